//! The target registry built from the configuration: targets, their LUN tables, access lists
//! and CHAP, as the login layer's [`Directory`].
//!
//! Building is split in two so the configuration logic is testable on its own: [`plan`] turns a
//! [`Config`] into inspectable [`TargetPlan`]s (identities, paths, policies), and
//! [`Registry::from_plan`] attaches a LUN table to each (opening images, constructing
//! logical units).
//!
//! LUN identities come from `crate::identity` (re-exported here). Layering: the registry uses
//! `boot` (client disks of boot targets), never the other way round, and hands the session
//! layer the `settings:` section as plain data.
use crate::boot::{BootTarget, GoldenImage};
use crate::config::{build_acl, validate_iscsi_name, Config, ConfigError, SettingsConfig};
pub use crate::identity::{default_serial, lu_identity, naa_identifier, revision, PRODUCT, VENDOR};
use crate::login::{AuthPolicy, ChapCredentials, Directory, TargetEntry, TargetLookup};
use crate::scsi::{LogicalUnit, LuIdentity, LunTable};
use crate::storage::s3::{ChunkCache, Location, RetryPolicy, S3Connection, S3Store};
use crate::storage::{BlockStore, FileStore};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Target portal group tag of the first portal (and of a connection on no configured portal).
pub const PORTAL_GROUP_TAG: u16 = 1;

/// Everything about one LUN except the opened store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunPlan {
    pub lun: u16,
    /// Resolved path (relative images resolved against the config file's directory).
    pub image: PathBuf,
    pub read_only: bool,
    pub block_size: u32,
    /// Reported physical block size (512e: 4096 over 512), at least `block_size`.
    pub physical_block_size: u32,
    pub thin: bool,
    pub removable: bool,
    /// Create a sparse image of this size if `image` is missing.
    pub create_size: Option<u64>,
    pub identity: LuIdentity,
}

/// Everything about one target except its LUN table.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    pub name: String,
    pub alias: Option<String>,
    /// The initiator globs as written.
    pub initiators: Vec<String>,
    pub acl: globset::GlobSet,
    /// Source address rules: (initiator glob, allowed networks), first match decides.
    pub sources: Vec<(globset::GlobMatcher, Vec<ipnet::IpNet>)>,
    pub chap: Option<ChapCredentials>,
    pub luns: Vec<LunPlan>,
}

impl TargetPlan {
    /// Whether `initiator` may see and log in to this target.
    pub fn allows(&self, initiator: &str) -> bool {
        self.acl.is_match(initiator)
    }

    /// Whether `initiator` may log in from `peer` (the `sources` rules; none = anywhere).
    pub fn source_allowed(&self, initiator: &str, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        match self.sources.iter().find(|(g, _)| g.is_match(initiator)) {
            Some((_, nets)) => nets.iter().any(|n| n.contains(&peer)),
            None => true,
        }
    }

    fn policy(&self) -> AuthPolicy {
        self.chap.clone().map_or(AuthPolicy::None, AuthPolicy::Chap)
    }
}

/// The whole plan: targets plus server-wide items.
#[derive(Debug, Clone)]
pub struct Plan {
    pub portals: Vec<SocketAddr>,
    pub settings: SettingsConfig,
    pub discovery_chap: Option<ChapCredentials>,
    pub targets: Vec<TargetPlan>,
}

/// Turn a validated config into a plan. Pure: touches no files.
pub fn plan(config: &Config) -> Result<Plan, ConfigError> {
    let file = config.source.as_str();
    let mut targets = Vec::with_capacity(config.targets.len());
    for (ti, t) in config.targets.iter().enumerate() {
        let acl = build_acl(&t.initiators)
            .map_err(|m| ConfigError::invalid(file, format!("targets[{ti}].initiators"), m))?;
        let mut luns = Vec::with_capacity(t.luns.len());
        for (li, l) in t.luns.iter().enumerate() {
            let lun = u16::try_from(l.lun)
                .ok()
                .filter(|&n| u32::from(n) <= crate::config::MAX_LUN)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        file,
                        format!("targets[{ti}].luns[{li}]"),
                        format!("LUN {} is above {}", l.lun, crate::config::MAX_LUN),
                    )
                })?;
            luns.push(LunPlan {
                lun,
                image: config.image_path(&l.image),
                read_only: l.read_only,
                block_size: l.block_size,
                physical_block_size: l.physical_block_size.unwrap_or(l.block_size),
                thin: l.thin,
                removable: l.removable,
                create_size: l.create_size.map(|s| s.0),
                identity: crate::scsi::LuIdentity {
                    naa: crate::identity::naa_in(
                        l.identity.or(t.identity).unwrap_or_default(),
                        &t.name,
                        lun,
                    ),
                    ..lu_identity(&t.name, lun, l.serial.as_deref())
                },
            });
        }
        let mut sources = Vec::new();
        for (glob, nets) in &t.sources {
            let m = globset::GlobBuilder::new(glob)
                .case_insensitive(true)
                .build()
                .map_err(|e| {
                    ConfigError::invalid(file, format!("targets[{ti}].sources"), e.to_string())
                })?
                .compile_matcher();
            let nets = nets
                .iter()
                .map(|n| crate::config::parse_source(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| ConfigError::invalid(file, format!("targets[{ti}].sources"), m))?;
            sources.push((m, nets));
        }
        // Exact names before globs, so a per-machine rule wins over a "*" rule.
        sources.sort_by_key(|(m, _)| m.glob().glob().contains(['*', '?', '[', '{']));
        targets.push(TargetPlan {
            name: t.name.clone(),
            alias: t.alias.clone(),
            initiators: t.initiators.clone(),
            acl,
            sources,
            chap: t.chap.as_ref().map(ChapCredentials::from),
            luns,
        });
    }
    Ok(Plan {
        portals: config.portal_addrs(),
        settings: config.settings.clone(),
        discovery_chap: config.discovery.chap.as_ref().map(ChapCredentials::from),
        targets,
    })
}

