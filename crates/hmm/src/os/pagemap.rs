//! The pagemap interfaces: the `PAGEMAP_SCAN` ioctl and `/proc/self/pagemap` reads.
//!
//! Follows `Documentation/admin-guide/mm/pagemap.rst`. `PAGEMAP_SCAN` reports
//! runs of pages sharing the same categories (present, zero page, huge, …) at
//! about 15 ns a page; the pagemap file gives one 64-bit entry per page with the
//! PFN (for `CAP_SYS_ADMIN`) and the exclusively-mapped bit at about 40 ns.

use std::os::fd::{AsFd, OwnedFd};

use bitflags::bitflags;
use linux_raw_sys::general as g;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::{abi, ioctl_ptr};
use crate::addr::{PAGE_SHIFT, VaRange, VirtAddr};

bitflags! {
    /// `PAGE_IS_*` categories of `PAGEMAP_SCAN`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Category: u64 {
        /// `PAGE_IS_WPALLOWED`: the VMA allows userfaultfd async write-protect.
        const WPALLOWED = g::PAGE_IS_WPALLOWED as u64;
        /// `PAGE_IS_WRITTEN`: written since write-protected (async WP).
        const WRITTEN = g::PAGE_IS_WRITTEN as u64;
        /// `PAGE_IS_FILE`: a file-backed page.
        const FILE = g::PAGE_IS_FILE as u64;
        /// `PAGE_IS_PRESENT`: mapped by a present PTE or PMD.
        const PRESENT = g::PAGE_IS_PRESENT as u64;
        /// `PAGE_IS_SWAPPED`: a swap entry.
        const SWAPPED = g::PAGE_IS_SWAPPED as u64;
        /// `PAGE_IS_PFNZERO`: the shared zero page (or huge zero page).
        const PFNZERO = g::PAGE_IS_PFNZERO as u64;
        /// `PAGE_IS_HUGE`: mapped by a PMD (THP) or a hugetlb entry.
        const HUGE = g::PAGE_IS_HUGE as u64;
        /// `PAGE_IS_SOFT_DIRTY`.
        const SOFT_DIRTY = g::PAGE_IS_SOFT_DIRTY as u64;
        /// `PAGE_IS_GUARD`: a guard region.
        const GUARD = g::PAGE_IS_GUARD as u64;
    }
}

/// One run of pages with the same categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First page.
    pub start: VirtAddr,
    /// End of the run (exclusive).
    pub end: VirtAddr,
    /// The categories, restricted to the scan's return mask.
    pub categories: Category,
}

/// Which pages a scan reports (`category_*` masks of `struct pm_scan_arg`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanFilter {
    /// Categories that must all be set (after inversion).
    pub required: Category,
    /// Categories inverted before matching.
    pub inverted: Category,
    /// At least one of these must be set (empty: no condition).
    pub any_of: Category,
    /// Categories reported in each region.
    pub returned: Category,
}

/// One `/proc/self/pagemap` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Entry(pub u64);

impl Entry {
    /// The page is present in RAM.
    pub fn present(self) -> bool {
        self.0 & abi::pagemap_entry::PRESENT != 0
    }
    /// The page is swapped out.
    pub fn swapped(self) -> bool {
        self.0 & abi::pagemap_entry::SWAPPED != 0
    }
    /// The page is a file page or shared anonymous.
    pub fn file_or_shared(self) -> bool {
        self.0 & abi::pagemap_entry::FILE_SHARED != 0
    }
    /// The page is mapped by this process only.
    pub fn exclusive(self) -> bool {
        self.0 & abi::pagemap_entry::EXCLUSIVE != 0
    }
    /// The PTE is userfaultfd write-protected.
    pub fn uffd_wp(self) -> bool {
        self.0 & abi::pagemap_entry::UFFD_WP != 0
    }
    /// The PFN of a present page; 0 without `CAP_SYS_ADMIN`.
    pub fn pfn(self) -> u64 {
        if self.present() {
            self.0 & abi::pagemap_entry::PFN_MASK
        } else {
            0
        }
    }
}

/// An open `/proc/self/pagemap`, for scans and entry reads.
#[derive(Debug)]
pub struct Pagemap {
    fd: OwnedFd,
}

/// Regions per `PAGEMAP_SCAN` call. The kernel copies out through a
/// 512-region bounce buffer; a larger `vec` saves calls on fragmented ranges.
const SCAN_VEC_LEN: usize = 4096;

impl Pagemap {
    /// Opens `/proc/self/pagemap` read-only.
    ///
    /// # Errors
    /// The `Errno` of `open(2)`.
    pub fn open() -> Result<Self, Errno> {
        let fd = rustix::fs::open(
            "/proc/self/pagemap",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { fd })
    }

