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

    /// Locks, waiting as long as needed.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
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

/// A condition variable paired with [`Mutex`].
#[derive(Debug, Default)]
pub(crate) struct Condvar(imp::Condvar);

impl Condvar {
    /// A new condition variable.
    pub(crate) fn new() -> Self {
        Self(imp::Condvar::new())
    }

    /// Waits for a notification, releasing the guard meanwhile.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter.
    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}
