//! Range fault: snapshot or fault a virtual address range into
//! [`HmmPfn`] entries (`mm/hmm.c`, `hmm_range_fault`).
//!
//! The kernel walks the CPU page table under the mmap lock. Here the walk is
//! made of what userspace can see:
//! - **VMAs** from `PROCMAP_QUERY`: a hole, or a VMA without read permission,
//!   gives `ERROR` (or [`Error::Fault`] when a fault was requested there);
//! - **present pages** from `PAGEMAP_SCAN` runs: `VALID`, with the map order
//!   of a PMD THP (9) or of the hugetlb page size, and the zero page as a
//!   read-only page;
//! - **PFNs** from `/proc/self/pagemap` (real frame numbers for root, 0
//!   otherwise), only when [`HmmRange::want_pfns`] asks for them; the zero
//!   page always reports [`Mm::zero_pfn`];
//! - **faults** with `MADV_POPULATE_READ`/`WRITE` over just the runs that
//!   need one, after which the walk restarts at the first faulted page, as
//!   the kernel's does. Read and write runs are faulted apart, so a page that
//!   asked only to be readable is not made writable (the kernel write-faults
//!   a whole empty page-table chunk when any entry in it asks for write).
//!
//! # Writability
//! The kernel reports `WRITE` from `pte_write()`, which userspace cannot read.
//! A present page is reported writable when its VMA is writable, it is not
//! the zero page, and either the mapping is shared or the page is private,
//! anonymous and not shared copy-on-write with a child (the `Mm` learns of
//! forks through userfaultfd and, when PFNs are read, pagemap's
//! exclusively-mapped bit says so per page). A device that writes through a
//! stale `WRITE` is still safe: its access goes through the kernel, which
//! breaks copy-on-write or refuses as the CPU's own write would.
//!
//! # Errors leave the input intact
//! The kernel leaves entries above the failing address holding their input
//! and entries below holding output, so a caller's per-page requests are lost
//! on `-EBUSY` (the FIXME of the fixed-format series). Here the input is
//! saved once, the output is written in place, and any error copies the saved
//! input back: on every error the array is exactly as it was on input.

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, Pfn, VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::mm::{Mm, MmCore};
use crate::notifier::{IntervalNotifier, OwnerId};
use crate::os::pagemap::{Category, Entry, Region, ScanFilter};
use crate::os::procmap::{Vma, VmaFlags};
use crate::pfn::{HmmPfn, NeedFault, pte_need_fault};

/// Consecutive faults at the same page without progress before the walk
/// gives up with [`Error::Busy`] (the page keeps disappearing under it).
const MAX_STALLED_FAULTS: u32 = 16;

/// `MADV_POPULATE` failures with `ENOMEM` tolerated before reporting [`Error::NoMem`].
const MAX_NOMEM_RETRIES: u32 = 3;

/// The `PAGEMAP_SCAN` filter of the range fault's walk: present or swapped
/// pages, with what the decision table needs to know about them. Public so
/// that benchmarks measure the raw scan exactly as the walk issues it.
pub const WALK_FILTER: ScanFilter = ScanFilter {
    required: Category::empty(),
    inverted: Category::empty(),
    any_of: Category::PRESENT.union(Category::SWAPPED),
    returned: Category::PRESENT
        .union(Category::SWAPPED)
        .union(Category::PFNZERO)
        .union(Category::HUGE)
        .union(Category::FILE),
};

