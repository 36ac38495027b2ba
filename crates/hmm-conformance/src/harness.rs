//! Runs each case in its own process, with a timeout, as
//! `tools/testing/selftests/kselftest_harness.h` forks one child per test.
//!
//! # The protocol
//!
//! The parent ([`run_isolated`]) re-executes a *host*: an executable that
//! calls [`child_main_if_requested`] before anything else. By default the host
//! is the running executable itself (`std::env::current_exe()`), started with
//! no arguments; [`Host::libtest`] adds the arguments that make a libtest test
//! binary run just one `#[test]` that makes the same call.
//!
//! 1. The parent starts the host with `HMM_CONFORMANCE_CHILD=name/variant`
//!    ([`CHILD_ENV`]) and `HMM_MIRROR_STRATEGY` ([`STRATEGY_ENV`]) set to the
//!    mirror strategy the case runs under, stdin closed, stdout and stderr
//!    piped, and the child as leader of a new process group (the kernel
//!    harness's `setpgrp()`).
//! 2. The child finds the case by `name/variant` in [`cases`] (then in the
//!    harness's own self-test cases), runs it under `catch_unwind`, and ends
//!    its stdout with one line: a marker and the outcome as JSON. It then
//!    exits with status 0, whatever the outcome. A panic becomes a failure
//!    carrying the panic message and location.
//! 3. The parent drains both pipes on threads (so a chatty case cannot block
//!    on a full pipe) and polls for the child's exit until the timeout. It
//!    detects the exit with `waitid(WNOWAIT)`, which leaves the child
//!    unreaped; then it kills the child's whole process group with SIGKILL,
//!    which ends any process the case left behind while the group id still
//!    cannot be reused, and only then reaps the child. On timeout the same
//!    group kill ends the case (the kernel harness's `kill(-pid, SIGKILL)`).
//! 4. The verdict: a timeout fails as `timed out after …`; a child killed by a
//!    signal fails naming the signal (`SIGABRT`, …); a non-zero exit, or an
//!    exit without the report line, fails with the status; each carries the
//!    tail of the child's stderr. Otherwise the reported outcome stands.
//!
//! The child also asks for SIGKILL when its parent thread dies
//! (`PR_SET_PDEATHSIG`), so interrupting the suite does not leave a case
//! running in its own process group, out of reach of the terminal's Ctrl-C.
//!
//! [`cases`]: crate::cases

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use hmm::Strategy;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use serde::{Deserialize, Serialize, Serializer};

use crate::case::{Case, Outcome};

/// The environment variable that tells a host executable to run one case:
/// its value is the case's `name/variant` ([`Case::id`]).
pub const CHILD_ENV: &str = "HMM_CONFORMANCE_CHILD";

/// The environment variable that gives a child its mirror strategy: the
/// variable [`Strategy::from_env`] reads, set to [`Strategy::name`]. The
/// software device (`hmm::testdev::Dmirror`) builds its mirror with it.
pub const STRATEGY_ENV: &str = "HMM_MIRROR_STRATEGY";

/// The per-case timeout the kernel's harness uses by default
/// (`TEST_TIMEOUT_DEFAULT`, 30 s, in `kselftest_harness.h`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the line on which a child reports its outcome.
const REPORT_MARKER: &str = "@@hmm-conformance-outcome@@ ";

/// The exit status of a child that ran its case but could not write the report.
const EXIT_UNREPORTED: i32 = 125;

/// How much of each captured stream is kept (the tail; the report line is last).
const CAPTURE_LIMIT: usize = 1 << 20;

/// How long the parent waits for the pipes to close once the child is gone.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How many lines of stderr a failure reason quotes.
const TAIL_LINES: usize = 20;

/// How a case ended, as the JSON report names it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultKind {
    /// The case passed.
    Pass,
    /// The case failed, crashed or timed out.
    Fail,
    /// The case could not run here.
    Skip,
}

