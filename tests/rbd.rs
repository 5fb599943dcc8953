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
