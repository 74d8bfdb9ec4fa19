//! One GPU VM: its context id and page table, its bindings, the rings attached to it,
//! and the fences of the work submitted through it.
//!
//! A binding maps a page-aligned GPU VA range to a userptr's pinned pages (their
//! IOVAs: the IOMMU checks again at stage 2), to device memory, or (SVM) to a chunk of
//! the process's own address space at the same VA. A userptr binding goes *invalid*
//! when the registry takes its region away (`mirror`); on a VM without replayable
//! faults the next [`GpuVm::submit`] maps it again, on one with them the next device
//! access faults and the handler does (`svm`).
//!
//! Installing an entry follows the registry's fresh-pin rule, with the VM's own
//! [`InvalidationLog`]: read the generation, resolve through the registry outside
//! every lock, then under the VM lock install only if no notice overlapping the range
//! arrived since (else start over), so a PTE never points at an IOVA the registry is
//! taking away.

use super::hw::Hw;
use super::pagetable::{Ctx, PageTable};
use super::stats::{add, Counters, GpuVmStats};
use super::GpuInner;
use crate::driver_section::Locked;
use crate::error::{Error, Result};
use crate::queue::{Backpressure, BatchFences, CommandQueue};
use crate::registry::notifier::InvalidationLog;
use crate::registry::{RangeMirror, Userptr};
use crate::submitter::{FenceTracker, Submitter};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use userptr_ring::Descriptor;

pub(super) const PAGE: u64 = 4096;
/// How long an invalidation or an unbind waits for the VM's work.
pub(super) const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a VM is created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// Non-present and write-protection faults hold the command and go to the fault
    /// handler (which rebinds invalidated userptrs) instead of failing it.
    pub replayable_faults: bool,
    /// Shared virtual memory: GPU VA == CPU VA, and a fault on an address with no
    /// binding binds the process's own memory there (implies replayable faults).
    pub svm: bool,
}

impl VmConfig {
    /// A VM of explicit bindings whose faults fail the command.
    pub fn bound() -> VmConfig {
        VmConfig::default()
    }

    /// A shared-virtual-memory VM.
    pub fn svm() -> VmConfig {
        VmConfig {
            replayable_faults: true,
            svm: true,
        }
    }

    pub(super) fn replayable(&self) -> bool {
        self.replayable_faults || self.svm
    }
}

/// Test and demonstration knobs that switch a protection off, so that a test can
/// show the hazard it prevents. Never set them otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugKnobs {
    /// Skip the TLB invalidation after zapping (stale TLB entries keep translating).
    pub skip_tlb_invalidation: bool,
    /// Skip the PTE zap (the entries still point at the IOVA the registry then unmaps
    /// and unpins: the window that unpinning before the zap opens, held open).
    pub skip_pte_zap: bool,
    /// Hold each unmap notice this long between marking its bindings and zapping
    /// their entries (widens the window in which a second notice of the region must
    /// not return while the entries are still present).
    pub notice_pause_ms: u32,
}

/// A binding made by [`GpuVm::bind`] or [`GpuVm::bind_device_memory`].
#[derive(Debug, PartialEq, Eq)]
pub struct Binding {
    pub(super) va: u64,
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) uid: u64,
}

impl Binding {
    /// GPU VA of the first byte (of the userptr: its offset in its page is kept).
    pub fn va(&self) -> u64 {
        self.va
    }

    /// GPU VA of byte `off`.
    pub fn va_at(&self, off: u64) -> u64 {
        self.va + off
    }

    /// The bound GPU VA range (whole pages).
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len
    }
}

