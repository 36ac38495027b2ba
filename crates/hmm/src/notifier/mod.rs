//! Interval notifiers: the interval-tree half of `mm/mmu_notifier.c`
//! (`include/linux/mmu_notifier.h`), reproduced exactly in userspace.
//!
//! A driver that mirrors part of an address space subscribes to a VA interval
//! with [`Subscriptions::insert`] and gets an [`IntervalNotifier`]. Whoever
//! changes the CPU side of the address space brackets the change with
//! [`Subscriptions::invalidate_range_start`] and
//! [`Subscriptions::invalidate_range_end`]; every subscription that overlaps
//! the range gets [`IntervalNotifierOps::invalidate`] in between. The driver
//! populates its device tables with the collision-retry loop
//! [`IntervalNotifier::read_begin`] → read the CPU side → take the driver lock
//! → [`IntervalNotifier::read_retry`] → install.
//!
//! # The protocol
//!
//! This is a collision-retry read-side/write-side "lock", a lot like a
//! seqcount, except that any number of write sides (invalidations) may hold it
//! at once. The write side protects the CPU page-table entries of the address
//! space: while any writer exists no PTE may be copied into a device table.
//! Holding the full write side also freezes the interval tree, so callbacks
//! can run without the lock on a snapshot of the overlapping subscriptions.
//!
//! ## State and who writes it
//!
//! Under the [`Subscriptions`] lock (the kernel's `subscriptions->lock`):
//! - `invalidate_seq`, the global sequence: starts at **2**;
//! - `active_invalidate_ranges`: invalidations between `_start` and `_end`;
//! - the interval tree and the deferred list of pending tree edits;
//! - `released`.
//!
//! The three states of the write side:
//! - **idle**: `active_invalidate_ranges == 0`, `invalidate_seq` even;
//! - **partially excluded**: `active_invalidate_ranges != 0`, seq even. Some
//!   invalidation runs but overlaps no subscription; the tree may change;
//! - **fully excluded** (an *odd epoch*): `active_invalidate_ranges != 0`, seq
//!   odd. The tree must not change: inserts and removes go to the deferred
//!   list and are applied, in order, by the `_end` that closes the epoch.
//!
//! Operations on the global seq, always under the lock: `seq |= 1` begins
//! writing, `seq += 1` (odd → even) releases, `seq & 1` tests for a writer.
//! Concurrent overlapping invalidations share one odd value, and the epoch
//! lasts until the *last* active invalidation ends, including ones that
//! overlap no subscription: overlapping windows merge into one epoch.
//!
//! Each subscription's own `invalidate_seq` is always **odd**. Insert sets it
//! under the `Subscriptions` lock (`seq - 1` when idle, the odd global seq when
//! an invalidation is active); otherwise only the driver writes it, through
//! [`Interval::set_seq`] **under the driver lock** from inside its
//! `invalidate` callback, with the odd `cur_seq` it was given. The driver reads
//! it with [`IntervalNotifier::read_retry`] under that same lock. Because idle
//! global values are even and subscription values are odd, "this subscription
//! is being invalidated right now" is exactly `sub seq == global seq`, with no
//! false positives, even after wrap-around.
//!
//! ## The interleaving it prevents
//!
//! Without the protocol a device fault could read a PTE, lose the CPU to an
//! invalidation that zaps the device table and then changes the PTE, and
//! finally install the PFN it read: the device would keep using a page the CPU
//! side no longer maps. With it:
//!
//! ```text
//!  invalidation (mm side)                 device fault (driver side)
//!  ----------------------                 --------------------------
//!                                         seq = read_begin(sub)    // 3, not invalidating
//!                                         pfn = read the CPU PTE   // old page
//!  invalidate_range_start:
//!    lock; active++; seq |= 1 (=5); unlock
//!    ops.invalidate(sub, range, cur_seq=5):
//!      driver_lock
//!        sub.set_seq(5)
//!        zap device entries
//!      driver_unlock
//!  change the CPU PTE
//!  invalidate_range_end:
//!    lock; active--; seq++ (=6);
//!    apply deferred edits; unlock; wake
//!                                         driver_lock
//!                                           read_retry(3): sub seq is 5 != 3
//!                                           -> true: the pfn is stale, retry
//!                                         driver_unlock
//! ```
//!
//! If instead the driver takes its lock before the callback does, `read_retry`
//! is false, the stale-to-be PFN is installed, and the callback, which needs the
//! same lock, zaps it right after. If `read_begin` runs after `set_seq` but
//! before `_end`, it sees `sub seq == global seq` and sleeps until the epoch
//! ends, so it never starts a walk that is already doomed. No barrier beyond
//! the two locks is needed: any race on the subscription's seq is closed by
//! the eventual `read_retry`, which is ordered against `set_seq` by the driver
//! lock. That is why the subscription seq is a relaxed atomic (the kernel's
//! `READ_ONCE` / `WRITE_ONCE`).
//!
//! ## Lifetimes and re-entrancy
//!
//! Callbacks run without the `Subscriptions` lock held, on `Arc` clones of the
//! subscriptions collected under it. [`IntervalNotifier::remove`] (and
//! `Drop`) of a subscription that is in the tree during an odd epoch waits for
//! the epoch to end, so once it returns no callback runs or will run on it.
//! Calling `remove` from inside any `invalidate` callback on the same thread is
//! refused with [`Error::Inval`] instead of deadlocking, and a drop there only
//! schedules the removal for the end of the epoch (memory-safe because the
//! running invalidation holds its own clone).

