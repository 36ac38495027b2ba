//! Device memory and migration: the required behaviours of device-private
//! pages (DESIGN §4), for both flavours of the software device's memory.
//!
//! Every test makes its own devices ([`Device::new_private`]), so the free
//! page count of a device is the test's own; the address space is shared
//! with the other tests of this binary, so tests look only at their own
//! addresses ([`Mm::device_page_at`]), never at process-wide totals.
//!
//! Data is checked word by word against a pattern that names the test, the
//! page and the word ([`pat`]), so a lost, torn or misplaced page shows.
//!
//! Effects of `munmap`, `mremap` and `MADV_DONTNEED` on the device table
//! are asynchronous (the service thread handles their events after the
//! call returned) and are waited for. A CPU access to a device page is not:
//! when it returns, the page is system memory, as in the kernel, where the
//! fault finishes `migrate_to_ram` before the access resumes. Tests check
//! that at once and record a violation ([`Late`]), then wait, so that the
//! data checks after it still run; the test fails at its end.
//!
//! Every mapping here is at least 4 pages long: the munmap race test
//! punches holes of at most 2 pages into its own mapping and relies on no
//! other mapping made while it runs fitting into one (see [`race`]).

mod common;

use common::{WORDS, fill, pat};

use std::sync::Arc;
use std::time::Duration;

use hmm::devmem::{DevicePage, Storage};
use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::testdev::{
    Device, Dmirror, HMM_DMIRROR_FLAG_FAIL_ALLOC, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_NONE, HMM_DMIRROR_PROT_WRITE,
};
use hmm::{MirrorOptions, Mm, PAGE_SIZE, VirtAddr};

const FLAVOURS: [Storage; 2] = [Storage::Device, Storage::Host];

/// 64-bit words per page.
/// The snapshot byte of a page in the reporting device's own memory, writable.
const LOCAL_WRITE: u8 = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE;

/// How long a test may take before [`Watchdog`] aborts the binary.
const LIMIT: Duration = Duration::from_secs(60);

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

/// A fresh device of its own with memory of `storage`, opened once.
fn open(storage: Storage) -> Dmirror {
    open_on(Device::new_private(0, storage))
}

fn open_on(device: Arc<Device>) -> Dmirror {
    Dmirror::open_device(device, MirrorOptions::default()).expect("open")
}

/// A private anonymous mapping of `npages` 4 KiB pages.
fn map(npages: u64) -> Mapping {
    assert!(npages >= 4, "see the module documentation");
    let m = Mapping::anonymous(npages * PAGE_SIZE, rw()).expect("mmap");
    m.no_hugepage();
    m
}

/// The `tag` pattern of pages `[first, first + n)` as bytes, for device writes.
fn pattern_bytes(tag: u64, first: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((n * PAGE_SIZE) as usize);
    for p in first..first + n {
        for w in 0..WORDS {
            out.extend_from_slice(&pat(tag, p, w).to_ne_bytes());
        }
    }
    out
}

/// Checks page `p` of `m` through the CPU: word `w` must be `want(w)`.
fn check_cpu_page(m: &Mapping, p: u64, want: impl Fn(usize) -> u64, what: &str) {
    for w in 0..WORDS {
        let got = m.read_u64(p as usize * WORDS + w);
        assert_eq!(
            got,
            want(w),
            "{what}: page {p} word {w}: {got:#018x}, want {:#018x}",
            want(w)
        );
    }
}

/// Checks one page of bytes a device returned: word `w` must be `want(w)`.
fn check_bytes_page(bytes: &[u8], want: impl Fn(usize) -> u64, what: &str) {
    assert_eq!(bytes.len(), PAGE_SIZE as usize);
    for (w, chunk) in bytes.chunks_exact(8).enumerate() {
        let got = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        assert_eq!(
            got,
            want(w),
            "{what}: word {w}: {got:#018x}, want {:#018x}",
            want(w)
        );
    }
}

/// Checks `n` pages of bytes a device returned for pages `first..` of the
/// `tag` pattern.
fn check_bytes(bytes: &[u8], tag: u64, first: u64, what: &str) {
    for (k, b) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
        let p = first + k as u64;
        check_bytes_page(b, |w| pat(tag, p, w), &format!("{what}: page {p}"));
    }
}

/// The address of page `p` of `m`.
fn page(m: &Mapping, p: u64) -> VirtAddr {
    m.pages(p, 1).start()
}

/// The device page mapped at page `p` of `m`.
fn dev_page(mm: &Mm, m: &Mapping, p: u64) -> Option<DevicePage> {
    mm.device_page_at(page(m, p)).expect("device_page_at")
}

/// The device page at page `p` of `m`, asserting it is `d`'s.
fn expect_on(mm: &Mm, d: &Dmirror, m: &Mapping, p: u64, what: &str) -> DevicePage {
    let dp = dev_page(mm, m, p).unwrap_or_else(|| panic!("{what}: page {p} is not device memory"));
    assert_eq!(
        dp.owner(),
        d.device().owner(),
        "{what}: page {p} is another device's"
    );
    dp
}

/// Page `p` of `m` is not device memory now.
fn expect_system(mm: &Mm, m: &Mapping, p: u64, what: &str) {
    if let Some(dp) = dev_page(mm, m, p) {
        panic!("{what}: page {p} is still device memory ({dp:?})");
    }
}

/// No device page of `d` is mapped at `at`, an address the test unmapped
/// (another test may have mapped and migrated something there since).
fn expect_none_of(mm: &Mm, d: &Dmirror, at: VirtAddr, what: &str) {
    if let Some(dp) = mm.device_page_at(at).expect("device_page_at")
        && dp.owner() == d.device().owner()
    {
        panic!("{what}: the device's page {dp:?} is still mapped at unmapped {at}");
    }
}

/// Page `p` of `m` stops being device memory (an asynchronous effect).
fn soon_system(mm: &Mm, m: &Mapping, p: u64, what: &str) {
    if !common::eventually(|| dev_page(mm, m, p).is_none()) {
        expect_system(mm, m, p, &format!("{what} (after 5 s)"));
    }
}

/// `d`'s device has `want` free pages, now or soon (pages are freed when
/// the service thread handled an event, or when a CPU fault finished).
fn expect_free(d: &Dmirror, want: u64, what: &str) {
    if !common::eventually(|| d.device().free_pages() == want) {
        panic!(
            "{what}: {} device pages free, want {want} (after 5 s)",
            d.device().free_pages()
        );
    }
}

/// Violations of "a CPU access that returned has brought its page back",
/// collected so that the data checks after them still run.
#[derive(Default)]
struct Late(Vec<String>);

impl Late {
    /// Right after a CPU access to page `p` of `m` returned: it must be
    /// system memory. Waits for it when it is not.
    fn system_now(&mut self, mm: &Mm, m: &Mapping, p: u64, what: &str) {
        if let Some(dp) = dev_page(mm, m, p) {
            self.0.push(format!(
                "{what}: page {p} is still device memory ({dp:?}) after the access returned"
            ));
            soon_system(mm, m, p, what);
        }
    }

    /// Right after CPU or device accesses returned: `want` free pages.
    fn free_now(&mut self, d: &Dmirror, want: u64, what: &str) {
        let now = d.device().free_pages();
        if now != want {
            self.0.push(format!(
                "{what}: {now} device pages free right after the access returned, want {want}"
            ));
            expect_free(d, want, what);
        }
    }

