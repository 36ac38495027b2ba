//! Device memory (`struct dev_pagemap`): pagemaps of device pages, the
//! refcounted page handles, and where a page's data lives.
//!
//! A device registers a [`DevPagemap`] of a kind ([`MemoryType::Private`]
//! now), a number of pages and its callbacks ([`PagemapOps`]). Each pagemap
//! gets its own range of PFNs, above any physical frame this machine can
//! have, so a PFN alone says whose page it is ([`lookup_pfn`]).
//!
//! A [`DevicePage`] is a counted handle, like `Arc`: the pagemap allocates it
//! with a count of one ([`DevPagemap::alloc_page`], `zone_device_page_init`),
//! clones share it, and when the last one drops the page goes back to the
//! pagemap's free list after [`PagemapOps::page_free`] ran. Each page has a
//! word of driver data (`zone_device_data`).
//!
//! # Where the data lives
//! - [`Storage::Device`]: the device has memory of its own (a copy). The
//!   pagemap keeps one page-sized buffer per page; migration copies into
//!   it and out of it.
//! - [`Storage::Host`]: the device keeps its data in ordinary pages of this
//!   process (a region the pagemap maps and registers with the address
//!   space's second userfaultfd), so migration moves pages with
//!   `UFFDIO_MOVE` instead of copying them.
//!
//! Dropping the [`DevPagemap`] (`memunmap_pages`) first migrates every page
//! still mapped by the process back to system memory, so no data is lost.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Weak};

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, VirtAddr};
use crate::error::{Error, Result};
use crate::mm::Mm;
use crate::notifier::OwnerId;
use crate::os::mm::Mapping;
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering};

/// The first PFN handed to device pagemaps: 2^40 frames is 4 PiB, past any
/// physical address (x86_64 has at most 52 bits, 2^40 frames).
pub const DEVICE_PFN_BASE: u64 = 1 << 40;

/// `enum memory_type`, the kinds a pagemap can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// `MEMORY_DEVICE_PRIVATE`: not CPU-addressable; a CPU touch migrates
    /// the page back to system memory.
    Private,
    /// `MEMORY_DEVICE_COHERENT`: CPU-addressable device memory.
    Coherent,
}

/// Where a pagemap's page data lives (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The device's own memory: data is copied in and out.
    Device,
    /// Ordinary pages of this process: data is moved with `UFFDIO_MOVE`.
    Host,
}

impl Storage {
    /// `HMM_DMIRROR_STORAGE=host` picks [`Storage::Host`]; anything else,
    /// or nothing, [`Storage::Device`].
    pub fn from_env() -> Storage {
        match std::env::var("HMM_DMIRROR_STORAGE").as_deref() {
            Ok("host") => Storage::Host,
            _ => Storage::Device,
        }
    }
}

/// The driver's callbacks (`struct dev_pagemap_ops`).
pub trait PagemapOps: Send + Sync + 'static {
    /// The last reference to `page` dropped (`page_free`). The page goes
    /// back to the free list after this returns.
    fn page_free(&self, page: &PageRef<'_>);

    /// The CPU touched `page`, mapped at `addr` (`migrate_to_ram`). Returns
    /// how many pages, from the faulting one on, to bring back in the same
    /// batch (at least 1; the library stops early at a page that is not
    /// this pagemap's or not contiguous). `Err` refuses: the faulting
    /// access gets `SIGBUS`, as when the kernel's handler fails.
    ///
    /// # Errors
    /// Whatever the driver reports; the library only logs it.
    fn migrate_to_ram(&self, page: &PageRef<'_>, addr: VirtAddr) -> Result<u64> {
        let _ = (page, addr);
        Ok(1)
    }
}

/// A page being freed or faulted, as the callbacks see it.
#[derive(Debug)]
pub struct PageRef<'a> {
    pgmap: &'a PagemapInner,
    index: u64,
}

impl PageRef<'_> {
    /// Index of the page in its pagemap.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The page's PFN.
    pub fn pfn(&self) -> u64 {
        self.pgmap.base_pfn + self.index
    }

    /// The driver's word (`zone_device_data`).
    pub fn driver_data(&self) -> u64 {
        self.pgmap.pages[self.index as usize]
            .driver_data
            .load(Ordering::Relaxed)
    }
}

