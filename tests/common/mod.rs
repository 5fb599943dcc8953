//! Shared helpers for the integration tests that drive real iSCSI clients (libiscsi's tools,
//! qemu-img, tcpdump) against our own binary.
//!
//! A test writes a config with [`Config`], starts the server with [`Server::start`] (it binds
//! `127.0.0.1:0` and we read the port from its stdout), runs clients with [`run`] (every client
//! is killed after [`CLIENT_TIMEOUT`] and the test fails), and the [`Server`] guard stops the
//! process when dropped. A missing client tool fails the test with the package to install:
//! nothing is skipped silently.
#![allow(dead_code)] // each test binary uses a different subset

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The initiator name every client uses unless a test says otherwise.
pub const INITIATOR: &str = "iqn.2026-11.test:init1";
/// A client that has not finished after this long has hung: kill it and fail.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Configuration (targets.yaml)
// ---------------------------------------------------------------------------------------------

/// CHAP credentials; `mutual_*` set means the initiator also authenticates the target.
#[derive(Clone, Debug)]
pub struct Chap {
    pub user: String,
    pub secret: String,
    pub mutual: Option<(String, String)>,
}

impl Chap {
    pub fn one_way(user: &str, secret: &str) -> Self {
        Chap {
            user: user.into(),
            secret: secret.into(),
            mutual: None,
        }
    }
    pub fn mutual(user: &str, secret: &str, tuser: &str, tsecret: &str) -> Self {
        Chap {
            user: user.into(),
            secret: secret.into(),
            mutual: Some((tuser.into(), tsecret.into())),
        }
    }
    fn yaml(&self) -> String {
        let mut s = format!("{{user: {}, secret: {}", q(&self.user), q(&self.secret));
        if let Some((u, p)) = &self.mutual {
            let _ = write!(s, ", mutual_user: {}, mutual_secret: {}", q(u), q(p));
        }
        s.push('}');
        s
    }
}

/// One logical unit backed by an image file.
#[derive(Clone, Debug)]
pub struct Lun {
    pub lun: u64,
    pub image: PathBuf,
    pub read_only: bool,
    pub block_size: u32,
    pub thin: bool,
    pub removable: bool,
}

