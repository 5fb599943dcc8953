//! A single-node Ceph (one monitor, one in-memory OSD, the RADOS gateway) started from
//! Debian's packages on 127.0.0.1 (../shared/RECIPES.md §7), for the tests that keep golden
//! images in S3 (tests/s3.rs, tests/cluster_s3.rs). Its daemons are stopped by the PIDs the
//! test started, and its directory removed, when dropped.

#![allow(dead_code)] // each test uses a different subset

use crate::common;
use crate::http::wait_for;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Access key of the gateway's test user.
pub const KEY: &str = "DISKLESSTESTKEY0";
pub const SECRET: &str = "disklesstestsecret0000000000000000000000";

/// A free TCP port on 127.0.0.1 (bound, then released for the daemon to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A single-node Ceph with the RADOS gateway, in a temporary directory; its daemons are
/// stopped by PID and the directory removed when dropped.
pub struct Ceph {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
    pub rgw_port: u16,
}

impl Ceph {
    /// The golden image `raw` as the protected snapshot `rbd/NAME@v1` that client disks are
    /// cloned from (pool `rbd` created and initialised; layering and exclusive-lock).
    pub fn rbd_parent(&self, raw: &Path, name: &str) {
        self.tool("ceph", &["osd", "pool", "create", "rbd", "8"])
            .ok();
        self.tool("rbd", &["pool", "init", "rbd"]).ok();
        let image = format!("rbd/{name}");
        let raw = raw.to_str().expect("UTF-8 path");
        let features = "layering,exclusive-lock";
        self.tool("rbd", &["import", "--image-feature", features, raw, &image])
            .ok();
        let snap = format!("{image}@v1");
        self.tool("rbd", &["snap", "create", &snap]).ok();
        self.tool("rbd", &["snap", "protect", &snap]).ok();
    }

    pub fn tool(&self, tool: &str, args: &[&str]) -> common::Output {
        let mut a = vec!["-c", self.conf.to_str().unwrap()];
        a.extend_from_slice(args);
        common::run(tool, &a)
    }

