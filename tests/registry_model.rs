//! proptest: the registry's merge, split and invalidation logic against a naive model
//! (a set of pinned pages per permission), on the reference device with real pins.
//!
//! After every operation: regions of one permission never overlap; every page the
//! model says a live registration needs is covered by a region of its permission; no
//! region overlaps a range invalidated since it was needed; the registry's pinned-byte
//! count equals the sum of its regions; and `VmPin` agrees with the registry.

mod common;

use common::{Anon, PinCheck};
use proptest::prelude::*;
use std::collections::BTreeSet;
use userptr::{Cause, Driver, Perm, Registry, RegistryConfig};

const PAGES: usize = 64;
const PAGE: usize = 4096;

#[derive(Clone, Debug)]
enum Op {
    Register {
        page: usize,
        pages: usize,
        write: bool,
    },
    Invalidate {
        page: usize,
        pages: usize,
        cause: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PAGES, 1usize..12, any::<bool>()).prop_map(|(page, pages, write)| Op::Register { page, pages, write }),
        1 => (0..PAGES, 1usize..20, 0u8..3).prop_map(|(page, pages, cause)| Op::Invalidate { page, pages, cause }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn merges_splits_and_invalidations_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let pins = PinCheck::start();
        let drv = Driver::reference().unwrap();
        let reg = Registry::new(drv.clone(), RegistryConfig::default());
        let buf = Anon::new(PAGES * PAGE);
        let page_addr = |p: usize| (buf.addr + p * PAGE) as u64;
        // Pages that a registration made since the last invalidation of them needs
        // covered, per permission (0: read, 2: read-write).
        let mut needed: [BTreeSet<usize>; 3] = Default::default();
        for op in ops {
            match op {
                Op::Register { page, pages, write } => {
                    let end = (page + pages).min(PAGES);
                    let perm = if write { Perm::READ_WRITE } else { Perm::READ };
                    reg.register(buf.addr + page * PAGE, (end - page) * PAGE, perm).unwrap();
                    needed[if write { 2 } else { 0 }].extend(page..end);
                }
                Op::Invalidate { page, pages, cause } => {
                    let end = (page + pages).min(PAGES);
                    let cause = [Cause::Unmap, Cause::Discard, Cause::Protect { new_prot: libc::PROT_NONE }][cause as usize];
                    reg.invalidate(page_addr(page)..page_addr(end), cause).unwrap();
                    for n in &mut needed {
                        for p in page..end {
                            n.remove(&p);
                        }
                    }
                    // Nothing may still cover an invalidated page.
                    for r in reg.regions() {
                        prop_assert!(r.range.end <= page_addr(page) || page_addr(end) <= r.range.start,
                            "region {:x?} survived the invalidation of pages {}..{}", r.range, page, end);
                    }
                }
            }
            let regions = reg.regions();
            for slot in [0usize, 2] {
                let perm = if slot == 2 { Perm::READ_WRITE } else { Perm::READ };
                let mut mine: Vec<_> = regions.iter().filter(|r| r.perm == perm).map(|r| r.range.clone()).collect();
                mine.sort_by_key(|r| r.start);
                for w in mine.windows(2) {
                    prop_assert!(w[0].end <= w[1].start, "regions overlap: {:x?}", w);
                }
                for &p in &needed[slot] {
                    let a = page_addr(p);
                    prop_assert!(mine.iter().any(|r| r.start <= a && a + PAGE as u64 <= r.end),
                        "page {} ({:?}) is not covered", p, perm);
                }
            }
            let sum: u64 = regions.iter().map(|r| r.range.end - r.range.start).sum();
            prop_assert!(reg.pinned_bytes() >= sum, "pinned {} < regions {}", reg.pinned_bytes(), sum);
        }
        // Drained retirees aside, the pinned count is exactly the regions'.
        reg.clear().unwrap();
        prop_assert_eq!(reg.pinned_bytes(), 0);
        prop_assert_eq!(reg.mappings(), 0);
        drop((reg, drv));
        pins.check();
    }
}
