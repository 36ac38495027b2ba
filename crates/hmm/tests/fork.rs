//! Fork and release: scenarios whose forked child builds its own `Mm`.
//!
//! The child of a multithreaded process may create threads only if no other
//! thread of the parent was being created at the moment of the fork (Rust's
//! std and glibc hold internal locks there that the child inherits). libtest
//! spawns a thread per test, so these scenarios run one after the other from
//! the single test of this binary instead of beside other tests.

mod common;

use common::{Recorder, whole_space};
use hmm::notifier::Event;
use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::os::process::{ChildExit, fork_and_wait};
use hmm::{HmmPfn, Mm, PAGE_SIZE};
use std::sync::Arc;

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

#[test]
fn fork_and_release_scenarios() {
    a_forked_child_gets_its_own_mm();
    dropping_the_last_handle_releases_every_notifier_once();
    calls_after_release_return_released();
    fork_write_protects_private_ranges();
    an_unprivileged_user_is_told_how_to_enable_userfaultfd();
}

/// Without root, userfaultfd depends on `vm.unprivileged_userfaultfd`: when
/// it is 0 the error names userfaultfd and says how to allow it.
fn an_unprivileged_user_is_told_how_to_enable_userfaultfd() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: needs root to switch to an unprivileged user");
        return;
    }
    let allowed = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    let status = fork_and_wait(|| {
        if hmm::os::process::become_user(65534, 65534).is_err() {
            return 10;
        }
        match (Mm::get(), allowed) {
            (Ok(_), true) => 0,
            (Err(hmm::Error::Unsupported { feature, hint }), false)
                if feature == "userfaultfd" && hint.contains("vm.unprivileged_userfaultfd=1") =>
            {
                0
            }
            (Ok(_), false) => 1,
            (Err(e), _) => {
                eprintln!("unprivileged Mm::get: {e:?}");
                2
            }
        }
    })
    .expect("fork");
    assert_eq!(
        status,
        ChildExit::Code(0),
        "unprivileged_userfaultfd={allowed}"
    );
}

fn a_forked_child_gets_its_own_mm() {
    let parent = Mm::get().expect("mm");
    let status = fork_and_wait(|| {
        if !parent.is_released() {
            return 1; // the parent's handle must be unusable in the child
        }
        if !matches!(
            parent.interval_notifier_insert(
                hmm::VirtAddr(0),
                PAGE_SIZE,
                Arc::new(Recorder::default())
            ),
            Err(hmm::Error::Released)
        ) {
            return 2;
        }
        match Mm::get() {
            Ok(child) if !child.same(&parent) && !child.is_released() => 0,
            _ => 3,
        }
    })
    .expect("fork");
    assert_eq!(status, ChildExit::Code(0));
    assert!(!parent.is_released());
}

fn dropping_the_last_handle_releases_every_notifier_once() {
    // The Mm is per process: release it in a child so the other tests keep theirs.
    let status = fork_and_wait(|| {
        let mm = Mm::get().expect("mm");
        let (n, rec) = whole_space(&mm);
        let m = Mapping::anonymous(2 * PAGE_SIZE, rw()).expect("mmap");
        common::mirror(&mm, &n, &m);
        let other = mm.clone();
        drop(mm);
        if rec.events().iter().any(|e| e.0 == Event::Release) {
            return 1; // a live handle remains: nothing may be released yet
        }
        drop(other);
        let count = |ev: Event| rec.events().iter().filter(|e| e.0 == ev).count();
        if count(Event::Release) != 1 {
            return 2;
        }
        // Unregistered and stopped: a DONTNEED raises no invalidation any more.
        let before = rec.events().len();
        dontneed(m.range()).expect("dontneed");
        std::thread::sleep(std::time::Duration::from_millis(20));
        if rec.events().len() != before {
            return 3;
        }
        // The notifier handle stays usable and never blocks.
        let seq = n.read_begin();
        let _ = n.read_retry(seq);
        if n.remove().is_err() {
            return 4;
        }
        // A new Mm can be made afterwards.
        match Mm::get() {
            Ok(mm2) if !mm2.is_released() => 0,
            _ => 5,
        }
    })
    .expect("fork");
    assert_eq!(status, ChildExit::Code(0));
}

fn calls_after_release_return_released() {
    let status = fork_and_wait(|| {
        let mm = Mm::get().expect("mm");
        let (n, _rec) = whole_space(&mm);
        let m = Mapping::anonymous(PAGE_SIZE, rw()).expect("mmap");
        mm.release();
        mm.release(); // idempotent
        let mut pfns = [HmmPfn::empty()];
        let r = common::fault(&mm, &n, m.range(), HmmPfn::empty(), &mut pfns, false);
        let checks = [
            matches!(r, Err(hmm::Error::Released)),
            matches!(mm.protect(m.range(), Prot::READ), Err(hmm::Error::Released)),
            matches!(mm.register(m.range()), Err(hmm::Error::Released)),
            matches!(
                mm.interval_notifier_insert(m.addr(), PAGE_SIZE, Arc::new(Recorder::default())),
                Err(hmm::Error::Released)
            ),
            mm.is_released(),
        ];
        if checks.iter().all(|&c| c) { 0 } else { 1 }
    })
    .expect("fork");
    assert_eq!(status, ChildExit::Code(0));
}

fn fork_write_protects_private_ranges() {
    let mm = Mm::get().expect("mm");
    let (n, rec) = whole_space(&mm);
    let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    common::mirror(&mm, &n, &m);
    let mut pfns = vec![HmmPfn::empty(); 4];
    common::fault(&mm, &n, m.range(), HmmPfn::empty(), &mut pfns, false).expect("snapshot");
    assert!(
        pfns.iter()
            .all(|p| p.contains(HmmPfn::VALID | HmmPfn::WRITE))
    );

    assert_eq!(fork_and_wait(|| 0).expect("fork"), ChildExit::Code(0));
    assert!(
        rec.wait_for(Event::ProtectionPage, m.range().start(), m.range().end()),
        "{:?}",
        rec.events()
    );
    assert!(mm.stats().forks >= 1);
    // The pages were shared copy-on-write at the fork: not writable until written.
    common::fault(&mm, &n, m.range(), HmmPfn::empty(), &mut pfns, false).expect("snapshot");
    assert!(
        pfns.iter()
            .all(|p| p.contains(HmmPfn::VALID) && !p.contains(HmmPfn::WRITE)),
        "{pfns:?}"
    );
    common::fault(
        &mm,
        &n,
        m.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns,
        false,
    )
    .expect("fault");
    assert!(
        pfns.iter()
            .all(|p| p.contains(HmmPfn::VALID | HmmPfn::WRITE))
    );
    n.remove().expect("remove");
}
