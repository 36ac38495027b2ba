//! Unit tests of the interval-notifier protocol: one test (or more) per rule of
//! `reference/kernel-hmm.md` §3 and §9.2–9.4.

use super::*;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex as StdMutex, Weak};
use std::thread;
use std::time::Duration;

type StdArc<T> = std::sync::Arc<T>;

/// How long a thread must stay blocked to count as "waiting".
const BLOCKED: Duration = Duration::from_millis(150);
/// How long anything that must finish may take before the test calls it a deadlock.
const DEADLOCK: Duration = Duration::from_secs(20);

/// One delivered callback.
#[derive(Clone, Debug, PartialEq)]
struct Call {
    tag: usize,
    start: u64,
    end: u64,
    event: Event,
    blockable: bool,
    owner: Option<OwnerId>,
    cur_seq: u64,
}

type Log = StdArc<StdMutex<Vec<Call>>>;

/// Ops built from a closure.
struct FnOps<F>(F);

impl<F> IntervalNotifierOps for FnOps<F>
where
    F: Fn(&Interval, &NotifierRange, u64) -> bool + Send + Sync + 'static,
{
    fn invalidate(&self, sub: &Interval, range: &NotifierRange, cur_seq: u64) -> bool {
        (self.0)(sub, range, cur_seq)
    }
}

fn ops(
    f: impl Fn(&Interval, &NotifierRange, u64) -> bool + Send + Sync + 'static,
) -> StdArc<dyn IntervalNotifierOps> {
    StdArc::new(FnOps(f))
}

fn new_log() -> Log {
    StdArc::new(StdMutex::new(Vec::new()))
}

fn record(log: &Log, tag: usize, range: &NotifierRange, cur_seq: u64) {
    log.lock().unwrap().push(Call {
        tag,
        start: range.start.0,
        end: range.end.0,
        event: range.event,
        blockable: range.blockable,
        owner: range.owner,
        cur_seq,
    });
}

/// Well-behaved driver ops: a driver lock around `set_seq`, logging, `true`.
fn logging(log: &Log, tag: usize) -> StdArc<dyn IntervalNotifierOps> {
    let log = log.clone();
    let driver_lock = StdMutex::new(());
    ops(move |sub, range, cur_seq| {
        let _g = driver_lock.lock().unwrap();
        sub.set_seq(cur_seq);
        record(&log, tag, range, cur_seq);
        true
    })
}

fn tags(log: &Log) -> Vec<usize> {
    log.lock().unwrap().iter().map(|c| c.tag).collect()
}

fn va(x: u64) -> VirtAddr {
    VirtAddr(x)
}

fn r(start: u64, end: u64) -> NotifierRange {
    NotifierRange::new(va(start), va(end), Event::Clear)
}

fn in_tree(subs: &Subscriptions, n: &IntervalNotifier) -> bool {
    subs.core.state.lock().in_tree(&n.sub)
}

fn active(subs: &Subscriptions) -> u64 {
    subs.core.state.lock().active_invalidate_ranges
}

fn deferred(subs: &Subscriptions) -> usize {
    subs.core.state.lock().deferred.len()
}

fn tree_len(subs: &Subscriptions) -> usize {
    subs.core.state.lock().itree.len()
}

/// Runs `f` on another thread and fails the test if it does not finish.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLOCK) {
        Ok(v) => v,
        Err(e) => panic!("deadlock (or panic) in the tested code: {e:?}"),
    }
}

#[test]
fn seq_starts_at_two_idle_seqs_even_sub_seqs_odd() {
    let subs = Subscriptions::new();
    assert_eq!(subs.seq(), 2);
    assert!(!subs.is_released());
    let log = new_log();
    let n = subs.insert(va(0x1000), 0x1000, logging(&log, 0)).unwrap();
    assert_eq!(n.seq() % 2, 1);
    for round in 0..5u64 {
        let before = subs.seq();
        assert_eq!(before % 2, 0, "idle seq is even");
        subs.invalidate(&r(0x1000, 0x2000)).unwrap();
        assert_eq!(subs.seq(), before + 2, "one odd epoch then release");
        assert_eq!(n.seq(), before + 1, "sub seq is the odd cur_seq");
        assert_eq!(n.seq() % 2, 1);
        assert_eq!(log.lock().unwrap()[round as usize].cur_seq, before + 1);
    }
}

