//! `mmap`, `munmap`, `mremap`, `mprotect` and `madvise`, and [`Mapping`], the
//! owner of one anonymous or file mapping.
//!
//! Follows `mmap(2)`, `mremap(2)`, `mprotect(2)` and `madvise(2)`
//! (`MADV_POPULATE_READ`/`WRITE` since 5.14).

use std::os::fd::{AsRawFd, BorrowedFd};

use bitflags::bitflags;
use rustix::io::Errno;

use super::{last_errno, retry_on_intr};
use crate::addr::{VaRange, VirtAddr};

bitflags! {
    /// `PROT_*` bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Prot: i32 {
        /// `PROT_READ`.
        const READ = libc::PROT_READ;
        /// `PROT_WRITE`.
        const WRITE = libc::PROT_WRITE;
        /// `PROT_EXEC`.
        const EXEC = libc::PROT_EXEC;
    }
}

/// `PROT_NONE`.
pub const PROT_NONE: Prot = Prot::empty();

fn check(ret: libc::c_int) -> Result<(), Errno> {
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

fn madvise(range: VaRange, advice: libc::c_int) -> Result<(), Errno> {
    retry_on_intr(|| {
        // SAFETY: madvise(2) with these advices changes only the page tables of
        // `range`; it never invalidates Rust objects because the library only
        // calls it on ranges the caller named for device use.
        check(unsafe { libc::madvise(range.start().as_mut_ptr(), range.len() as usize, advice) })
    })
}

/// `MADV_POPULATE_READ` (`write == false`) or `MADV_POPULATE_WRITE`: faults the
/// pages of `range` in as the CPU would on a read or write.
///
/// # Errors
/// `EFAULT` when a page cannot be populated (no VMA, SIGBUS), `EINVAL` for a
/// VMA that forbids it (`PROT_NONE`, `VM_PFNMAP`, or write on a read-only VMA),
/// `ENOMEM` when out of memory, `EHWPOISON` for poisoned memory.
pub fn populate(range: VaRange, write: bool) -> Result<(), Errno> {
    madvise(
        range,
        if write {
            libc::MADV_POPULATE_WRITE
        } else {
            libc::MADV_POPULATE_READ
        },
    )
}

/// `MADV_DONTNEED`: drops the pages of `range`; private anonymous memory reads
/// back as zeros.
///
/// # Errors
/// `EINVAL` for locked or special mappings, `ENOMEM` for unmapped addresses.
pub fn dontneed(range: VaRange) -> Result<(), Errno> {
    madvise(range, libc::MADV_DONTNEED)
}

/// `MADV_FREE`: lets the kernel drop the pages of `range` lazily; private
/// anonymous memory then reads back as zeros or as it was.
///
/// # Errors
/// `EINVAL` for shared or locked mappings, `ENOMEM` for unmapped addresses.
pub fn free(range: VaRange) -> Result<(), Errno> {
    madvise(range, libc::MADV_FREE)
}

/// `MADV_DONTFORK`: a forked child does not get `range` (nor share its
/// pages copy-on-write with the parent).
///
/// # Errors
/// The `Errno` of `madvise(2)`.
pub fn dontfork(range: VaRange) -> Result<(), Errno> {
    madvise(range, libc::MADV_DONTFORK)
}

/// `MADV_HUGEPAGE` (`true`) or `MADV_NOHUGEPAGE` (`false`) on `range`.
///
/// # Errors
/// The `Errno` of `madvise(2)`.
pub fn hugepage(range: VaRange, on: bool) -> Result<(), Errno> {
    madvise(
        range,
        if on {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        },
    )
}

/// `mprotect(2)` of `range`.
///
/// # Errors
/// `ENOMEM` for unmapped addresses, `EACCES` for a permission the mapping cannot have.
pub fn mprotect(range: VaRange, prot: Prot) -> Result<(), Errno> {
    // SAFETY: changing protections never frees memory; a later access the new
    // protection forbids raises SIGSEGV, which the callers of this library
    // avoid by accessing managed memory fault-safely.
    check(unsafe {
        libc::mprotect(
            range.start().as_mut_ptr(),
            range.len() as usize,
            prot.bits(),
        )
    })
}

/// `munmap(2)` of `range`.
///
/// # Safety
/// No live Rust reference may point into `range`.
pub unsafe fn munmap(range: VaRange) -> Result<(), Errno> {
    // SAFETY: the caller guarantees nothing borrows the range.
    check(unsafe { libc::munmap(range.start().as_mut_ptr(), range.len() as usize) })
}

/// The page size of the kernel's default hugetlb pool, from `/proc/meminfo`.
pub fn default_hugetlb_size() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The owner of one mapping; unmaps it on drop.
///
/// Element accessors are volatile and bounds checked: the memory may change
/// under device access at any time. An access that the mapping's current
/// protection forbids raises SIGSEGV, as any CPU access would.
///
/// # Invariants
/// `range` was returned by `mmap`; the parts of it listed in `released` were
/// unmapped by [`Mapping::unmap_part`] and are no longer ours (the kernel may
/// have reused them for another mapping), so `Drop` unmaps only the rest.
#[derive(Debug)]
pub struct Mapping {
    range: VaRange,
    released: std::sync::Mutex<Vec<VaRange>>,
}

impl Mapping {
    fn map(
        hint: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: u64,
    ) -> Result<Self, Errno> {
        let addr = hint.map_or(core::ptr::null_mut(), VirtAddr::as_mut_ptr);
        // SAFETY: mmap(2) creates a new mapping; without MAP_FIXED it never
        // replaces an existing one, so no Rust object loses its memory.
        let p = unsafe {
            libc::mmap(
                addr,
                len as usize,
                prot.bits(),
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno());
        }
        let range = VaRange::from_len(VirtAddr::from_ptr(p), len).map_err(|_| Errno::INVAL)?;
        Ok(Self::own(range))
    }

    fn own(range: VaRange) -> Self {
        Self {
            range,
            released: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A private anonymous mapping of `len` bytes.
    ///
    /// # Errors
    /// The `Errno` of `mmap(2)`.
    pub fn anonymous(len: u64, prot: Prot) -> Result<Self, Errno> {
        Self::map(
            None,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }

    /// A shared anonymous mapping (shmem) of `len` bytes.
    ///
    /// # Errors
    /// The `Errno` of `mmap(2)`.
    pub fn shared_anonymous(len: u64, prot: Prot) -> Result<Self, Errno> {
        Self::map(
            None,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }

    /// A private anonymous hugetlb mapping (`MAP_HUGETLB`, default pool size).
    ///
    /// # Errors
    /// `ENOMEM` when the pool has too few free pages.
    pub fn hugetlb(len: u64, prot: Prot) -> Result<Self, Errno> {
        Self::map(
            None,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
            0,
        )
    }

    /// A private anonymous mapping of `len` bytes whose start is aligned to
    /// `align` (a power of two), made by over-allocating and trimming.
    ///
    /// # Errors
    /// The `Errno` of `mmap(2)`/`munmap(2)`; `EINVAL` for a bad alignment.
    pub fn anonymous_aligned(len: u64, align: u64, prot: Prot) -> Result<Self, Errno> {
        if !align.is_power_of_two() {
            return Err(Errno::INVAL);
        }
        let big = Self::anonymous(len + align, prot)?;
        let base = big.range.start().get();
        let start = (base + align - 1) & !(align - 1);
        let keep = VaRange::from_len(VirtAddr(start), len).map_err(|_| Errno::INVAL)?;
        let all = big.range;
        core::mem::forget(big);
        let head = VaRange::new(all.start(), keep.start());
        let tail = VaRange::new(keep.end(), all.end());
        for part in [head, tail].into_iter().flatten() {
            // SAFETY: the trimmed parts belong to the mapping we just made and
            // nothing references them.
            unsafe { munmap(part) }?;
        }
        Ok(Self::own(keep))
    }

    /// A mapping of `len` bytes of the file `fd` from `offset`.
    ///
    /// # Errors
    /// The `Errno` of `mmap(2)`.
    pub fn file(
        fd: BorrowedFd<'_>,
        len: u64,
        offset: u64,
        prot: Prot,
        shared: bool,
    ) -> Result<Self, Errno> {
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        Self::map(None, len, prot, flags, fd.as_raw_fd(), offset)
    }

    /// The mapped range.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// The first address.
    pub fn addr(&self) -> VirtAddr {
        self.range.start()
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.range.len()
    }

    /// Never true: mappings are non-empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The pages `[first, first + n)` of the mapping as a range.
    ///
    /// # Panics
    /// When the pages lie outside the mapping.
    pub fn pages(&self, first: u64, n: u64) -> VaRange {
        let r = self
            .range
            .start()
            .checked_add_pages(first)
            .and_then(|s| VaRange::from_pages(s, n));
        match r {
            Ok(r) if r.end() <= self.range.end() => r,
            _ => panic!("pages {first}+{n} outside {:?}", self.range),
        }
    }

    /// `MADV_NOHUGEPAGE` on the whole mapping, so tests see 4 KiB PTEs. Best effort.
    pub fn no_hugepage(&self) {
        let _ = hugepage(self.range, false);
    }

    fn elem_ptr<T>(&self, index: usize) -> *mut T {
        let size = core::mem::size_of::<T>() as u64;
        let off = (index as u64).checked_mul(size);
        match off {
            Some(off) if off + size <= self.range.len() => {
                (self.range.start().get() + off) as usize as *mut T
            }
            _ => panic!("index {index} out of bounds of {:?}", self.range),
        }
    }

    /// Reads the `index`-th `u64` of the mapping (volatile).
    ///
    /// # Panics
    /// When `index` is out of bounds.
    pub fn read_u64(&self, index: usize) -> u64 {
        // SAFETY: the pointer is in bounds of our live mapping and aligned.
        unsafe { core::ptr::read_volatile(self.elem_ptr::<u64>(index)) }
    }

    /// Copies `out.len()` bytes from byte `offset` of the mapping into
    /// `out`. The mapping must be readable, and only memory no other
    /// thread writes meanwhile gives a consistent copy (the library uses it
    /// on its own regions).
    ///
    /// # Panics
    /// When the range is out of bounds.
    pub fn copy_out(&self, offset: u64, out: &mut [u8]) {
        let end = offset.checked_add(out.len() as u64);
        assert!(
            end.is_some_and(|e| e <= self.len()),
            "copy_out out of bounds"
        );
        // SAFETY: `offset..offset + out.len()` is inside our live mapping
        // (checked above); `out` is a distinct Rust buffer; the mapping is
        // only ever accessed through raw pointers, so no reference aliases.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.addr().as_mut_ptr::<u8>().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
    }

    /// Writes the `index`-th `u64` of the mapping (volatile).
    ///
    /// # Panics
    /// When `index` is out of bounds.
    pub fn write_u64(&self, index: usize, value: u64) {
        // SAFETY: the pointer is in bounds of our live mapping and aligned.
        unsafe { core::ptr::write_volatile(self.elem_ptr::<u64>(index), value) }
    }

    /// Reads the `index`-th `i32` of the mapping (volatile).
    ///
    /// # Panics
    /// When `index` is out of bounds.
    pub fn read_i32(&self, index: usize) -> i32 {
        // SAFETY: the pointer is in bounds of our live mapping and aligned.
        unsafe { core::ptr::read_volatile(self.elem_ptr::<i32>(index)) }
    }

    /// Writes the `index`-th `i32` of the mapping (volatile).
    ///
    /// # Panics
    /// When `index` is out of bounds.
    pub fn write_i32(&self, index: usize, value: i32) {
        // SAFETY: the pointer is in bounds of our live mapping and aligned.
        unsafe { core::ptr::write_volatile(self.elem_ptr::<i32>(index), value) }
    }

    /// Reads the `index`-th byte of the mapping (volatile).
    ///
    /// # Panics
    /// When `index` is out of bounds.
    pub fn read_u8(&self, index: usize) -> u8 {
        // SAFETY: the pointer is in bounds of our live mapping.
        unsafe { core::ptr::read_volatile(self.elem_ptr::<u8>(index)) }
    }

    /// Writes the `index`-th byte of the mapping (volatile).
    ///
    /// # Panics
    /// When `index` is out of bounds.
    pub fn write_u8(&self, index: usize, value: u8) {
        // SAFETY: the pointer is in bounds of our live mapping.
        unsafe { core::ptr::write_volatile(self.elem_ptr::<u8>(index), value) }
    }

    /// Unmaps the pages `part` of the mapping (they must lie inside it); later
    /// accesses to them crash as any access to unmapped memory would.
    ///
    /// # Errors
    /// `EINVAL` when `part` is not inside the mapping; the `Errno` of `munmap(2)`.
    pub fn unmap_part(&self, part: VaRange) -> Result<(), Errno> {
        if part.intersect(self.range) != Some(part) {
            return Err(Errno::INVAL);
        }
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        if released.iter().any(|r| r.overlaps(part)) {
            // Unmapping it again could hit someone else's mapping.
            return Err(Errno::INVAL);
        }
        // SAFETY: the part belongs to this mapping (not released before) and
        // the accessors hand out no references.
        unsafe { munmap(part) }?;
        released.push(part);
        Ok(())
    }

    /// The parts of the mapping still owned (not given back by `unmap_part`).
    fn owned_parts(&self) -> Vec<VaRange> {
        let mut released = self
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        released.sort_by_key(|r| r.start());
        let mut out = Vec::new();
        let mut cur = self.range.start();
        for r in released {
            if let Ok(part) = VaRange::new(cur, r.start()) {
                out.push(part);
            }
            cur = cur.max(r.end());
        }
        if let Ok(part) = VaRange::new(cur, self.range.end()) {
            out.push(part);
        }
        out
    }

    /// `mremap(2)` of the whole mapping to a new place (`MREMAP_MAYMOVE |
    /// MREMAP_FIXED` onto a fresh reservation, with `MREMAP_DONTUNMAP` when
    /// `dontunmap`); `self` then owns the new range, and with `dontunmap` the
    /// returned mapping owns the old one.
    ///
    /// # Errors
    /// The `Errno` of `mmap(2)` or `mremap(2)`.
    pub fn remap(&mut self, dontunmap: bool) -> Result<Option<Mapping>, Errno> {
        let target = Self::map(
            None,
            self.range.len(),
            PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        self.remap_onto(target, dontunmap)
    }

    /// [`Self::remap`] onto `target`, a mapping of the same length that the
    /// move replaces.
    ///
    /// # Errors
    /// `EINVAL` for a target of another length; the `Errno` of `mremap(2)`.
    pub fn remap_onto(
        &mut self,
        target: Mapping,
        dontunmap: bool,
    ) -> Result<Option<Mapping>, Errno> {
        if !self
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            // mremap needs the whole old range mapped.
            return Err(Errno::FAULT);
        }
        if target.len() != self.range.len() {
            return Err(Errno::INVAL);
        }
        let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        if dontunmap {
            flags |= libc::MREMAP_DONTUNMAP;
        }
        let len = self.range.len() as usize;
        // SAFETY: mremap moves our own mapping over our own reservation; the
        // accessors hold no references into either.
        let p = unsafe {
            libc::mremap(
                self.range.start().as_mut_ptr(),
                len,
                len,
                flags,
                target.addr().as_mut_ptr::<libc::c_void>(),
            )
        };
        if p == libc::MAP_FAILED {
            let err = last_errno();
            // MREMAP_FIXED unmaps the destination before it validates the
            // source, so after a failure the reservation may already be gone
            // and its addresses handed to another mapping: never unmap it
            // again (at worst an inaccessible reservation is left behind).
            target.leak();
            return Err(err);
        }
        // The reservation was replaced by the moved mapping: `self` owns it now.
        let new = target.leak();
        let old = core::mem::replace(&mut self.range, new);
        Ok(dontunmap.then(|| Mapping::own(old)))
    }

    /// Gives up ownership without unmapping; returns the range.
    pub fn leak(self) -> VaRange {
        let r = self.range;
        let me = core::mem::ManuallyDrop::new(self);
        // The list of released parts is dropped; the mapping itself is not unmapped.
        drop(core::mem::take(
            &mut *me.released.lock().unwrap_or_else(|e| e.into_inner()),
        ));
        r
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        for part in self.owned_parts() {
            // SAFETY: we own exactly these parts; nothing borrows them.
            let _ = unsafe { munmap(part) };
        }
    }
}

/// Pins the calling thread to `cpu` (`sched_setaffinity(2)`).
///
/// # Errors
/// `EINVAL` when the CPU does not exist.
pub fn pin_current_thread(cpu: usize) -> Result<(), Errno> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> usize {
    rustix::thread::sched_getcpu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;

    #[test]
    fn aligned_mapping_and_accessors() {
        let m = Mapping::anonymous_aligned(4 * PAGE_SIZE, 1 << 21, Prot::READ | Prot::WRITE)
            .expect("mmap");
        assert_eq!(m.addr().get() % (1 << 21), 0);
        m.write_u64(3, 0xdead);
        assert_eq!(m.read_u64(3), 0xdead);
        m.write_i32(1000, -5);
        assert_eq!(m.read_i32(1000), -5);
        populate(m.range(), true).expect("populate");
        dontneed(m.pages(0, 1)).expect("dontneed");
        assert_eq!(m.read_u64(3), 0, "DONTNEED drops private anonymous data");
    }

    #[test]
    fn drop_never_unmaps_a_part_already_given_back() {
        let m = Mapping::anonymous(3 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        let hole = m.pages(1, 1);
        m.unmap_part(hole).expect("munmap");
        assert_eq!(
            m.unmap_part(hole),
            Err(Errno::INVAL),
            "a part is given back once"
        );
        // Someone else maps at the freed address.
        let other = Mapping::map(
            Some(hole.start()),
            PAGE_SIZE,
            Prot::READ | Prot::WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        let Ok(other) = other else { return };
        assert_eq!(other.addr(), hole.start());
        other.write_u64(0, 9);
        drop(m);
        // Still mapped: the first mapping's drop left it alone.
        assert_eq!(other.read_u64(0), 9);
    }

    #[test]
    fn populate_reports_the_kernels_errors() {
        let m = Mapping::anonymous(2 * PAGE_SIZE, Prot::READ).expect("mmap");
        assert!(populate(m.range(), false).is_ok());
        assert!(
            populate(m.range(), true).is_err(),
            "write-populating a read-only VMA fails"
        );
        mprotect(m.range(), PROT_NONE).expect("mprotect");
        assert!(populate(m.range(), false).is_err());
    }
}
