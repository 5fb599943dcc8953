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
    tls: Option<Pki>,
    /// `user:password` etcdctl uses once auth is enabled.
    root: Option<String>,
    /// More command-line options of etcd (e.g. `--quota-backend-bytes=...`).
    args: Vec<String>,
}

/// Certificates made at test time with the `openssl` CLI: a CA, etcd's server certificate
/// (for 127.0.0.1) and a client certificate, all PEM, in one directory.
#[derive(Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A CA named `name` with a server and a client certificate signed by it.
    pub fn make(dir: &Path, name: &str) -> Pki {
        common::require("openssl", "openssl");
        std::fs::create_dir_all(dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let cn = format!("/CN={name}");
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &cn,
            ],
        ]
        .concat());
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        for who in ["server", "client"] {
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            let subj = format!("/CN={who}");
            run(&[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subj],
            ]
            .concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ]);
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        Self::start_with(dir, None)
    }

    /// With `tls`: client URLs are https, the server certificate is `tls`'s, and clients
    /// must show a certificate signed by its CA (`--client-cert-auth`).
    pub fn start_with(dir: &Path, tls: Option<Pki>) -> Etcd {
        Self::launch(dir, tls, &[])
    }

    /// A plain etcd started with more command-line options.
    pub fn start_args(dir: &Path, args: &[&str]) -> Etcd {
        Self::launch(dir, None, args)
    }

    fn launch(dir: &Path, tls: Option<Pki>, args: &[&str]) -> Etcd {
        common::require("etcd", "etcd-server");
        common::require("etcdctl", "etcd-client");
        std::fs::create_dir_all(dir).expect("etcd directory");
        let mut e = Etcd {
            child: None,
            dir: dir.to_path_buf(),
            client: free_port(),
            peer: free_port(),
            tls,
            root: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        // The ports were free when picked, but another process may bind one first: etcd
        // then exits saying so, and starts again on other ports (and an empty data
        // directory, which would otherwise remember the old peer URL).
        for _ in 0..5 {
            match e.try_spawn() {
                Ok(()) => return e,
                Err(log) if log.contains("address already in use") => {
                    let _ = std::fs::remove_dir_all(e.dir.join("etcd-data"));
                    e.client = free_port();
                    e.peer = free_port();
                }
                Err(log) => panic!("etcd did not start; its log:\n{log}"),
            }
        }
        panic!("etcd found a port taken five times")
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client)
    }

    /// Turn on etcd's authentication: a `root` user (for etcdctl here) and `user` with
    /// read-write access to `/diskless/` only.
    pub fn enable_auth(&mut self, user: &str, password: &str) {
        let root_pw = "root-secret";
        for args in [
            &[
                "user",
                "add",
                "root",
                "--new-user-password",
                root_pw,
                "--interactive=false",
            ][..],
            &[
                "user",
                "add",
                user,
                "--new-user-password",
                password,
                "--interactive=false",
            ],
            &["role", "add", "diskless"],
            &[
                "role",
                "grant-permission",
                "diskless",
                "--prefix=true",
                "readwrite",
                "/diskless/",
            ],
            &["user", "grant-role", user, "diskless"],
            &["auth", "enable"],
        ] {
            assert!(self.ctl(args), "etcdctl {args:?} failed");
        }
        self.root = Some(format!("root:{root_pw}"));
        assert!(self.ctl(&["get", "x"]), "etcdctl as root after auth enable");
    }

    /// Start (again, on the same data directory and ports) and wait until it answers.
    pub fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("etcd did not start; its log:\n{log}");
        }
    }

    /// Start and wait until it answers; Err(its log) if it exited first. Its own process
    /// must still run once the endpoint answers: another etcd on a port it could not bind
    /// must not pass for it.
    fn try_spawn(&mut self) -> Result<(), String> {
        let (p, client_url) = (self.peer, self.endpoint());
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let mut cmd = Command::new("etcd");
        if let Some(pki) = &self.tls {
            cmd.arg("--cert-file")
                .arg(pki.path("server.pem"))
                .arg("--key-file")
                .arg(pki.path("server.key"))
                .arg("--trusted-ca-file")
                .arg(pki.path("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "n1", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-cluster",
                &format!("n1=http://127.0.0.1:{p}"),
            ])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start etcd");
        self.child = Some(child);
        let log = self.dir.join("etcd.log");
        let exited = |e: &mut Etcd| {
            e.child
                .as_mut()
                .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
        };
        let answered = wait_for(Duration::from_secs(30), "etcd to answer or exit", || {
            if exited(self) {
                Some(false)
            } else {
                self.ctl(&["endpoint", "health"]).then_some(true)
            }
        });
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        if answered && !exited(self) && !log_text.contains("address already in use") {
            return Ok(());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Err(log_text)
    }

    /// `etcdctl ARGS`: whether it succeeded.
    pub fn ctl(&self, args: &[&str]) -> bool {
        self.ctl_out(args).is_some()
    }

    pub fn ctl_out(&self, args: &[&str]) -> Option<String> {
        let mut cmd = Command::new("etcdctl");
        if let Some(pki) = &self.tls {
            cmd.arg("--cacert")
                .arg(pki.path("ca.pem"))
                .arg("--cert")
                .arg(pki.path("client.pem"))
                .arg("--key")
                .arg(pki.path("client.key"));
        }
        if let Some(root) = &self.root {
            cmd.args(["--user", root]);
        }
        let out = cmd
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