impl Lun {
    /// A writable, thin, removable 512-byte-block LUN: the defaults the conformance run uses.
    pub fn new(lun: u64, image: &Path) -> Self {
        Lun {
            lun,
            image: image.to_path_buf(),
            read_only: false,
            block_size: 512,
            thin: true,
            removable: true,
        }
    }
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    pub fn block_size(mut self, bs: u32) -> Self {
        self.block_size = bs;
        self
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub initiators: Vec<String>,
    pub chap: Option<Chap>,
    pub luns: Vec<Lun>,
}

impl Target {
    /// A target open to every initiator ("*"), without CHAP.
    pub fn new(name: &str, luns: Vec<Lun>) -> Self {
        Target {
            name: name.into(),
            initiators: vec!["*".into()],
            chap: None,
            luns,
        }
    }
    pub fn initiators(mut self, globs: &[&str]) -> Self {
        self.initiators = globs.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn chap(mut self, chap: Chap) -> Self {
        self.chap = Some(chap);
        self
    }
}

#[derive(Clone, Debug, Default)]
pub struct Config {
    pub targets: Vec<Target>,
    pub discovery_chap: Option<Chap>,
    /// A whole configuration written as is (boot targets and the like).
    pub raw: Option<String>,
}

/// YAML double-quoted scalar (paths and secrets may hold characters YAML treats specially).
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Config {
    pub fn new(targets: Vec<Target>) -> Self {
        Config {
            targets,
            discovery_chap: None,
            raw: None,
        }
    }
    /// A configuration given as YAML text (its portals are overridden by `--listen`).
    pub fn yaml(text: &str) -> Self {
        Config {
            targets: Vec::new(),
            discovery_chap: None,
            raw: Some(text.to_string()),
        }
    }
    pub fn discovery_chap(mut self, chap: Chap) -> Self {
        self.discovery_chap = Some(chap);
        self
    }

    /// The config in the planned targets.yaml format.
    pub fn to_yaml(&self) -> String {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let mut y = String::from("portals: [\"127.0.0.1:0\"]\ntargets:\n");
        for t in &self.targets {
            let inits: Vec<String> = t.initiators.iter().map(|i| q(i)).collect();
            let _ = writeln!(y, "  - name: {}", q(&t.name));
            let _ = writeln!(y, "    initiators: [{}]", inits.join(", "));
            if let Some(c) = &t.chap {
                let _ = writeln!(y, "    chap: {}", c.yaml());
            }
            y.push_str("    luns:\n");
            for l in &t.luns {
                let _ = writeln!(
                    y,
                    "      - {{lun: {}, image: {}, read_only: {}, block_size: {}, thin: {}, removable: {}}}",
                    l.lun,
                    q(&l.image.to_string_lossy()),
                    l.read_only,
                    l.block_size,
                    l.thin,
                    l.removable
                );
            }
        }
        if let Some(c) = &self.discovery_chap {
            let _ = write!(y, "discovery:\n  chap: {}\n", c.yaml());
        }
        y
    }
}

/// Create a sparse image file of `size` bytes.
/// Where a boot script from 127.0.0.1 sends its client: the initiator name it sets and the
/// port of its `sanboot` portal (a cluster node's own or another node's).
pub fn script_placement(script: &str) -> (String, u16) {
    let initiator = script
        .lines()
        .find_map(|l| l.strip_prefix("set initiator-iqn "))
        .unwrap_or_else(|| panic!("no initiator in {script}"))
        .to_string();
    let port = script
        .lines()
        .find_map(|l| {
            // One disk: `sanboot URI`; several: LUN 0 is `sanhook --drive 0x80 URI`.
            l.strip_prefix("sanboot iscsi:127.0.0.1::")
                .or_else(|| l.strip_prefix("sanhook --drive 0x80 iscsi:127.0.0.1::"))
        })
        .and_then(|rest| rest.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no sanboot portal in {script}"));
    (initiator, port)
}

/// A TCP port free on 127.0.0.1 now (for a server told its port in advance).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sparse_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// `len` bytes of pseudo-random data (no dependency on `rand` from tests: xorshift is plenty).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

/// A running `diskless serve`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub config_path: PathBuf,
    stderr_path: PathBuf,
    /// What the server printed before its listening line (e.g. `diskless: api on ...`).
    pub early_lines: Vec<String>,
}

impl Server {
    /// Write `cfg` into `dir`/targets.yaml, start the binary on 127.0.0.1:0 and wait for
    /// `diskless: listening on 127.0.0.1:PORT`.
    pub fn start(dir: &Path, cfg: &Config) -> Server {
        // DISKLESS_TEST_BIN points the tests at another build (for example a release binary).
        let bin = std::env::var_os("DISKLESS_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_diskless")));
        Self::start_with(&bin, dir, cfg)
    }

    /// [`Server::start`] with an explicit binary.
    pub fn start_with(bin: &Path, dir: &Path, cfg: &Config) -> Server {
        Self::spawn(bin, dir, cfg, true)
    }

