//! Fork and release: scenarios whose forked child builds its own `Mm`.
//!
//! The child of a multithreaded process may create threads only if no other
//! thread of the parent was being created at the moment of the fork (Rust's
//! std and glibc hold internal locks there that the child inherits). libtest
//! spawns a thread per test, so these scenarios run one after the other from
//! the single test of this binary instead of beside other tests.

mod common;

use common::{Recorder, WORDS, fill, whole_space};
use hmm::devmem::Storage;
use hmm::notifier::Event;
use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::os::process::{ChildExit, fork_and_wait};
use hmm::testdev::{Device, Dmirror};
use hmm::{HmmPfn, MirrorOptions, Mm, PAGE_SIZE};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    for storage in [Storage::Device, Storage::Host] {
        let _watchdog = common::watchdog("the device-page fork scenarios", Duration::from_secs(60));
        a_fork_leaves_device_pages_usable(storage);
        device_private_pages_across_fork(storage);
    }
}

/// A fork that has nothing to do with the device leaves its pages usable:
/// the CPU reads them back afterwards.
fn a_fork_leaves_device_pages_usable(storage: Storage) {
    const TAG: u64 = 0xF3;
    let mm = Mm::get().expect("mm");
    let d = Dmirror::open_device(Device::new_private(0, storage), MirrorOptions::default())
        .expect("open");
    let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    m.no_hugepage();
    fill(&m, TAG);
    d.migrate_to_dev(m.addr(), 4, None).expect("migrate");
    assert_eq!(fork_and_wait(|| 0).expect("fork"), ChildExit::Code(0));
    assert!(
        mm.device_page_at(m.addr()).expect("at").is_some(),
        "{storage:?}: the fork took the device page"
    );
    if let Some((p, w, v)) = first_wrong(&m, 0..4, |p, w| pat(TAG, p, w)) {
        panic!("{storage:?}: after the fork, page {p} word {w} = {v:#018x}");
    }
}

/// Words per page.
/// [`common::pat`] with the page as an index.
fn pat(tag: u64, p: usize, w: usize) -> u64 {
    common::pat(tag, p as u64, w)
}

/// The first word of pages `pages` of `m` that is not `want(page, word)`.
fn first_wrong(
    m: &Mapping,
    pages: std::ops::Range<usize>,
    want: impl Fn(usize, usize) -> u64,
) -> Option<(usize, usize, u64)> {
    pages
        .flat_map(|p| (0..WORDS).map(move |w| (p, w)))
        .map(|(p, w)| (p, w, m.read_u64(p * WORDS + w)))
        .find(|&(p, w, v)| v != want(p, w))
}

