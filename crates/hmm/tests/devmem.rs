//! Device memory and migration: the required behaviours of device-private
//! pages (DESIGN §4), for both flavours of the software device's memory.

mod common;

use hmm::devmem::Storage;
use hmm::os::mm::{Mapping, Prot};
use hmm::testdev::{Device, Dmirror};
use hmm::{MirrorOptions, Mm, PAGE_SIZE};

const FLAVOURS: [Storage; 2] = [Storage::Device, Storage::Host];

fn open(storage: Storage) -> Dmirror {
    Dmirror::open_device(Device::new_private(0, storage), MirrorOptions::default()).expect("open")
}

fn fill(m: &Mapping, f: impl Fn(usize) -> u64) {
    for i in 0..(m.len() / 8) as usize {
        m.write_u64(i, f(i));
    }
}

#[test]
fn migrate_then_cpu_reads_back() {
    for storage in FLAVOURS {
        let d = open(storage);
        let mm = Mm::get().expect("mm");
        let m = Mapping::anonymous(16 * PAGE_SIZE, Prot::READ | Prot::WRITE).expect("mmap");
        fill(&m, |i| i as u64 * 3 + 1);
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
