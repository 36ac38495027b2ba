//! The software test device, modelled on the kernel's dmirror
//! (`lib/test_hmm.c`, `lib/test_hmm_uapi.h`).
//!
//! Each [`Dmirror`] is one open of `/dev/hmm_dmirror<minor>`: its own device
//! page table (a [`Mirror`] over the whole address space) and the owner
//! identity of its [`Device`]. It offers the dmirror commands with the
//! ioctls' results (`cpages`, `faults`) and errors.
//!
//! The device reaches host memory by virtual address through
//! `/proc/self/mem` (checking the mapping's write permission before a
//! write), so a page unmapped or write-protected under it is an error, never
//! a crash: the device drops the entry and faults again, and the range fault
//! then reports what the CPU page table says (`-EFAULT`, `-EPERM`). Unlike
//! `process_vm_readv`, `/proc/self/mem` never waits on a userfaultfd: the
//! device copies under its page-table lock, and a copy waiting on a fault
//! the service thread must serve while the service thread waits on that
//! lock for an invalidation would deadlock.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PUD_SHIFT, VaRange, VirtAddr};
use crate::devmem::{DevPagemap, DevicePage, PageRef, PagemapOps, Storage};
use crate::error::{Error, Result};
use crate::migrate::{MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MigrateSelect, MigrateVma};
use crate::mirror::{Mirror, MirrorEntry, MirrorOptions, Strategy, Table};
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
    storage: Storage,
    /// The device memory, made on first use.
    pagemap: StdMutex<Option<DevPagemap>>,
    /// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the next allocation fails once.
    fail_alloc: std::sync::atomic::AtomicBool,
    /// Pages of device memory.
    npages: u64,
    /// Pages a CPU fault brings back ([`Device::set_fault_batch`]).
    fault_batch: Arc<std::sync::atomic::AtomicU64>,
}

/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the device's next allocation fails (the
/// driver then falls back to allocating page by page, as dmirror does when
/// its huge allocation fails).
pub const HMM_DMIRROR_FLAG_FAIL_ALLOC: u64 = 1 << 0;

/// Pages of device memory a dmirror device has (512 MiB; untouched memory
/// costs nothing).
pub const DEVICE_PAGES: u64 = 128 * 1024;

/// Entries per migration step (dmirror's `src_pfns[64]`; a PMD's worth
/// here, which costs less per page).
const MIGRATE_CHUNK_PAGES: u64 = 512;

/// The most pages a CPU fault can bring back ([`Device::set_fault_batch`]).
pub const MAX_FAULT_BATCH_PAGES: u64 = 512;

/// The driver callbacks of a dmirror device's memory.
#[derive(Debug)]
struct DmirrorOps {
    /// Pages a CPU fault brings back (1 as dmirror; more up to the end of
    /// the faulting page's aligned block of that many pages).
    batch: Arc<std::sync::atomic::AtomicU64>,
}

