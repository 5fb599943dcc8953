//! The chunk-state map: a run-length extent map keyed by chunk index. Only chunks that differ
//! from the golden image are stored, so memory scales with what the client wrote or unmapped
//! (one entry per run), never with the size of the image.
use std::collections::BTreeMap;

/// What a chunk of the client's disk reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Unchanged: read from the golden image.
    Golden,
    /// Written by the client: read from the overlay data file.
    Overlay,
    /// Unmapped by the client (UNMAP, WRITE SAME with UNMAP): reads as zeroes (LBPRZ=1).
    Zero,
}

impl ChunkState {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            ChunkState::Golden => 0,
            ChunkState::Overlay => 1,
            ChunkState::Zero => 2,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(ChunkState::Golden),
            1 => Some(ChunkState::Overlay),
            2 => Some(ChunkState::Zero),
            _ => None,
        }
    }
}

/// One run of the map: chunks `[start, end)` in `state`. For `Overlay` runs the chunks live
/// in consecutive slots of the data file from `slot` on (chunk `c` in slot
/// `slot + (c - start)`); `slot` is 0 for other states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u64,
    pub end: u64,
    pub state: ChunkState,
    pub slot: u64,
}

impl Run {
    /// The data-file slot of chunk `c` (inside this run; meaningful for `Overlay` runs).
    pub(crate) fn slot_of(&self, c: u64) -> u64 {
        self.slot + (c - self.start)
    }
}

/// start chunk -> (end chunk exclusive, state, first slot). Invariants: runs do not overlap,
/// no run is `Golden` (golden is the absence of a run), non-overlay runs have slot 0, and
/// adjacent runs that could be one (same state, and for `Overlay` consecutive slots) are
/// merged, so chunks first written in order into consecutive slots stay one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    runs: BTreeMap<u64, (u64, ChunkState, u64)>,
    /// Chunks in `Overlay` and in `Zero` runs, kept as runs change so that [`ExtentMap::count`]
    /// is O(1): it is polled (space reports, client views) while a randomly written map has
    /// one run per chunk.
    overlay: u64,
    zero: u64,
}

impl ExtentMap {
    pub fn new() -> Self {
        ExtentMap::default()
    }

    /// Number of stored runs (memory use is proportional to this).
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// No run stored: every chunk is golden.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Set chunks `[start, end)` to `state`; `Overlay` chunks are mapped to the slot of their
    /// own index (the identity layout of format v1).
    pub fn set(&mut self, start: u64, end: u64, state: ChunkState) {
        self.set_run(start, end, state, start);
    }

    /// Set chunks `[start, end)` to `Overlay`, stored in slots `slot..slot + (end - start)`.
    pub fn set_slots(&mut self, start: u64, end: u64, slot: u64) {
        self.set_run(start, end, ChunkState::Overlay, slot);
    }

    /// Set chunks `[start, end)` to `state` (`slot`: the first chunk's slot, for `Overlay`).
    ///
    /// O(k log n) for k runs inside the range: never a pass over the whole map (the first
    /// version split the map off and appended it back, O(n) per call, which made every
    /// first-touch write of a client with many scattered runs cost hundreds of µs).
    pub(crate) fn set_run(&mut self, start: u64, end: u64, state: ChunkState, slot: u64) {
        if start >= end {
            return;
        }
        let slot = if state == ChunkState::Overlay {
            slot
        } else {
            0
        };
        self.split_at(start);
        self.split_at(end);
        // Drop every run inside [start, end): both edges are run boundaries now.
        while let Some(k) = self.runs.range(start..end).next().map(|(&k, _)| k) {
            if let Some((e, st, _)) = self.runs.remove(&k) {
                self.tally(st, e - k, false);
            }
        }
        if state == ChunkState::Golden {
            return;
        }
        self.tally(state, end - start, true);
        let joins = |a_start: u64, a_end: u64, a_slot: u64, b_slot: u64| {
            state != ChunkState::Overlay || a_slot.checked_add(a_end - a_start) == Some(b_slot)
        };
        let (mut s, mut e, mut first) = (start, end, slot);
        let left = self.runs.range(..start).next_back().map(|(&k, &v)| (k, v));
        if let Some((ls, (le, lst, lslot))) = left {
            if le == start && lst == state && joins(ls, le, lslot, slot) {
                self.runs.remove(&ls);
                s = ls;
                first = lslot;
            }
        }
        if let Some(&(re, rst, rslot)) = self.runs.get(&end) {
            if rst == state && joins(start, end, slot, rslot) {
                self.runs.remove(&end);
                e = re;
            }
        }
        self.runs.insert(s, (e, state, first));
    }

