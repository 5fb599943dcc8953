//! Full logins through `LoginMachine::step` and text exchanges through `TextMachine::step`,
//! modelled on what iPXE, libiscsi and open-iscsi send.

use diskless::login::chap::chap_response;
use diskless::login::keys;
use diskless::login::{
    AuthPolicy, ChapCredentials, Directory, LoginMachine, LoginOutcome, OurParams, SessionParams,
    SessionType, TargetEntry, TargetLookup, TextMachine, TextOutcome,
};
use diskless::pdu::{reject_reason, Bhs, LoginRequest, LoginResponse, Pdu, TextRequest};
use std::net::SocketAddr;
use std::sync::Arc;

const DISK: &str = "iqn.2026-01.test:disk1";
const CHAP: &str = "iqn.2026-01.test:chap";
const MUTUAL: &str = "iqn.2026-01.test:mutual";
const PRIVATE: &str = "iqn.2026-01.test:private";
const INIT: &str = "iqn.2026-01.host:pc1";
const VIP: &str = "iqn.2026-01.host:vip";

fn creds(mutual: bool) -> ChapCredentials {
    ChapCredentials {
        user: "alice".into(),
        secret: "alice-secret-1".into(),
        mutual: mutual.then(|| ("tgt".into(), "target-secret-2".into())),
    }
}

struct Dir {
    extra_targets: usize,
}

impl Directory for Dir {
    fn discovery_auth(&self, initiator: &str) -> AuthPolicy {
        if initiator == VIP {
            AuthPolicy::Chap(creds(false))
        } else {
            AuthPolicy::None
        }
    }
    fn lookup(&self, initiator: &str, target: &str) -> TargetLookup {
        match target {
            DISK => TargetLookup::Allowed(AuthPolicy::None),
            CHAP => TargetLookup::Allowed(AuthPolicy::Chap(creds(false))),
            MUTUAL => TargetLookup::Allowed(AuthPolicy::Chap(creds(true))),
            PRIVATE if initiator == VIP => TargetLookup::Allowed(AuthPolicy::None),
            PRIVATE => TargetLookup::NotAuthorized,
            _ => TargetLookup::NotFound,
        }
    }
    fn visible_targets(&self, initiator: &str, local: SocketAddr) -> Vec<TargetEntry> {
        let mut v: Vec<TargetEntry> = [DISK, CHAP, MUTUAL]
            .iter()
            .map(|n| TargetEntry {
                name: n.to_string(),
                addresses: vec![format!("{local},1")],
            })
            .collect();
        if initiator == VIP {
            v.push(TargetEntry {
                name: PRIVATE.into(),
                addresses: vec![format!("{local},1"), "[fd00::1]:3260,2".into()],
            });
        }
        for i in 0..self.extra_targets {
            v.push(TargetEntry {
                name: format!("iqn.2026-01.test:bulk-target-number-{i:04}"),
                addresses: vec![format!("{local},1")],
            });
        }
        v
    }
    fn target_alias(&self, target: &str) -> Option<String> {
        (target == DISK).then(|| "disk one".to_string())
    }
    fn portal_group_tag(&self, _local: SocketAddr) -> u16 {
        7
    }
}

fn local() -> SocketAddr {
    "192.0.2.10:3260".parse().unwrap()
}

fn machine() -> LoginMachine {
    LoginMachine::new(
        Arc::new(Dir { extra_targets: 0 }),
        OurParams::default(),
        local(),
    )
}

fn req(csg: u8, nsg: u8, transit: bool) -> LoginRequest {
    LoginRequest {
        transit,
        cont: false,
        csg,
        nsg,
        isid: [0x80, 0, 0, 0x12, 0x34, 1],
        itt: 0x1000,
        cid: 1,
        ..LoginRequest::default()
    }
}

fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
    let owned: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    keys::format(&owned)
}

fn bhs(p: &Pdu) -> &LoginResponse {
    match &p.bhs {
        Bhs::LoginResponse(r) => r,
        other => panic!("not a login response: {other:?}"),
    }
}

fn answers(p: &Pdu) -> Vec<(String, String)> {
    keys::parse(&p.data).unwrap()
}

