//! The lifecycle model over event sequences: one test per row of the table in
//! docs/overlays.md ("When a client boots again"), and their variants.

use super::*;

const GAP: u64 = 3_000;
const SEC: u64 = 1_000;
const T0: u64 = 1_800_000_000_000;

fn ipxe(q: u8) -> Isid {
    [0x40, 0x00, 0x27, 0x23, 0x00, q]
}
fn open_iscsi(q: u8) -> Isid {
    [0x00, 0x02, 0x3d, 0x00, 0x00, q]
}
fn windows(q: u8) -> Isid {
    [0x40, 0x00, 0x01, 0x37, 0x00, q]
}
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// edk2 IScsiDxe's ISID for MAC 52:54:00:12:34:56: the same on every boot.
const UEFI: Isid = [0x12, 0x54, 0x00, 0x12, 0x34, 0x56];
/// A random-format ISID (T=10b) nobody fingerprints.
const ODD: Isid = [0x80, 0x11, 0x22, 0x33, 0x44, 0x55];

fn peer() -> IpAddr {
    "10.0.0.21".parse().unwrap()
}

fn volatile() -> Policy {
    Policy {
        discards: true,
        reboot_gap_ms: GAP,
        ..Policy::default()
    }
}

/// A client under test: the model plus a session counter and a clock.
struct Sim {
    l: Lifecycle,
    p: Policy,
    now: u64,
    next: u64,
}

impl Sim {
    fn new(p: Policy) -> Sim {
        let mut l = Lifecycle::default();
        // A new client's overlay is created empty: its first boot needs no discard.
        l.state.fresh = true;
        Sim {
            l,
            p,
            now: T0,
            next: 1,
        }
    }
    fn wait(&mut self, ms: u64) -> &mut Self {
        self.now += ms;
        self
    }
    fn login(&mut self, isid: Isid) -> (u64, Decision) {
        let s = self.next;
        self.next += 1;
        let d = self.l.apply(
            &self.p,
            Event::Login {
                session: s,
                isid,
                peer: peer(),
                keys: KeyHint::Unknown,
            },
            self.now,
        );
        if d.reset {
            self.l.reset_done();
        }
        (s, d)
    }
    fn end(&mut self, session: u64, how: End) -> Decision {
        self.l
            .apply(&self.p, Event::SessionEnd { session, how }, self.now)
    }
    fn fetch(&mut self, from: &str) -> Decision {
        let d = self.l.apply(
            &self.p,
            Event::ScriptFetch {
                from: from.parse().unwrap(),
            },
            self.now,
        );
        if d.reset {
            self.l.reset_done();
        }
        d
    }
    /// The server restarts: only the durable state survives (through its YAML form).
    fn restart(&mut self) -> Decision {
        let text = serde_yaml::to_string(&self.l.state).unwrap();
        let state: BootState = serde_yaml::from_str(&text).unwrap();
        let (l, d) = Lifecycle::load(state, self.now);
        self.l = l;
        d
    }
    /// A boot that has reached its OS: firmware login, hand-off (the firmware session
    /// dropped, UEFI-style, or left open, BIOS-style), OS login.
    fn boot(&mut self, fw: Isid, os: Isid, bios: bool) -> (u64, u64) {
        let (f, _) = self.login(fw);
        if !bios {
            self.wait(2 * SEC).end(f, End::Dropped);
        }
        let (o, d) = self.wait(SEC).login(os);
        assert!(!d.reset && !d.new_boot, "hand-off must keep: {d:?}");
        (f, o)
    }
}

fn assert_reset(d: &Decision) {
    assert!(d.new_boot && d.reset, "expected a reset: {d:?}");
}
fn assert_keep(d: &Decision) {
    assert!(!d.new_boot && !d.reset, "expected keep: {d:?}");
}

