//! Migration to device memory and back: `migrate` … `migrate_multiple` of
//! `hmm-tests.c` (tests 12–17), and the device-private THP tests of the mm
//! tree (`migrate_anon_huge_*`).
//!
//! The THP tests map twice the PMD size, advise `MADV_HUGEPAGE` on the
//! PMD-aligned, PMD-sized part of it and migrate that. The software device
//! has no huge device pages, so the library splits the huge page and
//! migrates it page by page; what the tests check (every command's result
//! and the data the device and the CPU see) does not depend on that.

use hmm::VirtAddr;
use hmm::addr::VaRange;
use hmm::os::mm::{Mapping, PROT_NONE, Prot, hugepage, mprotect};
use hmm::testdev::{Dmirror, HMM_DMIRROR_FLAG_FAIL_ALLOC};

use super::{assert_cmd, hmm_buffer_pages};
use crate::buffer::{
    Buffer, INTS_PER_PAGE, NTIMES, Request, align, hmm_dmirror_cmd, hmm_dmirror_cmd_at,
    hmm_migrate_dev_to_sys, hmm_migrate_sys_to_dev, int, read_pmd_pagesize,
};
use crate::check::{
    Check, Context, EINVAL, ENOENT, OrFail, assert_each, assert_eq, assert_ret, fail, skip,
};
use crate::fixture::{Hmm, Hmm2, hmm_is_coherent_type};

const RW: Prot = Prot::READ.union(Prot::WRITE);

/// The common start of `migrate`, `migrate_fault` and `migrate_release`: a
/// private anonymous read-write buffer of `HMM_BUFFER_SIZE` holding `i`,
/// migrated to the device (`ASSERT_EQ(ret, 0)`, `ASSERT_EQ(buffer->cpages,
/// npages)`), and the check of what the device read. Returns the buffer
/// and `npages`.
fn migrated_buffer(hmm: &Hmm) -> Check<(Buffer, u64)> {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize buffer in system memory.
    buffer.fill_ptr(0..n, int);

    // Migrate memory to device.
    let ret = hmm_migrate_sys_to_dev(&hmm.fd, &mut buffer, npages);
    assert_cmd(Request::MigrateToDev, &ret, &buffer, npages, None)?;

    // Check what the device read.
    assert_each("mirror", 0..n, INTS_PER_PAGE, |i| buffer.mirror_int(i), int)?;
    Ok((buffer, npages))
}

/// Migrate anonymous memory to device private memory.
pub(crate) fn migrate(hmm: &Hmm) -> Check {
    migrated_buffer(hmm).map(drop)
}

/// Migrate anonymous memory to device private memory and fault some of it
/// back to system memory, then try migrating the resulting mix of system
/// and device private memory to the device.
pub(crate) fn migrate_fault(hmm: &Hmm) -> Check {
    let (mut buffer, npages) = migrated_buffer(hmm)?;
    let n = buffer.ints();

    // Fault half the pages back to system memory and check them.
    assert_each("ptr", 0..n / 2, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)?;

    // Migrate memory to the device again.
    let ret = hmm_migrate_sys_to_dev(&hmm.fd, &mut buffer, npages);
    assert_cmd(Request::MigrateToDev, &ret, &buffer, npages, None).context("second migration")?;

    // Check what the device read.
    assert_each(
        "second migration: mirror",
        0..n,
        INTS_PER_PAGE,
        |i| buffer.mirror_int(i),
        int,
    )
}

/// Migrate anonymous memory to device memory, release the device's memory
/// (which evicts it back to system memory), and read it with the CPU.
pub(crate) fn migrate_release(hmm: &Hmm) -> Check {
    let (mut buffer, npages) = migrated_buffer(hmm)?;
    let n = buffer.ints();

    // Release device memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Release, &mut buffer, npages);
    assert_ret(Request::Release.name(), &ret, 0)?;

    // Fault pages back to system memory and check them.
    assert_each("ptr", 0..n / 2, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)
}

