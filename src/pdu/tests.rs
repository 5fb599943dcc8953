//! Unit tests for the codec internals: digests, framing, AHS validation.
use super::*;
use bytes::{Bytes, BytesMut};

const BOTH: Digests = Digests {
    header: true,
    data: true,
};
const NONE: Digests = Digests {
    header: false,
    data: false,
};

fn enc(pdu: &Pdu, d: Digests) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(pdu, d, &mut out);
    out.to_vec()
}

fn read10() -> ScsiCommand {
    ScsiCommand {
        final_: true,
        read: true,
        attr: task_attr::SIMPLE,
        lun: lun_from_index(0),
        itt: 7,
        expected_data_transfer_length: 4096,
        cmd_sn: 1,
        exp_stat_sn: 2,
        cdb: vec![0x28, 0, 0, 0, 0, 0x10, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
        ..Default::default()
    }
}

#[test]
fn crc32c_rfc3720_b4_vectors() {
    // RFC 3720 Appendix B.4.
    assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    let inc: Vec<u8> = (0u8..32).collect();
    assert_eq!(crc32c::crc32c(&inc), 0x46DD_794E);
    let dec: Vec<u8> = (0u8..32).rev().collect();
    assert_eq!(crc32c::crc32c(&dec), 0x113F_DB5C);
}

#[test]
fn digest_is_little_endian_on_the_wire() {
    let pdu = Pdu {
        bhs: Bhs::NopIn(NopIn::default()),
        data: Bytes::from_static(&[0u8; 32]),
    };
    let wire = enc(&pdu, BOTH);
    // 32 zero bytes need no padding; the data digest is the last 4 bytes.
    assert_eq!(&wire[wire.len() - 4..], &[0xaa, 0x36, 0x91, 0x8a]);
    let hd = crc32c::crc32c(&wire[..48]).to_le_bytes();
    assert_eq!(&wire[48..52], &hd);
}

#[test]
fn trailer_pads_and_digests_padding() {
    let t = trailer(b"abcde", NONE);
    assert_eq!(&*t, &[0, 0, 0]);
    let t = trailer(b"abcde", BOTH);
    let crc = crc32c::crc32c(b"abcde\0\0\0").to_le_bytes();
    assert_eq!(&*t, &[0, 0, 0, crc[0], crc[1], crc[2], crc[3]]);
    assert!(trailer(b"", BOTH).is_empty());
    assert!(trailer(b"abcd", NONE).is_empty());
}

#[test]
fn encode_header_matches_encode_prefix() {
    for d in [NONE, BOTH] {
        let bhs = Bhs::DataIn(DataIn {
            final_: true,
            itt: 9,
            data_sn: 3,
            ..Default::default()
        });
        let data = Bytes::from_static(b"hello");
        let pdu = Pdu {
            bhs: bhs.clone(),
            data: data.clone(),
        };
        let wire = enc(&pdu, d);
        let mut v = encode_header(&bhs, 5, d).to_vec();
        v.extend_from_slice(&data);
        v.extend_from_slice(&trailer(&data, d));
        assert_eq!(v, wire);
    }
}

#[test]
fn every_prefix_is_incomplete_then_whole() {
    let pdu = Pdu {
        bhs: Bhs::ScsiCommand(read10()),
        data: Bytes::from_static(b"xyz"),
    };
    for d in [
        NONE,
        BOTH,
        Digests {
            header: true,
            data: false,
        },
    ] {
        let wire = enc(&pdu, d);
        for n in 0..wire.len() {
            assert_eq!(frame_length(&wire[..n], d, 8192), Ok(None), "prefix {n}");
        }
        assert_eq!(frame_length(&wire, d, 8192), Ok(Some(wire.len())));
        let mut longer = wire.clone();
        longer.extend_from_slice(&[0x55; 10]);
        assert_eq!(frame_length(&longer, d, 8192), Ok(Some(wire.len())));
        assert_eq!(decode(Bytes::from(wire), d).unwrap(), pdu);
    }
}

#[test]
fn header_digest_mismatch_is_caught_early() {
    let pdu = Pdu {
        bhs: Bhs::ScsiCommand(read10()),
        data: Bytes::from(vec![1u8; 100]),
    };
    let mut wire = enc(&pdu, BOTH);
    wire[20] ^= 1;
    // Only the header is needed to see it.
    assert_eq!(
        frame_length(&wire[..52], BOTH, 8192),
        Err(PduError::HeaderDigest)
    );
    assert_eq!(decode(Bytes::from(wire), BOTH), Err(PduError::HeaderDigest));
}

#[test]
fn data_digest_mismatch() {
    let pdu = Pdu {
        bhs: Bhs::DataOut(DataOut::default()),
        data: Bytes::from(vec![1u8; 10]),
    };
    let mut wire = enc(&pdu, BOTH);
    let n = wire.len();
    assert_eq!(frame_length(&wire, BOTH, 8192), Ok(Some(n)));
    wire[60] ^= 0x80;
    match decode(Bytes::from(wire), BOTH) {
        Err(PduError::DataDigest { frame_len, bhs }) => {
            assert_eq!(frame_len, n);
            assert_eq!(bhs[0], 0x05);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_length_refused_from_header_alone() {
    let mut bhs = [0u8; 48];
    bhs[0] = 0x01;
    bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    match frame_length(&bhs, NONE, 8192) {
        Err(PduError::DataSegmentTooLong { len, max, .. }) => {
            assert_eq!((len, max), (0xff_ffff, 8192));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(frame_length(&bhs[..47], NONE, 8192), Ok(None));
}

#[test]
fn unknown_opcode_reports_frame_len_when_whole() {
    let mut wire = vec![0u8; 48 + 8];
    wire[0] = 0x1c; // vendor-specific initiator opcode
    wire[7] = 5; // 5 data bytes + 3 pad
    assert_eq!(frame_length(&wire[..50], NONE, 8192), Ok(None));
    match frame_length(&wire, NONE, 8192) {
        Err(PduError::UnknownOpcode {
            opcode, frame_len, ..
        }) => assert_eq!((opcode, frame_len), (0x1c, 56)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decode(Bytes::from(wire), NONE),
        Err(PduError::UnknownOpcode { frame_len: 56, .. })
    ));
}

#[test]
fn extended_cdb_and_bidi_ahs_round_trip() {
    let mut cmd = read10();
    cmd.cdb = (0u8..32).collect();
    cmd.bidi_read_length = Some(0x1234_5678);
    let pdu = Pdu::header_only(Bhs::ScsiCommand(cmd));
    for d in [NONE, BOTH] {
        let wire = enc(&pdu, d);
        // Ext CDB AHS: 2+1+1+16 = 20 bytes; bidi: 8 bytes => 7 words.
        assert_eq!(wire[4], 7);
        assert_eq!(&wire[48..52], &[0, 17, 1, 0]);
        assert_eq!(&wire[68..76], &[0, 5, 2, 0, 0x12, 0x34, 0x56, 0x78]);
        assert_eq!(frame_length(&wire, d, 0), Ok(Some(wire.len())));
        assert_eq!(decode(Bytes::from(wire), d).unwrap(), pdu);
    }
}

#[test]
fn odd_extended_cdb_is_padded() {
    let mut cmd = read10();
    cmd.cdb = (0u8..19).collect(); // 3 extra bytes: AHSLength 4, 7 bytes, padded to 8
    let pdu = Pdu::header_only(Bhs::ScsiCommand(cmd));
    let wire = enc(&pdu, NONE);
    assert_eq!(wire[4], 2);
    assert_eq!(&wire[48..56], &[0, 4, 1, 0, 16, 17, 18, 0]);
    assert_eq!(decode(Bytes::from(wire), NONE).unwrap(), pdu);
}

fn with_ahs(ahs: &[u8], opcode: u8) -> Bytes {
    let mut wire = vec![0u8; 48];
    wire[0] = opcode;
    wire[4] = (ahs.len() / 4) as u8;
    wire.extend_from_slice(ahs);
    Bytes::from(wire)
}

fn reason(r: Result<Pdu, PduError>) -> &'static str {
    match r {
        Err(PduError::Malformed { reason, .. }) => reason,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn lying_ahs_is_malformed() {
    // AHSLength 9 overruns an 8-byte AHS area.
    assert_eq!(
        reason(decode(with_ahs(&[0, 9, 1, 0, 1, 2, 3, 4], 1), NONE)),
        "AHS overruns TotalAHSLength"
    );
    // Zero length.
    assert_eq!(
        reason(decode(with_ahs(&[0, 0, 1, 0], 1), NONE)),
        "zero-length AHS"
    );
    // Unknown type.
    assert_eq!(
        reason(decode(with_ahs(&[0, 1, 9, 0], 1), NONE)),
        "unknown AHS type"
    );
    // Bidi AHS with the wrong length.
    assert_eq!(
        reason(decode(with_ahs(&[0, 4, 2, 0, 1, 2, 3, 0], 1), NONE)),
        "bad Bidirectional Read AHS length"
    );
    // Extended CDB with only the reserved byte.
    assert_eq!(
        reason(decode(with_ahs(&[0, 1, 1, 0], 1), NONE)),
        "empty Extended CDB AHS"
    );
    // Duplicate bidi.
    assert_eq!(
        reason(decode(
            with_ahs(&[0, 5, 2, 0, 0, 0, 0, 1, 0, 5, 2, 0, 0, 0, 0, 2], 1),
            NONE
        )),
        "duplicate Bidirectional Read AHS"
    );
    // AHS on a NOP-Out.
    assert_eq!(
        reason(decode(with_ahs(&[0, 5, 2, 0, 0, 0, 0, 1], 0), NONE)),
        "AHS on a PDU that takes none"
    );
    // Malformed carries frame_len so the caller can skip it.
    assert!(matches!(
        decode(with_ahs(&[0, 1, 9, 0], 1), NONE),
        Err(PduError::Malformed {
            frame_len: Some(52),
            ..
        })
    ));
}

#[test]
fn wrong_frame_sizes_are_malformed_not_panics() {
    for n in 0..48 {
        assert!(matches!(
            decode(Bytes::from(vec![0u8; n]), BOTH),
            Err(PduError::Malformed { .. })
        ));
    }
    assert!(matches!(
        decode(Bytes::from(vec![0u8; 49]), NONE),
        Err(PduError::Malformed { .. })
    ));
}

#[test]
fn reserved_tags_and_fixed_bits() {
    let wire = enc(&Pdu::header_only(Bhs::Reject(Reject::default())), NONE);
    assert_eq!(&wire[..2], &[0x3f, 0x80]);
    assert_eq!(&wire[16..20], &[0xff; 4]);
    let wire = enc(
        &Pdu::header_only(Bhs::LoginRequest(LoginRequest::default())),
        NONE,
    );
    assert_eq!(wire[0], 0x43, "Login Request always has I set");
    let wire = enc(
        &Pdu::header_only(Bhs::AsyncMessage(AsyncMessage::default())),
        NONE,
    );
    assert_eq!(&wire[16..20], &[0xff; 4]);
}

#[test]
fn opcode_table() {
    for v in 0u8..=0x3f {
        if let Some(op) = Opcode::from_u8(v) {
            assert_eq!(op as u8, v);
            assert_eq!(op.is_initiator(), v < 0x20);
        }
    }
    assert_eq!(Opcode::from_u8(0x1c), None);
    assert_eq!(Opcode::from_u8(0x3c), None);
}

#[test]
fn bhs_accessors_and_error_frame_len() {
    let cmd = Bhs::ScsiCommand(read10());
    assert_eq!(cmd.itt(), 7);
    assert_eq!(cmd.cmd_sn(), Some(1));
    assert_eq!(cmd.exp_stat_sn(), Some(2));
    assert!(!cmd.immediate());
    assert!(Bhs::LoginRequest(LoginRequest::default()).immediate());
    assert_eq!(Bhs::Reject(Reject::default()).itt(), 0xffff_ffff);
    assert_eq!(Bhs::DataIn(DataIn::default()).cmd_sn(), None);
    assert_eq!(PduError::HeaderDigest.frame_len(), None);
    let e = PduError::UnknownOpcode {
        bhs: Box::new([0; BHS_LEN]),
        opcode: 0x1c,
        frame_len: 52,
    };
    assert_eq!(e.frame_len(), Some(52));
    assert_eq!(e.bhs().map(|b| b.len()), Some(BHS_LEN));
}
