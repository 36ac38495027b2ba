//! A small shim over the synchronization primitives so that `loom` can model
//! the concurrent algorithms (`RUSTFLAGS="--cfg loom"`).
//!
//! Outside loom the standard library's primitives are used; lock poisoning is
//! ignored because every critical section in this crate leaves its state
//! consistent before any call that could panic.

#[cfg(loom)]
use loom::sync as imp;
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
#[expect(
    unused_imports,
    reason = "only the address-space code uses it, and it is not built under loom"
)]
pub(crate) use loom::sync::atomic::AtomicBool;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(loom))]
use std::sync as imp;
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A mutex whose `lock` never reports poisoning.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(imp::Mutex<T>);

/// The guard of [`Mutex`].
pub(crate) type MutexGuard<'a, T> = imp::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub(crate) fn new(value: T) -> Self {
        Self(imp::Mutex::new(value))
    }

    /// Locks, waiting as long as needed; first makes sure the stack below
    /// is populated (see [`reserve_stack`]).
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(loom))]
        reserve_stack();
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks if that needs no waiting.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// A condition variable paired with [`Mutex`], which knows whether anyone
/// waits: `notify_all` with no waiter makes no system call (the standard
/// library's always does one, a `futex` wake, which the service thread paid
/// twice per event).
///
/// The count is exact for the usual pattern: the notifier changes the state
/// under the mutex and notifies after, the waiter checks it under the mutex
/// and waits. A waiter counts itself before `wait` releases the mutex, so a
/// notifier that took the mutex after that sees the count.
#[derive(Debug, Default)]
pub(crate) struct Condvar {
    cv: imp::Condvar,
    waiters: AtomicU64,
}

impl Condvar {
    /// A new condition variable.
    pub(crate) fn new() -> Self {
        Self {
            cv: imp::Condvar::new(),
            waiters: AtomicU64::new(0),
        }
    }

    /// Waits for a notification, releasing the guard meanwhile.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let g = self.cv.wait(guard).unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    /// Waits for a notification for at most `timeout`, releasing the guard
    /// meanwhile.
    #[cfg(not(loom))]
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let g = match self.cv.wait_timeout(guard, timeout) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    /// Wakes every waiter; nothing to do when there is none.
    pub(crate) fn notify_all(&self) {
        // The waiter's increment happened before it released the mutex,
        // and the caller took that mutex after: the load sees it.
        if self.waiters.load(Ordering::Relaxed) != 0 {
            self.cv.notify_all();
        }
    }
}

/// How much stack below the caller [`reserve_stack`] makes sure is populated:
/// more than any path of this crate uses while it holds a lock.
#[cfg(not(loom))]
pub(crate) const STACK_RESERVE: usize = 64 * 1024;

#[cfg(not(loom))]
thread_local! {
    /// The lowest stack address this thread has populated through
    /// [`reserve_stack`] (`usize::MAX`: none yet).
    static STACK_LOW: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Makes sure the [`STACK_RESERVE`] bytes of stack below the caller are
/// populated before it takes a lock the service thread may also need.
///
/// The service thread registers whole VMAs for MISSING faults, and a thread's
/// stack can be part of one: glibc maps thread stacks with `MAP_STACK`, which
/// Linux 6.7 and later turns into `VM_NOHUGEPAGE`, so a program's
/// `MADV_NOHUGEPAGE` mapping placed beside a stack merges with it. A thread
/// that first touches a stack page there while holding a lock would wait on
/// the service thread, which may be waiting for that very lock. Touching the
/// pages beforehand, with no lock held, lets the service thread resolve the
/// fault. Each thread remembers how deep it has probed, so the common case
/// is one thread-local read.
#[cfg(not(loom))]
#[inline]
pub(crate) fn reserve_stack() {
    let marker = 0u8;
    let sp = std::hint::black_box(&marker) as *const u8 as usize;
    let want = sp.saturating_sub(STACK_RESERVE);
    if STACK_LOW.get() <= want {
        return;
    }
    // Twice as deep as asked, so that calls from a little lower down (or
    // from another inlining of this function) find the reserve done.
    probe_stack(2);
    STACK_LOW.set(sp.saturating_sub(2 * STACK_RESERVE));
}

/// Touches `frames` × [`STACK_RESERVE`] bytes of stack below the caller: the
/// compiler probes every page of a frame larger than a page as it allocates
/// it (`-Z probe-stack`, on by default on x86_64), so an uninitialized local
/// buffer is enough and costs no writes of its own.
#[cfg(not(loom))]
#[inline(never)]
pub(crate) fn probe_stack(frames: usize) {
    let buf = std::mem::MaybeUninit::<[u8; STACK_RESERVE]>::uninit();
    std::hint::black_box(&buf);
    if frames > 1 {
        probe_stack(frames - 1);
    }
    std::hint::black_box(&buf);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{STACK_RESERVE, reserve_stack};
    use crate::addr::{PAGE_SIZE, VaRange, VirtAddr};
    use crate::os::pagemap::{Entry, Pagemap};

    /// The pages of stack in `[lo, hi)` that are present.
    fn present(pagemap: &Pagemap, range: VaRange) -> usize {
        let mut e = vec![Entry(0); range.npages() as usize];
        pagemap.read_entries(range, &mut e).expect("pagemap");
        e.iter().filter(|e| e.present()).count()
    }

    #[test]
    fn reserve_populates_the_stack_below_once() {
        let pagemap = Pagemap::open().expect("pagemap");
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let marker = 0u8;
                let sp = std::hint::black_box(&marker) as *const u8 as u64;
                // Whole pages of the reserve, leaving room above them for
                // the frames of the calls this test makes.
                let hi = VirtAddr(sp).page_down().0 - 8 * PAGE_SIZE;
                let lo = VirtAddr(sp - STACK_RESERVE as u64).page_down().0 + PAGE_SIZE;
                let below = VaRange::new(VirtAddr(lo), VirtAddr(hi)).expect("range");
                crate::os::mm::dontneed(below).expect("MADV_DONTNEED");
                assert_eq!(present(&pagemap, below), 0, "discarded");
                reserve_stack();
                assert_eq!(
                    present(&pagemap, below) as u64,
                    below.npages(),
                    "every page of the reserve is populated"
                );
                // The second call finds the reserve done and touches nothing.
                crate::os::mm::dontneed(below).expect("MADV_DONTNEED");
                reserve_stack();
                assert_eq!(present(&pagemap, below), 0, "no second probe");
            })
            .expect("spawn")
            .join()
            .expect("the thread");
    }
}
