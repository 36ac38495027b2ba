//! Migration between system memory and device memory (`mm/migrate_device.c`).
//!
//! # The three steps
//! [`MigrateVma::setup`] collects the pages of one VMA's range that
//! `flags` select and isolates them; the driver allocates a destination for
//! each entry it wants and hands it to [`MigrateVma::set_dst`];
//! [`MigrateVma::pages`] places the data (copies it, or moves it for a
//! device whose memory is ordinary pages, a run of side-by-side pages per
//! call) and commits; [`MigrateVma::finalize`] (or dropping the
//! `MigrateVma`) restores what did not move. Entries use the kernel's
//! encoding ([`migrate_pfn`], [`MIGRATE_PFN_VALID`], ...). In the kernel the
//! driver copies between `setup` and `pages`; here the library does, because
//! the data of an isolated page is in the library's staging region.
//!
//! # How a page leaves the CPU
//! A device-private page has no CPU mapping: its address is an absent page
//! in a VMA registered for userfaultfd MISSING faults, and the `Mm`'s
//! device table says which device page holds the data. Isolation takes the
//! CPU pages out of the address space at once with `UFFDIO_MOVE` into a
//! staging region (no copy; holes are skipped), so a CPU access during the
//! migration faults instead of writing to a page being copied: the service
//! thread parks such a fault and the migration serves it when it ends
//! (the kernel's wait on a migration entry). Where `UFFDIO_MOVE` cannot
//! take a page (a page shared copy-on-write with a child, or a VMA without
//! write permission, where the CPU cannot write anyway) the data is copied
//! and the page zapped with `MADV_DONTNEED`.
//!
//! # How it comes back
//! A CPU touch of a device-private page raises a MISSING fault; the service
//! thread asks the owner's [`PagemapOps::migrate_to_ram`] how many pages to
//! bring back, invalidates them, and installs the data with one
//! `UFFDIO_COPY` per contiguous run (a copying device) or `UFFDIO_MOVE` per
//! page (a device keeping its data in host pages), which also wakes the
//! faulting thread. [`migrate_to_system`] does the same on request.
//!
//! # What the address space does to device pages
//! `munmap` and `MADV_DONTNEED` free them (their events reach the service
//! thread, which drops the table entries); `mremap` moves the entries with
//! the mapping. A page isolated by a migration in progress is marked dead
//! instead, and the migration drops it when it commits.

use std::collections::HashMap;

use bitflags::bitflags;
use rustix::io::Errno;
use tracing::warn;

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, VaRange, VirtAddr};
use crate::devmem::{DevicePage, PagemapInner, PagemapOps, Storage};
use crate::error::{Error, Result};
use crate::mm::{Mm, MmCore};
use crate::notifier::{Event, NotifierRange, OwnerId};
use crate::os::mm::Mapping;
use crate::os::pagemap::Entry;
use crate::os::procmap::{Vma, VmaFlags};
use crate::os::uffd::RegisterMode;
use crate::vpnmap::VpnMap;

/// `MIGRATE_PFN_VALID`: the entry holds a page.
pub const MIGRATE_PFN_VALID: u64 = 1 << 0;
/// `MIGRATE_PFN_MIGRATE`: the entry migrates.
pub const MIGRATE_PFN_MIGRATE: u64 = 1 << 1;
/// `MIGRATE_PFN_WRITE`: the page is mapped writable.
pub const MIGRATE_PFN_WRITE: u64 = 1 << 3;
/// `MIGRATE_PFN_SHIFT`: where the PFN starts in an entry.
pub const MIGRATE_PFN_SHIFT: u32 = 6;

/// `migrate_pfn(pfn)`: `pfn << MIGRATE_PFN_SHIFT | MIGRATE_PFN_VALID`.
pub const fn migrate_pfn(pfn: u64) -> u64 {
    (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID
}

/// The PFN of an entry with `MIGRATE_PFN_VALID`, else `None`.
pub const fn migrate_pfn_to_pfn(entry: u64) -> Option<u64> {
    if entry & MIGRATE_PFN_VALID != 0 {
        Some(entry >> MIGRATE_PFN_SHIFT)
    } else {
        None
    }
}

bitflags! {
    /// `enum migrate_vma_direction`: which pages setup selects.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MigrateSelect: u32 {
        /// `MIGRATE_VMA_SELECT_SYSTEM`: system memory pages and holes.
        const SYSTEM = 1;
        /// `MIGRATE_VMA_SELECT_DEVICE_PRIVATE`: device-private pages of `pgmap_owner`.
        const DEVICE_PRIVATE = 2;
        /// `MIGRATE_VMA_SELECT_DEVICE_COHERENT`: device-coherent pages of `pgmap_owner`.
        const DEVICE_COHERENT = 4;
    }
}

