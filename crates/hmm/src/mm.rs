//! The process address space: one [`Mm`] per process (`mm_struct` plus
//! `mmu_notifier_get`), owning the userfaultfd, its service thread and the
//! interval-notifier tree.
//!
//! # Where invalidations come from
//! The kernel calls `invalidate_range_start` from inside every page-table
//! change. Userspace learns of changes through userfaultfd's non-cooperative
//! events, which the service thread turns into invalidations with the kernel's
//! event kinds:
//!
//! | event | caller | invalidation |
//! |---|---|---|
//! | `REMOVE` | `madvise(MADV_DONTNEED/REMOVE)` | [`Event::Clear`] |
//! | `UNMAP` | `munmap`, `mmap(MAP_FIXED)` over a range | [`Event::Unmap`] |
//! | `REMAP` | `mremap` | [`Event::Unmap`] of the old range |
//!
//! Library operations invalidate *before* they act: [`Mm::protect`] sends
//! [`Event::ProtectionVma`] around its `mprotect`, and releasing the `Mm`
//! sends [`Event::Release`].
//!
//! Two of those events do not describe the address space as it is when they
//! are handled. A `REMOVE` comes *before* its zap, which runs once the event
//! is read: the pages it is about to free are noted so that walks take them
//! for absent meanwhile (`crate::doomed`). A moving `mremap`'s `UNMAP` of the
//! old range comes after its `REMAP`, when another `mremap` may already have
//! moved a mapping onto those addresses: `REMAP`s are logged and that
//! `UNMAP` spares what a later one moved in (`crate::remaplog`).
//!
//! # Fork
//! `fork` write-protects every private writable page for copy-on-write. The
//! kernel brackets that with `invalidate_range_start/end(PROTECTION_PAGE)`;
//! here `pthread_atfork` handlers do the same: the prepare handler starts an
//! [`Event::ProtectionPage`] invalidation of every registered private
//! writable range, and the parent handler ends it once `fork` has returned,
//! so no device fault can install a writable entry in between.
//!
//! userfaultfd's own `UFFD_EVENT_FORK` is deliberately not used: glibc's
//! `fork` holds the malloc arena locks while the kernel makes the forking
//! thread wait for the monitor to read that event, so a service thread that
//! allocates while handling an earlier event deadlocks with it (observed on
//! 6.18 with glibc 2.36).
//!
//! # Registration
//! Events arrive only for ranges registered with the userfaultfd. Every VMA
//! a device faults through [`Mm::range_fault`](crate::range) is registered,
//! whole (a partial registration would split the program's mapping), in
//! write-protect mode first (which costs nothing until a page is
//! write-protected and delivers exactly the events above), so a device can
//! only ever map what the `Mm` hears about. Mappings userfaultfd cannot
//! register (regular-file mappings) are still snapshotted and faulted, but
//! mirrored without invalidation events: [`Mm::is_registered`] tells which.
//! A VMA registered before is probed rather than registered again (a
//! registration takes the mmap lock for writing; see
//! `MmCore::still_registered`).
//!
//! # Lifetime
//! [`Mm`] handles are counted; dropping the last one (or calling
//! [`Mm::release`]) sends `Release` to every notifier, unregisters every
//! range, stops the service thread and closes the userfaultfd. Later calls on
//! any handle of it return [`Error::Released`]. Notifier handles stay usable
//! (their `read_begin` never blocks on a released `Mm`), as the kernel's stay
//! valid after `exit_mmap`. After `fork` the child's [`Mm::get`] builds a new
//! `Mm`; the parent's handles copied into the child report `Released` there.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::thread::{JoinHandle, ThreadId};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::addr::{VaRange, VirtAddr};
use crate::error::{Error, Result};
use crate::notifier::{Event, IntervalNotifier, IntervalNotifierOps, NotifierRange, Subscriptions};
use crate::os::mm::Prot;
use crate::os::pagemap::{Category, Pagemap, ScanFilter};
use crate::os::procmap::{ProcMaps, VmaFlags};
use crate::os::uffd::{Features, Message, PagefaultFlags, RegisterMode, Uffd};
use crate::rangeset::RangeSet;
use crate::sync::{AtomicBool, AtomicU64, Condvar, Mutex, Ordering};

/// userfaultfd features the library cannot work without, with what each is for.
pub const REQUIRED_FEATURES: &[(Features, &str)] = &[
    (
        Features::EVENT_REMOVE,
        "madvise(MADV_DONTNEED) invalidations",
    ),
    (Features::EVENT_UNMAP, "munmap invalidations"),
    (Features::EVENT_REMAP, "mremap invalidations"),
    (Features::THREAD_ID, "fault attribution"),
];

/// userfaultfd features used where the kernel has them.
pub const OPTIONAL_FEATURES: Features = Features::MOVE
    .union(Features::WP_UNPOPULATED)
    .union(Features::WP_HUGETLBFS_SHMEM)
    .union(Features::MISSING_SHMEM)
    .union(Features::MISSING_HUGETLBFS)
    .union(Features::PAGEFAULT_FLAG_WP)
    .union(Features::POISON);

/// Counters of the service thread, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmStats {
    /// `REMOVE` events handled.
    pub removes: u64,
    /// `UNMAP` events handled.
    pub unmaps: u64,
    /// `REMAP` events handled.
    pub remaps: u64,
    /// `FORK` events handled.
    pub forks: u64,
    /// Page faults served.
    pub faults: u64,
    /// `UFFDIO_REGISTER` calls made (a VMA found still registered needs none).
    pub registrations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    removes: AtomicU64,
    unmaps: AtomicU64,
    remaps: AtomicU64,
    forks: AtomicU64,
    faults: AtomicU64,
    registrations: AtomicU64,
}