fn get(p: &Pdu, k: &str) -> Option<String> {
    answers(p)
        .into_iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v)
}

fn cont(o: LoginOutcome) -> Pdu {
    match o {
        LoginOutcome::Continue(p) => {
            assert_eq!(bhs(&p).status_class, 0);
            p
        }
        other => panic!("expected Continue, got {other:?}"),
    }
}

fn complete(o: LoginOutcome) -> (Pdu, SessionParams) {
    match o {
        LoginOutcome::Complete(c) => {
            let r = bhs(&c.response);
            assert!(r.transit);
            assert_eq!(r.nsg, 3);
            assert_eq!(c.isid, [0x80, 0, 0, 0x12, 0x34, 1]);
            assert_eq!(c.cid, 1);
            (c.response, c.params)
        }
        other => panic!("expected Complete, got {other:?}"),
    }
}

fn failed(o: LoginOutcome) -> (u8, u8, Pdu) {
    match o {
        LoginOutcome::Failed(p) => {
            let r = bhs(&p);
            assert!(!r.transit);
            (r.status_class, r.status_detail, p)
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn status(o: LoginOutcome) -> (u8, u8) {
    let (c, d, _) = failed(o);
    (c, d)
}

#[test]
fn ipxe_like_login() {
    let mut m = machine();
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", DISK),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]),
    ));
    let h = bhs(&r);
    assert!(h.transit && h.csg == 0 && h.nsg == 1);
    assert_eq!(h.itt, 0x1000);
    assert_eq!(h.isid, [0x80, 0, 0, 0x12, 0x34, 1]);
    assert_eq!((h.version_max, h.version_active), (0, 0));
    assert_eq!(
        answers(&r),
        vec![
            ("AuthMethod".to_string(), "None".to_string()),
            ("TargetPortalGroupTag".into(), "7".into()),
            ("TargetAlias".into(), "disk one".into()),
        ]
    );
    let (r, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxConnections", "1"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
            ("MaxRecvDataSegmentLength", "8192"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("ErrorRecoveryLevel", "0"),
        ]),
    ));
    assert_eq!(bhs(&r).csg, 1);
    assert_eq!(get(&r, "ImmediateData").as_deref(), Some("No"));
    assert_eq!(get(&r, "InitialR2T").as_deref(), Some("Yes"));
    assert_eq!(get(&r, "FirstBurstLength").as_deref(), Some("Irrelevant"));
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(
        get(&r, "TargetPortalGroupTag"),
        None,
        "only in the first response"
    );
    assert_eq!(p.session_type, SessionType::Normal);
    assert_eq!(p.initiator_name, INIT);
    assert_eq!(p.target_name, DISK);
    assert!(p.initial_r2t && !p.immediate_data);
    assert!(!p.header_digest && !p.data_digest);
    assert_eq!(p.initiator_max_recv_data_segment_length, 8192);
    assert_eq!(p.target_max_recv_data_segment_length, 262_144);
    assert_eq!(p.max_burst_length, 262_144);
    assert_eq!(p.default_time2wait, 2);
    assert_eq!(p.default_time2retain, 0);
    // After completion the machine refuses more requests.
    assert_eq!(status(m.step(&req(1, 3, true), &[])), (2, 0));
}

#[test]
fn libiscsi_like_login() {
    let mut m = machine();
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("InitiatorAlias", "libiscsi"),
            ("TargetName", DISK),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]),
    ));
    assert!(bhs(&r).transit);
    let (r, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None,CRC32C"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
        ]),
    ));
    let a = answers(&r);
    let names: Vec<&str> = a.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "HeaderDigest",
            "DataDigest",
            "InitialR2T",
            "ImmediateData",
            "MaxBurstLength",
            "FirstBurstLength",
            "MaxOutstandingR2T",
            "ErrorRecoveryLevel",
            "MaxConnections",
            "IFMarker",
            "OFMarker",
            "MaxRecvDataSegmentLength",
        ],
        "answers in request order, then our declaration"
    );
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("None"));
    assert_eq!(get(&r, "OFMarker").as_deref(), Some("No"));
    assert!(!p.initial_r2t && p.immediate_data);
    assert_eq!(p.first_burst_length, 262_144);
    assert_eq!(p.initiator_max_recv_data_segment_length, 262_144);
    assert_eq!(p.initiator_alias.as_deref(), Some("libiscsi"));
}