mod itree;

use core::cell::Cell;
use core::fmt;
use core::num::NonZeroU64;

use crate::addr::VirtAddr;
use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};

use itree::ITree;

/// Why an invalidation happens (`enum mmu_notifier_event`), with the kernel's
/// values.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Event {
    /// `MMU_NOTIFY_UNMAP`: munmap, or mremap moving the range.
    Unmap = 0,
    /// `MMU_NOTIFY_CLEAR`: PTEs cleared (madvise, page replacement, …).
    Clear = 1,
    /// `MMU_NOTIFY_PROTECTION_VMA`: protection change of the whole VMA.
    ProtectionVma = 2,
    /// `MMU_NOTIFY_PROTECTION_PAGE`: per-page protection change; inspect the CPU table.
    ProtectionPage = 3,
    /// `MMU_NOTIFY_SOFT_DIRTY`: soft-dirty accounting; same page and access.
    SoftDirty = 4,
    /// `MMU_NOTIFY_RELEASE`: the address space is going away.
    Release = 5,
    /// `MMU_NOTIFY_MIGRATE`: migration; `owner` is the migrating pgmap owner.
    Migrate = 6,
    /// `MMU_NOTIFY_EXCLUSIVE`: conversion to device-exclusive; `owner` is the requester.
    Exclusive = 7,
}

/// An opaque owner identity (the kernel's pgmap owner / `dev_private_owner`
/// pointer), unique per [`OwnerId::new`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OwnerId(NonZeroU64);

impl OwnerId {
    /// A fresh identity, different from every other one made in this process.
    pub fn new() -> Self {
        // A process-wide id counter is not part of any protocol loom models,
        // so it is a plain std atomic (a loom atomic cannot live in a static).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(NonZeroU64::MIN.saturating_add(n))
    }

