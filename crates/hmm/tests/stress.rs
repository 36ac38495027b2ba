//! Stress: device threads fault and read while another thread unmaps, remaps
//! and DONTNEEDs the same ranges, once per mirror strategy
//! ([`Strategy::Sequence`] and [`Strategy::RangeLock`]), for several seconds
//! in all (`HMM_STRESS_SECS`, default 4, split evenly between the two;
//! `HMM_STRESS_SEED` fixes the random choices, not the interleaving). The two
//! runs take turns: each counts the address space's events from its own
//! start, and sharing two CPUs would halve the pressure on both.
//!
//! # The arena and its oracle
//! 16 slots of 4 pages, each slot its own anonymous mapping (4 KiB pages,
//! `MADV_NOHUGEPAGE`); page `i` of slot `s` is page id `p = 4 s + i`. Whoever
//! writes a page writes all of it with one *stamp*: word `w` of page `p` in
//! generation `g` is `kind << 56 | p << 48 | w << 32 | g`, `kind` telling a
//! CPU write from a device write, `g` drawn from the page's counter `issued[p]`
//! before the write. A page that was never written since it was mapped or
//! DONTNEED'd reads zeros.
//!
//! One mutator thread picks a slot at random and, holding its lock, either
//! DONTNEEDs a run of its pages (then restamps some), replaces its mapping
//! (munmap, sometimes in two steps, and a new mapping, which often lands on a
//! hole another slot left), `mremap`s it whole to a new address, or restamps
//! pages in place; half the new mappings it registers with the `Mm` itself,
//! so that it knows which changes must raise events. The new address is
//! published to the devices, which read without the lock: what they read
//! may be gone, moved, or another slot's by then.
//!
//! Every successful device read is checked against the stamps:
//! - **always** (the read may race anything): every word is 0 or a stamp of
//!   its own word index, of some page id, at a generation already issued for
//!   that page, and the non-zero words of one 4 KiB page all carry the same
//!   page id (a physical page only ever holds one page id; a racing restamp
//!   may tear a page across words, never inside one). The page id need not be
//!   the slot's: an address read after its slot moved may hold another slot's
//!   new mapping by then. The output buffer is poisoned before each read so a
//!   read that reports success without filling it fails the check;
//! - **when nothing changed the slot during the command** (its sequence count,
//!   odd while the mutator or a device writer changes it, is the same even
//!   value before and after): every word is exactly what was last written,
//!   and the command did not fail with `EFAULT`.
//!
//! Device writes hold the slot's lock (they must not land in another slot's
//! mapping through a stale address: that would be the test's own race) and
//! are checked through the CPU right after. Snapshots run unlocked and may
//! only fail with `EBUSY`. Errors accepted from a racing command: `EFAULT`
//! (the pages went away) and `EBUSY` (invalidated for longer than the
//! deadline); anything else fails the test at once.
//!
//! # At the end
//! Everything below is collected and reported together:
//! - for each device: the `faults` reported by successful commands never
//!   exceed the mirror's (equal when no command failed), every fault mapped
//!   at least a page, `pages_cleared <= pages_mapped`, invalidations happened,
//!   and every command that failed with `EBUSY` is a fault the mirror counts
//!   as given up (`gave_up`), the mirror's only way to return `Busy`;
//! - for the range-lock strategy, its promise: a device fault never retries
//!   because of an invalidation, so none gives up (`gave_up == 0`, no
//!   command fails with `EBUSY`) unless its walk stalled on pages taken away
//!   as fast as it faulted them, which `retries` counts and which a run this
//!   short does not see; `pages_left_out <= pages_mapped`. The sequence
//!   strategy never defers an invalidation nor leaves a page out;
//! - for the address space: at least one `REMOVE`, `UNMAP` and `REMAP` event
//!   per DONTNEED, munmap and mremap of a range the test registered;
//! - after quiescing: every page a device maps in a live slot is registered
//!   with the userfaultfd (else its munmap would go unheard); no device maps a
//!   page that a slot used and that is unmapped now; every slot reads back
//!   exactly what was written, from each device, twice;
//! - the program's own `mremap` of a whole mapping never failed: a device
//!   mirroring part of it must not change what the program can do with it.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::os::procmap::ProcMaps;
use hmm::testdev::{Device, Dmirror};
use hmm::{MirrorOptions, Mm, MmStats, PAGE_SIZE, Strategy, VaRange, VirtAddr};

