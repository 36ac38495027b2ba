//! The text form of a run: one row per case and the closing count line.

use core::fmt;
use std::fmt::Write as _;

use crate::harness::{CaseResult, ResultKind};

/// How many cases passed, failed and were skipped.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed, crashed or timed out.
    pub failed: usize,
    /// Cases that were skipped.
    pub skipped: usize,
}

impl Summary {
    /// Counts `results`.
    pub fn of(results: &[CaseResult]) -> Self {
        results.iter().fold(Summary::default(), |mut s, r| {
            match r.result {
                ResultKind::Pass => s.passed += 1,
                ResultKind::Fail => s.failed += 1,
                ResultKind::Skip => s.skipped += 1,
            }
            s
        })
    }

    /// Whether nothing failed (skips do not count against a run).
    pub const fn ok(&self) -> bool {
        self.failed == 0
    }
}

impl fmt::Display for Summary {
    /// `N passed, N failed, N skipped`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// A table of `results` (result, name, variant, mirror strategy,
/// milliseconds, first line of the reason) followed by the line `N passed, N failed, N skipped`.
///
/// # Examples
///
/// ```
/// use hmm_conformance::format_table;
///
/// assert_eq!(format_table(&[]), "0 passed, 0 failed, 0 skipped\n");
/// ```
pub fn format_table(results: &[CaseResult]) -> String {
    let mut out = String::new();
    if !results.is_empty() {
        let name_w = results
            .iter()
            .map(|r| r.name.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        let variant_w = results
            .iter()
            .map(|r| r.variant.len())
            .chain([7])
            .max()
            .unwrap_or(7);
        let strategy_w = results
            .iter()
            .map(|r| r.strategy.name().len())
            .chain([8])
            .max()
            .unwrap_or(8);
        let ms_w = results
            .iter()
            .map(|r| r.ms.to_string().len())
            .chain([2])
            .max()
            .unwrap_or(2);
        let _ = writeln!(
            out,
            "RESULT  {:name_w$}  {:variant_w$}  {:strategy_w$}  {:>ms_w$}  REASON",
            "NAME", "VARIANT", "STRATEGY", "MS"
        );
        for r in results {
            let reason = r.reason.as_deref().map(first_line).unwrap_or_default();
            let row = format!(
                "{:6}  {:name_w$}  {:variant_w$}  {:strategy_w$}  {:>ms_w$}  {reason}",
                r.result.name(),
                r.name,
                r.variant,
                r.strategy.name(),
                r.ms
            );
            let _ = writeln!(out, "{}", row.trim_end());
        }
    }
    let _ = writeln!(out, "{}", Summary::of(results));
    out
}

/// The first line of a reason, marked when more follows.
fn first_line(reason: &str) -> String {
    match reason.split_once('\n') {
        Some((first, _)) => format!("{first} [...]"),
        None => reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use hmm::Strategy;

    use super::*;

    fn result(
        name: &str,
        variant: &str,
        strategy: Strategy,
        result: ResultKind,
        reason: Option<&str>,
        ms: u64,
    ) -> CaseResult {
        CaseResult {
            name: name.into(),
            variant: variant.into(),
            strategy,
            result,
            reason: reason.map(Into::into),
            ms,
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    #[test]
    fn the_closing_line_is_exact() {
        let s = Summary {
            passed: 3,
            failed: 1,
            skipped: 2,
        };
        assert_eq!(s.to_string(), "3 passed, 1 failed, 2 skipped");
        assert!(!s.ok());
        assert!(Summary { failed: 0, ..s }.ok());
    }

    #[test]
    fn the_table() {
        let results = [
            result(
                "open_close",
                "hmm_device_private",
                Strategy::Sequence,
                ResultKind::Pass,
                None,
                3,
            ),
            result(
                "open_close",
                "hmm_device_coherent",
                Strategy::Sequence,
                ResultKind::Skip,
                Some("no /dev/hmm_dmirror2"),
                1,
            ),
            result(
                "anon_read",
                "hmm_device_private",
                Strategy::RangeLock,
                ResultKind::Fail,
                Some("killed by signal 6 (SIGABRT)\nstderr:\nboom"),
                1234,
            ),
        ];
        let want = "\
RESULT  NAME        VARIANT              STRATEGY      MS  REASON
pass    open_close  hmm_device_private   sequence       3
skip    open_close  hmm_device_coherent  sequence       1  no /dev/hmm_dmirror2
fail    anon_read   hmm_device_private   range-lock  1234  killed by signal 6 (SIGABRT) [...]
1 passed, 1 failed, 1 skipped
";
        assert_eq!(format_table(&results), want);
        assert_eq!(
            Summary::of(&results),
            Summary {
                passed: 1,
                failed: 1,
                skipped: 1
            }
        );
    }
}
