use super::*;
use proptest::prelude::*;

const BS: u32 = 512;
const BLOCKS: usize = 64;
const SIZE: u64 = BS as u64 * BLOCKS as u64;

fn stamp(m: &str) -> Stamp {
    Stamp {
        message: m.into(),
        author: "test".into(),
        time_ms: 1,
    }
}

/// A base image whose block i is filled with byte i+1 (block 3 left a hole).
fn new_image(state: &Path) -> (Images, Vec<u8>) {
    let images = Images::new(state);
    let staging = images.staging_path("img").expect("staging");
    let staged = staging.path.clone();
    let mut model = vec![0u8; SIZE as usize];
    for (i, b) in model.chunks_mut(BS as usize).enumerate() {
        if i != 3 {
            b.fill(i as u8 + 1);
        }
    }
    let f = File::create(&staged).expect("create");
    f.set_len(SIZE).expect("len");
    for (i, b) in model.chunks(BS as usize).enumerate() {
        if i != 3 {
            f.write_all_at(b, (i * BS as usize) as u64).expect("write");
        }
    }
    drop(f);
    images
        .create_from_file("img", &staged, BS, &stamp("base"))
        .expect("import");
    (images, model)
}

/// Per-block action of one commit: 0 none, 1 zero, 2.. data byte.
fn apply(images: &Images, parent: u64, model: &[u8], acts: &[u8]) -> (u64, Vec<u8>) {
    let mut next = model.to_vec();
    let v = images
        .commit_layer("img", parent, &stamp("c"), |w| {
            let mut i = 0;
            while i < acts.len() {
                let a = acts[i];
                let mut j = i + 1;
                while j < acts.len() && acts[j] == a {
                    j += 1;
                }
                let (s, e) = ((i * BS as usize) as u64, (j * BS as usize) as u64);
                match a {
                    0 => {}
                    1 => w.zero(s, e)?,
                    b => w.data(s, &vec![b; (e - s) as usize])?,
                }
                i = j;
            }
            Ok(())
        })
        .expect("commit");
    for (i, &a) in acts.iter().enumerate() {
        let blk = &mut next[i * BS as usize..(i + 1) * BS as usize];
        match a {
            0 => {}
            1 => blk.fill(0),
            b => blk.fill(b),
        }
    }
    (v, next)
}

fn read_all(images: &Images, v: u64) -> Vec<u8> {
    let s = images.open("img", v).expect("open");
    let mut buf = vec![0u8; SIZE as usize];
    s.read_at(&mut buf, 0).expect("read");
    buf
}

#[test]
fn merged_map_splits_runs() {
    let mut m = MergedMap::default();
    m.set(0, 100, Source::Layer { idx: 0, off: 1000 });
    m.set(40, 60, Source::Zero);
    assert_eq!(
        m.run_at(10, 200),
        (Some(Source::Layer { idx: 0, off: 1010 }), 40)
    );
    assert_eq!(m.run_at(50, 200), (Some(Source::Zero), 60));
    assert_eq!(
        m.run_at(70, 200),
        (Some(Source::Layer { idx: 0, off: 1070 }), 100)
    );
    assert_eq!(m.run_at(150, 200), (None, 200));
    m.set(30, 120, Source::Layer { idx: 1, off: 0 });
    assert_eq!(m.len(), 2);
    // A run that continues its neighbour's data merges with it.
    m.set(120, 130, Source::Layer { idx: 1, off: 90 });
    assert_eq!(m.len(), 2);
    assert_eq!(
        m.run_at(30, 200),
        (Some(Source::Layer { idx: 1, off: 0 }), 130)
    );
    m.set(130, 140, Source::Zero);
    m.set(140, 150, Source::Zero);
    assert_eq!(m.run_at(135, 200), (Some(Source::Zero), 150));
    assert_eq!(
        m.run_at(119, 200),
        (Some(Source::Layer { idx: 1, off: 89 }), 130)
    );
}

#[test]
fn spec_parsing() {
    assert_eq!(
        parse_spec("win11").expect("p"),
        ("win11".into(), Selector::Latest)
    );
    assert_eq!(
        parse_spec("win11@4").expect("p"),
        ("win11".into(), Selector::Version(4))
    );
    assert_eq!(
        parse_spec("win11:test").expect("p"),
        ("win11".into(), Selector::Channel("test".into()))
    );
    assert!(parse_spec("win11@x").is_err());
    assert!(parse_spec("../x").is_err());
    assert!(parse_spec("a:B").is_err());
}

