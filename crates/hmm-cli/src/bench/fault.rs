//! `hmm bench fault`: range fault, device fault and invalidation, each beside
//! the raw primitive it is built on.
//!
//! | row | ours | raw primitive |
//! |---|---|---|
//! | snapshot, no PFNs | `Mm::range_fault`, `default_flags` 0, `want_pfns` false | `PAGEMAP_SCAN` with the range fault's filter |
//! | snapshot, PFNs | the same with `want_pfns` | that scan plus `pread` of `/proc/self/pagemap` over the range |
//! | device fault | `Mirror::fault(range, write)` on a fresh mapping | `MADV_POPULATE_WRITE` of an equally fresh mapping |
//! | munmap / DONTNEED | the call until the mirror's entry is gone | the same call on a page registered (WP mode, `EVENT_UNMAP`/`EVENT_REMOVE`) with a userfaultfd whose bare monitor reads and discards events |
//!
//! # Placement
//! The measuring thread, the `Mm`'s service thread and the bare monitor all
//! run on cpu0: the cheap "same CPU" placement of `reference/limits.md`
//! (a cross-vCPU wake-up costs 35–40 µs on these machines and would dominate
//! the invalidation rows). The `Mm` is created here, pinned, before anything
//! else in the process asks for it.
//!
//! # Warmth
//! Free page reporting hands memory idle for about 2 s back to the host, and
//! first-touching such memory costs up to twice as much. The device-fault
//! mappings are therefore made and unmapped back to back (each repetition
//! reuses the pages the previous one freed), the two arms alternate in order,
//! and the first repetition of every section is a discarded warm-up.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmm::mirror::MirrorGuard;
use hmm::notifier::{Interval, IntervalNotifierOps, NotifierRange};
use hmm::os::mm::{self as osmm, Mapping, Prot};
use hmm::os::pagemap::{Category, Entry, Pagemap};
use hmm::os::uffd::{Features, Message, RegisterMode, Uffd};
use hmm::{HmmPfn, HmmRange, IntervalNotifier, Mirror, MirrorOptions, Mm, PAGE_SIZE, VaRange};

use super::{
    BoxResult, Ctx, Pinned, Progress, Report, Row, RunStart, Target, fresh, order2, pinned_mm,
};

/// The CPU every thread of the benchmark runs on.
const CPU: usize = 0;
/// Size of each device-fault mapping (at most the snapshot size).
const FAULT_MIB: u64 = 256;
/// One-page calls per repetition of the invalidation rows.
const INVAL_PAGES: u64 = 2000;
/// Snapshot calls averaged in one repetition (each is a few milliseconds).
const SNAPSHOT_CALLS: u32 = 5;
/// How long an invalidation may take to reach the mirror before the
/// benchmark gives up (it normally takes microseconds).
const INVAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Notifier callbacks of a snapshot that keeps no device table: only the
/// sequence, so that `read_retry` works.
#[derive(Debug)]
struct SeqOnly;