#[test]
fn fingerprints() {
    assert_eq!(fingerprint(&ipxe(1), None), Fingerprint::Ipxe);
    assert_eq!(fingerprint(&windows(1), None), Fingerprint::Microsoft);
    assert_eq!(fingerprint(&open_iscsi(1), None), Fingerprint::OpenIscsi);
    assert_eq!(fingerprint(&UEFI, Some(MAC)), Fingerprint::UefiMac);
    assert_eq!(uefi_isid(MAC), UEFI);
    assert_eq!(fingerprint(&UEFI, None), Fingerprint::OuiFirmwareShaped);
    assert_eq!(fingerprint(&ODD, None), Fingerprint::Unknown);
    assert!(is_firmware_isid(&ipxe(9)));
    assert!(!is_firmware_isid(&open_iscsi(1)));
}

#[test]
fn ipxe_bios_boot_reboot_after_the_gap() {
    let mut c = Sim::new(volatile());
    let (f, d) = c.login(ipxe(1));
    assert_eq!(c.l.state.boots, 1);
    assert!(d.new_boot);
    // BIOS hand-off: the firmware session stays open; the OS login reaps it.
    let (_, d) = c.wait(5 * SEC).login(open_iscsi(1));
    assert_keep(&d);
    assert_eq!(d.close, vec![ipxe(1)], "orphan firmware session not reaped");
    assert_eq!(c.l.state.phase, Phase::Os);
    // The reaped session's end arrives later and changes nothing.
    assert_keep(&c.end(f, End::Dropped));
    // Machine reset: the OS session goes silent; iPXE logs in after the gap.
    let d = c.wait(10 * SEC).login(ipxe(2)).1;
    assert_reset(&d);
    assert_eq!(d.close, vec![open_iscsi(1)], "stale OS session not closed");
    assert_eq!(c.l.state.boots, 2);
    assert_eq!(
        c.l.state.resets, 1,
        "the first boot had a fresh disk already"
    );
}

#[test]
fn uefi_same_isid_every_boot_clean_shutdown() {
    for mac in [Some(MAC), None] {
        let mut c = Sim::new(Policy { mac, ..volatile() });
        let (_, o) = c.boot(UEFI, open_iscsi(1), false);
        assert_eq!(c.l.state.firmware_isids, vec![hex(&UEFI)]);
        c.wait(60 * SEC).end(o, End::Logout);
        assert_eq!(c.l.state.phase, Phase::OsEnded);
        // Powered on again at once: the same ISID as last boot.
        let d = c.wait(SEC).login(UEFI).1;
        assert_reset(&d);
        assert!(matches!(d.reason, Reason::FirmwareAfterOs { .. }), "{d:?}");
    }
}

#[test]
fn uefi_hard_reset_with_the_os_session_open_and_silent() {
    let mut c = Sim::new(volatile());
    c.boot(UEFI, open_iscsi(1), false);
    let d = c.wait(SEC).login(UEFI).1;
    assert_reset(&d);
    assert_eq!(d.close, vec![open_iscsi(1)]);
}

#[test]
fn uefi_with_a_windows_os() {
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(UEFI, windows(1), false);
    assert_eq!(c.l.state.os_isids, vec![hex(&windows(1))]);
    c.wait(30 * SEC).end(o, End::Logout);
    assert_reset(&c.wait(2 * SEC).login(UEFI).1);
    // Hard reset variant.
    c.wait(2 * SEC).end(1000, End::Dropped);
    c.boot(UEFI, windows(1), false);
    assert_reset(&c.wait(SEC).login(UEFI).1);
}

#[test]
fn pinging_os_and_a_fast_reset_within_the_gap() {
    let mut c = Sim::new(volatile());
    c.boot(ipxe(1), open_iscsi(1), true);
    // The OS answered a ping a moment ago; iPXE logs in well inside the gap.
    let d = c.wait(GAP / 3).login(ipxe(2)).1;
    assert_reset(&d);
}

#[test]
fn clean_power_off_and_immediate_power_on() {
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
    c.wait(SEC).end(o, End::Logout);
    assert_reset(&c.wait(6 * SEC).login(ipxe(1)).1);
    // Hard reset (system_reset) and a 4 s delay: the connection drops without logout.
    let (o, _) = c.wait(SEC).login(open_iscsi(1));
    c.end(o, End::Dropped);
    assert_reset(&c.wait(4 * SEC).login(ipxe(1)).1);
}

