//! Stack N layers on a versioned image (for scripts/bench/versions.sh): each layer rewrites
//! PERCENT of the image's 4 KiB chunks in runs of 1 to RUN chunks at random places (and unmaps
//! a few), like a series of `client commit`s of small updates.
//!
//!   cargo run --release --example mklayers -- STATE_DIR IMAGE LAYERS [PERCENT [RUN]]

use diskless::storage::versions::{Images, Stamp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: mklayers STATE_DIR IMAGE LAYERS [PERCENT [RUN]]".into());
    }
    let images = Images::new(std::path::Path::new(&args[1]));
    let image = &args[2];
    let layers: u64 = args[3].parse()?;
    let percent: f64 = args.get(4).map_or(Ok(2.0), |p| p.parse())?;
    let run: u64 = args.get(5).map_or(Ok(32), |p| p.parse())?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..layers {
        let log = images.log(image)?;
        let chunks = log.size / 4096;
        // Updates rewrite files: runs of 1 to RUN chunks (RUN 1: scattered single chunks,
        // the worst case for fragmentation).
        let n = ((chunks as f64) * percent / 100.0) as u64;
        let mut picks: Vec<u64> = Vec::new();
        while (picks.len() as u64) < n {
            let len = 1 + rnd() % run;
            let at = rnd() % chunks.saturating_sub(len).max(1);
            picks.extend(at..at + len);
        }
        picks.sort_unstable();
        picks.dedup();
        let stamp = Stamp {
            message: format!("bench layer {}", i + 1),
            author: "bench".into(),
            time_ms: 0,
        };
        let data: Vec<u8> = (0..4096).map(|_| rnd() as u8).collect();
        let v = images.commit_layer(image, log.head, &stamp, |w| {
            for (k, c) in picks.iter().enumerate() {
                if k % 50 == 49 {
                    w.zero(c * 4096, (c + 1) * 4096)?;
                } else {
                    w.data(c * 4096, &data)?;
                }
            }
            Ok(())
        })?;
        let store = images.open(image, v)?;
        println!(
            "{image}@{v}: {} chunks changed, {} runs in the merged map",
            picks.len(),
            store.map_runs()
        );
    }
    Ok(())
}
