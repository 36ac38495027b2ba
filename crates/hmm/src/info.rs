//! What this machine offers the library: the report behind `hmm info`.

use crate::PAGE_SIZE;
use crate::mm::{OPTIONAL_FEATURES, REQUIRED_FEATURES};
use crate::os::mm::{Mapping, Prot};
use crate::os::pagemap::{Category, Entry, Pagemap, ScanFilter};
use crate::os::procmap::ProcMaps;
use crate::os::uffd::{Features, Ioctls, Uffd};

/// One capability and whether it is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The kernel's name for it.
    pub name: String,
    /// Whether it is present and usable.
    pub present: bool,
    /// Whether the library cannot work without it.
    pub required: bool,
    /// What it is for, or why it is missing.
    pub detail: String,
}

/// Everything `hmm info` reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// `uname -r`.
    pub kernel: String,
    /// Whether the process runs as root.
    pub root: bool,
    /// Every check, in display order.
    pub checks: Vec<Check>,
    /// `/sys/kernel/mm/transparent_hugepage/enabled`, e.g. `always [madvise] never`.
    pub thp_enabled: Option<String>,
    /// Default hugetlb page size in bytes.
    pub hugetlb_page_size: Option<u64>,
    /// Free hugetlb pages of the default size.
    pub hugetlb_free: Option<u64>,
}

impl Report {
    /// Whether every required capability is present.
    pub fn usable(&self) -> bool {
        self.checks.iter().all(|c| c.present || !c.required)
    }
}

fn check(name: &str, present: bool, required: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        present,
        required,
        detail: detail.into(),
    }
}

