//! Golden images in S3 (issue 13, first slice), end to end against a real object store: a
//! single-node Ceph (one monitor, one in-memory OSD, the RADOS gateway) started from Debian's
//! packages on 127.0.0.1 (../shared/RECIPES.md §7). `diskless image push` uploads an image,
//! `diskless serve` serves it, qemu-img and 20 concurrent raw initiators read it, and
//! `/metrics` shows that each chunk was fetched from S3 once. A corrupt chunk object reaches
//! the initiator as MEDIUM ERROR, never as data.

#[path = "common/ceph.rs"]
mod ceph;
mod common;
#[path = "common/faultproxy.rs"]
mod faultproxy;
#[path = "common/http.rs"]
mod http;
#[path = "common/raw.rs"]
mod raw;

use ceph::{Ceph, KEY, SECRET};
use common::{Config, Server};
use http::Api;
use object_store::ObjectStoreExt;
use raw::Client;
use std::path::Path;
use std::process::Command;

const TARGET: &str = "iqn.2026-12.test:s3boot";
const MIB: usize = 1 << 20;

fn config(dir: &Path, ceph: &Ceph) -> String {
    ceph::write_credentials(dir);
    format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{reboot_gap_secs: 1, nop_in_interval_secs: 0}}\n\
         api: {{listen: \"127.0.0.1:0\"}}\n\
         chunk_cache: {{memory: 64MiB, disk: 64MiB}}\n\
         images:\n\
         \x20 - name: golden\n    s3: {{endpoint: \"{ep}\", bucket: golden, prefix: diskless, version: v1, credentials_file: s3.cred, timeout_secs: 5, retries: 1}}\n\
         \x20 - name: broken\n    s3: {{endpoint: \"{ep}\", bucket: golden, prefix: diskless, version: v1, credentials_file: s3.cred, timeout_secs: 5, retries: 1}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      bindings:\n\
         \x20       - {{initiator: \"iqn.2026-12.test:broken-*\", image: broken, mode: volatile}}\n\
         \x20     default: {{image: golden, mode: volatile}}\n",
        state = dir.join("state").display(),
        ep = ceph.endpoint(),
    )
}

fn diskless(args: &[&str]) -> common::Output {
    let bin = env!("CARGO_BIN_EXE_diskless");
    let out = Command::new(bin).args(args).output().unwrap();
    common::Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        cmdline: format!("diskless {}", args.join(" ")),
    }
}