impl IntervalNotifierOps for SeqOnly {
    fn invalidate(&self, sub: &Interval, _range: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}

/// Runs the benchmark: one warm-up and `reps` measured repetitions of each
/// section, the snapshot over `size_mib` MiB.
pub(super) fn run(reps: usize, size_mib: u64, progress: bool) -> BoxResult<Report> {
    let log = Progress(progress);
    let run_start = RunStart::now();
    let Pinned { mm, placement, thp } = pinned_mm(CPU, "bare uffd monitor")?;

    let size = size_mib
        .checked_mul(1 << 20)
        .ok_or("--size-mib is too large")?;
    let fault_len = size.min(FAULT_MIB << 20);
    log.say(format!("snapshot: {size_mib} MiB, 1 warm-up + {reps} reps"));
    let (snap, pfns_real) = snapshot(&mm, size, reps, &log)?;
    log.say(format!(
        "device fault: {} MiB fresh per rep",
        fault_len >> 20
    ));
    let fault = device_fault(&mm, fault_len, reps, &log)?;
    log.say(format!("invalidation: {INVAL_PAGES} pages per rep"));
    let (inval, inval_notes) = invalidation(&mm, reps, &log)?;

    let mut rows = Vec::new();
    rows.extend(snap);
    rows.push(fault);
    rows.extend(inval);
    let mut notes = vec![
        format!(
            "pages: 4 KiB PTEs everywhere (MADV_NOHUGEPAGE; THP mode: {thp}); PFNs read from \
             pagemap are {}",
            if pfns_real {
                "real (running as root)"
            } else {
                "0 (not root)"
            }
        ),
        format!(
            "reps: 1 warm-up discarded + {reps} measured per section, arms alternating in \
             order; ratio = ours ÷ raw paired within a rep, median (min–max) over reps"
        ),
        format!(
            "snapshot: {size_mib} MiB populated (MADV_POPULATE_WRITE), one call over the whole \
             range, mean of {SNAPSHOT_CALLS} calls per rep; raw scan: any_of PRESENT|SWAPPED \
             returning PRESENT|SWAPPED|PFNZERO|HUGE|FILE"
        ),
        format!(
            "device fault: {} MiB fresh mapping per rep, Mirror::fault(write) with default \
             options (512-page chunks, PFNs read), registration included; mappings unmapped \
             and remade back to back",
            fault_len >> 20
        ),
        format!(
            "invalidation: {INVAL_PAGES} one-page calls per rep on populated pages (munmap \
             trims the front of the VMA); ours = call until mirror.lock().get(addr) is None"
        ),
    ];
    notes.extend(inval_notes);
    notes.extend(run_start.noise_note());
    Ok(Report {
        bench: "fault",
        placement,
        notes,
        rows,
    })
}

/// One snapshot under the sequence protocol, retried while the notifier's
/// sequence moves.
fn range_snapshot(
    mm: &Mm,
    notifier: &IntervalNotifier,
    range: VaRange,
    pfns: &mut [HmmPfn],
    want_pfns: bool,
) -> hmm::Result<()> {
    loop {
        let seq = notifier.read_begin();
        let mut r = HmmRange::new(notifier, range.start(), range.end(), &mut *pfns);
        r.notifier_seq = seq;
        r.want_pfns = want_pfns;
        match mm.range_fault(&mut r) {
            Err(hmm::Error::Busy) => continue,
            other => other?,
        }
        if !notifier.read_retry(seq) {
            return Ok(());
        }
    }
}

/// Rows 1 and 2: the range fault without and with PFNs against the scan (and
/// the pagemap read). Also says whether PFNs are real.
fn snapshot(mm: &Mm, size: u64, reps: usize, log: &Progress) -> BoxResult<(Vec<Row>, bool)> {
    let m = Mapping::anonymous_aligned(size, 1 << 21, Prot::READ | Prot::WRITE).ctx("mmap")?;
    let range = m.range();
    osmm::hugepage(range, false).ctx("MADV_NOHUGEPAGE")?;
    osmm::populate(range, true).ctx("MADV_POPULATE_WRITE")?;
    let npages = range.npages() as usize;
    let notifier = mm.interval_notifier_insert(range.start(), range.len(), Arc::new(SeqOnly))?;
    let pagemap = Pagemap::open().ctx("open /proc/self/pagemap")?;
    let filter = hmm::range::WALK_FILTER;
    let mut pfns = vec![HmmPfn::empty(); npages];
    let mut regions = Vec::new();
    let mut entries = vec![Entry(0); npages];
    let mut samples: [Vec<f64>; 4] = Default::default();
    for rep in 0..=reps {
        let mut rate = [0.0; 4];
        let order = if rep.is_multiple_of(2) {
            [0, 1, 2, 3]
        } else {
            [1, 0, 3, 2]
        };
        for which in order {
            let start = Instant::now();
            for _ in 0..SNAPSHOT_CALLS {
                match which {
                    0 => range_snapshot(mm, &notifier, range, &mut pfns, false)?,
                    1 => {
                        regions.clear();
                        pagemap
                            .scan(range, &filter, &mut regions)
                            .ctx("PAGEMAP_SCAN")?;
                    }
                    2 => range_snapshot(mm, &notifier, range, &mut pfns, true)?,
                    _ => {
                        regions.clear();
                        pagemap
                            .scan(range, &filter, &mut regions)
                            .ctx("PAGEMAP_SCAN")?;
                        pagemap
                            .read_entries(range, &mut entries)
                            .ctx("pread /proc/self/pagemap")?;
                    }
                }
            }
            let per_call = start.elapsed().as_secs_f64() / f64::from(SNAPSHOT_CALLS);
            rate[which] = npages as f64 / per_call / 1e6;
            // Check (untimed) that each arm saw the whole range present.
            match which {
                0 | 2 => {
                    let ok = pfns
                        .iter()
                        .all(|p| p.contains(HmmPfn::VALID | HmmPfn::WRITE));
                    if !ok {
                        return Err("the range fault did not report every page valid+write".into());
                    }
                }
                _ => {
                    let covered: u64 = regions
                        .iter()
                        .filter(|r| r.categories.contains(Category::PRESENT))
                        .map(|r| (r.end.get() - r.start.get()) / PAGE_SIZE)
                        .sum();
                    if covered != npages as u64 {
                        return Err(format!(
                            "PAGEMAP_SCAN saw {covered} of {npages} pages present"
                        )
                        .into());
                    }
                }
            }
        }
        if rep > 0 {
            for (s, r) in samples.iter_mut().zip(rate) {
                s.push(r);
            }
        }
        log.say(format!(
            "  rep {rep}{}: range fault {:.1} / scan {:.1} Mpages/s; with PFNs {:.1} / scan+pread {:.1}",
            if rep == 0 { " (warm-up)" } else { "" },
            rate[0],
            rate[1],
            rate[2],
            rate[3]
        ));
    }
    let real_pfns = entries.iter().all(|e| e.pfn() != 0);
    if real_pfns && pfns.iter().any(|p| p.pfn().0 == 0) {
        return Err("pagemap gives PFNs but the range fault reported 0".into());
    }
    let mib = size >> 20;
    let rows = vec![
        Row::from_samples(
            format!("snapshot {mib} MiB present, no PFNs (range_fault)"),
            "Mpages/s",
            "PAGEMAP_SCAN",
            &samples[0],
            &samples[1],
            Target::AtLeast(0.7),
        )
        .ok_or("no snapshot samples")?,
        Row::from_samples(
            format!("snapshot {mib} MiB present, with PFNs (range_fault)"),
            "Mpages/s",
            "PAGEMAP_SCAN + pread pagemap",
            &samples[2],
            &samples[3],
            Target::AtLeast(0.7),
        )
        .ok_or("no snapshot samples")?,
    ];
    drop(notifier);
    Ok((rows, real_pfns))
}

/// Polls `done` under the mirror's lock, yielding the CPU in between (the
/// service thread that clears the entry runs on the same CPU).
fn wait_mirror(
    mirror: &Mirror,
    since: Instant,
    mut done: impl FnMut(&MirrorGuard<'_>) -> bool,
) -> BoxResult<()> {
    loop {
        if done(&mirror.lock()) {
            return Ok(());
        }
        if since.elapsed() > INVAL_TIMEOUT {
            return Err("an invalidation did not reach the mirror in time".into());
        }
        std::thread::yield_now();
    }
}

/// Row 3: a device fault (REQ_FAULT|REQ_WRITE) of fresh memory through the
/// mirror against MADV_POPULATE_WRITE of fresh memory, in ns per page.
fn device_fault(mm: &Mm, len: u64, reps: usize, log: &Progress) -> BoxResult<Row> {
    let mirror = Mirror::new(mm, None, MirrorOptions::default())?;
    let npages = len / PAGE_SIZE;
    let mut samples: [Vec<f64>; 2] = Default::default();
    for rep in 0..=reps {
        let mut ns = [0.0; 2];
        for which in order2(rep) {
            let m = fresh(len)?;
            let range = m.range();
            let start = Instant::now();
            if which == 0 {
                mirror.fault(range, true)?;
            } else {
                osmm::populate(range, true).ctx("MADV_POPULATE_WRITE")?;
            }
            ns[which] = start.elapsed().as_nanos() as f64 / npages as f64;
            if which == 0 {
                let mapped = mirror
                    .lock()
                    .entries_in(range)
                    .filter(|(_, e)| e.write)
                    .count() as u64;
                if mapped != npages {
                    return Err(format!("the mirror mapped {mapped} of {npages} pages").into());
                }
            }
            let since = Instant::now();
            drop(m);
            if which == 0 {
                // The service thread clears the table after munmap returns;
                // let it finish before the next timed arm shares the CPU.
                wait_mirror(&mirror, since, |t| t.is_empty())?;
            }
        }
        if rep > 0 {
            for (s, v) in samples.iter_mut().zip(ns) {
                s.push(v);
            }
        }
        log.say(format!(
            "  rep {rep}{}: mirror fault {:.0} / populate {:.0} ns/page",
            if rep == 0 { " (warm-up)" } else { "" },
            ns[0],
            ns[1]
        ));
    }
    Row::from_samples(
        format!(
            "device fault {} MiB fresh, REQ_FAULT|REQ_WRITE (Mirror::fault)",
            len >> 20
        ),
        "ns/page",
        "MADV_POPULATE_WRITE fresh",
        &samples[0],
        &samples[1],
        Target::AtMost(1.2),
    )
    .ok_or_else(|| "no device-fault samples".into())
}

/// A userfaultfd with `EVENT_REMOVE | EVENT_UNMAP` and a monitor thread on
/// [`CPU`] that only reads and discards its events: the floor for what any
/// event-driven invalidation costs the caller.
///
/// # Invariants
/// `uffd` is declared before `sentinel`, so on drop the userfaultfd is closed
/// (which unregisters everything) before the sentinel page is unmapped, and
/// that unmap waits for no reader.
struct BareMonitor {
    join: Option<JoinHandle<u64>>,
    uffd: Arc<Uffd>,
    /// A registered page whose `REMOVE` event tells the monitor to stop.
    sentinel: Mapping,
}

impl BareMonitor {
    fn start() -> BoxResult<Self> {
        let uffd = Arc::new(
            Uffd::open(Features::EVENT_REMOVE | Features::EVENT_UNMAP, false).ctx("userfaultfd")?,
        );
        let sentinel = Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE).ctx("mmap")?;
        osmm::populate(sentinel.range(), true).ctx("MADV_POPULATE_WRITE")?;
        uffd.register(sentinel.range(), RegisterMode::WP)
            .ctx("UFFDIO_REGISTER")?;
        let stop_at = sentinel.addr();
        let reader = uffd.clone();
        let join = std::thread::Builder::new()
            .name("bare-uffd-monitor".into())
            .spawn(move || {
                // Best effort, as for the service thread; the placement line
                // already says when pinning is impossible.
                let _ = osmm::pin_current_thread(CPU);
                let mut msgs = Vec::with_capacity(16);
                let mut events = 0u64;
                loop {
                    msgs.clear();
                    if reader.read_messages(&mut msgs).is_err() {
                        return events;
                    }
                    for m in &msgs {
                        match m {
                            Message::Remove { start, .. } if *start == stop_at => return events,
                            _ => events += 1,
                        }
                    }
                }
            })
            .ctx("spawn the monitor")?;
        Ok(Self {
            join: Some(join),
            uffd,
            sentinel,
        })
    }

    fn register(&self, range: VaRange) -> BoxResult<()> {
        self.uffd
            .register(range, RegisterMode::WP)
            .ctx("UFFDIO_REGISTER")?;
        Ok(())
    }

    /// Stops the monitor; returns how many events it discarded.
    fn stop(&mut self) -> u64 {
        let Some(join) = self.join.take() else {
            return 0;
        };
        if !join.is_finished() {
            // Waits until the monitor reads the event, then it returns.
            let _ = osmm::dontneed(self.sentinel.range());
        }
        join.join().unwrap_or(0)
    }
}

impl Drop for BareMonitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `n` populated one-page mappings, sorted by address.
fn one_page_mappings(n: u64) -> BoxResult<Vec<Mapping>> {
    let mut pages = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let p = Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE).ctx("mmap")?;
        osmm::populate(p.range(), true).ctx("MADV_POPULATE_WRITE")?;
        pages.push(p);
    }
    pages.sort_by_key(Mapping::addr);
    Ok(pages)
}

