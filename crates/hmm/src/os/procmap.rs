//! VMA queries through the `PROCMAP_QUERY` ioctl on `/proc/self/maps` (Linux 6.11+).
//!
//! Follows `include/uapi/linux/fs.h` (`struct procmap_query`). One ioctl returns
//! the VMA covering (or following) an address with its bounds, permissions,
//! page size and backing inode, without parsing text.

use std::os::fd::{AsFd, OwnedFd};

use bitflags::bitflags;
use linux_raw_sys::general as g;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::{abi, ioctl_ptr};
use crate::addr::VirtAddr;

bitflags! {
    /// `PROCMAP_QUERY_VMA_*` permission bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct VmaFlags: u64 {
        /// `VM_READ`.
        const READ = g::procmap_query_flags::PROCMAP_QUERY_VMA_READABLE as u64;
        /// `VM_WRITE`.
        const WRITE = g::procmap_query_flags::PROCMAP_QUERY_VMA_WRITABLE as u64;
        /// `VM_EXEC`.
        const EXEC = g::procmap_query_flags::PROCMAP_QUERY_VMA_EXECUTABLE as u64;
        /// `VM_MAYSHARE`: a shared mapping.
        const SHARED = g::procmap_query_flags::PROCMAP_QUERY_VMA_SHARED as u64;
    }
}

/// One VMA as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: VirtAddr,
    /// End (exclusive).
    pub end: VirtAddr,
    /// Permissions.
    pub flags: VmaFlags,
    /// The VMA's page size: 4 KiB, or the hugetlb page size.
    pub page_size: u64,
    /// Offset into the backing file, in bytes.
    pub offset: u64,
    /// The backing inode; 0 for anonymous private memory.
    pub inode: u64,
}

impl Vma {
    /// Whether the VMA is private anonymous memory (no backing inode, not shared).
    pub fn is_private_anon(&self) -> bool {
        self.inode == 0 && !self.flags.contains(VmaFlags::SHARED)
    }
}

/// An open `/proc/self/maps` for `PROCMAP_QUERY`.
///
/// Queries on one descriptor are serialized: the kernel keeps per-open-file
/// state for the query (`struct proc_maps_private`), and concurrent queries
/// from several threads on one file were seen to miss VMAs that exist.
#[derive(Debug)]
pub struct ProcMaps {
    fd: OwnedFd,
    serial: std::sync::Mutex<()>,
}

impl ProcMaps {
    /// Opens `/proc/self/maps`.
    ///
    /// # Errors
    /// The `Errno` of `open(2)`.
    pub fn open() -> Result<Self, Errno> {
        let fd = rustix::fs::open(
            "/proc/self/maps",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            serial: std::sync::Mutex::new(()),
        })
    }

    /// The VMA covering `addr`, or with `or_next` the first VMA above it.
    /// `Ok(None)` when there is none.
    ///
    /// # Errors
    /// `ENOTTY` on kernels without `PROCMAP_QUERY` (before 6.11).
    pub fn query(&self, addr: VirtAddr, or_next: bool) -> Result<Option<Vma>, Errno> {
        let mut q = g::procmap_query {
            size: core::mem::size_of::<g::procmap_query>() as u64,
            query_flags: if or_next {
                g::procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64
            } else {
                0
            },
            query_addr: addr.get(),
            vma_start: 0,
            vma_end: 0,
            vma_flags: 0,
            vma_page_size: 0,
            vma_offset: 0,
            inode: 0,
            dev_major: 0,
            dev_minor: 0,
            vma_name_size: 0,
            build_id_size: 0,
            vma_name_addr: 0,
            build_id_addr: 0,
        };
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: PROCMAP_QUERY takes a `struct procmap_query` in and out; with
        // zero name and build-id sizes it writes nothing else.
        match super::retry_on_intr(|| unsafe {
            ioctl_ptr(self.fd.as_fd(), abi::PROCMAP_QUERY, &mut q)
        }) {
            Ok(_) => Ok(Some(Vma {
                start: VirtAddr(q.vma_start),
                end: VirtAddr(q.vma_end),
                flags: VmaFlags::from_bits_truncate(q.vma_flags),
                page_size: q.vma_page_size,
                offset: q.vma_offset,
                inode: q.inode,
            })),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The userfaultfd registration of every VMA overlapping `range`, from the
/// `VmFlags` of `/proc/self/smaps` (`um` = MISSING, `uw` = WP, `ui` = MINOR):
/// `(vma start, vma end, registered in WP mode, registered in MISSING mode)`.
/// Slow (it reads the whole smaps file); for tests and diagnostics.
///
/// # Errors
/// The error of reading `/proc/self/smaps`.
pub fn uffd_registration(
    range: crate::addr::VaRange,
) -> std::io::Result<Vec<(VirtAddr, VirtAddr, bool, bool)>> {
    let text = std::fs::read_to_string("/proc/self/smaps")?;
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some((s, e)) = cur.take()
                && s < range.end().get()
                && e > range.start().get()
            {
                let has = |f: &str| flags.split_whitespace().any(|x| x == f);
                out.push((VirtAddr(s), VirtAddr(e), has("uw"), has("um")));
            }
        } else if let Some((bounds, _)) = line.split_once(' ')
            && let Some((a, b)) = bounds.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            cur = Some((a, b));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::os::mm::{Mapping, Prot};

    #[test]
    fn query_reports_bounds_permissions_and_holes() {
        let maps = ProcMaps::open().expect("maps");
        let m = Mapping::anonymous(4 * PAGE_SIZE, Prot::READ).expect("mmap");
        let v = maps
            .query(m.range().start(), false)
            .expect("query")
            .expect("vma");
        assert!(v.start <= m.range().start() && v.end >= m.range().end());
        assert!(v.flags.contains(VmaFlags::READ));
        assert!(!v.flags.contains(VmaFlags::WRITE));
        assert_eq!(v.page_size, PAGE_SIZE);
        assert!(v.is_private_anon());
        // Address 0 is never mapped; with or_next the first VMA above it is returned.
        assert_eq!(maps.query(VirtAddr(0), false).expect("query"), None);
        assert!(maps.query(VirtAddr(0), true).expect("query").is_some());
    }
}
