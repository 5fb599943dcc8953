//! Per-client copy-on-write overlays: data, crash recovery, and the on-disk format.
use diskless::storage::{
    BlockStore, ChunkState, FileStore, MemStore, Overlay, OverlayError, OverlayOptions,
};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn golden_mem(size: usize, bs: u32) -> (Arc<dyn BlockStore>, Vec<u8>) {
    let data = pattern(size, 7);
    (Arc::new(MemStore::with_data(data.clone(), bs, true)), data)
}

fn opts(chunk: u32) -> OverlayOptions {
    OverlayOptions {
        chunk_size: chunk,
        golden_id: Some("golden-test".into()),
    }
}

fn read_all(o: &Overlay) -> Vec<u8> {
    let mut b = vec![0u8; o.size() as usize];
    o.read_at(&mut b, 0).unwrap();
    b
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn reads_and_writes_across_chunks_512_and_4096() {
    for (bs, chunk) in [(512u32, 4096u32), (512, 8192), (4096, 4096), (4096, 16384)] {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 4096 + 3 * bs as usize; // last chunk partial
        let (golden, gbytes) = golden_mem(size, bs);
        let o = Overlay::create(dir.path(), golden.clone(), opts(chunk)).unwrap();
        let mut model = gbytes.clone();
        assert_eq!(o.block_size(), bs);
        assert_eq!(o.size(), size as u64);
        assert!(o.thin_provisioned() && !o.read_only());
        let b = bs as usize;
        // (offset, len) in blocks: inside one chunk, spanning chunks, the partial tail.
        let writes = [(1, 1), (7, 3), (20, 40), (0, 9), (size / b - 2, 2), (33, 1)];
        for (i, &(blk, n)) in writes.iter().enumerate() {
            let d = pattern(n * b, 100 + i as u64);
            o.write_at(&d, (blk * b) as u64, i % 2 == 0).unwrap();
            model[blk * b..(blk + n) * b].copy_from_slice(&d);
            assert_eq!(read_all(&o), model, "bs {bs} chunk {chunk} write {i}");
        }
        // Discard: partial edges get zeroes, whole chunks become zero chunks.
        o.discard(3 * b as u64, (chunk as usize * 3) as u64)
            .unwrap();
        model[3 * b..3 * b + chunk as usize * 3].fill(0);
        assert_eq!(read_all(&o), model);
        o.discard(0, size as u64).unwrap();
        assert!(read_all(&o).iter().all(|&x| x == 0));
        assert_eq!(o.stats().chunks_written, 0);
        assert_eq!(o.allocation(0).unwrap(), (false, size as u64));
        // Odd reads spanning zero, overlay and golden chunks.
        o.write_at(&pattern(b, 9), chunk as u64, false).unwrap();
        let mut part = vec![0u8; chunk as usize + 2 * b];
        o.read_at(&mut part, chunk as u64 - b as u64).unwrap();
        assert!(part[..b].iter().all(|&x| x == 0));
        assert_eq!(&part[b..2 * b], &pattern(b, 9)[..]);
        assert!(part[2 * b..].iter().all(|&x| x == 0));
        // Out of range.
        assert!(o.read_at(&mut [0u8; 512], size as u64).is_err());
        assert!(o.write_at(&[0u8; 512], u64::MAX - 100, false).is_err());
        assert!(o.discard(size as u64 - 512, 1024).is_err());
        // The golden image never changed.
        let mut g = vec![0u8; size];
        golden.read_at(&mut g, 0).unwrap();
        assert_eq!(g, gbytes);
    }
}

#[test]
fn golden_file_bytes_never_change() {
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("golden.img");
    std::fs::write(&gpath, pattern(1 << 20, 3)).unwrap();
    let before = std::fs::read(&gpath).unwrap();
    let golden: Arc<dyn BlockStore> = Arc::new(FileStore::open(&gpath, 512, true).unwrap());
    let o = Overlay::create(&dir.path().join("ov"), golden, OverlayOptions::default()).unwrap();
    for i in 0..50u64 {
        o.write_at(&pattern(1536, i), (i * 7919 % 2000) * 512, i % 5 == 0)
            .unwrap();
        o.discard((i * 104_729 % 1900) * 512, 8192).unwrap();
    }
    o.flush().unwrap();
    o.reset().unwrap();
    o.close().unwrap();
    assert_eq!(std::fs::read(&gpath).unwrap(), before);
}

#[test]
fn reopen_after_flush_keeps_data_and_refuses_other_goldens() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, mut model) = golden_mem(256 * 1024, 512);
    let o = Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap();
    assert!(matches!(
        Overlay::create(dir.path(), golden.clone(), opts(4096)),
        Err(OverlayError::Exists(_))
    ));
    // One server per overlay.
    assert!(matches!(
        Overlay::open(dir.path(), golden.clone()),
        Err(OverlayError::Busy(_))
    ));
    o.write_at(&pattern(5000 / 512 * 512, 1), 1024, false)
        .unwrap();
    model[1024..1024 + 4608].copy_from_slice(&pattern(4608, 1));
    o.discard(64 * 1024, 32 * 1024).unwrap();
    model[64 * 1024..96 * 1024].fill(0);
    o.flush().unwrap();
    drop(o);
    let o = Overlay::open(dir.path(), golden.clone()).unwrap();
    assert_eq!(read_all(&o), model);
    assert_eq!(o.golden_id(), Some("golden-test"));
    assert_eq!(o.chunk_state(64 * 1024).unwrap(), ChunkState::Zero);
    assert_eq!(o.chunk_state(0).unwrap(), ChunkState::Overlay);
    assert_eq!(o.chunk_state(200 * 1024).unwrap(), ChunkState::Golden);
    let st = o.stats();
    assert_eq!((st.chunks_written, st.bytes_written), (2, 8192));
    assert_eq!(st.chunks_zeroed, 8);
    drop(o);
    // Wrong size, wrong block size, wrong id.
    let (small, _) = golden_mem(128 * 1024, 512);
    assert!(matches!(
        Overlay::open(dir.path(), small),
        Err(OverlayError::GoldenMismatch(_))
    ));
    let (other_bs, _) = golden_mem(256 * 1024, 4096);
    assert!(matches!(
        Overlay::open(dir.path(), other_bs),
        Err(OverlayError::GoldenMismatch(_))
    ));
    assert!(matches!(
        Overlay::open_with_id(dir.path(), golden.clone(), Some("other")),
        Err(OverlayError::GoldenMismatch(_))
    ));
    let o = Overlay::open_with_id(dir.path(), golden, Some("golden-test")).unwrap();
    assert_eq!(read_all(&o), model);
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, _) = golden_mem(64 * 1024, 4096);
    for chunk in [512u32, 3000, 2 << 20] {
        assert!(matches!(
            Overlay::create(dir.path(), golden.clone(), opts(chunk)),
            Err(OverlayError::BadOptions(_))
        ));
    }
    assert!(Overlay::open(&dir.path().join("none"), golden).is_err());
}

