//! Hot-path micro benchmarks. Smoke-run only: `cargo bench --bench hotpaths -- --quick`.
//! To add a bench: write `fn bench_x(c: &mut Criterion)` and list it in `criterion_group!`.
use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use diskless::pdu::{self, Bhs, DataIn, Digests, Pdu, ScsiCommand};

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

criterion_group!(
    benches,
    bench_decode_scsi_cmd,
    bench_encode_data_in_header,
    bench_crc32c_8k,
);
criterion_main!(benches);