/// Spins until word 0 of the shared `flags` page is one of `want`, for at
/// most 10 s. Returns what it was.
fn wait_flag(flags: &Mapping, want: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = flags.read_u64(0);
        if want.contains(&v) || Instant::now() > deadline {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// Writes to stderr past libtest's capture (a forked child's captured
/// output is lost when it exits).
fn say(msg: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
}

/// The child's steps, in word 0 of a shared page.
const CHILD_CHECKED: u64 = 1;
const PARENT_WROTE: u64 = 2;
const CHILD_WROTE: u64 = 3;
const CHILD_FAILED: u64 = 99;

/// `fork` with device-private pages (DESIGN §4): the child sees the data as
/// it was at the fork, the parent keeps its device pages, and no later
/// write on either side (the parent's by the CPU and by the device, the
/// child's by the CPU) shows on the other.
///
/// The child only touches memory (no `Mm`, no threads); the parent's writes
/// come from a helper thread while the child waits for them, synchronised
/// through a shared page.
fn device_private_pages_across_fork(storage: Storage) {
    const TAG: u64 = 0xF0;
    const PARENT: u64 = 0xF1;
    const CHILD: u64 = 0xF2;
    {
        let mm = Mm::get().expect("mm");
        let d = Dmirror::open_device(Device::new_private(0, storage), MirrorOptions::default())
            .expect("open");
        let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
        m.no_hugepage();
        fill(&m, TAG);
        let cmd = d.migrate_to_dev(m.addr(), 4, None).expect("migrate");
        assert_eq!(cmd.cpages, 4, "{storage:?}");
        let at = |p: usize| m.pages(p as u64, 1).start();
        for p in 0..4 {
            assert!(
                mm.device_page_at(at(p)).expect("at").is_some(),
                "{storage:?}: page {p} did not migrate"
            );
        }
        let flags = Mapping::shared_anonymous(PAGE_SIZE, rw()).expect("shared mmap");

        let (status, parent) = std::thread::scope(|s| {
            // The parent's writes, once the child has checked the fork-time data.
            let helper = s.spawn(|| {
                if wait_flag(&flags, &[CHILD_CHECKED, CHILD_FAILED]) != CHILD_CHECKED {
                    return Err("the child never checked the data".to_owned());
                }
                // Page 0 by the CPU, page 1 by the device.
                for w in 0..WORDS {
                    m.write_u64(w, pat(PARENT, 0, w));
                }
                let mut data = Vec::with_capacity(PAGE_SIZE as usize);
                for w in 0..WORDS {
                    data.extend_from_slice(&pat(PARENT, 1, w).to_ne_bytes());
                }
                let r = d
                    .write(at(1), 1, &data)
                    .map_err(|e| format!("device write: {e:?}"));
                flags.write_u64(0, PARENT_WROTE);
                r.map(|_| ())
            });
            let status = fork_and_wait(|| {
                let fork_time = |p: usize, w: usize| pat(TAG, p, w);
                if let Some((p, w, v)) = first_wrong(&m, 0..4, fork_time) {
                    flags.write_u64(0, CHILD_FAILED);
                    say(&format!(
                        "child: page {p} word {w} = {v:#018x} at the fork\n"
                    ));
                    return 10 + p as i32;
                }
                flags.write_u64(0, CHILD_CHECKED);
                if wait_flag(&flags, &[PARENT_WROTE]) != PARENT_WROTE {
                    return 20;
                }
                if let Some((p, w, v)) = first_wrong(&m, 0..4, fork_time) {
                    say(&format!(
                        "child: page {p} word {w} = {v:#018x} after the parent wrote\n"
                    ));
                    return 30 + p as i32;
                }
                // The child's own writes, to pages the parent does not touch.
                for p in 2..4 {
                    for w in 0..WORDS {
                        m.write_u64(p * WORDS + w, pat(CHILD, p, w));
                    }
                }
                if let Some((p, w, v)) = first_wrong(&m, 2..4, |p, w| pat(CHILD, p, w)) {
                    say(&format!(
                        "child: page {p} word {w} = {v:#018x} after its own write\n"
                    ));
                    return 40 + p as i32;
                }
                flags.write_u64(0, CHILD_WROTE);
                0
            })
            .expect("fork");
            if status != ChildExit::Code(0) {
                // Let the helper stop waiting.
                flags.write_u64(0, CHILD_FAILED);
            }
            let parent = helper
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (status, parent)
        });
        assert_eq!(
            status,
            ChildExit::Code(0),
            "{storage:?}: the child (10+p: wrong data at the fork, 20: no parent write, \
             30+p: the parent's write showed, 40+p: its own write did not stick)"
        );
        parent.unwrap_or_else(|e| panic!("{storage:?}: parent: {e}"));
        assert_eq!(flags.read_u64(0), CHILD_WROTE, "{storage:?}");
        // The parent kept the device pages it did not touch.
        for p in 2..4 {
            assert!(
                mm.device_page_at(at(p)).expect("at").is_some(),
                "{storage:?}: page {p} is no longer device memory after the fork"
            );
        }
        // The parent's data: its own writes, and the fork-time data where
        // only the child wrote.
        let want = |p: usize, w: usize| {
            if p < 2 {
                pat(PARENT, p, w)
            } else {
                pat(TAG, p, w)
            }
        };
        if let Some((p, w, v)) = first_wrong(&m, 0..4, want) {
            panic!(
                "{storage:?}: parent page {p} word {w} = {v:#018x}, want {:#018x}",
                want(p, w)
            );
        }
    }
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
