//! The range lock: CPU-snapshot / invalidation serialization, the second
//! mirroring strategy of `mm/hmm.c` as first proposed (`struct hmm_range`,
//! `hmm_vma_range_lock`, `hmm_vma_range_unlock`), with the seed's suggested
//! `mmu_notifier_try_to_invalidate` as [`RangeLock::try_invalidate`].
//!
//! The [sequence protocol](crate::notifier) lets a device fault snapshot the
//! CPU page table optimistically and retry when an invalidation ran in the
//! meantime; nothing bounds the number of retries. The range lock trades that
//! for blocking: a device fault takes a [`Kind::Snapshot`] guard over its range
//! while it reads the CPU page table and installs the result in the device
//! table, an invalidation takes a [`Kind::Invalidate`] guard while it zaps the
//! device table and changes the CPU one, and the two wait for each other in
//! the order they arrived. A device fault therefore always completes on its
//! first try; the price is that an invalidation may stall behind a snapshot.
//!
//! # The rules
//!
//! Every request gets a place in one arrival order (its *ticket*), taken
//! under the lock when it arrives. Two requests *conflict* when their ranges
//! share at least one byte ([`VaRange::overlaps`]) and their kinds differ.
//!
//! 1. A request is **granted** exactly when no earlier-arrived conflicting
//!    request is still present, whether that one holds its guard or is itself
//!    still waiting. Otherwise it waits (on a condition variable, never
//!    spinning) until that is true.
//! 2. Requests of the same kind never wait for each other, overlapping or
//!    not: two snapshots only read the CPU table, and two invalidations of the
//!    same range may run together, as kernel invalidations of one range can.
//!    What is ordered is snapshot against invalidation.
//! 3. Requests over disjoint ranges never wait for each other, however busy
//!    the lock is.
//! 4. There is no barging: a request that arrives after a *waiting*
//!    conflicting request queues behind it even if whatever that one waits
//!    for does not overlap the newcomer. With snapshot `S1` held, invalidation
//!    `I2` waiting for it, and an overlapping snapshot `S3` arriving, `S3`
//!    waits for `I2` although it would not conflict with `S1`. This is what
//!    keeps either kind from starving the other.
//! 5. A guard is released when it is dropped, including during a panic's
//!    unwinding. The release wakes exactly the waiters it lets through.
//! 6. [`RangeLock::try_invalidate`] is granted under rule 1 or not at all: it
//!    returns [`WouldBlock`] whenever an earlier conflicting snapshot is
//!    present (held *or waiting*, so it does not barge either), and leaves no
//!    trace when it fails.
//!
//! Because a request waits only on requests that arrived before it, the
//! waits-for graph has no cycle: the earliest waiting request waits only on
//! held guards, which are released without taking the lock again. The one
//! way to deadlock is the caller's: taking a conflicting guard on a thread
//! that already holds one (the second request queues behind the first, which
//! its own thread will never drop), or, more generally, blocking inside a
//! guard on something that waits for a later range-lock request. Use
//! [`RangeLock::try_invalidate`] where that cannot be ruled out.
//!
//! ## What a caller that retries `try_invalidate` gets
//!
//! A failed attempt neither queues nor delays anyone, so retrying is always
//! safe. It succeeds at the first attempt that finds no conflicting snapshot
//! present; since a snapshot guard is held only while the device installs,
//! and every waiting snapshot is granted in bounded time (rule 4), a finite
//! burst of device faults is drained and a retry then succeeds. Against an
//! *unbounded* stream of overlapping snapshots a bare retry loop has no such
//! bound: a caller that must eventually invalidate (rather than skip, as
//! reclaim does) calls [`RangeLock::invalidate`], which takes a ticket and
//! waits only for the snapshots that arrived before it.
//!
//! ## Handing a refused invalidation to the snapshots
//!
//! A caller that must not wait, yet must not lose its invalidation either
//! (the mirror's, which runs on the service thread), records its range in a
//! ledger kept under the device table's lock: each snapshot in flight
//! leaves those pages out of its install. The device table then ends as if
//! the invalidation had waited for the snapshot and cleared what it
//! installed. A loom model checks that no interleaving leaves a stale entry.
//!
//! # State under the lock
//!
//! One mutex per address space (the [`RangeLock`] itself) protects:
//! - `entries`: every request that is present, held or waiting, **in arrival
//!   order** (a new one is pushed at the back; a release removes its entry
//!   from wherever it is, keeping the order). Each entry has its ticket (its
//!   identity), kind, range, whether it is `granted`, and, while it waits, the
//!   condition variable its thread sleeps on;
//! - `next_ticket`, and the counters reported by [`RangeLock::stats`].
//!
//! Whether a request may be granted depends only on the entries before it,
//! and an entry can only leave, never join, the part of the list before an
//! existing one. So once grantable a request stays grantable, and only a
//! release can make a waiter grantable, namely a waiter after the released
//! entry that conflicts with it. The release re-checks exactly those, marks
//! the ones that became grantable `granted` (still under the lock) and
//! notifies each one's own condition variable. A woken waiter only checks its
//! `granted` flag. Mutual exclusion follows: if conflicting `A` (earlier) and
//! `B` (later) were ever both granted, `B` was granted while `A`, present
//! from before `B` arrived until `A`'s release, was in the list before it,
//! contradicting rule 1.
//!
//! Granting and releasing cost a scan of the list (quadratic in the number
//! of present requests for the re-check). The list holds the requests in
//! flight on one address space, a handful in practice; correctness comes
//! before cleverness here.
//!
//! # The interleavings it prevents
//!
//! **A snapshot installing PFNs after an invalidation zapped them.** Without
//! any protocol a device fault reads a PTE, an invalidation zaps the device
//! table and changes the PTE, and the fault then installs the PFN it read:
//! the device keeps a page the CPU no longer maps. Under the range lock the
//! two cannot overlap in time, whichever arrives first:
//!
//! ```text
//!  invalidation (mm side)                 device fault (snapshot)
//!  ----------------------                 -----------------------
//!  g = invalidate(r)          // granted
//!  zap device entries of r
//!                                         s = snapshot(r)
//!                                           // waits: an earlier
//!                                           // conflicting request is held
//!  change the CPU PTEs of r
//!  drop(g)  -> grants s, wakes it
//!                                         read the CPU PTEs (new pages)
//!                                         install them in the device table
//!                                         drop(s)
//! ```
//!
//! and in the other order the invalidation waits for the installing snapshot
//! and then zaps what it installed:
//!
//! ```text
//!  invalidation (mm side)                 device fault (snapshot)
//!  ----------------------                 -----------------------
//!                                         s = snapshot(r)   // granted
//!                                         read the CPU PTEs (old pages)
//!  g = invalidate(r)
//!    // waits for s
//!                                         install them in the device table
//!                                         drop(s) -> grants g, wakes it
//!  zap device entries of r  // removes what s installed
//!  change the CPU PTEs of r
//!  drop(g)
//! ```
//!
//! **An invalidation storm starving a faulting device.** Under the sequence
//! protocol every invalidation that overlaps a fault's walk forces a retry,
//! so a steady stream of them can keep one fault retrying forever. Here a
//! snapshot waits only for the invalidations that arrived before it; those
//! that arrive later conflict with the snapshot and queue behind it (rule 4),
//! so the fault is granted after a bounded number of invalidations and never
//! retries.
//!
//! **A device starving reclaim.** Were snapshots allowed to join overlapping
//! snapshots that already hold the lock (readers first), devices faulting
//! back to back on a range would keep an invalidation waiting forever:
//!
//! ```text
//!  device A          reclaim                 device B
//!  snapshot(r) held
//!                    invalidate(r) waits
//!                                            snapshot(r): readers first
//!                                            would grant it at once...
//!  drop                                      ...and A faults again before
//!                                            B drops: the invalidation
//!                                            never runs.
//! ```
//!
//! FIFO order forbids that: B queues behind the waiting invalidation, which
//! waits only for A. Still, reclaim then stalls for as long as A installs,
//! which is the drawback the seed accepts and proposes to fix with
//! `mmu_notifier_try_to_invalidate`: [`RangeLock::try_invalidate`] returns
//! [`WouldBlock`] instead of waiting, and reclaim skips to its next candidate.
//!
//! # Differences from the seed
//!
//! The proposed `hmm_vma_range_lock` made a snapshot wait for *every* active
//! invalidation of the address space (`notifier_count`) and chained one
//! waiter per range through `hmm_range::waiting`; here a snapshot waits only
//! for overlapping invalidations, any number of requests may wait on one
//! range, and both kinds share one arrival order.

