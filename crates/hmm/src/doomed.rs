//! Pages a `MADV_DONTNEED` (or `MADV_REMOVE`, `MADV_FREE`) is about to zap.
//!
//! The kernel sends `UFFD_EVENT_REMOVE` *before* it zaps, and the `madvise`
//! caller goes on to zap as soon as the event is read. The service thread
//! runs the invalidation while it handles the event, so the invalidation can
//! be over while the CPU still maps the old pages: a device walk in that
//! window would read them, pass `read_retry` (or take its range lock without
//! conflict) and install PFNs the kernel frees a moment later, with no event
//! left to clear them. The kernel's own notifiers do not have this window
//! (`invalidate_range_end` runs after the zap); userspace gets no signal
//! when the zap is done.
//!
//! So the service thread notes, when it reads the event, which pages of the
//! range are present and with what PFN ([`Doomed::record`]). A walk treats a
//! page it finds still mapping its noted PFN as absent: it is doomed. A page
//! found absent, or mapping another PFN, has been zapped, and its note is
//! dropped. Notes expire after [`DOOMED_FOR`], long after any zap completes
//! (the `madvise` caller needs only to be scheduled). Two imprecisions stay,
//! both bounded by that time and both on the safe side: a page zapped and
//! faulted in again *before* the note was taken is noted under its new PFN
//! and reads as absent until the note expires or the page changes; a page
//! faulted in again after the zap with the very frame it had is likewise
//! taken for doomed. Zero-page mappings are never noted: that page is never
//! freed.
//!
//! The noted pages are also the zap's witnesses: it frees a range in
//! address order, so while one of them still maps its noted frame the zap
//! has not passed it, and a page of the range faulted in meanwhile, absent
//! when the note was taken, would be freed too. So while a note is pending
//! every present page of its range is doomed, not only the noted ones,
//! when the walk's segment holds the whole range (its witnesses must be
//! judged on the walk's own read of the segment; a later read could show a
//! zap the walk's entries predate). A range straddling segments keeps only
//! its noted pages doomed. (Under a DONTNEED storm on the pages being
//! faulted this costs device faults part of their rate, `hmm bench storm`.)
//!
//! So the pages of a range are covered when its last page is present when
//! the event is read (a witness that the zap reaches last), the range lies
//! inside the walk's segment, and inside one page table (2 MiB): a pagemap
//! read and a zap each hold a page table's lock while they work on it, so
//! the walk sees every page of one table either before or after the zap.
//!
//! Elsewhere holes stay open. A range with *no* present page when its
//! event is read has no witness; the pages after its last present one have
//! none either (the zap may have passed every noted page and not reached
//! them); a range straddling segments or page tables is judged in parts. A
//! page a device faults in there after the invalidation and before a
//! delayed zap is installed and then freed by the zap, and nothing marks
//! the zap's end (the caller's `madvise` returns to the caller only).
//! Dooming such ranges for a fixed time was tried: at 500 µs it cut storm
//! fault rates tenfold. It takes the `madvise` caller being held off the
//! CPU between the event's read and its zap while a device faults the same
//! range: under a DONTNEED storm on two busy CPUs, about one 0.5 s storm in
//! 60 left a stale entry (`tests/strategy.rs` reports them). A device that
//! reaches memory by physical address pins it (DESIGN §2).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::addr::VaRange;
use crate::os::pagemap::{Category, Entry, Pagemap, Region, ScanFilter};
use crate::sync::Mutex;

/// How long a note lasts.
pub(crate) const DOOMED_FOR: Duration = Duration::from_millis(50);

/// A new note checks the older ones against the page table once this many
/// are kept, and checks this many of them: a new note is taken on the
/// service thread between an event's read and its invalidation, where every
/// system call delays the device's coherence.
const CHECK_ON_RECORD: usize = 8;

/// Notes over more pages than this are left to expire rather than checked.
const CHECK_PAGES_MAX: u64 = 4096;

/// One `REMOVE` event's present pages.
#[derive(Debug)]
struct Removal {
    at: Instant,
    range: VaRange,
    /// Page index and the PFN it mapped when the event was read: the
    /// witnesses of the zap, which frees them in address order.
    pages: Vec<(u64, u64)>,
}

impl Removal {
    /// Whether the zap may still be to come: some noted page still maps
    /// its noted frame, and the note has not expired.
    fn pending(&self, now: Instant) -> bool {
        !self.pages.is_empty() && now - self.at <= DOOMED_FOR
    }
}

/// The notes of every `REMOVE` whose zap may still be pending, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Doomed {
    list: Mutex<VecDeque<Removal>>,
}

/// A page of a walk's segment still mapping the PFN noted for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DoomedPage {
    /// Page index.
    pub(crate) vpn: u64,
    /// The PFN it maps until the zap.
    pub(crate) pfn: u64,
}

