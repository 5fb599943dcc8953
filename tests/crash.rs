//! Fault injection: `kill -9` of the server at random moments while several clients stream
//! writes into their overlays, mixing FUA writes, plain writes and SYNCHRONIZE CACHE, partial
//! (one 512-byte block of a 4 KiB chunk: copy-up) and whole-chunk (8 blocks, aligned) writes.
//! After each restart every LBA must read a value the durability rules allow: what the last
//! acknowledged FUA write or SYNCHRONIZE CACHE made durable, or a later write (acknowledged or
//! in flight) that happened to land; never garbage, never an older value. Every overlay must
//! pass its consistency check and the golden image must be byte-identical. 50 rounds.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::{Config, Server};
use raw::Client;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.org.diskless:crash";
const CLIENTS: usize = 4;
const ROUNDS: u32 = 50;
/// LBAs written: [FIRST_LBA, FIRST_LBA + SPAN) (512-byte blocks, 4 KiB chunks of 8).
const FIRST_LBA: u32 = 96;
const SPAN: u32 = 4096;
/// Verification reads this many blocks per READ(10).
const READ_BLOCKS: u32 = 256;

/// What one LBA may read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// The golden image's content.
    Golden,
    /// 512 bytes of this value.
    Fill(u8),
}

/// Per LBA: the durable value and the values written since (acknowledged plain writes, or
/// the write in flight when the server died), any of which may have landed.
#[derive(Debug, Clone)]
struct Slot {
    durable: Val,
    maybe: Vec<u8>,
}

type Model = Arc<Vec<Mutex<BTreeMap<u32, Slot>>>>;

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

fn classify(got: &[u8], golden: &[u8], lba: u32) -> Option<Val> {
    let g = golden.get(lba as usize * 512..(lba as usize + 1) * 512)?;
    if got == g {
        return Some(Val::Golden);
    }
    let f = *got.first()?;
    got.iter().all(|&b| b == f).then_some(Val::Fill(f))
}

/// Read the whole written span of one client's disk and check every LBA against the model,
/// then settle it: after a restart, what is on disk is the truth. Returns the first problem.
fn verify(
    cl: &mut Client,
    model: &Mutex<BTreeMap<u32, Slot>>,
    golden: &[u8],
) -> Result<(), String> {
    let mut m = model.lock().unwrap();
    let mut lba = FIRST_LBA;
    while lba < FIRST_LBA + SPAN {
        let data = cl.read10(lba, READ_BLOCKS as u16);
        for (i, got) in data.chunks(512).enumerate() {
            let l = lba + i as u32;
            let slot = m.entry(l).or_insert(Slot {
                durable: Val::Golden,
                maybe: Vec::new(),
            });
            let Some(v) = classify(got, golden, l) else {
                return Err(format!("LBA {l} reads garbage: {:02x?}", &got[..16]));
            };
            let allowed = v == slot.durable || matches!(v, Val::Fill(f) if slot.maybe.contains(&f));
            if !allowed {
                return Err(format!(
                    "LBA {l} reads {v:?}; durable {:?}, possible {:?}",
                    slot.durable, slot.maybe
                ));
            }
            slot.durable = v;
            slot.maybe.clear();
        }
        lba += READ_BLOCKS;
    }
    Ok(())
}