use core::fmt;

use crate::addr::{VaRange, VirtAddr};
use crate::error::Error;
use crate::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a request does to the CPU-side mapping of its range.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// A device fault reads the CPU page table and installs what it read in
    /// the device table. Overlapping snapshots may hold the lock together.
    Snapshot,
    /// The CPU side changes the range and the device tables are zapped.
    /// Overlapping invalidations may hold the lock together.
    Invalidate,
}

/// [`RangeLock::try_invalidate`] would have had to wait.
///
/// Converts into [`Error::Again`] (`-EAGAIN`), the kernel's answer for an
/// invalidation that could not proceed without blocking.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
#[error("an overlapping snapshot holds or waits for the range; the invalidation would block")]
pub struct WouldBlock;

impl From<WouldBlock> for Error {
    fn from(_: WouldBlock) -> Self {
        Error::Again
    }
}

/// A snapshot of a [`RangeLock`]'s state and counters, for tests and
/// benchmarks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RangeLockStats {
    /// Guards currently held.
    pub holders: usize,
    /// Requests currently waiting.
    pub waiters: usize,
    /// Requests (blocking or `try_invalidate`) granted without waiting, ever.
    pub granted_immediately: u64,
    /// Requests that had to wait before being granted, ever (counted when
    /// they start waiting).
    pub waited: u64,
    /// `try_invalidate` calls that returned [`WouldBlock`], ever.
    pub would_block: u64,
}