impl ResultKind {
    /// `pass`, `fail` or `skip`.
    pub const fn name(self) -> &'static str {
        match self {
            ResultKind::Pass => "pass",
            ResultKind::Fail => "fail",
            ResultKind::Skip => "skip",
        }
    }
}

impl std::fmt::Display for ResultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of one case run in its own process.
///
/// Serializes as exactly
/// `{"name":…,"variant":…,"strategy":"sequence"|"range-lock","result":"pass"|"fail"|"skip","reason":…|null,"ms":…}`;
/// the captured output is kept for display but not serialized.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct CaseResult {
    /// The kernel's test name, e.g. `anon_read`.
    pub name: String,
    /// The kernel's variant name, e.g. `hmm_device_private`.
    pub variant: String,
    /// The mirror strategy the child ran under, by its [`Strategy::name`].
    #[serde(serialize_with = "serialize_strategy")]
    pub strategy: Strategy,
    /// How it ended.
    pub result: ResultKind,
    /// Why it failed or was skipped; `None` for a pass.
    pub reason: Option<String>,
    /// Wall-clock time from starting the child to reaping it, in milliseconds.
    pub ms: u64,
    /// The child's stdout (its tail, without the report line).
    #[serde(skip)]
    pub stdout: String,
    /// The child's stderr (its tail).
    #[serde(skip)]
    pub stderr: String,
}

impl CaseResult {
    /// `name/variant`, as [`Case::id`].
    pub fn id(&self) -> String {
        format!("{}/{}", self.name, self.variant)
    }

    fn new(
        case: &Case,
        strategy: Strategy,
        result: ResultKind,
        reason: Option<String>,
        ms: u64,
    ) -> Self {
        CaseResult {
            name: case.name.to_owned(),
            variant: case.variant_name().to_owned(),
            strategy,
            result,
            reason,
            ms,
            stdout: String::new(),
            stderr: String::new(),
        }
    }
}

fn serialize_strategy<S: Serializer>(strategy: &Strategy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(strategy.name())
}

/// An executable that hosts the suite, the arguments that make it reach
/// [`child_main_if_requested`], and the mirror strategy its children run
/// under.
#[derive(Clone, Debug)]
pub struct Host {
    program: PathBuf,
    args: Vec<OsString>,
    /// `None`: this process's own ([`Strategy::from_env`]).
    strategy: Option<Strategy>,
}

impl Host {
    /// A host started as `program args…`.
    pub fn new<I, A>(program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        Host {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            strategy: None,
        }
    }

    /// This host, starting its children under `strategy` ([`STRATEGY_ENV`]).
    ///
    /// Without it a child runs under this process's own strategy
    /// ([`Strategy::from_env`]), passed on explicitly.
    #[must_use]
    pub fn with_strategy(self, strategy: Strategy) -> Self {
        Host {
            strategy: Some(strategy),
            ..self
        }
    }

    /// The mirror strategy this host's children run under.
    pub fn strategy(&self) -> Strategy {
        self.strategy.unwrap_or_else(Strategy::from_env)
    }

    /// The running executable, started with no arguments: for a binary whose
    /// `main` calls [`child_main_if_requested`] first.
    ///
    /// # Errors
    /// When `std::env::current_exe()` cannot name the executable.
    pub fn current_exe() -> io::Result<Self> {
        Ok(Host::new(std::env::current_exe()?, Vec::<OsString>::new()))
    }

    /// The running libtest test binary, told to run only the `#[test]`
    /// named `test_name` (its path without the crate name), with output
    /// uncaptured. That test must call [`child_main_if_requested`].
    ///
    /// # Errors
    /// As [`Host::current_exe`].
    pub fn libtest(test_name: &str) -> io::Result<Self> {
        let args = [
            test_name,
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ];
        Ok(Host::new(std::env::current_exe()?, args))
    }
}

/// The outcome line a child writes.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Report {
    result: ResultKind,
    reason: Option<String>,
}