/// Excludes forks from range-fault walks, as the mmap lock does in the kernel
/// (`hmm_range_fault` holds it for reading, `fork` takes it for writing).
/// Without it, a `PROCMAP_QUERY` racing `fork` on 6.18 can miss the VMA
/// covering an address while `dup_mmap` holds the VMAs write-locked.
#[derive(Debug, Default)]
pub(crate) struct ForkGate {
    state: Mutex<(u32, bool)>,
    cv: Condvar,
}

/// A walk in progress; the gate reopens to forks when the last one drops.
#[derive(Debug)]
pub(crate) struct WalkGuard<'a>(&'a ForkGate);

impl ForkGate {
    /// Enters a walk, waiting while a fork is in progress.
    pub(crate) fn walk(&self) -> WalkGuard<'_> {
        self.enter();
        WalkGuard(self)
    }

    /// [`Self::walk`] without a guard: the caller calls [`Self::leave`]
    /// (a migration spans several calls).
    pub(crate) fn enter(&self) {
        let mut st = self.state.lock();
        while st.1 {
            st = self.cv.wait(st);
        }
        st.0 += 1;
    }

    /// Ends what [`Self::enter`] began.
    pub(crate) fn leave(&self) {
        let mut st = self.state.lock();
        st.0 -= 1;
        drop(st);
        self.cv.notify_all();
    }

    /// Closes the gate for a fork and waits for walks in progress to end.
    fn close(&self) {
        let mut st = self.state.lock();
        st.1 = true;
        while st.0 > 0 {
            st = self.cv.wait(st);
        }
    }

    /// Reopens the gate after the fork.
    fn open(&self) {
        self.state.lock().1 = false;
        self.cv.notify_all();
    }
}

impl Drop for WalkGuard<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Options for creating the process's [`Mm`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MmOptions {
    /// Pin the service thread to this CPU.
    pub service_cpu: Option<usize>,
}

/// The state shared by the handles and the service thread.
#[derive(Debug)]
pub(crate) struct MmCore {
    pid: u32,
    pub(crate) uffd: Uffd,
    pub(crate) subs: Arc<Subscriptions>,
    pub(crate) pagemap: Pagemap,
    pub(crate) maps: ProcMaps,
    /// The PFN reported for the shared zero page (see [`Mm::zero_pfn`]).
    pub(crate) zero_pfn: u64,
    /// Range-fault walks versus forks.
    pub(crate) fork_gate: ForkGate,
    /// Ranges registered with `uffd` (write-protect mode at least).
    registered: Mutex<RangeSet>,
    /// A VMA query and its registration (shared) versus the service
    /// thread's event reads (exclusive); see [`Self::query_registered`].
    layout: parking_lot::RwLock<()>,
    /// The device table: which pages device memory or a migration holds.
    pub(crate) dev: Mutex<crate::migrate::DevState>,
    /// Signalled when the service thread took a migration's own zap event
    /// (a generation count and its condition variable).
    pub(crate) removal_acks: (Mutex<u64>, Condvar),
    /// A second userfaultfd, without events, that owns the regions pages
    /// are moved into (migration staging, host-storage device memory):
    /// `UFFDIO_MOVE` needs its destination registered, and these regions
    /// must not raise events on the main one.
    mover: Option<Uffd>,
    /// Private ranges whose pages may be shared copy-on-write with a child
    /// since a fork, so a present page there is not known to be writable.
    pub(crate) fork_shared: Mutex<RangeSet>,
    /// Pages a `REMOVE` event announced and the kernel may not have zapped yet.
    pub(crate) doomed: crate::doomed::Doomed,
    /// The recent `REMAP` events, against stale `UNMAP`s (service thread only).
    remaps: Mutex<crate::remaplog::RemapLog>,
    released: AtomicBool,
    stop: OwnedFd,
    service: StdMutex<Option<(JoinHandle<()>, ThreadId)>>,
    counters: Counters,
}

/// A handle on the process's address space. Cloning is cheap; the last handle
/// dropped releases it.
#[derive(Clone, Debug)]
pub struct Mm {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    core: Arc<MmCore>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // A new `Mm` ([`Mm::get`]) waits until this one is released: two
        // at once would fight over the same VMAs (the old one unregistering
        // ranges whose addresses the new one already registered again).
        let _current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        self.core.release();
    }
}

/// The process's current `Mm`, by pid so that a forked child builds its own.
static CURRENT: StdMutex<Current> = StdMutex::new(None);

/// The process's current `Mm`: its pid and a weak reference to its handle.
type Current = Option<(u32, Weak<Handle>)>;