    /// The identity as a number (never zero).
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl Default for OwnerId {
    /// Same as [`OwnerId::new`]: a fresh identity.
    fn default() -> Self {
        Self::new()
    }
}

/// One invalidation (`struct mmu_notifier_range`).
///
/// `end` is exclusive and is the mm operation's range: it is **not** clipped
/// to the subscription that receives it.
#[derive(Clone, Debug)]
pub struct NotifierRange {
    /// First address invalidated.
    pub start: VirtAddr,
    /// One past the last address invalidated.
    pub end: VirtAddr,
    /// Why.
    pub event: Event,
    /// `MMU_NOTIFIER_RANGE_BLOCKABLE`: callbacks may sleep.
    pub blockable: bool,
    /// The owner that caused the event, so that it can skip its own events.
    pub owner: Option<OwnerId>,
}

impl NotifierRange {
    /// A blockable range without owner (`mmu_notifier_range_init`).
    pub fn new(start: VirtAddr, end: VirtAddr, event: Event) -> Self {
        Self {
            start,
            end,
            event,
            blockable: true,
            owner: None,
        }
    }

    /// The same range carrying `owner` (`mmu_notifier_range_init_owner`).
    #[must_use]
    pub fn with_owner(mut self, owner: OwnerId) -> Self {
        self.owner = Some(owner);
        self
    }

    /// The same range, not blockable (as `invalidate_range_start_nonblock` sets it).
    #[must_use]
    pub fn non_blocking(mut self) -> Self {
        self.blockable = false;
        self
    }

    /// The inclusive last address, `None` for an empty range (`end <= start`).
    fn last(&self) -> Option<u64> {
        if self.end > self.start {
            Some(self.end.0 - 1)
        } else {
            None
        }
    }
}

/// The callbacks of an interval subscription (`struct mmu_interval_notifier_ops`).
pub trait IntervalNotifierOps: Send + Sync + 'static {
    /// `ops->invalidate(sub, range, cur_seq)`: `range` overlaps `sub`.
    ///
    /// The kernel's contract: take the driver lock, call
    /// [`sub.set_seq(cur_seq)`](Interval::set_seq) under it, tear down the
    /// device mappings of the overlap, unlock, return `true`. `cur_seq` is
    /// always odd. For a non-blockable range (`!range.blockable`) do not sleep:
    /// `try_lock`, and return `false` if that would block, which aborts the
    /// whole invalidation with [`Error::Again`]. A driver may return `true`
    /// without `set_seq` for events it caused itself (matching `range.owner`)
    /// or if it never uses `read_begin` / `read_retry`.
    ///
    /// Runs without any lock of this module held. It must not call
    /// [`IntervalNotifier::read_begin`] on a subscription of the same address
    /// space (it would wait for the epoch it is holding open), nor
    /// [`IntervalNotifier::remove`] (refused with [`Error::Inval`]).
    fn invalidate(&self, sub: &Interval, range: &NotifierRange, cur_seq: u64) -> bool;
}

/// One subscription (`struct mmu_interval_notifier`): what a callback
/// receives as `sub`.
///
/// # Invariants
/// `start <= last`; `invalidate_seq` is odd once the subscription has been
/// inserted.
pub struct Interval {
    /// First address covered.
    start: VirtAddr,
    /// Last address covered (inclusive).
    last: VirtAddr,
    /// The callbacks. A std `Arc` even under loom: loom's `Arc` cannot hold a
    /// trait object made by coercion, and the callbacks' own synchronization is
    /// what loom models, not their reference count.
    ops: std::sync::Arc<dyn IntervalNotifierOps>,
    /// The subscription's sequence (`interval_sub->invalidate_seq`).
    invalidate_seq: AtomicU64,
}

impl Interval {
    /// The first address covered.
    pub fn start(&self) -> VirtAddr {
        self.start
    }

    /// The last address covered, inclusive (the kernel's `interval_tree.last`).
    pub fn last(&self) -> VirtAddr {
        self.last
    }

    /// `(start, last)`, both inclusive.
    pub fn range(&self) -> (VirtAddr, VirtAddr) {
        (self.start, self.last)
    }

    /// Whether `range` overlaps this subscription.
    pub fn overlaps(&self, range: &NotifierRange) -> bool {
        range
            .last()
            .is_some_and(|l| self.start.0 <= l && range.start <= self.last)
    }