impl From<Outcome> for Report {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Pass => Report {
                result: ResultKind::Pass,
                reason: None,
            },
            Outcome::Fail(reason) => Report {
                result: ResultKind::Fail,
                reason: Some(reason),
            },
            Outcome::Skip(reason) => Report {
                result: ResultKind::Skip,
                reason: Some(reason),
            },
        }
    }
}

/// Runs the case named by [`CHILD_ENV`] and exits, if the variable is set;
/// returns at once otherwise.
///
/// Call it first thing in `main` of every executable that hosts the suite
/// (the conformance test binary, the `hmm` command), before parsing
/// arguments: the parent starts the child with no arguments of its own.
///
/// The case is looked up by `name/variant` in [`cases`](crate::cases), then
/// among the harness's own self-test cases. An unknown name is reported as a
/// failure.
pub fn child_main_if_requested() {
    let Some(id) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    // Die with the parent: the child leads its own process group, so a Ctrl-C
    // at the terminal would not reach it. Failure only loses that safety net.
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    let outcome = match id.to_str().and_then(find_case) {
        Some(case) => run_in_child(&case),
        None => Outcome::fail(format!(
            "no case {id:?} in this executable ({})",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )),
    };
    let code = match write_report(outcome) {
        Ok(()) => 0,
        Err(_) => EXIT_UNREPORTED,
    };
    std::process::exit(code)
}

fn find_case(id: &str) -> Option<Case> {
    let (name, variant) = id.rsplit_once('/')?;
    crate::cases()
        .into_iter()
        .chain(crate::selftest::selftest_cases())
        .find(|c| c.name == name && c.variant_name() == variant)
}

/// The message and location of the last panic, recorded by the child's hook.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn run_in_child(case: &Case) -> Outcome {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        // "panicked at file:line:col:\nmessage"
        *LAST_PANIC.lock().unwrap_or_else(PoisonError::into_inner) = Some(info.to_string());
        previous(info);
    }));
    let run = case.run;
    let variant = case.variant;
    match panic::catch_unwind(move || run(variant)) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let recorded = LAST_PANIC
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let message = recorded.unwrap_or_else(|| {
                if let Some(s) = payload.downcast_ref::<&str>() {
                    (*s).to_owned()
                } else if let Some(s) = payload.downcast_ref::<String>() {
                    s.clone()
                } else {
                    "panicked with a non-string payload".to_owned()
                }
            });
            Outcome::Fail(message)
        }
    }
}

fn write_report(outcome: Outcome) -> io::Result<()> {
    let line = serde_json::to_string(&Report::from(outcome)).map_err(io::Error::other)?;
    let mut out = io::stdout().lock();
    // The leading newline puts the marker at the start of a line even after
    // output that did not end in one.
    write!(out, "\n{REPORT_MARKER}{line}\n")?;
    out.flush()
}

/// Runs `case` in a child of the running executable, killing it after `timeout`.
///
/// The child runs under this process's own mirror strategy
/// ([`Strategy::from_env`]); see [`run_isolated_with`] to choose it.
///
/// The running executable must call [`child_main_if_requested`] first thing
/// in `main`; see [`run_isolated_on`] for other hosts. Never fails: every
/// problem, including failing to start the child, is a failed [`CaseResult`].
pub fn run_isolated(case: &Case, timeout: Duration) -> CaseResult {
    run_isolated_with(case, timeout, Strategy::from_env())
}

/// [`run_isolated`], with the child's mirror built under `strategy`.
pub fn run_isolated_with(case: &Case, timeout: Duration, strategy: Strategy) -> CaseResult {
    match Host::current_exe() {
        Ok(host) => run_isolated_on(&host.with_strategy(strategy), case, timeout),
        Err(e) => CaseResult::new(
            case,
            strategy,
            ResultKind::Fail,
            Some(format!(
                "cannot find the running executable to re-execute: {e}"
            )),
            0,
        ),
    }
}

