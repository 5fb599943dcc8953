//! targets.yaml: the portals, server settings, discovery authentication and targets
//! (docs/configuration.md documents every key). Parsing is strict: unknown keys are errors,
//! and every error names the file, the YAML location or the offending field path.
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// How errors name the "file" of a quick-mode configuration.
pub const QUICK_SOURCE: &str = "--image";
/// The IANA-registered iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
/// Largest LUN we serve: SAM-5 single-level LUNs with 14-bit flat addressing.
pub const MAX_LUN: u32 = 16383;
/// RFC 7143 §12.1.3: CHAP secrets SHOULD be at least 12 bytes (96 bits); we require it.
pub const MIN_CHAP_SECRET: usize = 12;
/// The Microsoft iSCSI initiator accepts CHAP secrets of 12 to 16 bytes only (its
/// configuration dialog and `iscsicli` refuse longer ones): a longer secret locks Windows out.
pub const MS_INITIATOR_MAX_CHAP_SECRET: usize = 16;
/// iSCSI names are at most 223 bytes (RFC 7143 §4.2.7, RFC 3722).
pub const MAX_NAME_LEN: usize = 223;

/// Errors loading or validating the configuration. Every message starts with the file name.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML, or does not fit the schema (serde_yaml's message carries the field
    /// path and the line/column).
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// Valid YAML with a value we refuse; `path` is e.g. `targets[0].luns[1]`.
    #[error("{file}: {path}: {message}")]
    Invalid {
        file: String,
        path: String,
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(file: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_string(),
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A byte size: an integer (bytes) or a string with an optional binary suffix: "4096",
/// "64MiB", "64M", "1G", "1GiB", "512K", "2T". Suffixes are powers of 1024 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parse "64MiB", "1G", "4096", ...
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() {
            return Err(format!("bad size {s:?}: expected e.g. 64MiB, 1G or 4096"));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("bad size {s:?}: number too large"))?;
        let shift = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => {
                return Err(format!(
                    "bad size {s:?}: unknown unit {suffix:?} (use K, M, G, T or KiB, MiB, GiB, TiB)"
                ))
            }
        };
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("bad size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n} bytes")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 64MiB, 1G or 4096")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A listen address: `ip:port`, `[v6]:port`, or a bare IP (port 3260).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Portal(pub SocketAddr);

impl Portal {
    pub fn parse(s: &str) -> Result<Portal, String> {
        let t = s.trim();
        if let Ok(a) = t.parse::<SocketAddr>() {
            return Ok(Portal(a));
        }
        let bare = t
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(t);
        bare.parse::<IpAddr>()
            .map(|ip| Portal(SocketAddr::new(ip, DEFAULT_PORT)))
            .map_err(|_| {
                format!(
                    "bad portal address {s:?}: expected ip:port, e.g. 0.0.0.0:3260 or [::]:3260"
                )
            })
    }
}

impl<'de> Deserialize<'de> for Portal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Portal::parse(&s).map_err(de::Error::custom)
    }
}

fn default_portals() -> Vec<Portal> {
    vec![Portal(SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_portals")]
    pub portals: Vec<Portal>,
    #[serde(default)]
    pub settings: SettingsConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Golden images that boot targets serve through per-client overlays.
    #[serde(default)]
    pub images: Vec<ImageConfig>,
    /// Where per-client overlays and the control socket live (relative to the file's
    /// directory). Default: `state`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The optional HTTP listener that hands each client its iPXE boot script.
    #[serde(default)]
    pub boot_http: Option<BootHttpConfig>,
    /// Built-in network boot: proxyDHCP or DHCP, TFTP (docs/booting.md). Off when absent.
    #[serde(default)]
    pub netboot: Option<NetbootConfig>,
    /// The operator's HTTP API, web console and `/metrics` (absent: not served).
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// The chunk cache for images served from object stores (`images[].s3`).
    #[serde(default)]
    pub chunk_cache: ChunkCacheConfig,
    /// Several nodes placed through etcd (docs/scale-out.md). Absent: a single node.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Ceph RBD for persistent and install client disks of the images with `rbd:`
    /// (docs/scale-out.md). Needs `cluster:` (fencing follows the placement).
    #[serde(default)]
    pub rbd: Option<RbdConfig>,
    /// Directory relative image paths are resolved against (the file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// How errors name the file (its path as given).
    #[serde(skip)]
    pub source: String,
}

/// `settings:`; every key optional. The session layer maps it onto its runtime settings
/// (`session::Settings::from_config`) and the login layer's offers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettingsConfig {
    pub login_timeout_secs: u64,
    /// 0 = never ping.
    pub nop_in_interval_secs: u64,
    /// 0 = never drop an initiator for ignoring pings (iPXE never answers them).
    pub nop_in_timeout_secs: u64,
    pub max_sessions: usize,
    pub cmd_window: u32,
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Tie-breaker of the client lifecycle, for ambiguous evidence only: an unknown ISID
    /// after nothing of the client was live this long starts a new boot (docs/overlays.md).
    pub reboot_gap_secs: u64,
    /// Open TCP connections at most.
    pub max_connections: usize,
    /// Bytes one connection may hold before its PDUs are no longer read.
    pub max_buffered_bytes: ByteSize,
    /// Close a logged-in connection silent for this long (0 = never).
    pub idle_timeout_secs: u64,
    /// SANITIZE OVERWRITE writes at most this many bytes a second, so wiping a big disk
    /// does not starve the other clients of the same storage.
    pub sanitize_overwrite_rate: ByteSize,
    /// A versioned image's version with at least this many layers above its base gets a
    /// flat copy in the background when it is first read (docs/images.md); 0 = never.
    pub materialize_depth: u32,
    /// The flat copy reads and writes at most this many bytes a second (0 = no limit).
    pub materialize_rate: ByteSize,
    /// Boot read-ahead (docs/performance.md, "Cold starts"): learn the chunks a plain golden
    /// image's first boots read in this many seconds from its first read, save them in the
    /// state directory, and read them ahead when the image is opened again (0 = off).
    pub boot_readahead_secs: u64,
    /// At most this much of each image is learned and read ahead.
    pub boot_readahead_max: ByteSize,
}

impl Default for SettingsConfig {
    /// The defaults of every setting (docs/configuration.md); the session layer's runtime
    /// settings and the login layer's negotiation offers are built from these.
    fn default() -> Self {
        SettingsConfig {
            login_timeout_secs: 15,
            nop_in_interval_secs: 30,
            nop_in_timeout_secs: 0,
            max_sessions: 4096,
            cmd_window: 128,
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            immediate_data: true,
            initial_r2t: false,
            header_digest: true,
            data_digest: true,
            reboot_gap_secs: 15,
            max_connections: 8192,
            max_buffered_bytes: ByteSize(32 << 20),
            idle_timeout_secs: 0,
            sanitize_overwrite_rate: ByteSize(256 << 20),
            materialize_depth: 4,
            materialize_rate: ByteSize(64 << 20),
            boot_readahead_secs: 0,
            boot_readahead_max: ByteSize(512 << 20),
        }
    }
}

impl SettingsConfig {
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad =
            |key: &str, msg: String| ConfigError::invalid(file, format!("settings.{key}"), msg);
        // RFC 7143 §13.12-§13.14: 512 to 2^24-1 bytes.
        for (key, v) in [
            (
                "max_recv_data_segment_length",
                self.max_recv_data_segment_length,
            ),
            ("max_burst_length", self.max_burst_length),
            ("first_burst_length", self.first_burst_length),
        ] {
            if !(512..=16_777_215).contains(&v) {
                return Err(bad(
                    key,
                    format!("{v} is outside 512..=16777215 (RFC 7143 §13.12-13.14)"),
                ));
            }
        }
        // §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
        if self.first_burst_length > self.max_burst_length {
            return Err(bad(
                "first_burst_length",
                format!(
                    "{} exceeds max_burst_length {} (RFC 7143 §13.14)",
                    self.first_burst_length, self.max_burst_length
                ),
            ));
        }
        if self.login_timeout_secs == 0 {
            return Err(bad("login_timeout_secs", "must be at least 1".into()));
        }
        if self.max_sessions == 0 {
            return Err(bad("max_sessions", "must be at least 1".into()));
        }
        if self.max_connections == 0 {
            return Err(bad("max_connections", "must be at least 1".into()));
        }
        if self.sanitize_overwrite_rate.0 < 1 << 20 {
            return Err(bad(
                "sanitize_overwrite_rate",
                "must be at least 1MiB (a second)".into(),
            ));
        }
        if self.max_buffered_bytes.0 < 1 << 20 {
            return Err(bad("max_buffered_bytes", "must be at least 1MiB".into()));
        }
        // CmdSN uses serial number arithmetic (§4.2.2.1, RFC 1982): the window must stay far
        // below 2^31.
        if !(1..=65_536).contains(&self.cmd_window) {
            return Err(bad(
                "cmd_window",
                format!("{} is outside 1..=65536", self.cmd_window),
            ));
        }
        Ok(())
    }
}

/// `discovery:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// CHAP required for SendTargets discovery sessions, if present.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
}

/// CHAP credentials (RFC 7143 §12.1.3). `mutual_*`: how the target answers the initiator's
/// challenge (mutual CHAP); both or neither.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
    #[serde(default)]
    pub mutual_user: Option<String>,
    #[serde(default)]
    pub mutual_secret: Option<String>,
}

impl fmt::Debug for ChapConfig {
    // Secrets are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapConfig")
            .field("user", &self.user)
            .field("mutual_user", &self.mutual_user)
            .finish_non_exhaustive()
    }
}

impl ChapConfig {
    fn validate(&self, file: &str, path: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::invalid(file, path, msg);
        if self.user.is_empty() {
            return Err(bad("chap user is empty".into()));
        }
        let short = |what: &str, s: &str| {
            (s.len() < MIN_CHAP_SECRET).then(|| {
                bad(format!(
                    "chap {what} is {} bytes; at least {MIN_CHAP_SECRET} are required \
                     (RFC 7143 §12.1.3)",
                    s.len()
                ))
            })
        };
        if let Some(e) = short("secret", &self.secret) {
            return Err(e);
        }
        match (&self.mutual_user, &self.mutual_secret) {
            (None, None) => {}
            (Some(u), Some(s)) => {
                if u.is_empty() {
                    return Err(bad("chap mutual_user is empty".into()));
                }
                if let Some(e) = short("mutual_secret", s) {
                    return Err(e);
                }
                // §12.1.3: the same secret must not authenticate both directions.
                if *s == self.secret {
                    return Err(bad(
                        "chap mutual_secret must differ from secret (RFC 7143 §12.1.3)".into(),
                    ));
                }
            }
            _ => {
                return Err(bad(
                    "chap mutual_user and mutual_secret must be given together".into(),
                ))
            }
        }
        Ok(())
    }
}

fn default_initiators() -> Vec<String> {
    vec!["*".to_string()]
}

/// One entry of `targets:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    #[serde(default)]
    pub alias: Option<String>,
    /// Initiator name globs allowed to see and log in to this target.
    #[serde(default = "default_initiators")]
    pub initiators: Vec<String>,
    /// Source addresses (IPs or CIDR networks) logins to this target may come from, per
    /// initiator name glob: `{"iqn.2026-11.lab:pc-01": ["10.0.0.21"], "*": ["10.0.0.0/24"]}`.
    /// An initiator matching no entry may log in from anywhere. Absent: no address check.
    #[serde(default)]
    pub sources: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub chap: Option<ChapConfig>,
    #[serde(default)]
    pub luns: Vec<LunConfig>,
    /// A boot target: each client sees, as LUN 0, the golden image of its binding through
    /// its own overlay. Exclusive with `luns`.
    #[serde(default)]
    pub boot: Option<BootConfig>,
    /// How the NAA identifiers of this target's LUNs (and client disks) are formed; a LUN's
    /// own `identity` wins. Default `legacy`: identifiers never change under a client.
    #[serde(default)]
    pub identity: Option<IdentityFormat>,
}

