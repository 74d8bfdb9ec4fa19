//! IOVA space allocation: first-fit over the domain's usable ranges, with alignment,
//! coalescing frees so space is reused.
//!
//! Not IOVA = VA: some IOMMUs only translate 39 bits, and a device address space that is
//! independent of the host layout keeps mappings dense. Written here because the
//! allocator is twenty lines over a `BTreeMap`, and every IOVA allocator crate found
//! pulls a VMM framework with it.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;

/// Free IOVA space, as disjoint `[start, end)` ranges keyed by start.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    free: BTreeMap<u64, u64>,
}

impl IovaAllocator {
    /// All of `ranges` free.
    pub fn new(ranges: &[Range<u64>]) -> IovaAllocator {
        let mut a = IovaAllocator {
            free: BTreeMap::new(),
        };
        for r in ranges {
            if r.start < r.end {
                a.insert_free(r.start, r.end);
            }
        }
        a
    }

    /// Allocate `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        self.alloc_congruent(len, align, 0)
    }

    /// Allocate `len` bytes at an address `a` with `a % align == phase`: a host range
    /// backed by huge pages that starts `phase` bytes into a huge page gets an IOVA
    /// with the same offset, so the IOMMU can map it with large pages too.
    pub fn alloc_congruent(&mut self, len: u64, align: u64, phase: u64) -> Result<u64> {
        debug_assert!(align.is_power_of_two() && phase < align);
        if len == 0 {
            return Err(Error::ZeroLength { addr: 0 });
        }
        let found = self.free.iter().find_map(|(&start, &end)| {
            // The first aligned address at or after start, then the lowest address
            // with the right phase at or after start (possibly in the block before).
            let base = start.checked_add(align - 1)? & !(align - 1);
            let a = match base.checked_sub(align) {
                Some(prev) if prev + phase >= start => prev + phase,
                _ => base.checked_add(phase)?,
            };
            let e = a.checked_add(len)?;
            (e <= end).then_some((start, end, a, e))
        });
        let (start, end, a, e) = found.ok_or(Error::IovaExhausted { len, align })?;
        self.free.remove(&start);
        if start < a {
            self.free.insert(start, a);
        }
        if e < end {
            self.free.insert(e, end);
        }
        Ok(a)
    }

    /// Return `[iova, iova + len)`, which must have come from `alloc`.
    pub fn free(&mut self, iova: u64, len: u64) {
        self.insert_free(iova, iova + len);
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    fn insert_free(&mut self, mut start: u64, mut end: u64) {
        // Merge with the range before, if it touches.
        if let Some((&ps, &pe)) = self.free.range(..=start).next_back() {
            debug_assert!(pe <= start, "double free of IOVA {start:#x}");
            if pe == start {
                self.free.remove(&ps);
                start = ps;
            }
        }
        // Merge with the range after, if it touches.
        if let Some(&ne) = self.free.get(&end) {
            self.free.remove(&end);
            end = ne;
        }
        self.free.insert(start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aligns_reuses_and_exhausts() {
        let mut a = IovaAllocator::new(&[0x1000..0x10_0000]);
        let x = a.alloc(0x1000, 0x1000).unwrap();
        let y = a.alloc(0x2000, 0x10000).unwrap();
        assert_eq!(x, 0x1000);
        assert_eq!(y % 0x10000, 0);
        a.free(x, 0x1000);
        assert_eq!(a.alloc(0x1000, 0x1000).unwrap(), 0x1000);
        assert!(matches!(
            a.alloc(0x100_0000, 0x1000),
            Err(Error::IovaExhausted { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_overlaps_and_frees_everything(ops in proptest::collection::vec((1u64..64, 0u32..4, any::<bool>()), 1..100)) {
            let total = 0x1000u64 * 256;
            let mut a = IovaAllocator::new(&[0x1000..0x1000 + total]);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (pages, align_log, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (s, l) = live.swap_remove(0);
                    a.free(s, l);
                    continue;
                }
                let len = pages * 0x1000;
                let align = 0x1000u64 << align_log;
                let phase = (pages * 0x1000) % align;
                if let Ok(s) = a.alloc_congruent(len, align, phase) {
                    prop_assert_eq!(s % align, phase);
                    prop_assert!(s >= 0x1000 && s + len <= 0x1000 + total);
                    for &(o, ol) in &live {
                        prop_assert!(s + len <= o || o + ol <= s, "overlap");
                    }
                    live.push((s, len));
                }
            }
            for (s, l) in live.drain(..) {
                a.free(s, l);
            }
            prop_assert_eq!(a.free_bytes(), total);
            prop_assert_eq!(a.free.len(), 1);
        }
    }
}