/// Per-page state.
#[derive(Debug, Default)]
struct PageSlot {
    refs: AtomicU64,
    driver_data: AtomicU64,
    /// [`Storage::Host`]: the host page may hold data (it was moved or
    /// written in and not moved out since), so freeing must discard it.
    host_data: AtomicBool,
    /// [`Storage::Device`]: the page's memory still holds the data of a
    /// freed page. It is zeroed when first used, under the memory's lock,
    /// unless the use overwrites all of it (freeing does not zero: most
    /// pages are overwritten whole by their next migration).
    stale: AtomicBool,
}

pub(crate) struct PagemapInner {
    kind: MemoryType,
    storage: Storage,
    owner: OwnerId,
    base_pfn: u64,
    npages: u64,
    ops: Box<dyn PagemapOps>,
    pages: Vec<PageSlot>,
    /// Free page indices, lowest first out: pages freed together come back
    /// in ascending runs, so a migration's pages sit side by side in device
    /// memory and move back in one copy ([`with_device_run`]).
    free: Mutex<FreePages>,
    /// One page per device page ([`Storage::Device`]).
    device_mem: Option<Mutex<Vec<u8>>>,
    /// The host region ([`Storage::Host`]), registered with the mover
    /// userfaultfd so pages can be moved in.
    host: Option<Mapping>,
    /// Fault injection: the next allocations fail.
    fail_alloc: AtomicU64,
    mm: Mm,
}

impl fmt::Debug for PagemapInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevPagemap")
            .field("kind", &self.kind)
            .field("storage", &self.storage)
            .field("owner", &self.owner)
            .field("pfns", &(self.base_pfn..self.base_pfn + self.npages))
            .finish_non_exhaustive()
    }
}

/// The free pages of a pagemap, lowest index first out: a bitmap with a
/// hint of where the lowest free page is. (A binary heap did the same in
/// O(log n) per page and was a tenth of a 4 KiB page's migration.)
#[derive(Debug)]
struct FreePages {
    /// Bit `i % 64` of word `i / 64` is set when page `i` is free.
    words: Vec<u64>,
    /// No word below this one has a free page.
    hint: usize,
    len: u64,
}

impl FreePages {
    /// Pages `0..n`, all free.
    fn all(n: u64) -> Self {
        let mut words = vec![u64::MAX; n.div_ceil(64) as usize];
        if !n.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << (n % 64)) - 1;
        }
        FreePages {
            words,
            hint: 0,
            len: n,
        }
    }

    fn len(&self) -> u64 {
        self.len
    }

    /// Takes the lowest free page.
    fn pop(&mut self) -> Option<u64> {
        let w = (self.hint..self.words.len()).find(|&w| self.words[w] != 0);
        let Some(w) = w else {
            self.hint = self.words.len();
            return None;
        };
        self.hint = w;
        let bit = self.words[w].trailing_zeros();
        self.words[w] &= !(1u64 << bit);
        self.len -= 1;
        Some(((w as u64) << 6) | u64::from(bit))
    }

    /// Gives page `i` back.
    fn push(&mut self, i: u64) {
        let (w, bit) = ((i >> 6) as usize, i & 63);
        debug_assert!(self.words[w] & (1 << bit) == 0, "page {i} freed twice");
        self.words[w] |= 1 << bit;
        self.hint = self.hint.min(w);
        self.len += 1;
    }
}

/// Every live pagemap by its first PFN.
fn registry() -> &'static Mutex<BTreeMap<u64, Weak<PagemapInner>>> {
    static REG: std::sync::OnceLock<Mutex<BTreeMap<u64, Weak<PagemapInner>>>> =
        std::sync::OnceLock::new();
    REG.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// PFNs are never reused, so a stale PFN never names another pagemap's page.
static NEXT_PFN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(DEVICE_PFN_BASE);

/// The page a device PFN names, if its pagemap is alive and the page allocated.
pub fn lookup_pfn(pfn: u64) -> Option<DevicePage> {
    let pgmap = {
        let reg = registry().lock();
        let (_, w) = reg.range(..=pfn).next_back()?;
        w.upgrade()?
    };
    let index = pfn.checked_sub(pgmap.base_pfn)?;
    if index >= pgmap.npages {
        return None;
    }
    DevicePage::try_get(pgmap, index)
}

/// Whether `pfn` is in the range device pagemaps are given.
pub fn is_device_pfn(pfn: u64) -> bool {
    pfn >= DEVICE_PFN_BASE
}