/// One present request.
#[derive(Debug)]
struct Entry {
    /// Identity; tickets grow in arrival order.
    ticket: u64,
    /// Snapshot or invalidation.
    kind: Kind,
    /// The locked range.
    range: VaRange,
    /// Whether the request holds the lock (set under the lock, never cleared).
    granted: bool,
    /// The condition variable the waiting thread sleeps on; `None` for a
    /// request granted on arrival.
    wake: Option<Arc<Condvar>>,
}

impl Entry {
    /// Whether `self` and a request of `kind` over `range` must be ordered.
    fn conflicts(&self, kind: Kind, range: VaRange) -> bool {
        self.kind != kind && self.range.overlaps(range)
    }
}

/// Everything under the lock.
#[derive(Debug, Default)]
struct State {
    /// Present requests in arrival order.
    entries: Vec<Entry>,
    /// The next ticket to hand out.
    next_ticket: u64,
    /// See [`RangeLockStats::granted_immediately`].
    granted_immediately: u64,
    /// See [`RangeLockStats::waited`].
    waited: u64,
    /// See [`RangeLockStats::would_block`].
    would_block: u64,
}

impl State {
    /// Whether a request of `kind` over `range` placed after the first
    /// `before` entries may be granted (rule 1).
    fn grantable(&self, before: usize, kind: Kind, range: VaRange) -> bool {
        !self.entries[..before]
            .iter()
            .any(|e| e.conflicts(kind, range))
    }

    /// Appends a request and returns its ticket.
    fn push(&mut self, kind: Kind, range: VaRange, granted: bool) -> u64 {
        let ticket = self.next_ticket;
        // 2^64 requests are never reached; wrapping would only break the
        // uniqueness of a ticket after that many.
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.entries.push(Entry {
            ticket,
            kind,
            range,
            granted,
            wake: None,
        });
        ticket
    }

