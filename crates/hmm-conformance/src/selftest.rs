//! The harness's own test cases: one per way a case can end.
//!
//! They are never part of [`cases`](crate::cases) and so never run by the
//! suite, but [`child_main_if_requested`](crate::child_main_if_requested)
//! finds them, so the harness tests can run them in children of any host.

use std::time::Duration;

use crate::case::{Case, Fixture, Outcome, Variant};

/// The harness self-test cases, each for both variants of the `hmm` fixture.
///
/// Not a public interface: they exist so that the harness can be tested
/// through real child processes.
#[doc(hidden)]
pub fn selftest_cases() -> Vec<Case> {
    type Body = fn(Variant) -> Outcome;
    let bodies: [(&'static str, Body); 11] = [
        ("harness_pass", pass),
        ("harness_fail_assert", fail_assert),
        ("harness_fail_outcome", fail_outcome),
        ("harness_abort", abort),
        ("harness_sleep", sleep),
        ("harness_skip", skip),
        ("harness_variant", by_variant),
        ("harness_exit", exit_early),
        ("harness_noisy", noisy),
        ("harness_grandchild", grandchild),
        ("harness_strategy", strategy),
    ];
    bodies
        .into_iter()
        .flat_map(|(name, run)| Case::per_variant(name, Fixture::Hmm, run))
        .collect()
}

fn pass(_: Variant) -> Outcome {
    println!("hello from the child");
    Outcome::Pass
}

fn fail_assert(_: Variant) -> Outcome {
    let two = std::hint::black_box(1) + 1;
    assert_eq!(two, 3, "arithmetic is broken");
    Outcome::Pass
}

fn fail_outcome(_: Variant) -> Outcome {
    Outcome::fail("the mirror holds -1 at page 3")
}

fn abort(_: Variant) -> Outcome {
    // No core file for an abort that is the point of the test.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Core);
    limit.current = Some(0);
    let _ = rustix::process::setrlimit(rustix::process::Resource::Core, limit);
    eprintln!("about to abort");
    std::process::abort()
}

fn sleep(_: Variant) -> Outcome {
    std::thread::sleep(Duration::from_secs(120));
    Outcome::Pass
}

fn skip(_: Variant) -> Outcome {
    Outcome::skip("no coherent device (SPM address not given)")
}

fn by_variant(variant: Variant) -> Outcome {
    match variant {
        Variant::DevicePrivate => Outcome::Pass,
        Variant::DeviceCoherent => Outcome::skip("the coherent variant skips here"),
    }
}

fn exit_early(_: Variant) -> Outcome {
    eprintln!("leaving early");
    std::process::exit(3)
}

/// More output than the capture keeps, on both streams, ending mid-line.
fn noisy(_: Variant) -> Outcome {
    use std::io::Write;

    let line = "0123456789abcdef".repeat(8);
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    for i in 0..(3 << 20) / line.len() {
        if writeln!(out, "{i} {line}").is_err() || (i % 64 == 0 && writeln!(err, "{i}").is_err()) {
            return Outcome::fail("cannot write");
        }
    }
    if write!(out, "no newline at the end")
        .and_then(|()| out.flush())
        .is_err()
    {
        return Outcome::fail("cannot write");
    }
    Outcome::Pass
}

/// Prints the mirror strategy this process's devices are built with.
fn strategy(_: Variant) -> Outcome {
    println!("mirror strategy: {}", hmm::Strategy::from_env());
    Outcome::Pass
}

/// Leaves a process behind that holds the child's stdout and stderr open.
fn grandchild(_: Variant) -> Outcome {
    let spawned = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .or_else(|_| {
            // Without `sleep(1)`, leave this executable running the sleeping case.
            let exe = std::env::current_exe()?;
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env(crate::CHILD_ENV, "harness_sleep/hmm_device_private")
                .spawn()
        });
    match spawned {
        Ok(_) => Outcome::Pass,
        Err(e) => Outcome::fail(format!("cannot leave a grandchild behind: {e}")),
    }
}