/// The form of a LUN's NAA identifier in VPD page 0x83 (docs/configuration.md). Both are
/// derived from the target name and LUN number, so they are the same on every start and
/// on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityFormat {
    /// NAA 6 (IEEE Registered Extended, 16 bytes) with hash bits where the IEEE company ID
    /// belongs: what every version before this one reported, so the default.
    #[default]
    Legacy,
    /// NAA 3 (locally assigned, 8 bytes; SPC-4 §7.8.6.6.4): 60 bits of the same hash, no
    /// claim to an IEEE company ID.
    Naa3,
}

/// One entry of `images:`: a golden image, never written (except by a `direct` binding).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub name: String,
    /// The raw image file; empty when the image is in an object store (`s3:`).
    #[serde(default)]
    pub path: PathBuf,
    /// Serve the image from an S3-compatible object store instead of a file.
    #[serde(default)]
    pub s3: Option<S3ImageConfig>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Physical block size reported to clients (512e: 4096 over 512-byte logical blocks).
    #[serde(default)]
    pub physical_block_size: Option<u32>,
    /// Create a sparse image of this size if missing (demo use).
    #[serde(default)]
    pub create_size: Option<ByteSize>,
    /// Persistent and install client disks of this image live in Ceph RBD (top-level
    /// `rbd:`), each a clone of this snapshot; volatile ones stay node-local.
    #[serde(default)]
    pub rbd: Option<ImageRbdConfig>,
}

/// `images[].rbd`: the RBD snapshot holding the image's bytes (`rbd import`, `rbd snap
/// create`, `rbd snap protect`), parent of the clients' disks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRbdConfig {
    /// `IMAGE@SNAPSHOT` in the `rbd.pool`.
    pub parent: String,
}

impl ImageRbdConfig {
    /// (image, snapshot).
    pub fn parent_parts(&self) -> Option<(&str, &str)> {
        let (i, s) = self.parent.split_once('@')?;
        (is_rbd_name(i) && is_rbd_name(s)).then_some((i, s))
    }
}

/// `rbd:` how this node reaches Ceph for RBD client disks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdConfig {
    /// The pool holding the images' snapshots and the clients' disks.
    pub pool: String,
    /// The cephx user (`client.<id>`); its caps must allow blocklisting (`profile rbd`).
    #[serde(default = "default_rbd_id")]
    pub id: String,
    /// Ceph configuration file (monitor addresses).
    #[serde(default = "default_rbd_conf")]
    pub conf: PathBuf,
    /// Keyring of the user (default: what `conf` says).
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// Prefix of the clients' RBD image names (`<prefix>.<initiator>.<hash>`).
    #[serde(default = "default_rbd_prefix")]
    pub prefix: String,
}

fn default_rbd_id() -> String {
    "diskless".into()
}

fn default_rbd_conf() -> PathBuf {
    PathBuf::from("/etc/ceph/ceph.conf")
}

fn default_rbd_prefix() -> String {
    "diskless".into()
}

/// RBD pool, image, snapshot and user names kept to a safe set (no '/', '@', spaces).
fn is_rbd_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `images[].s3`: one immutable image version in an S3-compatible object store, read through
/// the node's chunk cache (docs/scale-out.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3ImageConfig {
    /// `https://host[:port]` (or `http://` for a store on a trusted network).
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: String,
    /// The image's name in the bucket (default: the entry's `name`).
    #[serde(default)]
    pub image: Option<String>,
    /// A version name, or `latest`: the version the cluster's catalogue calls latest
    /// (docs/scale-out.md, "Image catalogue"); empty with `channel`.
    #[serde(default)]
    pub version: String,
    /// Follow a channel of the cluster's catalogue (e.g. `production`) instead of a version.
    #[serde(default)]
    pub channel: Option<String>,
    /// The catalogue's sequence number of `version` once a pointer (`latest`, `channel`) was
    /// resolved: the image is then a series whose clients move at their next boot.
    #[serde(skip)]
    pub resolved_seq: Option<u64>,
    /// A file of `access_key_id = ...`, `secret_access_key = ...` (and optionally
    /// `session_token = ...`) lines; default: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
    /// from the environment. The keys are never logged or printed.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Time allowed for one request, in seconds.
    #[serde(default = "default_s3_timeout")]
    pub timeout_secs: u64,
    /// Attempts after a failed one (exponential backoff from 100 ms).
    #[serde(default = "default_s3_retries")]
    pub retries: u32,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}
fn default_s3_timeout() -> u64 {
    10
}
fn default_s3_retries() -> u32 {
    4
}

/// S3 credentials (from a file or the environment). Debug never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("S3Credentials(<redacted>)")
    }
}

/// `images[].s3.version: latest`: the catalogue's `latest` pointer.
pub const S3_LATEST: &str = "latest";

impl S3ImageConfig {
    /// The catalogue pointer this entry follows (`latest` or a channel), if any.
    pub fn pointer(&self) -> Option<&str> {
        match &self.channel {
            Some(c) => Some(c),
            None if self.version == S3_LATEST => Some(S3_LATEST),
            None => None,
        }
    }

    /// The image's name in the bucket (and in the catalogue).
    pub fn image_name<'a>(&'a self, entry: &'a str) -> &'a str {
        self.image.as_deref().unwrap_or(entry)
    }

    /// Read the credentials: from `credentials_file` (resolved by `resolve`) or the
    /// environment. Errors name the file or variable, never a secret.
    pub fn credentials(&self, resolve: impl Fn(&Path) -> PathBuf) -> Result<S3Credentials, String> {
        let Some(file) = &self.credentials_file else {
            let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            return match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
                (Some(a), Some(s)) => Ok(S3Credentials {
                    access_key_id: a,
                    secret_access_key: s,
                    session_token: var("AWS_SESSION_TOKEN"),
                }),
                _ => Err("no credentials_file and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not both set".into()),
            };
        };
        let path = resolve(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("credentials_file {}: {e}", path.display()))?;
        let (mut a, mut s, mut t) = (None, None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(format!(
                    "credentials_file {} line {}: expected key = value",
                    path.display(),
                    n + 1
                ));
            };
            let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
            match k.trim() {
                "access_key_id" | "aws_access_key_id" => a = v,
                "secret_access_key" | "aws_secret_access_key" => s = v,
                "session_token" | "aws_session_token" => t = v,
                other => {
                    return Err(format!(
                        "credentials_file {} line {}: unknown key {other:?}",
                        path.display(),
                        n + 1
                    ))
                }
            }
        }
        match (a, s) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(S3Credentials {
                access_key_id,
                secret_access_key,
                session_token: t,
            }),
            _ => Err(format!(
                "credentials_file {}: needs access_key_id and secret_access_key",
                path.display()
            )),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let ep = self.endpoint.as_str();
        let rest = ep
            .strip_prefix("https://")
            .or_else(|| ep.strip_prefix("http://"))
            .ok_or_else(|| format!("endpoint {ep:?} must start with https:// or http://"))?;
        if rest.trim_end_matches('/').is_empty() || rest.contains(char::is_whitespace) {
            return Err(format!("endpoint {ep:?} has no host"));
        }
        // S3 bucket naming rules (lowercase, digits, '.', '-'; 3..63).
        let b = self.bucket.as_str();
        if !(3..=63).contains(&b.len())
            || !b
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        {
            return Err(format!("bucket {b:?} is not a valid bucket name"));
        }
        let key_part = |what: &str, v: &str, may_be_empty: bool| {
            if (v.is_empty() && !may_be_empty)
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
                || v.split('/').any(|p| p == "." || p == "..")
            {
                Err(format!(
                    "{what} {v:?} must be letters, digits, '-', '_', '.' or '/'"
                ))
            } else {
                Ok(())
            }
        };
        key_part("prefix", &self.prefix, true)?;
        match &self.channel {
            Some(c) if !self.version.is_empty() => {
                return Err(format!(
                    "version {:?} and channel {c:?}: give one",
                    self.version
                ))
            }
            Some(c) => {
                key_part("channel", c, false)?;
                if c.contains('/') || c == S3_LATEST {
                    return Err(format!("channel {c:?} must be a plain name, not latest"));
                }
            }
            None if self.version.is_empty() => {
                return Err("needs version (a name, or latest) or channel".into())
            }
            None => {}
        }
        key_part("version", &self.version, true)?;
        if self.version.contains('/') {
            return Err(format!("version {:?} must not contain '/'", self.version));
        }
        if let Some(i) = &self.image {
            key_part("image", i, false)?;
        }
        if self.region.is_empty() {
            return Err("region must not be empty".into());
        }
        if self.timeout_secs == 0 || self.timeout_secs > 600 {
            return Err(format!("timeout_secs {} must be 1..600", self.timeout_secs));
        }
        if self.retries > 20 {
            return Err(format!("retries {} must be at most 20", self.retries));
        }
        Ok(())
    }
}

/// `cluster:` this node's place in a cluster registered in etcd (docs/scale-out.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name: the etcd key prefix is `/diskless/<name>/`.
    pub name: String,
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// etcd client endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// The iSCSI portal other nodes send this node's clients to (boot scripts, login
    /// redirection): an address clients can reach, with its port.
    pub advertise: Portal,
    /// Lease time to live in seconds: a node that stops renewing its lease loses its
    /// membership and its clients after this long.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: u64,
    /// TLS towards etcd (`https://` endpoints).
    #[serde(default)]
    pub tls: Option<EtcdTlsConfig>,
    /// etcd user and password (etcd's `auth enable`).
    #[serde(default)]
    pub auth: Option<EtcdAuthConfig>,
}

/// Top-level keys of targets.yaml that belong to one node: the shared configuration in
/// etcd (`diskless cluster config push`) never carries them.
pub const NODE_KEYS: &[&str] = &[
    "portals",
    "state_dir",
    "cluster",
    "api",
    "boot_http",
    "netboot",
];

/// A node's configuration text with the cluster's shared document laid over it: each
/// top-level key of `shared` replaces the node's. Refuses a shared document with a node key.
pub fn merge_shared(local: &str, shared: &str) -> Result<String, String> {
    use serde_yaml::{Mapping, Value};
    let map = |text: &str, what: &str| -> Result<Mapping, String> {
        if text.trim().is_empty() {
            return Ok(Mapping::new());
        }
        match serde_yaml::from_str::<Value>(text).map_err(|e| format!("{what}: {e}"))? {
            Value::Mapping(m) => Ok(m),
            Value::Null => Ok(Mapping::new()),
            _ => Err(format!("{what}: not a mapping of keys")),
        }
    };
    let mut out = map(local, "the node's configuration")?;
    for (k, v) in map(shared, "the shared configuration")? {
        let name = k
            .as_str()
            .ok_or("the shared configuration: top-level keys must be names")?;
        if NODE_KEYS.contains(&name) {
            return Err(format!(
                "the shared configuration has {name}:, which belongs to each node's own file \
                 (node keys: {})",
                NODE_KEYS.join(", ")
            ));
        }
        out.insert(k, v);
    }
    serde_yaml::to_string(&out).map_err(|e| e.to_string())
}

/// `cluster.tls`: how a node checks etcd's certificate and, with `--client-cert-auth`,
/// which certificate it shows. Paths are relative to the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// PEM certificate(s) of the CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// PEM client certificate and its private key (both or neither).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name etcd's certificate must carry (default: the endpoint's host).
    #[serde(default)]
    pub domain: Option<String>,
}

/// `cluster.auth`: an etcd user; the password is read from a file, never from the YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdAuthConfig {
    pub user: String,
    /// A file whose first line is the password (keep it mode 0600).
    pub password_file: PathBuf,
}

/// What `cluster.tls` and `cluster.auth` name, read and checked. Debug never shows the
/// password or the key.
#[derive(Clone, Default)]
pub struct EtcdSecrets {
    pub ca: Option<Vec<u8>>,
    /// (certificate, key), PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub domain: Option<String>,
    /// (user, password).
    pub user: Option<(String, String)>,
}

