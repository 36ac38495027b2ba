//! `fork(2)` and `waitpid(2)`, for the tests and conformance cases that check
//! copy-on-write behaviour across a fork.

use rustix::io::Errno;

use super::last_errno;

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Forks; runs `child` in the child process and exits it with the code
/// `child` returns (a panic in the child exits with 101). The parent waits for
/// the child and returns how it ended.
///
/// The child of a multithreaded process holds only the forking thread, so
/// `child` should be short and self-contained: touch memory, call this
/// library, return a code.
///
/// # Errors
/// The `Errno` of `fork(2)` or `waitpid(2)`.
pub fn fork_and_wait(child: impl FnOnce() -> i32) -> Result<ChildExit, Errno> {
    // SAFETY: fork(2) duplicates the process. In the child we run `child` and
    // leave through `_exit`, never returning into the caller's frames, so no
    // destructor of the parent's state runs twice.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_errno());
    }
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
        // SAFETY: _exit(2) ends the child without running the parent's atexit
        // handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) writes the status of our own child into `status`.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret >= 0 {
            break;
        }
        match last_errno() {
            Errno::INTR => continue,
            e => return Err(e),
        }
    }
    if libc::WIFEXITED(status) {
        Ok(ChildExit::Code(libc::WEXITSTATUS(status)))
    } else {
        Ok(ChildExit::Signal(libc::WTERMSIG(status)))
    }
}

/// `pthread_atfork(3)`: runs `prepare` in the forking thread before a fork,
/// and `parent`/`child` after it in each process. Used to hold process-wide
/// locks across a fork so that a child never inherits one held by a thread it
/// does not have.
///
/// # Errors
/// `ENOMEM` when the handlers cannot be recorded.
pub fn atfork(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> Result<(), Errno> {
    // SAFETY: the handlers are plain functions with no arguments, valid for
    // the life of the program.
    let ret = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if ret != 0 {
        Err(Errno::from_raw_os_error(ret))
    } else {
        Ok(())
    }
}

/// Gives up root for good: `setgroups([])`, `setgid(gid)`, `setuid(uid)`,
/// then `PR_SET_DUMPABLE` so `/proc/self` stays readable as for the user.
/// For tests that check what an unprivileged user sees, in a forked child.
///
/// # Errors
/// `EPERM` when the caller is not privileged.
pub fn become_user(uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: these calls take plain integers (and an empty group list) and
    // change only the calling process's credentials.
    unsafe {
        if libc::setgroups(0, core::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
            // A credential change makes the process non-dumpable, which hands
            // its /proc/self files to root; a process that was started as the
            // user would not be, so undo that.
            || libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0
        {
            return Err(last_errno());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_code_and_signal_are_reported() {
        assert_eq!(fork_and_wait(|| 7), Ok(ChildExit::Code(7)));
        assert_eq!(
            fork_and_wait(|| std::process::abort()),
            Ok(ChildExit::Signal(libc::SIGABRT))
        );
    }
}