impl PagemapOps for DmirrorOps {
    fn page_free(&self, _page: &PageRef<'_>) {}

    fn migrate_to_ram(&self, _page: &PageRef<'_>, addr: VirtAddr) -> Result<u64> {
        let n = self
            .batch
            .load(std::sync::atomic::Ordering::Relaxed)
            .clamp(1, MAX_FAULT_BATCH_PAGES);
        Ok(n - (addr.page_index() % n))
    }
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
            .get_or_init(|| Device::new_private(minor, Storage::from_env()))
            .clone())
    }

    /// A device-private device of its own (not one of the four minors),
    /// with device memory of the given flavour.
    pub fn new_private(minor: u32, storage: Storage) -> Arc<Device> {
        Self::with_pages(minor, storage, DEVICE_PAGES)
    }

    /// As [`Device::new_private`] with `npages` pages of device memory.
    pub fn with_pages(minor: u32, storage: Storage, npages: u64) -> Arc<Device> {
        Arc::new(Device {
            minor,
            owner: OwnerId::new(),
            kind: MemoryType::Private,
            storage,
            pagemap: StdMutex::new(None),
            fail_alloc: std::sync::atomic::AtomicBool::new(false),
            npages,
            fault_batch: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        })
    }

    /// How many pages a CPU fault on this device's memory brings back: 1
    /// (the default, as dmirror) up to [`MAX_FAULT_BATCH_PAGES`], taken
    /// from the faulting page to the end of its aligned block of `pages`.
    pub fn set_fault_batch(&self, pages: u64) {
        self.fault_batch.store(
            pages.clamp(1, MAX_FAULT_BATCH_PAGES),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Where the device keeps page data.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// Runs `f` on the device memory, making it on first use.
    fn with_pagemap<R>(&self, mm: &Mm, f: impl FnOnce(&DevPagemap) -> Result<R>) -> Result<R> {
        let mut g = self.pagemap.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(DevPagemap::new(
                mm,
                crate::devmem::MemoryType::Private,
                self.npages,
                self.owner,
                self.storage,
                Box::new(DmirrorOps {
                    batch: self.fault_batch.clone(),
                }),
            )?);
        }
        match g.as_ref() {
            Some(p) => f(p),
            None => Err(Error::NoMem),
        }
    }

    /// Allocates a device page, honouring the fault-injection flag.
    fn alloc(&self, pgmap: &DevPagemap) -> Result<DevicePage> {
        if self
            .fail_alloc
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Err(Error::NoMem);
        }
        pgmap.alloc_page()
    }

    /// Device pages not allocated (all of them before first use).
    pub fn free_pages(&self) -> u64 {
        let g = self.pagemap.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map_or(self.npages, DevPagemap::free_pages)
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

/// What a device access through a special entry reaches.
enum Target<'a> {
    /// A page of device memory.
    Page(&'a DevicePage),
    /// A host page the device holds (exclusive access).
    Host(VirtAddr),
}

/// Where the migration step from `a` ends, as dmirror's loop: at most
/// [`MIGRATE_CHUNK_PAGES`], within `range` and within the VMA at `a`.
///
/// # Errors
/// [`Error::Inval`] (`-EINVAL`) when no readable VMA covers `a`.
fn migrate_step_end(mm: &Mm, a: VirtAddr, range: VaRange) -> Result<VirtAddr> {
    let vma = match mm.vma_at(a)? {
        Some(v) if v.start <= a && v.flags.contains(crate::os::procmap::VmaFlags::READ) => v,
        _ => return Err(Error::Inval("no readable VMA in the migrate range")),
    };
    Ok(VirtAddr(
        (a.get() + (MIGRATE_CHUNK_PAGES << PAGE_SHIFT))
            .min(range.end().get())
            .min(vma.end.get()),
    ))
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
    /// The mirror's strategy comes from `HMM_MIRROR_STRATEGY`
    /// ([`Strategy::from_env`]), as the storage does from
    /// `HMM_DMIRROR_STORAGE`.
    pub fn open(minor: u32) -> Result<Dmirror> {
        let device = Device::get(minor)?;
        let options = MirrorOptions {
            strategy: Strategy::from_env(),
            ..MirrorOptions::default()
        };
        Self::open_device(device, options)
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
        mut dev_io: impl FnMut(Target<'_>, usize) -> Result<()>,
    ) -> Result<Cmd> {
        let mut done = 0u64;
        let mut cmd = Cmd::default();
        let npages = range.npages();
        // What the program finished before this command (an munmap or
        // mremap has had its event read when it returns) is handled first:
        // a device page replaced by then must not be read.
        self.mirror.mm().settle()?;
        loop {
            {
                let mut table = self.mirror.lock();
                done = copy_mapped(
                    &mut table,
                    range,
                    done,
                    write,
                    &mut copy,
                    &mut |va, off, e| self.device_copy(va, off, e, write, &mut dev_io),
                );
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
        let bounce = std::cell::RefCell::new(vec![0u8; range.len() as usize]);
        let cmd = self.access(
            range,
            false,
            |va, off, len| {
                crate::os::process_vm::mem_read(va, &mut bounce.borrow_mut()[off..off + len])
            },
            |target, off| {
                let mut b = bounce.borrow_mut();
                let page = &mut b[off..off + PAGE_SIZE as usize];
                match target {
                    Target::Page(p) => p.read(page),
                    Target::Host(a) => crate::os::process_vm::mem_read(a, page)
                        .map(|_| ())
                        .map_err(|e| Error::os("process_vm_readv", e)),
                }
            },
        )?;
        let bounce = bounce.into_inner();
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
        self.access(
            range,
            true,
            |va, off, len| {
                // `/proc/self/mem` writes like a debugger: only as far as
                // the mapping still allows writes (a plain mprotect raises
                // no event, so the entry's permission may be stale).
                let vma = self.mirror.mm().vma_at(va).ok().flatten();
                let Some(v) = vma.filter(|v| {
                    v.start <= va && v.flags.contains(crate::os::procmap::VmaFlags::WRITE)
                }) else {
                    return Err(rustix::io::Errno::FAULT);
                };
                let len = len.min((v.end.get() - va.get()) as usize);
                crate::os::process_vm::mem_write(va, &data[off..off + len])
            },
            |target, off| {
                let page = &data[off..off + PAGE_SIZE as usize];
                match target {
                    Target::Page(p) => p.write(0, page),
                    Target::Host(a) => crate::os::process_vm::mem_write(a, page)
                        .map(|_| ())
                        .map_err(|e| Error::os("process_vm_writev", e)),
                }
            },
        )
    }

    /// One page of a device access through a device-page entry: the device
    /// reads or writes its own memory. The entry is used only if the address
    /// space still maps that device page there; `false` means stale.
    fn device_copy(
        &self,
        va: VirtAddr,
        off: usize,
        e: MirrorEntry,
        write: bool,
        io: &mut impl FnMut(Target<'_>, usize) -> Result<()>,
    ) -> bool {
        let mm = self.mirror.mm();
        if e.atomic {
            // The page the device holds exclusive: it works on it in the
            // holder. A write checks the mapping still allows writes (a
            // plain mprotect raises no event).
            let Ok(Some((holder, owner))) = mm.exclusive_now(va) else {
                return false;
            };
            if owner != self.device.owner {
                return false;
            }
            if write
                && !matches!(mm.vma_at(va), Ok(Some(v)) if v.start <= va
                    && v.flags.contains(crate::os::procmap::VmaFlags::WRITE))
            {
                return false;
            }
            return io(Target::Host(holder), off).is_ok();
        }
        let Ok(Some(page)) = mm.device_page_now(va) else {
            return false;
        };
        page.pfn() == e.pfn.0 && io(Target::Page(&page), off).is_ok()
    }

    /// `HMM_DMIRROR_EXCLUSIVE`: takes every page of the range for exclusive
    /// (atomic) access, maps them in the device page table as atomic, and
    /// reads them back into `out` (when given).
    ///
    /// # Errors
    /// As [`Mm::make_device_exclusive`]; [`Error::Inval`] for a bad range.
    pub fn exclusive(&self, addr: VirtAddr, npages: u64, out: Option<&mut [u8]>) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        if let Some(o) = &out {
            check_buf(o.len(), range)?;
        }
        let mm = self.mirror.mm();
        let mut a = range.start();
        while a < range.end() {
            let vma = match mm.vma_at(a)? {
                Some(v) if v.start <= a => v,
                _ => {
                    return Err(Error::Fault {
                        addr: a,
                        why: "no VMA",
                    });
                }
            };
            let next = range.end().min(vma.end);
            let part = VaRange::new(a, next)?;
            mm.make_device_exclusive(part, self.device.owner)?;
            let mut t = self.mirror.lock();
            for k in 0..part.npages() {
                let va = VirtAddr(a.get() + (k << PAGE_SHIFT));
                if matches!(mm.exclusive_now(va), Ok(Some((_, o))) if o == self.device.owner) {
                    t.insert(
                        va,
                        MirrorEntry {
                            pfn: crate::addr::Pfn(0),
                            write: true,
                            order: 0,
                            atomic: true,
                        },
                    );
                }
            }
            drop(t);
            a = next;
        }
        let mut bounce = vec![0u8; range.len() as usize];
        let cmd = self.read(range.start(), npages, &mut bounce)?;
        if let Some(o) = out {
            o[..bounce.len()].copy_from_slice(&bounce);
        }
        Ok(cmd)
    }

    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: `-EPERM` if the device still holds any
    /// page of the range for atomic access.
    ///
    /// # Errors
    /// [`Error::Perm`] at the first atomic entry; [`Error::Inval`] for a bad range.
    pub fn check_exclusive(&self, addr: VirtAddr, npages: u64) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        let t = self.mirror.lock();
        if let Some((va, _)) = t.entries_in(range).find(|(_, e)| e.atomic) {
            return Err(Error::Perm { addr: va });
        }
        // The ioctl leaves `cpages` as it was (0).
        Ok(Cmd::default())
    }

    /// `HMM_DMIRROR_MIGRATE_TO_DEV`: migrates `npages` from `addr` to this
    /// device's memory, 64 pages and one VMA at a time, maps what moved in
    /// the device page table, and reads the range back from device memory
    /// into `out` (when given) as the driver does for verification.
    ///
    /// # Errors
    /// [`Error::Inval`] for a bad range, a hole or a VMA without read
    /// permission (`-EINVAL`); [`Error::NoEnt`] when a page did not end up
    /// in this device's memory (shared or file pages, another device's
    /// pages, a failed allocation); the migration's errors.
    pub fn migrate_to_dev(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: Option<&mut [u8]>,
    ) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        if let Some(o) = &out {
            check_buf(o.len(), range)?;
        }
        let mm = self.mirror.mm().clone();
        let owner = self.device.owner;
        self.device.with_pagemap(&mm, |pgmap| {
            let mut a = range.start();
            while a < range.end() {
                let next = migrate_step_end(&mm, a, range)?;
                let mut m = MigrateVma::setup(&mm, a, next, MigrateSelect::SYSTEM, Some(owner))?;
                for i in 0..m.npages() as usize {
                    if m.src()[i] & MIGRATE_PFN_MIGRATE == 0 {
                        continue;
                    }
                    // A failed allocation is retried once, page by page, as
                    // dmirror falls back from a huge allocation.
                    let page = match self.device.alloc(pgmap) {
                        Ok(p) => Some(p),
                        Err(_) => pgmap.alloc_page().ok(),
                    };
                    if let Some(p) = page {
                        m.set_dst(i, p)?;
                    }
                }
                m.pages();
                {
                    let mut t = self.mirror.lock();
                    for i in 0..m.npages() as usize {
                        let (s, d) = (m.src()[i], m.dst()[i]);
                        if let Some(pfn) = crate::migrate::migrate_pfn_to_pfn(d)
                            && s & MIGRATE_PFN_MIGRATE != 0
                        {
                            let va = VirtAddr(a.get() + ((i as u64) << PAGE_SHIFT));
                            t.insert(
                                va,
                                MirrorEntry {
                                    pfn: crate::addr::Pfn(pfn),
                                    write: d & MIGRATE_PFN_WRITE != 0,
                                    order: 0,
                                    atomic: false,
                                },
                            );
                        }
                    }
                }
                m.finalize();
                a = next;
            }
            Ok(())
        })?;
        self.read_device_only(range, out)
    }

    /// `dmirror_do_read` over device-page entries only: `-ENOENT` when a
    /// page of `range` is not this device's memory.
    fn read_device_only(&self, range: VaRange, out: Option<&mut [u8]>) -> Result<Cmd> {
        let mm = self.mirror.mm();
        mm.settle()?;
        let mut out = out;
        let t = self.mirror.lock();
        let pages = mm.device_pages_now(range)?;
        for (k, page) in (0..range.npages()).zip(pages) {
            let va = VirtAddr(range.start().get() + (k << PAGE_SHIFT));
            let e = t.get(va).ok_or(Error::NoEnt)?;
            let page = page.ok_or(Error::NoEnt)?;
            if page.pfn() != e.pfn.0 || page.owner() != self.device.owner {
                return Err(Error::NoEnt);
            }
            // Without a buffer only the placement is checked.
            if let Some(o) = out.as_deref_mut() {
                let off = (k << PAGE_SHIFT) as usize;
                page.read(&mut o[off..off + PAGE_SIZE as usize])?;
            }
        }
        drop(t);
        Ok(Cmd {
            cpages: range.npages(),
            faults: 0,
        })
    }

    /// `HMM_DMIRROR_MIGRATE_TO_SYS`: migrates this device's pages in
    /// `npages` from `addr` back to system memory; `cpages` counts them.
    ///
    /// # Errors
    /// [`Error::Inval`] for a bad range, a hole or a VMA without read permission.
    pub fn migrate_to_sys(&self, addr: VirtAddr, npages: u64) -> Result<Cmd> {
        let range = cmd_range(addr, npages)?;
        let mm = self.mirror.mm().clone();
        let owner = self.device.owner;
        let mut cpages = 0;
        let mut a = range.start();
        while a < range.end() {
            let next = migrate_step_end(&mm, a, range)?;
            let mut m =
                MigrateVma::setup(&mm, a, next, MigrateSelect::DEVICE_PRIVATE, Some(owner))?;
            for i in 0..m.npages() as usize {
                if m.src()[i] & MIGRATE_PFN_MIGRATE != 0 {
                    m.set_dst_system(i)?;
                }
            }
            m.pages();
            cpages += m
                .src()
                .iter()
                .filter(|s| *s & MIGRATE_PFN_MIGRATE != 0)
                .count() as u64;
            m.finalize();
            a = next;
        }
        Ok(Cmd { cpages, faults: 0 })
    }

    /// `HMM_DMIRROR_RELEASE`: evicts all of this device's memory back to
    /// system memory and unmaps it from the device page table.
    ///
    /// # Errors
    /// As [`DevPagemap::evict`].
    pub fn release(&self) -> Result<()> {
        let mm = self.mirror.mm().clone();
        self.device.with_pagemap(&mm, DevPagemap::evict)?;
        Ok(())
    }

    /// `HMM_DMIRROR_FLAGS`: sets the device's flags
    /// ([`HMM_DMIRROR_FLAG_FAIL_ALLOC`]).
    pub fn set_flags(&self, flags: u64) {
        self.device.fail_alloc.store(
            flags & HMM_DMIRROR_FLAG_FAIL_ALLOC != 0,
            std::sync::atomic::Ordering::Release,
        );
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
            *b = snapshot_byte_for(*p, zero, Some(self.device.owner));
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
    device: &mut impl FnMut(VirtAddr, usize, MirrorEntry) -> bool,
) -> u64 {
    let npages = range.npages();
    while done < npages {
        // A page of device memory: the device accesses it directly.
        let va = VirtAddr(range.start().get() + (done << PAGE_SHIFT));
        if let Some(e) = table.get(va)
            && (e.atomic || crate::devmem::is_device_pfn(e.pfn.0))
        {
            if (write && !e.write) || !device(va, (done << PAGE_SHIFT) as usize, e) {
                table.remove(va);
                return done;
            }
            done += 1;
            continue;
        }
        // The run of consecutive usable entries from `done`.
        let mut run = 0u64;
        while done + run < npages {
            let va = VirtAddr(range.start().get() + ((done + run) << PAGE_SHIFT));
            match table.get(va) {
                Some(e)
                    if (!write || e.write)
                        && !e.atomic
                        && !crate::devmem::is_device_pfn(e.pfn.0) =>
                {
                    run += 1
                }
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

/// The snapshot byte of one entry (`dmirror_mkentry` in `lib/test_hmm.c`)
/// for a device that has no memory of its own.
pub fn snapshot_byte(p: HmmPfn, zero_pfn: crate::addr::Pfn) -> u8 {
    snapshot_byte_for(p, zero_pfn, None)
}

/// The snapshot byte of one entry as the device of `owner` reports it: a
/// device-private page is `DEV_PRIVATE_LOCAL` when it is this device's
/// memory, `DEV_PRIVATE_REMOTE` when another's.
pub fn snapshot_byte_for(p: HmmPfn, zero_pfn: crate::addr::Pfn, owner: Option<OwnerId>) -> u8 {
    if p.contains(HmmPfn::ERROR) {
        return HMM_DMIRROR_PROT_ERROR;
    }
    if !p.contains(HmmPfn::VALID) {
        return HMM_DMIRROR_PROT_NONE;
    }
    if crate::devmem::is_device_pfn(p.pfn().0) {
        let local = crate::devmem::lookup_pfn(p.pfn().0).is_some_and(|d| Some(d.owner()) == owner);
        let kind = if local {
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
        } else {
            HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE
        };
        let perm = if p.contains(HmmPfn::WRITE) {
            HMM_DMIRROR_PROT_WRITE
        } else {
            HMM_DMIRROR_PROT_READ
        };
        return kind | perm;
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