fn meminfo_field(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Probes the machine. Never fails: what cannot be probed is reported missing.
pub fn probe() -> Report {
    let kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let root = rustix::process::geteuid().is_root();
    let mut checks = Vec::new();

    match Uffd::probe() {
        Ok(caps) => {
            checks.push(check(
                "userfaultfd",
                true,
                true,
                "the address space's event and fault channel",
            ));
            for (f, why) in REQUIRED_FEATURES {
                let name = format!("UFFD_FEATURE_{}", f.names().first().copied().unwrap_or("?"));
                checks.push(check(&name, caps.features.contains(*f), true, *why));
            }
            for (name, f) in OPTIONAL_FEATURES.iter_names() {
                let why = match f {
                    Features::MOVE => "UFFDIO_MOVE: migration by remapping",
                    Features::WP_UNPOPULATED => "write-protecting absent pages",
                    Features::WP_HUGETLBFS_SHMEM => "events on shmem and hugetlbfs mappings",
                    Features::MISSING_SHMEM => "device pages in shmem mappings",
                    Features::MISSING_HUGETLBFS => "device pages in hugetlbfs mappings",
                    _ => "write-protect faults",
                };
                checks.push(check(
                    &format!("UFFD_FEATURE_{name}"),
                    caps.features.contains(f),
                    false,
                    why,
                ));
            }
            for (name, io) in [
                ("UFFDIO_REGISTER", Ioctls::REGISTER),
                ("UFFDIO_UNREGISTER", Ioctls::UNREGISTER),
                ("UFFDIO_API", Ioctls::API),
            ] {
                checks.push(check(
                    name,
                    caps.ioctls.contains(io),
                    true,
                    "userfaultfd control",
                ));
            }
        }
        Err(e) => {
            let hint = if matches!(e, rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) {
                "refused: run as root or `sysctl -w vm.unprivileged_userfaultfd=1`".to_string()
            } else {
                format!("unavailable: {e}")
            };
            checks.push(check("userfaultfd", false, true, hint));
        }
    }
    // The range ioctls are reported by registering a scratch range.
    if let (Ok(uffd), Ok(m)) = (
        Uffd::open(Features::empty(), true),
        Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE),
    ) {
        let mode = crate::os::uffd::RegisterMode::MISSING | crate::os::uffd::RegisterMode::WP;
        match uffd.register(m.range(), mode) {
            Ok(io) => {
                for (name, bit, required) in [
                    ("UFFDIO_COPY", Ioctls::COPY, true),
                    ("UFFDIO_ZEROPAGE", Ioctls::ZEROPAGE, true),
                    ("UFFDIO_WAKE", Ioctls::WAKE, true),
                    ("UFFDIO_WRITEPROTECT", Ioctls::WRITEPROTECT, true),
                    ("UFFDIO_MOVE", Ioctls::MOVE, false),
                ] {
                    checks.push(check(
                        name,
                        io.contains(bit),
                        required,
                        "resolving faults on device pages",
                    ));
                }
            }
            Err(e) => checks.push(check(
                "UFFDIO_REGISTER (MISSING|WP)",
                false,
                true,
                e.to_string(),
            )),
        }
    }

    let pagemap = Pagemap::open();
    let scratch = Mapping::anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE);
    match (&pagemap, &scratch) {
        (Ok(pm), Ok(m)) => {
            m.write_u64(0, 1);
            let filter = ScanFilter {
                any_of: Category::PRESENT,
                returned: Category::PRESENT,
                ..Default::default()
            };
            let scan = pm.scan(m.range(), &filter, &mut Vec::new());
            checks.push(check(
                "PAGEMAP_SCAN",
                scan.is_ok(),
                true,
                scan.err()
                    .map_or("page-table walks (Linux 6.7+)".to_string(), |e| {
                        format!("missing: {e}")
                    }),
            ));
            let mut e = [Entry(0)];
            let pfn_ok = pm.read_entries(m.range(), &mut e).is_ok() && e[0].pfn() != 0;
            checks.push(check(
                "pagemap PFNs",
                pfn_ok,
                false,
                if pfn_ok {
                    "real frame numbers (CAP_SYS_ADMIN)"
                } else {
                    "PFNs read as 0 (needs CAP_SYS_ADMIN)"
                },
            ));
        }
        _ => checks.push(check(
            "PAGEMAP_SCAN",
            false,
            true,
            "cannot open /proc/self/pagemap",
        )),
    }
    let procmap = ProcMaps::open().and_then(|p| {
        let probe = crate::VirtAddr::from_ptr(&kernel as *const String as *const u8);
        p.query(probe, true).map(|_| ())
    });
    checks.push(check(
        "PROCMAP_QUERY",
        procmap.is_ok(),
        true,
        procmap
            .err()
            .map_or("VMA queries (Linux 6.11+)".to_string(), |e| {
                format!("missing: {e}")
            }),
    ));
    let popul = scratch
        .as_ref()
        .map(|m| crate::os::mm::populate(m.range(), true));
    checks.push(check(
        "MADV_POPULATE_READ/WRITE",
        matches!(popul, Ok(Ok(()))),
        true,
        "faulting device-requested pages (Linux 5.14+)",
    ));

    let thp_enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .map(|s| s.trim().to_string());
    checks.push(check(
        "transparent huge pages",
        thp_enabled
            .as_deref()
            .is_some_and(|s| !s.contains("[never]")),
        false,
        thp_enabled
            .clone()
            .unwrap_or_else(|| "not available".into()),
    ));
    let hugetlb_page_size = meminfo_field("Hugepagesize:").map(|kb| kb * 1024);
    let hugetlb_free = meminfo_field("HugePages_Free:");
    checks.push(check(
        "hugetlb pages",
        hugetlb_free.is_some_and(|n| n > 0),
        false,
        format!(
            "{} free of {} KiB (reserve with /proc/sys/vm/nr_hugepages)",
            hugetlb_free.unwrap_or(0),
            hugetlb_page_size.unwrap_or(0) / 1024
        ),
    ));
    Report {
        kernel,
        root,
        checks,
        thp_enabled,
        hugetlb_page_size,
        hugetlb_free,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_sees_what_the_library_needs() {
        let r = super::probe();
        assert!(!r.kernel.is_empty());
        for name in [
            "userfaultfd",
            "PAGEMAP_SCAN",
            "PROCMAP_QUERY",
            "UFFDIO_COPY",
        ] {
            let c = r
                .checks
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("{name} not probed"));
            assert!(c.present, "{name}: {}", c.detail);
        }
        assert!(r.usable());
    }
}