#[test]
fn simulated_crash_keeps_flushed_data() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, gbytes) = golden_mem(128 * 1024, 512);
    let o = Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap();
    let a = pattern(8192, 1);
    o.write_at(&a, 0, false).unwrap();
    o.flush().unwrap();
    let f = pattern(512, 2);
    o.write_at(&f, 40 * 1024, true).unwrap(); // FUA: durable without flush
    let mut flushed = gbytes.clone();
    flushed[..8192].copy_from_slice(&a);
    flushed[40 * 1024..40 * 1024 + 512].copy_from_slice(&f);
    // Unflushed: a golden chunk turning overlay, and an unmap.
    o.write_at(&pattern(4096, 3), 16 * 1024, false).unwrap();
    o.discard(64 * 1024, 16 * 1024).unwrap();
    assert!(o.stats().pending_records >= 2);
    o.simulate_crash(); // kill: no flush
    let report = Overlay::check(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let o = Overlay::open(dir.path(), golden.clone()).unwrap();
    let got = read_all(&o);
    assert_eq!(got[..8192], flushed[..8192]);
    assert_eq!(
        got[40 * 1024..40 * 1024 + 512],
        flushed[40 * 1024..40 * 1024 + 512]
    );
    // The unflushed golden→overlay chunk is back to golden (its record never became durable).
    assert_eq!(got[16 * 1024..20 * 1024], gbytes[16 * 1024..20 * 1024]);
    // The unflushed unmap of golden chunks is lost: golden again.
    assert_eq!(got[64 * 1024..80 * 1024], gbytes[64 * 1024..80 * 1024]);
    assert_eq!(got, flushed);
    assert!(Overlay::check(dir.path()).unwrap().is_clean());
}

/// Each round changes fresh golden chunks (write or unmap) and flushes: exactly one journal
/// record per round, so any journal prefix corresponds to one round's model.
#[test]
fn torn_or_corrupt_journal_opens_as_a_prefix() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("src");
    let (golden, gbytes) = golden_mem(256 * 1024, 512);
    let o = Overlay::create(&src, golden.clone(), opts(4096)).unwrap();
    let mut models = vec![gbytes.clone()];
    let mut m = gbytes.clone();
    for round in 0..20usize {
        let off = round * 3 * 4096;
        if round % 4 == 3 {
            o.discard(off as u64, 8192).unwrap();
            m[off..off + 8192].fill(0);
        } else {
            let d = pattern(4096 + 512, round as u64);
            o.write_at(&d, (off + 1024) as u64, false).unwrap();
            m[off + 1024..off + 1024 + d.len()].copy_from_slice(&d);
        }
        o.flush().unwrap();
        models.push(m.clone());
    }
    drop(o);
    let journal_len = std::fs::metadata(src.join("overlay.journal"))
        .unwrap()
        .len();
    assert_eq!(journal_len, 32 + 20 * 48);
    let mut cases: Vec<(u64, Option<u64>)> =
        (0..journal_len).step_by(5).map(|t| (t, None)).collect();
    cases.extend((0..journal_len).step_by(11).map(|c| (journal_len, Some(c))));
    for (i, (trunc, corrupt)) in cases.into_iter().enumerate() {
        let dst = base.path().join(format!("c{i}"));
        copy_dir(&src, &dst);
        let jp = dst.join("overlay.journal");
        let mut j = std::fs::read(&jp).unwrap();
        j.truncate(trunc as usize);
        if let Some(c) = corrupt {
            j[c as usize] ^= 0x5a;
        }
        std::fs::write(&jp, &j).unwrap();
        let rep = Overlay::check(&dst).unwrap();
        assert!(rep.is_clean(), "{rep:?}");
        let o = Overlay::open(&dst, golden.clone()).unwrap();
        let got = read_all(&o);
        let k = models
            .iter()
            .position(|m| *m == got)
            .unwrap_or_else(|| panic!("trunc {trunc} corrupt {corrupt:?}: not a prefix"));
        // Whole records before the damage survive.
        let intact = (trunc.min(corrupt.unwrap_or(u64::MAX)).saturating_sub(32)) / 48;
        assert_eq!(
            k as u64,
            intact.min(20),
            "trunc {trunc} corrupt {corrupt:?}"
        );
        // Recovery leaves a clean overlay that keeps working.
        o.write_at(&[1u8; 512], 0, true).unwrap();
        drop(o);
        let rep = Overlay::check(&dst).unwrap();
        assert!(rep.is_clean() && rep.journal_ignored_bytes == 0, "{rep:?}");
    }
}