impl fmt::Debug for EtcdSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSecrets")
            .field("tls", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|u| &u.0))
            .finish()
    }
}

/// Read a PEM file that must hold a block whose label ends with `label`
/// (`CERTIFICATE`, `PRIVATE KEY`).
fn read_pem(path: &Path, label: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(format!(
            "{}: not a PEM file with a {label} (-----BEGIN ...{label}-----)",
            path.display()
        ));
    }
    Ok(bytes)
}

fn default_lease_ttl() -> u64 {
    10
}

/// Characters allowed in cluster names and node ids (they become etcd key segments).
fn is_key_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ClusterConfig {
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        if !is_key_segment(&self.name) {
            return Err(ConfigError::invalid(
                file,
                "cluster.name",
                "must be 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if !is_key_segment(&self.node_id) {
            return Err(ConfigError::invalid(
                file,
                "cluster.node_id",
                "must be 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if self.etcd.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "cluster.etcd",
                "no etcd endpoint given",
            ));
        }
        for (i, e) in self.etcd.iter().enumerate() {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            let ok = rest.is_some_and(|r| {
                let host_port = r.trim_end_matches('/');
                !host_port.is_empty()
                    && !host_port.contains('/')
                    && host_port.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)
                    })
            });
            if !ok {
                return Err(ConfigError::invalid(
                    file,
                    format!("cluster.etcd[{i}]"),
                    format!("{e:?} is not http://HOST:PORT (or https://)"),
                ));
            }
        }
        let a = self.advertise.0;
        if a.ip().is_unspecified() || a.port() == 0 {
            return Err(ConfigError::invalid(
                file,
                "cluster.advertise",
                format!("{a} must be an address clients can reach, with its port (not 0.0.0.0 or port 0)"),
            ));
        }
        if !(2..=300).contains(&self.lease_ttl) {
            return Err(ConfigError::invalid(
                file,
                "cluster.lease_ttl",
                format!("{} must be 2..300 seconds", self.lease_ttl),
            ));
        }
        let https = self
            .etcd
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        match (&self.tls, https) {
            (Some(_), n) if n != self.etcd.len() => {
                return Err(ConfigError::invalid(
                    file,
                    "cluster.etcd",
                    "with cluster.tls every endpoint must be https://",
                ))
            }
            (None, n) if n > 0 => {
                return Err(ConfigError::invalid(
                    file,
                    "cluster.tls",
                    "https:// endpoints need cluster.tls.ca (the CA of etcd's certificate)",
                ))
            }
            _ => {}
        }
        if let Some(a) = &self.auth {
            if a.user.is_empty() || a.user.chars().any(char::is_control) {
                return Err(ConfigError::invalid(
                    file,
                    "cluster.auth.user",
                    "empty or has control characters",
                ));
            }
        }
        self.secrets()
            .map_err(|(path, m)| ConfigError::invalid(file, path, m))?;
        Ok(())
    }

    /// Make the TLS and password file paths absolute (relative to the file's directory).
    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = &mut self.tls {
            abs(&mut t.ca);
            t.cert.as_mut().map(abs);
            t.key.as_mut().map(abs);
        }
        if let Some(a) = &mut self.auth {
            abs(&mut a.password_file);
        }
    }

    /// Read the CA, the client certificate and key, and the password. Errors name the key
    /// and the file, never a secret.
    pub fn secrets(&self) -> Result<EtcdSecrets, (&'static str, String)> {
        let mut out = EtcdSecrets::default();
        if let Some(t) = &self.tls {
            out.ca = Some(read_pem(&t.ca, "CERTIFICATE").map_err(|m| ("cluster.tls.ca", m))?);
            out.identity = match (&t.cert, &t.key) {
                (Some(c), Some(k)) => Some((
                    read_pem(c, "CERTIFICATE").map_err(|m| ("cluster.tls.cert", m))?,
                    read_pem(k, "PRIVATE KEY").map_err(|m| ("cluster.tls.key", m))?,
                )),
                (None, None) => None,
                _ => {
                    return Err((
                        "cluster.tls",
                        "cert and key go together (a client certificate and its key)".into(),
                    ))
                }
            };
            out.domain = t.domain.clone();
        }
        if let Some(a) = &self.auth {
            let p = &a.password_file;
            let text = std::fs::read_to_string(p).map_err(|e| {
                (
                    "cluster.auth.password_file",
                    format!("{}: {e}", p.display()),
                )
            })?;
            let pw = text.lines().next().unwrap_or("").to_string();
            if pw.is_empty() {
                return Err((
                    "cluster.auth.password_file",
                    format!("{}: the first line (the password) is empty", p.display()),
                ));
            }
            out.user = Some((a.user.clone(), pw));
        }
        Ok(out)
    }
}

/// `chunk_cache:` the node's cache of chunks of images in object stores.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkCacheConfig {
    /// Memory tier (LRU by bytes).
    pub memory: ByteSize,
    /// Disk tier under `<state_dir>/chunk-cache` (LRU by bytes); 0 turns it off.
    pub disk: ByteSize,
}

impl Default for ChunkCacheConfig {
    fn default() -> Self {
        ChunkCacheConfig {
            memory: ByteSize(256 << 20),
            disk: ByteSize(8 << 30),
        }
    }
}

/// How a client's writes are kept (docs/overlays.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlayMode {
    /// Writes go to an overlay that is discarded when the client boots again.
    Volatile,
    /// Writes go to an overlay that survives reboots and server restarts.
    Persistent,
    /// Writes are refused (WRITE PROTECTED).
    Readonly,
    /// Writes go to the golden image itself (image maintenance; one client at a time).
    Direct,
    /// Installing an OS onto the client disk (Windows Setup reboots several times): kept
    /// like `persistent` across reboots until `diskless client commit` publishes it.
    Install,
}

/// When a client's boot discards a volatile disk (`reset:` of a binding; docs/overlays.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetPolicy {
    /// The boot model decides from logins, logouts, drops and plausible script fetches.
    #[default]
    Auto,
    /// Only a plausible boot-script fetch starts a boot (logins never discard the disk).
    OnScript,
    /// Only `diskless client reset` discards the disk.
    Manual,
}

impl fmt::Display for ResetPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResetPolicy::Auto => "auto",
            ResetPolicy::OnScript => "on_script",
            ResetPolicy::Manual => "manual",
        })
    }
}

/// An ISID or ISID prefix written as hex bytes, `:`/`-` separated or not
/// (`40:00:27:23`, `125400123456`): 1 to 6 bytes.
pub fn parse_isid_prefix(s: &str) -> Result<Vec<u8>, String> {
    let digits: String = s.chars().filter(|c| !matches!(c, ':' | '-')).collect();
    if digits.is_empty() || digits.len() % 2 != 0 || digits.len() > 12 {
        return Err(format!(
            "firmware_isid {s:?}: 1 to 6 bytes in hex (e.g. \"40:00:27:23\" or \"125400123456\")"
        ));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| format!("firmware_isid {s:?}: not hex"))
        })
        .collect()
}

impl fmt::Display for OverlayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverlayMode::Volatile => "volatile",
            OverlayMode::Persistent => "persistent",
            OverlayMode::Readonly => "readonly",
            OverlayMode::Direct => "direct",
            OverlayMode::Install => "install",
        })
    }
}

/// `boot:` of a target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// Bindings, first match wins.
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
    /// Binding for initiators no binding matches; absent = unknown initiators are refused.
    #[serde(default)]
    pub default: Option<DefaultBindingConfig>,
}

/// One binding: which initiators get which image, how.
///
/// The client's disks: LUN 0 is `image` + `mode`; `disks` adds LUN 1, 2, ... each with its
/// own image and mode (docs/configuration.md). The YAML may also list LUN 0 inside `disks`
/// instead of `image`/`mode`: it is moved here when the file is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawBinding")]
pub struct BindingConfig {
    /// Exact initiator name or glob (`iqn.2010-04.org.ipxe:*`). With `mac`/`uuid` it must be
    /// exact (the boot script sets it); absent with `mac`: derived from the MAC.
    pub initiator: Option<String>,
    /// The image of LUN 0 (the system disk).
    pub image: String,
    /// The mode of LUN 0.
    pub mode: OverlayMode,
    /// Further disks (LUN 1 and up), in LUN order.
    pub disks: Vec<DiskConfig>,
    /// MAC address the boot script endpoint knows this client by.
    pub mac: Option<String>,
    /// SMBIOS UUID the boot script endpoint knows this client by.
    pub uuid: Option<String>,
    /// CHAP credentials of this client (per-client CHAP); override the target's `chap`.
    pub chap: Option<ChapConfig>,
    /// When a boot discards a volatile disk: auto (default), on_script, manual.
    pub reset: ResetPolicy,
    /// The client firmware's ISID, or a prefix of it (an OUI: its first three bytes), in
    /// hex: logins matching it are the firmware's, all others the OS's.
    pub firmware_isid: Option<String>,
    /// The client's operating system: what the boot script adds for it (docs/booting.md).
    pub os: ClientOs,
    /// Whether the boot script clears iPXE's gateway before `sanboot` (the Windows route
    /// problem, docs/booting.md).
    pub gateway: GatewayPolicy,
}

/// A binding as written in the YAML file (LUN 0 either as `image`/`mode` or in `disks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    #[serde(default)]
    initiator: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    mode: Option<OverlayMode>,
    #[serde(default)]
    disks: Vec<DiskConfig>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    chap: Option<ChapConfig>,
    #[serde(default)]
    reset: ResetPolicy,
    #[serde(default)]
    firmware_isid: Option<String>,
    #[serde(default)]
    os: ClientOs,
    #[serde(default)]
    gateway: GatewayPolicy,
}

/// One disk of a client: `{lun: 1, image: data, mode: persistent}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub lun: u16,
    pub image: String,
    pub mode: OverlayMode,
}

/// Highest LUN of a client disk (iPXE drive numbers 0x80 + LUN stay below 0x100).
pub const MAX_DISK_LUN: u16 = 127;

/// LUN 0 out of `image`/`mode` or `disks`, the rest sorted by LUN; the structural rules
/// (one LUN 0, unique LUNs, modes an extra disk can have). Images are checked later.
fn split_disks(
    image: Option<String>,
    mode: Option<OverlayMode>,
    mut disks: Vec<DiskConfig>,
) -> Result<(String, OverlayMode, Vec<DiskConfig>), String> {
    disks.sort_by_key(|d| d.lun);
    for w in disks.windows(2) {
        if w[0].lun == w[1].lun {
            return Err(format!("disks: LUN {} is listed twice", w[0].lun));
        }
    }
    let (image, mode) = match (image, mode, disks.first().filter(|d| d.lun == 0)) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(
                "LUN 0 is given twice: either image/mode or a disks entry with lun: 0".into(),
            )
        }
        (Some(i), Some(m), None) => (i, m),
        (None, None, Some(d0)) => {
            let d0 = d0.clone();
            disks.remove(0);
            (d0.image, d0.mode)
        }
        (Some(_), None, None) => return Err("missing field `mode`".into()),
        (None, _, None) if disks.is_empty() => return Err("missing field `image`".into()),
        (None, _, None) => return Err("disks: no LUN 0 (the disk the client boots from)".into()),
    };
    for d in &disks {
        if d.lun > MAX_DISK_LUN {
            return Err(format!("disks: LUN {} is above {MAX_DISK_LUN}", d.lun));
        }
        if !matches!(
            d.mode,
            OverlayMode::Volatile | OverlayMode::Persistent | OverlayMode::Readonly
        ) {
            return Err(format!(
                "disks: LUN {} is {}: a disk other than LUN 0 is volatile, persistent or \
                 readonly (direct and install are for the system disk)",
                d.lun, d.mode
            ));
        }
    }
    Ok((image, mode, disks))
}

impl TryFrom<RawBinding> for BindingConfig {
    type Error = String;

