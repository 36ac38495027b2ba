//! Range fault: the per-entry decision table, faulting, errors that leave the
//! input intact, and bad input answered with typed errors.

mod common;

use std::sync::Arc;

use common::{Recorder, fault, whole_space};
use hmm::addr::TASK_SIZE;
use hmm::notifier::{Event, NotifierRange};
use hmm::os::mm::{Mapping, PROT_NONE, Prot, mprotect};
use hmm::{Error, HmmPfn, HmmRange, Mm, PAGE_SIZE, VaRange, VirtAddr};

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn snapshot_reports_each_page_state() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    // 0 absent | 1 written | 2 zero page | 3 read-only with data | 4 PROT_NONE | 5 hole
    let m = Mapping::anonymous(6 * PAGE_SIZE, rw()).expect("mmap");
    m.no_hugepage();
    m.write_u64(PAGE_SIZE as usize / 8, 11);
    let _ = m.read_u64(2 * PAGE_SIZE as usize / 8);
    m.write_u64(3 * PAGE_SIZE as usize / 8, 33);
    mprotect(m.pages(3, 1), Prot::READ).expect("mprotect");
    mprotect(m.pages(4, 1), PROT_NONE).expect("mprotect");
    m.unmap_part(m.pages(5, 1)).expect("munmap");

    let mut pfns = vec![HmmPfn::empty(); 6];
    // Another test may map something into the hole at page 5 at any time
    // (and unmap it again): take the snapshot again until the hole was a
    // hole both before and after it.
    let maps = hmm::os::procmap::ProcMaps::open().expect("maps");
    let hole = || {
        maps.query(m.pages(5, 1).start(), false)
            .expect("query")
            .is_none()
    };
    for _ in 0..100 {
        let before = hole();
        fault(&mm, &n, m.range(), HmmPfn::empty(), &mut pfns, true).expect("snapshot");
        if before && hole() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(pfns[0], HmmPfn::empty(), "absent page");
    assert_eq!(pfns[1].flags(), HmmPfn::VALID | HmmPfn::WRITE);
    assert_eq!(
        pfns[2].flags(),
        HmmPfn::VALID,
        "the zero page is a valid read-only page"
    );
    assert_eq!(pfns[3].flags(), HmmPfn::VALID, "read-only VMA");
    assert_eq!(pfns[4], HmmPfn::ERROR, "VMA without read permission");
    assert_eq!(pfns[5], HmmPfn::ERROR, "no VMA");
    for p in &pfns[1..4] {
        assert_eq!(p.map_order(), 0);
        assert_eq!(
            p.pfn().0 != 0,
            root(),
            "PFNs are real for root, 0 otherwise"
        );
    }
    assert_ne!(pfns[1].pfn(), pfns[3].pfn());

    // Without PFN lookup every flag is the same and the PFN field is 0.
    let mut nopfn = vec![HmmPfn::empty(); 6];
    fault(&mm, &n, m.range(), HmmPfn::empty(), &mut nopfn, false).expect("snapshot");
    // Pages 0-4 only: the hole at page 5 may meanwhile hold another test's mapping.
    for (i, (a, b)) in pfns.iter().zip(&nopfn).enumerate().take(5) {
        assert_eq!(a.flags(), b.flags());
        // The zero page always reports the zero PFN, so a device can tell it.
        let want = if i == 2 { mm.zero_pfn().0 } else { 0 };
        assert_eq!(b.pfn().0, want, "page {i}");
    }
    assert_eq!(pfns[2].pfn(), mm.zero_pfn());
    n.remove().expect("remove");
}