/// Runs `case` in a child started from `host`, under the host's mirror
/// strategy ([`Host::strategy`]), killing it after `timeout`.
///
/// See the [module docs](self) for the protocol and how crashes, timeouts
/// and missing reports are judged.
pub fn run_isolated_on(host: &Host, case: &Case, timeout: Duration) -> CaseResult {
    let strategy = host.strategy();
    let start = Instant::now();
    let mut command = Command::new(&host.program);
    command
        .args(&host.args)
        .env(CHILD_ENV, case.id())
        .env(STRATEGY_ENV, strategy.name())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let why = format!("cannot start {}: {e}", host.program.display());
            return CaseResult::new(case, strategy, ResultKind::Fail, Some(why), 0);
        }
    };
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());
    let pid = Pid::from_child(&child);

    let exited = wait_exit_unreaped(pid, start + timeout);
    // The child is unreaped here, so its pid is still its group's id and
    // cannot name another group.
    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    let status = child.wait();
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);

    let (report, stdout) = take_report(&stdout.finish(DRAIN_GRACE));
    let stderr = stderr.finish(DRAIN_GRACE);
    let (result, reason) = judge(exited, timeout, status, report, &stderr);
    CaseResult {
        stdout,
        stderr,
        ..CaseResult::new(case, strategy, result, reason, ms)
    }
}

/// Polls until the child exits (true) or `deadline` passes (false), without
/// reaping it.
fn wait_exit_unreaped(pid: Pid, deadline: Instant) -> bool {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    let mut step = Duration::from_millis(1);
    loop {
        match rustix::process::waitid(WaitId::Pid(pid), options) {
            Ok(Some(_)) => return true,
            Ok(None) | Err(rustix::io::Errno::INTR) => {}
            // Not our child any more (ECHILD): let `wait` report what it can.
            Err(_) => return true,
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(step.min(deadline - now));
        step = (step * 2).min(Duration::from_millis(20));
    }
}

fn judge(
    exited: bool,
    timeout: Duration,
    status: io::Result<ExitStatus>,
    report: Option<Report>,
    stderr: &str,
) -> (ResultKind, Option<String>) {
    let with_tail = |first: String| {
        let tail = tail_lines(stderr, TAIL_LINES);
        if tail.is_empty() {
            first
        } else {
            format!("{first}\nstderr:\n{tail}")
        }
    };
    if !exited {
        return (
            ResultKind::Fail,
            Some(with_tail(format!("timed out after {timeout:?}"))),
        );
    }
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            return (
                ResultKind::Fail,
                Some(format!("cannot reap the child: {e}")),
            );
        }
    };
    let unreported = report.is_none();
    let after = match &report {
        Some(r) => format!(" after reporting {}", r.result),
        None => " without reporting an outcome".to_owned(),
    };
    if let Some(signal) = status.signal() {
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        let why = format!(
            "killed by signal {signal} ({}{core}){after}",
            signal_name(signal)
        );
        return (ResultKind::Fail, Some(with_tail(why)));
    }
    match (status.code(), report) {
        (Some(0), Some(report)) => (report.result, report.reason),
        (Some(code), _) => {
            let mut why = format!("exited with status {code}{after}");
            if unreported && code == EXIT_UNREPORTED {
                why.push_str(" (the child could not write its report to stdout)");
            }
            (ResultKind::Fail, Some(with_tail(why)))
        }
        (None, _) => (
            ResultKind::Fail,
            Some(with_tail(format!("ended with {status}{after}"))),
        ),
    }
}

/// Splits the report line off a child's stdout: the last line that starts
/// with the marker. The newline written before the marker goes with it.
fn take_report(stdout: &str) -> (Option<Report>, String) {
    let at_line_start = |&(i, _): &(usize, &str)| i == 0 || stdout.as_bytes()[i - 1] == b'\n';
    let Some((at, _)) = stdout.rmatch_indices(REPORT_MARKER).find(at_line_start) else {
        return (None, stdout.to_owned());
    };
    let rest = &stdout[at + REPORT_MARKER.len()..];
    let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
    let Ok(report) = serde_json::from_str::<Report>(line) else {
        return (None, stdout.to_owned());
    };
    let before = &stdout[..at];
    let before = before.strip_suffix('\n').unwrap_or(before);
    (Some(report), format!("{before}{after}"))
}