    fn spawn(&mut self, name: &'static str, tool: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.out"))).unwrap();
        let child = Command::new(tool)
            .args(["-c", self.conf.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {tool}: {e}"));
        self.daemons.push((name, child));
    }

    /// Fail at once, with its status and the logs, when the daemon `name` has exited. A
    /// monitor exits with 28 (ENOSPC) when its data filesystem has under `mon data avail
    /// crit` percent free: 5 % by default, which a CI disk that is 95 % full but has
    /// gigabytes left trips, so the conf above turns that check off.
    fn exited(&mut self, name: &str) {
        let status = self
            .daemons
            .iter_mut()
            .find(|(n, _)| *n == name)
            .and_then(|(_, c)| c.try_wait().ok().flatten());
        if let Some(status) = status {
            panic!(
                "ceph {name} exited ({status}; 28 = ENOSPC: the temp filesystem full?)\n{}",
                self.logs()
            );
        }
    }

    /// Daemon output and logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for sub in ["", "log"] {
            let Ok(rd) = std::fs::read_dir(self.dir.path().join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "out" || x == "log") {
                    let t = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: String = t.lines().rev().take(15).collect::<Vec<_>>().join("\n");
                    s.push_str(&format!(
                        "--- {} (last lines, reversed) ---\n{tail}\n",
                        p.display()
                    ));
                }
            }
        }
        s
    }

    pub fn start() -> Ceph {
        for (tool, pkg) in [
            ("monmaptool", "ceph-base (a dependency of ceph-mon)"),
            ("ceph-mon", "ceph-mon"),
            ("ceph-osd", "ceph-osd"),
            ("radosgw", "radosgw"),
            ("radosgw-admin", "ceph-common"),
            ("ceph", "ceph-common"),
            ("curl", "curl"),
        ] {
            common::require(tool, pkg);
        }
        let dir = tempfile::Builder::new()
            .prefix("diskless-ceph")
            .tempdir()
            .unwrap();
        let d = dir.path().to_path_buf();
        for sub in ["run", "log", "mon", "osd", "rgw"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let (v2, v1, rgw_port) = (free_port(), free_port(), free_port());
        let fsid = "2f1e3c4d-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
        let conf = d.join("ceph.conf");
        let dd = d.display();
        std::fs::write(
            &conf,
            format!(
                "[global]\n\
                 fsid = {fsid}\n\
                 mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]\n\
                 mon initial members = a\n\
                 public addr = 127.0.0.1\n\
                 auth cluster required = none\n\
                 auth service required = none\n\
                 auth client required = none\n\
                 ms mon client mode = crc\n\
                 osd objectstore = memstore\n\
                 memstore device bytes = 1073741824\n\
                 osd pool default size = 1\n\
                 osd pool default min size = 1\n\
                 mon allow pool size one = true\n\
                 osd crush chooseleaf type = 0\n\
                 osd pool default pg num = 8\n\
                 osd pool default pgp num = 8\n\
                 osd pool default pg autoscale mode = off\n\
                 mon warn on pool no redundancy = false\n\
                 mon data avail crit = 0\n\
                 mon data avail warn = 0\n\
                 run dir = {dd}/run\n\
                 admin socket = {dd}/run/$name.asok\n\
                 log file = {dd}/log/$name.log\n\
                 pid file = {dd}/run/$name.pid\n\
                 mon data = {dd}/mon/$cluster-$id\n\
                 osd data = {dd}/osd/$cluster-$id\n\
                 [client.rgw.a]\n\
                 rgw frontends = beast endpoint=127.0.0.1:{rgw_port}\n\
                 rgw data = {dd}/rgw\n\
                 ms mon client mode = crc\n"
            ),
        )
        .unwrap();
        let mut ceph = Ceph {
            dir,
            conf,
            daemons: Vec::new(),
            rgw_port,
        };
        let monmap = d.join("monmap");
        let addv = format!("[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]");
        common::run(
            "monmaptool",
            &[
                "--create",
                "--fsid",
                fsid,
                "--addv",
                "a",
                &addv,
                monmap.to_str().unwrap(),
            ],
        )
        .ok();
        ceph.tool(
            "ceph-mon",
            &["--mkfs", "-i", "a", "--monmap", monmap.to_str().unwrap()],
        )
        .ok();
        ceph.spawn("mon", "ceph-mon", &["-i", "a", "-f"]);
        let limit = Duration::from_secs(60);
        wait_for(limit, "ceph-mon answering", || {
            ceph.exited("mon");
            ceph.tool("ceph", &["--connect-timeout", "5", "-s"])
                .success()
                .then_some(())
        });
        let uuid = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d";
        let id = ceph
            .tool("ceph", &["osd", "new", uuid])
            .ok()
            .stdout
            .trim()
            .to_string();
        std::fs::create_dir_all(d.join(format!("osd/ceph-{id}"))).unwrap();
        ceph.tool("ceph-osd", &["-i", &id, "--mkfs", "--osd-uuid", uuid])
            .ok();
        ceph.spawn("osd", "ceph-osd", &["-i", &id, "-f"]);
        wait_for(limit, "the OSD up", || {
            let o = ceph.tool("ceph", &["osd", "stat"]);
            o.stdout.contains("1 up").then_some(())
        });
        ceph.spawn("rgw", "radosgw", &["-n", "client.rgw.a", "-f"]);
        wait_for(Duration::from_secs(90), "radosgw listening", || {
            std::net::TcpStream::connect(("127.0.0.1", rgw_port))
                .ok()
                .map(drop)
        });
        ceph.tool(
            "radosgw-admin",
            &[
                "user",
                "create",
                "--uid=test",
                "--display-name=test",
                &format!("--access-key={KEY}"),
                &format!("--secret-key={SECRET}"),
            ],
        )
        .ok();
        ceph
    }

    /// Stop the gateway (by the PID we started), leaving the cluster up.
    pub fn stop_rgw(&mut self) {
        self.stop_daemon("rgw");
    }

    /// Stop one daemon (`mon`, `osd`, `rgw`) by the PID we started (SIGKILL).
    pub fn stop_daemon(&mut self, name: &str) {
        if let Some(i) = self.daemons.iter().position(|(n, _)| *n == name) {
            let (_, mut c) = self.daemons.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_rgw(&mut self) {
        self.spawn("rgw", "radosgw", &["-n", "client.rgw.a", "-f"]);
        let port = self.rgw_port;
        wait_for(Duration::from_secs(90), "radosgw listening again", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        });
    }

    /// The cluster's configuration file (for librados clients and the `rbd` tool).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.rgw_port)
    }

    /// Create a bucket (a signed PUT; object_store cannot create buckets).
    pub fn create_bucket(&self, bucket: &str) {
        let out = common::run(
            "curl",
            &[
                "-sS",
                "-f",
                "-X",
                "PUT",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                &format!("{KEY}:{SECRET}"),
                "-H",
                "x-amz-content-sha256:UNSIGNED-PAYLOAD",
                &format!("{}/{bucket}", self.endpoint()),
            ],
        );
        assert!(
            out.success(),
            "bucket create failed: {out}\n{}",
            self.logs()
        );
    }
}

impl Ceph {
    /// CPU time (user + system) each running daemon used so far (`mon`, `osd`, `rgw`), from
    /// /proc/PID/stat: what Ceph itself costs during a benchmark.
    pub fn daemon_cpu(&self) -> Vec<(&'static str, Duration)> {
        self.daemons
            .iter()
            .map(|(name, c)| (*name, common::process_cpu(c.id())))
            .collect()
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        // Gateway first, the monitor last; each by the PID we started.
        while let Some((_, mut c)) = self.daemons.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Write the gateway user's credentials as `dir/s3.cred` (the file an image's
/// `credentials_file: s3.cred` names).
pub fn write_credentials(dir: &Path) {
    std::fs::write(
        dir.join("s3.cred"),
        format!("access_key_id = {KEY}\nsecret_access_key = {SECRET}\n"),
    )
    .unwrap();
}
