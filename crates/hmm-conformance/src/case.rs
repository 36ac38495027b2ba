//! What one conformance case is: a test body, the fixture it runs in, and the
//! variant of that fixture.
//!
//! Models the `FIXTURE`/`FIXTURE_VARIANT`/`TEST_F` triple of
//! `tools/testing/selftests/kselftest_harness.h` as `hmm-tests.c` uses it:
//! two fixtures (`hmm` with one device, `hmm2` with two), each with the
//! variants `device_private` and `device_coherent`, and every test run once per
//! variant.

use core::fmt;

/// The fixture a test runs in (`FIXTURE(hmm)` or `FIXTURE(hmm2)`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Fixture {
    /// `hmm`: one mirror device.
    Hmm,
    /// `hmm2`: two mirror devices, for the multi-device tests.
    Hmm2,
}

impl Fixture {
    /// The kernel's fixture name: `hmm` or `hmm2`.
    pub const fn name(self) -> &'static str {
        match self {
            Fixture::Hmm => "hmm",
            Fixture::Hmm2 => "hmm2",
        }
    }

    /// The full variant name as the kernel prints it, e.g.
    /// `hmm_device_private` or `hmm2_device_coherent`.
    pub const fn variant_name(self, variant: Variant) -> &'static str {
        match (self, variant) {
            (Fixture::Hmm, Variant::DevicePrivate) => "hmm_device_private",
            (Fixture::Hmm, Variant::DeviceCoherent) => "hmm_device_coherent",
            (Fixture::Hmm2, Variant::DevicePrivate) => "hmm2_device_private",
            (Fixture::Hmm2, Variant::DeviceCoherent) => "hmm2_device_coherent",
        }
    }

    /// The dmirror device numbers the kernel's variant opens
    /// (`/dev/hmm_dmirror<N>`): `hmm` private 0, coherent 2; `hmm2` private
    /// 0 and 1, coherent 2 and 3.
    pub const fn device_numbers(self, variant: Variant) -> &'static [u32] {
        match (self, variant) {
            (Fixture::Hmm, Variant::DevicePrivate) => &[0],
            (Fixture::Hmm, Variant::DeviceCoherent) => &[2],
            (Fixture::Hmm2, Variant::DevicePrivate) => &[0, 1],
            (Fixture::Hmm2, Variant::DeviceCoherent) => &[2, 3],
        }
    }
}

impl fmt::Display for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of device memory a fixture variant mirrors into.
///
/// Printed alone as `device_private` / `device_coherent`; the name the kernel
/// prints carries the fixture too, see [`Fixture::variant_name`] and
/// [`Case::variant_name`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Variant {
    /// `MEMORY_DEVICE_PRIVATE`: memory the CPU cannot touch.
    DevicePrivate,
    /// `MEMORY_DEVICE_COHERENT`: memory the CPU can touch. The kernel skips
    /// this variant when the coherent devices are absent.
    DeviceCoherent,
}

impl Variant {
    /// Both variants, in the kernel's order.
    pub const ALL: [Variant; 2] = [Variant::DevicePrivate, Variant::DeviceCoherent];

    /// The variant's own name: `device_private` or `device_coherent`.
    pub const fn name(self) -> &'static str {
        match self {
            Variant::DevicePrivate => "device_private",
            Variant::DeviceCoherent => "device_coherent",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one case ended, as its body reports it.
///
/// A panic in the body (a failed `assert!`) is also a failure; the harness
/// turns it into [`Outcome::Fail`] with the panic message.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Outcome {
    /// Every check held.
    Pass,
    /// A check failed; the string says which and why.
    Fail(String),
    /// The case could not run here (`SKIP()` in the kernel); the string says why.
    Skip(String),
}

impl Outcome {
    /// A failure with its reason.
    pub fn fail(reason: impl Into<String>) -> Self {
        Outcome::Fail(reason.into())
    }

    /// A skip with its reason.
    pub fn skip(reason: impl Into<String>) -> Self {
        Outcome::Skip(reason.into())
    }

    /// The reason of a failure or skip; `None` for a pass.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Pass => None,
            Outcome::Fail(reason) | Outcome::Skip(reason) => Some(reason),
        }
    }
}

