//! The software test device, modelled on the kernel's dmirror
//! (`lib/test_hmm.c`, `lib/test_hmm_uapi.h`).
//!
//! Each [`Dmirror`] is one open of `/dev/hmm_dmirror<minor>`: its own device
//! page table (a [`Mirror`] over the whole address space) and the owner
//! identity of its [`Device`]. It offers the dmirror commands with the
//! ioctls' results (`cpages`, `faults`) and errors.
//!
//! The device reaches host memory by virtual address through
//! `process_vm_readv`/`writev` on its own process, so a page unmapped or
//! write-protected under it is an error, never a crash: the device drops the
//! entry and faults again, and the range fault then reports what the CPU
//! page table says (`-EFAULT`, `-EPERM`).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PUD_SHIFT, VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::mirror::{Mirror, MirrorOptions, Table};
use crate::mm::Mm;
use crate::notifier::OwnerId;
use crate::os::mm::{Mapping, Prot};
use crate::pfn::HmmPfn;

/// `HMM_DMIRROR_PROT_ERROR`: the page cannot be accessed.
pub const HMM_DMIRROR_PROT_ERROR: u8 = 0xFF;
/// `HMM_DMIRROR_PROT_NONE`: not mapped.
pub const HMM_DMIRROR_PROT_NONE: u8 = 0x00;
/// `HMM_DMIRROR_PROT_READ`.
pub const HMM_DMIRROR_PROT_READ: u8 = 0x01;
/// `HMM_DMIRROR_PROT_WRITE`.
pub const HMM_DMIRROR_PROT_WRITE: u8 = 0x02;
/// `HMM_DMIRROR_PROT_PMD`: mapped by the CPU with a PMD.
pub const HMM_DMIRROR_PROT_PMD: u8 = 0x04;
/// `HMM_DMIRROR_PROT_PUD`: mapped by the CPU with a PUD.
pub const HMM_DMIRROR_PROT_PUD: u8 = 0x08;
/// `HMM_DMIRROR_PROT_ZERO`: the shared zero page.
pub const HMM_DMIRROR_PROT_ZERO: u8 = 0x10;
/// `HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL`: this device's private page.
pub const HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL: u8 = 0x20;
/// `HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE`: another device's private page.
pub const HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE: u8 = 0x30;
/// `HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL`.
pub const HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL: u8 = 0x40;
/// `HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE`.
pub const HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE: u8 = 0x50;

/// Pages per range fault, as dmirror's `pfns[32]`.
const CHUNK_PAGES: u64 = 32;

/// The result of a command (`cpages`, `faults` of `struct hmm_dmirror_cmd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cmd {
    /// Pages processed.
    pub cpages: u64,
    /// Fault rounds (not pages): 1 for one contiguous fault pass.
    pub faults: u64,
}

/// The kind of device memory a device has (`enum memory_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// `MEMORY_DEVICE_PRIVATE`: not CPU-addressable.
    Private,
    /// `MEMORY_DEVICE_COHERENT`: CPU-addressable device memory.
    Coherent,
}

/// A dmirror device (`struct dmirror_device`): minors 0 and 1 are
/// device-private, 2 and 3 device-coherent.
#[derive(Debug)]
pub struct Device {
    minor: u32,
    owner: OwnerId,
    kind: MemoryType,
}

impl Device {
    /// Number of devices, as `DMIRROR_NDEVICES`.
    pub const COUNT: u32 = 4;

    /// The device of `minor`.
    ///
    /// # Errors
    /// [`Error::Inval`] for a minor past [`Device::COUNT`];
    /// [`Error::Unsupported`] for the device-coherent minors, whose memory is
    /// not built yet.
    pub fn get(minor: u32) -> Result<Arc<Device>> {
        static DEVICES: [OnceLock<Arc<Device>>; Device::COUNT as usize] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        let slot = DEVICES
            .get(minor as usize)
            .ok_or(Error::Inval("no such dmirror minor"))?;
        let kind = if minor < 2 {
            MemoryType::Private
        } else {
            MemoryType::Coherent
        };
        if kind == MemoryType::Coherent {
            return Err(Error::Unsupported {
                feature: "device-coherent memory (dmirror minors 2 and 3)",
                hint: "not implemented yet",
            });
        }
        Ok(slot
            .get_or_init(|| {
                Arc::new(Device {
                    minor,
                    owner: OwnerId::new(),
                    kind,
                })
            })
            .clone())
    }

