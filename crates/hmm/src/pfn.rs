//! The `hmm_pfn` entry format and the need-fault decision.
//!
//! Models `include/linux/hmm.h` (`enum hmm_pfn_flags`, the 6.16+ layout) and
//! the pure part of `mm/hmm.c`: `hmm_pte_need_fault()` and
//! `hmm_range_need_fault()`.
//!
//! # The entry
//!
//! One [`HmmPfn`] describes one base page of a range, as one `unsigned long`
//! does in the kernel's `hmm_pfns[]` array (64-bit layout):
//!
//! ```text
//!  63    62    61    60         59     58          57..53   52..0
//! VALID WRITE ERROR DMA_MAPPED P2PDMA P2PDMA_BUS  order    PFN
//! REQ_  REQ_
//! FAULT WRITE
//! ```
//!
//! - Bits 63..61 are outputs; on input, bits 63 and 62 are read as the
//!   requests [`HmmPfn::REQ_FAULT`] and [`HmmPfn::REQ_WRITE`] (the same bits
//!   under a second name, as `hmm.h` defines them).
//! - Bits 60..58 ([`INOUT_FLAGS`]) belong to the caller: they survive
//!   `hmm_range_fault()` unchanged ([`HmmPfn::with_output`]).
//! - Bits 57..53 hold the CPU mapping order ([`HmmPfn::map_order`]).
//! - Bits 52..0 hold the page frame number ([`HmmPfn::pfn`]).
//!
//! # The decision
//!
//! The walker (what the page table says) is kept apart from the decider (what
//! the caller needs). The walker computes the CPU flags of a page (`VALID`,
//! `VALID|WRITE` or nothing); [`pte_need_fault`] and [`range_need_fault`] then
//! say whether that state satisfies the caller's request, and nothing here
//! looks at a page table.
//!
//! # Examples
//!
//! Fault a whole range readable, with one page writable (the idiom from
//! `Documentation/mm/hmm.rst`):
//!
//! ```
//! use hmm::pfn::{HmmPfn, NeedFault, range_need_fault};
//!
//! let default_flags = HmmPfn::REQ_FAULT;
//! let pfn_flags_mask = HmmPfn::REQ_WRITE;
//! let entries = [HmmPfn::empty(), HmmPfn::REQ_WRITE, HmmPfn::empty()];
//!
//! // A read-only CPU mapping satisfies pages 0 and 2 but not page 1.
//! let need = range_need_fault(&entries, default_flags, pfn_flags_mask, HmmPfn::VALID);
//! assert_eq!(need, NeedFault::FAULT | NeedFault::WRITE_FAULT);
//!
//! // A pure snapshot never faults, whatever the entries hold.
//! let need = range_need_fault(&entries, HmmPfn::empty(), HmmPfn::empty(), HmmPfn::empty());
//! assert!(need.is_empty());
//! ```

use bitflags::bitflags;

use crate::addr::Pfn;

/// The shift of the order field: `HMM_PFN_ORDER_SHIFT` = `BITS_PER_LONG - 11` (6.16+).
pub const ORDER_SHIFT: u32 = 53;

/// The width mask of the order field once shifted down (`0x1F`, five bits: 53..57).
pub const ORDER_MASK: u64 = 0x1F;

/// The largest order the field can hold.
pub const MAX_ORDER: u32 = ORDER_MASK as u32;

/// The order field in place: bits 53..57.
pub const ORDER_FIELD: u64 = ORDER_MASK << ORDER_SHIFT;

/// Every non-PFN bit: `HMM_PFN_FLAGS` = `~((1 << ORDER_SHIFT) - 1)`, bits 53..63.
pub const FLAGS: u64 = !((1 << ORDER_SHIFT) - 1);

/// The PFN field: bits 0..52, `~HMM_PFN_FLAGS`.
pub const PFN_MASK: u64 = !FLAGS;

/// The named flag bits only (58..63): [`FLAGS`] without the order field.
pub const FLAG_BITS: u64 = FLAGS & !ORDER_FIELD;

/// The bits that belong to the caller and survive a fault unchanged:
/// `HMM_PFN_INOUT_FLAGS` (`mm/hmm.c`) = `DMA_MAPPED | P2PDMA | P2PDMA_BUS`.
pub const INOUT_FLAGS: HmmPfn = HmmPfn::DMA_MAPPED
    .union(HmmPfn::P2PDMA)
    .union(HmmPfn::P2PDMA_BUS);