#[test]
fn digests_chosen_in_initiator_order() {
    let mut m = machine();
    let (r, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", DISK),
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "CRC32C"),
        ]),
    ));
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("CRC32C"));
    assert!(p.header_digest && p.data_digest);
}

#[test]
fn open_iscsi_like_login_skips_security() {
    let mut m = machine();
    let (r, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("InitiatorAlias", "pc1"),
            ("TargetName", DISK),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("ErrorRecoveryLevel", "0"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("MaxOutstandingR2T", "1"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("MaxRecvDataSegmentLength", "262144"),
        ]),
    ));
    assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("7"));
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("1048576"));
    assert_eq!(p.max_burst_length, 1_048_576);
    assert_eq!(p.default_time2retain, 0);
}

#[test]
fn defaults_when_initiator_sends_nothing() {
    let mut m = machine();
    let (_, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", DISK)]),
    ));
    assert!(p.initial_r2t && p.immediate_data);
    assert_eq!(p.max_burst_length, 262_144);
    assert_eq!(p.first_burst_length, 65_536);
    assert_eq!(p.initiator_max_recv_data_segment_length, 8192);
    assert_eq!(p.max_outstanding_r2t, 1);
}

#[test]
fn stay_in_stage_without_transit() {
    let mut m = machine();
    let r = cont(m.step(
        &req(1, 3, false),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", DISK),
            ("MaxBurstLength", "65536"),
        ]),
    ));
    assert!(!bhs(&r).transit);
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
    let (r, p) = complete(m.step(&req(1, 3, true), &kv(&[("ImmediateData", "No")])));
    assert_eq!(get(&r, "ImmediateData").as_deref(), Some("No"));
    assert_eq!(p.max_burst_length, 65_536);
    assert!(!p.immediate_data);
}

/// Runs the CHAP exchange up to the target's challenge; returns (id, challenge).
fn chap_start(m: &mut LoginMachine, target: &str) -> (u8, Vec<u8>) {
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ]),
    ));
    assert!(!bhs(&r).transit, "no transit before CHAP is done");
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
    let r = cont(m.step(&req(0, 1, true), &kv(&[("CHAP_A", "5")])));
    assert!(!bhs(&r).transit);
    assert_eq!(get(&r, "CHAP_A").as_deref(), Some("5"));
    let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
    let c = keys::binary(&get(&r, "CHAP_C").unwrap()).unwrap();
    assert!(c.len() >= 16);
    (id, c)
}

#[test]
fn chap_one_way_right_secret() {
    let mut m = machine();
    let (id, c) = chap_start(&mut m, CHAP);
    let resp = keys::hex(&chap_response(id, b"alice-secret-1", &c));
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[("CHAP_N", "alice"), ("CHAP_R", &resp)]),
    ));
    let h = bhs(&r);
    assert!(h.transit && h.csg == 0 && h.nsg == 1);
    let (r, _) = complete(m.step(&req(1, 3, true), &kv(&[("ImmediateData", "Yes")])));
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
}