/// Migrate anonymous shared memory to device private memory.
///
/// Migration refuses shared (shmem) pages, so the read-back after it finds
/// no device page: `-ENOENT`.
pub(crate) fn migrate_shared(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let ptr = Mapping::shared_anonymous(size, RW).or_fail("mmap(MAP_SHARED | MAP_ANONYMOUS)")?;
    let mut buffer = Buffer::new(ptr, size);

    // Migrate memory to device.
    let ret = hmm_migrate_sys_to_dev(&hmm.fd, &mut buffer, npages);
    assert_ret(Request::MigrateToDev.name(), &ret, -ENOENT)
}

/// Try to migrate various memory types to device private memory.
pub(crate) fn migrate_mixed(hmm2: &Hmm2) -> Check {
    let npages = 6;
    let size = npages << hmm2.page_shift;
    let page_ints = (hmm2.page_size / 4) as usize;
    let migrate = Request::MigrateToDev;

    // Reserve a range of addresses.
    let ptr = Mapping::anonymous(size, PROT_NONE).or_fail("mmap")?;
    let mut buffer = Buffer::new(ptr, size);
    let p = buffer.ptr.addr();
    let page = |k: u64| VirtAddr(p.get() + (k << hmm2.page_shift));

    // Migrating a protected area should be an error.
    let ret = hmm_migrate_sys_to_dev(&hmm2.fd1, &mut buffer, npages);
    assert_ret(migrate.name(), &ret, -EINVAL).context("PROT_NONE")?;

    // Punch a hole after the first page address.
    buffer
        .ptr
        .unmap_part(buffer.ptr.pages(1, 1))
        .or_fail("munmap(page 1)")?;

    // We expect an error if the vma doesn't cover the range.
    let ret = hmm_migrate_sys_to_dev(&hmm2.fd1, &mut buffer, 3);
    assert_ret(migrate.name(), &ret, -EINVAL).context("hole at page 1")?;

    // Page 2 will be a read-only zero page.
    mprotect(buffer.ptr.pages(2, 1), Prot::READ).or_fail("mprotect(page 2, PROT_READ)")?;
    let val = buffer.ptr_int(2 * page_ints) + 3;
    assert_eq("val (page 2 read + 3)", val, 3)?;

    // Page 3 will be read-only.
    mprotect(buffer.ptr.pages(3, 1), RW).or_fail("mprotect(page 3, PROT_READ | PROT_WRITE)")?;
    buffer.set_ptr_int(3 * page_ints, val);
    mprotect(buffer.ptr.pages(3, 1), Prot::READ).or_fail("mprotect(page 3, PROT_READ)")?;

    // Page 4-5 will be read-write.
    mprotect(buffer.ptr.pages(4, 2), RW).or_fail("mprotect(pages 4-5, PROT_READ | PROT_WRITE)")?;
    buffer.set_ptr_int(4 * page_ints, val);
    buffer.set_ptr_int(5 * page_ints, val);

    // Now try to migrate pages 2-5 to device 1.
    let ret = hmm_dmirror_cmd_at(&hmm2.fd1, migrate, &mut buffer, page(2), 4);
    assert_cmd(migrate, &ret, &buffer, 4, None).context("pages 2-5 to device 1")?;

    // Page 5 won't be migrated to device 0 because it's on device 1.
    let ret = hmm_dmirror_cmd_at(&hmm2.fd0, migrate, &mut buffer, page(5), 1);
    assert_ret(migrate.name(), &ret, -ENOENT).context("page 5 to device 0")
}

