//! Exclusive device access for atomics (`make_device_exclusive`): the CPU
//! loses the page until it touches it, which revokes exclusivity with the
//! data intact.

use hmm::os::mm::{Mapping, Prot};
use hmm::testdev::Dmirror;
use hmm::{Error, Mm, PAGE_SIZE};

const NPAGES: u64 = 8;

fn filled() -> Mapping {
    let m = Mapping::anonymous(NPAGES * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
    for i in 0..(m.len() / 4) as usize {
        m.write_i32(i, i as i32);
    }
    m
}

#[test]
fn cpu_touch_revokes_exclusive_access_with_data_intact() {
    let d = Dmirror::open(0).expect("open");
    let mm = Mm::get().expect("mm");
    let m = filled();
    let mut out = vec![0u8; m.len() as usize];
    let cmd = d
        .exclusive(m.addr(), NPAGES, Some(&mut out))
        .expect("exclusive");
    assert_eq!(cmd.cpages, NPAGES);
    for i in 0..(m.len() / 4) as usize {
        let v = i32::from_ne_bytes(out[i * 4..i * 4 + 4].try_into().expect("4"));
        assert_eq!(v, i as i32, "device copy of int {i}");
    }
    for p in 0..NPAGES {
        assert!(
            mm.exclusive_at(m.pages(p, 1).start())
                .expect("at")
                .is_some()
        );
    }
    assert!(matches!(
        d.check_exclusive(m.addr(), NPAGES),
        Err(Error::Perm { .. })
    ));
    // A device write through the atomic mapping lands in the page.
    let mut data = out.clone();
    data[..4].copy_from_slice(&(-7i32).to_ne_bytes());
    d.write(m.addr(), 1, &data[..PAGE_SIZE as usize])
        .expect("device write");
    // The CPU read-and-increments every int: each first touch of a page
    // revokes exclusivity.
    for i in 0..(m.len() / 4) as usize {
        let v = m.read_i32(i);
        let want = if i == 0 { -7 } else { i as i32 };
        assert_eq!(v, want, "int {i}");
        m.write_i32(i, v + 1);
    }
    for p in 0..NPAGES {
        assert!(
            mm.exclusive_at(m.pages(p, 1).start())
                .expect("at")
                .is_none()
        );
    }
    d.check_exclusive(m.addr(), NPAGES)
        .expect("no atomic entries left");
    for i in 1..(m.len() / 4) as usize {
        assert_eq!(m.read_i32(i), i as i32 + 1);
    }
}

#[test]
fn protect_read_only_makes_device_write_perm() {
    let d = Dmirror::open(0).expect("open");
    let mm = Mm::get().expect("mm");
    let m = filled();
    d.exclusive(m.addr(), NPAGES, None).expect("exclusive");
    mm.protect(m.range(), Prot::READ).expect("protect");
    let data = vec![1u8; m.len() as usize];
    assert!(matches!(
        d.write(m.addr(), NPAGES, &data),
        Err(Error::Perm { .. })
    ));
    // The data survived.
    for i in 0..(m.len() / 4) as usize {
        assert_eq!(m.read_i32(i), i as i32, "int {i}");
    }
}

#[test]
fn exclusive_refuses_shared_memory() {
    let d = Dmirror::open(0).expect("open");
    let m = Mapping::shared_anonymous(2 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
    assert!(matches!(
        d.exclusive(m.addr(), 2, None),
        Err(Error::Unsupported { .. })
    ));
}