#[test]
fn insert_while_idle_gets_global_minus_one_and_read_begin_does_not_wait() {
    let subs = Subscriptions::new();
    let a = subs.insert(va(0), 0x1000, logging(&new_log(), 0)).unwrap();
    assert_eq!(a.seq(), 1);
    assert!(in_tree(&subs, &a));
    let s = a.read_begin();
    assert_eq!(s, 1);
    assert!(!a.read_retry(s));
    subs.invalidate(&r(0, 0x1000)).unwrap();
    assert_eq!(subs.seq(), 4);
    let b = subs
        .insert(va(0x1000), 0x1000, logging(&new_log(), 1))
        .unwrap();
    assert_eq!(b.seq(), 3);
    // A's seq (3) is not the global one (4): no wait either.
    assert_eq!(a.read_begin(), 3);
}

#[test]
fn insert_during_even_active_window_forces_odd_and_read_begin_waits() {
    let subs = Subscriptions::new();
    let range = r(0x1000, 0x2000);
    subs.invalidate_range_start(&range).unwrap();
    assert_eq!(
        subs.seq(),
        2,
        "nothing overlaps: partially excluded, seq stays even"
    );
    assert_eq!(active(&subs), 1);

    let log = new_log();
    let n = subs.insert(va(0x10000), 0x1000, logging(&log, 0)).unwrap();
    assert_eq!(subs.seq(), 3, "insert forced the odd state");
    assert_eq!(n.seq(), 3, "sub seq is the global seq, so read_begin waits");
    assert!(in_tree(&subs, &n), "inserted at once, not deferred");
    assert_eq!(deferred(&subs), 0);

    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| tx.send(n.read_begin()).unwrap());
        assert_eq!(
            rx.recv_timeout(BLOCKED),
            Err(RecvTimeoutError::Timeout),
            "read_begin waits"
        );
        subs.invalidate_range_end(&range);
        assert_eq!(rx.recv_timeout(DEADLOCK), Ok(3));
    });
    assert_eq!(subs.seq(), 4);
    assert!(!n.read_retry(3));
    subs.invalidate(&r(0x10000, 0x10001)).unwrap();
    assert_eq!(tags(&log), vec![0], "the sub was in the tree");
}

#[test]
fn insert_during_odd_epoch_is_deferred_until_the_epoch_ends() {
    let subs = Subscriptions::new();
    let log = new_log();
    let a = subs.insert(va(0), 0x10000, logging(&log, 0)).unwrap();
    let range = r(0x1000, 0x2000);
    subs.invalidate_range_start(&range).unwrap();
    assert_eq!(subs.seq(), 3);

    let b = subs.insert(va(0x1000), 0x1000, logging(&log, 1)).unwrap();
    assert_eq!(b.seq(), 3);
    assert!(!in_tree(&subs, &b), "deferred");
    assert_eq!(deferred(&subs), 1);
    assert_eq!(subs.seq(), 3);

    // A later overlapping invalidation of the same epoch does not see B.
    subs.invalidate_range_start(&range).unwrap();
    assert_eq!(tags(&log), vec![0, 0]);

    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| tx.send(b.read_begin()).unwrap());
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        subs.invalidate_range_end(&range);
        assert_eq!(subs.seq(), 3, "one range still active");
        assert!(!in_tree(&subs, &b));
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        subs.invalidate_range_end(&range);
        assert_eq!(rx.recv_timeout(DEADLOCK), Ok(3));
    });
    assert_eq!(subs.seq(), 4);
    assert!(in_tree(&subs, &b), "inserted by the last inv_end");
    assert_eq!(deferred(&subs), 0);
    log.lock().unwrap().clear();
    subs.invalidate(&range).unwrap();
    assert_eq!(tags(&log), vec![0, 1], "tree order");
    drop(a);
}

#[test]
fn deferred_edits_apply_in_list_order() {
    let subs = Subscriptions::new();
    let log = new_log();
    let a = subs.insert(va(0), 0x1000, logging(&log, 0)).unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    // Equal starts: the tree keeps the order in which the deferred list
    // inserted them.
    let c2 = subs.insert(va(0x5000), 0x1000, logging(&log, 2)).unwrap();
    let c1 = subs.insert(va(0x5000), 0x1000, logging(&log, 1)).unwrap();
    assert_eq!(deferred(&subs), 2);
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            a.remove().unwrap();
            tx.send(()).unwrap();
        });
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        assert_eq!(deferred(&subs), 3, "removal queued behind the inserts");
        subs.invalidate_range_end(&range);
        rx.recv_timeout(DEADLOCK).unwrap();
    });
    assert_eq!(tree_len(&subs), 2);
    log.lock().unwrap().clear();
    subs.invalidate(&r(0, 0x10000)).unwrap();
    assert_eq!(tags(&log), vec![2, 1]);
    drop((c1, c2));
    assert_eq!(tree_len(&subs), 0);
}

