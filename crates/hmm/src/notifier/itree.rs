//! The interval tree of a [`Subscriptions`](super::Subscriptions): the
//! userspace stand-in for the kernel's `rb_root_cached itree` with
//! `interval_tree_insert` / `interval_tree_remove` / `interval_tree_iter_first`
//! / `interval_tree_iter_next` (`lib/interval_tree.c`).
//!
//! The layout is the implicit augmented tree of `cgranges` (Heng Li): the
//! nodes sit in one vector sorted by `start`, and the in-order position `i` of
//! that vector *is* the tree: leaves at even indices, a node of level `k` at an
//! index whose low `k` bits are all ones and whose bit `k` is zero. Each node
//! keeps `max`, the greatest `last` of its subtree, so an overlap query prunes
//! every subtree that ends before the query starts and stops walking right at
//! the first node that starts after it: `O(log n + hits)` per query.
//!
//! Edits are a `Vec` insert or remove (a `memmove`; an append for the usual
//! ascending inserts) that marks the index stale; the next query re-indexes
//! in `O(n)`. That is the right trade for the notifier: edits happen once per
//! subscription, come in bursts (setup, teardown, the deferred list at the end
//! of an epoch) and are paid for once per burst, while queries happen on every
//! invalidation.
//!
//! Nodes with equal `start` keep their insertion order, as the kernel's
//! rb-tree does (an equal key links to the right).

/// One subscription in the tree.
#[derive(Debug)]
struct Node<T> {
    /// First address covered.
    start: u64,
    /// Last address covered (inclusive, as the kernel's `last`).
    last: u64,
    /// The greatest `last` in the implicit subtree rooted here.
    max: u64,
    /// What the tree stores (the subscription).
    item: T,
}

/// An interval tree over inclusive `[start, last]` intervals.
///
/// # Invariants
/// `nodes` is sorted by `start` (stable: equal starts in insertion order);
/// unless `stale`, `max` and `root_level` describe `nodes`.
#[derive(Debug)]
pub(super) struct ITree<T> {
    /// The nodes, sorted by `start`.
    nodes: Vec<Node<T>>,
    /// The level of the root, `None` when empty.
    root_level: Option<u32>,
    /// Set by every edit: `max` and `root_level` must be recomputed.
    stale: bool,
}

impl<T> ITree<T> {
    /// An empty tree.
    pub(super) const fn new() -> Self {
        Self {
            nodes: Vec::new(),
            root_level: None,
            stale: false,
        }
    }

    /// The number of intervals stored.
    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Inserts `[start, last]` after every interval with the same start.
    pub(super) fn insert(&mut self, start: u64, last: u64, item: T) {
        debug_assert!(start <= last);
        let pos = self.nodes.partition_point(|n| n.start <= start);
        self.nodes.insert(
            pos,
            Node {
                start,
                last,
                max: last,
                item,
            },
        );
        self.stale = true;
    }

    /// The index of the interval starting at `start` whose item satisfies
    /// `is`, if any.
    fn position(&self, start: u64, mut is: impl FnMut(&T) -> bool) -> Option<usize> {
        let from = self.nodes.partition_point(|n| n.start < start);
        self.nodes[from..]
            .iter()
            .take_while(|n| n.start == start)
            .position(|n| is(&n.item))
            .map(|i| from + i)
    }

    /// Whether an interval starting at `start` holds an item satisfying `is`.
    pub(super) fn contains(&self, start: u64, is: impl FnMut(&T) -> bool) -> bool {
        self.position(start, is).is_some()
    }

    /// Removes the interval starting at `start` whose item satisfies `is`
    /// and hands the item back.
    pub(super) fn remove(&mut self, start: u64, is: impl FnMut(&T) -> bool) -> Option<T> {
        let pos = self.position(start, is)?;
        self.stale = true;
        Some(self.nodes.remove(pos).item)
    }

