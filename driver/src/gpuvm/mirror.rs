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
//! 3. under the VM lock: zap the marked bindings' entries that still point where
//!    they pointed when marked (clear `W` for a downgrade): all of each binding, even
//!    where a late notice's window covers only part of it; free the tables the range
//!    emptied when the cause is `munmap` (or a remap, or teardown), post the TLB
//!    invalidation and wait for it; only then give the freed table pages back.
//!
//! Two notices may cover one region (the registry tells an invalidation about a
//! region a merge, an eviction or another invalidation is unmapping: `stale`). The
//! first one's step 1 marks the bindings; the second finds them marked already and
//! has no hits of its own, while their entries are still present until the first
//! one's step 3. Returning then would let the address-space change go ahead with the
//! device still translating to the old pages (pinned until the first notice's thread
//! gets to the unmap). So each notice is listed as [`Pending`] from step 1 to the end
//! of step 3, and a notice whose window overlaps a pending one's zaps (or clears the
//! write bits of) that one's VA ranges too, into its own window, and waits for its
//! own TLB invalidation: whichever thread finishes first, no entry into the window is
//! left when either returns.
//!
//! Per-cause policy (seed 002): `munmap` frees the page-table pages of the range; a
//! destructive `madvise`, `PROT_NONE`, an eviction or a merge zap and keep them; a
//! downgrade clears the write bits and keeps the pin; an upgrade does nothing (the
//! next write fault restores the bit).

use super::stats::add;
use super::vm::{wait_fences, Kind, VmInner};
use crate::registry::{Cause, RangeMirror, UnmapReason};
use std::ops::Range;

/// A notice between its step 1 and the end of its step 3 (see the module docs).
#[derive(Debug)]
pub(super) struct Pending {
    id: u64,
    /// The bindings it marked.
    vas: Vec<Target>,
}

/// A marked binding: its VA range, and the IOVA range its entries pointed at when
/// it was marked (the entries step 3 takes away or makes read-only; entries mapped
/// again meanwhile point elsewhere and stay).
#[derive(Clone, Debug)]
struct Target {
    va: Range<u64>,
    iova: Range<u64>,
}

/// What step 1 found.
struct Notice {
    /// This notice's entry in `pending`.
    id: u64,
    /// The entries step 3 takes away: of the bindings this notice marked, and those
    /// pending notices marked that point into this notice's window.
    vas: Vec<Target>,
    /// Whether this notice marked a binding itself (counted as an invalidation).
    hit: bool,
    fences: Vec<(std::sync::Weak<dyn crate::submitter::FenceTracker>, u64)>,
}

impl VmInner {
    /// Step 1: mark the bindings pointing into `[iova, iova + len)` with `mark`, list
    /// this notice as pending, and gather the VA ranges step 3 must clean (see
    /// [`Notice`]) and the fences to wait for.
    fn notice(
        &self,
        host: &Range<u64>,
        iova: u64,
        len: u64,
        mark: impl Fn(&mut super::vm::Bound) -> bool,
        remove_svm: bool,
    ) -> Notice {
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
        let mut mine = Vec::new();
        for (i, start) in starts {
            let Some(b) = st.bindings.get_mut(&start) else {
                continue;
            };
            // Where the binding's entries point now: all of them go (or lose `W`) in
            // step 3, also those outside the window (a notice of a region already
            // unmapped whose IOVAs were reused may cover only part of a binding's span:
            // marking the binding while leaving some of its entries would orphan them).
            let target = i..i + (b.va.end - b.va.start);
            if !mark(b) {
                continue;
            }
            let (va, gone, svm) = (b.va.clone(), !b.present, matches!(b.kind, Kind::Svm));
            tracing::trace!(vm = self.id, va = va.start, "notice hit");
            mine.push(Target { va, iova: target });
            if gone {
                st.by_iova.remove(&(i, start));
                // An SVM chunk is made again, maybe of another size, by the next fault.
                if remove_svm && svm {
                    st.bindings.remove(&start);
                }
            }
        }
        let mut vas = mine.clone();
        for p in &st.pending {
            vas.extend(
                p.vas
                    .iter()
                    .filter(|t| t.iova.start < window.end && window.start < t.iova.end)
                    .cloned(),
            );
        }
        let id = st.uid();
        st.pending.push(Pending {
            id,
            vas: mine.clone(),
        });
        // Work on the range is waited for whenever a binding mirrors it, present or
        // not (as Xe's userptr notifier waits on the VM): a command submitted while
        // a binding was present may still run.
        let mirrored = !vas.is_empty() || Self::mirrors(&st, host);
        let fences = if !mirrored || self.cfg.replayable() {
            Vec::new()
        } else {
            st.fences.clone()
        };
        Notice {
            id,
            vas,
            hit: !mine.is_empty(),
            fences,
        }
    }