/// Runs `op` again while `again` says it failed because an address-space
/// event is pending (`EAGAIN`: the kernel fills no page until the service
/// thread reads it), for up to 5 s, yielding in between. For threads other
/// than the service thread, which is the one that reads the event.
pub(crate) fn retry_while_event_pending<T, E>(
    mut op: impl FnMut() -> std::result::Result<T, E>,
    again: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match op() {
            Err(e) if again(&e) && std::time::Instant::now() < deadline => {
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

/// One page of the address space held by device memory or by a migration.
#[derive(Debug)]
pub(crate) enum Slot {
    /// A device-private page; the CPU page is absent (or, across a fork,
    /// a write-protected `shadow` copy the child inherits).
    Device {
        page: DevicePage,
        writable: bool,
        shadow: bool,
    },
    /// A page held for a device's exclusive (atomic) access: the CPU page
    /// was moved into `holder`, page `index`; a CPU touch moves it back.
    Exclusive {
        holder: std::sync::Arc<Mapping>,
        index: u64,
        owner: OwnerId,
    },
    /// Isolated by migration `id` as its entry `index`.
    Migrating {
        id: u64,
        index: usize,
        /// Unmapped or discarded meanwhile: drop, do not commit or restore.
        dead: bool,
        /// The migration zaps the CPU page itself: its `REMOVE` event is
        /// not a discard.
        removing: bool,
    },
}

/// Where each isolated entry of each migration in progress is now: page
/// numbers by migration and entry index.
#[derive(Debug, Default)]
struct Inflight {
    by_migration: HashMap<u64, Vec<u64>>,
}

/// An entry of [`Inflight`] not isolated (no page number is this large).
const NOT_ISOLATED: u64 = u64::MAX;

impl Inflight {
    /// Migration `id` isolated its entries: `vpns[i]` is entry `i`'s page
    /// number, or [`NOT_ISOLATED`].
    fn start(&mut self, id: u64, vpns: Vec<u64>) {
        self.by_migration.insert(id, vpns);
    }

    fn insert(&mut self, id: u64, i: usize, vpn: u64) {
        let v = self.by_migration.entry(id).or_default();
        if v.len() <= i {
            v.resize(i + 1, NOT_ISOLATED);
        }
        v[i] = vpn;
    }

    fn get(&self, id: u64, i: usize) -> Option<u64> {
        let vpn = *self.by_migration.get(&id)?.get(i)?;
        (vpn != NOT_ISOLATED).then_some(vpn)
    }

    fn remove(&mut self, id: u64, i: usize) -> Option<u64> {
        let slot = self.by_migration.get_mut(&id)?.get_mut(i)?;
        let vpn = std::mem::replace(slot, NOT_ISOLATED);
        (vpn != NOT_ISOLATED).then_some(vpn)
    }

    /// The isolated entries of migration `id`: `(index, page number)`.
    fn of(&self, id: u64) -> Vec<(usize, u64)> {
        self.by_migration.get(&id).map_or_else(Vec::new, |v| {
            v.iter()
                .enumerate()
                .filter(|&(_, &vpn)| vpn != NOT_ISOLATED)
                .map(|(i, &vpn)| (i, vpn))
                .collect()
        })
    }

    /// Migration `id` ended.
    fn forget(&mut self, id: u64) {
        self.by_migration.remove(&id);
    }
}

/// The device table of an address space (the device-private swap entries).
#[derive(Debug, Default)]
pub(crate) struct DevState {
    /// By virtual page number.
    slots: VpnMap<Slot>,
    /// Where each isolated entry is now: `(migration, index)` → page number.
    inflight: Inflight,
    /// Faults that came while their page was isolated.
    parked: Vec<(u64, bool)>,
    next_id: u64,
}

impl DevState {
    /// Number of device-private pages mapped.
    pub(crate) fn device_pages(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Device { .. }))
            .count()
    }

    /// The device pages in `range`: `(page offset, pfn, writable, owner)`.
    pub(crate) fn device_pages_in(&self, range: VaRange) -> Vec<(u64, u64, bool, OwnerId)> {
        let (lo, hi) = (range.start().page_index(), range.end().page_index());
        self.slots
            .range(lo..hi)
            .filter_map(|(k, s)| match s {
                Slot::Device { page, writable, .. } => {
                    Some((k - lo, page.pfn(), *writable, page.owner()))
                }
                Slot::Migrating { .. } | Slot::Exclusive { .. } => None,
            })
            .collect()
    }

    /// Whether `range` is exactly a migration's own zap: every page isolated
    /// with `removing` set. If so the flags are cleared (the event is
    /// taken as the zap's) and the caller skips the discard and the
    /// owner-less `Clear` (the migration already sent `Migrate`).
    pub(crate) fn ack_self_removal(&mut self, range: VaRange) -> bool {
        let (lo, hi) = (range.start().page_index(), range.end().page_index());
        let all = (lo..hi).all(|v| {
            matches!(
                self.slots.get(v),
                Some(Slot::Migrating { removing: true, .. })
            )
        });
        if all {
            for v in lo..hi {
                if let Some(Slot::Migrating { removing, .. }) = self.slots.get_mut(v) {
                    *removing = false;
                }
            }
        }
        all
    }

    /// The device pages of virtual pages `[lo, hi)` for which `which`
    /// holds, as runs of consecutive pages: `(first page, pages)`.
    fn device_runs(
        &self,
        lo: u64,
        hi: u64,
        which: impl Fn(&DevicePage) -> bool,
    ) -> Vec<(u64, Vec<DevicePage>)> {
        let mut runs: Vec<(u64, Vec<DevicePage>)> = Vec::new();
        for (vpn, s) in self.slots.range(lo..hi) {
            let Slot::Device { page, .. } = s else {
                continue;
            };
            if !which(page) {
                continue;
            }
            match runs.last_mut() {
                Some((first, pages)) if *first + pages.len() as u64 == vpn => {
                    pages.push(page.clone());
                }
                _ => runs.push((vpn, vec![page.clone()])),
            }
        }
        runs
    }

    /// Sets the slot of virtual page `vpn`.
    pub(crate) fn set_slot(&mut self, vpn: u64, slot: Slot) {
        self.slots.insert(vpn, slot);
    }

    /// Removes the slot of virtual page `vpn`.
    pub(crate) fn take_slot(&mut self, vpn: u64) -> Option<Slot> {
        self.slots.remove(vpn)
    }

    /// Removes the slot of `vpn` if it is an exclusive page.
    pub(crate) fn take_exclusive(&mut self, vpn: u64) -> Option<Slot> {
        match self.slots.get(vpn) {
            Some(Slot::Exclusive { .. }) => self.slots.remove(vpn),
            _ => None,
        }
    }

    /// The holder address and owner of the exclusive page at `vpn`.
    pub(crate) fn exclusive(&self, vpn: u64) -> Option<(VirtAddr, OwnerId)> {
        match self.slots.get(vpn) {
            Some(Slot::Exclusive {
                holder,
                index,
                owner,
            }) => Some((
                VirtAddr(holder.addr().get() + (index << PAGE_SHIFT)),
                *owner,
            )),
            _ => None,
        }
    }

    /// Every exclusive page.
    pub(crate) fn exclusive_pages(&self) -> Vec<u64> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Exclusive { .. }))
            .map(|(k, _)| k)
            .collect()
    }

    /// The device page at virtual page `vpn`, if any.
    pub(crate) fn device_page(&self, vpn: u64) -> Option<(&DevicePage, bool)> {
        match self.slots.get(vpn) {
            Some(Slot::Device { page, writable, .. }) => Some((page, *writable)),
            _ => None,
        }
    }

    /// Drops what `[start, end)` held: device pages are freed, isolated
    /// pages marked dead (unless `remove` and the migration zaps them itself).
    /// Returns the device pages, to be dropped outside the lock.
    pub(crate) fn discard(&mut self, range: VaRange, remove: bool) -> Vec<Freed> {
        let (lo, hi) = (range.start().page_index(), range.end().page_index());
        let keys = self.slots.keys_in(lo..hi);
        let mut freed = Vec::new();
        for k in keys {
            match self.slots.get_mut(k) {
                Some(Slot::Migrating { dead, removing, .. }) => {
                    if !(remove && *removing) {
                        *dead = true;
                    }
                    // Either way the migration's zap, if any, is done with.
                    *removing = false;
                }
                // The zap of a fork's shadow copy: the device keeps its page.
                Some(Slot::Device { shadow, .. }) if remove && *shadow => *shadow = false,
                Some(Slot::Device { .. } | Slot::Exclusive { .. }) => match self.slots.remove(k) {
                    Some(Slot::Device { page, .. }) => freed.push(Freed::Page(page)),
                    Some(Slot::Exclusive { holder, index, .. }) => {
                        freed.push(Freed::Held(holder, index));
                    }
                    _ => {}
                },
                None => {}
            }
        }
        freed
    }

    /// Moves what `[from, from + len)` held to `to` (mremap). Returns pages
    /// the move overwrote (a destination that held device pages).
    pub(crate) fn remap(&mut self, from: VirtAddr, to: VirtAddr, len: u64) -> Vec<Freed> {
        let (lo, n) = (from.page_index(), len >> PAGE_SHIFT);
        let dst = to.page_index();
        let moved: Vec<(u64, Slot)> = {
            let keys = self.slots.keys_in(lo..lo + n);
            keys.into_iter()
                .filter_map(|k| self.slots.remove(k).map(|s| (k, s)))
                .collect()
        };
        let mut freed = Vec::new();
        if let Ok(old_dst) = VaRange::from_len(to, len) {
            freed = self.discard(old_dst, false);
        }
        for (k, s) in moved {
            let nk = dst + (k - lo);
            if let Slot::Migrating { id, index, .. } = &s {
                self.inflight.insert(*id, *index, nk);
            }
            self.slots.insert(nk, s);
        }
        freed
    }
}

