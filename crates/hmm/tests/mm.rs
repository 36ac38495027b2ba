//! The address space: one per process, events turned into invalidations, release.

mod common;

use common::whole_space;
use hmm::notifier::Event;
use hmm::os::mm::{Mapping, Prot, dontneed};
use hmm::{HmmPfn, Mm, PAGE_SIZE};

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

#[test]
fn get_returns_the_same_mm_while_a_handle_lives() {
    let a = Mm::get().expect("mm");
    let b = Mm::get().expect("mm");
    assert!(a.same(&b));
}

#[test]
fn dontneed_and_munmap_become_invalidations() {
    let mm = Mm::get().expect("mm");
    let (n, rec) = whole_space(&mm);
    let m = Mapping::anonymous(8 * PAGE_SIZE, rw()).expect("mmap");
    common::mirror(&mm, &n, &m);

    let part = m.pages(1, 2);
    dontneed(part).expect("dontneed");
    assert!(
        rec.wait_for(Event::Clear, part.start(), part.end()),
        "{:?}",
        rec.events()
    );

    let part = m.pages(6, 2);
    m.unmap_part(part).expect("munmap");
    assert!(
        rec.wait_for(Event::Unmap, part.start(), part.end()),
        "{:?}",
        rec.events()
    );
    assert!(common::eventually(|| !mm.is_registered(part).expect("mm")));
    assert!(mm.is_registered(m.pages(0, 6)).expect("mm"));
    let stats = mm.stats();
    assert!(stats.removes >= 1 && stats.unmaps >= 1, "{stats:?}");
    n.remove().expect("remove");
}

#[test]
fn mremap_invalidates_the_old_range_and_keeps_the_registration() {
    let mm = Mm::get().expect("mm");
    let (n, rec) = whole_space(&mm);
    let mut m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    common::mirror(&mm, &n, &m);
    m.write_u64(0, 42);
    let old = m.range();
    m.remap(false).expect("mremap");
    assert_ne!(old, m.range());
    assert!(
        rec.wait_for(Event::Unmap, old.start(), old.end()),
        "{:?}",
        rec.events()
    );
    assert!(common::eventually(|| mm.stats().remaps >= 1));
    assert!(
        mm.is_registered(m.range()).expect("mm"),
        "the moved VMA keeps its userfaultfd context"
    );
    assert_eq!(m.read_u64(0), 42);
    n.remove().expect("remove");
}

#[test]
fn protect_invalidates_before_changing_protection() {
    let mm = Mm::get().expect("mm");
    let (n, rec) = whole_space(&mm);
    let m = Mapping::anonymous(2 * PAGE_SIZE, rw()).expect("mmap");
    common::mirror(&mm, &n, &m);
    mm.protect(m.range(), Prot::READ).expect("protect");
    assert!(
        rec.events()
            .iter()
            .any(|&(e, s, t)| e == Event::ProtectionVma
                && s == m.range().start().get()
                && t == m.range().end().get())
    );
    let mut pfns = vec![HmmPfn::empty(); 2];
    let err = common::fault(
        &mm,
        &n,
        m.range(),
        HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        &mut pfns,
        false,
    );
    assert!(matches!(err, Err(hmm::Error::Perm { .. })), "{err:?}");
    n.remove().expect("remove");
}