#[test]
fn chap_security_straight_to_full_feature() {
    let mut m = machine();
    let (id, c) = chap_start(&mut m, CHAP);
    let resp = keys::hex(&chap_response(id, b"alice-secret-1", &c));
    let mut r = req(0, 3, true);
    r.nsg = 3;
    let (p, params) = complete(m.step(&r, &kv(&[("CHAP_N", "alice"), ("CHAP_R", &resp)])));
    assert_eq!(bhs(&p).csg, 0);
    assert_eq!(
        get(&p, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(params.target_name, CHAP);
}

#[test]
fn chap_wrong_secret() {
    let mut m = machine();
    let (id, c) = chap_start(&mut m, CHAP);
    let resp = keys::hex(&chap_response(id, b"not-the-secret", &c));
    let o = m.step(
        &req(0, 1, true),
        &kv(&[("CHAP_N", "alice"), ("CHAP_R", &resp)]),
    );
    assert_eq!(status(o), (2, 1));
}

#[test]
fn chap_mutual_right_and_wrong() {
    let mut m = machine();
    let (id, c) = chap_start(&mut m, MUTUAL);
    let resp = keys::hex(&chap_response(id, b"alice-secret-1", &c));
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &resp),
            ("CHAP_I", "42"),
            ("CHAP_C", "0xa1a2a3a4a5a6a7a8a9aaabacadaeafb0"),
        ]),
    ));
    assert!(bhs(&r).transit);
    assert_eq!(get(&r, "CHAP_N").as_deref(), Some("tgt"));
    let theirs: Vec<u8> = (0xa1..=0xb0).collect();
    let expect = chap_response(42, b"target-secret-2", &theirs);
    assert_eq!(keys::binary(&get(&r, "CHAP_R").unwrap()).unwrap(), expect);
    // A wrong secret on the initiator side still fails even when it asks for mutual.
    let mut m = machine();
    let (id, c) = chap_start(&mut m, MUTUAL);
    let resp = keys::hex(&chap_response(id, b"wrong", &c));
    let o = m.step(
        &req(0, 1, true),
        &kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &resp),
            ("CHAP_I", "42"),
            ("CHAP_C", "0x0102"),
        ]),
    );
    let (_, _, p) = failed(o);
    assert_eq!((bhs(&p).status_class, bhs(&p).status_detail), (2, 1));
    assert_eq!(get(&p, "CHAP_R"), None, "no mutual answer after a failure");
}

#[test]
fn chap_reflection_refused() {
    let mut m = machine();
    let (id, c) = chap_start(&mut m, MUTUAL);
    let resp = keys::hex(&chap_response(id, b"alice-secret-1", &c));
    let o = m.step(
        &req(0, 1, true),
        &kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &resp),
            ("CHAP_I", &id.to_string()),
            ("CHAP_C", &keys::hex(&c)),
        ]),
    );
    assert_eq!(status(o), (2, 1));
}

#[test]
fn chap_mutual_not_configured_refused() {
    let mut m = machine();
    let (id, c) = chap_start(&mut m, CHAP);
    let resp = keys::hex(&chap_response(id, b"alice-secret-1", &c));
    let o = m.step(
        &req(0, 1, true),
        &kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &resp),
            ("CHAP_I", "3"),
            ("CHAP_C", "0x0102030405"),
        ]),
    );
    assert_eq!(status(o), (2, 1));
}

#[test]
fn chap_required_but_skipped() {
    // Straight to the operational stage.
    let mut m = machine();
    let o = m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", CHAP)]),
    );
    assert_eq!(status(o), (2, 1));
    // Offering only None.
    let mut m = machine();
    let o = m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", CHAP),
            ("AuthMethod", "None"),
        ]),
    );
    let (c, d, p) = failed(o);
    assert_eq!((c, d), (2, 1));
    assert_eq!(get(&p, "AuthMethod").as_deref(), Some("Reject"));
    // Asking to leave the security stage without any AuthMethod.
    let mut m = machine();
    let o = m.step(
        &req(0, 1, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", CHAP)]),
    );
    assert_eq!(status(o), (2, 1));
    // Jumping to CSG=1 in the middle of the CHAP exchange.
    let mut m = machine();
    chap_start(&mut m, CHAP);
    assert_eq!(status(m.step(&req(1, 3, true), &[])), (2, 1));
}

#[test]
fn chap_algorithm_not_acceptable() {
    let mut m = machine();
    cont(m.step(
        &req(0, 1, false),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", CHAP),
            ("AuthMethod", "CHAP"),
        ]),
    ));
    let (c, d, p) = failed(m.step(&req(0, 1, false), &kv(&[("CHAP_A", "6,7")])));
    assert_eq!((c, d), (2, 1));
    assert_eq!(get(&p, "CHAP_A").as_deref(), Some("Reject"));
}

