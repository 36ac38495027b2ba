//! Mirror: the device page table follows the CPU's.

mod common;

use hmm::notifier::{Event, NotifierRange};
use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::{Error, Mirror, MirrorOptions, Mm, OwnerId, PAGE_SIZE};

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

#[test]
fn fault_installs_entries_and_invalidation_clears_them() {
    let mm = Mm::get().expect("mm");
    let mirror = Mirror::new(
        &mm,
        None,
        MirrorOptions {
            chunk_pages: 3,
            ..Default::default()
        },
    )
    .expect("mirror");
    let m = Mapping::anonymous(8 * PAGE_SIZE, rw()).expect("mmap");
    m.no_hugepage();
    mirror.fault(m.range(), true).expect("fault");
    {
        let table = mirror.lock();
        let entries: Vec<_> = table.entries_in(m.range()).collect();
        assert_eq!(entries.len(), 8, "every page of every chunk installed");
        assert!(entries.iter().all(|(_, e)| e.write && e.order == 0));
        if rustix::process::geteuid().is_root() {
            assert!(entries.iter().all(|(_, e)| e.pfn.0 != 0));
        }
    }
    let s = mirror.stats();
    assert_eq!(s.faults, 1);
    assert!(s.pages_mapped >= 8);

    dontneed(m.pages(2, 3)).expect("dontneed");
    assert!(common::eventually(|| mirror
        .lock()
        .entries_in(m.range())
        .count()
        == 5));
    let table = mirror.lock();
    for p in 0..8u64 {
        let present = table.get(m.pages(p, 1).start()).is_some();
        assert_eq!(present, !(2..5).contains(&p), "page {p}");
    }
    drop(table);
    let s = mirror.stats();
    assert!(s.invalidations >= 1 && s.pages_cleared >= 3, "{s:?}");

    // A read fault of a read-only mapping installs read-only entries.
    let ro = Mapping::anonymous(2 * PAGE_SIZE, Prot::READ).expect("mmap");
    mirror.fault(ro.range(), false).expect("fault");
    assert!(mirror.lock().entries_in(ro.range()).all(|(_, e)| !e.write));
    assert!(matches!(
        mirror.fault(ro.range(), true),
        Err(Error::Perm { .. })
    ));
}

#[test]
fn own_migrations_do_not_invalidate_and_busy_tables_refuse_nonblocking() {
    let mm = Mm::get().expect("mm");
    let owner = OwnerId::new();
    let mirror = Mirror::new(
        &mm,
        None,
        MirrorOptions {
            owner: Some(owner),
            ..Default::default()
        },
    )
    .expect("mirror");
    let m = Mapping::anonymous(2 * PAGE_SIZE, rw()).expect("mmap");
    mirror.fault(m.range(), true).expect("fault");
    let subs = mm.subscriptions().expect("mm");
    let (s, e) = (m.range().start(), m.range().end());

    // The device's own migration is not an invalidation of its mapping.
    subs.invalidate(&NotifierRange::new(s, e, Event::Migrate).with_owner(owner))
        .expect("invalidate");
    assert_eq!(mirror.lock().entries_in(m.range()).count(), 2);
    // Someone else's is.
    subs.invalidate(&NotifierRange::new(s, e, Event::Migrate).with_owner(OwnerId::new()))
        .expect("invalidate");
    assert_eq!(mirror.lock().entries_in(m.range()).count(), 0);

    // A non-blockable invalidation while the table is locked: Again.
    mirror.fault(m.range(), true).expect("fault");
    let guard = mirror.lock();
    let r = subs.invalidate(&NotifierRange::new(s, e, Event::Clear).non_blocking());
    assert!(matches!(r, Err(Error::Again)), "{r:?}");
    drop(guard);
    assert_eq!(
        mirror.lock().entries_in(m.range()).count(),
        2,
        "an aborted invalidation changes nothing"
    );
}

#[test]
fn a_fault_gives_up_at_the_deadline_when_the_range_stays_busy() {
    let mm = Mm::get().expect("mm");
    let deadline = std::time::Duration::from_millis(50);
    let mirror = Mirror::new(
        &mm,
        None,
        MirrorOptions {
            deadline,
            ..Default::default()
        },
    )
    .expect("mirror");
    let m = Mapping::anonymous(PAGE_SIZE, rw()).expect("mmap");
    let subs = mm.subscriptions().expect("mm");
    // Keep an unrelated invalidation open: every fault attempt then sees
    // `Busy` or a moved sequence until the deadline passes.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let nr = NotifierRange::new(m.range().start(), m.range().end(), Event::Clear);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                subs.invalidate(&nr).expect("invalidate");
            }
        });
        let started = std::time::Instant::now();
        let mut busy = false;
        // Until a fault met the storm: on a loaded machine the invalidating
        // thread may not run for a while.
        while mirror.stats().retries == 0 && started.elapsed() < std::time::Duration::from_secs(10)
        {
            match mirror.fault(m.range(), true) {
                Err(Error::Busy) => {
                    busy = true;
                    break;
                }
                Ok(()) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if busy {
            assert!(started.elapsed() >= deadline, "gave up before the deadline");
        }
        assert!(mirror.stats().retries > 0, "the storm made the fault retry");
    });
}