/// What leaves the device table: a device page to drop, or a held page to
/// free in its holder. Dropping it frees it (outside the table's lock).
#[derive(Debug)]
pub(crate) enum Freed {
    /// A device page (its last reference may run `page_free`).
    Page(#[expect(dead_code, reason = "held only to be dropped")] DevicePage),
    /// A page in an exclusive-access holder.
    Held(std::sync::Arc<Mapping>, u64),
}

impl Drop for Freed {
    fn drop(&mut self) {
        if let Freed::Held(holder, index) = self
            && let Ok(r) = VaRange::from_len(
                VirtAddr(holder.addr().get() + (*index << PAGE_SHIFT)),
                PAGE_SIZE,
            )
        {
            let _ = crate::os::mm::dontneed(r);
        }
    }
}

/// What setup found at one page.
#[derive(Debug)]
enum Source {
    /// Not selected.
    None,
    /// A hole or the zero page: the destination starts zeroed.
    Empty,
    /// A system page, now at entry `index` of the staging region.
    Staged,
    /// A device page.
    Device(DevicePage),
}

/// A destination chosen by the driver.
#[derive(Debug)]
enum Dest {
    None,
    Device { page: DevicePage, writable: bool },
    System,
}

/// One migration (`struct migrate_vma`).
#[derive(Debug)]
pub struct MigrateVma {
    core: std::sync::Arc<MmCore>,
    id: u64,
    start: VirtAddr,
    end: VirtAddr,
    owner: Option<OwnerId>,
    src: Vec<u64>,
    dst: Vec<u64>,
    sources: Vec<Source>,
    dests: Vec<Dest>,
    cpages: u64,
    staging: Option<Mapping>,
    /// The VMA can be written (moving pages in and out needs that).
    writable_vma: bool,
    committed: bool,
    finalized: bool,
    /// This migration holds the fork gate until it finishes.
    gate_held: bool,
}

impl MigrateVma {
    /// `migrate_vma_setup`: collects and isolates the pages of
    /// `[start, end)` that `flags` select. The range must lie in one VMA.
    ///
    /// `cpages` counts the entries selected (holes included); `src[i]` is 0
    /// for a page not selected, `MIGRATE` alone for a hole or the zero page,
    /// and `migrate_pfn(pfn) | MIGRATE [| WRITE]` for a page. Shared, file
    /// and hugetlb pages are not selected; another owner's device pages are
    /// not selected; under `SELECT_SYSTEM` device pages are not selected.
    ///
    /// Waits until no address-space event is in flight (the service thread
    /// reads them at once; at most 5 s), so it is not for notifier
    /// callbacks, which run on the thread that reads them.
    ///
    /// # Errors
    /// [`Error::Inval`] (the kernel's `-EINVAL`) for an empty or misaligned
    /// range, no VMA at `start`, a range past its VMA, or a hugetlb VMA;
    /// [`Error::Released`]; [`Error::Os`] when a system call fails.
    pub fn setup(
        mm: &Mm,
        start: VirtAddr,
        end: VirtAddr,
        flags: MigrateSelect,
        pgmap_owner: Option<OwnerId>,
    ) -> Result<MigrateVma> {
        let core = mm.core()?.clone();
        if !start.is_page_aligned() || !end.is_page_aligned() || end <= start {
            return Err(Error::Inval("migrate range empty or not page aligned"));
        }
        let range = VaRange::new(start, end)?;

        let vma = core
            .maps
            .query(start, false)
            .map_err(|e| Error::os("PROCMAP_QUERY", e))?
            .ok_or(Error::Inval("no VMA at the start of the migrate range"))?;
        if end > vma.end {
            return Err(Error::Inval("migrate range past the end of its VMA"));
        }
        if vma.page_size != PAGE_SIZE {
            return Err(Error::Inval("hugetlb VMAs do not migrate"));
        }
        let npages = range.npages() as usize;
        // A migration excludes forks from setup to finalize (the kernel
        // holds the mmap lock): a fork must not copy isolated pages' holes.
        // Left in `finish`, which dropping the `MigrateVma` runs.
        core.fork_gate.enter();
        let mut m = MigrateVma {
            gate_held: true,
            id: {
                let mut st = core.dev.lock();
                st.next_id += 1;
                st.next_id
            },
            core,
            start,
            end,
            owner: pgmap_owner,
            src: vec![0; npages],
            dst: vec![0; npages],
            sources: (0..npages).map(|_| Source::None).collect(),
            dests: (0..npages).map(|_| Dest::None).collect(),
            cpages: 0,
            staging: None,
            writable_vma: vma.flags.contains(VmaFlags::WRITE),
            committed: false,
            finalized: false,
        };
        if !vma.is_private_anon() {
            // Shared and file pages never migrate to device-private memory.
            m.finish();
            return Ok(m);
        }
        m.collect(&vma, range, flags)?;
        Ok(m)
    }

    fn collect(&mut self, vma: &Vma, range: VaRange, flags: MigrateSelect) -> Result<()> {
        let core = self.core.clone();
        // From the VMA query to the entries recorded, under `layout` taken
        // with no event in flight: the events about these addresses that
        // were read are handled, and those read later are about changes
        // made from now on (a mapping replaced meanwhile), right to find and
        // kill the entries. The VMA is queried again here: the one setup
        // saw may have been replaced.
        let layout = core.layout_read_settled(range.start());
        let now = core
            .maps
            .query(range.start(), false)
            .map_err(|e| Error::os("PROCMAP_QUERY", e))?;
        let Some(vma) = now.filter(|v| {
            v.start <= range.start()
                && v.end >= range.end()
                && v.is_private_anon()
                && v.page_size == vma.page_size
        }) else {
            // Replaced by something that does not migrate: nothing selected.
            return Ok(());
        };
        // Device pages must fault to the service thread when touched.
        core.register_missing_locked(&vma, range.start())?;
        self.writable_vma = vma.flags.contains(VmaFlags::WRITE);
        let npages = range.npages() as usize;
        let mut entries = vec![Entry(0); npages];
        core.pagemap
            .read_entries(range, &mut entries)
            .map_err(|e| Error::os("pread /proc/self/pagemap", e))?;
        let base = range.start().page_index();
        // The kernel brackets the collection with a MIGRATE invalidation.
        core.invalidate_range(range, Event::Migrate, self.owner);
        let mut st = core.dev.lock();
        let mut any_present = false;
        let mut isolated = vec![NOT_ISOLATED; npages];
        for (i, e) in entries.iter().enumerate() {
            let vpn = base + i as u64;
            let dev = st.device_page(vpn).map(|(p, w)| (p.clone(), w));
            let (source, src) = if let Some((page, writable)) = dev {
                if flags.contains(MigrateSelect::DEVICE_PRIVATE) && self.owner == Some(page.owner())
                {
                    let w = if writable { MIGRATE_PFN_WRITE } else { 0 };
                    let pfn = page.pfn();
                    (
                        Source::Device(page),
                        migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | w,
                    )
                } else {
                    (Source::None, 0)
                }
            } else if st.slots.contains_key(vpn) {
                // Isolated by another migration.
                (Source::None, 0)
            } else if !flags.contains(MigrateSelect::SYSTEM) {
                (Source::None, 0)
            } else if e.present() {
                if e.pfn() == core.zero_pfn && e.pfn() != 0 {
                    (Source::Empty, MIGRATE_PFN_MIGRATE)
                } else {
                    any_present = true;
                    let w = if vma.flags.contains(VmaFlags::WRITE) && e.exclusive() {
                        MIGRATE_PFN_WRITE
                    } else {
                        0
                    };
                    (
                        Source::Staged,
                        migrate_pfn(e.pfn()) | MIGRATE_PFN_MIGRATE | w,
                    )
                }
            } else if e.swapped() {
                // Swapped out: fault it in first? The kernel skips swap entries.
                (Source::None, 0)
            } else {
                (Source::Empty, MIGRATE_PFN_MIGRATE)
            };
            if src & MIGRATE_PFN_MIGRATE != 0 {
                st.slots.insert(
                    vpn,
                    Slot::Migrating {
                        id: self.id,
                        index: i,
                        dead: false,
                        removing: false,
                    },
                );
                isolated[i] = vpn;
                self.cpages += 1;
            }
            self.src[i] = src;
            self.sources[i] = source;
        }
        st.inflight.start(self.id, isolated);
        drop(st);
        drop(layout);
        // Take the system pages (and zero pages) out of the address space.
        if any_present || self.sources.iter().any(|s| matches!(s, Source::Empty)) {
            self.isolate(range)?;
        }
        Ok(())
    }

    /// Moves the selected CPU pages of `range` into the staging region.
    fn isolate(&mut self, range: VaRange) -> Result<()> {
        let core = self.core.clone();
        let staging = core.staging_region(range.len())?;
        let npages = range.npages() as usize;
        let mut i = 0;
        while i < npages {
            if !matches!(self.sources[i], Source::Staged | Source::Empty) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < npages && matches!(self.sources[j], Source::Staged | Source::Empty) {
                j += 1;
            }
            self.isolate_run(&staging, range.start(), i, j)?;
            i = j;
        }
        // What was taken is what the staging region holds now: the scan
        // above is older than the moves (a CPU write may have filled a
        // hole, a DONTNEED emptied a page, in between), while each move
        // took the page as it was at that instant.
        let mut staged = vec![Entry(0); npages];
        core.pagemap
            .read_entries(staging.range(), &mut staged)
            .map_err(|e| Error::os("pread /proc/self/pagemap", e))?;
        for (k, e) in staged.iter().enumerate() {
            if !matches!(self.sources[k], Source::Staged | Source::Empty) {
                continue;
            }
            let zero = e.pfn() == core.zero_pfn && e.pfn() != 0;
            if e.present() && !zero {
                let w = if self.writable_vma {
                    MIGRATE_PFN_WRITE
                } else {
                    0
                };
                self.sources[k] = Source::Staged;
                self.src[k] = migrate_pfn(e.pfn()) | MIGRATE_PFN_MIGRATE | w;
            } else {
                self.sources[k] = Source::Empty;
                self.src[k] = MIGRATE_PFN_MIGRATE;
            }
        }
        self.staging = Some(staging);
        Ok(())
    }