/// Open (or create, when `create_size` is set and the image is missing) a LUN's image.
pub fn open_store(file: &str, path: &str, lun: &LunPlan) -> Result<FileStore, ConfigError> {
    let bad = |m: String| ConfigError::invalid(file, path, m);
    if let Some(size) = lun.create_size {
        if !lun.image.exists() {
            if let Some(dir) = lun.image.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| bad(format!("creating {}: {e}", dir.display())))?;
            }
            FileStore::create(&lun.image, size).map_err(|e| bad(format!("creating image: {e}")))?;
            tracing::info!(image = %lun.image.display(), size, "created sparse image");
        }
    }
    FileStore::open(&lun.image, lun.block_size, lun.read_only)
        .map(|s| s.with_thin(lun.thin))
        .map_err(|e| bad(format!("opening image: {e}")))
}

/// Construct the logical unit of a LUN (the one place that calls into the SCSI layer).
/// Persistent reservations with APTPL = 1 of the LU with this NAA identifier live in
/// `STATE_DIR/pr/<NAA id in hex>.pr` (the identifier is stable across restarts and reloads).
pub fn pr_file(state_dir: &Path, identity: &LuIdentity) -> PathBuf {
    let hex: String = identity.naa.iter().map(|b| format!("{b:02x}")).collect();
    state_dir.join("pr").join(format!("{hex}.pr"))
}

fn build_lu(
    store: Arc<dyn BlockStore>,
    lun: &LunPlan,
    state_dir: &Path,
    sanitize_rate: u64,
) -> LogicalUnit {
    // Largest single transfer: 32 MiB whatever the block size (bounds one command's buffer;
    // UEFI reads up to 8 MiB at once, libiscsi's WRITE SAME tests write 65536 blocks).
    let opts = crate::scsi::LuOptions {
        removable: lun.removable,
        max_transfer_blocks: (32 << 20) / lun.block_size.max(512),
        physical_block_exponent: crate::scsi::physical_exponent(
            lun.block_size,
            lun.physical_block_size,
        ),
        pr_file: Some(pr_file(state_dir, &lun.identity)),
        sanitize_rate,
        ..Default::default()
    };
    let lu = LogicalUnit::with_options(store, lun.identity.clone(), opts);
    match lu.restore_pr() {
        Ok(true) => {
            tracing::info!(image = %lun.image.display(), lun = lun.lun, "persistent reservations restored (APTPL)")
        }
        Ok(false) => {}
        // Starting without them beats not serving the disk; the operator must know.
        Err(e) => {
            tracing::error!(image = %lun.image.display(), lun = lun.lun, error = %e, "persistent reservations NOT restored")
        }
    }
    lu
}

/// Open every image of `target` and build its LUN table.
pub fn open_luns(
    file: &str,
    ti: usize,
    target: &TargetPlan,
    state_dir: &Path,
    sanitize_rate: u64,
) -> Result<Arc<LunTable>, ConfigError> {
    let mut map = BTreeMap::new();
    for (li, l) in target.luns.iter().enumerate() {
        let store = open_store(file, &format!("targets[{ti}].luns[{li}]"), l)?;
        map.insert(
            l.lun,
            Arc::new(build_lu(Arc::new(store), l, state_dir, sanitize_rate)),
        );
    }
    Ok(Arc::new(LunTable::new(map)))
}

struct Target {
    plan: TargetPlan,
    luns: Arc<LunTable>,
    /// Set for boot targets: each client gets its own disk (crate::boot).
    boot: Option<Arc<BootTarget>>,
}

/// The configured targets.
pub struct Registry {
    targets: Vec<Target>,
    portals: Vec<SocketAddr>,
    settings: SettingsConfig,
    discovery_chap: Option<ChapCredentials>,
    state_dir: PathBuf,
    boot_http: Option<crate::config::BootHttpConfig>,
    /// The node's chunk cache, when some image is in an object store.
    chunk_cache: Option<Arc<ChunkCache>>,
    /// The images served from object stores.
    s3_stores: Vec<Arc<S3Store>>,
}

impl Registry {
    /// Open every image (creating missing ones that have `create_size`) and build the targets.
    pub fn from_config(config: &Config) -> Result<Registry, ConfigError> {
        Registry::from_config_reusing(config, None).map(|(r, _)| r)
    }