/// What one invalidation arm measured.
#[derive(Clone, Copy, Default)]
struct InvalRun {
    /// Mean µs per call (for ours: until the mirror's entry was gone).
    us: f64,
    /// Mean µs until the call itself returned.
    ret_us: f64,
    /// Calls after which the mirror's entry was already gone when the call
    /// returned (no poll needed).
    gone_at_return: u64,
}

/// Mean µs per call of `total` over [`INVAL_PAGES`] calls.
fn per_call_us(total: Duration) -> f64 {
    total.as_secs_f64() * 1e6 / INVAL_PAGES as f64
}

/// munmap of mirrored pages, each until its mirror entry is gone.
fn ours_munmap(mirror: &Mirror) -> BoxResult<InvalRun> {
    let mut pages = one_page_mappings(INVAL_PAGES)?;
    for p in &pages {
        mirror.fault(p.range(), true)?;
    }
    let mut total = Duration::ZERO;
    let mut ret = Duration::ZERO;
    let mut gone = 0;
    for p in pages.drain(..) {
        let addr = p.addr();
        let t0 = Instant::now();
        drop(p);
        ret += t0.elapsed();
        if mirror.lock().get(addr).is_none() {
            gone += 1;
        } else {
            wait_mirror(mirror, t0, |t| t.get(addr).is_none())?;
        }
        total += t0.elapsed();
    }
    Ok(InvalRun {
        us: per_call_us(total),
        ret_us: per_call_us(ret),
        gone_at_return: gone,
    })
}

