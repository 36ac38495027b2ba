//! The assertions of the ported tests: `ASSERT_EQ` and `SKIP` of
//! `tools/testing/selftests/kselftest_harness.h`, as values.
//!
//! A case body returns [`Check`]; every assertion returns `Err(Stop::Fail)`
//! with a message that names what was compared, what was expected and what
//! was found (and, for buffers, the first differing element and its page), so
//! the body reads like the C with a `?` after each `ASSERT_*`. A skip is
//! `Err(Stop::Skip)` with its reason. [`verdict`] turns the result into the
//! case's [`Outcome`].

use core::fmt::{self, Debug, Display};

use crate::case::Outcome;

/// `EPERM`, as the kernel test compares `ret == -EPERM`.
pub(crate) const EPERM: i32 = libc::EPERM;
/// `ENOENT`.
pub(crate) const ENOENT: i32 = libc::ENOENT;
/// `EFAULT`.
pub(crate) const EFAULT: i32 = libc::EFAULT;
/// `EINVAL`.
pub(crate) const EINVAL: i32 = libc::EINVAL;

/// Why a case body stopped before its end.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum Stop {
    /// An assertion failed (`ASSERT_*`); the message says which and why.
    Fail(String),
    /// The case cannot run here (`SKIP()`); the message says why.
    Skip(String),
}

impl Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Fail(why) => f.write_str(why),
            Stop::Skip(why) => write!(f, "skipped: {why}"),
        }
    }
}

/// What a case body (or a step of one) returns.
pub(crate) type Check<T = ()> = Result<T, Stop>;

/// The outcome of a finished body.
pub(crate) fn verdict(result: Check) -> Outcome {
    match result {
        Ok(()) => Outcome::Pass,
        Err(Stop::Fail(why)) => Outcome::Fail(why),
        Err(Stop::Skip(why)) => Outcome::Skip(why),
    }
}

/// A failure with its message.
pub(crate) fn fail(why: impl Into<String>) -> Stop {
    Stop::Fail(why.into())
}

/// A skip with its reason.
pub(crate) fn skip(why: impl Into<String>) -> Stop {
    Stop::Skip(why.into())
}

/// Turns a setup step's error into a failure naming the step, as the kernel
/// test's `ASSERT_NE(buffer->ptr, MAP_FAILED)` and friends do.
pub(crate) trait OrFail<T> {
    /// `Ok` as is; `Err(e)` becomes a failure `what: e`.
    fn or_fail(self, what: &str) -> Check<T>;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Check<T> {
        self.map_err(|e| fail(format!("{what}: {e}")))
    }
}

/// Prefixes the message of a failure or skip with where it happened.
pub(crate) trait Context<T> {
    /// `Ok` as is; a stop's message becomes `what: message`, of the same kind.
    fn context(self, what: impl Display) -> Check<T>;
}

impl<T> Context<T> for Check<T> {
    fn context(self, what: impl Display) -> Check<T> {
        self.map_err(|stop| match stop {
            Stop::Fail(why) => Stop::Fail(format!("{what}: {why}")),
            Stop::Skip(why) => Stop::Skip(format!("{what}: {why}")),
        })
    }
}

/// `ASSERT_EQ(got, want)`, naming `what` in the failure.
pub(crate) fn assert_eq<T: PartialEq + Debug>(what: impl Display, got: T, want: T) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(fail(format!("{what}: expected {want:?}, got {got:?}")))
    }
}

/// The kernel's name of a positive errno, for messages.
pub(crate) fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        _ => "?",
    }
}

/// `ret` of a dmirror command as the C test sees it: 0 or `-errno`.
fn ret_text<T>(ret: &hmm::Result<T>) -> String {
    match ret {
        Ok(_) => "0".to_owned(),
        Err(e) => format!("-{} ({}: {e})", e.errno(), errno_name(e.errno())),
    }
}

/// `ASSERT_EQ(ret, want)` for a command's result, where `want` is `0` or
/// `-errno` as in the kernel test (`ret == -EFAULT`).
pub(crate) fn assert_ret<T>(what: &str, ret: &hmm::Result<T>, want: i32) -> Check {
    let got = match ret {
        Ok(_) => 0,
        Err(e) => -e.errno(),
    };
    if got == want {
        return Ok(());
    }
    let want_text = if want == 0 {
        "0".to_owned()
    } else {
        format!("{want} ({})", errno_name(-want))
    };
    Err(fail(format!(
        "{what}: expected ret {want_text}, got {}",
        ret_text(ret)
    )))
}

/// `for (i = 0; i < n; ++i) ASSERT_EQ(got(i), want(i))` over the elements of
/// a buffer with `per_page` elements to a page, reporting the first element
/// that differs, its page, and how many differ in all.
pub(crate) fn assert_each<T: PartialEq + Debug>(
    what: &str,
    range: core::ops::Range<usize>,
    per_page: usize,
    got: impl Fn(usize) -> T,
    want: impl Fn(usize) -> T,
) -> Check {
    let mut first = None;
    let mut differ = 0usize;
    let total = range.len();
    for i in range {
        let (g, w) = (got(i), want(i));
        if g != w {
            differ += 1;
            first.get_or_insert((i, g, w));
        }
    }
    match first {
        None => Ok(()),
        Some((i, g, w)) => Err(fail(format!(
            "{what}[{i}] (page {}): expected {w:?}, got {g:?}; {differ} of {total} elements differ",
            i / per_page
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertions_fail_with_what_they_compared() {
        assert_eq!(assert_eq("cpages", 3u64, 3), Ok(()));
        assert_eq!(
            assert_eq("cpages", 2u64, 3),
            Err(fail("cpages: expected 3, got 2"))
        );
        let ok: hmm::Result<()> = Ok(());
        assert_eq!(assert_ret("READ", &ok, 0), Ok(()));
        assert_eq!(
            assert_ret("READ", &ok, -EFAULT),
            Err(fail("READ: expected ret -14 (EFAULT), got 0"))
        );
        let busy: hmm::Result<()> = Err(hmm::Error::Busy);
        assert_eq!(assert_ret("READ", &busy, -libc::EBUSY), Ok(()));
        let Err(Stop::Fail(why)) = assert_ret("READ", &busy, 0) else {
            panic!("a wrong errno must fail");
        };
        assert!(
            why.starts_with("READ: expected ret 0, got -16 (EBUSY: "),
            "{why}"
        );
    }

    #[test]
    fn each_reports_the_first_difference_and_its_page() {
        let want = |i: usize| i as i32;
        assert_eq!(assert_each("ptr", 0..4096, 1024, want, want), Ok(()));
        let got = |i: usize| if i >= 2048 { 0 } else { i as i32 };
        assert_eq!(
            assert_each("ptr", 0..4096, 1024, got, want),
            Err(fail(
                "ptr[2048] (page 2): expected 2048, got 0; 2048 of 4096 elements differ"
            ))
        );
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(Ok(())), Outcome::Pass);
        assert_eq!(verdict(Err(fail("x"))), Outcome::Fail("x".into()));
        assert_eq!(verdict(Err(skip("y"))), Outcome::Skip("y".into()));
        let e: Result<(), &str> = Err("ENOMEM");
        assert_eq!(e.or_fail("mmap"), Err(fail("mmap: ENOMEM")));
    }
}
