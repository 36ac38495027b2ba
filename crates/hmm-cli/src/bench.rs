//! `hmm bench`: each figure of the library beside the raw kernel primitive it
//! is judged against, both measured in the same run (DESIGN.md §8).
//!
//! These machines are shared and noisy (`reference/limits.md`), so a goal is a
//! ratio to the primitive, never an absolute time. Every benchmark runs one
//! warm-up repetition that is discarded, then `reps` measured repetitions; in
//! each repetition the library's operation and the raw primitive run back to
//! back (their order alternating between repetitions), so a drift of the
//! machine moves both. A row reports the median and min–max over the measured
//! repetitions of the library's figure, of the primitive's, and of their
//! per-repetition ratio (library ÷ primitive); the verdict compares the
//! median ratio with the target.
//!
//! The statistics, the verdict and the report formats are pure and tested
//! here; the measurements live in the submodules.

use std::error::Error;
use std::fmt::{self, Display};
use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use serde::Serialize;

mod fault;
mod migrate;
mod storm;

/// The error type of the measurements.
type BoxResult<T> = Result<T, Box<dyn Error>>;

/// Adds what failed to an error.
trait Ctx<T> {
    fn ctx(self, what: &str) -> BoxResult<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> BoxResult<T> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
}

/// Logs progress to stderr when asked.
struct Progress(bool);

impl Progress {
    fn say(&self, what: impl Display) {
        if self.0 {
            eprintln!("{what}");
        }
    }
}

/// A fresh private anonymous mapping of `len` bytes with 4 KiB pages
/// (`MADV_NOHUGEPAGE`), not populated.
fn fresh(len: u64) -> BoxResult<hmm::os::mm::Mapping> {
    use hmm::os::mm::{self as osmm, Mapping, Prot};
    let m = Mapping::anonymous(len, Prot::READ | Prot::WRITE).ctx("mmap")?;
    osmm::hugepage(m.range(), false).ctx("MADV_NOHUGEPAGE")?;
    Ok(m)
}