    /// Every item, in tree order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.nodes.iter().map(|n| &n.item)
    }

    /// Recomputes `max` of every node and the root level (`cr_index_core`).
    fn reindex(&mut self) {
        self.stale = false;
        let a = &mut self.nodes;
        let n = a.len();
        if n == 0 {
            self.root_level = None;
            return;
        }
        // Level 0: the leaves sit at even indices. `last_i` tracks the
        // rightmost node of the current level and `last` the max of its
        // subtree: the right child of a node whose right child index lies past
        // the end is that partial subtree.
        let mut last_i = 0;
        let mut last = 0;
        for i in (0..n).step_by(2) {
            a[i].max = a[i].last;
            last_i = i;
            last = a[i].max;
        }
        let mut k = 1u32;
        while k < usize::BITS && (1usize << k) <= n {
            let x = 1usize << (k - 1);
            let i0 = (x << 1) - 1;
            let step = x << 2;
            for i in (i0..n).step_by(step) {
                let el = a[i - x].max;
                let er = if i + x < n { a[i + x].max } else { last };
                a[i].max = a[i].last.max(el).max(er);
            }
            last_i = if (last_i >> k) & 1 == 1 {
                last_i - x
            } else {
                last_i + x
            };
            if last_i < n && a[last_i].max > last {
                last = a[last_i].max;
            }
            k += 1;
        }
        self.root_level = Some(k - 1);
    }

    /// Calls `f` on every interval that overlaps `[qstart, qlast]`, in tree
    /// order (ascending start), as `interval_tree_iter_first` / `_next` would.
    pub(super) fn for_each_overlap(&mut self, qstart: u64, qlast: u64, mut f: impl FnMut(&T)) {
        if self.stale {
            self.reindex();
        }
        let a = &self.nodes;
        let n = a.len();
        let Some(root) = self.root_level else { return };
        // A subtree at level <= SMALL is scanned linearly.
        const SMALL: u32 = 3;
        // Each level pushes at most two entries (a node to revisit and its
        // left child), so 2 * 65 entries bound the stack for any `usize`.
        let mut stack = [(0usize, 0u32, false); 2 * (usize::BITS as usize + 1)];
        let mut top = 0;
        stack[top] = ((1usize << root) - 1, root, false);
        top += 1;
        while top > 0 {
            top -= 1;
            let (x, k, left_done) = stack[top];
            if k <= SMALL {
                let i0 = x >> k << k;
                let i1 = (i0 + (1usize << (k + 1)) - 1).min(n);
                for node in a.get(i0..i1).unwrap_or(&[]) {
                    if node.start > qlast {
                        break;
                    }
                    if node.last >= qstart {
                        f(&node.item);
                    }
                }
            } else if !left_done {
                let y = x - (1usize << (k - 1));
                stack[top] = (x, k, true);
                top += 1;
                // A left child past the end is a partial subtree without its
                // own `max`: visit it.
                if y >= n || a[y].max >= qstart {
                    stack[top] = (y, k - 1, false);
                    top += 1;
                }
            } else if x < n && a[x].start <= qlast {
                if a[x].last >= qstart {
                    f(&a[x].item);
                }
                stack[top] = (x + (1usize << (k - 1)), k - 1, false);
                top += 1;
            }
        }
    }
}

#[cfg(test)]
#[cfg(not(loom))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute(v: &[(u64, u64, usize)], qs: u64, ql: u64) -> Vec<usize> {
        let mut sorted: Vec<_> = v.to_vec();
        // Stable sort keeps insertion order among equal starts.
        sorted.sort_by_key(|e| e.0);
        sorted
            .into_iter()
            .filter(|&(s, l, _)| s <= ql && l >= qs)
            .map(|e| e.2)
            .collect()
    }

    fn query(t: &mut ITree<usize>, qs: u64, ql: u64) -> Vec<usize> {
        let mut out = Vec::new();
        t.for_each_overlap(qs, ql, |&i| out.push(i));
        out
    }

    #[test]
    fn empty_tree_finds_nothing() {
        let mut t: ITree<usize> = ITree::new();
        assert!(query(&mut t, 0, u64::MAX).is_empty());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn large_tree_small_query_visits_few() {
        let mut t = ITree::new();
        for i in 0..10_000u64 {
            t.insert(i * 0x1000, i * 0x1000 + 0xfff, i as usize);
        }
        // One huge interval covering everything, as dmirror's notifier does.
        t.insert(0, u64::MAX, 99_999);
        assert_eq!(query(&mut t, 0x5000, 0x5fff), vec![99_999, 5]);
        assert_eq!(query(&mut t, 0x5000, 0x6000), vec![99_999, 5, 6]);
        assert_eq!(t.len(), 10_001);
    }

    #[test]
    fn equal_starts_keep_insertion_order_and_remove_by_identity() {
        let mut t = ITree::new();
        t.insert(10, 20, 1);
        t.insert(10, 15, 2);
        t.insert(5, 10, 3);
        t.insert(10, 30, 4);
        assert_eq!(query(&mut t, 0, 100), vec![3, 1, 2, 4]);
        assert!(t.contains(10, |&i| i == 2));
        assert!(!t.contains(5, |&i| i == 2));
        assert_eq!(t.remove(10, |&i| i == 2), Some(2));
        assert_eq!(t.remove(10, |&i| i == 2), None);
        assert_eq!(query(&mut t, 0, 100), vec![3, 1, 4]);
        assert_eq!(query(&mut t, 21, 25), vec![4]);
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), vec![3, 1, 4]);
    }

    proptest! {
        #[test]
        fn matches_brute_force(
            ivs in proptest::collection::vec((0u64..200, 0u64..60), 0..300),
            removes in proptest::collection::vec(0usize..300, 0..40),
            queries in proptest::collection::vec((0u64..260, 0u64..80), 1..20),
        ) {
            let mut t = ITree::new();
            let mut v = Vec::new();
            for (id, &(s, len)) in ivs.iter().enumerate() {
                t.insert(s, s + len, id);
                v.push((s, s + len, id));
            }
            prop_assert_eq!(query(&mut t, 50, 120), brute(&v, 50, 120));
            for r in removes {
                if v.is_empty() { break; }
                let (s, _, id) = v.remove(r % v.len());
                prop_assert_eq!(t.remove(s, |&i| i == id), Some(id));
                // Alternate queries with edits: the index is rebuilt lazily.
                prop_assert_eq!(query(&mut t, s, s + 10), brute(&v, s, s + 10));
            }
            prop_assert_eq!(t.len(), v.len());
            for (qs, qlen) in queries {
                prop_assert_eq!(query(&mut t, qs, qs + qlen), brute(&v, qs, qs + qlen));
            }
            prop_assert_eq!(query(&mut t, 0, u64::MAX), brute(&v, 0, u64::MAX));
        }
    }
}