    /// [`Registry::from_config`] for a reload: a plain target whose LUNs are configured
    /// exactly as in `old` keeps `old`'s LUN table, and an unchanged LUN of a changed target
    /// keeps its [`LogicalUnit`], so reservations, unit attentions, mode pages and the COMPARE
    /// AND WRITE lock never fork between sessions from before and after the reload. Also
    /// returns the names of the plain targets of `old` whose LUNs changed (or that are gone):
    /// their sessions must be fenced ([`Registry::fence`]).
    pub fn from_config_reusing(
        config: &Config,
        old: Option<&Registry>,
    ) -> Result<(Registry, Vec<String>), ConfigError> {
        let file = config.source.clone();
        let state_dir = config.state_path();
        let rate = config.settings.sanitize_overwrite_rate.0;
        let mut changed = Vec::new();
        let registry = Registry::from_plan(plan(config)?, |ti, t| {
            if config.targets.get(ti).is_some_and(|tc| tc.boot.is_some()) {
                return Ok(Arc::new(LunTable::new(BTreeMap::new())));
            }
            let Some(prev) = old
                .and_then(|o| o.find(&t.name))
                .filter(|p| p.boot.is_none())
            else {
                return open_luns(&file, ti, t, &state_dir, rate);
            };
            if prev.plan.luns == t.luns {
                return Ok(Arc::clone(&prev.luns));
            }
            changed.push(prev.plan.name.clone());
            let mut map = BTreeMap::new();
            for (li, l) in t.luns.iter().enumerate() {
                let same = prev
                    .plan
                    .luns
                    .iter()
                    .find(|p| *p == l)
                    .and_then(|p| prev.luns.luns.get(&p.lun));
                let lu = match same {
                    Some(lu) => Arc::clone(lu),
                    None => {
                        let store = open_store(&file, &format!("targets[{ti}].luns[{li}]"), l)?;
                        Arc::new(build_lu(Arc::new(store), l, &state_dir, rate))
                    }
                };
                map.insert(l.lun, lu);
            }
            Ok(Arc::new(LunTable::new(map)))
        })?;
        if let Some(old) = old {
            for t in old.targets.iter().filter(|t| t.boot.is_none()) {
                let kept = config
                    .targets
                    .iter()
                    .any(|c| c.boot.is_none() && c.name.eq_ignore_ascii_case(&t.plan.name));
                if !kept {
                    changed.push(t.plan.name.clone());
                }
            }
        }
        let registry = registry.finish_boot(config, &file)?;
        registry.announce_port_groups();
        Ok((registry, changed))
    }

    /// Fence the sessions of a target whose LUNs a reload changed: every logical unit they
    /// may still address gets a unit attention (SPC-4 §6.33: REPORTED LUNS DATA HAS CHANGED,
    /// 3F/0E) before the sessions are asked to log out, so they log in again to the new
    /// LUN table instead of living beside it.
    pub fn fence(&self, target: &str) {
        if let Some(t) = self.find(target).filter(|t| t.boot.is_none()) {
            for lu in t.luns.luns.values() {
                lu.unit_attention_all(0x3f, 0x0e);
            }
        }
    }

    /// Attach the boot targets' client disks (golden images opened once).
    fn finish_boot(self, config: &Config, file: &str) -> Result<Registry, ConfigError> {
        let mut registry = self;
        registry.state_dir = config.state_path();
        registry.boot_http = config.boot_http.clone();
        if config.targets.iter().all(|t| t.boot.is_none()) {
            return Ok(registry);
        }
        // Golden images, opened read-only once (created first when create_size says so).
        let mut images = BTreeMap::new();
        for (i, im) in config.images.iter().enumerate() {
            if let Some(s3) = &im.s3 {
                let cache = match &registry.chunk_cache {
                    Some(c) => c.clone(),
                    None => {
                        let c = node_chunk_cache(config)
                            .map_err(|m| ConfigError::invalid(file, "chunk_cache", m))?;
                        registry.chunk_cache = Some(c.clone());
                        c
                    }
                };
                let (mut golden, store) = open_s3_image(config, &im.name, s3, im.block_size, cache)
                    .map_err(|m| ConfigError::invalid(file, format!("images[{i}].s3"), m))?;
                golden.physical_block_size = im.physical_block_size.unwrap_or(im.block_size);
                // Following a catalogue pointer: a series whose clients move to the version
                // the pointer names at their next boot (cluster::catalogue).
                golden.version = s3.resolved_seq;
                registry.s3_stores.push(store);
                images.insert(im.name.clone(), Arc::new(golden));
                continue;
            }
            let path = config.image_path(&im.path);
            let as_lun = LunPlan {
                lun: 0,
                image: path.clone(),
                read_only: true,
                block_size: im.block_size,
                physical_block_size: im.physical_block_size.unwrap_or(im.block_size),
                thin: true,
                removable: false,
                create_size: im.create_size.map(|s| s.0),
                identity: lu_identity(&im.name, 0, None),
            };
            if as_lun.create_size.is_some() && !path.exists() {
                open_store(
                    file,
                    &format!("images[{i}]"),
                    &LunPlan {
                        read_only: false,
                        ..as_lun.clone()
                    },
                )?;
            }
            let mut golden = GoldenImage::open(&im.name, &path, im.block_size)
                .map_err(|m| ConfigError::invalid(file, format!("images[{i}]"), m))?;
            golden.physical_block_size = im.physical_block_size.unwrap_or(im.block_size);
            golden.store = crate::storage::readahead::start(
                golden.store.clone(),
                &path,
                &golden.id,
                &im.name,
                &registry.state_dir,
                crate::storage::readahead::ReadAheadConfig {
                    window: std::time::Duration::from_secs(config.settings.boot_readahead_secs),
                    max_bytes: config.settings.boot_readahead_max.0,
                },
            );
            images.insert(im.name.clone(), Arc::new(golden));
        }
        // Versioned images (`name`, `name@N`, `name:channel` not in `images:`), resolved
        // now: a reload after a commit, rollback or channel change picks the new version,
        // which clients take at their next boot (docs/images.md).
        for (ti, tc) in config.targets.iter().enumerate() {
            let Some(boot) = &tc.boot else { continue };
            let mut specs: Vec<(&str, String)> = Vec::new();
            for (i, b) in boot.bindings.iter().enumerate() {
                let p = format!("targets[{ti}].boot.bindings[{i}]");
                specs.push((b.image.as_str(), format!("{p}.image")));
                for d in &b.disks {
                    specs.push((d.image.as_str(), format!("{p}.disks[lun {}].image", d.lun)));
                }
            }
            if let Some(d) = &boot.default {
                let p = format!("targets[{ti}].boot.default");
                specs.push((d.image.as_str(), format!("{p}.image")));
                for x in &d.disks {
                    specs.push((x.image.as_str(), format!("{p}.disks[lun {}].image", x.lun)));
                }
            }
            for (spec, p) in specs {
                if images.contains_key(spec) {
                    continue;
                }
                let golden = GoldenImage::open_version(&registry.state_dir, spec).map_err(|m| {
                    ConfigError::invalid(
                        file,
                        p,
                        format!("image {spec:?} is neither in images: nor a versioned image: {m}"),
                    )
                })?;
                images.insert(spec.to_string(), Arc::new(golden));
            }
        }
        let shared = shared_disks(config, file)?;
        for (ti, tc) in config.targets.iter().enumerate() {
            let Some(boot) = &tc.boot else { continue };
            let (bindings, default) =
                crate::boot::plan_bindings(file, &format!("targets[{ti}].boot"), boot, &images)?;
            if let Some(t) = registry.targets.get_mut(ti) {
                let mut bt = BootTarget::new(
                    &tc.name,
                    bindings,
                    default,
                    registry.state_dir.clone(),
                    std::time::Duration::from_secs(registry.settings.reboot_gap_secs),
                )
                .with_images(images.clone())
                .with_shared_disks(shared.clone());
                bt.identity = tc.identity.unwrap_or_default();
                t.boot = Some(Arc::new(bt));
            }
        }
        Ok(registry)
    }