/// The order of two arms in repetition `rep`: alternating, so neither
/// always runs on memory the other just freed.
fn order2(rep: usize) -> [usize; 2] {
    if rep.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// The benchmarks `hmm bench` runs.
#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// Range fault, device fault and invalidation against PAGEMAP_SCAN,
    /// MADV_POPULATE_WRITE and a bare userfaultfd monitor.
    Fault {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Measured repetitions (after one discarded warm-up repetition).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Size of the snapshot range in MiB (the device fault uses at most 256 MiB of it).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    /// Migration to device memory and back (the kernel's
    /// benchmark_thp_migration sizes, with and without THP, both storage
    /// flavours), CPU fault-back and a CPU scan of migrated memory, against
    /// memcpy, UFFDIO_MOVE/COPY and a bare userfaultfd monitor.
    Migrate {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Measured repetitions (after one discarded warm-up repetition);
        /// the 256 MiB rows run half as many, rounded up.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Device faults while another thread keeps calling MADV_DONTNEED on the
    /// same range, for both mirror strategies (sequence, range lock), beside
    /// the same storm on memory no mirror covers.
    Storm {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds measured per phase (after a 0.25 s warm-up); each second
        /// is one repetition.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Device threads faulting the range.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// The mirror's deadline (`MirrorOptions::deadline`) in milliseconds:
        /// a device fault gives up with Busy after it.
        #[arg(long, default_value_t = 100)]
        deadline_ms: u64,
    },
}

/// Runs the benchmark `which` and prints its report. A missed target is a
/// result, not a failure: the exit status is non-zero only when the benchmark
/// could not run.
pub fn run(which: BenchKind) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match which {
        BenchKind::Fault {
            json,
            reps,
            size_mib,
        } => {
            if reps == 0 {
                return Err("--reps must be at least 1".into());
            }
            if size_mib == 0 {
                return Err("--size-mib must be at least 1".into());
            }
            let report = fault::run(reps, size_mib, !json)?;
            print_report(&report, json)?;
        }
        BenchKind::Migrate { json, reps } => {
            if reps == 0 {
                return Err("--reps must be at least 1".into());
            }
            let report = migrate::run(reps, !json)?;
            print_report(&report, json)?;
        }
        BenchKind::Storm {
            json,
            seconds,
            threads,
            deadline_ms,
        } => {
            if !(1..=3600).contains(&seconds) {
                return Err("--seconds must be between 1 and 3600".into());
            }
            if !(1..=storm::MAX_THREADS).contains(&threads) {
                return Err(
                    format!("--threads must be between 1 and {}", storm::MAX_THREADS).into(),
                );
            }
            if !(1..=60_000).contains(&deadline_ms) {
                return Err("--deadline-ms must be between 1 and 60000".into());
            }
            let opts = storm::StormOptions {
                seconds,
                threads,
                deadline: std::time::Duration::from_millis(deadline_ms),
            };
            let report = storm::run(opts, !json)?;
            print_report(&report, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `report` as JSON or as a table.
fn print_report(report: &Report, json: bool) -> Result<(), Box<dyn Error>> {
    if json {
        println!("{}", report.to_json()?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// Median and range of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// The median (the mean of the two middle samples for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

impl Stats {
    /// The statistics of `samples`; `None` when there are none or one is NaN.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() || samples.iter().any(|x| x.is_nan()) {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if !n.is_multiple_of(2) {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }
}

/// A goal for the ratio library ÷ primitive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// The ratio must be at least this (a rate: higher is better).
    AtLeast(f64),
    /// The ratio must be at most this (a cost: lower is better).
    AtMost(f64),
    /// No goal: the row is reported, not judged.
    None,
}

impl Target {
    /// Whether `ratio` meets the target (always, for [`Target::None`]).
    pub fn meets(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(t) => ratio >= t,
            Target::AtMost(t) => ratio <= t,
            Target::None => true,
        }
    }

    /// Whether there is a goal to judge.
    pub fn is_goal(self) -> bool {
        self != Target::None
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::AtLeast(t) => write!(f, ">= {t}"),
            Target::AtMost(t) => write!(f, "<= {t}"),
            Target::None => f.write_str("none"),
        }
    }
}

/// One line of a report: the library's figure beside the primitive's.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// What was measured, with its size and page size.
    pub metric: String,
    /// The unit of `value` and `baseline_value`.
    pub unit: &'static str,
    /// The raw primitive it is judged against.
    pub baseline: String,
    /// The library's figure over the repetitions.
    pub value: Stats,
    /// The primitive's figure over the repetitions.
    pub baseline_value: Stats,
    /// The per-repetition ratio value ÷ baseline value.
    pub ratio: Stats,
    /// The goal for the median ratio.
    pub target: Target,
}

impl Row {
    /// A row from paired samples: `ours[i]` and `raw[i]` were measured in
    /// the same repetition. `None` when they are empty, of different lengths,
    /// or a raw sample is zero.
    pub fn from_samples(
        metric: impl Into<String>,
        unit: &'static str,
        baseline: impl Into<String>,
        ours: &[f64],
        raw: &[f64],
        target: Target,
    ) -> Option<Row> {
        if ours.len() != raw.len() || raw.contains(&0.0) {
            return None;
        }
        let ratios: Vec<f64> = ours.iter().zip(raw).map(|(o, r)| o / r).collect();
        Some(Row {
            metric: metric.into(),
            unit,
            baseline: baseline.into(),
            value: Stats::of(ours)?,
            baseline_value: Stats::of(raw)?,
            ratio: Stats::of(&ratios)?,
            target,
        })
    }

    /// Whether the median ratio meets the target.
    pub fn meets(&self) -> bool {
        self.target.meets(self.ratio.median)
    }
}

/// A benchmark's result: its rows and how its threads were placed.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The benchmark's name (`"fault"`, `"migrate"`).
    pub bench: &'static str,
    /// Thread placement, in words.
    pub placement: String,
    /// Lines of explanation printed above the table (sizes, page size, method).
    pub notes: Vec<String>,
    /// The rows.
    pub rows: Vec<Row>,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    metric: &'a str,
    value: f64,
    unit: &'a str,
    baseline: &'a str,
    baseline_value: f64,
    ratio: f64,
    target: String,
    min: f64,
    max: f64,
    reps: usize,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    bench: &'a str,
    placement: &'a str,
    rows: Vec<JsonRow<'a>>,
}

impl Report {
    /// The JSON form: `{"bench", "placement", "rows": [{"metric", "value",
    /// "unit", "baseline", "baseline_value", "ratio", "target", "min", "max",
    /// "reps"}]}`, with medians in `value`, `baseline_value` and `ratio`, and
    /// `min`/`max` the range of `value`.
    ///
    /// # Errors
    /// When serialization fails (a non-finite number).
    pub fn to_json(&self) -> serde_json::Result<String> {
        let j = JsonReport {
            bench: self.bench,
            placement: &self.placement,
            rows: self
                .rows
                .iter()
                .map(|r| JsonRow {
                    metric: &r.metric,
                    value: r.value.median,
                    unit: r.unit,
                    baseline: &r.baseline,
                    baseline_value: r.baseline_value.median,
                    ratio: r.ratio.median,
                    target: r.target.to_string(),
                    min: r.value.min,
                    max: r.value.max,
                    reps: r.value.n,
                })
                .collect(),
        };
        serde_json::to_string_pretty(&j)
    }
}

/// What both benchmarks start with (see [`pinned_mm`]).
pub(crate) struct Pinned {
    /// The process's `Mm`, its service thread pinned.
    pub mm: hmm::Mm,
    /// The thread placement, in words, for the report.
    pub placement: String,
    /// The THP mode line of `/sys/kernel/mm/transparent_hugepage/enabled`.
    pub thp: String,
}

/// Pins the calling thread to `cpu` and creates the `Mm` with its service
/// thread pinned there too (before anything else asks for the `Mm`: its
/// service thread is pinned at birth). `monitors` names the raw baselines'
/// threads, which their benchmark pins to the same CPU.
pub(crate) fn pinned_mm(cpu: usize, monitors: &str) -> BoxResult<Pinned> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = hmm::os::mm::pin_current_thread(cpu);
    let mm = hmm::Mm::get_with(hmm::MmOptions {
        service_cpu: Some(cpu),
    })
    .ctx("creating the Mm")?;
    let placement = match &pinned {
        Ok(()) => format!(
            "same CPU: measuring thread, hmm service thread and {monitors} pinned to \
             cpu{cpu} ({online} online)"
        ),
        Err(e) => format!("unpinned: pinning to cpu{cpu} failed ({e}); scheduler's choice"),
    };
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Pinned { mm, placement, thp })
}

/// CPU time in `USER_HZ` ticks (100 per second on Linux): every CPU's busy
/// time from `/proc/stat`, and this process's from `/proc/self/stat`. The
/// difference over a run is what other processes used: the noise indicator
/// of `reference/limits.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTicks {
    /// user + nice + system + irq + softirq of all CPUs.
    pub busy: u64,
    /// utime + stime of this process (all threads).
    pub own: u64,
}

