//! Command line (clap): `serve`, `image create`, `image push`, `check-config`, and the operator
//! commands (`clients`, `client ...`, `reload`, `cluster status`, `node drain`).
//!
//! Exit codes: 0 success, 1 I/O error (binding, creating an image, serving), 2 bad
//! configuration or usage.
mod images;

use crate::config::{ByteSize, Config, ConfigError, Portal};
use crate::registry::{self, Registry};
use crate::session::Server;
use crate::storage::FileStore;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "diskless",
    version,
    about = "An iSCSI target for diskless network boot"
)]
pub struct Cli {
    /// Log level or filter (trace, debug, info, warn, error, or a tracing filter such as
    /// "diskless=debug"); overrides RUST_LOG. Default: RUST_LOG, else info.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log: Option<String>,
    /// Log line format: text (colours only on a terminal, and never with NO_COLOR set) or
    /// json (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the targets of a configuration file, or one image (quick mode, --image).
    Serve(ServeArgs),
    /// Manage image files.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Validate a configuration file and print a summary (secrets are never printed).
    CheckConfig {
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
    },
    /// List the client disks of boot targets (initiator, image, mode, sessions, overlay use).
    Clients(ControlArgs),
    /// List the live sessions.
    Sessions(ControlArgs),
    /// Show, reset or commit one client's disk.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Re-read the configuration file of the running server (also: SIGHUP).
    Reload(ControlArgs),
    /// The cluster in etcd (the configuration's `cluster:` section).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// One node of the cluster.
    #[command(subcommand)]
    Node(NodeCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes, their load and their clients, as etcd has them now.
    Status {
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The configuration every node lays over its own file (docs/scale-out.md).
    #[command(subcommand)]
    Config(SharedConfigCommand),
    /// Every client's lifecycle record in etcd: the node it was last on, its owner now,
    /// its disk, boot count and phase.
    Clients {
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SharedConfigCommand {
    /// Check FILE against this node's configuration and store it in etcd: every node
    /// reloads with it (and refuses it, with the reason, if it does not fit the node).
    Push {
        file: PathBuf,
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
    },
    /// Remove the shared configuration: every node goes back to its own file.
    Clear {
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Take no new clients on a node; its clients move to other nodes at their next boot.
    Drain {
        /// The node (default: this configuration's cluster.node_id).
        node: Option<String>,
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
        /// Clear the drain mark: the node takes new clients again.
        #[arg(long)]
        undo: bool,
    },
}

/// How operator commands reach the server: its control socket, found from the
/// configuration's state directory unless given.
#[derive(Debug, Args, Clone)]
pub struct ControlArgs {
    #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
    pub config: PathBuf,
    /// Control socket of the running server (default: STATE_DIR/control.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Show a client's disk: image, mode, sessions, overlay size and blocks written.
    Show {
        initiator: String,
        #[command(flatten)]
        ctl: ControlArgs,
    },
    /// Discard a client's overlay (its sessions are closed first): LUN 0 and the volatile
    /// disks, or with --lun only that disk (a persistent data disk too).
    Reset {
        initiator: String,
        /// Reset only the disk on this LUN.
        #[arg(long)]
        lun: Option<u16>,
        #[command(flatten)]
        ctl: ControlArgs,
    },
    /// Give a client another image and/or mode from its next boot on (kept until
    /// --clear); a running client keeps its disk until it boots again (docs/overlays.md).
    NextBoot {
        initiator: String,
        /// `name`, `name@N` or `name:channel` (docs/images.md), or an `images:` name.
        #[arg(long, value_name = "IMAGE", conflicts_with = "clear")]
        image: Option<String>,
        /// volatile, persistent, readonly or direct.
        #[arg(long, value_name = "MODE", conflicts_with = "clear")]
        mode: Option<String>,
        /// Remove the override: the next boot takes the binding's image and mode.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        ctl: ControlArgs,
    },
    /// Publish a client's disk as the next version of a versioned image (IMAGE: a name),
    /// without stopping the client; or, given a path (with a `/` or ending in `.img`), write
    /// the golden image plus the overlay into a new flat image file.
    Commit {
        initiator: String,
        /// An image name (docs/images.md) or a new image file (must not exist).
        path: PathBuf,
        /// The version's message (image names only).
        #[arg(short, long, default_value = "")]
        message: String,
        /// The disk to publish (default: LUN 0, the system disk).
        #[arg(long, default_value_t = 0)]
        lun: u16,
        #[command(flatten)]
        ctl: ControlArgs,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file.
    #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
    pub config: PathBuf,
    /// Listen address (repeatable); replaces the configured portals. Port 0 picks a free port.
    #[arg(long = "listen", value_name = "ADDR", value_parser = parse_portal)]
    pub listen: Vec<SocketAddr>,
    /// Quick mode: serve this image as LUN 0, without a configuration file.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub image: Option<PathBuf>,
    /// Quick mode target name (default: iqn.2026-11.org.diskless:STEM, STEM = image file stem).
    #[arg(long, value_name = "IQN", requires = "image")]
    pub target: Option<String>,
    /// Quick mode: serve the image read-only.
    #[arg(long, requires = "image")]
    pub read_only: bool,
    /// Quick mode: logical block size, 512 or 4096 (default 512).
    #[arg(long, value_name = "N", requires = "image", value_parser = parse_block_size)]
    pub block_size: Option<u32>,
    /// Quick mode: serve the image as a golden image, each initiator on its own disk:
    /// volatile, persistent, readonly or direct (docs/overlays.md).
    #[arg(long, value_name = "MODE", requires = "image", value_parser = parse_mode)]
    pub overlay: Option<crate::config::OverlayMode>,
    /// Quick mode: where overlays and the control socket live (default: ./state).
    #[arg(long, value_name = "DIR", requires = "image")]
    pub state_dir: Option<PathBuf>,
    /// Built-in network boot: proxy (proxyDHCP beside the site's DHCP server), dhcp (also
    /// hand out addresses: needs netboot.pool) or off; replaces netboot.mode. Any client is
    /// answered unless netboot.clients says otherwise (docs/booting.md).
    #[arg(long, value_name = "MODE", value_parser = parse_netboot_mode)]
    pub netboot: Option<crate::config::NetbootMode>,
    /// Network interface netboot answers on (repeatable); replaces netboot.interfaces.
    #[arg(
        long = "netboot-interface",
        value_name = "IFNAME",
        requires = "netboot"
    )]
    pub netboot_interfaces: Vec<String>,
    /// Listen address of the boot HTTP endpoint (scripts, /files/); replaces
    /// boot_http.listen. Default with --netboot: 0.0.0.0:8080.
    #[arg(long, value_name = "ADDR", value_parser = parse_portal)]
    pub boot_http: Option<SocketAddr>,
    /// Serve the operator API, web console and /metrics on this address (replaces
    /// api.listen; a non-loopback address needs api.token in the configuration).
    #[arg(long, value_name = "ADDR", value_parser = parse_portal)]
    pub api: Option<SocketAddr>,
}

fn parse_netboot_mode(s: &str) -> Result<crate::config::NetbootMode, String> {
    use crate::config::NetbootMode::*;
    match s {
        "proxy" => Ok(Proxy),
        "dhcp" => Ok(Dhcp),
        "off" => Ok(Off),
        _ => Err(format!(
            "netboot mode must be proxy, dhcp or off, not {s:?}"
        )),
    }
}

fn parse_mode(s: &str) -> Result<crate::config::OverlayMode, String> {
    use crate::config::OverlayMode::*;
    match s {
        "volatile" => Ok(Volatile),
        "persistent" => Ok(Persistent),
        "readonly" => Ok(Readonly),
        "direct" => Ok(Direct),
        "install" => Ok(Install),
        _ => Err(format!(
            "overlay mode must be volatile, persistent, readonly, direct or install, not {s:?}"
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create a sparse image file (refuses to overwrite).
    Create {
        path: PathBuf,
        /// Size, e.g. 64MiB, 20G, 1048576.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Upload a raw image as a new immutable version to the object store that an `images:`
    /// entry with `s3:` names (its endpoint, bucket, prefix, image and version).
    Push {
        /// The raw image file.
        file: PathBuf,
        #[arg(short, long, default_value = "targets.yaml", value_name = "FILE")]
        config: PathBuf,
        /// The `images:` entry (by name).
        #[arg(long, value_name = "NAME")]
        image: String,
        /// Chunk size (power of two, 64KiB..64MiB).
        #[arg(long, value_parser = parse_size, default_value = "4MiB")]
        chunk_size: u64,
        /// The new version's name (default: the entry's `version`; required when the entry
        /// follows `latest` or a channel of the cluster's catalogue).
        #[arg(long = "version", value_name = "NAME")]
        new_version: Option<String>,
        /// The version's message in the cluster's catalogue.
        #[arg(short, long, default_value = "")]
        message: String,
    },
    #[command(flatten)]
    Versions(images::VersionCommand),
}

fn parse_portal(s: &str) -> Result<SocketAddr, String> {
    Portal::parse(s).map(|p| p.0)
}

fn parse_size(s: &str) -> Result<u64, String> {
    ByteSize::parse(s).map(|b| b.0)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.trim() {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("block size must be 512 or 4096, not {s:?}")),
    }
}

/// Why a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => 2,
            CliError::Io(_) => 1,
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn init_logging(level: Option<&str>, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|e| {
            eprintln!("diskless: ignoring --log {l:?} ({e}); logging at info");
            EnvFilter::new("info")
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second initialisation (tests) is not an error worth dying for.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => {
            // Escape codes only for a person at a terminal (https://no-color.org).
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).try_init()
        }
    };
}

/// The `diskless` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    init_logging(cli.log.as_deref(), cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diskless: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Run one command.
pub fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(args) => serve(args),
        Command::Image(ImageCommand::Create { path, size }) => image_create(&path, size),
        Command::Image(ImageCommand::Push {
            file,
            config,
            image,
            chunk_size,
            new_version,
            message,
        }) => image_push(&file, &config, &image, chunk_size, new_version, &message),
        Command::Image(ImageCommand::Versions(cmd)) => images::run(cmd),
        Command::Clients(ctl) => control(&ctl, "clients", None),
        Command::Sessions(ctl) => control(&ctl, "sessions", None),
        Command::Reload(ctl) => control(&ctl, "reload", None),
        Command::Client(ClientCommand::Show { initiator, ctl }) => {
            control(&ctl, &format!("show {initiator}"), Some(&initiator))
        }
        Command::Client(ClientCommand::Reset {
            initiator,
            lun,
            ctl,
        }) => {
            let opt = lun.map(|n| format!("--lun {n} ")).unwrap_or_default();
            control(&ctl, &format!("reset {opt}{initiator}"), Some(&initiator))
        }
        Command::Client(ClientCommand::NextBoot {
            initiator,
            image,
            mode,
            clear,
            ctl,
        }) => {
            // Checked here too, so a typo never reaches the server.
            crate::boot::nextboot::request(image.as_deref(), mode.as_deref(), clear)
                .map_err(|e| CliError::Io(e.to_string()))?;
            let mut line = format!("next-boot {initiator}");
            for (k, v) in [("image", &image), ("mode", &mode)] {
                if let Some(v) = v {
                    if v.contains(char::is_whitespace) {
                        return Err(CliError::Io(format!("{k} {v:?} contains spaces")));
                    }
                    line.push_str(&format!(" {k}={v}"));
                }
            }
            if clear {
                line.push_str(" clear");
            }
            control(&ctl, &line, Some(&initiator))
        }
        Command::Client(ClientCommand::Commit {
            initiator,
            path,
            message,
            lun,
            ctl,
        }) => {
            let opt = if lun == 0 {
                String::new()
            } else {
                format!("--lun {lun} ")
            };
            let name = path.to_string_lossy().to_string();
            if crate::storage::versions::valid_name(&name)
                && !name.ends_with(".img")
                && !name.ends_with(".raw")
            {
                let message = if message.is_empty() {
                    format!("published from {initiator}")
                } else {
                    message.replace(['\n', '\r'], " ")
                };
                return control(
                    &ctl,
                    &format!(
                        "publish {opt}{initiator} {name} {} {message}",
                        images::author()
                    ),
                    Some(&initiator),
                );
            }
            let abs = std::path::absolute(&path).map_err(|e| CliError::Io(e.to_string()))?;
            control(
                &ctl,
                &format!("commit {opt}{initiator} {}", abs.display()),
                Some(&initiator),
            )
        }
        Command::Cluster(ClusterCommand::Status { config, json }) => cluster_status(&config, json),
        Command::Cluster(ClusterCommand::Clients { config, json }) => {
            cluster_clients(&config, json)
        }
        Command::Cluster(ClusterCommand::Config(SharedConfigCommand::Push { file, config })) => {
            shared_config(&config, Some(&file))
        }
        Command::Cluster(ClusterCommand::Config(SharedConfigCommand::Clear { config })) => {
            shared_config(&config, None)
        }
        Command::Node(NodeCommand::Drain { node, config, undo }) => {
            node_drain(&config, node.as_deref(), !undo)
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            let plan = registry::plan(&c)?;
            let mut out = std::io::stdout().lock();
            let _ = write_summary(&mut out, &c, &plan);
            for w in c.warnings() {
                let _ = writeln!(out, "warning: {w}");
            }
            let _ = out.flush();
            Ok(())
        }
    }
}

/// Send one request to the running server's control socket. With no server running, the
/// client commands work offline on the state directory (`reload`, `clients` and `sessions`
/// need the server).
fn control(ctl: &ControlArgs, request: &str, offline_client: Option<&str>) -> Result<(), CliError> {
    let config = match Config::load(&ctl.config) {
        Ok(c) => Some(c),
        Err(e) if ctl.control.is_some() => {
            tracing::debug!(error = %e, "no configuration; using --control");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let socket = match (&ctl.control, &config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => c.state_path().join(crate::control::SOCKET),
        (None, None) => return Err(CliError::Io("no control socket".into())),
    };
    match crate::control::request(&socket, request) {
        Ok(Ok(body)) => {
            print!("{body}");
            Ok(())
        }
        Ok(Err(e)) => Err(CliError::Io(e)),
        Err(e) => {
            let (Some(config), Some(_)) = (config, offline_client) else {
                return Err(CliError::Io(format!(
                    "cannot reach the server at {}: {e} (is `diskless serve` running?)",
                    socket.display()
                )));
            };
            // Offline: open the registry (images read-only) and act on the overlay directly;
            // the overlay's lock refuses this while a server holds it. Catalogue pointers
            // name the versions the node served last (its state directory).
            let mut config = config;
            if crate::cluster::catalogue::follows_pointers(&config) {
                let f = crate::cluster::catalogue::Follower::default();
                f.set_state_dir(&config.state_path());
                f.resolve(&mut config).map_err(CliError::Io)?;
            }
            let server = Server::new(
                Arc::new(Registry::from_config(&config)?),
                crate::session::Settings::from_config(&config.settings),
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::Io(e.to_string()))?;
            let body = rt
                .block_on(crate::control::handle_offline(&server, request))
                .map_err(CliError::Io)?;
            print!("{body}");
            Ok(())
        }
    }
}

/// `diskless image push`: upload the version to the object store (chunks, then the manifest
/// only if absent); in a cluster, then record it in the catalogue and move `latest` to it
/// (S3 first, etcd second). A version already in the store, checked against the file, is
/// recorded without uploading anything: the way to finish a push whose record failed.
fn image_push(
    file: &Path,
    config: &Path,
    image: &str,
    chunk_size: u64,
    new_version: Option<String>,
    message: &str,
) -> Result<(), CliError> {
    let c = Config::load(config)?;
    let Some((i, im)) = c.images.iter().enumerate().find(|(_, i)| i.name == image) else {
        return Err(
            ConfigError::invalid(&c.source, "images", format!("no image named {image:?}")).into(),
        );
    };
    let Some(s3) = &im.s3 else {
        return Err(
            ConfigError::invalid(&c.source, format!("images[{i}]"), "has no s3: section").into(),
        );
    };
    let at = format!("images[{i}].s3");
    let mut s3 = s3.clone();
    let version = match (new_version, s3.pointer()) {
        (Some(v), _) => v,
        (None, None) => s3.version.clone(),
        (None, Some(p)) => {
            return Err(CliError::Io(format!(
                "image push: {at} follows {p} of the catalogue: name the new version with --version"
            )))
        }
    };
    if version.is_empty()
        || version == crate::config::S3_LATEST
        || !version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || version == "."
        || version == ".."
    {
        return Err(CliError::Io(format!(
            "image push: version {version:?} must be letters, digits, '-', '_' or '.' (not latest)"
        )));
    }
    s3.version = version.clone();
    s3.channel = None;
    let (store, location, policy) =
        registry::s3_target(&c, image, &s3).map_err(|m| ConfigError::invalid(&c.source, at, m))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(e.to_string()))?;
    let started = std::time::Instant::now();
    let pushed = rt.block_on(crate::storage::s3::push(
        store.clone(),
        &location,
        file,
        chunk_size,
        im.block_size,
        policy,
    ));
    let (manifest, r) = match (pushed, &c.cluster) {
        (Ok((m, r)), _) => (m, Some(r)),
        // Already in the store: in a cluster, record it if the catalogue lacks it.
        (Err(crate::storage::s3::S3Error::Exists(_)), Some(_)) => {
            let m = rt
                .block_on(crate::storage::s3::verify_pushed(
                    store,
                    &location,
                    file,
                    chunk_size,
                    im.block_size,
                    policy,
                ))
                .map_err(|e| CliError::Io(format!("image push: {e}")))?;
            println!(
                "diskless: {}/{} is in the object store already and matches {} (nothing uploaded)",
                s3.bucket,
                location.manifest(),
                file.display()
            );
            (m, None)
        }
        (Err(e), _) => return Err(CliError::Io(format!("image push: {e}"))),
    };
    if let Some(r) = r {
        println!(
            "diskless: pushed {} to {}/{} ({}, {} chunks of {}, {} stored, {} uploaded in {:.1} s)",
            file.display(),
            s3.bucket,
            location.manifest(),
            ByteSize(r.size),
            r.chunks,
            ByteSize(chunk_size),
            r.uploaded,
            ByteSize(r.bytes_uploaded),
            started.elapsed().as_secs_f64()
        );
    }
    let Some(cc) = &c.cluster else {
        return Ok(());
    };
    let name = s3.image_name(image).to_string();
    let rec = crate::cluster::catalogue::VersionRecord {
        version: version.clone(),
        seq: 0,
        time_ms: crate::boot::now_ms(),
        author: images::author(),
        message: message.to_string(),
        size: manifest.size,
        chunk_size: manifest.chunk_size,
        block_size: manifest.block_size,
        uid: manifest.uid(),
        manifest: format!("{}/{}", s3.bucket, location.manifest()),
        deleting: false,
    };
    use crate::cluster::catalogue::{record, Recorded};
    match rt.block_on(record(cc, &name, rec)) {
        Ok(Recorded::New { seq, previous }) => {
            println!(
                "diskless: recorded {name}@{version} (#{seq}) in the catalogue of cluster {}; latest: {} -> {version}",
                cc.name,
                previous.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        Ok(Recorded::Already { seq }) => Err(CliError::Io(format!(
            "image push: image version {name}@{version} already exists (in the object store and in the catalogue as #{seq}; versions are immutable)"
        ))),
        Err(e) => Err(CliError::Io(format!(
            "image push: {name}@{version} is in the object store but NOT in the catalogue of cluster {}: {e}. \
             Run the same push again once etcd answers: it checks the stored version against the file and records it without uploading again",
            cc.name
        ))),
    }
}

fn cluster_config(path: &Path) -> Result<crate::config::ClusterConfig, CliError> {
    let config = Config::load(path)?;
    config.cluster.clone().ok_or_else(|| {
        CliError::Config(ConfigError::invalid(
            &config.source,
            "cluster",
            "no cluster section: this node is not in a cluster",
        ))
    })
}

fn small_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))
}

fn cluster_status(path: &Path, json: bool) -> Result<(), CliError> {
    let cfg = cluster_config(path)?;
    let status = small_runtime()?
        .block_on(crate::cluster::etcd::read_status(&cfg))
        .map_err(|e| CliError::Io(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let w = |e: std::io::Error| CliError::Io(format!("stdout: {e}"));
    if json {
        let text =
            serde_json::to_string_pretty(&status).map_err(|e| CliError::Io(e.to_string()))?;
        writeln!(out, "{text}").map_err(w)?;
        return Ok(());
    }
    writeln!(out, "cluster {} ({} node(s))", cfg.name, status.nodes.len()).map_err(w)?;
    writeln!(
        out,
        "{:<20} {:<22} {:<9} {:>8} {:>8}",
        "NODE", "PORTAL", "STATE", "SESSIONS", "CLIENTS"
    )
    .map_err(w)?;
    for n in &status.nodes {
        let state = if n.draining { "draining" } else { "up" };
        writeln!(
            out,
            "{:<20} {:<22} {:<9} {:>8} {:>8}",
            n.id,
            n.portal.to_string(),
            state,
            n.load,
            n.clients
        )
        .map_err(w)?;
    }
    for d in &status.drained_absent {
        writeln!(out, "{d:<20} {:<22} {:<9}", "-", "drained, not running").map_err(w)?;
    }
    if status.orphans > 0 {
        writeln!(
            out,
            "warning: {} ownership key(s) name a node that is not live",
            status.orphans
        )
        .map_err(w)?;
    }
    Ok(())
}

/// `diskless cluster clients`: the lifecycle records in etcd, with each client's owner now.
fn cluster_clients(path: &Path, json: bool) -> Result<(), CliError> {
    use crate::boot::record::ClientRecord;
    let cfg = cluster_config(path)?;
    let (raw, owners) = small_runtime()?
        .block_on(crate::cluster::clients::read_all(&cfg))
        .map_err(|e| CliError::Io(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    let w = |e: std::io::Error| CliError::Io(format!("stdout: {e}"));
    let mut records = Vec::with_capacity(raw.len());
    for (key, value) in raw {
        match serde_json::from_slice::<ClientRecord>(&value) {
            Ok(r) => records.push(r),
            Err(e) => eprintln!("diskless: {key}: not a client record: {e}"),
        }
    }
    let owner = |r: &ClientRecord| {
        owners
            .iter()
            .find(|(who, _)| who.eq_ignore_ascii_case(&r.initiator))
            .map(|(_, n)| n.clone())
    };
    if json {
        let list: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("owner".into(), serde_json::json!(owner(r)));
                }
                v
            })
            .collect();
        let text = serde_json::to_string_pretty(&list).map_err(|e| CliError::Io(e.to_string()))?;
        writeln!(out, "{text}").map_err(w)?;
        return Ok(());
    }
    let table = cluster_clients_table(&records, owner);
    write!(out, "{table}").map_err(w)?;
    Ok(())
}

/// The `diskless cluster clients` table: one row per LUN of each client (LUN 0, then its
/// data disks), the client's columns repeated so that each row stands alone (grep, awk).
/// `NEXT LOGIN` says `recreate` for a disk in RBD an operator's reset discarded.
fn cluster_clients_table(
    records: &[crate::boot::record::ClientRecord],
    owner: impl Fn(&crate::boot::record::ClientRecord) -> Option<String>,
) -> String {
    use crate::boot::record::Lun0;
    use std::fmt::Write as _;
    let kind = |d: &Lun0| match d {
        Lun0::Overlay => "overlay".to_string(),
        Lun0::Rbd { name } => format!("rbd:{name}"),
        Lun0::Image => "image".to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:<12} {:<12} {:>3} {:<16} {:<10} {:<8} {:>5} {:<9} {:<10} LAST BOOT (UTC)",
        "INITIATOR",
        "LAST NODE",
        "OWNER",
        "LUN",
        "IMAGE",
        "MODE",
        "DISK",
        "BOOTS",
        "PHASE",
        "NEXT LOGIN"
    );
    for r in records {
        let owner = owner(r).unwrap_or_else(|| "-".into());
        let last_boot = r
            .last_boot_ms
            .map_or_else(|| "-".to_string(), crate::control::utc);
        let lun0 = (0u16, r.disk.image.as_str(), r.disk.mode, &r.disk.lun0);
        let data = r
            .disk
            .luns
            .iter()
            .map(|l| (l.lun, l.image.as_str(), l.mode, &l.disk));
        for (lun, image, mode, disk) in std::iter::once(lun0).chain(data) {
            let next = if r.state.rbd_recreate.contains(&lun) {
                "recreate"
            } else {
                "-"
            };
            let _ = writeln!(
                out,
                "{:<36} {:<12} {:<12} {:>3} {:<16} {:<10} {:<8} {:>5} {:<9} {:<10} {}",
                r.initiator,
                r.node,
                owner,
                lun,
                image,
                mode.to_string(),
                kind(disk),
                r.state.boots,
                r.state.phase.to_string(),
                next,
                last_boot
            );
        }
    }
    out
}

/// `diskless cluster config push FILE` / `clear`: checked against this node's file first.
fn shared_config(path: &Path, file: Option<&Path>) -> Result<(), CliError> {
    let cfg = cluster_config(path)?;
    let yaml = match file {
        Some(f) => {
            let text =
                std::fs::read(f).map_err(|e| CliError::Io(format!("{}: {e}", f.display())))?;
            let c = crate::control::load_with_shared(path, Some(&text)).map_err(CliError::Io)?;
            registry::plan(&c)?;
            Some(text)
        }
        None => None,
    };
    let pushed = yaml.is_some();
    small_runtime()?
        .block_on(crate::cluster::etcd::push_config(&cfg, yaml))
        .map_err(|e| CliError::Io(e.to_string()))?;
    if pushed {
        println!(
            "diskless: shared configuration stored in cluster {}; every node reloads with it",
            cfg.name
        );
    } else {
        println!(
            "diskless: shared configuration removed from cluster {}; nodes use their own files",
            cfg.name
        );
    }
    Ok(())
}

fn node_drain(path: &Path, node: Option<&str>, on: bool) -> Result<(), CliError> {
    let cfg = cluster_config(path)?;
    let node = node.unwrap_or(&cfg.node_id).to_string();
    if !node
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || node.is_empty()
    {
        return Err(CliError::Io(format!("{node:?} is not a node id")));
    }
    let clients = small_runtime()?
        .block_on(crate::cluster::etcd::set_drain(&cfg, &node, on))
        .map_err(|e| CliError::Io(e.to_string()))?;
    if on {
        println!("diskless: node {node} draining: no new clients; its {clients} client(s) move to other nodes at their next boot");
    } else {
        println!("diskless: node {node} takes new clients again ({clients} client(s) owned)");
    }
    Ok(())
}

fn image_create(path: &Path, size: u64) -> Result<(), CliError> {
    FileStore::create(path, size).map_err(|e| CliError::Io(format!("image create: {e}")))?;
    println!(
        "diskless: created {} ({}, sparse)",
        path.display(),
        ByteSize(size)
    );
    Ok(())
}

/// The validated configuration `serve` runs: from the file, or quick mode.
pub fn serve_config(args: &ServeArgs) -> Result<Config, CliError> {
    let mut config = match &args.image {
        Some(image) => {
            let name = args
                .target
                .clone()
                .unwrap_or_else(|| registry::quick_target_name(image));
            match args.overlay {
                Some(mode) => {
                    let mut c =
                        Config::quick_boot(image, &name, mode, args.block_size.unwrap_or(512));
                    c.state_dir = Some(
                        args.state_dir
                            .clone()
                            .unwrap_or_else(|| PathBuf::from("state")),
                    );
                    c.validate()?;
                    c
                }
                None => registry::quick_config(
                    image,
                    &name,
                    args.read_only,
                    args.block_size.unwrap_or(512),
                )?,
            }
        }
        None => Config::load(&args.config)?,
    };
    if !args.listen.is_empty() {
        config.portals = args.listen.iter().copied().map(Portal).collect();
        config.validate()?;
    }
    if let Some(listen) = args.boot_http {
        match &mut config.boot_http {
            Some(h) => h.listen = Portal(listen),
            None => {
                config.boot_http = Some(crate::config::BootHttpConfig {
                    listen: Portal(listen),
                    iscsi_portal: None,
                })
            }
        }
    }
    if let Some(mode) = args.netboot {
        if args.image.is_some() && args.overlay.is_none() && mode != crate::config::NetbootMode::Off
        {
            return Err(CliError::Config(ConfigError::invalid(
                crate::config::QUICK_SOURCE,
                "--netboot",
                "network boot serves boot targets: add --overlay volatile (or persistent)",
            )));
        }
        let n = config
            .netboot
            .get_or_insert_with(|| crate::config::NetbootConfig::quick(mode));
        n.mode = mode;
        if !args.netboot_interfaces.is_empty() {
            n.interfaces = args.netboot_interfaces.clone();
        }
        if config.boot_http.is_none() && mode != crate::config::NetbootMode::Off {
            config.boot_http = Some(crate::config::BootHttpConfig {
                listen: Portal(SocketAddr::from(([0, 0, 0, 0], 8080))),
                iscsi_portal: None,
            });
        }
    }
    if args.netboot.is_some() || args.boot_http.is_some() {
        config.validate()?;
    }
    if let Some(addr) = args.api {
        config.api.get_or_insert_with(Default::default).listen = Portal(addr);
        config.validate()?;
    }
    Ok(config)
}

/// Bind one listener per address. An IPv6 wildcard that shares its port with an IPv4
/// portal is made v6-only, else its dual-stack bind would collide with the IPv4 one.
pub async fn bind_listeners(addrs: &[SocketAddr]) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let sock = if addr.is_ipv6() {
            let s = tokio::net::TcpSocket::new_v6()?;
            if addrs.iter().any(|a| a.is_ipv4() && a.port() == addr.port()) {
                set_v6_only(&s)?;
            }
            s
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        out.push(sock.listen(1024)?);
    }
    Ok(out)
}

fn set_v6_only(sock: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called (not when
/// first polled), so a signal right after the "listening" line is never lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let term = async {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let int = async {
            match int {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => {},
            _ = int => {},
        }
        tracing::info!("shutdown requested");
    }
}

fn serve(args: ServeArgs) -> Result<(), CliError> {
    let config = serve_config(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))?;
    rt.block_on(async move {
        let listeners = bind_listeners(&config.portal_addrs())
            .await
            .map_err(|e| CliError::Io(e.to_string()))?;
        let bound = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| CliError::Io(e.to_string()))?;
        // Images are opened after binding so that a port in use fails fast; the registry
        // reports the real bound addresses (port 0 resolved) in SendTargets.
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        let mut config = config;
        let cluster = match &config.cluster {
            Some(c) => Some(
                crate::cluster::Cluster::new(c, bound.clone())
                    .await
                    .map_err(|e| CliError::Io(format!("cluster: {e}")))?,
            ),
            None => None,
        };
        // Images that follow the catalogue's pointers take the versions they name now (read
        // once here; the cluster's watch follows them from then on), or the versions this
        // node served before when etcd does not answer.
        let mut resolved = None;
        if let (Some(cl), Some(cc)) = (&cluster, &config.cluster) {
            cl.catalogue().set_state_dir(&config.state_path());
            if crate::cluster::catalogue::follows_pointers(&config) {
                match crate::cluster::catalogue::read_all(cc).await {
                    Ok(cat) => cl.catalogue().seed(cat),
                    Err(e) => tracing::warn!(error = %e, "image catalogue unreadable at start"),
                }
                resolved = Some(cl.catalogue().resolve(&mut config).map_err(CliError::Io)?);
            }
        }
        let registry = Registry::from_config(&config)?.with_portals(bound.clone());
        if let (Some(cl), Some(r)) = (&cluster, resolved) {
            cl.catalogue().commit(r);
        }
        // Deep versions get a flat copy in the background (docs/images.md, "Flat copies").
        crate::storage::versions::flat::apply_settings(&config.settings);
        let settings = crate::session::Settings::from_config(registry.settings());
        for t in registry.targets() {
            tracing::info!(target = %t.name, luns = t.luns.len(), "serving");
        }
        let shutdown = shutdown_signal();
        let http = match registry.boot_http() {
            Some(h) => Some(
                tokio::net::TcpListener::bind(h.listen.0)
                    .await
                    .map_err(|e| CliError::Io(format!("boot_http.listen {}: {e}", h.listen.0)))?,
            ),
            None => None,
        };
        let state_dir = registry.state_dir().to_path_buf();
        let api_listeners = match &config.api {
            Some(a) => {
                let main = tokio::net::TcpListener::bind(a.listen.0)
                    .await
                    .map_err(|e| CliError::Io(format!("api.listen {}: {e}", a.listen.0)))?;
                let metrics = match a.metrics_listen {
                    Some(m) => Some(tokio::net::TcpListener::bind(m.0).await.map_err(|e| {
                        CliError::Io(format!("api.metrics_listen {}: {e}", m.0))
                    })?),
                    None => None,
                };
                Some((main, metrics, a.token_digest()))
            }
            None => None,
        };
        let server = Server::new(Arc::new(registry), settings);
        let mut aux = tokio::task::JoinSet::new();
        // In a cluster, register (in the background: etcd may be down now) before serving.
        if let (Some(c), Some(cluster)) = (&config.cluster, cluster) {
            server.set_cluster(cluster.clone());
            if args.image.is_none() {
                cluster.set_shared(crate::control::ClusterShared::new(
                    server.clone(),
                    args.config.clone(),
                ));
            }
            // Published in the node's record: the other nodes' APIs ask it for its clients.
            if let Some(Ok(a)) = api_listeners.as_ref().map(|(m, _, _)| m.local_addr()) {
                cluster.set_api(a);
            }
            cluster.spawn(&mut aux);
            println!(
                "diskless: cluster {} node {} (etcd {}), clients sent to {}",
                c.name,
                c.node_id,
                c.etcd.join(","),
                c.advertise.0
            );
        }
        if let Some((main, metrics, token)) = api_listeners {
            // The audit log lives in the state directory.
            std::fs::create_dir_all(&state_dir)
                .map_err(|e| CliError::Io(format!("state_dir {}: {e}", state_dir.display())))?;
            let config_path = args.image.is_none().then(|| args.config.clone());
            let api = crate::api::Api::new(server.clone(), config_path, token, state_dir.clone());
            api.set_peer_token(config.api.as_ref().and_then(|a| a.token.clone()));
            let addr = main.local_addr().map_err(|e| CliError::Io(e.to_string()))?;
            println!("diskless: api on http://{addr}/");
            if let Some(m) = metrics {
                let maddr = m.local_addr().map_err(|e| CliError::Io(e.to_string()))?;
                println!("diskless: metrics on http://{maddr}/metrics");
                aux.spawn(crate::api::serve_metrics(m, api.clone()));
            }
            aux.spawn(crate::api::serve(main, api));
        }
        let http_addr = match &http {
            Some(l) => Some(l.local_addr().map_err(|e| CliError::Io(e.to_string()))?),
            None => None,
        };
        // Netboot binds before anything serves, so a taken port 67/69 fails `serve` at once.
        let netboot = match config.netboot.as_ref().filter(|n| n.mode != crate::config::NetbootMode::Off) {
            Some(n) => {
                if n.pool.is_some() {
                    std::fs::create_dir_all(&state_dir)
                        .map_err(|e| CliError::Io(format!("state directory {}: {e}", state_dir.display())))?;
                }
                let s = crate::netboot::server::settings(n, http_addr, &state_dir).map_err(CliError::Io)?;
                println!("diskless: {}", crate::netboot::server::describe(&s));
                Some(crate::netboot::server::bind(s).map_err(|e| CliError::Io(format!("netboot: {e}")))?)
            }
            None => None,
        };
        let files = match config.netboot.as_ref().filter(|n| n.mode != crate::config::NetbootMode::Off) {
            Some(n) => Some(Arc::new(crate::netboot::files::FileRoot::new(&n.root).map_err(|e| {
                CliError::Io(format!("netboot.root {}: {e}", n.root.display()))
            })?)),
            None => None,
        };
        if let (Some(l), Some(addr)) = (http, http_addr) {
            println!("diskless: boot scripts on http://{addr}/boot.ipxe");
            aux.spawn(crate::boot::http::serve_with_files(l, server.clone(), files));
        }
        if let Some(nb) = netboot {
            nb.spawn(&mut aux);
        }
        // Plain quick mode (one image, no overlays) has no state to keep or operate on.
        let wants_state = args.image.is_none() || args.overlay.is_some();
        if wants_state && std::fs::create_dir_all(&state_dir).is_ok() {
            let config_path = args.image.is_none().then(|| args.config.clone());
            aux.spawn(crate::control::serve(state_dir.join(crate::control::SOCKET), server.clone(), config_path.clone()));
            if let Some(path) = config_path {
                let server = server.clone();
                aux.spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
                    while hup.recv().await.is_some() {
                        if let Err(e) = crate::control::reload(&server, &path) {
                            tracing::error!(error = %e, "reload failed; keeping the old configuration");
                        }
                    }
                });
            }
        }
        announce(&mut std::io::stdout().lock(), &bound)
            .map_err(|e| CliError::Io(format!("stdout: {e}")))?;
        let cluster = server.cluster().cloned();
        let result = server.run(listeners, shutdown).await.map_err(|e| CliError::Io(e.to_string()));
        aux.abort_all();
        if let Some(c) = cluster {
            c.leave().await;
        }
        result
    })
}