    /// Keep the client disks of `old` whose bindings did not change (configuration reload:
    /// their overlays stay open and their sessions undisturbed).
    pub fn adopt_clients(&self, old: &Registry) {
        for t in &self.targets {
            if let (Some(new), Some(prev)) = (&t.boot, old.boot_target(&t.plan.name)) {
                new.adopt(&prev);
            }
        }
    }

    /// The boot target named `target`, if it is one.
    pub fn boot_target(&self, target: &str) -> Option<Arc<BootTarget>> {
        self.find(target).and_then(|t| t.boot.clone())
    }

    /// Every boot target.
    pub fn boot_targets(&self) -> Vec<Arc<BootTarget>> {
        self.targets.iter().filter_map(|t| t.boot.clone()).collect()
    }

    /// The node's chunk cache (images in object stores), if any.
    pub fn chunk_cache(&self) -> Option<&Arc<ChunkCache>> {
        self.chunk_cache.as_ref()
    }

    /// The images served from object stores.
    pub fn s3_stores(&self) -> &[Arc<S3Store>] {
        &self.s3_stores
    }

    /// The state directory (overlays, control socket).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The boot script endpoint's configuration, if enabled.
    pub fn boot_http(&self) -> Option<&crate::config::BootHttpConfig> {
        self.boot_http.as_ref()
    }

    /// Build from a plan with a caller-supplied LUN table builder (`(target index, plan)`);
    /// tests pass one that returns empty tables.
    pub fn from_plan(
        plan: Plan,
        mut luns: impl FnMut(usize, &TargetPlan) -> Result<Arc<LunTable>, ConfigError>,
    ) -> Result<Registry, ConfigError> {
        let mut targets = Vec::with_capacity(plan.targets.len());
        for (ti, t) in plan.targets.into_iter().enumerate() {
            let table = luns(ti, &t)?;
            targets.push(Target {
                plan: t,
                luns: table,
                boot: None,
            });
        }
        Ok(Registry {
            targets,
            portals: plan.portals,
            settings: plan.settings,
            discovery_chap: plan.discovery_chap,
            state_dir: PathBuf::from("state"),
            boot_http: None,
            chunk_cache: None,
            s3_stores: Vec::new(),
        })
    }

    /// Quick mode: one image as LUN 0 of `target_name`, open to every initiator, no CHAP,
    /// default settings and portal (the caller overrides portals with `with_portals`).
    pub fn quick(
        image: &Path,
        target_name: &str,
        read_only: bool,
        block_size: u32,
    ) -> Result<Registry, ConfigError> {
        let config = quick_config(image, target_name, read_only, block_size)?;
        Registry::from_config(&config)
    }

    /// Replace the portals (the `--listen` option).
    pub fn with_portals(mut self, portals: Vec<SocketAddr>) -> Registry {
        self.portals = portals;
        self.announce_port_groups();
        self
    }

    /// The LUNs of `target`, if it exists and is not a boot target (boot targets give each
    /// client its own: see [`Registry::boot_target`]).
    pub fn luns(&self, target: &str) -> Option<Arc<LunTable>> {
        self.find(target)
            .filter(|t| t.boot.is_none())
            .map(|t| Arc::clone(&t.luns))
    }