    fn check(self) {
        assert!(
            self.0.is_empty(),
            "a page touched by a CPU or device fault was still device memory when the \
             fault's access returned ({} times):\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

fn snapshot(d: &Dmirror, m: &Mapping) -> Vec<u8> {
    let n = m.len() / PAGE_SIZE;
    let mut out = vec![0xEEu8; n as usize];
    d.snapshot(m.addr(), n, &mut out).expect("snapshot");
    out
}

/// A snapshot byte of a page in system memory, mapped (read-only or writable).
fn is_system_byte(b: u8) -> bool {
    matches!(b, 0x01 | 0x02)
}

/// The device's free pages before it is used: its size.
fn total(d: &Dmirror) -> u64 {
    d.device().free_pages()
}

/// Migrates all of `m` to `d` and checks every page landed there.
fn migrate_all(mm: &Mm, d: &Dmirror, m: &Mapping, what: &str) {
    let n = m.len() / PAGE_SIZE;
    let cmd = d.migrate_to_dev(m.addr(), n, None).expect("migrate");
    assert_eq!(cmd.cpages, n, "{what}");
    for p in 0..n {
        expect_on(mm, d, m, p, what);
    }
}

#[test]
fn migrate_then_cpu_reads_back() {
    let _watchdog = common::watchdog("migrate_then_cpu_reads_back", LIMIT);
    for storage in FLAVOURS {
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let m = Mapping::anonymous(16 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        for i in 0..(m.len() / 8) as usize {
            m.write_u64(i, i as u64 * 3 + 1);
        }
        let mut out = vec![0u8; m.len() as usize];
        let cmd = d
            .migrate_to_dev(m.addr(), 16, Some(&mut out))
            .expect("migrate");
        assert_eq!(cmd.cpages, 16, "{storage:?}");
        for i in 0..(m.len() / 8) as usize {
            let v = u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().expect("8"));
            assert_eq!(v, i as u64 * 3 + 1, "{storage:?}: device copy word {i}");
        }
        assert!(mm.device_pages().expect("count") >= 16);
        // The CPU reads fault every page back.
        for i in 0..(m.len() / 8) as usize {
            assert_eq!(m.read_u64(i), i as u64 * 3 + 1, "{storage:?}: word {i}");
        }
        assert!(mm.device_page_at(m.addr()).expect("at").is_none());
    }
}

/// A CPU read of a migrated page returns its data and brings back just that
/// page; a CPU write to a migrated page brings it back first, so the rest of
/// the page keeps its data; the other pages stay on the device.
#[test]
fn cpu_read_and_write_of_migrated_pages() {
    let _watchdog = common::watchdog("cpu_read_and_write_of_migrated_pages", LIMIT);
    const TAG: u64 = 0xA1;
    let mut late = Late::default();
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let m = map(8);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);
        assert_eq!(d.device().free_pages(), total - 8, "{what}");
        assert_eq!(snapshot(&d, &m), vec![LOCAL_WRITE; 8], "{what}");

        // A CPU read in the middle of page 2.
        assert_eq!(m.read_u64(2 * WORDS + 100), pat(TAG, 2, 100), "{what}");
        late.system_now(&mm, &m, 2, &format!("{what}: CPU read"));
        late.free_now(&d, total - 7, &format!("{what}: CPU read"));

        // A CPU write is the first touch of page 5.
        let written = 0x5A5A_0000_0000_0007;
        m.write_u64(5 * WORDS + 7, written);
        late.system_now(&mm, &m, 5, &format!("{what}: CPU write"));
        late.free_now(&d, total - 6, &format!("{what}: CPU write"));
        for p in [0, 1, 3, 4, 6, 7] {
            expect_on(&mm, &d, &m, p, what);
        }
        let snap = snapshot(&d, &m);
        for (p, &b) in snap.iter().enumerate() {
            if p == 2 || p == 5 {
                assert!(is_system_byte(b), "{what}: page {p} snapshot {b:#x}");
            } else {
                assert_eq!(b, LOCAL_WRITE, "{what}: page {p} snapshot");
            }
        }
        // The write went to the page's data, which came back whole.
        check_cpu_page(
            &m,
            5,
            |w| if w == 7 { written } else { pat(TAG, 5, w) },
            what,
        );
        // Everything reads back, the rest faulting back one by one.
        for p in (0..8).filter(|&p| p != 5) {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
            late.system_now(&mm, &m, p, &format!("{what}: CPU read"));
        }
        late.free_now(&d, total, &format!("{what}: all read back"));
    }
    late.check();
}

/// A page the CPU brought back is system memory as soon as the CPU access
/// returns: it migrates again at once (a stale device-table entry would
/// make the migration skip it and report `ENOENT`).
#[test]
fn a_page_the_cpu_brought_back_migrates_again_at_once() {
    let _watchdog = common::watchdog("a_page_the_cpu_brought_back_migrates_again_at_once", LIMIT);
    const TAG: u64 = 0xAD;
    let mut late = Late::default();
    for storage in FLAVOURS {
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let m = map(4);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, &format!("{storage:?}"));
        let mut out = vec![0xEEu8; m.len() as usize];
        for round in 0..64u64 {
            let what = format!("{storage:?}, round {round}");
            let p = round % 4;
            assert_eq!(m.read_u64(p as usize * WORDS + 9), pat(TAG, p, 9), "{what}");
            out.fill(0xEE);
            let cmd = match d.migrate_to_dev(m.addr(), 4, Some(&mut out)) {
                Ok(cmd) => cmd,
                Err(e) if e.errno() == libc::ENOENT => {
                    late.0.push(format!(
                        "{what}: migrating again right after the CPU read of page {p}: {e:?}"
                    ));
                    soon_system(&mm, &m, p, &what);
                    d.migrate_to_dev(m.addr(), 4, Some(&mut out))
                        .expect("migrating again")
                }
                Err(e) => panic!("{what}: migrating again: {e:?}"),
            };
            assert_eq!(cmd.cpages, 4, "{what}");
            check_bytes(&out, TAG, 0, &what);
            expect_free(&d, total - 4, &what);
        }
        for p in 0..4 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), &format!("{storage:?}"));
        }
        expect_free(&d, total, &format!("{storage:?}: a device page leaked"));
    }
    late.check();
}

/// Unmapping part of a migrated range frees exactly those device pages (a
/// page still referenced elsewhere only when its last reference drops);
/// the rest stays on the device and reads back.
#[test]
fn partial_munmap_frees_just_those_device_pages() {
    let _watchdog = common::watchdog("partial_munmap_frees_just_those_device_pages", LIMIT);
    const TAG: u64 = 0xA2;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let m = map(8);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);
        let pfns: Vec<u64> = (0..8)
            .map(|p| expect_on(&mm, &d, &m, p, what).pfn())
            .collect();
        assert_eq!(d.device().free_pages(), total - 8, "{what}");

        // Hold a reference to page 3, as a driver might.
        let held = expect_on(&mm, &d, &m, 3, what);
        assert_eq!(held.refcount(), 2, "{what}: the table's and ours");

        m.unmap_part(m.pages(2, 3)).expect("munmap pages 2..5");
        expect_free(&d, total - 6, &format!("{what}: unmapped 3, one held"));
        assert_eq!(held.refcount(), 1, "{what}: the table let go of page 3");
        for p in 2..5 {
            expect_none_of(&mm, &d, page(&m, p), what);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            d.device().free_pages(),
            total - 6,
            "{what}: more pages freed than unmapped"
        );
        drop(held);
        assert_eq!(
            d.device().free_pages(),
            total - 5,
            "{what}: the last reference to page 3 dropped"
        );

        // The rest is still on the device, the same pages, and reads back.
        for p in [0, 1, 5, 6, 7] {
            let dp = expect_on(&mm, &d, &m, p, what);
            assert_eq!(dp.pfn(), pfns[p as usize], "{what}: page {p} changed");
        }
        for p in [0, 1, 5, 6, 7] {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, total, &format!("{what}: a device page leaked"));
    }
}