    fn isolate_run(
        &mut self,
        staging: &Mapping,
        start: VirtAddr,
        from: usize,
        to: usize,
    ) -> Result<()> {
        let core = self.core.clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut i = from;
        while i < to {
            let src = VirtAddr(start.get() + ((i as u64) << PAGE_SHIFT));
            let dst = VirtAddr(staging.addr().get() + ((i as u64) << PAGE_SHIFT));
            let len = ((to - i) as u64) << PAGE_SHIFT;
            if !self.writable_vma {
                // UFFDIO_MOVE needs a writable VMA; the CPU cannot write
                // here either, so copying is safe.
                return self.copy_and_zap(staging, start, i, to);
            }
            // Moved under `layout`, on the main userfaultfd: while an
            // `munmap`/`mremap` of these addresses has an event pending
            // (unread, as `layout` keeps it), the kernel refuses the move
            // with EAGAIN instead of moving pages the program just put
            // there; once read and handled, entries it hit are dead (or
            // moved) and are not taken.
            let layout = core.layout_read();
            let live = self.live_prefix(i, to);
            if live == 0 {
                drop(layout);
                self.untake(i);
                i += 1;
                continue;
            }
            let len = len.min((live as u64) << PAGE_SHIFT);
            let (moved, res) = core.uffd.move_partial(dst, src, len, true, true);
            drop(layout);
            i += (moved >> PAGE_SHIFT) as usize;
            match res {
                Ok(()) => {}
                // An event is pending on the source's userfaultfd: nothing
                // moves until the service thread reads it.
                Err(Errno::AGAIN) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                Err(_) if i < to => {
                    // The page at `i` cannot be moved (shared copy-on-write
                    // with a child): copy it and zap it.
                    self.copy_and_zap(staging, start, i, i + 1)?;
                    i += 1;
                }
                Err(e) => return Err(Error::os("UFFDIO_MOVE", e)),
            }
        }
        Ok(())
    }

    /// How many entries from `i` (below `to`) are still isolated where
    /// setup found them: not unmapped, not moved by an `mremap`.
    fn live_prefix(&self, i: usize, to: usize) -> usize {
        let base = self.start.page_index();
        let st = self.core.dev.lock();
        (i..to)
            .take_while(|&k| {
                let at = base + k as u64;
                st.inflight.get(self.id, k) == Some(at)
                    && matches!(st.slots.get(at), Some(Slot::Migrating { dead: false, .. }))
            })
            .count()
    }

    /// Gives up entry `i` before taking its page: an `mremap` moved it
    /// (its page stays where the mremap put it) or an unmap killed it.
    fn untake(&mut self, i: usize) {
        let mut st = self.core.dev.lock();
        if let Some(vpn) = st.inflight.remove(self.id, i) {
            st.slots.remove(vpn);
        }
        drop(st);
        if self.src[i] & MIGRATE_PFN_MIGRATE != 0 {
            self.cpages -= 1;
        }
        self.src[i] = 0;
        self.sources[i] = Source::None;
    }

    /// Copies entries `[from, to)` into the staging region and zaps them
    /// from the address space with one `MADV_DONTNEED`, then waits until
    /// the service thread has taken its `REMOVE` event as the migration's
    /// own (so that it cannot later be taken for a discard of the pages).
    fn copy_and_zap(
        &mut self,
        staging: &Mapping,
        start: VirtAddr,
        from: usize,
        to: usize,
    ) -> Result<()> {
        let core = self.core.clone();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for i in from..to {
            if !matches!(self.sources[i], Source::Staged) {
                continue;
            }
            let at = VirtAddr(start.get() + ((i as u64) << PAGE_SHIFT));
            match crate::os::process_vm::read(at, &mut buf) {
                Ok(_) => {
                    let dst = VirtAddr(staging.addr().get() + ((i as u64) << PAGE_SHIFT));
                    core.mover()?
                        .copy(dst, &buf, true)
                        .map_err(|e| Error::os("UFFDIO_COPY", e))?;
                }
                Err(_) => self.sources[i] = Source::Empty,
            }
        }
        let first = VirtAddr(start.get() + ((from as u64) << PAGE_SHIFT));
        let run = VaRange::from_len(first, ((to - from) as u64) << PAGE_SHIFT)?;
        {
            let mut st = core.dev.lock();
            for vpn in run.start().page_index()..run.end().page_index() {
                if let Some(Slot::Migrating { removing, .. }) = st.slots.get_mut(vpn) {
                    *removing = true;
                }
            }
        }
        match crate::os::mm::dontneed(run) {
            // Part of the run was unmapped meanwhile: its UNMAP event marks
            // those entries dead; the mapped part was zapped.
            Ok(()) | Err(Errno::NOMEM) => {}
            Err(e) => return Err(Error::os("madvise(MADV_DONTNEED)", e)),
        }
        core.wait_self_removal(run);
        Ok(())
    }

    /// First address.
    pub fn start(&self) -> VirtAddr {
        self.start
    }

    /// End (exclusive).
    pub fn end(&self) -> VirtAddr {
        self.end
    }

    /// `npages`: entries.
    pub fn npages(&self) -> u64 {
        self.src.len() as u64
    }

    /// `cpages`: entries selected by setup.
    pub fn cpages(&self) -> u64 {
        self.cpages
    }

    /// The source entries.
    pub fn src(&self) -> &[u64] {
        &self.src
    }

    /// The destination entries.
    pub fn dst(&self) -> &[u64] {
        &self.dst
    }

    /// The device page an entry's source is, for device → somewhere migrations.
    pub fn src_device_page(&self, i: usize) -> Option<&DevicePage> {
        match self.sources.get(i) {
            Some(Source::Device(p)) => Some(p),
            _ => None,
        }
    }

    /// Gives entry `i` a device page as destination. The data is copied
    /// (or, for a device with host storage and a system source, moved)
    /// into it by [`MigrateVma::pages`], a run of side-by-side pages at a
    /// time, before it commits.
    ///
    /// # Errors
    /// [`Error::Inval`] for an entry that does not migrate or after
    /// [`MigrateVma::pages`].
    pub fn set_dst(&mut self, i: usize, page: DevicePage) -> Result<()> {
        self.check_settable(i)?;
        let writable = self.writable_vma;
        self.dst[i] = migrate_pfn(page.pfn()) | if writable { MIGRATE_PFN_WRITE } else { 0 };
        self.dests[i] = Dest::Device { page, writable };
        Ok(())
    }

