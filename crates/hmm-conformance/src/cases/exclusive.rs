//! Exclusive (atomic) device access: `exclusive`, `exclusive_mprotect` and
//! `exclusive_cow` of `hmm-tests.c` (tests 24 to 26).
//!
//! `HMM_DMIRROR_EXCLUSIVE` takes every page of the buffer from the CPU for
//! the device's atomics (`make_device_exclusive`) and maps it in the device
//! page table as atomic; the next CPU access revokes it.

use hmm::Mm;
use hmm::os::mm::{Mapping, Prot};

use super::{assert_cmd, fork_child, hmm_buffer_pages};
use crate::buffer::{Buffer, INTS_PER_PAGE, Request, hmm_dmirror_cmd, int};
use crate::check::{Check, EPERM, OrFail, assert_each, assert_ret};
use crate::fixture::Hmm;

const RW: Prot = Prot::READ.union(Prot::WRITE);

/// The common start of both tests: a private anonymous read-write buffer of
/// `HMM_BUFFER_SIZE` holding `i`, taken for exclusive device access
/// (`ASSERT_EQ(ret, 0)`, `ASSERT_EQ(buffer->cpages, npages)`), and the
/// check of what the device read. Returns the buffer and `npages`.
fn exclusive_buffer(hmm: &Hmm) -> Check<(Buffer, u64)> {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize buffer in system memory.
    buffer.fill_ptr(0..n, int);

    // Map memory exclusively for device access.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Exclusive, &mut buffer, npages);
    assert_cmd(Request::Exclusive, &ret, &buffer, npages, None)?;

    // Check what the device read.
    assert_each("mirror", 0..n, INTS_PER_PAGE, |i| buffer.mirror_int(i), int)?;
    Ok((buffer, npages))
}

/// Basic check of exclusive faulting.
///
/// After `HMM_DMIRROR_EXCLUSIVE` the CPU reads and increments every `int`
/// (`ASSERT_EQ(ptr[i]++, i)`); the first touch of each page faults and
/// revokes the device's exclusive access. Then every `int` is `i + 1` and
/// `HMM_DMIRROR_CHECK_EXCLUSIVE` finds no atomic entry left (0).
pub(crate) fn exclusive(hmm: &Hmm) -> Check {
    let (mut buffer, npages) = exclusive_buffer(hmm)?;
    let n = buffer.ints();

    // Fault pages back to system memory and check them.
    increment_and_check(&mut buffer, n)?;

    // Check atomic access revoked.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::CheckExclusive, &mut buffer, npages);
    assert_ret(Request::CheckExclusive.name(), &ret, 0)
}

/// Exclusive access, then the CPU makes the buffer read-only: a device
/// write must fail with `-EPERM`.
///
/// Deviation: the C calls plain `mprotect(buffer->ptr, size, PROT_READ)`,
/// whose `MMU_NOTIFY_PROTECTION_VMA` invalidation drops the device's atomic
/// (writable) entries. In userspace a plain `mprotect` raises no event, so
/// the port makes the buffer read-only the notifying way the library
/// documents, [`Mm::protect`], which brackets the `mprotect` with that
/// invalidation. (The software device also rechecks the mapping's write
/// permission before writing through an atomic entry, so a plain
/// `mprotect` gives `-EPERM` here as well; the port does not depend on it.)
pub(crate) fn exclusive_mprotect(hmm: &Hmm) -> Check {
    let (mut buffer, npages) = exclusive_buffer(hmm)?;

    Mm::get()
        .and_then(|mm| mm.protect(buffer.ptr.range(), Prot::READ))
        .or_fail("mprotect(PROT_READ) (Mm::protect)")?;

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_ret(Request::Write.name(), &ret, -EPERM)
}

/// Exclusive access survives `fork()` with correct copy-on-write.
///
/// After `HMM_DMIRROR_EXCLUSIVE` the process forks, and parent and child
/// each read and increment every `int` (faulting the pages back) and then
/// find `i + 1`: neither sees the other's increments.
///
/// Deviation: in the C both processes run on after `fork()` and the child
/// ends with the test; here the child runs the checks and exits with their
/// verdict, which the parent waits for (see `fork_child`), then the parent
/// runs them.
pub(crate) fn exclusive_cow(hmm: &Hmm) -> Check {
    let (mut buffer, _) = exclusive_buffer(hmm)?;
    let n = buffer.ints();
    fork_child(|| increment_and_check(&mut buffer, n))?;
    increment_and_check(&mut buffer, n)
}

/// `ASSERT_EQ(ptr[i]++, i)` over the buffer, then `ASSERT_EQ(ptr[i], i+1)`.
///
/// The C stops at the first `ptr[i]++` that read a wrong value; here every
/// `int` is incremented and the first wrong one is reported with the count.
fn increment_and_check(buffer: &mut Buffer, n: usize) -> Check {
    let post_increment = |i: usize| {
        let old = buffer.ptr_int(i);
        buffer.set_ptr_int(i, old.wrapping_add(1));
        old
    };
    assert_each("ptr[i]++", 0..n, INTS_PER_PAGE, post_increment, int)?;
    assert_each(
        "ptr",
        0..n,
        INTS_PER_PAGE,
        |i| buffer.ptr_int(i),
        |i| int(i) + 1,
    )
}