#[test]
fn server_restart_between_boots() {
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(UEFI, open_iscsi(1), false);
    c.wait(SEC).end(o, End::Logout);
    let d = c.wait(SEC).restart();
    assert!(matches!(
        d.reason,
        Reason::ServerRestarted { interrupted: false }
    ));
    // Learned from the first boot: the firmware's ISID after the OS ended is a new boot.
    let d = c.wait(3600 * SEC).login(UEFI).1;
    assert_reset(&d);
    // And with a hard reset while the server was down.
    let mut c = Sim::new(volatile());
    c.boot(ODD, open_iscsi(1), false);
    c.restart();
    assert_reset(&c.wait(SEC).login(ODD).1);
}

#[test]
fn server_restart_mid_firmware_phase_keeps_the_disk() {
    for sigkill in [true, false] {
        let mut c = Sim::new(volatile());
        let (f, _) = c.login(ipxe(1));
        if !sigkill {
            c.end(f, End::ServerStop);
        }
        c.restart();
        assert!(c.l.state.interrupted);
        // The server was down far longer than the gap; iPXE logs in again.
        let d = c.wait(60 * SEC).login(ipxe(2)).1;
        assert_keep(&d);
        // ... and the boot goes on.
        assert_keep(&c.wait(SEC).login(open_iscsi(1)).1);
    }
}

#[test]
fn server_restart_while_the_os_runs_keeps_the_disk() {
    for how in [Some(End::ServerStop), Some(End::Logout), None] {
        let mut c = Sim::new(volatile());
        let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
        // SIGTERM: the server asks for a logout (the OS complies) or closes the connection;
        // SIGKILL: no end at all.
        if let Some(how) = how {
            c.end(o, how);
        }
        c.restart();
        let d = c.wait(120 * SEC).login(open_iscsi(1)).1;
        assert_keep(&d);
        assert!(matches!(d.reason, Reason::OsReturns { .. }), "{d:?}");
    }
}

#[test]
fn network_blip_keeps_the_disk_whatever_the_time() {
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(UEFI, open_iscsi(1), false);
    c.wait(SEC).end(o, End::Dropped);
    let d = c.wait(3600 * SEC).login(open_iscsi(1)).1;
    assert_keep(&d);
    // A session reinstatement (same ISID while the old one is live) too.
    let d = c.wait(SEC).login(open_iscsi(1)).1;
    assert_keep(&d);
    assert!(d.close.is_empty());
}

#[test]
fn idle_os_then_another_session_keeps_the_disk() {
    let mut c = Sim::new(volatile());
    c.boot(ipxe(1), open_iscsi(1), true);
    let d = c.wait(3 * 3600 * SEC).login(open_iscsi(2)).1;
    assert_keep(&d);
}

#[test]
fn foreign_script_fetch_while_the_client_runs_changes_nothing() {
    for policy in [
        volatile(),
        Policy {
            reset: ResetPolicy::OnScript,
            ..volatile()
        },
    ] {
        let mut c = Sim::new(policy);
        let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
        // Anyone, even from the client's own address, while its OS session is live.
        for from in ["10.0.0.99", "10.0.0.21"] {
            let d = c.wait(SEC).fetch(from);
            assert_keep(&d);
            assert!(d.close.is_empty());
            assert!(matches!(d.reason, Reason::ScriptIgnored { .. }), "{d:?}");
        }
        // During a blip, from another address: ignored.
        c.end(o, End::Dropped);
        let d = c.fetch("10.0.0.99");
        assert!(matches!(d.reason, Reason::ScriptIgnored { .. }), "{d:?}");
        assert_keep(&c.wait(SEC).login(open_iscsi(1)).1);
        assert_eq!(c.l.state.resets, 0);
    }
}

#[test]
fn plausible_fetch_is_weighed_with_the_next_login() {
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
    c.end(o, End::Dropped);
    // From the client's address with no OS session: evidence, but not a reset by itself.
    let d = c.fetch("10.0.0.21");
    assert_keep(&d);
    assert!(matches!(d.reason, Reason::Script { .. }), "{d:?}");
    // The OS comes back (it was a blip): the disk is kept.
    let (o, d) = c.wait(SEC).login(open_iscsi(1));
    assert_keep(&d);
    // Later a real boot: fetch, then a firmware nobody knows logs in within the gap.
    c.wait(SEC).end(o, End::Dropped);
    c.fetch("10.0.0.21");
    let d = c.wait(SEC).login(ODD).1;
    assert_reset(&d);
    assert!(matches!(d.reason, Reason::AfterScript { .. }), "{d:?}");
}

