//! When an overlay makes its waiting state changes durable without being asked (no FUA write,
//! no SYNCHRONIZE CACHE): the policy as a pure function of the queue's length and age, and the
//! thread that runs it for one overlay.
//!
//! The policy follows the kernel's own writeback of dirty pages, which is what a plain image
//! gets: data is written back once it has been dirty for `dirty_expire_centisecs` (30 s by
//! default) at the flusher's next wake-up (every 5 s), or earlier when too much is dirty. A
//! flush any sooner makes the overlay pay that writeback while the client still writes (a
//! first-touch pass with a flush every 16,384 changes ran at 0.6-0.7x the plain image, with
//! none inside the pass at 0.95-1.1x: docs/performance.md, eighth round) and buys nothing a
//! client was promised: only FUA writes and SYNCHRONIZE CACHE are acknowledged as durable.
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a state change may wait before a flush starts on its own: the kernel's 30 s
/// expiry of dirty data plus one 5 s flusher period, so that the data it points at is
/// usually written back already and the flush's fdatasync finds little to do.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(35);
/// Start a background flush once this many state changes wait (1 GiB of first touches in
/// 4 KiB chunks; 8 MiB of queued records).
pub(crate) const BACKGROUND_AT: usize = 1 << 18;
/// Flush in the writer itself past this many (the background flush cannot keep up): the
/// hard bound on the queue's memory, 16 MiB.
pub(crate) const MAX_PENDING: usize = 1 << 19;

/// What to do after a write or discard that was not asked to be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing now (the writeback thread keeps the age deadline).
    Nothing,
    /// Wake the writeback thread to flush now.
    Background,
    /// Flush in the writer: the queue is at its memory bound.
    Inline,
}

/// The policy: `pending` changes wait, the oldest for `age` (None: none waits).
pub(crate) fn due(pending: usize, age: Option<Duration>, max_age: Duration) -> Due {
    if pending > MAX_PENDING {
        Due::Inline
    } else if pending > BACKGROUND_AT || age.is_some_and(|a| a >= max_age) {
        Due::Background
    } else {
        Due::Nothing
    }
}

struct State {
    stop: bool,
    /// How long a change may wait (MAX_AGE unless a test sets another).
    max_age: Duration,
    /// Flush as soon as possible.
    kick: bool,
    /// Flush at this instant (the oldest waiting change's age limit).
    deadline: Option<Instant>,
}

/// One overlay's writeback thread: sleeps until kicked or until the oldest waiting change
/// reaches its age limit, then runs `flush` (the overlay's group commit). Stopped and joined
/// by [`Writeback::stop`], before the overlay closes, so nothing touches the overlay's
/// directory afterwards.
pub(crate) struct Writeback {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain flags: a panic while holding the lock leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writeback {
    /// Start the thread. `flush` makes every waiting change durable and returns when the
    /// oldest change still waiting was queued (None: none waits), so the next deadline can be
    /// set. If the thread cannot start (logged), the writer flushes itself whenever a
    /// flush is due (`Overlay::after_change`).
    pub(crate) fn start(
        name: &str,
        flush: impl Fn() -> Option<Instant> + Send + 'static,
    ) -> Writeback {
        let state = State {
            stop: false,
            max_age: MAX_AGE,
            kick: false,
            deadline: None,
        };
        let shared = Arc::new((Mutex::new(state), Condvar::new()));
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("overlay-wb".into())
            .stack_size(256 << 10)
            .spawn(move || run(&s, flush));
        let thread = match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(
                    overlay = name,
                    "cannot start the overlay writeback thread: {e}"
                );
                None
            }
        };
        Writeback {
            shared,
            thread: Mutex::new(thread),
        }
    }

    /// Change the age limit (tests and drills use a short one).
    pub(crate) fn set_max_age(&self, age: Duration) {
        guard(&self.shared.0).max_age = age;
    }

    /// After a change that was not asked to be durable: `pending` changes wait, the oldest
    /// queued at `since`. Applies [`due`] with this overlay's age limit, under one lock on
    /// the hot path: arms the deadline, or kicks the thread. True: the writer must flush
    /// itself (the queue at its memory bound, or a flush due and no thread to run it).
    pub(crate) fn after_change(&self, pending: usize, since: Option<Instant>) -> bool {
        let (m, cv) = &*self.shared;
        let mut st = guard(m);
        match due(pending, since.map(|t| t.elapsed()), st.max_age) {
            Due::Inline => true,
            Due::Background => {
                drop(st);
                if !self.running() {
                    return true;
                }
                self.kick();
                false
            }
            Due::Nothing => {
                if let Some(t) = since {
                    arm_locked(&mut st, cv, t);
                }
                false
            }
        }
    }

    /// Flush now, on the writeback thread.
    pub(crate) fn kick(&self) {
        let (m, cv) = &*self.shared;
        let mut st = guard(m);
        if !st.kick {
            st.kick = true;
            cv.notify_one();
        }
    }

    /// Whether the thread runs (it did not fail to start and was not stopped).
    pub(crate) fn running(&self) -> bool {
        guard(&self.thread).is_some()
    }

    /// Stop the thread and wait for it (a flush in progress completes first).
    pub(crate) fn stop(&self) {
        {
            let (m, cv) = &*self.shared;
            guard(m).stop = true;
            cv.notify_one();
        }
        if let Some(h) = guard(&self.thread).take() {
            let _ = h.join();
        }
    }
}

