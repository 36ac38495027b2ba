//! Registration with the userfaultfd: a VMA registered before is probed,
//! not registered again, and a mapping that replaces it is registered.
//!
//! A file of its own: the probe answers "maybe" (and the library registers
//! again) while any address-space event of the process is in flight, so
//! the count below needs a process where no other test maps and unmaps.

mod common;

use hmm::os::mm::{Mapping, Prot};
use hmm::{Mm, PAGE_SIZE};

fn rw() -> Prot {
    Prot::READ | Prot::WRITE
}

#[test]
fn a_registered_mapping_is_not_registered_again_but_its_replacement_is() {
    let mm = Mm::get().expect("mm");
    let m = Mapping::anonymous(4 * PAGE_SIZE, rw()).expect("mmap");
    m.no_hugepage();
    mm.register(m.range()).expect("register");
    assert!(mm.is_registered(m.range()).expect("smaps"));
    // Still registered: found so without UFFDIO_REGISTER (other tests of
    // this binary may register a few mappings meanwhile).
    let before = mm.stats().registrations;
    for _ in 0..100 {
        mm.register(m.range()).expect("register");
    }
    let made = mm.stats().registrations - before;
    assert!(made < 50, "{made} registrations for 100 calls");
    // Replaced: the old mapping's UNMAP is handled, the new one registered.
    for round in 0..20 {
        // MAP_FIXED over it: the kernel unmaps the old mapping first.
        common::map_at(m.range(), libc::MAP_FIXED).expect("mmap(MAP_FIXED)");
        m.write_u64(0, round);
        mm.register(m.range()).expect("register");
        assert!(mm.is_registered(m.range()).expect("smaps"), "round {round}");
        assert_eq!(m.read_u64(0), round);
    }
}