#[test]
fn compaction_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, mut model) = golden_mem(128 * 1024, 512);
    let o = Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap();
    let g0 = o.stats().generation;
    for i in 0..10usize {
        o.write_at(
            &pattern(512, i as u64),
            (i * 9000 / 512 * 512) as u64,
            false,
        )
        .unwrap();
        model[i * 9000 / 512 * 512..][..512].copy_from_slice(&pattern(512, i as u64));
        o.flush().unwrap();
    }
    o.discard(100 * 1024, 8192).unwrap();
    model[100 * 1024..100 * 1024 + 8192].fill(0);
    assert!(o.stats().journal_bytes > 32);
    o.compact_now().unwrap();
    let st = o.stats();
    assert_eq!(
        (st.journal_bytes, st.generation, st.pending_records),
        (32, g0 + 1, 0)
    );
    // Records after a compaction go to the new journal.
    o.write_at(&[3u8; 512], 120 * 1024, false).unwrap();
    model[120 * 1024..120 * 1024 + 512].fill(3);
    o.flush().unwrap();
    o.simulate_crash();
    let rep = Overlay::check(dir.path()).unwrap();
    assert!(rep.is_clean() && rep.journal_records == 1, "{rep:?}");
    let o = Overlay::open(dir.path(), golden).unwrap();
    assert_eq!(read_all(&o), model);
}

#[test]
fn check_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, _) = golden_mem(64 * 1024, 512);
    let o = Overlay::create(dir.path(), golden, opts(4096)).unwrap();
    o.write_at(&[5u8; 4096], 4096, false).unwrap();
    o.flush().unwrap();
    drop(o);
    let rep = Overlay::check(dir.path()).unwrap();
    assert!(rep.is_clean());
    assert_eq!((rep.journal_records, rep.chunks_written), (1, 1));
    assert_eq!(
        (rep.golden_size, rep.block_size, rep.chunk_size),
        (65536, 512, 4096)
    );
    assert_eq!(rep.golden_id.as_deref(), Some("golden-test"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("overlay.data"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert!(!Overlay::check(dir.path()).unwrap().is_clean());
    let meta = dir.path().join("overlay.meta");
    let mut b = std::fs::read(&meta).unwrap();
    b[20] ^= 1;
    std::fs::write(&meta, b).unwrap();
    assert!(matches!(
        Overlay::check(dir.path()),
        Err(OverlayError::Corrupt { .. })
    ));
}

#[test]
fn reset_goes_back_to_golden() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, gbytes) = golden_mem(128 * 1024, 4096);
    let o = Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap();
    o.write_at(&pattern(64 * 1024, 1), 0, false).unwrap();
    o.flush().unwrap();
    o.discard(64 * 1024, 32 * 1024).unwrap();
    o.write_at(&pattern(4096, 2), 100 * 1024, false).unwrap();
    o.reset().unwrap();
    assert_eq!(read_all(&o), gbytes);
    let st = o.stats();
    assert_eq!(
        (st.chunks_written, st.chunks_zeroed, st.pending_records),
        (0, 0, 0)
    );
    // Still usable after reset, and the reset itself is durable.
    o.write_at(&[9u8; 4096], 0, false).unwrap();
    o.simulate_crash();
    let o = Overlay::open(dir.path(), golden.clone()).unwrap();
    assert_eq!(read_all(&o), gbytes);
    // Dropping flushes: an orderly shutdown keeps unflushed writes.
    o.write_at(&[9u8; 4096], 0, false).unwrap();
    drop(o);
    let o = Overlay::open_or_create(dir.path(), golden.clone(), opts(4096)).unwrap();
    assert_eq!(read_all(&o)[..4096], [9u8; 4096]);
    drop(o);
    let fresh = dir.path().join("fresh");
    assert!(!Overlay::exists(&fresh));
    let o = Overlay::open_or_create(&fresh, golden, opts(4096)).unwrap();
    assert!(Overlay::exists(&fresh));
    assert_eq!(read_all(&o), gbytes);
    assert!(Overlay::check(dir.path()).unwrap().is_clean());
}

