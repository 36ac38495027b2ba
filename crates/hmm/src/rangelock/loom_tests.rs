//! Loom models of the range lock. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p hmm --release --lib rangelock::loom`
//! (the filter `loom` runs these and the notifier's models together).
//!
//! Each two-thread model is a handful of lock operations, so loom explores
//! every interleaving exhaustively; the three-thread model runs under a
//! preemption bound. A deadlock anywhere fails the model.

use super::*;

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::sync::{AtomicU64, Ordering};
use loom::thread;

/// The preemption bound of the three-thread model.
const PREEMPTIONS: usize = 6;

/// Pages `[a, b)`.
fn r(a: u64, b: u64) -> VaRange {
    VaRange::new(VirtAddr(a * PAGE_SIZE), VirtAddr(b * PAGE_SIZE)).unwrap()
}

/// How many guards of each kind are held right now, maintained by their
/// holders while they hold them.
#[derive(Debug, Default)]
struct Held {
    snapshots: AtomicU64,
    invalidations: AtomicU64,
}

impl Held {
    /// Runs inside a guard: announces it, checks that no guard of the other
    /// kind is held (every guard in these models overlaps every other), and
    /// withdraws it.
    fn inside(&self, kind: Kind) {
        let (mine, other) = match kind {
            Kind::Snapshot => (&self.snapshots, &self.invalidations),
            Kind::Invalidate => (&self.invalidations, &self.snapshots),
        };
        mine.fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            other.load(Ordering::SeqCst),
            0,
            "an overlapping snapshot and invalidation were held together"
        );
        mine.fetch_sub(1, Ordering::SeqCst);
    }
}

fn idle(lock: &RangeLock) -> bool {
    let st = lock.stats();
    st.holders == 0 && st.waiters == 0
}

/// Overlapping snapshot and invalidation on two threads: never both held,
/// both complete, the lock ends idle.
#[test]
fn overlapping_snapshot_and_invalidation_exclude_each_other() {
    loom::model(|| {
        let lock = Arc::new(RangeLock::new());
        let held = Arc::new(Held::default());
        let t = {
            let (lock, held) = (lock.clone(), held.clone());
            thread::spawn(move || {
                let g = lock.invalidate(r(1, 3));
                held.inside(Kind::Invalidate);
                drop(g);
            })
        };
        let g = lock.snapshot(r(0, 2));
        held.inside(Kind::Snapshot);
        drop(g);
        t.join().unwrap();
        assert!(idle(&lock));
        let st = lock.stats();
        assert_eq!(st.granted_immediately + st.waited, 2);
    });
}

/// Snapshot, invalidation, snapshot on three overlapping ranges: mutual
/// exclusion and completion whatever the arrival order, including the one
/// where the second snapshot must queue behind a waiting invalidation.
#[test]
fn three_overlapping_requests_exclude_and_complete() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(PREEMPTIONS);
    model.check(|| {
        let lock = Arc::new(RangeLock::new());
        let held = Arc::new(Held::default());
        let spawn = |kind: Kind, range: VaRange| {
            let (lock, held) = (lock.clone(), held.clone());
            thread::spawn(move || {
                let g = match kind {
                    Kind::Snapshot => lock.snapshot(range),
                    Kind::Invalidate => lock.invalidate(range),
                };
                held.inside(kind);
                drop(g);
            })
        };
        let s1 = spawn(Kind::Snapshot, r(0, 2));
        let i2 = spawn(Kind::Invalidate, r(1, 3));
        let g = lock.snapshot(r(0, 3));
        held.inside(Kind::Snapshot);
        drop(g);
        s1.join().unwrap();
        i2.join().unwrap();
        assert!(idle(&lock));
    });
}

/// Disjoint ranges never wait: each thread holds one guard and, while
/// holding it, takes a second of the other kind on a disjoint range; the
/// other thread does the same on ranges disjoint from both. Nothing ever
/// waits in any interleaving, and nothing deadlocks.
#[test]
fn disjoint_pair_never_waits() {
    loom::model(|| {
        let lock = Arc::new(RangeLock::new());
        let t = {
            let lock = lock.clone();
            thread::spawn(move || {
                let a = lock.snapshot(r(0, 1));
                let b = lock.invalidate(r(1, 2));
                drop(a);
                drop(b);
            })
        };
        let c = lock.invalidate(r(2, 3));
        let d = lock.try_invalidate(r(3, 4)).unwrap();
        let e = lock.snapshot(r(4, 5));
        drop((c, d, e));
        t.join().unwrap();
        assert!(idle(&lock));
        let st = lock.stats();
        assert_eq!(
            (st.waited, st.would_block, st.granted_immediately),
            (0, 0, 5)
        );
    });
}

