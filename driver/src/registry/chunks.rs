//! A region's chunks: a large region is mapped as pieces of
//! [`RegistryConfig::chunk_size`](super::RegistryConfig::chunk_size) (2 MiB by default,
//! as `drm_gpusvm` does), each its own IOMMU mapping, at `iova + offset` inside one IOVA
//! range the region reserves whole. Neither VFIO type1 nor io_uring can split a
//! mapping, so without chunks a 4 KiB discard inside a 16 MiB region costs re-pinning
//! the other 16 MiB; with them it costs re-pinning one chunk, on the next use.
//!
//! Two states per chunk, each with its own rule:
//! * **present** (an atomic per chunk): the chunk's translation may be used by a new
//!   submission. Written only under the exclusive notifier lock (a partial
//!   invalidation clears it, a chunk re-pin sets it), read under the shared one: the
//!   cache-hit test of `resolve` and `lookup_all_hits`. A clear always comes with an
//!   epoch bump of the region in the same exclusive section, so a submission that
//!   looked before it fails `read_retry`.
//! * **mapped** (under the region's [`Maps`] mutex): the chunk has an IOMMU mapping
//!   now. Whoever adds or removes a mapping, or gives the reservation back, holds the
//!   mutex: the invalidation that cleared `present` (after its fence wait), a chunk
//!   re-pin, and the region's unmap (which unmaps every mapped chunk and releases the
//!   reservation, after which nothing maps there again: `released`). A chunk whose
//!   `present` is clear but which is still mapped is being unmapped by an
//!   invalidation; a re-pin maps only chunks that are not mapped.
//!
//! Lock order: a region's `Maps` mutex may be held while taking the notifier lock
//! (a re-pin installs under it), never the other way round. Whoever holds it also
//! holds the region ([`Held`](super::region::Held)), or has it out of the index, so
//! eviction (which takes only unheld regions, and then their mutex) never waits for
//! a mutex its caller holds.
//!
//! A region of one chunk (small, or chunking off, or a domain with few mapping slots)
//! behaves as a region always did: a partial invalidation drops and splits it. A
//! partial permission downgrade drops and splits a chunked region too (a chunk re-pinned
//! writable over newly write-protected pages would fail).
//!
//! `driver/tests/loom_chunks.rs` model-checks a chunk's invalidation against a spanning
//! submission and its re-pin; `tests/registry_chunks.rs` and the proptest model
//! (`tests/registry_model.rs`, run with 4-page chunks) check the behaviour on the
//! reference device.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A region's chunk geometry and per-chunk states (see the module docs).
#[derive(Debug)]
pub(super) struct Chunks {
    range: Range<u64>,
    /// Chunk `k` is `[base + k * size, base + (k + 1) * size)` clipped to `range`.
    base: u64,
    size: u64,
    present: Box<[AtomicBool]>,
    maps: Mutex<Maps>,
}

/// What a region's mutex protects: which chunks have an IOMMU mapping.
#[derive(Debug)]
pub(super) struct Maps {
    pub(super) mapped: Vec<bool>,
    /// The reservation went back to the driver: nothing maps into it again.
    pub(super) released: bool,
}

/// The geometry for `range`: chunks of `chunk` bytes (a power of two; 0: one chunk),
/// aligned to their size, doubled until there are at most `cap` of them. A range no
/// larger than a chunk is one chunk.
pub(super) fn geometry(range: &Range<u64>, chunk: u64, cap: usize) -> (u64, u64, usize) {
    let len = range.end - range.start;
    if chunk == 0 || len <= chunk || cap <= 1 {
        return (range.start, len, 1);
    }
    let mut size = chunk;
    loop {
        let base = range.start & !(size - 1);
        let n = (range.end - base).div_ceil(size) as usize;
        if n <= cap || size >= len {
            return (base, size, n);
        }
        size <<= 1;
    }
}

impl Chunks {
    /// The chunks of `range` (see [`geometry`]), all present and mapped.
    pub(super) fn new(range: Range<u64>, chunk: u64, cap: usize) -> Chunks {
        let (base, size, n) = geometry(&range, chunk, cap);
        Chunks {
            range,
            base,
            size,
            present: (0..n).map(|_| AtomicBool::new(true)).collect(),
            maps: Mutex::new(Maps {
                mapped: vec![true; n],
                released: false,
            }),
        }
    }

    pub(super) fn count(&self) -> usize {
        self.present.len()
    }

