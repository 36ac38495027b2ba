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

/// Aborts the process when the test that made it is still running after
/// `limit`: a CPU fault that is never served, or a deadlock, would
/// otherwise hang the whole binary with no word of which test it was. The
/// message lists every thread with where the kernel has it waiting.
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn watchdog(what: impl Into<String>, limit: Duration) -> Watchdog {
    let what = what.into();
    let (done, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Past libtest's capture, which an abort would lose.
            let msg = format!(
                "{what}: still running after {limit:?}, aborting. Threads:\n{}\
                 Mappings registered with a userfaultfd (um: missing, uw: write-protect):\n{}",
                thread_states(),
                uffd_mappings()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
            std::process::abort();
        }
    });
    Watchdog {
        done: Some(done),
        thread: Some(thread),
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every thread of the process: name, kernel wait channel, kernel stack.
fn thread_states() -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stack: Vec<String> = read("stack")
            .lines()
            .take(6)
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
            .collect();
        out += &format!(
            "  {} {} wchan={} [{}]\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            stack.join(" < ")
        );
    }
    out
}

/// The mappings of the process that a userfaultfd tracks, from `smaps`.
fn uffd_mappings() -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out = String::new();
    let mut head = "";
    for line in smaps.lines() {
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            head = line;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let uffd: Vec<&str> = flags
                .split_whitespace()
                .filter(|f| matches!(*f, "um" | "uw" | "ui"))
                .collect();
            if !uffd.is_empty() {
                let range = head.split_whitespace().next().unwrap_or("");
                let kib = range
                    .split_once('-')
                    .and_then(|(a, b)| {
                        Some(
                            (u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                                / 1024,
                        )
                    })
                    .unwrap_or(0);
                out += &format!("  {head} ({kib} KiB) {}\n", uffd.join(" "));
            }
        }
    }
    out
}

/// 64-bit words per page.
pub const WORDS: usize = (hmm::PAGE_SIZE / 8) as usize;

/// Word `word` of page `page` of the data tagged `tag`: never zero, and
/// different for every tag, page and word.
pub fn pat(tag: u64, page: u64, word: usize) -> u64 {
    tag << 48 | page << 32 | 1 << 31 | word as u64
}

/// Writes the `tag` pattern into every page of `m` through the CPU.
pub fn fill(m: &hmm::os::mm::Mapping, tag: u64) {
    for p in 0..m.len() / hmm::PAGE_SIZE {
        for w in 0..WORDS {
            m.write_u64(p as usize * WORDS + w, pat(tag, p, w));
        }
    }
}

/// `mmap` of a private anonymous read-write mapping exactly over `run`,
/// with `fixed` = `MAP_FIXED` (replaces what is there, as an unmap would)
/// or `MAP_FIXED_NOREPLACE` (fails with `EEXIST` if anything is). Returns
/// the errno on failure.
pub fn map_at(run: VaRange, fixed: libc::c_int) -> Result<(), i32> {
    let want = run.start().as_mut_ptr::<libc::c_void>();
    // SAFETY: with MAP_FIXED the caller replaces pages of its own range,
    // which no Rust reference points into; MAP_FIXED_NOREPLACE replaces
    // nothing.
    #[allow(unsafe_code)]
    let p = unsafe {
        libc::mmap(
            want,
            run.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    if p != want {
        // A kernel that ignores MAP_FIXED_NOREPLACE placed it elsewhere.
        return Err(libc::EEXIST);
    }
    Ok(())
}
