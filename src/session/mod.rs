//! Sessions and connections (tokio): the only layer that touches sockets. To be implemented.
use crate::login::OurParams;
use crate::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

/// Runtime settings of the iSCSI server (the `settings:` section of targets.yaml).
#[derive(Debug, Clone)]
pub struct Settings {
    /// What we offer in negotiation.
    pub params: OurParams,
    /// Send a NOP-In ping on a connection idle this long (None: never).
    pub nop_in_interval: Option<Duration>,
    /// Drop a connection whose ping went unanswered this long (None: never; iPXE never answers
    /// pings, so a firmware session must not be dropped for that alone).
    pub nop_in_timeout: Option<Duration>,
    /// A login must complete within this time.
    pub login_timeout: Duration,
    /// At most this many sessions at once (further logins get status 0x0302).
    pub max_sessions: usize,
    /// CmdSN window per session: MaxCmdSN = ExpCmdSN + cmd_window - 1.
    pub cmd_window: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            params: OurParams::default(),
            nop_in_interval: Some(Duration::from_secs(30)),
            nop_in_timeout: None,
            login_timeout: Duration::from_secs(15),
            max_sessions: 4096,
            cmd_window: 128,
        }
    }
}

/// The iSCSI server: accepts connections on the listeners and runs sessions.
pub struct Server {
    _registry: Arc<Registry>,
    _settings: Settings,
}

impl Server {
    pub fn new(registry: Arc<Registry>, settings: Settings) -> Arc<Self> {
        Arc::new(Server {
            _registry: registry,
            _settings: settings,
        })
    }

    /// Serve until `shutdown` resolves; then ask every initiator to log out (Async Message,
    /// event 1), wait briefly, and close.
    pub async fn run(
        self: Arc<Self>,
        listeners: Vec<tokio::net::TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let _ = (listeners, shutdown);
        todo!()
    }
}