#[derive(Clone, Debug)]
pub(super) enum Kind {
    /// A userptr bound at a chosen VA.
    /// A raw registration (`'static`): a binding may outlive any borrow.
    Userptr(Userptr<'static>),
    /// Device memory at this VRAM offset.
    DevMem(u64),
    /// Shared virtual memory: VA == host address, pinned by the registry.
    Svm,
    /// Driver-owned memory that moves (a buffer object): the owner frees it.
    Driver,
}

#[derive(Clone, Debug)]
pub(super) struct Bound {
    pub(super) va: Range<u64>,
    pub(super) kind: Kind,
    /// Host pages (userptr and SVM kinds).
    pub(super) host: Option<Range<u64>>,
    /// IOVA of `va.start` while the entries are present (userptr and SVM kinds).
    pub(super) iova: Option<u64>,
    pub(super) present: bool,
    pub(super) writable: bool,
    pub(super) uid: u64,
}

pub(super) struct VmState {
    pub(super) pt: PageTable,
    /// By first VA.
    pub(super) bindings: BTreeMap<u64, Bound>,
    /// Present userptr and SVM bindings: (IOVA of their first page, first VA). A
    /// set: one userptr may be bound at several VAs.
    pub(super) by_iova: BTreeSet<(u64, u64)>,
    /// The IOVA ranges of the regions the registry has taken away or downgraded (the
    /// install check: an entry may point only at an IOVA no notice overlapped since
    /// it was resolved).
    pub(super) log: InvalidationLog,
    /// Latest seqno per queue of the work submitted through the VM.
    pub(super) fences: Vec<(Weak<dyn FenceTracker>, u64)>,
    pub(super) rings: Vec<u32>,
    /// The registry's notices between their step 1 and step 3 (`mirror`).
    pub(super) pending: Vec<super::mirror::Pending>,
    next_uid: u64,
}

impl VmState {
    /// The binding containing `va`.
    pub(super) fn covering(&self, va: u64) -> Option<&Bound> {
        let (_, b) = self.bindings.range(..=va).next_back()?;
        (va < b.va.end).then_some(b)
    }

    /// Whether `r` overlaps a binding.
    pub(super) fn overlaps(&self, r: &Range<u64>) -> bool {
        self.bindings
            .range(..r.end)
            .next_back()
            .is_some_and(|(_, b)| b.va.end > r.start)
    }

    pub(super) fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }
}

/// A VM (see the module docs).
pub(crate) struct VmInner {
    pub(super) gpu: Arc<GpuInner>,
    pub(super) id: u32,
    pub(super) cfg: VmConfig,
    pub(super) state: Mutex<VmState>,
    pub(super) stats: Counters,
    pub(super) knobs: Mutex<DebugKnobs>,
}

/// A GPU virtual address space (see the module docs). Destroyed on drop: its context
/// is disabled, its TLB entries invalidated, its tables and device memory freed.
pub struct GpuVm {
    pub(super) inner: Arc<VmInner>,
}

impl std::fmt::Debug for GpuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVm")
            .field("id", &self.inner.id)
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

pub(super) fn pages_of(u: &Userptr<'_>) -> Range<u64> {
    let start = u.addr() & !(PAGE - 1);
    start..(u.addr() + u.len()).next_multiple_of(PAGE)
}