#[test]
fn identification_failures() {
    type Case = (Vec<(&'static str, &'static str)>, (u8, u8));
    let cases: Vec<Case> = vec![
        (vec![("TargetName", DISK)], (2, 7)),
        (vec![("InitiatorName", INIT)], (2, 7)),
        (
            vec![("InitiatorName", INIT), ("TargetName", "iqn.nope")],
            (2, 3),
        ),
        (
            vec![("InitiatorName", INIT), ("TargetName", PRIVATE)],
            (2, 2),
        ),
        (
            vec![("InitiatorName", INIT), ("SessionType", "Weird")],
            (2, 9),
        ),
    ];
    for (keys_, want) in cases {
        let mut m = machine();
        assert_eq!(
            status(m.step(&req(0, 1, true), &kv(&keys_))),
            want,
            "{keys_:?}"
        );
    }
    // The authorized initiator gets in.
    let mut m = machine();
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", VIP),
            ("TargetName", PRIVATE),
            ("AuthMethod", "None"),
        ]),
    ));
    assert!(bhs(&r).transit);
}

#[test]
fn protocol_errors() {
    let first = kv(&[("InitiatorName", INIT), ("TargetName", DISK)]);
    // Unsupported version.
    let mut r = req(0, 1, true);
    r.version_min = 1;
    assert_eq!(status(machine().step(&r, &first)), (2, 5));
    // Malformed text.
    assert_eq!(
        status(machine().step(&req(0, 1, true), b"garbage\0")),
        (2, 0)
    );
    // NSG 2, NSG <= CSG, CSG 2/3.
    assert_eq!(status(machine().step(&req(0, 2, true), &first)), (2, 0));
    assert_eq!(status(machine().step(&req(1, 1, true), &first)), (2, 0));
    assert_eq!(status(machine().step(&req(3, 3, true), &first)), (2, 0));
    // T and C together.
    let mut r = req(0, 1, true);
    r.cont = true;
    assert_eq!(status(machine().step(&r, &first)), (2, 0));
    // Key negotiated twice.
    let mut m = machine();
    cont(m.step(
        &req(1, 3, false),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", DISK),
            ("MaxBurstLength", "65536"),
        ]),
    ));
    assert_eq!(
        status(m.step(&req(1, 3, true), &kv(&[("MaxBurstLength", "65536")]))),
        (2, 0)
    );
    // Security keys in the operational stage.
    let mut m = machine();
    let o = m.step(
        &req(1, 3, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", DISK),
            ("CHAP_A", "5"),
        ]),
    );
    assert_eq!(status(o), (2, 0));
    // Going back to the security stage.
    let mut m = machine();
    cont(m.step(
        &req(1, 3, false),
        &kv(&[("InitiatorName", INIT), ("TargetName", DISK)]),
    ));
    assert_eq!(status(m.step(&req(0, 1, true), &[])), (2, 0));
    // ISID changes mid-login.
    let mut m = machine();
    cont(m.step(
        &req(1, 3, false),
        &kv(&[("InitiatorName", INIT), ("TargetName", DISK)]),
    ));
    let mut r = req(1, 3, true);
    r.isid = [0; 6];
    assert_eq!(status(m.step(&r, &[])), (2, 0));
    // TargetName changes mid-login; a repeat of the same value is fine.
    let mut m = machine();
    cont(m.step(
        &req(0, 1, false),
        &kv(&[("InitiatorName", INIT), ("TargetName", DISK)]),
    ));
    cont(m.step(&req(0, 1, false), &kv(&[("TargetName", DISK)])));
    assert_eq!(
        status(m.step(&req(0, 1, false), &kv(&[("TargetName", CHAP)]))),
        (2, 0)
    );
}

#[test]
fn unknown_and_special_keys_in_login() {
    let mut m = machine();
    let (r, _) = complete(m.step(
        &req(1, 3, true),
        &kv(&[
            ("InitiatorName", INIT),
            ("TargetName", DISK),
            ("X-com.example.feature", "1"),
            ("NoSuchKey", "1"),
            ("TaskReporting", "RFC3720,ResponseFence"),
            ("iSCSIProtocolLevel", "1"),
            ("OFMarkInt", "2048~8192"),
            ("MaxBurstLength", "100"),
        ]),
    ));
    assert_eq!(
        get(&r, "X-com.example.feature").as_deref(),
        Some("NotUnderstood")
    );
    assert_eq!(get(&r, "NoSuchKey").as_deref(), Some("NotUnderstood"));
    assert_eq!(get(&r, "TaskReporting").as_deref(), Some("RFC3720"));
    assert_eq!(get(&r, "iSCSIProtocolLevel").as_deref(), Some("0"));
    assert_eq!(get(&r, "OFMarkInt").as_deref(), Some("Reject"));
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("Reject"));
}