#[test]
fn remove_during_odd_epoch_waits_and_no_callback_runs_after() {
    let subs = Subscriptions::new();
    let calls = StdArc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let a = subs
        .insert(
            va(0),
            0x1000,
            ops(move |sub, _, seq| {
                sub.set_seq(seq);
                c.fetch_add(1, Ordering::SeqCst);
                true
            }),
        )
        .unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            a.remove().unwrap();
            tx.send(()).unwrap();
        });
        assert_eq!(
            rx.recv_timeout(BLOCKED),
            Err(RecvTimeoutError::Timeout),
            "remove waits"
        );
        // Still in the tree until the epoch ends: it still gets callbacks.
        subs.invalidate_range_start(&range).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        subs.invalidate_range_end(&range);
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        subs.invalidate_range_end(&range);
        rx.recv_timeout(DEADLOCK).unwrap();
    });
    assert_eq!(tree_len(&subs), 0);
    subs.invalidate(&range).unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "no callback after remove returned"
    );
    assert_eq!(subs.seq(), 4, "nothing overlapped the last invalidation");
}

#[test]
fn no_callback_runs_after_remove_returns_under_contention() {
    let subs = Subscriptions::new();
    for _ in 0..100 {
        let removed = StdArc::new(AtomicBool::new(false));
        let violated = StdArc::new(AtomicBool::new(false));
        let (rm, vi) = (removed.clone(), violated.clone());
        let n = subs
            .insert(
                va(0),
                0x1000,
                ops(move |_, _, _| {
                    if rm.load(Ordering::SeqCst) {
                        vi.store(true, Ordering::SeqCst);
                    }
                    true
                }),
            )
            .unwrap();
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(Ordering::SeqCst) {
                        subs.invalidate(&r(0, 0x1000)).unwrap();
                        // Two back-to-back invalidators can keep the epoch
                        // odd for long stretches (merged windows starve a
                        // remover, as in the kernel); leave it gaps.
                        thread::yield_now();
                    }
                });
            }
            s.spawn(|| {
                thread::yield_now();
                n.remove().unwrap();
                removed.store(true, Ordering::SeqCst);
                // Let the invalidators run a little after the removal.
                for _ in 0..50 {
                    thread::yield_now();
                }
                stop.store(true, Ordering::SeqCst);
            });
        });
        assert!(
            !violated.load(Ordering::SeqCst),
            "a callback ran after remove returned"
        );
    }
    assert_eq!(tree_len(&subs), 0);
    assert_eq!(subs.seq() % 2, 0);
    assert_eq!(active(&subs), 0);
}

#[test]
fn remove_of_deferred_insert_cancels_without_waiting() {
    let subs = Subscriptions::new();
    let log = new_log();
    let _a = subs.insert(va(0), 0x1000, logging(&log, 0)).unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    let b = subs.insert(va(0), 0x1000, logging(&log, 1)).unwrap();
    assert_eq!(deferred(&subs), 1);
    // Removing waits for nothing although the epoch is still odd.
    finishes(move || b.remove()).unwrap();
    assert_eq!(deferred(&subs), 0);
    assert_eq!(subs.seq(), 3);
    subs.invalidate_range_end(&range);
    assert_eq!(subs.seq(), 4);
    assert_eq!(tree_len(&subs), 1);
    log.lock().unwrap().clear();
    subs.invalidate(&range).unwrap();
    assert_eq!(
        tags(&log),
        vec![0],
        "the cancelled insert never reached the tree"
    );
}

