//! Storage-level write probe (no network): times N scattered 4 KiB writes through a
//! `FileStore` and through a fresh `Overlay` (first touch), then the same writes again
//! (rewrite), with several threads like the blocking pool. Prints µs per write.
//!
//! ```text
//! cargo run --release --example writeprobe -- DIR [WRITES] [THREADS] [BS]
//! ```
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

fn main() {
    let a: Vec<String> = std::env::args().collect();
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
