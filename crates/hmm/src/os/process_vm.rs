//! Fault-safe access to this process's memory: `process_vm_readv(2)` and
//! `process_vm_writev(2)` on our own pid.
//!
//! The kernel resolves the access like a remote GUP: absent pages are faulted
//! in (a userfaultfd-registered page waits for its handler), an unmapped or
//! forbidden page ends the transfer with `EFAULT` instead of a signal. This is
//! how the software device touches host memory: a racing `munmap` or a stale
//! permission becomes an error it can turn into a device fault.

use rustix::io::Errno;

use super::last_errno;
use crate::addr::VirtAddr;

fn transfer(addr: VirtAddr, local: *mut u8, len: usize, write: bool) -> Result<usize, Errno> {
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let mut done = 0usize;
    while done < len {
        let liov = libc::iovec {
            iov_base: local.wrapping_add(done).cast(),
            iov_len: len - done,
        };
        let riov = libc::iovec {
            iov_base: (addr.get() as usize + done) as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: the local iovec covers memory the caller lent us for `len`
        // bytes (readable for writes, writable for reads); the remote side is
        // checked by the kernel, which fails with EFAULT instead of faulting us.
        let ret = unsafe {
            if write {
                libc::process_vm_writev(pid, &liov, 1, &riov, 1, 0)
            } else {
                libc::process_vm_readv(pid, &liov, 1, &riov, 1, 0)
            }
        };
        if ret < 0 {
            match last_errno() {
                Errno::INTR => continue,
                e if done > 0 => {
                    let _ = e;
                    return Ok(done);
                }
                e => return Err(e),
            }
        }
        if ret == 0 {
            break;
        }
        done += ret as usize;
    }
    Ok(done)
}

/// Copies `buf.len()` bytes from this process's address `addr` into `buf`.
/// Returns the bytes copied, which is short when a page part-way fails.
///
/// # Errors
/// `EFAULT` when the first page cannot be read (unmapped, `PROT_NONE`),
/// `ENOMEM` when out of memory.
pub fn read(addr: VirtAddr, buf: &mut [u8]) -> Result<usize, Errno> {
    transfer(addr, buf.as_mut_ptr(), buf.len(), false)
}

/// Copies `buf` to this process's address `addr`; returns the bytes written.
///
/// # Errors
/// `EFAULT` when the first page cannot be written (unmapped, read-only).
pub fn write(addr: VirtAddr, buf: &[u8]) -> Result<usize, Errno> {
    // The kernel only reads the local buffer for a write.
    transfer(addr, buf.as_ptr().cast_mut(), buf.len(), true)
}

/// This process's `/proc/self/mem`, opened once per pid (a forked child
/// must not use its parent's: the file is bound to the address space it
/// was opened in). Packed as `pid << 32 | fd`; 0 when not open.
static MEM_FD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn mem_fd() -> Result<std::os::fd::BorrowedFd<'static>, Errno> {
    use std::os::fd::{BorrowedFd, IntoRawFd};
    use std::sync::atomic::Ordering;
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    let cur = MEM_FD.load(Ordering::Acquire);
    let fd = if cur >> 32 == u64::from(pid) && cur != 0 {
        cur as u32 as i32
    } else {
        let owned = rustix::fs::open(
            "/proc/self/mem",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let raw = owned.into_raw_fd();
        let packed = (u64::from(pid) << 32) | u64::from(raw as u32);
        match MEM_FD.compare_exchange(cur, packed, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => raw,
            Err(now) => {
                // Another thread opened it first: use theirs, close ours.
                // SAFETY: `raw` came from `into_raw_fd` above and nothing
                // else owns it.
                drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
                now as u32 as i32
            }
        }
    };
    // SAFETY: the fd stays open for the life of the process (it is never
    // closed once published in MEM_FD for this pid).
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Like [`read()`], through `/proc/self/mem`, which **never waits on a
/// userfaultfd**: a page whose fault would go to a userfaultfd handler
/// ends the transfer (`EIO`/short count) instead. A device that holds its
/// page-table lock while it copies must use this: waiting on a fault the
/// service thread serves, while the service thread waits on that lock for
/// an invalidation, would deadlock.
///
/// # Errors
/// `EIO` when the first page cannot be read; the `Errno` of `open(2)`.
pub fn mem_read(addr: VirtAddr, buf: &mut [u8]) -> Result<usize, Errno> {
    let fd = mem_fd()?;
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], addr.get() + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// Like [`write()`], through `/proc/self/mem` (see [`mem_read`]). The kernel
/// writes as a debugger does (`FOLL_FORCE`), so a read-only private page
/// would be written too: the caller checks the mapping's permission.
///
/// # Errors
/// `EIO` when the first page cannot be written; the `Errno` of `open(2)`.
pub fn mem_write(addr: VirtAddr, buf: &[u8]) -> Result<usize, Errno> {
    let fd = mem_fd()?;
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pwrite(fd, &buf[done..], addr.get() + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::os::mm::{Mapping, PROT_NONE, Prot, mprotect};

    #[test]
    fn reads_writes_and_fails_without_crashing() {
        let m = Mapping::anonymous(2 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        assert_eq!(write(m.addr(), &[1, 2, 3]).expect("write"), 3);
        let mut b = [0u8; 3];
        assert_eq!(read(m.addr(), &mut b).expect("read"), 3);
        assert_eq!(b, [1, 2, 3]);
        mprotect(m.pages(1, 1), Prot::READ).expect("mprotect");
        assert_eq!(write(m.pages(1, 1).start(), &[9]), Err(Errno::FAULT));
        // A transfer crossing into a forbidden page is short, not an error.
        let mut big = vec![0u8; 2 * PAGE_SIZE as usize];
        mprotect(m.pages(1, 1), PROT_NONE).expect("mprotect");
        assert_eq!(read(m.addr(), &mut big).expect("read"), PAGE_SIZE as usize);
        m.unmap_part(m.pages(0, 1)).expect("munmap");
        assert_eq!(read(m.addr(), &mut b), Err(Errno::FAULT));
    }
}