    /// Places the data of every entry with a device destination in its
    /// page: staged system pages a run at a time (entries side by side
    /// whose destinations are side by side too), one `UFFDIO_MOVE` per run
    /// into host storage or one copy per run into device memory; device
    /// sources page by page; holes and zero pages not at all (a free device
    /// page is zeroed). An entry whose data cannot be placed loses its
    /// destination and does not migrate.
    fn transfer(&mut self) {
        let n = self.src.len();
        let mut i = 0;
        while i < n {
            let Dest::Device { page, .. } = &self.dests[i] else {
                i += 1;
                continue;
            };
            if !matches!(self.sources[i], Source::Staged) {
                if let Source::Device(from) = &self.sources[i] {
                    let mut buf = [0u8; PAGE_SIZE as usize];
                    if let Err(e) = from.read(&mut buf).and_then(|()| page.write(0, &buf)) {
                        warn!("copying device page {:#x}: {e}", from.pfn());
                        self.dests[i] = Dest::None;
                    }
                }
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n
                && matches!(self.sources[j], Source::Staged)
                && matches!((&self.dests[j - 1], &self.dests[j]),
                    (Dest::Device { page: a, .. }, Dest::Device { page: b, .. }) if b.follows(a))
            {
                j += 1;
            }
            self.transfer_run(i, j);
            i = j;
        }
    }

    /// Places the staged pages of entries `[from, to)`, whose destinations
    /// are consecutive pages of one pagemap.
    fn transfer_run(&mut self, from: usize, to: usize) {
        let Some(staging) = &self.staging else {
            return;
        };
        let Dest::Device { page: first, .. } = &self.dests[from] else {
            return;
        };
        let off = (from as u64) << PAGE_SHIFT;
        if first.storage() == Storage::Device {
            // The staging region is ours and nothing else touches it: read
            // it directly.
            let copied = crate::devmem::overwrite_device_run(first, to - from, |mem| {
                staging.copy_out(off, mem);
            });
            if copied.is_some() {
                return;
            }
        }
        let mover = self.core.mover().ok();
        let mut k = from;
        while k < to {
            let Dest::Device { page, .. } = &self.dests[k] else {
                return;
            };
            let staged = VirtAddr(staging.addr().get() + ((k as u64) << PAGE_SHIFT));
            if let (Some(mover), Some(host)) = (mover, page.host_addr()) {
                // Consecutive host pages: one move for the rest of the run.
                for d in &self.dests[k..to] {
                    if let Dest::Device { page, .. } = d {
                        page.note_host_filled();
                    }
                }
                let len = ((to - k) as u64) << PAGE_SHIFT;
                let (moved, res) = mover.move_partial(host, staged, len, true, true);
                k += (moved >> PAGE_SHIFT) as usize;
                if res.is_ok() || k >= to {
                    return;
                }
                // A huge page that cannot be split just now (EBUSY), or
                // anything else the move refuses: copy this page.
            }
            let Dest::Device { page, .. } = &self.dests[k] else {
                return;
            };
            let mut buf = [0u8; PAGE_SIZE as usize];
            staging.copy_out((k as u64) << PAGE_SHIFT, &mut buf);
            if let Err(e) = page.write(0, &buf) {
                warn!("copying into device page {:#x}: {e}", page.pfn());
                self.dests[k] = Dest::None;
            }
            k += 1;
        }
    }

    /// Gives entry `i` system memory as destination (device → system).
    ///
    /// # Errors
    /// [`Error::Inval`] for an entry that does not migrate or whose source
    /// is not a device page.
    pub fn set_dst_system(&mut self, i: usize) -> Result<()> {
        self.check_settable(i)?;
        if !matches!(self.sources[i], Source::Device(_)) {
            return Err(Error::Inval("only a device page migrates to system memory"));
        }
        self.dst[i] = MIGRATE_PFN_VALID;
        self.dests[i] = Dest::System;
        Ok(())
    }

    fn check_settable(&self, i: usize) -> Result<()> {
        if self.committed || self.finalized {
            return Err(Error::Inval(
                "destinations are set before migrate_vma_pages",
            ));
        }
        if self.src.get(i).is_none_or(|s| s & MIGRATE_PFN_MIGRATE == 0) {
            return Err(Error::Inval("the entry does not migrate"));
        }
        Ok(())
    }

    fn staged_addr(&self, i: usize) -> Result<VirtAddr> {
        let s = self
            .staging
            .as_ref()
            .ok_or(Error::Inval("no staged source"))?;
        Ok(VirtAddr(s.addr().get() + ((i as u64) << PAGE_SHIFT)))
    }

    /// `migrate_vma_pages`: places the data of every entry with a device
    /// destination ([`MigrateVma::set_dst`]), then commits every entry with
    /// a destination. After it, `src[i]` still has `MIGRATE` exactly for the
    /// entries that moved (an entry whose data could not be placed did not).
    pub fn pages(&mut self) {
        if self.committed || self.finalized {
            return;
        }
        self.committed = true;
        self.transfer();
        let core = self.core.clone();
        let mut to_system = Vec::new();
        let mut freed = Vec::new();
        {
            let mut st = core.dev.lock();
            for i in 0..self.src.len() {
                if self.src[i] & MIGRATE_PFN_MIGRATE == 0 {
                    continue;
                }
                let Some(vpn) = st.inflight.get(self.id, i) else {
                    self.src[i] &= !MIGRATE_PFN_MIGRATE;
                    continue;
                };
                let dead = matches!(st.slots.get(vpn), Some(Slot::Migrating { dead: true, .. }));
                match std::mem::replace(&mut self.dests[i], Dest::None) {
                    Dest::None => self.src[i] &= !MIGRATE_PFN_MIGRATE,
                    Dest::Device { page, writable } => {
                        if dead {
                            freed.push(page);
                            continue;
                        }
                        st.slots.insert(
                            vpn,
                            Slot::Device {
                                page,
                                writable,
                                shadow: false,
                            },
                        );
                        st.inflight.remove(self.id, i);
                    }
                    Dest::System => {
                        if !dead {
                            to_system.push((i, vpn));
                        }
                    }
                }
            }
        }
        drop(freed);
        // Installed a run of consecutive pages at a time.
        let mut k = 0;
        while k < to_system.len() {
            let mut end = k + 1;
            while end < to_system.len() && to_system[end].1 == to_system[end - 1].1 + 1 {
                end += 1;
            }
            let run = &to_system[k..end];
            let pages: Vec<DevicePage> = run
                .iter()
                .filter_map(|&(i, _)| match &self.sources[i] {
                    Source::Device(p) => Some(p.clone()),
                    _ => None,
                })
                .collect();
            let at = VirtAddr(run[0].1 << PAGE_SHIFT);
            let installed = pages.len() == run.len()
                && match core.install_from_device_retrying(at, &pages) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!("migrating {at} to system memory: {e}");
                        false
                    }
                };
            if !installed {
                for &(i, _) in run {
                    self.src[i] &= !MIGRATE_PFN_MIGRATE;
                }
            } else {
                let mut st = core.dev.lock();
                for &(i, vpn) in run {
                    st.slots.remove(vpn);
                    st.inflight.remove(self.id, i);
                }
            }
            k = end;
        }
    }

    /// `migrate_vma_finalize`: restores every entry that did not migrate
    /// and serves the CPU faults that waited for this migration.
    pub fn finalize(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.finalized {
            return;
        }
        self.finalized = true;
        let core = self.core.clone();
        let gate = std::mem::replace(&mut self.gate_held, false);
        let mut restore = Vec::new();
        let mut freed = Vec::new();
        {
            let mut st = core.dev.lock();
            for (i, vpn) in st.inflight.of(self.id) {
                let dead = matches!(st.slots.get(vpn), Some(Slot::Migrating { dead: true, .. }));
                self.src[i] &= !MIGRATE_PFN_MIGRATE;
                if !dead && matches!(self.sources[i], Source::Staged) {
                    // Stays isolated until its page is back: a fault
                    // meanwhile waits instead of mapping a zero page.
                    restore.push(i);
                    continue;
                }
                st.inflight.remove(self.id, i);
                st.slots.remove(vpn);
                match std::mem::replace(&mut self.sources[i], Source::None) {
                    Source::Device(page) if !dead => {
                        let writable = self.writable_vma;
                        st.slots.insert(
                            vpn,
                            Slot::Device {
                                page,
                                writable,
                                shadow: false,
                            },
                        );
                    }
                    Source::Device(page) => freed.push(page),
                    _ => {}
                }
            }
            for d in self.dests.iter_mut() {
                if let Dest::Device { page, .. } = std::mem::replace(d, Dest::None) {
                    freed.push(page);
                }
            }
        }
        drop(freed);
        for i in restore {
            // Where the page is now (an mremap may have moved it), unless
            // it was unmapped or discarded meanwhile.
            let at = {
                let st = core.dev.lock();
                st.inflight.get(self.id, i).filter(|&v| {
                    !matches!(st.slots.get(v), Some(Slot::Migrating { dead: true, .. }))
                })
            };
            if let Some(vpn) = at
                && let Err(e) = self.restore(i, VirtAddr(vpn << PAGE_SHIFT))
            {
                warn!("restoring {:#x}: {e}", vpn << PAGE_SHIFT);
            }
            let mut st = core.dev.lock();
            if let Some(vpn) = st.inflight.remove(self.id, i) {
                st.slots.remove(vpn);
            }
        }
        let parked = {
            let mut st = core.dev.lock();
            st.inflight.forget(self.id);
            std::mem::take(&mut st.parked)
        };
        // Let the faults that waited run again: the page is back, or is a
        // device page now (and the retried fault migrates it back).
        for (vpn, write) in parked {
            core.handle_missing(VirtAddr(vpn << PAGE_SHIFT), write);
        }
        self.staging = None;
        if gate {
            core.fork_gate.leave();
        }
    }

