//! Device reads and writes of anonymous memory: `anon_read` …
//! `anon_write_hugetlbfs` and `anon_read_multiple` of `hmm-tests.c`.

use hmm::os::mm::{Mapping, PROT_NONE, Prot, hugepage, mprotect};
use hmm::testdev::Dmirror;

use super::{assert_cmd, fork_child, hmm_buffer_pages, hugetlb_mapping};
use crate::buffer::{
    Buffer, INTS_PER_PAGE, NTIMES, Request, hmm_dmirror_cmd, int, read_pmd_pagesize,
};
use crate::check::{
    Check, Context, EFAULT, EPERM, OrFail, assert_each, assert_eq, assert_ret, skip,
};
use crate::fixture::Hmm;

const RW: Prot = Prot::READ.union(Prot::WRITE);

/// Read private anonymous memory.
pub(crate) fn anon_read(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);

    // Initialize buffer in system memory but leave the first two pages zero
    // (pte_none and pfn_zero).
    let first = (2 * hmm.page_size / 4) as usize;
    buffer.fill_ptr(first..buffer.ints(), int);

    // Set buffer permission to read-only.
    mprotect(buffer.ptr.range(), Prot::READ).or_fail("mprotect(PROT_READ)")?;

    // Populate the CPU page table with a special zero page.
    let val = buffer.ptr_int((hmm.page_size / 4) as usize);
    assert_eq("CPU read of page 1", val, 0)?;

    // Simulate a device reading system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Read, &mut buffer, npages);
    assert_cmd(Request::Read, &ret, &buffer, npages, Some(1))?;

    // Check what the device read.
    let mirror = |i| buffer.mirror_int(i);
    assert_each("mirror", 0..first, INTS_PER_PAGE, mirror, |_| 0)?;
    assert_each("mirror", first..buffer.ints(), INTS_PER_PAGE, mirror, int)
}

/// Read private anonymous memory which has been protected with
/// `mprotect()` `PROT_NONE`.
pub(crate) fn anon_read_prot(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize buffer in system memory.
    buffer.fill_ptr(0..n, int);

    // Initialize mirror buffer so we can verify it isn't written.
    buffer.fill_mirror(n, |i| -int(i));

    // Protect buffer from reading.
    mprotect(buffer.ptr.range(), PROT_NONE).or_fail("mprotect(PROT_NONE)")?;

    // Simulate a device reading system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Read, &mut buffer, npages);
    assert_ret(Request::Read.name(), &ret, -EFAULT)?;

    // Allow CPU to read the buffer so we can check it.
    mprotect(buffer.ptr.range(), Prot::READ).or_fail("mprotect(PROT_READ)")?;
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)?;

    // Check what the device read: nothing is copied out on error.
    assert_each(
        "mirror",
        0..n,
        INTS_PER_PAGE,
        |i| buffer.mirror_int(i),
        |i| -int(i),
    )
}

/// Write private anonymous memory.
pub(crate) fn anon_write(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize data that the device will write to buffer->ptr.
    buffer.fill_mirror(n, int);

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_cmd(Request::Write, &ret, &buffer, npages, Some(1))?;

    // Check what the device wrote.
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)
}

/// Write private anonymous memory which has been protected with
/// `mprotect()` `PROT_READ`.
pub(crate) fn anon_write_prot(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, Prot::READ).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Simulate a device reading a zero page of memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Read, &mut buffer, 1);
    assert_cmd(Request::Read, &ret, &buffer, 1, Some(1))?;

    // Initialize data that the device will write to buffer->ptr.
    buffer.fill_mirror(n, int);

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_ret(Request::Write.name(), &ret, -EPERM)?;

    // Check what the device wrote: nothing.
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), |_| 0)?;

    // Now allow writing and see that the zero page is replaced.
    mprotect(buffer.ptr.range(), RW).or_fail("mprotect(PROT_READ | PROT_WRITE)")?;

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_cmd(Request::Write, &ret, &buffer, npages, Some(1))?;

    // Check what the device wrote.
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)
}

