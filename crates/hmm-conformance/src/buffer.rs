//! `struct hmm_buffer` and `hmm_dmirror_cmd()` of `hmm-tests.c`: the CPU
//! buffer a test maps, the mirror buffer the device reads into or writes
//! from, and the one call that runs a dmirror command on them.

use std::fs::File;
use std::io;

use hmm::VirtAddr;
use hmm::os::mm::Mapping;
use hmm::testdev::{Cmd, Dmirror};
use rustix::fs::{Mode, OFlags};

/// `HMM_BUFFER_SIZE`: 1024 pages of 4 KiB.
pub(crate) const HMM_BUFFER_SIZE: u64 = 1024 << 12;
/// `NTIMES`: iterations of the `_multiple` tests.
pub(crate) const NTIMES: u64 = 10;
/// `TWOMEG`.
pub(crate) const TWOMEG: u64 = 1 << 21;

/// `int`s to a page, for locating a differing element.
pub(crate) const INTS_PER_PAGE: usize = hmm::PAGE_SIZE as usize / 4;

/// What a byte of a mirror buffer holds before the device writes it.
///
/// The kernel test `malloc`s the mirror, leaving its contents undefined; a
/// fixed non-zero pattern makes "the device wrote 0 here" a real check.
const MIRROR_POISON: u8 = 0xA5;

/// `ALIGN(x, a)` for a power-of-two `a`.
pub(crate) const fn align(x: u64, a: u64) -> u64 {
    (x + (a - 1)) & !(a - 1)
}

/// `i` as the C tests store it in an `int` (`ptr[i] = i`).
pub(crate) fn int(i: usize) -> i32 {
    i as i32
}

/// `struct hmm_buffer`: the CPU side (`ptr`), the device side (`mirror`), and
/// the results of the last command (`cpages`, `faults`).
///
/// Dropping it unmaps `ptr` and frees `mirror`, as `hmm_buffer_free()`.
#[derive(Debug)]
pub(crate) struct Buffer {
    /// `buffer->ptr`: the mapping the device mirrors. Commands start at its
    /// first address.
    pub ptr: Mapping,
    /// `buffer->mirror`: what the device read, or what it will write.
    pub mirror: Vec<u8>,
    /// `buffer->size`: the length of `ptr` in bytes.
    pub size: u64,
    /// `buffer->cpages` of the last successful command.
    pub cpages: u64,
    /// `buffer->faults` of the last successful command.
    pub faults: u64,
}

impl Buffer {
    /// A buffer over `ptr` with a mirror of `mirror_len` bytes.
    pub fn new(ptr: Mapping, mirror_len: u64) -> Self {
        Buffer {
            size: ptr.len(),
            ptr,
            mirror: vec![MIRROR_POISON; mirror_len as usize],
            cpages: 0,
            faults: 0,
        }
    }

    /// `size / sizeof(int)`: how many `int`s `ptr` holds.
    pub fn ints(&self) -> usize {
        (self.size / 4) as usize
    }

    /// `((int *)buffer->ptr)[i]`, read by the CPU.
    pub fn ptr_int(&self, i: usize) -> i32 {
        self.ptr.read_i32(i)
    }

    /// `((int *)buffer->ptr)[i] = v`, written by the CPU.
    pub fn set_ptr_int(&self, i: usize, v: i32) {
        self.ptr.write_i32(i, v);
    }

    /// `((int *)buffer->mirror)[i]`.
    pub fn mirror_int(&self, i: usize) -> i32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.mirror[i * 4..i * 4 + 4]);
        i32::from_ne_bytes(b)
    }

    /// `((int *)buffer->mirror)[i] = v`.
    pub fn set_mirror_int(&mut self, i: usize, v: i32) {
        self.mirror[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }

    /// Fills the first `n` `int`s of the mirror with `f(i)`.
    pub fn fill_mirror(&mut self, n: usize, f: impl Fn(usize) -> i32) {
        for i in 0..n {
            self.set_mirror_int(i, f(i));
        }
    }

    /// Fills the `int`s `range` of `ptr` with `f(i)`, as the CPU.
    pub fn fill_ptr(&self, range: core::ops::Range<usize>, f: impl Fn(usize) -> i32) {
        for i in range {
            self.set_ptr_int(i, f(i));
        }
    }
}