/// Print `diskless: listening on <addr>` per listener and flush (tests parse these lines).
pub fn announce(out: &mut impl Write, bound: &[SocketAddr]) -> std::io::Result<()> {
    for a in bound {
        writeln!(out, "diskless: listening on {a}")?;
    }
    out.flush()
}

/// The check-config summary. Never prints secrets.
pub fn write_summary(
    out: &mut impl Write,
    config: &Config,
    plan: &registry::Plan,
) -> std::io::Result<()> {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let secs = |d: Option<std::time::Duration>| {
        d.map_or("never".to_string(), |d| format!("{}s", d.as_secs()))
    };
    writeln!(out, "{}: OK", config.source)?;
    let portals: Vec<String> = plan.portals.iter().map(|p| p.to_string()).collect();
    writeln!(out, "portals: {}", portals.join(", "))?;
    let s = crate::session::Settings::from_config(&plan.settings);
    let p = &s.params;
    writeln!(
        out,
        "settings: login timeout {}s, NOP-In interval {}, NOP-In timeout {}, max sessions {}, \
         command window {}",
        s.login_timeout.as_secs(),
        secs(s.nop_in_interval),
        secs(s.nop_in_timeout),
        s.max_sessions,
        s.cmd_window
    )?;
    writeln!(
        out,
        "negotiation: MaxRecvDataSegmentLength {}, MaxBurstLength {}, FirstBurstLength {}, \
         ImmediateData {}, InitialR2T {}, header digest {}, data digest {}",
        p.max_recv_data_segment_length,
        p.max_burst_length,
        p.first_burst_length,
        yes(p.immediate_data),
        yes(p.initial_r2t),
        yes(p.allow_header_digest),
        yes(p.allow_data_digest)
    )?;
    if let Some(c) = &config.cluster {
        writeln!(
            out,
            "cluster: {} node {}, etcd {}, clients sent to {}, lease TTL {}s",
            c.name,
            c.node_id,
            c.etcd.join(", "),
            c.advertise.0,
            c.lease_ttl
        )?;
    }
    let auth = |c: Option<&crate::login::ChapCredentials>| match c {
        None => "none".to_string(),
        Some(c) => match &c.mutual {
            None => format!("CHAP (user {})", c.user),
            Some((mu, _)) => format!("mutual CHAP (user {}, target user {mu})", c.user),
        },
    };
    writeln!(
        out,
        "discovery authentication: {}",
        auth(plan.discovery_chap.as_ref())
    )?;
    if let Some(n) = &config.netboot {
        let clients = match n.client_macs() {
            None => "any client".to_string(),
            Some(m) => format!("{} client(s)", m.len()),
        };
        let ifs = if n.interfaces.is_empty() {
            "all interfaces".to_string()
        } else {
            n.interfaces.join(", ")
        };
        writeln!(
            out,
            "netboot: {} on {ifs}, {clients}, files from {} (BIOS {}, UEFI x64 {}, UEFI ARM64 {}){}",
            n.mode,
            n.root.display(),
            n.boot_files.bios,
            n.boot_files.uefi_x64,
            n.boot_files.uefi_arm64,
            match &n.pool {
                Some(p) => format!(", pool {}-{}/{}", p.start, p.end, p.prefix_len),
                None => String::new(),
            }
        )?;
    }
    writeln!(out, "targets: {}", plan.targets.len())?;
    for t in &plan.targets {
        match &t.alias {
            Some(a) => writeln!(out, "  {} (alias {a:?})", t.name)?,
            None => writeln!(out, "  {}", t.name)?,
        }
        writeln!(out, "    initiators: {}", t.initiators.join(", "))?;
        writeln!(out, "    authentication: {}", auth(t.chap.as_ref()))?;
        for l in &t.luns {
            let state = match std::fs::metadata(&l.image) {
                Ok(m) if m.is_file() => ByteSize(m.len()).to_string(),
                Ok(_) => "device".to_string(),
                Err(_) => match l.create_size {
                    Some(n) => format!("missing, will be created with {}", ByteSize(n)),
                    None => "missing".to_string(),
                },
            };
            writeln!(
                out,
                "    LUN {}: {} ({state}), {}-byte blocks, {}{}{}, serial {}",
                l.lun,
                l.image.display(),
                l.block_size,
                if l.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                if l.thin { ", thin" } else { "" },
                if l.removable { ", removable" } else { "" },
                l.identity.serial
            )?;
        }
    }
    if !config.images.is_empty() {
        writeln!(out, "images: {}", config.images.len())?;
    }
    for im in &config.images {
        match &im.s3 {
            // Where the version lives and where the credentials come from, never the keys.
            Some(s3) => writeln!(
                out,
                "  {}: s3 {} bucket {} key {}/{}/{} (credentials from {}), cache {} memory + {} disk",
                im.name,
                s3.endpoint,
                s3.bucket,
                s3.prefix.trim_matches('/'),
                s3.image.as_deref().unwrap_or(&im.name),
                match s3.pointer() {
                    Some(p) => format!("<{p} in the cluster's catalogue>"),
                    None => s3.version.clone(),
                },
                s3.credentials_file
                    .as_ref()
                    .map_or("the environment".to_string(), |f| f.display().to_string()),
                config.chunk_cache.memory,
                config.chunk_cache.disk
            )?,
            None => writeln!(out, "  {}: {}", im.name, config.image_path(&im.path).display())?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("diskless").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cluster_clients_lists_every_lun() {
        use crate::boot::record::{ClientRecord, DiskSummary, Lun0, LunSummary};
        use crate::config::OverlayMode;
        let state = crate::boot::lifecycle::BootState {
            boots: 4,
            rbd_recreate: vec![1],
            ..Default::default()
        };
        let rbd = |n: &str| Lun0::Rbd { name: n.into() };
        let two = DiskSummary {
            image: "golden".into(),
            version: None,
            mode: OverlayMode::Persistent,
            lun0: rbd("rbd/c1"),
            luns: vec![LunSummary {
                lun: 1,
                image: "data".into(),
                mode: OverlayMode::Persistent,
                disk: rbd("rbd/c1.lun1"),
            }],
        };
        let one = DiskSummary {
            image: "base".into(),
            version: None,
            mode: OverlayMode::Volatile,
            lun0: Lun0::Overlay,
            luns: Vec::new(),
        };
        let recs = [
            ClientRecord::new("t", "iqn.x:c1", "n1", 3, 9, two, &state),
            ClientRecord::new("t", "iqn.x:c2", "n2", 1, 9, one, &Default::default()),
        ];
        let table = cluster_clients_table(&recs, |r| (r.node == "n1").then(|| "n1".into()));
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows.len(),
            4,
            "a header, two LUNs of c1, one of c2:\n{table}"
        );
        assert_eq!(
            rows[0][..5],
            ["INITIATOR", "LAST", "NODE", "OWNER", "LUN"],
            "{table}"
        );
        // INITIATOR LAST-NODE OWNER LUN IMAGE MODE DISK BOOTS PHASE NEXT-LOGIN LAST-BOOT
        assert_eq!(
            rows[1][..10],
            [
                "iqn.x:c1",
                "n1",
                "n1",
                "0",
                "golden",
                "persistent",
                "rbd:rbd/c1",
                "4",
                "off",
                "-"
            ],
            "{table}"
        );
        assert_eq!(
            rows[2][..10],
            [
                "iqn.x:c1",
                "n1",
                "n1",
                "1",
                "data",
                "persistent",
                "rbd:rbd/c1.lun1",
                "4",
                "off",
                "recreate"
            ],
            "LUN 1, its reset pending:\n{table}"
        );
        assert_eq!(
            rows[3][..10],
            ["iqn.x:c2", "n2", "-", "0", "base", "volatile", "overlay", "0", "off", "-"],
            "{table}"
        );
    }

    #[test]
    fn serve_arguments() {
        let c = parse(&["serve"]).unwrap();
        match c.command {
            Command::Serve(a) => {
                assert_eq!(a.config, Path::new("targets.yaml"));
                assert!(a.listen.is_empty() && a.image.is_none());
            }
            _ => panic!(),
        }
        let c = parse(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:3261",
            "--image",
            "x.img",
            "--read-only",
            "--block-size",
            "4096",
            "--log",
            "debug",
        ])
        .unwrap();
        assert_eq!(c.log.as_deref(), Some("debug"));
        match c.command {
            Command::Serve(a) => {
                assert_eq!(a.listen.len(), 2);
                assert!(a.read_only);
                assert_eq!(a.block_size, Some(4096));
            }
            _ => panic!(),
        }
        assert!(parse(&["serve", "--read-only"]).is_err());
        assert!(parse(&["serve", "--image", "x", "--block-size", "1024"]).is_err());
        assert!(parse(&["serve", "--listen", "nohost:1"]).is_err());
        assert!(parse(&["serve", "-c", "a.yaml", "--image", "x"]).is_err());
        assert!(parse(&["image", "create", "x.img", "--size", "64MiB"]).is_ok());
        assert!(parse(&["image", "create", "x.img", "--size", "lots"]).is_err());
        assert!(parse(&["check-config", "-c", "a.yaml"]).is_ok());
        let c = parse(&["serve", "--netboot", "proxy", "--netboot-interface", "eth1"]).unwrap();
        let Command::Serve(a) = c.command else {
            panic!()
        };
        assert_eq!(a.netboot, Some(crate::config::NetbootMode::Proxy));
        assert_eq!(a.netboot_interfaces, vec!["eth1".to_string()]);
        assert!(parse(&["serve", "--netboot", "maybe"]).is_err());
        assert!(parse(&["serve", "--netboot-interface", "eth1"]).is_err());
    }

    #[test]
    fn quick_netboot_config() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("g.img");
        FileStore::create(&img, 1 << 20).unwrap();
        let root = dir.path().join("ipxe");
        std::fs::create_dir(&root).unwrap();
        let i = img.to_str().unwrap();
        // Without --overlay there is no boot target to netboot.
        let c = parse(&["serve", "--image", i, "--netboot", "proxy"]).unwrap();
        let Command::Serve(a) = c.command else {
            panic!()
        };
        let e = serve_config(&a)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--overlay"), "{e}");
        let c = parse(&[
            "serve",
            "--image",
            i,
            "--overlay",
            "volatile",
            "--netboot",
            "off",
            "--boot-http",
            "127.0.0.1:0",
        ])
        .unwrap();
        let Command::Serve(a) = c.command else {
            panic!()
        };
        let config = serve_config(&a).unwrap();
        assert_eq!(
            config.netboot.as_ref().map(|n| n.mode),
            Some(crate::config::NetbootMode::Off)
        );
        assert_eq!(
            config.boot_http.as_ref().map(|h| h.listen.0.to_string()),
            Some("127.0.0.1:0".to_string())
        );
    }

    #[test]
    fn quick_mode_config() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("My Disk.img");
        FileStore::create(&img, 1 << 20).unwrap();
        let c = parse(&[
            "serve",
            "--image",
            img.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        let Command::Serve(a) = c.command else {
            panic!()
        };
        let config = serve_config(&a).unwrap();
        assert_eq!(config.targets[0].name, "iqn.2026-11.org.diskless:my-disk");
        assert_eq!(config.portal_addrs(), vec!["127.0.0.1:0".parse().unwrap()]);
        let c = parse(&["serve", "--image", "/nonexistent/x.img"]).unwrap();
        let Command::Serve(a) = c.command else {
            panic!()
        };
        assert_eq!(serve_config(&a).err().map(|e| e.exit_code()), Some(2));
        let c = parse(&["serve", "--image", img.to_str().unwrap(), "--target", "Bad"]).unwrap();
        let Command::Serve(a) = c.command else {
            panic!()
        };
        assert_eq!(serve_config(&a).err().map(|e| e.exit_code()), Some(2));
    }

    #[tokio::test]
    async fn binds_and_announces_real_ports() {
        let ls =
            bind_listeners(&["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]).await;
        // IPv6 loopback may be unavailable in a sandbox; IPv4 alone must work.
        let ls = match ls {
            Ok(l) => l,
            Err(_) => bind_listeners(&["127.0.0.1:0".parse().unwrap()])
                .await
                .unwrap(),
        };
        let bound: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        assert!(bound.iter().all(|a| a.port() != 0));
        let mut out = Vec::new();
        announce(&mut out, &bound).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            format!("diskless: listening on {}", bound[0])
        );
        // A taken port is an I/O error.
        assert!(bind_listeners(&[bound[0]]).await.is_err());
    }

    #[test]
    fn summary_shows_netboot() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "{}{}{}{}{}{}",
            "boot_http: {listen: \"0.0.0.0:8080\"}\nnetboot:\n  mode: dhcp\n",
            "  interfaces: [eth1]\n  clients: [\"52:54:00:00:00:01\"]\n",
            format_args!("  root: {}\n", dir.path().display()),
            "  pool: {start: 10.0.0.10, end: 10.0.0.20}\n",
            "targets:\n  - name: iqn.2026-11.org.x:y\n    luns:\n",
            "      - {lun: 0, image: a.img, create_size: 1MiB}\n",
        );
        let c = Config::from_yaml(&yaml, "t.yaml", dir.path()).unwrap();
        let p = registry::plan(&c).unwrap();
        let mut out = Vec::new();
        write_summary(&mut out, &c, &p).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("netboot: dhcp on eth1, 1 client(s)")
                && s.contains("pool 10.0.0.10-10.0.0.20/24"),
            "{s}"
        );
    }

    #[test]
    fn summary_hides_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "discovery:\n  chap: {user: disc, secret: discoverysecret}\ntargets:\n  - name: iqn.2026-11.org.x:y\n    chap: {user: boot, secret: bootsecret123, mutual_user: tgt, mutual_secret: mutualsecret99}\n    luns:\n      - {lun: 0, image: a.img, create_size: 1MiB}\n";
        let c = Config::from_yaml(yaml, "t.yaml", dir.path()).unwrap();
        let p = registry::plan(&c).unwrap();
        let mut out = Vec::new();
        write_summary(&mut out, &c, &p).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("iqn.2026-11.org.x:y") && s.contains("will be created with 1MiB"),
            "{s}"
        );
        assert!(
            s.contains("mutual CHAP (user boot, target user tgt)"),
            "{s}"
        );
        for secret in ["discoverysecret", "bootsecret123", "mutualsecret99"] {
            assert!(!s.contains(secret), "{s}");
        }
    }
}