/// Wait (bounded) for the fences of the VM's work; a timeout is logged, not fatal:
/// the zap that follows makes whatever still runs fault instead.
pub(super) fn wait_fences(fences: &[(Weak<dyn FenceTracker>, u64)]) -> bool {
    let deadline = Instant::now() + FENCE_TIMEOUT;
    let mut all = true;
    for (q, s) in fences {
        let Some(q) = q.upgrade() else { continue };
        if q.is_done(*s) {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = q.wait_done(*s, left) {
            tracing::warn!("GPU VM invalidation: the VM's work did not finish: {e}");
            all = false;
        }
    }
    all
}

impl VmInner {
    pub(super) fn hw(&self) -> &Hw {
        &self.gpu.shared.hw
    }

    /// The VM's state, locked inside a driver section: the registry's notices take
    /// this lock from inside invalidations, which an application signal handler's
    /// monitored call could start on a thread that holds it.
    pub(super) fn lock(&self) -> Locked<MutexGuard<'_, VmState>> {
        crate::driver_section::lock(&self.state)
    }

    pub(super) fn cx(&self) -> Ctx<'_> {
        Ctx {
            hw: &self.gpu.shared.hw,
            alloc: &self.gpu.shared.pt_alloc,
            stats: &self.stats,
        }
    }

    pub(super) fn knobs(&self) -> DebugKnobs {
        *self.knobs.lock().expect("knobs lock poisoned")
    }

    /// Invalidate `ranges` in the TLB (unless the debug knob skips it).
    pub(super) fn tlb_invalidate(&self, ranges: &[Range<u64>]) {
        if ranges.is_empty() || self.knobs().skip_tlb_invalidation {
            return;
        }
        add(&self.stats.tlb_invalidations, 1);
        if let Err(e) = self.hw().tlb_invalidate(self.id, ranges) {
            tracing::error!("GPU VM {}: {e}", self.id);
        }
    }

    /// Install the entries of binding `start` (uid `uid`) at `iova`, unless a notice
    /// of the registry overlapped those IOVAs since generation `gen`, or the binding
    /// changed.
    /// Returns whether it was installed.
    pub(super) fn install(
        &self,
        st: &mut VmState,
        gen: u64,
        start: u64,
        uid: u64,
        iova: u64,
        writable: bool,
    ) -> Result<bool> {
        let Some(b) = st.bindings.get(&start) else {
            return Ok(false);
        };
        let span = iova..iova + (b.va.end - b.va.start);
        let refused = b.uid != uid || st.log.invalidated_since(gen, &span);
        let (va, now) = (b.va.start, st.log.generation());
        tracing::trace!(vm = self.id, va, iova, gen, now, refused, "install");
        if refused {
            return Ok(false);
        }
        let va = b.va.clone();
        if b.present {
            st.pt.zap(&self.cx(), va.clone());
            if let Some(old) = b.iova {
                st.by_iova.remove(&(old, start));
            }
        }
        st.pt.map(
            &self.cx(),
            va.start,
            va.end - va.start,
            iova,
            writable,
            false,
        )?;
        let b = st.bindings.get_mut(&start).expect("checked above");
        b.iova = Some(iova);
        b.present = true;
        b.writable = writable;
        st.by_iova.insert((iova, start));
        Ok(true)
    }

    fn teardown(&self) {
        if crate::fork::in_forked_child() {
            return;
        }
        let (fences, rings) = {
            let st = self.lock();
            (st.fences.clone(), st.rings.clone())
        };
        wait_fences(&fences);
        let hw = self.hw();
        for r in rings {
            if hw.ring_vm(r) == self.id {
                hw.set_ring_vm(r, 0);
            }
        }
        hw.disable_vm(self.id);
        if let Err(e) = hw.tlb_invalidate(self.id, &[]) {
            tracing::error!("GPU VM {} teardown: {e}", self.id);
        }
        let st = self.lock();
        let cx = self.cx();
        cx.free_pages(&st.pt.pages());
        let mut dm = self
            .gpu
            .shared
            .devmem_alloc
            .lock()
            .expect("device-memory allocator poisoned");
        for b in st.bindings.values() {
            if let Kind::DevMem(off) = b.kind {
                dm.free(off, b.va.end - b.va.start);
            }
        }
    }
}

impl Drop for VmInner {
    fn drop(&mut self) {
        self.teardown();
        self.gpu.release_vm_id(self.id);
    }
}

impl GpuVm {
    pub(super) fn create(gpu: Arc<GpuInner>, cfg: VmConfig) -> Result<GpuVm> {
        let _section = crate::driver_section::enter();
        let id = gpu.take_vm_id()?;
        let stats = Counters::default();
        let pt = {
            let cx = Ctx {
                hw: &gpu.shared.hw,
                alloc: &gpu.shared.pt_alloc,
                stats: &stats,
            };
            PageTable::new(&cx)
        };
        let pt = match pt {
            Ok(pt) => pt,
            Err(e) => {
                gpu.release_vm_id(id);
                return Err(e);
            }
        };
        let hw = &gpu.shared.hw;
        // The id may have served another VM: nothing of it may stay in the TLB.
        if let Err(e) = hw.tlb_invalidate(id, &[]) {
            let cx = Ctx {
                hw,
                alloc: &gpu.shared.pt_alloc,
                stats: &stats,
            };
            cx.free_pages(&pt.pages());
            gpu.release_vm_id(id);
            return Err(e);
        }
        hw.program_vm(id, pt.root(), cfg.replayable());
        let inner = Arc::new(VmInner {
            gpu: gpu.clone(),
            id,
            cfg,
            state: Mutex::new(VmState {
                pt,
                bindings: BTreeMap::new(),
                by_iova: BTreeSet::new(),
                log: InvalidationLog::default(),
                fences: Vec::new(),
                rings: Vec::new(),
                pending: Vec::new(),
                next_uid: 0,
            }),
            stats,
            knobs: Mutex::new(DebugKnobs::default()),
        });
        gpu.publish_vm(id, Arc::downgrade(&inner));
        let mirror: Weak<dyn RangeMirror> = Arc::downgrade(&inner) as Weak<dyn RangeMirror>;
        gpu.shared.registry.add_mirror(mirror);
        Ok(GpuVm { inner })
    }

