//! The ported tests of `tools/testing/selftests/mm/hmm-tests.c`, one
//! function per `TEST_F`, named as the kernel names it.
//!
//! Each body takes its fixture ([`Hmm`] or [`Hmm2`]) and returns
//! [`Check`]; the `?` after each assertion is the C's `ASSERT_*`. The
//! registry runs every test once per fixture variant.
//!
//! - [`anon`]: device reads and writes of private and shared anonymous
//!   memory, across `fork`, THP and hugetlb (tests 2–9 and 18).
//! - [`exclusive`](mod@exclusive): exclusive (atomic) device access, revoked
//!   by a CPU access, and a device write after the CPU made the pages
//!   read-only (24, 25).
//! - [`file`](mod@file): device reads and writes of a shared file mapping
//!   (10, 11).
//! - [`migrate`](mod@migrate): migration of anonymous memory to
//!   device-private memory and back, by command, by CPU fault and by
//!   releasing the device's memory (12–17), and the device-private THP
//!   migrations of the mm tree (`migrate_anon_huge_*`).
//! - [`snapshot`](mod@snapshot): what the device sees without faulting,
//!   device pages included (20–22).
//!
//! Not here yet: `anon_teardown`, `double_map`, `exclusive_cow`,
//! `hmm_gup_test`, `hmm_cow_in_device`, and the mm tree's
//! `migrate_partial_unmap_fault`, `migrate_remap_fault` and
//! `benchmark_thp_migration`.

pub(crate) mod anon;
pub(crate) mod exclusive;
pub(crate) mod file;
pub(crate) mod migrate;
pub(crate) mod snapshot;

use core::fmt;
use std::fs::File;
use std::io::Read;

use hmm::os::mm::{Mapping, Prot, default_hugetlb_size};
use hmm::os::process::{ChildExit, fork_and_wait};

pub(crate) use anon::{
    anon_read, anon_read_multiple, anon_read_prot, anon_write, anon_write_child,
    anon_write_child_shared, anon_write_huge, anon_write_hugetlbfs, anon_write_prot,
};
pub(crate) use exclusive::{exclusive, exclusive_cow, exclusive_mprotect};
pub(crate) use file::{file_read, file_write};
pub(crate) use migrate::{
    migrate, migrate_anon_huge_empty, migrate_anon_huge_err, migrate_anon_huge_fault,
    migrate_anon_huge_free, migrate_anon_huge_zero, migrate_anon_huge_zero_err, migrate_fault,
    migrate_mixed, migrate_multiple, migrate_release, migrate_shared,
};
pub(crate) use snapshot::{compound, mixedmap, snapshot};

use crate::buffer::{Buffer, HMM_BUFFER_SIZE, Request, TWOMEG, align};
use crate::check::{Check, OrFail, assert_eq, assert_ret, fail, skip};
use crate::fixture::Hmm;

/// The most of a child's failure message that comes back to the parent; one
/// pipe write of at most `PIPE_BUF` bytes never blocks on an empty pipe.
const CHILD_MESSAGE_MAX: usize = 4000;

/// Simple NULL test of device open/close: the fixture's setup and teardown
/// must succeed.
pub(crate) fn open_close(_hmm: &Hmm) -> Check {
    Ok(())
}

/// `npages = ALIGN(HMM_BUFFER_SIZE, self->page_size) >> self->page_shift;
/// ASSERT_NE(npages, 0); size = npages << self->page_shift;`: the default
/// buffer's pages and bytes.
pub(crate) fn hmm_buffer_pages(hmm: &Hmm) -> Check<(u64, u64)> {
    let npages = align(HMM_BUFFER_SIZE, hmm.page_size) >> hmm.page_shift;
    if npages == 0 {
        return Err(fail("npages: expected non-zero, got 0"));
    }
    Ok((npages, npages << hmm.page_shift))
}

/// The three checks after a successful command: `ASSERT_EQ(ret, 0)`,
/// `ASSERT_EQ(buffer->cpages, cpages)` and, when given,
/// `ASSERT_EQ(buffer->faults, faults)`.
pub(crate) fn assert_cmd(
    request: Request,
    ret: &hmm::Result<()>,
    buffer: &Buffer,
    cpages: u64,
    faults: Option<u64>,
) -> Check {
    let name = request.name();
    assert_ret(name, ret, 0)?;
    assert_eq(
        format_args!("{name}: buffer->cpages"),
        buffer.cpages,
        cpages,
    )?;
    if let Some(faults) = faults {
        assert_eq(
            format_args!("{name}: buffer->faults"),
            buffer.faults,
            faults,
        )?;
    }
    Ok(())
}