/// The arguments of one range fault (`struct hmm_range`).
#[derive(Debug)]
pub struct HmmRange<'a> {
    /// The notifier whose sequence guards the walk.
    pub notifier: &'a IntervalNotifier,
    /// The value of `notifier.read_begin()` this walk is valid for.
    pub notifier_seq: u64,
    /// First address (page aligned).
    pub start: VirtAddr,
    /// End address (page aligned, exclusive).
    pub end: VirtAddr,
    /// One entry per page: requests in, results out.
    pub hmm_pfns: &'a mut [HmmPfn],
    /// Request bits applied to every entry.
    pub default_flags: HmmPfn,
    /// Which bits of each entry count as a request.
    pub pfn_flags_mask: HmmPfn,
    /// Device-private pages of this owner are reported, not faulted.
    pub dev_private_owner: Option<OwnerId>,
    /// Whether to read PFNs from `/proc/self/pagemap`. Without it every flag is
    /// still exact and the PFN field is 0; the walk costs about a third.
    pub want_pfns: bool,
}

impl<'a> HmmRange<'a> {
    /// A range over `[start, end)` with no requests (a pure snapshot) that
    /// reads PFNs; set the public fields for anything else.
    pub fn new(
        notifier: &'a IntervalNotifier,
        start: VirtAddr,
        end: VirtAddr,
        hmm_pfns: &'a mut [HmmPfn],
    ) -> Self {
        Self {
            notifier,
            notifier_seq: 0,
            start,
            end,
            hmm_pfns,
            default_flags: HmmPfn::empty(),
            pfn_flags_mask: HmmPfn::empty(),
            dev_private_owner: None,
            want_pfns: true,
        }
    }
}

/// What the CPU page table says about one page, as `hmm_pfn` output bits.
fn cpu_flags_for(vma: &Vma, cats: Category, entry: Option<Entry>, fork_shared: bool) -> HmmPfn {
    if !cats.contains(Category::PRESENT) {
        return HmmPfn::empty();
    }
    let zero = cats.contains(Category::PFNZERO);
    let shared = vma.flags.contains(VmaFlags::SHARED);
    let private_anon = !cats.contains(Category::FILE) && !fork_shared;
    let exclusive = entry.is_none_or(|e| e.exclusive() && !e.uffd_wp());
    let writable =
        vma.flags.contains(VmaFlags::WRITE) && !zero && (shared || (private_anon && exclusive));
    if writable {
        HmmPfn::VALID | HmmPfn::WRITE
    } else {
        HmmPfn::VALID
    }
}

/// The map order of a huge run in `vma`.
fn huge_order(vma: &Vma) -> u32 {
    if vma.page_size > PAGE_SIZE {
        vma.page_size.trailing_zeros() - PAGE_SHIFT
    } else {
        PMD_SHIFT - PAGE_SHIFT
    }
}

/// Where one walk stopped.
enum Walked {
    /// Every page from the walk's start to the end has its output.
    Done,
    /// Pages from this address were faulted in; walk again from it.
    Faulted(VirtAddr),
}

struct Walk<'r> {
    core: &'r MmCore,
    range: VaRange,
    /// The caller's entries as they were on input (requests, sticky flags).
    input: &'r [HmmPfn],
    /// The caller's array, receiving the output in place.
    out: &'r mut [HmmPfn],
    default_flags: HmmPfn,
    pfn_flags_mask: HmmPfn,
    want_pfns: bool,
    any_fault: bool,
    dev_private_owner: Option<OwnerId>,
    regions: Vec<Region>,
    entries: Vec<Entry>,
    nomem: u32,
    /// A page about to be zapped was met (its fault waits for the zap).
    doomed_seen: bool,
}