/// munmap of pages registered with a bare monitor.
fn raw_munmap() -> BoxResult<InvalRun> {
    let mut pages = one_page_mappings(INVAL_PAGES)?;
    let mut mon = BareMonitor::start()?;
    for p in &pages {
        mon.register(p.range())?;
    }
    let mut total = Duration::ZERO;
    for p in pages.drain(..) {
        let t0 = Instant::now();
        drop(p);
        total += t0.elapsed();
    }
    let events = mon.stop();
    if events < INVAL_PAGES {
        return Err(format!("the bare monitor saw {events} of {INVAL_PAGES} UNMAP events").into());
    }
    Ok(InvalRun {
        us: per_call_us(total),
        ret_us: per_call_us(total),
        gone_at_return: 0,
    })
}

/// MADV_DONTNEED of mirrored pages, each until its mirror entry is gone.
fn ours_dontneed(mirror: &Mirror) -> BoxResult<InvalRun> {
    let m = fresh(INVAL_PAGES * PAGE_SIZE)?;
    osmm::populate(m.range(), true).ctx("MADV_POPULATE_WRITE")?;
    mirror.fault(m.range(), true)?;
    let mut total = Duration::ZERO;
    let mut ret = Duration::ZERO;
    let mut gone = 0;
    for i in 0..INVAL_PAGES {
        let page = m.pages(i, 1);
        let addr = page.start();
        let t0 = Instant::now();
        osmm::dontneed(page).ctx("MADV_DONTNEED")?;
        ret += t0.elapsed();
        if mirror.lock().get(addr).is_none() {
            gone += 1;
        } else {
            wait_mirror(mirror, t0, |t| t.get(addr).is_none())?;
        }
        total += t0.elapsed();
    }
    Ok(InvalRun {
        us: per_call_us(total),
        ret_us: per_call_us(ret),
        gone_at_return: gone,
    })
}