#[test]
fn ipxe_reconnect_in_the_firmware_phase_keeps_and_the_gap_breaks_ties() {
    let mut c = Sim::new(volatile());
    let (f, _) = c.login(ipxe(1));
    c.wait(SEC).end(f, End::Dropped);
    // iPXE gives up on a command and reconnects at once, with a new ISID.
    assert_keep(&c.wait(100).login(ipxe(2)).1);
    // A second firmware session beside a live one.
    assert_keep(&c.wait(100).login(ipxe(3)).1);
    // A boot that never reached its OS, then nothing for longer than the gap: tie-breaker.
    c.end(3, End::Dropped);
    c.end(2, End::Dropped);
    let d = c.wait(GAP + SEC).login(ipxe(4)).1;
    assert_reset(&d);
    assert!(matches!(d.reason, Reason::GapTieBreak { .. }), "{d:?}");
}

#[test]
fn ambiguous_unknown_isids_keep_the_disk() {
    let mut c = Sim::new(volatile());
    c.boot(ipxe(1), open_iscsi(1), true);
    // Unknown ISID beside the live OS session: kept whatever the time.
    let d = c.wait(3600 * SEC).login(ODD).1;
    assert_keep(&d);
    assert!(matches!(d.reason, Reason::Ambiguous { .. }), "{d:?}");
    // Within the gap of the last session's end: kept.
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
    c.end(o, End::Dropped);
    assert_keep(&c.wait(SEC).login(ODD).1);
    // Nothing live for longer than the gap: the tie-breaker calls it a new boot.
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
    c.end(o, End::Logout);
    assert_reset(&c.wait(GAP + SEC).login(ODD).1);
}

#[test]
fn unknown_firmware_is_learned_from_the_first_login() {
    let mut c = Sim::new(volatile());
    let (_, o) = c.boot(ODD, [0x80, 9, 9, 9, 9, 9], false);
    assert_eq!(c.l.state.firmware_isids, vec![hex(&ODD)]);
    assert_eq!(c.l.state.past_os_isids, vec![hex(&[0x80, 9, 9, 9, 9, 9])]);
    // Hard reset inside the gap: the learned firmware ISID decides, not the time.
    let _ = o;
    assert_reset(&c.wait(SEC).login(ODD).1);
}

#[test]
fn explicit_firmware_isid_prefix() {
    let p = Policy {
        firmware_isid: Some(vec![0x80, 0x11]),
        ..volatile()
    };
    let mut c = Sim::new(p);
    c.boot(ODD, open_iscsi(1), false);
    // Not the firmware's prefix: the OS's, even a never-seen one.
    assert_keep(&c.wait(SEC).login([0x80, 0x12, 0, 0, 0, 1]).1);
    assert_reset(&c.wait(SEC).login(ODD).1);
}

#[test]
fn on_script_and_manual_policies() {
    let mut c = Sim::new(Policy {
        reset: ResetPolicy::OnScript,
        ..volatile()
    });
    let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
    c.end(o, End::Logout);
    // A firmware login alone does not reset under on_script (a new boot is counted).
    let d = c.wait(SEC).login(ipxe(2)).1;
    assert!(d.new_boot && !d.reset, "{d:?}");
    c.end(4, End::Dropped);
    // The plausible fetch does.
    assert_reset(&c.wait(SEC).fetch("10.0.0.21"));

    let mut c = Sim::new(Policy {
        reset: ResetPolicy::Manual,
        ..volatile()
    });
    let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
    c.end(o, End::Logout);
    assert!(!c.wait(SEC).login(ipxe(2)).1.reset);
    assert!(!c.fetch("10.0.0.21").reset);
    let d = c.l.apply(&c.p, Event::OperatorReset, c.now);
    assert!(d.reset && !d.close.is_empty());
    assert_eq!(c.l.state.resets, 1);
}

