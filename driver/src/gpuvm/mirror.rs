//! The registry's notices to a VM (`crate::registry::mirror`): a region's IOVA
//! mapping is about to go away, or to become read-only. The VM runs Xe's order before
//! it returns, and the registry unmaps and unpins only after:
//!
//! 1. under the VM lock: record the host range in the VM's log (an install racing
//!    this notice starts over), find the bindings that point into the region's IOVAs
//!    and mark them not present (read-only for a downgrade);
//! 2. without the lock: wait for the fences of the VM's work, on a VM without
//!    replayable faults (on one with them, work that touches the range later faults
//!    and waits for the handler instead: waiting here could wait for a fault that
//!    needs this very invalidation to end);
//! 3. under the VM lock: zap the entries (clear `W` for a downgrade), free the tables
//!    the range emptied when the cause is `munmap` (or a remap, or teardown), post the
//!    TLB invalidation and wait for it; only then give the freed table pages back.
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
        st.log.record(host.clone());
        let starts: Vec<(u64, u64)> = st
            .by_iova
            .range(iova..iova.saturating_add(len))
            .map(|(&i, &va)| (i, va))
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
            hits.push((start, uid, va));
            if gone {
                st.by_iova.remove(&i);
                // An SVM chunk is made again, maybe of another size, by the next fault.
                if remove_svm && svm {
                    st.bindings.remove(&start);
                }
            }
        }
        let fences = if hits.is_empty() || self.cfg.replayable() {
            Vec::new()
        } else {
            st.fences.clone()
        };
        (hits, fences)
    }
}

impl RangeMirror for VmInner {
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
        if hits.is_empty() {
            return;
        }
        add(&self.stats.invalidations, 1);
        if !fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&fences);
        }
        let knobs = self.knobs();
        let freed = {
            let mut st = self.lock();
            let cx = self.cx();
            let mut ranges = Vec::new();
            let mut freed = Vec::new();
            for (start, _uid, va) in hits {
                // Mapped again meanwhile (a merge or an eviction has no window): its
                // entries are the new ones; the TLB is invalidated all the same.
                let again = st.bindings.get(&start).is_some_and(|b| b.present);
                if !again && !knobs.skip_pte_zap {
                    st.pt.zap(&cx, va.clone());
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
        if hits.is_empty() {
            return;
        }
        add(&self.stats.downgrades, 1);
        if !fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&fences);
        }
        let mut st = self.lock();
        let cx = self.cx();
        let mut ranges = Vec::new();
        for (start, uid, va) in hits {
            if st
                .bindings
                .get(&start)
                .is_some_and(|b| b.uid == uid && b.present && !b.writable)
            {
                st.pt.clear_write(&cx, va.clone());
            }
            ranges.push(va);
        }
        self.tlb_invalidate(&ranges);
    }
}
