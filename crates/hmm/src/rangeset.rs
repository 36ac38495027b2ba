//! A set of disjoint half-open address ranges, merged on insert.
//!
//! Used by [`crate::mm`] to remember which ranges are registered with the
//! userfaultfd and which private ranges may hold pages shared with a child
//! since a fork.

use std::collections::BTreeMap;

use crate::addr::{VaRange, VirtAddr};

/// Disjoint, non-adjacent ranges keyed by start.
///
/// # Invariants
/// For consecutive entries `(s1, e1)`, `(s2, e2)`: `s1 < e1 < s2 < e2`.
#[derive(Debug, Default, Clone)]
pub(crate) struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `r`, merging with overlapping or adjacent ranges.
    pub(crate) fn insert(&mut self, r: VaRange) {
        let mut start = r.start().get();
        let mut end = r.end().get();
        // A range starting at or before `start` that reaches it merges.
        if let Some((&s, &e)) = self.map.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.map.remove(&s);
        }
        let absorbed: Vec<u64> = self.map.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = self.map.remove(&s) {
                end = end.max(e);
            }
        }
        self.map.insert(start, end);
    }

    /// Removes `r`, splitting ranges that straddle its bounds.
    pub(crate) fn remove(&mut self, r: VaRange) {
        let (start, end) = (r.start().get(), r.end().get());
        let mut touched: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.map.range(..start).next_back()
            && e > start
        {
            touched.push((s, e));
        }
        touched.extend(self.map.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in touched {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start);
            }
            if e > end {
                self.map.insert(end, e);
            }
        }
    }

    /// The parts of `r` covered by the set, in order.
    pub(crate) fn overlapping(&self, r: VaRange) -> Vec<VaRange> {
        let (start, end) = (r.start().get(), r.end().get());
        let mut out = Vec::new();
        let first = self.map.range(..=start).next_back().map(|(&s, &e)| (s, e));
        let rest = self
            .map
            .range(start.saturating_add(1)..end)
            .map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(rest) {
            if let Ok(part) = VaRange::new(VirtAddr(s.max(start)), VirtAddr(e.min(end))) {
                out.push(part);
            }
        }
        out
    }

    /// Whether every byte of `r` is in the set.
    pub(crate) fn covers(&self, r: VaRange) -> bool {
        self.map
            .range(..=r.start().get())
            .next_back()
            .is_some_and(|(_, &e)| e >= r.end().get())
    }

    /// Whether any byte of `r` is in the set.
    pub(crate) fn intersects(&self, r: VaRange) -> bool {
        !self.overlapping(r).is_empty()
    }

    /// Every range, in order.
    pub(crate) fn ranges(&self) -> Vec<VaRange> {
        self.map
            .iter()
            .filter_map(|(&s, &e)| VaRange::new(VirtAddr(s), VirtAddr(e)).ok())
            .collect()
    }

    /// Empties the set.
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: u64, e: u64) -> VaRange {
        VaRange::new(VirtAddr(s << 12), VirtAddr(e << 12)).expect("valid")
    }

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut set = RangeSet::new();
        set.insert(r(1, 3));
        set.insert(r(5, 7));
        set.insert(r(3, 5));
        assert_eq!(set.ranges(), vec![r(1, 7)]);
        set.remove(r(2, 4));
        assert_eq!(set.ranges(), vec![r(1, 2), r(4, 7)]);
        assert_eq!(set.overlapping(r(0, 5)), vec![r(1, 2), r(4, 5)]);
        assert!(!set.intersects(r(2, 4)));
        set.clear();
        assert!(set.ranges().is_empty());
    }

    proptest! {
        /// The set behaves like a bitmap of pages under any insert/remove sequence.
        #[test]
        fn matches_a_page_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..16), 0..40)) {
            let mut set = RangeSet::new();
            let mut bits = [false; 80];
            for (ins, s, len) in ops {
                let range = r(s, s + len);
                if ins { set.insert(range) } else { set.remove(range) }
                for b in &mut bits[s as usize..(s + len) as usize] { *b = ins; }
            }
            let mut model = vec![false; 80];
            for part in set.ranges() {
                for p in part.start().page_index()..part.end().page_index() { model[p as usize] = true; }
            }
            prop_assert_eq!(&model, &bits.to_vec());
            // covers() is "every page of the range is in the set".
            for (s, len) in [(0u64, 1u64), (3, 5), (10, 30), (60, 20)] {
                let all = bits[s as usize..(s + len) as usize].iter().all(|&b| b);
                prop_assert_eq!(set.covers(r(s, s + len)), all);
            }
            // Stored ranges are disjoint and non-adjacent.
            let rs = set.ranges();
            for w in rs.windows(2) { prop_assert!(w[0].end() < w[1].start()); }
        }
    }
}
