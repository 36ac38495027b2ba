//! A device page table kept coherent with the CPU's: the historic
//! `hmm_mirror`, today's `drm_gpusvm` in miniature.
//!
//! A [`Mirror`] owns an interval notifier and a table of entries (page →
//! PFN, writability, map order). A device fault runs the canonical loop of
//! `Documentation/mm/hmm.rst`, chunk by chunk:
//!
//! ```text
//! seq = read_begin()
//! range_fault(chunk)          -- Busy: retry until the deadline
//! lock the table
//! if read_retry(seq): unlock, retry
//! install the entries
//! unlock
//! ```
//!
//! and the invalidate callback takes the same lock, calls `set_seq`, and
//! clears every entry overlapping the invalidated range. So at any time a page
//! is either mapped to the same memory in both tables or absent from the
//! device's (the guarantee of the old `hmm.h` header comment).
//!
//! With one exception userspace cannot close. The kernel zaps the pages of
//! an `MADV_DONTNEED` (or `MADV_REMOVE`, `MADV_FREE`) only after the
//! service thread has read its event, and says nothing when the zap is
//! done. The service thread notes the pages the zap is about to free, and
//! a fault treats them, and whatever is faulted in beside them meanwhile,
//! as absent until the zap has passed; but a discarded range with no
//! present page when its event is read has no page to tell the zap's end
//! by, and a device fault in the short window before that zap can install
//! a frame the zap then frees. The entry names a freed frame until the
//! page is invalidated or faulted again. A device that reaches memory by
//! virtual address (as the software device does, fault-safely) is
//! unaffected; one that uses the PFNs must pin the pages it maps.
//!
//! # Two strategies
//!
//! That loop is [`Strategy::Sequence`], the kernel's and the default. Any
//! invalidation of the mirror between `read_begin` and `read_retry` throws
//! the chunk's walk away, so a steady stream of them can keep a device fault
//! retrying until its deadline. [`Strategy::RangeLock`] is the alternative of
//! seed 003 (see [`crate::rangelock`]): a device fault takes a snapshot guard
//! over its chunk, walks (faulting as asked) and installs, all in one pass;
//! an invalidation takes an invalidation guard over its range, so the two are
//! serialized in arrival order and invalidations of other ranges never
//! disturb a fault. A device fault under it never restarts because of an
//! invalidation.
//!
//! Under the range lock the invalidation side never *waits* for a snapshot.
//! It runs on the `Mm`'s service thread (or inside a library operation), and
//! stalling there would stop the service thread serving faults, perhaps the
//! very one the snapshot's walk waits on; in userspace it would not even hold
//! up the CPU's change, which the kernel makes as soon as the event is read.
//! So the callback calls [`RangeLock::try_invalidate`], the seed's proposed
//! `mmu_notifier_try_to_invalidate`. Granted, it clears the overlapping
//! entries under its guard. Refused (an overlapping snapshot holds or waits
//! for the range), it clears the entries present now and leaves its range
//! with the snapshots in flight, under the table lock: each of them, when it
//! installs, leaves out the pages of every invalidation that arrived after it
//! was granted. The device table ends exactly as it would had the
//! invalidation waited for the snapshot to install and then cleared it
//! (the seed's order), without anyone waiting.

use crate::vpnmap::VpnMap;
use std::time::{Duration, Instant};

use crate::addr::{PAGE_SHIFT, Pfn, TASK_SIZE, VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::mm::Mm;
use crate::notifier::{
    Event, Interval, IntervalNotifier, IntervalNotifierOps, NotifierRange, OwnerId,
};
use crate::pfn::HmmPfn;
use crate::range::HmmRange;
use crate::rangelock::{Ledger, RangeLock};
use crate::sync::{Arc, AtomicU64, Mutex, MutexGuard, Ordering};

/// `HMM_RANGE_DEFAULT_TIMEOUT`: how long drivers retry a busy range.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(1000);

/// How a [`Mirror`] keeps device faults and invalidations apart (see the
/// [module docs](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The kernel's sequence protocol: walk optimistically, check
    /// `read_retry` under the table lock, retry until the deadline.
    #[default]
    Sequence,
    /// Seed 003's range lock: faults and invalidations of overlapping ranges
    /// are serialized in arrival order; a fault never retries.
    RangeLock,
}