/// A device's pagemap (`struct dev_pagemap` after `memremap_pages`).
///
/// Dropping it evicts: every page still mapped by the process migrates back
/// to system memory first.
#[derive(Debug)]
pub struct DevPagemap {
    inner: Arc<PagemapInner>,
}

impl DevPagemap {
    /// Registers a pagemap of `npages` pages (`memremap_pages`).
    ///
    /// # Errors
    /// [`Error::Inval`] for zero pages; [`Error::Unsupported`] for
    /// [`MemoryType::Coherent`] (not built yet); [`Error::Os`] when the host
    /// region cannot be mapped or registered.
    pub fn new(
        mm: &Mm,
        kind: MemoryType,
        npages: u64,
        owner: OwnerId,
        storage: Storage,
        ops: Box<dyn PagemapOps>,
    ) -> Result<DevPagemap> {
        if npages == 0 {
            return Err(Error::Inval("a pagemap needs at least one page"));
        }
        if kind == MemoryType::Coherent {
            return Err(Error::Unsupported {
                feature: "device-coherent memory",
                hint: "not implemented yet; use MemoryType::Private",
            });
        }
        let bytes = npages.checked_mul(PAGE_SIZE).ok_or(Error::Overflow)?;
        let (device_mem, host) = match storage {
            Storage::Device => {
                let len = usize::try_from(bytes).map_err(|_| Error::Overflow)?;
                (Some(Mutex::new(vec![0u8; len])), None)
            }
            Storage::Host => (None, Some(mm.core()?.host_region(bytes)?)),
        };
        let base_pfn = NEXT_PFN.fetch_add(npages, std::sync::atomic::Ordering::Relaxed);
        let inner = Arc::new(PagemapInner {
            kind,
            storage,
            owner,
            base_pfn,
            npages,
            ops,
            pages: (0..npages).map(|_| PageSlot::default()).collect(),
            free: Mutex::new(FreePages::all(npages)),
            device_mem,
            host,
            fail_alloc: AtomicU64::new(0),
            mm: mm.clone(),
        });
        registry().lock().insert(base_pfn, Arc::downgrade(&inner));
        Ok(DevPagemap { inner })
    }

    /// The owner (`pgmap->owner`): migration and range faults compare it.
    pub fn owner(&self) -> OwnerId {
        self.inner.owner
    }

    /// The kind of memory.
    pub fn kind(&self) -> MemoryType {
        self.inner.kind
    }

    /// Where the data lives.
    pub fn storage(&self) -> Storage {
        self.inner.storage
    }

    /// The first PFN and the number of pages.
    pub fn pfn_range(&self) -> (u64, u64) {
        (self.inner.base_pfn, self.inner.npages)
    }

    /// Pages not allocated.
    pub fn free_pages(&self) -> u64 {
        self.inner.free.lock().len()
    }

    /// Allocates a page with one reference (`zone_device_page_init`).
    ///
    /// # Errors
    /// [`Error::NoMem`] when every page is in use, or when fault injection
    /// ([`DevPagemap::fail_next_allocs`]) says so.
    pub fn alloc_page(&self) -> Result<DevicePage> {
        if self
            .inner
            .fail_alloc
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::NoMem);
        }
        let index = self.inner.free.lock().pop().ok_or(Error::NoMem)?;
        let slot = &self.inner.pages[index as usize];
        slot.driver_data.store(0, Ordering::Relaxed);
        slot.refs.store(1, Ordering::Release);
        Ok(DevicePage {
            pgmap: self.inner.clone(),
            index,
        })
    }

    /// Makes the next `n` allocations fail (fault injection).
    pub fn fail_next_allocs(&self, n: u64) {
        self.inner.fail_alloc.store(n, Ordering::Release);
    }

    /// Migrates every page of this pagemap that the process maps back to
    /// system memory (`migrate_device_range` over the whole pagemap, as a
    /// driver does before `memunmap_pages`). Returns how many moved.
    ///
    /// # Errors
    /// As [`crate::migrate::migrate_to_system`].
    pub fn evict(&self) -> Result<u64> {
        let core = self.inner.mm.core()?;
        core.evict_pagemap(&self.inner)
    }
}

impl Drop for DevPagemap {
    fn drop(&mut self) {
        if let Err(e) = self.evict() {
            tracing::warn!("evicting {:?}: {e}", self.inner);
        }
    }
}