impl CpuTicks {
    /// Reads both files now; `None` when either cannot be read or parsed.
    pub fn now() -> Option<CpuTicks> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        Some(CpuTicks {
            busy: parse_busy(&stat)?,
            own: parse_own(&own)?,
        })
    }

    /// Seconds of CPU that others used between `self` and `later`.
    pub fn others_since(self, later: CpuTicks) -> f64 {
        let busy = later.busy.saturating_sub(self.busy);
        let own = later.own.saturating_sub(self.own);
        busy.saturating_sub(own) as f64 / 100.0
    }
}

/// The start of a benchmark run, for its closing noise note.
#[derive(Clone, Copy, Debug)]
pub struct RunStart {
    wall: Instant,
    ticks: Option<CpuTicks>,
}

impl RunStart {
    /// Now.
    pub fn now() -> RunStart {
        RunStart {
            wall: Instant::now(),
            ticks: CpuTicks::now(),
        }
    }

    /// "noise: other processes used … CPU-s during the … s run", when the
    /// CPU times could be read at both ends.
    pub fn noise_note(&self) -> Option<String> {
        let (t0, t1) = (self.ticks?, CpuTicks::now()?);
        Some(format!(
            "noise: other processes used {:.2} CPU-s during the {:.1} s run",
            t0.others_since(t1),
            self.wall.elapsed().as_secs_f64()
        ))
    }
}

