//! The registry of ported `hmm-tests.c` cases.

use crate::case::{Case, Fixture};
use crate::fixture::{run_hmm, run_hmm2};

/// `TEST_F(fixture, name)`: the case `name` of `cases`, once per variant of
/// `fixture`, under the kernel's name.
macro_rules! test_f {
    (hmm, $name:ident) => {
        Case::per_variant(stringify!($name), Fixture::Hmm, |variant| {
            run_hmm(variant, crate::cases::$name)
        })
    };
    (hmm2, $name:ident) => {
        Case::per_variant(stringify!($name), Fixture::Hmm2, |variant| {
            run_hmm2(variant, crate::cases::$name)
        })
    };
}

/// Every ported case, once per variant, in the kernel file's order (the mm
/// tree's device-private THP tests last, as there).
///
/// Not ported yet: `anon_teardown`, `double_map`, `exclusive_cow`,
/// `hmm_gup_test`, `hmm_cow_in_device`, `migrate_partial_unmap_fault`,
/// `migrate_remap_fault` and `benchmark_thp_migration`.
pub fn cases() -> Vec<Case> {
    [
        test_f!(hmm, open_close),
        test_f!(hmm, anon_read),
        test_f!(hmm, anon_read_prot),
        test_f!(hmm, anon_write),
        test_f!(hmm, anon_write_prot),
        test_f!(hmm, anon_write_child),
        test_f!(hmm, anon_write_child_shared),
        test_f!(hmm, anon_write_huge),
        test_f!(hmm, anon_write_hugetlbfs),
        test_f!(hmm, file_read),
        test_f!(hmm, file_write),
        test_f!(hmm, migrate),
        test_f!(hmm, migrate_fault),
        test_f!(hmm, migrate_release),
        test_f!(hmm, migrate_shared),
        test_f!(hmm2, migrate_mixed),
        test_f!(hmm, migrate_multiple),
        test_f!(hmm, anon_read_multiple),
        test_f!(hmm, mixedmap),
        test_f!(hmm2, snapshot),
        test_f!(hmm, compound),
        test_f!(hmm, exclusive),
        test_f!(hmm, exclusive_mprotect),
        test_f!(hmm, exclusive_cow),
        test_f!(hmm, migrate_anon_huge_empty),
        test_f!(hmm, migrate_anon_huge_zero),
        test_f!(hmm, migrate_anon_huge_free),
        test_f!(hmm, migrate_anon_huge_fault),
        test_f!(hmm, migrate_anon_huge_err),
        test_f!(hmm, migrate_anon_huge_zero_err),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_both_variants_are_there() {
        let all = cases();
        let mut ids: Vec<_> = all.iter().map(Case::id).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate case ids");
        assert_eq!(n, 2 * 30);
        assert_eq!(all[0].id(), "open_close/hmm_device_private");
        assert_eq!(all[1].id(), "open_close/hmm_device_coherent");
        assert!(ids.contains(&"snapshot/hmm2_device_private".to_owned()));
        assert!(ids.contains(&"migrate_mixed/hmm2_device_coherent".to_owned()));
        // The exclusive-access tests follow `compound`, as in the kernel file.
        let at = |id: &str| all.iter().position(|c| c.id() == id);
        let compound = at("compound/hmm_device_coherent").expect("compound");
        assert_eq!(at("exclusive/hmm_device_private"), Some(compound + 1));
        assert_eq!(
            at("exclusive_mprotect/hmm_device_private"),
            Some(compound + 3)
        );
        assert_eq!(
            all.last().map(Case::id).as_deref(),
            Some("migrate_anon_huge_zero_err/hmm_device_coherent")
        );
    }
}
