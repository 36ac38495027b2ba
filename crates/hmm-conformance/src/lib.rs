//! The kernel's HMM selftests (`tools/testing/selftests/mm/hmm-tests.c`),
//! ported to the userspace HMM, and the harness that runs them.
//!
//! # The model
//!
//! The kernel's `kselftest_harness.h` forks one child per test, kills its
//! process group after a timeout, and counts a crash as a failure of that
//! test alone. This crate does the same with processes: every [`Case`] (one
//! test of one fixture variant, named as the kernel names it, e.g.
//! `anon_read` / `hmm_device_private`) runs in a fresh process started from
//! the running executable, so a case that corrupts its address space, aborts
//! or hangs cannot take the rest of the suite with it. See [`harness`] for the
//! child protocol.
//!
//! Two executables host the suite, and both call
//! [`child_main_if_requested`] first thing in `main`:
//! - `tests/conformance.rs` (`cargo test -p hmm-conformance`), one libtest
//!   trial per case and mirror strategy, named `name::variant` under the
//!   sequence strategy and `name::variant::range_lock` under the range lock;
//! - the `hmm selftest` command, through [`run_suite_under`] and
//!   [`format_table`] (or the JSON form of [`CaseResult`]).
//!
//! Every case runs under each of the mirror's strategies
//! ([`hmm::Strategy`]): the harness gives the child its strategy through
//! [`STRATEGY_ENV`], and the software device builds its mirror with it.
//!
//! A skip always carries its reason ([`Outcome::Skip`]).
//!
//! # Examples
//!
//! A host's `main`:
//!
//! ```no_run
//! use hmm_conformance::{DEFAULT_TIMEOUT, child_main_if_requested, format_table, run_suite};
//!
//! child_main_if_requested(); // runs one case and exits, when this is a child
//! let results = run_suite(None, DEFAULT_TIMEOUT);
//! print!("{}", format_table(&results));
//! ```

#![deny(missing_docs)]

mod buffer;
mod case;
mod cases;
mod check;
mod fixture;
pub mod harness;
mod registry;
mod report;
mod selftest;

pub use case::{Case, Fixture, Outcome, Variant};
pub use harness::{
    CHILD_ENV, CaseResult, DEFAULT_TIMEOUT, Host, ResultKind, STRATEGY_ENV,
    child_main_if_requested, run_cases_on, run_isolated, run_isolated_on, run_isolated_with,
    run_suite, run_suite_under, run_suite_with,
};
pub use registry::cases;
pub use report::{Summary, format_table};
#[doc(hidden)]
pub use selftest::selftest_cases;