#[test]
fn overlapping_invalidation_windows_merge_into_one_epoch() {
    let subs = Subscriptions::new();
    let log = new_log();
    let a = subs.insert(va(0), 0x2000, logging(&log, 0)).unwrap();
    let (r1, r2) = (r(0, 0x1000), r(0x1000, 0x2000));
    subs.invalidate_range_start(&r1).unwrap();
    subs.invalidate_range_start(&r2).unwrap();
    let seqs: Vec<u64> = log.lock().unwrap().iter().map(|c| c.cur_seq).collect();
    assert_eq!(seqs, vec![3, 3], "concurrent invalidations share cur_seq");
    subs.invalidate_range_end(&r1);
    assert_eq!(subs.seq(), 3);
    subs.invalidate_range_end(&r2);
    assert_eq!(subs.seq(), 4);

    // A range that overlaps no sub still holds the epoch open.
    let quiet = r(0x100000, 0x101000);
    subs.invalidate_range_start(&r1).unwrap();
    subs.invalidate_range_start(&quiet).unwrap();
    assert_eq!(subs.seq(), 5);
    subs.invalidate_range_end(&r1);
    assert_eq!(subs.seq(), 5, "the quiet range is still active");
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| tx.send(a.read_begin()).unwrap());
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        subs.invalidate_range_end(&quiet);
        assert_eq!(rx.recv_timeout(DEADLOCK), Ok(5));
    });
    assert_eq!(subs.seq(), 6);
}

#[test]
fn invalidation_overlapping_no_sub_leaves_seq_even() {
    let subs = Subscriptions::new();
    let log = new_log();
    let _a = subs.insert(va(0x10000), 0x1000, logging(&log, 0)).unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    assert_eq!(subs.seq(), 2);
    assert_eq!(active(&subs), 1, "counted although nothing overlaps");
    subs.invalidate_range_end(&range);
    assert_eq!(subs.seq(), 2);
    assert_eq!(active(&subs), 0);
    // An empty range overlaps nothing either.
    subs.invalidate(&r(0x10000, 0x10000)).unwrap();
    assert_eq!(subs.seq(), 2);
    assert!(tags(&log).is_empty());
}

#[test]
fn nonblocking_false_returns_again_after_ending_the_epoch() {
    let subs = Subscriptions::new();
    let log = new_log();
    let l = log.clone();
    let driver_lock = StdArc::new(StdMutex::new(()));
    let dl = driver_lock.clone();
    let a = subs
        .insert(
            va(0),
            0x1000,
            ops(move |sub, range, seq| {
                record(&l, 0, range, seq);
                let guard = if range.blockable {
                    Some(dl.lock().unwrap())
                } else {
                    dl.try_lock().ok()
                };
                let Some(_g) = guard else { return false };
                sub.set_seq(seq);
                true
            }),
        )
        .unwrap();
    let _b = subs.insert(va(0x1000), 0x1000, logging(&log, 1)).unwrap();
    let range = r(0, 0x2000).non_blocking();

    // Uncontended: the trylock succeeds.
    subs.invalidate(&range).unwrap();
    assert_eq!(tags(&log), vec![0, 1]);
    assert_eq!(subs.seq(), 4);
    log.lock().unwrap().clear();

    let held = driver_lock.lock().unwrap();
    assert!(matches!(
        subs.invalidate_range_start(&range),
        Err(Error::Again)
    ));
    assert_eq!(tags(&log), vec![0], "later subs are not called");
    assert_eq!(active(&subs), 0, "inv_end already ran");
    assert_eq!(subs.seq(), 6, "the epoch already ended");
    drop(held);
    // read_begin does not wait for an epoch that is over.
    let s = finishes(move || {
        let s = a.read_begin();
        drop(a);
        s
    });
    assert_eq!(s, 3);
}

#[test]
fn nonblocking_again_with_another_range_active_keeps_the_epoch() {
    let subs = Subscriptions::new();
    let _a = subs
        .insert(va(0), 0x1000, ops(|_, range, _| range.blockable))
        .unwrap();
    let other = r(0, 0x1000);
    subs.invalidate_range_start(&other).unwrap();
    assert!(matches!(
        subs.invalidate_range_start(&other.clone().non_blocking()),
        Err(Error::Again)
    ));
    assert_eq!(active(&subs), 1);
    assert_eq!(subs.seq(), 3);
    subs.invalidate_range_end(&other);
    assert_eq!(subs.seq(), 4);
}

#[test]
fn blockable_false_is_warned_and_ignored() {
    let subs = Subscriptions::new();
    let log = new_log();
    let l = log.clone();
    let _a = subs
        .insert(
            va(0),
            0x1000,
            ops(move |_, range, seq| {
                record(&l, 0, range, seq);
                false
            }),
        )
        .unwrap();
    let _b = subs.insert(va(0x800), 0x1000, logging(&log, 1)).unwrap();
    subs.invalidate(&r(0, 0x2000)).unwrap();
    assert_eq!(tags(&log), vec![0, 1]);
    assert_eq!(subs.seq(), 4);
    assert_eq!(active(&subs), 0);
}

