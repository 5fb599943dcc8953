//! End-to-end tests: our binary serves scratch images and real initiators talk to it.
//!
//! Clients: libiscsi's `iscsi-ls`, `iscsi-inq`, `iscsi-readcapacity16` (Debian libiscsi-bin),
//! `qemu-img` with its iSCSI block driver, and `tcpdump` to check what was negotiated. A missing
//! tool fails the test with the package to install; `scripts/test.sh` installs them as root.

mod common;

use common::*;
use std::path::Path;

const DISK1: &str = "iqn.2026-11.test:disk1";
const DISK4K: &str = "iqn.2026-11.test:disk4k";
const MIB: u64 = 1024 * 1024;
/// libiscsi's exit code when a login fails (for example "Authentication failure(513)").
const LOGIN_FAILED: Option<i32> = Some(10);

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A server with one target `DISK1` holding one 64 MiB, thin, removable, 512-byte LUN 0.
fn one_disk(dir: &Path) -> Server {
    let img = dir.join("disk1.img");
    sparse_image(&img, 64 * MIB);
    Server::start(
        dir,
        &Config::new(vec![Target::new(DISK1, vec![Lun::new(0, &img)])]),
    )
}

/// The lines of `iscsi-ls` output that belong to one target (its Target: line and its Lun: lines).
fn target_block<'a>(listing: &'a str, iqn: &str) -> Vec<&'a str> {
    let head = format!("Target:{iqn} ");
    let mut lines = listing.lines().skip_while(|l| !l.starts_with(&head));
    let mut block: Vec<&str> = lines.next().into_iter().collect();
    block.extend(lines.take_while(|l| !l.starts_with("Target:")));
    block
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// `cmp -n LEN a b` (the byte-exact comparison the README promises).
fn cmp_prefix(a: &Path, b: &Path, len: u64) {
    run(
        "cmp",
        &[
            "-n",
            &len.to_string(),
            &a.to_string_lossy(),
            &b.to_string_lossy(),
        ],
    )
    .ok();
}

// ---------------------------------------------------------------------------------------------
// Discovery (SendTargets, RFC 7143 section 4.3 / appendix C)
// ---------------------------------------------------------------------------------------------

#[test]
fn discovery_lists_every_target_with_its_portal() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_image(&a, 16 * MIB);
    sparse_image(&b, 16 * MIB);
    let srv = Server::start(
        dir.path(),
        &Config::new(vec![
            Target::new(DISK1, vec![Lun::new(0, &a)]),
            Target::new("iqn.2026-11.test:disk2", vec![Lun::new(0, &b)]),
        ]),
    );
    let out = run("iscsi-ls", &["-i", INITIATOR, &srv.portal_url()]).ok();
    for iqn in [DISK1, "iqn.2026-11.test:disk2"] {
        // The portal must be the address really bound, not the configured port 0.
        let want = format!("Target:{iqn} Portal:127.0.0.1:{},", srv.port);
        assert!(out.stdout.contains(&want), "missing `{want}` in: {out}");
    }
}

#[test]
fn discovery_shows_luns_and_sizes() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_image(&a, 64 * MIB);
    sparse_image(&b, 32 * MIB);
    let srv = Server::start(
        dir.path(),
        &Config::new(vec![
            Target::new(DISK1, vec![Lun::new(0, &a)]),
            Target::new(DISK4K, vec![Lun::new(0, &b).block_size(4096)]),
        ]),
    );
    let out = run("iscsi-ls", &["-i", INITIATOR, "-s", &srv.portal_url()]).ok();
    for (iqn, size, bs) in [(DISK1, 64 * MIB, 512), (DISK4K, 32 * MIB, 4096)] {
        let block = target_block(&out.stdout, iqn);
        let want = format!("(Size:{})", iscsi_ls_size(size, bs));
        assert!(
            block.iter().any(|l| l.starts_with("Lun:0 ")
                && l.contains("Type:DIRECT_ACCESS")
                && l.contains(&want)),
            "target {iqn}: no `Lun:0 ... DIRECT_ACCESS {want}` line in: {out}"
        );
    }
}

