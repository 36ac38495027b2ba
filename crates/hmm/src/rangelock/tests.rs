//! Unit tests of the range lock: one test (or more) per rule of the module
//! documentation, and a stress test of the mutual-exclusion invariant.
//!
//! "Is waiting" is observed through [`RangeLock::stats`] (the request is in
//! the list and not granted), not through sleeps, so the tests do not depend
//! on timing except for the deadline that turns a deadlock into a failure.

use super::*;

use crate::addr::{PAGE_SIZE, VirtAddr};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc as StdArc, Mutex as StdMutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long anything that must happen may take before the test calls it a deadlock.
const DEADLOCK: Duration = Duration::from_secs(20);

/// Pages `[a, b)`.
fn r(a: u64, b: u64) -> VaRange {
    VaRange::new(VirtAddr(a * PAGE_SIZE), VirtAddr(b * PAGE_SIZE)).unwrap()
}

/// Waits until the lock's stats satisfy `pred`.
fn wait_until(lock: &RangeLock, what: &str, pred: impl Fn(&RangeLockStats) -> bool) {
    let deadline = Instant::now() + DEADLOCK;
    loop {
        let st = lock.stats();
        if pred(&st) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// A thread that takes a guard, reports it, and holds it until told to drop it.
struct Holder {
    got: Receiver<()>,
    release: Sender<()>,
    handle: JoinHandle<()>,
}

impl Holder {
    fn spawn(lock: &StdArc<RangeLock>, kind: Kind, range: VaRange) -> Self {
        let (got_tx, got) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let lock = lock.clone();
        let handle = thread::spawn(move || {
            let g = match kind {
                Kind::Snapshot => lock.snapshot(range),
                Kind::Invalidate => lock.invalidate(range),
            };
            assert_eq!((g.kind(), g.range()), (kind, range));
            got_tx.send(()).unwrap();
            let _ = release_rx.recv();
            drop(g);
        });
        Self {
            got,
            release,
            handle,
        }
    }

    /// Asserts the guard is held (waiting for it up to the deadline).
    fn granted(&self) {
        self.got
            .recv_timeout(DEADLOCK)
            .expect("request never granted");
    }

    /// Asserts the guard is not held yet.
    fn not_granted(&self) {
        assert_eq!(self.got.try_recv(), Err(TryRecvError::Empty));
    }

    /// Drops the guard and joins the thread.
    fn release(self) {
        self.release.send(()).unwrap();
        self.handle.join().unwrap();
    }
}

fn new_lock() -> StdArc<RangeLock> {
    StdArc::new(RangeLock::new())
}

#[test]
fn disjoint_ranges_never_wait() {
    let lock = new_lock();
    let a = Holder::spawn(&lock, Kind::Snapshot, r(0, 4));
    let b = Holder::spawn(&lock, Kind::Invalidate, r(4, 8));
    // Both held at once, on two threads.
    a.granted();
    b.granted();
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters, st.waited), (2, 0, 0));
    // And a third, disjoint from both, on this thread.
    let c = lock.invalidate(r(8, 9));
    let d = lock.snapshot(r(9, 10));
    assert_eq!(lock.stats().holders, 4);
    drop((c, d));
    a.release();
    b.release();
    let st = lock.stats();
    assert_eq!(
        (st.holders, st.waiters, st.waited, st.granted_immediately),
        (0, 0, 0, 4)
    );
}

#[test]
fn snapshot_waits_for_earlier_overlapping_invalidation() {
    let lock = new_lock();
    let inv = lock.invalidate(r(0, 4));
    let s = Holder::spawn(&lock, Kind::Snapshot, r(2, 6));
    wait_until(&lock, "the snapshot to wait", |st| st.waiters == 1);
    s.not_granted();
    drop(inv);
    s.granted();
    assert_eq!(lock.stats().waited, 1);
    s.release();
    assert_eq!(lock.stats().holders, 0);
}

#[test]
fn invalidation_waits_for_overlapping_snapshot() {
    let lock = new_lock();
    let snap = lock.snapshot(r(0, 4));
    let i = Holder::spawn(&lock, Kind::Invalidate, r(3, 4));
    wait_until(&lock, "the invalidation to wait", |st| st.waiters == 1);
    i.not_granted();
    drop(snap);
    i.granted();
    i.release();
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters, st.waited), (0, 0, 1));
}

#[test]
fn snapshot_does_not_barge_past_a_waiting_invalidation() {
    let lock = new_lock();
    // S1 held; I2 waits for it; S3 overlaps only I2, not S1.
    let s1 = lock.snapshot(r(0, 4));
    let i2 = Holder::spawn(&lock, Kind::Invalidate, r(2, 6));
    wait_until(&lock, "I2 to wait", |st| st.waiters == 1);
    let s3 = Holder::spawn(&lock, Kind::Snapshot, r(4, 8));
    wait_until(&lock, "S3 to wait", |st| st.waiters == 2);
    // S4 overlaps both S1 and I2 and waits too.
    let s4 = Holder::spawn(&lock, Kind::Snapshot, r(0, 8));
    wait_until(&lock, "S4 to wait", |st| st.waiters == 3);
    i2.not_granted();
    s3.not_granted();
    s4.not_granted();
    drop(s1);
    i2.granted();
    wait_until(&lock, "I2 to hold", |st| st.holders == 1 && st.waiters == 2);
    s3.not_granted();
    s4.not_granted();
    i2.release();
    s3.granted();
    s4.granted();
    s3.release();
    s4.release();
    assert_eq!(lock.stats().waited, 3);
}