impl Doomed {
    /// Notes the present pages of `range` (not the zero page), just after
    /// its `REMOVE` event was read.
    pub(crate) fn record(&self, pagemap: &Pagemap, range: VaRange, zero_pfn: u64) {
        let pages = present_pfns(pagemap, range, zero_pfn);
        let mut list = self.list.lock();
        let now = Instant::now();
        while list.front().is_some_and(|r| now - r.at > DOOMED_FOR) {
            list.pop_front();
        }
        // Drop the pages of older notes that have been zapped since, so the
        // list holds only zaps really in flight (large notes just expire).
        let check = if list.len() >= CHECK_ON_RECORD {
            CHECK_ON_RECORD
        } else {
            0
        };
        // One read for all of them when they lie close together (a program
        // discarding a buffer page by page), one each otherwise.
        let span = list.iter().take(check).map(|r| r.range).reduce(|a, b| {
            VaRange::new(a.start().min(b.start()), a.end().max(b.end())).unwrap_or(a)
        });
        let shared = span
            .filter(|s| s.npages() <= DIRECT_READ_PAGES)
            .map(|s| (s, current(pagemap, s)));
        for r in list
            .iter_mut()
            .take(check)
            .filter(|r| r.range.npages() <= CHECK_PAGES_MAX)
        {
            let own;
            let (at, now) = match &shared {
                Some((s, e)) => (*s, &e[..]),
                None => {
                    own = current(pagemap, r.range);
                    (r.range, &own[..])
                }
            };
            r.pages.retain(|&(vpn, pfn)| still_maps(now, at, vpn, pfn));
        }
        list.retain(|r| r.pending(now));
        if !pages.is_empty() {
            list.push_back(Removal {
                at: now,
                range,
                pages,
            });
        }
    }

    /// The pages of `seg` a pending zap is about to free, as read in
    /// `entries` (one per page of `seg`, when the walk read them) or from
    /// `pagemap`: noted pages that still map their noted PFN, and, while a
    /// small note's zap is pending, every present page of its range (a page
    /// faulted in after the note and before the zap is freed by it too).
    /// Notes whose zap is over are dropped.
    pub(crate) fn in_segment(
        &self,
        pagemap: &Pagemap,
        seg: VaRange,
        entries: Option<&[Entry]>,
    ) -> Vec<DoomedPage> {
        let overlapping = |list: &VecDeque<Removal>| list.iter().any(|r| r.range.overlaps(seg));
        // The segment's entries, read once for every note, and outside the
        // lock: the service thread takes it to note every `REMOVE`.
        let read = match entries {
            Some(_) => Vec::new(),
            None if overlapping(&self.list.lock()) => current(pagemap, seg),
            None => return Vec::new(),
        };
        let e = entries.unwrap_or(&read[..]);
        let mut list = self.list.lock();
        if list.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let (lo, hi) = (seg.start().page_index(), seg.end().page_index());
        let mut out = Vec::new();
        for r in list.iter_mut() {
            if !r.pending(now) || !r.range.overlaps(seg) {
                continue;
            }
            // Everything is judged on the walk's own view of the segment,
            // `e`: a newer read could show a zap the walk's entries predate.
            // So the whole range is doomed only for a note inside the
            // segment, whose witnesses are all in that view.
            let inside = r.range.start() >= seg.start() && r.range.end() <= seg.end();
            r.pages.retain(|&(vpn, pfn)| {
                if vpn < lo || vpn >= hi {
                    return true;
                }
                let still = still_maps(e, seg, vpn, pfn);
                if still {
                    out.push(DoomedPage { vpn, pfn });
                }
                still
            });
            if inside && r.pending(now) {
                let from = r.range.start().page_index().max(lo);
                let to = r.range.end().page_index().min(hi);
                for vpn in from..to {
                    let entry = e.get((vpn - lo) as usize);
                    if let Some(entry) = entry.filter(|x| x.present()) {
                        out.push(DoomedPage {
                            vpn,
                            pfn: entry.pfn(),
                        });
                    }
                }
            }
        }
        list.retain(|r| r.pending(now));
        out.sort_unstable_by_key(|d| d.vpn);
        out.dedup_by_key(|d| d.vpn);
        out
    }

    /// How many notes are kept (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.list.lock().len()
    }
}

/// The pagemap entries of `range` now (all absent if they cannot be read).
fn current(pagemap: &Pagemap, range: VaRange) -> Vec<Entry> {
    let mut e = vec![Entry(0); range.npages() as usize];
    if pagemap.read_entries(range, &mut e).is_err() {
        e.fill(Entry(0));
    }
    e
}

/// Whether page `vpn` is present and maps `pfn`, in `entries` of `range`.
fn still_maps(entries: &[Entry], range: VaRange, vpn: u64, pfn: u64) -> bool {
    vpn.checked_sub(range.start().page_index())
        .and_then(|i| entries.get(i as usize))
        .is_some_and(|e| e.present() && e.pfn() == pfn)
}