#[test]
fn read_retry_and_check_retry_follow_set_seq() {
    let subs = Subscriptions::new();
    let own = OwnerId::new();
    let n = subs
        .insert(
            va(0),
            0x1000,
            ops(move |sub, range, seq| {
                // Skip our own events, as dmirror does for MIGRATE.
                if range.owner != Some(own) {
                    sub.set_seq(seq);
                }
                true
            }),
        )
        .unwrap();
    let s = n.read_begin();
    assert!(!n.read_retry(s));
    assert!(!n.check_retry(s));
    let own_event = NotifierRange::new(va(0), va(0x1000), Event::Migrate).with_owner(own);
    subs.invalidate(&own_event).unwrap();
    assert!(!n.read_retry(s), "no set_seq: the reader is not disturbed");
    subs.invalidate(&r(0, 0x1000)).unwrap();
    assert!(n.read_retry(s));
    assert!(n.check_retry(s));
    assert!(n.interval().read_retry(s));
    let s2 = n.read_begin();
    assert_eq!(s2, 5);
    assert!(!n.read_retry(s2));
    // set_seq through the handle as well.
    n.set_seq(7);
    assert!(n.read_retry(s2));
    assert_eq!(n.seq(), 7);
}

#[test]
fn seq_wraparound_never_sleeps_forever() {
    let subs = Subscriptions::new();
    subs.core.state.lock().invalidate_seq = u64::MAX - 1;
    let n = subs.insert(va(0), 0x1000, logging(&new_log(), 0)).unwrap();
    assert_eq!(n.seq(), u64::MAX - 2);
    subs.invalidate(&r(0, 0x1000)).unwrap();
    assert_eq!(n.seq(), u64::MAX);
    assert_eq!(subs.seq(), 0, "wrapped to an even value");
    let s = finishes(move || n.read_begin());
    assert_eq!(s, u64::MAX);
}

