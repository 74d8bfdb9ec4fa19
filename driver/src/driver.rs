//! The driver handle: an IOMMU domain, the IOVA space the driver hands out in it and,
//! for a device that speaks the userptr ring protocol, that device. Everything else
//! (mappings, queues, the registry) is created from here.
//!
//! A driver made with [`Driver::for_domain`] has no ring-protocol device: it maps
//! memory into a domain that another engine drives (the NVMe engine over VFIO,
//! `vfio::nvme`); [`Driver::queue`] then fails with [`Error::NoRingDevice`].
//!
//! # IOVA reuse and in-flight work
//!
//! An IOVA is never handed out again while device work submitted against its previous
//! mapping may still run: whoever unmaps a range that such work may still reach
//! (the registry, after a device that would not finish or reset in time) unmaps it with
//! its pending work attached (`Driver::release_iova`); the translation goes at once
//! (a late access faults instead of reaching new memory) but the IOVA range is
//! *quarantined*, out of the allocator, until every attached batch is proven finished
//! (checked again on every later allocation). What cannot be proven finished for good
//! stays quarantined for the driver's life: IOVA space is leaked rather than reused
//! ([`Driver::quarantined_iova`] counts it).
//!
//! # Domain exhaustion
//!
//! A cache of idle mappings in the domain (the registry) registers itself as a
//! [`Reclaim`]er. When a mapping the driver makes for itself or a caller (ring memory,
//! [`Driver::map_user`]) finds the domain out of mapping slots, IOVA space or
//! locked memory, the reclaimers are asked to unmap idle mappings, and the mapping is
//! tried again.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::iommu::{IommuDomain, Perm, PAGE_2M, PAGE_4K};
use crate::iova::IovaAllocator;
use crate::mapping::UserMapping;
use crate::queue::CommandQueue;
use crate::submitter::{deadline_after, millis, PendingWork};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use userptr_ring::regs;

/// Something that keeps idle mappings in a driver's domain and can give them back
/// when the domain runs out (the registry's pin cache is one).
pub trait Reclaim: Send + Sync {
    /// Unmap idle mappings worth at least `bytes` bytes and `mappings` mappings, as far
    /// as it has them. Returns whether anything was unmapped. Called with none of the
    /// driver's locks held.
    fn reclaim(&self, bytes: u64, mappings: usize) -> bool;
}

/// An IOVA range unmapped while work submitted against it may still run.
struct Quarantined {
    iova: u64,
    len: u64,
    work: Vec<PendingWork>,
}

/// Rounds of reclaim-and-retry a mapping gets before its error is returned.
const RECLAIM_ROUNDS: u32 = 8;

struct Inner {
    device: Option<Arc<dyn Device>>,
    name: String,
    domain: Arc<dyn IommuDomain>,
    iova: Mutex<IovaAllocator>,
    irq_mask: Mutex<()>,
    /// Serialises read-modify-writes of CONTROL (pause/resume against a reset).
    control: Mutex<()>,
    /// IOVA ranges held back from the allocator (see the module docs).
    quarantine: Mutex<Vec<Quarantined>>,
    /// Bytes in `quarantine` (read without its lock on every allocation).
    quarantined: AtomicU64,
    reclaimers: Mutex<Vec<Weak<dyn Reclaim>>>,
    /// The rings a [`CommandQueue`](crate::CommandQueue) drives (at most one each).
    rings: Mutex<std::collections::BTreeSet<u32>>,
}

/// A queue's claim on its ring: while it is held, no other queue of this driver
/// programs, enables or disables that ring. Released on drop.
#[derive(Debug)]
pub(crate) struct RingClaim {
    driver: Driver,
    ring: u32,
}

impl Drop for RingClaim {
    fn drop(&mut self) {
        crate::driver_section::lock(&self.driver.inner.rings).remove(&self.ring);
    }
}

/// Whether `e` says the domain (or the locked-memory limit) is out of room, which
/// unmapping idle mappings can cure.
fn exhausted(e: &Error) -> bool {
    matches!(
        e,
        Error::TooManyMappings { .. } | Error::IovaExhausted { .. } | Error::PinLimit { .. }
    )
}