    /// The position of the request with `ticket`.
    fn position(&self, ticket: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.ticket == ticket)
    }

    /// Removes the request with `ticket` and grants every waiter that this
    /// release lets through, waking each on its own condition variable.
    fn release(&mut self, ticket: u64) {
        let Some(pos) = self.position(ticket) else {
            return;
        };
        let gone = self.entries.remove(pos);
        // Only a later waiter that conflicted with the released entry can
        // have become grantable: nothing else changed before any other one.
        for i in pos..self.entries.len() {
            let e = &self.entries[i];
            if e.granted || !e.conflicts(gone.kind, gone.range) {
                continue;
            }
            if self.grantable(i, e.kind, e.range) {
                let e = &mut self.entries[i];
                e.granted = true;
                if let Some(cv) = &e.wake {
                    cv.notify_all();
                }
            }
        }
    }
}

/// The per-address-space range lock: serializes overlapping snapshots and
/// invalidations in arrival order. See the [module documentation](self) for
/// the rules.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
}

impl RangeLock {
    /// A lock with nothing held or waiting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a snapshot guard over `range`: blocks until every
    /// earlier-arrived overlapping invalidation, held or waiting, is gone.
    ///
    /// Overlapping snapshots may hold the lock together. Hold the guard while
    /// reading the CPU page table and installing the result in the device
    /// table, and no longer: it blocks overlapping invalidations.
    ///
    /// Never call it with a guard of the other kind over an overlapping range
    /// held on the same thread: that deadlocks.
    pub fn snapshot(&self, range: VaRange) -> RangeGuard<'_> {
        self.acquire(Kind::Snapshot, range)
    }

    /// Takes an invalidation guard over `range`: blocks until every
    /// earlier-arrived overlapping snapshot, held or waiting, is gone.
    ///
    /// Overlapping invalidations may hold the lock together. Snapshots that
    /// arrive while this one waits queue behind it, so it waits only for the
    /// snapshots that arrived before it.
    ///
    /// Never call it with a guard of the other kind over an overlapping range
    /// held on the same thread: that deadlocks; use
    /// [`try_invalidate`](Self::try_invalidate) there.
    pub fn invalidate(&self, range: VaRange) -> RangeGuard<'_> {
        self.acquire(Kind::Invalidate, range)
    }

    /// Takes an invalidation guard over `range` if that needs no waiting.
    ///
    /// A failed attempt leaves no trace: it neither queues nor delays anyone,
    /// so the caller may skip the range or retry. A retry succeeds at the
    /// first attempt that finds no overlapping snapshot present; against an
    /// unbounded stream of overlapping snapshots only
    /// [`invalidate`](Self::invalidate) is guaranteed to get through (see the
    /// [module documentation](self)).
    ///
    /// # Errors
    /// [`WouldBlock`] when an earlier overlapping snapshot holds the lock or
    /// waits for it (granting now would either wait or barge past it).
    pub fn try_invalidate(&self, range: VaRange) -> Result<RangeGuard<'_>, WouldBlock> {
        let mut st = self.state.lock();
        let n = st.entries.len();
        if !st.grantable(n, Kind::Invalidate, range) {
            st.would_block += 1;
            return Err(WouldBlock);
        }
        st.granted_immediately += 1;
        let ticket = st.push(Kind::Invalidate, range, true);
        drop(st);
        Ok(RangeGuard {
            lock: self,
            ticket,
            kind: Kind::Invalidate,
            range,
        })
    }

    /// The current holders and waiters, and the counters since creation.
    pub fn stats(&self) -> RangeLockStats {
        let st = self.state.lock();
        let holders = st.entries.iter().filter(|e| e.granted).count();
        RangeLockStats {
            holders,
            waiters: st.entries.len() - holders,
            granted_immediately: st.granted_immediately,
            waited: st.waited,
            would_block: st.would_block,
        }
    }

    /// Queues a request and waits until it is granted.
    fn acquire(&self, kind: Kind, range: VaRange) -> RangeGuard<'_> {
        let mut st = self.state.lock();
        let n = st.entries.len();
        let granted = st.grantable(n, kind, range);
        let ticket = st.push(kind, range, granted);
        let cv = if granted {
            st.granted_immediately += 1;
            None
        } else {
            st.waited += 1;
            let cv = Arc::new(Condvar::new());
            if let Some(e) = st.entries.last_mut() {
                e.wake = Some(cv.clone());
            }
            Some(cv)
        };
        // From here on the guard owns the entry: should the wait unwind, its
        // drop (which runs after `st` was handed to the wait and so is not
        // held) removes the entry and lets later requests through.
        let guard = RangeGuard {
            lock: self,
            ticket,
            kind,
            range,
        };
        match cv {
            None => drop(st),
            Some(cv) => wait_granted(st, &cv, ticket),
        }
        guard
    }
}