#[test]
fn discovery_hides_targets_the_initiator_may_not_use() {
    let dir = tempdir();
    let imgs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("{i}.img")))
        .collect();
    for i in &imgs {
        sparse_image(i, 8 * MIB);
    }
    let open = "iqn.2026-11.test:open";
    let mine = "iqn.2026-11.test:mine";
    let hidden = "iqn.2026-11.test:hidden";
    let srv = Server::start(
        dir.path(),
        &Config::new(vec![
            Target::new(open, vec![Lun::new(0, &imgs[0])]),
            Target::new(mine, vec![Lun::new(0, &imgs[1])]).initiators(&["iqn.2026-11.test:init*"]),
            Target::new(hidden, vec![Lun::new(0, &imgs[2])])
                .initiators(&["iqn.2026-11.test:other*"]),
        ]),
    );
    let out = run("iscsi-ls", &["-i", INITIATOR, &srv.portal_url()]).ok();
    assert!(out.stdout.contains(&format!("Target:{open} ")), "{out}");
    assert!(
        out.stdout.contains(&format!("Target:{mine} ")),
        "glob match must be listed: {out}"
    );
    assert!(
        !out.stdout.contains(hidden),
        "a target that excludes the initiator was listed: {out}"
    );
    // And it refuses the login itself (RFC 7143 10.13.5: Status-Class 2, authorization failure).
    run("iscsi-inq", &["-i", INITIATOR, &srv.url(hidden, 0)]).failed();
    // The allowed initiator can log in.
    run(
        "iscsi-inq",
        &["-i", "iqn.2026-11.test:other-1", &srv.url(hidden, 0)],
    )
    .ok();
}

#[test]
fn discovery_chap_right_and_wrong() {
    let dir = tempdir();
    let img = dir.path().join("d.img");
    sparse_image(&img, 8 * MIB);
    let srv = Server::start(
        dir.path(),
        &Config::new(vec![Target::new(DISK1, vec![Lun::new(0, &img)])])
            .discovery_chap(Chap::one_way("disc", "discsecret1234")),
    );
    let good = format!("iscsi://disc%discsecret1234@127.0.0.1:{}", srv.port);
    let out = run("iscsi-ls", &["-i", INITIATOR, &good]).ok();
    assert!(out.stdout.contains(&format!("Target:{DISK1} ")), "{out}");

    let bad = format!("iscsi://disc%wrongsecret9999@127.0.0.1:{}", srv.port);
    let out = run("iscsi-ls", &["-i", INITIATOR, &bad]).failed();
    assert!(
        !out.stdout.contains("Target:"),
        "targets listed with a wrong secret: {out}"
    );

    let out = run("iscsi-ls", &["-i", INITIATOR, &srv.portal_url()]).failed();
    assert!(
        !out.stdout.contains("Target:"),
        "targets listed without CHAP: {out}"
    );
}

// ---------------------------------------------------------------------------------------------
// INQUIRY and VPD pages (SPC-4 6.6, 7.8; SBC-3 6.6)
// ---------------------------------------------------------------------------------------------

#[test]
fn inquiry_standard_data() {
    let dir = tempdir();
    let srv = one_disk(dir.path());
    let out = run("iscsi-inq", &["-i", INITIATOR, &srv.url(DISK1, 0)]).ok();
    let s = &out.stdout;
    assert_eq!(field(s, "Peripheral Qualifier"), Some("CONNECTED"), "{out}");
    assert_eq!(
        field(s, "Peripheral Device Type"),
        Some("DIRECT_ACCESS"),
        "{out}"
    );
    assert_eq!(
        field(s, "Removable"),
        Some("1"),
        "LUN is configured removable: {out}"
    );
    assert!(field(s, "Vendor").is_some_and(|v| !v.is_empty()), "{out}");
    assert!(field(s, "Product").is_some_and(|v| !v.is_empty()), "{out}");
    assert_eq!(field(s, "CmdQue"), Some("1"), "{out}");
}

