//! The fault path and shared virtual memory. A fault inside a binding maps it again
//! (a userptr the registry invalidated, an SVM chunk, a write bit an upgrade gave
//! back), if the process itself could make the access. A fault on an address with no
//! binding, in an SVM VM, binds a chunk of the process's memory at the same VA: as
//! drm_gpusvm does, the largest of 2 MiB, 64 KiB and 4 KiB whose aligned block around
//! the faulting page lies inside the VMA and overlaps no binding of the VM (fewer,
//! larger pins; 2 MiB leaves where the mapping allows them), pinned through the
//! registry so that the monitors keep it coherent.

use std::ops::Range;

/// Chunk sizes, largest first.
pub(super) const CHUNKS: [u64; 3] = [2 << 20, 64 << 10, 4 << 10];

/// The chunk to bind for a fault on `page`, inside `vma`, avoiding `taken` ranges.
pub(super) fn chunk_for(
    page: u64,
    vma: &Range<u64>,
    taken: impl Fn(&Range<u64>) -> bool,
) -> Range<u64> {
    for size in CHUNKS {
        let start = page & !(size - 1);
        let c = start..start + size;
        if vma.start <= c.start && c.end <= vma.end && !taken(&c) {
            return c;
        }
    }
    page..page + 4096
}

/// The chunks to try for a fault on `page`, in order: [`chunk_for`]'s, then each
/// smaller aligned block around the page that lies inside `vma` and is free, down to
/// the page itself (a pin of the larger one may fail where part of it changed
/// meanwhile: another thread's `mprotect` or `munmap` next to the page).
pub(super) fn chunks_for(
    page: u64,
    vma: &Range<u64>,
    taken: impl Fn(&Range<u64>) -> bool,
) -> Vec<Range<u64>> {
    let first = chunk_for(page, vma, &taken);
    let mut out = vec![first.clone()];
    for size in CHUNKS {
        let start = page & !(size - 1);
        let c = start..start + size;
        if size < first.end - first.start && vma.start <= c.start && c.end <= vma.end && !taken(&c)
        {
            out.push(c);
        }
    }
    if first.end - first.start > 4096 && !out.contains(&(page..page + 4096)) {
        out.push(page..page + 4096);
    }
    out
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn largest_aligned_block_inside_the_vma_and_free() {
        let m = 2u64 << 20;
        let none = |_: &Range<u64>| false;
        assert_eq!(chunk_for(m + 0x5000, &(m..3 * m), none), m..2 * m);
        // The VMA ends mid-way: 64 KiB.
        assert_eq!(
            chunk_for(m + 0x5000, &(m..m + (1 << 20)), none),
            m..m + (64 << 10)
        );
        // The VMA starts at an odd page: 4 KiB.
        assert_eq!(
            chunk_for(0x13000, &(0x13000..0x15000), none),
            0x13000..0x14000
        );
        // A binding inside the 2 MiB block: 64 KiB.
        let taken = |r: &Range<u64>| r.start < m + 0x20_0000 && r.end - r.start > (64 << 10);
        assert_eq!(chunk_for(m, &(m..3 * m), taken), m..m + (64 << 10));
        // Then each smaller block, down to the page.
        assert_eq!(
            chunks_for(m + 0x15000, &(m..3 * m), none),
            vec![m..2 * m, m + 0x10000..m + 0x20000, m + 0x15000..m + 0x16000]
        );
        assert_eq!(
            chunks_for(0x13000, &(0x13000..0x15000), none),
            vec![0x13000..0x14000]
        );
    }
}

use super::populate;
use super::stats::add;
use super::vm::{pages_of, Bound, Kind, VmInner};
use crate::iommu::Perm;
use userptr_ring::regs::fault_kind;
use userptr_ring::regs::fault_record::FaultQueueRecord;
use userptr_ring::AccessKind;

const PAGE: u64 = 4096;
/// How long a fault is tried again while invalidations (or address-space changes next
/// to the page) keep racing it, before it fails: the thread yields between the first
/// tries, then sleeps a little (a racing notice may be descheduled on a loaded
/// machine; a count of yields alone ran out there and failed a command whose memory
/// never changed).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);
/// Tries with a yield between them before the sleeps.
const YIELDS: u32 = 64;