/// `fork()`; the child runs `child` and exits 0 when it passes. The parent
/// waits, and fails unless the child exited 0; a child's failure message
/// comes back through a pipe.
///
/// The kernel test only asserts `WIFEXITED`; requiring status 0 makes the
/// child's assertions count.
pub(crate) fn fork_child(child: impl FnOnce() -> Check) -> Check {
    let (reader, writer) = rustix::pipe::pipe().or_fail("pipe")?;
    let exit = fork_and_wait(|| match child() {
        Ok(()) => 0,
        Err(stop) => {
            let msg = stop.to_string();
            let mut end = msg.len().min(CHILD_MESSAGE_MAX);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            // Nothing more to do if the parent cannot hear: the status says it failed.
            let _ = rustix::io::write(&writer, &msg.as_bytes()[..end]);
            1
        }
    })
    .or_fail("fork")?;
    drop(writer);
    let mut msg = String::new();
    // The message is an aid; the exit status decides.
    let _ = File::from(reader).read_to_string(&mut msg);
    match exit {
        ChildExit::Code(0) => Ok(()),
        ChildExit::Code(1) if !msg.is_empty() => Err(fail(format!("in the child: {msg}"))),
        ChildExit::Code(code) => Err(fail(format!(
            "the child exited with status {code} (101 is a panic; see stderr)"
        ))),
        ChildExit::Signal(signal) => Err(fail(format!("the child was killed by signal {signal}"))),
    }
}

/// The hugetlb mapping of `anon_write_hugetlbfs` and `compound`:
/// `ALIGN(TWOMEG, default_hsize)` bytes of `MAP_HUGETLB`, read-write.
/// Returns the mapping and the huge page size.
///
/// Skips when the default huge page size is unknown or the pool cannot
/// back the mapping ("Huge page could not be allocated").
pub(crate) fn hugetlb_mapping() -> Check<(Mapping, u64)> {
    let hsize = default_hugetlb_size().ok_or_else(|| {
        skip("Huge page size could not be determined (no Hugepagesize in /proc/meminfo)")
    })?;
    let size = align(TWOMEG, hsize);
    let map = Mapping::hugetlb(size, Prot::READ | Prot::WRITE).map_err(|e| {
        skip(format!(
            "Huge page could not be allocated: mmap(MAP_HUGETLB) of {size} bytes failed: {e}; \
             reserve huge pages with `echo 1 > /proc/sys/vm/nr_hugepages`"
        ))
    })?;
    Ok((map, hsize))
}

/// A snapshot byte (`HMM_DMIRROR_PROT_*`), printed with its parts' names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProtByte(pub u8);

impl fmt::Debug for ProtByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use hmm::testdev::*;
        let b = self.0;
        write!(f, "{b:#04x} (")?;
        if b == HMM_DMIRROR_PROT_ERROR {
            return f.write_str("ERROR)");
        }
        if b == HMM_DMIRROR_PROT_NONE {
            return f.write_str("NONE)");
        }
        let mut parts = Vec::new();
        match b & 0xF0 {
            0 => {}
            HMM_DMIRROR_PROT_ZERO => parts.push("ZERO"),
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL => parts.push("DEV_PRIVATE_LOCAL"),
            HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE => parts.push("DEV_PRIVATE_REMOTE"),
            HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL => parts.push("DEV_COHERENT_LOCAL"),
            HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE => parts.push("DEV_COHERENT_REMOTE"),
            _ => parts.push("?"),
        }
        for (bit, name) in [
            (HMM_DMIRROR_PROT_READ, "READ"),
            (HMM_DMIRROR_PROT_WRITE, "WRITE"),
            (HMM_DMIRROR_PROT_PMD, "PMD"),
            (HMM_DMIRROR_PROT_PUD, "PUD"),
        ] {
            if b & bit != 0 {
                parts.push(name);
            }
        }
        write!(f, "{})", parts.join("|"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_bytes_print_their_parts() {
        let p = |b| format!("{:?}", ProtByte(b));
        assert_eq!(p(0xFF), "0xff (ERROR)");
        assert_eq!(p(0x00), "0x00 (NONE)");
        assert_eq!(p(0x11), "0x11 (ZERO|READ)");
        assert_eq!(p(0x06), "0x06 (WRITE|PMD)");
        assert_eq!(p(0x22), "0x22 (DEV_PRIVATE_LOCAL|WRITE)");
    }

    #[test]
    fn a_failing_child_fails_the_parent_with_its_message() {
        assert_eq!(fork_child(|| Ok(())), Ok(()));
        assert_eq!(
            fork_child(|| Err(fail("ptr[3] differs"))),
            Err(fail("in the child: ptr[3] differs"))
        );
        let aborts = || {
            // No core file for an abort that is the point of the test.
            let mut limit = rustix::process::getrlimit(rustix::process::Resource::Core);
            limit.current = Some(0);
            let _ = rustix::process::setrlimit(rustix::process::Resource::Core, limit);
            std::process::abort()
        };
        let Err(crate::check::Stop::Fail(why)) = fork_child(aborts) else {
            panic!("an aborted child must fail");
        };
        assert!(why.contains("signal 6"), "{why}");
    }
}