    /// The target plans (names, ACLs, LUN identities), in configuration order.
    pub fn targets(&self) -> impl Iterator<Item = &TargetPlan> {
        self.targets.iter().map(|t| &t.plan)
    }

    pub fn portals(&self) -> &[SocketAddr] {
        &self.portals
    }

    /// The `settings:` section (the session layer turns it into its runtime settings).
    pub fn settings(&self) -> &SettingsConfig {
        &self.settings
    }

    fn find(&self, target: &str) -> Option<&Target> {
        // iSCSI names compare case-insensitively (stringprep lowercases them, RFC 3722).
        self.targets
            .iter()
            .find(|t| t.plan.name.eq_ignore_ascii_case(target))
    }

    /// Tell every plain LUN how many portal groups (target port groups) reach it.
    fn announce_port_groups(&self) {
        let n = u16::try_from(self.portals.len()).unwrap_or(u16::MAX);
        for t in &self.targets {
            for lu in t.luns.luns.values() {
                lu.set_port_groups(n);
            }
        }
    }

    /// The target portal group tag of the portal a connection arrived on: each configured
    /// portal is its own group, numbered from 1 in configuration order (RFC 7143 §13.9); the
    /// SCSI layer uses it as relative target port and target port group (MPIO).
    pub fn tpgt_of(&self, local: SocketAddr) -> u16 {
        let ip = canonical(local.ip());
        self.portals
            .iter()
            .position(|p| {
                p.port() == local.port() && (p.ip().is_unspecified() || canonical(p.ip()) == ip)
            })
            .and_then(|i| u16::try_from(i + 1).ok())
            .unwrap_or(PORTAL_GROUP_TAG)
    }

    /// TargetAddress values for a SendTargets answer (RFC 7143 Appendix C, §13.8):
    /// "ip:port,tpgt". A wildcard portal is reported with the address the initiator reached us
    /// on, since 0.0.0.0 means nothing to it.
    pub fn target_addresses(&self, local: SocketAddr) -> Vec<String> {
        let local_ip = canonical(local.ip());
        let mut out: Vec<String> = Vec::new();
        for (i, p) in self.portals.iter().enumerate() {
            let tag = u16::try_from(i + 1).unwrap_or(u16::MAX);
            let ip = if p.ip().is_unspecified() {
                local_ip
            } else {
                p.ip()
            };
            // Two wildcards on one port (0.0.0.0 and [::]) are one address: the first
            // portal's group, as `tpgt_of` answers for it.
            let at = SocketAddr::new(ip, p.port()).to_string();
            if !out
                .iter()
                .any(|a| a.rsplit_once(',').is_some_and(|(x, _)| x == at))
            {
                out.push(format!("{at},{tag}"));
            }
        }
        out
    }
}

/// An IPv4-mapped IPv6 address (a v4 client on a dual-stack [::] socket) as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The quick-mode target name for an image: `iqn.2026-11.org.diskless:<file stem>`, the stem
/// lowercased with anything outside a-z 0-9 '-' '.' replaced by '-'.
pub fn quick_target_name(image: &Path) -> String {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        clean.push_str("disk");
    }
    clean.truncate(150);
    format!("iqn.2026-11.org.diskless:{clean}")
}

/// The validated config quick mode serves.
pub fn quick_config(
    image: &Path,
    target_name: &str,
    read_only: bool,
    block_size: u32,
) -> Result<Config, ConfigError> {
    let config = Config::quick(image, target_name, read_only, block_size);
    if let Err(m) = validate_iscsi_name(target_name) {
        return Err(ConfigError::invalid("--target", "", m));
    }
    config.validate()?;
    Ok(config)
}

impl Directory for Registry {
    fn discovery_auth(&self, _initiator: &str) -> AuthPolicy {
        self.discovery_chap
            .clone()
            .map_or(AuthPolicy::None, AuthPolicy::Chap)
    }

    fn lookup(&self, initiator: &str, target: &str) -> TargetLookup {
        match self.find(target) {
            None => TargetLookup::NotFound,
            Some(t) if !t.plan.allows(initiator) => TargetLookup::NotAuthorized,
            // A boot target serves only initiators some binding (or the default) covers.
            Some(t) => match &t.boot {
                // A boot target serves only initiators some binding (or the default) covers;
                // a binding's own CHAP credentials (per-client CHAP) override the target's.
                Some(b) => match b.binding(initiator) {
                    None => TargetLookup::NotAuthorized,
                    Some(bd) => match &bd.chap {
                        Some(c) => TargetLookup::Allowed(AuthPolicy::Chap(c.clone())),
                        None => TargetLookup::Allowed(t.plan.policy()),
                    },
                },
                None => TargetLookup::Allowed(t.plan.policy()),
            },
        }
    }

    fn visible_targets(&self, initiator: &str, local: SocketAddr) -> Vec<TargetEntry> {
        let addresses = self.target_addresses(local);
        self.targets
            .iter()
            .filter(|t| t.plan.allows(initiator))
            .filter(|t| {
                t.boot
                    .as_ref()
                    .is_none_or(|b| b.binding(initiator).is_some())
            })
            .map(|t| TargetEntry {
                name: t.plan.name.clone(),
                addresses: addresses.clone(),
            })
            .collect()
    }

    fn target_alias(&self, target: &str) -> Option<String> {
        self.find(target).and_then(|t| t.plan.alias.clone())
    }