/// One test of one variant: what the kernel's harness runs in one child.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// The kernel's test name, e.g. `anon_read`.
    pub name: &'static str,
    /// The fixture the test belongs to.
    pub fixture: Fixture,
    /// The variant this instance runs.
    pub variant: Variant,
    /// The body. It receives the variant so one function serves both.
    pub run: fn(Variant) -> Outcome,
}

impl Case {
    /// One case.
    pub const fn new(
        name: &'static str,
        fixture: Fixture,
        variant: Variant,
        run: fn(Variant) -> Outcome,
    ) -> Self {
        Case {
            name,
            fixture,
            variant,
            run,
        }
    }

    /// The test once per variant, as `TEST_F` instantiates it.
    ///
    /// # Examples
    ///
    /// ```
    /// use hmm_conformance::{Case, Fixture, Outcome, Variant};
    ///
    /// fn open_close(_: Variant) -> Outcome {
    ///     Outcome::Pass
    /// }
    /// let [private, coherent] = Case::per_variant("open_close", Fixture::Hmm, open_close);
    /// assert_eq!(private.id(), "open_close/hmm_device_private");
    /// assert_eq!(coherent.id(), "open_close/hmm_device_coherent");
    /// ```
    pub const fn per_variant(
        name: &'static str,
        fixture: Fixture,
        run: fn(Variant) -> Outcome,
    ) -> [Case; 2] {
        [
            Case::new(name, fixture, Variant::DevicePrivate, run),
            Case::new(name, fixture, Variant::DeviceCoherent, run),
        ]
    }

    /// The variant name as the kernel prints it, e.g. `hmm_device_private`.
    pub const fn variant_name(&self) -> &'static str {
        self.fixture.variant_name(self.variant)
    }

    /// `name/variant`, e.g. `anon_read/hmm_device_private`: the key the
    /// harness passes to a child and matches filters against.
    pub fn id(&self) -> String {
        format!("{}/{}", self.name, self.variant_name())
    }

    /// Whether `filter` is a substring of the name or of `name/variant`.
    pub fn matches(&self, filter: &str) -> bool {
        self.name.contains(filter) || self.id().contains(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(_: Variant) -> Outcome {
        Outcome::Pass
    }

    #[test]
    fn variant_names_are_the_kernels() {
        let names: Vec<_> = [Fixture::Hmm, Fixture::Hmm2]
            .into_iter()
            .flat_map(|f| Variant::ALL.map(|v| f.variant_name(v)))
            .collect();
        assert_eq!(
            names,
            [
                "hmm_device_private",
                "hmm_device_coherent",
                "hmm2_device_private",
                "hmm2_device_coherent"
            ]
        );
        for f in [Fixture::Hmm, Fixture::Hmm2] {
            for v in Variant::ALL {
                assert_eq!(f.variant_name(v), format!("{f}_{v}"));
            }
        }
    }

    #[test]
    fn device_numbers_are_the_kernels() {
        assert_eq!(Fixture::Hmm.device_numbers(Variant::DevicePrivate), [0]);
        assert_eq!(Fixture::Hmm.device_numbers(Variant::DeviceCoherent), [2]);
        assert_eq!(Fixture::Hmm2.device_numbers(Variant::DevicePrivate), [0, 1]);
        assert_eq!(
            Fixture::Hmm2.device_numbers(Variant::DeviceCoherent),
            [2, 3]
        );
    }

    #[test]
    fn ids_and_filters() {
        let [p, c] = Case::per_variant("migrate_multiple", Fixture::Hmm2, pass);
        assert_eq!(p.id(), "migrate_multiple/hmm2_device_private");
        assert_eq!(c.variant_name(), "hmm2_device_coherent");
        assert!(p.matches("migrate"));
        assert!(p.matches("multiple/hmm2_device_pr"));
        assert!(!p.matches("coherent"));
        assert!(c.matches("coherent"));
    }

    #[test]
    fn reasons() {
        assert_eq!(Outcome::Pass.reason(), None);
        assert_eq!(Outcome::fail("x").reason(), Some("x"));
        assert_eq!(Outcome::skip("y"), Outcome::Skip("y".into()));
    }
}