#[test]
fn faults_populate_only_what_is_requested() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    m.no_hugepage();
    // Read faults map the zero page; one page asks for write through the mask.
    let mut pfns = vec![HmmPfn::empty(); 4];
    pfns[2] = HmmPfn::REQ_WRITE;
    loop {
        let seq = n.read_begin();
        let mut r = HmmRange::new(&n, m.range().start(), m.range().end(), &mut pfns);
        r.notifier_seq = seq;
        r.default_flags = HmmPfn::REQ_FAULT;
        r.pfn_flags_mask = HmmPfn::REQ_WRITE;
        match mm.range_fault(&mut r) {
            Err(Error::Busy) => continue,
            other => break other.expect("fault"),
        }
    }
    for (i, p) in pfns.iter().enumerate() {
        let want = if i == 2 {
            HmmPfn::VALID | HmmPfn::WRITE
        } else {
            HmmPfn::VALID
        };
        assert_eq!(p.flags(), want, "page {i}");
    }
    // A write fault breaks the zero page into a private writable page.
    fault(
        &mm,
        &n,
        m.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns,
        true,
    )
    .expect("fault");
    assert!(
        pfns.iter()
            .all(|p| p.flags() == HmmPfn::VALID | HmmPfn::WRITE)
    );
    // A snapshot never populates.
    let fresh = Mapping::anonymous(2 * PAGE_SIZE, rw()).expect("mmap");
    let mut snap = vec![HmmPfn::empty(); 2];
    fault(&mm, &n, fresh.range(), HmmPfn::empty(), &mut snap, true).expect("snapshot");
    assert_eq!(snap, vec![HmmPfn::empty(); 2]);
    n.remove().expect("remove");
}

#[test]
fn sticky_input_flags_survive_and_other_bits_are_overwritten() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let m = Mapping::anonymous(2 * PAGE_SIZE, rw()).expect("mmap");
    m.write_u64(0, 1);
    let sticky = HmmPfn::DMA_MAPPED | HmmPfn::P2PDMA | HmmPfn::P2PDMA_BUS;
    let mut pfns = vec![
        sticky | HmmPfn::ERROR | HmmPfn::from_bits_retain(0x1234),
        sticky,
    ];
    fault(&mm, &n, m.range(), HmmPfn::empty(), &mut pfns, false).expect("snapshot");
    assert_eq!(pfns[0], sticky | HmmPfn::VALID | HmmPfn::WRITE);
    assert_eq!(pfns[1], sticky);
    n.remove().expect("remove");
}

#[test]
fn errors_leave_the_pfn_array_exactly_as_it_was() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    m.write_u64(0, 1);
    mprotect(m.pages(2, 1), Prot::READ).expect("mprotect");
    mprotect(m.pages(3, 1), PROT_NONE).expect("mprotect");
    let input: Vec<HmmPfn> = (0..4)
        .map(|i| HmmPfn::REQ_FAULT | HmmPfn::DMA_MAPPED | HmmPfn::from_bits_retain(i))
        .collect();

    // EPERM: a write fault on the read-only VMA (page 2).
    let mut pfns = input.clone();
    let r = fault(
        &mm,
        &n,
        m.pages(0, 3),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns[..3],
        true,
    );
    assert!(
        matches!(r, Err(Error::Perm { addr }) if addr == m.pages(2, 1).start()),
        "{r:?}"
    );
    assert_eq!(pfns, input);

    // EFAULT: a fault request on the PROT_NONE VMA (page 3).
    let r = fault(&mm, &n, m.range(), HmmPfn::REQ_FAULT, &mut pfns, true);
    assert!(
        matches!(r, Err(Error::Fault { addr, .. }) if addr == m.pages(3, 1).start()),
        "{r:?}"
    );
    assert_eq!(pfns, input);

    // EBUSY: an invalidation between read_begin and the walk.
    let seq = n.read_begin();
    mm.subscriptions()
        .expect("mm")
        .invalidate(&NotifierRange::new(
            m.range().start(),
            m.range().end(),
            Event::Clear,
        ))
        .expect("invalidate");
    let mut r = HmmRange::new(
        &n,
        m.pages(0, 2).start(),
        m.pages(0, 2).end(),
        &mut pfns[..2],
    );
    r.notifier_seq = seq;
    r.default_flags = HmmPfn::REQ_FAULT;
    assert!(matches!(mm.range_fault(&mut r), Err(Error::Busy)));
    assert_eq!(pfns, input);

    // EFAULT for a hole, with the kernel's errno.
    m.unmap_part(m.pages(1, 1)).expect("munmap");
    let r = fault(
        &mm,
        &n,
        m.pages(0, 2),
        HmmPfn::REQ_FAULT,
        &mut pfns[..2],
        true,
    );
    assert_eq!(r.as_ref().map_err(Error::errno).err(), Some(14));
    assert_eq!(pfns, input);
    n.remove().expect("remove");
}

