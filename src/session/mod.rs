//! Sessions and connections (tokio): the only layer that touches sockets. One task per
//! connection reads and dispatches PDUs, SCSI commands run on the blocking pool, and a writer
//! task per connection sends responses as they complete.

mod cmdsn;
mod connection;
mod io;
mod table;
mod task;

pub use cmdsn::{sn_le, sn_lt, Admit, CmdWindow};
pub use io::{FrameReader, ReadError};
pub use table::{SessionHandle, SessionTable};
pub use task::{Completion, DataOutError, Residual, WriteCollector};

use crate::login::OurParams;
use crate::registry::Registry;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

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
    /// A firmware login after the client had no session this long counts as a reboot
    /// (volatile overlays are discarded then; docs/overlays.md).
    pub reboot_gap: Duration,
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
            reboot_gap: Duration::from_secs(15),
        }
    }
}

/// The iSCSI server: accepts connections on the listeners and runs sessions.
pub struct Server {
    registry: RwLock<Arc<Registry>>,
    settings: Settings,
    sessions: SessionTable,
    shutdown: watch::Sender<bool>,
}

impl Server {
    pub fn new(registry: Arc<Registry>, settings: Settings) -> Arc<Self> {
        Arc::new(Server {
            registry: RwLock::new(registry),
            settings,
            sessions: SessionTable::default(),
            shutdown: watch::Sender::new(false),
        })
    }

    /// The registry in force (a reload swaps it; sessions keep the LUNs they logged in to).
    pub fn registry(&self) -> Arc<Registry> {
        match self.registry.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the registry (configuration reload). Existing sessions are not disturbed.
    pub fn set_registry(&self, registry: Arc<Registry>) {
        match self.registry.write() {
            Ok(mut r) => *r = registry,
            Err(p) => *p.into_inner() = registry,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// Serve until `shutdown` resolves; then ask every initiator to log out (Async Message,
    /// event 1), wait briefly, and close.
    pub async fn run(
        self: Arc<Self>,
        listeners: Vec<TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            let server = self.clone();
            tasks.spawn(async move { server.accept_loop(listener).await });
        }
        shutdown.await;
        info!(
            sessions = self.sessions.len(),
            "shutting down: asking initiators to log out"
        );
        let _ = self.shutdown.send(true);
        tasks.abort_all();
        // Connections answer the shutdown signal themselves; give them a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let server = self.clone();
                    tokio::spawn(async move {
                        connection::run(server, stream, peer).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}