    /// Chunk `k`'s host range.
    pub(super) fn range_of(&self, k: usize) -> Range<u64> {
        let s = self.base + k as u64 * self.size;
        s.max(self.range.start)..(s + self.size).min(self.range.end)
    }

    /// Chunk `k`'s offset from the region's start (its IOVA is the region's plus this).
    pub(super) fn offset_of(&self, k: usize) -> u64 {
        self.range_of(k).start - self.range.start
    }

    /// The chunks `pages` touches (clipped to the region).
    pub(super) fn touching(&self, pages: &Range<u64>) -> Range<usize> {
        let s = pages.start.max(self.range.start);
        let e = pages.end.min(self.range.end);
        if s >= e {
            return 0..0;
        }
        ((s - self.base) / self.size) as usize..((e - 1 - self.base) / self.size) as usize + 1
    }

    /// Whether every chunk `pages` touches is present. Under the notifier lock (either
    /// side).
    pub(super) fn present(&self, pages: &Range<u64>) -> bool {
        // Relaxed: written only under the exclusive notifier lock, which orders it.
        self.touching(pages)
            .all(|k| self.present[k].load(Ordering::Relaxed))
    }

    /// Whether chunk `k` is present. Under the notifier lock (either side).
    pub(super) fn is_present(&self, k: usize) -> bool {
        // Relaxed: written only under the exclusive notifier lock, which orders it.
        self.present[k].load(Ordering::Relaxed)
    }

    /// Clear chunk `k`'s present bit; returns whether it was set. Under the exclusive
    /// notifier lock.
    pub(super) fn take_present(&self, k: usize) -> bool {
        // Relaxed: under the exclusive notifier lock.
        self.present[k].swap(false, Ordering::Relaxed)
    }

    /// Set chunk `k`'s present bit. Under the exclusive notifier lock, with the chunk
    /// mapped.
    pub(super) fn set_present(&self, k: usize) {
        // Relaxed: under the exclusive notifier lock.
        self.present[k].store(true, Ordering::Relaxed)
    }

    /// The mapped states (see the module docs for who takes it and in what order).
    pub(super) fn maps(&self) -> crate::driver_section::Locked<MutexGuard<'_, Maps>> {
        crate::driver_section::lock(&self.maps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const M: u64 = 1 << 20;

    #[test]
    fn small_ranges_are_one_chunk_and_large_ones_aligned_pieces() {
        let c = Chunks::new(0x1000..0x3000, 2 * M, 100);
        assert_eq!((c.count(), c.range_of(0)), (1, 0x1000..0x3000));
        // 16 MiB starting 4 KiB past a 2 MiB boundary: 9 chunks, the ends clipped.
        let r = 2 * M + 0x1000..18 * M + 0x1000;
        let c = Chunks::new(r.clone(), 2 * M, 100);
        assert_eq!(c.count(), 9);
        assert_eq!(c.range_of(0), r.start..4 * M);
        assert_eq!(c.range_of(8), 18 * M..r.end);
        assert_eq!(c.offset_of(1), 4 * M - r.start);
        assert_eq!(c.touching(&(r.start..r.start + 0x1000)), 0..1);
        assert_eq!(c.touching(&(4 * M - 0x1000..4 * M + 0x1000)), 0..2);
        assert_eq!(c.touching(&(0..u64::MAX)), 0..9);
        assert_eq!(c.touching(&(0..0x1000)), 0..0);
        let covered: u64 = (0..9).map(|k| c.range_of(k)).map(|x| x.end - x.start).sum();
        assert_eq!(covered, r.end - r.start);
    }

    #[test]
    fn the_chunk_grows_to_stay_within_the_cap_and_one_slot_means_one_chunk() {
        let c = Chunks::new(0..64 * M, 2 * M, 8);
        assert_eq!((c.count(), c.range_of(0)), (8, 0..8 * M));
        assert_eq!(Chunks::new(0..64 * M, 2 * M, 1).count(), 1);
        assert_eq!(Chunks::new(0..64 * M, 0, 1000).count(), 1);
    }

    #[test]
    fn present_follows_every_touched_chunk() {
        let c = Chunks::new(0..8 * M, 2 * M, 100);
        assert!(c.present(&(0..8 * M)));
        assert!(c.take_present(2));
        assert!(!c.take_present(2));
        assert!(!c.present(&(0..8 * M)));
        assert!(!c.present(&(5 * M..5 * M + 1)));
        assert!(c.present(&(0..4 * M)) && c.present(&(6 * M..8 * M)));
        c.set_present(2);
        assert!(c.present(&(0..8 * M)));
    }
}
