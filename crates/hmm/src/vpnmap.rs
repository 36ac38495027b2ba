//! A map from virtual page numbers to values, kept as the page tables keep
//! entries: in chunks of 512 consecutive pages (one page-table page), found
//! through an ordered map of chunks.
//!
//! The device table of an address space holds one entry per page a device
//! or a migration holds, and a migration touches each of its pages several
//! times (select, isolate, commit); an ordered map of pages made each touch
//! a tree search over every page held, which cost more than the
//! `UFFDIO_MOVE` of the page itself (measured with `hmm bench migrate`:
//! about a third of a 4 KiB page's migration was tree searching). Here a
//! touch is a search over chunks (1/512 as many) and an index.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Pages per chunk, as in one page-table page.
const CHUNK_SHIFT: u32 = 9;
const CHUNK: usize = 1 << CHUNK_SHIFT;

struct Chunk<T> {
    /// Entries present.
    len: usize,
    slots: Box<[Option<T>]>,
}

impl<T> Chunk<T> {
    fn new() -> Self {
        Chunk {
            len: 0,
            slots: (0..CHUNK).map(|_| None).collect(),
        }
    }
}

/// A map from page numbers to `T` (see the module documentation).
pub(crate) struct VpnMap<T> {
    chunks: BTreeMap<u64, Chunk<T>>,
    len: usize,
}

impl<T> Default for VpnMap<T> {
    fn default() -> Self {
        VpnMap {
            chunks: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for VpnMap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The chunk of `vpn` and its index there.
fn split(vpn: u64) -> (u64, usize) {
    (vpn >> CHUNK_SHIFT, (vpn as usize) & (CHUNK - 1))
}

impl<T> VpnMap<T> {
    /// Entries present.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether no page has an entry.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry of page `vpn`.
    pub(crate) fn get(&self, vpn: u64) -> Option<&T> {
        let (c, i) = split(vpn);
        self.chunks.get(&c)?.slots[i].as_ref()
    }

    /// The entry of page `vpn`, to change.
    pub(crate) fn get_mut(&mut self, vpn: u64) -> Option<&mut T> {
        let (c, i) = split(vpn);
        self.chunks.get_mut(&c)?.slots[i].as_mut()
    }

    /// Whether page `vpn` has an entry.
    pub(crate) fn contains_key(&self, vpn: u64) -> bool {
        self.get(vpn).is_some()
    }

    /// Sets the entry of page `vpn`; returns the one it replaced.
    pub(crate) fn insert(&mut self, vpn: u64, value: T) -> Option<T> {
        let (c, i) = split(vpn);
        let chunk = self.chunks.entry(c).or_insert_with(Chunk::new);
        let old = chunk.slots[i].replace(value);
        if old.is_none() {
            chunk.len += 1;
            self.len += 1;
        }
        old
    }

    /// Removes the entry of page `vpn`.
    pub(crate) fn remove(&mut self, vpn: u64) -> Option<T> {
        let (c, i) = split(vpn);
        let chunk = self.chunks.get_mut(&c)?;
        let old = chunk.slots[i].take()?;
        chunk.len -= 1;
        self.len -= 1;
        if chunk.len == 0 {
            self.chunks.remove(&c);
        }
        Some(old)
    }

    /// The entries of pages `range`, in page order.
    pub(crate) fn range(&self, range: Range<u64>) -> impl Iterator<Item = (u64, &T)> + '_ {
        let Range { start, end } = range;
        let chunks = if start < end {
            self.chunks
                .range(start >> CHUNK_SHIFT..=(end - 1) >> CHUNK_SHIFT)
        } else {
            // An empty range of chunks.
            self.chunks.range(1..1)
        };
        chunks.flat_map(move |(&c, chunk)| {
            let base = c << CHUNK_SHIFT;
            let from = start.saturating_sub(base).min(CHUNK as u64) as usize;
            let to = (end - base.min(end)).min(CHUNK as u64) as usize;
            chunk.slots[from..to.max(from)]
                .iter()
                .enumerate()
                .filter_map(move |(k, s)| s.as_ref().map(|v| (base + (from + k) as u64, v)))
        })
    }

    /// The pages of `range` that have entries, in order.
    pub(crate) fn keys_in(&self, range: Range<u64>) -> Vec<u64> {
        self.range(range).map(|(k, _)| k).collect()
    }

    /// Every entry, in page order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.range(0..u64::MAX)
            .chain(self.get(u64::MAX).map(|v| (u64::MAX, v)))
    }

    /// Every entry's value, in page order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks
            .values()
            .flat_map(|c| c.slots.iter().filter_map(Option::as_ref))
    }

    /// Every entry's value, to change.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.chunks
            .values_mut()
            .flat_map(|c| c.slots.iter_mut().filter_map(Option::as_mut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Range(u64, u64),
    }

    /// Page numbers near chunk edges and far apart, where mistakes hide.
    fn vpn() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..2048,
            (0u64..4).prop_map(|k| u64::MAX - k),
            (0u64..1 << 36).prop_map(|v| v << 9),
            (1u64..1 << 36).prop_map(|v| (v << 9) - 1),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (vpn(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            vpn().prop_map(Op::Remove),
            (vpn(), vpn()).prop_map(|(a, b)| Op::Range(a.min(b), a.max(b))),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_an_ordered_map(ops in proptest::collection::vec(op(), 1..200)) {
            let mut ours = VpnMap::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(ours.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(ours.remove(k), model.remove(&k)),
                    Op::Range(a, b) => {
                        let got: Vec<(u64, u32)> = ours.range(a..b).map(|(k, v)| (k, *v)).collect();
                        let want: Vec<(u64, u32)> = model.range(a..b).map(|(k, v)| (*k, *v)).collect();
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(ours.len(), model.len());
            }
            let all: Vec<(u64, u32)> = ours.iter().map(|(k, v)| (k, *v)).collect();
            let want: Vec<(u64, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(all, want);
            let values: Vec<u32> = ours.values().copied().collect();
            prop_assert_eq!(values, model.values().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn empty_chunks_are_dropped() {
        let mut m = VpnMap::default();
        for k in 510..515 {
            m.insert(k, k);
        }
        assert_eq!(m.chunks.len(), 2);
        for k in 510..512 {
            m.remove(k);
        }
        assert_eq!(m.chunks.len(), 1, "the first chunk is empty now");
        assert_eq!(m.keys_in(0..u64::MAX), [512, 513, 514]);
        for v in m.values_mut() {
            *v += 1;
        }
        assert_eq!(m.get(513), Some(&514));
        assert!(m.range(5..5).next().is_none(), "an empty range");
        let (hi, lo) = (9, 3);
        assert!(m.range(hi..lo).next().is_none(), "a reversed range");
    }
}