/// A sample value of `/metrics` (first line starting with `name`).
fn metric(api: &Api, name: &str) -> Option<f64> {
    let m = api.get("/metrics");
    m.body
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn an_image_in_ceph_rgw_is_served_fetched_once_and_checked() {
    let mut ceph = Ceph::start();
    ceph.create_bucket("golden");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 8 MiB of data with one all-zero MiB (not stored), in 1 MiB chunks: 7 objects.
    let mut data = common::random_bytes(8 * MIB, 13);
    data[3 * MIB..4 * MIB].fill(0);
    std::fs::write(d.join("golden.raw"), &data).unwrap();
    let yaml = config(d, &ceph);
    std::fs::write(d.join("push.yaml"), &yaml).unwrap();
    diskless(&["check-config", "-c", d.join("push.yaml").to_str().unwrap()]).ok();
    let push = |image: &str| {
        diskless(&[
            "image",
            "push",
            d.join("golden.raw").to_str().unwrap(),
            "--config",
            d.join("push.yaml").to_str().unwrap(),
            "--image",
            image,
            "--chunk-size",
            "1MiB",
        ])
    };
    let t = std::time::Instant::now();
    let out = push("golden").ok();
    eprintln!(
        "figure: push of 8 MiB (7 chunks of 1 MiB) took {:?}",
        t.elapsed()
    );
    assert!(out.stdout.contains("7 stored"), "{out}");
    // Versions are immutable: a second push of v1 is refused.
    let again = push("golden").failed();
    assert!(again.stderr.contains("already exists"), "{again}");
    // A second image whose chunk 5 object is then corrupted in the bucket.
    push("broken").ok();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(ceph.endpoint())
        .with_bucket_name("golden")
        .with_region("us-east-1")
        .with_access_key_id(KEY)
        .with_secret_access_key(SECRET)
        .with_allow_http(true)
        .build()
        .unwrap();
    let mut bad = data[5 * MIB..6 * MIB].to_vec();
    bad[12345] ^= 0x40;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store.put(
        &object_store::path::Path::from("diskless/broken/v1/chunks/00000005"),
        bad.into(),
    ))
    .unwrap();

    let server = Server::start(d, &Config::yaml(&yaml));
    let api = Api {
        base: server.api_url(),
        token: None,
    };
    let fetches = "diskless_s3_chunk_fetches_total{version=\"golden/diskless/golden/v1\"}";
    assert_eq!(
        metric(&api, fetches),
        Some(0.0),
        "nothing fetched before a read"
    );

    // A cold storm: 20 raw initiators read the whole disk at once, 64 KiB per command.
    let port = server.port;
    let t = std::time::Instant::now();
    let clients: Vec<_> = (0..20u16)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                c.isid = [0x00, 0x02, 0x3d, 0x00, 0x00, i as u8 + 1];
                c.login(&format!("iqn.2026-12.test:storm-{i}"), TARGET)
                    .unwrap_or_else(|e| panic!("login {i}: {e:?}"));
                let mut seen = Vec::with_capacity(8 * MIB);
                for lba in (0..(8 * MIB / 512) as u32).step_by(128) {
                    seen.extend_from_slice(&c.read10(lba, 128));
                }
                seen
            })
        })
        .collect();
    for (i, t) in clients.into_iter().enumerate() {
        let seen = t.join().unwrap_or_else(|_| panic!("client {i} failed"));
        assert!(seen == data, "client {i} read different bytes");
    }
    eprintln!(
        "figure: cold storm, 20 clients x 8 MiB (160 MiB served) took {:?}",
        t.elapsed()
    );
    assert_eq!(
        metric(&api, fetches),
        Some(7.0),
        "20 clients: each stored chunk fetched once"
    );

    // A real client: qemu-img reads the whole disk through its iSCSI driver.
    common::require_tool("qemu-img");
    let out_file = d.join("read.raw");
    common::run(
        "qemu-img",
        &[
            "convert", "--image-opts",
            &format!(
                "driver=iscsi,transport=tcp,portal={},target={TARGET},lun=0,initiator-name=iqn.2026-12.test:qemu",
                server.portal()
            ),
            "-O", "raw", out_file.to_str().unwrap(),
        ],
    )
    .ok();
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "qemu-img read different bytes"
    );
    assert_eq!(metric(&api, fetches), Some(7.0), "served from the cache");
    assert!(metric(&api, "diskless_chunk_cache_hits_total{tier=\"memory\"}").unwrap_or(0.0) > 0.0);

    // The corrupt chunk: MEDIUM ERROR (sense key 3, UNRECOVERED READ ERROR 11/00), no data.
    let mut c = Client::connect(server.port);
    c.login("iqn.2026-12.test:broken-1", TARGET).unwrap();
    assert_eq!(c.read10(0, 8), data[..4096], "intact chunks still serve");
    let lba = (5 * MIB / 512) as u32;
    let r = c.run(&raw::read10_cdb(lba, 8), 4096, None);
    assert_eq!(r.status, 2, "CHECK CONDITION expected: {r:?}");
    assert_eq!(
        r.sense.get(2).map(|k| k & 0x0f),
        Some(3),
        "MEDIUM ERROR: {r:?}"
    );
    assert_eq!(
        r.sense.get(12),
        Some(&0x11),
        "UNRECOVERED READ ERROR: {r:?}"
    );
    let bad_version = "diskless_s3_checksum_errors_total{version=\"golden/diskless/broken/v1\"}";
    assert!(metric(&api, bad_version).unwrap_or(0.0) >= 1.0);
    assert!(server.stderr().contains("checksum mismatch"), "logged");

    // The store unreachable: cached chunks still serve; an uncached one fails after its
    // retries with MEDIUM ERROR (nothing cached); once the store is back it serves.
    ceph.stop_rgw();
    let mut g = Client::connect(server.port);
    g.login("iqn.2026-12.test:during-outage", TARGET).unwrap();
    assert!(
        g.read10(0, 128) == data[..64 << 10],
        "cached chunks serve during the outage"
    );
    let lba6 = (6 * MIB / 512) as u32;
    let t = std::time::Instant::now();
    let r = c.run(&raw::read10_cdb(lba6, 8), 4096, None);
    assert_eq!(
        r.status, 2,
        "CHECK CONDITION expected while S3 is down: {r:?}"
    );
    assert_eq!(
        r.sense.get(2).map(|k| k & 0x0f),
        Some(3),
        "MEDIUM ERROR: {r:?}"
    );
    eprintln!(
        "figure: uncached read with the store down failed after {:?}",
        t.elapsed()
    );
    ceph.start_rgw();
    assert_eq!(c.read10(lba6, 8), data[6 * MIB..6 * MIB + 4096]);
    drop((c, g));
    server.stop();

    faults_between_the_node_and_the_store(&d.join("proxied"), &ceph, &data);
    drop(ceph);
}