    fn tally(&mut self, state: ChunkState, n: u64, add: bool) {
        let c = match state {
            ChunkState::Overlay => &mut self.overlay,
            ChunkState::Zero => &mut self.zero,
            ChunkState::Golden => return,
        };
        *c = if add { *c + n } else { c.saturating_sub(n) };
    }

    /// Make `at` a run boundary by splitting the run that straddles it.
    fn split_at(&mut self, at: u64) {
        let straddling = self.runs.range(..at).next_back().map(|(&k, &v)| (k, v));
        if let Some((s, (e, st, slot))) = straddling {
            if e > at {
                let right = if st == ChunkState::Overlay {
                    slot + (at - s)
                } else {
                    0
                };
                self.runs.insert(s, (at, st, slot));
                self.runs.insert(at, (e, st, right));
            }
        }
    }

    /// The state of chunk `c` and the end (exclusive) of the run of that state containing it,
    /// capped at `limit`.
    pub(crate) fn run_at(&self, c: u64, limit: u64) -> (ChunkState, u64) {
        let r = self.lookup(c, limit);
        (r.state, r.end)
    }

    /// The run containing chunk `c`, starting at `c` (its `slot` is `c`'s slot) and capped at
    /// `limit`; a golden gap reads as a `Golden` run.
    pub(crate) fn lookup(&self, c: u64, limit: u64) -> Run {
        if let Some((&s, &(e, st, slot))) = self.runs.range(..=c).next_back() {
            if e > c {
                let slot = if st == ChunkState::Overlay {
                    slot + (c - s)
                } else {
                    0
                };
                return Run {
                    start: c,
                    end: e.min(limit),
                    state: st,
                    slot,
                };
            }
        }
        let next = self
            .runs
            .range(c..)
            .next()
            .map(|(&k, _)| k)
            .unwrap_or(limit);
        Run {
            start: c,
            end: next.min(limit),
            state: ChunkState::Golden,
            slot: 0,
        }
    }