impl Walk<'_> {
    fn req(&self, i: usize) -> HmmPfn {
        self.input[i].effective_request(self.default_flags, self.pfn_flags_mask)
    }

    /// Pages `[lo, hi)` have no usable VMA: ERROR, or `Fault` if any of them
    /// must be made valid (`hmm_vma_walk_hole` / `hmm_vma_walk_test`).
    fn error_pages(&mut self, lo: VirtAddr, hi: VirtAddr, why: &'static str) -> Result<()> {
        let (a, b) = (self.range.page_offset(lo), self.range.page_offset(hi));
        for i in a..b {
            if self.any_fault && self.req(i).contains(HmmPfn::REQ_FAULT) {
                let addr = VirtAddr(self.range.start().get() + ((i as u64) << PAGE_SHIFT));
                return Err(Error::Fault { addr, why });
            }
            self.out[i] = self.input[i].with_output(HmmPfn::ERROR);
        }
        Ok(())
    }

    fn walk(&mut self, from: VirtAddr) -> Result<Walked> {
        let end = self.range.end();
        let mut cur = from;
        while cur < end {
            // A covering VMA comes back registered, before it is scanned:
            // what the device maps from here on raises invalidations.
            let vma = self.core.query_registered(cur)?;
            match vma {
                Some(v) if v.start <= cur => {
                    let seg_end = v.end.min(end);
                    if !v.flags.contains(VmaFlags::READ) {
                        self.error_pages(cur, seg_end, "VMA without read permission")?;
                    } else if let Walked::Faulted(at) =
                        self.walk_vma(&v, VaRange::new(cur, seg_end)?)?
                    {
                        return Ok(Walked::Faulted(at));
                    }
                    cur = seg_end;
                }
                other => {
                    let hole_end = other.map_or(end, |v| v.start.min(end));
                    self.error_pages(cur, hole_end, "no VMA")?;
                    cur = hole_end;
                }
            }
        }
        Ok(Walked::Done)
    }

    fn walk_vma(&mut self, vma: &Vma, seg: VaRange) -> Result<Walked> {
        self.regions.clear();
        let filter = WALK_FILTER;
        self.core
            .pagemap
            .scan(seg, &filter, &mut self.regions)
            .map_err(|e| Error::os("PAGEMAP_SCAN", e))?;
        let fork_shared = self.core.fork_shared.lock().overlapping(seg);
        let base = self.range.page_offset(seg.start());
        let npages = seg.npages() as usize;
        // Entries (PFN and exclusivity) for the present runs, when asked for.
        if self.want_pfns {
            self.entries.clear();
            self.entries.resize(npages, Entry(0));
            for r in &self.regions {
                if r.categories.contains(Category::PRESENT) {
                    let rr = VaRange::new(r.start, r.end)?;
                    let at = seg.page_offset(r.start);
                    self.core
                        .pagemap
                        .read_entries(rr, &mut self.entries[at..at + rr.npages() as usize])
                        .map_err(|e| Error::os("pread /proc/self/pagemap", e))?;
                }
            }
        }
        // Pages a pending zap is about to free read as absent.
        let doomed = self.core.doomed.in_segment(
            &self.core.pagemap,
            seg,
            self.want_pfns.then_some(&self.entries[..]),
        );
        let mut doomed = doomed.iter().peekable();
        // Device-private pages: absent for the CPU, in the device table.
        let device = self.core.dev.lock().device_pages_in(seg);
        let mut device = device.iter().peekable();
        let mut regions = self.regions.iter().peekable();
        let mut fault_from: Option<usize> = None;
        let mut fault_write = false;
        for j in 0..npages {
            let addr = VirtAddr(seg.start().get() + ((j as u64) << PAGE_SHIFT));
            while regions.peek().is_some_and(|r| r.end <= addr) {
                regions.next();
            }
            while doomed.peek().is_some_and(|d| d.vpn < addr.page_index()) {
                doomed.next();
            }
            let is_doomed = doomed.peek().is_some_and(|d| d.vpn == addr.page_index());
            let cats = regions
                .peek()
                .filter(|r| r.start <= addr && !is_doomed)
                .map_or(Category::empty(), |r| r.categories);
            if is_doomed {
                self.doomed_seen = true;
            }
            let entry = self.want_pfns.then(|| self.entries[j]);
            let shared = fork_shared.iter().any(|r| r.contains(addr));
            let mut cpu = cpu_flags_for(vma, cats, entry, shared);
            while device.peek().is_some_and(|d| d.0 < j as u64) {
                device.next();
            }
            let mut device_pfn = None;
            if let Some(&&(_, pfn, writable, owner)) = device.peek().filter(|d| d.0 == j as u64)
                && !cpu.contains(HmmPfn::VALID)
                && self.dev_private_owner == Some(owner)
            {
                // The device's own page: reported, never faulted. Another
                // owner's page reads as absent, so a requested fault brings
                // it back to system memory (the service thread serves the
                // populate's MISSING fault).
                cpu = if writable {
                    HmmPfn::VALID | HmmPfn::WRITE
                } else {
                    HmmPfn::VALID
                };
                device_pfn = Some(pfn);
            }
            let i = base + j;
            let need = if self.any_fault {
                pte_need_fault(self.req(i), cpu)
            } else {
                NeedFault::empty()
            };
            if !need.is_empty() {
                if need.contains(NeedFault::WRITE_FAULT) && !vma.flags.contains(VmaFlags::WRITE) {
                    return Err(Error::Perm { addr });
                }
                let write = need.contains(NeedFault::WRITE_FAULT);
                match fault_from {
                    None => {
                        fault_from = Some(j);
                        fault_write = write;
                    }
                    // A run is faulted with one kind of access: a read run
                    // ends where a write is needed and the other way round.
                    Some(from) if write != fault_write => {
                        return self.fault(vma, seg, from, j, fault_write);
                    }
                    Some(_) => {}
                }
                continue;
            }
            if let Some(from) = fault_from {
                // The run of pages needing a fault ended: fault it, then restart there.
                return self.fault(vma, seg, from, j, fault_write);
            }
            let mut bits = cpu;
            if cpu.contains(HmmPfn::VALID) {
                let order = if cats.contains(Category::HUGE) {
                    huge_order(vma)
                } else {
                    0
                };
                let pfn = if let Some(p) = device_pfn {
                    p
                } else if cats.contains(Category::PFNZERO) && !cats.contains(Category::HUGE) {
                    self.core.zero_pfn
                } else {
                    entry.map_or(0, Entry::pfn)
                };
                bits = HmmPfn::new(cpu, Pfn(pfn), order).unwrap_or(cpu);
            }
            self.out[i] = self.input[i].with_output(bits);
        }
        if let Some(from) = fault_from {
            return self.fault(vma, seg, from, npages, fault_write);
        }
        Ok(Walked::Done)
    }

    /// `hmm_vma_fault`: populate pages `[from, to)` of `seg` as the CPU would.
    fn fault(
        &mut self,
        vma: &Vma,
        seg: VaRange,
        from: usize,
        to: usize,
        write: bool,
    ) -> Result<Walked> {
        let lo = VirtAddr(seg.start().get() + ((from as u64) << PAGE_SHIFT));
        let hi = VirtAddr(seg.start().get() + ((to as u64) << PAGE_SHIFT));
        // hugetlb is populated in whole huge pages.
        let mask = vma.page_size.max(PAGE_SIZE) - 1;
        let run = VaRange::new(
            VirtAddr(lo.get() & !mask).max(vma.start),
            VirtAddr((hi.get() + mask) & !mask).min(vma.end),
        )?;
        match crate::os::mm::populate(run, write) {
            Ok(()) => {
                if write {
                    self.core.fork_shared.lock().remove(run);
                }
                Ok(Walked::Faulted(lo))
            }
            // "No VMA or out of memory": the VMA may have changed under us
            // (a concurrent fork or registration splits and merges VMAs), so
            // walk again; only a repeated failure is reported.
            Err(rustix::io::Errno::NOMEM) => {
                self.nomem += 1;
                if self.nomem > MAX_NOMEM_RETRIES {
                    Err(Error::NoMem)
                } else {
                    Ok(Walked::Faulted(lo))
                }
            }
            Err(
                rustix::io::Errno::FAULT | rustix::io::Errno::INVAL | rustix::io::Errno::HWPOISON,
            ) => Err(Error::Fault {
                addr: lo,
                why: "the kernel could not fault the page in",
            }),
            Err(e) => Err(Error::os("madvise(MADV_POPULATE)", e)),
        }
    }
}

