//! Every raw system call, ioctl and `unsafe` block of the library.
//!
//! The crate root denies `unsafe_code`; this module tree allows it because it is
//! the one place that talks to the kernel through raw ABIs: userfaultfd
//! ([`uffd`]), the pagemap interfaces ([`pagemap`]), the `PROCMAP_QUERY` VMA
//! query ([`procmap`]), `madvise`/`mprotect`/`mmap` ([`mm`]) and
//! `process_vm_readv`/`writev` ([`process_vm`]). Each wrapper documents the man
//! page it follows and returns the kernel's `Errno` intact; the rest of the
//! crate is safe code on top of these wrappers.
//!
//! Constants that the system headers (and `linux-raw-sys`) lack are defined in
//! [`abi`], each checked by a golden test.
#![allow(unsafe_code)]

pub mod abi;
pub mod mm;
pub mod pagemap;
pub mod process;
pub mod process_vm;
pub mod procmap;
pub mod uffd;

use rustix::io::Errno;

/// The calling thread's last OS error as an [`Errno`].
pub(crate) fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// Runs `f` again while it fails with `EINTR`, as rustix's `retry_on_intr`.
pub(crate) fn retry_on_intr<T>(mut f: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Issues `ioctl(fd, request, arg)` with a pointer to `arg`.
///
/// # Safety
/// `request` must be an ioctl whose argument is a `T` read and/or written by the
/// kernel in place, and `fd` must be the kind of file that ioctl belongs to.
pub(crate) unsafe fn ioctl_ptr<T>(
    fd: std::os::fd::BorrowedFd<'_>,
    request: u32,
    arg: &mut T,
) -> Result<libc::c_int, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: the caller guarantees that `request` takes a `*mut T`; `arg` is a
    // live exclusive reference for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg as *mut T) };
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}
