//! Heterogeneous Memory Management (HMM) in userspace.
//!
//! A device that shares a process's virtual address space with the CPU needs
//! three things from the memory manager, which the Linux kernel gives its
//! drivers through HMM and this crate gives any userspace device runtime:
//!
//! 1. **An address space it can watch.** [`Mm`] is the process's address
//!    space: one userfaultfd, one service thread, and a tree of
//!    [interval notifiers](notifier) whose callbacks run whenever part of
//!    the address space changes (`munmap`, `madvise(MADV_DONTNEED)`, `mremap`,
//!    `fork`, or a notifying [`Mm::protect`]).
//! 2. **A way to read the CPU's page table.** [`Mm::range_fault`] snapshots a
//!    range into [`HmmPfn`] entries (valid, writable, error, map order, PFN),
//!    faulting in the pages a device asks for, built on `PAGEMAP_SCAN`,
//!    `PROCMAP_QUERY`, `/proc/self/pagemap` and `MADV_POPULATE_*`.
//! 3. **The sequence protocol** that makes the two race-free: take
//!    `read_begin`, fault the range, take the device lock, and install the
//!    entries only if `read_retry` is false; the invalidate callback takes the
//!    same lock and calls `set_seq`. The rules are written down in
//!    [`notifier`].
//!
//! All system calls and `unsafe` code live in [`os`]; the rest is safe code.
//!
//! # Example
//! Mirror a buffer for a device: fault it in writable and read back what the
//! CPU maps, under the sequence protocol.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use hmm::notifier::{Interval, IntervalNotifierOps, NotifierRange};
//! use hmm::os::mm::{Mapping, Prot};
//! use hmm::{HmmPfn, HmmRange, Mm, PAGE_SIZE};
//!
//! /// The device page table: one entry per page, cleared on invalidation.
//! struct Device { table: Mutex<Vec<HmmPfn>> }
//!
//! impl IntervalNotifierOps for Device {
//!     fn invalidate(&self, sub: &Interval, _range: &NotifierRange, cur_seq: u64) -> bool {
//!         let mut table = self.table.lock().unwrap();
//!         sub.set_seq(cur_seq);
//!         table.iter_mut().for_each(|e| *e = HmmPfn::empty());
//!         true
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mm = Mm::get()?;
//! let buf = Mapping::anonymous(16 * PAGE_SIZE, Prot::READ | Prot::WRITE)?;
//! let dev = Arc::new(Device { table: Mutex::new(vec![HmmPfn::empty(); 16]) });
//! let notifier = mm.interval_notifier_insert(buf.addr(), buf.len(), dev.clone())?;
//!
//! let mut pfns = vec![HmmPfn::empty(); 16];
//! loop {
//!     let seq = notifier.read_begin();
//!     let mut range = HmmRange::new(&notifier, buf.range().start(), buf.range().end(), &mut pfns);
//!     range.notifier_seq = seq;
//!     range.default_flags = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
//!     match mm.range_fault(&mut range) {
//!         Err(hmm::Error::Busy) => continue,
//!         other => other?,
//!     }
//!     let mut table = dev.table.lock().unwrap();
//!     if notifier.read_retry(seq) {
//!         continue;
//!     }
//!     table.copy_from_slice(&pfns);
//!     break;
//! }
//! assert!(dev.table.lock().unwrap().iter().all(|e| e.contains(HmmPfn::VALID | HmmPfn::WRITE)));
//!
//! // The CPU drops the pages: the device hears of it before madvise returns to a second call.
//! hmm::os::mm::dontneed(buf.range())?;
//! notifier.remove()?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod addr;
#[cfg(not(loom))]
pub mod devmem;
#[cfg(not(loom))]
pub(crate) mod doomed;
pub mod error;
#[cfg(not(loom))]
pub mod exclusive;
#[cfg(not(loom))]
pub mod info;
#[cfg(not(loom))]
pub mod migrate;
#[cfg(not(loom))]
pub mod mirror;
#[cfg(not(loom))]
pub mod mm;
pub mod notifier;
pub mod os;
pub mod pfn;
#[cfg(not(loom))]
pub mod range;
pub mod rangelock;
#[cfg(not(loom))]
pub(crate) mod rangeset;
#[cfg(not(loom))]
pub(crate) mod remaplog;
pub(crate) mod sync;
#[cfg(not(loom))]
pub mod testdev;
#[cfg(not(loom))]
mod vpnmap;

pub use addr::{PAGE_SHIFT, PAGE_SIZE, Pfn, VaRange, VirtAddr};
pub use error::{Error, Result};
#[cfg(not(loom))]
pub use mirror::{Mirror, MirrorOptions, Strategy};
#[cfg(not(loom))]
pub use mm::{Mm, MmOptions, MmStats};
pub use notifier::{Event, IntervalNotifier, IntervalNotifierOps, NotifierRange, OwnerId};
pub use pfn::HmmPfn;
#[cfg(not(loom))]
pub use range::HmmRange;
