//! Storage-level write probe (no network): times N scattered 4 KiB writes through a
//! `FileStore` and through a fresh `Overlay` (first touch), then the same writes again
//! (rewrite), with several threads like the blocking pool. Prints µs per write.
//!
//! ```text
//! cargo run --release --example writeprobe -- DIR [WRITES] [THREADS] [BS]
//! cargo run --release --example writeprobe -- fs DIR [WRITES]
//! ```
//!
//! The `fs` mode is the file system alone (std + libc, no overlay code): the CPU of N 4 KiB
//! first writes and of the fdatasync after them, for the layouts an overlay data file can
//! have: random offsets into the holes of a sparse 1 GiB file (the v1 identity layout),
//! appended slots (the v2 dense layout), appended slots into a tail `fallocate`d ahead in
//! 64 MiB steps, and rewrites of written, cached blocks (what a plain image pays).
use diskless::storage::{BlockStore, FileStore, Overlay, OverlayOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

fn run(store: &Arc<dyn BlockStore>, offs: &[u64], threads: usize, bs: usize) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            let store = store.clone();
            s.spawn(move || {
                let buf = vec![0x5au8 ^ k as u8; bs];
                for o in offs.iter().skip(k).step_by(threads) {
                    store.write_at(&buf, *o, false).expect("write");
                }
            });
        }
    });
    t.elapsed().as_secs_f64() * 1e6 / offs.len() as f64
}

/// CPU time (user + system) of this process, in µs.
fn cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct we pass; nothing else is touched.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One layout of the `fs` probe: returns (CPU µs per write, wall µs per write, fdatasync CPU
/// ms, fdatasync wall ms).
fn fs_layout(
    path: &std::path::Path,
    offs: &[u64],
    sparse: u64,
    falloc: u64,
) -> (f64, f64, f64, f64) {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let _ = std::fs::remove_file(path);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open");
    f.set_len(sparse).expect("set_len");
    f.sync_all().expect("sync");
    let buf = vec![0x5au8; 4096];
    let (c0, t0) = (cpu_us(), Instant::now());
    let mut tail = 0u64;
    for &o in offs {
        if falloc > 0 && o + 4096 > tail {
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, tail as i64, falloc as i64) };
            assert_eq!(r, 0, "fallocate");
            tail += falloc;
        }
        f.write_all_at(&buf, o).expect("write");
    }
    let (c1, t1) = (cpu_us(), Instant::now());
    f.sync_data().expect("fdatasync");
    let (c2, t2) = (cpu_us(), Instant::now());
    let n = offs.len() as f64;
    (
        (c1 - c0) / n,
        (t1 - t0).as_secs_f64() * 1e6 / n,
        (c2 - c1) / 1e3,
        (t2 - t1).as_secs_f64() * 1e3,
    )
}

fn fs_probe(dir: &std::path::Path, n: usize) {
    std::fs::create_dir_all(dir).expect("dir");
    let size: u64 = 1 << 30;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut seen = std::collections::HashSet::new();
    let random: Vec<u64> = std::iter::from_fn(|| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        Some((seed % (size / 4096)) * 4096)
    })
    .filter(|o| seen.insert(*o))
    .take(n)
    .collect();
    let appended: Vec<u64> = (0..n as u64).map(|i| i * 4096).collect();
    let p = dir.join("probe.data");
    println!("{n} first writes of 4 KiB, then one fdatasync (CPU of this process; one thread)");
    println!(
        "{:34} {:>10} {:>10} {:>12} {:>12}",
        "layout", "CPU µs/w", "wall µs/w", "sync CPU ms", "sync wall ms"
    );
    let row = |name: &str, r: (f64, f64, f64, f64)| {
        println!(
            "{name:34} {:10.2} {:10.2} {:12.1} {:12.1}",
            r.0, r.1, r.2, r.3
        )
    };
    for round in 0..2 {
        println!("round {}", round + 1);
        row("random into holes (v1)", fs_layout(&p, &random, size, 0));
        row("appended slots (v2 dense)", fs_layout(&p, &appended, 0, 0));
        row(
            "appended, 64 MiB fallocate ahead",
            fs_layout(&p, &appended, 0, 64 << 20),
        );
        // Rewrite of allocated, cached blocks: the file the last layout left, written again.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open");
            let buf = vec![0xa5u8; 4096];
            for &o in &appended {
                f.write_all_at(&buf, o).expect("write");
            }
            f.sync_data().expect("sync");
            let (c0, t0) = (cpu_us(), Instant::now());
            for &o in &appended {
                f.write_all_at(&buf, o).expect("write");
            }
            let (c1, t1) = (cpu_us(), Instant::now());
            f.sync_data().expect("sync");
            let (c2, t2) = (cpu_us(), Instant::now());
            let n = appended.len() as f64;
            row(
                "rewrite of written blocks (plain)",
                (
                    (c1 - c0) / n,
                    (t1 - t0).as_secs_f64() * 1e6 / n,
                    (c2 - c1) / 1e3,
                    (t2 - t1).as_secs_f64() * 1e3,
                ),
            );
        }
    }
    let _ = std::fs::remove_file(&p);
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.get(1).map(String::as_str) == Some("fs") {
        let dir = PathBuf::from(a.get(2).expect("DIR"));
        let n: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(60_000);
        return fs_probe(&dir, n);
    }
    let dir = PathBuf::from(a.get(1).expect("DIR"));
    let n: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let threads: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(4);
    let bs: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let size: u64 = 1 << 30;
    std::fs::create_dir_all(&dir).expect("dir");
    let img = dir.join("golden.img");
    if !img.exists() {
        let f = std::fs::File::create(&img).expect("img");
        let b = vec![0xa5u8; 1 << 20];
        use std::os::unix::fs::FileExt;
        for i in 0..(size >> 20) {
            f.write_all_at(&b, i << 20).expect("fill");
        }
        f.sync_all().expect("sync");
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let offs: Vec<u64> = (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % (size / bs as u64)) * bs as u64
        })
        .collect();
    let plain_path = dir.join("plain.img");
    std::fs::copy(&img, &plain_path).expect("copy");
    let plain: Arc<dyn BlockStore> =
        Arc::new(FileStore::open(&plain_path, 512, false).expect("plain"));
    let golden: Arc<dyn BlockStore> = Arc::new(FileStore::open(&img, 512, true).expect("golden"));
    let od = dir.join("ov");
    let _ = std::fs::remove_dir_all(&od);
    let ov = Overlay::create(&od, golden, OverlayOptions::default()).expect("overlay");
    let ov: Arc<dyn BlockStore> = Arc::new(ov);
    let p1 = run(&plain, &offs, threads, bs);
    let o1 = run(&ov, &offs, threads, bs);
    let p2 = run(&plain, &offs, threads, bs);
    let o2 = run(&ov, &offs, threads, bs);
    let t = Instant::now();
    ov.flush().expect("flush");
    let f = t.elapsed().as_secs_f64() * 1e3;
    println!("plain first {p1:.2} µs, overlay first touch {o1:.2} µs, plain again {p2:.2} µs, overlay rewrite {o2:.2} µs; flush {f:.1} ms");
}