const SLOTS: usize = 16;
const SLOT_PAGES: u64 = 4;
const NPAGES: usize = SLOTS * SLOT_PAGES as usize;
const WORDS: usize = (PAGE_SIZE / 8) as usize;
const DEVICES: usize = 2;

const KIND_CPU: u64 = 0xC5;
const KIND_DEV: u64 = 0xD5;
const EFAULT: i32 = 14;
const EBUSY: i32 = 16;

fn stamp(kind: u64, page: usize, word: usize, generation: u32) -> u64 {
    kind << 56 | (page as u64) << 48 | (word as u64) << 32 | u64::from(generation)
}

/// xorshift64*: enough randomness for choosing operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A random run of pages inside a slot: (first page, count).
    fn run(&mut self) -> (u64, u64) {
        let first = self.below(SLOT_PAGES);
        (first, 1 + self.below(SLOT_PAGES - first))
    }
}

struct SlotState {
    /// `None` only while the mutator replaces it.
    map: Option<Mapping>,
    /// The test registered the mapping with the `Mm`'s userfaultfd itself
    /// (devices may have registered it too), so changes to it raise events.
    registered: bool,
}

struct Slot {
    /// Even while nothing changes the slot; odd while the mutator or a device
    /// writer holds `state` and changes the mapping or its contents.
    seq: AtomicU64,
    /// The current start address, for lock-free readers.
    addr: AtomicU64,
    state: Mutex<SlotState>,
}

struct Arena {
    slots: Vec<Slot>,
    /// The stamp of word 0 of each page as last written, 0 for zeros.
    expected: Vec<AtomicU64>,
    /// The last generation drawn for each page.
    issued: Vec<AtomicU32>,
    stop: AtomicBool,
    deadline: Instant,
}

impl SlotState {
    fn map(&self) -> &Mapping {
        self.map.as_ref().expect("a slot always has a mapping")
    }
}

impl Arena {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    /// Locks slot `s`; `None` when a thread panicked holding it (the test
    /// is failing already: stop).
    fn lock(&self, s: usize) -> Option<MutexGuard<'_, SlotState>> {
        self.slots[s].state.lock().ok()
    }

    /// Opens a change of slot `s` (its sequence count goes odd).
    fn begin(&self, s: usize) {
        let prev = self.slots[s].seq.fetch_add(1, Ordering::SeqCst);
        assert_eq!(prev % 2, 0, "slot {s} changed by two writers at once");
    }

    /// Closes it (even again).
    fn end(&self, s: usize) {
        self.slots[s].seq.fetch_add(1, Ordering::SeqCst);
    }

    fn next_generation(&self, p: usize) -> u32 {
        self.issued[p].fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The CPU writes page `i` of slot `s` with a new generation.
    fn cpu_stamp(&self, s: usize, map: &Mapping, i: u64) {
        let p = s * SLOT_PAGES as usize + i as usize;
        let g = self.next_generation(p);
        let base = i as usize * WORDS;
        for w in 0..WORDS {
            map.write_u64(base + w, stamp(KIND_CPU, p, w, g));
        }
        self.expected[p].store(stamp(KIND_CPU, p, 0, g), Ordering::SeqCst);
    }

    /// The CPU stamps each page of slot `s` with probability `num / 4`;
    /// the others stay zero.
    fn stamp_some(&self, s: usize, map: &Mapping, pages: (u64, u64), num: u64, rng: &mut Rng) {
        for i in pages.0..pages.0 + pages.1 {
            let p = s * SLOT_PAGES as usize + i as usize;
            if rng.below(4) < num {
                self.cpu_stamp(s, map, i);
            } else {
                self.expected[p].store(0, Ordering::SeqCst);
            }
        }
    }
}