#[test]
fn persistent_counts_boots_and_never_resets() {
    let mut c = Sim::new(Policy {
        discards: false,
        ..volatile()
    });
    for _ in 0..3 {
        let (_, o) = c.boot(ipxe(1), open_iscsi(1), true);
        c.end(o, End::Logout);
        c.wait(SEC);
    }
    assert_eq!(c.l.state.boots, 3);
    assert_eq!(c.l.state.resets, 0);
}

#[test]
fn boots_and_resets_are_counted_separately_and_history_is_bounded() {
    let mut c = Sim::new(volatile());
    for _ in 0..40 {
        let (_, o) = c.boot(ipxe(1), open_iscsi(1), false);
        c.wait(SEC).end(o, End::Logout);
    }
    assert_eq!(c.l.state.boots, 40);
    assert_eq!(c.l.state.resets, 39, "the first boot's disk was fresh");
    assert_eq!(c.l.state.history.len(), HISTORY);
    assert!(c
        .l
        .state
        .last_reset_reason
        .as_deref()
        .is_some_and(|r| r.contains("after the OS phase began")));
}

#[test]
fn a_reset_decided_before_a_crash_stays_pending() {
    let mut c = Sim::new(volatile());
    c.boot(ipxe(1), open_iscsi(1), true);
    let d = c.l.apply(
        &c.p,
        Event::Login {
            session: 99,
            isid: ipxe(2),
            peer: peer(),
            keys: KeyHint::Unknown,
        },
        c.now + SEC,
    );
    assert!(d.reset);
    // Crash before the overlay was reset: the pending flag survives the restart.
    c.restart();
    assert!(c.l.state.reset_pending);
}

#[test]
fn two_clients_are_independent() {
    let mut a = Sim::new(volatile());
    let mut b = Sim::new(volatile());
    a.boot(ipxe(1), open_iscsi(1), true);
    b.boot(ipxe(1), open_iscsi(1), true);
    assert_reset(&a.wait(SEC).login(ipxe(2)).1);
    assert_eq!(b.l.state.phase, Phase::Os);
    assert_eq!(b.l.state.resets, 0);
}

#[test]
fn login_key_shapes() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut edk2 = names(&["InitiatorName", "SessionType", "TargetName", "AuthMethod"]);
    edk2.extend(names(&EDK2_KEYS));
    assert_eq!(key_hint(&edk2), KeyHint::Edk2);
    let mut ipxe = names(&["InitiatorName", "TargetName", "SessionType", "AuthMethod"]);
    ipxe.extend(names(&IPXE_KEYS));
    assert_eq!(key_hint(&ipxe), KeyHint::Ipxe);
    let open_iscsi = names(&[
        "InitiatorName",
        "InitiatorAlias",
        "TargetName",
        "SessionType",
        "HeaderDigest",
        "DataDigest",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "IFMarker",
        "OFMarker",
        "ErrorRecoveryLevel",
    ]);
    assert_eq!(key_hint(&open_iscsi), KeyHint::Rfc3720Os);
    assert_eq!(
        key_hint(&names(&["InitiatorName", "HeaderDigest"])),
        KeyHint::Unknown
    );
}

#[test]
fn edk2_key_shape_recognises_a_firmware_nobody_learned() {
    // The state was lost mid-life (or predates the model): the client's OS phase is known,
    // its firmware ISID is not, and no MAC is configured. IScsiDxe's key sequence decides.
    let mut c = Sim::new(volatile());
    c.boot(ipxe(1), open_iscsi(1), true);
    let d = c.l.apply(
        &c.p,
        Event::Login {
            session: 50,
            isid: UEFI,
            peer: peer(),
            keys: KeyHint::Edk2,
        },
        c.now + SEC,
    );
    assert!(d.reset, "{d:?}");
    // Without the key shape the same login is ambiguous and keeps the disk.
    let mut c = Sim::new(volatile());
    c.boot(ipxe(1), open_iscsi(1), true);
    assert_keep(&c.wait(SEC).login(UEFI).1);
}
