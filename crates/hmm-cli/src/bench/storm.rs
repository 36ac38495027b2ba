//! `hmm bench storm`: device faults while the CPU side keeps invalidating
//! the same range, under both mirror strategies, beside the same storm on
//! memory no mirror covers.
//!
//! Each strategy runs two phases of the same shape, back to back, their
//! order alternating between strategies:
//!
//! | phase | device threads loop | invalidator loops |
//! |---|---|---|
//! | mirrored | `Mirror::fault(range, write)` over the whole range | `MADV_DONTNEED` of a pseudo-random sub-range of it |
//! | raw | `MADV_POPULATE_WRITE` of the whole range (what the kernel does for a device fault) | the same `MADV_DONTNEED` sequence on a range no mirror covers (not registered with the userfaultfd) |
//!
//! Every call is timed. A mirrored fault that returns [`hmm::Error::Busy`]
//! gave up at the mirror's deadline; its time counts in the latency figures,
//! since it is what the device waited. Each second of a phase is one
//! repetition: a row's figure is the median (min–max) over the seconds of
//! the per-second figure (a rate, a percentile), and the ratio is paired by
//! second. The share of faults completed and the mirror's counters are
//! totals over the measured seconds.
//!
//! The targets hold for the range lock only: every device fault
//! completes (the share is at least the raw arm's, which never gives up),
//! and the invalidation's hold-up (the `MADV_DONTNEED` call) has a p99
//! within 2× the device fault's own p99 in the same storm. The sequence
//! strategy is reported under the same storm without a target.
//!
//! # Placement
//! The invalidator, the `Mm`'s service thread (which reads the `REMOVE`
//! event each mirrored `MADV_DONTNEED` waits on) and the measuring thread run
//! on cpu0: the cheap same-CPU hand-off of `reference/limits.md`. The device
//! threads run on the other CPUs (cpu1 on the 2-vCPU machines), as a device
//! works beside the CPU; so every `MADV_DONTNEED` also pays the TLB shootdown
//! IPI to a running sibling (about 13 µs), in both phases alike.

use std::collections::BTreeSet;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmm::mirror::MirrorStats;
use hmm::os::mm as osmm;
use hmm::rangelock::RangeLockStats;
use hmm::{Mirror, MirrorOptions, Mm, PAGE_SIZE, Strategy, VaRange};

use super::{
    BoxResult, Ctx, Pinned, Progress, Report, Row, RunStart, Target, fresh, order2, pinned_mm,
};

/// The CPU of the invalidator, the `Mm`'s service thread and the measuring
/// thread.
const CPU: usize = 0;
/// Pages in the stormed range.
const PAGES: u64 = 64;
/// The most pages one `MADV_DONTNEED` of the storm drops.
const INVAL_MAX_PAGES: u64 = 16;
/// Untimed run-in at the start of each phase.
const WARMUP: Duration = Duration::from_millis(250);
/// One repetition.
const WINDOW: Duration = Duration::from_secs(1);
/// How long, beyond the mirror's deadline, a thread may take to return
/// after the stop flag before the benchmark reports it stuck.
const GRACE: Duration = Duration::from_secs(10);
/// How often the measuring thread looks at the stop flag while it waits.
const POLL: Duration = Duration::from_millis(20);
/// Seed of the invalidator's sub-ranges: the same in every phase, so both
/// arms of a strategy see the same sequence.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// The most device threads `--threads` accepts.
pub(super) const MAX_THREADS: usize = 64;

/// What `hmm bench storm` was asked for.
#[derive(Clone, Copy, Debug)]
pub(super) struct StormOptions {
    /// Measured seconds per phase (one repetition each).
    pub seconds: u64,
    /// Device threads.
    pub threads: usize,
    /// The mirror's deadline.
    pub deadline: Duration,
}

/// The two arms of a strategy's pair of phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    /// Device threads fault through a mirror with this strategy.
    Mirrored(Strategy),
    /// Device threads run `MADV_POPULATE_WRITE` on an unmirrored range.
    Raw,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Mirrored(_) => "mirrored",
            Arm::Raw => "raw",
        }
    }
}

