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

/// start chunk -> (end chunk exclusive, state). Invariants: runs do not overlap, no run is
/// `Golden` (golden is the absence of a run), and adjacent runs of the same state are merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    runs: BTreeMap<u64, (u64, ChunkState)>,
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

    /// Set chunks `[start, end)` to `state`.
    ///
    /// O(k log n) for k runs inside the range: never a pass over the whole map (the first
    /// version split the map off and appended it back, O(n) per call, which made every
    /// first-touch write of a client with many scattered runs cost hundreds of µs).
    pub fn set(&mut self, start: u64, end: u64, state: ChunkState) {
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        // Drop every run inside [start, end): both edges are run boundaries now.
        while let Some(k) = self.runs.range(start..end).next().map(|(&k, _)| k) {
            self.runs.remove(&k);
        }
        if state == ChunkState::Golden {
            return;
        }
        let (mut s, mut e) = (start, end);
        let left = self.runs.range(..start).next_back().map(|(&k, &v)| (k, v));
        if let Some((ls, (le, lst))) = left {
            if le == start && lst == state {
                self.runs.remove(&ls);
                s = ls;
            }
        }
        if let Some(&(re, rst)) = self.runs.get(&end) {
            if rst == state {
                self.runs.remove(&end);
                e = re;
            }
        }
        self.runs.insert(s, (e, state));
    }

    /// Make `at` a run boundary by splitting the run that straddles it.
    fn split_at(&mut self, at: u64) {
        let straddling = self.runs.range(..at).next_back().map(|(&k, &v)| (k, v));
        if let Some((s, (e, st))) = straddling {
            if e > at {
                self.runs.insert(s, (at, st));
                self.runs.insert(at, (e, st));
            }
        }
    }

    /// The state of chunk `c` and the end (exclusive) of the run of that state containing it,
    /// capped at `limit`.
    pub(crate) fn run_at(&self, c: u64, limit: u64) -> (ChunkState, u64) {
        if let Some((_, &(e, st))) = self.runs.range(..=c).next_back() {
            if e > c {
                return (st, e.min(limit));
            }
        }
        let next = self
            .runs
            .range(c..)
            .next()
            .map(|(&k, _)| k)
            .unwrap_or(limit);
        (ChunkState::Golden, next.min(limit))
    }

    /// The runs covering chunks `[start, end)`, golden gaps included, in order.
    pub(crate) fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, ChunkState)> {
        let mut out = Vec::new();
        let mut pos = start;
        let from = match self.runs.range(..=start).next_back() {
            Some((&s, &(e, _))) if e > start => s,
            _ => start,
        };
        for (&s, &(e, st)) in self.runs.range(from..end) {
            let s = s.max(pos);
            if s > pos {
                out.push((pos, s, ChunkState::Golden));
            }
            let e = e.min(end);
            out.push((s, e, st));
            pos = e;
        }
        if pos < end {
            out.push((pos, end, ChunkState::Golden));
        }
        out
    }

    /// Every stored (non-golden) run in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, ChunkState)> + '_ {
        self.runs.iter().map(|(&s, &(e, st))| (s, e, st))
    }

    /// Number of chunks in `state` (not meaningful for `Golden`).
    pub(crate) fn count(&self, state: ChunkState) -> u64 {
        self.iter()
            .filter(|r| r.2 == state)
            .map(|(s, e, _)| e - s)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dense(m: &ExtentMap, n: u64) -> Vec<ChunkState> {
        let mut v = Vec::new();
        for (s, e, st) in m.runs(0, n) {
            for _ in s..e {
                v.push(st);
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

    proptest! {
        #[test]
        fn matches_dense_model(ops in proptest::collection::vec((0u64..64, 0u64..64, 0u8..3), 1..60)) {
            let n = 64;
            let mut m = ExtentMap::new();
            let mut model = vec![ChunkState::Golden; n as usize];
            for (a, b, s) in ops {
                let (a, b) = (a.min(b), a.max(b));
                let st = ChunkState::from_byte(s).unwrap();
                m.set(a, b, st);
                for c in a..b { model[c as usize] = st; }
                prop_assert_eq!(dense(&m, n), model.clone());
                // Invariants: sorted, disjoint, merged, no golden.
                let runs: Vec<_> = m.iter().collect();
                for w in runs.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0);
                    prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2));
                }
                prop_assert!(runs.iter().all(|r| r.2 != ChunkState::Golden && r.0 < r.1));
                for c in 0..n {
                    let (st, end) = m.run_at(c, n);
                    prop_assert_eq!(st, model[c as usize]);
                    prop_assert!(end > c && end <= n);
                    prop_assert!((c..end).all(|x| model[x as usize] == st));
                    prop_assert!(end == n || model[end as usize] != st || st == ChunkState::Golden);
                }
            }
        }
    }
}