/// The last `n` lines of `s`.
fn tail_lines(s: &str, n: usize) -> String {
    let s = s.trim_end();
    let start = s
        .rmatch_indices('\n')
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    s[start..].to_owned()
}

/// The name of a signal number, for failure reasons.
fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "unnamed signal",
    }
}

/// The tail of one child stream, filled by a reader thread.
struct Capture {
    buf: Arc<Mutex<Tail>>,
    done: mpsc::Receiver<()>,
}

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        // Trim in batches so that a chatty child costs amortized O(1) per byte.
        if self.bytes.len() > 2 * CAPTURE_LIMIT {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let excess = self.bytes.len().saturating_sub(CAPTURE_LIMIT);
        self.bytes.drain(..excess);
        self.dropped += excess;
    }
}

impl Capture {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Self {
        let buf = Arc::new(Mutex::new(Tail::default()));
        let (tx, done) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            let buf = Arc::clone(&buf);
            thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(());
            });
        }
        // Without a pipe, `tx` is dropped here and `finish` returns at once.
        Capture { buf, done }
    }

    /// What was captured, once the pipe closed or `grace` passed: a process
    /// that escaped the group kill may hold the pipe open forever.
    fn finish(self, grace: Duration) -> String {
        let _ = self.done.recv_timeout(grace);
        let mut tail =
            std::mem::take(&mut *self.buf.lock().unwrap_or_else(PoisonError::into_inner));
        tail.trim();
        let text = String::from_utf8_lossy(&tail.bytes);
        if tail.dropped > 0 {
            format!("[{} earlier bytes dropped]\n{text}", tail.dropped)
        } else {
            text.into_owned()
        }
    }
}

/// Runs every case of [`cases`](crate::cases) that matches `filter`, one at a
/// time, each with [`run_isolated`].
///
/// `filter` is a substring of the case name or of `name/variant`
/// ([`Case::matches`]).
pub fn run_suite(filter: Option<&str>, timeout: Duration) -> Vec<CaseResult> {
    run_suite_with(filter, timeout, &mut |_| {})
}

/// [`run_suite`], calling `on_result` as each case finishes (for live output).
pub fn run_suite_with(
    filter: Option<&str>,
    timeout: Duration,
    on_result: &mut dyn FnMut(&CaseResult),
) -> Vec<CaseResult> {
    selected(&crate::cases(), filter)
        .map(|case| {
            let result = run_isolated(case, timeout);
            on_result(&result);
            result
        })
        .collect()
}

/// [`run_suite_with`] under each of `strategies` in turn: every matching
/// case under the first strategy, then every one under the next.
pub fn run_suite_under(
    filter: Option<&str>,
    timeout: Duration,
    strategies: &[Strategy],
    on_result: &mut dyn FnMut(&CaseResult),
) -> Vec<CaseResult> {
    let cases = crate::cases();
    strategies
        .iter()
        .flat_map(|&strategy| selected(&cases, filter).map(move |case| (case, strategy)))
        .map(|(case, strategy)| {
            let result = run_isolated_with(case, timeout, strategy);
            on_result(&result);
            result
        })
        .collect()
}

/// Runs the cases of `cases` that match `filter`, one at a time, on `host`.
pub fn run_cases_on(
    host: &Host,
    cases: &[Case],
    filter: Option<&str>,
    timeout: Duration,
    on_result: &mut dyn FnMut(&CaseResult),
) -> Vec<CaseResult> {
    selected(cases, filter)
        .map(|case| {
            let result = run_isolated_on(host, case, timeout);
            on_result(&result);
            result
        })
        .collect()
}