#[test]
fn invalidation_does_not_barge_past_a_waiting_snapshot() {
    let lock = new_lock();
    let i1 = lock.invalidate(r(0, 4));
    let s2 = Holder::spawn(&lock, Kind::Snapshot, r(2, 6));
    wait_until(&lock, "S2 to wait", |st| st.waiters == 1);
    let i3 = Holder::spawn(&lock, Kind::Invalidate, r(5, 6));
    wait_until(&lock, "I3 to wait", |st| st.waiters == 2);
    // A try over I3's range would barge past S2 as well.
    assert_eq!(lock.try_invalidate(r(5, 6)).unwrap_err(), WouldBlock);
    // But an invalidation overlapping only I1 (same kind) goes through.
    drop(lock.try_invalidate(r(0, 2)).unwrap());
    drop(i1);
    s2.granted();
    i3.not_granted();
    s2.release();
    i3.granted();
    i3.release();
}

#[test]
fn a_release_that_lets_nobody_through_wakes_nobody() {
    let lock = new_lock();
    let s1 = lock.snapshot(r(0, 4));
    let i2 = Holder::spawn(&lock, Kind::Invalidate, r(2, 6));
    wait_until(&lock, "I2 to wait", |st| st.waiters == 1);
    // Releases of guards that do not conflict with I2 (disjoint from it, or
    // of its kind) leave it waiting.
    drop(lock.snapshot(r(8, 9)));
    drop(lock.invalidate(r(4, 5)));
    let s3 = lock.snapshot(r(0, 1));
    assert_eq!(lock.stats().holders, 2);
    drop(s3);
    i2.not_granted();
    assert_eq!(lock.stats().waiters, 1);
    drop(s1);
    i2.granted();
    i2.release();
}

#[test]
fn overlapping_snapshots_run_together() {
    let lock = new_lock();
    let a = Holder::spawn(&lock, Kind::Snapshot, r(0, 4));
    let b = Holder::spawn(&lock, Kind::Snapshot, r(2, 6));
    a.granted();
    b.granted();
    let c = lock.snapshot(r(0, 6));
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters, st.waited), (3, 0, 0));
    drop(c);
    a.release();
    b.release();
}

#[test]
fn overlapping_invalidations_run_together() {
    let lock = new_lock();
    let a = Holder::spawn(&lock, Kind::Invalidate, r(0, 4));
    let b = Holder::spawn(&lock, Kind::Invalidate, r(0, 4));
    a.granted();
    b.granted();
    let c = lock.try_invalidate(r(1, 2)).unwrap();
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters, st.waited), (3, 0, 0));
    drop(c);
    a.release();
    b.release();
}

#[test]
fn try_invalidate_would_block_on_a_held_snapshot() {
    let lock = RangeLock::new();
    let s = lock.snapshot(r(0, 4));
    assert_eq!(lock.try_invalidate(r(3, 5)).unwrap_err(), WouldBlock);
    // A failed attempt leaves no trace.
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters, st.would_block), (1, 0, 1));
    // A disjoint range goes through while the snapshot holds.
    let g = lock.try_invalidate(r(4, 8)).unwrap();
    assert_eq!(g.kind(), Kind::Invalidate);
    assert_eq!(g.range(), r(4, 8));
    drop(g);
    drop(s);
    // After the release the overlapping one goes through too.
    let g = lock.try_invalidate(r(3, 5)).unwrap();
    // Only the failed attempt was counted as refused.
    let st = lock.stats();
    assert_eq!(
        (st.holders, st.granted_immediately, st.would_block),
        (1, 3, 1)
    );
    drop(g);
}

#[test]
fn try_invalidate_holds_off_later_snapshots() {
    let lock = new_lock();
    let g = lock.try_invalidate(r(0, 4)).unwrap();
    let s = Holder::spawn(&lock, Kind::Snapshot, r(0, 1));
    wait_until(&lock, "the snapshot to wait", |st| st.waiters == 1);
    s.not_granted();
    drop(g);
    s.granted();
    s.release();
}

#[test]
fn would_block_is_again() {
    let e: Error = WouldBlock.into();
    assert!(matches!(e, Error::Again));
    assert_eq!(e.errno(), 11);
    assert!(WouldBlock.to_string().contains("would block"));
}