/// The body of `anon_write_child` and `anon_write_child_shared`: a child
/// sees the parent's data, writes `-i` through its own device, and the
/// parent then sees `-i` (`shared`) or still `i` (copy-on-write).
fn write_child(hmm: &Hmm, ptr: Mapping, shared: bool) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize buffer->ptr so we can tell if it is written.
    buffer.fill_ptr(0..n, int);

    // Initialize data that the device will write to buffer->ptr.
    buffer.fill_mirror(n, |i| -int(i));

    fork_child(|| {
        // Check that we see the parent's values.
        assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)?;
        assert_each(
            "mirror",
            0..n,
            INTS_PER_PAGE,
            |i| buffer.mirror_int(i),
            |i| -int(i),
        )?;

        // The child process needs its own mirror to its own mm.
        let child_fd = Dmirror::open(0).or_fail("hmm_open(0)")?;

        // Simulate a device writing system memory.
        let ret = hmm_dmirror_cmd(&child_fd, Request::Write, &mut buffer, npages);
        assert_cmd(Request::Write, &ret, &buffer, npages, Some(1))?;

        // Check what the device wrote.
        assert_each(
            "ptr",
            0..n,
            INTS_PER_PAGE,
            |i| buffer.ptr_int(i),
            |i| -int(i),
        )
    })?;

    if shared {
        // Check that the parent's buffer did change.
        assert_each(
            "parent: ptr",
            0..n,
            INTS_PER_PAGE,
            |i| buffer.ptr_int(i),
            |i| -int(i),
        )
    } else {
        // Check that the parent's buffer did not change.
        assert_each(
            "parent: ptr",
            0..n,
            INTS_PER_PAGE,
            |i| buffer.ptr_int(i),
            int,
        )
    }
}

/// Check that a device writing an anonymous private mapping will
/// copy-on-write if a child process inherits the mapping.
///
/// Also verifies after `fork()` memory the device can be read by child.
pub(crate) fn anon_write_child(hmm: &Hmm) -> Check {
    let (_, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
    write_child(hmm, ptr, false)
}

/// Check that a device writing an anonymous shared mapping will not
/// copy-on-write if a child process inherits the mapping.
pub(crate) fn anon_write_child_shared(hmm: &Hmm) -> Check {
    let (_, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::shared_anonymous(size, RW).or_fail("mmap(MAP_SHARED | MAP_ANONYMOUS)")?;
    write_child(hmm, ptr, true)
}

/// Write private anonymous huge page.
///
/// As in the kernel, only the data is checked, not that a THP backs it
/// (that needs THP `enabled` to be `madvise` or `always`).
pub(crate) fn anon_write_huge(hmm: &Hmm) -> Check {
    let size = read_pmd_pagesize()
        .map_err(|e| skip(format!("transparent huge pages are not available: {e}")))?;
    let npages = size >> hmm.page_shift;

    // The kernel maps twice the size and aligns into it; the aligned
    // mapping is the same.
    let ptr = Mapping::anonymous_aligned(size, size, RW).or_fail("mmap")?;
    hugepage(ptr.range(), true).or_fail("madvise(MADV_HUGEPAGE)")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize data that the device will write to buffer->ptr.
    buffer.fill_mirror(n, int);

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_cmd(Request::Write, &ret, &buffer, npages, Some(1))?;

    // Check what the device wrote.
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)
}

/// Write huge TLBFS page.
pub(crate) fn anon_write_hugetlbfs(hmm: &Hmm) -> Check {
    let (ptr, _) = hugetlb_mapping()?;
    let npages = ptr.len() >> hmm.page_shift;
    let size = ptr.len();
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize data that the device will write to buffer->ptr.
    buffer.fill_mirror(n, int);

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_cmd(Request::Write, &ret, &buffer, npages, Some(1))?;

    // Check what the device wrote.
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)
}

/// Read anonymous memory multiple times.
pub(crate) fn anon_read_multiple(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    for c in 0..NTIMES as usize {
        let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
        let mut buffer = Buffer::new(ptr, size);
        let n = buffer.ints();

        // Initialize buffer in system memory.
        buffer.fill_ptr(0..n, |i| int(i + c));

        // Simulate a device reading system memory.
        let ret = hmm_dmirror_cmd(&hmm.fd, Request::Read, &mut buffer, npages);
        assert_cmd(Request::Read, &ret, &buffer, npages, Some(1))
            .context(format_args!("iteration {c}"))?;

        // Check what the device read.
        let what = format!("iteration {c}: mirror");
        assert_each(
            &what,
            0..n,
            INTS_PER_PAGE,
            |i| buffer.mirror_int(i),
            |i| int(i + c),
        )?;
    }
    Ok(())
}