    fn source_allowed(&self, initiator: &str, target: &str, peer: IpAddr) -> bool {
        self.find(target)
            .is_none_or(|t| t.plan.source_allowed(initiator, peer))
    }

    fn portal_group_tag(&self, local: SocketAddr) -> u16 {
        self.tpgt_of(local)
    }
}

/// The node's one chunk cache, kept across configuration reloads while its directory and
/// sizes stay the same (a new cache would forget the disk tier's files).
fn node_chunk_cache(config: &Config) -> Result<Arc<ChunkCache>, String> {
    /// (directory, memory bytes, disk bytes, the cache).
    type Node = (PathBuf, u64, u64, Arc<ChunkCache>);
    static NODE: std::sync::Mutex<Option<Node>> = std::sync::Mutex::new(None);
    let dir = config.state_path().join("chunk-cache");
    let (mem, disk) = (config.chunk_cache.memory.0, config.chunk_cache.disk.0);
    let mut node = NODE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((d, m, k, c)) = node.as_ref() {
        if *d == dir && *m == mem && *k == disk {
            return Ok(c.clone());
        }
    }
    let cache = ChunkCache::new(mem, (disk > 0).then_some((dir.as_path(), disk)))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let cache = Arc::new(cache);
    *node = Some((dir, mem, disk, cache.clone()));
    Ok(cache)
}

/// The RBD client disks of the images with `rbd:` (None: every disk is node-local).
#[cfg(feature = "rbd")]
fn shared_disks(
    config: &Config,
    _file: &str,
) -> Result<Option<Arc<dyn crate::storage::SharedDisks>>, ConfigError> {
    let Some(r) = &config.rbd else {
        return Ok(None);
    };
    let parents: BTreeMap<String, (String, String)> = config
        .images
        .iter()
        .filter_map(|im| {
            let (i, s) = im.rbd.as_ref()?.parent_parts()?;
            Some((im.name.clone(), (i.to_string(), s.to_string())))
        })
        .collect();
    let connect = crate::storage::rbd::RbdConnect {
        conf: config.image_path(&r.conf),
        id: r.id.clone(),
        keyring: r.keyring.as_ref().map(|k| config.image_path(k)),
        pool: r.pool.clone(),
    };
    Ok(Some(Arc::new(crate::storage::rbd::RbdClientDisks::new(
        connect, &r.prefix, parents,
    ))))
}

/// Without the `rbd` feature an `rbd:` section cannot be served.
#[cfg(not(feature = "rbd"))]
fn shared_disks(
    config: &Config,
    file: &str,
) -> Result<Option<Arc<dyn crate::storage::SharedDisks>>, ConfigError> {
    if config.rbd.is_some() || config.images.iter().any(|i| i.rbd.is_some()) {
        return Err(ConfigError::invalid(
            file,
            "rbd",
            "this build has no Ceph RBD support (build with `cargo build --features rbd`)",
        ));
    }
    Ok(None)
}

/// Where an `images[].s3` entry lives: a client for its store, its location, the retry
/// policy (also used by `diskless image push`).
pub fn s3_target(
    config: &Config,
    name: &str,
    s3: &crate::config::S3ImageConfig,
) -> Result<(Arc<dyn object_store::ObjectStore>, Location, RetryPolicy), String> {
    let creds = s3.credentials(|p| config.image_path(p))?;
    let conn = S3Connection {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        region: s3.region.clone(),
        access_key_id: creds.access_key_id,
        secret_access_key: creds.secret_access_key,
        session_token: creds.session_token,
    };
    let policy = RetryPolicy {
        timeout: std::time::Duration::from_secs(s3.timeout_secs),
        retries: s3.retries,
        ..RetryPolicy::default()
    };
    let store = conn.connect(policy.timeout).map_err(|e| e.to_string())?;
    let location = Location {
        prefix: s3.prefix.clone(),
        image: s3.image.clone().unwrap_or_else(|| name.to_string()),
        version: s3.version.clone(),
    };
    Ok((store, location, policy))
}

/// Open one image version from an object store (fetches and checks its manifest).
fn open_s3_image(
    config: &Config,
    name: &str,
    s3: &crate::config::S3ImageConfig,
    block_size: u32,
    cache: Arc<ChunkCache>,
) -> Result<(GoldenImage, Arc<S3Store>), String> {
    let (store, location, policy) = s3_target(config, name, s3)?;
    let key = format!(
        "{}/{}",
        s3.bucket,
        location
            .manifest()
            .as_ref()
            .trim_end_matches("/manifest.json")
    );
    let opened =
        S3Store::open(store, location, &key, cache.clone(), policy).map_err(|e| e.to_string())?;
    if opened.block_size() != block_size {
        return Err(format!(
            "{key}: the version has block size {}, the configuration says {block_size}",
            opened.block_size()
        ));
    }
    let opened = Arc::new(opened);
    let mut golden = GoldenImage::from_store(
        name,
        PathBuf::from(format!("s3://{key}")),
        block_size,
        opened.clone(),
        format!("s3|{}|{key}|{}", s3.endpoint, opened.size()),
    );
    // Following a catalogue pointer (resolved: `version` names what it points at now).
    if s3.resolved_seq.is_some() {
        let (config, name, s3) = (config.clone(), name.to_string(), s3.clone());
        golden.older = Some(Arc::new(move |id: &str, seq: u64| {
            open_recorded_s3(&config, &name, &s3, block_size, cache.clone(), id, seq)
        }));
    }
    Ok((golden, opened))
}