impl Drop for PagemapInner {
    fn drop(&mut self) {
        registry().lock().remove(&self.base_pfn);
    }
}

/// A counted reference to a device page.
pub struct DevicePage {
    pgmap: Arc<PagemapInner>,
    index: u64,
}

impl fmt::Debug for DevicePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePage(pfn {:#x})", self.pfn())
    }
}

impl DevicePage {
    fn try_get(pgmap: Arc<PagemapInner>, index: u64) -> Option<DevicePage> {
        let slot = &pgmap.pages[index as usize];
        slot.refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n + 1)
            })
            .ok()?;
        Some(DevicePage { pgmap, index })
    }

    /// The page's PFN.
    pub fn pfn(&self) -> u64 {
        self.pgmap.base_pfn + self.index
    }

    /// Index in its pagemap.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The owner of its pagemap.
    pub fn owner(&self) -> OwnerId {
        self.pgmap.owner
    }

    /// The kind of its pagemap.
    pub fn kind(&self) -> MemoryType {
        self.pgmap.kind
    }

    /// Where its data lives.
    pub fn storage(&self) -> Storage {
        self.pgmap.storage
    }

    /// The driver's word.
    pub fn driver_data(&self) -> u64 {
        self.slot().driver_data.load(Ordering::Relaxed)
    }

    /// Sets the driver's word.
    pub fn set_driver_data(&self, v: u64) {
        self.slot().driver_data.store(v, Ordering::Relaxed);
    }

    /// How many references the page has now.
    pub fn refcount(&self) -> u64 {
        self.slot().refs.load(Ordering::Acquire)
    }

    /// Whether both handles name the same page.
    pub fn same_page(&self, other: &DevicePage) -> bool {
        Arc::ptr_eq(&self.pgmap, &other.pgmap) && self.index == other.index
    }

    fn slot(&self) -> &PageSlot {
        &self.pgmap.pages[self.index as usize]
    }

    /// Zeroes the page in `mem` (its pagemap's device memory, locked) if it
    /// still holds a freed page's data.
    fn zero_if_stale(&self, mem: &mut [u8]) {
        if self.slot().stale.swap(false, Ordering::AcqRel) {
            let off = (self.index << PAGE_SHIFT) as usize;
            mem[off..off + PAGE_SIZE as usize].fill(0);
        }
    }

    /// Whether this page comes right after `prev` in the same pagemap, so
    /// that their data sits side by side (in device memory or in the host
    /// region) and moves in one call.
    pub(crate) fn follows(&self, prev: &DevicePage) -> bool {
        Arc::ptr_eq(&self.pgmap, &prev.pgmap) && self.index == prev.index + 1
    }

    /// Notes that the host page holds data now ([`Storage::Host`]).
    pub(crate) fn note_host_filled(&self) {
        self.slot().host_data.store(true, Ordering::Release);
    }

    /// Notes that the host page is about to be emptied by moving its data
    /// out ([`Storage::Host`]); a failed move notes it filled again.
    pub(crate) fn note_host_emptied(&self) {
        self.slot().host_data.store(false, Ordering::Release);
    }

    /// The host address of the page's storage ([`Storage::Host`] only).
    pub(crate) fn host_addr(&self) -> Option<VirtAddr> {
        let host = self.pgmap.host.as_ref()?;
        Some(VirtAddr(host.addr().get() + (self.index << PAGE_SHIFT)))
    }

    /// Copies the page's data into `out` (one page).
    ///
    /// For [`Storage::Host`] the data is read from the host page (an absent
    /// host page reads as zeros).
    pub fn read(&self, out: &mut [u8]) -> Result<()> {
        let n = (PAGE_SIZE as usize).min(out.len());
        let off = (self.index << PAGE_SHIFT) as usize;
        match (&self.pgmap.device_mem, self.host_addr()) {
            (Some(mem), _) => {
                let mut mem = mem.lock();
                self.zero_if_stale(&mut mem);
                out[..n].copy_from_slice(&mem[off..off + n]);
            }
            (None, Some(addr)) => {
                crate::os::process_vm::read(addr, &mut out[..n])
                    .map_err(|e| Error::os("process_vm_readv", e))?;
            }
            (None, None) => return Err(Error::Inval("pagemap without storage")),
        }
        Ok(())
    }

    /// Writes `data` (at most a page) into the page at byte `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        if offset + data.len() > PAGE_SIZE as usize {
            return Err(Error::Inval("write past the end of a device page"));
        }
        let off = (self.index << PAGE_SHIFT) as usize + offset;
        match (&self.pgmap.device_mem, self.host_addr()) {
            (Some(mem), _) => {
                let mut mem = mem.lock();
                self.zero_if_stale(&mut mem);
                mem[off..off + data.len()].copy_from_slice(data);
            }
            (None, Some(addr)) => {
                self.note_host_filled();
                crate::os::process_vm::write(VirtAddr(addr.get() + offset as u64), data)
                    .map_err(|e| Error::os("process_vm_writev", e))?;
            }
            (None, None) => return Err(Error::Inval("pagemap without storage")),
        }
        Ok(())
    }

    pub(crate) fn pagemap(&self) -> &Arc<PagemapInner> {
        &self.pgmap
    }
}

