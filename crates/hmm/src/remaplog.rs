//! Which part of an `UNMAP` event still describes the address space.
//!
//! A moving `mremap` frees its old range under the mmap lock, then sends
//! `REMAP` and, once that is read, the `UNMAP` of the old range. In between
//! another thread can map the freed addresses and `mremap` a mapping onto
//! them, whose `REMAP` is queued before the first one's `UNMAP`:
//!
//! ```text
//!   REMAP A -> B     (thread 1: A is free from here on)
//!   REMAP X -> A     (thread 2 moves its mapping, device pages and all, onto A)
//!   UNMAP A          (thread 1's, about A as it was before thread 2's move)
//! ```
//!
//! Handled as it comes, that `UNMAP` would discard what the second `REMAP`
//! moved to `A`. So the service thread logs each `REMAP`; an `UNMAP` inside
//! the old range of a logged one is that move's own, and the parts of it
//! that a later-logged `REMAP` moved something into are left alone. An
//! `UNMAP` no `REMAP` accounts for (a `munmap`) counts whole. The log keeps
//! entries for [`KEEP_FOR`]: the `UNMAP` follows its `REMAP` at once, and
//! with `MREMAP_DONTUNMAP` none comes (a later `munmap` of the old range then
//! takes the entry, which is harmless: nothing was moved into that range
//! since, or its own `UNMAP` would have come first).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::addr::VaRange;
use crate::rangeset::RangeSet;

/// How long a `REMAP` stays in the log.
pub(crate) const KEEP_FOR: Duration = Duration::from_secs(1);

/// The recent `REMAP` events, in the order they were handled.
#[derive(Debug, Default)]
pub(crate) struct RemapLog {
    seq: u64,
    /// `(seq, old range, when)` of each logged move.
    from: VecDeque<(u64, VaRange, Instant)>,
    /// `(seq, new range, when)` of each logged move.
    into: VecDeque<(u64, VaRange, Instant)>,
}

impl RemapLog {
    /// Logs a `REMAP` of `old` to `new`.
    pub(crate) fn remap(&mut self, old: VaRange, new: VaRange, now: Instant) {
        self.expire(now);
        self.seq += 1;
        self.from.push_back((self.seq, old, now));
        self.into.push_back((self.seq, new, now));
    }

    /// The parts of `unmapped`, from an `UNMAP` event, that it really
    /// describes (see the [module docs](self)).
    pub(crate) fn unmap(&mut self, unmapped: VaRange, now: Instant) -> Vec<VaRange> {
        self.expire(now);
        let Some(i) = self.from.iter().position(|&(_, old, _)| {
            old.start() <= unmapped.start() && unmapped.end() <= old.end()
        }) else {
            return vec![unmapped];
        };
        let Some((seq, _, _)) = self.from.remove(i) else {
            return vec![unmapped];
        };
        let mut live = RangeSet::new();
        live.insert(unmapped);
        for &(later, new, _) in &self.into {
            if later > seq {
                live.remove(new);
            }
        }
        live.ranges()
    }

    fn expire(&mut self, now: Instant) {
        while self.from.front().is_some_and(|e| now - e.2 > KEEP_FOR) {
            self.from.pop_front();
        }
        while self.into.front().is_some_and(|e| now - e.2 > KEEP_FOR) {
            self.into.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{PAGE_SIZE, VirtAddr};

    /// Pages `[a, b)`.
    fn r(a: u64, b: u64) -> VaRange {
        VaRange::new(VirtAddr(a * PAGE_SIZE), VirtAddr(b * PAGE_SIZE)).unwrap()
    }

    #[test]
    fn an_unmap_no_remap_accounts_for_counts_whole() {
        let mut log = RemapLog::default();
        let now = Instant::now();
        assert_eq!(log.unmap(r(0, 8), now), vec![r(0, 8)]);
        log.remap(r(16, 24), r(32, 40), now);
        assert_eq!(
            log.unmap(r(0, 8), now),
            vec![r(0, 8)],
            "not in the old range"
        );
    }

    #[test]
    fn a_moves_own_unmap_spares_what_a_later_move_put_there() {
        let mut log = RemapLog::default();
        let now = Instant::now();
        log.remap(r(0, 8), r(100, 108), now); // thread 1: A -> B
        log.remap(r(50, 58), r(0, 8), now); // thread 2: X -> A
        assert!(
            log.unmap(r(0, 8), now).is_empty(),
            "thread 1's UNMAP A is stale"
        );
        // A later munmap of A (no REMAP left to account for it) counts.
        assert_eq!(log.unmap(r(0, 8), now), vec![r(0, 8)]);
    }

    #[test]
    fn only_the_parts_moved_into_later_are_spared() {
        let mut log = RemapLog::default();
        let now = Instant::now();
        log.remap(r(0, 8), r(100, 108), now);
        log.remap(r(50, 53), r(2, 5), now);
        assert_eq!(log.unmap(r(0, 8), now), vec![r(0, 2), r(5, 8)]);
    }

    #[test]
    fn a_move_logged_before_does_not_spare() {
        let mut log = RemapLog::default();
        let now = Instant::now();
        log.remap(r(50, 58), r(0, 8), now); // X -> A first
        log.remap(r(0, 8), r(100, 108), now); // then A -> B: its UNMAP is about that A
        assert_eq!(log.unmap(r(0, 8), now), vec![r(0, 8)]);
    }

    #[test]
    fn entries_expire() {
        let mut log = RemapLog::default();
        let then = Instant::now();
        log.remap(r(0, 8), r(100, 108), then);
        log.remap(r(50, 58), r(0, 8), then);
        let later = then + KEEP_FOR + Duration::from_millis(1);
        assert_eq!(log.unmap(r(0, 8), later), vec![r(0, 8)]);
        assert!(log.from.is_empty() && log.into.is_empty());
    }
}