/// The version of an object-store image a persistent disk recorded (`id`, the golden id its
/// overlay was made on: `s3|ENDPOINT|BUCKET/PREFIX/IMAGE/VERSION|SIZE`), opened again after
/// the catalogue pointer left it: versions are immutable in the store, and its chunks go
/// through the node's chunk cache like the pointer's version (docs/scale-out.md, "Image
/// catalogue").
fn open_recorded_s3(
    config: &Config,
    name: &str,
    s3: &crate::config::S3ImageConfig,
    block_size: u32,
    cache: Arc<ChunkCache>,
    id: &str,
    seq: u64,
) -> Result<GoldenImage, String> {
    let mut parts = id.split('|');
    let (Some("s3"), Some(endpoint), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{id:?} is not a version in an object store"));
    };
    if endpoint != s3.endpoint {
        return Err(format!(
            "the disk was made on {endpoint}, this node reads {}",
            s3.endpoint
        ));
    }
    let version = key
        .rsplit('/')
        .next()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{id:?} names no version"))?;
    let mut older = s3.clone();
    older.version = version.to_string();
    older.channel = None;
    older.resolved_seq = None;
    let (mut golden, _) = open_s3_image(config, name, &older, block_size, cache)?;
    if golden.id != id {
        return Err(format!(
            "the store has {}, the disk was made on {id}",
            golden.id
        ));
    }
    golden.version = Some(seq);
    golden.older = None;
    Ok(golden)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "
portals: [\"0.0.0.0:3260\", \"192.168.1.5:3261\"]
discovery:
  chap: {user: disc, secret: discoverysecret}
targets:
  - name: iqn.2026-11.org.diskless:open
    alias: open disk
    luns:
      - {lun: 0, image: a.img, create_size: 1MiB}
      - {lun: 3, image: /abs/b.img, create_size: 1MiB, serial: MYSERIAL, block_size: 4096}
  - name: iqn.2026-11.org.diskless:ipxe
    initiators: [\"iqn.2010-04.org.ipxe:*\"]
    chap: {user: boot, secret: bootsecret123}
    luns:
      - {lun: 0, image: c.img, create_size: 1MiB, read_only: true}
";

    fn registry(yaml: &str) -> Registry {
        let c = Config::from_yaml(yaml, "t.yaml", Path::new("/cfg")).unwrap();
        Registry::from_plan(plan(&c).unwrap(), |_, _| {
            Ok(Arc::new(LunTable::new(BTreeMap::new())))
        })
        .unwrap()
    }

    #[test]
    fn identities_are_stable_and_distinct() {
        let a = lu_identity("iqn.2026-11.org.x:a", 0, None);
        let b = lu_identity("iqn.2026-11.org.x:a", 1, None);
        let c = lu_identity("iqn.2026-11.org.x:b", 0, None);
        assert_eq!(a, lu_identity("iqn.2026-11.org.x:a", 0, None));
        assert_ne!(a.naa, b.naa);
        assert_ne!(a.naa, c.naa);
        assert_ne!(a.serial, b.serial);
        assert_eq!(a.serial.len(), 16);
        assert!(a.serial.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.naa[0] >> 4, 6);
        assert_eq!((a.vendor.as_str(), a.product.as_str()), (VENDOR, PRODUCT));
        assert!(!a.revision.is_empty() && a.revision.len() <= 4);
        assert_eq!(
            lu_identity("iqn.2026-11.org.x:a", 0, Some("S1")).serial,
            "S1"
        );
    }

    #[test]
    fn identity_key_picks_the_naa_form() {
        let yaml = "
targets:
  - name: iqn.2026-11.org.diskless:old
    luns:
      - {lun: 0, image: a.img, create_size: 1MiB}
      - {lun: 1, image: b.img, create_size: 1MiB, identity: naa3}
  - name: iqn.2026-11.org.diskless:new
    identity: naa3
    luns:
      - {lun: 0, image: c.img, create_size: 1MiB}
      - {lun: 1, image: d.img, create_size: 1MiB, identity: legacy}
";
        let c = Config::from_yaml(yaml, "t.yaml", Path::new("/cfg")).unwrap();
        let p = plan(&c).unwrap();
        let nibbles: Vec<Vec<u8>> = p
            .targets
            .iter()
            .map(|t| t.luns.iter().map(|l| l.identity.naa[0] >> 4).collect())
            .collect();
        assert_eq!(nibbles, vec![vec![6, 3], vec![3, 6]]);
        // The default form is the one every earlier version reported.
        let old = &p.targets[0].luns[0].identity;
        assert_eq!(old.naa, naa_identifier("iqn.2026-11.org.diskless:old", 0));
        let bad = Config::from_yaml(
            "targets: [{name: iqn.2026-11.org.x:y, identity: naa6, \
             luns: [{lun: 0, image: a.img, create_size: 1MiB}]}]",
            "t.yaml",
            Path::new("/cfg"),
        );
        assert!(bad.is_err_and(|e| e.to_string().contains("naa6")));
    }

    #[test]
    fn plan_resolves_paths_and_identities() {
        let c = Config::from_yaml(YAML, "t.yaml", Path::new("/cfg")).unwrap();
        let p = plan(&c).unwrap();
        assert_eq!(p.targets.len(), 2);
        let t0 = &p.targets[0];
        assert_eq!(t0.luns[0].image, Path::new("/cfg/a.img"));
        assert_eq!(t0.luns[1].image, Path::new("/abs/b.img"));
        assert_eq!(t0.luns[1].lun, 3);
        assert_eq!(t0.luns[1].block_size, 4096);
        assert_eq!(t0.luns[1].identity.serial, "MYSERIAL");
        assert_eq!(t0.luns[0].create_size, Some(1 << 20));
        assert!(p.targets[1].luns[0].read_only);
        assert_eq!(
            p.discovery_chap.as_ref().map(|c| c.user.as_str()),
            Some("disc")
        );
    }

    #[test]
    fn directory_lookup_and_acl() {
        let r = registry(YAML);
        let ipxe = "iqn.2010-04.org.ipxe:00112233";
        let other = "iqn.1994-05.com.redhat:abc";
        assert_eq!(
            r.lookup(other, "iqn.2026-11.org.diskless:nope"),
            TargetLookup::NotFound
        );
        assert_eq!(
            r.lookup(other, "iqn.2026-11.org.diskless:open"),
            TargetLookup::Allowed(AuthPolicy::None)
        );
        assert_eq!(
            r.lookup(other, "IQN.2026-11.org.diskless:OPEN"),
            TargetLookup::Allowed(AuthPolicy::None)
        );
        assert_eq!(
            r.lookup(other, "iqn.2026-11.org.diskless:ipxe"),
            TargetLookup::NotAuthorized
        );
        match r.lookup(ipxe, "iqn.2026-11.org.diskless:ipxe") {
            TargetLookup::Allowed(AuthPolicy::Chap(c)) => assert_eq!(c.user, "boot"),
            x => panic!("{x:?}"),
        }
        // Case-insensitive globs.
        assert!(matches!(
            r.lookup("IQN.2010-04.ORG.IPXE:X", "iqn.2026-11.org.diskless:ipxe"),
            TargetLookup::Allowed(_)
        ));
        assert!(matches!(r.discovery_auth(other), AuthPolicy::Chap(_)));
        assert_eq!(
            r.target_alias("iqn.2026-11.org.diskless:open").as_deref(),
            Some("open disk")
        );
        assert_eq!(r.target_alias("iqn.2026-11.org.diskless:ipxe"), None);
        assert!(r.luns("iqn.2026-11.org.diskless:open").is_some());
        assert!(r.luns("iqn.2026-11.org.diskless:nope").is_none());
        assert_eq!(r.portal_group_tag("10.0.0.1:3260".parse().unwrap()), 1);
    }

    #[test]
    fn visible_targets_filter_and_substitute_wildcards() {
        let r = registry(YAML);
        let local: SocketAddr = "10.1.2.3:3260".parse().unwrap();
        let v = r.visible_targets("iqn.1994-05.com.redhat:abc", local);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "iqn.2026-11.org.diskless:open");
        assert_eq!(
            v[0].addresses,
            vec!["10.1.2.3:3260,1", "192.168.1.5:3261,2"]
        );
        let v = r.visible_targets("iqn.2010-04.org.ipxe:x", local);
        assert_eq!(v.len(), 2);
        // A v4 client on a dual-stack socket.
        // Each portal is its own portal group (MPIO): the tag follows the portal.
        assert_eq!(r.tpgt_of("192.168.1.5:3261".parse().unwrap()), 2);
        assert_eq!(r.tpgt_of(local), 1);
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:3260".parse().unwrap();
        assert_eq!(r.target_addresses(mapped)[0], "10.1.2.3:3260,1");
        let r6 = registry(&YAML.replace(
            "\"0.0.0.0:3260\", \"192.168.1.5:3261\"",
            "\"[::]:3260\", \"0.0.0.0:3260\"",
        ));
        let local6: SocketAddr = "[fd00::1]:3260".parse().unwrap();
        assert_eq!(r6.target_addresses(local6), vec!["[fd00::1]:3260,1"]);
    }

    #[test]
    fn quick_names() {
        assert_eq!(
            quick_target_name(Path::new("/srv/Win 11_x64.img")),
            "iqn.2026-11.org.diskless:win-11-x64"
        );
        assert_eq!(
            quick_target_name(Path::new("/")),
            "iqn.2026-11.org.diskless:disk"
        );
        assert!(validate_iscsi_name(&quick_target_name(Path::new("/x/ÄÖ.img"))).is_ok());
        assert!(quick_config(
            Path::new("/nonexistent.img"),
            "iqn.2026-11.org.x:y",
            false,
            512
        )
        .is_err());
        assert!(quick_config(Path::new("/etc/hostname"), "bad name", false, 512).is_err());
    }

    #[test]
    fn open_store_creates_missing_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sub/demo.img");
        let yaml = format!(
            "targets:\n  - name: iqn.2026-11.org.x:y\n    luns:\n      - {{lun: 0, image: {}, create_size: 2MiB, thin: false}}\n",
            img.display()
        );
        let c = Config::from_yaml(&yaml, "t.yaml", dir.path()).unwrap();
        let p = plan(&c).unwrap();
        let s = open_store("t.yaml", "targets[0].luns[0]", &p.targets[0].luns[0]).unwrap();
        assert_eq!(s.size(), 2 << 20);
        assert!(!s.thin_provisioned());
        // Second open reuses the image.
        let s2 = open_store("t.yaml", "x", &p.targets[0].luns[0]).unwrap();
        assert_eq!(s2.size(), 2 << 20);
    }
}