    fn try_from(r: RawBinding) -> Result<Self, String> {
        let (image, mode, disks) = split_disks(r.image, r.mode, r.disks)?;
        Ok(BindingConfig {
            initiator: r.initiator,
            image,
            mode,
            disks,
            mac: r.mac,
            uuid: r.uuid,
            chap: r.chap,
            reset: r.reset,
            firmware_isid: r.firmware_isid,
            os: r.os,
            gateway: r.gateway,
        })
    }
}

/// `os:` of a binding: what the boot script does for the client's operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientOs {
    /// Linux and anything else: a plain `sanboot`.
    #[default]
    Other,
    Linux,
    /// Windows: `sanboot --keep`, and the gateway rule of `gateway: auto`.
    Windows,
}

impl fmt::Display for ClientOs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientOs::Other => "other",
            ClientOs::Linux => "linux",
            ClientOs::Windows => "windows",
        })
    }
}

/// `gateway:` of a binding: clear iPXE's gateway (`set netX/gateway 0.0.0.0`) before
/// `sanboot`, so the iBFT hands the OS no gateway (ipxe/ipxe#1599, docs/booting.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayPolicy {
    /// Clear it for `os: windows` when the portal is on the client's subnet (known from the
    /// script URL's `ip=` and `netmask=`); keep it otherwise.
    #[default]
    Auto,
    Keep,
    /// Always clear it (the portal must then be on the client's subnet).
    Clear,
}

/// `boot.default:` (LUN 0 as `image`/`mode` or in `disks`, as in a binding).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawDefaultBinding")]
pub struct DefaultBindingConfig {
    pub image: String,
    pub mode: OverlayMode,
    /// Further disks (LUN 1 and up), in LUN order.
    pub disks: Vec<DiskConfig>,
    /// As in a binding.
    pub reset: ResetPolicy,
    pub os: ClientOs,
    pub gateway: GatewayPolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaultBinding {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    mode: Option<OverlayMode>,
    #[serde(default)]
    disks: Vec<DiskConfig>,
    #[serde(default)]
    reset: ResetPolicy,
    #[serde(default)]
    os: ClientOs,
    #[serde(default)]
    gateway: GatewayPolicy,
}

impl TryFrom<RawDefaultBinding> for DefaultBindingConfig {
    type Error = String;

    fn try_from(r: RawDefaultBinding) -> Result<Self, String> {
        let (image, mode, disks) = split_disks(r.image, r.mode, r.disks)?;
        Ok(DefaultBindingConfig {
            image,
            mode,
            disks,
            reset: r.reset,
            os: r.os,
            gateway: r.gateway,
        })
    }
}

/// Default address of the operator API: loopback only.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9260";
/// Shortest admin token accepted (a token is a password typed by nobody: make it long).
pub const MIN_API_TOKEN: usize = 16;

fn default_api_listen() -> Portal {
    Portal(SocketAddr::from(([127, 0, 0, 1], 9260)))
}

/// `api:`: the operator's HTTP API, web console and Prometheus metrics (docs/operations.md).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address; default 127.0.0.1:9260. Any non-loopback address needs a credential.
    #[serde(default = "default_api_listen")]
    pub listen: Portal,
    /// Admin bearer token (at least 16 bytes). Never logged or returned.
    #[serde(default)]
    pub token: Option<String>,
    /// The admin token as the hex SHA-256 of it (keeps the token itself out of the file).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// A separate listener for `/metrics` only, without credential (e.g. 0.0.0.0:9261 for
    /// Prometheus). `/metrics` is also served on `listen`, behind the credential.
    #[serde(default)]
    pub metrics_listen: Option<Portal>,
}

impl fmt::Debug for ApiConfig {
    // The credential is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("credential", &self.has_credential())
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            token: None,
            token_sha256: None,
            metrics_listen: None,
        }
    }
}

impl ApiConfig {
    pub fn has_credential(&self) -> bool {
        self.token.is_some() || self.token_sha256.is_some()
    }

    /// The SHA-256 of the admin token, if one is configured.
    pub fn token_digest(&self) -> Option<[u8; 32]> {
        use sha2::{Digest, Sha256};
        if let Some(t) = &self.token {
            return Some(Sha256::digest(t.as_bytes()).into());
        }
        let hex = self.token_sha256.as_deref()?;
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        if self.token.is_some() && self.token_sha256.is_some() {
            return Err(ConfigError::invalid(
                file,
                "api",
                "give token or token_sha256, not both",
            ));
        }
        if let Some(t) = &self.token {
            if t.len() < MIN_API_TOKEN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::invalid(
                    file,
                    "api.token",
                    format!("the token must be at least {MIN_API_TOKEN} bytes without spaces"),
                ));
            }
        }
        if let Some(h) = &self.token_sha256 {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    file,
                    "api.token_sha256",
                    "expected 64 hex digits (sha256sum of the token)",
                ));
            }
        }
        if !self.listen.0.ip().is_loopback() && !self.has_credential() {
            return Err(ConfigError::invalid(
                file,
                "api.listen",
                format!(
                    "{} is not a loopback address: an admin token (api.token or api.token_sha256) is required",
                    self.listen.0
                ),
            ));
        }
        if self
            .metrics_listen
            .is_some_and(|m| m.0 == self.listen.0 && m.0.port() != 0)
        {
            return Err(ConfigError::invalid(
                file,
                "api.metrics_listen",
                "metrics_listen must differ from listen (/metrics is served there already)",
            ));
        }
        Ok(())
    }
}

/// `boot_http:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootHttpConfig {
    /// Address of the HTTP listener, e.g. 0.0.0.0:8080.
    pub listen: Portal,
    /// iSCSI portal written into the scripts (`host:port`, or a host (IPv4 or name) alone:
    /// with the first portal's port); default: the address the client reached the HTTP
    /// listener on, with the first portal's port.
    #[serde(default)]
    pub iscsi_portal: Option<String>,
}

/// `netboot.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetbootMode {
    /// Nothing is answered.
    Off,
    /// proxyDHCP (PXE 2.1): boot information only, beside the site's DHCP server.
    Proxy,
    /// A DHCP server with an address pool (isolated lab networks only).
    Dhcp,
}

impl fmt::Display for NetbootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetbootMode::Off => "off",
            NetbootMode::Proxy => "proxy",
            NetbootMode::Dhcp => "dhcp",
        })
    }
}

/// `netboot.clients`: the keyword `any`, or a list of MAC addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NetbootClients {
    Keyword(String),
    Macs(Vec<String>),
}

/// `netboot.boot_files`: the iPXE binary (a name inside `root`) per client architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootFilesConfig {
    /// Legacy BIOS PXE (option 93 = 0).
    pub bios: String,
    /// UEFI x86-64 (option 93 = 7 or 9; 16 for HTTP boot).
    pub uefi_x64: String,
    /// UEFI IA32 (6; 15 for HTTP boot).
    pub uefi_ia32: String,
    /// UEFI ARM64 (11; 19 for HTTP boot).
    pub uefi_arm64: String,
}

impl Default for BootFilesConfig {
    fn default() -> Self {
        BootFilesConfig {
            bios: "undionly.kpxe".into(),
            uefi_x64: "snponly.efi".into(),
            uefi_ia32: "ipxe-ia32.efi".into(),
            uefi_arm64: "snponly-arm64.efi".into(),
        }
    }
}

/// `netboot.ports`: the well-known ports; only tests change them.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetbootPorts {
    pub dhcp: u16,
    pub pxe: u16,
    pub tftp: u16,
    /// Where replies to clients go (68; tests use another).
    pub client: u16,
}

impl Default for NetbootPorts {
    fn default() -> Self {
        NetbootPorts {
            dhcp: 67,
            pxe: 4011,
            tftp: 69,
            client: 68,
        }
    }
}

/// `netboot.pool` (mode dhcp).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub start: std::net::Ipv4Addr,
    pub end: std::net::Ipv4Addr,
    /// Prefix length of the subnet (e.g. 24).
    #[serde(default = "default_prefix")]
    pub prefix_len: u8,
    #[serde(default)]
    pub router: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<std::net::Ipv4Addr>,
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
}

fn default_prefix() -> u8 {
    24
}
fn default_lease_secs() -> u32 {
    3600
}
fn default_netboot_root() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}

/// `netboot:` (docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetbootConfig {
    pub mode: NetbootMode,
    /// Network interfaces to answer on (each socket is bound to its device); empty: all.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// The address written into answers (boot server, TFTP server, script URL); default: the
    /// first IPv4 address of the first interface (or of the host).
    #[serde(default)]
    pub server_ip: Option<std::net::Ipv4Addr>,
    /// Which clients get an answer: `any` or a list of MAC addresses.
    pub clients: NetbootClients,
    /// Directory served over TFTP and HTTP (`/files/...`): iPXE binaries, kernels, initrds.
    #[serde(default = "default_netboot_root")]
    pub root: PathBuf,
    #[serde(default)]
    pub boot_files: BootFilesConfig,
    /// The URL iPXE is sent to; default: the boot_http listener's `/boot.ipxe` with the
    /// client's MAC, UUID and platform.
    #[serde(default)]
    pub script_url: Option<String>,
    /// Serve TFTP (default yes).
    #[serde(default = "default_true")]
    pub tftp: bool,
    #[serde(default)]
    pub ports: NetbootPorts,
    /// Mode dhcp: the address pool; leases are kept in STATE_DIR/leases.
    #[serde(default)]
    pub pool: Option<PoolConfig>,
}

impl NetbootConfig {
    /// The quick-mode section (`serve --netboot MODE`): any client, the Debian ipxe files.
    pub fn quick(mode: NetbootMode) -> NetbootConfig {
        NetbootConfig {
            mode,
            interfaces: Vec::new(),
            server_ip: None,
            clients: NetbootClients::Keyword("any".into()),
            root: default_netboot_root(),
            boot_files: BootFilesConfig::default(),
            script_url: None,
            tftp: true,
            ports: NetbootPorts::default(),
            pool: None,
        }
    }

    /// The accepted MACs (lowercase, ':'), or None for any client.
    pub fn client_macs(&self) -> Option<Vec<String>> {
        match &self.clients {
            NetbootClients::Keyword(_) => None,
            NetbootClients::Macs(m) => Some(m.iter().filter_map(|m| parse_mac(m).ok()).collect()),
        }
    }