#[test]
fn initiator_splits_keys_with_c_bit() {
    let mut m = machine();
    let all = kv(&[
        ("InitiatorName", INIT),
        ("TargetName", DISK),
        ("MaxBurstLength", "65536"),
    ]);
    // Split in the middle of a key.
    let (a, b) = all.split_at(20);
    let mut r = req(1, 3, false);
    r.cont = true;
    let p = cont(m.step(&r, a));
    let h = bhs(&p);
    assert!(!h.transit && !h.cont);
    assert!(p.data.is_empty());
    let (p, params) = complete(m.step(&req(1, 3, true), b));
    assert_eq!(get(&p, "MaxBurstLength").as_deref(), Some("65536"));
    assert_eq!(params.max_burst_length, 65_536);
}

#[test]
fn long_response_sent_in_pieces() {
    let mut m = machine();
    // 200 unknown keys with long names: ~15 KiB of NotUnderstood answers.
    let names: Vec<String> = (0..200)
        .map(|i| format!("X-com.example.a-rather-long-extension-key-name-{i:05}"))
        .collect();
    let mut pairs: Vec<(&str, &str)> = vec![("InitiatorName", INIT), ("TargetName", DISK)];
    pairs.extend(names.iter().map(|n| (n.as_str(), "1")));
    let text = kv(&pairs);
    assert!(text.len() > 8192);
    // The initiator's text itself needs two PDUs.
    let (a, b) = text.split_at(8000);
    let mut r = req(1, 3, false);
    r.cont = true;
    cont(m.step(&r, a));
    let first = cont(m.step(&req(1, 3, true), b));
    let h = bhs(&first);
    assert!(h.cont && !h.transit);
    assert_eq!(first.data.len(), 8192);
    // Empty requests fetch the rest.
    let (last, _) = complete(m.step(&req(1, 3, true), &[]));
    assert!(!bhs(&last).cont);
    let mut whole = first.data.to_vec();
    whole.extend_from_slice(&last.data);
    let got = keys::parse(&whole).unwrap();
    let tail: Vec<&String> = got.iter().skip(198).map(|(k, _)| k).collect();
    assert_eq!(got.len(), 200 + 3, "{tail:?}");
    assert_eq!(got[0].0, names[0]);
    assert_eq!(got[0].1, "NotUnderstood");
    assert!(got.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength"));
}

#[test]
fn data_while_fetching_rest_is_error() {
    let mut m = machine();
    let names: Vec<String> = (0..150)
        .map(|i| format!("X-com.example.a-rather-long-extension-key-name-{i:05}"))
        .collect();
    let mut pairs: Vec<(&str, &str)> = vec![("InitiatorName", INIT), ("TargetName", DISK)];
    pairs.extend(names.iter().map(|n| (n.as_str(), "1")));
    let text = kv(&pairs);
    let first = cont(m.step(&req(1, 3, true), &text));
    assert!(bhs(&first).cont);
    assert_eq!(
        status(m.step(&req(1, 3, true), &kv(&[("ImmediateData", "No")]))),
        (2, 0)
    );
}

fn discovery_login(initiator: &str) -> SessionParams {
    let mut m = machine();
    let (r, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[
            ("InitiatorName", initiator),
            ("SessionType", "Discovery"),
            ("InitialR2T", "No"),
            ("MaxRecvDataSegmentLength", "65536"),
        ]),
    ));
    assert_eq!(get(&r, "TargetPortalGroupTag"), None, "not for discovery");
    assert_eq!(get(&r, "InitialR2T").as_deref(), Some("Irrelevant"));
    assert_eq!(p.session_type, SessionType::Discovery);
    assert_eq!(p.target_name, "");
    p
}

fn text_req(ttt: u32) -> TextRequest {
    TextRequest {
        final_: true,
        itt: 0x2000,
        ttt,
        ..TextRequest::default()
    }
}