/// Requests of one kind never wait for each other, even overlapping and
/// taken in opposite nesting orders on two threads (which would deadlock if
/// they did).
#[test]
fn same_kind_overlaps_never_wait() {
    loom::model(|| {
        let lock = Arc::new(RangeLock::new());
        let t = {
            let lock = lock.clone();
            thread::spawn(move || {
                let a = lock.snapshot(r(0, 2));
                let b = lock.invalidate(r(4, 6));
                drop((a, b));
            })
        };
        let c = lock.invalidate(r(5, 7));
        let d = lock.snapshot(r(1, 3));
        drop((c, d));
        t.join().unwrap();
        assert!(idle(&lock));
        assert_eq!(lock.stats().waited, 0);
    });
}

/// try_invalidate against an overlapping snapshot: it either gets the guard
/// while no snapshot holds, or returns WouldBlock because the snapshot
/// arrived first; never both held, and once the snapshot is gone it succeeds.
#[test]
fn try_invalidate_vs_snapshot() {
    loom::model(|| {
        let lock = Arc::new(RangeLock::new());
        let held = Arc::new(Held::default());
        let started = Arc::new(AtomicU64::new(0));
        let t = {
            let (lock, held, started) = (lock.clone(), held.clone(), started.clone());
            thread::spawn(move || {
                started.store(1, Ordering::SeqCst);
                let g = lock.snapshot(r(0, 2));
                held.inside(Kind::Snapshot);
                drop(g);
            })
        };
        match lock.try_invalidate(r(1, 2)) {
            Ok(g) => {
                held.inside(Kind::Invalidate);
                drop(g);
            }
            Err(WouldBlock) => {
                assert_eq!(
                    started.load(Ordering::SeqCst),
                    1,
                    "WouldBlock with no snapshot present"
                );
                assert_eq!(lock.stats().would_block, 1);
            }
        }
        t.join().unwrap();
        assert!(idle(&lock));
        drop(lock.try_invalidate(r(1, 2)).unwrap());
        assert!(idle(&lock));
    });
}

/// The mirror's range-lock strategy in miniature: a device fault (snapshot
/// guard, [`Ledger::begin`], read the CPU's value, install unless left out)
/// against an invalidation (the CPU changes the value, then the callback:
/// `try_invalidate`, clear, and [`Ledger::leave`] when refused). Whatever the
/// interleaving, the device table ends empty or holding the CPU's value,
/// never the old one, and nobody waits on a refused invalidation.
#[test]
fn refused_invalidation_left_with_the_snapshot_never_leaves_stale_entries() {
    loom::model(|| {
        const OLD: u64 = 1;
        const NEW: u64 = 2;
        let lock = Arc::new(RangeLock::new());
        let cpu = Arc::new(AtomicU64::new(OLD));
        let table = Arc::new(Mutex::new((None::<u64>, Ledger::default())));
        let invalidation = {
            let (lock, cpu, table) = (lock.clone(), cpu.clone(), table.clone());
            thread::spawn(move || {
                cpu.store(NEW, Ordering::SeqCst);
                let guard = lock.try_invalidate(r(0, 1)).ok();
                let mut t = table.lock();
                t.0 = None;
                if guard.is_none() {
                    t.1.leave(r(0, 1));
                }
                drop(t);
                drop(guard);
            })
        };
        let g = lock.snapshot(r(0, 1));
        let since = table.lock().1.begin();
        let seen = cpu.load(Ordering::SeqCst);
        let mut t = table.lock();
        if !t.1.left_out(since, VirtAddr(0)) {
            t.0 = Some(seen);
        }
        t.1.end(since);
        drop(t);
        drop(g);
        invalidation.join().unwrap();
        let t = table.lock();
        assert!(
            t.0.is_none() || t.0 == Some(NEW),
            "the device kept a value the CPU no longer has"
        );
        assert!(t.1.left.is_empty() && t.1.snapshots.is_empty());
        drop(t);
        assert!(idle(&lock));
    });
}