#[test]
fn transparent_huge_pages_report_pmd_order() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let two_mb = 1u64 << 21;
    let m = Mapping::anonymous_aligned(two_mb, two_mb, rw()).expect("mmap");
    if hmm::os::mm::hugepage(m.range(), true).is_err() {
        eprintln!("SKIP: MADV_HUGEPAGE refused: transparent huge pages unavailable");
        return;
    }
    let mut pfns = vec![HmmPfn::empty(); 512];
    fault(
        &mm,
        &n,
        m.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns,
        true,
    )
    .expect("fault");
    if pfns[0].map_order() == 0 {
        eprintln!("SKIP: the kernel backed the range with 4 KiB pages (no free huge page)");
        return;
    }
    assert!(
        pfns.iter()
            .all(|p| p.map_order() == 9 && p.flags() == HmmPfn::VALID | HmmPfn::WRITE)
    );
    if root() {
        // One compound page: consecutive PFNs from a 512-aligned head.
        assert_eq!(pfns[0].pfn().0 % 512, 0);
        assert!(pfns.windows(2).all(|w| w[1].pfn().0 == w[0].pfn().0 + 1));
    }
    n.remove().expect("remove");
}

#[test]
fn hugetlb_pages_report_their_order() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let Some(hsize) = hmm::os::mm::default_hugetlb_size() else {
        eprintln!("SKIP: no hugetlb page size in /proc/meminfo");
        return;
    };
    let m = match Mapping::hugetlb(hsize, rw()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "SKIP: MAP_HUGETLB failed ({e}): reserve pages with /proc/sys/vm/nr_hugepages"
            );
            return;
        }
    };
    let npages = (hsize / PAGE_SIZE) as usize;
    let mut pfns = vec![HmmPfn::empty(); npages];
    fault(
        &mm,
        &n,
        m.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns,
        true,
    )
    .expect("fault");
    let order = hsize.trailing_zeros() - 12;
    assert!(
        pfns.iter()
            .all(|p| p.map_order() == order && p.flags() == HmmPfn::VALID | HmmPfn::WRITE)
    );
    // Read-only protection is reported too (the kernel's `compound` selftest).
    mm.protect(m.range(), Prot::READ).expect("protect");
    fault(&mm, &n, m.range(), HmmPfn::empty(), &mut pfns, true).expect("snapshot");
    assert!(
        pfns.iter()
            .all(|p| p.map_order() == order && p.flags() == HmmPfn::VALID)
    );
    n.remove().expect("remove");
}

#[test]
fn shared_and_file_mappings() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let shm = Mapping::shared_anonymous(2 * PAGE_SIZE, rw()).expect("mmap");
    shm.write_u64(0, 5);
    let _ = shm.read_u64(PAGE_SIZE as usize / 8);
    let mut pfns = vec![HmmPfn::empty(); 2];
    fault(&mm, &n, shm.range(), HmmPfn::empty(), &mut pfns, false).expect("snapshot");
    assert_eq!(pfns[0].flags(), HmmPfn::VALID | HmmPfn::WRITE);
    // A shared page read first is still writable in a shared mapping.
    assert_eq!(pfns[1].flags(), HmmPfn::VALID | HmmPfn::WRITE);

    // A private file mapping: read faults give read-only file pages.
    let f = std::fs::File::open("/proc/self/exe").expect("exe");
    let fm = Mapping::file(
        std::os::fd::AsFd::as_fd(&f),
        PAGE_SIZE,
        0,
        Prot::READ | Prot::WRITE,
        false,
    )
    .expect("mmap");
    let mut pf = vec![HmmPfn::empty(); 1];
    fault(&mm, &n, fm.range(), HmmPfn::REQ_FAULT, &mut pf, false).expect("fault");
    assert_eq!(
        pf[0].flags(),
        HmmPfn::VALID,
        "an unwritten private file page is copy-on-write"
    );
    assert!(
        !mm.is_registered(fm.range()).expect("mm"),
        "regular files cannot be registered"
    );
    fault(
        &mm,
        &n,
        fm.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pf,
        false,
    )
    .expect("fault");
    assert_eq!(
        pf[0].flags(),
        HmmPfn::VALID | HmmPfn::WRITE,
        "the write broke copy-on-write"
    );
    n.remove().expect("remove");
}

