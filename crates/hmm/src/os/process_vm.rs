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
