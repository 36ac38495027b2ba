//! Loom models of the sequence protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p hmm --release --lib notifier`.
//!
//! Each model is two threads and a handful of lock operations, so loom can
//! explore every interleaving exhaustively; the one three-thread model runs
//! under a preemption bound.

use super::*;

use crate::sync::{Arc, AtomicU64, Mutex, Ordering};
use loom::thread;

/// The preemption bound of the three-thread model.
const PREEMPTIONS: usize = 4;

/// The device side of a toy driver: what it mapped and what the last
/// invalidation declared stale.
#[derive(Debug, Default)]
struct Dev {
    /// The "PFN" (a PTE generation) installed in the device table.
    mapped: Option<u64>,
    /// Generations below this were declared stale by an invalidation.
    stale_below: u64,
}

/// The driver: its lock, and the CPU "PTE" (a generation number).
#[derive(Debug)]
struct Driver {
    dev: Mutex<Dev>,
    pte: AtomicU64,
}

/// The kernel-contract callback: under the driver lock, `set_seq`, check that
/// nothing stale is mapped, zap, and declare the current generation stale
/// (the CPU side changes it right after).
struct DriverOps(Arc<Driver>);

impl IntervalNotifierOps for DriverOps {
    fn invalidate(&self, sub: &Interval, _range: &NotifierRange, cur_seq: u64) -> bool {
        let mut dev = self.0.dev.lock();
        sub.set_seq(cur_seq);
        let pte = self.0.pte.load(Ordering::SeqCst);
        if let Some(v) = dev.mapped {
            assert!(v >= dev.stale_below, "a stale PFN survived an invalidation");
        }
        dev.mapped = None;
        dev.stale_below = pte + 1;
        true
    }
}

/// A callback that fails the model if it runs after its subscription's
/// `remove` returned.
struct CheckRemoved(Arc<Mutex<bool>>);

impl IntervalNotifierOps for CheckRemoved {
    fn invalidate(&self, sub: &Interval, _range: &NotifierRange, cur_seq: u64) -> bool {
        let removed = self.0.lock();
        assert!(!*removed, "callback ran after remove returned");
        sub.set_seq(cur_seq);
        true
    }
}

fn range() -> NotifierRange {
    NotifierRange::new(VirtAddr(0), VirtAddr(0x1000), Event::Clear)
}

fn idle(subs: &Subscriptions) -> bool {
    let st = subs.core.state.lock();
    st.active_invalidate_ranges == 0
        && st.invalidate_seq.is_multiple_of(2)
        && st.deferred.is_empty()
}

/// read_begin / invalidate (driver lock + set_seq) / read_retry: a reader
/// that passes read_retry under the driver lock never installs a generation
/// the invalidation declared stale, and finishes within two rounds.
#[test]
fn reader_never_installs_what_an_invalidation_declared_stale() {
    loom::model(|| {
        let subs = Subscriptions::new();
        let drv = Arc::new(Driver {
            dev: Mutex::new(Dev::default()),
            pte: AtomicU64::new(0),
        });
        let n = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(DriverOps(drv.clone())),
            )
            .unwrap();

        let inv = {
            let (subs, drv) = (subs.clone(), drv.clone());
            thread::spawn(move || {
                let r = range();
                subs.invalidate_range_start(&r).unwrap();
                drv.pte.store(1, Ordering::SeqCst);
                subs.invalidate_range_end(&r);
            })
        };

        // One invalidation can force at most one retry: the second
        // read_begin waits for its epoch to end.
        assert!(fault(&n, &drv, 2));

        inv.join().unwrap();
        let dev = drv.dev.lock();
        assert!(dev.mapped.is_none() || dev.mapped == Some(1));
        drop(dev);
        assert!(idle(&subs));
        drop(n);
    });
}

/// One device fault: read_begin, read the PTE, and install it under the
/// driver lock unless read_retry says it is stale; at most `rounds` tries.
fn fault(n: &IntervalNotifier, drv: &Driver, rounds: usize) -> bool {
    for _ in 0..rounds {
        let seq = n.read_begin();
        let v = drv.pte.load(Ordering::SeqCst);
        let mut dev = drv.dev.lock();
        if !n.read_retry(seq) {
            assert!(v >= dev.stale_below, "read_retry passed on stale data");
            dev.mapped = Some(v);
            return true;
        }
    }
    false
}

/// A subscription inserted while an invalidation that overlapped nothing is
/// active (the even-but-active window): the insert forces the epoch odd, so
/// a fault on the new subscription cannot install the PTE that invalidation
/// is about to change.
#[test]
fn insert_during_even_active_window_cannot_install_stale() {
    loom::model(|| {
        let subs = Subscriptions::new();
        let drv = Arc::new(Driver {
            dev: Mutex::new(Dev::default()),
            pte: AtomicU64::new(0),
        });
        let inv = {
            let (subs, drv) = (subs.clone(), drv.clone());
            thread::spawn(move || {
                let r = range();
                subs.invalidate_range_start(&r).unwrap();
                drv.pte.store(1, Ordering::SeqCst);
                subs.invalidate_range_end(&r);
            })
        };
        let n = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(DriverOps(drv.clone())),
            )
            .unwrap();
        assert!(fault(&n, &drv, 2));
        inv.join().unwrap();
        let mapped = drv.dev.lock().mapped;
        assert!(
            mapped.is_none() || mapped == Some(1),
            "stale PTE mapped: {mapped:?}"
        );
        assert!(idle(&subs));
        drop(n);
    });
}