/// Waits until the device pages `pages` (which were at `old`) are mapped at
/// `m`'s pages, in order.
fn wait_moved(mm: &Mm, old: VirtAddr, m: &Mapping, pages: &[DevicePage], what: &str) {
    let moved = common::eventually(|| {
        pages
            .iter()
            .enumerate()
            .all(|(p, dp)| dev_page(mm, m, p as u64).is_some_and(|now| now.same_page(dp)))
    });
    if !moved {
        let at = |base: VirtAddr| -> Vec<Option<u64>> {
            (0..pages.len() as u64)
                .map(|p| {
                    let a = base.checked_add_pages(p).expect("in range");
                    mm.device_page_at(a).expect("at").map(|d| d.pfn())
                })
                .collect()
        };
        let refs: Vec<u64> = pages.iter().map(|p| p.refcount()).collect();
        panic!(
            "{what}: device pages {pages:?} did not move from {old} to {}: pfns now at the \
             new address {:x?}, at the old {:x?}; references (1 = only the test's) {refs:?}; \
             {:?}",
            m.addr(),
            at(m.addr()),
            at(old),
            mm.stats()
        );
    }
}

/// `mremap` of a migrated range moves its device pages with it (twice in a
/// row); the data reads back at the new address.
#[test]
fn mremap_moves_device_pages() {
    let _watchdog = common::watchdog("mremap_moves_device_pages", LIMIT);
    const TAG: u64 = 0xA3;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let mut m = map(8);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);
        let pages: Vec<DevicePage> = (0..8).map(|p| expect_on(&mm, &d, &m, p, what)).collect();

        for round in 0..2 {
            let old = m.range();
            assert!(m.remap(false).expect("mremap").is_none());
            assert_ne!(m.addr(), old.start());
            wait_moved(
                &mm,
                old.start(),
                &m,
                &pages,
                &format!("{what}: move {round}"),
            );
            for p in 0..8 {
                let at = old.start().checked_add_pages(p).expect("in range");
                expect_none_of(&mm, &d, at, &format!("{what}: move {round}"));
            }
            assert_eq!(
                d.device().free_pages(),
                total - 8,
                "{what}: move {round}: moving freed or allocated device pages"
            );
        }
        drop(pages);
        assert_eq!(snapshot(&d, &m), vec![LOCAL_WRITE; 8], "{what}");
        for p in 0..8 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, total, &format!("{what}: a device page leaked"));
    }
}

/// `mremap(MREMAP_DONTUNMAP)` of a migrated range moves its device pages to
/// the new address; the old range stays mapped and reads zeros.
#[test]
fn mremap_dontunmap_moves_device_pages_and_leaves_zeros() {
    let _watchdog = common::watchdog(
        "mremap_dontunmap_moves_device_pages_and_leaves_zeros",
        LIMIT,
    );
    const TAG: u64 = 0xA4;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let mut m = map(8);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);
        let pages: Vec<DevicePage> = (0..8).map(|p| expect_on(&mm, &d, &m, p, what)).collect();

        let old = m.remap(true).expect("mremap").expect("the old range");
        wait_moved(&mm, old.addr(), &m, &pages, what);
        for p in 0..8 {
            expect_system(&mm, &old, p, &format!("{what}: old range"));
        }
        assert_eq!(d.device().free_pages(), total - 8, "{what}");
        drop(pages);
        // The old range is empty: zeros, from the CPU and from the device.
        for p in 0..8 {
            check_cpu_page(&old, p, |_| 0, &format!("{what}: old range"));
        }
        let mut out = vec![0xEEu8; old.len() as usize];
        d.read(old.addr(), 8, &mut out)
            .expect("device read of the old range");
        for (p, bytes) in out.chunks_exact(PAGE_SIZE as usize).enumerate() {
            check_bytes_page(bytes, |_| 0, &format!("{what}: device read, old page {p}"));
        }
        assert_eq!(d.device().free_pages(), total - 8, "{what}");
        // The data is at the new address.
        for p in 0..8 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, total, &format!("{what}: a device page leaked"));
    }
}

/// A range moved with `mremap` (with and without `MREMAP_DONTUNMAP`, after
/// a device mirrored it) migrates at its new address.
#[test]
fn migrate_after_mremap() {
    let _watchdog = common::watchdog("migrate_after_mremap", LIMIT);
    const TAG: u64 = 0xA5;
    for storage in FLAVOURS {
        for dontunmap in [false, true] {
            let what = format!("{storage:?}, dontunmap {dontunmap}");
            let what = what.as_str();
            let d = open(storage);
            let mm = Mm::get().expect("mm");
            let total = total(&d);
            let mut m = map(8);
            fill(&m, TAG);
            // The device mirrors the range first, so it is registered.
            let mut out = vec![0u8; m.len() as usize];
            d.read(m.addr(), 8, &mut out).expect("device read");
            let old = m.remap(dontunmap).expect("mremap");
            assert_eq!(old.is_some(), dontunmap);

            let mut out = vec![0xEEu8; m.len() as usize];
            let cmd = d
                .migrate_to_dev(m.addr(), 8, Some(&mut out))
                .expect("migrate at the new address");
            assert_eq!(cmd.cpages, 8, "{what}");
            check_bytes(&out, TAG, 0, &format!("{what}: device copy"));
            for p in 0..8 {
                expect_on(&mm, &d, &m, p, what);
            }
            assert_eq!(d.device().free_pages(), total - 8, "{what}");
            if let Some(old) = &old {
                for p in 0..8 {
                    expect_system(&mm, old, p, what);
                    check_cpu_page(old, p, |_| 0, &format!("{what}: old range"));
                }
            }
            for p in 0..8 {
                check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
            }
            expect_free(&d, total, &format!("{what}: a device page leaked"));
        }
    }
}

/// `MADV_DONTNEED` discards device pages: later reads, by the CPU or a
/// device, see zeros, and the device pages are freed.
#[test]
fn dontneed_discards_device_pages() {
    let _watchdog = common::watchdog("dontneed_discards_device_pages", LIMIT);
    const TAG: u64 = 0xA6;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let m = map(8);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);

        dontneed(m.pages(2, 4)).expect("madvise(MADV_DONTNEED) pages 2..6");
        // The very next CPU read sees zeros.
        assert_eq!(
            m.read_u64(3 * WORDS + 11),
            0,
            "{what}: page 3 after DONTNEED"
        );
        expect_free(&d, total - 4, &format!("{what}: discarded 4 of 8"));
        for p in 2..6 {
            expect_system(&mm, &m, p, what);
        }
        for p in [0, 1, 6, 7] {
            expect_on(&mm, &d, &m, p, what);
        }
        // A device sees zeros too, and reading them allocates nothing.
        let mut out = vec![0xEEu8; (4 * PAGE_SIZE) as usize];
        d.read(page(&m, 2), 4, &mut out).expect("device read");
        for (k, bytes) in out.chunks_exact(PAGE_SIZE as usize).enumerate() {
            check_bytes_page(
                bytes,
                |_| 0,
                &format!("{what}: device read, page {}", k + 2),
            );
        }
        for p in 2..6 {
            check_cpu_page(&m, p, |_| 0, what);
        }
        assert_eq!(d.device().free_pages(), total - 4, "{what}");
        for p in [0, 1, 6, 7] {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, total, &format!("{what}: a device page leaked"));
    }
}