/// Bad input of every kind gets a typed error, never a panic.
#[test]
fn bad_input_table() {
    let mm = Mm::get().expect("mm");
    let (n, _rec) = whole_space(&mm);
    let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    let s = m.addr().get();
    let other_subs = hmm::notifier::Subscriptions::new();
    let foreign = other_subs
        .insert(VirtAddr(0), PAGE_SIZE, Arc::new(Recorder::default()))
        .expect("insert");

    type Check = fn(&Error) -> bool;
    let misaligned: Check = |e| matches!(e, Error::Misaligned { .. });
    let empty: Check = |e| matches!(e, Error::Empty);
    let out_of_range: Check = |e| matches!(e, Error::OutOfRange { .. });
    let length: Check = |e| matches!(e, Error::PfnLength { .. });
    let foreign_n: Check = |e| matches!(e, Error::ForeignNotifier);
    let overflow: Check = |e| matches!(e, Error::Overflow);

    // (start, end, pfn entries, use the foreign notifier, expected)
    let cases: Vec<(&str, u64, u64, usize, bool, Check)> = vec![
        (
            "misaligned start",
            s + 1,
            s + PAGE_SIZE,
            1,
            false,
            misaligned,
        ),
        ("misaligned end", s, s + PAGE_SIZE + 7, 1, false, misaligned),
        ("both misaligned", s + 3, s + 5, 1, false, misaligned),
        ("empty", s, s, 0, false, empty),
        ("end before start", s + PAGE_SIZE, s, 1, false, empty),
        (
            "past the user address space",
            TASK_SIZE,
            TASK_SIZE + PAGE_SIZE,
            1,
            false,
            out_of_range,
        ),
        (
            "kernel addresses",
            0xffff_8000_0000_0000,
            0xffff_8000_0000_1000,
            1,
            false,
            out_of_range,
        ),
        ("end at u64 max page", !0xfff, !0xfff, 0, false, empty),
        ("too few entries", s, s + 4 * PAGE_SIZE, 3, false, length),
        ("too many entries", s, s + 4 * PAGE_SIZE, 5, false, length),
        ("no entries", s, s + PAGE_SIZE, 0, false, length),
        (
            "notifier of another address space",
            s,
            s + PAGE_SIZE,
            1,
            true,
            foreign_n,
        ),
    ];
    for (what, start, end, len, use_foreign, check) in &cases {
        let mut pfns = vec![HmmPfn::REQ_FAULT; *len];
        let before = pfns.clone();
        let notifier = if *use_foreign { &foreign } else { &n };
        let mut r = HmmRange::new(notifier, VirtAddr(*start), VirtAddr(*end), &mut pfns);
        r.notifier_seq = notifier.read_begin();
        let res = mm.range_fault(&mut r);
        match res {
            Err(ref e) => assert!(check(e), "{what}: unexpected {e:?}"),
            Ok(()) => panic!("{what}: accepted"),
        }
        assert_eq!(pfns, before, "{what}: the array changed");
    }

    // Range constructors and the other entry points.
    let ctor_cases: Vec<(&str, hmm::Result<VaRange>, Check)> = vec![
        (
            "from_len overflow",
            VaRange::from_len(VirtAddr(!0xfff), 2 * PAGE_SIZE),
            overflow,
        ),
        (
            "from_pages overflow",
            VaRange::from_pages(VirtAddr(s), u64::MAX / 2),
            overflow,
        ),
        ("from_len zero", VaRange::from_len(VirtAddr(s), 0), empty),
        (
            "from_pages misaligned",
            VaRange::from_pages(VirtAddr(s + 8), 1),
            misaligned,
        ),
    ];
    for (what, res, check) in &ctor_cases {
        match res {
            Err(e) => assert!(check(e), "{what}: unexpected {e:?}"),
            Ok(r) => panic!("{what}: accepted {r:?}"),
        }
    }
    let rec: Arc<Recorder> = Arc::new(Recorder::default());
    let insert_zero = mm.interval_notifier_insert(VirtAddr(s), 0, rec.clone());
    assert!(
        matches!(insert_zero, Err(Error::Overflow)),
        "insert of length 0"
    );
    let insert_wrap = mm.interval_notifier_insert(VirtAddr(u64::MAX - 10), 100, rec.clone());
    assert!(
        matches!(insert_wrap, Err(Error::Overflow)),
        "insert that wraps"
    );
    let unmapped = VaRange::from_pages(VirtAddr(0x1000), 1).expect("range");
    assert!(
        matches!(mm.protect(unmapped, Prot::READ), Err(Error::Os { .. })),
        "protect of unmapped memory"
    );
    // Registering unmapped memory is not an error: nothing there to hear about.
    assert!(mm.register(unmapped).is_ok());
    foreign.remove().expect("remove");
    n.remove().expect("remove");
}