/// Whether the process could make the access to `page` (`write` or a read): `None`
/// if not, else whether it could write it too.
fn may_access(page: u64, write: bool) -> Option<bool> {
    if populate::accessible(page, PAGE, true) {
        Some(true)
    } else if !write && populate::accessible(page, PAGE, false) {
        Some(false)
    } else {
        None
    }
}

impl VmInner {
    /// The fault handler's answer for `rec`: map the page (bind it again, or bind an
    /// SVM chunk) and replay (`true`), or fail the command (`false`).
    pub(super) fn resolve_fault(&self, rec: &FaultQueueRecord) -> bool {
        let _section = crate::driver_section::enter();
        add(&self.stats.faults, 1);
        let ok = self.resolve(rec);
        add(
            if ok {
                &self.stats.faults_replayed
            } else {
                &self.stats.faults_failed
            },
            1,
        );
        ok
    }

    fn resolve(&self, rec: &FaultQueueRecord) -> bool {
        let page = rec.va & !(PAGE - 1);
        let write = rec.access == AccessKind::Write;
        let deadline = std::time::Instant::now() + RETRY_FOR;
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let (gen, found) = {
                let st = self.lock();
                (st.log.generation(), st.covering(page).cloned())
            };
            let done = match found {
                Some(b) => self.refault(gen, &b, page, write, rec.kind),
                None if self.cfg.svm => self.svm_fault(gen, page, write),
                None => Some(false),
            };
            tracing::trace!(vm = self.id, va = rec.va, ?done, "fault attempt");
            match done {
                Some(ok) => return ok,
                // An invalidation raced the install, or a pin failed while the process
                // can still make the access: let the other side finish, try again.
                None if std::time::Instant::now() > deadline => return false,
                None if attempt <= YIELDS => std::thread::yield_now(),
                None => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        }
    }

    /// A fault inside binding `b`: map it again if the process can make the access.
    /// `None`: raced (or an SVM chunk was dropped to be made afresh), try again.
    fn refault(&self, gen: u64, b: &Bound, page: u64, write: bool, kind: u8) -> Option<bool> {
        let host = match &b.kind {
            // Always mapped writable.
            Kind::DevMem(_) | Kind::Driver => return Some(false),
            Kind::Userptr(u) if write && !u.perm().write() => return Some(false),
            _ => b.host.clone()?,
        };
        let host_page = host.start + (page - b.va.start);
        let Some(can_write) = may_access(host_page, write) else {
            return Some(false);
        };
        let Kind::Userptr(u) = &b.kind else {
            // An SVM chunk that faults while bound (a write bit an upgrade gives back):
            // drop it and bind afresh from what the registry has now.
            let mut st = self.lock();
            if st.bindings.get(&b.va.start).is_some_and(|x| x.uid == b.uid) {
                let x = st.bindings.remove(&b.va.start).expect("checked");
                if let Some(i) = x.iova {
                    st.by_iova.remove(&(i, b.va.start));
                }
                st.pt.zap(&self.cx(), x.va.clone());
                self.tlb_invalidate(std::slice::from_ref(&x.va));
            }
            return None;
        };
        let reg = &self.gpu.shared.registry;
        let Ok(i) = reg.iova(u) else {
            // Final if the process cannot make the access now, else raced: again.
            return may_access(host_page, write)
                .map(|_| None)
                .unwrap_or(Some(false));
        };
        let iova = i - (u.addr() - pages_of(u).start);
        let writable = u.perm().write() && can_write;
        let mut st = self.lock();
        match self.install(&mut st, gen, b.va.start, b.uid, iova, writable) {
            Ok(true) => {}
            // Raced an invalidation, or its entries are still being zapped: again.
            Ok(false) | Err(_) => return None,
        }
        // A read-only entry may be cached: a write fault on it would come back.
        if kind == fault_kind::WRITE_PROTECTED {
            self.tlb_invalidate(std::slice::from_ref(&b.va));
        }
        add(&self.stats.rebinds, 1);
        Some(true)
    }