impl Clone for DevicePage {
    fn clone(&self) -> Self {
        self.slot().refs.fetch_add(1, Ordering::AcqRel);
        DevicePage {
            pgmap: self.pgmap.clone(),
            index: self.index,
        }
    }
}

impl Drop for DevicePage {
    fn drop(&mut self) {
        if self.slot().refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let r = PageRef {
            pgmap: &self.pgmap,
            index: self.index,
        };
        self.pgmap.ops.page_free(&r);
        if self.pgmap.host.is_some() && self.slot().host_data.swap(false, Ordering::AcqRel) {
            // The data of a freed page must not show in the next one (a
            // page whose data was moved out is a hole already): discarded
            // before the page is free again, at once or with its batch.
            let deferred = DISCARDS
                .try_with(|d| match d.borrow_mut().as_mut() {
                    Some(list) => {
                        list.push((self.pgmap.clone(), self.index));
                        true
                    }
                    None => false,
                })
                .unwrap_or(false);
            if !deferred {
                discard_and_free(&self.pgmap, &[self.index]);
            }
            return;
        }
        if self.pgmap.device_mem.is_some() {
            // Zeroed when next used, if not overwritten whole.
            self.slot().stale.store(true, Ordering::Release);
        }
        self.pgmap.free.lock().push(self.index);
    }
}

/// Host-storage pages (pagemap, index) whose discard waits for the end of
/// a batch.
type Discards = Vec<(Arc<PagemapInner>, u64)>;

