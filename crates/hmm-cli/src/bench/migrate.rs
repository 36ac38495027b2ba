//! `hmm bench migrate`: migration to device memory and back, the CPU
//! fault that brings a page back, and a CPU scan of migrated memory, each
//! beside the raw primitive it is judged against.
//!
//! | row | ours | raw primitive | target |
//! |---|---|---|---|
//! | sys->dev, copying device | `Dmirror::migrate_to_dev(addr, n, None)`, `Storage::Device` | page-by-page `memcpy` (4 KiB calls) of the same bytes into warm memory | ≥ 0.8× |
//! | dev->sys, copying device | `Dmirror::migrate_to_sys` | `UFFDIO_COPY` in 2 MiB chunks from warm memory into an empty registered region | ≥ 0.8× |
//! | sys->dev, moving device | `migrate_to_dev`, `Storage::Host` | `UFFDIO_MOVE` in 2 MiB chunks between two registered regions | ≥ 0.5× |
//! | dev->sys, moving device | `migrate_to_sys` | `UFFDIO_MOVE` in 2 MiB chunks back | ≥ 0.5× |
//! | fault-back | a read of a migrated 4 KiB page, until it returns | the same read of a page registered for MISSING faults, resolved by a bare monitor with one `UFFDIO_COPY` of 4 KiB | ≤ 1.3× |
//! | scan | a read of one word per page over 256 MiB migrated | the same scan of a registered range, resolved by a bare monitor with one `UFFDIO_COPY` of 512 pages (2 MiB) per fault | ≥ 0.8× |
//!
//! The moving device's ceiling is 0.5×: a migration moves each page twice
//! (into a staging region at setup, before the driver has picked a
//! destination, as `migrate_vma_setup` unmaps before the driver allocates;
//! then into the device page). From 2 MiB the THP rows' raw arm moves one
//! PMD per 2 MiB, while a migration keeps its state per 4 KiB page.
//!
//! The migration rows are the kernel's `benchmark_thp_migration`
//! (`hmm-tests.c`): sizes 512 KiB to 256 MiB, each with `MADV_HUGEPAGE` and
//! with `MADV_NOHUGEPAGE` on a PMD-aligned buffer, GB/s of buffer migrated.
//! The dev->sys targets are this benchmark's own choice (the same as the
//! sys->dev ones, against the primitive that installs the data).
//!
//! # Placement
//! The measuring thread, the `Mm`'s service thread and the bare monitors
//! all run on cpu0, as in `bench fault`.
//!
//! # Warmth and buffers
//! Every repetition migrates fresh buffers (mapped, advised, populated and
//! written untimed), so a THP row starts from THPs each time (the library
//! brings pages back as 4 KiB pages). A size below 16 MiB is migrated
//! several times per repetition, each time a fresh buffer, and the figure is
//! total bytes over total time. The raw memcpy copies between the same two
//! buffers every time (its destination is warm, like the device's memory
//! after the warm-up), so below a few MiB both stay in cache; ours read a
//! buffer that was just written.

use std::hint::black_box;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmm::devmem::Storage;
use hmm::os::mm::{self as osmm, Mapping, Prot};
use hmm::os::pagemap::{Category, Pagemap, ScanFilter};
use hmm::os::uffd::{Features, Message, RegisterMode, Uffd};
use hmm::testdev::{Device, Dmirror};
use hmm::{MirrorOptions, Mm, PAGE_SIZE, VaRange, VirtAddr};

use super::{BoxResult, Ctx, Pinned, Progress, Report, Row, RunStart, Target, order2, pinned_mm};

/// The CPU every thread of the benchmark runs on.
const CPU: usize = 0;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// A PMD: the THP size and the raw primitives' chunk.
const PMD: u64 = 2 * MIB;
/// The sizes of the kernel's `benchmark_thp_migration`.
const SIZES: [u64; 7] = [
    512 * KIB,
    MIB,
    2 * MIB,
    4 * MIB,
    8 * MIB,
    16 * MIB,
    256 * MIB,
];
/// A size below this is migrated several times per repetition.
const MIN_BYTES_PER_REP: u64 = 16 * MIB;
/// Sizes from this on run half the repetitions.
const BIG: u64 = 256 * MIB;
/// Pages faulted back one at a time per repetition.
const FAULT_PAGES: u64 = 2048;
/// The CPU scan's range.
const SCAN_LEN: u64 = 256 * MIB;
/// Pages the bare monitor copies per fault in the scan.
const SCAN_BATCH: u64 = 512;
/// `EEXIST`, as `Errno::raw_os_error` gives it.
const EEXIST: i32 = 17;
/// `u64` words per page.
const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// The two device flavours, in report order.
const STORAGES: [Storage; 2] = [Storage::Device, Storage::Host];

