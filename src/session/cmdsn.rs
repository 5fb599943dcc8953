//! The CmdSN window (RFC 7143 §4.2.2.1 and §3.2.2.1): commands are delivered in CmdSN order,
//! commands outside [ExpCmdSN, MaxCmdSN] are silently ignored, immediate commands bypass the
//! ordering. Sequence numbers compare with serial-number arithmetic (RFC 1982, 32 bits).
//! Pure: no sockets, no clock.

/// `a < b` in 32-bit serial arithmetic (RFC 1982 §3.2).
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// `a <= b` in 32-bit serial arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// What to do with an arriving command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Deliver now.
    Now,
    /// Inside the window but ahead of ExpCmdSN: hold until the gap fills.
    Hold,
    /// Outside the window: ignore silently (§4.2.2.1: "the target MUST silently ignore").
    Ignore,
}

#[derive(Debug, Clone)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    window: u32,
    /// The MaxCmdSN advertised so far; it never goes back (§4.2.2.1).
    max_cmd_sn: u32,
}

impl CmdWindow {
    /// `initial` is the CmdSN of the leading Login Request (§11.12.8: the first non-immediate
    /// command after login carries it).
    pub fn new(initial: u32, window: u32) -> Self {
        let window = window.max(1);
        CmdWindow {
            exp_cmd_sn: initial,
            window,
            max_cmd_sn: initial.wrapping_add(window - 1),
        }
    }

    /// The configured window size.
    pub fn window(&self) -> u32 {
        self.window
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// MaxCmdSN we advertise: at most ExpCmdSN + window - 1, less the commands still
    /// outstanding (see [`CmdWindow::set_busy`]).
    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn
    }

    /// `busy` commands have been delivered and not yet completed. The window counts them, so
    /// an initiator can never have more than `window` commands in the target (§4.2.2.1: the
    /// target's queuing capacity; MaxCmdSN = ExpCmdSN - 1 closes the window). MaxCmdSN only
    /// moves forward: a smaller value would be ignored by the initiator anyway.
    pub fn set_busy(&mut self, busy: u32) {
        let target = self
            .exp_cmd_sn
            .wrapping_add(self.window - busy.min(self.window))
            .wrapping_sub(1);
        if sn_lt(self.max_cmd_sn, target) {
            self.max_cmd_sn = target;
        }
    }

    /// The command with `cmd_sn`, just delivered, was rejected: §7.3 says its CmdSN MUST NOT
    /// be considered received, so ExpCmdSN goes back to it and the initiator plugs the gap by
    /// sending a command with that CmdSN again.
    pub fn retract(&mut self, cmd_sn: u32) {
        if self.exp_cmd_sn.wrapping_sub(1) == cmd_sn {
            self.exp_cmd_sn = cmd_sn;
        }
    }

    /// Decide about a command with `cmd_sn`; advances ExpCmdSN when it is delivered in order.
    pub fn admit(&mut self, cmd_sn: u32, immediate: bool) -> Admit {
        if immediate {
            // §3.2.2.1: immediate commands are not ordered and do not advance ExpCmdSN.
            return Admit::Now;
        }
        if sn_lt(self.max_cmd_sn, cmd_sn) {
            // Beyond MaxCmdSN, including ExpCmdSN itself while the window is closed.
            Admit::Ignore
        } else if cmd_sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            Admit::Now
        } else if sn_lt(self.exp_cmd_sn, cmd_sn) && sn_le(cmd_sn, self.max_cmd_sn) {
            Admit::Hold
        } else {
            Admit::Ignore
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(0xffff_fffe, 1));
        assert!(!sn_lt(1, 0xffff_fffe));
        assert!(sn_le(5, 5));
    }

    #[test]
    fn window_rules() {
        let mut w = CmdWindow::new(10, 4);
        assert_eq!(w.max_cmd_sn(), 13);
        assert_eq!(w.admit(9, false), Admit::Ignore); // too low
        assert_eq!(w.admit(14, false), Admit::Ignore); // too high
        assert_eq!(w.admit(12, false), Admit::Hold);
        assert_eq!(w.admit(10, false), Admit::Now);
        assert_eq!(w.exp_cmd_sn(), 11);
        assert_eq!(w.admit(99, true), Admit::Now); // immediate
        assert_eq!(w.exp_cmd_sn(), 11);
    }

    #[test]
    fn outstanding_commands_close_the_window() {
        let mut w = CmdWindow::new(10, 3);
        assert_eq!(w.admit(10, false), Admit::Now);
        w.set_busy(1);
        assert_eq!(w.max_cmd_sn(), 12);
        assert_eq!(w.admit(11, false), Admit::Now);
        assert_eq!(w.admit(12, false), Admit::Now);
        w.set_busy(3);
        assert_eq!(w.max_cmd_sn(), 12); // closed: ExpCmdSN - 1
        assert_eq!(w.admit(13, false), Admit::Ignore);
        w.set_busy(1);
        assert_eq!(w.max_cmd_sn(), 14);
        w.set_busy(3); // never back
        assert_eq!(w.max_cmd_sn(), 14);
        assert_eq!(w.admit(13, false), Admit::Now);
    }

    #[test]
    fn rejected_command_leaves_a_gap() {
        let mut w = CmdWindow::new(5, 8);
        assert_eq!(w.admit(5, false), Admit::Now);
        w.retract(5);
        assert_eq!(w.exp_cmd_sn(), 5);
        assert_eq!(w.admit(6, false), Admit::Hold);
        assert_eq!(w.admit(5, false), Admit::Now);
        w.retract(3); // not the last delivered one: no effect
        assert_eq!(w.exp_cmd_sn(), 6);
    }

    #[test]
    fn window_across_wrap() {
        let mut w = CmdWindow::new(u32::MAX, 8);
        assert_eq!(w.admit(u32::MAX, false), Admit::Now);
        assert_eq!(w.exp_cmd_sn(), 0);
        assert_eq!(w.admit(3, false), Admit::Hold);
    }
}