fn text_pdu(o: TextOutcome) -> Pdu {
    match o {
        TextOutcome::Respond(p) => p,
        other => panic!("expected Respond, got {other:?}"),
    }
}

fn tr(p: &Pdu) -> &diskless::pdu::TextResponse {
    match &p.bhs {
        Bhs::TextResponse(r) => r,
        other => panic!("not a text response: {other:?}"),
    }
}

fn names_in(p: &Pdu) -> Vec<String> {
    answers(p)
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .map(|(_, v)| v)
        .collect()
}

fn text_machine(extra: usize) -> TextMachine {
    TextMachine::new(
        Arc::new(Dir {
            extra_targets: extra,
        }),
        local(),
    )
}

#[test]
fn discovery_send_targets_filtered() {
    let p = discovery_login(INIT);
    let mut t = text_machine(0);
    let r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", "All")])));
    let h = tr(&r);
    assert!(h.final_ && !h.cont);
    assert_eq!(h.ttt, 0xffff_ffff);
    assert_eq!(h.itt, 0x2000);
    assert_eq!(names_in(&r), [DISK, CHAP, MUTUAL]);
    assert_eq!(
        answers(&r)[1],
        ("TargetAddress".to_string(), "192.0.2.10:3260,1".to_string())
    );
    // The VIP initiator (which logs in to discovery with CHAP) also sees the private target.
    let mut p = p;
    p.initiator_name = VIP.into();
    let r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", "All")])));
    assert_eq!(names_in(&r), [DISK, CHAP, MUTUAL, PRIVATE]);
    // By name; a hidden target yields nothing.
    let r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", PRIVATE)])));
    assert_eq!(names_in(&r), [PRIVATE]);
    assert_eq!(answers(&r).len(), 3);
    p.initiator_name = INIT.into();
    let r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", PRIVATE)])));
    assert!(r.data.is_empty());
}

#[test]
fn discovery_with_chap() {
    let mut m = machine();
    let r = cont(m.step(
        &req(0, 1, true),
        &kv(&[
            ("InitiatorName", VIP),
            ("SessionType", "Discovery"),
            ("AuthMethod", "CHAP"),
        ]),
    ));
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
    let mut m = machine();
    let o = m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", VIP), ("SessionType", "Discovery")]),
    );
    assert_eq!(status(o), (2, 1));
}

#[test]
fn normal_session_send_targets() {
    let mut m = machine();
    let (_, p) = complete(m.step(
        &req(1, 3, true),
        &kv(&[("InitiatorName", INIT), ("TargetName", DISK)]),
    ));
    let mut t = text_machine(0);
    let r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", "")])));
    assert_eq!(names_in(&r), [DISK]);
    let r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", "All")])));
    assert_eq!(names_in(&r).len(), 3);
    // Empty SendTargets in a discovery session is refused.
    let d = discovery_login(INIT);
    let r = text_pdu(t.step(&d, &text_req(0xffff_ffff), &kv(&[("SendTargets", "")])));
    assert_eq!(get(&r, "SendTargets").as_deref(), Some("Reject"));
}

#[test]
fn long_send_targets_in_pieces_with_ttt() {
    let mut p = discovery_login(INIT);
    p.initiator_max_recv_data_segment_length = 512;
    let mut t = text_machine(40);
    let mut r = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", "All")])));
    let mut whole = Vec::new();
    let mut pieces = 0;
    loop {
        let h = tr(&r).clone();
        assert!(r.data.len() <= 512);
        whole.extend_from_slice(&r.data);
        pieces += 1;
        if h.final_ {
            assert!(!h.cont);
            assert_eq!(h.ttt, 0xffff_ffff);
            break;
        }
        assert!(h.cont);
        assert_ne!(h.ttt, 0xffff_ffff);
        let mut next = text_req(h.ttt);
        next.final_ = true;
        r = text_pdu(t.step(&p, &next, &[]));
        assert!(pieces < 100);
    }
    assert!(pieces > 2);
    let all = keys::parse(&whole).unwrap();
    assert_eq!(all.iter().filter(|(k, _)| k == "TargetName").count(), 43);

    // A new request (TTT=0xffffffff) resets; the stale tag is then refused.
    let first = text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", "All")])));
    let stale = tr(&first).ttt;
    text_pdu(t.step(&p, &text_req(0xffff_ffff), &kv(&[("SendTargets", DISK)])));
    assert!(matches!(
        t.step(&p, &text_req(stale), &[]),
        TextOutcome::Reject(_)
    ));
}

