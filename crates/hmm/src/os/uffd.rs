//! userfaultfd: the API handshake, registration and the resolving ioctls.
//!
//! Follows `userfaultfd(2)` and `ioctl_userfaultfd(2)`; `UFFDIO_MOVE` is from
//! `Documentation/admin-guide/mm/userfaultfd.rst` (Linux 6.8+).

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use bitflags::bitflags;
use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as io;
use rustix::io::Errno;

use super::{abi, ioctl_ptr, last_errno, retry_on_intr};
use crate::addr::{VaRange, VirtAddr};

bitflags! {
    /// `UFFD_FEATURE_*`: what the handshake asks for and what the kernel grants.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
        const PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// `UFFD_FEATURE_EVENT_FORK`: the monitor gets the child's userfaultfd.
        const EVENT_FORK = g::UFFD_FEATURE_EVENT_FORK as u64;
        /// `UFFD_FEATURE_EVENT_REMAP`: mremap of a registered range.
        const EVENT_REMAP = g::UFFD_FEATURE_EVENT_REMAP as u64;
        /// `UFFD_FEATURE_EVENT_REMOVE`: madvise DONTNEED/REMOVE of a registered range.
        const EVENT_REMOVE = g::UFFD_FEATURE_EVENT_REMOVE as u64;
        /// `UFFD_FEATURE_MISSING_HUGETLBFS`.
        const MISSING_HUGETLBFS = g::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        /// `UFFD_FEATURE_MISSING_SHMEM`.
        const MISSING_SHMEM = g::UFFD_FEATURE_MISSING_SHMEM as u64;
        /// `UFFD_FEATURE_EVENT_UNMAP`: munmap of a registered range.
        const EVENT_UNMAP = g::UFFD_FEATURE_EVENT_UNMAP as u64;
        /// `UFFD_FEATURE_SIGBUS`: faults raise SIGBUS instead of queueing.
        const SIGBUS = g::UFFD_FEATURE_SIGBUS as u64;
        /// `UFFD_FEATURE_THREAD_ID`: fault messages carry the faulting thread.
        const THREAD_ID = g::UFFD_FEATURE_THREAD_ID as u64;
        /// `UFFD_FEATURE_MINOR_HUGETLBFS`.
        const MINOR_HUGETLBFS = g::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        /// `UFFD_FEATURE_MINOR_SHMEM`.
        const MINOR_SHMEM = g::UFFD_FEATURE_MINOR_SHMEM as u64;
        /// `UFFD_FEATURE_EXACT_ADDRESS`.
        const EXACT_ADDRESS = g::UFFD_FEATURE_EXACT_ADDRESS as u64;
        /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: WP mode on shmem and hugetlbfs.
        const WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect absent pages too.
        const WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// `UFFD_FEATURE_POISON`.
        const POISON = g::UFFD_FEATURE_POISON as u64;
        /// `UFFD_FEATURE_WP_ASYNC`.
        const WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC as u64;
        /// `UFFD_FEATURE_MOVE`: the `UFFDIO_MOVE` ioctl.
        const MOVE = g::UFFD_FEATURE_MOVE as u64;
    }
}

impl Features {
    /// The kernel names of the set flags, for messages and `hmm info`.
    pub fn names(self) -> Vec<&'static str> {
        self.iter_names().map(|(n, _)| n).collect()
    }
}

bitflags! {
    /// Bits of the `ioctls` masks returned by `UFFDIO_API` and `UFFDIO_REGISTER`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << g::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << g::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << g::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << g::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << g::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << g::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << g::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << g::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << g::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << g::_UFFDIO_API;
    }
}

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on absent pages are reported.
        const MISSING = g::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Writes to write-protected pages are reported; also enables the non-cooperative events.
        const WP = g::UFFDIO_REGISTER_MODE_WP as u64;
        /// Minor faults (page cache present, PTE absent) are reported.
        const MINOR = g::UFFDIO_REGISTER_MODE_MINOR as u64;
    }
}

bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*` of a fault message.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PagefaultFlags: u64 {
        /// The access was a write.
        const WRITE = g::UFFD_PAGEFAULT_FLAG_WRITE as u64;
        /// The fault was a write-protect fault.
        const WP = g::UFFD_PAGEFAULT_FLAG_WP as u64;
        /// The fault was a minor fault.
        const MINOR = g::UFFD_PAGEFAULT_FLAG_MINOR as u64;
    }
}

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum Message {
    /// `UFFD_EVENT_PAGEFAULT`: a thread waits on `address`.
    Pagefault {
        /// The faulting address (page aligned unless `EXACT_ADDRESS`).
        address: VirtAddr,
        /// What kind of access.
        flags: PagefaultFlags,
        /// The faulting thread, with `THREAD_ID`.
        tid: u32,
    },
    /// `UFFD_EVENT_FORK`: the process forked; `child` is the child's userfaultfd.
    Fork {
        /// The new userfaultfd for the child's copy of the registered ranges.
        child: OwnedFd,
    },
    /// `UFFD_EVENT_REMAP`: `mremap` moved `[from, from + len)` to `to`.
    Remap {
        /// Old start.
        from: VirtAddr,
        /// New start.
        to: VirtAddr,
        /// Length in bytes.
        len: u64,
    },
    /// `UFFD_EVENT_REMOVE`: `madvise(MADV_DONTNEED/REMOVE)` over `[start, end)`.
    Remove {
        /// First address.
        start: VirtAddr,
        /// End (exclusive).
        end: VirtAddr,
    },
    /// `UFFD_EVENT_UNMAP`: `munmap` over `[start, end)`.
    Unmap {
        /// First address.
        start: VirtAddr,
        /// End (exclusive).
        end: VirtAddr,
    },
    /// An event code this library does not know.
    Unknown(u8),
}

/// An open userfaultfd after a successful `UFFDIO_API` handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    ioctls: Ioctls,
}

/// What the kernel offers, from a handshake that asked for nothing.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// Every feature the kernel can grant.
    pub features: Features,
    /// Every ioctl the kernel supports on a userfaultfd.
    pub ioctls: Ioctls,
}

fn open_fd(nonblock: bool) -> Result<OwnedFd, Errno> {
    let mut flags = libc::O_CLOEXEC;
    if nonblock {
        flags |= libc::O_NONBLOCK;
    }
    // SAFETY: userfaultfd(2) takes only a flags word and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret < 0 {
        return Err(last_errno());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

fn handshake(fd: &OwnedFd, features: Features) -> Result<(Features, Ioctls), Errno> {
    let mut api = g::uffdio_api {
        api: g::UFFD_API as u64,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api` in and out; `fd` is a userfaultfd.
    unsafe { ioctl_ptr(fd.as_fd(), io::UFFDIO_API, &mut api) }?;
    Ok((
        Features::from_bits_retain(api.features),
        Ioctls::from_bits_retain(api.ioctls),
    ))
}

/// The most messages [`Uffd::read_messages`] reads at once.
pub const READ_BATCH: usize = 16;

impl Uffd {
    /// Opens a userfaultfd (`O_CLOEXEC`, optionally `O_NONBLOCK`) and runs the
    /// `UFFDIO_API` handshake asking for `features`.
    ///
    /// # Errors
    /// The `Errno` of `userfaultfd(2)` (`EPERM` when unprivileged userfaultfd is
    /// disabled) or of the handshake (`EINVAL` when a feature is not supported).
    pub fn open(features: Features, nonblock: bool) -> Result<Self, Errno> {
        let fd = open_fd(nonblock)?;
        let (features, ioctls) = handshake(&fd, features)?;
        Ok(Self {
            fd,
            features,
            ioctls,
        })
    }

    /// What this kernel supports: the handshake with no features requested
    /// reports every feature it could grant.
    ///
    /// # Errors
    /// As [`Uffd::open`].
    pub fn probe() -> Result<Capabilities, Errno> {
        let fd = open_fd(false)?;
        let (features, ioctls) = handshake(&fd, Features::empty())?;
        Ok(Capabilities { features, ioctls })
    }

    /// Wraps the child userfaultfd delivered by a fork event. No handshake is
    /// needed: it inherits the parent's features.
    pub fn from_fork(fd: OwnedFd, features: Features) -> Self {
        Self {
            fd,
            features,
            ioctls: Ioctls::empty(),
        }
    }