#[test]
fn log_rollback_channels_gc_flatten() {
    let dir = tempfile::tempdir().expect("tmp");
    let (images, base) = new_image(dir.path());
    let mut acts = vec![0u8; BLOCKS];
    acts[1] = 9;
    let (v2, m2) = apply(&images, 1, &base, &acts);
    acts[1] = 0;
    acts[2] = 1;
    let (v3, m3) = apply(&images, v2, &m2, &acts);
    assert_eq!((v2, v3), (2, 3));
    assert_eq!(read_all(&images, 3), m3);
    images
        .set_channel("img", "production", Some(2))
        .expect("ch");
    let log = images.rollback("img", 2).expect("rollback");
    assert_eq!(log.resolve(&Selector::Latest).expect("r"), 2);
    // v3 is unpinned: collected unless in use.
    let r = images.gc("img", &BTreeSet::from([3])).expect("gc");
    assert!(r.removed_versions.is_empty());
    let r = images.gc("img", &BTreeSet::new()).expect("gc");
    assert_eq!(r.removed_versions, vec![3]);
    assert_eq!(r.removed_files, vec!["v3.layer".to_string()]);
    // A new commit never reuses 3.
    let (v4, m4) = apply(&images, 2, &m2, &acts);
    assert_eq!(v4, 4);
    assert_eq!(read_all(&images, 4), m4);
    // Flatten v4: same content, v1..v3 no longer needed by it; 2 stays (channel).
    let log = images.flatten("img", 4).expect("flatten");
    assert_eq!(log.get(4).expect("v4").kind, VersionKind::Base);
    assert_eq!(read_all(&images, 4), m4);
    images.set_channel("img", "production", None).expect("ch");
    let r = images.gc("img", &BTreeSet::new()).expect("gc");
    // head is 4 (commit moved it); its chain is itself now.
    assert_eq!(r.kept, vec![4]);
    assert_eq!(r.removed_versions, vec![1, 2]);
    assert_eq!(read_all(&images, 4), m4);
}

#[test]
fn orphans_of_an_interrupted_commit_are_collected() {
    let dir = tempfile::tempdir().expect("tmp");
    let (images, _) = new_image(dir.path());
    let d = images.dir("img");
    std::fs::write(d.join("v2.layer.partial"), b"torn").expect("w");
    std::fs::write(d.join("v2.layer"), b"not in the catalogue").expect("w");
    // An import in progress keeps its staged file; an abandoned one is collected.
    let busy = images.staging_path("img").expect("staging");
    std::fs::write(&busy.path, b"being written").expect("w");
    let r = images.gc("img", &BTreeSet::new()).expect("gc");
    assert_eq!(r.removed_files.len(), 2);
    assert!(busy.path.exists());
    drop(busy);
    let r = images.gc("img", &BTreeSet::new()).expect("gc");
    assert_eq!(r.removed_files.len(), 1, "{:?}", r.removed_files);
    assert!(d.join("v1.base").exists());
}

