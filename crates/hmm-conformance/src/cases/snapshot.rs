//! What a device sees of the CPU page table without faulting:
//! `mixedmap`, `snapshot` and `compound` of `hmm-tests.c`.

use hmm::addr::{PMD_SHIFT, PUD_SHIFT};
use hmm::os::mm::{Mapping, PROT_NONE, Prot, mprotect};
use hmm::testdev::{
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, HMM_DMIRROR_PROT_ERROR, HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD, HMM_DMIRROR_PROT_PUD, HMM_DMIRROR_PROT_READ, HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
};

use super::{ProtByte, assert_cmd, hugetlb_mapping};
use crate::buffer::{Buffer, Request, hmm_dmirror_cmd, hmm_dmirror_cmd_at, int};
use crate::check::{Check, Context, OrFail, assert_each, assert_eq, fail, skip};
use crate::fixture::{Hmm, Hmm2, hmm_is_coherent_type};

/// `m[i]` of a snapshot, for messages.
fn m(buffer: &Buffer) -> impl Fn(usize) -> ProtByte + '_ {
    |i| ProtByte(buffer.mirror[i])
}

/// Compares every byte of a snapshot with `want`, reporting each one that
/// differs (`ASSERT_EQ(m[i], …)` for each `i`).
fn assert_snapshot(buffer: &Buffer, want: &[u8]) -> Check {
    let differ: Vec<String> = want
        .iter()
        .enumerate()
        .filter(|&(i, &w)| buffer.mirror[i] != w)
        .map(|(i, &w)| {
            format!(
                "m[{i}]: expected {:?}, got {:?}",
                ProtByte(w),
                ProtByte(buffer.mirror[i])
            )
        })
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(fail(format!("snapshot: {}", differ.join("; "))))
    }
}

/// Test memory snapshot without faulting in pages accessed by the device:
/// a mapping of the device's own memory (a `VM_MIXEDMAP` VMA in the kernel).
pub(crate) fn mixedmap(hmm: &Hmm) -> Check {
    let npages = 1;

    // Map the device's memory through its fd, MAP_PRIVATE.
    let ptr = hmm
        .fd
        .mmap(npages, Prot::READ | Prot::WRITE)
        .or_fail("mmap of the dmirror fd")?;
    let mut buffer = Buffer::new(ptr, npages);

    // Simulate a device snapshotting CPU pagetables.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Snapshot, &mut buffer, npages);
    assert_cmd(Request::Snapshot, &ret, &buffer, npages, None)?;

    // Check what the device saw.
    assert_eq("m[0]", m(&buffer)(0), ProtByte(HMM_DMIRROR_PROT_READ))
}