    fn validate(&self, file: &str, has_http: bool) -> Result<(), ConfigError> {
        let bad = |key: &str, msg: String| {
            ConfigError::invalid(
                file,
                if key.is_empty() {
                    "netboot".to_string()
                } else {
                    format!("netboot.{key}")
                },
                msg,
            )
        };
        match &self.clients {
            NetbootClients::Keyword(k) if k == "any" => {}
            NetbootClients::Keyword(k) => {
                return Err(bad(
                    "clients",
                    format!("{k:?}: expected `any` or a list of MAC addresses"),
                ))
            }
            NetbootClients::Macs(m) => {
                if m.is_empty() {
                    return Err(bad(
                        "clients",
                        "empty list: no client would get an answer".into(),
                    ));
                }
                for (i, mac) in m.iter().enumerate() {
                    parse_mac(mac).map_err(|e| bad(&format!("clients[{i}]"), e))?;
                }
            }
        }
        for (i, ifname) in self.interfaces.iter().enumerate() {
            // IFNAMSIZ is 16 with the NUL.
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '\0']) {
                return Err(bad(
                    &format!("interfaces[{i}]"),
                    format!("{ifname:?} is not an interface name"),
                ));
            }
        }
        for (key, name) in [
            ("boot_files.bios", &self.boot_files.bios),
            ("boot_files.uefi_x64", &self.boot_files.uefi_x64),
            ("boot_files.uefi_ia32", &self.boot_files.uefi_ia32),
            ("boot_files.uefi_arm64", &self.boot_files.uefi_arm64),
        ] {
            // A DHCP `file` field holds 127 bytes and a NUL.
            if name.is_empty() || name.len() > 127 || name.contains("..") || !name.is_ascii() {
                return Err(bad(
                    key,
                    format!("{name:?} must be 1-127 ASCII bytes naming a file in root"),
                ));
            }
        }
        if let Some(u) = &self.script_url {
            if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("tftp://"))
                || u.len() > 127
            {
                return Err(bad(
                    "script_url",
                    format!(
                        "{u:?} must be an http://, https:// or tftp:// URL of at most 127 bytes"
                    ),
                ));
            }
        }
        if self.mode == NetbootMode::Off {
            return Ok(());
        }
        if !self.root.is_dir() {
            return Err(bad(
                "root",
                format!(
                    "{} is not a directory (install the Debian package ipxe, or name a \
                     directory holding the iPXE binaries)",
                    self.root.display()
                ),
            ));
        }
        if self.script_url.is_none() && !has_http {
            return Err(bad(
                "",
                "needs boot_http (the boot script endpoint iPXE is sent to) or script_url".into(),
            ));
        }
        match (&self.pool, self.mode) {
            (None, NetbootMode::Dhcp) => {
                return Err(bad("pool", "mode dhcp needs an address pool".into()))
            }
            (Some(_), NetbootMode::Proxy) => {
                return Err(bad(
                    "pool",
                    "mode proxy never hands out addresses; remove pool or use mode dhcp".into(),
                ))
            }
            (Some(p), _) => {
                if !(8..=30).contains(&p.prefix_len) {
                    return Err(bad(
                        "pool.prefix_len",
                        format!("{} is outside 8..=30", p.prefix_len),
                    ));
                }
                let (s, e) = (u32::from(p.start), u32::from(p.end));
                let mask = u32::MAX << (32 - u32::from(p.prefix_len));
                if s > e || s & mask != e & mask {
                    return Err(bad(
                        "pool",
                        format!(
                            "start {} and end {} must be in order and in one /{} subnet",
                            p.start, p.end, p.prefix_len
                        ),
                    ));
                }
                if e - s >= 65_536 {
                    return Err(bad("pool", "more than 65536 addresses".into()));
                }
                if p.lease_secs < 60 {
                    return Err(bad("pool.lease_secs", "must be at least 60".into()));
                }
            }
            (None, _) => {}
        }
        Ok(())
    }
}

fn default_block_size() -> u32 {
    512
}
fn default_true() -> bool {
    true
}

/// One entry of `luns:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    /// Read as u32 so that out-of-range numbers get our message, not serde's.
    pub lun: u32,
    /// Relative paths are relative to the configuration file's directory.
    pub image: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Physical block size reported to clients (512e: 4096 over 512-byte logical blocks);
    /// default: `block_size`.
    #[serde(default)]
    pub physical_block_size: Option<u32>,
    #[serde(default = "default_true")]
    pub thin: bool,
    #[serde(default)]
    pub removable: bool,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub create_size: Option<ByteSize>,
    /// The NAA identifier's form for this LUN (default: the target's, else `legacy`).
    #[serde(default)]
    pub identity: Option<IdentityFormat>,
}

/// Validate an iSCSI name (RFC 7143 §4.2.7: "iqn.", "eui." or "naa." formats; characters
/// restricted to what stringprep (RFC 3722) leaves: a-z 0-9 '-' '.' ':').
pub fn validate_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name {name:?} is longer than {MAX_NAME_LEN} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | ':')))
    {
        return Err(format!(
            "name {name:?} contains {c:?}: only lowercase a-z, 0-9, '-', '.' and ':' are allowed \
             (RFC 7143 §4.2.7)"
        ));
    }
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix("iqn.") {
        // iqn.YYYY-MM.reversed.domain[:anything]
        let b = rest.as_bytes();
        let date_ok = b.len() > 8
            && b.iter().take(4).all(u8::is_ascii_digit)
            && b.get(4) == Some(&b'-')
            && b.get(5..7)
                .is_some_and(|m| m.iter().all(u8::is_ascii_digit))
            && b.get(7) == Some(&b'.');
        let month_ok = rest
            .get(5..7)
            .and_then(|m| m.parse::<u8>().ok())
            .is_some_and(|m| (1..=12).contains(&m));
        let authority = rest.get(8..).unwrap_or("");
        let authority = authority.split(':').next().unwrap_or("");
        if !date_ok || !month_ok || authority.is_empty() {
            return Err(format!(
                "name {name:?} is not iqn.YYYY-MM.reversed.domain[:identifier], \
                 e.g. iqn.2026-11.org.example:disk (RFC 7143 §4.2.7)"
            ));
        }
        Ok(())
    } else if let Some(rest) = name.strip_prefix("eui.") {
        if rest.len() == 16 && hex(rest) {
            Ok(())
        } else {
            Err(format!(
                "name {name:?}: eui. must be followed by 16 hex digits (RFC 7143 §4.2.7)"
            ))
        }
    } else if let Some(rest) = name.strip_prefix("naa.") {
        if (rest.len() == 16 || rest.len() == 32) && hex(rest) {
            Ok(())
        } else {
            Err(format!(
                "name {name:?}: naa. must be followed by 16 or 32 hex digits (RFC 7143 §4.2.7)"
            ))
        }
    } else {
        Err(format!(
            "name {name:?} must start with iqn., eui. or naa. (RFC 7143 §4.2.7)"
        ))
    }
}

/// Parse a source address: an IP ("10.0.0.5") or a network ("10.0.0.0/24", "fd00::/64").
pub fn parse_source(s: &str) -> Result<ipnet::IpNet, String> {
    let t = s.trim();
    t.parse::<ipnet::IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("bad source address {s:?}: expected an IP or a CIDR network"))
}

/// Parse a MAC address ("52:54:00:12:34:56" or with '-'), lowercase hex with ':'.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(format!(
            "bad MAC address {s:?}: expected e.g. 52:54:00:12:34:56"
        ));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

/// Build a case-insensitive matcher for initiator name globs (initiator names are
/// case-insensitive: stringprep lowercases them, RFC 3722).
pub fn build_acl(patterns: &[String]) -> Result<globset::GlobSet, String> {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        let g = globset::GlobBuilder::new(p)
            .case_insensitive(true)
            .build()
            .map_err(|e| format!("bad initiator glob {p:?}: {e}"))?;
        b.add(g);
    }
    b.build().map_err(|e| format!("bad initiator globs: {e}"))
}