impl Strategy {
    /// Both, the default first.
    pub const ALL: [Strategy; 2] = [Strategy::Sequence, Strategy::RangeLock];

    /// The name used on command lines and in reports: `sequence` or
    /// `range-lock`.
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::Sequence => "sequence",
            Strategy::RangeLock => "range-lock",
        }
    }

    /// The strategy called `name` ([`Self::name`]; `seq` and `rangelock`
    /// are accepted too).
    pub fn from_name(name: &str) -> Option<Strategy> {
        match name {
            "sequence" | "seq" => Some(Strategy::Sequence),
            "range-lock" | "rangelock" | "range_lock" => Some(Strategy::RangeLock),
            _ => None,
        }
    }

    /// `HMM_MIRROR_STRATEGY` ([`Self::from_name`]), or the default.
    pub fn from_env() -> Strategy {
        std::env::var("HMM_MIRROR_STRATEGY")
            .ok()
            .and_then(|s| Self::from_name(&s))
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a [`Mirror`] faults.
#[derive(Clone, Copy, Debug)]
pub struct MirrorOptions {
    /// How faults and invalidations are kept apart.
    pub strategy: Strategy,
    /// Give up with [`Error::Busy`] when a chunk keeps being invalidated this long.
    pub deadline: Duration,
    /// Pages per range fault (dmirror uses 32; larger chunks amortise the walk).
    pub chunk_pages: u64,
    /// Whether entries carry real PFNs (see [`HmmRange::want_pfns`]).
    pub want_pfns: bool,
    /// The device's owner identity: its own migrations are not invalidations,
    /// and its device-private pages are reported rather than faulted.
    pub owner: Option<OwnerId>,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Sequence,
            deadline: DEFAULT_DEADLINE,
            chunk_pages: 512,
            want_pfns: true,
            owner: None,
        }
    }
}

/// One device page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorEntry {
    /// The page frame (0 when PFNs are not read).
    pub pfn: Pfn,
    /// Whether the device may write.
    pub write: bool,
    /// The CPU's map order for this page (0, 9 for a PMD, …).
    pub order: u32,
    /// The device holds the page for exclusive (atomic) access.
    pub atomic: bool,
}

/// The counters of a mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Device faults served ([`Mirror::fault`] calls that installed something).
    pub faults: u64,
    /// Range-fault retries after `Busy` or a failed `read_retry`.
    pub retries: u64,
    /// Invalidation callbacks that cleared entries.
    pub invalidations: u64,
    /// Pages installed, in total.
    pub pages_mapped: u64,
    /// Pages cleared by invalidations, in total.
    pub pages_cleared: u64,
    /// Device faults that gave up with [`Error::Busy`] at the deadline.
    pub gave_up: u64,
    /// Invalidations that found an overlapping snapshot in flight and were
    /// left with it ([`Strategy::RangeLock`] only).
    pub deferred: u64,
    /// Pages a snapshot left out of its install because an invalidation
    /// arrived while it walked ([`Strategy::RangeLock`] only).
    pub pages_left_out: u64,
}

/// The device page table, reachable only under the mirror's lock.
#[derive(Debug, Default)]
pub struct Table {
    entries: VpnMap<MirrorEntry>,
    /// [`Strategy::RangeLock`]: the snapshots granted and not yet installed.
    inflight: Ledger,
}

/// Ends a range-lock snapshot that leaves early (an error, a panic).
struct InFlightEnd<'a> {
    shared: &'a Shared,
    since: u64,
}

impl Drop for InFlightEnd<'_> {
    fn drop(&mut self) {
        self.shared.table.lock().inflight.end(self.since);
    }
}

impl Table {
    /// The entry for the page holding `addr`.
    pub fn get(&self, addr: VirtAddr) -> Option<MirrorEntry> {
        self.entries.get(addr.page_index()).copied()
    }

    /// Removes the entry for the page holding `addr` (a device-side zap, e.g.
    /// after an access found the page gone).
    pub fn remove(&mut self, addr: VirtAddr) -> Option<MirrorEntry> {
        self.entries.remove(addr.page_index())
    }

