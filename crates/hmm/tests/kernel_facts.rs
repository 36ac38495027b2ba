//! The kernel behaviour the library is built on, one test per fact
//! (`DESIGN.md` §9, `reference/limits.md` §5), so that a kernel that stops
//! behaving this way is noticed here rather than as a hang or a silent
//! misbehaviour deep inside the library.
//!
//! Rules every test follows:
//! - It opens its own non-blocking userfaultfd and its own mappings, and
//!   waits for messages by polling with a deadline ([`DEADLINE`]); a missing
//!   message fails the test instead of hanging it.
//! - Anything that can block on the userfaultfd (a fault into a MISSING range,
//!   an madvise/munmap/mremap/fork whose event must be read) runs on a spawned
//!   thread holding its own handle to the memory, while the test thread serves
//!   the userfaultfd; the thread is joined, with a deadline, after resolution.
//!   A failing test drops its userfaultfd while unwinding, and closing a
//!   userfaultfd wakes every thread waiting on it.
//! - Memory is declared before the userfaultfd, so it is dropped after it, and
//!   no spawned thread returns a mapping (a finished thread's result lives in
//!   its `JoinHandle`, which an unwinding test drops first): unmapping a range
//!   still registered with a live `EVENT_UNMAP` userfaultfd waits for a reader
//!   that never comes, on the test thread itself.
//! - The tests that fork or move memory with `mremap` run alone
//!   ([`exclusive`]): a fork copies every test's address space, making their
//!   private pages shared for a while (`UFFDIO_MOVE` then answers `EBUSY`),
//!   and the `mremap` test needs the page above its chunk to stay mapped.
//!
//! Skips (printed with the reason, the test then passes): the THP half of the
//! `PAGEMAP_SCAN` test when no huge page materialises, the hugetlb half of the
//! `PROCMAP_QUERY` test when the default pool has no free page, and the
//! `mremap` cases when the allocator does not hand out a glibc mmapped chunk.

use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hmm::os::mm::{self, Mapping, Prot};
use hmm::os::pagemap::{Category, Entry, Pagemap, ScanFilter};
use hmm::os::process::{ChildExit, fork_and_wait};
use hmm::os::process_vm;
use hmm::os::procmap::{ProcMaps, VmaFlags};
use hmm::os::uffd::{Features, Ioctls, Message, PagefaultFlags, RegisterMode, Uffd};
use hmm::{PAGE_SIZE, VaRange, VirtAddr};
use rustix::io::Errno;

/// How long a test waits for a message or a thread before it fails.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long a thread must stay blocked to count as blocked, and how long the
/// userfaultfd must stay silent to count as silent.
const SETTLE: Duration = Duration::from_millis(50);

const RW: Prot = Prot::READ.union(Prot::WRITE);

static ALONE: RwLock<()> = RwLock::new(());

/// Held by every test that may run beside others.
fn shared() -> RwLockReadGuard<'static, ()> {
    ALONE.read().unwrap_or_else(PoisonError::into_inner)
}

/// Held by a test that forks or moves memory: no other test runs meanwhile.
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    ALONE.write().unwrap_or_else(PoisonError::into_inner)
}

/// A non-blocking userfaultfd granted at least `features`.
fn open(features: Features) -> Uffd {
    let uffd = Uffd::open(features, true).expect("userfaultfd + UFFDIO_API");
    assert!(
        uffd.features().contains(features),
        "asked for {:?}, granted {:?}",
        features.names(),
        uffd.features().names()
    );
    uffd
}

/// The index of the `i`-th `u64` of page `page`, for the `Mapping` accessors.
fn word(page: u64, i: u64) -> usize {
    (page * PAGE_SIZE / 8 + i) as usize
}

/// One page whose `i`-th `u64` is `seed << 32 | i`.
fn pattern(seed: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|i| (seed << 32 | i).to_ne_bytes())
        .collect()
}

fn gettid() -> u32 {
    rustix::thread::gettid()
        .as_raw_nonzero()
        .get()
        .cast_unsigned()
}

