//! The registry's notices to a VM (`crate::registry::mirror`): a region's IOVA
//! mapping is about to go away, or to become read-only. The VM runs Xe's order before
//! it returns, and the registry unmaps and unpins only after:
//!
//! 0. for an invalidation of the address space (`invalidating`, told before the
//!    registry waits and unmaps): wait for the VM's work when a binding mirrors the
//!    range, on a VM without replayable faults;
//! 1. under the VM lock: record the region's IOVA range in the VM's log (an install
//!    of an entry pointing there, racing this notice, starts over), find the
//!    bindings that point into the region's IOVAs and mark them not present
//!    (read-only for a downgrade);
//! 2. without the lock: wait for the fences of the VM's work when a binding mirrors
//!    the range (present or not), on a VM without replayable faults (on one with
//!    them, work that touches the range later faults and waits for the handler
//!    instead: waiting here could wait for a fault that needs this very
//!    invalidation to end);
//! 3. under the VM lock: zap the entries that still point into the region (clear
//!    `W` for a downgrade), free the tables the range emptied when the cause is
//!    `munmap` (or a remap, or teardown), post the TLB invalidation and wait for it;
//!    only then give the freed table pages back.
//!
//! Per-cause policy (seed 002): `munmap` frees the page-table pages of the range; a
//! destructive `madvise`, `PROT_NONE`, an eviction or a merge zap and keep them; a
//! downgrade clears the write bits and keeps the pin; an upgrade does nothing (the
//! next write fault restores the bit).

use super::stats::add;
use super::vm::{wait_fences, Kind, VmInner};
use crate::registry::{Cause, RangeMirror, UnmapReason};
use std::ops::Range;

impl VmInner {
    /// Step 1: the bindings pointing into `[iova, iova + len)`, as `(first VA, uid,
    /// VA range)`, updated by `mark`; and the fences to wait for.
    #[allow(clippy::type_complexity)]
    fn notice(
        &self,
        host: &Range<u64>,
        iova: u64,
        len: u64,
        mark: impl Fn(&mut super::vm::Bound) -> bool,
        remove_svm: bool,
    ) -> (
        Vec<(u64, u64, Range<u64>)>,
        Vec<(std::sync::Weak<dyn crate::submitter::FenceTracker>, u64)>,
    ) {
        let mut st = self.lock();
        let window = iova..iova.saturating_add(len);
        let g = st.log.record(window.clone());
        tracing::trace!(
            vm = self.id,
            iova,
            len,
            host_start = host.start,
            host_end = host.end,
            gen = g,
            "notice"
        );
        let starts: Vec<(u64, u64)> = st
            .by_iova
            .range((window.start, 0)..(window.end, 0))
            .copied()
            .collect();
        let mut hits = Vec::new();
        for (i, start) in starts {
            let Some(b) = st.bindings.get_mut(&start) else {
                continue;
            };
            if !mark(b) {
                continue;
            }
            let (uid, va, gone, svm) =
                (b.uid, b.va.clone(), !b.present, matches!(b.kind, Kind::Svm));
            tracing::trace!(vm = self.id, va = va.start, "notice hit");
            hits.push((start, uid, va));
            if gone {
                st.by_iova.remove(&(i, start));
                // An SVM chunk is made again, maybe of another size, by the next fault.
                if remove_svm && svm {
                    st.bindings.remove(&start);
                }
            }
        }
        // Work on the range is waited for whenever a binding mirrors it, present or
        // not (as Xe's userptr notifier waits on the VM): a command submitted while
        // a binding was present may still run.
        let mirrored = !hits.is_empty() || Self::mirrors(&st, host);
        let fences = if !mirrored || self.cfg.replayable() {
            Vec::new()
        } else {
            st.fences.clone()
        };
        (hits, fences)
    }
}

impl VmInner {
    /// Whether a binding mirrors part of the host range `host` (present or not).
    fn mirrors(st: &super::vm::VmState, host: &Range<u64>) -> bool {
        st.bindings.values().any(|b| {
            b.host
                .as_ref()
                .is_some_and(|h| h.start < host.end && host.start < h.end)
        })
    }
}

impl RangeMirror for VmInner {
    fn invalidating(&self, host: Range<u64>, _cause: Cause) {
        // Step 0, for an invalidation of the address space: the VM's work on the
        // range is waited for even where the registry holds no region for it any more
        // (one another invalidation is retiring, or none: a binding whose re-pin
        // failed), as Xe's userptr notifier waits on the VM. Not on a VM with
        // replayable faults (see step 2).
        if self.cfg.replayable() {
            return;
        }
        let _section = crate::driver_section::enter();
        let fences = {
            let st = self.lock();
            if Self::mirrors(&st, &host) {
                st.fences.clone()
            } else {
                Vec::new()
            }
        };
        if !fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&fences);
        }
    }

    fn unmapping(&self, host: Range<u64>, iova: u64, len: u64, reason: UnmapReason) {
        let _section = crate::driver_section::enter();
        let free_tables = matches!(
            reason,
            UnmapReason::Invalidation(Cause::Unmap | Cause::Remap { .. } | Cause::Release)
        );
        let (hits, fences) = self.notice(
            &host,
            iova,
            len,
            |b| {
                let was = b.present;
                b.present = false;
                b.iova = None;
                was
            },
            true,
        );
        if !fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&fences);
        }
        if hits.is_empty() {
            return;
        }
        add(&self.stats.invalidations, 1);
        let knobs = self.knobs();
        let freed = {
            let mut st = self.lock();
            let cx = self.cx();
            let mut ranges = Vec::new();
            let mut freed = Vec::new();
            let window = iova..iova.saturating_add(len);
            for (_start, _uid, va) in hits {
                // Only entries that still point into the region: a binding mapped
                // again meanwhile (a merge or an eviction has no window) points at
                // the region that replaced it. The TLB is invalidated all the same.
                if !knobs.skip_pte_zap {
                    st.pt.zap_into(&cx, va.clone(), &window);
                    if free_tables {
                        freed.extend(st.pt.free_empty(&cx, va.clone()));
                    }
                }
                ranges.push(va);
            }
            self.tlb_invalidate(&ranges);
            freed
        };
        // After the TLB invalidation: no walk in flight reads these tables any more.
        self.cx().free_pages(&freed);
    }

    fn downgrading(&self, host: Range<u64>, iova: u64, len: u64) {
        let _section = crate::driver_section::enter();
        let (hits, fences) = self.notice(
            &host,
            iova,
            len,
            |b| {
                let was = b.present && b.writable;
                b.writable = false;
                was
            },
            false,
        );
        if !fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&fences);
        }
        if hits.is_empty() {
            return;
        }
        add(&self.stats.downgrades, 1);
        let mut st = self.lock();
        let cx = self.cx();
        let mut ranges = Vec::new();
        let window = iova..iova.saturating_add(len);
        for (_start, _uid, va) in hits {
            st.pt.clear_write_into(&cx, va.clone(), &window);
            ranges.push(va);
        }
        self.tlb_invalidate(&ranges);
    }
}