/// Sets `stop` when a thread ends, panicking or not, so the others finish.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The always-true check of one page a device read: see the module comment.
fn check_page_loose(arena: &Arena, bytes: &[u8]) -> Result<(), String> {
    let mut page_id = None;
    for (w, chunk) in bytes.chunks_exact(8).enumerate() {
        let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        if v == 0 {
            continue;
        }
        let kind = v >> 56;
        let p = ((v >> 48) & 0xff) as usize;
        let word = ((v >> 32) & 0xffff) as usize;
        let g = v as u32;
        if kind != KIND_CPU && kind != KIND_DEV {
            return Err(format!("word {w} = {v:#018x}: not a stamp"));
        }
        if p >= NPAGES || word != w {
            return Err(format!("word {w} = {v:#018x}: wrong page or word index"));
        }
        let issued = arena.issued[p].load(Ordering::SeqCst);
        if g == 0 || g > issued {
            return Err(format!(
                "word {w} = {v:#018x}: generation {g} of page {p} never written (issued {issued})"
            ));
        }
        match page_id {
            None => page_id = Some(p),
            Some(q) if q != p => {
                return Err(format!(
                    "word {w} = {v:#018x}: page {p}'s stamp in a page holding page {q}'s"
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The exact check: every word is what was last written to page `p`.
fn check_page_exact(bytes: &[u8], p: usize, expected: u64) -> Result<(), String> {
    for (w, chunk) in bytes.chunks_exact(8).enumerate() {
        let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        let want = if expected == 0 {
            0
        } else {
            expected | (w as u64) << 32
        };
        if v != want {
            return Err(format!(
                "page {p} word {w} = {v:#018x}, last written {want:#018x}"
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct DeviceStats {
    reads_ok: u64,
    reads_exact: u64,
    read_efault: u64,
    read_ebusy: u64,
    writes_ok: u64,
    write_efault: u64,
    write_ebusy: u64,
    snapshots_ok: u64,
    snapshot_ebusy: u64,
    /// Commands that failed with EFAULT (or snapshots that saw an ERROR
    /// page) although nothing changed their slot meanwhile.
    stable_efault: u64,
    /// The same with EBUSY: possible in principle (every invalidation in the
    /// process retries a whole-address-space mirror's fault), only reported.
    stable_ebusy: u64,
    first_stable_error: Option<String>,
    /// `Cmd::faults` summed over successful commands.
    cmd_faults: u64,
    failed_cmds: u64,
}

impl DeviceStats {
    fn stable_error(&mut self, errno: i32, what: String) {
        if errno == EBUSY {
            self.stable_ebusy += 1;
        } else {
            self.stable_efault += 1;
            self.first_stable_error.get_or_insert(what);
        }
    }
}

fn device_thread(arena: &Arena, dm: &Dmirror, seed: u64) -> DeviceStats {
    let _stop = StopOnDrop(&arena.stop);
    let mut rng = Rng::new(seed);
    let mut st = DeviceStats::default();
    let mut buf = vec![0u8; (SLOT_PAGES * PAGE_SIZE) as usize];
    let page = PAGE_SIZE as usize;
    while arena.running() {
        // Two devices and the mutator share few CPUs: let the mutator run.
        std::thread::yield_now();
        let s = rng.below(SLOTS as u64) as usize;
        let (i0, n) = rng.run();
        let pages = s * SLOT_PAGES as usize + i0 as usize;
        let slot = &arena.slots[s];
        match rng.below(16) {
            0 => {
                // A device write, under the slot's lock, checked through the CPU.
                let Some(state) = arena.lock(s) else { break };
                arena.begin(s);
                let addr = state
                    .map()
                    .addr()
                    .checked_add_pages(i0)
                    .expect("in the slot");
                let mut data = vec![0u8; n as usize * page];
                let mut gens = Vec::new();
                for k in 0..n as usize {
                    let g = arena.next_generation(pages + k);
                    gens.push(g);
                    for w in 0..WORDS {
                        let v = stamp(KIND_DEV, pages + k, w, g);
                        data[k * page + w * 8..][..8].copy_from_slice(&v.to_ne_bytes());
                    }
                }
                match dm.write(addr, n, &data) {
                    Ok(cmd) => {
                        st.writes_ok += 1;
                        st.cmd_faults += cmd.faults;
                        assert_eq!(cmd.cpages, n);
                        for (k, &g) in gens.iter().enumerate() {
                            let p = pages + k;
                            let first = (i0 as usize + k) * WORDS;
                            for w in 0..WORDS {
                                let got = state.map().read_u64(first + w);
                                let want = stamp(KIND_DEV, p, w, g);
                                assert_eq!(
                                    got, want,
                                    "the CPU does not see device write of page {p} word {w} \
                                     ({addr}, {n} pages, slot {s})"
                                );
                            }
                            arena.expected[p].store(stamp(KIND_DEV, p, 0, g), Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        st.failed_cmds += 1;
                        match e.errno() {
                            EFAULT => st.write_efault += 1,
                            EBUSY => st.write_ebusy += 1,
                            _ => panic!("device write of {n} pages at {addr}: {e:?}"),
                        }
                        st.stable_error(e.errno(), format!("write of {n} pages at {addr}: {e:?}"));
                        // Part of it may have landed: make the contents known again.
                        for i in i0..i0 + n {
                            arena.cpu_stamp(s, state.map(), i);
                        }
                    }
                }
                arena.end(s);
                drop(state);
            }
            1 => {
                // A snapshot: never faults, fails only with EBUSY.
                let s1 = slot.seq.load(Ordering::SeqCst);
                let addr = VirtAddr(slot.addr.load(Ordering::SeqCst))
                    .checked_add_pages(i0)
                    .expect("in the slot");
                let mut bytes = [0xEEu8; SLOT_PAGES as usize];
                let res = dm.snapshot(addr, n, &mut bytes);
                fence(Ordering::SeqCst);
                let stable = s1.is_multiple_of(2) && slot.seq.load(Ordering::SeqCst) == s1;
                match res {
                    Ok(_) => {
                        st.snapshots_ok += 1;
                        for &b in &bytes[..n as usize] {
                            assert!(
                                matches!(b, 0x00 | 0x01 | 0x02 | 0x11 | 0xFF),
                                "snapshot byte {b:#x} at {addr} ({n} pages)"
                            );
                            if stable && b == 0xFF {
                                st.stable_error(
                                    EFAULT,
                                    format!("snapshot of {n} pages at {addr}: ERROR byte"),
                                );
                            }
                        }
                    }
                    Err(e) if e.errno() == EBUSY => st.snapshot_ebusy += 1,
                    Err(e) => panic!("snapshot of {n} pages at {addr}: {e:?}"),
                }
            }
            _ => {
                // A read, racing whatever the mutator does.
                let out = &mut buf[..n as usize * page];
                out.fill(0xEE);
                let s1 = slot.seq.load(Ordering::SeqCst);
                let addr = VirtAddr(slot.addr.load(Ordering::SeqCst))
                    .checked_add_pages(i0)
                    .expect("in the slot");
                let res = dm.read(addr, n, out);
                fence(Ordering::SeqCst);
                let mut expected = [0u64; SLOT_PAGES as usize];
                for (k, e) in expected.iter_mut().take(n as usize).enumerate() {
                    *e = arena.expected[pages + k].load(Ordering::SeqCst);
                }
                let stable = s1.is_multiple_of(2) && slot.seq.load(Ordering::SeqCst) == s1;
                match res {
                    Ok(cmd) => {
                        st.reads_ok += 1;
                        st.cmd_faults += cmd.faults;
                        assert_eq!(cmd.cpages, n);
                        for (k, bytes) in out.chunks_exact(page).enumerate() {
                            if let Err(why) = check_page_loose(arena, bytes) {
                                panic!(
                                    "device read of {n} pages at {addr} (slot {s}), page {k}: {why}"
                                );
                            }
                            if stable
                                && let Err(why) = check_page_exact(bytes, pages + k, expected[k])
                            {
                                panic!(
                                    "device read of {n} pages at {addr} (slot {s}, unchanged \
                                     during the read), page {k}: {why}"
                                );
                            }
                        }
                        if stable {
                            st.reads_exact += 1;
                        }
                    }
                    Err(e) => {
                        st.failed_cmds += 1;
                        match e.errno() {
                            EFAULT => st.read_efault += 1,
                            EBUSY => st.read_ebusy += 1,
                            _ => panic!("device read of {n} pages at {addr}: {e:?}"),
                        }
                        if stable {
                            st.stable_error(
                                e.errno(),
                                format!("read of {n} pages at {addr}: {e:?}"),
                            );
                        }
                    }
                }
            }
        }
    }
    st
}

#[derive(Debug, Default)]
struct MutatorStats {
    ops: u64,
    dontneeds: u64,
    replaces: u64,
    partial_unmaps: u64,
    remaps: u64,
    restamps: u64,
    /// Events the kernel must have sent for ranges the test registered.
    want_removes: u64,
    want_unmaps: u64,
    want_remaps: u64,
    /// `mremap`s of a slot's whole mapping that failed.
    remap_failures: u64,
    first_remap_failure: Option<String>,
}

/// What the mutator leaves behind.
struct MutatorOutcome {
    stats: MutatorStats,
    /// Every page address a slot ever used.
    used: BTreeSet<u64>,
    /// The ranges of the mremaps that failed.
    failed_remaps: Vec<VaRange>,
}

/// The VMAs over `range`, for diagnostics.
fn vma_layout(maps: &ProcMaps, range: VaRange) -> String {
    let mut out = Vec::new();
    let mut a = range.start();
    while a < range.end() {
        match maps.query(a, true) {
            Ok(Some(v)) if v.start < range.end() => {
                let uffd = VaRange::new(v.start, v.end)
                    .ok()
                    .and_then(|r| hmm::os::procmap::uffd_registration(r).ok())
                    .map_or_else(|| "?".into(), |regs| format!("{regs:?}"));
                out.push(format!(
                    "[{}, {}) {:?} inode {} uffd {uffd}",
                    v.start, v.end, v.flags, v.inode
                ));
                a = v.end;
            }
            Ok(_) => break,
            Err(e) => {
                out.push(format!("PROCMAP_QUERY: {e}"));
                break;
            }
        }
    }
    out.join(" ")
}

fn new_mapping(mm: &Mm, rng: &mut Rng) -> SlotState {
    let map = Mapping::anonymous(SLOT_PAGES * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
    map.no_hugepage();
    let registered = rng.below(2) == 0;
    if registered {
        mm.register(map.range()).expect("register");
    }
    SlotState {
        map: Some(map),
        registered,
    }
}

fn note_pages(used: &mut BTreeSet<u64>, range: VaRange) {
    let mut a = range.start().get();
    while a < range.end().get() {
        used.insert(a);
        a += PAGE_SIZE;
    }
}

/// The CPU side: unmaps, remaps, DONTNEEDs and restamps slots at random.
fn mutator_thread(arena: &Arena, mm: &Mm, seed: u64) -> MutatorOutcome {
    let _stop = StopOnDrop(&arena.stop);
    let mut rng = Rng::new(seed);
    let mut st = MutatorStats::default();
    let mut used = BTreeSet::new();
    let mut failed_remaps = Vec::new();
    let maps = ProcMaps::open().expect("open /proc/self/maps");
    for s in 0..SLOTS {
        note_pages(&mut used, arena.lock(s).expect("slot").map().range());
    }
    while arena.running() {
        let s = rng.below(SLOTS as u64) as usize;
        let Some(mut state) = arena.lock(s) else {
            break;
        };
        arena.begin(s);
        match rng.below(20) {
            0..=6 => {
                let (i0, n) = rng.run();
                if !state.registered && rng.below(2) == 0 {
                    mm.register(state.map().range()).expect("register");
                    state.registered = true;
                }
                dontneed(state.map().pages(i0, n)).expect("dontneed");
                st.dontneeds += 1;
                st.want_removes += u64::from(state.registered);
                arena.stamp_some(s, state.map(), (i0, n), 2, &mut rng);
            }
            7..=11 => {
                // munmap, optionally in two steps, and a new mapping, which
                // often lands where this or another slot's old one was.
                let old_registered = state.registered;
                let mut munmaps = 1;
                if rng.below(3) == 0 {
                    let (i0, n) = rng.run();
                    state
                        .map()
                        .unmap_part(state.map().pages(i0, n))
                        .expect("munmap");
                    st.partial_unmaps += 1;
                    munmaps += u64::from(i0 > 0) + u64::from(i0 + n < SLOT_PAGES);
                }
                let fresh = if rng.below(2) == 0 {
                    // Unmap first, so the hole can be reused at once.
                    drop(state.map.take());
                    new_mapping(mm, &mut rng)
                } else {
                    let fresh = new_mapping(mm, &mut rng);
                    drop(state.map.take());
                    fresh
                };
                if old_registered {
                    st.want_unmaps += munmaps;
                }
                state.registered = fresh.registered;
                state.map = fresh.map;
                arena.slots[s]
                    .addr
                    .store(state.map().addr().get(), Ordering::SeqCst);
                note_pages(&mut used, state.map().range());
                arena.stamp_some(s, state.map(), (0, SLOT_PAGES), 3, &mut rng);
                st.replaces += 1;
            }
            12..=15 => {
                let old = state.map().range();
                let before = vma_layout(&maps, old);
                match state.map.as_mut().expect("mapped").remap(false) {
                    Ok(kept) => {
                        assert!(kept.is_none());
                        assert_ne!(old, state.map().range());
                        st.remaps += 1;
                        st.want_remaps += u64::from(state.registered);
                    }
                    Err(e) => {
                        // Counted, and failed at the end, so that the rest of
                        // the run still checks everything else.
                        st.remap_failures += 1;
                        failed_remaps.push(old);
                        st.first_remap_failure.get_or_insert_with(|| {
                            format!(
                                "mremap of {old:?}: {e}; VMAs before {before}, after {}",
                                vma_layout(&maps, old)
                            )
                        });
                        // A failed multi-VMA move may have moved part of the
                        // mapping before failing (and `Mapping::remap` then
                        // unmapped its reservation with that part in it):
                        // what is left of the old range is nobody's to unmap.
                        let _ = state.map.take().expect("mapped").leak();
                        let fresh = new_mapping(mm, &mut rng);
                        state.registered = fresh.registered;
                        state.map = fresh.map;
                        arena.stamp_some(s, state.map(), (0, SLOT_PAGES), 3, &mut rng);
                    }
                }
                arena.slots[s]
                    .addr
                    .store(state.map().addr().get(), Ordering::SeqCst);
                note_pages(&mut used, state.map().range());
            }
            _ => {
                let (i0, n) = rng.run();
                for i in i0..i0 + n {
                    arena.cpu_stamp(s, state.map(), i);
                }
                st.restamps += 1;
            }
        }
        st.ops += 1;
        arena.end(s);
        drop(state);
    }
    MutatorOutcome {
        stats: st,
        used,
        failed_remaps,
    }
}

/// Polls `cond` for up to 2 s.
fn within_2s(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn since(now: MmStats, base: MmStats) -> MmStats {
    MmStats {
        removes: now.removes - base.removes,
        unmaps: now.unmaps - base.unmaps,
        remaps: now.remaps - base.remaps,
        forks: now.forks - base.forks,
        faults: now.faults - base.faults,
        registrations: now.registrations - base.registrations,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Makes the per-strategy runs take turns (see the module docs).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn device_reads_race_unmap_remap_and_dontneed_sequence() {
    stress(Strategy::Sequence);
}

#[test]
fn device_reads_race_unmap_remap_and_dontneed_range_lock() {
    stress(Strategy::RangeLock);
}

/// One run with both devices' mirrors under `strategy`.
fn stress(strategy: Strategy) {
    // The other run failing poisons the lock; this one still runs.
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let secs = env_u64("HMM_STRESS_SECS").unwrap_or(4);
    let run = Duration::from_secs(secs) / 2;
    let seed = env_u64("HMM_STRESS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "stress {strategy}: {run:?} of {secs} s, seed {seed} (HMM_STRESS_SECS, HMM_STRESS_SEED)"
    );
    let _watchdog = common::watchdog(format!("stress {strategy}"), Duration::from_secs(60));
    let mm = Mm::get().expect("mm");
    let options = MirrorOptions {
        strategy,
        ..MirrorOptions::default()
    };
    let devices: Vec<Arc<Dmirror>> = (0..DEVICES)
        .map(|_| {
            let device = Device::get(0).expect("dmirror device");
            Arc::new(Dmirror::open_device(device, options).expect("open dmirror"))
        })
        .collect();
    let base = mm.stats();

    let mut rng = Rng::new(seed);
    let mut slots = Vec::new();
    let mut first = Vec::new();
    for _ in 0..SLOTS {
        let state = new_mapping(&mm, &mut rng);
        slots.push(Slot {
            seq: AtomicU64::new(0),
            addr: AtomicU64::new(state.map().addr().get()),
            state: Mutex::new(state),
        });
        first.push(rng.next());
    }
    let arena = Arc::new(Arena {
        slots,
        expected: (0..NPAGES).map(|_| AtomicU64::new(0)).collect(),
        issued: (0..NPAGES).map(|_| AtomicU32::new(0)).collect(),
        stop: AtomicBool::new(false),
        deadline: Instant::now() + run,
    });
    for (s, &seed) in first.iter().enumerate() {
        let state = arena.lock(s).expect("slot");
        let mut r = Rng::new(seed);
        arena.stamp_some(s, state.map(), (0, SLOT_PAGES), 3, &mut r);
    }

    let started = Instant::now();
    let mutator = {
        let arena = arena.clone();
        let mm = mm.clone();
        let seed = rng.next();
        std::thread::Builder::new()
            .name("stress-mutator".into())
            .spawn(move || mutator_thread(&arena, &mm, seed))
            .expect("spawn")
    };
    let device_threads: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(d, dm)| {
            let arena = arena.clone();
            let dm = dm.clone();
            let seed = rng.next();
            std::thread::Builder::new()
                .name(format!("stress-device-{d}"))
                .spawn(move || device_thread(&arena, &dm, seed))
                .expect("spawn")
        })
        .collect();
    let dev_stats: Vec<DeviceStats> = device_threads
        .into_iter()
        .map(|t| t.join().expect("device thread panicked"))
        .collect();
    let MutatorOutcome {
        stats: mutated,
        used,
        failed_remaps,
    } = mutator.join().expect("mutator thread panicked");
    let elapsed = started.elapsed();
    eprintln!("stress {strategy}: ran {elapsed:.2?}; mutator {mutated:?}");
    for (d, st) in dev_stats.iter().enumerate() {
        let mirror = devices[d].mirror();
        eprintln!("stress {strategy}: device {d}: {st:?}");
        eprintln!("stress {strategy}: device {d} mirror: {:?}", mirror.stats());
        if strategy == Strategy::RangeLock {
            eprintln!(
                "stress {strategy}: device {d} range lock: {:?}",
                mirror.range_lock_stats()
            );
        }
    }

    // The run did what it is for (a failure here is the test's, not the library's).
    assert!(mutated.dontneeds > 0 && mutated.replaces > 0 && mutated.remaps > 0);
    let total = |f: fn(&DeviceStats) -> u64| dev_stats.iter().map(f).sum::<u64>();
    assert!(total(|s| s.reads_ok) > 0, "no device read succeeded");
    assert!(
        total(|s| s.reads_exact) > 0,
        "no read ran on an unchanging slot"
    );
    assert!(total(|s| s.writes_ok) > 0, "no device write succeeded");

    // What the library owes, collected so that one run reports all of it.
    let mut problems: Vec<String> = Vec::new();

    // Every event the kernel owed for the ranges the test registered arrives.
    let caught_up = within_2s(|| {
        let ev = since(mm.stats(), base);
        ev.removes >= mutated.want_removes
            && ev.unmaps >= mutated.want_unmaps
            && ev.remaps >= mutated.want_remaps
    });
    let events = since(mm.stats(), base);
    eprintln!("stress {strategy}: mm events {events:?}");
    if !caught_up || events.removes == 0 || events.unmaps + events.remaps == 0 {
        problems.push(format!(
            "events missing: {events:?}; the ranges the test registered needed at least \
             {} REMOVE, {} UNMAP, {} REMAP",
            mutated.want_removes, mutated.want_unmaps, mutated.want_remaps
        ));
    }

    // A command on a slot that nothing changed meanwhile has no reason to fault.
    for (d, st) in dev_stats.iter().enumerate() {
        if st.stable_efault > 0 {
            problems.push(format!(
                "device {d}: {} commands failed with EFAULT (or saw ERROR) on a slot nothing \
                 changed during the command; first: {}",
                st.stable_efault,
                st.first_stable_error.as_deref().unwrap_or("")
            ));
        }
    }

    // The mirrors' counters add up.
    for (d, st) in dev_stats.iter().enumerate() {
        let m = devices[d].mirror().stats();
        let mut bad = Vec::new();
        if st.cmd_faults > m.faults {
            bad.push(format!("commands report {} faults", st.cmd_faults));
        }
        if st.failed_cmds == 0 && st.cmd_faults != m.faults {
            bad.push(format!(
                "no command failed, yet commands report {} faults",
                st.cmd_faults
            ));
        }
        if m.faults == 0 || m.pages_mapped < m.faults {
            bad.push("faults without pages mapped".into());
        }
        if m.pages_cleared > m.pages_mapped {
            bad.push("more pages cleared than mapped".into());
        }
        if m.invalidations == 0 || m.pages_cleared < m.invalidations {
            bad.push("invalidations that cleared nothing, or none".into());
        }
        // A mirror returns `Busy` only from a fault that gave up, which
        // `gave_up` counts, and dmirror fails the command with it: the two
        // agree exactly.
        let ebusy = st.read_ebusy + st.write_ebusy + st.snapshot_ebusy;
        if ebusy != m.gave_up {
            bad.push(format!(
                "{ebusy} commands failed with EBUSY but {} faults gave up",
                m.gave_up
            ));
        }
        if m.gave_up > m.retries {
            bad.push("faults gave up without retrying".into());
        }
        match strategy {
            Strategy::RangeLock => {
                // The strategy's promise: invalidations never make a fault
                // retry; only a walk that stalls does (`retries`).
                if m.gave_up > 0 {
                    bad.push(format!(
                        "{} range-lock faults gave up ({} stalled walks): a fault returned \
                         Busy",
                        m.gave_up, m.retries
                    ));
                }
                if m.pages_left_out > m.pages_mapped {
                    bad.push("more pages left out than mapped".into());
                }
            }
            Strategy::Sequence => {
                if m.deferred != 0 || m.pages_left_out != 0 {
                    bad.push("the sequence strategy deferred or left out pages".into());
                }
            }
        }
        if !bad.is_empty() {
            problems.push(format!("device {d}: {m:?}: {}", bad.join("; ")));
        }
    }

    // Quiesced. A device maps only what the address space hears about: a
    // page a device maps is registered with the userfaultfd, else its munmap
    // would raise no invalidation.
    let live: BTreeSet<u64> = (0..SLOTS)
        .flat_map(|s| {
            let r = arena.lock(s).expect("slot").map().range();
            (0..SLOT_PAGES).map(move |i| r.start().get() + i * PAGE_SIZE)
        })
        .collect();
    for &a in &live {
        for (d, dm) in devices.iter().enumerate() {
            let entry = dm.mirror().lock().get(VirtAddr(a));
            if let Some(e) = entry {
                let page = VaRange::from_len(VirtAddr(a), PAGE_SIZE).expect("page");
                if !mm.is_registered(page).expect("smaps") {
                    problems.push(format!(
                        "device {d} maps page {a:#x} ({e:?}) of a live slot, which is not \
                         registered with the userfaultfd: its munmap would go unheard"
                    ));
                }
            }
        }
    }

    // No device keeps an entry for a page that is unmapped now.
    let maps = ProcMaps::open().expect("open /proc/self/maps");
    let stale = || -> Vec<String> {
        let mut found = Vec::new();
        for &a in used.difference(&live) {
            let mapped = maps
                .query(VirtAddr(a), false)
                .expect("PROCMAP_QUERY")
                .is_some();
            if mapped {
                continue;
            }
            for (d, dm) in devices.iter().enumerate() {
                let entry = dm.mirror().lock().get(VirtAddr(a));
                if let Some(e) = entry {
                    let in_failed_mremap = failed_remaps.iter().any(|r| r.contains(VirtAddr(a)));
                    found.push(format!(
                        "device {d} maps unmapped page {a:#x}: {e:?}{}",
                        if in_failed_mremap {
                            " (part of a failed mremap)"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
        found
    };
    if !within_2s(|| stale().is_empty()) {
        let found = stale();
        problems.push(format!(
            "{} device entries for unmapped pages remain ({} pages used, {} live): {}",
            found.len(),
            used.len(),
            live.len(),
            found.join("; ")
        ));
    }

    // Every slot reads back exactly, from each device, twice (faulting, then
    // from the device table).
    let mut out = vec![0u8; (SLOT_PAGES * PAGE_SIZE) as usize];
    for (d, dm) in devices.iter().enumerate() {
        for s in 0..SLOTS {
            let addr = arena.lock(s).expect("slot").map().addr();
            for round in 0..2 {
                out.fill(0xEE);
                if let Err(e) = dm.read(addr, SLOT_PAGES, &mut out) {
                    problems.push(format!(
                        "final read {round} of slot {s} by device {d}: {e:?}"
                    ));
                    continue;
                }
                for (k, bytes) in out.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let p = s * SLOT_PAGES as usize + k;
                    let want = arena.expected[p].load(Ordering::SeqCst);
                    if let Err(why) = check_page_exact(bytes, p, want) {
                        problems.push(format!(
                            "final read {round} of slot {s} by device {d}: {why}"
                        ));
                    }
                }
            }
        }
    }

    // The program's own mremap of a whole mapping must not fail.
    if mutated.remap_failures > 0 {
        problems.push(format!(
            "{} of {} mremaps of a slot's whole mapping failed; first: {}",
            mutated.remap_failures,
            mutated.remap_failures + mutated.remaps,
            mutated.first_remap_failure.as_deref().unwrap_or("")
        ));
    }

    eprintln!(
        "stress {strategy}: {} reads ({} exact, {} raced), {} writes, {} snapshots; {} EFAULT, {} EBUSY \
         ({} EBUSY on unchanging slots)",
        total(|s| s.reads_ok),
        total(|s| s.reads_exact),
        total(|s| s.reads_ok - s.reads_exact),
        total(|s| s.writes_ok),
        total(|s| s.snapshots_ok),
        total(|s| s.read_efault + s.write_efault),
        total(|s| s.read_ebusy + s.write_ebusy + s.snapshot_ebusy),
        total(|s| s.stable_ebusy),
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