bitflags! {
    /// One entry of an `hmm_pfns[]` array: `enum hmm_pfn_flags` plus the order
    /// and PFN fields (6.16+ 64-bit layout; see the [module docs](self)).
    ///
    /// Unnamed bits (order and PFN) are retained by every operation, so an
    /// entry round-trips through this type unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use hmm::Pfn;
    /// use hmm::pfn::HmmPfn;
    ///
    /// let e = HmmPfn::new(HmmPfn::VALID | HmmPfn::WRITE, Pfn(0x1234), 9).expect("fits");
    /// assert_eq!(e.bits(), (1 << 63) | (1 << 62) | (9 << 53) | 0x1234);
    /// assert_eq!(e.pfn(), Pfn(0x1234));
    /// assert_eq!(e.map_order(), 9);
    /// assert!(e.contains(HmmPfn::WRITE));
    /// ```
    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
    pub struct HmmPfn: u64 {
        /// Output: the PFN field is valid and the page at least readable (`HMM_PFN_VALID`).
        const VALID = 1 << 63;
        /// Output: the page is writable (`HMM_PFN_WRITE`).
        const WRITE = 1 << 62;
        /// Output: access is impossible; the device must fail it (`HMM_PFN_ERROR`).
        const ERROR = 1 << 61;
        /// Sticky in→out: the caller has DMA-mapped this entry (`HMM_PFN_DMA_MAPPED`, 6.16+).
        const DMA_MAPPED = 1 << 60;
        /// Sticky in→out: the page is P2P memory (`HMM_PFN_P2PDMA`, 6.16+).
        const P2PDMA = 1 << 59;
        /// Sticky in→out: the P2P mapping is a bus address (`HMM_PFN_P2PDMA_BUS`, 6.16+).
        const P2PDMA_BUS = 1 << 58;
        /// Input: the output must end up VALID, faulting if needed (`HMM_PFN_REQ_FAULT`,
        /// the same bit as [`HmmPfn::VALID`]).
        const REQ_FAULT = Self::VALID.bits();
        /// Input: with [`HmmPfn::REQ_FAULT`], the output must end up writable
        /// (`HMM_PFN_REQ_WRITE`, the same bit as [`HmmPfn::WRITE`]). Ignored alone.
        const REQ_WRITE = Self::WRITE.bits();

        // Keep the order and PFN bits through every bitflags operation.
        const _ = !0;
    }
}

impl HmmPfn {
    /// Builds an entry from its flag bits, PFN and mapping order.
    ///
    /// Only the named flag bits of `flags` ([`FLAG_BITS`], 58..63) are used; any
    /// order or PFN bits it carries are dropped, so an existing entry may be
    /// passed to take its flags. The result is `None` rather than a corrupted
    /// entry when `pfn` is wider than the 53-bit PFN field or `order` is larger
    /// than [`MAX_ORDER`].
    ///
    /// # Examples
    ///
    /// ```
    /// use hmm::Pfn;
    /// use hmm::pfn::HmmPfn;
    ///
    /// assert!(HmmPfn::new(HmmPfn::VALID, Pfn(1 << 53), 0).is_none());
    /// assert!(HmmPfn::new(HmmPfn::VALID, Pfn(1), 32).is_none());
    /// assert_eq!(HmmPfn::new(HmmPfn::VALID, Pfn(1), 0), Some(HmmPfn::VALID | HmmPfn::from_bits_retain(1)));
    /// ```
    pub const fn new(flags: HmmPfn, pfn: Pfn, order: u32) -> Option<HmmPfn> {
        if pfn.0 & !PFN_MASK != 0 || order > MAX_ORDER {
            return None;
        }
        let order_bits = (order as u64) << ORDER_SHIFT;
        Some(HmmPfn::from_bits_retain(
            (flags.bits() & FLAG_BITS) | order_bits | pfn.0,
        ))
    }