#[test]
fn inquiry_every_vpd_page() {
    let dir = tempdir();
    let srv = one_disk(dir.path());
    let url = srv.url(DISK1, 0);
    // iscsi-inq's -c takes the page code in DECIMAL.
    let page = |code: u8| {
        run(
            "iscsi-inq",
            &["-i", INITIATOR, "-e", "1", "-c", &code.to_string(), &url],
        )
        .ok()
    };

    let out = page(0x00);
    for p in ["0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"] {
        assert!(
            out.stdout.contains(&format!("Page:{p} ")),
            "Supported VPD pages lacks {p}: {out}"
        );
    }
    let out = page(0x80);
    let serial = field(&out.stdout, "Unit Serial Number").unwrap_or("");
    assert!(
        !serial
            .trim_matches(|c| c == '[' || c == ']' || c == ' ')
            .is_empty(),
        "empty serial: {out}"
    );
    let out = page(0x83);
    assert!(out.stdout.contains("DEVICE_IDENTIFICATION"), "{out}");
    assert!(
        out.stdout.contains("DEVICE DESIGNATOR #0"),
        "no designator: {out}"
    );
    assert!(
        out.stdout.contains("Association:(0) LOGICAL_UNIT"),
        "no LU designator: {out}"
    );
    let out = page(0xb0);
    assert!(
        field(&out.stdout, "maximum transfer length").is_some(),
        "{out}"
    );
    let out = page(0xb1);
    assert!(
        field(&out.stdout, "Medium Rotation Rate").is_some(),
        "{out}"
    );
    let out = page(0xb2);
    // SBC-3 6.6.4: a thin-provisioned LU reports provisioning type 010b and supports UNMAP.
    assert_eq!(
        field(&out.stdout, "provisioning type"),
        Some("2"),
        "thin LUN: {out}"
    );
    assert_eq!(
        field(&out.stdout, "lbpu"),
        Some("1"),
        "thin LUN should support UNMAP: {out}"
    );
}

#[test]
fn readcapacity16_reports_size_and_block_size() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_image(&a, 64 * MIB);
    sparse_image(&b, 32 * MIB);
    let srv = Server::start(
        dir.path(),
        &Config::new(vec![Target::new(
            DISK1,
            vec![Lun::new(0, &a), Lun::new(1, &b).block_size(4096)],
        )]),
    );
    for (lun, size, bs) in [(0, 64 * MIB, 512u64), (1, 32 * MIB, 4096)] {
        let out = run(
            "iscsi-readcapacity16",
            &["-i", INITIATOR, &srv.url(DISK1, lun)],
        )
        .ok();
        let s = &out.stdout;
        assert_eq!(
            field(s, "RETURNED LOGICAL BLOCK ADDRESS"),
            Some((size / bs - 1).to_string().as_str()),
            "{out}"
        );
        assert_eq!(
            field(s, "LOGICAL BLOCK LENGTH IN BYTES"),
            Some(bs.to_string().as_str()),
            "{out}"
        );
        assert_eq!(
            field(s, "Total size"),
            Some(size.to_string().as_str()),
            "{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Data path with qemu-img
// ---------------------------------------------------------------------------------------------

/// Write 4 MiB of random data onto the LUN at `url` with qemu-img, read the LUN back, `cmp`.
fn check_qemu_round_trip(dir: &Path, url: &str, seed: u64) {
    let src = dir.join("random.bin");
    let back = dir.join("back.img");
    write_file(&src, &random_bytes(4 * MIB as usize, seed));
    let (s, b) = (src.to_string_lossy(), back.to_string_lossy());
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &s, url],
    )
    .ok();
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", url, &b]).ok();
    cmp_prefix(&src, &back, 4 * MIB);
}

/// The same through `--image-opts` with `header-digest=crc32c`, capturing the traffic to check
/// that the target really agreed to CRC32C (a successful login alone does not prove it).
fn check_header_digest(dir: &Path, port: u16, opts: &str, seed: u64) {
    let src = dir.join("random-digest.bin");
    let back = dir.join("back-digest.img");
    write_file(&src, &random_bytes(4 * MIB as usize, seed));
    let cap = Capture::start(dir, port);
    let (s, b) = (src.to_string_lossy(), back.to_string_lossy());
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            &s,
            opts,
        ],
    )
    .ok();
    run(
        "qemu-img",
        &["convert", "--image-opts", opts, "-O", "raw", &b],
    )
    .ok();
    let segments = cap.finish();
    cmp_prefix(&src, &back, 4 * MIB);
    // RFC 7143 13.1 / 6.2: the answer must be a value the initiator offered; QEMU offered only
    // CRC32C, so every answer must be CRC32C.
    let answers = text_keys(&segments, port, "HeaderDigest");
    assert!(
        !answers.is_empty(),
        "no HeaderDigest answer from the target in the capture"
    );
    assert!(
        answers.iter().all(|a| a == "CRC32C"),
        "target answered HeaderDigest={answers:?}"
    );
}