    /// The features granted by the handshake.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The ioctls available on the file descriptor.
    pub fn ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// `UFFDIO_REGISTER`: registers `range` in `mode`; returns the ioctls usable on it.
    ///
    /// # Errors
    /// `EINVAL` for a mapping userfaultfd cannot register (a regular file) or a
    /// misaligned hugetlb range; `EBUSY` when another userfaultfd holds it.
    pub fn register(&self, range: VaRange, mode: RegisterMode) -> Result<Ioctls, Errno> {
        let mut reg = g::uffdio_register {
            range: g::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register` in and out.
        retry_on_intr(|| unsafe { ioctl_ptr(self.fd.as_fd(), io::UFFDIO_REGISTER, &mut reg) })?;
        Ok(Ioctls::from_bits_retain(reg.ioctls))
    }

    /// `UFFDIO_UNREGISTER` of `range`.
    ///
    /// # Errors
    /// `EINVAL` when the range is not valid.
    pub fn unregister(&self, range: VaRange) -> Result<(), Errno> {
        let mut r = g::uffdio_range {
            start: range.start().get(),
            len: range.len(),
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range` in.
        retry_on_intr(|| unsafe { ioctl_ptr(self.fd.as_fd(), io::UFFDIO_UNREGISTER, &mut r) })?;
        Ok(())
    }

    /// `UFFDIO_COPY`: atomically fills the absent pages at `dst` with `src` and,
    /// unless `dontwake`, wakes the threads waiting there. Partial progress
    /// (`EAGAIN` with bytes copied) is continued here.
    ///
    /// # Errors
    /// `EEXIST` when a page is already present (the fault is already resolved),
    /// `ENOENT` when the mapping changed under a pending remove, `EINVAL` for
    /// misaligned or unregistered ranges, `ESRCH` when the process is exiting.
    pub fn copy(&self, dst: VirtAddr, src: &[u8], dontwake: bool) -> Result<(), Errno> {
        self.copy_mode(dst, src, dontwake, false)
    }

    /// [`Uffd::copy`], installing the pages write-protected when `wp`
    /// (`UFFDIO_COPY_MODE_WP`; the range must be registered in WP mode).
    ///
    /// # Errors
    /// As [`Uffd::copy`].
    pub fn copy_mode(
        &self,
        dst: VirtAddr,
        src: &[u8],
        dontwake: bool,
        wp: bool,
    ) -> Result<(), Errno> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut c = g::uffdio_copy {
                dst: dst.get() + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: if dontwake {
                    g::UFFDIO_COPY_MODE_DONTWAKE as u64
                } else {
                    0
                } | if wp { g::UFFDIO_COPY_MODE_WP as u64 } else { 0 },
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which `src` covers,
            // and writes only into the registered destination range.
            match unsafe { ioctl_ptr(self.fd.as_fd(), io::UFFDIO_COPY, &mut c) } {
                Ok(_) => done += c.copy.max(0) as u64,
                Err(Errno::AGAIN | Errno::INTR) if c.copy > 0 => done += c.copy as u64,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page over the absent pages of `range`.
    ///
    /// # Errors
    /// As [`Uffd::copy`].
    pub fn zeropage(&self, range: VaRange, dontwake: bool) -> Result<(), Errno> {
        let mut z = g::uffdio_zeropage {
            range: g::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode: if dontwake {
                g::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage` in and out.
        retry_on_intr(|| unsafe { ioctl_ptr(self.fd.as_fd(), io::UFFDIO_ZEROPAGE, &mut z) })?;
        Ok(())
    }

    /// `UFFDIO_MOVE`: moves the pages of `[src, src + len)` to `dst` without
    /// copying; returns the bytes moved. The destination must be registered
    /// with this userfaultfd; on 6.18 the source need not be (checked by the
    /// `kernel_facts` tests).
    ///
    /// # Errors
    /// `ENOENT` for an absent source page (unless `allow_src_holes`), `EEXIST`
    /// when a destination page is present, `EBUSY` for a shared source page,
    /// `EINVAL` for unregistered ranges.
    pub fn move_pages(
        &self,
        dst: VirtAddr,
        src: VirtAddr,
        len: u64,
        dontwake: bool,
        allow_src_holes: bool,
    ) -> Result<u64, Errno> {
        match self.move_partial(dst, src, len, dontwake, allow_src_holes) {
            (done, Ok(())) => Ok(done),
            (_, Err(e)) => Err(e),
        }
    }

    /// [`Uffd::move_pages`] that also says how far it got before an error:
    /// `(bytes moved, result)`; on error the page at `src + bytes moved` is
    /// the one the kernel refused.
    pub fn move_partial(
        &self,
        dst: VirtAddr,
        src: VirtAddr,
        len: u64,
        dontwake: bool,
        allow_src_holes: bool,
    ) -> (u64, Result<(), Errno>) {
        let mut mode = 0;
        if dontwake {
            mode |= abi::UFFDIO_MOVE_MODE_DONTWAKE;
        }
        if allow_src_holes {
            mode |= abi::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
        }
        let mut done = 0u64;
        while done < len {
            let mut m = g::uffdio_move {
                dst: dst.get() + done,
                src: src.get() + done,
                len: len - done,
                mode,
                move_: 0,
            };
            // SAFETY: UFFDIO_MOVE takes a `struct uffdio_move` in and out; the
            // kernel validates both ranges against the registered VMAs.
            match unsafe { ioctl_ptr(self.fd.as_fd(), abi::UFFDIO_MOVE, &mut m) } {
                Ok(_) => done += m.move_.max(0) as u64,
                Err(Errno::AGAIN | Errno::INTR) if m.move_ > 0 => done += m.move_ as u64,
                Err(Errno::INTR) => {}
                Err(e) => {
                    done += m.move_.max(0) as u64;
                    return (done, Err(e));
                }
            }
        }
        (done, Ok(()))
    }

    /// `UFFDIO_WRITEPROTECT`: sets (`protect`) or clears write protection on `range`.
    ///
    /// # Errors
    /// `EINVAL` for a range not registered in WP mode, `ENOENT` during a pending remove.
    pub fn writeprotect(&self, range: VaRange, protect: bool, dontwake: bool) -> Result<(), Errno> {
        let mut mode = 0;
        if protect {
            mode |= abi::UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dontwake {
            mode |= abi::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut w = g::uffdio_writeprotect {
            range: g::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect` in.
        retry_on_intr(|| unsafe { ioctl_ptr(self.fd.as_fd(), io::UFFDIO_WRITEPROTECT, &mut w) })?;
        Ok(())
    }

    /// `UFFDIO_POISON`: marks the absent pages of `range` poisoned, so an
    /// access raises `SIGBUS` (the answer to a fault that cannot be served).
    ///
    /// # Errors
    /// `EINVAL` without `UFFD_FEATURE_POISON`; `EEXIST` for a present page.
    pub fn poison(&self, range: VaRange) -> Result<(), Errno> {
        let mut p = g::uffdio_poison {
            range: g::uffdio_range {
                start: range.start().get(),
                len: range.len(),
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON takes a `struct uffdio_poison` in and out.
        retry_on_intr(|| unsafe { ioctl_ptr(self.fd.as_fd(), abi::UFFDIO_POISON, &mut p) })?;
        Ok(())
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on faults in `range`.
    ///
    /// # Errors
    /// `EINVAL` for a bad range.
    pub fn wake(&self, range: VaRange) -> Result<(), Errno> {
        let mut r = g::uffdio_range {
            start: range.start().get(),
            len: range.len(),
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range` in.
        retry_on_intr(|| unsafe { ioctl_ptr(self.fd.as_fd(), io::UFFDIO_WAKE, &mut r) })?;
        Ok(())
    }

    /// Reads the pending messages (up to [`READ_BATCH`]) into `out`; returns how many were
    /// read. On a non-blocking descriptor with nothing pending, returns 0.
    ///
    /// # Errors
    /// The `Errno` of `read(2)`.
    pub fn read_messages(&self, out: &mut Vec<Message>) -> Result<usize, Errno> {
        const N: usize = READ_BATCH;
        let mut raw = [g::uffd_msg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: g::uffd_msg__bindgen_ty_1 {
                reserved: g::uffd_msg__bindgen_ty_1__bindgen_ty_5 {
                    reserved1: 0,
                    reserved2: 0,
                    reserved3: 0,
                },
            },
        }; N];
        let size = core::mem::size_of::<g::uffd_msg>();
        let n = loop {
            use std::os::fd::AsRawFd;
            // SAFETY: `raw` is a writable buffer of N messages; read(2) writes
            // whole messages into it and returns the byte count.
            let ret = unsafe { libc::read(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), N * size) };
            if ret >= 0 {
                break ret as usize / size;
            }
            match last_errno() {
                Errno::INTR => continue,
                Errno::AGAIN => return Ok(0),
                e => return Err(e),
            }
        };
        for m in &raw[..n] {
            out.push(decode(m));
        }
        Ok(n)
    }
}

fn decode(m: &g::uffd_msg) -> Message {
    // SAFETY (for each union read below): the kernel fills the union member
    // that `event` names; every member is plain integers, so any bit pattern
    // is a valid value.
    match m.event as u32 {
        g::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above; the event is a page fault.
            let pf = unsafe { m.arg.pagefault };
            Message::Pagefault {
                address: VirtAddr(pf.address),
                flags: PagefaultFlags::from_bits_retain(pf.flags),
                // SAFETY: `feat` is a one-member union of a u32.
                tid: unsafe { pf.feat.ptid },
            }
        }
        g::UFFD_EVENT_FORK => {
            // SAFETY: see above; the event is a fork.
            let ufd = unsafe { m.arg.fork.ufd };
            // SAFETY: the kernel installed this fd in our table for this message;
            // it is ours to own and close.
            let child = unsafe { OwnedFd::from_raw_fd(ufd as i32) };
            Message::Fork { child }
        }
        g::UFFD_EVENT_REMAP => {
            // SAFETY: see above; the event is a remap.
            let r = unsafe { m.arg.remap };
            Message::Remap {
                from: VirtAddr(r.from),
                to: VirtAddr(r.to),
                len: r.len,
            }
        }
        g::UFFD_EVENT_REMOVE => {
            // SAFETY: see above; the event is a remove.
            let r = unsafe { m.arg.remove };
            Message::Remove {
                start: VirtAddr(r.start),
                end: VirtAddr(r.end),
            }
        }
        g::UFFD_EVENT_UNMAP => {
            // SAFETY: see above; UNMAP uses the remove member.
            let r = unsafe { m.arg.remove };
            Message::Unmap {
                start: VirtAddr(r.start),
                end: VirtAddr(r.end),
            }
        }
        other => Message::Unknown(other as u8),
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