    /// `mmu_interval_set_seq`: records `cur_seq` (odd) as this subscription's
    /// sequence.
    ///
    /// Call it from `invalidate`, under the same driver lock that guards
    /// [`IntervalNotifier::read_retry`].
    pub fn set_seq(&self, cur_seq: u64) {
        // WRITE_ONCE: the driver lock orders it against read_retry.
        self.invalidate_seq.store(cur_seq, Ordering::Relaxed);
    }

    /// `mmu_interval_read_retry`: whether `seq` (from `read_begin`) is stale.
    /// Call it under the driver lock.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.invalidate_seq.load(Ordering::Relaxed) != seq
    }

    /// `mmu_interval_check_retry`: the same test without the driver lock.
    /// `true` is reliable; `false` is only a hint.
    pub fn check_retry(&self, seq: u64) -> bool {
        // READ_ONCE.
        self.invalidate_seq.load(Ordering::Relaxed) != seq
    }

    /// The subscription's current sequence (always odd), for tests and
    /// introspection.
    pub fn seq(&self) -> u64 {
        self.invalidate_seq.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interval")
            .field("start", &self.start)
            .field("last", &self.last)
            .field("invalidate_seq", &self.seq())
            .finish_non_exhaustive()
    }
}

/// Whether two handles name the same subscription.
fn same(a: &Arc<Interval>, b: &Arc<Interval>) -> bool {
    Arc::ptr_eq(a, b)
}

/// The lock-protected part of [`Subscriptions`].
#[derive(Debug)]
struct State {
    /// The global sequence: even when idle, odd during an excluding epoch.
    invalidate_seq: u64,
    /// Invalidations between `_start` and `_end`.
    active_invalidate_ranges: u64,
    /// The subscriptions callbacks are delivered to.
    itree: ITree<Arc<Interval>>,
    /// Tree edits postponed to the end of the odd epoch, in order: an entry
    /// not in the tree is an insert, one in the tree a removal.
    deferred: Vec<Arc<Interval>>,
    /// Set by [`Subscriptions::release`].
    released: bool,
}

impl State {
    /// Whether `sub` is in the tree (the kernel's `!RB_EMPTY_NODE`).
    fn in_tree(&self, sub: &Arc<Interval>) -> bool {
        self.itree.contains(sub.start.0, |s| same(s, sub))
    }

    /// Whether an excluding epoch is running.
    fn is_invalidating(&self) -> bool {
        self.invalidate_seq & 1 == 1
    }
}

/// The per-address-space notifier state (`struct mmu_notifier_subscriptions`,
/// interval-tree part).
///
/// See the [module documentation](self) for the protocol.
pub struct Subscriptions {
    /// The shared state, also held by every [`IntervalNotifier`]. A separate
    /// `Arc` (rather than `self: &Arc<Self>`) keeps `insert` a `&self` method
    /// under loom too, whose `Arc` cannot be a method receiver.
    core: Arc<Core>,
}

/// What [`Subscriptions`] and its notifiers share.
#[derive(Debug)]
struct Core {
    /// `subscriptions->lock` and what it guards.
    state: Mutex<State>,
    /// `subscriptions->wq`: woken at the end of every odd epoch.
    wq: Condvar,
}

impl fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Subscriptions");
        // Never wait in Debug: it may be called while an invalidation runs.
        match self.core.state.try_lock() {
            Some(st) => d
                .field("invalidate_seq", &st.invalidate_seq)
                .field("active_invalidate_ranges", &st.active_invalidate_ranges)
                .field("subscriptions", &st.itree.len())
                .field("deferred", &st.deferred.len())
                .field("released", &st.released)
                .finish(),
            None => d.finish_non_exhaustive(),
        }
    }
}