#[test]
fn callbacks_get_the_unclipped_range_only_when_overlapping_in_tree_order() {
    let subs = Subscriptions::new();
    let log = new_log();
    let mut keep = Vec::new();
    for (tag, start) in [(5, 0x5000), (1, 0x1000), (3, 0x3000), (9, 0x9000)] {
        keep.push(subs.insert(va(start), 0x1000, logging(&log, tag)).unwrap());
    }
    let owner = OwnerId::new();
    let range = NotifierRange::new(va(0x1800), va(0x5001), Event::Unmap).with_owner(owner);
    subs.invalidate(&range).unwrap();
    let calls = log.lock().unwrap().clone();
    assert_eq!(
        calls.iter().map(|c| c.tag).collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
    for c in calls {
        assert_eq!((c.start, c.end), (0x1800, 0x5001), "not clipped");
        assert_eq!(c.event, Event::Unmap);
        assert!(c.blockable);
        assert_eq!(c.owner, Some(owner));
        assert_eq!(c.cur_seq, 3);
    }
}

#[test]
fn last_is_inclusive_and_end_exclusive() {
    let subs = Subscriptions::new();
    let log = new_log();
    let n = subs.insert(va(0x1000), 0x1000, logging(&log, 0)).unwrap();
    assert_eq!(n.start(), va(0x1000));
    assert_eq!(n.last(), va(0x1fff));
    assert_eq!(n.range(), (va(0x1000), va(0x1fff)));
    for (range, hit) in [
        (r(0x2000, 0x3000), false),
        (r(0, 0x1000), false),
        (r(0x1fff, 0x2000), true),
        (r(0, 0x1001), true),
        (r(0x1800, 0x1800), false),
    ] {
        log.lock().unwrap().clear();
        subs.invalidate(&range).unwrap();
        assert_eq!(!tags(&log).is_empty(), hit, "{range:?}");
        assert_eq!(n.interval().overlaps(&range), hit, "{range:?}");
    }
}

#[test]
fn many_subs_small_invalidation_calls_only_the_overlapping_one() {
    let subs = Subscriptions::new();
    let calls = StdArc::new(AtomicUsize::new(0));
    let mut keep = Vec::new();
    for i in 0..10_000u64 {
        let c = calls.clone();
        let o = ops(move |sub, range, seq| {
            assert!(sub.overlaps(range));
            sub.set_seq(seq);
            c.fetch_add(1, Ordering::Relaxed);
            true
        });
        keep.push(subs.insert(va(i * 0x1000), 0x1000, o).unwrap());
    }
    for i in 0..10_000u64 {
        let page = (i * 7919) % 10_000 * 0x1000;
        subs.invalidate(&r(page, page + 0x1000)).unwrap();
    }
    assert_eq!(calls.load(Ordering::Relaxed), 10_000);
    drop(keep);
    assert_eq!(tree_len(&subs), 0);
}

#[test]
fn release_delivers_release_once_to_every_sub_then_insert_fails() {
    let subs = Subscriptions::new();
    let log = new_log();
    let a = subs.insert(va(0), 0x1000, logging(&log, 0)).unwrap();
    let b = subs
        .insert(va(0x7fff_0000_0000), 0x1000, logging(&log, 1))
        .unwrap();
    let c = subs.insert(va(u64::MAX), 1, logging(&log, 2)).unwrap();
    subs.release();
    subs.release();
    assert!(subs.is_released());
    let calls = log.lock().unwrap().clone();
    assert_eq!(
        calls.iter().map(|c| c.tag).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for call in &calls {
        assert_eq!(call.event, Event::Release);
        assert_eq!((call.start, call.end), (0, u64::MAX));
        assert!(call.blockable);
        assert_eq!(call.owner, None);
        assert_eq!(call.cur_seq, 3);
    }
    assert_eq!(subs.seq(), 4);
    assert!(matches!(
        subs.insert(va(0), 0x1000, logging(&log, 3)),
        Err(Error::Released)
    ));
    // The handles keep working and never hang.
    let (s, retry) = finishes(move || {
        let s = a.read_begin();
        (s, a.read_retry(s))
    });
    assert_eq!((s, retry), (3, false));
    finishes(move || b.remove()).unwrap();
    drop(c);
    assert_eq!(tree_len(&subs), 0);
}

#[test]
fn release_waits_for_deferred_inserts_so_they_get_release_too() {
    let subs = Subscriptions::new();
    let log = new_log();
    let _a = subs.insert(va(0), 0x1000, logging(&log, 0)).unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    let _b = subs.insert(va(0x1000), 0x1000, logging(&log, 1)).unwrap();
    log.lock().unwrap().clear();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            subs.release();
            tx.send(()).unwrap();
        });
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        assert!(matches!(
            subs.insert(va(0), 1, logging(&log, 2)),
            Err(Error::Released)
        ));
        subs.invalidate_range_end(&range);
        rx.recv_timeout(DEADLOCK).unwrap();
    });
    let calls = log.lock().unwrap().clone();
    assert_eq!(
        calls.iter().map(|c| (c.tag, c.event)).collect::<Vec<_>>(),
        vec![(0, Event::Release), (1, Event::Release)]
    );
}

/// Where a test keeps a notifier that its own callback takes out.
type Slot = StdArc<StdMutex<Option<IntervalNotifier>>>;
/// What the callback's `remove` (or drop) returned.
type Outcome = StdArc<StdMutex<Option<Result<()>>>>;

/// A driver whose callback removes (or drops) its own notifier. The returned
/// slot holds the notifier until the callback takes it; the callback only has
/// a weak reference, so there is no cycle.
fn self_removing(
    subs: &Arc<Subscriptions>,
    use_remove: bool,
) -> (Slot, StdArc<AtomicUsize>, Outcome) {
    let slot: Slot = StdArc::new(StdMutex::new(None));
    let calls = StdArc::new(AtomicUsize::new(0));
    let outcome: Outcome = StdArc::new(StdMutex::new(None));
    let (w, c, out) = (StdArc::downgrade(&slot), calls.clone(), outcome.clone());
    let n = subs
        .insert(
            va(0),
            0x1000,
            ops(move |sub, _, seq| {
                sub.set_seq(seq);
                c.fetch_add(1, Ordering::SeqCst);
                let me = Weak::upgrade(&w).and_then(|s| s.lock().unwrap().take());
                if let Some(me) = me {
                    if use_remove {
                        *out.lock().unwrap() = Some(me.remove());
                    } else {
                        drop(me);
                        *out.lock().unwrap() = Some(Ok(()));
                    }
                }
                true
            }),
        )
        .unwrap();
    *slot.lock().unwrap() = Some(n);
    (slot, calls, outcome)
}