    /// Maps the page holding `addr` (a device installing what it owns, e.g.
    /// pages it just migrated to its memory, as `dmirror` does).
    pub fn insert(&mut self, addr: VirtAddr, entry: MirrorEntry) {
        self.entries.insert(addr.page_index(), entry);
    }

    /// Number of mapped pages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The mapped pages in `range`, in order.
    pub fn entries_in(&self, range: VaRange) -> impl Iterator<Item = (VirtAddr, MirrorEntry)> + '_ {
        self.entries
            .range(range.start().page_index()..range.end().page_index())
            .map(|(p, &e)| (VirtAddr(p << PAGE_SHIFT), e))
    }

    fn clear(&mut self, start: VirtAddr, end: VirtAddr) -> u64 {
        let first = start.page_index();
        let last = end.get().div_ceil(1 << PAGE_SHIFT);
        let keys = self.entries.keys_in(first..last);
        for &k in &keys {
            self.entries.remove(k);
        }
        keys.len() as u64
    }
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    retries: AtomicU64,
    invalidations: AtomicU64,
    pages_mapped: AtomicU64,
    pages_cleared: AtomicU64,
    gave_up: AtomicU64,
    deferred: AtomicU64,
    pages_left_out: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    owner: Option<OwnerId>,
    strategy: Strategy,
    /// [`Strategy::RangeLock`]'s lock (unused under the sequence strategy).
    ranges: RangeLock,
    counters: Counters,
}

impl Shared {
    fn count_cleared(&self, cleared: u64) {
        if cleared > 0 {
            self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
            self.counters
                .pages_cleared
                .fetch_add(cleared, Ordering::Relaxed);
        }
    }

    /// The range-lock strategy's invalidation (see the [module docs](self)).
    fn invalidate_ranged(&self, range: &NotifierRange) -> bool {
        let Ok(r) = VaRange::new(range.start.page_down(), range.end) else {
            return true;
        };
        let guard = self.ranges.try_invalidate(r).ok();
        let mut table = if range.blockable {
            self.table.lock()
        } else {
            match self.table.try_lock() {
                Some(t) => t,
                None => return false,
            }
        };
        let cleared = table.clear(range.start, range.end);
        if guard.is_none() && table.inflight.leave(r) {
            self.counters.deferred.fetch_add(1, Ordering::Relaxed);
        }
        // Counted before the table is unlocked: whoever sees the entries
        // gone sees the invalidation counted.
        self.count_cleared(cleared);
        drop(table);
        drop(guard);
        true
    }
}

impl IntervalNotifierOps for Shared {
    fn invalidate(&self, sub: &Interval, range: &NotifierRange, cur_seq: u64) -> bool {
        // A device's own migration does not invalidate its mapping (dmirror).
        if range.event == Event::Migrate && range.owner.is_some() && range.owner == self.owner {
            return true;
        }
        if self.strategy == Strategy::RangeLock {
            // No `set_seq`: nothing reads the sequence under this strategy.
            return self.invalidate_ranged(range);
        }
        let mut table = if range.blockable {
            self.table.lock()
        } else {
            match self.table.try_lock() {
                Some(t) => t,
                None => return false,
            }
        };
        sub.set_seq(cur_seq);
        let cleared = table.clear(range.start, range.end);
        self.count_cleared(cleared);
        drop(table);
        true
    }
}

/// A device page table mirroring part of the process's address space.
#[derive(Debug)]
pub struct Mirror {
    mm: Mm,
    shared: Arc<Shared>,
    notifier: IntervalNotifier,
    options: MirrorOptions,
}

/// The mirror's table, locked. Invalidations of the mirrored span wait while
/// it is held.
pub type MirrorGuard<'a> = MutexGuard<'a, Table>;