/// The dmirror commands the ported tests use (`HMM_DMIRROR_*` of
/// `lib/test_hmm_uapi.h`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Request {
    /// `HMM_DMIRROR_READ`: the device reads `ptr` into `mirror`.
    Read,
    /// `HMM_DMIRROR_WRITE`: the device writes `mirror` into `ptr`.
    Write,
    /// `HMM_DMIRROR_MIGRATE_TO_DEV`: migrates `ptr` to the device's memory,
    /// then reads it back from there into `mirror`.
    MigrateToDev,
    /// `HMM_DMIRROR_MIGRATE_TO_SYS`: migrates the device's pages of `ptr`
    /// back to system memory.
    MigrateToSys,
    /// `HMM_DMIRROR_SNAPSHOT`: one status byte per page of `ptr` into `mirror`.
    Snapshot,
    /// `HMM_DMIRROR_EXCLUSIVE`: takes the pages of `ptr` from the CPU for
    /// the device's exclusive (atomic) access, then reads them into `mirror`.
    Exclusive,
    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: `-EPERM` while the device still holds
    /// any page of `ptr` for atomic access.
    CheckExclusive,
    /// `HMM_DMIRROR_RELEASE`: evicts all of the device's memory.
    Release,
    /// `HMM_DMIRROR_FLAGS`: `npages` carries the flags
    /// (`HMM_DMIRROR_FLAG_FAIL_ALLOC`).
    Flags,
}

impl Request {
    /// The kernel's name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Request::Read => "HMM_DMIRROR_READ",
            Request::Write => "HMM_DMIRROR_WRITE",
            Request::MigrateToDev => "HMM_DMIRROR_MIGRATE_TO_DEV",
            Request::MigrateToSys => "HMM_DMIRROR_MIGRATE_TO_SYS",
            Request::Snapshot => "HMM_DMIRROR_SNAPSHOT",
            Request::Exclusive => "HMM_DMIRROR_EXCLUSIVE",
            Request::CheckExclusive => "HMM_DMIRROR_CHECK_EXCLUSIVE",
            Request::Release => "HMM_DMIRROR_RELEASE",
            Request::Flags => "HMM_DMIRROR_FLAGS",
        }
    }
}

/// `hmm_dmirror_cmd(fd, request, buffer, npages)`: runs `request` over
/// `npages` pages from `buffer.ptr`, with `buffer.mirror` as the device side.
///
/// As in the C, `cpages` and `faults` are copied back only on success. (The
/// C loops on `EINTR`; the library's commands are not interruptible.)
///
/// # Errors
/// The command's error; compare [`hmm::Error::errno`] with the kernel's
/// `-errno`.
pub(crate) fn hmm_dmirror_cmd(
    fd: &Dmirror,
    request: Request,
    buffer: &mut Buffer,
    npages: u64,
) -> hmm::Result<()> {
    hmm_dmirror_cmd_at(fd, request, buffer, buffer.ptr.addr(), npages)
}

/// [`hmm_dmirror_cmd`] from `addr` instead of the start of `buffer.ptr`, for
/// the tests that move `buffer->ptr` into the middle of the mapping.
pub(crate) fn hmm_dmirror_cmd_at(
    fd: &Dmirror,
    request: Request,
    buffer: &mut Buffer,
    addr: VirtAddr,
    npages: u64,
) -> hmm::Result<()> {
    let cmd: Cmd = match request {
        Request::Read => fd.read(addr, npages, &mut buffer.mirror),
        Request::Write => fd.write(addr, npages, &buffer.mirror),
        Request::MigrateToDev => fd.migrate_to_dev(addr, npages, Some(&mut buffer.mirror)),
        Request::MigrateToSys => fd.migrate_to_sys(addr, npages),
        Request::Snapshot => fd.snapshot(addr, npages, &mut buffer.mirror),
        Request::Exclusive => fd.exclusive(addr, npages, Some(&mut buffer.mirror)),
        Request::CheckExclusive => fd.check_exclusive(addr, npages),
        // The ioctl zeroes cpages and faults before it dispatches and copies
        // them back on success.
        Request::Release => fd.release().map(|()| Cmd::default()),
        Request::Flags => {
            fd.set_flags(npages);
            Ok(Cmd::default())
        }
    }?;
    buffer.cpages = cmd.cpages;
    buffer.faults = cmd.faults;
    Ok(())
}