/// Migrate anonymous memory to device memory and back to system memory
/// multiple times. In case of private zone configuration, this is done
/// through fault pages accessed by CPU. In case of coherent zone
/// configuration, the pages from the device should be explicitly migrated
/// back to system memory. The reason is Coherent device zone has coherent
/// access by CPU, therefore it will not generate any page fault.
pub(crate) fn migrate_multiple(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    for c in 0..NTIMES {
        let ptr = Mapping::anonymous(size, RW).or_fail("mmap")?;
        let mut buffer = Buffer::new(ptr, size);
        let n = buffer.ints();
        let at = format!("iteration {c}");

        // Initialize buffer in system memory.
        buffer.fill_ptr(0..n, int);

        // Migrate memory to device.
        let ret = hmm_migrate_sys_to_dev(&hmm.fd, &mut buffer, npages);
        assert_cmd(Request::MigrateToDev, &ret, &buffer, npages, None).context(&at)?;

        // Check what the device read.
        assert_each(
            &format!("{at}: mirror"),
            0..n,
            INTS_PER_PAGE,
            |i| buffer.mirror_int(i),
            int,
        )?;

        // Migrate back to system memory and check them.
        if hmm_is_coherent_type(hmm.device_number) {
            let ret = hmm_migrate_dev_to_sys(&hmm.fd, &mut buffer, npages);
            assert_cmd(Request::MigrateToSys, &ret, &buffer, npages, None).context(&at)?;
        }

        assert_each(
            &format!("{at}: ptr"),
            0..n,
            INTS_PER_PAGE,
            |i| buffer.ptr_int(i),
            int,
        )?;
    }
    Ok(())
}

/// The buffer of the device-private THP tests: `buffer->ptr = old_ptr`, a
/// private anonymous mapping of twice the PMD size, and `map`, the
/// PMD-aligned PMD-sized part of it, advised `MADV_HUGEPAGE`, where the
/// commands run.
#[derive(Debug)]
struct HugeBuffer {
    /// The whole mapping (`old_ptr`, `buffer->size = 2 * size`) and the mirror.
    buffer: Buffer,
    /// `map = ALIGN(old_ptr, size)`.
    map: VirtAddr,
    /// `size`: the PMD size.
    size: u64,
}

impl HugeBuffer {
    /// `size` from `read_pmd_pagesize()`; skips without THP.
    fn pmd_size() -> Check<u64> {
        read_pmd_pagesize()
            .map_err(|e| skip(format!("transparent huge pages are not available: {e}")))
    }

    /// `mmap(NULL, 2 * size, prot, MAP_PRIVATE | MAP_ANONYMOUS)`, `map =
    /// ALIGN(old_ptr, size)`, `madvise(map, size, MADV_HUGEPAGE)`, with a
    /// mirror of `mirror_len` bytes set to `0xFF` (`memset(buffer->mirror,
    /// 0xFF, …)`).
    fn new(size: u64, prot: Prot, mirror_len: u64) -> Check<Self> {
        let (ptr, map) = Self::map(size, prot)?;
        let mut buffer = Buffer::new(ptr, mirror_len);
        buffer.mirror.fill(0xFF);
        Ok(HugeBuffer { buffer, map, size })
    }

    /// The mapping and its aligned, huge-page-advised half.
    fn map(size: u64, prot: Prot) -> Check<(Mapping, VirtAddr)> {
        let old_ptr = Mapping::anonymous(2 * size, prot).or_fail("mmap")?;
        let map = VirtAddr(align(old_ptr.addr().get(), size));
        let range = VaRange::from_len(map, size).or_fail("ALIGN(old_ptr, size)")?;
        hugepage(range, true).or_fail("madvise(MADV_HUGEPAGE)")?;
        Ok((old_ptr, map))
    }

    /// "unmap and remap the region to reset things": `munmap(old_ptr, 2 *
    /// size)`, then a fresh mapping as [`HugeBuffer::new`] makes; the mirror
    /// is kept.
    fn remap(&mut self, prot: Prot) -> Check {
        let ptr = &self.buffer.ptr;
        ptr.unmap_part(ptr.range()).or_fail("munmap(old_ptr)")?;
        let (ptr, map) = Self::map(self.size, prot)?;
        // The old mapping is all unmapped: dropping it unmaps nothing more.
        self.buffer.ptr = ptr;
        self.map = map;
        Ok(())
    }

    /// `npages = size >> page_shift`.
    fn npages(&self) -> u64 {
        self.size >> hmm::PAGE_SHIFT
    }

    /// `size / sizeof(int)`: the `int`s of `map`.
    fn ints(&self) -> usize {
        (self.size / 4) as usize
    }

