//! Device reads and writes of a shared file mapping: `file_read` and
//! `file_write` of `hmm-tests.c`.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use hmm::os::mm::{Mapping, Prot};

use super::{assert_cmd, hmm_buffer_pages};
use crate::buffer::{Buffer, INTS_PER_PAGE, Request, hmm_create_file, hmm_dmirror_cmd, int};
use crate::check::{Check, OrFail, assert_each};
use crate::fixture::Hmm;

/// `((int *)bytes)[i]`.
fn int_at(bytes: &[u8], i: usize) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[i * 4..i * 4 + 4]);
    i32::from_ne_bytes(b)
}

/// Read mmap'ed file memory.
pub(crate) fn file_read(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let file = hmm_create_file(size).or_fail("hmm_create_file")?;

    // Write initial contents of the file.
    let mut contents = vec![0u8; size as usize];
    for i in 0..contents.len() / 4 {
        contents[i * 4..i * 4 + 4].copy_from_slice(&int(i).to_ne_bytes());
    }
    file.write_all_at(&contents, 0).or_fail("pwrite")?;

    let ptr = Mapping::file(file.as_fd(), size, 0, Prot::READ, true)
        .or_fail("mmap(PROT_READ, MAP_SHARED)")?;
    let mut buffer = Buffer::new(ptr, size);
    // As the C's memset(buffer->mirror, 0, size) after the pwrite.
    buffer.mirror.fill(0);
    let n = buffer.ints();

    // Simulate a device reading system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Read, &mut buffer, npages);
    assert_cmd(Request::Read, &ret, &buffer, npages, Some(1))?;

    // Check what the device read.
    assert_each("mirror", 0..n, INTS_PER_PAGE, |i| buffer.mirror_int(i), int)
}

/// Write mmap'ed file memory.
pub(crate) fn file_write(hmm: &Hmm) -> Check {
    let (npages, size) = hmm_buffer_pages(hmm)?;
    let file = hmm_create_file(size).or_fail("hmm_create_file")?;
    let ptr = Mapping::file(file.as_fd(), size, 0, Prot::READ | Prot::WRITE, true)
        .or_fail("mmap(PROT_READ | PROT_WRITE, MAP_SHARED)")?;
    let mut buffer = Buffer::new(ptr, size);
    let n = buffer.ints();

    // Initialize data that the device will write to buffer->ptr.
    buffer.fill_mirror(n, int);

    // Simulate a device writing system memory.
    let ret = hmm_dmirror_cmd(&hmm.fd, Request::Write, &mut buffer, npages);
    assert_cmd(Request::Write, &ret, &buffer, npages, Some(1))?;

    // Check what the device wrote.
    assert_each("ptr", 0..n, INTS_PER_PAGE, |i| buffer.ptr_int(i), int)?;

    // Check that the device also wrote the file. (The C preads into the
    // mirror, which already holds the expected data; a fresh buffer makes
    // the check independent of it.)
    let mut contents = vec![0u8; size as usize];
    file.read_exact_at(&mut contents, 0).or_fail("pread")?;
    assert_each("file", 0..n, INTS_PER_PAGE, |i| int_at(&contents, i), int)
}