#[test]
fn remove_from_inside_a_callback_is_an_error_not_a_deadlock() {
    let subs = Subscriptions::new();
    let (slot, calls, outcome) = self_removing(&subs, true);
    let s = subs.clone();
    finishes(move || s.invalidate(&r(0, 0x1000))).unwrap();
    assert!(matches!(
        outcome.lock().unwrap().take(),
        Some(Err(Error::Inval(
            "remove called from inside an invalidate callback"
        )))
    ));
    // The dropped handle scheduled the removal for the end of that epoch.
    assert_eq!(tree_len(&subs), 0);
    assert_eq!(deferred(&subs), 0);
    assert_eq!(subs.seq(), 4);
    subs.invalidate(&r(0, 0x1000)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(slot.lock().unwrap().is_none());
}

#[test]
fn drop_from_inside_a_callback_is_deferred_and_safe() {
    let subs = Subscriptions::new();
    let (slot, calls, outcome) = self_removing(&subs, false);
    let s = subs.clone();
    finishes(move || s.invalidate(&r(0, 0x1000))).unwrap();
    assert!(matches!(outcome.lock().unwrap().take(), Some(Ok(()))));
    assert_eq!(tree_len(&subs), 0);
    subs.invalidate(&r(0, 0x1000)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(slot.lock().unwrap().is_none());
}

#[test]
fn remove_from_a_callback_of_another_address_space_is_refused_too() {
    let s1 = Subscriptions::new();
    let s2 = Subscriptions::new();
    let victim = StdArc::new(StdMutex::new(Some(
        s2.insert(va(0), 1, ops(|_, _, _| true)).unwrap(),
    )));
    let outcome = StdArc::new(StdMutex::new(None));
    let (v, out) = (victim.clone(), outcome.clone());
    let _n = s1
        .insert(
            va(0),
            1,
            ops(move |_, _, _| {
                if let Some(n) = v.lock().unwrap().take() {
                    *out.lock().unwrap() = Some(n.remove());
                }
                true
            }),
        )
        .unwrap();
    let s = s1.clone();
    finishes(move || s.invalidate(&r(0, 1))).unwrap();
    assert!(matches!(
        outcome.lock().unwrap().take(),
        Some(Err(Error::Inval(_)))
    ));
    // s2 was idle, so the drop removed it at once.
    assert_eq!(tree_len(&s2), 0);
}

#[test]
fn drop_without_remove_removes() {
    let subs = Subscriptions::new();
    let calls = StdArc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let n = subs
        .insert(
            va(0),
            0x1000,
            ops(move |_, _, _| {
                c.fetch_add(1, Ordering::SeqCst);
                true
            }),
        )
        .unwrap();
    drop(n);
    assert_eq!(tree_len(&subs), 0);

    // During an odd epoch, drop waits like remove.
    let c = calls.clone();
    let n = subs
        .insert(
            va(0),
            0x1000,
            ops(move |_, _, _| {
                c.fetch_add(1, Ordering::SeqCst);
                true
            }),
        )
        .unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(move || {
            drop(n);
            tx.send(()).unwrap();
        });
        assert_eq!(rx.recv_timeout(BLOCKED), Err(RecvTimeoutError::Timeout));
        subs.invalidate_range_end(&range);
        rx.recv_timeout(DEADLOCK).unwrap();
    });
    subs.invalidate(&range).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(tree_len(&subs), 0);
}

#[test]
fn drop_while_unwinding_defers_instead_of_waiting() {
    let subs = Subscriptions::new();
    let n = subs.insert(va(0), 0x1000, ops(|_, _, _| true)).unwrap();
    let range = r(0, 0x1000);
    subs.invalidate_range_start(&range).unwrap();
    let res = finishes(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _n = n;
            panic!("a test assertion failed while the epoch was odd");
        }))
        .is_err()
    });
    assert!(res);
    assert_eq!(deferred(&subs), 1, "removal queued, not waited for");
    subs.invalidate_range_end(&range);
    assert_eq!(tree_len(&subs), 0);
}

