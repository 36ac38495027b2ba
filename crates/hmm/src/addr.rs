//! Typed virtual addresses, page counts and validated half-open ranges.
//!
//! Models the kernel's `unsigned long` addresses and `PAGE_SIZE` arithmetic
//! (`include/linux/mm.h`), with every computation spelled out through
//! `checked_*` so that a bad range becomes an [`Error`], never a wrap-around.

use core::fmt;

use crate::error::{Error, Result};

/// log2 of the base page size on x86_64.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// log2 of a PMD mapping (2 MiB) in bytes.
pub const PMD_SHIFT: u32 = 21;
/// log2 of a PUD mapping (1 GiB) in bytes.
pub const PUD_SHIFT: u32 = 30;
/// One past the highest user address with 4-level paging (`TASK_SIZE` on x86_64).
pub const TASK_SIZE: u64 = (1 << 47) - PAGE_SIZE;

/// A user virtual address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(pub u64);

impl VirtAddr {
    /// The address of a pointer.
    pub fn from_ptr<T>(ptr: *const T) -> Self {
        Self(ptr as usize as u64)
    }

    /// The raw address.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The address as a mutable pointer, for syscalls that take one.
    pub fn as_mut_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }

    /// Whether the address is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }

    /// The page-aligned address at or below this one.
    pub const fn page_down(self) -> Self {
        Self(self.0 & !(PAGE_SIZE - 1))
    }

    /// The address `bytes` further on.
    ///
    /// # Errors
    /// [`Error::Overflow`] when the sum does not fit in 64 bits.
    pub fn checked_add(self, bytes: u64) -> Result<Self> {
        self.0.checked_add(bytes).map(Self).ok_or(Error::Overflow)
    }

    /// The address `pages` pages further on.
    ///
    /// # Errors
    /// [`Error::Overflow`] when the result does not fit in 64 bits.
    pub fn checked_add_pages(self, pages: u64) -> Result<Self> {
        let bytes = pages.checked_mul(PAGE_SIZE).ok_or(Error::Overflow)?;
        self.checked_add(bytes)
    }

    /// The page index of this address (address >> [`PAGE_SHIFT`]).
    pub const fn page_index(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A validated half-open range `[start, end)` of user virtual addresses.
///
/// # Invariants
/// `start < end`, both are page aligned, and `end <= TASK_SIZE`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VaRange {
    start: VirtAddr,
    end: VirtAddr,
}

impl VaRange {
    /// Validates `[start, end)`: page aligned, non-empty, inside the user address space.
    ///
    /// # Errors
    /// - [`Error::Misaligned`] when either bound is not page aligned;
    /// - [`Error::Empty`] when `start >= end`;
    /// - [`Error::OutOfRange`] when `end` lies past [`TASK_SIZE`].
    pub fn new(start: VirtAddr, end: VirtAddr) -> Result<Self> {
        if !start.is_page_aligned() || !end.is_page_aligned() {
            return Err(Error::Misaligned {
                addr: if start.is_page_aligned() { end } else { start },
            });
        }
        if start >= end {
            return Err(Error::Empty);
        }
        if end.0 > TASK_SIZE {
            return Err(Error::OutOfRange { end });
        }
        Ok(Self { start, end })
    }

    /// Validates `[start, start + len)`.
    ///
    /// # Errors
    /// As [`VaRange::new`], plus [`Error::Overflow`] when `start + len` wraps and
    /// [`Error::Empty`] when `len` is zero.
    pub fn from_len(start: VirtAddr, len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::Empty);
        }
        let end = start.checked_add(len)?;
        Self::new(start, end)
    }

    /// Validates `npages` pages from `start`.
    ///
    /// # Errors
    /// As [`VaRange::from_len`].
    pub fn from_pages(start: VirtAddr, npages: u64) -> Result<Self> {
        let len = npages.checked_mul(PAGE_SIZE).ok_or(Error::Overflow)?;
        Self::from_len(start, len)
    }

    /// The first address.
    pub const fn start(self) -> VirtAddr {
        self.start
    }

    /// One past the last address.
    pub const fn end(self) -> VirtAddr {
        self.end
    }

    /// The length in bytes.
    pub const fn len(self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Never true: a `VaRange` is non-empty by construction. Present for API symmetry.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// The number of base pages.
    pub const fn npages(self) -> u64 {
        self.len() >> PAGE_SHIFT
    }

    /// Whether `addr` lies inside.
    pub const fn contains(self, addr: VirtAddr) -> bool {
        self.start.0 <= addr.0 && addr.0 < self.end.0
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(self, other: VaRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// The common part of two ranges, if any.
    pub fn intersect(self, other: VaRange) -> Option<VaRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(VaRange { start, end })
    }

    /// The index of the page holding `addr`, counted from `start`.
    pub const fn page_offset(self, addr: VirtAddr) -> usize {
        ((addr.0 - self.start.0) >> PAGE_SHIFT) as usize
    }
}

impl fmt::Debug for VaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Display for VaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A page frame number: a physical address shifted right by [`PAGE_SHIFT`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Pfn(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_validation() {
        let a = VirtAddr(0x1000);
        assert!(VaRange::new(a, VirtAddr(0x3000)).is_ok());
        assert!(matches!(
            VaRange::new(VirtAddr(0x1001), a),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(VaRange::new(a, a), Err(Error::Empty)));
        assert!(matches!(VaRange::from_len(a, 0), Err(Error::Empty)));
        assert!(matches!(
            VaRange::from_len(VirtAddr(!0xfff), 0x2000),
            Err(Error::Overflow)
        ));
        assert!(matches!(
            VaRange::from_pages(a, u64::MAX),
            Err(Error::Overflow)
        ));
        assert!(matches!(
            VaRange::new(a, VirtAddr(TASK_SIZE + PAGE_SIZE)),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn range_arithmetic() {
        let r = VaRange::from_pages(VirtAddr(0x10000), 4).expect("valid");
        assert_eq!(r.npages(), 4);
        assert_eq!(r.len(), 4 * PAGE_SIZE);
        assert!(r.contains(VirtAddr(0x13fff)));
        assert!(!r.contains(VirtAddr(0x14000)));
        let s = VaRange::from_pages(VirtAddr(0x12000), 4).expect("valid");
        assert!(r.overlaps(s));
        assert_eq!(
            r.intersect(s),
            VaRange::new(VirtAddr(0x12000), VirtAddr(0x14000)).ok()
        );
        assert_eq!(r.page_offset(VirtAddr(0x12000)), 2);
    }
}