    /// Puts the staged page of entry `i` back at `at`; retries while the
    /// kernel refuses because an event is pending (`EAGAIN`).
    fn restore(&self, i: usize, at: VirtAddr) -> Result<()> {
        let staged = self.staged_addr(i)?;
        let core = &self.core;
        let res = retry_while_event_pending(
            || {
                if self.writable_vma {
                    match core.uffd.move_pages(at, staged, PAGE_SIZE, true, false) {
                        Err(Errno::AGAIN) => Err(Errno::AGAIN),
                        Err(Errno::EXIST) | Ok(_) => Ok(()),
                        // Not movable (made read-only since): copy.
                        Err(_) => self.restore_copy(staged, at),
                    }
                } else {
                    self.restore_copy(staged, at)
                }
            },
            |e| *e == Errno::AGAIN,
        );
        match res {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(Error::os("UFFDIO_MOVE/COPY", e)),
        }
    }

    fn restore_copy(&self, staged: VirtAddr, at: VirtAddr) -> std::result::Result<(), Errno> {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        crate::os::process_vm::read(staged, &mut buf)?;
        self.core.uffd.copy(at, &buf, true)
    }
}

impl Drop for MigrateVma {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Mm {
    /// The device page mapped at the page holding `addr`, if any.
    ///
    /// # Errors
    /// [`Error::Released`].
    ///
    /// Waits until the events already read are handled (an `mremap` or
    /// `munmap` that returned has had its event read), so it must not be
    /// called under a lock that an invalidation callback takes.
    pub fn device_page_at(&self, addr: VirtAddr) -> Result<Option<DevicePage>> {
        let core = self.core()?;
        let _layout = core.layout_read();
        let st = core.dev.lock();
        Ok(st.device_page(addr.page_index()).map(|(p, _)| p.clone()))
    }

    /// Waits until the address-space events already read are handled:
    /// whatever the program's `munmap`, `mremap` or `MADV_DONTNEED` that
    /// already returned did is in the device table and the mirrors after
    /// this. Must not be called under a lock an invalidation callback takes.
    ///
    /// # Errors
    /// [`Error::Released`].
    pub fn settle(&self) -> Result<()> {
        drop(self.core()?.layout_read());
        Ok(())
    }

    /// [`Mm::device_page_now`] for every page of `range`, under one hold
    /// of the table's lock: entry `k` is page `k`'s device page, if any.
    pub(crate) fn device_pages_now(&self, range: VaRange) -> Result<Vec<Option<DevicePage>>> {
        let core = self.core()?;
        let (lo, hi) = (range.start().page_index(), range.end().page_index());
        let mut out: Vec<Option<DevicePage>> = (lo..hi).map(|_| None).collect();
        let st = core.dev.lock();
        for (vpn, s) in st.slots.range(lo..hi) {
            if let Slot::Device { page, .. } = s {
                out[(vpn - lo) as usize] = Some(page.clone());
            }
        }
        Ok(out)
    }

    /// [`Mm::device_page_at`] as the table says now, without waiting: for
    /// a device under its page-table lock.
    pub(crate) fn device_page_now(&self, addr: VirtAddr) -> Result<Option<DevicePage>> {
        let core = self.core()?;
        let st = core.dev.lock();
        Ok(st.device_page(addr.page_index()).map(|(p, _)| p.clone()))
    }

    /// How many pages of the address space device memory holds.
    ///
    /// # Errors
    /// [`Error::Released`].
    pub fn device_pages(&self) -> Result<usize> {
        let core = self.core()?;
        let _layout = core.layout_read();
        Ok(core.dev.lock().device_pages())
    }

    /// The VMA covering `addr`, or the next one above it (`PROCMAP_QUERY`).
    ///
    /// # Errors
    /// [`Error::Released`]; [`Error::Os`] when the query fails.
    pub fn vma_at(&self, addr: VirtAddr) -> Result<Option<Vma>> {
        self.core()?
            .maps
            .query(addr, true)
            .map_err(|e| Error::os("PROCMAP_QUERY", e))
    }
}

/// Migrates the device-private pages of `owner` in `range` back to system
/// memory (the driver's explicit migrate-to-system). Returns how many moved.
///
/// # Errors
/// [`Error::Released`]; [`Error::Os`] when installing the data fails.
pub fn migrate_to_system(mm: &Mm, range: VaRange, owner: OwnerId) -> Result<u64> {
    let core = mm.core()?.clone();
    core.bring_back(range, |p| p.owner() == owner)
}

impl MmCore {
    /// Brings back every device page in `range` for which `which` holds.
    pub(crate) fn bring_back(
        &self,
        range: VaRange,
        which: impl Fn(&DevicePage) -> bool,
    ) -> Result<u64> {
        let (lo, hi) = (range.start().page_index(), range.end().page_index());
        let runs = self.dev.lock().device_runs(lo, hi, which);
        let mut moved = 0;
        for (first, pages) in runs {
            let at = VirtAddr(first << PAGE_SHIFT);
            let r = VaRange::from_len(at, (pages.len() as u64) << PAGE_SHIFT)?;
            self.invalidate_range(r, Event::Migrate, None);
            self.install_from_device_retrying(at, &pages)?;
            let mut freed = Vec::new();
            let mut st = self.dev.lock();
            for (k, p) in pages.iter().enumerate() {
                let vpn = first + k as u64;
                if matches!(st.slots.get(vpn), Some(Slot::Device { page, .. }) if page.same_page(p))
                {
                    freed.extend(st.slots.remove(vpn));
                    moved += 1;
                }
            }
            drop(st);
            drop(freed);
            drop(pages);
            let _ = self.uffd.wake(r);
        }
        Ok(moved)
    }

    /// Evicts every page of `pgmap` the process maps.
    pub(crate) fn evict_pagemap(&self, pgmap: &std::sync::Arc<PagemapInner>) -> Result<u64> {
        let all = VaRange::new(VirtAddr(PAGE_SIZE), VirtAddr(crate::addr::TASK_SIZE))?;
        self.bring_back(all, |p| std::sync::Arc::ptr_eq(p.pagemap(), pgmap))
    }

    /// [`Self::install_from_device`] from a thread other than the service
    /// thread: while an event is pending the kernel refuses with `EAGAIN`
    /// until the service thread reads it, so retry for a while.
    pub(crate) fn install_from_device_retrying(
        &self,
        at: VirtAddr,
        pages: &[DevicePage],
    ) -> Result<()> {
        retry_while_event_pending(
            || self.install_from_device(at, pages, true),
            |e| {
                matches!(
                    e,
                    Error::Os {
                        source: Errno::AGAIN,
                        ..
                    }
                )
            },
        )
    }