    /// The VM context id (1..=15).
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// How the VM was created.
    pub fn config(&self) -> VmConfig {
        self.inner.cfg
    }

    /// The counters.
    pub fn stats(&self) -> GpuVmStats {
        self.inner.stats.snapshot()
    }

    /// Page-table pages of this VM (the root included).
    pub fn pt_pages(&self) -> usize {
        self.inner.lock().pt.tables()
    }

    /// Switch protections off for a test (see [`DebugKnobs`]).
    pub fn set_debug_knobs(&self, k: DebugKnobs) {
        *self.inner.knobs.lock().expect("knobs lock poisoned") = k;
    }

    /// Whether the page table maps `va` now (the driver's shadow of it), and where.
    pub fn leaf(&self, va: u64) -> Option<u64> {
        self.inner.lock().pt.leaf(va)
    }

    /// The leaf mapping `va` as the device's table holds it (walked through the VRAM
    /// window, as the engine walks it): for checks that the device sees what the
    /// driver wrote.
    pub fn device_leaf(&self, va: u64) -> Option<u64> {
        use userptr_ring::regs::pte;
        let _st = self.inner.lock();
        let hw = self.inner.hw();
        let mut table = _st.pt.root();
        for level in (0..pte::LEVELS).rev() {
            let e = hw.read_word(table + pte::index(va, level) * 8);
            if e & pte::V == 0 {
                return None;
            }
            if e & pte::L != 0 {
                return Some(e);
            }
            table = e & pte::ADDR;
        }
        None
    }

    /// Make ring `q` a context of this VM: from its next batch on, the addresses in
    /// its descriptors are GPU VAs here.
    pub fn attach(&self, q: &CommandQueue) -> Result<()> {
        let mut st = self.inner.lock();
        self.inner.hw().set_ring_vm(q.ring(), self.inner.id);
        if !st.rings.contains(&q.ring()) {
            st.rings.push(q.ring());
        }
        Ok(())
    }

    /// Give ring `q` back its IOVA addressing.
    pub fn detach(&self, q: &CommandQueue) {
        let mut st = self.inner.lock();
        st.rings.retain(|&r| r != q.ring());
        self.inner.hw().set_ring_vm(q.ring(), 0);
    }

    /// The userptr bindings not present now (none in a VM with replayable faults:
    /// its faults bind them), but those in `skip`.
    fn invalid_userptrs(&self, st: &VmState, skip: &[u64]) -> Vec<(u64, u64, Userptr<'static>)> {
        if self.inner.cfg.replayable() {
            return Vec::new();
        }
        st.bindings
            .values()
            .filter(|b| !b.present && !skip.contains(&b.va.start))
            .filter_map(|b| match &b.kind {
                Kind::Userptr(u) => Some((b.va.start, b.uid, u.clone())),
                _ => None,
            })
            .collect()
    }

    /// The present userptr bindings made read-only by a downgrade, that their
    /// userptr would let write (none in a VM with replayable faults: a write fault
    /// gives the bit back there), but those in `skip`.
    fn downgraded_userptrs(&self, st: &VmState, skip: &[u64]) -> Vec<(u64, u64, Userptr<'static>)> {
        if self.inner.cfg.replayable() {
            return Vec::new();
        }
        st.bindings
            .values()
            .filter(|b| b.present && !b.writable && !skip.contains(&b.va.start))
            .filter_map(|b| match &b.kind {
                Kind::Userptr(u) if u.perm().write() => Some((b.va.start, b.uid, u.clone())),
                _ => None,
            })
            .collect()
    }