/// The busy ticks of the `cpu` line of `/proc/stat`.
fn parse_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq ...
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

/// utime + stime from `/proc/self/stat` (fields 14 and 15, counted after the
/// parenthesised command name, which may contain spaces).
fn parse_own(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A number with about four significant digits, without an exponent.
fn num(x: f64) -> String {
    let a = x.abs();
    let decimals = if a >= 1000.0 {
        0
    } else if a >= 100.0 {
        1
    } else if a >= 10.0 {
        2
    } else if a >= 1.0 {
        3
    } else {
        4
    };
    format!("{x:.decimals$}")
}

/// `median (min–max)`.
fn spread(s: &Stats) -> String {
    format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "hmm bench {}", self.bench)?;
        writeln!(f, "placement: {}", self.placement)?;
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        writeln!(f)?;
        let header = [
            "metric",
            "value",
            "unit",
            "baseline",
            "baseline value",
            "ratio",
            "target",
            "verdict",
        ];
        let cells: Vec<[String; 8]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.metric.clone(),
                    spread(&r.value),
                    r.unit.to_string(),
                    r.baseline.clone(),
                    spread(&r.baseline_value),
                    spread(&r.ratio),
                    r.target.to_string(),
                    if !r.target.is_goal() {
                        "-"
                    } else if r.meets() {
                        "meets"
                    } else {
                        "misses"
                    }
                    .to_string(),
                ]
            })
            .collect();
        let mut width = header.map(|h| h.chars().count());
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, row: &[&str]| -> fmt::Result {
            let parts: Vec<String> = row
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            writeln!(f, "{}", parts.join("  ").trim_end())
        };
        line(f, &header)?;
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        line(f, &rule.iter().map(String::as_str).collect::<Vec<_>>())?;
        for row in &cells {
            line(f, &row.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        let judged = self.rows.iter().filter(|r| r.target.is_goal()).count();
        let met = self
            .rows
            .iter()
            .filter(|r| r.target.is_goal() && r.meets())
            .count();
        writeln!(f)?;
        writeln!(
            f,
            "{met} of {judged} targets met (verdict on the median ratio)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        let s = Stats::of(&[7.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (7.0, 7.0, 7.0));
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn cpu_ticks_parse() {
        let stat = "cpu  10 1 20 500 7 3 4 0 0 0\ncpu0 5 0 10 250 3 1 2 0 0 0\n";
        assert_eq!(parse_busy(stat), Some(10 + 1 + 20 + 3 + 4));
        let own = "1234 (hmm (x) y) R 1 2 3 4 5 6 7 8 9 10 42 8 0 0 20 0 3";
        assert_eq!(parse_own(own), Some(50));
        let a = CpuTicks { busy: 100, own: 40 };
        let b = CpuTicks {
            busy: 250,
            own: 140,
        };
        assert!((a.others_since(b) - 0.5).abs() < 1e-12);
        assert!(CpuTicks::now().is_some());
    }

    #[test]
    fn targets_and_ratios() {
        assert!(Target::AtLeast(0.7).meets(0.7));
        assert!(Target::AtLeast(0.7).meets(1.5));
        assert!(!Target::AtLeast(0.7).meets(0.69));
        assert!(Target::AtMost(1.2).meets(1.2));
        assert!(!Target::AtMost(1.2).meets(1.21));
        assert_eq!(Target::AtLeast(0.7).to_string(), ">= 0.7");
        assert_eq!(Target::AtMost(1.3).to_string(), "<= 1.3");
        assert!(Target::None.meets(1e9));
        assert!(!Target::None.is_goal());
        assert!(Target::AtMost(1.3).is_goal());
        assert_eq!(Target::None.to_string(), "none");

        // Ratios are paired per repetition, then summarised.
        let r = Row::from_samples(
            "m",
            "ns/page",
            "b",
            &[110.0, 300.0, 120.0],
            &[100.0, 200.0, 100.0],
            Target::AtMost(1.2),
        )
        .unwrap();
        assert_eq!(r.value.median, 120.0);
        assert_eq!(r.baseline_value.median, 100.0);
        assert!((r.ratio.median - 1.2).abs() < 1e-12);
        assert!((r.ratio.min - 1.1).abs() < 1e-12);
        assert!((r.ratio.max - 1.5).abs() < 1e-12);
        assert!(r.meets());
        let slow = Row::from_samples("m", "u", "b", &[2.0], &[1.0], Target::AtMost(1.3)).unwrap();
        assert!(!slow.meets());
        assert!(
            Row::from_samples("m", "u", "b", &[1.0], &[1.0, 2.0], Target::AtMost(1.0)).is_none()
        );
        assert!(Row::from_samples("m", "u", "b", &[1.0], &[0.0], Target::AtMost(1.0)).is_none());
    }

    fn sample_report() -> Report {
        Report {
            bench: "fault",
            placement: "same CPU".into(),
            notes: vec!["note".into()],
            rows: vec![
                Row::from_samples(
                    "snapshot",
                    "Mpages/s",
                    "PAGEMAP_SCAN",
                    &[50.0, 40.0, 60.0],
                    &[70.0, 70.0, 70.0],
                    Target::AtLeast(0.7),
                )
                .unwrap(),
                Row::from_samples(
                    "munmap",
                    "us/call",
                    "bare monitor",
                    &[14.0],
                    &[10.0],
                    Target::AtMost(1.3),
                )
                .unwrap(),
            ],
        }
    }

    #[test]
    fn json_has_exactly_the_listed_keys() {
        let v: serde_json::Value =
            serde_json::from_str(&sample_report().to_json().unwrap()).unwrap();
        let top = v.as_object().unwrap();
        let mut keys: Vec<&str> = top.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["bench", "placement", "rows"]);
        assert_eq!(v["bench"], "fault");
        assert_eq!(v["placement"], "same CPU");
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        for row in rows {
            let mut keys: Vec<&str> = row
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                [
                    "baseline",
                    "baseline_value",
                    "max",
                    "metric",
                    "min",
                    "ratio",
                    "reps",
                    "target",
                    "unit",
                    "value"
                ]
            );
        }
        let r0 = &rows[0];
        assert_eq!(r0["metric"], "snapshot");
        assert_eq!(r0["value"], 50.0);
        assert_eq!(r0["min"], 40.0);
        assert_eq!(r0["max"], 60.0);
        assert_eq!(r0["reps"], 3);
        assert_eq!(r0["baseline_value"], 70.0);
        assert!((r0["ratio"].as_f64().unwrap() - 50.0 / 70.0).abs() < 1e-12);
        assert_eq!(r0["target"], ">= 0.7");
        assert_eq!(rows[1]["target"], "<= 1.3");
    }

    #[test]
    fn table_has_a_verdict_per_row() {
        let text = sample_report().to_string();
        assert!(text.contains("placement: same CPU"));
        let lines: Vec<&str> = text.lines().collect();
        let snapshot = lines.iter().find(|l| l.starts_with("snapshot")).unwrap();
        assert!(snapshot.contains("meets"), "{snapshot}");
        assert!(snapshot.contains("50.00 (40.00–60.00)"), "{snapshot}");
        let munmap = lines.iter().find(|l| l.starts_with("munmap")).unwrap();
        assert!(munmap.ends_with("misses"), "{munmap}");
        assert!(text.contains("1 of 2 targets met"));
    }

    #[test]
    fn rows_without_a_goal_are_not_judged() {
        let mut report = sample_report();
        report
            .rows
            .push(Row::from_samples("info", "us", "raw", &[5.0], &[1.0], Target::None).unwrap());
        let text = report.to_string();
        let info = text.lines().find(|l| l.starts_with("info")).unwrap();
        assert!(info.ends_with('-'), "{info}");
        assert!(text.contains("1 of 2 targets met"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        assert_eq!(v["rows"][2]["target"], "none");
    }
}
