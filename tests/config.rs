//! targets.yaml, the registry as a login `Directory`, and the `diskless` binary's
//! configuration commands.
use diskless::config::{Config, ConfigError};
use diskless::login::{AuthPolicy, Directory, TargetLookup};
use diskless::registry::{self, Registry};
use diskless::scsi::LunTable;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

mod common;
use common::check_config;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_err(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "targets.yaml", text);
    match Config::load(&p) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            let s = e.to_string();
            assert!(s.starts_with(&format!("{}: ", p.display())), "{s}");
            s
        }
    }
}

/// A registry whose LUN tables are empty (the Directory does not need LUs).
fn directory(text: &str, dir: &Path) -> Registry {
    let p = write(dir, "targets.yaml", text);
    let c = Config::load(&p).unwrap();
    Registry::from_plan(registry::plan(&c).unwrap(), |_, _| {
        Ok(Arc::new(LunTable::new(BTreeMap::new())))
    })
    .unwrap()
}

const TWO_TARGETS: &str = r#"
portals: ["0.0.0.0:3260", "[::]:3260", "192.0.2.7:3270"]
targets:
  - name: iqn.2026-11.org.diskless:public
    luns: [{lun: 0, image: images/pub.img, create_size: 1MiB}]
  - name: iqn.2026-11.org.diskless:ipxe-only
    alias: boot
    initiators: ["iqn.2010-04.org.ipxe:*", "iqn.2026-11.org.example:lab-??"]
    chap: {user: boot, secret: twelve-bytes}
    luns:
      - {lun: 0, image: images/boot.img, create_size: 1MiB, read_only: true}
      - {lun: 1, image: images/scratch.img, create_size: 8MiB, block_size: 4096}
"#;

#[test]
fn bad_yaml_is_a_parse_error_with_location() {
    let e = load_err("targets: [\n  - name: x\n");
    assert!(e.contains("line"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "t.yaml", "portals: [\"0.0.0.0:3260\"\n");
    assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
    assert!(matches!(
        Config::load(&dir.path().join("missing.yaml")),
        Err(ConfigError::Read { .. })
    ));
}

#[test]
fn unknown_keys_are_errors() {
    let e = load_err("portal: [\"0.0.0.0:3260\"]\n");
    assert!(e.contains("unknown field `portal`"), "{e}");
    let e = load_err("settings: {nop_interval: 3}\n");
    assert!(e.contains("unknown field `nop_interval`"), "{e}");
    let e = load_err(&TWO_TARGETS.replace("alias: boot", "alias: boot\n    acl: []"));
    assert!(
        e.contains("targets[1]: unknown field `acl`") && e.contains("line 8"),
        "{e}"
    );
}

#[test]
fn missing_image_names_the_lun() {
    let e = load_err(
        "targets:\n  - name: iqn.2026-11.org.x:y\n    luns:\n      - {lun: 0, image: /a.img, create_size: 1M}\n      - {lun: 1, image: /no/such.img}\n",
    );
    assert!(
        e.ends_with(
            "targets[0].luns[1]: image /no/such.img does not exist (set create_size to create it)"
        ),
        "{e}"
    );
}

#[test]
fn duplicate_lun_and_target() {
    let e = load_err(&TWO_TARGETS.replace("- {lun: 1,", "- {lun: 0,"));
    assert!(e.contains("targets[1].luns[1]: duplicate LUN 0"), "{e}");
    let e = load_err(&TWO_TARGETS.replace("diskless:ipxe-only", "diskless:public"));
    assert!(e.contains("targets[1].name: duplicate target name"), "{e}");
}

#[test]
fn short_secret_is_rejected_without_echoing_it() {
    let e = load_err(&TWO_TARGETS.replace("twelve-bytes", "eleven-byte"));
    assert!(
        e.contains("targets[1].chap: chap secret is 11 bytes"),
        "{e}"
    );
    assert!(!e.contains("eleven-byte"), "{e}");
}

#[test]
fn relative_images_resolve_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "targets.yaml", TWO_TARGETS);
    let c = Config::load(&p).unwrap();
    let plan = registry::plan(&c).unwrap();
    assert_eq!(
        plan.targets[0].luns[0].image,
        dir.path().join("images/pub.img")
    );
    // Opening creates the sparse images (and their directory).
    let store = registry::open_store(&c.source, "x", &plan.targets[1].luns[1]).unwrap();
    use diskless::storage::BlockStore;
    assert_eq!((store.size(), store.block_size()), (8 << 20, 4096));
    assert!(dir.path().join("images/scratch.img").exists());
}