thread_local! {
    /// `CURRENT`, held by the forking thread from `prepare` to `parent`/`child`.
    static HELD_ACROSS_FORK: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Current>>> =
        const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// The invalidations the prepare handler started, ended by the parent handler.
    static FORK_BRACKET: std::cell::RefCell<Option<(Arc<Handle>, Vec<NotifierRange>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Before `fork` (and before glibc takes its own locks): start the
/// `ProtectionPage` invalidations of the current `Mm`, then hold `CURRENT`.
extern "C" fn fork_prepare() {
    let handle = {
        let cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref()
            .filter(|(p, _)| *p == pid())
            .and_then(|(_, w)| w.upgrade())
    };
    if let Some(handle) = handle {
        let started = handle.core.fork_begin();
        handle.core.fork_gate.close();
        // No migration runs now: give the child the device pages' data.
        handle.core.fork_devices_begin();
        FORK_BRACKET.with(|b| *b.borrow_mut() = Some((handle, started)));
    }
    let guard = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    HELD_ACROSS_FORK.with(|h| *h.borrow_mut() = Some(guard));
}

/// After `fork` in the parent: the page tables are copied and write-protected;
/// end the invalidations.
extern "C" fn fork_parent() {
    HELD_ACROSS_FORK.with(|h| drop(h.borrow_mut().take()));
    if let Some((handle, started)) = FORK_BRACKET.with(|b| b.borrow_mut().take()) {
        handle.core.fork_devices_end();
        handle.core.fork_gate.open();
        for nr in &started {
            handle.core.subs.invalidate_range_end(nr);
        }
    }
}

/// After `fork` in the child: the parent's `Mm` is not ours; drop nothing of it.
extern "C" fn fork_child() {
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
    HELD_ACROSS_FORK.with(|h| drop(h.borrow_mut().take()));
    if let Some((handle, _started)) = FORK_BRACKET.with(|b| b.borrow_mut().take()) {
        // Releasing it here would act on the parent's userfaultfd.
        std::mem::forget(handle);
    }
}

/// Installs the fork handlers once.
///
/// Not a `Once`: a child forked while another thread runs `call_once` would
/// inherit it running and wait forever. An atomic flag never waits.
fn install_fork_handlers() {
    static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !INSTALLED.swap(true, std::sync::atomic::Ordering::AcqRel)
        && let Err(e) = crate::os::process::atfork(fork_prepare, fork_parent, fork_child)
    {
        warn!("pthread_atfork: {e}");
    }
}

/// This process's id, or 0 before it is first asked for (and again in a
/// forked child, whose handler clears it): `getpid` is a system call, and
/// every call into an `Mm` checks the pid.
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn pid() -> u32 {
    use std::sync::atomic::Ordering::Relaxed;
    match PID.load(Relaxed) {
        0 => {
            let p = rustix::process::getpid().as_raw_nonzero().get() as u32;
            PID.store(p, Relaxed);
            p
        }
        p => p,
    }
}

impl Mm {
    /// The process's address space: the same `Mm` while any handle lives,
    /// a new one in a forked child.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the missing piece when userfaultfd (or a
    /// required feature of it), `PAGEMAP_SCAN` or `PROCMAP_QUERY` is not
    /// available, with how to fix it; [`Error::Os`] for other failures.
    pub fn get() -> Result<Mm> {
        Self::get_with(MmOptions::default())
    }

    /// As [`Mm::get`], with options that apply if a new `Mm` is created.
    ///
    /// # Errors
    /// As [`Mm::get`].
    pub fn get_with(options: MmOptions) -> Result<Mm> {
        install_fork_handlers();
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let me = pid();
        if let Some((p, weak)) = cur.as_ref()
            && *p == me
            && let Some(handle) = weak.upgrade()
        {
            return Ok(Mm { handle });
        }
        let core = MmCore::new(me, options)?;
        let handle = Arc::new(Handle { core });
        *cur = Some((me, Arc::downgrade(&handle)));
        Ok(Mm { handle })
    }

    pub(crate) fn core(&self) -> Result<&Arc<MmCore>> {
        let core = &self.handle.core;
        if core.released.load(Ordering::Acquire) || core.pid != pid() {
            return Err(Error::Released);
        }
        Ok(core)
    }

    /// Inserts an interval notifier over `[start, start + length)`
    /// (`mmu_interval_notifier_insert`).
    ///
    /// # Errors
    /// [`Error::Overflow`] for an empty or overflowing interval,
    /// [`Error::Released`] after release.
    pub fn interval_notifier_insert(
        &self,
        start: VirtAddr,
        length: u64,
        ops: Arc<dyn IntervalNotifierOps>,
    ) -> Result<IntervalNotifier> {
        self.core()?.subs.insert(start, length, ops)
    }

    /// The notifier tree, for callers that drive invalidations themselves.
    ///
    /// # Errors
    /// [`Error::Released`] after release.
    pub fn subscriptions(&self) -> Result<Arc<Subscriptions>> {
        Ok(self.core()?.subs.clone())
    }

    /// Registers the userfaultfd-capable mappings of `range` so that changes to
    /// them are heard (done automatically by the range fault).
    ///
    /// # Errors
    /// [`Error::Released`], or the `Errno` of a failed registration other than
    /// an unregistrable mapping.
    pub fn register(&self, range: VaRange) -> Result<()> {
        self.core()?.ensure_registered(range)
    }

    /// Whether every byte of `range` is mapped and registered with this
    /// address space's userfaultfd, so that its changes raise invalidations.
    /// Asks the kernel (`/proc/self/smaps`), so it is slow: for tests and
    /// diagnostics.
    ///
    /// # Errors
    /// [`Error::Released`] after release; [`Error::Os`] when smaps cannot be read.
    pub fn is_registered(&self, range: VaRange) -> Result<bool> {
        self.core()?;
        let vmas = crate::os::procmap::uffd_registration(range).map_err(|e| {
            Error::os(
                "read /proc/self/smaps",
                Errno::from_io_error(&e).unwrap_or(Errno::IO),
            )
        })?;
        let mut cur = range.start();
        for (start, end, wp, _) in vmas {
            if start > cur || !wp {
                return Ok(false);
            }
            cur = end;
        }
        Ok(cur >= range.end())
    }

    /// Changes the protection of `range` the notifying way: an
    /// [`Event::ProtectionVma`] invalidation brackets the `mprotect`, so a
    /// device never keeps a permission the CPU lost.
    ///
    /// # Errors
    /// [`Error::Released`]; the `Errno` of `mprotect(2)` as [`Error::Os`].
    pub fn protect(&self, range: VaRange, prot: Prot) -> Result<()> {
        let core = self.core()?;
        let nr = NotifierRange {
            start: range.start(),
            end: range.end(),
            event: Event::ProtectionVma,
            blockable: true,
            owner: None,
        };
        core.subs.invalidate_range_start(&nr)?;
        let res = crate::os::mm::mprotect(range, prot).map_err(|e| Error::os("mprotect", e));
        core.subs.invalidate_range_end(&nr);
        res
    }

    /// The service thread's counters.
    pub fn stats(&self) -> MmStats {
        let c = &self.handle.core.counters;
        MmStats {
            removes: c.removes.load(Ordering::Relaxed),
            unmaps: c.unmaps.load(Ordering::Relaxed),
            remaps: c.remaps.load(Ordering::Relaxed),
            forks: c.forks.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            registrations: c.registrations.load(Ordering::Relaxed),
        }
    }

    /// The PFN the range fault reports for the shared zero page: the real one
    /// for root, [`ZERO_PFN_SENTINEL`] otherwise. Reported even when PFN
    /// lookup is off, so a device can always tell the zero page (`is_zero_pfn`).
    pub fn zero_pfn(&self) -> crate::addr::Pfn {
        crate::addr::Pfn(self.handle.core.zero_pfn)
    }

    /// The userfaultfd features in use.
    pub fn features(&self) -> Features {
        self.handle.core.uffd.features()
    }

    /// Releases the address space now, as dropping the last handle would.
    /// Idempotent.
    pub fn release(&self) {
        self.handle.core.release();
    }

    /// Whether the address space was released.
    pub fn is_released(&self) -> bool {
        self.core().is_err()
    }

    /// Whether two handles refer to the same address space.
    pub fn same(&self, other: &Mm) -> bool {
        Arc::ptr_eq(&self.handle, &other.handle)
    }
}

fn unsupported_uffd(e: Errno) -> Error {
    match e {
        Errno::PERM | Errno::ACCESS => Error::Unsupported {
            feature: "userfaultfd",
            hint: "the kernel refuses userfaultfd to this user: run as root (or with \
                   CAP_SYS_PTRACE), or allow it with `sysctl -w vm.unprivileged_userfaultfd=1`",
        },
        Errno::NOSYS => Error::Unsupported {
            feature: "userfaultfd",
            hint: "the kernel was built without CONFIG_USERFAULTFD",
        },
        e => Error::os("userfaultfd", e),
    }
}

impl MmCore {
    fn new(pid: u32, options: MmOptions) -> Result<Arc<Self>> {
        let caps = Uffd::probe().map_err(unsupported_uffd)?;
        let mut wanted = Features::empty();
        for (f, _) in REQUIRED_FEATURES {
            if !caps.features.contains(*f) {
                return Err(Error::Unsupported {
                    feature: f
                        .names()
                        .first()
                        .copied()
                        .unwrap_or("a userfaultfd feature"),
                    hint: "the kernel's userfaultfd lacks a required feature (Linux 4.11+ has all events)",
                });
            }
            wanted |= *f;
        }
        wanted |= caps.features & OPTIONAL_FEATURES;
        let uffd = Uffd::open(wanted, true).map_err(unsupported_uffd)?;
        let pagemap = Pagemap::open().map_err(|e| Error::os("open /proc/self/pagemap", e))?;
        let maps = ProcMaps::open().map_err(|e| Error::os("open /proc/self/maps", e))?;
        probe_scan_and_query(&pagemap, &maps)?;
        let zero_pfn = probe_zero_pfn(&pagemap);
        let mover = if caps.features.contains(Features::MOVE) {
            Some(Uffd::open(Features::MOVE, true).map_err(unsupported_uffd)?)
        } else {
            None
        };
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| Error::os("eventfd", e))?;
        let core = Arc::new(MmCore {
            pid,
            uffd,
            subs: Subscriptions::new(),
            pagemap,
            maps,
            zero_pfn,
            fork_gate: ForkGate::default(),
            registered: Mutex::new(RangeSet::new()),
            layout: parking_lot::RwLock::new(()),
            dev: Mutex::new(crate::migrate::DevState::default()),
            removal_acks: (Mutex::new(0), Condvar::new()),
            mover,
            fork_shared: Mutex::new(RangeSet::new()),
            doomed: crate::doomed::Doomed::default(),
            remaps: Mutex::new(crate::remaplog::RemapLog::default()),
            released: AtomicBool::new(false),
            stop,
            service: StdMutex::new(None),
            counters: Counters::default(),
        });
        let thread_core = core.clone();
        let (ready_tx, ready) = std::sync::mpsc::sync_channel::<()>(1);
        let join = std::thread::Builder::new()
            .name("hmm-mm-service".into())
            .stack_size(SERVICE_STACK)
            .spawn(move || {
                // Populated before anything is registered: a fault on its
                // own stack is one the service thread could never serve.
                crate::sync::probe_stack(SERVICE_STACK_PROBED / crate::sync::STACK_RESERVE);
                let _ = ready_tx.send(());
                if let Some(cpu) = options.service_cpu
                    && let Err(e) = crate::os::mm::pin_current_thread(cpu)
                {
                    warn!("cannot pin the service thread to cpu {cpu}: {e}");
                }
                thread_core.service_loop();
            })
            .map_err(|_| Error::NoMem)?;
        let _ = ready.recv();
        let tid = join.thread().id();
        *core.service.lock().unwrap_or_else(|e| e.into_inner()) = Some((join, tid));
        Ok(core)
    }

    /// The VMAs overlapping `range`, each with the part of `range` it covers.
    pub(crate) fn vmas_in(
        &self,
        range: VaRange,
    ) -> Result<Vec<(crate::os::procmap::Vma, VaRange)>> {
        let mut out = Vec::new();
        let mut cur = range.start();
        while cur < range.end() {
            let Some(vma) = self
                .maps
                .query(cur, true)
                .map_err(|e| Error::os("PROCMAP_QUERY", e))?
            else {
                break;
            };
            if vma.start >= range.end() {
                break;
            }
            let part = VaRange::new(vma.start.max(cur), vma.end.min(range.end()))?;
            out.push((vma, part));
            cur = part.end();
        }
        Ok(out)
    }

    /// Registers every VMA overlapping `range`, whole.
    ///
    /// Always asks the kernel (registering a range this userfaultfd already
    /// holds changes nothing): `munmap` returns as soon as its `UNMAP` event
    /// is read, before the service thread processes it, so the bookkeeping in
    /// `registered` can be stale for a range that was unmapped and mapped
    /// again, and trusting it would leave the new mapping unheard.
    pub(crate) fn ensure_registered(&self, range: VaRange) -> Result<()> {
        let mut cur = range.start();
        while cur < range.end() {
            match self.query_registered(cur)? {
                Some(v) if v.start <= cur => cur = v.end,
                Some(v) if v.start < range.end() => cur = v.start,
                _ => break,
            }
        }
        Ok(())
    }

    /// The VMA covering `at`, or the next one above it; a covering VMA is
    /// registered whole ([`Self::register_vma`]) before this returns.
    ///
    /// The query and the registration hold `layout` shared, and the service
    /// thread reads events holding it exclusive. A registered VMA cannot be
    /// unmapped or moved in between: `munmap` and `mremap` of it wait until
    /// their event is read. Without that, the mapping queried could be
    /// replaced by a larger one before the registration, which would then
    /// cover part of the new VMA and split it.
    pub(crate) fn query_registered(&self, at: VirtAddr) -> Result<Option<crate::os::procmap::Vma>> {
        let _layout = self.layout_read();
        let vma = self
            .maps
            .query(at, true)
            .map_err(|e| Error::os("PROCMAP_QUERY", e))?;
        if let Some(v) = &vma
            && v.start <= at
        {
            self.register_vma(v)?;
        }
        Ok(vma)
    }

    /// Registers one VMA, whole: registering part of it would split it, and
    /// the program's own mremap of the mapping would then fail (it needs one
    /// VMA). Whole VMAs are also whole hugetlb pages. The range fault calls
    /// this for each VMA right before scanning it, so a mapping that appears
    /// during a fault is never mirrored unregistered.
    fn register_vma(&self, vma: &crate::os::procmap::Vma) -> Result<()> {
        let Ok(piece) = VaRange::new(vma.start, vma.end) else {
            return Ok(());
        };
        let known = self.registered.lock().covers(piece);
        if known && self.still_registered(piece) {
            return Ok(());
        }
        self.counters.registrations.fetch_add(1, Ordering::Relaxed);
        match self.uffd.register(piece, RegisterMode::WP) {
            Ok(_) => {
                self.registered.lock().insert(piece);
                if !known {
                    self.register_split_remainder(vma, piece)?;
                }
            }
            // A regular-file mapping, or a VMA kind WP mode does not
            // support here: mirrored without invalidation events.
            Err(Errno::INVAL) => debug!("{piece:?} cannot be registered with userfaultfd"),
            // Another userfaultfd (the application's own) holds it.
            Err(Errno::BUSY) => warn!("{piece:?} is registered with another userfaultfd"),
            // The mapping went away meanwhile: nothing to hear about.
            Err(Errno::NOMEM) => {}
            Err(e) => return Err(Error::os("UFFDIO_REGISTER", e)),
        }
        Ok(())
    }

    /// Whether `piece`, one VMA the bookkeeping says is registered, still
    /// is: then it needs no `UFFDIO_REGISTER`, which takes the mmap lock for
    /// writing and, issued on every device fault, held up every `madvise`
    /// and page fault of the program.
    ///
    /// The probe is `UFFDIO_WRITEPROTECT` clearing the VMA's first page
    /// (nothing of ours is ever write-protected, so it changes nothing),
    /// under the mmap *read* lock: `ENOENT` when the VMA there is not
    /// registered in WP mode, `EAGAIN` while an unmap, remap or remove of a
    /// registered range is in flight (from before the kernel changes the
    /// mapping until its event is read; `kernel_facts` checks both). The
    /// caller holds `layout`, so every event read has been handled and the
    /// bookkeeping is current unless an event is in flight; with none in
    /// flight, a registered VMA at the start of `piece` is the one the
    /// bookkeeping knows (an unregistered mapping never merges with it, and
    /// splits and in-place growth keep the registration). Anything but
    /// success registers again.
    fn still_registered(&self, piece: VaRange) -> bool {
        self.wp_probe(piece.start()).is_ok()
    }

    /// `UFFDIO_WRITEPROTECT` clearing the page at `at`, which changes
    /// nothing of ours (see [`Self::still_registered`]): `EAGAIN` while an
    /// address-space event of the main userfaultfd is in flight, `ENOENT`
    /// when the VMA there is not registered in WP mode.
    pub(crate) fn wp_probe(&self, at: VirtAddr) -> std::result::Result<(), Errno> {
        let page =
            VaRange::from_len(at.page_down(), crate::addr::PAGE_SIZE).map_err(|_| Errno::INVAL)?;
        self.uffd.writeprotect(page, false, true)
    }

    /// Registers what a first registration split off a VMA that grew
    /// meanwhile.
    ///
    /// `vma` came from a query made before the registration. `layout` keeps
    /// a registered VMA from being replaced in between, but an unregistered
    /// one can be unmapped without an event: if a mapping was then created
    /// in its place and merged with a neighbour, the registration covered
    /// part of the new VMA and split it. The program's
    /// `mremap` of its whole mapping would then fail with `EFAULT` (the
    /// range spans two VMAs). An unregistered neighbour of the same kind
    /// right against `piece` is such a remainder (or a new mapping the
    /// kernel kept apart only because of the registration): registering it
    /// too lets the kernel merge the halves again. A few passes, as the
    /// layout may change again meanwhile.
    fn register_split_remainder(
        &self,
        vma: &crate::os::procmap::Vma,
        piece: VaRange,
    ) -> Result<()> {
        let same_kind = |n: &crate::os::procmap::Vma| {
            n.flags == vma.flags && n.page_size == vma.page_size && n.inode == vma.inode
        };
        let mut piece = piece;
        for _ in 0..4 {
            let mut grew = false;
            let before = piece.start().get().checked_sub(1).map(VirtAddr);
            let sides = [Some(piece.end()), before];
            for at in sides.into_iter().flatten() {
                let Ok(Some(n)) = self.maps.query(at, false) else {
                    continue;
                };
                let adjacent = n.start == piece.end() || n.end == piece.start();
                let Ok(next) = VaRange::new(n.start, n.end) else {
                    continue;
                };
                if !adjacent || !same_kind(&n) || self.registered.lock().covers(next) {
                    continue;
                }
                self.counters.registrations.fetch_add(1, Ordering::Relaxed);
                match self.uffd.register(next, RegisterMode::WP) {
                    Ok(_) => {
                        self.registered.lock().insert(next);
                        grew = true;
                    }
                    Err(Errno::INVAL | Errno::BUSY | Errno::NOMEM) => continue,
                    Err(e) => return Err(Error::os("UFFDIO_REGISTER", e)),
                }
                let lo = piece.start().min(next.start());
                let hi = piece.end().max(next.end());
                piece = VaRange::new(lo, hi)?;
            }
            if !grew {
                break;
            }
        }
        Ok(())
    }

    /// Whether the caller is this address space's service thread.
    pub(crate) fn on_service_thread(&self) -> bool {
        let me = std::thread::current().id();
        self.service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(_, tid)| *tid == me)
    }

    /// The layout lock, shared (see [`Self::query_registered`]), taken with
    /// the stack below populated ([`crate::sync::reserve_stack`]).
    pub(crate) fn layout_read(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        crate::sync::reserve_stack();
        self.layout.read()
    }

    /// The layout lock, shared, once no address-space event is in flight
    /// (waiting at most 5 s): for recording state by address. The kernel
    /// frees an unmapped range before its `UNMAP` event is read, so another
    /// thread may map the addresses again meanwhile; state recorded for the
    /// new mapping while that event is in flight would be taken for the old
    /// one's when it is read. Once none is in flight (and `layout` keeps the
    /// service thread from reading until the guard drops), every event read
    /// later is about a change made after the recording. Not for notifier
    /// callbacks, which run on the thread that reads the events.
    pub(crate) fn layout_read_settled(&self, at: VirtAddr) -> parking_lot::RwLockReadGuard<'_, ()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let layout = self.layout_read();
            if self.wp_probe(at) != Err(Errno::AGAIN) || std::time::Instant::now() >= deadline {
                return layout;
            }
            drop(layout);
            std::thread::yield_now();
        }
    }

    /// Records `range` as registered.
    pub(crate) fn note_registered(&self, range: VaRange) {
        self.registered.lock().insert(range);
    }

    /// The event-less userfaultfd for `UFFDIO_MOVE` into library regions.
    ///
    /// # Errors
    /// [`Error::Unsupported`] on a kernel without `UFFDIO_MOVE`.
    pub(crate) fn mover(&self) -> Result<&Uffd> {
        self.mover.as_ref().ok_or(Error::Unsupported {
            feature: "UFFD_FEATURE_MOVE",
            hint: "moving pages needs Linux 6.8+",
        })
    }

    /// A private anonymous region of `bytes`, PMD-aligned, registered with
    /// the mover userfaultfd so pages can be moved into it. Write-protect
    /// mode only: touching it never faults to anyone.
    ///
    /// # Errors
    /// [`Error::Os`] when it cannot be mapped or registered.
    pub(crate) fn host_region(&self, bytes: u64) -> Result<crate::os::mm::Mapping> {
        self.library_region(bytes, self.mover()?)
    }

    /// A migration's staging region: like [`Self::host_region`] but
    /// registered with the main userfaultfd, so that moves into it are
    /// refused (`EAGAIN`) while an unmap or remap event is pending.
    ///
    /// # Errors
    /// [`Error::Os`] when it cannot be mapped or registered.
    pub(crate) fn staging_region(&self, bytes: u64) -> Result<crate::os::mm::Mapping> {
        self.library_region(bytes, &self.uffd)
    }

    fn library_region(&self, bytes: u64, uffd: &Uffd) -> Result<crate::os::mm::Mapping> {
        // Mapped and registered as one step against VMA registrations: one
        // that registers a fresh neighbour it split off
        // ([`Self::register_split_remainder`]) must not take this region
        // in between.
        crate::sync::reserve_stack();
        let _layout = self.layout.write();
        let map = crate::os::mm::Mapping::anonymous_aligned(
            bytes,
            1 << crate::addr::PMD_SHIFT,
            Prot::READ | Prot::WRITE,
        )
        .map_err(|e| Error::os("mmap", e))?;
        // A child never needs these (it gets device data as of the fork in
        // its own pages), and pages shared copy-on-write with one could not
        // be moved out any more.
        crate::os::mm::dontfork(map.range()).map_err(|e| Error::os("madvise(MADV_DONTFORK)", e))?;
        uffd.register(map.range(), RegisterMode::WP)
            .map_err(|e| Error::os("UFFDIO_REGISTER", e))?;
        Ok(map)
    }

    fn invalidate(&self, start: VirtAddr, end: VirtAddr, event: Event) {
        if self.released.load(Ordering::Acquire) || start >= end {
            return;
        }
        let nr = NotifierRange {
            start,
            end,
            event,
            blockable: true,
            owner: None,
        };
        if let Err(e) = self.subs.invalidate(&nr) {
            warn!("invalidation {event:?} {start}..{end} failed: {e}");
        }
    }

    fn handle(&self, msg: Message) {
        match msg {
            Message::Remove { start, end } => {
                self.counters.removes.fetch_add(1, Ordering::Relaxed);
                let range = VaRange::new(start, end).ok();
                if let Some(r) = range
                    && self.dev.lock().ack_self_removal(r)
                {
                    // A migration zapping what it isolated: not a discard.
                    self.removals_handled();
                    return;
                }
                self.invalidate(start, end, Event::Clear);
                if let Some(r) = range {
                    // DONTNEED'd private pages come back exclusive.
                    self.fork_shared.lock().remove(r);
                    let freed = self.dev.lock().discard(r, true);
                    drop(freed);
                }
            }
            Message::Unmap { start, end } => {
                self.counters.unmaps.fetch_add(1, Ordering::Relaxed);
                self.invalidate(start, end, Event::Unmap);
                let Ok(r) = VaRange::new(start, end) else {
                    return;
                };
                // Not what a later mremap moved here (`crate::remaplog`).
                let parts = self.remaps.lock().unmap(r, std::time::Instant::now());
                for part in parts {
                    self.registered.lock().remove(part);
                    self.fork_shared.lock().remove(part);
                    let freed = self.dev.lock().discard(part, false);
                    drop(freed);
                }
            }
            Message::Remap { from, to, len } => {
                self.counters.remaps.fetch_add(1, Ordering::Relaxed);
                if let (Ok(old), Ok(new)) =
                    (VaRange::from_len(from, len), VaRange::from_len(to, len))
                {
                    self.remaps
                        .lock()
                        .remap(old, new, std::time::Instant::now());
                    let mut reg = self.registered.lock();
                    let moved = !reg.overlapping(old).is_empty();
                    reg.remove(old);
                    if moved {
                        // The moved VMA keeps its userfaultfd context.
                        reg.insert(new);
                    }
                    drop(reg);
                    let mut fs = self.fork_shared.lock();
                    if fs.intersects(old) {
                        fs.remove(old);
                        fs.insert(new);
                    }
                    drop(fs);
                    // Device pages move with the mapping.
                    let freed = self.dev.lock().remap(from, to, len);
                    drop(freed);
                }
                self.invalidate(from, from.checked_add(len).unwrap_or(from), Event::Unmap);
            }
            Message::Fork { child } => {
                // Not requested (see "Fork" above); if it ever arrives, closing
                // the child's userfaultfd unregisters the child's copies.
                drop(child);
            }
            Message::Pagefault { address, flags, .. } => {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                let page = VaRange::from_len(address.page_down(), crate::addr::PAGE_SIZE);
                if flags.contains(PagefaultFlags::WP) {
                    // A device page's shadow during a fork waits for it;
                    // nothing else here write-protects pages.
                    if self.park_shadow_write(address) {
                    } else if let Ok(r) = page
                        && let Err(e) = self.uffd.writeprotect(r, false, false)
                    {
                        // EAGAIN: an event is pending (the page may be gone
                        // by then); the woken thread faults again.
                        if e != Errno::AGAIN {
                            warn!("UFFDIO_WRITEPROTECT {r:?}: {e}");
                        }
                        let _ = self.uffd.wake(r);
                    }
                } else {
                    // Ranges are registered for MISSING faults only while
                    // they hold device pages.
                    self.handle_missing(address, flags.contains(PagefaultFlags::WRITE));
                }
            }
            Message::Unknown(code) => warn!("unknown userfaultfd event {code:#x}"),
        }
    }

    /// Starts the `ProtectionPage` invalidations of a fork: every registered
    /// private writable range, whose pages the fork is about to share
    /// copy-on-write. Returns the ranges to end after the fork.
    fn fork_begin(&self) -> Vec<NotifierRange> {
        let mut started = Vec::new();
        if self.released.load(Ordering::Acquire) {
            return started;
        }
        self.counters.forks.fetch_add(1, Ordering::Relaxed);
        let ranges = self.registered.lock().ranges();
        for r in ranges {
            let Ok(vmas) = self.vmas_in(r) else { continue };
            for (vma, part) in vmas {
                if !vma.flags.contains(VmaFlags::WRITE) || vma.flags.contains(VmaFlags::SHARED) {
                    continue;
                }
                self.fork_shared.lock().insert(part);
                let nr = NotifierRange {
                    start: part.start(),
                    end: part.end(),
                    event: Event::ProtectionPage,
                    blockable: true,
                    owner: None,
                };
                match self.subs.invalidate_range_start(&nr) {
                    Ok(()) => started.push(nr),
                    Err(e) => warn!("fork invalidation {part:?}: {e}"),
                }
            }
        }
        started
    }

    fn service_loop(&self) {
        let mut msgs = Vec::with_capacity(16);
        // Wait only after a read that did not fill its buffer, which drained
        // the queue; after a full one more messages are usually queued, and
        // reading them at once saves the wait (one system call each).
        let mut idle = true;
        loop {
            if idle {
                let mut fds = [
                    PollFd::new(&self.uffd, PollFlags::IN),
                    PollFd::new(&self.stop, PollFlags::IN),
                ];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(e) => {
                        warn!("service thread: poll failed: {e}");
                        return;
                    }
                }
                if !fds[1].revents().is_empty() {
                    return;
                }
            }
            msgs.clear();
            // Read and handled under `layout`: `munmap` returns once its
            // event is read, so the addresses can be mapped and used again
            // before the event is handled; whoever records pages by address
            // (VMA registration, the device table) holds `layout` shared
            // and so comes after the handling, never before it.
            let layout = self.layout.write();
            match self.uffd.read_messages(&mut msgs) {
                Ok(n) => idle = n < crate::os::uffd::READ_BATCH,
                Err(e) => {
                    warn!("service thread: read failed: {e}");
                    return;
                }
            }
            // A REMOVE's zap follows its read: note what it is about to
            // free before anything else, so that walks do not take it and a
            // page zapped and faulted in again is rarely noted (see
            // `crate::doomed`).
            for m in &msgs {
                if let Message::Remove { start, end } = *m
                    && let Ok(r) = VaRange::new(start, end)
                {
                    self.doomed.record(&self.pagemap, r, self.zero_pfn);
                }
            }
            // Only these events change what the waits on removal_acks look at.
            let removals = msgs
                .iter()
                .any(|m| matches!(m, Message::Remove { .. } | Message::Unmap { .. }));
            // Device pages an unmap frees are discarded a run at a time.
            crate::devmem::free_in_batches(|| {
                for m in msgs.drain(..) {
                    self.handle(m);
                }
            });
            drop(layout);
            if !removals {
                continue;
            }
            self.removals_handled();
        }
    }

    /// Migrations and forks waiting for their zap's event look again.
    fn removals_handled(&self) {
        *self.removal_acks.0.lock() += 1;
        self.removal_acks.1.notify_all();
    }

    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.pid != pid() {
            // A forked child's copy of the parent's Mm: the service thread and
            // the userfaultfd context belong to the parent.
            return;
        }
        // 1. Device pages come back to system memory while faults can
        //    still be served, then no device may use the address space.
        self.revoke_all_exclusive();
        if let Ok(all) = VaRange::new(
            VirtAddr(crate::addr::PAGE_SIZE),
            VirtAddr(crate::addr::TASK_SIZE),
        ) && let Err(e) = self.bring_back(all, |_| true)
        {
            warn!("bringing device pages back at release: {e}");
        }
        let freed = std::mem::take(&mut *self.dev.lock());
        crate::devmem::free_in_batches(|| drop(freed));
        self.subs.release();
        // 2. Unregister while the service thread still drains events, so no
        //    munmap caller waits on an event nobody reads.
        let ranges = {
            let mut reg = self.registered.lock();
            let r = reg.ranges();
            reg.clear();
            r
        };
        for r in ranges {
            if let Err(e) = self.uffd.unregister(r) {
                debug!("UFFDIO_UNREGISTER {r:?}: {e}");
            }
        }
        // 3. Stop the service thread (unless we are it).
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        let service = self
            .service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((join, tid)) = service
            && tid != std::thread::current().id()
        {
            let _ = join.join();
        }
    }
}