/// Assigns a call to the repetition (window) it started in.
#[derive(Clone, Copy, Debug)]
struct Clock {
    /// The start of the first measured window (the end of the warm-up).
    start: Instant,
    /// Measured windows.
    windows: usize,
}

impl Clock {
    /// The window of a call that started at `t`; `None` in the warm-up or
    /// after the last window.
    fn window(self, t: Instant) -> Option<usize> {
        let since = t.checked_duration_since(self.start)?;
        let w = usize::try_from(since.as_nanos() / WINDOW.as_nanos()).ok()?;
        (w < self.windows).then_some(w)
    }

    /// The end of the last window.
    fn end(self) -> Instant {
        self.start + WINDOW * u32::try_from(self.windows).unwrap_or(u32::MAX)
    }
}

/// The `q`-quantile of `sorted` by nearest rank (`q = 1` is the maximum);
/// `None` when it is empty.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    Some(sorted[rank - 1])
}

/// The timed calls of one thread, or of one side of a phase, by window.
#[derive(Clone, Debug, Default, PartialEq)]
struct Calls {
    /// Each call's time in µs, by window (sorted once merged).
    us: Vec<Vec<f64>>,
    /// Calls that completed, by window.
    done: Vec<u64>,
    /// Calls that gave up at the deadline, by window.
    gave_up: Vec<u64>,
}

impl Calls {
    fn new(windows: usize) -> Calls {
        Calls {
            us: vec![Vec::new(); windows],
            done: vec![0; windows],
            gave_up: vec![0; windows],
        }
    }

    fn record(&mut self, window: usize, us: f64, done: bool) {
        self.us[window].push(us);
        if done {
            self.done[window] += 1;
        } else {
            self.gave_up[window] += 1;
        }
    }

    /// Adds `other`'s calls (same number of windows) and keeps each
    /// window's times sorted.
    fn merge(&mut self, other: Calls) {
        for (a, b) in self.us.iter_mut().zip(other.us) {
            a.extend(b);
            a.sort_by(f64::total_cmp);
        }
        for (a, b) in self.done.iter_mut().zip(other.done) {
            *a += b;
        }
        for (a, b) in self.gave_up.iter_mut().zip(other.gave_up) {
            *a += b;
        }
    }

    /// All calls.
    fn calls(&self) -> u64 {
        self.us.iter().map(|w| w.len() as u64).sum()
    }

    fn done_total(&self) -> u64 {
        self.done.iter().sum()
    }

    fn gave_up_total(&self) -> u64 {
        self.gave_up.iter().sum()
    }

    /// Completed calls per second, by window.
    fn rates(&self) -> Vec<Option<f64>> {
        self.done
            .iter()
            .map(|&d| Some(d as f64 / WINDOW.as_secs_f64()))
            .collect()
    }

    /// The `q`-quantile of each window's times ([`quantile`]; the windows
    /// must be sorted, as [`Calls::merge`] leaves them).
    fn quantiles(&self, q: f64) -> Vec<Option<f64>> {
        self.us.iter().map(|w| quantile(w, q)).collect()
    }

    /// The `q`-quantile of all calls together.
    fn overall(&self, q: f64) -> Option<f64> {
        let mut all: Vec<f64> = self.us.iter().flatten().copied().collect();
        all.sort_by(f64::total_cmp);
        quantile(&all, q)
    }
}

/// The windows where both sides have a figure, as paired samples.
fn paired(ours: &[Option<f64>], raw: &[Option<f64>]) -> (Vec<f64>, Vec<f64>) {
    ours.iter()
        .zip(raw)
        .filter_map(|(o, r)| Some(((*o)?, (*r)?)))
        .unzip()
}

/// One step of xorshift64: a cheap, reproducible sequence.
fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The sub-range of `range` that random word `x` picks: a start page
/// anywhere, 1 to [`INVAL_MAX_PAGES`] pages, cut at the end of `range`.
fn sub_range(range: VaRange, x: u64) -> hmm::Result<VaRange> {
    let n = range.npages();
    let first = x % n;
    let len = (1 + (x >> 32) % INVAL_MAX_PAGES).min(n - first);
    VaRange::from_pages(range.start().checked_add_pages(first)?, len)
}