#[test]
fn a_panic_while_holding_releases_the_guard() {
    let lock = new_lock();
    // A waiter queued behind the guard that is about to unwind.
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let panicker = {
        let lock = lock.clone();
        thread::spawn(move || {
            let _g = lock.invalidate(r(0, 4));
            held_tx.send(()).unwrap();
            let _ = go_rx.recv();
            panic!("invalidation callback failed");
        })
    };
    held_rx.recv_timeout(DEADLOCK).unwrap();
    let s = Holder::spawn(&lock, Kind::Snapshot, r(0, 4));
    wait_until(&lock, "the snapshot to wait", |st| st.waiters == 1);
    go_tx.send(()).unwrap();
    assert!(panicker.join().is_err());
    s.granted();
    s.release();

    // The same on one thread, through catch_unwind.
    let res = std::panic::catch_unwind(|| {
        let _g = lock.snapshot(r(0, 4));
        panic!("device install failed");
    });
    assert!(res.is_err());
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters), (0, 0));
    drop(lock.try_invalidate(r(0, 4)).unwrap());
}

/// A small deterministic PRNG (xorshift64*), so the stress test needs no
/// dependency and replays the same schedule of requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn stress_mutual_exclusion_and_completion() {
    const THREADS: u64 = 8;
    const OPS: u64 = 3000;
    const PAGES: u64 = 24;

    let lock = new_lock();
    // Every guard held right now, recorded while it is held.
    let held: StdArc<StdMutex<Vec<(u64, Kind, VaRange)>>> = StdArc::default();
    let (done_tx, done_rx) = mpsc::channel();
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (lock, held, done_tx) = (lock.clone(), held.clone(), done_tx.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
            let (mut granted, mut refused) = (0u64, 0u64);
            for op in 0..OPS {
                let a = rng.below(PAGES);
                let b = (a + 1 + rng.below(4)).min(PAGES);
                let range = r(a, b);
                let guard = match rng.below(4) {
                    0 | 1 => lock.snapshot(range),
                    2 => lock.invalidate(range),
                    _ => match lock.try_invalidate(range) {
                        Ok(g) => g,
                        Err(WouldBlock) => {
                            refused += 1;
                            continue;
                        }
                    },
                };
                granted += 1;
                let id = (t << 32) | op;
                {
                    let mut h = held.lock().unwrap();
                    for &(other, kind, rr) in h.iter() {
                        assert!(
                            kind == guard.kind() || !rr.overlaps(range),
                            "{:?} {range:?} held together with {kind:?} {rr:?} ({other:#x})",
                            guard.kind(),
                        );
                    }
                    h.push((id, guard.kind(), range));
                }
                // Hold it for a moment so that others pile up behind it.
                if rng.below(8) == 0 {
                    thread::yield_now();
                }
                held.lock().unwrap().retain(|e| e.0 != id);
                drop(guard);
            }
            done_tx.send((granted, refused)).unwrap();
        }));
    }
    let (mut granted, mut refused) = (0, 0);
    for _ in 0..THREADS {
        let (g, r) = done_rx
            .recv_timeout(DEADLOCK)
            .expect("a request never completed (deadlock?)");
        granted += g;
        refused += r;
    }
    for h in handles {
        h.join().unwrap();
    }
    let st = lock.stats();
    assert_eq!((st.holders, st.waiters), (0, 0));
    assert_eq!(st.granted_immediately + st.waited, granted);
    assert_eq!(st.would_block, refused);
    assert_eq!(granted + refused, THREADS * OPS);
    assert!(held.lock().unwrap().is_empty());
}

/// The page at page index `p`.
fn page(p: u64) -> VirtAddr {
    VirtAddr(p * PAGE_SIZE)
}

#[test]
fn ledger_leaves_out_only_what_arrived_after_a_snapshot_began() {
    let mut l = Ledger::default();
    // Nobody in flight: nothing to leave, nothing recorded.
    assert!(!l.leave(r(0, 4)));
    let s1 = l.begin();
    assert!(!l.left_out(s1, page(1)), "arrived before s1 began");
    assert!(l.leave(r(0, 2)));
    let s2 = l.begin();
    assert!(l.leave(r(4, 6)));
    // s1 leaves out both ranges, s2 only the one after it began.
    assert!(l.left_out(s1, page(1)) && l.left_out(s1, page(5)));
    assert!(!l.left_out(s2, page(1)) && l.left_out(s2, page(5)));
    assert!(!l.left_out(s1, page(3)), "not invalidated");
    assert!(!l.left_out(s1, page(2)), "ranges are half-open");
    // s1 done: what only it needed is forgotten, s2's part kept.
    l.end(s1);
    assert_eq!(l.left.len(), 1);
    assert!(l.left_out(s2, page(5)));
    l.end(s2);
    assert!(l.left.is_empty() && l.snapshots.is_empty());
}

#[test]
fn ledger_end_of_one_of_two_snapshots_of_a_generation_keeps_the_other() {
    let mut l = Ledger::default();
    let a = l.begin();
    let b = l.begin();
    assert_eq!(a, b);
    assert!(l.leave(r(0, 1)));
    l.end(a);
    assert!(l.left_out(b, page(0)), "b is still in flight");
    l.end(b);
    assert!(l.left.is_empty());
}