/// The service thread's stack: it runs every notifier callback.
const SERVICE_STACK: usize = 1 << 20;

/// How much of [`SERVICE_STACK`] is populated when the thread starts (a
/// multiple of [`crate::sync::STACK_RESERVE`], leaving room for the frames
/// above the probe).
const SERVICE_STACK_PROBED: usize = 12 * crate::sync::STACK_RESERVE;

/// The PFN used for the zero page when the real one cannot be read: the
/// highest PFN the `hmm_pfn` format holds, which no RAM page has.
pub const ZERO_PFN_SENTINEL: u64 = crate::pfn::PFN_MASK;

/// The shared zero page's PFN from pagemap (root), or [`ZERO_PFN_SENTINEL`].
fn probe_zero_pfn(pagemap: &Pagemap) -> u64 {
    let Ok(m) = crate::os::mm::Mapping::anonymous(crate::addr::PAGE_SIZE, Prot::READ) else {
        return ZERO_PFN_SENTINEL;
    };
    m.no_hugepage();
    let _ = m.read_u64(0);
    let mut e = [crate::os::pagemap::Entry(0)];
    match pagemap.read_entries(m.range(), &mut e) {
        Ok(()) if e[0].pfn() != 0 => e[0].pfn(),
        _ => ZERO_PFN_SENTINEL,
    }
}