impl Subscriptions {
    /// Empty state, global sequence 2.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            core: Arc::new(Core {
                state: Mutex::new(State {
                    invalidate_seq: 2,
                    active_invalidate_ranges: 0,
                    itree: ITree::new(),
                    deferred: Vec::new(),
                    released: false,
                }),
                wq: Condvar::new(),
            }),
        })
    }

    /// `mmu_interval_notifier_insert`: subscribes `ops` to
    /// `[start, start + length - 1]`.
    ///
    /// On return the subscription may not be in the tree yet (it is deferred
    /// while an invalidation epoch runs); use [`IntervalNotifier::read_begin`],
    /// which waits for that epoch, before reading the CPU side.
    ///
    /// `ops` must not own the returned handle (a cycle would keep the
    /// subscription alive forever); keep a `Weak` there instead.
    ///
    /// # Errors
    /// - [`Error::Overflow`] when `length` is 0 or `start + length - 1` overflows;
    /// - [`Error::Released`] after [`Subscriptions::release`].
    pub fn insert(
        &self,
        start: VirtAddr,
        length: u64,
        ops: std::sync::Arc<dyn IntervalNotifierOps>,
    ) -> Result<IntervalNotifier> {
        let last = length
            .checked_sub(1)
            .and_then(|l| start.0.checked_add(l))
            .ok_or(Error::Overflow)?;
        let sub = Arc::new(Interval {
            start,
            last: VirtAddr(last),
            ops,
            invalidate_seq: AtomicU64::new(0),
        });
        let mut st = self.core.state.lock();
        if st.released {
            return Err(Error::Released);
        }
        if st.active_invalidate_ranges != 0 {
            if st.is_invalidating() {
                // The tree is frozen: insert at the end of the epoch.
                st.deferred.push(Arc::clone(&sub));
            } else {
                // Partially excluded: the running invalidations' VAs are
                // unknown, so force the odd state to make read_begin wait for
                // them, and insert now.
                st.invalidate_seq |= 1;
                st.itree.insert(start.0, last, Arc::clone(&sub));
            }
            sub.invalidate_seq
                .store(st.invalidate_seq, Ordering::Relaxed);
        } else {
            debug_assert!(!st.is_invalidating());
            sub.invalidate_seq
                .store(st.invalidate_seq.wrapping_sub(1), Ordering::Relaxed);
            st.itree.insert(start.0, last, Arc::clone(&sub));
        }
        drop(st);
        Ok(IntervalNotifier {
            core: Arc::clone(&self.core),
            sub,
            removed: false,
        })
    }

    /// `mmu_notifier_invalidate_range_start` (interval-tree part): begins an
    /// invalidation and calls every overlapping subscription, in tree order.
    ///
    /// Every `Ok` must be paired with one [`Subscriptions::invalidate_range_end`]
    /// of the same range.
    ///
    /// # Errors
    /// [`Error::Again`] when `range` is not blockable and a callback returned
    /// `false`. The end step has then already run: the caller must not change
    /// the CPU side and must not call `invalidate_range_end`.
    pub fn invalidate_range_start(&self, range: &NotifierRange) -> Result<()> {
        let (cur_seq, subs) = self.core.inv_start_range(range, false);
        // Should a callback panic, close this invalidation anyway so that the
        // epoch ends and waiters are not stranded.
        let mut end = EndOnUnwind {
            core: &self.core,
            armed: true,
        };
        for sub in &subs {
            let ok = {
                let _in_cb = CallbackScope::enter();
                sub.ops.invalidate(sub, range, cur_seq)
            };
            if !ok {
                if range.blockable {
                    tracing::warn!(
                        start = %sub.start,
                        last = %sub.last,
                        "interval notifier returned false on a blockable range; ignored"
                    );
                } else {
                    end.armed = false;
                    self.core.inv_end();
                    return Err(Error::Again);
                }
            }
        }
        end.armed = false;
        Ok(())
    }

    /// `mmu_notifier_invalidate_range_end` (interval-tree part): ends one
    /// invalidation; the last one of an odd epoch applies the deferred tree
    /// edits and wakes every waiter.
    pub fn invalidate_range_end(&self, range: &NotifierRange) {
        let _ = range;
        self.core.inv_end();
    }

    /// [`invalidate_range_start`](Self::invalidate_range_start) followed, on
    /// success, by [`invalidate_range_end`](Self::invalidate_range_end).
    ///
    /// # Errors
    /// As `invalidate_range_start`.
    pub fn invalidate(&self, range: &NotifierRange) -> Result<()> {
        self.invalidate_range_start(range)?;
        self.invalidate_range_end(range);
        Ok(())
    }

    /// `__mmu_notifier_release` (interval-tree part): one blockable
    /// [`Event::Release`] invalidation over `[0, u64::MAX)` delivered to every
    /// subscription, after which the address space counts as released and
    /// [`insert`](Self::insert) fails with [`Error::Released`].
    ///
    /// Idempotent: only the first call delivers anything, so each subscription
    /// gets `Release` at most once. Subscriptions whose insert was deferred by
    /// a running epoch are waited for so that they get it too (unless this is
    /// called from inside a callback, where waiting could deadlock). Every
    /// subscription in the tree is called, including one covering the single
    /// address `u64::MAX` that the exclusive end cannot express.
    /// Subscriptions stay in the tree; `remove`, `read_begin` and `read_retry`
    /// keep working.
    pub fn release(&self) {
        let mut st = self.core.state.lock();
        if st.released {
            return;
        }
        // From here on no insert succeeds, so the deferred list can only lose
        // pending inserts.
        st.released = true;
        if !in_callback() {
            let seq = st.invalidate_seq;
            let pending_insert = |st: &State| st.deferred.iter().any(|d| !st.in_tree(d));
            if st.is_invalidating() && pending_insert(&st) {
                while st.invalidate_seq == seq {
                    st = self.core.wq.wait(st);
                }
            }
        }
        drop(st);
        let range = NotifierRange::new(VirtAddr(0), VirtAddr(u64::MAX), Event::Release);
        let (cur_seq, subs) = self.core.inv_start_range(&range, true);
        let mut end = EndOnUnwind {
            core: &self.core,
            armed: true,
        };
        for sub in &subs {
            let _in_cb = CallbackScope::enter();
            if !sub.ops.invalidate(sub, &range, cur_seq) {
                tracing::warn!(
                    start = %sub.start,
                    last = %sub.last,
                    "interval notifier returned false on release; ignored"
                );
            }
        }
        end.armed = false;
        self.core.inv_end();
    }

    /// Whether [`release`](Self::release) has run.
    pub fn is_released(&self) -> bool {
        self.core.state.lock().released
    }

    /// The current global sequence (`subscriptions->invalidate_seq`).
    pub fn seq(&self) -> u64 {
        self.core.state.lock().invalidate_seq
    }
}

