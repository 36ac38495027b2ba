//! `FIXTURE(hmm)` and `FIXTURE(hmm2)` of `hmm-tests.c`: the dmirror devices
//! a test runs against, opened by `FIXTURE_SETUP` and closed by
//! `FIXTURE_TEARDOWN` (here: on drop).
//!
//! The setup opens the devices of the variant ([`Fixture::device_numbers`]).
//! As in the kernel, a device-coherent variant whose device cannot be opened
//! is skipped: the library refuses minors 2 and 3 with
//! [`hmm::Error::Unsupported`] until device-coherent memory exists, and the
//! skip carries that error's text. Any other failure to open fails the case
//! (`ASSERT_GE(self->fd, 0)`).

use hmm::testdev::Dmirror;
use hmm::{PAGE_SHIFT, PAGE_SIZE};

use crate::case::{Fixture, Outcome, Variant};
use crate::check::{Check, fail, skip, verdict};

/// `hmm_open(unit)` for the fixture setup of `variant`.
fn hmm_open(unit: u32, variant: Variant) -> Check<Dmirror> {
    Dmirror::open(unit).map_err(|e| match (variant, &e) {
        (Variant::DeviceCoherent, hmm::Error::Unsupported { .. }) => skip(e.to_string()),
        _ => fail(format!(
            "could not open hmm dmirror driver (/dev/hmm_dmirror{unit}): {e}"
        )),
    })
}

/// `hmm_is_coherent_type(dev_num)`: whether the device of that number has
/// device-coherent memory: `dev_num >= HMM_COHERENCE_DEVICE_ONE`, minors 2
/// and 3.
pub(crate) const fn hmm_is_coherent_type(dev_num: u32) -> bool {
    dev_num >= 2
}

/// `FIXTURE(hmm)`: one mirror device.
#[derive(Debug)]
pub(crate) struct Hmm {
    /// `variant->device_number`: the minor of `fd`.
    pub device_number: u32,
    /// `self->fd`: the device of the variant (`/dev/hmm_dmirror0` or `2`).
    pub fd: Dmirror,
    /// `self->page_size`.
    pub page_size: u64,
    /// `self->page_shift`.
    pub page_shift: u32,
}

impl Hmm {
    /// `FIXTURE_SETUP(hmm)`.
    fn setup(variant: Variant) -> Check<Self> {
        let [unit] = *Fixture::Hmm.device_numbers(variant) else {
            return Err(fail("the hmm fixture has one device"));
        };
        Ok(Hmm {
            device_number: unit,
            fd: hmm_open(unit, variant)?,
            page_size: PAGE_SIZE,
            page_shift: PAGE_SHIFT,
        })
    }
}

/// `FIXTURE(hmm2)`: two mirror devices with distinct owners.
#[derive(Debug)]
pub(crate) struct Hmm2 {
    /// `variant->device_number0`: the minor of `fd0`.
    pub device_number0: u32,
    /// `self->fd0`: `/dev/hmm_dmirror0` (or `2`).
    pub fd0: Dmirror,
    /// `self->fd1`: `/dev/hmm_dmirror1` (or `3`).
    pub fd1: Dmirror,
    /// `self->page_size`.
    pub page_size: u64,
    /// `self->page_shift`.
    pub page_shift: u32,
}

impl Hmm2 {
    /// `FIXTURE_SETUP(hmm2)`.
    fn setup(variant: Variant) -> Check<Self> {
        let [unit0, unit1] = *Fixture::Hmm2.device_numbers(variant) else {
            return Err(fail("the hmm2 fixture has two devices"));
        };
        let fd0 = hmm_open(unit0, variant)?;
        let fd1 = hmm_open(unit1, variant)?;
        Ok(Hmm2 {
            device_number0: unit0,
            fd0,
            fd1,
            page_size: PAGE_SIZE,
            page_shift: PAGE_SHIFT,
        })
    }
}

/// Runs `test` in a fresh `hmm` fixture of `variant` (`TEST_F(hmm, …)`).
pub(crate) fn run_hmm(variant: Variant, test: fn(&Hmm) -> Check) -> Outcome {
    verdict(Hmm::setup(variant).and_then(|fixture| test(&fixture)))
}

/// Runs `test` in a fresh `hmm2` fixture of `variant` (`TEST_F(hmm2, …)`).
pub(crate) fn run_hmm2(variant: Variant, test: fn(&Hmm2) -> Check) -> Outcome {
    verdict(Hmm2::setup(variant).and_then(|fixture| test(&fixture)))
}