    /// Start on two ports the configuration names (`make(iscsi, http)`: a cluster node
    /// advertises its own portal, so it cannot listen on port 0). Ports are picked free but
    /// another process may bind one before the server does: then the server exits with
    /// EADDRINUSE and it is started again on other ports. Returns the server and its ports.
    pub fn start_on_free_ports(
        dir: &Path,
        make: impl Fn(u16, u16) -> Config,
    ) -> (Server, u16, u16) {
        let bin = std::env::var_os("DISKLESS_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_diskless")));
        let mut last = String::new();
        for _ in 0..5 {
            let (iscsi, http) = (free_port(), free_port());
            match Self::try_spawn(&bin, dir, &make(iscsi, http), false) {
                Ok(server) => {
                    assert_eq!(server.port, iscsi);
                    return (server, iscsi, http);
                }
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("five starts on fresh ports all found a port taken; last: {last}")
    }

    fn spawn(bin: &Path, dir: &Path, cfg: &Config, listen_anywhere: bool) -> Server {
        Self::try_spawn(bin, dir, cfg, listen_anywhere).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start the server; Err: it exited or stayed silent before its listening line (the
    /// message has its stderr).
    fn try_spawn(
        bin: &Path,
        dir: &Path,
        cfg: &Config,
        listen_anywhere: bool,
    ) -> Result<Server, String> {
        let config_path = dir.join("targets.yaml");
        std::fs::write(&config_path, cfg.to_yaml()).unwrap();
        let stderr_path = dir.join("server.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("-c").arg(&config_path);
        if listen_anywhere {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));

        // A reader thread forwards stdout lines and keeps draining the pipe afterwards so the
        // server never blocks on a full pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child: Some(child),
            port: 0,
            config_path,
            stderr_path,
            early_lines: Vec::new(),
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(port) = parse_listening_line(&line) {
                        server.port = port;
                        return Ok(server);
                    }
                    server.early_lines.push(line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.child.as_mut().and_then(|c| wait_timeout(c, Duration::from_secs(5)));
                    return Err(format!(
                        "{} exited ({status:?}) before printing 'diskless: listening on 127.0.0.1:PORT'; stderr:\n{}",
                        bin.display(),
                        server.stderr()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} did not print 'diskless: listening on 127.0.0.1:PORT' within {:?}; stderr:\n{}",
                        bin.display(),
                        STARTUP_TIMEOUT,
                        server.stderr()
                    ))
                }
            }
        }
    }

    /// The operator API's base URL (`http://127.0.0.1:PORT/`, from `diskless: api on ...`).
    pub fn api_url(&self) -> String {
        self.early_lines
            .iter()
            .find_map(|l| l.strip_prefix("diskless: api on "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("the server printed no api line: {:?}", self.early_lines))
    }

    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// `iscsi://127.0.0.1:PORT` (discovery URL for iscsi-ls).
    pub fn portal_url(&self) -> String {
        format!("iscsi://127.0.0.1:{}", self.port)
    }
    /// `iscsi://127.0.0.1:PORT/IQN/LUN`.
    pub fn url(&self, iqn: &str, lun: u64) -> String {
        format!("iscsi://127.0.0.1:{}/{}/{}", self.port, iqn, lun)
    }
    /// The URL with one-way CHAP credentials in libiscsi's `user%secret@` form.
    pub fn chap_url(&self, iqn: &str, lun: u64, user: &str, secret: &str) -> String {
        format!(
            "iscsi://{}%{}@127.0.0.1:{}/{}/{}",
            user, secret, self.port, iqn, lun
        )
    }
    /// QEMU `--image-opts` string for a LUN, optionally forcing a header digest.
    pub fn qemu_opts(&self, iqn: &str, lun: u64, header_digest: Option<&str>) -> String {
        let mut s = format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name=iqn.2026-11.test:qemu",
            self.portal(),
            iqn,
            lun
        );
        if let Some(d) = header_digest {
            let _ = write!(s, ",header-digest={d}");
        }
        s
    }

    /// What the server wrote to stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Stop with SIGTERM and wait (the server must flush and exit on its own within 10 s).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then wait up to `limit` for the exit (None: still running).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        signal(child, libc::SIGTERM);
        wait_timeout(child, limit)
    }

    /// SIGKILL: the crash of the server process, nothing flushed or closed.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(10));
        match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "diskless did not exit within 10 s of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `diskless: listening on 127.0.0.1:PORT` -> PORT.