/// MADV_DONTNEED of pages registered with a bare monitor.
fn raw_dontneed() -> BoxResult<InvalRun> {
    let m = fresh(INVAL_PAGES * PAGE_SIZE)?;
    osmm::populate(m.range(), true).ctx("MADV_POPULATE_WRITE")?;
    let mut mon = BareMonitor::start()?;
    mon.register(m.range())?;
    let mut total = Duration::ZERO;
    for i in 0..INVAL_PAGES {
        let page = m.pages(i, 1);
        let t0 = Instant::now();
        osmm::dontneed(page).ctx("MADV_DONTNEED")?;
        total += t0.elapsed();
    }
    let events = mon.stop();
    if events < INVAL_PAGES {
        return Err(format!("the bare monitor saw {events} of {INVAL_PAGES} REMOVE events").into());
    }
    Ok(InvalRun {
        us: per_call_us(total),
        ret_us: per_call_us(total),
        gone_at_return: 0,
    })
}

/// Rows 4 and 5: munmap and MADV_DONTNEED of one mirrored page until the
/// device entry is gone, against the same call with a bare monitor. Also
/// returns notes on how often the entry was already gone at return.
fn invalidation(mm: &Mm, reps: usize, log: &Progress) -> BoxResult<(Vec<Row>, Vec<String>)> {
    let mirror = Mirror::new(mm, None, MirrorOptions::default())?;
    let mut samples: [Vec<f64>; 4] = Default::default();
    let mut gone = [0u64; 2];
    let mut ret: [Vec<f64>; 2] = Default::default();
    for rep in 0..=reps {
        let mut run = [InvalRun::default(); 4];
        for pair in order2(rep) {
            for arm in order2(rep) {
                let which = 2 * pair + arm;
                run[which] = match which {
                    0 => ours_munmap(&mirror)?,
                    1 => raw_munmap()?,
                    2 => ours_dontneed(&mirror)?,
                    _ => raw_dontneed()?,
                };
            }
        }
        if rep > 0 {
            for (s, r) in samples.iter_mut().zip(run) {
                s.push(r.us);
            }
            gone[0] += run[0].gone_at_return;
            gone[1] += run[2].gone_at_return;
            ret[0].push(run[0].ret_us);
            ret[1].push(run[2].ret_us);
        }
        log.say(format!(
            "  rep {rep}{}: munmap {:.2} / bare {:.2} us; DONTNEED {:.2} / bare {:.2} us",
            if rep == 0 { " (warm-up)" } else { "" },
            run[0].us,
            run[1].us,
            run[2].us,
            run[3].us
        ));
    }
    let calls = INVAL_PAGES * reps as u64;
    let median = |v: &[f64]| super::Stats::of(v).map_or(f64::NAN, |s| s.median);
    let notes = [("munmap", 0, 1), ("DONTNEED", 1, 3)]
        .into_iter()
        .map(|(op, i, raw)| {
            format!(
                "invalidation, {op}: ours returned after {:.2} us (bare monitor {:.2} us) and \
                 the entry was gone after {:.2} us (medians); gone already at return in {:.1}% \
                 of calls, otherwise the thread yielded until it was",
                median(&ret[i]),
                median(&samples[raw]),
                median(&samples[2 * i]),
                100.0 * gone[i] as f64 / calls as f64
            )
        })
        .collect();
    let rows = vec![
        Row::from_samples(
            "invalidate: munmap 4 KiB mirrored page, until entry gone",
            "us/call",
            "munmap 4 KiB, uffd WP + EVENT_UNMAP, bare monitor",
            &samples[0],
            &samples[1],
            Target::AtMost(1.3),
        )
        .ok_or("no munmap samples")?,
        Row::from_samples(
            "invalidate: MADV_DONTNEED 4 KiB mirrored page, until entry gone",
            "us/call",
            "MADV_DONTNEED 4 KiB, uffd WP + EVENT_REMOVE, bare monitor",
            &samples[2],
            &samples[3],
            Target::AtMost(1.3),
        )
        .ok_or("no DONTNEED samples")?,
    ];
    Ok((rows, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_alternate() {
        assert_eq!(order2(0), [0, 1]);
        assert_eq!(order2(1), [1, 0]);
        assert_eq!(order2(2), [0, 1]);
    }

    #[test]
    fn errors_name_what_failed() {
        let r: Result<(), &str> = Err("boom");
        let e = r.ctx("mmap").unwrap_err();
        assert_eq!(e.to_string(), "mmap: boom");
    }
}