/// The word written at the start of page `page` of a buffer in round `seed`
/// (never zero, so a page that arrives zeroed is caught).
fn pattern(seed: u64, page: u64) -> u64 {
    (seed.rotate_left(29) ^ page.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

/// The XOR of the patterns of pages `[0, n)`.
fn pattern_xor(seed: u64, n: u64) -> u64 {
    (0..n).fold(0, |a, p| a ^ pattern(seed, p))
}

/// GB/s (1e9 bytes per second).
fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-12) / 1e9
}

/// A human size: `512 KiB`, `2 MiB`.
fn size_name(bytes: u64) -> String {
    if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / KIB)
    }
}

fn storage_name(s: Storage) -> &'static str {
    match s {
        Storage::Device => "copying device",
        Storage::Host => "moving device",
    }
}

fn thp_name(thp: bool) -> &'static str {
    if thp { "THP" } else { "4 KiB" }
}

/// Measured repetitions for a buffer of `size` bytes.
fn reps_for(size: u64, reps: usize) -> usize {
    if size >= BIG { reps.div_ceil(2) } else { reps }
}

/// How many fresh buffers of `size` one repetition migrates.
fn rounds_for(size: u64) -> u64 {
    (MIN_BYTES_PER_REP / size).max(1)
}

/// A fresh PMD-aligned buffer of `len` bytes, `MADV_HUGEPAGE` or
/// `MADV_NOHUGEPAGE`, populated, page `p` starting with `pattern(seed, p)`.
fn source(len: u64, thp: bool, seed: u64) -> BoxResult<Mapping> {
    let m = Mapping::anonymous_aligned(len, PMD, Prot::READ | Prot::WRITE).ctx("mmap")?;
    osmm::hugepage(m.range(), thp).ctx(if thp {
        "MADV_HUGEPAGE"
    } else {
        "MADV_NOHUGEPAGE"
    })?;
    osmm::populate(m.range(), true).ctx("MADV_POPULATE_WRITE")?;
    for p in 0..len / PAGE_SIZE {
        m.write_u64(p as usize * WORDS, pattern(seed, p));
    }
    Ok(m)
}

/// An empty PMD-aligned region of `len` bytes with the given THP advice.
fn empty(len: u64, thp: bool) -> BoxResult<Mapping> {
    let m = Mapping::anonymous_aligned(len, PMD, Prot::READ | Prot::WRITE).ctx("mmap")?;
    osmm::hugepage(m.range(), thp).ctx("madvise")?;
    Ok(m)
}

/// Checks that page `p` of `m` starts with `pattern(seed, p)`.
fn check(m: &Mapping, seed: u64, what: &str) -> BoxResult<()> {
    for p in 0..m.len() / PAGE_SIZE {
        let got = m.read_u64(p as usize * WORDS);
        let want = pattern(seed, p);
        if got != want {
            return Err(format!("{what}: page {p} holds {got:#x}, not {want:#x}").into());
        }
    }
    Ok(())
}

/// Pages of `range` mapped by a PMD (a THP).
fn huge_pages(pagemap: &Pagemap, range: VaRange) -> BoxResult<u64> {
    let filter = ScanFilter {
        any_of: Category::PRESENT,
        returned: Category::PRESENT | Category::HUGE,
        ..ScanFilter::default()
    };
    let mut regions = Vec::new();
    pagemap
        .scan(range, &filter, &mut regions)
        .ctx("PAGEMAP_SCAN")?;
    Ok(regions
        .iter()
        .filter(|r| r.categories.contains(Category::HUGE))
        .map(|r| (r.end.get() - r.start.get()) / PAGE_SIZE)
        .sum())
}