    /// `PAGEMAP_SCAN` over `range`, appending the matching runs to `out`.
    ///
    /// Works around the 6.18 `walk_end` quirk: when a call fills `vec` or
    /// flushes its bounce buffer more than once, `walk_end` may be left at an
    /// earlier flush point; resuming from the later of `walk_end` and the end
    /// of the last region returned never re-reads a region.
    ///
    /// # Errors
    /// `ENOTTY` on kernels without `PAGEMAP_SCAN` (before 6.7), `EINVAL` for a
    /// bad filter or range.
    pub fn scan(
        &self,
        range: VaRange,
        filter: &ScanFilter,
        out: &mut Vec<Region>,
    ) -> Result<(), Errno> {
        // A region is at least a page: a small range needs a small buffer
        // (this one is zeroed on every call; 4096 regions is 96 KiB, more
        // than the scan of a few pages costs).
        let len = usize::try_from(range.npages()).map_or(SCAN_VEC_LEN, |n| n.min(SCAN_VEC_LEN));
        let mut vec = vec![
            g::page_region {
                start: 0,
                end: 0,
                categories: 0
            };
            len.max(1)
        ];
        let end = range.end().get();
        let mut cur = range.start().get();
        while cur < end {
            let mut arg = g::pm_scan_arg {
                size: core::mem::size_of::<g::pm_scan_arg>() as u64,
                flags: 0,
                start: cur,
                end,
                walk_end: 0,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                max_pages: 0,
                category_inverted: filter.inverted.bits(),
                category_mask: filter.required.bits(),
                category_anyof_mask: filter.any_of.bits(),
                return_mask: filter.returned.bits(),
            };
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` in and out and
            // writes at most `vec_len` regions into `vec`, which we own.
            let n = super::retry_on_intr(|| unsafe {
                ioctl_ptr(self.fd.as_fd(), abi::PAGEMAP_SCAN, &mut arg)
            })? as usize;
            for r in &vec[..n] {
                out.push(Region {
                    start: VirtAddr(r.start),
                    end: VirtAddr(r.end),
                    categories: Category::from_bits_retain(r.categories),
                });
            }
            if n < vec.len() {
                // With no max_pages, a call that did not fill `vec` walked the whole range.
                break;
            }
            let last_end = vec[n - 1].end;
            let next = arg.walk_end.max(last_end);
            if next <= cur {
                break;
            }
            cur = next;
        }
        Ok(())
    }

    /// Reads the pagemap entries of `range` into `out` (one per page).
    ///
    /// # Errors
    /// `EINVAL` when `out` is shorter than the range; the `Errno` of `pread(2)`.
    pub fn read_entries(&self, range: VaRange, out: &mut [Entry]) -> Result<(), Errno> {
        let n = range.npages() as usize;
        if out.len() < n {
            return Err(Errno::INVAL);
        }
        let mut done = 0usize;
        while done < n {
            let offset = (range.start().get() >> PAGE_SHIFT) * 8 + done as u64 * 8;
            let want = &mut out[done..n];
            // SAFETY: `want` is a writable buffer of `want.len()` u64 entries;
            // pread(2) writes at most that many bytes into it.
            let ret = unsafe {
                use std::os::fd::AsRawFd;
                libc::pread(
                    self.fd.as_raw_fd(),
                    want.as_mut_ptr().cast(),
                    want.len() * 8,
                    offset as libc::off_t,
                )
            };
            if ret < 0 {
                match super::last_errno() {
                    Errno::INTR => continue,
                    e => return Err(e),
                }
            }
            if ret == 0 {
                return Err(Errno::IO);
            }
            done += ret as usize / 8;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::os::mm::{Mapping, Prot};

    #[test]
    fn scan_reports_present_runs_and_the_zero_page() {
        let pm = Pagemap::open().expect("pagemap");
        let m = Mapping::anonymous(8 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        m.write_u64(2 * PAGE_SIZE as usize / 8, 7); // page 2 written
        let _ = m.read_u64(4 * PAGE_SIZE as usize / 8); // page 4: zero page
        let mut out = Vec::new();
        let filter = ScanFilter {
            any_of: Category::PRESENT | Category::SWAPPED,
            returned: Category::PRESENT | Category::PFNZERO | Category::HUGE,
            ..Default::default()
        };
        pm.scan(m.range(), &filter, &mut out).expect("scan");
        let base = m.range().start().get();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].start.get(), base + 2 * PAGE_SIZE);
        assert_eq!(out[0].categories, Category::PRESENT);
        assert_eq!(out[1].start.get(), base + 4 * PAGE_SIZE);
        assert_eq!(out[1].categories, Category::PRESENT | Category::PFNZERO);
    }

    #[test]
    fn scan_loop_survives_more_regions_than_the_vector() {
        // Every other page present: more regions than SCAN_VEC_LEN and more
        // than the kernel's 512-entry bounce buffer, the case where 6.18
        // reports a stale walk_end.
        let pages = 2 * SCAN_VEC_LEN as u64 + 6;
        let pm = Pagemap::open().expect("pagemap");
        let m = Mapping::anonymous(2 * pages * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.no_hugepage();
        for i in 0..pages {
            m.write_u64((2 * i * PAGE_SIZE) as usize / 8, 1);
        }
        let mut out = Vec::new();
        let filter = ScanFilter {
            required: Category::PRESENT,
            returned: Category::PRESENT,
            ..Default::default()
        };
        pm.scan(m.range(), &filter, &mut out).expect("scan");
        assert_eq!(out.len() as u64, pages);
        for (i, r) in out.iter().enumerate() {
            assert_eq!(
                r.start.get(),
                m.range().start().get() + 2 * i as u64 * PAGE_SIZE
            );
            assert_eq!(r.end.get() - r.start.get(), PAGE_SIZE);
        }
    }

    #[test]
    fn entries_report_presence_and_exclusivity() {
        let pm = Pagemap::open().expect("pagemap");
        let m = Mapping::anonymous(2 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        m.write_u64(0, 1);
        let mut e = [Entry(0); 2];
        pm.read_entries(m.range(), &mut e).expect("pread");
        assert!(e[0].present());
        assert!(e[0].exclusive());
        assert!(!e[1].present());
        assert_eq!(e[1].pfn(), 0);
        if rustix::process::geteuid().is_root() {
            assert_ne!(e[0].pfn(), 0, "root reads real PFNs");
        }
    }
}