    /// The page frame number: `entry & ~HMM_PFN_FLAGS` (`hmm_pfn_to_page`).
    ///
    /// Meaningful only when [`HmmPfn::VALID`] is set.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.bits() & PFN_MASK)
    }

    /// The order of the CPU mapping that holds this page
    /// (`hmm_pfn_to_map_order`): the CPU maps it with a `1 << order` page
    /// mapping starting at the order-aligned address.
    ///
    /// Meaningful only when [`HmmPfn::VALID`] is set.
    pub const fn map_order(self) -> u32 {
        ((self.bits() >> ORDER_SHIFT) & ORDER_MASK) as u32
    }

    /// The named flag bits only (58..63), without the order and PFN fields.
    pub const fn flags(self) -> HmmPfn {
        HmmPfn::from_bits_retain(self.bits() & FLAG_BITS)
    }

    /// The effective request of an input entry:
    /// `(entry & pfn_flags_mask) | default_flags` (the first lines of
    /// `hmm_pte_need_fault`).
    ///
    /// # Examples
    ///
    /// ```
    /// use hmm::pfn::HmmPfn;
    ///
    /// // The mask lets the entry's REQ_WRITE through; the default adds REQ_FAULT.
    /// let req = HmmPfn::REQ_WRITE.effective_request(HmmPfn::REQ_FAULT, HmmPfn::REQ_WRITE);
    /// assert_eq!(req, HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE);
    /// // A zero mask ignores whatever the entry holds.
    /// let req = HmmPfn::all().effective_request(HmmPfn::empty(), HmmPfn::empty());
    /// assert!(req.is_empty());
    /// ```
    #[must_use]
    pub const fn effective_request(self, default_flags: HmmPfn, pfn_flags_mask: HmmPfn) -> HmmPfn {
        self.intersection(pfn_flags_mask).union(default_flags)
    }

    /// The output entry that replaces this input entry:
    /// `(old & HMM_PFN_INOUT_FLAGS) | new_bits`.
    ///
    /// The caller's [`INOUT_FLAGS`] survive; every other bit of the input
    /// (requests, stale PFN, stale order) is overwritten.
    ///
    /// # Examples
    ///
    /// ```
    /// use hmm::pfn::HmmPfn;
    ///
    /// let input = HmmPfn::REQ_FAULT | HmmPfn::DMA_MAPPED;
    /// let out = input.with_output(HmmPfn::VALID | HmmPfn::from_bits_retain(7));
    /// assert_eq!(out, HmmPfn::VALID | HmmPfn::DMA_MAPPED | HmmPfn::from_bits_retain(7));
    /// ```
    #[must_use]
    pub const fn with_output(self, new_bits: HmmPfn) -> HmmPfn {
        self.intersection(INOUT_FLAGS).union(new_bits)
    }
}

bitflags! {
    /// What a request needs from the CPU page table (`HMM_NEED_FAULT`,
    /// `HMM_NEED_WRITE_FAULT` in `mm/hmm.c`).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct NeedFault: u8 {
        /// A fault is needed (`HMM_NEED_FAULT`).
        const FAULT = 1 << 0;
        /// The fault must be a write fault (`HMM_NEED_WRITE_FAULT`).
        const WRITE_FAULT = 1 << 1;
    }
}

/// Whether the CPU state `cpu_flags` satisfies the effective request `req`
/// (`hmm_pte_need_fault`, after the mask and default are applied; see
/// [`HmmPfn::effective_request`]).
///
/// - `req` lacks [`HmmPfn::REQ_FAULT`]: nothing is needed (a lone
///   [`HmmPfn::REQ_WRITE`] is ignored).
/// - `req` has [`HmmPfn::REQ_WRITE`] and `cpu_flags` lack [`HmmPfn::WRITE`]:
///   a write fault.
/// - `cpu_flags` lack [`HmmPfn::VALID`]: a fault.
/// - Otherwise nothing.
///
/// # Examples
///
/// ```
/// use hmm::pfn::{HmmPfn, NeedFault, pte_need_fault};
///
/// let rw = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
/// assert_eq!(pte_need_fault(rw, HmmPfn::VALID), NeedFault::FAULT | NeedFault::WRITE_FAULT);
/// assert_eq!(pte_need_fault(HmmPfn::REQ_FAULT, HmmPfn::empty()), NeedFault::FAULT);
/// assert_eq!(pte_need_fault(HmmPfn::REQ_WRITE, HmmPfn::empty()), NeedFault::empty());
/// ```
pub const fn pte_need_fault(req: HmmPfn, cpu_flags: HmmPfn) -> NeedFault {
    if !req.contains(HmmPfn::REQ_FAULT) {
        return NeedFault::empty();
    }
    if req.contains(HmmPfn::REQ_WRITE) && !cpu_flags.contains(HmmPfn::WRITE) {
        return NeedFault::FAULT.union(NeedFault::WRITE_FAULT);
    }
    if !cpu_flags.contains(HmmPfn::VALID) {
        return NeedFault::FAULT;
    }
    NeedFault::empty()
}