/// Walks from `last` to the end, restarting after each fault, until done or
/// the notifier's sequence moves.
fn walk_until_done(
    walk: &mut Walk<'_>,
    notifier: &IntervalNotifier,
    seq: u64,
    mut last: VirtAddr,
) -> Result<()> {
    let mut stalled = 0;
    loop {
        if notifier.check_retry(seq) {
            return Err(Error::Busy);
        }
        match walk.walk(last)? {
            Walked::Done => return Ok(()),
            Walked::Faulted(at) => {
                if std::mem::take(&mut walk.doomed_seen) && at == last {
                    // Faulting a doomed page does nothing until the zap
                    // runs: let the thread that makes it have the CPU. Not
                    // a stall: the note ends with the zap, or expires.
                    std::thread::yield_now();
                    continue;
                }
                stalled = if at == last { stalled + 1 } else { 0 };
                if stalled >= MAX_STALLED_FAULTS {
                    return Err(Error::Busy);
                }
                last = at;
            }
        }
    }
}

impl Mm {
    /// Snapshots or faults `range` into its pfn array (`hmm_range_fault`).
    ///
    /// On success every entry holds its output (see [`HmmPfn`]). The result is
    /// valid only if `notifier.read_retry(range.notifier_seq)` is false under
    /// the device lock afterwards.
    ///
    /// # Errors
    /// - [`Error::Busy`]: the notifier's sequence moved; restart from `read_begin`;
    /// - [`Error::Fault`]: a page required to be valid has no VMA, a VMA
    ///   without read permission, or could not be faulted in;
    /// - [`Error::Perm`]: a write was required on a VMA without write permission;
    /// - [`Error::NoMem`]: out of memory while faulting;
    /// - [`Error::Misaligned`], [`Error::Empty`], [`Error::OutOfRange`],
    ///   [`Error::PfnLength`]: bad arguments;
    /// - [`Error::ForeignNotifier`]: the notifier belongs to another `Mm`;
    /// - [`Error::Released`]: the address space was released.
    ///
    /// On every error `hmm_pfns` is left exactly as it was.
    pub fn range_fault(&self, args: &mut HmmRange<'_>) -> Result<()> {
        let core = self.core()?;
        let range = VaRange::new(args.start, args.end)?;
        let npages = range.npages();
        if args.hmm_pfns.len() as u64 != npages {
            return Err(Error::PfnLength {
                range,
                want: npages,
                got: args.hmm_pfns.len(),
            });
        }
        if !args.notifier.belongs_to(&core.subs) {
            return Err(Error::ForeignNotifier);
        }
        let _walk = core.fork_gate.walk();
        // One copy of the input: the walk writes the output in place and an
        // error puts the input back, so the array is untouched on failure.
        let input: Vec<HmmPfn> = args.hmm_pfns.to_vec();
        let any_fault = (args.default_flags | args.pfn_flags_mask).contains(HmmPfn::REQ_FAULT);
        let (notifier, seq) = (args.notifier, args.notifier_seq);
        let mut walk = Walk {
            core,
            range,
            input: &input,
            out: &mut *args.hmm_pfns,
            default_flags: args.default_flags,
            pfn_flags_mask: args.pfn_flags_mask,
            want_pfns: args.want_pfns,
            any_fault,
            dev_private_owner: args.dev_private_owner,
            regions: Vec::new(),
            entries: Vec::new(),
            nomem: 0,
            doomed_seen: false,
        };
        let result = walk_until_done(&mut walk, notifier, seq, range.start());
        if result.is_err() {
            walk.out.copy_from_slice(&input);
        }
        result
    }
}