/// Two overlapping invalidations merge into one epoch: the first `_end` does
/// not release the write side while the second still runs, so the reader
/// never installs a PTE the second one is about to change.
#[test]
fn merged_epoch_lasts_until_the_last_invalidation_ends() {
    // Three threads explode without a bound; every interleaving with up to
    // PREEMPTIONS forced switches is explored (the bug this guards against
    // needs two).
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(PREEMPTIONS);
    model.check(|| {
        let subs = Subscriptions::new();
        let drv = Arc::new(Driver {
            dev: Mutex::new(Dev::default()),
            pte: AtomicU64::new(0),
        });
        let n = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(DriverOps(drv.clone())),
            )
            .unwrap();
        let spawn_inv = || {
            let (subs, drv) = (subs.clone(), drv.clone());
            thread::spawn(move || {
                let r = range();
                subs.invalidate_range_start(&r).unwrap();
                drv.pte.fetch_add(1, Ordering::SeqCst);
                subs.invalidate_range_end(&r);
            })
        };
        let (i1, i2) = (spawn_inv(), spawn_inv());
        // Two epochs can force two retries.
        assert!(fault(&n, &drv, 3));
        i1.join().unwrap();
        i2.join().unwrap();
        let mapped = drv.dev.lock().mapped;
        assert!(
            mapped.is_none() || mapped == Some(2),
            "stale PTE mapped: {mapped:?}"
        );
        assert!(idle(&subs));
        drop(n);
    });
}

/// remove racing an invalidation: no callback runs after remove returns.
#[test]
fn no_callback_after_remove_returns() {
    loom::model(|| {
        let subs = Subscriptions::new();
        let removed = Arc::new(Mutex::new(false));
        let n = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(CheckRemoved(removed.clone())),
            )
            .unwrap();

        let inv = {
            let subs = subs.clone();
            thread::spawn(move || subs.invalidate(&range()).unwrap())
        };

        n.remove().unwrap();
        *removed.lock() = true;

        inv.join().unwrap();
        assert!(idle(&subs));
        assert_eq!(subs.core.state.lock().itree.len(), 0);
    });
}

/// insert racing an invalidation (deferred, or forced odd), then read_begin
/// and remove: read_begin never returns inside the epoch that invalidates
/// the new subscription, no callback runs after remove, and the tree ends
/// exactly as it started.
#[test]
fn insert_read_begin_remove_racing_an_invalidation() {
    loom::model(|| {
        let subs = Subscriptions::new();
        let removed = Arc::new(Mutex::new(false));
        let a = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(CheckRemoved(Arc::new(Mutex::new(false)))),
            )
            .unwrap();

        let inv = {
            let subs = subs.clone();
            thread::spawn(move || subs.invalidate(&range()).unwrap())
        };

        let b = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(CheckRemoved(removed.clone())),
            )
            .unwrap();
        let seq = b.read_begin();
        assert_eq!(seq % 2, 1);
        assert_ne!(subs.seq(), seq, "read_begin returned inside the epoch");
        b.remove().unwrap();
        *removed.lock() = true;

        inv.join().unwrap();
        assert!(idle(&subs));
        let st = subs.core.state.lock();
        assert_eq!(st.itree.len(), 1);
        assert!(st.in_tree(&a.sub));
        drop(st);
        drop(a);
    });
}

/// A non-blockable invalidation whose callback's trylock fails returns
/// `Again` with the epoch already closed, while a reader holds the lock.
#[test]
fn nonblocking_again_closes_the_epoch() {
    struct TryLockOps(Arc<Mutex<()>>);
    impl IntervalNotifierOps for TryLockOps {
        fn invalidate(&self, sub: &Interval, range: &NotifierRange, cur_seq: u64) -> bool {
            let guard = if range.blockable {
                Some(self.0.lock())
            } else {
                self.0.try_lock()
            };
            match guard {
                Some(_g) => {
                    sub.set_seq(cur_seq);
                    true
                }
                None => false,
            }
        }
    }
    loom::model(|| {
        let subs = Subscriptions::new();
        let lock = Arc::new(Mutex::new(()));
        let n = subs
            .insert(
                VirtAddr(0),
                0x1000,
                std::sync::Arc::new(TryLockOps(lock.clone())),
            )
            .unwrap();
        let inv = {
            let subs = subs.clone();
            thread::spawn(
                move || match subs.invalidate_range_start(&range().non_blocking()) {
                    Ok(()) => subs.invalidate_range_end(&range()),
                    Err(e) => assert!(matches!(e, Error::Again)),
                },
            )
        };
        let seq = n.read_begin();
        {
            let _g = lock.lock();
            let _ = n.read_retry(seq);
        }
        inv.join().unwrap();
        assert!(idle(&subs));
        drop(n);
    });
}
