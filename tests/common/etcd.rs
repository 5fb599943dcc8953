//! A single-member etcd (Debian's etcd-server) on 127.0.0.1 with ports of its own, for the
//! cluster tests (tests/cluster.rs, tests/cluster_s3.rs).

#![allow(dead_code)] // each test uses a different subset

use crate::common;
use crate::http::wait_for;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free TCP port on 127.0.0.1 (bound, then released for the daemon to take).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A single-member etcd on 127.0.0.1 (RECIPES §7), stopped by its PID when dropped.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    pub client: u16,
    peer: u16,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        common::require("etcd", "etcd-server");
        common::require("etcdctl", "etcd-client");
        let mut e = Etcd {
            child: None,
            dir: dir.to_path_buf(),
            client: free_port(),
            peer: free_port(),
        };
        e.spawn();
        e
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Start (again, on the same data directory and ports) and wait until it answers.
    pub fn spawn(&mut self) {
        let (c, p) = (self.client, self.peer);
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "n1", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{c}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{c}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-cluster",
                &format!("n1=http://127.0.0.1:{p}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start etcd");
        self.child = Some(child);
        wait_for(Duration::from_secs(30), "etcd to answer", || {
            self.ctl(&["endpoint", "health"]).then_some(())
        });
    }

    /// `etcdctl ARGS`: whether it succeeded.
    pub fn ctl(&self, args: &[&str]) -> bool {
        self.ctl_out(args).is_some()
    }

    pub fn ctl_out(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "--command-timeout=2s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Initiator → owner node, as etcd has it now.
    pub fn owners(&self, cluster: &str) -> BTreeMap<String, String> {
        let prefix = format!("/diskless/{cluster}/owners/");
        let text = self
            .ctl_out(&["get", "--prefix", &prefix])
            .expect("etcdctl get owners");
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((k.strip_prefix(&prefix)?.to_string(), v.to_string())),
                _ => None,
            })
            .collect()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
    }
}
