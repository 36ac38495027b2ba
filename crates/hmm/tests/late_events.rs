//! A late `UNMAP` event: the kernel frees an unmapped range before its
//! event is read, so another thread can map the addresses again and migrate
//! the new mapping while the event waits. The migration must not record its
//! entries until the event is read, or the event, taken for the old
//! mapping's, kills them.
//!
//! A file of its own: the test holds the service thread in a notifier
//! callback, which would stall every other test of the process.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hmm::devmem::Storage;
use hmm::notifier::{Interval, IntervalNotifierOps, NotifierRange};
use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::testdev::{Device, Dmirror};
use hmm::{MirrorOptions, Mm, PAGE_SIZE, VaRange};

const PAGES: u64 = 4;

/// A notifier whose callbacks wait while the gate is shut.
#[derive(Default)]
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
    entered: AtomicBool,
}

impl Gate {
    fn set(&self, shut: bool) {
        *self.shut.lock().unwrap_or_else(|e| e.into_inner()) = shut;
        self.opened.notify_all();
    }
}

impl IntervalNotifierOps for Gate {
    fn invalidate(&self, sub: &Interval, _: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        self.entered.store(true, Ordering::SeqCst);
        let mut shut = self.shut.lock().unwrap_or_else(|e| e.into_inner());
        while *shut {
            shut = self.opened.wait(shut).unwrap_or_else(|e| e.into_inner());
        }
        true
    }
}

/// Opens the gate when dropped, so a failing test does not leave the
/// service thread waiting.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_migration_where_an_unmap_event_waits_keeps_its_pages() {
    let _watchdog = common::watchdog("late UNMAP", Duration::from_secs(30));
    let mm = Mm::get().expect("mm");
    let d = Dmirror::open_device(
        Device::new_private(0, Storage::Device),
        MirrorOptions::default(),
    )
    .expect("open");
    let rw = Prot::READ | Prot::WRITE;
    // The gate's range: a DONTNEED there holds the service thread.
    let g = Mapping::anonymous(PAGES * PAGE_SIZE, rw).expect("mmap");
    g.write_u64(0, 1);
    mm.register(g.range()).expect("register");
    let gate = Arc::new(Gate::default());
    gate.set(true);
    let _open = OpenOnDrop(gate.clone());
    let n = mm
        .interval_notifier_insert(g.addr(), g.len(), gate.clone())
        .expect("insert");
    // The mapping to unmap.
    let x = Mapping::anonymous(PAGES * PAGE_SIZE, rw).expect("mmap");
    x.no_hugepage();
    x.write_u64(0, 2);
    mm.register(x.range()).expect("register");
    let xr: VaRange = x.range();

    std::thread::scope(|s| {
        let held = s.spawn(|| dontneed(g.range()));
        until("the service thread in the gate", || {
            gate.entered.load(Ordering::SeqCst)
        });
        // Unmapped at once; its UNMAP event waits for the service thread.
        let unmapper = s.spawn(move || drop(x));
        until("the addresses freed", || {
            common::map_at(xr, libc::MAP_FIXED_NOREPLACE).is_ok()
        });
        // A new mapping there, written, and migrated while the event waits.
        for p in 0..PAGES {
            let word = (0xA0 + p).to_ne_bytes();
            hmm::os::process_vm::write(hmm::VirtAddr(xr.start().get() + p * PAGE_SIZE), &word)
                .expect("write the new mapping");
        }
        let migration = s.spawn(|| {
            let mut out = vec![0u8; (PAGES * PAGE_SIZE) as usize];
            d.migrate_to_dev(xr.start(), PAGES, Some(&mut out))
                .map(|cmd| (cmd.cpages, out))
        });
        std::thread::sleep(Duration::from_millis(50));
        gate.set(false);
        held.join().expect("DONTNEED thread").expect("DONTNEED");
        unmapper.join().expect("munmap thread");
        let (cpages, out) = migration
            .join()
            .expect("migration thread")
            .expect("migrating the new mapping");
        assert_eq!(cpages, PAGES);
        for p in 0..PAGES {
            let at = (p * PAGE_SIZE) as usize;
            let word = u64::from_ne_bytes(out[at..at + 8].try_into().expect("8 bytes"));
            assert_eq!(word, 0xA0 + p, "page {p} of the new mapping");
        }
    });
    n.remove().expect("remove");
    // SAFETY: the test's own mapping at `xr`, which no Rust reference points
    // into; the device's pages come back or are freed with it.
    #[allow(unsafe_code)]
    let r = unsafe { hmm::os::mm::munmap(xr) };
    r.expect("munmap");
}
