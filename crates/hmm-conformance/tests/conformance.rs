//! The ported kernel selftests, one libtest trial per case, variant and
//! mirror strategy: `name::variant` under the sequence strategy (e.g.
//! `anon_read::hmm_device_private`), `name::variant::range_lock` under the
//! range lock.
//!
//! Every trial runs its case in a child process of this binary (see
//! `hmm_conformance::harness`), given its strategy through
//! `HMM_MIRROR_STRATEGY`, so `main` first gives the child its chance.
//! A skip is reported as `ignored` with its reason.
//!
//! `HMM_CONFORMANCE_TIMEOUT` (seconds) overrides the per-case timeout.

use std::process::ExitCode;
use std::time::Duration;

use hmm::Strategy;
use hmm_conformance::{
    Case, DEFAULT_TIMEOUT, ResultKind, cases, child_main_if_requested, run_isolated_with,
};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

fn main() -> ExitCode {
    child_main_if_requested();
    let mut args = Arguments::from_args();
    // The kernel runs its tests one at a time; the cases share the mirror
    // devices and their timings mean more without neighbours.
    args.test_threads.get_or_insert(1);
    let timeout = std::env::var("HMM_CONFORMANCE_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let cases = cases();
    let trials = Strategy::ALL
        .into_iter()
        .flat_map(|strategy| {
            cases
                .iter()
                .map(move |case| trial(*case, strategy, timeout))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// The trial's name: `name::variant`, and `::range_lock` under the range lock
/// (the strategy's name, in a form that is one path segment).
fn trial_name(case: &Case, strategy: Strategy) -> String {
    let base = format!("{}::{}", case.name, case.variant_name());
    match strategy {
        Strategy::Sequence => base,
        other => format!("{base}::{}", other.name().replace('-', "_")),
    }
}

fn trial(case: Case, strategy: Strategy, timeout: Duration) -> Trial {
    Trial::ignorable_test(trial_name(&case, strategy), move || {
        let r = run_isolated_with(&case, timeout, strategy);
        let reason = r.reason.unwrap_or_default();
        match r.result {
            ResultKind::Pass => Ok(Completion::Completed),
            ResultKind::Skip => Ok(Completion::ignored_with(reason)),
            ResultKind::Fail => {
                // A crash's reason already quotes the tail of stderr.
                let quoted = reason.contains("\nstderr:\n");
                let mut msg = reason;
                for (stream, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
                    let text = tail(text, 100);
                    if text.is_empty() || (quoted && stream == "stderr") {
                        continue;
                    }
                    msg.push_str(&format!("\n--- {stream} (last lines) ---\n{text}"));
                }
                Err(Failed::from(msg))
            }
        }
    })
}

/// The last `n` lines of a captured stream.
fn tail(text: &str, n: usize) -> &str {
    let text = text.trim();
    let start = text.rmatch_indices('\n').nth(n).map_or(0, |(i, _)| i + 1);
    &text[start..]
}