impl Mirror {
    /// A mirror of `span` (the whole user address space when `None`).
    ///
    /// # Errors
    /// [`Error::Released`] when `mm` was released.
    pub fn new(mm: &Mm, span: Option<VaRange>, options: MirrorOptions) -> Result<Mirror> {
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            owner: options.owner,
            strategy: options.strategy,
            ranges: RangeLock::new(),
            counters: Counters::default(),
        });
        let (start, len) = span.map_or((VirtAddr(0), TASK_SIZE), |s| (s.start(), s.len()));
        let notifier = mm.interval_notifier_insert(start, len, shared.clone())?;
        Ok(Mirror {
            mm: mm.clone(),
            shared,
            notifier,
            options,
        })
    }

    /// The address space mirrored.
    pub fn mm(&self) -> &Mm {
        &self.mm
    }

    /// The mirror's notifier.
    pub fn notifier(&self) -> &IntervalNotifier {
        &self.notifier
    }

    /// The options it was made with.
    pub fn options(&self) -> &MirrorOptions {
        &self.options
    }

    /// Locks the table.
    pub fn lock(&self) -> MirrorGuard<'_> {
        self.shared.table.lock()
    }

    /// The counters.
    pub fn stats(&self) -> MirrorStats {
        let c = &self.shared.counters;
        MirrorStats {
            faults: c.faults.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            pages_mapped: c.pages_mapped.load(Ordering::Relaxed),
            pages_cleared: c.pages_cleared.load(Ordering::Relaxed),
            gave_up: c.gave_up.load(Ordering::Relaxed),
            deferred: c.deferred.load(Ordering::Relaxed),
            pages_left_out: c.pages_left_out.load(Ordering::Relaxed),
        }
    }

    /// The range lock's own counters ([`Strategy::RangeLock`]; all zero
    /// under the sequence strategy).
    pub fn range_lock_stats(&self) -> crate::rangelock::RangeLockStats {
        self.shared.ranges.stats()
    }

    /// One range fault of `chunk` into `pfns`: true when done, false when
    /// it must be walked again (the sequence moved, or the walk stalled on
    /// pages taken away as fast as it faulted them in); [`Error::Busy`] once
    /// that happens past the deadline.
    fn walk(
        &self,
        chunk: VaRange,
        default_flags: HmmPfn,
        pfns: &mut [HmmPfn],
        deadline: Instant,
    ) -> Result<Option<u64>> {
        let seq = self.notifier.read_begin();
        pfns.iter_mut().for_each(|p| *p = HmmPfn::empty());
        let mut range = HmmRange::new(&self.notifier, chunk.start(), chunk.end(), pfns);
        range.notifier_seq = seq;
        range.default_flags = default_flags;
        range.dev_private_owner = self.options.owner;
        range.want_pfns = self.options.want_pfns;
        match self.mm.range_fault(&mut range) {
            Ok(()) => Ok(Some(seq)),
            Err(Error::Busy) => self.again(deadline).map(|()| None),
            Err(e) => Err(e),
        }
    }

    /// Counts a retry; [`Error::Busy`] when past `deadline`.
    fn again(&self, deadline: Instant) -> Result<()> {
        self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= deadline {
            self.shared.counters.gave_up.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Busy);
        }
        Ok(())
    }

    /// Walks one chunk and hands the entries to `install` under the table
    /// lock, by the mirror's strategy.
    fn with_range<R>(
        &self,
        chunk: VaRange,
        default_flags: HmmPfn,
        pfns: &mut [HmmPfn],
        deadline: Instant,
        install: impl FnMut(&mut Table, &[HmmPfn]) -> R,
    ) -> Result<R> {
        match self.options.strategy {
            Strategy::Sequence => {
                self.with_range_seq(chunk, default_flags, pfns, deadline, install)
            }
            Strategy::RangeLock => {
                self.with_range_locked(chunk, default_flags, pfns, deadline, install)
            }
        }
    }

    /// The range-lock strategy: snapshot guard, one walk, install what no
    /// invalidation took meanwhile (see the [module docs](self)).
    fn with_range_locked<R>(
        &self,
        chunk: VaRange,
        default_flags: HmmPfn,
        pfns: &mut [HmmPfn],
        deadline: Instant,
        mut install: impl FnMut(&mut Table, &[HmmPfn]) -> R,
    ) -> Result<R> {
        let _guard = self.shared.ranges.snapshot(chunk);
        let since = self.shared.table.lock().inflight.begin();
        let done = InFlightEnd {
            shared: &self.shared,
            since,
        };
        // Invalidations do not move the sequence here; only a walk that
        // stalls comes round again (still under the guard).
        while self.walk(chunk, default_flags, pfns, deadline)?.is_none() {}
        let mut table = self.shared.table.lock();
        let mut left_out = 0;
        for (i, p) in pfns.iter_mut().enumerate() {
            let addr = VirtAddr(chunk.start().get() + ((i as u64) << PAGE_SHIFT));
            if p.contains(HmmPfn::VALID) && table.inflight.left_out(since, addr) {
                *p = HmmPfn::empty();
                left_out += 1;
            }
        }
        let r = install(&mut table, pfns);
        table.inflight.end(since);
        drop(table);
        std::mem::forget(done);
        if left_out > 0 {
            self.shared
                .counters
                .pages_left_out
                .fetch_add(left_out, Ordering::Relaxed);
        }
        Ok(r)
    }

    /// The sequence strategy: the read_begin / range fault / read_retry
    /// loop, retrying until the deadline.
    fn with_range_seq<R>(
        &self,
        chunk: VaRange,
        default_flags: HmmPfn,
        pfns: &mut [HmmPfn],
        deadline: Instant,
        mut install: impl FnMut(&mut Table, &[HmmPfn]) -> R,
    ) -> Result<R> {
        loop {
            let Some(seq) = self.walk(chunk, default_flags, pfns, deadline)? else {
                continue;
            };
            let mut table = self.shared.table.lock();
            if self.notifier.read_retry(seq) {
                drop(table);
                self.again(deadline)?;
                continue;
            }
            return Ok(install(&mut table, pfns));
        }
    }

    /// A device fault: makes every page of `range` valid (and writable with
    /// `write`) in the CPU's page table and installs it in the device's.
    ///
    /// # Errors
    /// As [`Mm::range_fault`]; [`Error::Busy`] when a chunk was invalidated
    /// for longer than the deadline.
    pub fn fault(&self, range: VaRange, write: bool) -> Result<()> {
        let flags = if write {
            HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE
        } else {
            HmmPfn::REQ_FAULT
        };
        let deadline = Instant::now() + self.options.deadline;
        let chunk_len = self.options.chunk_pages.max(1) << PAGE_SHIFT;
        let mut pfns =
            vec![HmmPfn::empty(); self.options.chunk_pages.min(range.npages()).max(1) as usize];
        let mut cur = range.start();
        while cur < range.end() {
            let end = VirtAddr(cur.get().saturating_add(chunk_len).min(range.end().get()));
            let chunk = VaRange::new(cur, end)?;
            let n = chunk.npages() as usize;
            let mapped =
                self.with_range(chunk, flags, &mut pfns[..n], deadline, |table, pfns| {
                    for (i, p) in pfns.iter().enumerate() {
                        if p.contains(HmmPfn::VALID) {
                            let page = chunk.start().page_index() + i as u64;
                            table.entries.insert(
                                page,
                                MirrorEntry {
                                    pfn: p.pfn(),
                                    write: p.contains(HmmPfn::WRITE),
                                    order: p.map_order(),
                                    atomic: false,
                                },
                            );
                        }
                    }
                    n as u64
                })?;
            self.shared
                .counters
                .pages_mapped
                .fetch_add(mapped, Ordering::Relaxed);
            cur = end;
        }
        self.shared.counters.faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A snapshot of `range` without faulting (`default_flags = 0`), taken
    /// under the protocol so that it was true at one instant while the table
    /// lock was held. `out` gets one entry per page.
    ///
    /// # Errors
    /// [`Error::PfnLength`] for a wrong-sized `out`; otherwise as [`Mirror::fault`].
    pub fn snapshot(&self, range: VaRange, out: &mut [HmmPfn]) -> Result<()> {
        if out.len() as u64 != range.npages() {
            return Err(Error::PfnLength {
                range,
                want: range.npages(),
                got: out.len(),
            });
        }
        let deadline = Instant::now() + self.options.deadline;
        let chunk = self.options.chunk_pages.max(1) as usize;
        let mut cur = range.start();
        for piece in out.chunks_mut(chunk) {
            let sub = VaRange::from_pages(cur, piece.len() as u64)?;
            self.with_range(sub, HmmPfn::empty(), piece, deadline, |_, _| ())?;
            cur = sub.end();
        }
        Ok(())
    }
}