    /// The minor number.
    pub fn minor(&self) -> u32 {
        self.minor
    }

    /// The owner identity (`pgmap->owner`, `dev_private_owner`).
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// The kind of memory.
    pub fn kind(&self) -> MemoryType {
        self.kind
    }
}

/// One open of a dmirror device: a device page table mirroring the process.
#[derive(Debug)]
pub struct Dmirror {
    device: Arc<Device>,
    mirror: Mirror,
    /// Memory the device exposed through [`Dmirror::mmap`].
    exposed: StdMutex<Vec<OwnedFd>>,
}

/// Validates a command's `addr` and `npages` as the ioctl does.
fn cmd_range(addr: VirtAddr, npages: u64) -> Result<VaRange> {
    if !addr.is_page_aligned() {
        return Err(Error::Inval("addr is not page aligned"));
    }
    let len = npages
        .checked_shl(PAGE_SHIFT)
        .filter(|l| l >> PAGE_SHIFT == npages);
    match len.and_then(|l| addr.get().checked_add(l)) {
        Some(end) if end > addr.get() => VaRange::new(addr, VirtAddr(end))
            .map_err(|_| Error::Inval("range past the user address space")),
        _ => Err(Error::Inval("zero or overflowing npages")),
    }
}

fn check_buf(len: usize, range: VaRange) -> Result<()> {
    if (len as u64) < range.len() {
        return Err(Error::Inval("buffer shorter than npages pages"));
    }
    Ok(())
}

impl Dmirror {
    /// Opens `/dev/hmm_dmirror<minor>`.
    ///
    /// # Errors
    /// As [`Device::get`]; and as [`Mm::get`].
    pub fn open(minor: u32) -> Result<Dmirror> {
        let device = Device::get(minor)?;
        Self::open_device(device, MirrorOptions::default())
    }