pub fn parse_listening_line(line: &str) -> Option<u16> {
    let rest = line.trim().strip_prefix("diskless: listening on ")?;
    let addr: std::net::SocketAddr = rest.split_whitespace().next()?.parse().ok()?;
    Some(addr.port())
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child we own and have not yet reaped.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Client tools
// ---------------------------------------------------------------------------------------------

/// The Debian package that ships a client tool.
pub fn package_for(tool: &str) -> &'static str {
    match tool {
        "iscsi-ls" | "iscsi-inq" | "iscsi-readcapacity16" | "iscsi-test-cu" => "libiscsi-bin",
        "qemu-img" => "qemu-utils (Debian 12's 7.2) and qemu-block-extra",
        "tcpdump" => "tcpdump",
        "tgtd" | "tgtadm" => "tgt",
        "cmp" => "diffutils",
        _ => "?",
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// iPXE's ISID (IANA format, enterprise 0x002723) with a qualifier.
pub fn firmware_isid(q: u16) -> [u8; 6] {
    [0x40, 0x00, 0x27, 0x23, (q >> 8) as u8, q as u8]
}

/// open-iscsi's ISID (OUI format 00:02:3d) with a qualifier.
pub fn os_isid(q: u16) -> [u8; 6] {
    [0x00, 0x02, 0x3d, 0x00, (q >> 8) as u8, q as u8]
}

/// Publish a client's disk with `diskless client commit` while no server runs (the offline
/// path: the configuration names the state directory); fails the test with its stderr.
pub fn commit_offline(config: &Path, initiator: &str, out: &Path) {
    let done = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["client", "commit", initiator])
        .arg(out)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "client commit: {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// A browser test script (tests/browser/*.mjs) run by node in tests/browser: it prints
/// `STEP <name>` lines when it has seen something and reads a line on stdin before each
/// next stage. Killed when dropped.
pub struct Browser {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// The script's other stdout lines so far.
    pub seen: Vec<String>,
    started: Instant,
    limit: Duration,
}

impl Browser {
    /// Start `tests/browser/SCRIPT` with `env`; the whole run must end within `limit`.
    pub fn start(
        script: &str,
        env: &[(&str, &dyn AsRef<std::ffi::OsStr>)],
        limit: Duration,
    ) -> Browser {
        let dir = repo().join("tests/browser");
        let mut cmd = Command::new("node");
        cmd.arg(dir.join(script)).current_dir(&dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let stdout = child.stdout.take().expect("node stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Browser {
            child,
            lines,
            seen: Vec::new(),
            started: Instant::now(),
            limit,
        }
    }

    /// Wait for `STEP <step>`; panics with the script's output if it does not come in time.
    pub fn expect(&mut self, step: &str) {
        let want = format!("STEP {step}");
        loop {
            let left = self.limit.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == want => return,
                Ok(l) => self.seen.push(l),
                Err(_) => {
                    let _ = self.child.kill();
                    let (_, err) = self.finish();
                    panic!(
                        "the browser never reached step {step:?} (stdout {:?}); its stderr:\n{err}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Write `line` to the script's stdin.
    pub fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("browser stdin");
        writeln!(stdin, "{line}").expect("write to the browser script");
    }

    /// Wait for the script to end: its exit status and stderr.
    pub fn finish(&mut self) -> (ExitStatus, String) {
        let status = self.child.wait().expect("node exit");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The browser tests (tests/console.rs, tests/cluster_api.rs) need node, Debian's chromium
/// and playwright-core from `npm ci` in tests/browser: fail, never skip, without them.
pub fn require_browser_tools() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node not found: install the Debian package nodejs (scripts/test.sh does it as root)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium not found: install the Debian package chromium (scripts/test.sh does it as root)"
    );
    assert!(
        repo()
            .join("tests/browser/node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed: run `npm ci` in tests/browser (scripts/test.sh does it)"
    );
}

/// The repository (for scripts/ and fixtures).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<target dir>/boot-cache`: downloaded .debs, built images, the saved boot capture.
pub fn boot_cache() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("boot-cache")
}

/// Fail (never skip) when a tool or a file (an absolute path) is missing, naming its Debian
/// package.
pub fn require(what: &str, package: &str) {
    let found = if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        find_in_path(what).is_some()
    };
    assert!(
        found,
        "'{what}' not found: install the Debian package {package} (scripts/test.sh does it as root)"
    );
}

/// Fail the test (never skip) when a client tool is missing.
pub fn require_tool(tool: &str) {
    if find_in_path(tool).is_none() {
        panic!(
            "required client tool '{tool}' not found: install the Debian package {} (scripts/test.sh does it when run as root)",
            package_for(tool)
        );
    }
    if tool == "qemu-img" && !qemu_img_opens_iscsi() {
        panic!(
            "qemu-img cannot open iSCSI images (no iSCSI block driver): install Debian's qemu-utils and qemu-block-extra of one version (scripts/test.sh does it as root)"
        );
    }
}

/// Whether qemu-img really has a working iSCSI driver, judged by what it does (its --help
/// lists "iscsi" even when the driver module is missing): opening a portal nobody listens on
/// fails to connect with the driver, and with "Unknown driver" without it.
fn qemu_img_opens_iscsi() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(out) = Command::new("qemu-img")
            .args([
                "info",
                "--image-opts",
                "driver=iscsi,transport=tcp,portal=127.0.0.1:1,target=iqn.2026-11.org.diskless:probe,lun=0",
            ])
            .stdin(Stdio::null())
            .output()
        else {
            return false;
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .to_ascii_lowercase();
        !["unknown driver", "unable to load module", "unknown protocol", "not whitelisted"]
            .iter()
            .any(|m| text.contains(m))
            && (text.contains("iscsi") || text.contains("connect"))
    })
}

/// What a client printed and how it exited.
#[derive(Debug)]
pub struct Output {
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub cmdline: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    /// Panic with the whole transcript unless the client exited 0.
    pub fn ok(self) -> Self {
        assert!(self.success(), "client failed: {self}");
        self
    }
    /// Panic unless the client failed (non-zero exit).
    pub fn failed(self) -> Self {
        assert!(!self.success(), "client unexpectedly succeeded: {self}");
        self
    }
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

/// `diskless check-config -c PATH`: its output and exit status. The AWS variables of the
/// caller's environment are removed so an S3 image's credentials come from the file it names.
pub fn check_config(path: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_diskless"))
        .args(["check-config", "-c"])
        .arg(path)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run diskless check-config: {e}"));
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        cmdline: format!("diskless check-config -c {}", path.display()),
    }
}

/// Run a client with [`CLIENT_TIMEOUT`]; kill it and fail the test if it hangs.
pub fn run(tool: &str, args: &[&str]) -> Output {
    run_env(tool, args, &[])
}

/// Like [`run`], with extra environment variables. libiscsi's CHAP variables from the caller's
/// environment are removed so they cannot change a test's meaning.
pub fn run_env(tool: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    require_tool(tool);
    let cmdline = format!("{} {}", tool, args.join(" "));
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in [
        "LIBISCSI_CHAP_USERNAME",
        "LIBISCSI_CHAP_PASSWORD",
        "LIBISCSI_CHAP_TARGET_USERNAME",
        "LIBISCSI_CHAP_TARGET_PASSWORD",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
    let out_t = drain(child.stdout.take().unwrap());
    let err_t = drain(child.stderr.take().unwrap());
    let status = wait_timeout(&mut child, CLIENT_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let out = Output {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
        cmdline,
    };
    assert!(
        status.is_some(),
        "client hung for {CLIENT_TIMEOUT:?} and was killed: {out}"
    );
    out
}

fn drain<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The size `iscsi-ls -s` prints for a LUN: READ CAPACITY(10)'s last LBA times the block size,
/// divided by 1024 while above 1024 (libiscsi's own arithmetic, so 64 MiB shows as "63M").
pub fn iscsi_ls_size(size_bytes: u64, block_size: u64) -> String {
    let mut size = (size_bytes / block_size - 1) * block_size;
    let units = [' ', 'k', 'M', 'G', 'T'];
    let mut i = 0;
    while i < 4 && size > 1024 {
        size /= 1024;
        i += 1;
    }
    format!("{size}{}", units[i])
}

/// Value of `KEY:value` in the output of libiscsi's tools.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

// ---------------------------------------------------------------------------------------------
// Packet capture (to check what the target really negotiated)
// ---------------------------------------------------------------------------------------------

/// A running `tcpdump -i lo` writing a pcap file; stopped with [`Capture::finish`] or on drop.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    /// Start capturing TCP traffic to/from `port` on loopback (needs root: CAP_NET_RAW).
    pub fn start(dir: &Path, port: u16) -> Capture {
        require_tool("tcpdump");
        let file = dir.join(format!("capture-{port}.pcap"));
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-w"])
            .arg(&file)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // tcpdump says "listening on lo" once the capture is armed.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            let mut all = String::new();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
                if line.contains("listening on") {
                    let _ = tx.send(Ok(()));
                    for _ in lines.by_ref() {}
                    return;
                }
            }
            let _ = tx.send(Err(all));
        });
        let mut cap = Capture {
            child: Some(child),
            file,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => cap,
            Ok(Err(msg)) => {
                cap.kill();
                panic!("tcpdump failed to start (it needs root / CAP_NET_RAW):\n{msg}")
            }
            Err(_) => {
                cap.kill();
                panic!("tcpdump did not start capturing within 20 s")
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGINT);
            if wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Stop the capture (SIGINT flushes the file) and return the TCP payloads seen.
    pub fn finish(mut self) -> Vec<Segment> {
        // Let the last segments reach the capture before stopping it.
        thread::sleep(Duration::from_millis(300));
        self.kill();
        let data = std::fs::read(&self.file).unwrap();
        parse_pcap(&data)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One TCP segment's payload with its ports.
#[derive(Debug)]
pub struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

/// Minimal pcap reader: classic pcap, Ethernet (lo) or raw IPv4 link types, IPv4/TCP only.
pub fn parse_pcap(data: &[u8]) -> Vec<Segment> {
    let mut out = Vec::new();
    let u32le = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    let Some(magic) = u32le(data, 0) else {
        return out;
    };
    assert!(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        "not a little-endian pcap file (magic {magic:#x})"
    );
    let link = u32le(data, 20).unwrap_or(0);
    let mut off = 24;
    while let (Some(incl), true) = (u32le(data, off + 8), off + 16 <= data.len()) {
        let start = off + 16;
        let end = start + incl as usize;
        let Some(pkt) = data.get(start..end) else {
            break;
        };
        off = end;
        let ip = match link {
            1 if pkt.get(12..14) == Some(&[0x08, 0x00]) => &pkt[14..],
            101 | 228 => pkt,
            _ => continue,
        };
        let Some(&vihl) = ip.first() else { continue };
        if vihl >> 4 != 4 || ip.get(9) != Some(&6) {
            continue;
        }
        let ihl = usize::from(vihl & 0x0f) * 4;
        let total = ip
            .get(2..4)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .unwrap_or(0);
        let Some(tcp) = ip.get(ihl..total.min(ip.len())) else {
            continue;
        };
        if tcp.len() < 20 {
            continue;
        }
        let src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
        let doff = usize::from(tcp[12] >> 4) * 4;
        let payload = tcp.get(doff..).unwrap_or(&[]).to_vec();
        if !payload.is_empty() {
            out.push(Segment {
                src_port,
                dst_port,
                payload,
            });
        }
    }
    out
}

/// Every `KEY=value` text key the sender put in its segments (login text is NUL separated).
pub fn text_keys(segments: &[Segment], from_port: u16, key: &str) -> Vec<String> {
    let needle = format!("{key}=");
    let mut found = Vec::new();
    for s in segments.iter().filter(|s| s.src_port == from_port) {
        for piece in s.payload.split(|&b| b == 0) {
            let text = String::from_utf8_lossy(piece);
            if let Some(pos) = text.find(&needle) {
                found.push(text[pos + needle.len()..].to_string());
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// tgt, the reference target (to check that the harness itself catches a wrong target)
// ---------------------------------------------------------------------------------------------

/// A private tgtd on a loopback port with one target and one LUN (tgt puts a controller at
/// LUN 0, the disk is LUN 1), stopped by its PID on drop.
pub struct Tgt {
    child: Option<Child>,
    ctl: u16,
    pub port: u16,
    pub iqn: String,
}

impl Tgt {
    pub fn start(image: &Path, iqn: &str) -> Tgt {
        require_tool("tgtd");
        require_tool("tgtadm");
        for _ in 0..20 {
            // tgtd cannot bind port 0: take a port the kernel just handed out, then give it to tgtd.
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            // A private control port, so a tgtd already running here is left alone.
            let ctl = 1000 + (port % 8000);
            if Path::new(&format!("/var/run/tgtd/socket.{ctl}")).exists() {
                continue;
            }
            let child = Command::new("tgtd")
                .args(["-f", "-C", &ctl.to_string(), "--iscsi"])
                .arg(format!("portal=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut tgt = Tgt {
                child: Some(child),
                ctl,
                port,
                iqn: iqn.to_string(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Some(c) = tgt.child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        break; // lost the port or the control socket: try another
                    }
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    tgt.admin(&["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn]);
                    let img = image.to_string_lossy();
                    tgt.admin(&[
                        "--op",
                        "new",
                        "--mode",
                        "logicalunit",
                        "--tid",
                        "1",
                        "--lun",
                        "1",
                        "-b",
                        &img,
                    ]);
                    tgt.admin(&[
                        "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
                    ]);
                    return tgt;
                }
                thread::sleep(Duration::from_millis(50));
            }
            tgt.stop();
        }
        panic!("tgtd did not start on a loopback port");
    }

    fn admin(&self, args: &[&str]) {
        let ctl = self.ctl.to_string();
        let mut all = vec!["-C", ctl.as_str(), "--lld", "iscsi"];
        all.extend_from_slice(args);
        run("tgtadm", &all).ok();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // tgtd ignores SIGTERM while it has targets: delete them, then stop it.
            let ctl = self.ctl.to_string();
            for args in [
                &[
                    "--lld", "iscsi", "--mode", "target", "--op", "delete", "--force", "--tid", "1",
                ][..],
                &["--mode", "system", "--op", "delete"][..],
            ] {
                let _ = Command::new("tgtadm")
                    .arg("-C")
                    .arg(&ctl)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time (user + system) process `pid` used so far, from /proc/PID/stat (zero once it is
/// gone).
#[allow(dead_code)] // only the benchmarks that count a daemon's CPU call it
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}
