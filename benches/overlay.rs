//! The overlay write path, piece by piece (issue 12). Smoke-run:
//! `cargo bench --bench overlay -- --quick`.
//!
//! - `overlay/first_touch_4k`: a whole-chunk write into a chunk never written (no copy-up:
//!   pwrite into a hole + chunk-map update + a queued state record).
//! - `overlay/first_touch_many_8x4k`: eight such writes in one `write_many` (a batch the
//!   session received together: one pwritev into eight consecutive slots); per batch.
//! - `overlay/copy_up_512`: a 512-byte write into a fresh 4 KiB chunk (reads the other
//!   3.5 KiB from the golden image and writes the whole chunk).
//! - `overlay/rewrite_4k`: a write into a chunk already in the overlay (pwrite only).
//! - `plain/write_4k`: the same pwrite into a plain image file, for scale.
//! - `overlay/map_update`: one chunk-map update of a map holding 100k scattered runs.
//! - `overlay/journal_append_fsync/N`: N first-touch writes, then the flush that journals
//!   their N state records in one append (fdatasync of the data, then of the journal).
//! - `overlay/fua_4k`: a FUA first-touch write (flush included).
//!
//! The files live in a temporary directory on the file system of `$TMPDIR` (set it to the
//! disk you serve overlays from).
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use diskless::storage::{BlockStore, ChunkState, ExtentMap, FileStore, Overlay, OverlayOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 16 GiB sparse golden image: room for millions of fresh chunks.
const SIZE: u64 = 16 << 30;
const CHUNKS: u64 = SIZE / 4096;
/// Stride between consecutive fresh chunks (odd, so a pass visits every chunk once).
const STRIDE: u64 = 12_289;

struct Fixture {
    _dir: tempfile::TempDir,
    overlay: Arc<Overlay>,
    plain: Arc<FileStore>,
    next: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = dir.path().join("golden.img");
        FileStore::create(&g, SIZE).expect("golden");
        // A few MiB of real data at the start, where copy-up reads come from.
        let golden: Arc<dyn BlockStore> = Arc::new(FileStore::open(&g, 512, true).expect("open"));
        let overlay = Overlay::create(&dir.path().join("ov"), golden, OverlayOptions::default())
            .expect("overlay");
        let p = dir.path().join("plain.img");
        FileStore::create(&p, SIZE).expect("plain");
        let plain = Arc::new(FileStore::open(&p, 512, false).expect("plain"));
        Fixture {
            _dir: dir,
            overlay: Arc::new(overlay),
            plain,
            next: 0,
        }
    }

    /// The byte offset of a chunk not written yet.
    fn fresh(&mut self) -> u64 {
        self.next += 1;
        (self.next * STRIDE % CHUNKS) * 4096
    }
}

/// Time `iters` calls of `write`, flushing (untimed) whenever more than 100,000 state
/// changes wait: past 262,144 the overlay flushes on its own (writeback.rs), gigabytes of new
/// data inside the timing, and a bench that writes faster would pay for it more often.
fn timed(f: &mut Fixture, iters: u64, mut write: impl FnMut(&mut Fixture)) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if f.overlay.stats().pending_records > 100_000 {
            f.overlay.flush().expect("flush");
        }
        let t = Instant::now();
        write(f);
        total += t.elapsed();
    }
    total
}

fn bench_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("overlay");
    g.measurement_time(Duration::from_secs(3));
    let buf = vec![0x5au8; 4096];
    let mut f = Fixture::new();
    g.bench_function("first_touch_4k", |b| {
        b.iter_custom(|iters| {
            timed(&mut f, iters, |f| {
                let o = f.fresh();
                f.overlay
                    .write_at(black_box(&buf), o, false)
                    .expect("write")
            })
        })
    });
    g.bench_function("first_touch_many_8x4k", |b| {
        b.iter_custom(|iters| {
            timed(&mut f, iters, |f| {
                let offsets: Vec<u64> = (0..8).map(|_| f.fresh()).collect();
                let writes: Vec<(u64, &[u8])> = offsets.iter().map(|&o| (o, &buf[..])).collect();
                f.overlay.write_many(black_box(&writes)).expect("write")
            })
        })
    });
    g.bench_function("copy_up_512", |b| {
        b.iter(|| {
            let o = f.fresh();
            f.overlay
                .write_at(black_box(&buf[..512]), o + 1024, false)
                .expect("write")
        })
    });
    let hot = f.fresh();
    f.overlay.write_at(&buf, hot, false).expect("write");
    g.bench_function("rewrite_4k", |b| {
        b.iter(|| {
            f.overlay
                .write_at(black_box(&buf), hot, false)
                .expect("write")
        })
    });
    g.bench_function("fua_4k", |b| {
        b.iter(|| {
            let o = f.fresh();
            f.overlay.write_at(black_box(&buf), o, true).expect("write")
        })
    });
    for n in [1u64, 32, 1024] {
        g.bench_with_input(BenchmarkId::new("journal_append_fsync", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..n {
                        let o = f.fresh();
                        f.overlay.write_at(&buf, o, false).expect("write");
                    }
                    let t = Instant::now();
                    f.overlay.flush().expect("flush");
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("plain");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("write_4k", |b| {
        b.iter(|| {
            let o = f.fresh();
            f.plain.write_at(black_box(&buf), o, false).expect("write")
        })
    });
    g.finish();
}

fn bench_map(c: &mut Criterion) {
    let mut m = ExtentMap::new();
    for i in 0..100_000u64 {
        let s = i * STRIDE % CHUNKS;
        m.set(s, s + 1, ChunkState::Overlay);
    }
    let mut next = 100_000u64;
    c.bench_function("overlay/map_update", |b| {
        b.iter(|| {
            next += 1;
            let s = next * STRIDE % CHUNKS;
            m.set(black_box(s), s + 1, ChunkState::Overlay);
        })
    });
}

criterion_group!(benches, bench_writes, bench_map);
criterion_main!(benches);