fn probe_scan_and_query(pagemap: &Pagemap, maps: &ProcMaps) -> Result<()> {
    // Any mapped page will do: the probe only checks that the ioctls exist.
    let probe = VirtAddr::from_ptr(&CURRENT as *const _ as *const u8).page_down();
    let range = VaRange::from_len(probe, crate::addr::PAGE_SIZE)?;
    let filter = ScanFilter {
        any_of: Category::PRESENT,
        returned: Category::PRESENT,
        ..Default::default()
    };
    match pagemap.scan(range, &filter, &mut Vec::new()) {
        Ok(()) => {}
        Err(Errno::NOTTY | Errno::INVAL) => {
            return Err(Error::Unsupported {
                feature: "PAGEMAP_SCAN",
                hint: "needs Linux 6.7 or later",
            });
        }
        Err(e) => return Err(Error::os("PAGEMAP_SCAN", e)),
    }
    match maps.query(probe, false) {
        Ok(_) => Ok(()),
        Err(Errno::NOTTY | Errno::INVAL) => Err(Error::Unsupported {
            feature: "PROCMAP_QUERY",
            hint: "needs Linux 6.11 or later",
        }),
        Err(e) => Err(Error::os("PROCMAP_QUERY", e)),
    }
}

impl AsFd for MmCore {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}