/// An error with its source chain, on one line.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// What the device threads call in a phase.
#[derive(Clone, Debug)]
enum DeviceOp {
    /// `Mirror::fault(range, write = true)`.
    Fault(Arc<Mirror>),
    /// `MADV_POPULATE_WRITE` of the range.
    Populate,
}

impl DeviceOp {
    /// One call: `Ok(true)` when it completed, `Ok(false)` when it gave up
    /// at the deadline.
    fn call(&self, range: VaRange) -> Result<bool, String> {
        match self {
            DeviceOp::Fault(mirror) => match mirror.fault(range, true) {
                Ok(()) => Ok(true),
                Err(hmm::Error::Busy) => Ok(false),
                Err(e) => Err(format!("Mirror::fault: {}", chain(&e))),
            },
            DeviceOp::Populate => osmm::populate(range, true)
                .map(|()| true)
                .map_err(|e| format!("MADV_POPULATE_WRITE: {e}")),
        }
    }
}

/// What a storm thread hands back.
#[derive(Debug)]
struct ThreadOut {
    calls: Calls,
    /// Why pinning failed, if it did.
    pin_error: Option<String>,
    /// The error that stopped the thread early, if any.
    error: Option<String>,
}

/// Pins the calling thread to `cpu`; the failure, in words.
fn pin(cpu: usize) -> Option<String> {
    osmm::pin_current_thread(cpu)
        .err()
        .map(|e| format!("cpu{cpu}: {e}"))
}

// The stop flag publishes nothing but itself (the results come back through
// `join`, which synchronizes), so every access is `Relaxed`.

