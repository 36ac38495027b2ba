//! The library's error type.
//!
//! One variant per documented kernel error of the HMM calls (`-EBUSY`,
//! `-EFAULT`, `-EPERM`, `-EINVAL`, `-ENOMEM`, `-EAGAIN`, …) so that callers and
//! the conformance suite can compare against the kernel's return codes through
//! [`Error::errno`], plus the input errors a userspace API must report instead
//! of panicking.

use crate::addr::{VaRange, VirtAddr};

/// A `Result` with the library's [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything the library can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The range was invalidated while it was read; restart from `read_begin` (`-EBUSY`).
    #[error("the range was invalidated during the walk; retry from read_begin")]
    Busy,
    /// A page was required to be valid but cannot be (`-EFAULT`).
    #[error("page at {addr} cannot be made valid: {why}")]
    Fault {
        /// The first page that could not be made valid.
        addr: VirtAddr,
        /// What the CPU page table or VMA said.
        why: &'static str,
    },
    /// A write fault was required on a mapping without write permission (`-EPERM`).
    #[error("write access to {addr} is not permitted by the mapping")]
    Perm {
        /// The first page that needed write access.
        addr: VirtAddr,
    },
    /// Invalid argument (`-EINVAL`).
    #[error("invalid argument: {0}")]
    Inval(&'static str),
    /// Out of memory (`-ENOMEM`).
    #[error("out of memory")]
    NoMem,
    /// A non-blockable invalidation could not proceed (`-EAGAIN`).
    #[error("a notifier could not run without blocking")]
    Again,
    /// The entry does not exist (`-ENOENT`).
    #[error("no such entry")]
    NoEnt,
    /// An address or page-count computation overflowed (`-EOVERFLOW`).
    #[error("address arithmetic overflowed")]
    Overflow,
    /// An address is not page aligned (`-EINVAL`).
    #[error("address {addr} is not page aligned")]
    Misaligned {
        /// The offending address.
        addr: VirtAddr,
    },
    /// A range has no pages (`-EINVAL`).
    #[error("the range is empty")]
    Empty,
    /// A range reaches past the user address space (`-EFAULT`).
    #[error("the range ends at {end}, past the user address space")]
    OutOfRange {
        /// The offending end.
        end: VirtAddr,
    },
    /// A pfn array does not have one entry per page (`-EINVAL`).
    #[error("pfn array has {got} entries, the range {range} needs {want}")]
    PfnLength {
        /// The range.
        range: VaRange,
        /// Entries needed.
        want: u64,
        /// Entries given.
        got: usize,
    },
    /// The address space was released; the handle is no longer usable (`-ESRCH`).
    #[error("the address space was released")]
    Released,
    /// The notifier does not belong to this address space (`-EINVAL`).
    #[error("the notifier belongs to another address space")]
    ForeignNotifier,
    /// A kernel feature the library needs is missing.
    #[error("{feature} is not available: {hint}")]
    Unsupported {
        /// The missing feature, by its kernel name.
        feature: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call, by its man-page name.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: rustix::io::Errno,
    },
}

impl Error {
    /// The kernel's errno for this error, as a positive number.
    pub fn errno(&self) -> i32 {
        use rustix::io::Errno;
        let e = match self {
            Error::Busy => Errno::BUSY,
            Error::Fault { .. } | Error::OutOfRange { .. } => Errno::FAULT,
            Error::Perm { .. } => Errno::PERM,
            Error::Inval(_)
            | Error::Misaligned { .. }
            | Error::Empty
            | Error::PfnLength { .. }
            | Error::ForeignNotifier => Errno::INVAL,
            Error::NoMem => Errno::NOMEM,
            Error::Again => Errno::AGAIN,
            Error::NoEnt => Errno::NOENT,
            Error::Overflow => Errno::OVERFLOW,
            Error::Released => Errno::SRCH,
            Error::Unsupported { .. } => Errno::NOSYS,
            Error::Os { source, .. } => *source,
        };
        e.raw_os_error()
    }

    /// Wraps a failed system call.
    pub fn os(op: &'static str, source: rustix::io::Errno) -> Self {
        Error::Os { op, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values_are_the_kernels() {
        assert_eq!(Error::Busy.errno(), 16);
        assert_eq!(
            Error::Fault {
                addr: VirtAddr(0),
                why: ""
            }
            .errno(),
            14
        );
        assert_eq!(Error::Perm { addr: VirtAddr(0) }.errno(), 1);
        assert_eq!(Error::Inval("x").errno(), 22);
        assert_eq!(Error::NoMem.errno(), 12);
        assert_eq!(Error::Again.errno(), 11);
        assert_eq!(Error::NoEnt.errno(), 2);
        assert_eq!(Error::Overflow.errno(), 75);
    }
}