#[test]
fn qemu_img_writes_and_reads_back() {
    let dir = tempdir();
    let srv = one_disk(dir.path());
    check_qemu_round_trip(dir.path(), &srv.url(DISK1, 0), 1);
    let back = dir.path().join("back.img");
    assert_eq!(
        std::fs::metadata(&back).unwrap().len(),
        64 * MIB,
        "read-back size"
    );
}

#[test]
fn qemu_img_with_header_digest_crc32c() {
    let dir = tempdir();
    let srv = one_disk(dir.path());
    // QEMU is the only client here that can force a digest: it offers HeaderDigest=CRC32C only.
    check_header_digest(
        dir.path(),
        srv.port,
        &srv.qemu_opts(DISK1, 0, Some("crc32c")),
        2,
    );
}

#[test]
fn read_only_lun_refuses_qemu_img_writes() {
    let dir = tempdir();
    let img = dir.path().join("ro.img");
    let pattern = random_bytes(16 * MIB as usize, 3);
    write_file(&img, &pattern);
    let ro = "iqn.2026-11.test:ro";
    let srv = Server::start(
        dir.path(),
        &Config::new(vec![Target::new(ro, vec![Lun::new(0, &img).read_only()])]),
    );
    let src = dir.path().join("random.bin");
    write_file(&src, &random_bytes(MIB as usize, 4));
    let url = srv.url(ro, 0);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &src.to_string_lossy(),
            &url,
        ],
    )
    .failed();
    // Reading still works and shows the original bytes.
    let back = dir.path().join("back.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            &back.to_string_lossy(),
        ],
    )
    .ok();
    cmp_prefix(&img, &back, 16 * MIB);
    drop(srv);
    assert!(
        std::fs::read(&img).unwrap() == pattern,
        "read-only image was modified"
    );
}

#[test]
fn written_bytes_are_in_the_image_after_stop() {
    let dir = tempdir();
    let srv = one_disk(dir.path());
    let data = random_bytes(4 * MIB as usize, 5);
    let src = dir.path().join("random.bin");
    write_file(&src, &data);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &src.to_string_lossy(),
            &srv.url(DISK1, 0),
        ],
    )
    .ok();
    let stderr_log = srv.stderr();
    let status = srv.stop();
    assert!(
        status.success(),
        "diskless exited with {status} after SIGTERM; stderr:\n{stderr_log}"
    );
    let img = std::fs::read(dir.path().join("disk1.img")).unwrap();
    assert_eq!(img.len() as u64, 64 * MIB, "image size changed");
    assert!(
        img[..data.len()] == data[..],
        "image file does not hold the written bytes"
    );
    assert!(
        img[data.len()..].iter().all(|&b| b == 0),
        "bytes beyond the write changed"
    );
}

// ---------------------------------------------------------------------------------------------
// CHAP (RFC 7143 section 12.1.3)
// ---------------------------------------------------------------------------------------------

fn chap_server(dir: &Path, chap: Chap) -> Server {
    let img = dir.join("c.img");
    sparse_image(&img, 8 * MIB);
    Server::start(
        dir,
        &Config::new(vec![Target::new(DISK1, vec![Lun::new(0, &img)]).chap(chap)]),
    )
}

fn assert_auth_failure(out: Output) {
    assert_eq!(out.code, LOGIN_FAILED, "expected a login failure: {out}");
}