thread_local! {
    /// The pages freed inside [`free_in_batches`] on this thread.
    static DISCARDS: std::cell::RefCell<Option<Discards>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f`; host-storage device pages it frees are discarded together at
/// the end, one `MADV_DONTNEED` per run of side-by-side pages rather than
/// one per page, and only then become free. A munmap of a migrated range
/// frees all its pages at once (one call a page would be 65536 calls for
/// 256 MiB). Nested calls join the outermost batch.
pub(crate) fn free_in_batches<R>(f: impl FnOnce() -> R) -> R {
    let outermost = DISCARDS.with(|d| {
        let mut d = d.borrow_mut();
        d.is_none().then(|| *d = Some(Vec::new())).is_some()
    });
    if !outermost {
        return f();
    }
    /// Ends the batch even if `f` unwinds.
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            let Some(mut list) = DISCARDS.with(|d| d.borrow_mut().take()) else {
                return;
            };
            list.sort_unstable_by_key(|(p, i)| (Arc::as_ptr(p) as usize, *i));
            for group in list.chunk_by(|a, b| Arc::ptr_eq(&a.0, &b.0)) {
                let indices: Vec<u64> = group.iter().map(|(_, i)| *i).collect();
                discard_and_free(&group[0].0, &indices);
            }
        }
    }
    let _flush = Flush;
    f()
}

/// Discards the host pages of `indices` (ascending) of a host-storage
/// pagemap, a run of side-by-side pages per call, then frees them.
fn discard_and_free(pgmap: &PagemapInner, indices: &[u64]) {
    if let Some(host) = &pgmap.host {
        for run in indices.chunk_by(|a, b| b == &(a + 1)) {
            let at = VirtAddr(host.addr().get() + (run[0] << PAGE_SHIFT));
            if let Ok(pages) = crate::addr::VaRange::from_len(at, run.len() as u64 * PAGE_SIZE) {
                let _ = crate::os::mm::dontneed(pages);
            }
        }
    }
    let mut free = pgmap.free.lock();
    for &i in indices {
        free.push(i);
    }
}

/// Runs `f` on the device memory holding `pages` when they are consecutive
/// pages of one [`Storage::Device`] pagemap, in order (the memory stays
/// locked meanwhile); `None` otherwise.
pub(crate) fn with_device_run<R>(pages: &[DevicePage], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    let first = pages.first()?;
    let pgmap = &first.pgmap;
    let mem = pgmap.device_mem.as_ref()?;
    let consecutive = pages
        .iter()
        .enumerate()
        .all(|(k, p)| Arc::ptr_eq(&p.pgmap, pgmap) && p.index == first.index + k as u64);
    if !consecutive {
        return None;
    }
    let off = (first.index << PAGE_SHIFT) as usize;
    let len = pages.len() << PAGE_SHIFT;
    let mut mem = mem.lock();
    for p in pages {
        p.zero_if_stale(&mut mem);
    }
    Some(f(&mem[off..off + len]))
}

/// Runs `f` to overwrite, whole, the device memory of `n` pages from
/// `first` (pages `first.index()..first.index() + n` of its
/// [`Storage::Device`] pagemap, whichever pages those are; the caller knows
/// them for its own), with the memory locked; `None` for host storage or a
/// run past the pagemap's end. `f` must write every byte: the pages are not
/// zeroed first.
pub(crate) fn overwrite_device_run<R>(
    first: &DevicePage,
    n: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Option<R> {
    let pgmap = &first.pgmap;
    let mem = pgmap.device_mem.as_ref()?;
    if first.index.checked_add(n as u64)? > pgmap.npages {
        return None;
    }
    let off = (first.index << PAGE_SHIFT) as usize;
    let len = n << PAGE_SHIFT;
    let mut mem = mem.lock();
    for slot in &pgmap.pages[first.index as usize..first.index as usize + n] {
        slot.stale.store(false, Ordering::Release);
    }
    Some(f(&mut mem[off..off + len]))
}

impl PagemapInner {
    pub(crate) fn ops(&self) -> &dyn PagemapOps {
        &*self.ops
    }

    pub(crate) fn page_ref(&self, index: u64) -> PageRef<'_> {
        PageRef { pgmap: self, index }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoOps;

    impl PagemapOps for NoOps {
        fn page_free(&self, _: &PageRef<'_>) {}
    }

    fn pagemap(mm: &Mm, storage: Storage) -> DevPagemap {
        DevPagemap::new(
            mm,
            MemoryType::Private,
            8,
            OwnerId::new(),
            storage,
            Box::new(NoOps),
        )
        .expect("pagemap")
    }

    #[test]
    fn the_free_bitmap_gives_the_lowest_free_page() {
        let mut f = FreePages::all(130);
        let got: Vec<u64> = (0..130).map_while(|_| f.pop()).collect();
        assert_eq!(got, (0..130).collect::<Vec<_>>());
        assert_eq!(
            (f.pop(), f.len()),
            (None, 0),
            "130 pages, not a word's worth more"
        );
        for i in [129, 64, 3, 70] {
            f.push(i);
        }
        assert_eq!(f.len(), 4);
        let got: Vec<u64> = (0..5).map_while(|_| f.pop()).collect();
        assert_eq!(got, [3, 64, 70, 129]);
    }

    #[test]
    fn pages_freed_together_come_back_in_ascending_runs() {
        let mm = Mm::get().expect("mm");
        let p = pagemap(&mm, Storage::Device);
        let first: Vec<DevicePage> = (0..4).map(|_| p.alloc_page().expect("alloc")).collect();
        let idx = |v: &[DevicePage]| v.iter().map(DevicePage::index).collect::<Vec<_>>();
        assert_eq!(idx(&first), [0, 1, 2, 3]);
        drop(first);
        let again: Vec<DevicePage> = (0..4).map(|_| p.alloc_page().expect("alloc")).collect();
        assert_eq!(
            idx(&again),
            [0, 1, 2, 3],
            "lowest first, not last freed first"
        );
    }

    #[test]
    fn a_freed_pages_data_never_shows_in_the_next_allocation() {
        let mm = Mm::get().expect("mm");
        for storage in [Storage::Device, Storage::Host] {
            let p = pagemap(&mm, storage);
            let pages: Vec<DevicePage> = (0..3).map(|_| p.alloc_page().expect("alloc")).collect();
            for page in &pages {
                page.write(0, &[0xAB; PAGE_SIZE as usize]).expect("write");
            }
            drop(pages);
            let again: Vec<DevicePage> = (0..3).map(|_| p.alloc_page().expect("alloc")).collect();
            // Read whole; written in part; read as a run: zeros but what was written.
            let mut buf = vec![0xFFu8; PAGE_SIZE as usize];
            again[0].read(&mut buf).expect("read");
            assert!(
                buf.iter().all(|&b| b == 0),
                "{storage:?}: a read of a reused page"
            );
            again[1].write(8, &[7; 8]).expect("write");
            again[1].read(&mut buf).expect("read");
            assert_eq!(
                &buf[..16],
                &[0, 0, 0, 0, 0, 0, 0, 0, 7, 7, 7, 7, 7, 7, 7, 7]
            );
            assert!(
                buf[16..].iter().all(|&b| b == 0),
                "{storage:?}: the rest of a page written in part"
            );
            if storage == Storage::Device {
                let zeros = with_device_run(&again[2..], |mem| mem.iter().all(|&b| b == 0));
                assert_eq!(zeros, Some(true), "a run read straight from device memory");
                // A whole overwrite is not zeroed first, nor afterwards.
                overwrite_device_run(&again[0], 1, |mem| mem.fill(5));
                again[0].read(&mut buf).expect("read");
                assert!(buf.iter().all(|&b| b == 5), "the overwrite stays");
            }
        }
    }

    #[test]
    fn pages_freed_in_a_batch_are_discarded_and_free_at_its_end() {
        let mm = Mm::get().expect("mm");
        let p = pagemap(&mm, Storage::Host);
        let all = p.free_pages();
        // Two runs, apart: pages 0-2 and 4-5 of the pagemap (3 stays).
        let pages: Vec<DevicePage> = (0..6).map(|_| p.alloc_page().expect("alloc")).collect();
        for page in &pages {
            page.write(0, &[0xCD; PAGE_SIZE as usize]).expect("write");
        }
        let (kept, freed): (Vec<DevicePage>, Vec<DevicePage>) =
            pages.into_iter().partition(|pg| pg.index() == 3);
        free_in_batches(|| {
            free_in_batches(|| drop(freed));
            assert_eq!(p.free_pages(), all - 6, "not free before the batch ends");
        });
        assert_eq!(p.free_pages(), all - 1, "free after it");
        let mut buf = vec![0xFFu8; PAGE_SIZE as usize];
        kept[0].read(&mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0xCD), "a page kept keeps its data");
        let again: Vec<DevicePage> = (0..5).map(|_| p.alloc_page().expect("alloc")).collect();
        for page in &again {
            page.read(&mut buf).expect("read");
            assert!(
                buf.iter().all(|&b| b == 0),
                "page {}: discarded with its batch",
                page.index()
            );
        }
    }

    #[test]
    fn a_run_is_consecutive_pages_of_one_device_memory() {
        let mm = Mm::get().expect("mm");
        let p = pagemap(&mm, Storage::Device);
        let pages: Vec<DevicePage> = (0..4).map(|_| p.alloc_page().expect("alloc")).collect();
        for (k, page) in pages.iter().enumerate() {
            page.write(0, &[k as u8 + 1; 8]).expect("write");
        }
        let firsts = with_device_run(&pages[1..3], |mem| {
            assert_eq!(mem.len(), 2 * PAGE_SIZE as usize);
            [mem[0], mem[PAGE_SIZE as usize]]
        });
        assert_eq!(firsts, Some([2, 3]), "pages 1 and 2, in order");
        let out_of_order = [pages[2].clone(), pages[1].clone()];
        assert!(with_device_run(&out_of_order, |_| ()).is_none());
        let gap = [pages[0].clone(), pages[2].clone()];
        assert!(with_device_run(&gap, |_| ()).is_none());
        let other = pagemap(&mm, Storage::Device);
        let mixed = [pages[3].clone(), other.alloc_page().expect("alloc")];
        assert!(with_device_run(&mixed, |_| ()).is_none(), "two pagemaps");
        assert!(with_device_run(&[], |_| ()).is_none());
        let host = pagemap(&mm, Storage::Host);
        let h = [host.alloc_page().expect("alloc")];
        assert!(
            with_device_run(&h, |_| ()).is_none(),
            "host storage has no device memory"
        );
    }
}