/// Polls `uffd` until at least `n` messages arrived; fails after [`DEADLINE`].
fn wait_messages(uffd: &Uffd, n: usize) -> Vec<Message> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    loop {
        uffd.read_messages(&mut out).expect("read(userfaultfd)");
        if out.len() >= n {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} message(s), got {out:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Exactly one message.
fn wait_one(uffd: &Uffd) -> Message {
    let mut msgs = wait_messages(uffd, 1);
    assert_eq!(msgs.len(), 1, "expected one message, got {msgs:?}");
    msgs.pop().expect("one message")
}

/// Waits for `h` to finish while reading (not serving) `uffd`; returns the
/// thread's result and every message read meanwhile. Fails after [`DEADLINE`].
fn join_reading<T>(uffd: &Uffd, h: JoinHandle<T>) -> (T, Vec<Message>) {
    let deadline = Instant::now() + DEADLINE;
    let mut msgs = Vec::new();
    while !h.is_finished() {
        uffd.read_messages(&mut msgs).expect("read(userfaultfd)");
        assert!(
            Instant::now() < deadline,
            "thread still blocked; messages read: {msgs:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let v = h.join().expect("the spawned thread panicked");
    uffd.read_messages(&mut msgs).expect("read(userfaultfd)");
    (v, msgs)
}

/// Joins `h`, which must finish without any message on `uffd`.
fn join_quiet<T>(uffd: &Uffd, h: JoinHandle<T>) -> T {
    let (v, msgs) = join_reading(uffd, h);
    assert!(msgs.is_empty(), "unexpected userfaultfd messages: {msgs:?}");
    v
}

/// `h` is still blocked after [`SETTLE`].
fn assert_blocked<T>(h: &JoinHandle<T>, what: &str) {
    thread::sleep(SETTLE);
    assert!(
        !h.is_finished(),
        "{what} returned before the userfaultfd answered"
    );
}

/// Nothing arrives on `uffd` for [`SETTLE`].
fn assert_quiet(uffd: &Uffd) {
    let end = Instant::now() + SETTLE;
    let mut msgs = Vec::new();
    while Instant::now() < end {
        uffd.read_messages(&mut msgs).expect("read(userfaultfd)");
        thread::sleep(Duration::from_millis(1));
    }
    assert!(msgs.is_empty(), "unexpected userfaultfd messages: {msgs:?}");
}

/// A page fault message: (address, flags, tid).
fn pagefault(m: Message) -> (VirtAddr, PagefaultFlags, u32) {
    match m {
        Message::Pagefault {
            address,
            flags,
            tid,
        } => (address, flags, tid),
        other => panic!("expected a page fault, got {other:?}"),
    }
}

/// One pagemap entry.
fn entry(pm: &Pagemap, page: VaRange) -> Entry {
    let mut e = [Entry(0)];
    pm.read_entries(page, &mut e).expect("pread(pagemap)");
    e[0]
}

/// A glibc `malloc` chunk that is a mapping of its own: the one way the safe
/// `os` API offers to move registered memory with `mremap`, because
/// `Mapping::remap(false)` is a same-size `MREMAP_MAYMOVE`, which the kernel
/// leaves in place, and `Mapping::remap(true)` passes no `new_address` to the
/// variadic `mremap`, so `MREMAP_DONTUNMAP` reads whatever is in the register
/// and usually fails with EINVAL.
///
/// glibc serves a request above its largest mmap threshold (32 MiB on 64-bit)
/// with a private anonymous mapping: a 16-byte header (`prev_size`, then
/// `size | IS_MMAPPED`) and the data. `realloc` grows it with
/// `mremap(MREMAP_MAYMOVE)`, which must move it when the page above is taken.
struct MallocChunk {
    buf: Arc<Mutex<Vec<u8>>>,
    /// The chunk's mapping, header included.
    range: VaRange,
}

impl MallocChunk {
    const CONTENTS: &[u8] = b"kernel facts";

    /// A chunk of `len` bytes, or why there cannot be one here.
    fn new(len: usize) -> Result<Self, String> {
        let mut v = Vec::<u8>::with_capacity(len);
        v.extend_from_slice(Self::CONTENTS);
        let ptr = v.as_ptr() as u64;
        if ptr % PAGE_SIZE != 16 {
            return Err(format!(
                "a {len}-byte allocation at {ptr:#x} is not a glibc mmapped chunk"
            ));
        }
        let mut size = [0u8; 8];
        process_vm::read(VirtAddr(ptr - 8), &mut size)
            .map_err(|e| format!("reading the chunk header at {ptr:#x}: {e}"))?;
        let size = u64::from_ne_bytes(size);
        if size & 2 == 0 || (size & !7) < len as u64 + 16 {
            return Err(format!(
                "header {size:#x} at {ptr:#x} is not an mmapped {len}-byte chunk"
            ));
        }
        let range = VaRange::from_len(VirtAddr(ptr - 16), size & !7).map_err(|e| e.to_string())?;
        let maps = ProcMaps::open().map_err(|e| format!("open /proc/self/maps: {e}"))?;
        match maps.query(range.end(), false) {
            Ok(Some(_)) => {}
            other => {
                return Err(format!(
                    "the page above the chunk is free ({other:?}): it may grow in place"
                ));
            }
        }
        Ok(Self {
            buf: Arc::new(Mutex::new(v)),
            range,
        })
    }

    /// Doubles the capacity on another thread (its `mremap` waits until the
    /// events are read); the thread returns the chunk's new start, or `None`
    /// when it grew in place.
    fn grow(&self) -> JoinHandle<Option<VirtAddr>> {
        let buf = Arc::clone(&self.buf);
        let old = self.range.start();
        thread::spawn(move || {
            let mut v = buf.lock().unwrap_or_else(PoisonError::into_inner);
            let more = 2 * v.capacity() - v.len();
            v.reserve_exact(more);
            let new = VirtAddr(v.as_ptr() as u64 - 16);
            (new != old).then_some(new)
        })
    }

    fn contents(&self) -> Vec<u8> {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Fact 1: a WP-only registration costs nothing on first touch yet delivers
/// every non-cooperative event: REMOVE, UNMAP, REMAP and FORK, each holding
/// its caller until the monitor reads it.
#[test]
fn wp_only_registration_delivers_events_and_no_first_touch_faults() {
    let _g = exclusive();
    let m = Arc::new(Mapping::anonymous(16 * PAGE_SIZE, RW).expect("mmap"));
    m.no_hugepage();
    let chunk = MallocChunk::new(40 << 20);
    let uffd = open(
        Features::EVENT_REMOVE
            | Features::EVENT_UNMAP
            | Features::EVENT_REMAP
            | Features::EVENT_FORK,
    );
    let ioctls = uffd
        .register(m.range(), RegisterMode::WP)
        .expect("register WP");
    assert!(ioctls.contains(Ioctls::WRITEPROTECT), "{ioctls:?}");

    // First-touch writes and reads of absent pages never reach the handler.
    let m2 = Arc::clone(&m);
    let reads = join_quiet(
        &uffd,
        thread::spawn(move || {
            for p in 0..8 {
                m2.write_u64(word(p, 0), 0x100 + p);
            }
            (8..12).map(|p| m2.read_u64(word(p, 0))).collect::<Vec<_>>()
        }),
    );
    assert_eq!(reads, [0; 4]);
    assert_eq!(m.read_u64(word(3, 0)), 0x103, "page 3 is present now");

    // MADV_DONTNEED: REMOVE with the exact range, and the pages are dropped.
    let part = m.pages(2, 4);
    let h = thread::spawn(move || mm::dontneed(part));
    assert_blocked(&h, "madvise(DONTNEED)");
    match wait_one(&uffd) {
        Message::Remove { start, end } => assert_eq!((start, end), (part.start(), part.end())),
        other => panic!("expected REMOVE of {part:?}, got {other:?}"),
    }
    join_quiet(&uffd, h).expect("madvise(DONTNEED)");
    let m2 = Arc::clone(&m);
    let after = join_quiet(
        &uffd,
        thread::spawn(move || (m2.read_u64(word(2, 0)), m2.read_u64(word(6, 0)))),
    );
    assert_eq!(after, (0, 0x106), "DONTNEED dropped pages 2..6 only");

    // munmap of part of the range: UNMAP with the exact range.
    let part = m.pages(14, 2);
    let m2 = Arc::clone(&m);
    let h = thread::spawn(move || m2.unmap_part(part));
    assert_blocked(&h, "munmap");
    match wait_one(&uffd) {
        Message::Unmap { start, end } => assert_eq!((start, end), (part.start(), part.end())),
        other => panic!("expected UNMAP of {part:?}, got {other:?}"),
    }
    join_quiet(&uffd, h).expect("munmap");

    // A moving mremap: REMAP with from, to and len (then UNMAP of the old
    // place, checked in `moving_mremap_delivers_remap_then_unmap_and_the_registration_follows`).
    match &chunk {
        Ok(chunk) => {
            uffd.register(chunk.range, RegisterMode::WP)
                .expect("register WP");
            let h = chunk.grow();
            assert_blocked(&h, "mremap");
            let (to, msgs) = join_reading(&uffd, h);
            let to = to.expect("the chunk moved");
            let old = chunk.range;
            match msgs.first() {
                Some(Message::Remap { from, to: t, len }) => {
                    assert_eq!((*from, *t, *len), (old.start(), to, old.len()));
                }
                _ => panic!("expected REMAP {old:?} -> {to:?} first, got {msgs:?}"),
            }
            assert_eq!(msgs.len(), 2, "REMAP then UNMAP of the old place: {msgs:?}");
        }
        Err(why) => eprintln!("SKIP the REMAP part of this test: {why}"),
    }

    // fork: FORK carrying a new userfaultfd for the child.
    let h = thread::spawn(|| fork_and_wait(|| 0));
    assert_blocked(&h, "fork");
    let msg = wait_one(&uffd);
    let child_exit = join_quiet(&uffd, h).expect("fork");
    assert_eq!(child_exit, ChildExit::Code(0));
    match msg {
        Message::Fork { child } => {
            use std::os::fd::{AsFd, AsRawFd};
            assert_ne!(child.as_raw_fd(), uffd.as_fd().as_raw_fd());
            let link = std::fs::read_link(format!("/proc/self/fd/{}", child.as_raw_fd()))
                .expect("readlink of the child's userfaultfd");
            assert_eq!(link.to_string_lossy(), "anon_inode:[userfaultfd]");
        }
        other => panic!("expected FORK, got {other:?}"),
    }
    assert_quiet(&uffd);
}

/// Fact 2: a WP-registered sub-range can be registered again as MISSING|WP;
/// the VMA splits at the sub-range, and only the sub-range reports missing pages.
#[test]
fn wp_subrange_reregisters_as_missing_and_splits_the_vma() {
    let _g = shared();
    let m = Arc::new(Mapping::anonymous(8 * PAGE_SIZE, RW).expect("mmap"));
    m.no_hugepage();
    let maps = ProcMaps::open().expect("open /proc/self/maps");
    let uffd = open(Features::empty());
    uffd.register(m.range(), RegisterMode::WP)
        .expect("register WP");
    let sub = m.pages(2, 3);
    let ioctls = uffd
        .register(sub, RegisterMode::MISSING | RegisterMode::WP)
        .expect("register MISSING|WP inside a WP range");
    assert!(
        ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WRITEPROTECT),
        "{ioctls:?}"
    );

    let bounds = |a: VirtAddr| {
        let v = maps.query(a, false).expect("PROCMAP_QUERY").expect("a VMA");
        (v.start, v.end)
    };
    assert_eq!(
        bounds(sub.start()),
        (sub.start(), sub.end()),
        "the MISSING|WP part is one VMA"
    );
    assert_eq!(
        bounds(m.addr()),
        (m.addr(), sub.start()),
        "WP part before it"
    );
    assert_eq!(
        bounds(sub.end()),
        (sub.end(), m.range().end()),
        "WP part after it"
    );

    // Outside the sub-range a first touch is silent; inside it faults.
    let m2 = Arc::clone(&m);
    assert_eq!(
        join_quiet(&uffd, thread::spawn(move || m2.read_u64(word(0, 0)))),
        0
    );
    let m2 = Arc::clone(&m);
    let h = thread::spawn(move || m2.read_u64(word(3, 0)));
    let (addr, _, _) = pagefault(wait_one(&uffd));
    assert_eq!(addr, m.pages(3, 1).start());
    uffd.zeropage(m.pages(3, 1), false)
        .expect("UFFDIO_ZEROPAGE");
    assert_eq!(join_quiet(&uffd, h), 0);
}

/// Fact 3: MISSING faults carry the page address, the faulting thread and the
/// access kind; COPY and ZEROPAGE resolve and wake; COPY over a present page
/// is EEXIST.
#[test]
fn missing_faults_are_reported_and_resolved_by_copy_and_zeropage() {
    let _g = shared();
    let m = Arc::new(Mapping::anonymous(8 * PAGE_SIZE, RW).expect("mmap"));
    m.no_hugepage();
    let uffd = open(Features::THREAD_ID);
    uffd.register(m.range(), RegisterMode::MISSING)
        .expect("register MISSING");

    // A read fault, resolved with COPY.
    let m2 = Arc::clone(&m);
    let h = thread::spawn(move || (gettid(), m2.read_u64(word(1, 5))));
    let (addr, flags, tid) = pagefault(wait_one(&uffd));
    assert_eq!(addr, m.pages(1, 1).start(), "page-aligned fault address");
    assert_eq!(flags, PagefaultFlags::empty(), "a read fault");
    assert_ne!(tid, 0, "THREAD_ID fills the tid");
    assert_blocked(&h, "the faulting read");
    uffd.copy(addr, &pattern(1), false).expect("UFFDIO_COPY");
    let (reader_tid, value) = join_quiet(&uffd, h);
    assert_eq!(tid, reader_tid, "the message names the faulting thread");
    assert_eq!(value, 1 << 32 | 5, "the woken reader sees the copied data");

    // A write fault carries WRITE; the write lands on the copied page.
    let m2 = Arc::clone(&m);
    let h = thread::spawn(move || m2.write_u64(word(2, 7), 0xdead_beef));
    let (addr, flags, _) = pagefault(wait_one(&uffd));
    assert_eq!(addr, m.pages(2, 1).start());
    assert_eq!(flags, PagefaultFlags::WRITE, "a write fault");
    uffd.copy(addr, &pattern(2), false).expect("UFFDIO_COPY");
    join_quiet(&uffd, h);
    assert_eq!(
        m.read_u64(word(2, 7)),
        0xdead_beef,
        "the retried write landed"
    );
    assert_eq!(m.read_u64(word(2, 8)), 2 << 32 | 8, "over the copied data");

    // A read fault resolved with ZEROPAGE reads zeros.
    let m2 = Arc::clone(&m);
    let h = thread::spawn(move || m2.read_u64(word(3, 9)));
    let (addr, flags, _) = pagefault(wait_one(&uffd));
    assert_eq!(
        (addr, flags),
        (m.pages(3, 1).start(), PagefaultFlags::empty())
    );
    uffd.zeropage(m.pages(3, 1), false)
        .expect("UFFDIO_ZEROPAGE");
    assert_eq!(join_quiet(&uffd, h), 0);

    // COPY over a present page: EEXIST, and the page keeps its data.
    assert_eq!(
        uffd.copy(m.pages(1, 1).start(), &pattern(9), false),
        Err(Errno::EXIST)
    );
    assert_eq!(m.read_u64(word(1, 5)), 1 << 32 | 5);
    assert_quiet(&uffd);
}

/// Fact 4: `process_vm_readv` and `MADV_POPULATE_READ/WRITE` of an absent page
/// in a MISSING range wait for the handler, then succeed.
#[test]
fn process_vm_read_and_populate_wait_for_the_handler() {
    let _g = shared();
    let m = Arc::new(Mapping::anonymous(4 * PAGE_SIZE, RW).expect("mmap"));
    m.no_hugepage();
    let uffd = open(Features::THREAD_ID);
    uffd.register(m.range(), RegisterMode::MISSING)
        .expect("register MISSING");

    let page = m.pages(0, 1);
    let h = thread::spawn(move || {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let res = process_vm::read(page.start(), &mut buf);
        (gettid(), res, buf)
    });
    let (addr, flags, tid) = pagefault(wait_one(&uffd));
    assert_eq!((addr, flags), (page.start(), PagefaultFlags::empty()));
    assert_blocked(&h, "process_vm_readv");
    uffd.copy(addr, &pattern(4), false).expect("UFFDIO_COPY");
    let (reader_tid, res, buf) = join_quiet(&uffd, h);
    assert_eq!(tid, reader_tid, "the fault is raised in the calling thread");
    assert_eq!(res, Ok(PAGE_SIZE as usize));
    assert_eq!(buf, pattern(4));

    let page = m.pages(1, 1);
    let h = thread::spawn(move || mm::populate(page, false));
    let (addr, flags, _) = pagefault(wait_one(&uffd));
    assert_eq!((addr, flags), (page.start(), PagefaultFlags::empty()));
    assert_blocked(&h, "MADV_POPULATE_READ");
    uffd.copy(addr, &pattern(5), false).expect("UFFDIO_COPY");
    assert_eq!(join_quiet(&uffd, h), Ok(()));
    assert_eq!(m.read_u64(word(1, 3)), 5 << 32 | 3);

    let page = m.pages(2, 1);
    let h = thread::spawn(move || mm::populate(page, true));
    let (addr, flags, _) = pagefault(wait_one(&uffd));
    assert_eq!((addr, flags), (page.start(), PagefaultFlags::WRITE));
    assert_blocked(&h, "MADV_POPULATE_WRITE");
    uffd.copy(addr, &pattern(6), false).expect("UFFDIO_COPY");
    assert_eq!(join_quiet(&uffd, h), Ok(()));
    assert_eq!(m.read_u64(word(2, 3)), 6 << 32 | 3);
    assert_quiet(&uffd);
}

/// Fact 5: `UFFDIO_MOVE` needs the destination registered with the calling
/// userfaultfd (EINVAL otherwise); it moves the page (the source becomes
/// absent); an absent source page is ENOENT unless holes are allowed; a
/// present destination page is EEXIST.
///
/// On 6.18 the *source* need not be registered: an unregistered source, or
/// one registered with another userfaultfd, moves as well: only the
/// destination's userfaultfd context is checked. `DESIGN.md` §9 says both must be
/// registered; the library registers its device pools anyway, so it is safe
/// either way, and this test records what the kernel really does.
#[test]
fn uffdio_move_needs_the_destination_registered_with_the_same_uffd() {
    let _g = shared();
    let dst = Mapping::anonymous(4 * PAGE_SIZE, RW).expect("mmap");
    let src = Mapping::anonymous(4 * PAGE_SIZE, RW).expect("mmap");
    let unreg = Mapping::anonymous(2 * PAGE_SIZE, RW).expect("mmap");
    let other = Mapping::anonymous(2 * PAGE_SIZE, RW).expect("mmap");
    for m in [&dst, &src, &unreg, &other] {
        m.no_hugepage();
    }
    for p in 0..2 {
        src.write_u64(word(p, 0), 0x5000 + p);
        src.write_u64(word(p, 511), 0x5100 + p);
    }
    unreg.write_u64(word(0, 0), 0x7000);
    other.write_u64(word(0, 0), 0x8000);
    let pm = Pagemap::open().expect("open pagemap");
    let uffd = open(Features::MOVE);
    let uffd2 = open(Features::MOVE);
    let ioctls = uffd
        .register(dst.range(), RegisterMode::MISSING)
        .expect("register dst");
    assert!(ioctls.contains(Ioctls::MOVE), "{ioctls:?}");
    uffd.register(src.range(), RegisterMode::MISSING)
        .expect("register src");
    uffd2
        .register(other.range(), RegisterMode::MISSING)
        .expect("register other");

    // The destination must be registered with the calling userfaultfd.
    let page = |m: &Mapping, p: u64| m.pages(p, 1).start();
    assert_eq!(
        uffd.move_pages(page(&unreg, 1), page(&src, 0), PAGE_SIZE, false, false),
        Err(Errno::INVAL),
        "unregistered destination"
    );
    assert_eq!(
        uffd.move_pages(page(&other, 1), page(&src, 0), PAGE_SIZE, false, false),
        Err(Errno::INVAL),
        "destination registered with another userfaultfd"
    );
    assert!(
        entry(&pm, src.pages(0, 1)).present(),
        "failed moves left the source in place"
    );

    // Registered to registered: the page moves.
    assert_eq!(
        uffd.move_pages(page(&dst, 0), page(&src, 0), PAGE_SIZE, false, false),
        Ok(PAGE_SIZE)
    );
    assert!(entry(&pm, dst.pages(0, 1)).present());
    assert!(
        !entry(&pm, src.pages(0, 1)).present(),
        "the source page is gone"
    );
    assert_eq!(
        (dst.read_u64(word(0, 0)), dst.read_u64(word(0, 511))),
        (0x5000, 0x5100)
    );

    // The source's registration does not matter (see above).
    assert_eq!(
        uffd.move_pages(page(&dst, 1), page(&unreg, 0), PAGE_SIZE, false, false),
        Ok(PAGE_SIZE),
        "unregistered source"
    );
    assert_eq!(dst.read_u64(word(1, 0)), 0x7000);
    assert!(!entry(&pm, unreg.pages(0, 1)).present());
    assert_eq!(
        uffd.move_pages(page(&dst, 3), page(&other, 0), PAGE_SIZE, false, false),
        Ok(PAGE_SIZE),
        "source registered with another userfaultfd"
    );
    assert_eq!(dst.read_u64(word(3, 0)), 0x8000);

    // An absent source page: ENOENT, or nothing moved with ALLOW_SRC_HOLES.
    let (s2, d2) = (page(&src, 2), page(&dst, 2));
    assert_eq!(
        uffd.move_pages(d2, s2, PAGE_SIZE, false, false),
        Err(Errno::NOENT),
        "absent source"
    );
    assert_eq!(
        uffd.move_pages(d2, s2, PAGE_SIZE, false, true),
        Ok(PAGE_SIZE),
        "hole skipped"
    );
    assert!(
        !entry(&pm, dst.pages(2, 1)).present(),
        "a hole moves nothing"
    );

    // A present destination page: EEXIST, and the source stays.
    assert_eq!(
        uffd.move_pages(page(&dst, 0), page(&src, 1), PAGE_SIZE, false, false),
        Err(Errno::EXIST),
        "present destination"
    );
    assert!(entry(&pm, src.pages(1, 1)).present());
    assert_eq!(dst.read_u64(word(0, 0)), 0x5000);
    assert_quiet(&uffd);
}

/// Fact 6: `UFFDIO_WRITEPROTECT` of present pages makes a write fault with WP
/// (pagemap shows the uffd-wp bit); un-protecting without DONTWAKE wakes the
/// writer and the write lands.
#[test]
fn writeprotect_faults_writes_and_unprotect_wakes_them() {
    let _g = shared();
    let m = Arc::new(Mapping::anonymous(4 * PAGE_SIZE, RW).expect("mmap"));
    m.no_hugepage();
    for p in 0..4 {
        m.write_u64(word(p, 0), 0x600 + p);
    }
    let pm = Pagemap::open().expect("open pagemap");
    let uffd = open(Features::PAGEFAULT_FLAG_WP | Features::THREAD_ID);
    uffd.register(m.range(), RegisterMode::MISSING | RegisterMode::WP)
        .expect("register");
    let wp = m.pages(0, 2);
    uffd.writeprotect(wp, true, false)
        .expect("UFFDIO_WRITEPROTECT");
    let mut e = [Entry(0); 4];
    pm.read_entries(m.range(), &mut e).expect("pread(pagemap)");
    let wp_bits: Vec<bool> = e.iter().map(|e| e.uffd_wp()).collect();
    assert_eq!(wp_bits, [true, true, false, false], "{e:x?}");

    // Reads of a protected page do not fault.
    assert_eq!(m.read_u64(word(1, 0)), 0x601);
    let m2 = Arc::clone(&m);
    let h = thread::spawn(move || {
        m2.write_u64(word(1, 0), 0x6666);
        gettid()
    });
    let (addr, flags, tid) = pagefault(wait_one(&uffd));
    assert_eq!(addr, m.pages(1, 1).start());
    assert!(
        flags.contains(PagefaultFlags::WP | PagefaultFlags::WRITE),
        "{flags:?}"
    );
    assert_blocked(&h, "the protected write");
    assert_eq!(m.read_u64(word(1, 0)), 0x601, "the write waits");
    uffd.writeprotect(m.pages(1, 1), false, false)
        .expect("UFFDIO_WRITEPROTECT off");
    assert_eq!(join_quiet(&uffd, h), tid);
    assert_eq!(m.read_u64(word(1, 0)), 0x6666, "the write landed");
    pm.read_entries(m.range(), &mut e).expect("pread(pagemap)");
    let wp_bits: Vec<bool> = e.iter().map(|e| e.uffd_wp()).collect();
    assert_eq!(wp_bits, [true, false, false, false], "{e:x?}");
    assert_quiet(&uffd);
}

/// Fact 7: the event codes are the ones the decoder uses, and a moving
/// `mremap` of a registered range delivers REMAP then UNMAP of the old place;
/// the registration follows the move (later events name the new addresses).
///
/// `DESIGN.md` §9 records this order for `mremap(MAYMOVE|FIXED)` onto another
/// registered mapping. `Mapping::remap` can express neither `MREMAP_FIXED` nor,
/// today, any move at all (see [`MallocChunk`]), so the move here is glibc's
/// `realloc` growing an mmapped chunk: a plain `mremap(MREMAP_MAYMOVE)`.
#[test]
fn moving_mremap_delivers_remap_then_unmap_and_the_registration_follows() {
    let _g = exclusive(); // nothing may unmap the chunk's neighbour meanwhile
    {
        use linux_raw_sys::general as g;
        let codes = [
            g::UFFD_EVENT_PAGEFAULT,
            g::UFFD_EVENT_FORK,
            g::UFFD_EVENT_REMAP,
            g::UFFD_EVENT_REMOVE,
            g::UFFD_EVENT_UNMAP,
        ];
        assert_eq!(codes, [0x12, 0x13, 0x14, 0x15, 0x16]);
    }
    let chunk = match MallocChunk::new(40 << 20) {
        Ok(c) => c,
        Err(why) => {
            eprintln!("SKIP moving_mremap_delivers_remap_then_unmap: {why}");
            return;
        }
    };
    let uffd = open(Features::EVENT_REMAP | Features::EVENT_REMOVE | Features::EVENT_UNMAP);
    uffd.register(chunk.range, RegisterMode::WP)
        .expect("register WP");

    let old = chunk.range;
    let h = chunk.grow();
    assert_blocked(&h, "mremap");
    let (to, msgs) = join_reading(&uffd, h);
    let to = to.expect("the chunk moved");
    assert_eq!(msgs.len(), 2, "REMAP then UNMAP: {msgs:?}");
    match (&msgs[0], &msgs[1]) {
        (Message::Remap { from, to: t, len }, Message::Unmap { start, end }) => {
            assert_eq!((*from, *t, *len), (old.start(), to, old.len()));
            assert_eq!((*start, *end), (old.start(), old.end()));
        }
        _ => panic!("expected REMAP {old:?} -> {to:?} then UNMAP {old:?}, got {msgs:?}"),
    }
    assert_eq!(chunk.contents(), b"kernel facts", "the data moved along");

    // The registration moved too: DONTNEED of the new place (past the chunk
    // header page, which glibc still needs) raises REMOVE with new addresses.
    let part = to
        .checked_add_pages(1)
        .and_then(|s| VaRange::from_pages(s, 2))
        .expect("range");
    let h = thread::spawn(move || mm::dontneed(part));
    match wait_one(&uffd) {
        Message::Remove { start, end } => assert_eq!((start, end), (part.start(), part.end())),
        other => panic!("expected REMOVE of the moved range {part:?}, got {other:?}"),
    }
    join_quiet(&uffd, h).expect("madvise(DONTNEED)");
    assert_quiet(&uffd);
}

/// Fact 8: the `PAGEMAP_SCAN` loop survives the 6.18 stale `walk_end`
/// (exactly one region per present page, no duplicates), and a THP-backed
/// 2 MiB region reports HUGE.
#[test]
fn pagemap_scan_loop_and_huge_category() {
    let _g = shared();
    let len = 64 << 20;
    let m = Mapping::anonymous(len, RW).expect("mmap");
    m.no_hugepage();
    let npages = len / PAGE_SIZE;
    for p in (0..npages).step_by(2) {
        m.write_u64(word(p, 0), p + 1);
    }
    let pm = Pagemap::open().expect("open pagemap");
    let filter = ScanFilter {
        required: Category::PRESENT,
        returned: Category::PRESENT,
        ..Default::default()
    };
    let mut out = Vec::new();
    pm.scan(m.range(), &filter, &mut out).expect("PAGEMAP_SCAN");
    assert_eq!(out.len() as u64, npages / 2, "one region per present page");
    for (i, r) in out.iter().enumerate() {
        let start = m.addr().get() + 2 * i as u64 * PAGE_SIZE;
        assert_eq!(
            (r.start.get(), r.end.get()),
            (start, start + PAGE_SIZE),
            "region {i}"
        );
        assert_eq!(r.categories, Category::PRESENT);
    }
    drop(m);

    let huge = 2 << 20;
    let t = Mapping::anonymous_aligned(huge, huge, RW).expect("aligned mmap");
    mm::hugepage(t.range(), true).expect("MADV_HUGEPAGE");
    t.write_u64(0, 42);
    let anon_huge_kb = smaps_anon_huge_kb(t.addr());
    if anon_huge_kb < huge / 1024 {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_else(|e| format!("unreadable ({e})"));
        eprintln!(
            "SKIP huge part of pagemap_scan_loop_and_huge_category: the MADV_HUGEPAGE mapping \
             got AnonHugePages {anon_huge_kb} kB, not 2048 kB (THP enabled: {})",
            thp.trim()
        );
        return;
    }
    let filter = ScanFilter {
        required: Category::PRESENT,
        returned: Category::PRESENT | Category::HUGE,
        ..Default::default()
    };
    let mut out = Vec::new();
    pm.scan(t.range(), &filter, &mut out).expect("PAGEMAP_SCAN");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((out[0].start, out[0].end), (t.addr(), t.range().end()));
    assert_eq!(out[0].categories, Category::PRESENT | Category::HUGE);
}

/// `AnonHugePages` (kB) of the VMA holding `addr`, from `/proc/self/smaps`.
fn smaps_anon_huge_kb(addr: VirtAddr) -> u64 {
    smaps_field(addr, "AnonHugePages:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("AnonHugePages value")
}

/// The value of the `smaps` line starting with `field` in the entry covering
/// `addr`.
fn smaps_field(addr: VirtAddr, field: &str) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read smaps");
    let mut inside = false;
    for line in smaps.lines() {
        let header = line
            .split_once(' ')
            .and_then(|(r, _)| r.split_once('-'))
            .and_then(|(s, e)| {
                Some((
                    u64::from_str_radix(s, 16).ok()?,
                    u64::from_str_radix(e, 16).ok()?,
                ))
            });
        if let Some((s, e)) = header {
            inside = s <= addr.get() && addr.get() < e;
        } else if inside && let Some(v) = line.strip_prefix(field) {
            return v.trim().to_owned();
        }
    }
    panic!("no smaps entry with {field} for {addr}");
}

/// Fact 9: `PROCMAP_QUERY` reports the hugetlb page size, the SHARED flag of
/// shared anonymous memory, and inode 0 for private anonymous memory.
#[test]
fn procmap_query_page_size_shared_and_inode() {
    let _g = shared();
    let private = Mapping::anonymous(2 * PAGE_SIZE, RW).expect("mmap");
    let shm = Mapping::shared_anonymous(2 * PAGE_SIZE, RW).expect("mmap shared");
    let maps = ProcMaps::open().expect("open /proc/self/maps");

    let v = maps
        .query(private.addr(), false)
        .expect("PROCMAP_QUERY")
        .expect("VMA");
    assert_eq!(v.inode, 0, "private anonymous memory has no inode");
    assert_eq!(v.flags, VmaFlags::READ | VmaFlags::WRITE);
    assert_eq!(v.page_size, PAGE_SIZE);
    assert!(v.is_private_anon());

    let v = maps
        .query(shm.addr(), false)
        .expect("PROCMAP_QUERY")
        .expect("VMA");
    assert_eq!((v.start, v.end), (shm.addr(), shm.range().end()));
    assert_eq!(v.flags, VmaFlags::READ | VmaFlags::WRITE | VmaFlags::SHARED);
    assert_ne!(v.inode, 0, "shared anonymous memory is a shmem file");
    assert_eq!(v.page_size, PAGE_SIZE);
    assert!(!v.is_private_anon());

    let Some(huge) = mm::default_hugetlb_size() else {
        eprintln!("SKIP hugetlb part of procmap_query: no Hugepagesize in /proc/meminfo");
        return;
    };
    let h = match Mapping::hugetlb(huge, RW) {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "SKIP hugetlb part of procmap_query: mmap(MAP_HUGETLB, {huge}) failed with {e} \
                 (no free pages in the default pool; root can reserve some through \
                 /proc/sys/vm/nr_hugepages)"
            );
            return;
        }
    };
    let v = maps
        .query(h.addr(), false)
        .expect("PROCMAP_QUERY")
        .expect("VMA");
    assert_eq!((v.start, v.end), (h.addr(), h.range().end()));
    assert_eq!(
        v.page_size, huge,
        "the VMA's page size is the hugetlb page size"
    );
    assert!(!v.flags.contains(VmaFlags::SHARED));
}

/// The `VmFlags` of the `smaps` entry covering `addr`.
fn smaps_vmflags(addr: VirtAddr) -> String {
    smaps_field(addr, "VmFlags:")
}

/// Fact: `mremap(MAYMOVE|FIXED)` onto a destination registered with the same
/// userfaultfd delivers the destination's `UNMAP` first, then `REMAP`, then
/// (without `MREMAP_DONTUNMAP`) the `UNMAP` of the old range, which by then
/// may hold another mapping: the kernel freed it before the events went out.
/// With `MREMAP_DONTUNMAP` no `UNMAP` of the old range comes, and the old
/// range stays registered.
#[test]
fn mremap_onto_a_registered_destination_event_order() {
    let _g = exclusive();
    for dontunmap in [true, false] {
        let mut src = Mapping::anonymous(4 * PAGE_SIZE, RW).expect("mmap");
        let dst = Mapping::anonymous(4 * PAGE_SIZE, RW).expect("mmap");
        src.no_hugepage();
        dst.no_hugepage();
        src.write_u64(word(0, 0), 0xA11);
        let uffd = open(Features::EVENT_REMAP | Features::EVENT_REMOVE | Features::EVENT_UNMAP);
        uffd.register(src.range(), RegisterMode::WP)
            .expect("register src");
        uffd.register(dst.range(), RegisterMode::WP)
            .expect("register dst");
        let (old, new) = (src.range(), dst.range());
        let h = thread::spawn(move || {
            let kept = src.remap_onto(dst, dontunmap);
            (src, kept)
        });
        let ((src, kept), msgs) = join_reading(&uffd, h);
        // Closing the userfaultfd before anything is unmapped: an unmap of a
        // registered range waits for its event to be read.
        let old_flags = dontunmap.then(|| smaps_vmflags(old.start()));
        drop(uffd);
        let kept = kept.expect("mremap");
        assert_eq!(src.range(), new, "the mapping moved onto the destination");
        assert_eq!(src.read_u64(word(0, 0)), 0xA11, "the data moved along");
        let mut want = vec![
            Message::Unmap {
                start: new.start(),
                end: new.end(),
            },
            Message::Remap {
                from: old.start(),
                to: new.start(),
                len: old.len(),
            },
        ];
        if !dontunmap {
            want.push(Message::Unmap {
                start: old.start(),
                end: old.end(),
            });
        }
        assert_eq!(
            format!("{msgs:?}"),
            format!("{want:?}"),
            "dontunmap {dontunmap}"
        );
        if let Some(flags) = old_flags {
            eprintln!("MREMAP_DONTUNMAP: the old range's VmFlags: {flags}");
        }
        drop(kept);
        drop(src);
    }
}

/// Fact: `UFFDIO_WRITEPROTECT` clearing one page, under the mmap *read*
/// lock, tells whether the VMA there is registered in WP mode (`ENOENT` if
/// not) and whether an address-space event of the userfaultfd is in flight
/// (`EAGAIN` from before an unmap of a registered range until its event is
/// read). The library's registration fast path rests on both: a VMA it
/// registered, probed this way, needs no `UFFDIO_REGISTER` (which takes the
/// mmap lock for writing).
#[test]
fn writeprotect_clear_probes_registration_and_events_in_flight() {
    let _g = exclusive();
    let a = Mapping::anonymous(2 * PAGE_SIZE, RW).expect("mmap");
    let b = Mapping::anonymous(PAGE_SIZE, RW).expect("mmap");
    let c = Mapping::anonymous(PAGE_SIZE, RW).expect("mmap");
    a.write_u64(word(0, 0), 0xA);
    let uffd = open(Features::EVENT_UNMAP | Features::EVENT_REMOVE);
    uffd.register(a.range(), RegisterMode::WP)
        .expect("register a");
    uffd.register(b.range(), RegisterMode::WP)
        .expect("register b");
    let probe = |m: &Mapping| uffd.writeprotect(m.pages(0, 1), false, true);
    assert_eq!(probe(&a), Ok(()), "a registered VMA, nothing in flight");
    assert_eq!(probe(&c), Err(Errno::NOENT), "an unregistered VMA");
    // The unmap of another registered range waits for its event to be
    // read; until then every probe of the userfaultfd answers EAGAIN.
    let h = thread::spawn(move || drop(b));
    assert_blocked(&h, "munmap of a registered range");
    assert_eq!(probe(&a), Err(Errno::AGAIN), "an UNMAP event is unread");
    assert!(matches!(wait_one(&uffd), Message::Unmap { .. }));
    join_quiet(&uffd, h);
    assert_eq!(probe(&a), Ok(()), "the event was read");
    // The probe changed nothing the program can see.
    assert_eq!(a.read_u64(word(0, 0)), 0xA);
    a.write_u64(word(0, 0), 0xB);
    assert_eq!(a.read_u64(word(0, 0)), 0xB);
    assert_quiet(&uffd);
}