    /// The index in `buffer.ptr` of `map`'s `int` `i`.
    fn index(&self, i: usize) -> usize {
        ((self.map.get() - self.buffer.ptr.addr().get()) / 4) as usize + i
    }

    /// `((int *)map)[i]`, read by the CPU.
    fn ptr_int(&self, i: usize) -> i32 {
        self.buffer.ptr_int(self.index(i))
    }

    /// `((int *)map)[i] = v`, written by the CPU.
    fn set_ptr_int(&self, i: usize, v: i32) {
        self.buffer.set_ptr_int(self.index(i), v);
    }

    /// `hmm_dmirror_cmd(fd, request, buffer, npages)` with `buffer->ptr = map`.
    fn cmd(&mut self, fd: &Dmirror, request: Request, npages: u64) -> hmm::Result<()> {
        hmm_dmirror_cmd_at(fd, request, &mut self.buffer, self.map, npages)
    }

    /// `HMM_DMIRROR_FLAGS` with `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the device's
    /// next (huge) allocation fails. `ASSERT_EQ(ret, 0)`.
    fn fail_alloc(&mut self, fd: &Dmirror) -> Check {
        let ret = self.cmd(fd, Request::Flags, HMM_DMIRROR_FLAG_FAIL_ALLOC);
        assert_ret(Request::Flags.name(), &ret, 0)
    }

    /// `HMM_DMIRROR_MIGRATE_TO_DEV` of `map`, with `ASSERT_EQ(ret, 0)` and
    /// `ASSERT_EQ(buffer->cpages, npages)`.
    fn migrate_to_dev(&mut self, fd: &Dmirror) -> Check {
        let npages = self.npages();
        let ret = self.cmd(fd, Request::MigrateToDev, npages);
        assert_cmd(Request::MigrateToDev, &ret, &self.buffer, npages, None)
    }

    /// `for (i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(mirror[i], want(i))`.
    fn assert_mirror(&self, want: impl Fn(usize) -> i32) -> Check {
        assert_each(
            "mirror",
            0..self.ints(),
            INTS_PER_PAGE,
            |i| self.buffer.mirror_int(i),
            want,
        )
    }

    /// `for (i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(ptr[i], want(i))`
    /// over `map`, read by the CPU (faulting device pages back).
    fn assert_ptr(&self, want: impl Fn(usize) -> i32) -> Check {
        assert_each(
            "ptr",
            0..self.ints(),
            INTS_PER_PAGE,
            |i| self.ptr_int(i),
            want,
        )
    }
}

/// Migrate private anonymous huge empty page.
pub(crate) fn migrate_anon_huge_empty(hmm: &Hmm) -> Check {
    let size = HugeBuffer::pmd_size()?;
    let mut buffer = HugeBuffer::new(size, Prot::READ, size)?;

    // Migrate memory to device.
    buffer.migrate_to_dev(&hmm.fd)?;

    // Check what the device read.
    buffer.assert_mirror(|_| 0)
}

/// Migrate private anonymous huge zero page.
pub(crate) fn migrate_anon_huge_zero(hmm: &Hmm) -> Check {
    let size = HugeBuffer::pmd_size()?;
    let mut buffer = HugeBuffer::new(size, Prot::READ, size)?;

    // Initialize a read-only zero huge page.
    assert_eq("CPU read of map[0]", buffer.ptr_int(0), 0)?;

    // Migrate memory to device.
    buffer.migrate_to_dev(&hmm.fd)?;

    // Check what the device read.
    buffer.assert_mirror(|_| 0)?;

    // Fault pages back to system memory and check them.
    buffer.assert_ptr(|_| 0)
}