#[test]
fn chap_one_way() {
    let dir = tempdir();
    let srv = chap_server(dir.path(), Chap::one_way("u", "secretsecret12"));
    run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &srv.chap_url(DISK1, 0, "u", "secretsecret12"),
        ],
    )
    .ok();

    let out = run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &srv.chap_url(DISK1, 0, "u", "wrongsecret123"),
        ],
    );
    assert!(out.all().contains("Authentication failure"), "{out}");
    assert_auth_failure(out);
    let out = run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &srv.chap_url(DISK1, 0, "nobody", "secretsecret12"),
        ],
    );
    assert_auth_failure(out);
    // No credentials at all: the target must not fall back to AuthMethod=None.
    assert_auth_failure(run("iscsi-inq", &["-i", INITIATOR, &srv.url(DISK1, 0)]));
    // The same through libiscsi's environment variables.
    run_env(
        "iscsi-inq",
        &["-i", INITIATOR, &srv.url(DISK1, 0)],
        &[
            ("LIBISCSI_CHAP_USERNAME", "u"),
            ("LIBISCSI_CHAP_PASSWORD", "secretsecret12"),
        ],
    )
    .ok();
}

#[test]
fn chap_mutual() {
    let dir = tempdir();
    let srv = chap_server(
        dir.path(),
        Chap::mutual("u", "secretsecret12", "tu", "tsecretsecret12"),
    );
    let url = |user: &str, secret: &str, tuser: &str, tsecret: &str| {
        format!(
            "{}?target_user={tuser}&target_password={tsecret}",
            srv.chap_url(DISK1, 0, user, secret)
        )
    };
    run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &url("u", "secretsecret12", "tu", "tsecretsecret12"),
        ],
    )
    .ok();
    // libiscsi checks the target's CHAP_R itself: a wrong target secret must fail the login.
    assert_auth_failure(run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &url("u", "secretsecret12", "tu", "wrongtsecret12"),
        ],
    ));
    let out = run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &url("u", "wrongsecret123", "tu", "tsecretsecret12"),
        ],
    );
    assert!(out.all().contains("Authentication failure"), "{out}");
    assert_auth_failure(out);
}

// ---------------------------------------------------------------------------------------------
// The same checks against tgt, the reference target, to validate the harness itself: what passes
// against diskless must pass against another target, and a check must catch a known wrong answer.
// ---------------------------------------------------------------------------------------------

mod reference {
    use super::*;

    /// tgt (Debian's reference target) with one 64 MiB scratch LUN.
    fn tgt(dir: &Path) -> (Tgt, String) {
        let img = dir.join("tgt.img");
        sparse_image(&img, 64 * MIB);
        let tgt = Tgt::start(&img, "iqn.2026-11.test:tgt-reference");
        let url = format!("iscsi://127.0.0.1:{}/{}/1", tgt.port, tgt.iqn);
        (tgt, url)
    }

    #[test]
    fn harness_round_trip_passes_against_tgt() {
        let dir = tempdir();
        let (_tgt, url) = tgt(dir.path());
        check_qemu_round_trip(dir.path(), &url, 11);
    }