    /// Writes the data of `pages` (device pages of consecutive virtual
    /// pages from `at`) into the absent CPU pages there, waking the threads
    /// that wait on them unless `dontwake`.
    pub(crate) fn install_from_device(
        &self,
        at: VirtAddr,
        pages: &[DevicePage],
        dontwake: bool,
    ) -> Result<()> {
        let n = pages.len();
        let host = pages.iter().all(|p| p.host_addr().is_some());
        // Whether the one call that placed every page also woke the waiters
        // (a fault-back of one run: one system call less).
        let mut woken = false;
        if host {
            let mut k = 0;
            while k < n {
                // Pages side by side in the host region move in one call.
                let mut end = k + 1;
                while end < n && pages[end].follows(&pages[end - 1]) {
                    end += 1;
                }
                let whole = k == 0 && end == n;
                woken = self.move_host_run(
                    VirtAddr(at.get() + ((k as u64) << PAGE_SHIFT)),
                    &pages[k..end],
                    whole && !dontwake,
                )?;
                k = end;
            }
        } else {
            // Straight from device memory when the pages sit side by side
            // there; through a bounce buffer otherwise.
            let direct =
                crate::devmem::with_device_run(pages, |src| self.uffd.copy(at, src, dontwake));
            let res = match direct {
                Some(res) => res,
                None => {
                    let mut buf = vec![0u8; n << PAGE_SHIFT];
                    for (k, p) in pages.iter().enumerate() {
                        p.read(&mut buf[k << PAGE_SHIFT..(k + 1) << PAGE_SHIFT])?;
                    }
                    self.uffd.copy(at, &buf, dontwake)
                }
            };
            match res {
                Ok(()) => woken = !dontwake,
                Err(Errno::EXIST) => {}
                Err(e) => return Err(Error::os("UFFDIO_COPY", e)),
            }
        }
        if !dontwake && !woken {
            let r = VaRange::from_len(at, (n as u64) << PAGE_SHIFT)?;
            let _ = self.uffd.wake(r);
        }
        Ok(())
    }

    /// Moves the data of `pages`, consecutive pages of one host-storage
    /// pagemap, to the absent CPU pages from `at`: one `UFFDIO_MOVE` for
    /// the run, continued past a page it refuses, which is handled alone.
    ///
    /// With `wake`, a move that takes the whole run at once also wakes the
    /// threads waiting on it; returns whether that happened.
    fn move_host_run(&self, at: VirtAddr, pages: &[DevicePage], wake: bool) -> Result<bool> {
        let mut k = 0;
        while k < pages.len() {
            let Some(src) = pages[k].host_addr() else {
                return Err(Error::Inval("a host-storage run without host pages"));
            };
            let dst = VirtAddr(at.get() + ((k as u64) << PAGE_SHIFT));
            for p in &pages[k..] {
                p.note_host_emptied();
            }
            let len = ((pages.len() - k) as u64) << PAGE_SHIFT;
            let whole = wake && k == 0;
            let (moved, res) = self.uffd.move_partial(dst, src, len, !whole, false);
            k += (moved >> PAGE_SHIFT) as usize;
            let Err(e) = res else {
                return Ok(whole);
            };
            // The move stopped at page `k`: it is still in the host region.
            let (p, dst) = (&pages[k], VirtAddr(at.get() + ((k as u64) << PAGE_SHIFT)));
            let res = match e {
                // An empty host page (never written): zeros.
                Errno::NOENT => self.uffd.zeropage(VaRange::from_len(dst, PAGE_SIZE)?, true),
                // Already there (the fault was resolved): the data stays
                // in the host page, to be discarded when it is freed.
                Errno::EXIST => {
                    p.note_host_filled();
                    Ok(())
                }
                // A VMA without write permission, or a page the move
                // refuses (shared copy-on-write): copy instead.
                Errno::INVAL | Errno::BUSY => {
                    p.note_host_filled();
                    let mut buf = vec![0u8; PAGE_SIZE as usize];
                    p.read(&mut buf)?;
                    self.uffd.copy(dst, &buf, true)
                }
                other => {
                    for p in &pages[k..] {
                        p.note_host_filled();
                    }
                    Err(other)
                }
            };
            match res {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(Error::os("UFFDIO_MOVE", e)),
            }
            k += 1;
        }
        Ok(false)
    }

    /// The service thread's answer to a MISSING fault at `addr`.
    pub(crate) fn handle_missing(&self, addr: VirtAddr, write: bool) {
        let page_at = addr.page_down();
        let vpn = page_at.page_index();
        let batch: Option<Vec<DevicePage>> = {
            let mut st = self.dev.lock();
            match st.slots.get(vpn) {
                Some(Slot::Migrating { .. }) => {
                    st.parked.push((vpn, write));
                    return;
                }
                Some(Slot::Device { page, .. }) => {
                    let pgmap = page.pagemap().clone();
                    let want = pgmap
                        .ops()
                        .migrate_to_ram(&pgmap.page_ref(page.index()), page_at);
                    match want {
                        Ok(n) => {
                            let mut pages = Vec::new();
                            for k in 0..n.max(1) {
                                match st.slots.get(vpn + k) {
                                    Some(Slot::Device { page, .. })
                                        if std::sync::Arc::ptr_eq(page.pagemap(), &pgmap) =>
                                    {
                                        pages.push(page.clone());
                                    }
                                    _ => break,
                                }
                            }
                            Some(pages)
                        }
                        Err(e) => {
                            warn!("migrate_to_ram at {page_at} refused: {e}");
                            None
                        }
                    }
                }
                Some(Slot::Exclusive { .. }) => {
                    drop(st);
                    self.revoke_exclusive(vpn);
                    return;
                }
                None => Some(Vec::new()),
            }
        };
        let Some(pages) = batch else {
            // The driver refused: the access gets SIGBUS, as the kernel's.
            if let Ok(r) = VaRange::from_len(page_at, PAGE_SIZE)
                && let Err(e) = self.uffd.poison(r)
            {
                warn!("UFFDIO_POISON {r:?}: {e}");
            }
            return;
        };
        let one = VaRange::from_len(page_at, PAGE_SIZE).ok();
        if pages.is_empty() {
            // Not a device page: the first touch of a page in a VMA that
            // holds some. Give it what the kernel would.
            let res = if write {
                self.uffd.copy(page_at, &[0u8; PAGE_SIZE as usize], false)
            } else {
                one.map_or(Ok(()), |r| self.uffd.zeropage(r, false))
            };
            match res {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    if let Some(r) = one {
                        let _ = self.uffd.wake(r);
                    }
                }
                Err(e) => {
                    // EAGAIN: an event (a REMOVE) is pending and the kernel
                    // refuses to fill pages until it is read. Wake the
                    // thread: its access faults again after the event.
                    if e != Errno::AGAIN {
                        warn!("resolving the fault at {page_at}: {e}");
                    }
                    if let Some(r) = one {
                        let _ = self.uffd.wake(r);
                    }
                }
            }
            return;
        }
        if let Ok(r) = VaRange::from_len(page_at, (pages.len() as u64) << PAGE_SHIFT) {
            self.invalidate_range(r, Event::Migrate, None);
        }
        // Installed under the device table's lock until the slots are gone:
        // the faulting thread goes on once its page is present (woken by
        // the call that places the batch, or finding it present before it
        // sleeps), and must not find it still listed as device memory.
        let n = pages.len() as u64;
        let mut st = self.dev.lock();
        let installed = self.install_from_device(page_at, &pages, false);
        if let Err(e) = &installed {
            drop(st);
            if !matches!(
                e,
                Error::Os {
                    source: Errno::AGAIN,
                    ..
                }
            ) {
                warn!("migrating {page_at} back to system memory: {e}");
            }
            drop(pages);
        } else {
            let mut freed = Vec::new();
            for (k, p) in pages.iter().enumerate() {
                let v = vpn + k as u64;
                if matches!(st.slots.get(v), Some(Slot::Device { page, .. }) if page.same_page(p)) {
                    freed.extend(st.slots.remove(v));
                }
            }
            drop(st);
            drop(freed);
            drop(pages);
            // Woken by the install.
            return;
        }
        if let Ok(r) = VaRange::from_len(page_at, n << PAGE_SHIFT) {
            let _ = self.uffd.wake(r);
        }
    }