    /// Submit `descs` (GPU VAs) on `q`, attached to this VM, as one batch. On a VM
    /// without replayable faults, userptr bindings the registry invalidated are bound
    /// again first (their memory pinned anew); one that cannot be leaves its range
    /// unmapped, and a command touching it fails with a DMA fault.
    ///
    /// # Safety
    ///
    /// On a shared-virtual-memory VM the descriptors carry the process's own pointers,
    /// and the device reads and writes whatever they reach (the fault handler pins only
    /// what the process itself could access): every byte the commands may write must
    /// be memory the caller owns and does not access, and every byte they read must
    /// not be written by the program, until the batch's fences complete. On a VM of
    /// bound userptrs, what the commands reach is what [`GpuVm::bind`] bound, whose
    /// registrations' contracts ([`crate::Registry::register`]) already cover it.
    pub unsafe fn submit(&self, q: &CommandQueue, descs: &[Descriptor]) -> Result<BatchFences> {
        let _section = crate::driver_section::enter();
        let inner = &*self.inner;
        if descs.len() > q.size() as usize {
            return Err(Error::RingFull {
                ring: q.ring(),
                size: q.size(),
            });
        }
        for d in descs {
            d.validate()?;
        }
        // Bindings whose memory could not be pinned in this call: left unmapped.
        let mut failed: Vec<u64> = Vec::new();
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            let (gen, mut todo, read_only) = {
                let st = inner.lock();
                if !st.rings.contains(&q.ring()) {
                    return Err(Error::QueueNotAttached {
                        ring: q.ring(),
                        vm: inner.id,
                    });
                }
                (
                    st.log.generation(),
                    self.invalid_userptrs(&st, &failed),
                    self.downgraded_userptrs(&st, &failed),
                )
            };
            // A downgraded binding whose memory is writable again (the upgrade did
            // nothing to the VM): bound again with its write bit. There is no fault
            // to do it in a VM without replayable faults.
            let upgraded: Vec<u64> = read_only
                .into_iter()
                .filter(|(_, _, u)| super::populate::accessible(pages_of(u).start, PAGE, true))
                .map(|x| {
                    let start = x.0;
                    todo.push(x);
                    start
                })
                .collect();
            let resolved: Vec<_> = todo
                .into_iter()
                .map(|(start, uid, u)| {
                    let i = inner.gpu.shared.registry.iova(&u);
                    (start, uid, u, i)
                })
                .collect();
            let mut st = inner.lock();
            for (start, uid, u, i) in resolved {
                let Ok(i) = i else {
                    failed.push(start);
                    continue;
                };
                let iova = i - (u.addr() - pages_of(&u).start);
                if inner.install(&mut st, gen, start, uid, iova, u.perm().write())? {
                    add(&inner.stats.rebinds, 1);
                }
            }
            // An invalidation raced the installs, or took away another binding
            // meanwhile (a registry region may span several): bind those too before
            // the commands can meet them. Bounded: under a storm of invalidations the
            // batch goes with what is mapped, and a command meeting a hole faults.
            if rounds < 64 && !self.invalid_userptrs(&st, &failed).is_empty() {
                continue;
            }
            // The read-only entries of the upgraded ones may be cached.
            let ranges: Vec<Range<u64>> = upgraded
                .iter()
                .filter_map(|s| {
                    st.bindings
                        .get(s)
                        .filter(|b| b.writable)
                        .map(|b| b.va.clone())
                })
                .collect();
            inner.tlb_invalidate(&ranges);
            match q.submit_batch(descs, Backpressure::WouldBlock) {
                Ok(f) => {
                    let t = q.tracker();
                    match st.fences.iter_mut().find(|(w, _)| Weak::ptr_eq(w, &t)) {
                        Some(x) => x.1 = x.1.max(f.end.seqno),
                        None => st.fences.push((t, f.end.seqno)),
                    }
                    add(&inner.stats.submissions, 1);
                    return Ok(f);
                }
                Err(Error::RingFull { .. }) => {
                    drop(st);
                    q.wait_for_room(descs.len())?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