/// A driver instance bound to one device. Cheap to clone (shared).
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("device", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Drive `device`.
    pub fn new(device: Arc<dyn Device>) -> Driver {
        let domain = device.domain();
        let name = device.name();
        Driver::build(Some(device), domain, name)
    }

    /// A driver for an IOMMU domain alone (no ring-protocol device): mappings, the
    /// registry and IOVA allocation, for an engine of its own (NVMe over VFIO).
    pub fn for_domain(domain: Arc<dyn IommuDomain>, name: &str) -> Driver {
        Driver::build(None, domain, name.to_string())
    }

    fn build(
        device: Option<Arc<dyn Device>>,
        domain: Arc<dyn IommuDomain>,
        name: String,
    ) -> Driver {
        let iova = IovaAllocator::new(&domain.iova_ranges());
        Driver {
            inner: Arc::new(Inner {
                device,
                name,
                domain,
                iova: Mutex::new(iova),
                irq_mask: Mutex::new(()),
                control: Mutex::new(()),
                quarantine: Mutex::new(Vec::new()),
                quarantined: AtomicU64::new(0),
                reclaimers: Mutex::new(Vec::new()),
                rings: Mutex::new(std::collections::BTreeSet::new()),
            }),
        }
    }

    /// Register a cache of idle mappings to be asked for room when the domain runs out
    /// (see the module docs). Held weakly: a dropped one is forgotten.
    pub fn add_reclaimer(&self, r: Weak<dyn Reclaim>) {
        let mut v = crate::driver_section::lock(&self.inner.reclaimers);
        v.retain(|w| w.strong_count() > 0);
        v.push(r);
    }

    /// Ask every reclaimer for `bytes` bytes and `mappings` mappings. Returns whether
    /// anything was unmapped.
    pub fn reclaim(&self, bytes: u64, mappings: usize) -> bool {
        let live: Vec<Arc<dyn Reclaim>> = {
            let mut v = crate::driver_section::lock(&self.inner.reclaimers);
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        let mut freed = false;
        for r in live {
            freed |= r.reclaim(bytes, mappings);
        }
        freed
    }

    /// The ring-protocol device, if this driver has one.
    pub fn device(&self) -> Option<&Arc<dyn Device>> {
        self.inner.device.as_ref()
    }

    /// The ring-protocol device, or [`Error::NoRingDevice`].
    pub(crate) fn ring_device(&self) -> Result<&Arc<dyn Device>> {
        self.inner
            .device
            .as_ref()
            .ok_or_else(|| Error::NoRingDevice {
                device: self.inner.name.clone(),
            })
    }

    /// A short description of the device for messages.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device's IOMMU domain.
    pub fn domain(&self) -> &Arc<dyn IommuDomain> {
        &self.inner.domain
    }

    /// Map `len` bytes of process memory at `addr` for the device with `perm`, by
    /// address: the mapping borrows nothing. Prefer [`Driver::map_slice`] /
    /// [`Driver::map_slice_ref`], which borrow the buffer for the mapping's life.
    ///
    /// # Safety
    ///
    /// From this call until the returned mapping is dropped (or
    /// [`UserMapping::unmap`]ped):
    /// * the range stays mapped in the process, with the same pages (no `munmap`,
    ///   `mremap`, destructive `madvise` or `mmap(MAP_FIXED)` over it: nothing would
    ///   tell the device, which keeps reaching the pages pinned now; see
    ///   `tests/hazard.rs`);
    /// * the program does not access it in a way that races the device's access
    ///   `perm` allows: with [`Perm::WRITE`], no reference to it is held and nothing
    ///   reads or writes it while a device command that may write it runs; with
    ///   [`Perm::READ`], nothing writes it while a command that may read it runs.
    ///   Waiting for the command's fence ends its access, as with any DMA.
    ///
    /// The bytes of the first and last page outside `addr..addr + len` are mapped too
    /// (the IOMMU maps whole pages): they fall under the same rules for every command
    /// that reaches them.
    pub unsafe fn map_user(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
    ) -> Result<UserMapping<'static>> {
        UserMapping::new(self, addr as u64, len as u64, perm)
    }

    /// Map a slice for device reads and writes ([`Perm::READ_WRITE`]). The mapping
    /// borrows the slice mutably until it is dropped: the program cannot read, write or
    /// free it meanwhile, and dropping the mapping unmaps it (waiting for the device's
    /// transfers in flight), so no device access outlives the borrow.
    ///
    /// The device may write any bytes: `T` must be valid for every bit pattern
    /// ([`bytemuck::AnyBitPattern`]) and, since the device also reads it, have no
    /// padding ([`bytemuck::NoUninit`]). `bool`, `char`, references and enums are
    /// refused at compile time.
    pub fn map_slice<'a, T>(&self, s: &'a mut [T]) -> Result<UserMapping<'a>>
    where
        T: bytemuck::AnyBitPattern + bytemuck::NoUninit,
    {
        UserMapping::new(
            self,
            s.as_mut_ptr() as u64,
            std::mem::size_of_val(s) as u64,
            Perm::READ_WRITE,
        )
    }

    /// Map a slice for device reads only ([`Perm::READ`]: a device write faults). The
    /// mapping borrows the slice (shared) until it is dropped: the program may read it
    /// meanwhile, not write it. `T` must have no padding ([`bytemuck::NoUninit`]: the
    /// device reads every byte); its `Copy` bound rules out interior mutability.
    pub fn map_slice_ref<'a, T>(&self, s: &'a [T]) -> Result<UserMapping<'a>>
    where
        T: bytemuck::NoUninit,
    {
        UserMapping::new(
            self,
            s.as_ptr() as u64,
            std::mem::size_of_val(s) as u64,
            Perm::READ,
        )
    }

    /// Open command ring `ring` with `size` slots.
    /// Its memory is one mapping of the domain; a domain out of room first gets idle
    /// mappings reclaimed (see the module docs).
    pub fn queue(&self, ring: u32, size: u32) -> Result<CommandQueue> {
        CommandQueue::new(self.clone(), ring, size)
    }

    /// Number of rings the device has.
    pub fn rings(&self) -> u32 {
        self.device().map_or(0, |d| d.read32(regs::CAPS) & 0xff)
    }

    /// [`Driver::map_raw`], asking the reclaimers for room when the domain is out of it
    /// (a bounded number of times).
    pub(crate) fn map_reclaiming(&self, host: u64, len: u64, perm: Perm) -> Result<u64> {
        let mut rounds = 0;
        loop {
            match self.map_raw(host, len, perm) {
                Err(e) if exhausted(&e) && rounds < RECLAIM_ROUNDS && self.reclaim(len, 1) => {
                    rounds += 1;
                }
                r => return r,
            }
        }
    }

    /// Map driver-owned coherent ring memory at a freshly allocated IOVA
    /// ([`IommuDomain::map_coherent`](crate::iommu::IommuDomain::map_coherent)), asking
    /// the reclaimers for room as [`Driver::map_reclaiming`] does; returns the IOVA.
    pub(crate) fn map_coherent_reclaiming(
        &self,
        mem: &Arc<crate::dma_memory::DmaMemory>,
        perm: Perm,
    ) -> Result<u64> {
        let len = mem.len() as u64;
        let mut rounds = 0;
        loop {
            let r = self.map_at_fresh_iova(mem.addr(), len, |iova| {
                self.inner.domain.map_coherent(iova, mem, perm)
            });
            match r {
                Err(e) if exhausted(&e) && rounds < RECLAIM_ROUNDS && self.reclaim(len, 1) => {
                    rounds += 1;
                }
                r => return r,
            }
        }
    }

    /// Map whole pages at a freshly allocated IOVA; returns the IOVA.
    pub(crate) fn map_raw(&self, host: u64, len: u64, perm: Perm) -> Result<u64> {
        self.map_at_fresh_iova(host, len, |iova| {
            self.inner.domain.map(iova, host, len, perm)
        })
    }

    /// Allocate an IOVA range for `[host, host + len)` and `map` it there.
    fn map_at_fresh_iova(
        &self,
        host: u64,
        len: u64,
        map: impl FnOnce(u64) -> Result<()>,
    ) -> Result<u64> {
        let iova = self.reserve_iova(host, len)?;
        if let Err(e) = map(iova) {
            self.free_iova(iova, len);
            return Err(e);
        }
        Ok(iova)
    }

    /// Reserve an IOVA range for `[host, host + len)` without mapping anything there:
    /// a chunked registration maps its pieces into it one by one
    /// ([`Driver::map_user_at`]) and gives it back whole ([`Driver::release_iova`]).
    /// Ranges of 2 MiB or more get an IOVA congruent to `host` modulo 2 MiB, so that
    /// huge-page-backed memory can be mapped with 2 MiB IOMMU pages.
    pub(crate) fn reserve_iova(&self, host: u64, len: u64) -> Result<u64> {
        self.release_quarantine();
        let (align, phase) = if len >= PAGE_2M {
            (PAGE_2M, host % PAGE_2M)
        } else {
            (PAGE_4K, 0)
        };
        crate::driver_section::lock(&self.inner.iova).alloc_congruent(len, align, phase)
    }

    /// Map and pin user memory `[host, host + len)` at `iova`, inside a range the
    /// caller reserved ([`Driver::reserve_iova`]) and has not mapped there yet, then
    /// apply the backing policy ([`crate::backing::check`]): a refused range is unmapped
    /// again and the refusal returned.
    pub(crate) fn map_user_at(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<()> {
        self.inner.domain.map(iova, host, len, perm)?;
        if let Err(e) = crate::backing::check(host..host + len, perm) {
            if let Err(u) = self.inner.domain.unmap(iova, len) {
                tracing::error!("unmapping refused range {host:#x} + {len:#x}: {u}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Take away the translation [`Driver::map_user_at`] made; the IOVA stays reserved.
    pub(crate) fn unmap_at(&self, iova: u64, len: u64) -> Result<()> {
        self.inner.domain.unmap(iova, len)
    }

    /// Give back a reservation ([`Driver::reserve_iova`]) with nothing mapped in it any
    /// more: to the allocator, or, if the batches in `work` may still reach it, into
    /// quarantine until they are proven finished (see the module docs). Returns whether
    /// it was quarantined.
    pub(crate) fn release_iova(&self, iova: u64, len: u64, work: Vec<PendingWork>) -> bool {
        if work.iter().all(PendingWork::done) {
            self.free_iova(iova, len);
            return false;
        }
        tracing::warn!(
            "IOVA {iova:#x} + {len:#x} quarantined: device work submitted against it may \
             still run"
        );
        let mut q = crate::driver_section::lock(&self.inner.quarantine);
        q.push(Quarantined { iova, len, work });
        // Relaxed: a hint for the allocation path, which re-reads under the lock.
        self.inner.quarantined.fetch_add(len, Ordering::Relaxed);
        true
    }

    /// Map user memory: [`Driver::map_raw`], reclaiming idle cached mappings first when
    /// the domain is out of room (see [`Driver::map_reclaiming`]), then the backing
    /// policy ([`crate::backing::check`]) on the pinned range; a refused range is
    /// unmapped again and the refusal returned. Every pin of application memory goes
    /// through here (a [`UserMapping`]) or through [`Driver::map_user_at`] (the
    /// registry's chunks); driver-owned DMA memory (rings, NVMe queues) uses `map_raw`.
    pub(crate) fn map_user_reclaiming(&self, host: u64, len: u64, perm: Perm) -> Result<u64> {
        let iova = self.map_reclaiming(host, len, perm)?;
        self.check_user_pages(iova, host, len, perm)
    }

    /// The backing policy on a range just mapped at `iova`: unmapped again if refused.
    fn check_user_pages(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<u64> {
        if let Err(e) = crate::backing::check(host..host + len, perm) {
            if let Err(u) = self.unmap_raw(iova, len) {
                tracing::error!("unmapping refused range {host:#x} + {len:#x}: {u}");
            }
            return Err(e);
        }
        Ok(iova)
    }

    /// Undo `map_raw`.
    pub(crate) fn unmap_raw(&self, iova: u64, len: u64) -> Result<()> {
        self.inner.domain.unmap(iova, len)?;
        self.free_iova(iova, len);
        Ok(())
    }

    /// Bytes of IOVA space quarantined now: unmapped while device work submitted
    /// against them may still run, kept out of the allocator until it is proven
    /// finished (see the module docs).
    pub fn quarantined_iova(&self) -> u64 {
        // Relaxed: a reading.
        self.inner.quarantined.load(Ordering::Relaxed)
    }

    /// Return the quarantined ranges whose work is proven finished to the allocator.
    fn release_quarantine(&self) {
        // Relaxed: a hint; the list itself is read under its lock.
        if self.inner.quarantined.load(Ordering::Relaxed) == 0 {
            return;
        }
        let held = std::mem::take(&mut *crate::driver_section::lock(&self.inner.quarantine));
        // Checked outside the lock: `done` asks the queues.
        let (free, keep): (Vec<_>, Vec<_>) = held
            .into_iter()
            .partition(|q| q.work.iter().all(PendingWork::done));
        crate::driver_section::lock(&self.inner.quarantine).extend(keep);
        for q in free {
            self.free_iova(q.iova, q.len);
            // Relaxed: see release_iova.
            self.inner.quarantined.fetch_sub(q.len, Ordering::Relaxed);
        }
    }

    fn free_iova(&self, iova: u64, len: u64) {
        crate::driver_section::lock(&self.inner.iova).free(iova, len)
    }

    /// Claim ring `ring` for one queue, or `RingBusy` if a queue already drives it.
    /// Taken before anything touches the ring's registers, so a refused open leaves
    /// the queue already open on the ring alone.
    pub(crate) fn claim_ring(&self, ring: u32) -> Result<RingClaim> {
        if !crate::driver_section::lock(&self.inner.rings).insert(ring) {
            return Err(Error::RingBusy { ring });
        }
        Ok(RingClaim {
            driver: self.clone(),
            ring,
        })
    }

    pub(crate) fn irq_enable(&self, ring: u32, on: bool) {
        let _g = crate::driver_section::lock(&self.inner.irq_mask);
        let Some(dev) = self.device() else { return };
        let m = dev.read32(regs::IRQ_MASK);
        let m = if on { m | 1 << ring } else { m & !(1 << ring) };
        dev.write32(regs::IRQ_MASK, m);
    }

    /// Pause (`false`) or resume (`true`) the device's command processing
    /// (CONTROL.ENABLE). Paused, submissions queue up until the ring is full. Pausing
    /// does not wait for the batch in progress: it stops the engine from starting the
    /// next one.
    pub fn set_enabled(&self, on: bool) {
        let Some(dev) = self.device() else { return };
        let _g = crate::driver_section::lock(&self.inner.control);
        dev.write32(regs::CONTROL, if on { regs::CONTROL_ENABLE } else { 0 });
    }

    /// Reset the device: every queued command completes with status `Aborted` (a
    /// command the engine is executing finishes first). Waits up to `timeout` for the
    /// reset to finish (`Duration::MAX`: no practical limit).
    pub fn reset(&self, timeout: std::time::Duration) -> Result<()> {
        let dev = self.ring_device()?;
        {
            // A pause or resume between the read and the write would be undone by it.
            let _g = crate::driver_section::lock(&self.inner.control);
            let keep = dev.read32(regs::CONTROL) & regs::CONTROL_ENABLE;
            dev.write32(regs::CONTROL, keep | regs::CONTROL_RESET);
        }
        let deadline = deadline_after(timeout);
        while dev.read32(regs::STATUS) & regs::STATUS_RESETTING != 0 {
            if std::time::Instant::now() > deadline {
                return Err(Error::DeviceTimeout {
                    what: "its reset",
                    waited_ms: millis(timeout),
                });
            }
            std::thread::yield_now();
        }
        Ok(())
    }
}