#[test]
fn commit_to_writes_what_the_client_sees() {
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("golden.img");
    FileStore::create(&gpath, 4 << 20).unwrap();
    {
        let g = FileStore::open(&gpath, 512, false).unwrap();
        g.write_at(&pattern(64 * 1024, 1), 1 << 20, false).unwrap();
        g.write_at(&pattern(8192, 2), 3 << 20, false).unwrap();
        g.flush().unwrap();
    }
    let golden: Arc<dyn BlockStore> = Arc::new(FileStore::open(&gpath, 512, true).unwrap());
    let o = Overlay::create(&dir.path().join("ov"), golden, OverlayOptions::default()).unwrap();
    o.write_at(&pattern(1536, 3), (1 << 20) + 512, false)
        .unwrap();
    o.write_at(&pattern(4096, 4), 2 << 20, false).unwrap();
    o.discard(3 << 20, 4096).unwrap();
    let out = dir.path().join("new-golden.img");
    o.commit_to(&out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), read_all(&o));
    assert!(!dir.path().join("new-golden.img.partial").exists());
    assert!(matches!(o.commit_to(&out), Err(OverlayError::Exists(_))));
    // Sparse: only what holds data is allocated (allow some file-system slack).
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated <= 1 << 20, "{allocated}");
    // The new image serves as a golden image.
    let g2: Arc<dyn BlockStore> = Arc::new(FileStore::open(&out, 512, true).unwrap());
    let o2 = Overlay::create(&dir.path().join("ov2"), g2, OverlayOptions::default()).unwrap();
    assert_eq!(read_all(&o2), read_all(&o));
}

#[test]
fn allocation_reports_overlay_golden_and_zero() {
    let dir = tempfile::tempdir().unwrap();
    // Golden: first half mapped, second half unmapped.
    let g = MemStore::new(64 * 1024, 512, false);
    g.write_at(&[1u8; 32 * 1024], 0, false).unwrap();
    let golden: Arc<dyn BlockStore> = Arc::new(g);
    let o = Overlay::create(dir.path(), golden, opts(4096)).unwrap();
    assert_eq!(o.allocation(0).unwrap(), (true, 32 * 1024));
    assert_eq!(o.allocation(512).unwrap(), (true, 32 * 1024 - 512));
    assert_eq!(o.allocation(32 * 1024).unwrap(), (false, 32 * 1024));
    o.write_at(&[2u8; 512], 40 * 1024, false).unwrap();
    o.discard(8 * 1024, 8192).unwrap();
    assert_eq!(o.allocation(0).unwrap(), (true, 8 * 1024));
    assert_eq!(o.allocation(8 * 1024).unwrap(), (false, 8 * 1024));
    assert_eq!(o.allocation(16 * 1024).unwrap(), (true, 16 * 1024));
    assert_eq!(o.allocation(32 * 1024).unwrap(), (false, 8 * 1024));
    assert_eq!(o.allocation(40 * 1024 + 1000).unwrap(), (true, 4096 - 512));
    assert_eq!(o.allocation(44 * 1024).unwrap(), (false, 20 * 1024));
    assert!(o.allocation(64 * 1024).is_err());
}

#[test]
fn huge_sparse_golden_image() {
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("huge.img");
    let tib = 1u64 << 40;
    FileStore::create(&gpath, tib).unwrap();
    let golden: Arc<dyn BlockStore> = Arc::new(FileStore::open(&gpath, 512, true).unwrap());
    let ov = dir.path().join("ov");
    let o = Overlay::create(&ov, golden.clone(), OverlayOptions::default()).unwrap();
    let spots = [0u64, 4096 * 1000 + 512, tib / 2 + 7 * 512, tib - 4096];
    for (i, &s) in spots.iter().enumerate() {
        o.write_at(&pattern(1024, i as u64), s, false).unwrap();
    }
    // A whole-disk-sized unmap (mkfs does this) stays one extent.
    o.discard(1 << 30, tib / 4).unwrap();
    o.flush().unwrap();
    let st = o.stats();
    assert!(st.extents <= 10, "{st:?}");
    assert_eq!(st.chunks_zeroed, (tib / 4) / 4096);
    drop(o);
    let o = Overlay::open(&ov, golden).unwrap();
    for (i, &s) in spots.iter().enumerate() {
        let mut b = vec![0u8; 1024];
        o.read_at(&mut b, s).unwrap();
        assert_eq!(b, pattern(1024, i as u64));
    }
    let (mapped, run) = o.allocation(1 << 30).unwrap();
    assert_eq!((mapped, run), (false, tib / 4));
    let (mapped, _) = o.allocation(tib / 8 * 5).unwrap();
    assert!(!mapped);
    // The data file is sparse: a few chunks allocated.
    use std::os::unix::fs::MetadataExt;
    let data = std::fs::metadata(ov.join("overlay.data")).unwrap();
    // Dense: one slot per chunk written (the 1 KiB write at tib / 2 + 3.5 KiB touches two).
    assert_eq!(data.len(), 5 * 4096);
    assert!(data.blocks() * 512 < 1 << 20);
    let out = dir.path().join("merged.img");
    o.commit_to(&out).unwrap();
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), tib);
    assert!(m.blocks() * 512 < 1 << 20);
    let merged = FileStore::open(&out, 512, true).unwrap();
    let mut b = vec![0u8; 1024];
    merged.read_at(&mut b, tib / 2 + 7 * 512).unwrap();
    assert_eq!(b, pattern(1024, 2));
}

