//! Fault injection: `kill -9` of the server at random moments while several clients stream
//! synced writes (FUA, or WRITE + SYNCHRONIZE CACHE) into their overlays; after each restart
//! every acknowledged write must be there, every overlay must pass its consistency check, and
//! the golden image must be byte-identical. Many rounds.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{Config, Server};
use raw::Client;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Per client: the writes it saw acknowledged (latest per LBA), and the one in flight.
type Acked = Arc<Vec<Mutex<Vec<(u32, u8)>>>>;
type Pending = Arc<Vec<Mutex<Option<(u32, u8)>>>>;

const TARGET: &str = "iqn.2026-11.org.diskless:crash";
const CLIENTS: usize = 4;
const ROUNDS: u32 = 12;

fn config(dir: &Path) -> Config {
    Config::yaml(&format!(
        "portals: [\"127.0.0.1:0\"]\nstate_dir: {}\nsettings: {{nop_in_interval_secs: 0}}\n\
         images:\n  - {{name: base, path: {}}}\n\
         targets:\n  - name: {TARGET}\n    boot:\n      default: {{image: base, mode: persistent}}\n",
        dir.join("state").display(),
        dir.join("golden.img").display()
    ))
}

fn isid(n: u32) -> [u8; 6] {
    [0x00, 0x02, 0x3d, 0x00, (n >> 8) as u8, n as u8]
}

/// A tiny deterministic generator (no extra crate for a test's coin flips).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let golden = common::random_bytes(8 << 20, 11);
    std::fs::write(dir.path().join("golden.img"), &golden).unwrap();
    let cfg = config(dir.path());
    // acked[c] = (lba, fill) of every write client c saw acknowledged, latest per LBA.
    let acked: Acked = Arc::new((0..CLIENTS).map(|_| Mutex::new(Vec::new())).collect());
    // The write each client had in flight (not acknowledged) when the server died: it may or
    // may not have landed, so either value is correct for its LBA.
    let pending: Pending = Arc::new((0..CLIENTS).map(|_| Mutex::new(None)).collect());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    // Client threads die with the connection when the server is killed: keep their panics
    // quiet, the checks below run on the main thread with the default hook back.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for round in 0..ROUNDS {
        let server = Server::start(dir.path(), &cfg);
        let port = server.port;
        // Verify what earlier rounds acknowledged, on each client's own disk.
        for (c, list) in acked.iter().enumerate() {
            let mut cl = Client::connect(port);
            cl.isid = isid(round * 100 + c as u32);
            cl.login(&format!("iqn.2026-11.test:crash-{c}"), TARGET)
                .unwrap();
            let inflight = pending[c].lock().unwrap().take();
            let mut list = list.lock().unwrap();
            if let Some((lba, fill)) = inflight {
                // Settle the in-flight write: whichever value is there now is the truth.
                if cl.read10(lba, 1) == vec![fill; 512] {
                    list.retain(|&(x, _)| x != lba);
                    list.push((lba, fill));
                }
            }
            for &(lba, fill) in list.iter() {
                let got = cl.read10(lba, 1);
                if got != vec![fill; 512] {
                    let _ = std::panic::take_hook();
                    std::panic::set_hook(default_hook);
                    panic!("round {round}: client {c} lost acknowledged write at LBA {lba}");
                }
            }
        }
        let threads: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let acked = acked.clone();
                let pending = pending.clone();
                let r = round;
                std::thread::spawn(move || {
                    let mut cl = Client::connect(port);
                    cl.isid = isid(r * 100 + 50 + c as u32);
                    if cl
                        .login(&format!("iqn.2026-11.test:crash-{c}"), TARGET)
                        .is_err()
                    {
                        return;
                    }
                    let mut i = 0u32;
                    loop {
                        let lba = 100 + (i * 7 + c as u32 * 3 + r * 11) % 4000;
                        let fill = ((r * 31 + i * 7 + c as u32) % 255 + 1) as u8;
                        *pending[c].lock().unwrap() = Some((lba, fill));
                        let ok = if i % 2 == 0 {
                            let mut cdb = raw::write10_cdb(lba, 1);
                            cdb[1] |= 0x08; // FUA
                            cl.run(&cdb, 512, Some(&[fill; 512])).status == 0
                        } else {
                            cl.run(&raw::write10_cdb(lba, 1), 512, Some(&[fill; 512]))
                                .status
                                == 0
                                && cl.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status == 0
                        };
                        if !ok {
                            return;
                        }
                        let mut l = acked[c].lock().unwrap();
                        l.retain(|&(x, _)| x != lba);
                        l.push((lba, fill));
                        *pending[c].lock().unwrap() = None;
                        i += 1;
                    }
                })
            })
            .collect();
        // Kill at a random moment 50..450 ms into the stream.
        std::thread::sleep(Duration::from_millis(50 + next(&mut seed) % 400));
        server.kill9();
        let deadline = Instant::now() + Duration::from_secs(30);
        for t in threads {
            let _ = t.join();
            assert!(Instant::now() < deadline, "client threads did not stop");
        }
    }
    std::panic::set_hook(default_hook);
    // Every overlay passes the offline consistency check.
    let clients_dir = dir.path().join("state/clients");
    let mut checked = 0;
    for t in std::fs::read_dir(&clients_dir).unwrap() {
        for c in std::fs::read_dir(t.unwrap().path()).unwrap() {
            for o in std::fs::read_dir(c.unwrap().path()).unwrap() {
                let o = o.unwrap().path();
                // Beside the overlay directory: the client's boot state (lifecycle.yaml).
                if !o.is_dir() {
                    continue;
                }
                let report = diskless::storage::Overlay::check(&o).unwrap();
                assert!(report.problems.is_empty(), "{}: {report:?}", o.display());
                checked += 1;
            }
        }
    }
    assert_eq!(checked, CLIENTS);
    // A last restart: everything acknowledged is there; the golden image never changed.
    let server = Server::start(dir.path(), &cfg);
    for (c, list) in acked.iter().enumerate() {
        let mut cl = Client::connect(server.port);
        cl.isid = isid(9000 + c as u32);
        cl.login(&format!("iqn.2026-11.test:crash-{c}"), TARGET)
            .unwrap();
        let mut list = list.lock().unwrap();
        if let Some((lba, fill)) = pending[c].lock().unwrap().take() {
            if cl.read10(lba, 1) == vec![fill; 512] {
                list.retain(|&(x, _)| x != lba);
                list.push((lba, fill));
            }
        }
        assert!(
            !list.is_empty(),
            "client {c} never got a write acknowledged"
        );
        for &(lba, fill) in list.iter() {
            assert_eq!(
                cl.read10(lba, 1),
                vec![fill; 512],
                "client {c} lost LBA {lba}"
            );
        }
    }
    assert_eq!(
        std::fs::read(dir.path().join("golden.img")).unwrap(),
        golden,
        "golden image changed"
    );
}
