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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::addr::{PAGE_SHIFT, Pfn, TASK_SIZE, VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::mm::Mm;
use crate::notifier::{
    Event, Interval, IntervalNotifier, IntervalNotifierOps, NotifierRange, OwnerId,
};
use crate::pfn::HmmPfn;
use crate::range::HmmRange;
use crate::sync::{Arc, AtomicU64, Mutex, MutexGuard, Ordering};

/// `HMM_RANGE_DEFAULT_TIMEOUT`: how long drivers retry a busy range.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(1000);

/// How a [`Mirror`] faults.
#[derive(Clone, Copy, Debug)]
pub struct MirrorOptions {
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
}

/// The device page table, reachable only under the mirror's lock.
#[derive(Debug, Default)]
pub struct Table {
    entries: BTreeMap<u64, MirrorEntry>,
}

impl Table {
    /// The entry for the page holding `addr`.
    pub fn get(&self, addr: VirtAddr) -> Option<MirrorEntry> {
        self.entries.get(&addr.page_index()).copied()
    }

    /// Removes the entry for the page holding `addr` (a device-side zap, e.g.
    /// after an access found the page gone).
    pub fn remove(&mut self, addr: VirtAddr) -> Option<MirrorEntry> {
        self.entries.remove(&addr.page_index())
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
            .map(|(&p, &e)| (VirtAddr(p << PAGE_SHIFT), e))
    }

    fn clear(&mut self, start: VirtAddr, end: VirtAddr) -> u64 {
        let first = start.page_index();
        let last = end.get().div_ceil(1 << PAGE_SHIFT);
        let keys: Vec<u64> = self.entries.range(first..last).map(|(&k, _)| k).collect();
        for k in &keys {
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
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    owner: Option<OwnerId>,
    counters: Counters,
}

impl IntervalNotifierOps for Shared {
    fn invalidate(&self, sub: &Interval, range: &NotifierRange, cur_seq: u64) -> bool {
        // A device's own migration does not invalidate its mapping (dmirror).
        if range.event == Event::Migrate && range.owner.is_some() && range.owner == self.owner {
            return true;
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
        drop(table);
        if cleared > 0 {
            self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
            self.counters
                .pages_cleared
                .fetch_add(cleared, Ordering::Relaxed);
        }
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
        }
    }

    /// Runs the read_begin / range fault / read_retry loop over one chunk and
    /// hands the entries to `install` under the table lock. Retries on `Busy`
    /// until the deadline.
    fn with_range<R>(
        &self,
        chunk: VaRange,
        default_flags: HmmPfn,
        pfns: &mut [HmmPfn],
        deadline: Instant,
        mut install: impl FnMut(&mut Table, &[HmmPfn]) -> R,
    ) -> Result<R> {
        loop {
            let seq = self.notifier.read_begin();
            pfns.iter_mut().for_each(|p| *p = HmmPfn::empty());
            let mut range = HmmRange::new(&self.notifier, chunk.start(), chunk.end(), pfns);
            range.notifier_seq = seq;
            range.default_flags = default_flags;
            range.dev_private_owner = self.options.owner;
            range.want_pfns = self.options.want_pfns;
            match self.mm.range_fault(&mut range) {
                Ok(()) => {}
                Err(Error::Busy) => {
                    self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= deadline {
                        return Err(Error::Busy);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut table = self.shared.table.lock();
            if self.notifier.read_retry(seq) {
                drop(table);
                self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= deadline {
                    return Err(Error::Busy);
                }
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