/// Many writers doing copy-on-write of the same chunks at once (each owns some 512-byte
/// blocks), with readers checking that every block is whole (golden or a writer's pattern).
#[test]
fn concurrent_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 256usize;
    let (golden, gbytes) = golden_mem(blocks * 512, 512);
    let o = Arc::new(Overlay::create(dir.path(), golden, opts(8192)).unwrap());
    let threads = 8usize;
    let mut hs = Vec::new();
    for t in 0..threads {
        let o = Arc::clone(&o);
        hs.push(std::thread::spawn(move || {
            for round in 0..4u8 {
                for blk in (t..blocks).step_by(threads) {
                    o.write_at(
                        &[(t as u8 + 1) * 16 + round; 512],
                        (blk * 512) as u64,
                        round == 3,
                    )
                    .unwrap();
                }
            }
        }));
    }
    let reader = {
        let o = Arc::clone(&o);
        let g = gbytes.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                let all = read_all(&o);
                for (blk, b) in all.chunks(512).enumerate() {
                    let golden = &g[blk * 512..(blk + 1) * 512];
                    let t = blk % threads;
                    let ok = b == golden
                        || (0..4u8).any(|r| b.iter().all(|&x| x == (t as u8 + 1) * 16 + r));
                    assert!(ok, "block {blk} torn");
                }
            }
        })
    };
    for h in hs {
        h.join().unwrap();
    }
    reader.join().unwrap();
    let all = read_all(&o);
    for (blk, b) in all.chunks(512).enumerate() {
        let t = blk % threads;
        assert!(
            b.iter().all(|&x| x == (t as u8 + 1) * 16 + 3),
            "lost update at {blk}"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        blk: u64,
        n: u64,
        seed: u64,
        fua: bool,
    },
    /// `write_many`: (block, count, seed) each, most of them whole chunks.
    WriteMany(Vec<(u64, u64, u64)>),
    Read {
        blk: u64,
        n: u64,
    },
    Discard {
        blk: u64,
        n: u64,
    },
    Flush,
    Close,
    Crash,
}

/// A write of `write_many`: whole chunks (of `per_chunk` blocks) three times in four, the
/// kind it writes side by side, else any blocks.
fn many_write(blocks: u64, per_chunk: u64) -> impl Strategy<Value = (u64, u64, u64)> {
    let chunks = blocks / per_chunk;
    prop_oneof![
        3 => (0..chunks, 1..4u64, any::<u64>()).prop_map(move |(c, k, seed)| {
            (c * per_chunk, k.min(chunks - c) * per_chunk, seed)
        }),
        1 => (0..blocks, 1..20u64, any::<u64>())
            .prop_map(move |(blk, n, seed)| (blk, n.min(blocks - blk), seed)),
    ]
}

fn op(blocks: u64, per_chunk: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..blocks, 1..40u64, any::<u64>(), proptest::bool::weighted(0.1))
            .prop_map(move |(blk, n, seed, fua)| Op::Write { blk, n: n.min(blocks - blk), seed, fua }),
        3 => proptest::collection::vec(many_write(blocks, per_chunk), 1..12).prop_map(Op::WriteMany),
        3 => (0..blocks, 1..64u64).prop_map(move |(blk, n)| Op::Read { blk, n: n.min(blocks - blk) }),
        2 => (0..blocks, 1..64u64).prop_map(move |(blk, n)| Op::Discard { blk, n: n.min(blocks - blk) }),
        1 => Just(Op::Flush),
        1 => Just(Op::Close),
        1 => Just(Op::Crash),
    ]
}

fn run_model(bs: u32, chunk: u32, blocks: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let size = (blocks * u64::from(bs)) as usize;
    let (golden, gbytes) = golden_mem(size, bs);
    let b = bs as usize;
    let mut o = Some(Overlay::create(dir.path(), golden.clone(), opts(chunk)).unwrap());
    // `model` is what the client sees; `durable` what must survive a crash.
    let mut model = gbytes.clone();
    let mut durable = gbytes.clone();
    for op in ops {
        let ov = o.as_ref().unwrap();
        match op {
            Op::Write { blk, n, seed, fua } => {
                let d = pattern(n as usize * b, seed);
                ov.write_at(&d, blk * u64::from(bs), fua).unwrap();
                let s = blk as usize * b;
                model[s..s + d.len()].copy_from_slice(&d);
                if fua {
                    // FUA makes everything written so far durable (we flush all).
                    durable = model.clone();
                }
            }
            Op::WriteMany(writes) => {
                let data: Vec<(u64, Vec<u8>)> = writes
                    .iter()
                    .map(|&(blk, n, seed)| (blk * u64::from(bs), pattern(n as usize * b, seed)))
                    .collect();
                let refs: Vec<(u64, &[u8])> = data.iter().map(|(o, d)| (*o, &d[..])).collect();
                ov.write_many(&refs).unwrap();
                for (o, d) in &data {
                    model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                }
            }
            Op::Read { blk, n } => {
                let mut got = vec![0u8; n as usize * b];
                ov.read_at(&mut got, blk * u64::from(bs)).unwrap();
                let s = blk as usize * b;
                prop_assert_eq!(&got[..], &model[s..s + got.len()]);
            }
            Op::Discard { blk, n } => {
                ov.discard(blk * u64::from(bs), n * u64::from(bs)).unwrap();
                let s = blk as usize * b;
                model[s..s + n as usize * b].fill(0);
            }
            Op::Flush => {
                ov.flush().unwrap();
                durable = model.clone();
            }
            Op::Close => {
                o.take().unwrap().close().unwrap();
                durable = model.clone();
                o = Some(Overlay::open(dir.path(), golden.clone()).unwrap());
                prop_assert_eq!(read_all(o.as_ref().unwrap()), model.clone());
            }
            Op::Crash => {
                o.take().unwrap().simulate_crash();
                let rep = Overlay::check(dir.path()).unwrap();
                prop_assert!(rep.is_clean(), "{:?}", rep);
                let re = Overlay::open(dir.path(), golden.clone()).unwrap();
                let got = read_all(&re);
                // Every chunk reads its flushed content or its latest content.
                for (i, c) in got.chunks(chunk as usize).enumerate() {
                    let r = i * chunk as usize..i * chunk as usize + c.len();
                    prop_assert!(
                        c == &durable[r.clone()] || c == &model[r.clone()],
                        "chunk {} is neither flushed nor latest",
                        i
                    );
                }
                model = got.clone();
                durable = got;
                o = Some(re);
            }
        }
    }
    let ov = o.take().unwrap();
    prop_assert_eq!(read_all(&ov), model);
    let mut g = vec![0u8; size];
    golden.read_at(&mut g, 0).unwrap();
    prop_assert_eq!(g, gbytes);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn model_512_blocks(ops in proptest::collection::vec(op(300, 8), 1..50)) {
        run_model(512, 4096, 300, ops)?;
    }

    #[test]
    fn model_4096_blocks(ops in proptest::collection::vec(op(70, 2), 1..50)) {
        run_model(4096, 8192, 70, ops)?;
    }
}

