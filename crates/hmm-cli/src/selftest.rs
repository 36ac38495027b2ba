//! `hmm selftest`: the conformance suite, each case in its own process,
//! under each chosen mirror strategy.

use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use hmm::Strategy;
use hmm_conformance::{CaseResult, ResultKind, Summary, format_table, run_suite_under};

/// Which mirror strategies to run the suite under (`--strategy`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, ValueEnum)]
pub enum Strategies {
    /// The kernel's sequence protocol only.
    Sequence,
    /// The range lock only.
    RangeLock,
    /// Both, the sequence protocol first.
    #[default]
    Both,
}

impl Strategies {
    /// The strategies, in the order the suite runs under them.
    fn list(self) -> &'static [Strategy] {
        match self {
            Strategies::Sequence => &[Strategy::Sequence],
            Strategies::RangeLock => &[Strategy::RangeLock],
            Strategies::Both => &Strategy::ALL,
        }
    }
}

/// Runs the suite under each strategy; exits non-zero when a case failed.
pub fn run(
    filter: Option<&str>,
    json: bool,
    timeout_s: u64,
    strategies: Strategies,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let timeout = Duration::from_secs(timeout_s);
    let mut progress = |r: &CaseResult| {
        if !json {
            let mark = match r.result {
                ResultKind::Pass => "ok",
                ResultKind::Fail => "FAIL",
                ResultKind::Skip => "skip",
            };
            eprintln!(
                "{mark:4} {}/{} [{}] ({} ms)",
                r.name, r.variant, r.strategy, r.ms
            );
        }
    };
    let results = run_suite_under(filter, timeout, strategies.list(), &mut progress);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strategy_names_match_the_mirror() {
        for s in [Strategies::Sequence, Strategies::RangeLock] {
            let name = s
                .to_possible_value()
                .expect("a value")
                .get_name()
                .to_owned();
            assert_eq!(s.list(), [Strategy::from_name(&name).expect("a strategy")]);
            assert_eq!(s.list()[0].name(), name);
        }
        assert_eq!(Strategies::default().list(), Strategy::ALL);
    }
}
