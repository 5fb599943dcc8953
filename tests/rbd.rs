//! Ceph RBD client disks with fencing (issue 13; cargo feature `rbd`, so this file only
//! builds with `cargo test --features rbd --test rbd`). Against a real single-node Ceph
//! (tests/common/ceph.rs): node A takes an image's exclusive lock and writes; node B cannot
//! take the lock while A holds it; B fences A (breaks its lock, which blocklists A's RADOS
//! client) and takes over; A's next write fails; B reads what A had flushed.
#![cfg(feature = "rbd")]

#[path = "common/ceph.rs"]
mod ceph;
mod common;
#[path = "common/http.rs"]
mod http;

use ceph::Ceph;
use diskless::storage::rbd::{RbdDisk, RbdError};
use diskless::storage::BlockStore;

#[test]
fn exclusive_lock_and_fencing_by_blocklist() {
    common::require("rbd", "ceph-common");
    let ceph = Ceph::start();
    ceph.tool("ceph", &["osd", "pool", "create", "rbd", "8"])
        .ok();
    ceph.tool("rbd", &["pool", "init", "rbd"]).ok();
    ceph.tool(
        "rbd",
        &[
            "create",
            "--size",
            "16M",
            "--image-feature",
            "layering,exclusive-lock",
            "rbd/disk",
        ],
    )
    .ok();

    let a = RbdDisk::open(ceph.conf(), "admin", "rbd", "disk").expect("A opens the image");
    assert_eq!(a.size(), 16 << 20);
    a.lock().expect("A takes the exclusive lock");
    assert!(a.is_owner().unwrap());
    let first = common::random_bytes(64 << 10, 1);
    a.write_at(&first, 0, false).unwrap();
    a.flush().expect("A's write acknowledged durable");

    let b = RbdDisk::open(ceph.conf(), "admin", "rbd", "disk").expect("B opens the image");
    match b.lock() {
        Err(RbdError::Locked(owners)) => assert!(!owners.is_empty(), "owner named"),
        other => panic!("B took a lock A holds: {other:?}"),
    }
    assert!(!b.is_owner().unwrap());

    // A's node is declared dead (its etcd lease ran out): B fences it and takes over.
    let a_addrs = a.addrs().unwrap();
    let fenced = b.fence_and_lock().expect("B fences A and takes the lock");
    assert!(!fenced.is_empty());
    assert!(b.is_owner().unwrap());
    let list = ceph.tool("ceph", &["osd", "blocklist", "ls"]).ok();
    let a_addr = a_addrs
        .split(',')
        .next()
        .unwrap_or_default()
        .trim_start_matches("v2:");
    assert!(
        !a_addr.is_empty() && list.stdout.contains(a_addr),
        "A ({a_addrs}) is in the OSD blocklist: {}",
        list.stdout
    );

    // A is fenced: its writes fail, nothing of them reaches the disk.
    let late = common::random_bytes(64 << 10, 2);
    let r = a.write_at(&late, 0, true);
    assert!(r.is_err(), "a fenced client's write was acknowledged");
    eprintln!("measured: the fenced client's write failed with: {r:?}");
    let mut seen = vec![0u8; 64 << 10];
    b.read_at(&mut seen, 0).unwrap();
    assert!(seen == first, "B reads what A flushed, not A's late write");
    b.write_at(&late, 0, true).unwrap();
    b.read_at(&mut seen, 0).unwrap();
    assert!(seen == late);
}