/// A device faulting another device's pages brings them back to system
/// memory first and reads the right data; a snapshot (no fault) reports
/// them as nothing to the other device and as its own to the owner.
#[test]
fn a_device_faulting_another_devices_pages_migrates_them_back() {
    let _watchdog = common::watchdog(
        "a_device_faulting_another_devices_pages_migrates_them_back",
        LIMIT,
    );
    const TAG: u64 = 0xA7;
    let mut late = Late::default();
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let a = open(storage);
        let b = open(storage);
        assert_ne!(a.device().owner(), b.device().owner());
        let mm = Mm::get().expect("mm");
        let (total_a, total_b) = (total(&a), total(&b));
        let m = map(8);
        fill(&m, TAG);
        migrate_all(&mm, &a, &m, what);

        assert_eq!(
            snapshot(&a, &m),
            vec![LOCAL_WRITE; 8],
            "{what}: the owner's snapshot"
        );
        assert_eq!(
            snapshot(&b, &m),
            vec![HMM_DMIRROR_PROT_NONE; 8],
            "{what}: another device's snapshot does not fault"
        );
        // The snapshot moved nothing.
        for p in 0..8 {
            expect_on(&mm, &a, &m, p, what);
        }

        // B reads pages 2..4: just those come back.
        let mut out = vec![0xEEu8; (2 * PAGE_SIZE) as usize];
        let cmd = b.read(page(&m, 2), 2, &mut out).expect("B reads 2 pages");
        assert_eq!(cmd.cpages, 2, "{what}");
        assert!(cmd.faults >= 1, "{what}: B read A's pages without a fault");
        check_bytes(&out, TAG, 2, &format!("{what}: B's read"));
        for p in 2..4 {
            late.system_now(&mm, &m, p, &format!("{what}: B's read"));
        }
        late.free_now(&a, total_a - 6, &format!("{what}: B's read"));
        for p in [0, 1, 4, 5, 6, 7] {
            expect_on(&mm, &a, &m, p, what);
        }

        // B reads everything.
        let mut out = vec![0xEEu8; m.len() as usize];
        b.read(m.addr(), 8, &mut out).expect("B reads all");
        check_bytes(&out, TAG, 0, &format!("{what}: B's read"));
        for p in 0..8 {
            late.system_now(&mm, &m, p, &format!("{what}: B's read"));
        }
        late.free_now(&a, total_a, &format!("{what}: B's read, A's pages freed"));
        assert_eq!(b.device().free_pages(), total_b, "{what}: B used no memory");
        for (p, b) in snapshot(&a, &m).into_iter().enumerate() {
            assert!(
                is_system_byte(b),
                "{what}: A's snapshot of page {p}: {b:#x}"
            );
        }
        for p in 0..8 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
    }
    late.check();
}

/// A device that runs out of memory leaves the pages it could not take in
/// system memory, intact: `migrate_to_dev` reports `ENOENT`, the CPU reads
/// the original data, and no device page leaks.
#[test]
fn device_allocation_failure_leaves_the_data_in_system_memory() {
    let _watchdog = common::watchdog(
        "device_allocation_failure_leaves_the_data_in_system_memory",
        LIMIT,
    );
    const TAG: u64 = 0xA8;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open_on(Device::with_pages(0, storage, 4));
        let mm = Mm::get().expect("mm");
        let m = map(8);
        fill(&m, TAG);

        // 8 pages, room for 4.
        let err = d
            .migrate_to_dev(m.addr(), 8, None)
            .expect_err("8 pages on a device of 4");
        assert_eq!(err.errno(), libc::ENOENT, "{what}: {err:?}");
        assert_eq!(d.device().free_pages(), 0, "{what}");
        for p in 0..4 {
            expect_on(&mm, &d, &m, p, what);
        }
        for p in 4..8 {
            expect_system(&mm, &m, p, what);
        }
        for p in 0..8 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, 4, &format!("{what}: a device page leaked"));

        // A full device takes nothing more; the refused pages are intact.
        d.migrate_to_dev(m.addr(), 4, None).expect("4 pages fit");
        assert_eq!(d.device().free_pages(), 0, "{what}");
        let err = d
            .migrate_to_dev(page(&m, 4), 4, None)
            .expect_err("a full device");
        assert_eq!(err.errno(), libc::ENOENT, "{what}: {err:?}");
        assert_eq!(d.device().free_pages(), 0, "{what}");
        for p in 4..8 {
            expect_system(&mm, &m, p, what);
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        let cmd = d.migrate_to_sys(m.addr(), 8).expect("migrate back");
        assert_eq!(cmd.cpages, 4, "{what}");
        assert_eq!(d.device().free_pages(), 4, "{what}");

        // HMM_DMIRROR_FLAG_FAIL_ALLOC fails one allocation; the driver
        // falls back to page by page, so everything still moves.
        d.set_flags(HMM_DMIRROR_FLAG_FAIL_ALLOC);
        let mut out = vec![0xEEu8; (4 * PAGE_SIZE) as usize];
        d.migrate_to_dev(page(&m, 4), 4, Some(&mut out))
            .expect("migrate with one failed allocation");
        check_bytes(&out, TAG, 4, what);
        assert_eq!(d.device().free_pages(), 0, "{what}");
        for p in 0..8 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, 4, &format!("{what}: a device page leaked"));
    }
}

/// `Dmirror::release` and dropping the device (its pagemap) with pages in
/// use migrate them back to system memory first: the data is intact.
#[test]
fn releasing_the_device_memory_migrates_pages_back() {
    let _watchdog = common::watchdog("releasing_the_device_memory_migrates_pages_back", LIMIT);
    const TAG: u64 = 0xA9;
    const TAG2: u64 = 0xAA;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let mm = Mm::get().expect("mm");

        // Release, with pages in two mappings.
        let d = open(storage);
        let total = total(&d);
        let m1 = map(8);
        let m2 = map(4);
        fill(&m1, TAG);
        fill(&m2, TAG2);
        migrate_all(&mm, &d, &m1, what);
        migrate_all(&mm, &d, &m2, what);
        assert_eq!(d.device().free_pages(), total - 12, "{what}");
        d.release().expect("release");
        for p in 0..8 {
            expect_system(&mm, &m1, p, what);
        }
        for p in 0..4 {
            expect_system(&mm, &m2, p, what);
        }
        assert_eq!(d.device().free_pages(), total, "{what}: after release");
        for (p, b) in snapshot(&d, &m1).into_iter().enumerate() {
            assert!(is_system_byte(b), "{what}: snapshot of page {p}: {b:#x}");
        }
        for p in 0..8 {
            check_cpu_page(&m1, p, |w| pat(TAG, p, w), what);
        }
        for p in 0..4 {
            check_cpu_page(&m2, p, |w| pat(TAG2, p, w), what);
        }
        // The device works again after a release.
        migrate_all(&mm, &d, &m1, what);
        for p in 0..8 {
            check_cpu_page(&m1, p, |w| pat(TAG, p, w), what);
        }
        expect_free(&d, total, &format!("{what}: a device page leaked"));

        // Dropping the device, with its pages mapped.
        let d = open(storage);
        migrate_all(&mm, &d, &m1, what);
        migrate_all(&mm, &d, &m2, what);
        let pfns: Vec<u64> = (0..8)
            .map(|p| expect_on(&mm, &d, &m1, p, what).pfn())
            .collect();
        drop(d);
        for p in 0..8 {
            expect_system(&mm, &m1, p, &format!("{what}: after the drop"));
        }
        for p in 0..4 {
            expect_system(&mm, &m2, p, &format!("{what}: after the drop"));
        }
        for pfn in pfns {
            assert!(
                hmm::devmem::lookup_pfn(pfn).is_none(),
                "{what}: pfn {pfn:#x} outlived its pagemap"
            );
        }
        for p in 0..8 {
            check_cpu_page(&m1, p, |w| pat(TAG, p, w), what);
        }
        for p in 0..4 {
            check_cpu_page(&m2, p, |w| pat(TAG2, p, w), what);
        }
    }
}