/// `hmm_migrate_sys_to_dev(fd, buffer, npages)`: `HMM_DMIRROR_MIGRATE_TO_DEV`
/// over `npages` from `buffer.ptr`.
///
/// # Errors
/// As [`hmm_dmirror_cmd`].
pub(crate) fn hmm_migrate_sys_to_dev(
    fd: &Dmirror,
    buffer: &mut Buffer,
    npages: u64,
) -> hmm::Result<()> {
    hmm_dmirror_cmd(fd, Request::MigrateToDev, buffer, npages)
}

/// `hmm_migrate_dev_to_sys(fd, buffer, npages)`: `HMM_DMIRROR_MIGRATE_TO_SYS`
/// over `npages` from `buffer.ptr`.
///
/// # Errors
/// As [`hmm_dmirror_cmd`].
pub(crate) fn hmm_migrate_dev_to_sys(
    fd: &Dmirror,
    buffer: &mut Buffer,
    npages: u64,
) -> hmm::Result<()> {
    hmm_dmirror_cmd(fd, Request::MigrateToSys, buffer, npages)
}

/// `hmm_create_file(size)`: an `O_TMPFILE` in `/tmp` of `size` bytes,
/// deleted on close.
///
/// # Errors
/// The `Errno` of `open(2)` or `ftruncate(2)`.
pub(crate) fn hmm_create_file(size: u64) -> io::Result<File> {
    let fd = rustix::fs::open(
        "/tmp",
        OFlags::TMPFILE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from(0o600),
    )?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file)
}

/// `read_pmd_pagesize()`: the THP size, from
/// `/sys/kernel/mm/transparent_hugepage/hpage_pmd_size`.
///
/// # Errors
/// When the file is missing (no THP) or does not hold a number.
pub(crate) fn read_pmd_pagesize() -> io::Result<u64> {
    const PATH: &str = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size";
    let text = std::fs::read_to_string(PATH)?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{PATH}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm::PAGE_SIZE;
    use hmm::os::mm::Prot;

    #[test]
    fn ints_of_both_sides() {
        let ptr = Mapping::anonymous(2 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        let mut b = Buffer::new(ptr, 2 * PAGE_SIZE);
        assert_eq!(b.ints(), 2048);
        assert_eq!(b.mirror_int(5), i32::from_ne_bytes([MIRROR_POISON; 4]));
        b.fill_mirror(b.ints(), |i| -(i as i32));
        b.fill_ptr(1..3, |i| i as i32 * 10);
        assert_eq!(b.mirror_int(2047), -2047);
        assert_eq!([b.ptr_int(0), b.ptr_int(1), b.ptr_int(2)], [0, 10, 20]);
    }

    #[test]
    fn align_and_sizes() {
        assert_eq!(align(TWOMEG, 1 << 30), 1 << 30);
        assert_eq!(align(TWOMEG, TWOMEG), TWOMEG);
        assert_eq!(align(1, 4096), 4096);
        assert_eq!(HMM_BUFFER_SIZE / PAGE_SIZE, 1024);
    }

    #[test]
    fn tmpfiles_have_their_size() {
        let f = hmm_create_file(3 * PAGE_SIZE).expect("O_TMPFILE in /tmp");
        assert_eq!(f.metadata().expect("fstat").len(), 3 * PAGE_SIZE);
    }
}
