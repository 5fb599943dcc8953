//! `diskless image list|log|rollback|channel|flatten|gc|import|export` (docs/images.md).
//! Catalogue changes take effect for new boots once the running server reloads: the commands
//! ask it to (`reload` on the control socket) when it runs.

use super::CliError;
use crate::config::Config;
use crate::storage::versions::{self, Images, Stamp, VersionKind};
use clap::{Args, Subcommand};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the images live: the configuration's state directory, or `--state-dir`.
#[derive(Debug, Args, Clone)]
pub struct StateArgs {
    #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
    pub config: PathBuf,
    /// State directory (default: the configuration's state_dir).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// List versioned images (in a cluster, the catalogue's images too).
    List {
        #[command(flatten)]
        st: StateArgs,
    },
    /// The versions of an image: number, parent, time, author, size of the change, clients
    /// on it, message; which one is latest and which channels point where. For an image in
    /// an object store (an `images:` entry with `s3:`) of a cluster: its versions in the
    /// cluster's catalogue (etcd), the same on every node.
    Log {
        image: String,
        #[command(flatten)]
        st: StateArgs,
    },
    /// Make `latest` point at VERSION again (later versions stay until `image gc`). In a
    /// cluster's catalogue: a compare-and-swap in etcd; every node's new boots follow.
    Rollback {
        image: String,
        version: String,
        /// Only if latest names this version now (catalogue only).
        #[arg(long, value_name = "VERSION")]
        expect: Option<String>,
        #[command(flatten)]
        st: StateArgs,
    },
    /// Point a channel (e.g. test, production) at a version; bindings name it IMAGE:CHANNEL.
    Channel {
        image: String,
        channel: String,
        /// The version (omit with --remove).
        version: Option<String>,
        #[arg(long, conflicts_with = "version")]
        remove: bool,
        /// Only if the channel names this version now (catalogue only).
        #[arg(long, value_name = "VERSION")]
        expect: Option<String>,
        #[command(flatten)]
        st: StateArgs,
    },
    /// Rewrite a version (default: latest) as a flat file: same content, no chain below it.
    Flatten {
        image: String,
        version: Option<u64>,
        #[command(flatten)]
        st: StateArgs,
    },
    /// Delete versions nothing needs (never latest, a channel's, one a binding names, one a
    /// client boots now, one an overlay sits on) and files of interrupted commits. For an
    /// image in a cluster's catalogue: versions no pointer names and no client record uses,
    /// beyond the newest --keep (each marked deleting in etcd, then its objects deleted).
    Gc {
        image: String,
        /// Catalogue images: how many of the newest versions are always kept.
        #[arg(long, default_value_t = 3)]
        keep: usize,
        /// Catalogue images: print the plan, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        st: StateArgs,
    },
    /// Import a disk image (raw, qcow2, vhdx, vpc/VHD, vmdk: through `qemu-img convert`) as
    /// a new image, or as a new version of an existing one (same size).
    Import {
        image: String,
        file: PathBuf,
        /// Source format (default: qemu-img probes it; give it for raw files).
        #[arg(long)]
        format: Option<String>,
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        #[arg(short, long, default_value = "imported")]
        message: String,
        #[command(flatten)]
        st: StateArgs,
    },
    /// Export IMAGE, IMAGE@N or IMAGE:CHANNEL to a raw or qcow2 file (refuses to overwrite).
    Export {
        spec: String,
        out: PathBuf,
        #[arg(long, default_value = "raw")]
        format: String,
        #[command(flatten)]
        st: StateArgs,
    },
}

fn io(e: impl std::fmt::Display) -> CliError {
    CliError::Io(e.to_string())
}

fn state_dir(st: &StateArgs) -> Result<(PathBuf, Option<Config>), CliError> {
    if let Some(d) = &st.state_dir {
        return Ok((d.clone(), Config::load(&st.config).ok()));
    }
    let c = Config::load(&st.config)?;
    Ok((c.state_path(), Some(c)))
}