/// A real `kill -9`: a child process (this test binary, re-run) writes and flushes in a loop,
/// reporting each flushed write on stdout; the parent kills it mid-stream, then reopens the
/// overlay and checks every reported write survived.
#[test]
fn kill_dash_nine_child() {
    const ENV: &str = "DISKLESS_OVERLAY_CHILD_DIR";
    const BLOCKS: u64 = 512;
    let golden_at = |dir: &Path| -> Arc<dyn BlockStore> {
        Arc::new(FileStore::open(&dir.join("golden.img"), 512, true).unwrap())
    };
    if let Ok(dir) = std::env::var(ENV) {
        // Child: never returns normally; the parent kills it.
        use std::io::Write;
        let dir = Path::new(&dir);
        let o = Overlay::open(&dir.join("ov"), golden_at(dir)).unwrap();
        let mut out = std::io::stdout();
        for i in 0u64.. {
            let blk = i % BLOCKS;
            o.write_at(&pattern(512, i), blk * 512, false).unwrap();
            if i % 3 == 0 {
                o.discard(((i * 7) % BLOCKS) / 8 * 4096, 4096).unwrap();
            }
            o.flush().unwrap();
            writeln!(out, "{i}").unwrap();
            out.flush().unwrap();
            // Unflushed noise that may or may not survive.
            o.write_at(&[0xEE; 512], ((i * 13) % BLOCKS) * 512, false)
                .unwrap();
        }
        return;
    }
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("golden.img"),
        pattern(BLOCKS as usize * 512, 1),
    )
    .unwrap();
    Overlay::create(&dir.path().join("ov"), golden_at(dir.path()), opts(4096))
        .unwrap()
        .close()
        .unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kill_dash_nine_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last = None;
    for line in lines.by_ref() {
        if let Ok(n) = line.unwrap().trim().parse::<u64>() {
            last = Some(n);
            if n >= 700 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The child ran on until the kill: what it reported meanwhile is still in the pipe, and
    // its last report bounds what it did (one more write and its noise at most).
    for line in lines {
        if let Ok(n) = line.unwrap_or_default().trim().parse::<u64>() {
            last = Some(n);
        }
    }
    let last = last.expect("child reported nothing");
    assert!(Overlay::check(&dir.path().join("ov")).unwrap().is_clean());
    let o = Overlay::open(&dir.path().join("ov"), golden_at(dir.path())).unwrap();
    // For each block, the last write reported flushed must be there unless a later write
    // (flushed or not, or a discard) may have replaced it.
    for blk in 0..BLOCKS {
        let Some(i) = (0..=last).rev().find(|i| i % BLOCKS == blk) else {
            continue;
        };
        let later_noise = (i..=last + 1).any(|j| (j * 13) % BLOCKS == blk);
        let later_discard = (i..=last + 1).any(|j| j % 3 == 0 && ((j * 7) % BLOCKS) / 8 == blk / 8);
        let mut b = [0u8; 512];
        o.read_at(&mut b, blk * 512).unwrap();
        if !later_noise && !later_discard {
            assert_eq!(b.to_vec(), pattern(512, i), "block {blk}, write {i} lost");
        }
    }
}

/// The overlay behind the SCSI layer: writes, UNMAP reading back zeroes, GET LBA STATUS,
/// and SYNCHRONIZE CACHE making writes survive a crash.
#[test]
fn serves_as_a_logical_unit() {
    use diskless::scsi::{status, LogicalUnit, LuIdentity, Nexus};
    let dir = tempfile::tempdir().unwrap();
    let (golden, gbytes) = golden_mem(256 * 512, 512);
    let ov = Arc::new(Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap());
    let lu = LogicalUnit::new(
        ov.clone(),
        LuIdentity {
            vendor: "DISKLESS".into(),
            product: "OVERLAY".into(),
            revision: "0001".into(),
            serial: "OV1".into(),
            naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        },
    );
    let n = Nexus {
        id: 1,
        initiator_port: "iqn.test:c1,i,0x000000000001".into(),
        initiator_name: "iqn.test:c1".into(),
        relative_port: 1,
        target_port: String::new(),
    };
    let run = |c: &[u8], d: &[u8]| {
        let mut c = c.to_vec();
        c.resize(16, 0);
        let _ = lu.transfer(&c);
        let r = lu.execute(&n, &c, d);
        assert_eq!(r.status, status::GOOD, "{r:?}");
        r
    };
    // Until the first UNIT ATTENTION is consumed.
    let mut c = [0u8; 16];
    let _ = lu.execute(&n, &c, &[]);
    // WRITE(10) 3 blocks at LBA 5, then SYNCHRONIZE CACHE(10).
    run(&[0x2a, 0, 0, 0, 0, 5, 0, 0, 3, 0], &[7u8; 1536]);
    run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    let r = run(&[0x28, 0, 0, 0, 0, 4, 0, 0, 5, 0], &[]);
    assert_eq!(&r.data_in[..512], &gbytes[4 * 512..5 * 512]);
    assert_eq!(&r.data_in[512..2048], &[7u8; 1536][..]);
    // UNMAP LBAs 16..48 (whole 4 KiB chunks): zeroes and deallocated.
    let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
    p.extend_from_slice(&16u64.to_be_bytes());
    p.extend_from_slice(&32u32.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    run(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p);
    let r = run(&[0x28, 0, 0, 0, 0, 16, 0, 0, 32, 0], &[]);
    assert!(r.data_in.iter().all(|&x| x == 0));
    c = [0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 24, 0, 0];
    let st = run(&c, &[]);
    assert_eq!(&st.data_in[16..20], &32u32.to_be_bytes());
    assert_eq!(st.data_in[20], 1, "deallocated");
    drop(lu);
    // SYNCHRONIZE CACHE made the write durable; the unmap was not flushed.
    Arc::try_unwrap(ov).ok().unwrap().simulate_crash();
    let o = Overlay::open(dir.path(), golden).unwrap();
    let mut b = vec![0u8; 1536];
    o.read_at(&mut b, 5 * 512).unwrap();
    assert_eq!(b, vec![7u8; 1536]);
}

/// Group commit: FUA writes from many threads at once (most of them find their ticket covered
/// by another thread's flush) are all durable after a crash, and an UNMAP made durable only by
/// a later SYNCHRONIZE CACHE (no write in between: no new write ticket) is journaled too.
#[test]
fn group_committed_fua_writes_and_unmaps_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, gbytes) = golden_mem(4 << 20, 512);
    let o = Arc::new(Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap());
    const THREADS: u64 = 8;
    const PER: u64 = 48;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let o = o.clone();
            std::thread::spawn(move || {
                for i in 0..PER {
                    // Thread t owns chunks t, t + THREADS, ...: every write is a first touch.
                    let chunk = i * THREADS + t;
                    let data = pattern(4096, chunk + 100);
                    // Every other write is FUA; the rest are plain and may be lost.
                    o.write_at(&data, chunk * 4096, i % 2 == 0).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    o.flush().unwrap();
    // An unmap of golden chunks, then SYNCHRONIZE CACHE with no write since the last flush.
    let unmap_at = 2 << 20;
    o.discard(unmap_at, 64 * 1024).unwrap();
    o.flush().unwrap();
    // Plain writes after the last flush: may be lost, must not damage anything.
    o.write_at(&pattern(4096, 7), 3 << 20, false).unwrap();
    let o = Arc::into_inner(o).unwrap();
    o.simulate_crash();
    assert!(Overlay::check(dir.path()).unwrap().is_clean());
    let o = Overlay::open(dir.path(), golden).unwrap();
    let got = read_all(&o);
    for chunk in 0..THREADS * PER {
        let at = (chunk * 4096) as usize;
        assert_eq!(
            got[at..at + 4096],
            pattern(4096, chunk + 100)[..],
            "chunk {chunk} (flushed) lost"
        );
    }
    let u = unmap_at as usize;
    assert!(got[u..u + 64 * 1024].iter().all(|&b| b == 0), "unmap lost");
    let last = 3 << 20;
    assert!(
        got[last..last + 4096] == gbytes[last..last + 4096]
            || got[last..last + 4096] == pattern(4096, 7)[..]
    );
}

/// A version 1 overlay directory as the old code wrote it (chunks at their own offset in a
/// device-sized data file, 24-byte snapshot extents, 32-byte journal records): overlays on
/// operators' disks must still open, read what they held, and keep working (format v2 maps
/// them to the slots of their own index and appends new chunks after them).
#[test]
fn opens_a_version_1_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 256 * 1024usize;
    let (golden, mut model) = golden_mem(size, 512);
    let le64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    // Snapshot: chunks 2..4 overlay, 10..12 zero; generation 5, last_seq 9.
    let id = b"golden-test";
    let mut m = b"DLOVMETA".to_vec();
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&512u32.to_le_bytes());
    le64(&mut m, size as u64);
    m.extend_from_slice(&4096u32.to_le_bytes());
    m.extend_from_slice(&(id.len() as u32 + 1).to_le_bytes());
    le64(&mut m, 5);
    le64(&mut m, 9);
    le64(&mut m, 2);
    m.resize(64, 0);
    m.extend_from_slice(id);
    for (s, e, st) in [(2u64, 4u64, 1u8), (10, 12, 2)] {
        le64(&mut m, s);
        le64(&mut m, e);
        m.push(st);
        m.extend_from_slice(&[0; 7]);
    }
    let crc = crc32c::crc32c(&m);
    m.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(d.join("overlay.meta"), &m).unwrap();
    // Journal of generation 5: chunk 20 became overlay (seq 10), chunk 3 golden (seq 11).
    let mut j = b"DLOVJRNL".to_vec();
    le64(&mut j, 5);
    j.resize(28, 0);
    let crc = crc32c::crc32c(&j);
    j.extend_from_slice(&crc.to_le_bytes());
    for (seq, s, n, st) in [(10u64, 20u64, 1u64, 1u8), (11, 3, 1, 0)] {
        let at = j.len();
        le64(&mut j, seq);
        le64(&mut j, s);
        le64(&mut j, n);
        j.push(st);
        j.extend_from_slice(&[0; 3]);
        let crc = crc32c::crc32c(&j[at..]);
        j.extend_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(d.join("overlay.journal"), &j).unwrap();
    // Data file: device-sized, chunks at their own offset.
    let mut data = vec![0u8; size];
    for c in [2usize, 20] {
        let p = pattern(4096, 100 + c as u64);
        data[c * 4096..][..4096].copy_from_slice(&p);
        model[c * 4096..][..4096].copy_from_slice(&p);
    }
    data[3 * 4096..][..4096].fill(0xee); // stale: chunk 3 went back to golden
    model[10 * 4096..12 * 4096].fill(0);
    std::fs::write(d.join("overlay.data"), &data).unwrap();

    let rep = Overlay::check(d).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(
        (rep.version, rep.journal_records, rep.chunks_written),
        (1, 2, 2)
    );
    let o = Overlay::open_with_id(d, golden.clone(), Some("golden-test")).unwrap();
    assert_eq!(read_all(&o), model);
    // New first touches go to slots after the device-sized identity region.
    let w = pattern(8192, 7);
    o.write_at(&w, 40 * 4096, false).unwrap();
    model[40 * 4096..][..8192].copy_from_slice(&w);
    o.write_at(&[9u8; 512], 2 * 4096 + 512, false).unwrap(); // rewrite of an identity chunk
    model[2 * 4096 + 512..][..512].fill(9);
    o.flush().unwrap();
    assert_eq!(read_all(&o), model);
    assert_eq!(o.stats().data_slots, 64 + 2);
    drop(o);
    let rep = Overlay::check(d).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!((rep.version, rep.chunks_written), (2, 4));
    assert_eq!(rep.data_file_size, (64 + 2) * 4096);
    let o = Overlay::open(d, golden.clone()).unwrap();
    assert_eq!(read_all(&o), model);
    // Reset starts the slots from 0.
    o.reset().unwrap();
    assert_eq!(o.stats().data_slots, 0);
    o.write_at(&w, 0, true).unwrap();
    drop(o);
    assert_eq!(Overlay::check(d).unwrap().data_file_size, 8192);
}

/// First touches in write order share one run of slots (the map stays small for a client that
/// writes sequentially) and the data file holds exactly the slots handed out.
#[test]
fn dense_slots_are_taken_in_write_order() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, mut model) = golden_mem(1 << 20, 512);
    let o = Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap();
    // Backwards, chunk by chunk: chunk 200 gets slot 0, 199 slot 1, ...
    for c in (100..=200u64).rev() {
        let p = pattern(4096, c);
        o.write_at(&p, c * 4096, false).unwrap();
        model[(c * 4096) as usize..][..4096].copy_from_slice(&p);
    }
    // Forwards: one run.
    for c in 0..50u64 {
        let p = pattern(4096, 1000 + c);
        o.write_at(&p, c * 4096, false).unwrap();
        model[(c * 4096) as usize..][..4096].copy_from_slice(&p);
    }
    let st = o.stats();
    assert_eq!((st.chunks_written, st.data_slots), (151, 151));
    assert!(st.extents <= 102, "{st:?}");
    // An unmapped chunk keeps its slot: written again, it goes back there (no new slot).
    o.discard(10 * 4096, 4096).unwrap();
    model[10 * 4096..11 * 4096].fill(0);
    o.write_at(&[4u8; 512], 10 * 4096, false).unwrap();
    model[10 * 4096..10 * 4096 + 512].fill(4);
    assert_eq!(o.stats().data_slots, 151);
    assert_eq!(read_all(&o), model);
    o.flush().unwrap();
    drop(o);
    let rep = Overlay::check(dir.path()).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.data_file_size, 151 * 4096);
    let o = Overlay::open(dir.path(), golden).unwrap();
    assert_eq!(read_all(&o), model);
}

/// Changes nobody asked to be durable are flushed on their own once the oldest is old
/// enough (writeback.rs; 35 s by default, 100 ms here), so a crash after that keeps them.
#[test]
fn old_changes_are_flushed_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, mut model) = golden_mem(256 * 1024, 512);
    let o = Overlay::create(dir.path(), golden.clone(), opts(4096)).unwrap();
    o.set_writeback_age(std::time::Duration::from_millis(100));
    let p = pattern(4096, 11);
    o.write_at(&p, 8 * 4096, false).unwrap();
    model[8 * 4096..9 * 4096].copy_from_slice(&p);
    o.discard(16 * 4096, 2 * 4096).unwrap();
    model[16 * 4096..18 * 4096].fill(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while o.stats().pending_records > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not flushed on its own: {:?}",
            o.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    o.simulate_crash();
    let o = Overlay::open(dir.path(), golden).unwrap();
    assert_eq!(o.chunk_state(8 * 4096).unwrap(), ChunkState::Overlay);
    assert_eq!(o.chunk_state(16 * 4096).unwrap(), ChunkState::Zero);
    assert_eq!(read_all(&o), model);
}