/// Whether any of `entries` needs a fault when the CPU state of all of them
/// is `cpu_flags` (`hmm_range_need_fault`): the union of [`pte_need_fault`]
/// over the effective request of every entry.
///
/// When `default_flags | pfn_flags_mask` lacks [`HmmPfn::REQ_FAULT`] no entry
/// can request a fault, and the entries are not looked at. The scan stops
/// early once both bits are needed.
///
/// # Examples
///
/// ```
/// use hmm::pfn::{HmmPfn, NeedFault, range_need_fault};
///
/// let entries = [HmmPfn::empty(); 4];
/// let need = range_need_fault(&entries, HmmPfn::REQ_FAULT, HmmPfn::empty(), HmmPfn::empty());
/// assert_eq!(need, NeedFault::FAULT);
/// ```
pub fn range_need_fault(
    entries: &[HmmPfn],
    default_flags: HmmPfn,
    pfn_flags_mask: HmmPfn,
    cpu_flags: HmmPfn,
) -> NeedFault {
    range_need_fault_iter(
        entries.iter().copied(),
        default_flags,
        pfn_flags_mask,
        cpu_flags,
    )
}

/// [`range_need_fault`] over any source of entries, so that tests can observe
/// which entries the decision reads.
fn range_need_fault_iter(
    entries: impl IntoIterator<Item = HmmPfn>,
    default_flags: HmmPfn,
    pfn_flags_mask: HmmPfn,
    cpu_flags: HmmPfn,
) -> NeedFault {
    // If neither the default nor the mask can carry REQ_FAULT, every effective
    // request lacks it and pte_need_fault() is empty for every entry.
    if !default_flags
        .union(pfn_flags_mask)
        .contains(HmmPfn::REQ_FAULT)
    {
        return NeedFault::empty();
    }
    let mut need = NeedFault::empty();
    for entry in entries {
        let req = entry.effective_request(default_flags, pfn_flags_mask);
        need |= pte_need_fault(req, cpu_flags);
        if need.is_all() {
            break;
        }
    }
    need
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The kernel's values (6.16+ 64-bit layout), written out independently.
    #[test]
    fn golden_bit_positions() {
        assert_eq!(HmmPfn::VALID.bits(), 0x8000_0000_0000_0000);
        assert_eq!(HmmPfn::WRITE.bits(), 0x4000_0000_0000_0000);
        assert_eq!(HmmPfn::ERROR.bits(), 0x2000_0000_0000_0000);
        assert_eq!(HmmPfn::DMA_MAPPED.bits(), 0x1000_0000_0000_0000);
        assert_eq!(HmmPfn::P2PDMA.bits(), 0x0800_0000_0000_0000);
        assert_eq!(HmmPfn::P2PDMA_BUS.bits(), 0x0400_0000_0000_0000);
        assert_eq!(HmmPfn::REQ_FAULT, HmmPfn::VALID);
        assert_eq!(HmmPfn::REQ_WRITE, HmmPfn::WRITE);
        // hmm.h spells them as 1 << (BITS_PER_LONG - k).
        const BITS_PER_LONG: u32 = 64;
        for (flag, k) in [
            (HmmPfn::VALID, 1),
            (HmmPfn::WRITE, 2),
            (HmmPfn::ERROR, 3),
            (HmmPfn::DMA_MAPPED, 4),
            (HmmPfn::P2PDMA, 5),
            (HmmPfn::P2PDMA_BUS, 6),
        ] {
            assert_eq!(flag.bits(), 1 << (BITS_PER_LONG - k), "{flag:?}");
        }
    }

    #[test]
    fn golden_fields() {
        assert_eq!(ORDER_SHIFT, 53);
        assert_eq!(ORDER_SHIFT, u64::BITS - 11);
        assert_eq!(ORDER_MASK, 0x1F);
        assert_eq!(MAX_ORDER, 31);
        assert_eq!(ORDER_FIELD, 0x03E0_0000_0000_0000);
        assert_eq!(FLAGS, 0xFFE0_0000_0000_0000);
        assert_eq!(PFN_MASK, 0x001F_FFFF_FFFF_FFFF);
        assert_eq!(PFN_MASK, (1 << 53) - 1);
        assert_eq!(FLAG_BITS, 0xFC00_0000_0000_0000);
        assert_eq!(INOUT_FLAGS.bits(), 0x1C00_0000_0000_0000);
        assert_eq!(FLAGS, FLAG_BITS | ORDER_FIELD);
        assert_eq!(FLAG_BITS & ORDER_FIELD, 0);
        assert_eq!(FLAGS & PFN_MASK, 0);
        assert_eq!(FLAGS | PFN_MASK, u64::MAX);
    }

    #[test]
    fn golden_need_fault_bits() {
        assert_eq!(NeedFault::FAULT.bits(), 1);
        assert_eq!(NeedFault::WRITE_FAULT.bits(), 2);
        assert_eq!(NeedFault::all().bits(), 3);
    }

    #[test]
    fn the_order_of_known_mappings_fits() {
        // PMD (9 with 4K pages) and PUD (18) leaves.
        let pmd = crate::addr::PMD_SHIFT - crate::addr::PAGE_SHIFT;
        let pud = crate::addr::PUD_SHIFT - crate::addr::PAGE_SHIFT;
        for order in [0, pmd, pud] {
            let e = HmmPfn::new(HmmPfn::VALID, Pfn(42), order).expect("fits");
            assert_eq!(e.map_order(), order);
            assert_eq!(e.pfn(), Pfn(42));
        }
    }

    #[test]
    fn new_rejects_what_does_not_fit() {
        assert_eq!(HmmPfn::new(HmmPfn::empty(), Pfn(PFN_MASK + 1), 0), None);
        assert_eq!(HmmPfn::new(HmmPfn::empty(), Pfn(u64::MAX), 0), None);
        assert_eq!(HmmPfn::new(HmmPfn::empty(), Pfn(0), MAX_ORDER + 1), None);
        let max = HmmPfn::new(HmmPfn::empty(), Pfn(PFN_MASK), MAX_ORDER).expect("fits");
        assert_eq!(max.bits(), !FLAG_BITS);
        assert!(max.flags().is_empty());
    }

    #[test]
    fn debug_names_each_bit_once() {
        let s = format!("{:?}", HmmPfn::VALID | HmmPfn::WRITE);
        assert_eq!(s, "HmmPfn(VALID | WRITE)");
        assert!(format!("{:?}", HmmPfn::VALID | HmmPfn::from_bits_retain(5)).contains("0x5"));
    }

    /// The decision table written out as a plain truth table over the two
    /// request bits and the two CPU bits.
    fn oracle(req_fault: bool, req_write: bool, cpu_valid: bool, cpu_write: bool) -> NeedFault {
        match (req_fault, req_write, cpu_valid, cpu_write) {
            (false, _, _, _) => NeedFault::empty(),
            (true, true, _, false) => NeedFault::FAULT | NeedFault::WRITE_FAULT,
            (true, _, false, _) => NeedFault::FAULT,
            (true, _, true, _) => NeedFault::empty(),
        }
    }

    #[test]
    fn need_fault_matches_the_truth_table_exhaustively() {
        for bits in 0..16u8 {
            let (rf, rw, cv, cw) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
            let mut req = HmmPfn::empty();
            req.set(HmmPfn::REQ_FAULT, rf);
            req.set(HmmPfn::REQ_WRITE, rw);
            let mut cpu = HmmPfn::empty();
            cpu.set(HmmPfn::VALID, cv);
            cpu.set(HmmPfn::WRITE, cw);
            assert_eq!(
                pte_need_fault(req, cpu),
                oracle(rf, rw, cv, cw),
                "req {req:?} cpu {cpu:?}"
            );
        }
    }

    /// An entry source that fails the test if the decision reads it.
    struct Untouchable;

    impl Iterator for Untouchable {
        type Item = HmmPfn;
        fn next(&mut self) -> Option<HmmPfn> {
            panic!("the fast path read an entry");
        }
    }

    #[test]
    fn the_early_exit_stops_reading() {
        // The first entry needs both bits; the second must not be read.
        let entries = [HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE]
            .into_iter()
            .chain(Untouchable);
        let need = range_need_fault_iter(entries, HmmPfn::empty(), HmmPfn::all(), HmmPfn::VALID);
        assert_eq!(need, NeedFault::all());
    }

    fn any_pfn() -> impl Strategy<Value = HmmPfn> {
        any::<u64>().prop_map(HmmPfn::from_bits_retain)
    }

    /// Entries and flags biased towards the interesting bits.
    fn any_flags() -> impl Strategy<Value = HmmPfn> {
        prop_oneof![
            any_pfn(),
            (any::<bool>(), any::<bool>(), any::<u64>()).prop_map(|(f, w, low)| {
                let mut e = HmmPfn::from_bits_retain(low & !FLAG_BITS);
                e.set(HmmPfn::REQ_FAULT, f);
                e.set(HmmPfn::REQ_WRITE, w);
                e
            }),
        ]
    }

    proptest! {
        #[test]
        fn effective_request_rule(e in any_pfn(), d in any_pfn(), m in any_pfn()) {
            let req = e.effective_request(d, m);
            prop_assert_eq!(req.bits(), (e.bits() & m.bits()) | d.bits());
            // Every default bit is in; no entry bit outside the mask is.
            prop_assert!(req.contains(d));
            prop_assert_eq!(req.bits() & !d.bits() & !m.bits(), 0);
        }

        #[test]
        fn need_fault_matches_the_oracle(req in any_pfn(), cpu in any_pfn()) {
            let want = oracle(
                req.bits() >> 63 & 1 == 1,
                req.bits() >> 62 & 1 == 1,
                cpu.bits() >> 63 & 1 == 1,
                cpu.bits() >> 62 & 1 == 1,
            );
            prop_assert_eq!(pte_need_fault(req, cpu), want);
            // Only the two request bits and the two CPU bits matter.
            let strip = |x: HmmPfn| x & (HmmPfn::VALID | HmmPfn::WRITE);
            prop_assert_eq!(pte_need_fault(strip(req), strip(cpu)), want);
        }

        #[test]
        fn range_need_fault_is_the_union(
            entries in prop::collection::vec(any_flags(), 0..64),
            d in any_flags(),
            m in any_flags(),
            cpu in any_flags(),
        ) {
            let want = entries
                .iter()
                .fold(NeedFault::empty(), |acc, e| acc | pte_need_fault(e.effective_request(d, m), cpu));
            prop_assert_eq!(range_need_fault(&entries, d, m, cpu), want);
        }

        #[test]
        fn the_fast_path_reads_no_entry(d in any_pfn(), m in any_pfn(), cpu in any_pfn()) {
            let d = d - HmmPfn::REQ_FAULT;
            let m = m - HmmPfn::REQ_FAULT;
            prop_assert_eq!(range_need_fault_iter(Untouchable, d, m, cpu), NeedFault::empty());
        }

        #[test]
        fn with_output_keeps_exactly_the_inout_bits(old in any_pfn(), new in any_pfn()) {
            let out = old.with_output(new);
            prop_assert_eq!(out.bits(), (old.bits() & INOUT_FLAGS.bits()) | new.bits());
            // Where `new` is clear, the output shows old's INOUT bits and nothing else of old.
            let clear = !new.bits();
            prop_assert_eq!(out.bits() & clear, old.bits() & INOUT_FLAGS.bits() & clear);
            // With nothing new, only the sticky bits remain.
            prop_assert_eq!(old.with_output(HmmPfn::empty()), old & INOUT_FLAGS);
        }

        #[test]
        fn fields_round_trip_without_bleeding(
            flags in any_pfn(),
            pfn in 0..=PFN_MASK,
            order in 0..=MAX_ORDER,
        ) {
            let e = HmmPfn::new(flags, Pfn(pfn), order).expect("in range");
            prop_assert_eq!(e.pfn(), Pfn(pfn));
            prop_assert_eq!(e.map_order(), order);
            prop_assert_eq!(e.flags().bits(), flags.bits() & FLAG_BITS);
            prop_assert_eq!(HmmPfn::new(e.flags(), e.pfn(), e.map_order()), Some(e));
        }

        #[test]
        fn any_entry_splits_into_its_fields(e in any_pfn()) {
            let rebuilt = HmmPfn::new(e.flags(), e.pfn(), e.map_order());
            prop_assert_eq!(rebuilt, Some(e));
        }

        #[test]
        fn out_of_range_parts_are_refused(
            flags in any_pfn(),
            pfn in any::<u64>(),
            order in any::<u32>(),
        ) {
            let fits = pfn <= PFN_MASK && order <= MAX_ORDER;
            prop_assert_eq!(HmmPfn::new(flags, Pfn(pfn), order).is_some(), fits);
        }
    }
}
