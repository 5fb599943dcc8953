//! The cost of counting: what the data path pays per completed command with metrics on.
//! Smoke-run: `cargo bench --bench metrics -- --quick`.
//!
//! `metrics/command_done` is the whole per-command hook (a few relaxed atomic adds and one
//! histogram observation); `metrics/scsi_read_4k` is a 4 KiB READ(10) through the SCSI layer
//! from memory, the cheapest real command, for scale; `metrics/scsi_read_4k_counted` is the
//! same read with the hook, as the connection runs it.
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use diskless::metrics::Metrics;
use diskless::scsi::{LogicalUnit, LuIdentity, LunTable, Nexus};
use diskless::storage::MemStore;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn lun_table() -> LunTable {
    let store = MemStore::with_data(vec![0xa5u8; 64 << 20], 512, false);
    let lu = LogicalUnit::new(
        Arc::new(store),
        LuIdentity {
            vendor: "DISKLESS".into(),
            product: "bench".into(),
            revision: "0001".into(),
            serial: "bench0".into(),
            naa: [0x60; 16],
        },
    );
    LunTable::new(BTreeMap::from([(0u16, Arc::new(lu))]))
}

fn nexus() -> Nexus {
    Nexus {
        id: 1,
        initiator_port: "iqn.2026-11.bench:i,i,0x400027230001".into(),
        initiator_name: "iqn.2026-11.bench:i".into(),
        relative_port: 1,
        target_port: String::new(),
    }
}

fn bench_metrics(c: &mut Criterion) {
    let m = Arc::new(Metrics::new());
    let peer = "127.0.0.1:1".parse().expect("literal address");
    let mut rec = m.session_opened(
        1,
        "iqn.2026-11.bench:i",
        "iqn.2026-11.bench:t",
        [0, 2, 0x3d, 0, 0, 1],
        peer,
        "login",
    );
    c.bench_function("metrics/command_done", |b| {
        b.iter(|| {
            rec.command_done(
                black_box(0),
                black_box(0x28),
                black_box(4096),
                black_box(Duration::from_micros(30)),
            )
        })
    });
    let luns = lun_table();
    let nexus = nexus();
    let cdb = [0x28u8, 0, 0, 0, 0x10, 0, 0, 0, 8, 0];
    c.bench_function("metrics/scsi_read_4k", |b| {
        b.iter(|| luns.execute(&nexus, 0, black_box(&cdb), &[]))
    });
    c.bench_function("metrics/scsi_read_4k_counted", |b| {
        b.iter(|| {
            let t0 = Instant::now();
            let r = luns.execute(&nexus, 0, black_box(&cdb), &[]);
            rec.command_done(0, cdb[0], r.data_in.len() as u64, t0.elapsed());
            r
        })
    });
}

criterion_group!(benches, bench_metrics);
criterion_main!(benches);