#[test]
fn length_zero_or_overflow_is_rejected() {
    let subs = Subscriptions::new();
    let nop = || ops(|_, _, _| true);
    assert!(matches!(subs.insert(va(0), 0, nop()), Err(Error::Overflow)));
    assert!(matches!(
        subs.insert(va(u64::MAX), 2, nop()),
        Err(Error::Overflow)
    ));
    assert!(matches!(
        subs.insert(va(2), u64::MAX, nop()),
        Err(Error::Overflow)
    ));
    let whole = subs.insert(va(1), u64::MAX, nop()).unwrap();
    assert_eq!(whole.last(), va(u64::MAX));
    drop(whole);
    let top = subs.insert(va(u64::MAX), 1, nop()).unwrap();
    assert_eq!(top.last(), va(u64::MAX));
    let all = subs.insert(va(0), u64::MAX, nop()).unwrap();
    assert_eq!(all.last(), va(u64::MAX - 1));
    assert_eq!(tree_len(&subs), 2);
}

#[test]
fn a_panicking_callback_still_ends_the_epoch() {
    let subs = Subscriptions::new();
    let _n = subs
        .insert(va(0), 0x1000, ops(|_, _, _| panic!("driver bug")))
        .unwrap();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = subs.invalidate_range_start(&r(0, 0x1000));
    }));
    assert!(res.is_err());
    assert_eq!(active(&subs), 0);
    assert_eq!(subs.seq(), 4);
    assert!(!in_callback(), "the callback depth was restored");
}

#[test]
fn concurrent_readers_never_install_stale_pfns() {
    // The dmirror pattern with a "PTE" generation: every invalidation zaps the
    // device table under the driver lock, then bumps the CPU PTE.
    struct Driver {
        mapped: StdMutex<Option<u64>>,
        pte: std::sync::atomic::AtomicU64,
        bad: AtomicBool,
    }
    let drv = StdArc::new(Driver {
        mapped: StdMutex::new(None),
        pte: std::sync::atomic::AtomicU64::new(0),
        bad: AtomicBool::new(false),
    });
    let d = drv.clone();
    let subs = Subscriptions::new();
    let n = subs
        .insert(
            va(0),
            0x1000,
            ops(move |sub, _, seq| {
                let mut m = d.mapped.lock().unwrap();
                sub.set_seq(seq);
                // Anything mapped must be the current PTE: a stale one would
                // have been installed after the previous invalidation.
                if m.is_some_and(|v| v != d.pte.load(Ordering::SeqCst)) {
                    d.bad.store(true, Ordering::SeqCst);
                }
                *m = None;
                true
            }),
        )
        .unwrap();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..5_000 {
                let range = r(0, 0x1000);
                subs.invalidate_range_start(&range).unwrap();
                drv.pte.fetch_add(1, Ordering::SeqCst);
                subs.invalidate_range_end(&range);
            }
            stop.store(true, Ordering::SeqCst);
        });
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let seq = n.read_begin();
                    let v = drv.pte.load(Ordering::SeqCst);
                    let mut m = drv.mapped.lock().unwrap();
                    if !n.read_retry(seq) {
                        *m = Some(v);
                    }
                }
            });
        }
    });
    assert!(
        !drv.bad.load(Ordering::SeqCst),
        "a stale PFN survived an invalidation"
    );
    let m = *drv.mapped.lock().unwrap();
    assert!(m.is_none_or(|v| v == drv.pte.load(Ordering::SeqCst)));
}

#[test]
fn owner_ids_are_unique_and_events_have_kernel_values() {
    let a = OwnerId::new();
    let b = OwnerId::new();
    assert_ne!(a, b);
    assert_ne!(a.get(), 0);
    let values: Vec<u8> = [
        Event::Unmap,
        Event::Clear,
        Event::ProtectionVma,
        Event::ProtectionPage,
        Event::SoftDirty,
        Event::Release,
        Event::Migrate,
        Event::Exclusive,
    ]
    .iter()
    .map(|&e| e as u8)
    .collect();
    assert_eq!(values, (0..8).collect::<Vec<u8>>());
}

#[test]
fn belongs_to_is_pointer_identity() {
    let s1 = Subscriptions::new();
    let s2 = Subscriptions::new();
    let n = s1.insert(va(0), 1, ops(|_, _, _| true)).unwrap();
    assert!(n.belongs_to(&s1));
    assert!(!n.belongs_to(&s2));
    assert!(format!("{n:?} {s1:?}").contains("Interval"));
}

#[test]
fn everything_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Subscriptions>();
    check::<IntervalNotifier>();
    check::<Interval>();
    check::<NotifierRange>();
    check::<OwnerId>();
    check::<Event>();
}