/// Up to this many pages (one page of pagemap entries), the present pages
/// of a range are found by reading its entries, not by a `PAGEMAP_SCAN`
/// first.
const DIRECT_READ_PAGES: u64 = 512;

/// The present pages of `range` with their PFNs, the zero page left out.
fn present_pfns(pagemap: &Pagemap, range: VaRange, zero_pfn: u64) -> Vec<(u64, u64)> {
    if range.npages() <= DIRECT_READ_PAGES {
        // Small: one read of its entries costs less than a scan first.
        let base = range.start().page_index();
        return current(pagemap, range)
            .iter()
            .enumerate()
            .filter(|(_, e)| e.present() && e.pfn() != 0 && e.pfn() != zero_pfn)
            .map(|(k, e)| (base + k as u64, e.pfn()))
            .collect();
    }
    let filter = ScanFilter {
        any_of: Category::PRESENT,
        returned: Category::PRESENT | Category::PFNZERO,
        ..Default::default()
    };
    let mut regions: Vec<Region> = Vec::new();
    if pagemap.scan(range, &filter, &mut regions).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut entries = Vec::new();
    for r in regions {
        if r.categories.contains(Category::PFNZERO) {
            continue;
        }
        let Ok(run) = VaRange::new(r.start, r.end) else {
            continue;
        };
        entries.clear();
        entries.resize(run.npages() as usize, Entry(0));
        if pagemap.read_entries(run, &mut entries).is_err() {
            continue;
        }
        let base = run.start().page_index();
        for (k, e) in entries.iter().enumerate() {
            if e.present() && e.pfn() != 0 && e.pfn() != zero_pfn {
                out.push((base + k as u64, e.pfn()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::os::mm::{Mapping, Prot};

    fn pfn_of(pagemap: &Pagemap, m: &Mapping, page: u64) -> u64 {
        let mut e = [Entry(0)];
        pagemap
            .read_entries(m.pages(page, 1), &mut e)
            .expect("pagemap");
        e[0].pfn()
    }

    #[test]
    fn a_noted_range_is_doomed_until_its_noted_pages_are_zapped() {
        let pagemap = Pagemap::open().expect("pagemap");
        let m = Mapping::anonymous(4 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        for p in 0..4 {
            m.write_u64((p * PAGE_SIZE / 8) as usize, p + 1);
        }
        let doomed = Doomed::default();
        // Page 3 stays absent: not noted.
        crate::os::mm::dontneed(m.pages(3, 1)).expect("DONTNEED");
        let pfns: Vec<u64> = (0..3).map(|p| pfn_of(&pagemap, &m, p)).collect();
        doomed.record(&pagemap, m.range(), 0);
        let page = |p: u64| m.addr().page_index() + p;
        let seen = doomed.in_segment(&pagemap, m.range(), None);
        let want: Vec<DoomedPage> = (0..3)
            .map(|p| DoomedPage {
                vpn: page(p),
                pfn: pfns[p as usize],
            })
            .collect();
        assert_eq!(seen, want, "the present pages, with their PFNs");
        // The zap reaches page 0.
        crate::os::mm::dontneed(m.pages(0, 1)).expect("DONTNEED");
        let seen = doomed.in_segment(&pagemap, m.range(), None);
        assert_eq!(seen, want[1..].to_vec(), "page 0 was zapped");
        // Faulted in again while pages 1 and 2 still wait for the zap: the
        // zap may yet free it, so it is doomed too, as is page 3 faulted in.
        m.write_u64(0, 7);
        m.write_u64((3 * PAGE_SIZE / 8) as usize, 7);
        let seen: Vec<u64> = doomed
            .in_segment(&pagemap, m.range(), None)
            .iter()
            .map(|d| d.vpn)
            .collect();
        assert_eq!(seen, (0..4).map(page).collect::<Vec<_>>());
        // A segment elsewhere sees nothing of it.
        let other = Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        other.write_u64(0, 1);
        assert!(doomed.in_segment(&pagemap, other.range(), None).is_empty());
        // The zap reaches pages 1 and 2: the note ends, and what was
        // faulted in after it lives.
        crate::os::mm::dontneed(m.pages(1, 2)).expect("DONTNEED");
        assert!(doomed.in_segment(&pagemap, m.pages(0, 1), None).is_empty());
        assert!(doomed.in_segment(&pagemap, m.range(), None).is_empty());
        assert_eq!(doomed.len(), 0, "an ended note is dropped");
    }

    #[test]
    fn notes_expire() {
        let pagemap = Pagemap::open().expect("pagemap");
        let m = Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.write_u64(0, 1);
        let doomed = Doomed::default();
        doomed.record(&pagemap, m.range(), 0);
        assert_eq!(doomed.in_segment(&pagemap, m.range(), None).len(), 1);
        std::thread::sleep(DOOMED_FOR + Duration::from_millis(5));
        assert!(doomed.in_segment(&pagemap, m.range(), None).is_empty());
        assert_eq!(doomed.len(), 0, "expired notes are dropped");
    }

    /// Notes of single pages `stride` pages apart, each zapped after it
    /// is taken: kept until [`CHECK_ON_RECORD`] are, then pruned.
    fn pruned_once_enough_are_kept(stride: u64) {
        let pagemap = Pagemap::open().expect("pagemap");
        let n = CHECK_ON_RECORD as u64 + 1;
        let m = Mapping::anonymous(n * stride * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        let doomed = Doomed::default();
        for k in 0..n - 1 {
            let p = k * stride;
            m.write_u64((p * PAGE_SIZE / 8) as usize, 1);
            doomed.record(&pagemap, m.pages(p, 1), 0);
            crate::os::mm::dontneed(m.pages(p, 1)).expect("DONTNEED");
        }
        assert_eq!(
            doomed.len(),
            CHECK_ON_RECORD,
            "kept, unchecked, until this many"
        );
        // The next note checks the kept ones: all were zapped.
        let p = (n - 1) * stride;
        m.write_u64((p * PAGE_SIZE / 8) as usize, 1);
        doomed.record(&pagemap, m.pages(p, 1), 0);
        assert_eq!(doomed.len(), 1, "the zapped ones went; the new one stays");
    }

    #[test]
    fn notes_of_zapped_pages_are_pruned_once_enough_are_kept() {
        // Side by side: checked with one read.
        pruned_once_enough_are_kept(1);
        // Further apart than one read covers: checked one by one.
        pruned_once_enough_are_kept(DIRECT_READ_PAGES);
    }

    #[test]
    fn a_pruning_check_keeps_the_notes_whose_zap_is_to_come() {
        let pagemap = Pagemap::open().expect("pagemap");
        let n = CHECK_ON_RECORD as u64 + 1;
        let m = Mapping::anonymous(n * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        let doomed = Doomed::default();
        for p in 0..n - 1 {
            m.write_u64((p * PAGE_SIZE / 8) as usize, 1);
            doomed.record(&pagemap, m.pages(p, 1), 0);
            // Every other page zapped; the rest still wait for theirs.
            if p % 2 == 0 {
                crate::os::mm::dontneed(m.pages(p, 1)).expect("DONTNEED");
            }
        }
        let p = n - 1;
        m.write_u64((p * PAGE_SIZE / 8) as usize, 1);
        doomed.record(&pagemap, m.pages(p, 1), 0);
        assert_eq!(
            doomed.len(),
            CHECK_ON_RECORD / 2 + 1,
            "the zapped went, the pending and the new one stay"
        );
    }

    #[test]
    fn a_large_range_is_scanned_and_noted_like_a_small_one() {
        let pagemap = Pagemap::open().expect("pagemap");
        let n = DIRECT_READ_PAGES + 88;
        let m = Mapping::anonymous(n * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        let written = [0, 1, DIRECT_READ_PAGES - 1, DIRECT_READ_PAGES, n - 1];
        for p in written {
            m.write_u64((p * PAGE_SIZE / 8) as usize, p + 1);
        }
        let pages = present_pfns(&pagemap, m.range(), 0);
        let want: Vec<(u64, u64)> = written
            .iter()
            .map(|&p| (m.addr().page_index() + p, pfn_of(&pagemap, &m, p)))
            .collect();
        assert_eq!(pages, want, "scanned");
        let small = present_pfns(&pagemap, m.pages(0, 2), 0);
        assert_eq!(small, want[..2].to_vec(), "read directly");
    }

    #[test]
    fn entries_read_by_the_walk_are_used_and_the_zero_page_is_never_noted() {
        let pagemap = Pagemap::open().expect("pagemap");
        let m = Mapping::anonymous(2 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        m.write_u64(0, 1);
        let _ = m.read_u64((PAGE_SIZE / 8) as usize); // the zero page
        let zero = pfn_of(&pagemap, &m, 1);
        let doomed = Doomed::default();
        doomed.record(&pagemap, m.range(), zero);
        let mut e = vec![Entry(0); 2];
        pagemap.read_entries(m.range(), &mut e).expect("pagemap");
        // Only the written page is noted; while its zap is pending the
        // zero-page mapping beside it is doomed too (the zap unmaps it).
        let seen = doomed.in_segment(&pagemap, m.range(), Some(&e));
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[1].pfn, zero);
        // Entries showing the noted page absent end the note.
        e[0] = Entry(0);
        assert!(doomed.in_segment(&pagemap, m.range(), Some(&e)).is_empty());
        assert_eq!(doomed.len(), 0);
    }
}