#[test]
fn glob_acls() {
    let dir = tempfile::tempdir().unwrap();
    let r = directory(TWO_TARGETS, dir.path());
    let t = "iqn.2026-11.org.diskless:ipxe-only";
    let allowed = |i: &str| matches!(r.lookup(i, t), TargetLookup::Allowed(_));
    assert!(allowed("iqn.2010-04.org.ipxe:52540012abcd"));
    assert!(allowed("iqn.2026-11.org.example:lab-07"));
    assert!(!allowed("iqn.2026-11.org.example:lab-100"));
    assert!(!allowed("iqn.1994-05.com.redhat:client"));
    assert_eq!(
        r.lookup("iqn.1994-05.com.redhat:client", t),
        TargetLookup::NotAuthorized
    );
    assert_eq!(
        r.lookup(
            "iqn.1994-05.com.redhat:client",
            "iqn.2026-11.org.diskless:nope"
        ),
        TargetLookup::NotFound
    );
    match r.lookup("iqn.2010-04.org.ipxe:x", t) {
        TargetLookup::Allowed(AuthPolicy::Chap(c)) => {
            assert_eq!(c.user, "boot");
            assert_eq!(c.secret, "twelve-bytes");
            assert!(c.mutual.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.discovery_auth("anyone"), AuthPolicy::None);
    assert_eq!(r.target_alias(t).as_deref(), Some("boot"));
}

#[test]
fn visible_targets_are_filtered_by_acl() {
    let dir = tempfile::tempdir().unwrap();
    let r = directory(TWO_TARGETS, dir.path());
    let local: SocketAddr = "10.0.0.1:3260".parse().unwrap();
    let names = |i: &str| -> Vec<String> {
        r.visible_targets(i, local)
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    assert_eq!(
        names("iqn.1994-05.com.redhat:client"),
        vec!["iqn.2026-11.org.diskless:public"]
    );
    assert_eq!(
        names("iqn.2010-04.org.ipxe:x"),
        vec![
            "iqn.2026-11.org.diskless:public",
            "iqn.2026-11.org.diskless:ipxe-only"
        ]
    );
}

#[test]
fn wildcard_portals_report_the_local_address() {
    let dir = tempfile::tempdir().unwrap();
    let r = directory(TWO_TARGETS, dir.path());
    let v4 = r.visible_targets("x", "10.0.0.1:3260".parse().unwrap());
    // 0.0.0.0 and [::] both become the address the initiator reached (listed once); each
    // configured portal is its own portal group, tagged by its place in `portals`.
    assert_eq!(v4[0].addresses, vec!["10.0.0.1:3260,1", "192.0.2.7:3270,3"]);
    let v6 = r.visible_targets("x", "[2001:db8::5]:3260".parse().unwrap());
    assert_eq!(
        v6[0].addresses,
        vec!["[2001:db8::5]:3260,1", "192.0.2.7:3270,3"]
    );
    assert_eq!(r.portal_group_tag("10.0.0.1:3260".parse().unwrap()), 1);
}

#[test]
fn shipped_targets_yaml_is_valid() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("targets.yaml");
    let c = Config::load(&p).unwrap();
    assert_eq!(c.targets.len(), 2);
    assert_eq!(c.targets[0].name, "iqn.2026-11.org.diskless:demo");
    assert_eq!(c.targets[1].name, "iqn.2026-11.org.diskless:boot");
    assert!(c.targets[1]
        .boot
        .as_ref()
        .is_some_and(|b| b.default.is_some()));
    assert_eq!(c.images[0].create_size.map(|s| s.0), Some(64 << 20));
    assert_eq!(
        c.targets[0].luns[0].create_size.map(|s| s.0),
        Some(64 << 20)
    );
    assert_eq!(c.portal_addrs(), vec!["0.0.0.0:3260".parse().unwrap()]);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diskless"))
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.yaml", TWO_TARGETS);
    let out = check_config(&good).ok();
    let stdout = &out.stdout;
    assert!(
        stdout.contains("iqn.2026-11.org.diskless:ipxe-only"),
        "{stdout}"
    );
    assert!(stdout.contains("CHAP (user boot)"), "{stdout}");
    assert!(!stdout.contains("twelve-bytes"), "secret printed: {stdout}");

    let bad = write(
        dir.path(),
        "bad.yaml",
        &TWO_TARGETS.replace("lun: 1", "lun: 20000"),
    );
    let out = check_config(&bad);
    assert_eq!(out.code, Some(2), "{out}");
    let stderr = &out.stderr;
    assert!(
        stderr.contains("targets[1].luns[1]: LUN 20000 is above 16383"),
        "{stderr}"
    );

    let out = check_config(&dir.path().join("none.yaml"));
    assert_eq!(out.code, Some(2), "{out}");

    let out = bin().args(["check-config", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_with_bad_config_exits_2_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.yaml", "targets: 7\n");
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--image"])
        .arg(dir.path().join("missing.img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn image_create_is_sparse_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let out = bin()
        .args(["image", "create"])
        .arg(&img)
        .args(["--size", "64MiB"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 64 << 20, "image is not sparse");
    let out = bin()
        .args(["image", "create"])
        .arg(&img)
        .args(["--size", "1MiB"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    let out = bin()
        .args(["image", "create"])
        .arg(dir.path().join("x.img"))
        .args(["--size", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = bin()
        .args(["image", "create"])
        .arg(dir.path().join("y.img"))
        .args(["--size", "big"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// End to end through the binary: quick mode binds, announces the real port, and serves.
/// Needs the SCSI layer's `LogicalUnit::new` (a `todo!()` until the branches are merged).
#[test]
fn serve_quick_mode_announces_the_bound_port() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("quick.img");
    diskless::storage::FileStore::create(&img, 1 << 20).unwrap();
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--image"])
        .arg(&img)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("diskless: listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .unwrap();
    assert_ne!(addr.port(), 0);
    assert!(std::net::TcpStream::connect(addr).is_ok());
    // SIGTERM ends the server cleanly.
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn serve_with_port_in_use_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("busy.img");
    diskless::storage::FileStore::create(&img, 1 << 20).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = bin()
        .args(["serve", "--listen", &addr, "--image"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
}

/// `images[].s3`: checked by check-config (endpoint, bucket, keys, credentials) without
/// contacting the store, and the credentials are never printed.
#[test]
fn s3_images_are_validated_and_their_credentials_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s3.cred",
        "# test\naccess_key_id = AKIAEXAMPLEKEYID\nsecret_access_key = very-secret-value-0123\n",
    );
    let good = |s3: &str, extra: &str| {
        format!(
            "images:\n  - name: golden\n    s3: {{{s3}}}\n{extra}\
             targets:\n  - name: iqn.2026-12.test:t\n    boot:\n      default: {{image: golden, mode: volatile}}\n"
        )
    };
    let base = "endpoint: \"http://127.0.0.1:7480\", bucket: golden-images, version: v1, credentials_file: s3.cred";
    let p = write(
        dir.path(),
        "targets.yaml",
        &good(base, "chunk_cache: {memory: 32MiB, disk: 1GiB}\n"),
    );
    let out = check_config(&p);
    let text = out.all();
    assert!(out.success(), "{text}");
    assert!(
        text.contains("golden: s3 http://127.0.0.1:7480 bucket golden-images key /golden/v1"),
        "{text}"
    );
    assert!(
        !text.contains("very-secret") && !text.contains("AKIAEXAMPLE"),
        "{text}"
    );

    let cases = [
        ("endpoint: \"ftp://x\", bucket: golden-images, version: v1, credentials_file: s3.cred", "https:// or http://"),
        ("endpoint: \"http://x\", bucket: Golden_Images, version: v1, credentials_file: s3.cred", "not a valid bucket name"),
        ("endpoint: \"http://x\", bucket: golden-images, version: \"../v1\", credentials_file: s3.cred", "version"),
        ("endpoint: \"http://x\", bucket: golden-images, credentials_file: s3.cred", "needs version"),
        ("endpoint: \"http://x\", bucket: golden-images, version: v1, channel: test, credentials_file: s3.cred", "give one"),
        ("endpoint: \"http://x\", bucket: golden-images, channel: latest, credentials_file: s3.cred", "not latest"),
        // Pointers follow the cluster's catalogue: no cluster, no pointer.
        ("endpoint: \"http://x\", bucket: golden-images, version: latest, credentials_file: s3.cred", "need cluster:"),
        ("endpoint: \"http://x\", bucket: golden-images, version: v1, credentials_file: missing.cred", "missing.cred"),
        ("endpoint: \"http://x\", bucket: golden-images, version: v1, credentials_file: s3.cred, timeout_secs: 0", "timeout_secs"),
        ("endpoint: \"http://x\", bucket: golden-images, version: v1, credentials_file: s3.cred, retries: 99", "retries"),
    ];
    for (s3, want) in cases {
        let p = write(dir.path(), "bad.yaml", &good(s3, ""));
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("images[0].s3") && e.contains(want), "{s3}: {e}");
        assert!(!e.contains("very-secret"), "{e}");
    }
    // A bad credentials file names the line, not the value.
    write(
        dir.path(),
        "bad.cred",
        "access_key_id = A\nsecret = very-secret-value-0123\n",
    );
    let p = write(
        dir.path(),
        "bad.yaml",
        &good("endpoint: \"http://x\", bucket: golden-images, version: v1, credentials_file: bad.cred", ""),
    );
    let e = Config::load(&p).unwrap_err().to_string();
    assert!(e.contains("line 2") && !e.contains("very-secret"), "{e}");
    // An image is a file or an object, not both; and an object is never written (direct).
    let p = write(
        dir.path(),
        "bad.yaml",
        &format!(
            "images:\n  - name: golden\n    path: g.img\n    s3: {{{base}}}\n\
             targets:\n  - name: iqn.2026-12.test:t\n    boot:\n      default: {{image: golden, mode: volatile}}\n"
        ),
    );
    let e = Config::load(&p).unwrap_err().to_string();
    assert!(e.contains("either a path or s3"), "{e}");
    let p = write(
        dir.path(),
        "bad.yaml",
        &good(base, "").replace("mode: volatile", "mode: direct"),
    );
    let e = Config::load(&p).unwrap_err().to_string();
    assert!(e.contains("direct is not possible"), "{e}");
}

/// `rbd:` is checked by check-config on any build; a build without the cargo feature `rbd`
/// refuses to serve it (exit 2, with the reason) instead of serving node-local disks.
#[cfg(not(feature = "rbd"))]
#[test]
fn rbd_disks_need_a_build_with_the_rbd_feature() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ceph.conf", "[global]\n");
    let cfg = write(
        dir.path(),
        "targets.yaml",
        "portals: [\"127.0.0.1:0\"]\n\
         cluster: {name: lab, node_id: n1, etcd: [\"http://127.0.0.1:9\"], advertise: \"127.0.0.1:3260\"}\n\
         rbd: {pool: diskless, conf: ceph.conf}\n\
         images:\n  - {name: g, path: g.img, create_size: 1MiB, rbd: {parent: g@v1}}\n\
         targets:\n  - name: iqn.2026-12.org.diskless:rbd\n    boot: {default: {image: g, mode: persistent}}\n",
    );
    check_config(&cfg).ok();
    let out = bin().args(["serve", "-c"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no Ceph RBD support"), "{err}");
}