/// Heap memory aligned to a PMD (safe code: an over-allocated `Vec` and an
/// offset into it), advised and populated: the raw memcpy's buffers.
struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: u64, thp: bool) -> BoxResult<Self> {
        let len = usize::try_from(len)?;
        let v = vec![0u8; len + PMD as usize];
        let base = VirtAddr::from_ptr(v.as_ptr()).get();
        let start = base.next_multiple_of(PMD);
        let range = VaRange::from_len(VirtAddr(start), len as u64).ctx("buffer range")?;
        osmm::hugepage(range, thp).ctx("madvise")?;
        osmm::populate(range, true).ctx("MADV_POPULATE_WRITE")?;
        Ok(Self {
            v,
            off: (start - base) as usize,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }

    /// Page `p` starts with `pattern(seed, p)`.
    fn fill(&mut self, seed: u64) {
        for (p, page) in self
            .bytes_mut()
            .chunks_exact_mut(PAGE_SIZE as usize)
            .enumerate()
        {
            page[..8].copy_from_slice(&pattern(seed, p as u64).to_ne_bytes());
        }
    }
}

/// One timed migration there and back.
#[derive(Clone, Copy, Default)]
struct Trip {
    to_dev: Duration,
    to_sys: Duration,
}

impl std::ops::AddAssign for Trip {
    fn add_assign(&mut self, o: Trip) {
        self.to_dev += o.to_dev;
        self.to_sys += o.to_sys;
    }
}

/// Ours: a fresh buffer to the device and back. Returns the times and the
/// pages of the buffer that were THPs before the migration.
fn ours_trip(
    dm: &Dmirror,
    pagemap: &Pagemap,
    size: u64,
    thp: bool,
    seed: u64,
) -> BoxResult<(Trip, u64)> {
    let m = source(size, thp, seed)?;
    let huge = huge_pages(pagemap, m.range())?;
    let npages = size / PAGE_SIZE;
    let t = Instant::now();
    dm.migrate_to_dev(m.addr(), npages, None)
        .ctx("migrate_to_dev")?;
    let to_dev = t.elapsed();
    let t = Instant::now();
    let cmd = dm.migrate_to_sys(m.addr(), npages).ctx("migrate_to_sys")?;
    let to_sys = t.elapsed();
    if cmd.cpages != npages {
        return Err(format!("migrate_to_sys moved {} of {npages} pages", cmd.cpages).into());
    }
    check(&m, seed, "after migrating back")?;
    Ok((Trip { to_dev, to_sys }, huge))
}

/// Raw, copying device: page-by-page memcpy of `src` into `dev` (the
/// device's memory), then UFFDIO_COPY of `dev` in 2 MiB chunks into an empty
/// registered region.
fn raw_copy_trip(
    uffd: &Uffd,
    src: &AlignedBuf,
    dev: &mut AlignedBuf,
    size: u64,
    thp: bool,
    seed: u64,
) -> BoxResult<Trip> {
    let n = size as usize;
    let t = Instant::now();
    for (d, s) in dev.bytes_mut()[..n]
        .chunks_exact_mut(PAGE_SIZE as usize)
        .zip(src.bytes()[..n].chunks_exact(PAGE_SIZE as usize))
    {
        // One call per page, as a driver copies page by page.
        black_box(d).copy_from_slice(black_box(s));
    }
    let to_dev = t.elapsed();
    let dst = empty(size, thp)?;
    uffd.register(dst.range(), RegisterMode::MISSING)
        .ctx("UFFDIO_REGISTER")?;
    let data = &dev.bytes()[..n];
    let t = Instant::now();
    for off in (0..size).step_by(PMD as usize) {
        let len = PMD.min(size - off);
        let at = VirtAddr(dst.addr().get() + off);
        uffd.copy(at, &data[off as usize..(off + len) as usize], true)
            .ctx("UFFDIO_COPY")?;
    }
    let to_sys = t.elapsed();
    check(&dst, seed, "raw UFFDIO_COPY")?;
    Ok(Trip { to_dev, to_sys })
}

/// UFFDIO_MOVE of `size` bytes from `src` to `dst` in 2 MiB chunks.
fn move_chunks(uffd: &Uffd, dst: VirtAddr, src: VirtAddr, size: u64) -> BoxResult<()> {
    for off in (0..size).step_by(PMD as usize) {
        let len = PMD.min(size - off);
        uffd.move_pages(
            VirtAddr(dst.get() + off),
            VirtAddr(src.get() + off),
            len,
            true,
            false,
        )
        .ctx("UFFDIO_MOVE")?;
    }
    Ok(())
}

/// Raw, moving device: a fresh buffer moved with UFFDIO_MOVE in 2 MiB chunks
/// into an empty registered region, and back.
fn raw_move_trip(uffd: &Uffd, size: u64, thp: bool, seed: u64) -> BoxResult<Trip> {
    let src = source(size, thp, seed)?;
    let dst = empty(size, thp)?;
    for m in [&src, &dst] {
        uffd.register(m.range(), RegisterMode::WP)
            .ctx("UFFDIO_REGISTER")?;
    }
    let t = Instant::now();
    move_chunks(uffd, dst.addr(), src.addr(), size)?;
    let to_dev = t.elapsed();
    let t = Instant::now();
    move_chunks(uffd, src.addr(), dst.addr(), size)?;
    let to_sys = t.elapsed();
    check(&src, seed, "raw UFFDIO_MOVE there and back")?;
    Ok(Trip { to_dev, to_sys })
}

/// Samples of one (size, THP) configuration: per storage, ours and raw,
/// GB/s each way.
#[derive(Default)]
struct TripSamples {
    ours: [[Vec<f64>; 2]; 2],
    raw: [[Vec<f64>; 2]; 2],
    /// THP pages seen in ours' buffers, and pages in all.
    huge: u64,
    pages: u64,
}

/// What every section of the benchmark uses.
struct Bench {
    /// The copying and the moving device, in [`STORAGES`] order.
    devs: [Dmirror; 2],
    mm: Mm,
    pagemap: Pagemap,
    /// The raw arms' own userfaultfd (`UFFD_FEATURE_MOVE`, no events).
    uffd: Uffd,
    /// The raw memcpy's destination: warm, 4 KiB pages, like device memory.
    dev_mem: AlignedBuf,
    /// Bumped for every buffer, so no buffer holds a previous one's data.
    seed: u64,
    log: Progress,
}

impl Bench {
    fn next_seed(&mut self) -> u64 {
        self.seed += 1;
        self.seed
    }
}

/// The migration matrix for one size and THP mode.
fn trips(b: &mut Bench, size: u64, thp: bool, reps: usize) -> BoxResult<TripSamples> {
    let rounds = rounds_for(size);
    let mut src = AlignedBuf::new(size, thp)?;
    let mut s = TripSamples::default();
    for rep in 0..=reps {
        let mut gb = [[[0.0; 2]; 2]; 2]; // [storage][ours/raw][to_dev/to_sys]
        for (k, storage) in STORAGES.iter().enumerate() {
            for arm in order2(rep) {
                let mut total = Trip::default();
                for _ in 0..rounds {
                    let seed = b.next_seed();
                    if arm == 0 {
                        let (t, huge) = ours_trip(&b.devs[k], &b.pagemap, size, thp, seed)?;
                        total += t;
                        if rep > 0 {
                            s.huge += huge;
                            s.pages += size / PAGE_SIZE;
                        }
                    } else if *storage == Storage::Device {
                        src.fill(seed);
                        total += raw_copy_trip(&b.uffd, &src, &mut b.dev_mem, size, thp, seed)?;
                    } else {
                        total += raw_move_trip(&b.uffd, size, thp, seed)?;
                    }
                }
                let bytes = size * rounds;
                gb[k][arm] = [gbps(bytes, total.to_dev), gbps(bytes, total.to_sys)];
            }
        }
        if rep > 0 {
            for (k, [ours, raw]) in gb.iter().enumerate() {
                for d in 0..2 {
                    s.ours[k][d].push(ours[d]);
                    s.raw[k][d].push(raw[d]);
                }
            }
        }
        b.log.say(format!(
            "  {} {} rep {rep}{}: copying {:.2}/{:.2} (memcpy {:.2}, COPY {:.2}); \
             moving {:.2}/{:.2} (MOVE {:.1}/{:.1}) GB/s sys->dev/dev->sys",
            size_name(size),
            thp_name(thp),
            if rep == 0 { " (warm-up)" } else { "" },
            gb[0][0][0],
            gb[0][0][1],
            gb[0][1][0],
            gb[0][1][1],
            gb[1][0][0],
            gb[1][0][1],
            gb[1][1][0],
            gb[1][1][1],
        ));
    }
    Ok(s)
}

/// A userfaultfd of its own with a monitor thread on [`CPU`] that resolves
/// each MISSING fault in `region` with one UFFDIO_COPY of up to `batch`
/// pages from the faulting page on (page `p` of the region starting with
/// `pattern(seed, p)`), blocking in `read()` as `reference/limits.md`'s
/// handlers do.
///
/// # Invariants
/// `uffd` is declared before `sentinel`: the userfaultfd is closed (and the
/// registrations dropped) before the sentinel page is unmapped.
struct BareMissing {
    join: Option<JoinHandle<Result<u64, String>>>,
    /// Held so the registrations outlive the monitor thread.
    _uffd: Arc<Uffd>,
    /// A registered page whose fault tells the monitor to stop.
    sentinel: Mapping,
}

impl BareMissing {
    fn start(region: VaRange, batch: u64, seed: u64) -> BoxResult<Self> {
        let uffd = Arc::new(Uffd::open(Features::empty(), false).ctx("userfaultfd")?);
        let sentinel = Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE).ctx("mmap")?;
        for r in [region, sentinel.range()] {
            uffd.register(r, RegisterMode::MISSING)
                .ctx("UFFDIO_REGISTER")?;
        }
        let stop_at = sentinel.addr();
        let reader = uffd.clone();
        let join = std::thread::Builder::new()
            .name("bare-uffd-missing".into())
            .spawn(move || -> Result<u64, String> {
                // Best effort; the placement line says when pinning failed.
                let _ = osmm::pin_current_thread(CPU);
                let mut buf = vec![0u8; (batch * PAGE_SIZE) as usize];
                let mut msgs = Vec::with_capacity(16);
                let mut faults = 0u64;
                let mut failed: Option<String> = None;
                loop {
                    msgs.clear();
                    reader
                        .read_messages(&mut msgs)
                        .map_err(|e| format!("read userfaultfd: {e}"))?;
                    for m in &msgs {
                        let Message::Pagefault { address, .. } = m else {
                            continue;
                        };
                        let at = address.page_down();
                        if at == stop_at {
                            reader
                                .copy(at, &buf[..PAGE_SIZE as usize], false)
                                .map_err(|e| format!("UFFDIO_COPY (sentinel): {e}"))?;
                            return match failed {
                                Some(e) => Err(e),
                                None => Ok(faults),
                            };
                        }
                        faults += 1;
                        let first = (at.get() - region.start().get()) / PAGE_SIZE;
                        let n = batch.min((region.end().get() - at.get()) / PAGE_SIZE);
                        for k in 0..n {
                            let o = (k * PAGE_SIZE) as usize;
                            buf[o..o + 8].copy_from_slice(&pattern(seed, first + k).to_ne_bytes());
                        }
                        let page = VaRange::from_len(at, PAGE_SIZE).map_err(|e| e.to_string())?;
                        match reader.copy(at, &buf[..(n * PAGE_SIZE) as usize], false) {
                            Ok(()) => {}
                            // Resolved already (EEXIST): wake the faulter.
                            Err(e) if e.raw_os_error() == EEXIST => {
                                let _ = reader.wake(page);
                            }
                            Err(e) => {
                                // Never leave the faulting thread waiting.
                                failed.get_or_insert(format!("UFFDIO_COPY at {at}: {e}"));
                                let _ = reader.zeropage(page, false);
                            }
                        }
                    }
                }
            })
            .ctx("spawn the monitor")?;
        Ok(Self {
            join: Some(join),
            _uffd: uffd,
            sentinel,
        })
    }

    /// Stops the monitor; returns how many faults it served.
    fn stop(&mut self) -> BoxResult<u64> {
        let Some(join) = self.join.take() else {
            return Ok(0);
        };
        if !join.is_finished() {
            // Blocks until the monitor resolves it, then it returns.
            black_box(self.sentinel.read_u8(0));
        }
        Ok(join.join().map_err(|_| "the bare monitor panicked")??)
    }
}