#[test]
fn text_c_bit_from_initiator() {
    let p = discovery_login(INIT);
    let mut t = text_machine(0);
    let all = kv(&[("SendTargets", "All")]);
    let (a, b) = all.split_at(5);
    let mut r1 = text_req(0xffff_ffff);
    r1.final_ = false;
    r1.cont = true;
    let ack = text_pdu(t.step(&p, &r1, a));
    let h = tr(&ack);
    assert!(!h.final_ && ack.data.is_empty());
    assert_ne!(h.ttt, 0xffff_ffff);
    let r = text_pdu(t.step(&p, &text_req(h.ttt), b));
    assert_eq!(names_in(&r).len(), 3);
}

#[test]
fn text_renegotiation_and_rejects() {
    let p = discovery_login(INIT);
    let mut t = text_machine(0);
    match t.step(
        &p,
        &text_req(0xffff_ffff),
        &kv(&[("MaxRecvDataSegmentLength", "4096")]),
    ) {
        TextOutcome::Renegotiated(_, np) => {
            assert_eq!(np.initiator_max_recv_data_segment_length, 4096)
        }
        other => panic!("{other:?}"),
    }
    let r = text_pdu(t.step(
        &p,
        &text_req(0xffff_ffff),
        &kv(&[
            ("MaxBurstLength", "4096"),
            ("HeaderDigest", "CRC32C"),
            ("X-foo", "bar"),
            ("MaxRecvDataSegmentLength", "1"),
        ]),
    ));
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("Reject"));
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("Reject"));
    assert_eq!(get(&r, "X-foo").as_deref(), Some("NotUnderstood"));
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength").as_deref(),
        Some("Reject")
    );
    assert!(matches!(
        t.step(&p, &text_req(0xffff_ffff), b"broken\0"),
        TextOutcome::Reject(reject_reason::PROTOCOL_ERROR)
    ));
    let mut bad = text_req(0xffff_ffff);
    bad.cont = true;
    assert!(matches!(
        t.step(&p, &bad, &[]),
        TextOutcome::Reject(reject_reason::PROTOCOL_ERROR)
    ));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary requests never panic the login machine; every outcome is a login response.
        #[test]
        fn login_never_panics(
            steps in proptest::collection::vec(
                (any::<bool>(), any::<bool>(), 0u8..4, 0u8..4, 0u8..2,
                 proptest::collection::vec(any::<u8>(), 0..300)),
                1..6),
        ) {
            let mut m = machine();
            for (t, c, csg, nsg, vmin, data) in steps {
                let mut r = req(csg, nsg, t);
                r.cont = c;
                r.version_min = vmin;
                let pdu = match m.step(&r, &data) {
                    LoginOutcome::Continue(p) | LoginOutcome::Failed(p) => p,
                    LoginOutcome::Complete(c) => c.response,
                };
                prop_assert!(matches!(pdu.bhs, Bhs::LoginResponse(_)));
                prop_assert!(pdu.data.len() <= 8192);
            }
        }

        /// Well-formed but arbitrary key=value text never panics either.
        #[test]
        fn login_keys_never_panic(
            pairs in proptest::collection::vec(("[A-Za-z_#.-]{1,20}", "[ -~]{0,40}"), 0..30),
        ) {
            let mut all: Vec<(String, String)> = vec![
                ("InitiatorName".into(), INIT.into()),
                ("TargetName".into(), DISK.into()),
            ];
            all.extend(pairs);
            let mut m = machine();
            let _ = m.step(&req(0, 3, true), &keys::format(&all));
            let mut t = text_machine(0);
            let p = discovery_login(INIT);
            let _ = t.step(&p, &text_req(0xffff_ffff), &keys::format(&all));
        }
    }
}