/// The operator's name for the log.
pub fn author() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into())
        .replace(char::is_whitespace, "_")
}

/// Ask a running server to reload (new boots take the change); say what happened.
fn tell_server(dir: &Path) -> String {
    match crate::control::request(&dir.join(crate::control::SOCKET), "reload") {
        Ok(Ok(_)) => "server reloaded: clients take it at their next boot".into(),
        Ok(Err(e)) => format!("server did not reload: {e}"),
        Err(_) => "server not running: takes effect when it starts".into(),
    }
}

/// Versions pinned offline: overlays in the state directory and versions the
/// configuration's bindings name with `@N`.
fn offline_pins(dir: &Path, config: Option<&Config>, image: &str) -> BTreeSet<u64> {
    let mut pins: BTreeSet<u64> = crate::boot::versions_in_use(dir, image)
        .into_keys()
        .collect();
    let log = Images::new(dir).log(image).ok();
    for t in config.iter().flat_map(|c| c.targets.iter()) {
        let Some(b) = &t.boot else { continue };
        // LUN 0 and every other disk of the bindings (docs/overlays.md, several disks).
        let specs =
            b.bindings
                .iter()
                .flat_map(|x| std::iter::once(&x.image).chain(x.disks.iter().map(|d| &d.image)))
                .chain(b.default.iter().flat_map(|d| {
                    std::iter::once(&d.image).chain(d.disks.iter().map(|x| &x.image))
                }))
                .map(String::as_str);
        for spec in specs {
            if let (Ok((n, sel)), Some(log)) = (versions::parse_spec(spec), &log) {
                if n == image {
                    pins.extend(log.resolve(&sel).ok());
                }
            }
        }
    }
    pins
}

/// A local version number.
fn number(v: &str) -> Result<u64, CliError> {
    v.parse().map_err(|_| {
        CliError::Io(format!(
            "version {v:?}: a local image's versions are numbers"
        ))
    })
}

/// When IMAGE is an `images:` entry in an object store (or its name in the bucket) and the
/// configuration has `cluster:`: the cluster and the image's name in the catalogue.
fn catalogue_of(st: &StateArgs, image: &str) -> Option<(crate::config::ClusterConfig, String)> {
    let c = Config::load(&st.config).ok()?;
    let cluster = c.cluster.clone()?;
    c.images.iter().find_map(|im| {
        let s3 = im.s3.as_ref()?;
        let name = s3.image_name(&im.name);
        (im.name == image || name == image).then(|| (cluster.clone(), name.to_string()))
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))
}

