//! Hot-path micro benchmarks. Smoke-run only: `cargo bench --bench hotpaths -- --quick`.
//! To add a bench: write `fn bench_x(c: &mut Criterion)` and list it in `criterion_group!`.
use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use diskless::login::{SessionParams, SessionType};
use diskless::pdu::{self, Bhs, DataIn, DataOut, Digests, Pdu, ScsiCommand};
use diskless::scsi::{LogicalUnit, LuIdentity, LunTable, Nexus};
use diskless::session::{Completion, Residual, WriteCollector};
use diskless::storage::MemStore;
use std::collections::BTreeMap;
use std::sync::Arc;

const BOTH: Digests = Digests {
    header: true,
    data: true,
};

fn read10_frame() -> Bytes {
    let cmd = ScsiCommand {
        final_: true,
        read: true,
        attr: pdu::task_attr::SIMPLE,
        itt: 0x1234,
        expected_data_transfer_length: 65536,
        cmd_sn: 10,
        exp_stat_sn: 9,
        cdb: vec![0x28, 0, 0, 0, 0x10, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0],
        ..Default::default()
    };
    let mut out = BytesMut::new();
    pdu::encode(&Pdu::header_only(Bhs::ScsiCommand(cmd)), BOTH, &mut out);
    out.freeze()
}

fn bench_decode_scsi_cmd(c: &mut Criterion) {
    let frame = read10_frame();
    c.bench_function("pdu/decode_scsi_cmd", |b| {
        b.iter(|| {
            let n = pdu::frame_length(black_box(&frame), BOTH, 262_144);
            let p = pdu::decode(black_box(frame.clone()), BOTH);
            (n, p)
        })
    });
}

fn bench_encode_data_in_header(c: &mut Criterion) {
    let bhs = Bhs::DataIn(DataIn {
        final_: true,
        status_present: true,
        itt: 0x1234,
        ttt: 0xffff_ffff,
        stat_sn: 9,
        exp_cmd_sn: 11,
        max_cmd_sn: 74,
        buffer_offset: 57344,
        ..Default::default()
    });
    c.bench_function("pdu/encode_data_in_header", |b| {
        b.iter(|| pdu::encode_header(black_box(&bhs), black_box(8192), BOTH))
    });
}

fn bench_crc32c_8k(c: &mut Criterion) {
    let data = vec![0xa5u8; 8192];
    let mut g = c.benchmark_group("pdu");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("crc32c_8k", |b| {
        b.iter(|| pdu::trailer(black_box(&data), BOTH))
    });
    g.finish();
}

/// Completion::into_pdus for a 128 KiB read: the Data-In split at the segment length a client
/// declared (8 KiB is the RFC 7143 default, 256 KiB what libiscsi offers).
fn bench_data_in_assemble(c: &mut Criterion) {
    let data = Bytes::from(vec![0x5au8; 128 * 1024]);
    let mut g = c.benchmark_group("data_in");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for (name, seg) in [
        ("assemble_128k/seg8k", 8192u32),
        ("assemble_128k/seg256k", 262_144),
    ] {
        let mut out = Vec::with_capacity(32);
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                Completion {
                    itt: 7,
                    lun: 0,
                    status: 0,
                    sense: None,
                    data: data.clone(),
                    residual: Residual::None,
                    r2t_count: 0,
                }
                .into_pdus(black_box(seg), 262_144, &mut out);
                out.len()
            })
        });
    }
    g.finish();
}

fn lun_table() -> LunTable {
    // 64 MiB of non-zero data so a read copies real bytes.
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
    let mut luns = BTreeMap::new();
    luns.insert(0u16, Arc::new(lu));
    LunTable::new(luns)
}

fn nexus() -> Nexus {
    Nexus {
        id: 1,
        initiator_port: "iqn.2026-11.test:bench,i,0x400001370000".into(),
        initiator_name: "iqn.2026-11.test:bench".into(),
        relative_port: 1,
        target_port: String::new(),
    }
}

/// LunTable::transfer + execute as the session calls them for one command.
fn bench_scsi(c: &mut Criterion) {
    let table = lun_table();
    let nx = nexus();
    // READ(10) LBA 0x1000, 8 blocks of 512 = 4 KiB.
    let read10 = [0x28u8, 0, 0, 0, 0x10, 0, 0, 0, 8, 0];
    // Standard INQUIRY, allocation length 96.
    let inquiry = [0x12u8, 0, 0, 0, 96, 0];
    let mut g = c.benchmark_group("scsi");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("read10_4k", |b| {
        b.iter(|| {
            let t = table.transfer(0, black_box(&read10));
            let r = table.execute(&nx, 0, black_box(&read10), &[]);
            (t.is_ok(), r.data_in.len())
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("inquiry", |b| {
        b.iter(|| {
            table
                .execute(&nx, 0, black_box(&inquiry), &[])
                .data_in
                .len()
        })
    });
    g.finish();
}

fn session_params() -> SessionParams {
    SessionParams {
        session_type: SessionType::Normal,
        initiator_name: "iqn.2026-11.test:bench".into(),
        initiator_alias: None,
        target_name: "iqn.2026-11.org.diskless:bench".into(),
        header_digest: false,
        data_digest: false,
        max_connections: 1,
        // libiscsi's offer (docs: InitialR2T=No, ImmediateData=Yes, 256 KiB bursts), but with
        // a first burst of 16 KiB so the rest of the 64 KiB comes through one R2T.
        initial_r2t: false,
        immediate_data: true,
        max_burst_length: 262_144,
        first_burst_length: 16_384,
        default_time2wait: 2,
        default_time2retain: 20,
        max_outstanding_r2t: 1,
        data_pdu_in_order: true,
        data_sequence_in_order: true,
        error_recovery_level: 0,
        initiator_max_recv_data_segment_length: 8192,
        target_max_recv_data_segment_length: 8192,
    }
}

/// WriteCollector for a 64 KiB write: 8 KiB immediate, 8 KiB unsolicited Data-Out, then one
/// R2T for the remaining 48 KiB answered with six 8 KiB Data-Out PDUs.
fn bench_write_collect(c: &mut Criterion) {
    let params = session_params();
    let chunk = vec![0x3cu8; 8192];
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Bytes(65536));
    g.bench_function("write_collect_64k", |b| {
        b.iter(|| {
            let mut w = WriteCollector::new(&params, 65536, 65536, black_box(&chunk))
                .map_err(|e| e.to_string())?;
            let unsol = DataOut {
                final_: true,
                itt: 9,
                ttt: 0xffff_ffff,
                buffer_offset: 8192,
                ..Default::default()
            };
            w.data_out(&params, &unsol, &chunk)
                .map_err(|e| e.to_string())?;
            let mut ttt = 100u32;
            let r2ts = w.next_r2ts(&params, 9, 0, || {
                ttt += 1;
                ttt
            });
            for r2t in &r2ts {
                let n = r2t.desired_data_transfer_length / 8192;
                for i in 0..n {
                    let hdr = DataOut {
                        final_: i + 1 == n,
                        itt: 9,
                        ttt: r2t.ttt,
                        data_sn: i,
                        buffer_offset: r2t.buffer_offset + i * 8192,
                        ..Default::default()
                    };
                    w.data_out(&params, &hdr, &chunk)
                        .map_err(|e| e.to_string())?;
                }
            }
            if !w.complete() {
                return Err("write not complete".to_string());
            }
            Ok(w.into_data().len())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_decode_scsi_cmd,
    bench_encode_data_in_header,
    bench_crc32c_8k,
    bench_data_in_assemble,
    bench_scsi,
    bench_write_collect,
);
criterion_main!(benches);