/// Sleeps on `cv` until the request with `ticket` is granted.
fn wait_granted(mut st: MutexGuard<'_, State>, cv: &Condvar, ticket: u64) {
    loop {
        let granted = st.position(ticket).is_none_or(|i| st.entries[i].granted);
        if granted {
            return;
        }
        st = cv.wait(st);
    }
}

/// A held range lock: a snapshot installing or an invalidation running.
///
/// Dropping it (also during a panic's unwinding) releases the range and wakes
/// exactly the waiters that can now proceed.
#[must_use = "the range is unlocked as soon as the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
    kind: Kind,
    range: VaRange,
}

impl RangeGuard<'_> {
    /// The locked range.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// Whether this guards a snapshot or an invalidation.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl fmt::Debug for RangeGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeGuard")
            .field("ticket", &self.ticket)
            .field("kind", &self.kind)
            .field("range", &self.range)
            .finish()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.state.lock().release(self.ticket);
    }
}

/// A record, kept under the device table's lock, of the snapshots in flight
/// and of the invalidations they must leave out of their install: how a
/// [`RangeLock::try_invalidate`] that was refused hands its range to the
/// snapshots it would have waited for (the range-lock strategy of
/// [`crate::mirror`]).
///
/// A snapshot calls [`Ledger::begin`] once granted, before it reads the CPU
/// page table, and [`Ledger::end`] after its install; a refused invalidation
/// calls [`Ledger::leave`] after clearing the device table; the install
/// leaves out every page for which [`Ledger::left_out`] holds.
#[derive(Debug, Default)]
#[cfg_attr(
    all(loom, not(test)),
    allow(dead_code, reason = "the mirror that uses it is not built under loom")
)]
pub(crate) struct Ledger {
    /// Counts the invalidations left with snapshots.
    generation: u64,
    /// Each snapshot in flight: the generation when it was granted.
    snapshots: Vec<u64>,
    /// The invalidations left with snapshots: generation and range.
    left: Vec<(u64, VaRange)>,
}

#[cfg_attr(
    all(loom, not(test)),
    expect(dead_code, reason = "the mirror that uses it is not built under loom")
)]
impl Ledger {
    /// A snapshot was granted; returns its generation.
    pub(crate) fn begin(&mut self) -> u64 {
        self.snapshots.push(self.generation);
        self.generation
    }

    /// The snapshot of generation `since` is done; forgets what no snapshot
    /// in flight needs any more.
    pub(crate) fn end(&mut self, since: u64) {
        if let Some(i) = self.snapshots.iter().position(|&g| g == since) {
            self.snapshots.swap_remove(i);
        }
        match self.snapshots.iter().min() {
            None => self.left.clear(),
            Some(&oldest) => self.left.retain(|&(g, _)| g > oldest),
        }
    }

    /// Leaves `range` with the snapshots in flight; false when there are none.
    pub(crate) fn leave(&mut self, range: VaRange) -> bool {
        if self.snapshots.is_empty() {
            return false;
        }
        self.generation += 1;
        self.left.push((self.generation, range));
        true
    }

    /// Whether the page at `addr` was invalidated after generation `since`.
    pub(crate) fn left_out(&self, since: u64, addr: VirtAddr) -> bool {
        self.left
            .iter()
            .any(|&(g, r)| g > since && r.contains(addr))
    }
}

#[cfg(test)]
#[cfg(not(loom))]
mod tests;

#[cfg(test)]
#[cfg(loom)]
mod loom_tests;