/// `image gc` of a catalogue image (docs/images.md, "Garbage collection in a cluster"): the
/// plan from the catalogue and the cluster's client records; each version is marked deleting
/// in etcd (compare-and-swap: a pointer moved to it meanwhile refuses the mark), then its
/// objects are deleted (the manifest first: a version without one is never read), then its
/// record.
fn catalogue_gc(
    st: &StateArgs,
    cc: &crate::config::ClusterConfig,
    name: &str,
    keep: usize,
    dry_run: bool,
) -> Result<(), CliError> {
    use crate::cluster::catalogue;
    use object_store::ObjectStoreExt;
    let c = Config::load(&st.config)?;
    // The `images:` entries on this image in the bucket (client records name the entry).
    let entries: Vec<&crate::config::ImageConfig> = c
        .images
        .iter()
        .filter(|im| {
            im.s3
                .as_ref()
                .is_some_and(|s| s.image_name(&im.name) == name)
        })
        .collect();
    let Some(first) = entries.first() else {
        return Err(CliError::Io(format!("no images: entry on {name}")));
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io)?;
    let entry = rt
        .block_on(catalogue::read_image_entry(cc, name))
        .map_err(io)?;
    let (records, _) = rt
        .block_on(crate::cluster::clients::read_all(cc))
        .map_err(io)?;
    let mut in_use = BTreeSet::new();
    for (key, bytes) in &records {
        let r = match serde_json::from_slice::<crate::boot::record::ClientRecord>(bytes) {
            Ok(r) => r,
            Err(e) => {
                return Err(CliError::Io(format!(
                    "client record {key} unreadable ({e}): nothing deleted"
                )))
            }
        };
        // `name` or `name@N`.
        let on = r.disk.image.split('@').next().unwrap_or_default();
        if entries.iter().any(|im| im.name == on) {
            if let Some(v) = r.disk.version {
                in_use.insert(v);
            }
        }
    }
    let plan = catalogue::gc_plan(&entry, keep, &in_use);
    let seqs: Vec<String> = in_use.iter().map(|v| format!("#{v}")).collect();
    println!(
        "{name}: {} versions, keeping the newest {keep}, those a pointer names and those client disks use ({})",
        entry.versions.len(),
        if seqs.is_empty() { "none".into() } else { seqs.join(" ") }
    );
    if plan.is_empty() {
        println!("nothing to delete");
        return Ok(());
    }
    for r in &plan {
        println!(
            "{} {name}@{} (#{})",
            if dry_run { "would delete" } else { "deleting" },
            r.version,
            r.seq
        );
    }
    if dry_run {
        return Ok(());
    }
    let first_s3 = first
        .s3
        .clone()
        .ok_or_else(|| CliError::Io("no s3".into()))?;
    let mut failed = 0;
    for r in &plan {
        if let Err(e) = rt.block_on(catalogue::mark_deleting(cc, name, &r.version)) {
            println!("kept {name}@{}: {e}", r.version);
            failed += 1;
            continue;
        }
        let mut s3 = first_s3.clone();
        s3.version = r.version.clone();
        s3.channel = None;
        let (store, location, _) =
            crate::registry::s3_target(&c, &first.name, &s3).map_err(CliError::Io)?;
        // Chunk objects live under the version's own name (`<version>/chunks/N`): no other
        // version shares them. All-zero chunks were never stored (NotFound is fine).
        let chunks = r.size.div_ceil(r.chunk_size.max(1));
        let deleted = rt.block_on(async {
            let mut paths = vec![location.manifest()];
            paths.extend((0..chunks).map(|i| location.chunk(i)));
            let mut n = 0u64;
            for p in &paths {
                match store.delete(p).await {
                    Ok(()) => n += 1,
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(n)
        });
        match deleted {
            Ok(n) => {
                rt.block_on(catalogue::forget(cc, name, &r.version))
                    .map_err(io)?;
                println!(
                    "deleted {name}@{} (#{}): its manifest and chunk objects ({n} keys)",
                    r.version, r.seq
                );
            }
            Err(e) => {
                println!(
                    "{name}@{} is marked deleting but its objects were not all deleted ({e}): run gc again",
                    r.version
                );
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(CliError::Io(format!("{failed} version(s) not deleted")));
    }
    Ok(())
}

/// Move a catalogue pointer; say what moved.
fn move_pointer(
    cc: &crate::config::ClusterConfig,
    image: &str,
    pointer: &str,
    to: Option<&str>,
    expect: Option<&str>,
) -> Result<(), CliError> {
    let by = author();
    let moved = runtime()?
        .block_on(crate::cluster::catalogue::move_pointer(
            cc,
            image,
            pointer,
            to,
            expect,
            &by,
            crate::boot::now_ms(),
        ))
        .map_err(|e| CliError::Io(e.to_string()))?;
    let was = moved.previous.as_deref().unwrap_or("unset");
    match (to, moved.unchanged) {
        (Some(v), true) => println!("{image}:{pointer} is {v} already (nothing changed)"),
        (None, true) => println!("{image}:{pointer} is not set (nothing changed)"),
        (Some(v), false) => println!(
            "{image}:{pointer} -> {v} (was {was}) in the catalogue of cluster {}: every node's clients take it at their next boot",
            cc.name
        ),
        (None, false) => println!("{image}:{pointer} removed (was {was})"),
    }
    Ok(())
}

/// The `image log` table of a catalogue image, newest first.
pub fn format_catalogue(image: &str, e: &crate::cluster::catalogue::ImageEntry) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let latest = e
        .pointers
        .get(crate::cluster::catalogue::LATEST)
        .map_or("-", |p| p.version.as_str());
    let _ = writeln!(
        out,
        "image {image} (catalogue): {} versions, latest = {latest}",
        e.versions.len()
    );
    let _ = writeln!(
        out,
        "{:>4} {:16} {:19} {:10} {:>10} {:>7} {:16}  MESSAGE",
        "SEQ", "VERSION", "TIME (UTC)", "AUTHOR", "SIZE", "CHUNK", "UID"
    );
    for v in e.in_order().iter().rev() {
        let tags: Vec<&str> = e
            .pointers
            .iter()
            .filter(|(_, p)| p.version == v.version)
            .map(|(n, _)| n.as_str())
            .collect();
        let tags = tag_suffix(&tags);
        let _ = writeln!(
            out,
            "{:>4} {:16} {:19} {:10} {:>10} {:>7} {:16}  {}{}",
            v.seq,
            v.version,
            crate::control::utc(v.time_ms),
            v.author,
            crate::config::ByteSize(v.size).to_string(),
            crate::config::ByteSize(v.chunk_size).to_string(),
            v.uid,
            v.message,
            tags
        );
    }
    for (n, p) in &e.pointers {
        if !e.versions.contains_key(&p.version) {
            let _ = writeln!(
                out,
                "warning: {n} names {}, not in the catalogue",
                p.version
            );
        }
    }
    out
}

pub fn run(cmd: VersionCommand) -> Result<(), CliError> {
    match cmd {
        VersionCommand::List { st } => {
            // In a cluster: the catalogue's images first (the same on every node).
            if let Some(cc) = Config::load(&st.config).ok().and_then(|c| c.cluster) {
                let cat = runtime()?
                    .block_on(crate::cluster::catalogue::read_all(&cc))
                    .map_err(|e| CliError::Io(e.to_string()))?;
                for (name, e) in &cat.images {
                    let pointers: Vec<String> = e
                        .pointers
                        .iter()
                        .map(|(p, v)| format!("{p} {}", v.version))
                        .collect();
                    println!(
                        "{name}  (catalogue)  {}  {} versions",
                        pointers.join("  "),
                        e.versions.len()
                    );
                }
            }
            let (dir, _) = state_dir(&st)?;
            let images = Images::new(&dir);
            for name in images.list().map_err(io)? {
                let log = images.log(&name).map_err(io)?;
                println!(
                    "{name}  latest {}  {} versions  {} bytes",
                    log.head,
                    log.versions.len(),
                    log.size
                );
            }
            Ok(())
        }
        VersionCommand::Log { image, st } => {
            if let Some((cc, name)) = catalogue_of(&st, &image) {
                let e = runtime()?
                    .block_on(crate::cluster::catalogue::read_image_entry(&cc, &name))
                    .map_err(|e| CliError::Io(e.to_string()))?;
                print!("{}", format_catalogue(&name, &e));
                return Ok(());
            }
            let (dir, _) = state_dir(&st)?;
            let log = Images::new(&dir).log(&image).map_err(io)?;
            print!(
                "{}",
                format_log(&log, &crate::boot::versions_in_use(&dir, &image))
            );
            Ok(())
        }
        VersionCommand::Rollback {
            image,
            version,
            expect,
            st,
        } => {
            if let Some((cc, name)) = catalogue_of(&st, &image) {
                return move_pointer(
                    &cc,
                    &name,
                    crate::cluster::catalogue::LATEST,
                    Some(&version),
                    expect.as_deref(),
                );
            }
            let version = number(&version)?;
            let (dir, _) = state_dir(&st)?;
            Images::new(&dir).rollback(&image, version).map_err(io)?;
            println!(
                "{image}: latest is now version {version} ({})",
                tell_server(&dir)
            );
            persistent_note(&dir, &image, version);
            Ok(())
        }
        VersionCommand::Channel {
            image,
            channel,
            version,
            remove,
            expect,
            st,
        } => {
            if version.is_none() && !remove {
                return Err(CliError::Io("give a VERSION or --remove".into()));
            }
            if let Some((cc, name)) = catalogue_of(&st, &image) {
                if channel == crate::cluster::catalogue::LATEST {
                    return Err(CliError::Io(
                        "latest is not a channel: use `diskless image rollback`".into(),
                    ));
                }
                return move_pointer(&cc, &name, &channel, version.as_deref(), expect.as_deref());
            }
            let version = version.as_deref().map(number).transpose()?;
            let (dir, _) = state_dir(&st)?;
            Images::new(&dir)
                .set_channel(&image, &channel, version)
                .map_err(io)?;
            match version {
                Some(v) => println!("{image}:{channel} -> {v} ({})", tell_server(&dir)),
                None => println!("{image}:{channel} removed ({})", tell_server(&dir)),
            }
            Ok(())
        }
        VersionCommand::Flatten { image, version, st } => {
            let (dir, _) = state_dir(&st)?;
            let images = Images::new(&dir);
            let v = match version {
                Some(v) => v,
                None => images.log(&image).map_err(io)?.head,
            };
            images.flatten(&image, v).map_err(io)?;
            println!("{image}@{v} is flat (run `diskless image gc {image}` to free its chain)");
            Ok(())
        }
        VersionCommand::Gc {
            image,
            keep,
            dry_run,
            st,
        } => {
            if let Some((cc, name)) = catalogue_of(&st, &image) {
                return catalogue_gc(&st, &cc, &name, keep, dry_run);
            }
            if dry_run {
                return Err(CliError::Io(
                    "--dry-run is for images in a cluster's catalogue".into(),
                ));
            }
            let (dir, config) = state_dir(&st)?;
            // With the server running, it knows the clients booted now: let it collect.
            let sock = dir.join(crate::control::SOCKET);
            match crate::control::request(&sock, &format!("image-gc {image}")) {
                Ok(Ok(body)) => {
                    print!("{body}");
                    return Ok(());
                }
                Ok(Err(e)) => return Err(CliError::Io(e)),
                Err(_) => {}
            }
            let pins = offline_pins(&dir, config.as_ref(), &image);
            let r = Images::new(&dir).gc(&image, &pins).map_err(io)?;
            print!("{}", crate::control::format_gc(&r));
            Ok(())
        }
        VersionCommand::Import {
            image,
            file,
            format,
            block_size,
            message,
            st,
        } => {
            let (dir, _) = state_dir(&st)?;
            if !versions::valid_name(&image) {
                return Err(CliError::Io(format!(
                    "{image:?} is not a valid image name (a-z 0-9 - _ .)"
                )));
            }
            let images = Images::new(&dir);
            let staging = images.staging_path(&image).map_err(io)?;
            let staged = staging.path.clone();
            let res = qemu_img_convert(&file, format.as_deref(), &staged, "raw").and_then(|()| {
                let stamp = Stamp {
                    message,
                    author: author(),
                    time_ms: crate::boot::now_ms(),
                };
                if images.exists(&image) {
                    images.add_base(&image, &staged, &stamp).map_err(io)
                } else {
                    images
                        .create_from_file(&image, &staged, block_size, &stamp)
                        .map(|_| 1)
                        .map_err(io)
                }
            });
            let _ = std::fs::remove_file(&staged);
            let v = res?;
            println!("imported {} as {image}@{v}", file.display());
            Ok(())
        }
        VersionCommand::Export {
            spec,
            out,
            format,
            st,
        } => {
            let (dir, _) = state_dir(&st)?;
            if out.exists() {
                return Err(CliError::Io(format!("{} exists already", out.display())));
            }
            if format != "raw" && format != "qcow2" {
                return Err(CliError::Io(format!(
                    "export format {format:?}: raw or qcow2"
                )));
            }
            let (name, sel) = versions::parse_spec(&spec).map_err(io)?;
            let images = Images::new(&dir);
            let log = images.log(&name).map_err(io)?;
            let v = log.resolve(&sel).map_err(io)?;
            let store = images.open_in(&log, v).map_err(io)?;
            let mut raw = out.as_os_str().to_owned();
            raw.push(".partial");
            let raw = PathBuf::from(raw);
            let res = versions::export_raw(&store, &raw)
                .map_err(io)
                .and_then(|_| {
                    if format == "raw" {
                        std::fs::hard_link(&raw, &out).map_err(io)
                    } else {
                        qemu_img_convert(&raw, Some("raw"), &out, "qcow2")
                    }
                });
            let _ = std::fs::remove_file(&raw);
            res?;
            println!("exported {name}@{v} to {} ({format})", out.display());
            Ok(())
        }
    }
}

/// `qemu-img convert`: QEMU's own readers and writers for every format operators bring
/// (raw, qcow2 with compression and backing files, VHD as `vpc`, VHDX, VMDK); no Rust crate
/// covers these. Sparse output (`-S 4k`: zero runs become holes).
fn qemu_img_convert(
    src: &Path,
    src_fmt: Option<&str>,
    dst: &Path,
    dst_fmt: &str,
) -> Result<(), CliError> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    if let Some(f) = src_fmt {
        cmd.args(["-f", f]);
    }
    cmd.args(["-O", dst_fmt, "-S", "4k"]).arg(src).arg(dst);
    let out = cmd
        .output()
        .map_err(|e| CliError::Io(format!("qemu-img (apt-get install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(CliError::Io(format!(
            "qemu-img convert {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Say which persistent disks stay on another version than latest.
fn persistent_note(dir: &Path, image: &str, latest: u64) {
    let used = crate::boot::versions_in_use(dir, image);
    let others: Vec<String> = used
        .iter()
        .filter(|(v, _)| **v != latest)
        .map(|(v, n)| format!("{n} on {v}"))
        .collect();
    if !others.is_empty() {
        println!(
            "client disks on other versions: {} (persistent disks stay on their version \
             until `diskless client reset`; volatile ones move at their next boot)",
            others.join(", ")
        );
    }
}

/// The `image log` table, newest first.
pub fn format_log(log: &versions::ImageLog, used: &std::collections::BTreeMap<u64, u32>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "image {}: {} bytes, {}-byte blocks, latest = {}",
        log.name, log.size, log.block_size, log.head
    );
    let _ = writeln!(
        out,
        "{:>4} {:>6} {:5} {:19} {:10} {:>12} {:>7}  MESSAGE",
        "VER", "PARENT", "KIND", "TIME (UTC)", "AUTHOR", "CHANGE", "CLIENTS"
    );
    for v in log.versions.iter().rev() {
        let mut tags: Vec<String> = Vec::new();
        if v.version == log.head {
            tags.push("latest".into());
        }
        for (c, cv) in &log.channels {
            if *cv == v.version {
                tags.push(c.clone());
            }
        }
        let tags = tag_suffix(&tags);
        let _ = writeln!(
            out,
            "{:>4} {:>6} {:5} {:19} {:10} {:>12} {:>7}  {}{}",
            v.version,
            v.parent.map_or("-".into(), |p| p.to_string()),
            match v.kind {
                VersionKind::Base => "base",
                VersionKind::Layer => "layer",
            },
            crate::control::utc(v.time_ms),
            v.author,
            crate::config::ByteSize(v.change_bytes).to_string(),
            used.get(&v.version).copied().unwrap_or(0),
            v.message,
            tags
        );
    }
    out
}

/// ` [latest, test]` after a version in `image log`: the pointers that name it, or nothing.
fn tag_suffix<S: AsRef<str>>(tags: &[S]) -> String {
    if tags.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = tags.iter().map(AsRef::as_ref).collect();
    format!(" [{}]", names.join(", "))
}