/// A device write to a migrated page writes the device memory through the
/// device-page entry (no fault, the page stays on the device); a device
/// read sees it, and so does the CPU after faulting the page back.
#[test]
fn device_access_through_device_page_entries() {
    let _watchdog = common::watchdog("device_access_through_device_page_entries", LIMIT);
    const TAG: u64 = 0xAB;
    const NEW: u64 = 0xAC;
    let tag = |p: u64| if (1..3).contains(&p) { NEW } else { TAG };
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let total = total(&d);
        let m = map(4);
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);
        let pages: Vec<DevicePage> = (0..4).map(|p| expect_on(&mm, &d, &m, p, what)).collect();

        let cmd = d
            .write(page(&m, 1), 2, &pattern_bytes(NEW, 1, 2))
            .expect("device write");
        assert_eq!(cmd.cpages, 2, "{what}");
        assert_eq!(cmd.faults, 0, "{what}: the device faulted its own pages");
        // Still the same device pages, holding the new data.
        for (p, dp) in pages.iter().enumerate() {
            let now = expect_on(&mm, &d, &m, p as u64, what);
            assert!(now.same_page(dp), "{what}: page {p} moved");
        }
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for p in 0..4u64 {
            pages[p as usize].read(&mut buf).expect("device page read");
            check_bytes_page(
                &buf,
                |w| pat(tag(p), p, w),
                &format!("{what}: device memory of page {p}"),
            );
        }
        drop(pages);

        let mut out = vec![0xEEu8; m.len() as usize];
        let cmd = d.read(m.addr(), 4, &mut out).expect("device read");
        assert_eq!(cmd.faults, 0, "{what}: the device faulted its own pages");
        for (p, bytes) in out.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let p = p as u64;
            check_bytes_page(
                bytes,
                |w| pat(tag(p), p, w),
                &format!("{what}: device read of page {p}"),
            );
        }
        assert_eq!(d.device().free_pages(), total - 4, "{what}");
        assert_eq!(snapshot(&d, &m), vec![LOCAL_WRITE; 4], "{what}");
        for p in 0..4 {
            check_cpu_page(&m, p, |w| pat(tag(p), p, w), what);
        }
        expect_free(&d, total, &format!("{what}: a device page leaked"));
    }
}

/// Device reads, writes and migrations race a thread that unmaps, replaces
/// and remaps their range, for about a second per flavour.
#[test]
fn munmap_racing_device_access() {
    let _watchdog = common::watchdog("munmap_racing_device_access", 2 * LIMIT);
    for storage in FLAVOURS {
        race::run(storage, Duration::from_secs(1));
    }
}

/// The munmap race.
///
/// # The range and its oracle
/// A 10-page mapping `R`; its pages 1..=8 are the range the devices use
/// (page `k` of the range is `R`'s page `k + 1`), pages 0 and 9 stay mapped
/// throughout so that every hole the mutator punches is bounded by the
/// test's own pages. A hole is at most 2 pages, and every mapping made
/// while the race runs is larger: the other tests' are at least 4 pages;
/// a new thread's signal stack (Rust's) is 3, its stack, malloc arenas and
/// the library's regions far more (only the dynamic loader at start-up and
/// the library's zero-page probe when an `Mm` is made, which the race holds
/// throughout, map 1 or 2). So no other mapping can be placed into a hole
/// while the devices may still use its addresses. Should one appear anyway
/// (`MAP_FIXED_NOREPLACE` refuses to map the hole again), the test stops
/// and says so.
///
/// Word `w` of range page `k` written in generation `g` is
/// [`race::stamp`]`(k, w, g)`, with a magic number, `k` and `w` in it;
/// generations come from a per-page counter, drawn before the write.
///
/// # Threads
/// - the mutator, on the CPU: punches a hole (`munmap` of 1–2 pages, then
///   `mmap(MAP_FIXED_NOREPLACE)` there again), replaces pages with
///   `mmap(MAP_FIXED)`, moves a fresh mapping over them with
///   `mremap(MREMAP_FIXED)`, or restamps pages in place; new pages get a
///   new generation, written by the CPU;
/// - a device writer (device A): `write` of a run of pages with new stamps;
/// - a migrator (device A): `migrate_to_dev` of a run (verifying the copy it
///   returns) or `migrate_to_sys`;
/// - two readers, one on device A and one on device B (which faults A's
///   pages back).
///
/// Device A's three threads share one open of it (one device page table).
///
/// # What is checked
/// Every command succeeds or fails with `EFAULT`, `EBUSY`, `EINVAL` or
/// `ENOENT`. Every successful read (and migration copy) returns, for each
/// word, zero or a stamp of its own page and word at a generation already
/// issued (a racing write may mix generations within a page, but never
/// another page's data, poison, or a generation never written). When no
/// write or mutation ran during the command (a sequence count), every word
/// is exactly what was last written, unless two writers overlapped on the
/// page (then it is "unknown" until written again), and a read or write did
/// not fail with `EFAULT`/`EINVAL`. At the end, with nothing else
/// running, every page reads back exactly through both devices and the
/// CPU, a migration of the whole range to device A takes every page, and
/// after unmapping the range every device page is freed.
mod race {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
    use std::time::{Duration, Instant};

    use hmm::devmem::Storage;
    use hmm::os::mm::Mapping;
    use hmm::testdev::{Device, Dmirror};
    use hmm::{Mm, PAGE_SIZE, VaRange, VirtAddr};

    use super::{WORDS, open_on, rw};

    /// Pages of the range.
    const PAGES: u64 = 8;
    const MAGIC: u64 = 0x5EED;

    /// Word `w` of range page `k` in generation `g` (below 2^24).
    pub fn stamp(k: u64, w: usize, g: u32) -> u64 {
        MAGIC << 48 | k << 40 | (w as u64) << 24 | u64::from(g)
    }

    /// A small generator for choosing operations.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }

        /// A run of at most `max` pages inside the range: (first, count).
        fn run(&mut self, max: u64) -> (u64, u64) {
            let first = self.below(PAGES);
            (first, 1 + self.below(max.min(PAGES - first)))
        }
    }

    struct Shared {
        /// Page 0 of the range.
        base: VirtAddr,
        /// Generations drawn, per page.
        issued: [AtomicU32; PAGES as usize],
        /// What each page holds when nothing is writing: `Some(generation)`,
        /// or `None` after two writers overlapped on it or a write failed
        /// part-way (until the next clean write).
        oracle: Mutex<[Option<u32>; PAGES as usize]>,
        /// Writes and mutations in progress, and a count bumped when one
        /// starts and when it ends.
        active: AtomicU32,
        epoch: AtomicU64,
        /// The same per writer, odd while it runs.
        mutator_seq: AtomicU64,
        writer_seq: AtomicU64,
        stop: AtomicBool,
        /// A mapping that is not the test's appeared in a hole.
        foreign: AtomicBool,
        /// Failures that need no immediate stop, reported at the end.
        stable_failures: Mutex<Vec<String>>,
        /// The last writes, mutations and migrations, for failure messages.
        log: Mutex<std::collections::VecDeque<String>>,
        t0: Instant,
    }

    impl Shared {
        fn addr(&self, k: u64) -> VirtAddr {
            self.base.checked_add_pages(k).expect("in the range")
        }

        fn begin(&self, mine: &AtomicU64) {
            self.active.fetch_add(1, SeqCst);
            self.epoch.fetch_add(1, SeqCst);
            mine.fetch_add(1, SeqCst);
        }

        fn end(&self, mine: &AtomicU64) {
            mine.fetch_add(1, SeqCst);
            self.epoch.fetch_add(1, SeqCst);
            self.active.fetch_sub(1, SeqCst);
        }

        fn next_gen(&self, k: u64) -> u32 {
            self.issued[k as usize].fetch_add(1, SeqCst) + 1
        }

        /// Records the outcome of a write of pages `[k0, k0 + n)` with
        /// `gens`; `clean` when it succeeded and no other writer overlapped.
        fn settle(&self, k0: u64, gens: &[u32], clean: bool) {
            let mut o = self.oracle.lock().unwrap_or_else(|e| e.into_inner());
            for (i, &g) in gens.iter().enumerate() {
                o[k0 as usize + i] = clean.then_some(g);
            }
        }

        fn running(&self) -> bool {
            !self.stop.load(SeqCst)
        }

        /// Records an operation on pages `[k0, k0 + n)`.
        fn log(&self, k0: u64, n: u64, what: String) {
            let t = self.t0.elapsed().as_micros();
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() == 4096 {
                log.pop_front();
            }
            log.push_back(format!("{t:>8} us  pages {k0}..{}  {what}", k0 + n));
        }

        /// The logged operations that touched page `k`, the last `max` of them.
        fn history(&self, k: u64, max: usize) -> String {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let hits: Vec<&String> = log
                .iter()
                .filter(|l| {
                    let r = l
                        .split("pages ")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next());
                    let Some((a, b)) = r.and_then(|r| r.split_once("..")) else {
                        return false;
                    };
                    let (a, b) = (a.parse::<u64>().unwrap_or(0), b.parse::<u64>().unwrap_or(0));
                    (a..b).contains(&k)
                })
                .collect();
            let from = hits.len().saturating_sub(max);
            hits[from..].iter().map(|l| format!("    {l}\n")).collect()
        }

        fn note_stable_failure(&self, what: String) {
            self.stable_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(what);
        }

        /// Checks one page `k` a device returned: always loosely, exactly
        /// when `exact` says what it must hold.
        fn check_page(&self, k: u64, bytes: &[u8], exact: Option<u32>) -> Result<(), String> {
            let issued = self.issued[k as usize].load(SeqCst);
            for (w, chunk) in bytes.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
                if let Some(g) = exact
                    && v != stamp(k, w, g)
                {
                    return Err(format!(
                        "word {w} = {v:#018x}, last written {:#018x} (nothing wrote meanwhile)",
                        stamp(k, w, g)
                    ));
                }
                if v == 0 {
                    continue;
                }
                let g = (v & 0xff_ffff) as u32;
                if v >> 48 != MAGIC || (v >> 40) & 0xff != k || ((v >> 24) & 0xffff) as usize != w {
                    return Err(format!(
                        "word {w} = {v:#018x}: not a stamp of page {k} word {w}"
                    ));
                }
                if g == 0 || g > issued {
                    return Err(format!(
                        "word {w} = {v:#018x}: generation {g} never written (issued {issued})"
                    ));
                }
            }
            Ok(())
        }
    }

    /// A consistent view of the oracle for a command: the epoch and
    /// activity before it, and the oracle then.
    struct View {
        /// When the command started, in µs since the race began.
        at: u128,
        epoch: u64,
        active: u32,
        oracle: [Option<u32>; PAGES as usize],
    }

    impl View {
        fn take(sh: &Shared) -> View {
            let epoch = sh.epoch.load(SeqCst);
            let active = sh.active.load(SeqCst);
            let oracle = *sh.oracle.lock().unwrap_or_else(|e| e.into_inner());
            View {
                at: sh.t0.elapsed().as_micros(),
                epoch,
                active,
                oracle,
            }
        }

        /// Nothing wrote or mutated since `take`.
        fn stable(&self, sh: &Shared) -> bool {
            self.active == 0 && sh.epoch.load(SeqCst) == self.epoch
        }
    }

    fn allowed(errno: i32) -> bool {
        [libc::EFAULT, libc::EBUSY, libc::EINVAL, libc::ENOENT].contains(&errno)
    }

    /// Checks a successful read of `[k0, k0 + n)` into `out`.
    fn check_read(sh: &Shared, view: &View, k0: u64, out: &[u8], who: &str) {
        let stable = view.stable(sh);
        for (i, bytes) in out.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let k = k0 + i as u64;
            let exact = if stable {
                view.oracle[k as usize]
            } else {
                None
            };
            if let Err(why) = sh.check_page(k, bytes, exact) {
                panic!(
                    "{who} of {} pages at range page {k0} (started at {} us): page {k}: {why}\n  \
                     the last operations on page {k}:\n{}",
                    out.len() / PAGE_SIZE as usize,
                    view.at,
                    sh.history(k, 12)
                );
            }
        }
    }

    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }

    #[derive(Debug, Default)]
    struct Counts {
        ok: u64,
        failed: u64,
    }

    fn reader(sh: &Shared, d: &Dmirror, seed: u64, who: &str) -> Counts {
        let _stop = StopOnDrop(&sh.stop);
        let mut rng = Rng(seed);
        let mut c = Counts::default();
        let mut buf = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        while sh.running() {
            let (k0, n) = rng.run(PAGES);
            let out = &mut buf[..(n * PAGE_SIZE) as usize];
            out.fill(0xEE);
            let view = View::take(sh);
            match d.read(sh.addr(k0), n, out) {
                Ok(cmd) => {
                    assert_eq!(cmd.cpages, n);
                    check_read(sh, &view, k0, out, who);
                    c.ok += 1;
                }
                Err(e) => {
                    assert!(allowed(e.errno()), "{who}: read of {n} at {k0}: {e:?}");
                    if view.stable(sh) && matches!(e.errno(), libc::EFAULT | libc::EINVAL) {
                        sh.note_stable_failure(format!(
                            "{who}: read of {n} pages at range page {k0} failed with nothing \
                             changing the range: {e:?}"
                        ));
                    }
                    c.failed += 1;
                }
            }
        }
        c
    }

    fn writer(sh: &Shared, d: &Dmirror, seed: u64) -> Counts {
        let _stop = StopOnDrop(&sh.stop);
        let mut rng = Rng(seed);
        let mut c = Counts::default();
        while sh.running() {
            std::thread::yield_now();
            let (k0, n) = rng.run(PAGES);
            let gens: Vec<u32> = (k0..k0 + n).map(|k| sh.next_gen(k)).collect();
            let mut data = Vec::with_capacity((n * PAGE_SIZE) as usize);
            for (i, &g) in gens.iter().enumerate() {
                for w in 0..WORDS {
                    data.extend_from_slice(&stamp(k0 + i as u64, w, g).to_ne_bytes());
                }
            }
            sh.begin(&sh.writer_seq);
            let m1 = sh.mutator_seq.load(SeqCst);
            let t = sh.t0.elapsed().as_micros();
            let res = d.write(sh.addr(k0), n, &data);
            let m2 = sh.mutator_seq.load(SeqCst);
            let alone = m1.is_multiple_of(2) && m1 == m2;
            sh.settle(k0, &gens, res.is_ok() && alone);
            sh.log(
                k0,
                n,
                format!(
                    "device write of generations {gens:x?} (from {t} us): {}{}",
                    match &res {
                        Ok(_) => "ok".to_owned(),
                        Err(e) => format!("{e:?}"),
                    },
                    if alone { "" } else { ", raced the mutator" }
                ),
            );
            sh.end(&sh.writer_seq);
            match res {
                Ok(cmd) => {
                    assert_eq!(cmd.cpages, n);
                    c.ok += 1;
                }
                Err(e) => {
                    assert!(allowed(e.errno()), "write of {n} at {k0}: {e:?}");
                    if alone && matches!(e.errno(), libc::EFAULT | libc::EINVAL) {
                        sh.note_stable_failure(format!(
                            "write of {n} pages at range page {k0} failed with nothing \
                             changing the range: {e:?}"
                        ));
                    }
                    c.failed += 1;
                }
            }
        }
        c
    }

    fn migrator(sh: &Shared, d: &Dmirror, seed: u64) -> Counts {
        let _stop = StopOnDrop(&sh.stop);
        let mut rng = Rng(seed);
        let mut c = Counts::default();
        let mut buf = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        while sh.running() {
            let (k0, n) = rng.run(PAGES);
            let t = sh.t0.elapsed().as_micros();
            if rng.below(4) == 0 {
                let res = d.migrate_to_sys(sh.addr(k0), n);
                sh.log(k0, n, format!("migrate_to_sys (from {t} us): {res:?}"));
                match res {
                    Ok(_) => c.ok += 1,
                    Err(e) => {
                        assert!(allowed(e.errno()), "migrate_to_sys of {n} at {k0}: {e:?}");
                        c.failed += 1;
                    }
                }
                continue;
            }
            let out = &mut buf[..(n * PAGE_SIZE) as usize];
            out.fill(0xEE);
            let view = View::take(sh);
            let res = d.migrate_to_dev(sh.addr(k0), n, Some(out));
            sh.log(
                k0,
                n,
                format!(
                    "migrate_to_dev (from {t} us): {:?}",
                    res.as_ref().map(|_| ())
                ),
            );
            match res {
                Ok(cmd) => {
                    assert_eq!(cmd.cpages, n);
                    check_read(sh, &view, k0, out, "migrate_to_dev");
                    c.ok += 1;
                }
                Err(e) => {
                    assert!(allowed(e.errno()), "migrate_to_dev of {n} at {k0}: {e:?}");
                    c.failed += 1;
                }
            }
        }
        c
    }

    /// `munmap(2)` of part of the test's own range.
    fn punch(run: VaRange) {
        // SAFETY: `run` lies inside the range this test mapped and owns; no
        // Rust reference points into it (accessors are volatile and
        // bounds-checked by address only).
        #[allow(unsafe_code)]
        let r = unsafe { hmm::os::mm::munmap(run) };
        r.expect("munmap");
    }

    /// Maps a hole the test punched again, with `MAP_FIXED_NOREPLACE`,
    /// which never replaces a mapping: a foreign one in the hole is
    /// reported, not destroyed.
    fn refill(run: VaRange) -> Result<(), i32> {
        super::common::map_at(run, libc::MAP_FIXED_NOREPLACE)
    }

    /// `mmap(MAP_FIXED)` over part of the test's own range: replaces its
    /// pages at once (an unmap without a hole).
    fn replace(run: VaRange) {
        super::common::map_at(run, libc::MAP_FIXED).expect("mmap(MAP_FIXED)");
    }

    /// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)` of `from` (a mapping the test
    /// made) over `run`, which it replaces.
    fn move_over(from: Mapping, run: VaRange) {
        assert_eq!(from.len(), run.len());
        // SAFETY: both ranges are the test's own and nothing borrows them;
        // `from` is leaked below, so its range is never unmapped again.
        #[allow(unsafe_code)]
        let p = unsafe {
            libc::mremap(
                from.addr().as_mut_ptr(),
                run.len() as usize,
                run.len() as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                run.start().as_mut_ptr::<libc::c_void>(),
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mremap: {}",
            std::io::Error::last_os_error()
        );
        let _ = from.leak();
    }

    /// Writes new stamps into pages `[k0, k0 + n)` through `map`, whose page
    /// `off + i` is range page `k0 + i`. Returns the generations.
    fn cpu_stamp(sh: &Shared, map: &Mapping, off: u64, k0: u64, n: u64) -> Vec<u32> {
        let mut gens = Vec::new();
        for i in 0..n {
            let k = k0 + i;
            let g = sh.next_gen(k);
            for w in 0..WORDS {
                map.write_u64((off + i) as usize * WORDS + w, stamp(k, w, g));
            }
            gens.push(g);
        }
        gens
    }

    #[derive(Debug, Default)]
    struct MutatorCounts {
        holes: u64,
        replaces: u64,
        moves: u64,
        restamps: u64,
    }

    fn mutator(sh: &Shared, r: &Mapping, seed: u64) -> MutatorCounts {
        let _stop = StopOnDrop(&sh.stop);
        let mut rng = Rng(seed);
        let mut c = MutatorCounts::default();
        while sh.running() {
            std::thread::yield_now();
            let op = rng.below(4);
            let (k0, n) = rng.run(2);
            let run = VaRange::from_pages(sh.addr(k0), n).expect("run");
            sh.begin(&sh.mutator_seq);
            let w1 = sh.writer_seq.load(SeqCst);
            let gens = match op {
                0 => {
                    punch(run);
                    // Let the devices run into the hole.
                    for _ in 0..4 {
                        std::thread::yield_now();
                    }
                    if let Err(e) = refill(run) {
                        // Someone else's mapping is in the hole: the devices
                        // must not touch it. Stop; the test fails below.
                        eprintln!("mmap(MAP_FIXED_NOREPLACE) of the hole {run:?}: errno {e}");
                        sh.foreign.store(true, SeqCst);
                        sh.stop.store(true, SeqCst);
                        sh.end(&sh.mutator_seq);
                        return c;
                    }
                    c.holes += 1;
                    cpu_stamp(sh, r, k0 + 1, k0, n)
                }
                1 => {
                    replace(run);
                    c.replaces += 1;
                    cpu_stamp(sh, r, k0 + 1, k0, n)
                }
                2 => {
                    let fresh = Mapping::anonymous(run.len(), rw()).expect("mmap");
                    let gens = cpu_stamp(sh, &fresh, 0, k0, n);
                    move_over(fresh, run);
                    c.moves += 1;
                    gens
                }
                _ => {
                    c.restamps += 1;
                    cpu_stamp(sh, r, k0 + 1, k0, n)
                }
            };
            let w2 = sh.writer_seq.load(SeqCst);
            let alone = w1.is_multiple_of(2) && w1 == w2;
            sh.settle(k0, &gens, alone);
            sh.log(
                k0,
                n,
                format!(
                    "CPU {} with generations {gens:x?}{}",
                    ["hole", "MAP_FIXED", "mremap over", "restamp"][op as usize],
                    if alone { "" } else { ", raced the writer" }
                ),
            );
            sh.end(&sh.mutator_seq);
        }
        c
    }

    pub fn run(storage: Storage, secs: Duration) {
        let mm = Mm::get().expect("mm");
        let dev_a = Device::new_private(0, storage);
        let dev_b = Device::new_private(1, storage);
        let (total_a, total_b) = (dev_a.free_pages(), dev_b.free_pages());
        // One open of device A for its writer, migrator and reader, as a
        // driver's threads share one device page table.
        let a = open_on(dev_a.clone());
        let b = open_on(dev_b.clone());

        let r = Mapping::anonymous((PAGES + 2) * PAGE_SIZE, rw()).expect("mmap");
        r.no_hugepage();
        let sh = Shared {
            base: r.pages(1, 1).start(),
            issued: Default::default(),
            oracle: Mutex::new([None; PAGES as usize]),
            active: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
            mutator_seq: AtomicU64::new(0),
            writer_seq: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            foreign: AtomicBool::new(false),
            stable_failures: Mutex::new(Vec::new()),
            log: Mutex::new(std::collections::VecDeque::new()),
            t0: Instant::now(),
        };
        let gens = cpu_stamp(&sh, &r, 1, 0, PAGES);
        sh.settle(0, &gens, true);

        let seed = 0x9E37_79B9_7F4A_7C15 ^ (storage == Storage::Host) as u64;
        let deadline = Instant::now() + secs;
        let (muts, writes, migrations, reads_a, reads_b) = std::thread::scope(|s| {
            let muts = s.spawn(|| mutator(&sh, &r, seed));
            let writes = s.spawn(|| writer(&sh, &a, seed.rotate_left(7)));
            let migrations = s.spawn(|| migrator(&sh, &a, seed.rotate_left(13)));
            let reads_a = s.spawn(|| reader(&sh, &a, seed.rotate_left(19), "read A"));
            let reads_b = s.spawn(|| reader(&sh, &b, seed.rotate_left(29), "read B"));
            while sh.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            sh.stop.store(true, SeqCst);
            let join = |h: std::thread::ScopedJoinHandle<'_, Counts>| {
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            };
            (
                muts.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                join(writes),
                join(migrations),
                join(reads_a),
                join(reads_b),
            )
        });
        eprintln!(
            "{storage:?}: mutator {muts:?}; writes {writes:?}; migrations {migrations:?}; \
             reads A {reads_a:?}; reads B {reads_b:?}"
        );
        if sh.foreign.load(SeqCst) {
            // Its pages are not all ours any more: never unmap them.
            let _ = r.leak();
            panic!(
                "{storage:?}: another mapping was placed into a hole the test punched; \
                 the test's assumption (no other mapping of at most 2 pages) is wrong"
            );
        }
        let failures = sh
            .stable_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        assert!(
            failures.is_empty(),
            "{storage:?}: {} commands failed although nothing changed their range; first: {}",
            failures.len(),
            failures[0]
        );
        assert!(muts.holes + muts.replaces + muts.moves > 0, "{storage:?}");
        assert!(
            reads_a.ok > 0 && reads_b.ok > 0,
            "{storage:?}: no read succeeded"
        );

        // Quiet now: everything reads back exactly, through both devices
        // and the CPU.
        let oracle = *sh.oracle.lock().unwrap_or_else(|e| e.into_inner());
        for (who, d) in [("device A", &a), ("device B", &b)] {
            let mut out = vec![0xEEu8; (PAGES * PAGE_SIZE) as usize];
            d.read(sh.base, PAGES, &mut out)
                .unwrap_or_else(|e| panic!("{storage:?}: final read by {who}: {e:?}"));
            for (k, bytes) in out.chunks_exact(PAGE_SIZE as usize).enumerate() {
                if let Err(why) = sh.check_page(k as u64, bytes, oracle[k]) {
                    panic!("{storage:?}: final read by {who}, page {k}: {why}");
                }
            }
        }
        for k in 0..PAGES {
            let mut bytes = Vec::with_capacity(PAGE_SIZE as usize);
            for w in 0..WORDS {
                bytes.extend_from_slice(&r.read_u64((k + 1) as usize * WORDS + w).to_ne_bytes());
            }
            if let Err(why) = sh.check_page(k, &bytes, oracle[k as usize]) {
                panic!("{storage:?}: final CPU read, page {k}: {why}");
            }
        }

        // Migrate everything once more, then unmap: every device page goes.
        if let Err(e) = a.migrate_to_dev(sh.base, PAGES, None) {
            let mut snap = vec![0xEEu8; PAGES as usize];
            let snap = a.snapshot(sh.base, PAGES, &mut snap).map(|_| snap);
            let pages: Vec<String> = (0..PAGES)
                .map(|k| {
                    let at = sh.addr(k);
                    let dp = mm.device_page_at(at).expect("at");
                    let vma = mm.vma_at(at).expect("vma").map(|v| (v.start, v.end));
                    // What a migration of just this page selects now.
                    let sel = hmm::migrate::MigrateVma::setup(
                        &mm,
                        at,
                        sh.addr(k + 1),
                        hmm::migrate::MigrateSelect::SYSTEM,
                        Some(dev_a.owner()),
                    )
                    .map(|m| {
                        let src = m.src()[0];
                        m.finalize();
                        src
                    });
                    format!(
                        "page {k} at {at}: {dp:?} (owner A: {:?}), VMA {vma:x?}, \
                         a migration of it selects {sel:x?}",
                        dp.as_ref().map(|d| d.owner() == dev_a.owner())
                    )
                })
                .collect();
            panic!(
                "{storage:?}: the final migration, with nothing else running, failed: {e:?}\n  \
                 A's snapshot {snap:x?}\n  {}",
                pages.join("\n  ")
            );
        }
        let range = VaRange::from_pages(sh.base, PAGES).expect("range");
        drop(r);
        let freed = super::common::eventually(|| {
            dev_a.free_pages() == total_a && dev_b.free_pages() == total_b
        });
        assert!(
            freed,
            "{storage:?}: device pages leaked: A has {} of {total_a} free, B {} of {total_b}",
            dev_a.free_pages(),
            dev_b.free_pages()
        );
        for k in 0..PAGES {
            // Another test may have mapped and migrated something there since.
            let at = range.start().checked_add_pages(k).expect("in range");
            if let Some(dp) = mm.device_page_at(at).expect("at") {
                assert!(
                    dp.owner() != dev_a.owner() && dp.owner() != dev_b.owner(),
                    "{storage:?}: device page {dp:?} is still mapped at unmapped {at}"
                );
            }
        }
    }
}