fn selected<'a>(cases: &'a [Case], filter: Option<&'a str>) -> impl Iterator<Item = &'a Case> {
    cases
        .iter()
        .filter(move |c| filter.is_none_or(|f| c.matches(f)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::{Fixture, Variant};
    use crate::selftest::selftest_cases;

    /// The child entry of this test binary: a no-op unless [`CHILD_ENV`] is set.
    #[test]
    fn child_entry() {
        child_main_if_requested();
    }

    /// `child_entry`'s libtest name: its module path without the crate name.
    fn child_test_name() -> String {
        let path = module_path!();
        let rel = path.split_once("::").map_or(path, |(_, rel)| rel);
        format!("{rel}::child_entry")
    }

    fn host() -> Host {
        Host::libtest(&child_test_name()).expect("current_exe")
    }

    fn case(name: &str, variant: Variant) -> Case {
        selftest_cases()
            .into_iter()
            .find(|c| c.name == name && c.variant == variant)
            .expect("a self-test case")
    }

    fn run(name: &str, timeout: Duration) -> CaseResult {
        run_isolated_on(&host(), &case(name, Variant::DevicePrivate), timeout)
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn child_test_name_is_this_module() {
        assert_eq!(child_test_name(), "harness::tests::child_entry");
    }

    #[test]
    fn a_passing_case_passes() {
        let r = run("harness_pass", LONG);
        assert_eq!(
            (r.result, r.reason.as_deref()),
            (ResultKind::Pass, None),
            "{r:?}"
        );
        assert_eq!(r.name, "harness_pass");
        assert_eq!(r.variant, "hmm_device_private");
        assert_eq!(r.strategy, host().strategy());
        assert!(r.stdout.contains("hello from the child"), "{r:?}");
        assert!(!r.stdout.contains(REPORT_MARKER), "{r:?}");
    }

    #[test]
    fn a_failing_assert_fails_with_the_panic_message() {
        let r = run("harness_fail_assert", LONG);
        assert_eq!(r.result, ResultKind::Fail, "{r:?}");
        let reason = r.reason.expect("a reason");
        assert!(reason.contains("arithmetic is broken"), "{reason}");
        assert!(reason.contains("panicked at"), "{reason}");
        assert!(reason.contains("selftest.rs"), "{reason}");
    }

    #[test]
    fn a_returned_failure_keeps_its_reason() {
        let r = run("harness_fail_outcome", LONG);
        assert_eq!(r.result, ResultKind::Fail);
        assert_eq!(r.reason.as_deref(), Some("the mirror holds -1 at page 3"));
    }

    #[test]
    fn an_abort_is_a_failure_naming_sigabrt() {
        let r = run("harness_abort", LONG);
        assert_eq!(r.result, ResultKind::Fail, "{r:?}");
        let reason = r.reason.expect("a reason");
        assert!(
            reason.starts_with("killed by signal 6 (SIGABRT"),
            "{reason}"
        );
        assert!(reason.contains("without reporting an outcome"), "{reason}");
        assert!(
            reason.contains("about to abort"),
            "stderr tail missing: {reason}"
        );
    }

    #[test]
    fn a_case_past_its_timeout_is_killed() {
        let timeout = Duration::from_millis(300);
        let r = run("harness_sleep", timeout);
        assert_eq!(r.result, ResultKind::Fail, "{r:?}");
        let reason = r.reason.as_deref().expect("a reason");
        assert!(reason.starts_with("timed out after 300ms"), "{reason}");
        assert!(r.ms >= 300, "{r:?}");
        assert!(r.ms < 10_000, "the child was not killed promptly: {r:?}");
    }

    #[test]
    fn a_skip_carries_its_reason() {
        let r = run("harness_skip", LONG);
        assert_eq!(r.result, ResultKind::Skip);
        assert_eq!(
            r.reason.as_deref(),
            Some("no coherent device (SPM address not given)")
        );
    }

    #[test]
    fn the_variant_reaches_the_body() {
        let host = host();
        let private = run_isolated_on(
            &host,
            &case("harness_variant", Variant::DevicePrivate),
            LONG,
        );
        let coherent = run_isolated_on(
            &host,
            &case("harness_variant", Variant::DeviceCoherent),
            LONG,
        );
        assert_eq!(private.result, ResultKind::Pass, "{private:?}");
        assert_eq!(coherent.result, ResultKind::Skip, "{coherent:?}");
        assert_eq!(coherent.variant, "hmm_device_coherent");
    }

    #[test]
    fn the_strategy_reaches_the_child() {
        let case = case("harness_strategy", Variant::DevicePrivate);
        for strategy in Strategy::ALL {
            let r = run_isolated_on(&host().with_strategy(strategy), &case, LONG);
            assert_eq!(r.result, ResultKind::Pass, "{r:?}");
            assert_eq!(r.strategy, strategy);
            let line = format!("mirror strategy: {strategy}");
            assert!(r.stdout.lines().any(|l| l == line), "{line:?}: {r:?}");
        }
    }

    #[test]
    fn a_host_without_a_strategy_passes_its_own_on() {
        let host = host();
        assert_eq!(host.strategy(), Strategy::from_env());
        let r = run_isolated_on(
            &host,
            &case("harness_strategy", Variant::DevicePrivate),
            LONG,
        );
        assert_eq!(r.strategy, Strategy::from_env());
        let line = format!("mirror strategy: {}", Strategy::from_env());
        assert!(r.stdout.lines().any(|l| l == line), "{line:?}: {r:?}");
    }

    #[test]
    fn an_exit_without_a_report_fails_with_its_status() {
        let r = run("harness_exit", LONG);
        assert_eq!(r.result, ResultKind::Fail, "{r:?}");
        let reason = r.reason.expect("a reason");
        assert!(
            reason.starts_with("exited with status 3 without reporting"),
            "{reason}"
        );
        assert!(reason.contains("leaving early"), "{reason}");
    }

    #[test]
    fn a_noisy_case_still_reports() {
        let r = run("harness_noisy", LONG);
        assert_eq!(r.result, ResultKind::Pass, "{:?} {:?}", r.result, r.reason);
        assert!(r.stdout.starts_with("[") && r.stdout.contains("earlier bytes dropped"));
        assert!(
            r.stdout.ends_with("no newline at the end"),
            "{:?}",
            &r.stdout[r.stdout.len() - 40..]
        );
        assert!(r.stdout.len() <= CAPTURE_LIMIT + 64);
    }

    #[test]
    fn a_leftover_grandchild_does_not_hold_the_suite() {
        let r = run("harness_grandchild", LONG);
        assert_eq!(r.result, ResultKind::Pass, "{r:?}");
        assert!(r.ms < 10_000, "waited on the grandchild: {r:?}");
    }

    #[test]
    fn an_unknown_case_fails_in_the_child() {
        fn never(_: Variant) -> Outcome {
            Outcome::Pass
        }
        let ghost = Case::new("no_such_case", Fixture::Hmm, Variant::DevicePrivate, never);
        let r = run_isolated_on(&host(), &ghost, LONG);
        assert_eq!(r.result, ResultKind::Fail);
        let reason = r.reason.expect("a reason");
        assert!(
            reason.starts_with("no case \"no_such_case/hmm_device_private\""),
            "{reason}"
        );
    }

    #[test]
    fn a_missing_host_is_a_failure() {
        let host = Host::new("/nonexistent/hmm-conformance-host", ["x"]);
        let r = run_isolated_on(&host, &case("harness_pass", Variant::DevicePrivate), LONG);
        assert_eq!(r.result, ResultKind::Fail);
        assert!(
            r.reason
                .expect("a reason")
                .starts_with("cannot start /nonexistent")
        );
    }

    #[test]
    fn run_cases_filters_and_streams() {
        let mut seen = Vec::new();
        let results = run_cases_on(
            &host(),
            &selftest_cases(),
            Some("harness_skip"),
            LONG,
            &mut |r| seen.push(r.id()),
        );
        assert_eq!(
            seen,
            [
                "harness_skip/hmm_device_private",
                "harness_skip/hmm_device_coherent"
            ]
        );
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|r| r.result == ResultKind::Skip));
        let one = run_cases_on(
            &host(),
            &selftest_cases(),
            Some("harness_pass/hmm_device_coherent"),
            LONG,
            &mut |_| {},
        );
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].variant, "hmm_device_coherent");
    }

    #[test]
    fn the_json_shape_is_fixed() {
        let pass = CaseResult {
            name: "anon_read".into(),
            variant: "hmm_device_private".into(),
            strategy: Strategy::Sequence,
            result: ResultKind::Pass,
            reason: None,
            ms: 12,
            stdout: "not serialized".into(),
            stderr: "not serialized".into(),
        };
        let skip = CaseResult {
            result: ResultKind::Skip,
            reason: Some("no device".into()),
            variant: "hmm_device_coherent".into(),
            ..pass.clone()
        };
        let fail = CaseResult {
            result: ResultKind::Fail,
            reason: Some("x".into()),
            strategy: Strategy::RangeLock,
            ..pass.clone()
        };
        assert_eq!(
            serde_json::to_string(&pass).expect("json"),
            r#"{"name":"anon_read","variant":"hmm_device_private","strategy":"sequence","result":"pass","reason":null,"ms":12}"#
        );
        assert_eq!(
            serde_json::to_value(&skip).expect("json"),
            serde_json::json!({
                "name": "anon_read",
                "variant": "hmm_device_coherent",
                "strategy": "sequence",
                "result": "skip",
                "reason": "no device",
                "ms": 12,
            })
        );
        let fail = serde_json::to_value(&fail).expect("json");
        assert_eq!(fail["result"], "fail");
        assert_eq!(fail["strategy"], "range-lock");
        // A real run serializes the same way.
        let skip = case("harness_skip", Variant::DevicePrivate);
        let ranged = run_isolated_on(&host().with_strategy(Strategy::RangeLock), &skip, LONG);
        let real = serde_json::to_value(ranged).expect("json");
        let keys: Vec<_> = real.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys.len(), 6);
        for k in ["name", "variant", "strategy", "result", "reason", "ms"] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {real}");
        }
        assert_eq!(real["strategy"], "range-lock");
        assert!(real["ms"].is_u64());
    }

    #[test]
    fn the_report_line_is_found_only_at_a_line_start() {
        let line = format!("{REPORT_MARKER}{{\"result\":\"skip\",\"reason\":\"r\"}}");
        let (report, rest) = take_report(&format!("a\nb\n{line}\n"));
        assert_eq!(
            report,
            Some(Report {
                result: ResultKind::Skip,
                reason: Some("r".into())
            })
        );
        assert_eq!(rest, "a\nb");
        // A marker in the middle of a line is the case's output, not a report.
        let (report, _) = take_report(&format!("x{line}\n"));
        assert_eq!(report, None);
        // The last report wins.
        let pass = format!("{REPORT_MARKER}{{\"result\":\"pass\",\"reason\":null}}");
        let (report, rest) = take_report(&format!("{line}\n{pass}\n"));
        assert_eq!(report.map(|r| r.result), Some(ResultKind::Pass));
        assert_eq!(rest, line);
        // Garbage after the marker is not a report.
        let (report, _) = take_report(&format!("{REPORT_MARKER}not json\n"));
        assert_eq!(report, None);
    }

    #[test]
    fn tails_and_signal_names() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a\nb", 5), "a\nb");
        assert_eq!(tail_lines("", 5), "");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(64), "unnamed signal");
    }
}
