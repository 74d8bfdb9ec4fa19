//! Device-side mirrors of registered ranges: a GPU VM whose page tables point at the
//! IOVAs of the registry's regions (`gpuvm`, a layer above) must take those entries
//! away **before** the registry unmaps the IOVA and unpins, and make them read-only
//! before the IOMMU mapping becomes read-only (Xe's order: wait for the fences, zap
//! the PTEs, invalidate the TLB, then unmap and unpin).
//!
//! The registry tells every mirror (registered with [`crate::Registry::add_mirror`],
//! held weakly) outside its locks, on the thread that unmaps, after the region left
//! the index (so nothing resolves to it any more) and after the region's own fences
//! were waited for. A mirror must not call back into the registry from these calls.

use super::Cause;
use std::ops::Range;

/// Why a region's device mapping goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmapReason {
    /// An invalidation of the address space, for `Cause` (its policy decides what a
    /// mirror frees: `munmap` frees the page tables of the range, a discard keeps
    /// them).
    Invalidation(Cause),
    /// The registry evicted the idle region (pin budget, mapping limit): the memory
    /// is still there and may be pinned again.
    Eviction,
    /// The region was merged into a larger one that covers it: the memory is still
    /// there, now at the new region's IOVA.
    Merge,
}

/// A device-side mirror of registered ranges (see the module docs).
pub trait RangeMirror: Send + Sync {
    /// An invalidation of the host range `host` for `cause` has begun (its window is
    /// open), before the registry waits for its own fences and unmaps: the mirror
    /// waits for its device work on the range, whichever regions are (or are no
    /// longer) pinned for it. Told for every invalidation that drops or downgrades.
    fn invalidating(&self, host: Range<u64>, cause: Cause) {
        let _ = (host, cause);
    }

    /// The region `host` (whole pages), mapped at `iova` for `len` bytes, is about to
    /// be unmapped from the IOMMU and unpinned. When this returns, the device must no
    /// longer reach `[iova, iova + len)` through the mirror.
    fn unmapping(&self, host: Range<u64>, iova: u64, len: u64, reason: UnmapReason);

    /// The region `host` at `iova` is about to become device-read-only (a protection
    /// downgrade): the pin stays. When this returns, the device must no longer write
    /// `[iova, iova + len)` through the mirror.
    fn downgrading(&self, host: Range<u64>, iova: u64, len: u64);
}

impl super::Registry {
    /// Add a device-side mirror (see the module docs). Held weakly: a mirror that is
    /// dropped is forgotten.
    pub fn add_mirror(&self, m: std::sync::Weak<dyn RangeMirror>) {
        let mut ms = crate::driver_section::lock(&self.inner.mirrors);
        ms.retain(|w| w.strong_count() > 0);
        ms.push(m);
    }
}

impl super::Inner {
    fn live_mirrors(&self) -> Vec<std::sync::Arc<dyn RangeMirror>> {
        let ms = crate::driver_section::lock(&self.mirrors);
        ms.iter().filter_map(|w| w.upgrade()).collect()
    }

    pub(super) fn tell_invalidating(&self, host: &Range<u64>, cause: Cause) {
        for m in self.live_mirrors() {
            m.invalidating(host.clone(), cause);
        }
    }

    pub(super) fn tell_unmapping(&self, r: &super::region::Region, why: UnmapReason) {
        self.tell_unmapping_range(r.range.clone(), r.iova, r.len(), why);
    }

    /// Part of a region (chunks) is about to be unmapped: `host` at `iova`.
    pub(super) fn tell_unmapping_range(
        &self,
        host: Range<u64>,
        iova: u64,
        len: u64,
        why: UnmapReason,
    ) {
        for m in self.live_mirrors() {
            m.unmapping(host.clone(), iova, len, why);
        }
    }

    /// Regions out of the index that an invalidation of the range does not unmap
    /// itself (another one is retiring them, or a merge left them draining): the
    /// mirrors drop their entries for them now, so none survives the invalidation.
    pub(super) fn tell_stale(&self, stale: &[std::sync::Arc<super::region::Region>], cause: Cause) {
        for r in stale {
            self.tell_unmapping(r, UnmapReason::Invalidation(cause));
        }
    }

    pub(super) fn tell_downgrading(&self, r: &super::region::Region) {
        for m in self.live_mirrors() {
            m.downgrading(r.range.clone(), r.iova, r.len());
        }
    }
}