/// Test memory snapshot without faulting in pages accessed by the device:
/// one page of each kind, seen through device 0, with page 5 in device 0's
/// memory and page 6 in device 1's.
pub(crate) fn snapshot(hmm2: &Hmm2) -> Check {
    let npages = 7;
    let size = npages << hmm2.page_shift;
    let page_ints = (hmm2.page_size / 4) as usize;
    let migrate = Request::MigrateToDev;

    // Reserve a range of addresses. The C mallocs `npages` bytes of mirror
    // and lets the two migrations below copy a page each into it; here the
    // mirror has room for that page, and the snapshot uses its first
    // `npages` bytes.
    let ptr = Mapping::anonymous(size, PROT_NONE).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let p = buffer.ptr.addr();
    let page = |k| buffer.ptr.pages(k, 1);

    // Punch a hole after the first page address.
    buffer.ptr.unmap_part(page(1)).or_fail("munmap(page 1)")?;

    // Page 2 will be read-only zero page.
    mprotect(page(2), Prot::READ).or_fail("mprotect(page 2, PROT_READ)")?;
    let val = buffer.ptr_int(2 * page_ints) + 3;
    assert_eq("val (page 2 read + 3)", val, 3)?;

    // Page 3 will be read-only.
    mprotect(page(3), Prot::READ | Prot::WRITE)
        .or_fail("mprotect(page 3, PROT_READ | PROT_WRITE)")?;
    buffer.set_ptr_int(3 * page_ints, val);
    mprotect(page(3), Prot::READ).or_fail("mprotect(page 3, PROT_READ)")?;

    // Page 4-6 will be read-write.
    mprotect(buffer.ptr.pages(4, 3), Prot::READ | Prot::WRITE)
        .or_fail("mprotect(pages 4-6, PROT_READ | PROT_WRITE)")?;
    buffer.set_ptr_int(4 * page_ints, val);

    let (page5, page6) = (page(5).start(), page(6).start());

    // Page 5 will be migrated to device 0.
    let ret = hmm_dmirror_cmd_at(&hmm2.fd0, migrate, &mut buffer, page5, 1);
    assert_cmd(migrate, &ret, &buffer, 1, None).context("page 5 to device 0")?;

    // Page 6 will be migrated to device 1.
    let ret = hmm_dmirror_cmd_at(&hmm2.fd1, migrate, &mut buffer, page6, 1);
    assert_cmd(migrate, &ret, &buffer, 1, None).context("page 6 to device 1")?;

    // Simulate a device snapshotting CPU pagetables.
    let ret = hmm_dmirror_cmd_at(&hmm2.fd0, Request::Snapshot, &mut buffer, p, npages);
    assert_cmd(Request::Snapshot, &ret, &buffer, npages, None)?;

    // Check what the device saw.
    let (m5, m6) = if hmm_is_coherent_type(hmm2.device_number0) {
        (
            HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE,
            HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE,
        )
    } else {
        (
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE,
            // Device 1's page is a device-private entry of another owner:
            // with no fault requested it reads as not present.
            HMM_DMIRROR_PROT_NONE,
        )
    };
    assert_snapshot(
        &buffer,
        &[
            // A VMA without VM_READ.
            HMM_DMIRROR_PROT_ERROR,
            // No VMA.
            HMM_DMIRROR_PROT_ERROR,
            HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ,
            HMM_DMIRROR_PROT_READ,
            HMM_DMIRROR_PROT_WRITE,
            m5,
            m6,
        ],
    )
}

/// Test the `hmm_range_fault()` handling of large pages (PMD or PUD) that
/// should be mapped by a large page table entry.
///
/// The kernel expects `PMD` with the usual 2 MiB default huge page; the
/// level expected here follows the default huge page size, so a 1 GiB
/// default expects `PUD`.
pub(crate) fn compound(hmm: &Hmm) -> Check {
    // Skip test if we can't allocate a hugetlbfs page.
    let (ptr, hsize) = hugetlb_mapping()?;
    let level = match hsize {
        s if s == 1 << PMD_SHIFT => HMM_DMIRROR_PROT_PMD,
        s if s == 1 << PUD_SHIFT => HMM_DMIRROR_PROT_PUD,
        s => {
            return Err(skip(format!(
                "the default huge page size {s} is neither a PMD nor a PUD"
            )));
        }
    };
    let npages = ptr.len() >> hmm.page_shift;
    let mut buffer = Buffer::new(ptr, npages);
    let n = buffer.ints();

    // Initialize the pages the device will snapshot in buffer->ptr.
    buffer.fill_ptr(0..n, int);

    // Simulate a device snapshotting CPU pagetables.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Snapshot, &mut buffer, npages);
    assert_cmd(Request::Snapshot, &ret, &buffer, npages, None)?;

    // Check what the device saw.
    let want = ProtByte(HMM_DMIRROR_PROT_WRITE | level);
    assert_each("m", 0..npages as usize, 1, m(&buffer), |_| want)?;

    // Make the region read-only.
    mprotect(buffer.ptr.range(), Prot::READ).or_fail("mprotect(PROT_READ)")?;

    // Simulate a device snapshotting CPU pagetables.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Snapshot, &mut buffer, npages);
    assert_cmd(Request::Snapshot, &ret, &buffer, npages, None)?;

    // Check what the device saw.
    let want = ProtByte(HMM_DMIRROR_PROT_READ | level);
    assert_each("m", 0..npages as usize, 1, m(&buffer), |_| want)
}