#[test]
fn damaged_layer_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let (images, base) = new_image(dir.path());
    let mut acts = vec![0u8; BLOCKS];
    acts[5] = 7;
    apply(&images, 1, &base, &acts);
    let p = images.dir("img").join("v2.layer");
    let f = OpenOptions::new().write(true).open(&p).expect("open");
    let len = f.metadata().expect("m").len();
    f.write_all_at(&[0xff], len - 10).expect("w");
    assert!(matches!(
        images.open("img", 2),
        Err(VersionError::Corrupt { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Chains (and branches) of 10+ versions read exactly like a reference model, whole and
    /// at unaligned offsets, also after flattening some of them.
    #[test]
    fn chains_match_the_model(
        commits in proptest::collection::vec(
            (any::<prop::sample::Index>(),
             proptest::collection::vec(prop_oneof![6 => Just(0u8), 1 => Just(1u8), 3 => 2u8..=255], BLOCKS)),
            10..15),
        flat in proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
        reads in proptest::collection::vec((0..SIZE, 1..3000u64), 1..20),
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let (images, base) = new_image(dir.path());
        let mut models: Vec<(u64, Vec<u8>)> = vec![(1, base)];
        for (i, (pick, acts)) in commits.iter().enumerate() {
            // Mostly extend the newest version; sometimes branch from an older one.
            let (parent, model) = if i >= 10 && i % 2 == 1 {
                models[pick.index(models.len())].clone()
            } else {
                models[models.len() - 1].clone()
            };
            let (v, m) = apply(&images, parent, &model, acts);
            models.push((v, m));
        }
        // The deepest chain has 10+ layers, read through one merged map.
        let deepest = models.iter().map(|(v, _)| images.log("img").expect("log").chain(*v).map_or(0, |c| c.len())).max();
        prop_assert!(deepest.unwrap_or(0) >= 11);
        for f in &flat {
            let (v, _) = models[f.index(models.len())];
            images.flatten("img", v).expect("flatten");
        }
        for (v, m) in &models {
            let s = images.open("img", *v).expect("open");
            let mut buf = vec![0u8; SIZE as usize];
            s.read_at(&mut buf, 0).expect("read");
            prop_assert_eq!(&buf, m, "version {}", v);
            for &(off, len) in &reads {
                let len = len.min(SIZE - off);
                let mut b = vec![0u8; len as usize];
                s.read_at(&mut b, off).expect("read");
                prop_assert_eq!(&b[..], &m[off as usize..(off + len) as usize]);
            }
        }
    }
}

/// A chain of `n` layers on the base (each writes a few blocks and zeroes one), with its
/// model.
fn deep_chain(images: &Images, base: &[u8], n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut models = vec![(1, base.to_vec())];
    for i in 0..n {
        let mut acts = vec![0u8; BLOCKS];
        acts[(i * 7) % BLOCKS] = 2 + i as u8;
        acts[(i * 7 + 1) % BLOCKS] = 2 + i as u8;
        acts[(i * 13 + 5) % BLOCKS] = 1;
        let (p, m) = models.last().cloned().expect("model");
        models.push(apply(images, p, &m, &acts));
    }
    models
}

fn flat_files(images: &Images) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(images.dir("img").join(flat::FLAT_DIR))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn flat_copy_is_found_at_start_and_partials_are_swept() {
    let dir = tempfile::tempdir().expect("tmp");
    let (images, base) = new_image(dir.path());
    let models = deep_chain(&images, &base, 5);
    let (v, m) = models.last().cloned().expect("model");
    {
        let s = images.open("img", v).expect("open");
        assert_eq!(s.depth(), 5);
        assert!(!s.is_flat());
        s.materialize_now(0).expect("materialize");
        assert!(s.is_flat());
    }
    let names = flat_files(&images);
    let uid = images
        .log("img")
        .expect("log")
        .get(v)
        .expect("v")
        .uid
        .clone();
    assert_eq!(names, vec![flat::flat_name(v, &uid)]);
    // A fresh open (every store of the version closed: a new process) uses it at once.
    let s = images.open("img", v).expect("open");
    assert!(s.is_flat());
    let mut buf = vec![0u8; SIZE as usize];
    s.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, m);
    drop(s);
    // A torn copy (wrong size) is derived data: deleted, the version reads its chain.
    let p = images.flat_path("img", v, &uid);
    std::fs::write(&p, b"torn").expect("w");
    let s = images.open("img", v).expect("open");
    assert!(!s.is_flat() && !p.exists());
    s.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, m);
    // A crash's partial (nobody holds it) goes at the next copy; the base version has no
    // slot at all.
    let stale = p.with_extension("flat.partial");
    std::fs::write(&stale, b"crash").expect("w");
    s.materialize_now(0).expect("materialize");
    assert!(!stale.exists());
    assert!(images.open("img", 1).expect("open").flat_path().is_none());
}

#[test]
fn gc_and_flatten_know_flat_copies() {
    let dir = tempfile::tempdir().expect("tmp");
    let (images, base) = new_image(dir.path());
    let models = deep_chain(&images, &base, 6);
    // Copies of v4 and v7 (the head).
    for v in [4, 7] {
        images
            .open("img", v)
            .expect("open")
            .materialize_now(0)
            .expect("m");
    }
    assert_eq!(flat_files(&images).len(), 2);
    // A partial held by a running copy stays; an abandoned one goes.
    let fd = images.dir("img").join(flat::FLAT_DIR);
    let held = fd.join("v9-x.flat.partial");
    let f = File::create(&held).expect("create");
    // SAFETY: a valid fd.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    std::fs::write(fd.join("v8-y.flat.partial"), b"crash").expect("w");
    // Everything is in use: only the abandoned partial goes.
    let r = images.gc("img", &BTreeSet::new()).expect("gc");
    assert!(r.removed_versions.is_empty());
    assert_eq!(r.removed_files, vec!["flat/v8-y.flat.partial".to_string()]);
    assert!(held.exists());
    drop(f);
    // Flatten v7 takes its flat copy as its base (no second copy).
    let log = images.flatten("img", 7).expect("flatten");
    assert_eq!(log.get(7).expect("v7").kind, VersionKind::Base);
    assert_eq!(read_all(&images, 7), models[6].1);
    assert_eq!(
        flat_files(&images).len(),
        2,
        "v4's copy and the held partial"
    );
    // v1..v6 are needed by nothing now: gone, with v4's flat copy and the free partial.
    let r = images.gc("img", &BTreeSet::new()).expect("gc");
    assert_eq!(r.removed_versions, vec![1, 2, 3, 4, 5, 6]);
    assert!(flat_files(&images).is_empty(), "{:?}", flat_files(&images));
    assert_eq!(read_all(&images, 7), models[6].1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    /// A deep version reads like the model before, during and after its background copy
    /// (each read from one source, the chain or the flat copy), and after a reopen.
    #[test]
    fn flat_copy_reads_match_the_model_before_during_after(
        commits in proptest::collection::vec(
            proptest::collection::vec(prop_oneof![6 => Just(0u8), 1 => Just(1u8), 3 => 2u8..=255], BLOCKS),
            10..13),
        reads in proptest::collection::vec((0..SIZE, 1..3000u64), 1..20),
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let (images, base) = new_image(dir.path());
        let mut model = base;
        let mut v = 1;
        for acts in &commits {
            (v, model) = apply(&images, v, &model, acts);
        }
        let check = |s: &VersionStore| -> Result<(), TestCaseError> {
            for &(off, len) in &reads {
                let len = len.min(SIZE - off);
                let mut b = vec![0u8; len as usize];
                s.read_at(&mut b, off).expect("read");
                prop_assert_eq!(&b[..], &model[off as usize..(off + len) as usize]);
            }
            Ok(())
        };
        let s = images.open("img", v).expect("open");
        prop_assert!(s.depth() >= 10);
        check(&s)?;
        // Slow enough (64 KiB/s for a 32 KiB image) that reads run during the copy.
        s.materialize_in_background(64 << 10);
        let t = std::time::Instant::now();
        let mut during = 0;
        while !s.is_flat() {
            check(&s)?;
            during += 1;
            prop_assert!(t.elapsed() < std::time::Duration::from_secs(30), "copy never finished");
        }
        prop_assert!(during > 0);
        check(&s)?;
        let mut all = vec![0u8; SIZE as usize];
        s.read_at(&mut all, 0).expect("read");
        prop_assert_eq!(&all, &model);
        drop(s);
        let s = images.open("img", v).expect("open");
        prop_assert!(s.is_flat());
        check(&s)?;
    }
}

#[test]
fn chain_reads_work_inside_try_nonblocking() {
    // A read across base, layer and zero runs, on the event loop's path (RWF_NOWAIT):
    // the files were just written, so the page cache serves it and the data is the model's.
    let dir = tempfile::tempdir().expect("tmp");
    let (images, base) = new_image(dir.path());
    let chain = deep_chain(&images, &base, 3);
    let (v, want) = chain.last().expect("chain").clone();
    let s = images.open("img", v).expect("open");
    assert!(s.map_runs() > 1, "a read crosses runs");
    let mut buf = vec![0u8; SIZE as usize];
    match crate::storage::try_nonblocking(|| s.read_at(&mut buf, 0)) {
        Some(r) => r.expect("read"),
        // A file system that cannot say (no RWF_NOWAIT): the blocking path reads it.
        None => s.read_at(&mut buf, 0).expect("read"),
    }
    assert_eq!(buf, want);
}