impl Config {
    /// Read, parse and validate `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Config::from_yaml(&text, &file, base)
    }

    /// Parse and validate YAML text; `file` names it in errors, relative images resolve
    /// against `base_dir`.
    pub fn from_yaml(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        // An empty file (or only comments) is an empty configuration, not an error.
        let mut config: Config = if text.trim().lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            serde_yaml::from_str("{}")
        } else {
            serde_yaml::from_str(text)
        }
        .map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        config.base_dir = base_dir.to_path_buf();
        config.source = file.to_string();
        if let Some(c) = config.cluster.as_mut() {
            c.resolve_paths(base_dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// A config with one target from the command line (quick mode); nothing is validated
    /// against the file system.
    pub fn quick(image: &Path, target: &str, read_only: bool, block_size: u32) -> Config {
        Config {
            portals: default_portals(),
            settings: SettingsConfig::default(),
            discovery: DiscoveryConfig::default(),
            targets: vec![TargetConfig {
                name: target.to_string(),
                alias: None,
                initiators: default_initiators(),
                sources: Default::default(),
                chap: None,
                luns: vec![LunConfig {
                    lun: 0,
                    image: image.to_path_buf(),
                    read_only,
                    block_size,
                    physical_block_size: None,
                    thin: true,
                    removable: false,
                    serial: None,
                    create_size: None,
                    identity: None,
                }],
                boot: None,
                identity: None,
            }],
            images: Vec::new(),
            state_dir: None,
            boot_http: None,
            netboot: None,
            api: None,
            chunk_cache: ChunkCacheConfig::default(),
            cluster: None,
            rbd: None,
            base_dir: PathBuf::from("."),
            source: QUICK_SOURCE.to_string(),
        }
    }

    /// Quick mode with overlays: the image is a golden image and every initiator gets its
    /// own disk in `mode` (a boot target with only a default binding).
    pub fn quick_boot(image: &Path, target: &str, mode: OverlayMode, block_size: u32) -> Config {
        let mut c = Config::quick(image, target, true, block_size);
        let name = image
            .file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "image".into());
        c.images = vec![ImageConfig {
            name: name.clone(),
            path: image.to_path_buf(),
            s3: None,
            block_size,
            physical_block_size: None,
            create_size: None,
            rbd: None,
        }];
        if let Some(t) = c.targets.first_mut() {
            t.luns.clear();
            t.boot = Some(BootConfig {
                bindings: Vec::new(),
                default: Some(DefaultBindingConfig {
                    image: name,
                    mode,
                    disks: Vec::new(),
                    reset: ResetPolicy::Auto,
                    os: ClientOs::Other,
                    gateway: GatewayPolicy::Auto,
                }),
            });
        }
        c
    }

    /// The portal addresses.
    pub fn portal_addrs(&self) -> Vec<SocketAddr> {
        self.portals.iter().map(|p| p.0).collect()
    }

    /// The state directory (overlays, control socket), resolved.
    pub fn state_path(&self) -> PathBuf {
        self.image_path(self.state_dir.as_deref().unwrap_or(Path::new("state")))
    }

    /// The absolute-or-base-relative path of an image.
    pub fn image_path(&self, image: &Path) -> PathBuf {
        if image.is_absolute() {
            image.to_path_buf()
        } else {
            self.base_dir.join(image)
        }
    }

    /// Valid but questionable settings, one sentence each (never a secret): CHAP secrets
    /// longer than the Microsoft iSCSI initiator accepts.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |path: String, c: &ChapConfig| {
            for (what, s) in [
                ("secret", Some(&c.secret)),
                ("mutual_secret", c.mutual_secret.as_ref()),
            ] {
                if let Some(s) = s.filter(|s| s.len() > MS_INITIATOR_MAX_CHAP_SECRET) {
                    out.push(format!(
                        "{}: {path}.chap.{what} is {} bytes: the Microsoft iSCSI initiator \
                         accepts {MIN_CHAP_SECRET} to {MS_INITIATOR_MAX_CHAP_SECRET}, so Windows \
                         clients cannot log in with it",
                        self.source,
                        s.len()
                    ));
                }
            }
        };
        if let Some(c) = &self.discovery.chap {
            check("discovery".into(), c);
        }
        for (i, t) in self.targets.iter().enumerate() {
            if let Some(c) = &t.chap {
                check(format!("targets[{i}]"), c);
            }
            for (j, b) in t.boot.iter().flat_map(|b| b.bindings.iter()).enumerate() {
                if let Some(c) = &b.chap {
                    check(format!("targets[{i}].boot.bindings[{j}]"), c);
                }
            }
        }
        out
    }

    /// Check everything serde cannot: names, numbers, duplicates, secrets, images.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let file = self.source.as_str();
        if self.portals.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "portals",
                "no listen address given",
            ));
        }
        let mut seen = HashSet::new();
        for (i, p) in self.portals.iter().enumerate() {
            if !seen.insert(p.0) {
                return Err(ConfigError::invalid(
                    file,
                    format!("portals[{i}]"),
                    format!("duplicate portal {}", p.0),
                ));
            }
        }
        self.settings.validate(file)?;
        if let Some(api) = &self.api {
            api.validate(file)?;
        }
        self.validate_images()?;
        if let Some(c) = &self.cluster {
            c.validate(file)?;
        }
        self.validate_rbd()?;
        if let Some(n) = &self.netboot {
            n.validate(file, self.boot_http.is_some())?;
        }
        if let Some(chap) = &self.discovery.chap {
            chap.validate(file, "discovery.chap")?;
        }
        let mut names = HashSet::new();
        for (ti, t) in self.targets.iter().enumerate() {
            let tpath = format!("targets[{ti}]");
            validate_iscsi_name(&t.name)
                .map_err(|m| ConfigError::invalid(file, format!("{tpath}.name"), m))?;
            if !names.insert(t.name.as_str()) {
                return Err(ConfigError::invalid(
                    file,
                    format!("{tpath}.name"),
                    format!("duplicate target name {}", t.name),
                ));
            }
            if let Some(a) = &t.alias {
                // TargetAlias is a UTF-8 text value (§13.6); keep it printable and short.
                if a.is_empty() || a.len() > 255 || a.chars().any(char::is_control) {
                    return Err(ConfigError::invalid(
                        file,
                        format!("{tpath}.alias"),
                        "alias must be 1-255 bytes of printable text",
                    ));
                }
            }
            if t.initiators.is_empty() {
                return Err(ConfigError::invalid(
                    file,
                    format!("{tpath}.initiators"),
                    "empty list: no initiator could log in (omit the key to allow everyone)",
                ));
            }
            build_acl(&t.initiators)
                .map_err(|m| ConfigError::invalid(file, format!("{tpath}.initiators"), m))?;
            for (glob, nets) in &t.sources {
                build_acl(std::slice::from_ref(glob))
                    .map_err(|m| ConfigError::invalid(file, format!("{tpath}.sources"), m))?;
                for n in nets {
                    parse_source(n).map_err(|m| {
                        ConfigError::invalid(file, format!("{tpath}.sources[{glob:?}]"), m)
                    })?;
                }
            }
            if let Some(chap) = &t.chap {
                chap.validate(file, &format!("{tpath}.chap"))?;
            }
            match (&t.boot, t.luns.is_empty()) {
                (Some(_), false) => {
                    return Err(ConfigError::invalid(
                        file,
                        tpath.clone(),
                        "a target has either luns or boot, not both",
                    ))
                }
                (None, true) => {
                    return Err(ConfigError::invalid(
                        file,
                        format!("{tpath}.luns"),
                        "no LUNs (and no boot section)",
                    ))
                }
                (Some(b), true) => self.validate_boot(&format!("{tpath}.boot"), b)?,
                (None, false) => {}
            }
            let mut luns = HashSet::new();
            for (li, l) in t.luns.iter().enumerate() {
                self.validate_lun(&format!("{tpath}.luns[{li}]"), l)?;
                if !luns.insert(l.lun) {
                    return Err(ConfigError::invalid(
                        file,
                        format!("{tpath}.luns[{li}]"),
                        format!("duplicate LUN {}", l.lun),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `rbd:` and `images[].rbd`: names, the configuration files, and `cluster:` (a node
    /// fences another's RBD lock only when etcd says it owns the client).
    fn validate_rbd(&self) -> Result<(), ConfigError> {
        let file = self.source.as_str();
        if let Some(r) = &self.rbd {
            for (key, v) in [("pool", &r.pool), ("id", &r.id), ("prefix", &r.prefix)] {
                if !is_rbd_name(v) {
                    return Err(ConfigError::invalid(
                        file,
                        format!("rbd.{key}"),
                        format!("{v:?} must be 1-96 letters, digits, '-', '_' or '.'"),
                    ));
                }
            }
            let conf = self.image_path(&r.conf);
            if !conf.is_file() {
                return Err(ConfigError::invalid(
                    file,
                    "rbd.conf",
                    format!("{} is not a file", conf.display()),
                ));
            }
            if let Some(k) = &r.keyring {
                let k = self.image_path(k);
                if !k.is_file() {
                    return Err(ConfigError::invalid(
                        file,
                        "rbd.keyring",
                        format!("{} is not a file", k.display()),
                    ));
                }
            }
            if self.cluster.is_none() {
                return Err(ConfigError::invalid(
                    file,
                    "rbd",
                    "RBD client disks need cluster: (a node fences a disk's previous holder \
                     only when etcd says the client is its own)",
                ));
            }
        }
        for (i, im) in self.images.iter().enumerate() {
            let Some(ir) = &im.rbd else { continue };
            let path = format!("images[{i}].rbd");
            if self.rbd.is_none() {
                return Err(ConfigError::invalid(
                    file,
                    path,
                    "needs the top-level rbd: section (pool, id, conf)",
                ));
            }
            if ir.parent_parts().is_none() {
                return Err(ConfigError::invalid(
                    file,
                    format!("{path}.parent"),
                    format!(
                        "{:?} must be IMAGE@SNAPSHOT (letters, digits, '-', '_', '.')",
                        ir.parent
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_images(&self) -> Result<(), ConfigError> {
        let file = self.source.as_str();
        let mut names = HashSet::new();
        for (i, im) in self.images.iter().enumerate() {
            let path = format!("images[{i}]");
            let bad = |m: String| ConfigError::invalid(file, path.as_str(), m);
            if im.name.is_empty()
                || !im
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(bad(format!(
                    "image name {:?} must be non-empty letters, digits, '-', '_' or '.'",
                    im.name
                )));
            }
            if !names.insert(im.name.as_str()) {
                return Err(bad(format!("duplicate image name {}", im.name)));
            }
            if let Some(s3) = &im.s3 {
                if !im.path.as_os_str().is_empty() || im.create_size.is_some() {
                    return Err(bad(
                        "an image has either a path or s3:, not both (nor create_size)".into(),
                    ));
                }
                s3.validate()
                    .map_err(|m| ConfigError::invalid(file, format!("{path}.s3"), m))?;
                if s3.pointer().is_some() && self.cluster.is_none() {
                    return Err(ConfigError::invalid(
                        file,
                        format!("{path}.s3"),
                        "version: latest and channel: follow the cluster's image catalogue: they need cluster:",
                    ));
                }
                s3.credentials(|p| self.image_path(p))
                    .map_err(|m| ConfigError::invalid(file, format!("{path}.s3"), m))?;
                continue;
            }
            if im.path.as_os_str().is_empty() {
                return Err(bad("needs a path (or s3:)".into()));
            }
            // The same checks as a LUN's image.
            let as_lun = LunConfig {
                lun: 0,
                image: im.path.clone(),
                read_only: true,
                block_size: im.block_size,
                physical_block_size: im.physical_block_size,
                thin: true,
                removable: false,
                serial: None,
                create_size: im.create_size,
                identity: None,
            };
            self.validate_lun(&path, &as_lun)?;
        }
        Ok(())
    }

    fn validate_boot(&self, path: &str, b: &BootConfig) -> Result<(), ConfigError> {
        let file = self.source.as_str();
        let known = |image: &str, p: String| {
            // A versioned image (`name`, `name@N`, `name:channel`, docs/images.md) lives in
            // the state directory: the registry resolves it when it opens the images.
            let versioned = image.contains(['@', ':'])
                || image
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
            if versioned || self.images.iter().any(|i| i.name == image) {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    file,
                    p,
                    format!("image {image:?} is not in images:"),
                ))
            }
        };
        // An image in an object store is immutable: `direct` would write into it.
        let in_s3 = |image: &str| {
            self.images
                .iter()
                .any(|i| i.name == image && i.s3.is_some())
        };
        let direct = b
            .bindings
            .iter()
            .enumerate()
            .map(|(i, bd)| (format!("{path}.bindings[{i}].mode"), &bd.image, bd.mode))
            .chain(
                b.default
                    .iter()
                    .map(|d| (format!("{path}.default.mode"), &d.image, d.mode)),
            );
        for (p, image, mode) in direct {
            if mode == OverlayMode::Direct && in_s3(image) {
                return Err(ConfigError::invalid(
                    file,
                    p,
                    format!(
                        "image {image:?} is in an object store (immutable): direct is not possible"
                    ),
                ));
            }
        }
        if b.bindings.is_empty() && b.default.is_none() {
            return Err(ConfigError::invalid(
                file,
                path,
                "no bindings and no default: no client could boot",
            ));
        }
        for (i, bd) in b.bindings.iter().enumerate() {
            let bp = format!("{path}.bindings[{i}]");
            known(&bd.image, format!("{bp}.image"))?;
            for d in &bd.disks {
                known(&d.image, format!("{bp}.disks[lun {}].image", d.lun))?;
            }
            match &bd.initiator {
                Some(pat) => {
                    build_acl(std::slice::from_ref(pat))
                        .map_err(|m| ConfigError::invalid(file, format!("{bp}.initiator"), m))?;
                    let glob = pat.contains(['*', '?', '[', '{']);
                    if glob && (bd.mac.is_some() || bd.uuid.is_some()) {
                        return Err(ConfigError::invalid(
                            file,
                            format!("{bp}.initiator"),
                            "a binding with mac or uuid needs an exact initiator name (the boot                              script sets it)",
                        ));
                    }
                    if !glob {
                        validate_iscsi_name(&pat.to_ascii_lowercase()).map_err(|m| {
                            ConfigError::invalid(file, format!("{bp}.initiator"), m)
                        })?;
                    }
                }
                None if bd.mac.is_none() => {
                    return Err(ConfigError::invalid(
                        file,
                        bp,
                        "a binding needs an initiator (name or glob) or a mac",
                    ))
                }
                None => {}
            }
            if let Some(mac) = &bd.mac {
                parse_mac(mac).map_err(|m| ConfigError::invalid(file, format!("{bp}.mac"), m))?;
            }
            if let Some(chap) = &bd.chap {
                chap.validate(file, &format!("{bp}.chap"))?;
            }
            if let Some(f) = &bd.firmware_isid {
                parse_isid_prefix(f)
                    .map_err(|m| ConfigError::invalid(file, format!("{bp}.firmware_isid"), m))?;
            }
        }
        if let Some(d) = &b.default {
            known(&d.image, format!("{path}.default.image"))?;
            for x in &d.disks {
                known(
                    &x.image,
                    format!("{path}.default.disks[lun {}].image", x.lun),
                )?;
            }
        }
        Ok(())
    }

    fn validate_lun(&self, path: &str, l: &LunConfig) -> Result<(), ConfigError> {
        let file = self.source.as_str();
        let bad = |msg: String| ConfigError::invalid(file, path, msg);
        if l.lun > MAX_LUN {
            return Err(bad(format!("LUN {} is above {MAX_LUN}", l.lun)));
        }
        if l.block_size != 512 && l.block_size != 4096 {
            return Err(bad(format!(
                "block_size {} is not 512 or 4096",
                l.block_size
            )));
        }
        if let Some(p) = l.physical_block_size {
            // READ CAPACITY(16) reports it as a power-of-two exponent of logical blocks
            // (LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT, SBC-3 §5.16.2, 4 bits).
            if !p.is_power_of_two() || p < l.block_size || p / l.block_size > 1 << 15 {
                return Err(bad(format!(
                    "physical_block_size {p} must be a power of two, at least block_size {} (4096 over 512 for 512e)",
                    l.block_size
                )));
            }
        }
        if let Some(s) = &l.serial {
            // The Unit Serial Number VPD page (0x80) holds printable ASCII (SPC-4).
            if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(bad(format!(
                    "serial {s:?} must be 1-64 printable ASCII characters without spaces"
                )));
            }
        }
        let image = self.image_path(&l.image);
        match std::fs::metadata(&image) {
            Ok(m) if m.is_dir() => {
                return Err(bad(format!("image {} is a directory", image.display())))
            }
            Ok(m) if m.is_file() => {
                if m.len() == 0 || m.len() % u64::from(l.block_size) != 0 {
                    return Err(bad(format!(
                        "image {} is {} bytes, not a whole number of {}-byte blocks",
                        image.display(),
                        m.len(),
                        l.block_size
                    )));
                }
            }
            // Block devices and the like: sized when opened.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if l.create_size.is_none() {
                    // Quick mode has no create_size to suggest; `diskless image create` does it.
                    let hint = if self.source == QUICK_SOURCE {
                        "create it with `diskless image create PATH --size SIZE`"
                    } else {
                        "set create_size to create it"
                    };
                    return Err(bad(format!(
                        "image {} does not exist ({hint})",
                        image.display()
                    )));
                }
            }
            Err(e) => return Err(bad(format!("image {}: {e}", image.display()))),
        }
        if let Some(size) = l.create_size {
            if size.0 == 0 || size.0 % u64::from(l.block_size) != 0 {
                return Err(bad(format!(
                    "create_size {} is not a non-zero multiple of block_size {}",
                    size.0, l.block_size
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, "t.yaml", Path::new("/nonexistent-dir"))
    }

    const ONE: &str = "
targets:
  - name: iqn.2026-11.org.diskless:demo
    luns:
      - lun: 0
        image: demo.img
        create_size: 64MiB
";

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("64MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("1G"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("512k"), Ok(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse(" 2 TiB "), Ok(ByteSize(2 << 40)));
        assert!(ByteSize::parse("").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("12XB").is_err());
        assert!(ByteSize::parse("99999999999999999999").is_err());
        assert!(ByteSize::parse("99999999999T").is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn cluster_section() {
        let with = |c: &str| parse(&format!("{ONE}cluster: {c}\n"));
        let ok = with(
            "{name: lab, node_id: node-a, etcd: [\"http://10.0.0.5:2379\"], advertise: \"10.0.1.11:3260\"}",
        )
        .unwrap();
        let c = ok.cluster.unwrap();
        assert_eq!((c.lease_ttl, c.advertise.0.port()), (10, 3260));
        for (bad, path) in [
            ("{name: \"a/b\", node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\"}", "cluster.name"),
            ("{name: lab, node_id: \"\", etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\"}", "cluster.node_id"),
            ("{name: lab, node_id: n, etcd: [], advertise: \"10.0.0.1:3260\"}", "cluster.etcd"),
            ("{name: lab, node_id: n, etcd: [\"h:2379\"], advertise: \"10.0.0.1:3260\"}", "cluster.etcd[0]"),
            ("{name: lab, node_id: n, etcd: [\"http://h:0\"], advertise: \"10.0.0.1:3260\"}", "cluster.etcd[0]"),
            ("{name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"0.0.0.0:3260\"}", "cluster.advertise"),
            ("{name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:0\"}", "cluster.advertise"),
            ("{name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\", lease_ttl: 1}", "cluster.lease_ttl"),
            ("{name: lab, node_id: n, etcd: [\"https://h:1\"], advertise: \"10.0.0.1:3260\"}", "cluster.tls"),
            ("{name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\", tls: {ca: /nonexistent.pem}}", "cluster.etcd"),
            ("{name: lab, node_id: n, etcd: [\"https://h:1\"], advertise: \"10.0.0.1:3260\", tls: {ca: /nonexistent.pem}}", "cluster.tls.ca"),
            ("{name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\", auth: {user: u, password_file: /nonexistent}}", "cluster.auth.password_file"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(path), "{bad}: {e}");
        }
        assert!(with("{name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\", extra: 1}").is_err());
    }

    #[test]
    fn rbd_section() {
        let conf = tempfile::NamedTempFile::new().unwrap();
        let conf = conf.path().display().to_string();
        let cluster = "cluster: {name: lab, node_id: n, etcd: [\"http://h:1\"], advertise: \"10.0.0.1:3260\"}\n";
        let image =
            |rbd: &str| format!("images:\n  - {{name: g, path: g.img, create_size: 64MiB{rbd}}}\n");
        let with = |top: &str, rbd: &str, cl: &str| parse(&format!("{ONE}{cl}{top}{}", image(rbd)));
        let top = format!("rbd: {{pool: diskless, conf: {conf}}}\n");
        let ok = with(&top, ", rbd: {parent: golden@v1}", cluster).unwrap();
        let r = ok.rbd.unwrap();
        assert_eq!((r.id.as_str(), r.prefix.as_str()), ("diskless", "diskless"));
        assert_eq!(
            ok.images[0].rbd.as_ref().unwrap().parent_parts(),
            Some(("golden", "v1"))
        );
        for (top, rbd, cl, path) in [
            // Fencing follows the placement: no cluster, no RBD disks.
            (top.clone(), "", "", "need cluster:"),
            (
                String::new(),
                ", rbd: {parent: golden@v1}",
                cluster,
                "images[0].rbd",
            ),
            (
                top.clone(),
                ", rbd: {parent: golden}",
                cluster,
                "images[0].rbd.parent",
            ),
            (
                top.clone(),
                ", rbd: {parent: \"a/b@v1\"}",
                cluster,
                "images[0].rbd.parent",
            ),
            (
                top.clone(),
                ", rbd: {parent: \"a@\"}",
                cluster,
                "images[0].rbd.parent",
            ),
            (
                format!("rbd: {{pool: \"a b\", conf: {conf}}}\n"),
                "",
                cluster,
                "rbd.pool",
            ),
            (
                format!("rbd: {{pool: p, id: \"\", conf: {conf}}}\n"),
                "",
                cluster,
                "rbd.id",
            ),
            (
                "rbd: {pool: p, conf: /nonexistent/ceph.conf}\n".into(),
                "",
                cluster,
                "rbd.conf",
            ),
            (
                format!("rbd: {{pool: p, conf: {conf}, keyring: /nonexistent/k}}\n"),
                "",
                cluster,
                "rbd.keyring",
            ),
        ] {
            let e = with(&top, rbd, cl).unwrap_err().to_string();
            assert!(e.contains(path), "{top} {rbd}: {e}");
        }
        assert!(with(
            &format!("rbd: {{pool: p, conf: {conf}, user: x}}\n"),
            "",
            cluster
        )
        .is_err());
    }

    #[test]
    fn portals() {
        assert_eq!(Portal::parse("0.0.0.0:3260").unwrap().0.port(), 3260);
        assert_eq!(Portal::parse("10.0.0.1").unwrap().0.port(), 3260);
        assert!(Portal::parse("[::]:3261").unwrap().0.is_ipv6());
        assert!(Portal::parse("[::1]").unwrap().0.is_ipv6());
        assert!(Portal::parse("host:3260").is_err());
        assert!(Portal::parse("1.2.3.4:99999").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_iscsi_name("iqn.2026-11.org.diskless:demo").is_ok());
        assert!(validate_iscsi_name("iqn.2001-04.com.example").is_ok());
        assert!(validate_iscsi_name("eui.02004567a425678d").is_ok());
        assert!(validate_iscsi_name("naa.52004567ba64678d").is_ok());
        assert!(validate_iscsi_name("naa.62004567ba64678d62004567ba64678d").is_ok());
        for bad in [
            "",
            "demo",
            "iqn.2026-13.org.x:y",
            "iqn.26-11.org.x",
            "iqn.2026-11.",
            "iqn.2026-11.:x",
            "iqn.2026-11.org.Diskless:demo",
            "iqn.2026-11.org.diskless:de mo",
            "eui.0200",
            "naa.zz004567ba64678d",
        ] {
            assert!(validate_iscsi_name(bad).is_err(), "{bad}");
        }
        assert!(validate_iscsi_name(&format!("iqn.2026-11.org.x:{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn defaults_and_settings() {
        let c = parse(ONE).unwrap();
        assert_eq!(c.portal_addrs(), vec!["0.0.0.0:3260".parse().unwrap()]);
        assert_eq!(c.settings.nop_in_interval_secs, 30);
        assert_eq!(c.settings.nop_in_timeout_secs, 0);
        assert_eq!(c.settings.login_timeout_secs, 15);
        let l = &c.targets[0].luns[0];
        assert_eq!(
            (l.block_size, l.thin, l.read_only, l.removable),
            (512, true, false, false)
        );
        assert_eq!(c.targets[0].initiators, vec!["*"]);
        assert_eq!(
            c.image_path(&l.image),
            Path::new("/nonexistent-dir/demo.img")
        );

        let c = parse(&format!(
            "settings: {{nop_in_interval_secs: 0, nop_in_timeout_secs: 5, cmd_window: 32, \
             header_digest: false}}\n{ONE}"
        ))
        .unwrap();
        let s = &c.settings;
        assert_eq!(s.nop_in_interval_secs, 0);
        assert_eq!(s.nop_in_timeout_secs, 5);
        assert_eq!(s.cmd_window, 32);
        assert!(!s.header_digest);
        assert!(s.data_digest);
    }

    #[test]
    fn empty_file_is_empty_config() {
        let c = parse("# nothing\n").unwrap();
        assert!(c.targets.is_empty());
        assert_eq!(c.portals.len(), 1);
    }

    fn err(yaml: &str) -> String {
        parse(yaml).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn errors_name_the_field() {
        let e = err("portals: [\"nope\"]\n");
        assert!(
            e.starts_with("t.yaml: ") && e.contains("bad portal") && e.contains("line 1"),
            "{e}"
        );
        let e = err(&format!("{ONE}        colour: red\n"));
        assert!(
            e.contains("unknown field `colour`") && e.contains("line"),
            "{e}"
        );
        let e = err("settings: {max_burst_length: 1024, first_burst_length: 4096}\n");
        assert!(e.contains("settings.first_burst_length"), "{e}");
        let e = err("settings: {cmd_window: 0}\n");
        assert!(e.contains("settings.cmd_window"), "{e}");
        let e = err(&ONE.replace("lun: 0", "lun: 16384"));
        assert!(
            e.contains("targets[0].luns[0]: LUN 16384 is above 16383"),
            "{e}"
        );
        let e = err(&ONE.replace(
            "create_size: 64MiB",
            "create_size: 64MiB\n        block_size: 1024",
        ));
        assert!(e.contains("block_size 1024"), "{e}");
        let e = err(&ONE.replace(
            "create_size: 64MiB",
            "create_size: 64MiB\n        physical_block_size: 3000",
        ));
        assert!(e.contains("physical_block_size 3000"), "{e}");
        let long = ONE.replace(
            "luns:",
            "chap: {user: u, secret: \"0123456789abcdefXYZ\"}\n    luns:",
        );
        let w = parse(&long).unwrap().warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("19 bytes") && !w[0].contains("0123456789"),
            "{w:?}"
        );
        assert!(parse(ONE).unwrap().warnings().is_empty());
        let e = err(&ONE.replace(
            "create_size: 64MiB",
            "create_size: 64MiB\n        block_size: 4096\n        physical_block_size: 512",
        ));
        assert!(e.contains("physical_block_size 512"), "{e}");
        let e = err(&ONE.replace("64MiB", "64XiB"));
        assert!(e.contains("bad size"), "{e}");
        let e = err(&ONE.replace("        create_size: 64MiB\n", ""));
        assert!(
            e.contains("targets[0].luns[0]: image /nonexistent-dir/demo.img does not exist"),
            "{e}"
        );
        let e = err(&ONE.replace("64MiB", "1000"));
        assert!(e.contains("create_size 1000"), "{e}");
        let e = err(&format!(
            "{ONE}      - lun: 0\n        image: b.img\n        create_size: 1M\n"
        ));
        assert!(e.contains("targets[0].luns[1]: duplicate LUN 0"), "{e}");
        let e = err(&format!("{ONE}{}", ONE.replace("targets:\n", "")));
        assert!(e.contains("targets[1].name: duplicate target"), "{e}");
        let e = err(&ONE.replace("diskless:demo", "diskless:Demo"));
        assert!(e.contains("targets[0].name"), "{e}");
        let e = err(&ONE.replace("    luns:", "    initiators: [\"iqn.[\"]\n    luns:"));
        assert!(
            e.contains("targets[0].initiators: bad initiator glob"),
            "{e}"
        );
        let e = err(&ONE.replace("    luns:", "    initiators: []\n    luns:"));
        assert!(e.contains("targets[0].initiators"), "{e}");
        let e = err(&ONE.replace("    luns:", "    chap: {user: u, secret: short}\n    luns:"));
        assert!(e.contains("targets[0].chap: chap secret is 5 bytes"), "{e}");
        assert!(!e.contains("short"), "secret leaked: {e}");
        let e = err(&format!(
            "discovery:\n  chap: {{user: u, secret: abcdefghijkl, mutual_user: m}}\n{ONE}"
        ));
        assert!(
            e.contains("discovery.chap: chap mutual_user and mutual_secret"),
            "{e}"
        );
        let e = err(&format!(
            "discovery:\n  chap: {{user: u, secret: abcdefghijkl, mutual_user: m, mutual_secret: abcdefghijkl}}\n{ONE}"
        ));
        assert!(e.contains("must differ"), "{e}");
        let e = err("targets: [{name: iqn.2026-11.org.x:y, luns: []}]\n");
        assert!(e.contains("targets[0].luns: no LUNs"), "{e}");
        let e = err(&ONE.replace("lun: 0", "lun: 0\n        serial: \"a b\""));
        assert!(e.contains("serial"), "{e}");
        let e = err("portals: [\"1.2.3.4:1\", \"1.2.3.4:1\"]\n");
        assert!(e.contains("portals[1]: duplicate portal"), "{e}");
    }

    #[test]
    fn bad_yaml_never_panics() {
        for y in [
            "{",
            "targets: [",
            "- a\n- b",
            "targets: 5",
            "portals: {a: b}",
            ":\n:\n",
            "\t- x",
            "targets:\n  - name: [1,2]\n",
            "settings: {max_sessions: -1}",
            "&a [*a]",
            "!!binary x",
            "targets:\n  - luns:\n    - lun: -3\n",
        ] {
            let e = err(y);
            assert!(e.starts_with("t.yaml: "), "{y:?} -> {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_input_never_panics(s in "\\PC{0,80}") {
            let _ = ByteSize::parse(&s);
            let _ = Portal::parse(&s);
            let _ = validate_iscsi_name(&s);
            let _ = parse(&s);
        }

        #[test]
        fn yaml_shaped_input_never_panics(
            key in "(portals|settings|targets|discovery|name|luns|lun|image|chap)",
            val in "[\\[\\]{}:,\"a-z0-9 .-]{0,30}",
        ) {
            let _ = parse(&format!("{key}: {val}\n"));
            let _ = parse(&format!("targets:\n  - {key}: {val}\n"));
        }
    }

    #[test]
    fn netboot_section() {
        let c = parse(&format!("{ONE}netboot:\n  mode: off\n  clients: any\n")).unwrap();
        let n = c.netboot.unwrap();
        assert_eq!(n.mode, NetbootMode::Off);
        assert_eq!(n.client_macs(), None);
        assert_eq!(n.boot_files.bios, "undionly.kpxe");
        assert_eq!(n.ports.dhcp, 67);
        let c = parse(&format!(
            "{ONE}netboot:\n  mode: off\n  clients: [\"52-54-00-AA-BB-CC\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.netboot.unwrap().client_macs(),
            Some(vec!["52:54:00:aa:bb:cc".to_string()])
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display();
        let http = "boot_http: {listen: \"0.0.0.0:8080\"}\n";
        let ok = format!("{ONE}{http}netboot:\n  mode: proxy\n  clients: any\n  root: {root}\n");
        assert!(parse(&ok).is_ok(), "{}", err(&ok));
        for (yaml, want) in [
            (format!("{ONE}netboot:\n  clients: any\n"), "missing field `mode`"),
            (format!("{ONE}netboot:\n  mode: proxy\n"), "missing field `clients`"),
            (format!("{ONE}netboot:\n  mode: on\n  clients: any\n"), "unknown variant"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: all\n"), "netboot.clients"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: []\n"), "netboot.clients"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: [nope]\n"), "netboot.clients[0]"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: any\n  interfaces: [\"a b\"]\n"), "netboot.interfaces[0]"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: any\n  boot_files: {{bios: ../x}}\n"), "netboot.boot_files.bios"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: any\n  script_url: ftp://x\n"), "netboot.script_url"),
            (format!("{ONE}netboot:\n  mode: proxy\n  clients: any\n  root: /nonexistent\n"), "netboot.root"),
            (format!("{ONE}netboot:\n  mode: proxy\n  clients: any\n  root: {root}\n"), "needs boot_http"),
            (format!("{ONE}{http}netboot:\n  mode: dhcp\n  clients: any\n  root: {root}\n"), "netboot.pool"),
            (format!("{ok}  pool: {{start: 10.0.0.10, end: 10.0.0.20}}\n"), "mode proxy never"),
            (format!("{ONE}{http}netboot:\n  mode: dhcp\n  clients: any\n  root: {root}\n  pool: {{start: 10.0.0.30, end: 10.0.0.20}}\n"), "netboot.pool"),
            (format!("{ONE}{http}netboot:\n  mode: dhcp\n  clients: any\n  root: {root}\n  pool: {{start: 10.0.0.30, end: 10.0.1.20}}\n"), "one /24"),
            (format!("{ONE}{http}netboot:\n  mode: dhcp\n  clients: any\n  root: {root}\n  pool: {{start: 10.0.0.3, end: 10.0.0.20, lease_secs: 5}}\n"), "lease_secs"),
            (format!("{ONE}netboot:\n  mode: off\n  clients: any\n  colour: red\n"), "unknown field `colour`"),
        ] {
            let e = err(&yaml);
            assert!(e.contains(want), "{yaml}\n-> {e}");
        }
        let dhcp = format!("{ONE}{http}netboot:\n  mode: dhcp\n  clients: any\n  root: {root}\n  pool: {{start: 10.0.0.10, end: 10.0.0.20, router: 10.0.0.1}}\n");
        let c = parse(&dhcp).unwrap();
        let p = c.netboot.unwrap().pool.unwrap();
        assert_eq!((p.prefix_len, p.lease_secs), (24, 3600));
    }

    #[test]
    fn chap_debug_hides_secret() {
        let c = ChapConfig {
            user: "u".into(),
            secret: "topsecret-value".into(),
            mutual_user: Some("m".into()),
            mutual_secret: Some("other-secret-value".into()),
        };
        let d = format!("{c:?}");
        assert!(
            !d.contains("topsecret") && !d.contains("other-secret"),
            "{d}"
        );
    }
}

#[cfg(test)]
mod lifecycle_keys {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, "t.yaml", Path::new("/nonexistent-dir"))
    }

    fn boot(binding: &str) -> String {
        format!(
            "images:\n  - {{name: base, path: base.img, create_size: 1MiB}}\n\
             targets:\n  - name: iqn.2026-11.org.diskless:boot\n    boot:\n      bindings:\n\
             \x20       - {binding}\n"
        )
    }

    #[test]
    fn reset_policy_firmware_isid_and_install_mode() {
        let c = parse(&boot(
            "{initiator: \"iqn.2026-11.test:a\", image: base, mode: install, reset: on_script, \
             firmware_isid: \"12:54:00\"}",
        ))
        .unwrap();
        let b = &c.targets[0].boot.as_ref().unwrap().bindings[0];
        assert_eq!(b.mode, OverlayMode::Install);
        assert_eq!(b.reset, ResetPolicy::OnScript);
        assert_eq!(
            parse_isid_prefix(b.firmware_isid.as_deref().unwrap()),
            Ok(vec![0x12, 0x54, 0x00])
        );
        let c = parse(&boot(
            "{initiator: \"iqn.2026-11.test:a\", image: base, mode: volatile}",
        ))
        .unwrap();
        assert_eq!(
            c.targets[0].boot.as_ref().unwrap().bindings[0].reset,
            ResetPolicy::Auto
        );
        assert_eq!(parse_isid_prefix("400027230001").unwrap().len(), 6);
        for bad in ["", "4", "40:00:27:23:00:01:02", "zz"] {
            assert!(parse_isid_prefix(bad).is_err(), "{bad}");
        }
        let e = parse(&boot(
            "{initiator: \"iqn.2026-11.test:a\", image: base, mode: volatile, firmware_isid: \"xyz\"}",
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("firmware_isid"), "{e}");
        let e = parse(&boot(
            "{initiator: \"iqn.2026-11.test:a\", image: base, mode: volatile, reset: sometimes}",
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("reset") || e.contains("sometimes"), "{e}");
    }
}

#[cfg(test)]
mod api_tests {
    use super::*;

    fn load(api: &str) -> Result<Config, ConfigError> {
        let c = Config::from_yaml(&format!("api: {api}\n"), "t.yaml", Path::new("/cfg"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn api_section() {
        let c = load("{}").unwrap();
        let a = c.api.unwrap();
        assert_eq!(a.listen.0.to_string(), DEFAULT_API_LISTEN);
        assert!(a.token_digest().is_none());
        // Anything but loopback needs a credential.
        let e = load("{listen: \"0.0.0.0:9260\"}").unwrap_err().to_string();
        assert!(e.contains("api.listen") && e.contains("token"), "{e}");
        assert!(load("{listen: \"0.0.0.0:9260\", token: abcdefghijklmnopq}").is_ok());
        assert!(load("{token: short}").is_err());
        assert!(load("{token: \"has a space in it!!\"}").is_err());
        assert!(load("{token_sha256: abc}").is_err());
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let c = load(&format!("{{listen: \"[::]:1\", token_sha256: {hash}}}")).unwrap();
        // sha256("test")
        assert_eq!(c.api.as_ref().unwrap().token_digest().unwrap()[0], 0x9f);
        assert!(load(&format!(
            "{{token: abcdefghijklmnopq, token_sha256: {hash}}}"
        ))
        .is_err());
        assert!(load("{listen: \"127.0.0.1:9\", metrics_listen: \"127.0.0.1:9\"}").is_err());
        assert!(load("{bogus: 1}").is_err());
        // The credential never appears in a debug print.
        let c = load("{token: abcdefghijklmnopq}").unwrap();
        assert!(!format!("{:?}", c.api).contains("abcdefghijklmnopq"));
    }
}

#[cfg(test)]
mod disk_lists {
    use super::*;

    fn binding(b: &str) -> Result<BindingConfig, String> {
        serde_yaml::from_str::<BindingConfig>(b).map_err(|e| e.to_string())
    }

    #[test]
    fn both_shapes_give_lun_0_and_the_rest_in_lun_order() {
        let a = binding(
            "{initiator: x, disks: [{lun: 2, image: games, mode: readonly}, \
             {lun: 0, image: sys, mode: volatile}, {lun: 1, image: data, mode: persistent}], \
             os: windows, gateway: clear}",
        )
        .unwrap();
        let b = binding(
            "{initiator: x, image: sys, mode: volatile, disks: [{lun: 2, image: games, mode: \
             readonly}, {lun: 1, image: data, mode: persistent}], os: windows, gateway: clear}",
        )
        .unwrap();
        for c in [&a, &b] {
            assert_eq!((c.image.as_str(), c.mode), ("sys", OverlayMode::Volatile));
            assert_eq!(
                c.disks.iter().map(|d| (d.lun, d.mode)).collect::<Vec<_>>(),
                [(1, OverlayMode::Persistent), (2, OverlayMode::Readonly)]
            );
            assert_eq!((c.os, c.gateway), (ClientOs::Windows, GatewayPolicy::Clear));
        }
        let single = binding("{initiator: x, image: sys, mode: persistent}").unwrap();
        assert!(single.disks.is_empty());
        assert_eq!(
            (single.os, single.gateway),
            (ClientOs::Other, GatewayPolicy::Auto)
        );
    }

    #[test]
    fn bad_lists_are_refused() {
        for (b, want) in [
            ("{disks: [{lun: 1, image: d, mode: persistent}]}", "no LUN 0"),
            ("{image: s}", "missing field `mode`"),
            ("{mode: volatile}", "missing field `image`"),
            (
                "{image: s, mode: volatile, disks: [{lun: 0, image: s, mode: volatile}]}",
                "LUN 0 is given twice",
            ),
            (
                "{disks: [{lun: 0, image: s, mode: volatile}, {lun: 1, image: d, mode: install}]}",
                "volatile, persistent or readonly",
            ),
            (
                "{disks: [{lun: 0, image: s, mode: volatile}, {lun: 3, image: d, mode: readonly}, \
                 {lun: 3, image: e, mode: readonly}]}",
                "LUN 3 is listed twice",
            ),
            (
                "{disks: [{lun: 0, image: s, mode: volatile}, {lun: 128, image: d, mode: readonly}]}",
                "above 127",
            ),
            ("{image: s, mode: volatile, gateway: sometimes}", "sometimes"),
        ] {
            let e = binding(b).err().unwrap_or_default();
            assert!(e.contains(want), "{b}: {e}");
        }
    }
}