impl Core {
    /// `mn_itree_inv_start_range`: counts the invalidation in, and if any
    /// subscription overlaps makes the epoch odd. Returns `cur_seq` and the
    /// overlapping subscriptions in tree order; the tree cannot change until
    /// the matching `inv_end` (the epoch stays odd), so the snapshot is what
    /// the kernel's lockless iteration would see.
    fn inv_start_range(&self, range: &NotifierRange, all: bool) -> (u64, Vec<Arc<Interval>>) {
        let mut st = self.state.lock();
        st.active_invalidate_ranges += 1;
        let mut subs = Vec::new();
        if all {
            subs.extend(st.itree.iter().cloned());
        } else if let Some(last) = range.last() {
            st.itree
                .for_each_overlap(range.start.0, last, |s| subs.push(Arc::clone(s)));
        }
        if !subs.is_empty() {
            st.invalidate_seq |= 1;
        }
        (st.invalidate_seq, subs)
    }

    /// `mn_itree_inv_end`.
    fn inv_end(&self) {
        let mut st = self.state.lock();
        let Some(active) = st.active_invalidate_ranges.checked_sub(1) else {
            tracing::warn!("invalidate_range_end without a matching invalidate_range_start");
            return;
        };
        st.active_invalidate_ranges = active;
        if active != 0 || !st.is_invalidating() {
            return;
        }
        // The last invalidation of the odd epoch: release the write side.
        st.invalidate_seq = st.invalidate_seq.wrapping_add(1);
        let deferred = core::mem::take(&mut st.deferred);
        // Removed subscriptions are dropped after unlocking: the last
        // reference may run the driver's Drop, which must not run under the lock.
        let mut removed = Vec::new();
        for sub in deferred {
            if let Some(old) = st.itree.remove(sub.start.0, |s| same(s, &sub)) {
                removed.push(old);
            } else {
                st.itree.insert(sub.start.0, sub.last.0, sub);
            }
        }
        drop(st);
        self.wq.notify_all();
        drop(removed);
    }