    /// Opens `device` with a mirror of the given options (the owner is the device's).
    ///
    /// # Errors
    /// As [`Mm::get`].
    pub fn open_device(device: Arc<Device>, options: MirrorOptions) -> Result<Dmirror> {
        let mm = Mm::get()?;
        let options = MirrorOptions {
            owner: Some(device.owner),
            chunk_pages: CHUNK_PAGES,
            ..options
        };
        let mirror = Mirror::new(&mm, None, options)?;
        Ok(Dmirror {
            device,
            mirror,
            exposed: StdMutex::new(Vec::new()),
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The device page table.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// The copy loop of `dmirror_read`/`dmirror_write`: under the table lock,
    /// move data for the pages mapped (writable, for `write`) from where the
    /// last attempt stopped; fault from the first missing page; repeat.
    fn access(
        &self,
        range: VaRange,
        write: bool,
        mut copy: impl FnMut(VirtAddr, usize, usize) -> std::result::Result<usize, rustix::io::Errno>,
    ) -> Result<Cmd> {
        let mut done = 0u64;
        let mut cmd = Cmd::default();
        let npages = range.npages();
        loop {
            {
                let mut table = self.mirror.lock();
                done = copy_mapped(&mut table, range, done, write, &mut copy);
            }
            if done == npages {
                break;
            }
            let from = VirtAddr(range.start().get() + (done << PAGE_SHIFT));
            self.mirror.fault(VaRange::new(from, range.end())?, write)?;
            cmd.faults += 1;
        }
        cmd.cpages = npages;
        Ok(cmd)
    }

    /// `HMM_DMIRROR_READ`: the device reads `npages` from `addr` into `out`.
    ///
    /// # Errors
    /// [`Error::Inval`] for a misaligned `addr`, zero or overflowing `npages`,
    /// or a short buffer; the range fault's errors (`-EFAULT`, `-EPERM`,
    /// `-EBUSY`). On error nothing is written to `out`.
    pub fn read(&self, addr: VirtAddr, npages: u64, out: &mut [u8]) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        check_buf(out.len(), range)?;
        let mut bounce = vec![0u8; range.len() as usize];
        let cmd = self.access(range, false, |va, off, len| {
            crate::os::process_vm::read(va, &mut bounce[off..off + len])
        })?;
        out[..bounce.len()].copy_from_slice(&bounce);
        Ok(cmd)
    }

    /// `HMM_DMIRROR_WRITE`: the device writes `data` to `npages` at `addr`.
    ///
    /// # Errors
    /// As [`Dmirror::read`].
    pub fn write(&self, addr: VirtAddr, npages: u64, data: &[u8]) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        check_buf(data.len(), range)?;
        self.access(range, true, |va, off, len| {
            crate::os::process_vm::write(va, &data[off..off + len])
        })
    }

    /// `HMM_DMIRROR_SNAPSHOT`: one status byte per page into `out`, without faulting.
    ///
    /// # Errors
    /// As [`Dmirror::read`], with `out` needing `npages` bytes.
    pub fn snapshot(&self, addr: VirtAddr, npages: u64, out: &mut [u8]) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        if (out.len() as u64) < npages {
            return Err(Error::Inval("buffer shorter than npages bytes"));
        }
        let mut pfns = vec![HmmPfn::empty(); npages as usize];
        self.mirror.snapshot(range, &mut pfns)?;
        let zero = self.mirror.mm().zero_pfn();
        for (b, p) in out.iter_mut().zip(&pfns) {
            *b = snapshot_byte(*p, zero);
        }
        Ok(Cmd {
            cpages: npages,
            faults: 0,
        })
    }

    /// The dmirror fd's `mmap`: the device exposes `npages` zeroed pages of
    /// its memory and the process maps them privately with `prot`, already
    /// populated (as `vm_insert_page` does), making a mixed mapping.
    ///
    /// # Errors
    /// The `Errno` of `memfd_create`, `ftruncate` or `mmap` as [`Error::Os`].
    pub fn mmap(&self, npages: u64, prot: Prot) -> Result<Mapping> {
        let len = npages.checked_mul(PAGE_SIZE).ok_or(Error::Overflow)?;
        let fd = rustix::fs::memfd_create("hmm_dmirror", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| Error::os("memfd_create", e))?;
        rustix::fs::ftruncate(&fd, len).map_err(|e| Error::os("ftruncate", e))?;
        let m = Mapping::file(fd.as_fd(), len, 0, prot, false).map_err(|e| Error::os("mmap", e))?;
        if prot.contains(Prot::READ) {
            crate::os::mm::populate(m.range(), false)
                .map_err(|e| Error::os("madvise(MADV_POPULATE_READ)", e))?;
        }
        self.exposed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fd);
        Ok(m)
    }
}

/// Moves data for the mapped pages of `range` from page `done` on; returns
/// how many pages are done. A transfer that fails part-way means the page
/// went away under the device: its entry is dropped so the next fault
/// reports what the CPU page table says.
fn copy_mapped(
    table: &mut Table,
    range: VaRange,
    mut done: u64,
    write: bool,
    copy: &mut impl FnMut(VirtAddr, usize, usize) -> std::result::Result<usize, rustix::io::Errno>,
) -> u64 {
    let npages = range.npages();
    while done < npages {
        // The run of consecutive usable entries from `done`.
        let mut run = 0u64;
        while done + run < npages {
            let va = VirtAddr(range.start().get() + ((done + run) << PAGE_SHIFT));
            match table.get(va) {
                Some(e) if !write || e.write => run += 1,
                _ => break,
            }
        }
        if run == 0 {
            return done;
        }
        let va = VirtAddr(range.start().get() + (done << PAGE_SHIFT));
        let off = (done << PAGE_SHIFT) as usize;
        let len = (run << PAGE_SHIFT) as usize;
        let moved = copy(va, off, len).unwrap_or(0);
        let full = (moved as u64) >> PAGE_SHIFT;
        done += full;
        if full < run {
            // A stale entry: the CPU unmapped or protected the page.
            table.remove(VirtAddr(range.start().get() + (done << PAGE_SHIFT)));
            return done;
        }
    }
    done
}