/// Runs `call` on `cpu` until the stop flag, recording each success (its
/// start, its time in µs, whether it completed) in the window it started
/// in; the first error stops every thread.
fn call_loop(
    cpu: usize,
    clock: Clock,
    stop: &AtomicBool,
    mut call: impl FnMut() -> Result<(Instant, f64, bool), String>,
) -> ThreadOut {
    let pin_error = pin(cpu);
    let mut calls = Calls::new(clock.windows);
    let mut error = None;
    while !stop.load(Ordering::Relaxed) {
        match call() {
            Ok((t0, us, done)) => {
                if let Some(w) = clock.window(t0) {
                    calls.record(w, us, done);
                }
            }
            Err(e) => {
                error = Some(e);
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
    ThreadOut {
        calls,
        pin_error,
        error,
    }
}

/// A device thread: `op` over the whole range until the stop flag.
fn device_thread(
    op: DeviceOp,
    range: VaRange,
    cpu: usize,
    clock: Clock,
    stop: &AtomicBool,
) -> ThreadOut {
    call_loop(cpu, clock, stop, || {
        let t0 = Instant::now();
        let r = op.call(range);
        r.map(|done| (t0, t0.elapsed().as_secs_f64() * 1e6, done))
    })
}

/// The invalidator: `MADV_DONTNEED` of pseudo-random sub-ranges until the
/// stop flag.
fn invalidator_thread(range: VaRange, clock: Clock, stop: &AtomicBool) -> ThreadOut {
    let mut x = SEED;
    call_loop(CPU, clock, stop, || {
        x = xorshift(x);
        let sub = sub_range(range, x).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        osmm::dontneed(sub).map_err(|e| format!("MADV_DONTNEED {sub}: {e}"))?;
        Ok((t0, t0.elapsed().as_secs_f64() * 1e6, true))
    })
}

/// Waits until every thread has returned, at most `patience`, and collects
/// what they hand back.
///
/// # Errors
/// When a thread is still running after `patience` (its handle is dropped,
/// which detaches it; the process ends after the error is printed) or
/// panicked.
fn join_all(
    handles: Vec<(String, JoinHandle<ThreadOut>)>,
    patience: Duration,
) -> BoxResult<Vec<ThreadOut>> {
    let until = Instant::now() + patience;
    while handles.iter().any(|(_, h)| !h.is_finished()) {
        if Instant::now() >= until {
            let stuck: Vec<&str> = handles
                .iter()
                .filter(|(_, h)| !h.is_finished())
                .map(|(n, _)| n.as_str())
                .collect();
            return Err(format!(
                "{} did not stop within {:.1} s of the stop flag",
                stuck.join(", "),
                patience.as_secs_f64()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    handles
        .into_iter()
        .map(|(name, h)| h.join().map_err(|_| format!("{name} panicked").into()))
        .collect()
}

/// What one phase measured.
#[derive(Debug)]
struct Phase {
    /// The device threads' calls.
    device: Calls,
    /// The invalidator's `MADV_DONTNEED` calls.
    inval: Calls,
    /// The mirror's counters over the measured seconds (mirrored phases).
    stats: Option<(MirrorStats, RangeLockStats)>,
    /// Pinning failures, one line each.
    pin_errors: Vec<String>,
}

/// `after - before`, counter by counter (the counters only grow).
fn stats_delta(before: MirrorStats, after: MirrorStats) -> MirrorStats {
    MirrorStats {
        faults: after.faults.saturating_sub(before.faults),
        retries: after.retries.saturating_sub(before.retries),
        invalidations: after.invalidations.saturating_sub(before.invalidations),
        pages_mapped: after.pages_mapped.saturating_sub(before.pages_mapped),
        pages_cleared: after.pages_cleared.saturating_sub(before.pages_cleared),
        gave_up: after.gave_up.saturating_sub(before.gave_up),
        deferred: after.deferred.saturating_sub(before.deferred),
        pages_left_out: after.pages_left_out.saturating_sub(before.pages_left_out),
    }
}

/// `after - before` of the ever-growing counters; the gauges as of `after`.
fn lock_delta(before: RangeLockStats, after: RangeLockStats) -> RangeLockStats {
    RangeLockStats {
        holders: after.holders,
        waiters: after.waiters,
        granted_immediately: after
            .granted_immediately
            .saturating_sub(before.granted_immediately),
        waited: after.waited.saturating_sub(before.waited),
        would_block: after.would_block.saturating_sub(before.would_block),
    }
}

/// The CPU of each device thread: round-robin over every CPU but [`CPU`],
/// or [`CPU`] itself on a one-CPU machine.
fn device_cpus(online: usize, threads: usize) -> Vec<usize> {
    (0..threads)
        .map(|i| {
            if online > 1 {
                CPU + 1 + i % (online - 1)
            } else {
                CPU
            }
        })
        .collect()
}

/// Runs one phase: a fresh populated range, the threads for `arm`, the
/// warm-up and `opts.seconds` measured seconds.
fn phase(mm: &Mm, arm: Arm, opts: &StormOptions, cpus: &[usize]) -> BoxResult<Phase> {
    let m = fresh(PAGES * PAGE_SIZE)?;
    let range = m.range();
    osmm::populate(range, true).ctx("MADV_POPULATE_WRITE")?;
    let mirror = match arm {
        Arm::Mirrored(strategy) => {
            let options = MirrorOptions {
                strategy,
                deadline: opts.deadline,
                ..MirrorOptions::default()
            };
            let mirror = Mirror::new(mm, Some(range), options).ctx("Mirror::new")?;
            // The first device fault registers the VMA with the
            // userfaultfd; it is not part of the storm.
            mirror.fault(range, true).ctx("the first device fault")?;
            if !mm.is_registered(range).ctx("reading the registration")? {
                return Err("the mirrored range is not registered with the userfaultfd".into());
            }
            Some(Arc::new(mirror))
        }
        Arm::Raw => None,
    };
    let op = mirror.clone().map_or(DeviceOp::Populate, DeviceOp::Fault);
    let stop = Arc::new(AtomicBool::new(false));
    let clock = Clock {
        start: Instant::now() + WARMUP,
        windows: usize::try_from(opts.seconds).ctx("--seconds")?,
    };

    let mut handles = Vec::new();
    let mut spawn_error = None;
    for (i, &cpu) in cpus.iter().enumerate() {
        let (op, stop) = (op.clone(), stop.clone());
        let name = format!("storm-device-{i}");
        match std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || device_thread(op, range, cpu, clock, &stop))
        {
            Ok(h) => handles.push((name, h)),
            Err(e) => {
                spawn_error = Some(format!("spawning {name}: {e}"));
                break;
            }
        }
    }
    if spawn_error.is_none() {
        let stop = stop.clone();
        let name = "storm-invalidator".to_string();
        match std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || invalidator_thread(range, clock, &stop))
        {
            Ok(h) => handles.push((name, h)),
            Err(e) => spawn_error = Some(format!("spawning {name}: {e}")),
        }
    }
    if spawn_error.is_some() {
        stop.store(true, Ordering::Relaxed);
    }

    let wait = |until: Instant| {
        while !stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(POLL));
        }
    };
    wait(clock.start);
    let before = mirror.as_ref().map(|m| (m.stats(), m.range_lock_stats()));
    wait(clock.end());
    stop.store(true, Ordering::Relaxed);
    let outs = join_all(handles, opts.deadline + GRACE)?;
    if let Some(e) = spawn_error {
        return Err(e.into());
    }

    let mut device = Calls::new(clock.windows);
    let mut inval = Calls::new(clock.windows);
    let mut pin_errors = Vec::new();
    let mut errors = Vec::new();
    let n = outs.len();
    for (i, out) in outs.into_iter().enumerate() {
        pin_errors.extend(out.pin_error);
        errors.extend(out.error);
        // The invalidator was spawned last.
        if i + 1 == n {
            inval.merge(out.calls);
        } else {
            device.merge(out.calls);
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; ").into());
    }
    let stats = match (&mirror, before) {
        (Some(m), Some((s0, l0))) => Some((
            stats_delta(s0, m.stats()),
            lock_delta(l0, m.range_lock_stats()),
        )),
        _ => None,
    };
    if arm == Arm::Raw && mm.is_registered(range).ctx("reading the registration")? {
        return Err("the raw arm's range is registered with the userfaultfd".into());
    }
    // The mirror goes before the mapping it mirrors.
    drop(op);
    drop(mirror);
    drop(m);
    Ok(Phase {
        device,
        inval,
        stats,
        pin_errors,
    })
}

/// Pushes a row from per-window figures, or a note saying why there is none.
#[expect(clippy::too_many_arguments, reason = "one row's fields, named")]
fn push_row(
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    metric: String,
    unit: &'static str,
    baseline: String,
    ours: &[Option<f64>],
    raw: &[Option<f64>],
    target: Target,
) {
    let (o, r) = paired(ours, raw);
    match Row::from_samples(&metric, unit, baseline, &o, &r, target) {
        Some(row) => rows.push(row),
        None => notes.push(format!(
            "{metric}: no row (no second where both arms had a non-zero figure)"
        )),
    }
}

/// The rows of one strategy: the mirrored phase `ours` beside the raw phase
/// `raw`.
fn rows_for(strategy: Strategy, ours: &Phase, raw: &Phase, notes: &mut Vec<String>) -> Vec<Row> {
    let s = strategy.name();
    let judged = strategy == Strategy::RangeLock;
    let goal = |t: Target| if judged { t } else { Target::None };
    let mut rows = Vec::new();
    push_row(
        &mut rows,
        notes,
        format!("{s} device faults completed"),
        "faults/s",
        "MADV_POPULATE_WRITE calls, unmirrored storm".into(),
        &ours.device.rates(),
        &raw.device.rates(),
        Target::None,
    );
    let share =
        |c: &Calls| (c.calls() > 0).then(|| 100.0 * c.done_total() as f64 / c.calls() as f64);
    push_row(
        &mut rows,
        notes,
        format!("{s} device faults completed before the deadline"),
        "%",
        "MADV_POPULATE_WRITE calls completed, unmirrored storm".into(),
        &[share(&ours.device)],
        &[share(&raw.device)],
        goal(Target::AtLeast(1.0)),
    );
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        push_row(
            &mut rows,
            notes,
            format!("{s} device fault {name}"),
            "us",
            format!("MADV_POPULATE_WRITE {name}, unmirrored storm"),
            &ours.device.quantiles(q),
            &raw.device.quantiles(q),
            Target::None,
        );
    }
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        push_row(
            &mut rows,
            notes,
            format!("{s} invalidation (MADV_DONTNEED) {name}"),
            "us",
            format!("MADV_DONTNEED {name}, unmirrored storm"),
            &ours.inval.quantiles(q),
            &raw.inval.quantiles(q),
            Target::None,
        );
    }
    push_row(
        &mut rows,
        notes,
        format!("{s} invalidation p99 vs device fault p99"),
        "us",
        format!("{s} device fault p99, same storm"),
        &ours.inval.quantiles(0.99),
        &ours.device.quantiles(0.99),
        goal(Target::AtMost(2.0)),
    );
    if let Some((st, _)) = ours.stats {
        let calls = Some(ours.device.calls() as f64);
        let invals = Some(ours.inval.calls() as f64);
        for (what, value, per, base) in [
            ("retries", st.retries, "device fault calls", calls),
            (
                "invalidations deferred",
                st.deferred,
                "MADV_DONTNEED calls",
                invals,
            ),
            (
                "pages left out",
                st.pages_left_out,
                "device fault calls",
                calls,
            ),
        ] {
            push_row(
                &mut rows,
                notes,
                format!("{s} {what} (mirror counter)"),
                "count",
                format!("{per}, same storm"),
                &[Some(value as f64)],
                &[base],
                Target::None,
            );
        }
    }
    rows
}

/// One line on what a phase did, for the notes and the progress log.
fn phase_line(strategy: Strategy, arm: Arm, p: &Phase, deadline: Duration) -> String {
    let us = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let mut line = format!(
        "{strategy}, {} phase: {} device calls ({} completed, {} gave up at {} ms), device p99 \
         {} us; {} MADV_DONTNEED calls, p99 {} us",
        arm.name(),
        p.device.calls(),
        p.device.done_total(),
        p.device.gave_up_total(),
        deadline.as_millis(),
        us(p.device.overall(0.99)),
        p.inval.calls(),
        us(p.inval.overall(0.99)),
    );
    if let Some((s, l)) = p.stats {
        line.push_str(&format!(
            "; mirror counters: faults {}, retries {}, invalidations {}, pages mapped {}, \
             pages cleared {}, gave up {}, deferred {}, pages left out {}; range lock: granted \
             at once {}, waited {}, would block {}",
            s.faults,
            s.retries,
            s.invalidations,
            s.pages_mapped,
            s.pages_cleared,
            s.gave_up,
            s.deferred,
            s.pages_left_out,
            l.granted_immediately,
            l.waited,
            l.would_block,
        ));
    }
    line
}

/// Runs the benchmark: for each strategy, a mirrored and a raw phase.
pub(super) fn run(opts: StormOptions, progress: bool) -> BoxResult<Report> {
    let log = Progress(progress);
    let run_start = RunStart::now();
    // Counted before pinning: the count follows the calling thread's affinity.
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Pinned { mm, placement, thp } = pinned_mm(CPU, "the invalidator thread")?;
    let cpus = device_cpus(online, opts.threads);

    let mut rows = Vec::new();
    let mut phase_notes = Vec::new();
    let mut row_notes = Vec::new();
    let mut pin_errors = BTreeSet::new();
    for (k, strategy) in Strategy::ALL.into_iter().enumerate() {
        let mut done: [Option<Phase>; 2] = [None, None];
        for which in order2(k) {
            let arm = if which == 0 {
                Arm::Mirrored(strategy)
            } else {
                Arm::Raw
            };
            log.say(format!(
                "{strategy}, {} phase: {:.2} s warm-up + {} s",
                arm.name(),
                WARMUP.as_secs_f64(),
                opts.seconds
            ));
            let p =
                phase(&mm, arm, &opts, &cpus).ctx(&format!("{strategy}, {} phase", arm.name()))?;
            let line = phase_line(strategy, arm, &p, opts.deadline);
            log.say(format!("  {line}"));
            phase_notes.push(line);
            pin_errors.extend(p.pin_errors.iter().cloned());
            done[which] = Some(p);
        }
        let [Some(ours), Some(raw)] = &done else {
            return Err("a phase did not run".into());
        };
        rows.extend(rows_for(strategy, ours, raw, &mut row_notes));
    }

    let mut device_set: Vec<String> = cpus
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|c| format!("cpu{c}"))
        .collect();
    device_set.dedup();
    let mut placement = format!(
        "{placement}; {} device thread(s) pinned round-robin to {} (beside the CPU side: each \
         MADV_DONTNEED also pays a TLB shootdown IPI)",
        opts.threads,
        device_set.join(", ")
    );
    if !pin_errors.is_empty() {
        let list: Vec<String> = pin_errors.into_iter().collect();
        placement.push_str(&format!("; pinning failed: {}", list.join(", ")));
    }

    let mut notes = vec![
        format!(
            "range: {PAGES} pages ({} KiB) of private anonymous memory, MADV_NOHUGEPAGE (THP \
             mode: {thp}), populated; a fresh mapping per phase",
            PAGES * PAGE_SIZE / 1024
        ),
        format!(
            "storm: {} device thread(s) loop over the whole range (mirrored: Mirror::fault(write) \
             with deadline {} ms, {}-page chunks, PFNs read; raw: MADV_POPULATE_WRITE of a range \
             no mirror covers) while one invalidator loops MADV_DONTNEED of a pseudo-random \
             sub-range of 1-{INVAL_MAX_PAGES} pages (the same sequence in every phase); every \
             call timed; the invalidator is not rate-limited, so the raw storm is denser (a \
             mirrored MADV_DONTNEED waits for the service thread to read its event)",
            opts.threads,
            opts.deadline.as_millis(),
            MirrorOptions::default().chunk_pages
        ),
        format!(
            "reps: per strategy a mirrored and a raw phase back to back, order alternating; each \
             phase {:.2} s untimed warm-up, then {} s, each second one repetition (a call counts \
             in the second it started); device latencies include the calls that gave up; \
             p50/p99 by nearest rank per second; ratio = ours ÷ baseline paired by second, \
             median (min–max); completion share and mirror counters are totals over the \
             measured seconds",
            WARMUP.as_secs_f64(),
            opts.seconds
        ),
        "targets (range lock only, from the issue): every device fault completes (share >= 1x \
         the raw arm's 100%), and the MADV_DONTNEED p99 is within 2x the device fault's p99 in \
         the same storm; the sequence strategy is reported under the same storm without targets"
            .to_string(),
    ];
    notes.extend(phase_notes);
    notes.extend(row_notes);
    notes.extend(run_start.noise_note());
    Ok(Report {
        bench: "storm",
        placement,
        notes,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmm::VirtAddr;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&[1.0, 2.0], 0.5), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn calls_by_window() {
        let start = Instant::now();
        let clock = Clock { start, windows: 2 };
        assert_eq!(clock.window(start), Some(0));
        assert_eq!(clock.window(start + Duration::from_millis(999)), Some(0));
        assert_eq!(clock.window(start + WINDOW), Some(1));
        assert_eq!(clock.window(start + 2 * WINDOW), None);
        assert_eq!(clock.end(), start + 2 * WINDOW);
        let later = Clock {
            start: start + WINDOW,
            windows: 1,
        };
        assert_eq!(later.window(start), None);

        let mut a = Calls::new(2);
        a.record(0, 3.0, true);
        a.record(0, 1.0, false);
        let mut b = Calls::new(2);
        b.record(0, 2.0, true);
        b.record(1, 5.0, true);
        let mut all = Calls::new(2);
        all.merge(a);
        all.merge(b);
        assert_eq!(all.us[0], [1.0, 2.0, 3.0]);
        assert_eq!(
            (all.calls(), all.done_total(), all.gave_up_total()),
            (4, 3, 1)
        );
        assert_eq!(all.rates(), [Some(2.0), Some(1.0)]);
        assert_eq!(all.quantiles(1.0), [Some(3.0), Some(5.0)]);
        assert_eq!(Calls::new(1).quantiles(0.5), [None]);
        assert_eq!(all.overall(0.5), Some(2.0));
    }

    #[test]
    fn pairs_skip_windows_without_figures() {
        let (o, r) = paired(&[Some(1.0), None, Some(3.0)], &[Some(2.0), Some(9.0), None]);
        assert_eq!((o, r), (vec![1.0], vec![2.0]));
    }

    #[test]
    fn sub_ranges_stay_inside() {
        let range = VaRange::from_pages(VirtAddr(0x10_0000), PAGES).unwrap();
        let mut x = SEED;
        let mut lens = BTreeSet::new();
        for _ in 0..10_000 {
            x = xorshift(x);
            let sub = sub_range(range, x).unwrap();
            assert!(sub.start() >= range.start() && sub.end() <= range.end());
            assert!((1..=INVAL_MAX_PAGES).contains(&sub.npages()));
            lens.insert(sub.npages());
        }
        assert_eq!(lens.len() as u64, INVAL_MAX_PAGES);
        assert_ne!(xorshift(SEED), SEED);
    }

    #[test]
    fn device_threads_avoid_the_invalidators_cpu() {
        assert_eq!(device_cpus(2, 2), [1, 1]);
        assert_eq!(device_cpus(4, 4), [1, 2, 3, 1]);
        assert_eq!(device_cpus(1, 2), [0, 0]);
    }

    #[test]
    fn counters_subtract() {
        let a = MirrorStats {
            retries: 3,
            deferred: 1,
            ..MirrorStats::default()
        };
        let b = MirrorStats {
            retries: 10,
            deferred: 4,
            pages_left_out: 2,
            ..MirrorStats::default()
        };
        let d = stats_delta(a, b);
        assert_eq!((d.retries, d.deferred, d.pages_left_out), (7, 3, 2));
    }

    fn calls_with(us: &[&[f64]], gave_up: u64) -> Calls {
        let mut c = Calls::new(us.len());
        for (w, v) in us.iter().enumerate() {
            for &x in *v {
                c.record(w, x, true);
            }
        }
        c.gave_up[0] += gave_up;
        c.us[0].extend(std::iter::repeat_n(1e5, gave_up as usize));
        let mut sorted = Calls::new(us.len());
        sorted.merge(c);
        sorted
    }

    #[test]
    fn only_the_range_lock_is_judged() {
        let phase = |device: Calls, inval: Calls| Phase {
            device,
            inval,
            stats: Some((MirrorStats::default(), RangeLockStats::default())),
            pin_errors: Vec::new(),
        };
        let ours = phase(
            calls_with(&[&[10.0, 20.0], &[10.0, 30.0]], 0),
            calls_with(&[&[15.0], &[15.0]], 0),
        );
        let raw = phase(
            calls_with(&[&[5.0], &[5.0]], 0),
            calls_with(&[&[2.0], &[2.0]], 0),
        );
        let mut notes = Vec::new();
        let rl = rows_for(Strategy::RangeLock, &ours, &raw, &mut notes);
        assert!(notes.is_empty(), "{notes:?}");
        let goals: Vec<&str> = rl
            .iter()
            .filter(|r| r.target.is_goal())
            .map(|r| r.metric.as_str())
            .collect();
        assert_eq!(
            goals,
            [
                "range-lock device faults completed before the deadline",
                "range-lock invalidation p99 vs device fault p99"
            ]
        );
        assert!(rl.iter().all(|r| r.meets()));
        assert!(rl.iter().all(|r| r.metric.starts_with("range-lock ")));

        let seq = rows_for(Strategy::Sequence, &ours, &raw, &mut notes);
        assert!(seq.iter().all(|r| !r.target.is_goal()));
        assert_eq!(seq.len(), rl.len());

        // A give-up misses the completion target.
        let busy = phase(
            calls_with(&[&[10.0], &[10.0]], 1),
            calls_with(&[&[15.0], &[15.0]], 0),
        );
        let rl = rows_for(Strategy::RangeLock, &busy, &raw, &mut notes);
        let share = rl
            .iter()
            .find(|r| r.metric.ends_with("before the deadline"))
            .unwrap();
        assert!(!share.meets());
        assert!((share.value.median - 200.0 / 3.0).abs() < 1e-9);
    }
}