    /// `mmu_interval_notifier_remove` without the handle; waits for the odd
    /// epoch when `wait`.
    fn remove_sub(&self, sub: &Arc<Interval>, wait: bool) {
        let mut st = self.state.lock();
        let mut garbage = None;
        let mut seq = None;
        if st.is_invalidating() {
            if st.in_tree(sub) {
                // Removal at the end of the epoch; wait for it.
                st.deferred.push(Arc::clone(sub));
                seq = Some(st.invalidate_seq);
            } else if let Some(pos) = st.deferred.iter().position(|d| same(d, sub)) {
                // Still waiting to be inserted: cancel the insert, no wait.
                garbage = Some(st.deferred.remove(pos));
            } else {
                tracing::warn!(
                    "removing an interval notifier that is neither in the tree nor pending"
                );
            }
        } else {
            garbage = st.itree.remove(sub.start.0, |s| same(s, sub));
            if garbage.is_none() {
                tracing::warn!("removing an interval notifier that is not in the tree");
            }
        }
        if let (true, Some(seq)) = (wait, seq) {
            while st.invalidate_seq == seq {
                st = self.wq.wait(st);
            }
        }
        drop(st);
        drop(garbage);
    }
}

/// Runs `inv_end` if dropped while armed (a callback panicked).
struct EndOnUnwind<'a> {
    /// Whose invalidation to end.
    core: &'a Core,
    /// Cleared on every normal exit path.
    armed: bool,
}

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.core.inv_end();
        }
    }
}

#[cfg(not(loom))]
std::thread_local! {
    /// How many `invalidate` callbacks this thread is inside.
    static CALLBACK_DEPTH: Cell<usize> = const { Cell::new(0) };
}

#[cfg(loom)]
loom::thread_local! {
    /// How many `invalidate` callbacks this (loom) thread is inside.
    static CALLBACK_DEPTH: Cell<usize> = Cell::new(0);
}

/// Whether this thread is inside an `invalidate` callback.
fn in_callback() -> bool {
    // During thread teardown the slot may be gone: no callback runs then.
    CALLBACK_DEPTH.try_with(|d| d.get() != 0).unwrap_or(false)
}

/// Marks the current thread as inside a callback for its lifetime.
struct CallbackScope(());

impl CallbackScope {
    /// Enters a callback.
    fn enter() -> Self {
        let _ = CALLBACK_DEPTH.try_with(|d| d.set(d.get() + 1));
        Self(())
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        let _ = CALLBACK_DEPTH.try_with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// A subscription handle returned by [`Subscriptions::insert`]; dropping it
/// removes the subscription.
///
/// Dereferences to its [`Interval`].
pub struct IntervalNotifier {
    /// The state of the address space it is subscribed to.
    core: Arc<Core>,
    /// The subscription.
    sub: Arc<Interval>,
    /// Set once removed, so that `Drop` does nothing.
    removed: bool,
}

impl fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("interval", &*self.sub)
            .finish_non_exhaustive()
    }
}