/// The snapshot byte of one entry (`dmirror_mkentry` in `lib/test_hmm.c`).
pub fn snapshot_byte(p: HmmPfn, zero_pfn: crate::addr::Pfn) -> u8 {
    if p.contains(HmmPfn::ERROR) {
        return HMM_DMIRROR_PROT_ERROR;
    }
    if !p.contains(HmmPfn::VALID) {
        return HMM_DMIRROR_PROT_NONE;
    }
    let mut b = if p.pfn() == zero_pfn {
        HMM_DMIRROR_PROT_ZERO
    } else {
        0
    };
    b |= if p.contains(HmmPfn::WRITE) {
        HMM_DMIRROR_PROT_WRITE
    } else {
        HMM_DMIRROR_PROT_READ
    };
    let shift = p.map_order() + PAGE_SHIFT;
    if shift == PMD_SHIFT {
        b |= HMM_DMIRROR_PROT_PMD;
    } else if shift == PUD_SHIFT {
        b |= HMM_DMIRROR_PROT_PUD;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Pfn;

    #[test]
    fn snapshot_bytes_are_the_kernels() {
        let zero = Pfn(7);
        let e = |f: HmmPfn, pfn: u64, order: u32| HmmPfn::new(f, Pfn(pfn), order).expect("fits");
        assert_eq!(snapshot_byte(HmmPfn::ERROR, zero), 0xFF);
        assert_eq!(snapshot_byte(HmmPfn::empty(), zero), 0x00);
        assert_eq!(snapshot_byte(e(HmmPfn::VALID, 1, 0), zero), 0x01);
        assert_eq!(
            snapshot_byte(e(HmmPfn::VALID | HmmPfn::WRITE, 1, 0), zero),
            0x02
        );
        assert_eq!(snapshot_byte(e(HmmPfn::VALID, 7, 0), zero), 0x11);
        assert_eq!(
            snapshot_byte(e(HmmPfn::VALID | HmmPfn::WRITE, 1, 9), zero),
            0x06
        );
        assert_eq!(snapshot_byte(e(HmmPfn::VALID, 1, 9), zero), 0x05);
        assert_eq!(snapshot_byte(e(HmmPfn::VALID, 1, 18), zero), 0x09);
    }

    #[test]
    fn commands_validate_like_the_ioctl() {
        assert!(matches!(
            cmd_range(VirtAddr(0x1001), 1),
            Err(Error::Inval(_))
        ));
        assert!(matches!(
            cmd_range(VirtAddr(0x1000), 0),
            Err(Error::Inval(_))
        ));
        assert!(matches!(
            cmd_range(VirtAddr(0x1000), u64::MAX),
            Err(Error::Inval(_))
        ));
        assert!(matches!(
            cmd_range(VirtAddr(!0xfff), 2),
            Err(Error::Inval(_))
        ));
        assert!(cmd_range(VirtAddr(0x1000), 2).is_ok());
        assert!(matches!(Device::get(2), Err(Error::Unsupported { .. })));
        assert!(matches!(Device::get(4), Err(Error::Inval(_))));
        let a = Device::get(0).expect("dev0");
        let b = Device::get(1).expect("dev1");
        assert_ne!(a.owner(), b.owner());
        assert_eq!(Device::get(0).expect("dev0").owner(), a.owner());
    }
}