/// The client disks `serve` uses (`RbdClientDisks`): a clone of the image's snapshot per
/// client, created at the first open; opened only when the owner check passes; a second
/// owner fences the first (whose writes then fail); a clone whose size differs from the
/// image is refused.
#[test]
fn client_disks_are_clones_locked_by_their_owner() {
    use diskless::storage::rbd::{client_image_name, RbdClientDisks, RbdConnect};
    use diskless::storage::{SharedDiskError, SharedDisks};
    common::require("rbd", "ceph-common");
    let ceph = Ceph::start();
    let tmp = tempfile::tempdir().unwrap();
    let golden = tmp.path().join("golden.img");
    let bytes = common::random_bytes(4 << 20, 3);
    std::fs::write(&golden, &bytes).unwrap();
    ceph.tool("ceph", &["osd", "pool", "create", "rbd", "8"])
        .ok();
    ceph.tool("rbd", &["pool", "init", "rbd"]).ok();
    ceph.tool("rbd", &["import", golden.to_str().unwrap(), "rbd/golden"])
        .ok();
    ceph.tool("rbd", &["snap", "create", "rbd/golden@v1"]).ok();
    ceph.tool("rbd", &["snap", "protect", "rbd/golden@v1"]).ok();
    let disks = || {
        RbdClientDisks::new(
            RbdConnect {
                conf: ceph.conf().to_path_buf(),
                id: "admin".into(),
                keyring: None,
                pool: "rbd".into(),
            },
            "t",
            [("g".to_string(), ("golden".to_string(), "v1".to_string()))].into(),
        )
    };
    let (a, b) = (disks(), disks());
    assert!(a.holds("g") && !a.holds("other"));
    let owner = || Ok(());
    let not_owner = || Err("the client is owned by node n2".to_string());
    let size = bytes.len() as u64;

    // Not the owner: nothing is created.
    match a.open("tgt", "iqn.x:c1", 0, "g", size, 512, &not_owner) {
        Err(SharedDiskError::NotOwner { why, .. }) => assert!(why.contains("n2")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened by a node that does not own the client"),
    }
    let name = client_image_name("t", "tgt", "iqn.x:c1");
    let ls = ceph.tool("rbd", &["ls", "rbd"]).ok();
    assert!(!ls.stdout.contains(&name), "{}", ls.stdout);

    // The owner: a new clone that reads as the golden image, locked.
    let (d1, created) = a
        .open("tgt", "iqn.x:c1", 0, "g", size, 512, &owner)
        .unwrap();
    assert!(created);
    let mut seen = vec![0u8; 64 << 10];
    d1.read_at(&mut seen, 0).unwrap();
    assert!(seen == bytes[..64 << 10]);
    let mine = common::random_bytes(4096, 4);
    d1.write_at(&mine, 8192, true).unwrap();
    assert!(!d1.fenced());
    let info = ceph.tool("rbd", &["info", &format!("rbd/{name}")]).ok();
    assert!(
        info.stdout.contains("parent: rbd/golden@v1"),
        "{}",
        info.stdout
    );

    // Another node asked to take the client: it fences the first, which can no longer write.
    let (d2, created) = b
        .open("tgt", "iqn.x:c1", 0, "g", size, 512, &owner)
        .unwrap();
    assert!(!created);
    assert!(d1.fenced(), "the first holder knows it lost the disk");
    assert!(d1.write_at(&mine, 0, true).is_err());
    let mut back = vec![0u8; 4096];
    d2.read_at(&mut back, 8192).unwrap();
    assert!(back == mine, "the acknowledged write is there");
    d2.read_at(&mut back, 0).unwrap();
    assert!(back == bytes[..4096], "the fenced write is not");

    // A data disk (LUN 1) of the same client: its own clone, named after LUN 0's, locked and
    // fenced apart from it (each disk has its own RADOS client).
    assert_eq!(
        b.disk_name("tgt", "iqn.x:c1", 1),
        Some(format!("rbd/{name}.lun1"))
    );
    let (l1, created) = b
        .open("tgt", "iqn.x:c1", 1, "g", size, 512, &owner)
        .unwrap();
    assert!(created, "LUN 1 is a clone of its own");
    let data = common::random_bytes(4096, 5);
    l1.write_at(&data, 0, true).unwrap();
    let (l1a, created) = a
        .open("tgt", "iqn.x:c1", 1, "g", size, 512, &owner)
        .unwrap();
    assert!(!created);
    assert!(l1.fenced(), "LUN 1's first holder is fenced");
    assert!(l1.write_at(&data, 4096, true).is_err());
    l1a.read_at(&mut back, 0).unwrap();
    assert!(back == data, "LUN 1's acknowledged write is there");
    d2.read_at(&mut back, 0).unwrap();
    assert!(back == bytes[..4096], "LUN 0 is another disk");
    assert!(!d2.fenced());

    // A clone of another size than the image (its snapshot is not the image): refused.
    match a.open("tgt", "iqn.x:c2", 0, "g", size + 512, 512, &owner) {
        Err(SharedDiskError::Failed { reason, .. }) => assert!(reason.contains("bytes")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a disk of the wrong size was served"),
    }
}