/// Make sure a flush is due by `since`'s age limit (the lock held).
fn arm_locked(st: &mut State, cv: &Condvar, since: Instant) {
    let at = since + st.max_age;
    if st.deadline.is_none_or(|d| at < d) {
        st.deadline = Some(at);
        cv.notify_one();
    }
}

fn run(shared: &(Mutex<State>, Condvar), flush: impl Fn() -> Option<Instant>) {
    let (m, cv) = shared;
    loop {
        {
            let mut st = guard(m);
            loop {
                if st.stop {
                    return;
                }
                if std::mem::take(&mut st.kick) {
                    break;
                }
                match st.deadline {
                    None => st = cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            st.deadline = None;
                            break;
                        }
                        st = cv
                            .wait_timeout(st, d - now)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                }
            }
        }
        // Changes queued while this flush ran (or left by a failed one, which logs) set the
        // next deadline from their own age; a failed flush is retried no sooner than a
        // second later.
        let oldest = flush();
        if let Some(since) = oldest {
            let mut st = guard(m);
            let retry = Instant::now() + Duration::from_secs(1);
            if st.deadline.is_none() {
                st.deadline = Some((since + st.max_age).max(retry));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_by_count_and_age() {
        let age = Duration::from_secs(35);
        assert_eq!(due(0, None, age), Due::Nothing);
        assert_eq!(due(10, Some(Duration::from_secs(34)), age), Due::Nothing);
        assert_eq!(due(10, Some(age), age), Due::Background);
        assert_eq!(due(BACKGROUND_AT, Some(Duration::ZERO), age), Due::Nothing);
        assert_eq!(due(BACKGROUND_AT + 1, None, age), Due::Background);
        assert_eq!(due(MAX_PENDING + 1, None, age), Due::Inline);
    }

    #[test]
    fn flushes_at_the_deadline_and_when_kicked_and_stops() {
        let (tx, rx) = std::sync::mpsc::channel();
        let wb = Writeback::start("test", move || {
            let _ = tx.send(Instant::now());
            None
        });
        assert!(wb.running());
        wb.set_max_age(Duration::from_millis(50));
        let t0 = Instant::now();
        assert!(
            !wb.after_change(1, Some(t0)),
            "armed, not flushed in the writer"
        );
        let at = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("flushed by age");
        assert!(at >= t0 + Duration::from_millis(50));
        wb.kick();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("flushed when kicked");
        wb.stop();
        assert!(!wb.running());
        assert!(rx.try_recv().is_err());
    }
}