impl IntervalNotifier {
    /// `mmu_interval_read_begin`: the sequence to pass to
    /// [`read_retry`](Self::read_retry) after reading the CPU side.
    ///
    /// If this subscription is being invalidated right now, sleeps until that
    /// invalidation epoch ends. `read_retry` may already be true on return;
    /// the caller loops (and bounds the loop if it wants a deadline). Do not
    /// call it while holding the driver lock or from inside a callback.
    pub fn read_begin(&self) -> u64 {
        let mut st = self.core.state.lock();
        // Pairs with the relaxed store in set_seq; races are closed by the
        // eventual read_retry under the driver lock.
        let seq = self.sub.invalidate_seq.load(Ordering::Relaxed);
        // Subscription seqs are odd and idle global seqs even, so equality
        // means "inside the current odd epoch" and the wait always ends.
        if seq == st.invalidate_seq {
            while st.invalidate_seq == seq {
                st = self.core.wq.wait(st);
            }
        }
        seq
    }

    /// `mmu_interval_read_retry`: whether what was read since
    /// [`read_begin`](Self::read_begin) returned `seq` is stale. Call it under
    /// the driver lock that `invalidate` takes around `set_seq`.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.sub.read_retry(seq)
    }

    /// `mmu_interval_check_retry`: lockless [`read_retry`](Self::read_retry);
    /// `true` is reliable, `false` only a hint.
    pub fn check_retry(&self, seq: u64) -> bool {
        self.sub.check_retry(seq)
    }

    /// `mmu_interval_set_seq`; see [`Interval::set_seq`].
    pub fn set_seq(&self, cur_seq: u64) {
        self.sub.set_seq(cur_seq);
    }

    /// The subscription, as callbacks see it.
    pub fn interval(&self) -> &Interval {
        &self.sub
    }

    /// Whether this notifier is subscribed to `subs` (pointer identity).
    pub fn belongs_to(&self, subs: &Subscriptions) -> bool {
        Arc::ptr_eq(&self.core, &subs.core)
    }

    /// `mmu_interval_notifier_remove`: unsubscribes.
    ///
    /// If an invalidation epoch is running and the subscription is in the
    /// tree, waits for the epoch to end. Once this returns `Ok`, no callback
    /// runs or will run on the subscription. A subscription whose insert is
    /// still deferred is cancelled without waiting.
    ///
    /// # Errors
    /// [`Error::Inval`] when called from inside an `invalidate` callback on
    /// this thread, where waiting would deadlock. The handle is then dropped,
    /// which schedules the removal for the end of the running epoch without
    /// waiting: callbacks of that epoch may still reach the subscription.
    pub fn remove(mut self) -> Result<()> {
        if in_callback() {
            return Err(Error::Inval(
                "remove called from inside an invalidate callback",
            ));
        }
        self.removed = true;
        self.core.remove_sub(&self.sub, true);
        Ok(())
    }
}

impl core::ops::Deref for IntervalNotifier {
    type Target = Interval;

    fn deref(&self) -> &Interval {
        &self.sub
    }
}

impl Drop for IntervalNotifier {
    /// Removes the subscription as [`IntervalNotifier::remove`] does. From
    /// inside a callback, or while the thread unwinds from a panic (which may
    /// have left an invalidation that never ends), the removal is deferred to
    /// the end of the epoch without waiting.
    fn drop(&mut self) {
        if !self.removed {
            self.removed = true;
            let wait = !in_callback() && !std::thread::panicking();
            self.core.remove_sub(&self.sub, wait);
        }
    }
}

#[cfg(test)]
#[cfg(not(loom))]
mod tests;

#[cfg(test)]
#[cfg(loom)]
mod loom_tests;