    /// A fault with no binding in an SVM VM: check the access, pin a chunk through
    /// the registry, and bind every unbound part of the registry region that now
    /// holds it (the registry merges adjacent pins into one region and retires the
    /// old ones, whose bindings its notice removes) at the same VA. `None`: raced,
    /// try again.
    fn svm_fault(&self, gen: u64, page: u64, write: bool) -> Option<bool> {
        // The process's own access first: nothing is pinned for an access it could
        // not make (unmapped, PROT_NONE, a write to read-only memory).
        let Some(can_write) = may_access(page, write) else {
            tracing::trace!(vm = self.id, page, write, "svm fault: no access");
            return Some(false);
        };
        let Some(vma) = crate::backing::vmas(page..page + PAGE)
            .ok()
            .and_then(|v| v.into_iter().find(|v| v.range.contains(&page)))
        else {
            tracing::trace!(vm = self.id, page, "svm fault: no vma");
            return Some(false);
        };
        let chunks = {
            let st = self.lock();
            chunks_for(page, &vma.range, |r| st.overlaps(r))
        };
        // Read-write where a pin can be had (memory the process cannot write may still
        // be in a device-read-only region of the registry: a hit, no pin), else read.
        let perms: &[Perm] = if can_write {
            &[Perm::READ_WRITE]
        } else {
            &[Perm::READ_WRITE, Perm::READ]
        };
        let reg = &self.gpu.shared.registry;
        let mut got = None;
        'pin: for c in chunks {
            for &p in perms {
                // SAFETY: the application handed this memory to the device when it
                // submitted the faulting command on an SVM VM (`GpuVm::submit`'s
                // contract); the registration lives as long as the binding, and the
                // monitors invalidate it when the process changes the range.
                let r = unsafe { reg.register(c.start as usize, (c.end - c.start) as usize, p) };
                match r {
                    Ok(u) => {
                        got = Some((c, u, p));
                        break 'pin;
                    }
                    Err(e) => {
                        tracing::trace!(vm = self.id, start = c.start, end = c.end, %e, "svm pin failed")
                    }
                }
            }
        }
        // No pin: final only if the process itself cannot make the access now (the
        // memory went, or became read-only or PROT_NONE); else a race with a change
        // next to it (the VMA split under the chunk), tried again.
        let transient = || may_access(page, write).map(|_| None).unwrap_or(Some(false));
        let Some((chunk, u, perm)) = got else {
            return transient();
        };
        let Ok(iova) = reg.iova(&u) else {
            return transient();
        };
        // The region holding the chunk now; its mapped parts around the chunk without
        // a binding get one (not its chunks a partial invalidation took: entries there
        // would reach an unmapped IOVA; the next fault there re-pins them).
        let region = reg
            .regions()
            .into_iter()
            .find(|r| {
                r.perm == perm
                    && r.range.start <= chunk.start
                    && chunk.end <= r.range.end
                    && r.iova + (chunk.start - r.range.start) == iova
            })
            .map_or((chunk.clone(), iova), |r| {
                let run = r.mapped_run(&chunk);
                let at = r.iova + (run.start - r.range.start);
                (run, at)
            });
        let mut st = self.lock();
        let mut gaps = Vec::new();
        let mut at = region.0.start;
        for (_, b) in st.bindings.range(..region.0.end) {
            if b.va.end <= at {
                continue;
            }
            if b.va.start > at {
                gaps.push(at..b.va.start);
            }
            at = at.max(b.va.end);
        }
        if at < region.0.end {
            gaps.push(at..region.0.end);
        }
        if !gaps.iter().any(|g| g.start <= page && page < g.end) {
            return None; // another fault bound it meanwhile
        }
        for g in gaps {
            let uid = st.uid();
            st.bindings.insert(
                g.start,
                Bound {
                    va: g.clone(),
                    kind: Kind::Svm,
                    host: Some(g.clone()),
                    iova: None,
                    present: false,
                    writable: can_write,
                    uid,
                },
            );
            let giova = region.1 + (g.start - region.0.start);
            match self.install(&mut st, gen, g.start, uid, giova, can_write) {
                Ok(true) => {}
                other => {
                    st.bindings.remove(&g.start);
                    // Ok(false): an invalidation raced it. Err: the page table still
                    // holds entries of a chunk an invalidation is taking away (its
                    // notice removed the binding and zaps them next). Both: again.
                    let _ = other;
                    return None;
                }
            }
            add(
                match g.end - g.start {
                    0x20_0000 => &self.stats.svm_chunks_2m,
                    0x1_0000 => &self.stats.svm_chunks_64k,
                    0x1000 => &self.stats.svm_chunks_4k,
                    _ => &self.stats.svm_region_binds,
                },
                1,
            );
        }
        Some(true)
    }
}