    /// tgt answers HeaderDigest=None to a QEMU that offered only CRC32C (RFC 7143 §6.2 forbids
    /// an answer that was not offered): the digest check must catch it, or it proves nothing.
    #[test]
    fn harness_digest_check_catches_tgts_unoffered_answer() {
        let dir = tempdir();
        let (tgt, _) = tgt(dir.path());
        let opts = format!(
            "driver=iscsi,transport=tcp,portal=127.0.0.1:{},target={},lun=1,initiator-name=iqn.2026-11.test:qemu,header-digest=crc32c",
            tgt.port, tgt.iqn
        );
        let caught =
            std::panic::catch_unwind(|| check_header_digest(dir.path(), tgt.port, &opts, 12));
        let msg = match caught {
            Ok(()) => panic!(
                "the digest check passed against tgt, which answers a value QEMU did not offer"
            ),
            Err(e) => e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        };
        assert!(
            msg.contains("target answered HeaderDigest"),
            "the digest check failed for another reason: {msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The harness's own helpers (no server needed)
// ---------------------------------------------------------------------------------------------

mod harness_helpers {
    use super::common::*;

    #[test]
    fn listening_line_is_parsed() {
        assert_eq!(
            parse_listening_line("diskless: listening on 127.0.0.1:40123"),
            Some(40123)
        );
        assert_eq!(
            parse_listening_line("diskless: listening on 127.0.0.1:3260 (portal 1)"),
            Some(3260)
        );
        assert_eq!(parse_listening_line("something else"), None);
    }

    /// The Server guard against a stand-in that follows the planned CLI contract.
    #[test]
    fn server_guard_reads_port_and_stops() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-diskless");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = serve ] && [ \"$2\" = -c ] && [ -f \"$3\" ] || exit 3\n\
             trap 'exit 0' TERM\necho 'starting'\necho 'diskless: listening on 127.0.0.1:4321'\n\
             while :; do sleep 0.05; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let srv = Server::start_with(&fake, dir.path(), &Config::new(vec![]));
        assert_eq!(srv.port, 4321);
        assert_eq!(srv.url("iqn.x", 2), "iscsi://127.0.0.1:4321/iqn.x/2");
        assert!(srv.stop().success());
        // Dropping a running server must not hang either.
        let srv = Server::start_with(&fake, dir.path(), &Config::new(vec![]));
        drop(srv);
    }

    #[test]
    fn client_runner_reports_exit_codes() {
        let out = run("cmp", &["/dev/null", "/dev/null"]).ok();
        assert_eq!(out.code, Some(0));
        let out = run("cmp", &["/nonexistent-a", "/nonexistent-b"]).failed();
        assert_eq!(out.code, Some(2));
    }

    #[test]
    fn iscsi_ls_size_matches_libiscsi() {
        // Values seen from iscsi-ls -s against tgt.
        assert_eq!(iscsi_ls_size(64 * 1024 * 1024, 512), "63M");
        assert_eq!(iscsi_ls_size(32 * 1024 * 1024, 4096), "31M");
    }

    #[test]
    fn config_yaml_has_the_planned_shape() {
        let img = std::path::Path::new("/tmp/x y.img");
        let cfg = Config::new(vec![Target::new(
            "iqn.2026-11.test:a",
            vec![Lun::new(0, img).read_only()],
        )
        .chap(Chap::mutual("u", "s:ecret\"x", "tu", "ts"))])
        .discovery_chap(Chap::one_way("d", "ds"));
        let v: serde_yaml::Value = serde_yaml::from_str(&cfg.to_yaml()).unwrap();
        assert_eq!(v["portals"][0].as_str(), Some("127.0.0.1:0"));
        let t = &v["targets"][0];
        assert_eq!(t["name"].as_str(), Some("iqn.2026-11.test:a"));
        assert_eq!(t["initiators"][0].as_str(), Some("*"));
        assert_eq!(t["chap"]["secret"].as_str(), Some("s:ecret\"x"));
        assert_eq!(t["chap"]["mutual_user"].as_str(), Some("tu"));
        let l = &t["luns"][0];
        assert_eq!(l["image"].as_str(), Some("/tmp/x y.img"));
        assert_eq!(l["read_only"].as_bool(), Some(true));
        assert_eq!(l["block_size"].as_u64(), Some(512));
        assert_eq!(v["discovery"]["chap"]["user"].as_str(), Some("d"));
    }

    #[test]
    fn pcap_reader_finds_text_keys() {
        // One Ethernet/IPv4/TCP packet from port 3260 carrying login text.
        let payload = b"\x23\0\0\0HeaderDigest=CRC32C\0DataDigest=None\0";
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&3260u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp.extend_from_slice(payload);
        let mut ip = vec![
            0x45u8, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
        ];
        let total = (ip.len() + tcp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&tcp);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        let mut pcap = Vec::new();
        pcap.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        pcap.extend_from_slice(&[2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0, 0]);
        pcap.extend_from_slice(&[0u8; 8]);
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&frame);
        let segs = parse_pcap(&pcap);
        assert_eq!(segs.len(), 1);
        assert_eq!(
            text_keys(&segs, 3260, "HeaderDigest"),
            vec!["CRC32C".to_string()]
        );
        assert_eq!(
            text_keys(&segs, 3260, "DataDigest"),
            vec!["None".to_string()]
        );
        assert!(text_keys(&segs, 40000, "HeaderDigest").is_empty());
    }

    #[test]
    fn output_fields_are_parsed() {
        let s = "LOGICAL BLOCK LENGTH IN BYTES:4096\nTotal size:33554432\n";
        assert_eq!(field(s, "Total size"), Some("33554432"));
        assert_eq!(field(s, "LOGICAL BLOCK LENGTH IN BYTES"), Some("4096"));
        assert_eq!(field(s, "Missing"), None);
    }
}
