//! `hmm selftest`: the conformance suite, each case in its own process.

use std::process::ExitCode;
use std::time::Duration;

use hmm_conformance::{CaseResult, ResultKind, Summary, format_table, run_suite_with};

/// Runs the suite; exits non-zero when a case failed.
pub fn run(
    filter: Option<&str>,
    json: bool,
    timeout_s: u64,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let timeout = Duration::from_secs(timeout_s);
    let mut progress = |r: &CaseResult| {
        if !json {
            let mark = match r.result {
                ResultKind::Pass => "ok",
                ResultKind::Fail => "FAIL",
                ResultKind::Skip => "skip",
            };
            eprintln!("{mark:4} {}/{} ({} ms)", r.name, r.variant, r.ms);
        }
    };
    let results = run_suite_with(filter, timeout, &mut progress);
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", format_table(&results));
    }
    Ok(if Summary::of(&results).ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