impl Drop for BareMissing {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Ours: µs per CPU read of a migrated 4 KiB page until it returns, over
/// [`FAULT_PAGES`] pages read in descending order (so each fault brings back
/// exactly one page, whatever batch the driver asks for).
fn ours_fault_back(dm: &Dmirror, mm: &Mm, seed: u64) -> BoxResult<f64> {
    let m = source(FAULT_PAGES * PAGE_SIZE, false, seed)?;
    dm.migrate_to_dev(m.addr(), FAULT_PAGES, None)
        .ctx("migrate_to_dev")?;
    let f0 = mm.stats().faults;
    let t = Instant::now();
    let mut acc = 0;
    for p in (0..FAULT_PAGES).rev() {
        acc ^= m.read_u64(p as usize * WORDS);
    }
    let el = t.elapsed();
    let faults = mm.stats().faults - f0;
    if acc != pattern_xor(seed, FAULT_PAGES) {
        check(&m, seed, "fault-back")?;
    }
    if faults < FAULT_PAGES {
        return Err(format!("{faults} faults for {FAULT_PAGES} migrated pages read").into());
    }
    Ok(el.as_secs_f64() * 1e6 / FAULT_PAGES as f64)
}

/// Raw: µs per CPU read of a registered missing page resolved by the bare
/// monitor with UFFDIO_COPY of 4 KiB, same order.
fn raw_fault_back(seed: u64) -> BoxResult<f64> {
    let m = empty(FAULT_PAGES * PAGE_SIZE, false)?;
    let mut mon = BareMissing::start(m.range(), 1, seed)?;
    let t = Instant::now();
    let mut acc = 0;
    for p in (0..FAULT_PAGES).rev() {
        acc ^= m.read_u64(p as usize * WORDS);
    }
    let el = t.elapsed();
    let faults = mon.stop()?;
    if faults != FAULT_PAGES || acc != pattern_xor(seed, FAULT_PAGES) {
        return Err(format!(
            "the bare monitor served {faults} faults, data ok: {}",
            acc == pattern_xor(seed, FAULT_PAGES)
        )
        .into());
    }
    Ok(el.as_secs_f64() * 1e6 / FAULT_PAGES as f64)
}

/// Ours: GB/s of a read scan (one word per page) of [`SCAN_LEN`] migrated,
/// and the faults it took.
fn ours_scan(dm: &Dmirror, mm: &Mm, seed: u64) -> BoxResult<(f64, u64)> {
    let npages = SCAN_LEN / PAGE_SIZE;
    let m = source(SCAN_LEN, false, seed)?;
    dm.migrate_to_dev(m.addr(), npages, None)
        .ctx("migrate_to_dev")?;
    // A sequential scan is what batching is for: bring back the rest of
    // the 2 MiB block with each fault, as the bare monitor does.
    dm.device().set_fault_batch(SCAN_BATCH);
    let f0 = mm.stats().faults;
    let t = Instant::now();
    let mut acc = 0;
    for p in 0..npages {
        acc ^= m.read_u64(p as usize * WORDS);
    }
    let el = t.elapsed();
    dm.device().set_fault_batch(1);
    let faults = mm.stats().faults - f0;
    if acc != pattern_xor(seed, npages) {
        check(&m, seed, "scan")?;
    }
    Ok((gbps(SCAN_LEN, el), faults))
}

/// Raw: the same scan served by the bare monitor, [`SCAN_BATCH`] pages per fault.
fn raw_scan(seed: u64) -> BoxResult<(f64, u64)> {
    let npages = SCAN_LEN / PAGE_SIZE;
    let m = empty(SCAN_LEN, false)?;
    let mut mon = BareMissing::start(m.range(), SCAN_BATCH, seed)?;
    let t = Instant::now();
    let mut acc = 0;
    for p in 0..npages {
        acc ^= m.read_u64(p as usize * WORDS);
    }
    let el = t.elapsed();
    let faults = mon.stop()?;
    if acc != pattern_xor(seed, npages) {
        check(&m, seed, "bare scan")?;
    }
    Ok((gbps(SCAN_LEN, el), faults))
}

/// Which of the three arms (ours per storage, then raw) runs when, by rep.
fn order3(rep: usize) -> [usize; 3] {
    match rep % 3 {
        0 => [0, 1, 2],
        1 => [2, 0, 1],
        _ => [1, 2, 0],
    }
}

/// The fault-back and scan rows, with notes on the faults taken.
fn cpu_access(b: &mut Bench, reps: usize) -> BoxResult<(Vec<Row>, Vec<String>)> {
    let mut fb: [Vec<f64>; 3] = Default::default();
    for rep in 0..=reps {
        let mut us = [0.0; 3];
        for arm in order3(rep) {
            let seed = b.next_seed();
            us[arm] = if arm < 2 {
                ours_fault_back(&b.devs[arm], &b.mm, seed)?
            } else {
                raw_fault_back(seed)?
            };
        }
        if rep > 0 {
            for (s, v) in fb.iter_mut().zip(us) {
                s.push(v);
            }
        }
        b.log.say(format!(
            "  fault-back rep {rep}{}: copying {:.2} / moving {:.2} / bare COPY {:.2} us",
            if rep == 0 { " (warm-up)" } else { "" },
            us[0],
            us[1],
            us[2]
        ));
    }
    let scan_reps = reps.div_ceil(2);
    let mut sc: [Vec<f64>; 3] = Default::default();
    let mut faults = [0u64; 3];
    for rep in 0..=scan_reps {
        let mut r = [(0.0, 0); 3];
        for arm in order3(rep) {
            let seed = b.next_seed();
            r[arm] = if arm < 2 {
                ours_scan(&b.devs[arm], &b.mm, seed)?
            } else {
                raw_scan(seed)?
            };
        }
        if rep > 0 {
            for k in 0..3 {
                sc[k].push(r[k].0);
                faults[k] += r[k].1;
            }
        }
        b.log.say(format!(
            "  scan rep {rep}{}: copying {:.3} / moving {:.3} / bare {:.3} GB/s ({} / {} / {} faults)",
            if rep == 0 { " (warm-up)" } else { "" },
            r[0].0,
            r[1].0,
            r[2].0,
            r[0].1,
            r[1].1,
            r[2].1
        ));
    }
    let mut rows = Vec::new();
    for (k, storage) in STORAGES.iter().enumerate() {
        rows.push(
            Row::from_samples(
                format!(
                    "fault-back: CPU read of a migrated 4 KiB page, {}",
                    storage_name(*storage)
                ),
                "us/fault",
                "MISSING fault -> UFFDIO_COPY 4 KiB, bare monitor",
                &fb[k],
                &fb[2],
                Target::AtMost(1.3),
            )
            .ok_or("no fault-back samples")?,
        );
    }
    for (k, storage) in STORAGES.iter().enumerate() {
        rows.push(
            Row::from_samples(
                format!(
                    "scan: CPU read of 1 word/page over 256 MiB migrated, {}",
                    storage_name(*storage)
                ),
                "GB/s",
                format!(
                    "bare monitor, UFFDIO_COPY {SCAN_BATCH} pages ({} KiB) per fault",
                    SCAN_BATCH * PAGE_SIZE / KIB
                ),
                &sc[k],
                &sc[2],
                Target::AtLeast(0.8),
            )
            .ok_or("no scan samples")?,
        );
    }
    let per = |f: u64| f as f64 / scan_reps as f64;
    let npages = SCAN_LEN / PAGE_SIZE;
    let notes = vec![
        format!(
            "fault-back: {FAULT_PAGES} pages migrated (untimed) then read one word each in \
             descending address order, so each fault brings back one page; mean per read"
        ),
        format!(
            "scan: {npages} pages per scan; faults per scan: copying {:.0}, moving {:.0}, \
             bare {:.0} (mean over {scan_reps} reps)",
            per(faults[0]),
            per(faults[1]),
            per(faults[2])
        ),
    ];
    Ok((rows, notes))
}

/// Runs the benchmark: one warm-up and `reps` measured repetitions of each
/// section (half, rounded up, for 256 MiB buffers and the scan).
pub(super) fn run(reps: usize, progress: bool) -> BoxResult<Report> {
    let log = Progress(progress);
    let run_start = RunStart::now();
    let Pinned {
        mm,
        placement,
        thp: thp_mode,
    } = pinned_mm(CPU, "bare uffd monitors")?;
    let devs = [
        Dmirror::open_device(
            Device::new_private(0, Storage::Device),
            MirrorOptions::default(),
        )
        .ctx("opening the copying device")?,
        Dmirror::open_device(
            Device::new_private(1, Storage::Host),
            MirrorOptions::default(),
        )
        .ctx("opening the moving device")?,
    ];
    let mut b = Bench {
        devs,
        mm,
        pagemap: Pagemap::open().ctx("open /proc/self/pagemap")?,
        uffd: Uffd::open(Features::MOVE, false).ctx("userfaultfd (MOVE)")?,
        dev_mem: AlignedBuf::new(SIZES.iter().copied().max().unwrap_or(BIG), false)?,
        seed: 0x5eed_0000,
        log,
    };

    // The matrix: samples by (size, thp).
    let mut matrix = Vec::new();
    let mut thp_seen = [0u64; 2];
    for &size in &SIZES {
        for thp in [true, false] {
            let r = reps_for(size, reps);
            b.log.say(format!(
                "migrate {} {}: {} buffer(s) per rep, 1 warm-up + {r} reps",
                size_name(size),
                thp_name(thp),
                rounds_for(size)
            ));
            let s = trips(&mut b, size, thp, r)?;
            if thp && size >= PMD {
                thp_seen[0] += s.huge;
                thp_seen[1] += s.pages;
            }
            matrix.push((size, thp, s));
        }
    }
    b.log.say("CPU access: fault-back and scan");
    let (cpu_rows, cpu_notes) = cpu_access(&mut b, reps)?;

    let mut rows = Vec::new();
    for (k, storage) in STORAGES.iter().enumerate() {
        for (d, dir) in ["sys->dev", "dev->sys"].iter().enumerate() {
            let (baseline, target) = match (storage, d) {
                (Storage::Device, 0) => (
                    "page-by-page memcpy (4 KiB calls) into warm memory".to_string(),
                    Target::AtLeast(0.8),
                ),
                (Storage::Device, _) => (
                    "UFFDIO_COPY 2 MiB chunks into a registered region".to_string(),
                    Target::AtLeast(0.8),
                ),
                (Storage::Host, 0) => (
                    "UFFDIO_MOVE 2 MiB chunks between registered regions".to_string(),
                    Target::AtLeast(0.5),
                ),
                (Storage::Host, _) => (
                    "UFFDIO_MOVE 2 MiB chunks back".to_string(),
                    Target::AtLeast(0.5),
                ),
            };
            for thp in [true, false] {
                for (size, t, s) in &matrix {
                    if *t != thp {
                        continue;
                    }
                    rows.push(
                        Row::from_samples(
                            format!(
                                "{dir} {} {}, {} ({})",
                                size_name(*size),
                                thp_name(thp),
                                storage_name(*storage),
                                if d == 0 {
                                    "migrate_to_dev"
                                } else {
                                    "migrate_to_sys"
                                }
                            ),
                            "GB/s",
                            baseline.clone(),
                            &s.ours[k][d],
                            &s.raw[k][d],
                            target,
                        )
                        .ok_or("no migration samples")?,
                    );
                }
            }
        }
    }
    rows.extend(cpu_rows);

    let mut notes = vec![
        format!(
            "buffers: fresh per migration, PMD-aligned, MADV_HUGEPAGE (THP rows) or \
             MADV_NOHUGEPAGE (4 KiB rows), populated and written untimed (THP mode: {thp_mode}); \
             in the THP rows of 2 MiB and more, {:.1}% of the pages were THPs before \
             migrating (below 2 MiB no THP fits)",
            100.0 * thp_seen[0] as f64 / thp_seen[1].max(1) as f64
        ),
        format!(
            "reps: 1 warm-up discarded + {reps} measured ({} for 256 MiB and the scan), arms \
             alternating in order; sizes under {} MiB migrate several fresh buffers per rep \
             ({} MiB in all); ratio = ours ÷ raw paired within a rep, median (min–max) over reps",
            reps.div_ceil(2),
            MIN_BYTES_PER_REP / MIB,
            MIN_BYTES_PER_REP / MIB
        ),
        "migration: GB/s = 1e9 bytes of buffer per second; ours are Dmirror::migrate_to_dev \
         (out = None) and migrate_to_sys on devices made by Device::new_private \
         (copying: Storage::Device, moving: Storage::Host); raw arms use a userfaultfd of \
         their own; dev->sys targets are this benchmark's choice (the sys->dev ones)"
            .to_string(),
        "moving device: a migration moves each page twice (into a staging region at setup, \
         before the driver picks its destination, then into the device page), so 0.5x of one \
         UFFDIO_MOVE is its ceiling; from 2 MiB the THP rows' raw arm moves one PMD per 2 MiB \
         while a migration keeps state per 4 KiB page (migrate_vma's granularity)"
            .to_string(),
    ];
    notes.extend(cpu_notes);
    notes.extend(run_start.noise_note());
    // The devices evict (nothing is left on them) before the Mm goes.
    drop(b);
    Ok(Report {
        bench: "migrate",
        placement,
        notes,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_nonzero_and_distinct() {
        let a: Vec<u64> = (0..1000).map(|p| pattern(7, p)).collect();
        assert!(a.iter().all(|&x| x != 0));
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(b.len(), a.len());
        assert_ne!(pattern(7, 3), pattern(8, 3));
        assert_eq!(pattern_xor(7, 2), pattern(7, 0) ^ pattern(7, 1));
    }

    #[test]
    fn sizes_and_reps() {
        assert_eq!(size_name(512 * KIB), "512 KiB");
        assert_eq!(size_name(256 * MIB), "256 MiB");
        assert_eq!(rounds_for(512 * KIB), 32);
        assert_eq!(rounds_for(16 * MIB), 1);
        assert_eq!(rounds_for(256 * MIB), 1);
        assert_eq!(reps_for(16 * MIB, 5), 5);
        assert_eq!(reps_for(256 * MIB, 5), 3);
        assert_eq!(reps_for(256 * MIB, 1), 1);
        assert!((gbps(2_000_000_000, Duration::from_secs(2)) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn three_arms_rotate() {
        for rep in 0..3 {
            let mut o = order3(rep);
            o.sort_unstable();
            assert_eq!(o, [0, 1, 2]);
        }
        assert_ne!(order3(0)[0], order3(1)[0]);
    }

    #[test]
    fn aligned_buffers_are_aligned_and_filled() {
        let mut b = AlignedBuf::new(64 * KIB, false).expect("buffer");
        assert_eq!(VirtAddr::from_ptr(b.bytes().as_ptr()).get() % PMD, 0);
        assert_eq!(b.bytes().len(), (64 * KIB) as usize);
        b.fill(3);
        let w = u64::from_ne_bytes(b.bytes()[4096..4104].try_into().expect("8 bytes"));
        assert_eq!(w, pattern(3, 1));
    }
}