/// Migrate private anonymous huge page and free.
pub(crate) fn migrate_anon_huge_free(hmm: &Hmm) -> Check {
    let size = HugeBuffer::pmd_size()?;
    let mut buffer = HugeBuffer::new(size, RW, size)?;

    // Initialize buffer in system memory.
    for i in 0..buffer.ints() {
        buffer.set_ptr_int(i, int(i));
    }

    // Migrate memory to device.
    buffer.migrate_to_dev(&hmm.fd)?;

    // Check what the device read.
    buffer.assert_mirror(int)?;

    // Try freeing it.
    let range = VaRange::from_len(buffer.map, size).or_fail("map")?;
    hmm::os::mm::free(range).map_err(|e| fail(format!("madvise(MADV_FREE): expected 0, got {e}")))
}

/// Migrate private anonymous huge page and fault back to sysmem.
pub(crate) fn migrate_anon_huge_fault(hmm: &Hmm) -> Check {
    let size = HugeBuffer::pmd_size()?;
    let mut buffer = HugeBuffer::new(size, RW, size)?;

    // Initialize buffer in system memory.
    for i in 0..buffer.ints() {
        buffer.set_ptr_int(i, int(i));
    }

    // Migrate memory to device.
    buffer.migrate_to_dev(&hmm.fd)?;

    // Check what the device read.
    buffer.assert_mirror(int)?;

    // Fault pages back to system memory and check them.
    buffer.assert_ptr(int)
}

/// Migrate private anonymous huge page with allocation errors.
pub(crate) fn migrate_anon_huge_err(hmm: &Hmm) -> Check {
    let size = HugeBuffer::pmd_size()?;
    let mut buffer = HugeBuffer::new(size, RW, 2 * size)?;
    let npages = buffer.npages();

    // Initialize buffer in system memory.
    for i in 0..buffer.ints() {
        buffer.set_ptr_int(i, int(i));
    }

    // Migrate memory to device but force a THP allocation error.
    buffer.fail_alloc(&hmm.fd)?;
    buffer.migrate_to_dev(&hmm.fd)?;

    // Check what the device read.
    buffer.assert_mirror(int)?;

    // Try faulting back a single (PAGE_SIZE) page.
    assert_eq("ptr[2048]", buffer.ptr_int(2048), 2048)?;

    // unmap and remap the region to reset things.
    buffer.remap(RW)?;

    // Initialize buffer in system memory.
    for i in 0..buffer.ints() {
        buffer.set_ptr_int(i, int(i));
    }

    // Migrate THP to device.
    buffer.migrate_to_dev(&hmm.fd).context("after the remap")?;

    // Force an allocation error when faulting back a THP resident in the
    // device.
    buffer.fail_alloc(&hmm.fd)?;

    let ret = buffer.cmd(&hmm.fd, Request::MigrateToSys, npages);
    assert_ret(Request::MigrateToSys.name(), &ret, 0)?;
    assert_eq("after the remap: ptr[2048]", buffer.ptr_int(2048), 2048)
}

/// Migrate private anonymous huge zero page with allocation errors.
pub(crate) fn migrate_anon_huge_zero_err(hmm: &Hmm) -> Check {
    let size = HugeBuffer::pmd_size()?;
    let mut buffer = HugeBuffer::new(size, Prot::READ, 2 * size)?;

    // Migrate memory to device but force a THP allocation error.
    buffer.fail_alloc(&hmm.fd)?;
    buffer.migrate_to_dev(&hmm.fd)?;

    // Check what the device read.
    buffer.assert_mirror(|_| 0)?;

    // Try faulting back a single (PAGE_SIZE) page.
    assert_eq("ptr[2048]", buffer.ptr_int(2048), 0)?;

    // unmap and remap the region to reset things.
    buffer.remap(Prot::READ)?;

    // Initialize buffer in system memory (zero THP page). The C reads
    // through the pointer to the old mapping, which the new one normally
    // reuses; the new mapping is what is meant.
    assert_eq("after the remap: ptr[0]", buffer.ptr_int(0), 0)?;

    // Migrate memory to device but force a THP allocation error.
    buffer.fail_alloc(&hmm.fd)?;
    buffer.migrate_to_dev(&hmm.fd).context("after the remap")?;

    // Fault the device memory back and check it.
    buffer.assert_ptr(|_| 0).context("after the remap")
}