    /// The runs covering chunks `[start, end)`, golden gaps included, in order, clipped to
    /// the range (a clipped overlay run's slot is that of its first chunk in the range).
    pub(crate) fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut pos = start;
        let from = match self.runs.range(..=start).next_back() {
            Some((&s, &(e, _, _))) if e > start => s,
            _ => start,
        };
        for (&s, &(e, st, slot)) in self.runs.range(from..end) {
            let cs = s.max(pos);
            if cs > pos {
                out.push(Run {
                    start: pos,
                    end: cs,
                    state: ChunkState::Golden,
                    slot: 0,
                });
            }
            let ce = e.min(end);
            let slot = if st == ChunkState::Overlay {
                slot + (cs - s)
            } else {
                0
            };
            out.push(Run {
                start: cs,
                end: ce,
                state: st,
                slot,
            });
            pos = ce;
        }
        if pos < end {
            out.push(Run {
                start: pos,
                end,
                state: ChunkState::Golden,
                slot: 0,
            });
        }
        out
    }

    /// Every stored (non-golden) run in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Run> + '_ {
        self.runs.iter().map(|(&start, &(end, state, slot))| Run {
            start,
            end,
            state,
            slot,
        })
    }

    /// Number of chunks in `state` (not meaningful for `Golden`).
    pub(crate) fn count(&self, state: ChunkState) -> u64 {
        match state {
            ChunkState::Overlay => self.overlay,
            ChunkState::Zero => self.zero,
            ChunkState::Golden => 0,
        }
    }

    /// One past the highest slot an overlay run uses (0 when none): where the data file's
    /// slots must reach.
    #[cfg(test)]
    pub(crate) fn slot_end(&self) -> u64 {
        self.iter()
            .filter(|r| r.state == ChunkState::Overlay)
            .map(|r| r.slot + (r.end - r.start))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Per chunk: (state, slot), slot 0 unless overlay.
    fn dense(m: &ExtentMap, n: u64) -> Vec<(ChunkState, u64)> {
        let mut v = Vec::new();
        for r in m.runs(0, n) {
            for c in r.start..r.end {
                let slot = if r.state == ChunkState::Overlay {
                    r.slot_of(c)
                } else {
                    0
                };
                v.push((r.state, slot));
            }
        }
        v
    }

    #[test]
    fn set_split_merge() {
        let mut m = ExtentMap::new();
        m.set(2, 10, ChunkState::Overlay);
        m.set(4, 6, ChunkState::Zero);
        assert_eq!(m.len(), 3);
        m.set(4, 6, ChunkState::Overlay);
        assert_eq!(m.len(), 1);
        m.set(0, 12, ChunkState::Golden);
        assert_eq!(m.len(), 0);
        m.set(0, 1 << 40, ChunkState::Zero);
        assert_eq!(m.run_at(5, 1 << 41), (ChunkState::Zero, 1 << 40));
        assert_eq!(m.run_at(1 << 40, 1 << 41), (ChunkState::Golden, 1 << 41));
        assert_eq!(m.count(ChunkState::Zero), 1 << 40);
    }

    #[test]
    fn slots_coalesce_in_write_order() {
        let mut m = ExtentMap::new();
        // Chunks 7, 8, 9 first written in that order take slots 0, 1, 2: one run.
        m.set_slots(8, 9, 1);
        m.set_slots(7, 8, 0);
        m.set_slots(9, 10, 2);
        assert_eq!(m.len(), 1);
        assert_eq!(m.lookup(9, 100).slot, 2);
        // Chunk 10 in a slot that does not follow: its own run, same state.
        m.set_slots(10, 11, 40);
        assert_eq!(m.len(), 2);
        assert_eq!(m.slot_end(), 41);
        // Splitting keeps each chunk's slot.
        m.set(8, 9, ChunkState::Zero);
        assert_eq!(m.lookup(9, 100).slot, 2);
        assert_eq!(m.lookup(7, 100).slot, 0);
        assert_eq!(
            m.runs(9, 11).iter().map(|r| r.slot).collect::<Vec<_>>(),
            vec![2, 40]
        );
    }

    proptest! {
        #[test]
        fn matches_dense_model(ops in proptest::collection::vec((0u64..64, 0u64..64, 0u8..3, 0u64..80), 1..60)) {
            let n = 64;
            let mut m = ExtentMap::new();
            let mut model = vec![(ChunkState::Golden, 0u64); n as usize];
            for (a, b, s, slot) in ops {
                let (a, b) = (a.min(b), a.max(b));
                let st = ChunkState::from_byte(s).unwrap();
                if st == ChunkState::Overlay {
                    m.set_slots(a, b, slot);
                    for c in a..b { model[c as usize] = (st, slot + (c - a)); }
                } else {
                    m.set(a, b, st);
                    for c in a..b { model[c as usize] = (st, 0); }
                }
                prop_assert_eq!(dense(&m, n), model.clone());
                // Invariants: sorted, disjoint, merged where mergeable, no golden.
                let runs: Vec<_> = m.iter().collect();
                for w in runs.windows(2) {
                    prop_assert!(w[0].end <= w[1].start);
                    let mergeable = w[0].end == w[1].start && w[0].state == w[1].state
                        && (w[0].state != ChunkState::Overlay
                            || w[0].slot + (w[0].end - w[0].start) == w[1].slot);
                    prop_assert!(!mergeable);
                }
                prop_assert!(runs.iter().all(|r| r.state != ChunkState::Golden && r.start < r.end));
                let want_end = model.iter().filter(|x| x.0 == ChunkState::Overlay).map(|x| x.1 + 1).max().unwrap_or(0);
                prop_assert_eq!(m.slot_end(), want_end);
                for st in [ChunkState::Overlay, ChunkState::Zero] {
                    let want = model.iter().filter(|x| x.0 == st).count() as u64;
                    prop_assert_eq!(m.count(st), want);
                }
                for c in 0..n {
                    let r = m.lookup(c, n);
                    prop_assert_eq!((r.state, if r.state == ChunkState::Overlay { r.slot } else { 0 }), model[c as usize]);
                    prop_assert!(r.end > c && r.end <= n);
                    // Every chunk of the returned run has that state and the next slot.
                    for x in c..r.end {
                        let want = if r.state == ChunkState::Overlay { r.slot + (x - c) } else { 0 };
                        prop_assert_eq!(model[x as usize], (r.state, want));
                    }
                }
                // Sub-range views agree with the model too.
                let (lo, hi) = (a / 2, (b + n) / 2);
                for r in m.runs(lo, hi) {
                    for x in r.start..r.end {
                        let want = if r.state == ChunkState::Overlay { r.slot_of(x) } else { 0 };
                        prop_assert_eq!(model[x as usize], (r.state, want));
                    }
                }
            }
        }
    }
}