/// READ(10) of 8 blocks at the start of 1 MiB chunk `chunk`.
fn read_chunk(c: &mut Client, chunk: usize) -> raw::ScsiResult {
    c.run(&raw::read10_cdb((chunk * MIB / 512) as u32, 8), 4096, None)
}

/// CHECK CONDITION, MEDIUM ERROR / UNRECOVERED READ ERROR (03/11/00).
fn assert_medium_error(r: &raw::ScsiResult, what: &str) {
    assert_eq!(r.status, 2, "{what}: CHECK CONDITION expected: {r:?}");
    assert_eq!(r.sense_triplet(), Some((3, 0x11, 0)), "{what}: {r:?}");
}

/// A second server reads the same version through a fault-injecting proxy in front of the
/// gateway (tests/common/faultproxy.rs), faults on chunk objects only: 503s and stalls that
/// the retries absorb are invisible to the initiator; ones that outlast them give MEDIUM
/// ERROR within the bounded time (never a hang, never other bytes); nothing bad is cached,
/// and cached chunks keep serving while a fetch is stalled.
fn faults_between_the_node_and_the_store(dir: &Path, ceph: &Ceph, data: &[u8]) {
    use faultproxy::{FaultProxy, Faults};
    use std::time::{Duration, Instant};
    std::fs::create_dir_all(dir).unwrap();
    ceph::write_credentials(dir);
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", ceph.rgw_port), "/chunks/");
    let yaml = format!(
        "portals: [\"127.0.0.1:0\"]\n\
         state_dir: {state}\n\
         settings: {{nop_in_interval_secs: 0}}\n\
         api: {{listen: \"127.0.0.1:0\"}}\n\
         chunk_cache: {{memory: 64MiB, disk: 0}}\n\
         images:\n\
         \x20 - name: golden\n    s3: {{endpoint: \"{ep}\", bucket: golden, prefix: diskless, version: v1, credentials_file: s3.cred, timeout_secs: 1, retries: 2}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: golden, mode: volatile}}\n",
        state = dir.join("state").display(),
        ep = proxy.endpoint(),
    );
    let server = Server::start(dir, &Config::yaml(&yaml));
    let api = Api {
        base: server.api_url(),
        token: None,
    };
    let m = |name: &str| {
        metric(
            &api,
            &format!("diskless_s3_{name}_total{{version=\"golden/diskless/golden/v1\"}}"),
        )
        .unwrap_or(0.0) as u64
    };
    let mut c = Client::connect(server.port);
    c.login("iqn.2026-12.test:proxied-1", TARGET).unwrap();
    let block = |chunk: usize| &data[chunk * MIB..chunk * MIB + 4096];

    // Two 503s, then the store answers: the third attempt serves, the initiator sees GOOD.
    proxy.set(Faults {
        fail_next: 2,
        ..Faults::default()
    });
    let r = read_chunk(&mut c, 0);
    assert_eq!(r.status, 0, "two 503s are retried: {r:?}");
    assert_eq!(r.data, block(0));
    assert_eq!(proxy.seen().failed, 2);
    assert_eq!(m("failed_attempts"), 2);
    assert_eq!(m("read_errors"), 0);
    let log = server.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("S3 read failed; retrying") && l.contains("503")),
        "the 503 is logged with the retry: {log}"
    );

    // 503 for good: the read fails after 1 + 2 attempts, MEDIUM ERROR, nothing cached; once
    // the store answers again the same read serves the right bytes.
    proxy.set(Faults {
        fail_all: true,
        ..Faults::default()
    });
    let t = Instant::now();
    assert_medium_error(&read_chunk(&mut c, 1), "503 on every attempt");
    let failed_after = t.elapsed();
    assert_eq!(proxy.seen().failed, 5, "1 + retries attempts");
    assert_eq!(m("read_errors"), 1);
    let log = server.stderr();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("S3 read failed after its retries")
            && l.contains("chunk=1")
            && l.contains("503")),
        "the final failure is logged with its cause: {log}"
    );
    proxy.set(Faults::default());
    let r = read_chunk(&mut c, 1);
    assert_eq!(r.status, 0, "served once the store is back: {r:?}");
    assert_eq!(r.data, block(1));

    // A stall longer than timeout_secs on the first attempt: timed out, retried, served.
    proxy.set(Faults {
        delay_next: 1,
        delay: Duration::from_secs(3),
        ..Faults::default()
    });
    let r = read_chunk(&mut c, 2);
    assert_eq!(r.status, 0, "a stalled attempt is retried: {r:?}");
    assert_eq!(r.data, block(2));
    assert!(
        server
            .stderr()
            .lines()
            .any(|l| l.contains("S3 read failed; retrying") && l.contains("chunks/00000002")),
        "the stalled attempt is logged with the retry: {}",
        server.stderr()
    );

    // Every attempt stalls: MEDIUM ERROR after about (1 + retries) x timeout + backoff, and
    // meanwhile another initiator's read of a cached chunk is served at once.
    proxy.set(Faults {
        delay_all: true,
        delay: Duration::from_secs(3),
        ..Faults::default()
    });
    let port = server.port;
    let t = Instant::now();
    let stalled = std::thread::spawn(move || {
        let r = read_chunk(&mut c, 4);
        (c, r, t.elapsed())
    });
    let mut g = Client::connect(port);
    g.login("iqn.2026-12.test:proxied-2", TARGET).unwrap();
    wait_for_stall(&proxy, 1);
    let t_cached = Instant::now();
    assert_eq!(
        g.read10(0, 8),
        block(0),
        "a cached chunk during a stalled fetch"
    );
    let cached = t_cached.elapsed();
    let (mut c, r, stalled_for) = stalled.join().expect("stalled read");
    assert_medium_error(&r, "every attempt stalled");
    assert!(
        stalled_for >= Duration::from_secs(3) && stalled_for < Duration::from_secs(10),
        "bounded by 3 x timeout_secs + backoff: {stalled_for:?}"
    );
    assert!(
        cached < Duration::from_secs(1),
        "cached read took {cached:?}"
    );
    assert!(
        server
            .stderr()
            .lines()
            .any(|l| l.contains("S3 read failed after its retries") && l.contains("chunk=4")),
        "the final failure is logged: {}",
        server.stderr()
    );
    proxy.set(Faults::default());
    let r = read_chunk(&mut c, 4);
    assert_eq!(r.status, 0, "served once the store is fast again: {r:?}");
    assert_eq!(r.data, block(4));
    eprintln!(
        "figure: through the fault proxy: 503 x3 -> MEDIUM ERROR after {failed_after:?}; every attempt stalled -> MEDIUM ERROR after {stalled_for:?} (timeout_secs 1, retries 2); a cached read meanwhile {cached:?}; proxy saw {:?}",
        proxy.seen()
    );
    drop((c, g));
    server.stop();
}

/// Until the proxy holds more than `before` delayed requests (a stalled fetch has started).
fn wait_for_stall(proxy: &faultproxy::FaultProxy, before: usize) {
    http::wait_for(
        std::time::Duration::from_secs(10),
        "a stalled request at the proxy",
        || (proxy.seen().delayed > before).then_some(()),
    );
}