/// One client's write stream until the connection dies: a FUA write, a plain write or a
/// SYNCHRONIZE CACHE at each step, one block or one aligned 4 KiB chunk at a time.
fn stream(port: u16, c: usize, round: u32, model: Model) {
    let mut cl = Client::connect(port);
    cl.isid = isid(round * 100 + 50 + c as u32);
    if cl
        .login(&format!("iqn.2026-11.test:crash-{c}"), TARGET)
        .is_err()
    {
        return;
    }
    let mut seed = 0x2545_f491_4f6c_dd1d ^ (u64::from(round) << 8 | c as u64);
    loop {
        let r = next(&mut seed);
        let fill = (r >> 8) as u8 | 1;
        let kind = r % 10;
        if kind == 0 {
            // SYNCHRONIZE CACHE(10): once acknowledged, every acknowledged write is durable.
            if cl.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).status != 0 {
                return;
            }
            for slot in model[c].lock().unwrap().values_mut() {
                if let Some(&last) = slot.maybe.last() {
                    slot.durable = Val::Fill(last);
                    slot.maybe.clear();
                }
            }
            continue;
        }
        let fua = kind < 5;
        let blocks: u32 = if r >> 20 & 1 == 0 { 1 } else { 8 };
        let lba = if blocks == 1 {
            FIRST_LBA + (r >> 24) as u32 % SPAN
        } else {
            FIRST_LBA + ((r >> 24) as u32 % (SPAN / 8)) * 8
        };
        {
            let mut m = model[c].lock().unwrap();
            for l in lba..lba + blocks {
                m.entry(l)
                    .or_insert(Slot {
                        durable: Val::Golden,
                        maybe: Vec::new(),
                    })
                    .maybe
                    .push(fill);
            }
        }
        let mut cdb = raw::write10_cdb(lba, blocks as u16);
        if fua {
            cdb[1] |= 0x08;
        }
        let data = vec![fill; blocks as usize * 512];
        if cl.run(&cdb, data.len() as u32, Some(&data)).status != 0 {
            return;
        }
        if fua {
            // FUA (SBC-3 §5.x): durable once acknowledged.
            let mut m = model[c].lock().unwrap();
            for l in lba..lba + blocks {
                if let Some(slot) = m.get_mut(&l) {
                    slot.durable = Val::Fill(fill);
                    slot.maybe.clear();
                }
            }
        }
    }
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_write() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let golden = common::random_bytes(8 << 20, 11);
    std::fs::write(dir.path().join("golden.img"), &golden).unwrap();
    let cfg = config(dir.path());
    let model: Model = Arc::new((0..CLIENTS).map(|_| Mutex::new(BTreeMap::new())).collect());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    // Client threads die with the connection when the server is killed: keep their panics
    // quiet, the checks below run on the main thread with the default hook back.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    'rounds: for round in 0..ROUNDS {
        let server = Server::start(dir.path(), &cfg);
        let port = server.port;
        for c in 0..CLIENTS {
            let mut cl = Client::connect(port);
            cl.isid = isid(round * 100 + c as u32);
            cl.login(&format!("iqn.2026-11.test:crash-{c}"), TARGET)
                .unwrap();
            if let Err(e) = verify(&mut cl, &model[c], &golden) {
                failure = Some(format!("round {round}: client {c}: {e}"));
                break 'rounds;
            }
        }
        let threads: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let model = model.clone();
                std::thread::spawn(move || stream(port, c, round, model))
            })
            .collect();
        // Kill at a random moment 20..220 ms into the stream.
        std::thread::sleep(Duration::from_millis(20 + next(&mut seed) % 200));
        server.kill9();
        let deadline = Instant::now() + Duration::from_secs(30);
        for t in threads {
            let _ = t.join();
            assert!(Instant::now() < deadline, "client threads did not stop");
        }
    }
    std::panic::set_hook(default_hook);
    if let Some(f) = failure {
        panic!("{f}");
    }
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
    // A last restart: everything durable is there; the golden image never changed.
    let server = Server::start(dir.path(), &cfg);
    for c in 0..CLIENTS {
        let mut cl = Client::connect(server.port);
        cl.isid = isid(9000 + c as u32);
        cl.login(&format!("iqn.2026-11.test:crash-{c}"), TARGET)
            .unwrap();
        verify(&mut cl, &model[c], &golden).unwrap_or_else(|e| panic!("client {c}: {e}"));
        let written = model[c]
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.durable != Val::Golden)
            .count();
        assert!(written > 0, "client {c} never got a write made durable");
    }
    assert_eq!(
        std::fs::read(dir.path().join("golden.img")).unwrap(),
        golden,
        "golden image changed"
    );
    eprintln!(
        "{ROUNDS} rounds in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