/// A CPU fault brings back as many pages as the device's fault batch says:
/// one by default (as dmirror), the rest of the aligned block when larger.
#[test]
fn a_cpu_fault_brings_back_the_devices_batch() {
    let _watchdog = common::watchdog("a_cpu_fault_brings_back_the_devices_batch", LIMIT);
    const TAG: u64 = 0xB7;
    for storage in FLAVOURS {
        let what = format!("{storage:?}");
        let what = what.as_str();
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        // 16 pages at the start of a 2 MiB block: a batch of 512 from page 0
        // covers them all, and stops where the device pages end.
        let m = Mapping::anonymous_aligned(16 * PAGE_SIZE, 2 << 20, rw()).expect("mmap");
        fill(&m, TAG);
        migrate_all(&mm, &d, &m, what);
        // Default: the touched page only.
        check_cpu_page(&m, 0, |w| pat(TAG, 0, w), what);
        expect_system(&mm, &m, 0, what);
        expect_on(&mm, &d, &m, 1, what);
        // A batch of 8 from page 1: pages 1..8 (the end of its 8-page block).
        d.device().set_fault_batch(8);
        check_cpu_page(&m, 1, |w| pat(TAG, 1, w), what);
        for p in 1..8 {
            expect_system(&mm, &m, p, what);
        }
        expect_on(&mm, &d, &m, 8, what);
        // 512 from page 8: everything left.
        d.device().set_fault_batch(512);
        check_cpu_page(&m, 8, |w| pat(TAG, 8, w), what);
        for p in 8..16 {
            expect_system(&mm, &m, p, what);
        }
        for p in 0..16 {
            check_cpu_page(&m, p, |w| pat(TAG, p, w), what);
        }
    }
}
