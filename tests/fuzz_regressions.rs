//! Fuzz regressions without cargo-fuzz: the harnesses of `fuzz/src/lib.rs` (the very code the
//! cargo-fuzz targets run) fed the seed corpora and every input a fuzzer once crashed on.
//! Add a crash as `const` bytes plus a `#[test]` calling the same harness (docs/security.md).

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
        })
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

#[test]
fn pdu_decode_seeds() {
    for (name, data) in seeds("pdu_decode") {
        eprintln!("{name}");
        harness::pdu_decode(&data);
    }
}

#[test]
fn pdu_decode_seeds_are_valid_pdus() {
    // The seeds are real PDUs: each decodes, so the fuzzer starts past the parser's gates.
    use bytes::Bytes;
    use diskless::pdu::{decode, Digests};
    for (name, data) in seeds("pdu_decode") {
        let flags = data[0];
        let d = Digests {
            header: flags & 1 != 0,
            data: flags & 2 != 0,
        };
        let r = decode(Bytes::copy_from_slice(&data[1..]), d);
        assert!(r.is_ok(), "{name}: {r:?}");
    }
}

#[test]
fn text_keys_seeds() {
    for (name, data) in seeds("text_keys") {
        assert!(diskless::login::keys::parse(&data).is_ok(), "{name}");
        harness::text_keys(&data);
    }
}

#[test]
fn login_sequence_seeds() {
    for (name, data) in seeds("login_sequence") {
        eprintln!("{name}");
        harness::login_sequence(&data);
    }
}

#[test]
fn login_seeds_log_in() {
    // The login seeds model real clients: each must reach the full-feature phase, including
    // the CHAP ones (the harness computes CHAP_R), or the fuzzer would start from failures.
    for (name, data) in seeds("login_sequence") {
        if data[0] & 1 != 0 {
            continue;
        }
        let mut input = harness::Input::new(&data[1..]);
        let params = harness::login_phase(&mut input, std::sync::Arc::new(harness::TestDirectory));
        assert!(params.is_some(), "{name} did not log in");
    }
}

#[test]
fn scsi_cdb_seeds() {
    for (name, data) in seeds("scsi_cdb") {
        eprintln!("{name}");
        harness::scsi_cdb(&data);
    }
}

#[test]
fn empty_and_tiny_inputs() {
    for data in [&[][..], &[0], &[0xff], &[7; 3], &[0x80, 0x10]] {
        harness::pdu_decode(data);
        harness::text_keys(data);
        harness::login_sequence(data);
        harness::scsi_cdb(data);
    }
}

#[test]
fn scsi_seeds_mostly_succeed() {
    // Print each seed command's outcome; the boot-path seeds must be all GOOD.
    for (name, data) in seeds("scsi_cdb") {
        let mut results = Vec::new();
        harness::scsi_run(&data, &mut |cdb, r| {
            let sense = r.sense.as_deref().and_then(harness::sense_triple);
            eprintln!("{name}: {cdb:02x?} -> {:#x} {sense:x?}", r.status);
            results.push(r.status);
        });
        if name.ends_with("ipxe_boot") || name.ends_with("linux_probe") {
            assert!(results.iter().all(|&s| s == 0), "{name}: {results:?}");
        }
    }
}

/// scsi_cdb, 2026-11-25 (a harness false positive, kept as a regression of the data check):
/// WRITE(10) of 16 blocks with no Data-Out at all is GOOD and writes nothing, because a
/// Data-Out cut short by the transport writes only the whole blocks received (FCP-4 §9.4.2).
const SCSI_SHORT_WRITE: &[u8] = &[
    0x80, 0x00, 0x00, 0x00, 0x80, 0x0a, 0x2a, 0x00, 0x00, 0x00, 0x00, 0x70, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00,
];

#[test]
fn scsi_short_write_data_out() {
    harness::scsi_cdb(SCSI_SHORT_WRITE);
}

#[test]
fn dhcp_packet_seeds() {
    for (name, data) in seeds("dhcp_packet") {
        eprintln!("{name}");
        harness::dhcp_packet(&data);
    }
}

#[test]
fn tftp_packet_seeds() {
    for (name, data) in seeds("tftp_packet") {
        eprintln!("{name}");
        harness::tftp_packet(&data);
    }
}

/// dhcp_packet, 60 s run: two adjacent option 94 (3 bytes each) that dhcproto concatenates
/// (RFC 3396) into one of 6 bytes, then debug-asserts a length of 3. The precheck now sums
/// adjacent runs.
const DHCP_CONCATENATED_OPTION_94: &[u8] = &[
    0x01, 0x01, 0x01, 0x06, 0x00, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x52, 0x54, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x2b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x3d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x63, 0x82, 0x53,
    0x63, 0x35, 0x01, 0x03, 0x5d, 0x02, 0x00, 0x00, 0x3c, 0x20, 0x50, 0x65, 0x6e, 0x74, 0x3a, 0x41,
    0x72, 0x30, 0x30, 0x30, 0x3a, 0x55, 0x4e, 0x44, 0x49, 0x3a, 0x30, 0x30, 0x32, 0x30, 0x30, 0x31,
    0x61, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x5e, 0x03, 0x01, 0x02, 0x00, 0x5e, 0x03, 0x01, 0x02, 0x01, 0x34, 0x04, 0x0a,
    0x00, 0x00, 0x0a, 0x36, 0x04, 0x0a, 0x00, 0x00, 0x01, 0xff,
];

#[test]
fn dhcp_concatenated_option_94() {
    harness::dhcp_packet(DHCP_CONCATENATED_OPTION_94);
}
