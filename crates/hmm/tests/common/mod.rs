//! Shared test fixtures: a recording device and the canonical fault loop.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmm::notifier::{Event, Interval, IntervalNotifierOps, NotifierRange};
use hmm::{HmmPfn, HmmRange, IntervalNotifier, Mm, VaRange, VirtAddr};

/// A device that records every invalidation it receives.
#[derive(Default)]
pub struct Recorder {
    pub seen: Mutex<Vec<(Event, u64, u64)>>,
}

impl IntervalNotifierOps for Recorder {
    fn invalidate(&self, sub: &Interval, range: &NotifierRange, cur_seq: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        sub.set_seq(cur_seq);
        seen.push((range.event, range.start.get(), range.end.get()));
        true
    }
}

impl Recorder {
    /// Waits until an invalidation with `event` over exactly `[start, end)`
    /// arrived (other tests share the address space and its events).
    pub fn wait_for(&self, event: Event, start: VirtAddr, end: VirtAddr) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen
                .iter()
                .any(|&(e, s, t)| e == event && s <= start.get() && t >= end.get())
            {
                return true;
            }
            drop(seen);
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    pub fn events(&self) -> Vec<(Event, u64, u64)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A notifier over the whole user address space with a recorder behind it.
pub fn whole_space(mm: &Mm) -> (IntervalNotifier, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let n = mm
        .interval_notifier_insert(VirtAddr(0), hmm::addr::TASK_SIZE, rec.clone())
        .expect("insert");
    (n, rec)
}

/// The canonical loop: read_begin, range fault, retry on Busy.
pub fn fault(
    mm: &Mm,
    n: &IntervalNotifier,
    range: VaRange,
    default_flags: HmmPfn,
    pfns: &mut [HmmPfn],
    want_pfns: bool,
) -> hmm::Result<()> {
    loop {
        let seq = n.read_begin();
        let mut r = HmmRange::new(n, range.start(), range.end(), pfns);
        r.notifier_seq = seq;
        r.default_flags = default_flags;
        r.want_pfns = want_pfns;
        match mm.range_fault(&mut r) {
            Err(hmm::Error::Busy) => continue,
            other => return other,
        }
    }
}

/// Faults `m` in through the range fault so that it is registered.
pub fn mirror(mm: &Mm, n: &IntervalNotifier, m: &hmm::os::mm::Mapping) {
    let mut pfns = vec![HmmPfn::empty(); m.range().npages() as usize];
    fault(
        mm,
        n,
        m.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns,
        false,
    )
    .expect("fault");
    assert!(mm.is_registered(m.range()).expect("mm"));
}

/// Polls `cond` for up to 5 s.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}
