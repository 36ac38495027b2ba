//! Exclusive device access for atomics (`make_device_exclusive`,
//! `mm/rmap.c`).
//!
//! The kernel replaces the CPU's PTE with a device-exclusive swap entry, so
//! any CPU access faults and restores the page. Here the page is moved with
//! `UFFDIO_MOVE` out of the address space into a holder region (the device
//! works on it there); its address becomes an absent page in a VMA
//! registered for MISSING faults, and the `Mm`'s device table records the
//! holder. A CPU touch raises a MISSING fault: the service thread sends a
//! `Clear` invalidation (which drops the device's atomic mapping), moves the
//! page back, data intact, and wakes the thread.
//!
//! A fork revokes every exclusive page first (the kernel's fork restores
//! the original PTE too), so the child gets the data and copy-on-write
//! works as for any page.

use std::sync::Arc;

use rustix::io::Errno;
use tracing::warn;

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::migrate::Slot;
use crate::mm::{Mm, MmCore};
use crate::notifier::{Event, OwnerId};
use crate::os::procmap::VmaFlags;

impl Mm {
    /// `make_device_exclusive` over every page of `range`, for `owner`:
    /// each page is faulted in writable and taken from the CPU until its
    /// next CPU access. Returns the number of pages.
    ///
    /// # Errors
    /// [`Error::Inval`] when `range` is not inside one VMA;
    /// [`Error::Unsupported`] (the kernel's `-EOPNOTSUPP`) for shared, file
    /// or hugetlb pages; [`Error::Fault`] when a page cannot be faulted in
    /// writable; [`Error::Os`] when a move fails.
    pub fn make_device_exclusive(&self, range: VaRange, owner: OwnerId) -> Result<u64> {
        let core = self.core()?.clone();
        let _walk = core.fork_gate.walk();
        let vma = core
            .maps
            .query(range.start(), false)
            .map_err(|e| Error::os("PROCMAP_QUERY", e))?
            .ok_or(Error::Inval("no VMA at the start of the range"))?;
        if range.end() > vma.end {
            return Err(Error::Inval("the range spans more than one VMA"));
        }
        if !vma.is_private_anon() || vma.page_size != PAGE_SIZE {
            return Err(Error::Unsupported {
                feature: "device-exclusive access to shared, file or hugetlb pages",
                hint: "only private anonymous pages can be made exclusive",
            });
        }
        if !vma.flags.contains(VmaFlags::WRITE) {
            return Err(Error::Fault {
                addr: range.start(),
                why: "exclusive access needs a writable mapping",
            });
        }
        core.register_missing(&vma, range.start())?;
        crate::os::mm::populate(range, true).map_err(|_| Error::Fault {
            addr: range.start(),
            why: "the page could not be faulted in writable",
        })?;
        core.invalidate_range(range, Event::Exclusive, Some(owner));
        let holder = Arc::new(core.host_region(range.len())?);
        let base = range.start().page_index();
        {
            // Recorded by address: after the events about these addresses
            // were handled, none in flight (see `layout_read_settled`).
            let _layout = core.layout_read_settled(range.start());
            let mut st = core.dev.lock();
            for k in 0..range.npages() {
                st.set_slot(
                    base + k,
                    Slot::Exclusive {
                        holder: holder.clone(),
                        index: k,
                        owner,
                    },
                );
            }
        }
        let mover = core.mover()?;
        let mut moved = 0;
        let res = crate::migrate::retry_while_event_pending(
            || {
                let (m, res) = mover.move_partial(
                    VirtAddr(holder.addr().get() + moved),
                    VirtAddr(range.start().get() + moved),
                    range.len() - moved,
                    true,
                    false,
                );
                moved += m;
                res
            },
            |e| *e == Errno::AGAIN,
        );
        if let Err(e) = res {
            // Give back what moved; the rest never left.
            let done = moved >> PAGE_SHIFT;
            for k in 0..range.npages() {
                if k < done {
                    core.revoke_exclusive(base + k);
                } else {
                    let _ = core.dev.lock().take_slot(base + k);
                }
            }
            return Err(Error::os("UFFDIO_MOVE", e));
        }
        Ok(range.npages())
    }

    /// The holder address of an exclusive page at the page holding `addr`
    /// and its owner, if the page is held exclusive.
    ///
    /// # Errors
    /// [`Error::Released`].
    ///
    /// Waits until the events already read are handled, so it must not be
    /// called under a lock that an invalidation callback takes.
    pub fn exclusive_at(&self, addr: VirtAddr) -> Result<Option<(VirtAddr, OwnerId)>> {
        let core = self.core()?;
        let _layout = core.layout_read();
        let st = core.dev.lock();
        Ok(st.exclusive(addr.page_index()))
    }

    /// [`Mm::exclusive_at`] without waiting: for a device under its
    /// page-table lock.
    pub(crate) fn exclusive_now(&self, addr: VirtAddr) -> Result<Option<(VirtAddr, OwnerId)>> {
        let core = self.core()?;
        let st = core.dev.lock();
        Ok(st.exclusive(addr.page_index()))
    }
}

impl MmCore {
    /// Gives an exclusive page back to the CPU: `Clear` invalidation, move
    /// back, wake.
    pub(crate) fn revoke_exclusive(&self, vpn: u64) {
        let Some(slot) = self.dev.lock().take_exclusive(vpn) else {
            return;
        };
        let Slot::Exclusive { holder, index, .. } = &slot else {
            return;
        };
        let at = VirtAddr(vpn << PAGE_SHIFT);
        let Ok(page) = VaRange::from_len(at, PAGE_SIZE) else {
            return;
        };
        self.invalidate_range(page, Event::Clear, None);
        let src = VirtAddr(holder.addr().get() + (index << PAGE_SHIFT));
        let on_service = self.on_service_thread();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let res = loop {
            let res = match self.uffd.move_pages(at, src, PAGE_SIZE, false, false) {
                Ok(_) | Err(Errno::EXIST) => Ok(()),
                Err(Errno::AGAIN) => Err(Errno::AGAIN),
                // Made read-only since: copy the data back instead.
                Err(_) => {
                    let mut buf = vec![0u8; PAGE_SIZE as usize];
                    crate::os::process_vm::read(src, &mut buf).and_then(|_| {
                        match self.uffd.copy(at, &buf, false) {
                            Err(Errno::EXIST) => Ok(()),
                            other => other,
                        }
                    })
                }
            };
            // EAGAIN: an event is pending, and no page can be filled until
            // it is read. Another thread waits for the service thread to
            // read it; the service thread itself cannot.
            if res == Err(Errno::AGAIN) && !on_service && std::time::Instant::now() < deadline {
                std::thread::yield_now();
                continue;
            }
            break res;
        };
        match res {
            Ok(()) => {
                if let Ok(r) = VaRange::from_len(src, PAGE_SIZE) {
                    let _ = crate::os::mm::dontneed(r);
                }
            }
            Err(e) => {
                // The data stays in the holder and the page exclusive; the
                // woken thread faults again (after the pending event).
                if e != Errno::AGAIN {
                    warn!("revoking exclusive access to {at}: {e}");
                }
                self.dev.lock().set_slot(vpn, slot);
                let _ = self.uffd.wake(page);
            }
        }
    }

    /// Revokes every exclusive page (before a fork, at release).
    pub(crate) fn revoke_all_exclusive(&self) {
        let vpns = self.dev.lock().exclusive_pages();
        for vpn in vpns {
            self.revoke_exclusive(vpn);
        }
    }
}