    /// Runs a blockable invalidation of `range` with `event` and `owner`.
    pub(crate) fn invalidate_range(&self, range: VaRange, event: Event, owner: Option<OwnerId>) {
        let nr = NotifierRange {
            start: range.start(),
            end: range.end(),
            event,
            blockable: true,
            owner,
        };
        if let Err(e) = self.subs.invalidate(&nr) {
            warn!("invalidation {event:?} {range:?} failed: {e}");
        }
    }

    /// Waits until no page of `run` waits for its self-removal event
    /// ([`DevState::ack_self_removal`]); bounded, in case the event went
    /// to another reader.
    pub(crate) fn wait_self_removal(&self, run: VaRange) {
        let (lo, hi) = (run.start().page_index(), run.end().page_index());
        let done = self.wait_for_events(|st| {
            !st.slots
                .range(lo..hi)
                .any(|(_, s)| matches!(s, Slot::Migrating { removing: true, .. }))
        });
        if !done {
            warn!("the REMOVE event of a migration's zap of {run:?} never came");
        }
    }

    /// Waits until `done` holds of the device table, looking again after
    /// each batch of events the service thread handles; gives up after 5 s
    /// (`false`).
    fn wait_for_events(&self, done: impl Fn(&DevState) -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut acks = self.removal_acks.0.lock();
        loop {
            if done(&self.dev.lock()) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            acks = self.removal_acks.1.wait_timeout(acks, deadline - now);
        }
    }

    /// Before a fork, with no migration running: exclusive pages go back
    /// to the CPU, and each device page gets a write-protected shadow copy
    /// in its CPU page, which the child inherits (the data as of the fork).
    pub(crate) fn fork_devices_begin(&self) {
        self.revoke_all_exclusive();
        let runs = {
            let mut st = self.dev.lock();
            for s in st.slots.values_mut() {
                if let Slot::Device { shadow, .. } = s {
                    *shadow = true;
                }
            }
            st.device_runs(0, u64::MAX, |_| true)
        };
        for (first, pages) in runs {
            let at = VirtAddr(first << PAGE_SHIFT);
            let mut buf = vec![0u8; pages.len() << PAGE_SHIFT];
            let mut ok = true;
            for (k, p) in pages.iter().enumerate() {
                ok &= p
                    .read(&mut buf[k << PAGE_SHIFT..(k + 1) << PAGE_SHIFT])
                    .is_ok();
            }
            if !ok {
                warn!("fork: cannot read the device pages at {at}");
                continue;
            }
            // The forking thread holds no lock the service thread needs, so
            // a pending event (EAGAIN) gets read: retry.
            if let Err(e) = retry_while_event_pending(
                || self.uffd.copy_mode(at, &buf, true, true),
                |e| *e == Errno::AGAIN,
            ) {
                warn!("fork: shadow copy of the device pages at {at}: {e}");
            }
        }
    }

    /// After the fork, in the parent: the shadows go (the device keeps its
    /// pages), and writes that waited on a shadow run again.
    pub(crate) fn fork_devices_end(&self) {
        let runs: Vec<(u64, u64)> = {
            let st = self.dev.lock();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (vpn, s) in st.slots.iter() {
                if !matches!(s, Slot::Device { shadow: true, .. }) {
                    continue;
                }
                match runs.last_mut() {
                    Some((first, n)) if *first + *n == vpn => *n += 1,
                    _ => runs.push((vpn, 1)),
                }
            }
            runs
        };
        for (first, n) in runs {
            if let Ok(r) = VaRange::from_len(VirtAddr(first << PAGE_SHIFT), n << PAGE_SHIFT)
                && let Err(e) = crate::os::mm::dontneed(r)
            {
                warn!("fork: dropping the shadow copies at {r:?}: {e}");
            }
        }
        // The zap's REMOVE event clears the shadow flags when it is handled;
        // a write fault read in the same batch is parked before that. Wait
        // for it, so that no parked write is left behind.
        self.wait_shadows_gone();
        let parked = std::mem::take(&mut self.dev.lock().parked);
        for (vpn, write) in parked {
            self.handle_missing(VirtAddr(vpn << PAGE_SHIFT), write);
        }
    }

    /// Waits (bounded) until no device page has a shadow copy.
    fn wait_shadows_gone(&self) {
        let done = self.wait_for_events(|st| {
            !st.slots
                .values()
                .any(|s| matches!(s, Slot::Device { shadow: true, .. }))
        });
        if !done {
            warn!("fork: the shadow copies' REMOVE events never came");
        }
    }

    /// A write fault on a device page's shadow copy: parks it until the
    /// fork ends. `false` when `addr` is not such a page.
    pub(crate) fn park_shadow_write(&self, addr: VirtAddr) -> bool {
        let vpn = addr.page_index();
        let mut st = self.dev.lock();
        if matches!(st.slots.get(vpn), Some(Slot::Device { shadow: true, .. })) {
            st.parked.push((vpn, true));
            true
        } else {
            false
        }
    }

    /// Registers `vma`, the VMA holding `at`, whole for MISSING faults (and
    /// write-protect mode): whole, so that registering does not split the
    /// program's mapping (an `mremap` of it must still find one VMA).
    pub(crate) fn register_missing(&self, vma: &Vma, at: VirtAddr) -> Result<()> {
        let _layout = self.layout_read();
        self.register_missing_locked(vma, at)
    }

    /// [`Self::register_missing`] for a caller that holds `layout` shared.
    ///
    /// Another thread may change the layout after `vma` was queried: a
    /// mapping merged into it unmapped, and a region of another userfaultfd
    /// (the library's own) mapped there. The kernel then refuses the stale
    /// extent (`EBUSY` for another context's VMA, `EINVAL` or `ENOMEM` for a
    /// hole), and the VMA holding `at` is queried again.
    pub(crate) fn register_missing_locked(&self, vma: &Vma, at: VirtAddr) -> Result<()> {
        const TRIES: usize = 8;
        let mut vma = *vma;
        for _ in 0..TRIES {
            let piece = VaRange::new(vma.start, vma.end)?;
            match self
                .uffd
                .register(piece, RegisterMode::MISSING | RegisterMode::WP)
            {
                Ok(_) => {
                    self.note_registered(piece);
                    return Ok(());
                }
                Err(Errno::BUSY | Errno::INVAL | Errno::NOMEM) => {
                    let now = self
                        .maps
                        .query(at, false)
                        .map_err(|e| Error::os("PROCMAP_QUERY", e))?;
                    match now {
                        Some(v) if v.start <= at && v.is_private_anon() => vma = v,
                        _ => return Err(Error::Inval("the mapping changed under the call")),
                    }
                }
                Err(e) => return Err(Error::os("UFFDIO_REGISTER (missing)", e)),
            }
        }
        Err(Error::os("UFFDIO_REGISTER (missing)", Errno::BUSY))
    }
}

/// Default callbacks for a pagemap that needs none.
#[derive(Debug, Default)]
pub struct NoOps;

impl PagemapOps for NoOps {
    fn page_free(&self, _page: &crate::devmem::PageRef<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::mm::Prot;
    use crate::os::uffd::{Features, Uffd};

    #[test]
    fn a_stale_vma_is_queried_again_before_registering() {
        let mm = crate::Mm::get().expect("mm");
        let core = mm.core().expect("core").clone();
        let m = Mapping::anonymous(4 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        let stale = core
            .maps
            .query(m.addr(), false)
            .expect("PROCMAP_QUERY")
            .expect("a VMA");
        assert!(stale.end >= m.range().end());
        // Meanwhile the second half goes to another userfaultfd: the VMA
        // splits, and the queried extent is no longer one VMA of ours.
        let other = Uffd::open(Features::empty(), true).expect("userfaultfd");
        other
            .register(m.pages(2, 2), RegisterMode::WP)
            .expect("UFFDIO_REGISTER");
        core.register_missing(&stale, m.addr())
            .expect("registered after a second query");
        let now = core
            .maps
            .query(m.addr(), false)
            .expect("PROCMAP_QUERY")
            .expect("a VMA");
        assert_eq!(now.end, m.pages(2, 2).start(), "the VMA of `at`, not more");
        assert!(mm.is_registered(m.pages(0, 2)).expect("smaps"));
    }
}