    /// The end of step 3: this notice is no longer pending.
    fn done(st: &mut super::vm::VmState, id: u64) {
        st.pending.retain(|p| p.id != id);
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
        let n = self.notice(
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
        if !n.fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&n.fences);
        }
        if n.vas.is_empty() {
            Self::done(&mut self.lock(), n.id);
            return;
        }
        if n.hit {
            add(&self.stats.invalidations, 1);
        }
        let knobs = self.knobs();
        if knobs.notice_pause_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(
                knobs.notice_pause_ms.into(),
            ));
        }
        let freed = {
            let mut st = self.lock();
            let cx = self.cx();
            let mut ranges = Vec::new();
            let mut freed = Vec::new();
            for Target { va, iova: target } in n.vas {
                // Only entries that still point where the binding pointed: a binding
                // mapped again meanwhile (a merge or an eviction has no window) points
                // at the region that replaced it. The TLB is invalidated all the same.
                if !knobs.skip_pte_zap {
                    st.pt.zap_into(&cx, va.clone(), &target);
                    if free_tables {
                        freed.extend(st.pt.free_empty(&cx, va.clone()));
                    }
                }
                ranges.push(va);
            }
            self.tlb_invalidate(&ranges);
            Self::done(&mut st, n.id);
            freed
        };
        // After the TLB invalidation: no walk in flight reads these tables any more.
        self.cx().free_pages(&freed);
    }

    fn downgrading(&self, host: Range<u64>, iova: u64, len: u64) {
        let _section = crate::driver_section::enter();
        let n = self.notice(
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
        if !n.fences.is_empty() {
            add(&self.stats.fence_waits, 1);
            wait_fences(&n.fences);
        }
        let mut st = self.lock();
        if n.vas.is_empty() {
            Self::done(&mut st, n.id);
            return;
        }
        if n.hit {
            add(&self.stats.downgrades, 1);
        }
        let cx = self.cx();
        let mut ranges = Vec::new();
        for Target { va, iova: target } in n.vas {
            st.pt.clear_write_into(&cx, va.clone(), &target);
            ranges.push(va);
        }
        self.tlb_invalidate(&ranges);
        Self::done(&mut st, n.id);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::{Gpu, VmConfig};
    use crate::iommu::Perm;
    use crate::queue::WaitMode;
    use crate::registry::{RangeMirror, Registry, RegistryConfig, UnmapReason};
    use crate::Driver;
    use std::time::Duration;
    use userptr_ring::{Descriptor, Status};

    /// A notice whose window covers only the start of a binding's IOVA span (one of
    /// a region already unmapped, whose IOVAs were handed out again, told late) marks
    /// the binding: then every entry of it must go, not only those into the window,
    /// or the rest stay mapped with no binding left to take them away.
    #[test]
    fn a_notice_that_marks_a_binding_takes_all_its_entries() {
        let drv = Driver::reference().unwrap();
        let reg = Registry::new(drv.clone(), RegistryConfig::default());
        let gpu = Gpu::open(&reg).unwrap();
        let vm = gpu.create_vm(VmConfig::bound()).unwrap();
        let q = drv.queue(0, 8).unwrap();
        vm.attach(&q).unwrap();
        let len = 64 << 10;
        let mem = crate::dma_memory::DmaMemory::new(len).unwrap();
        // SAFETY: the test's own buffer, alive until the end; read by nobody.
        let u = unsafe { reg.register(mem.addr() as usize, len, Perm::READ_WRITE) }.unwrap();
        let va = 0x40_0000_0000;
        let b = vm.bind(&u, va).unwrap();
        // SAFETY: the FILL reaches the registration above.
        let f = unsafe { vm.submit(&q, &[Descriptor::fill(b.va(), len as u64, 1)]) }.unwrap();
        let c = q
            .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
            .unwrap();
        assert_eq!(c.status, Status::Ok);
        let first = vm.leaf(va).expect("mapped") & userptr_ring::regs::pte::ADDR;
        assert!(vm.leaf(va + 0x8000).is_some());
        let host = mem.addr()..mem.addr() + len as u64;
        vm.inner.unmapping(host, first, 4096, UnmapReason::Eviction);
        for off in (0..len as u64).step_by(4096) {
            assert_eq!(vm.leaf(va + off), None, "an entry at +{off:#x} was left");
        }
        drop((b, u));
    }
}
