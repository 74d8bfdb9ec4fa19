//! The driver side of a command ring: submission with back-pressure, completion by
//! polling the fence word or by blocking on the ring's interrupt eventfd.
//!
//! Memory: one page-aligned [`DmaMemory`] block holds the submission queue (64-byte
//! descriptors), the completion queue (32-byte entries) and the fence word. It is
//! mapped into the device's IOMMU (pinned, permission-checked) like any buffer, as
//! driver-owned *coherent* memory ([`crate::iommu::IommuDomain::map_coherent`]), and the
//! device is given only IOVAs. The reference device reaches it through a view of its
//! own after the IOMMU's translation and permission check instead of a DMA transfer
//! (datasheet section 5.1); the protocol is the same either way.
//!
//! Completion: the fence word is the cheap "is it done" signal, but the driver never
//! trusts it alone: the device writes it by DMA, which the CPU may observe torn, and it
//! lands before the device publishes CQ_TAIL. A waiter that sees the fence reach its
//! seqno therefore drains the completion queue (Acquire on CQ_TAIL) and returns only
//! once it holds its command's completion entry.
//!
//! In flight: at most `size` commands are submitted and not yet reaped, so the
//! completion queue can never overflow.
//!
//! Unclaimed completions: reaped entries wait in a store until a `wait` claims them;
//! its memory is bounded by the ring size (at least [`store::MIN_CAP`] entries),
//! whatever is left unclaimed: the rule is in [`store`].
//!
//! Deadlines saturate: every timeout here, `Duration::MAX` included, is a bound, never
//! an overflow ([`crate::submitter::deadline_after`]).
//!
//! Files: this one (opening and closing a ring, its registers and memory), `submit`
//! (descriptors, the doorbell, back-pressure), `wait` (reaping completions, waiting
//! for fences), [`store`] (the unclaimed completions).

pub mod store;
mod submit;
mod wait;

pub use submit::{Backpressure, BatchFences};
pub use wait::{CompletionExt, WaitMode};

use crate::device::Device;
use crate::dma_memory::DmaMemory;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use userptr_ring::regs::{self, ring, ring_reg};
use userptr_ring::{Consumer, Geometry, Producer, SharedIndices, COMPLETION_SIZE, DESCRIPTOR_SIZE};

/// The SQ counters as the driver sees them: registers; storing the tail is the doorbell.
struct SqRegs<'a>(&'a dyn Device, u32);
impl SharedIndices for SqRegs<'_> {
    fn load_head(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::SQ_HEAD))
    }
    fn load_tail(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::SQ_TAIL))
    }
    fn store_head(&self, _head: u32) {
        // SQ_HEAD is read-only for the driver; the producer never calls this.
    }
    fn store_tail(&self, tail: u32) {
        self.0.write32(ring_reg(self.1, ring::SQ_TAIL), tail)
    }
}

/// The CQ counters as the driver sees them.
struct CqRegs<'a>(&'a dyn Device, u32);
impl SharedIndices for CqRegs<'_> {
    fn load_head(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::CQ_HEAD))
    }
    fn load_tail(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::CQ_TAIL))
    }
    fn store_head(&self, head: u32) {
        self.0.write32(ring_reg(self.1, ring::CQ_HEAD), head)
    }
    fn store_tail(&self, _tail: u32) {
        // CQ_TAIL is read-only for the driver; the consumer never calls this.
    }
}

struct State {
    prod: Producer,
    cons: Consumer,
    next_seqno: u64,
    in_flight: u32,
    /// Reaped completions nobody has claimed yet.
    done: store::Store,
    /// Highest seqno reaped; the ring completes in order, so every lower one was too.
    max_reaped: u64,
}

/// One command ring of a device, owned by the driver. Closed (ring disabled, its
/// memory unmapped) on drop. Derefs to [`QueueCore`], where the methods are.
pub struct CommandQueue {
    core: Arc<QueueCore>,
    /// Dropped after [`Drop::drop`] has disabled the ring: the next queue on this
    /// ring can only be opened once this one no longer touches it.
    _claim: crate::driver::RingClaim,
}

impl std::ops::Deref for CommandQueue {
    type Target = QueueCore;
    fn deref(&self) -> &QueueCore {
        &self.core
    }
}

/// The part of a queue that waiters share: the registry keeps a weak reference to it
/// for every in-flight submission, to wait for the device during invalidation.
pub struct QueueCore {
    driver: Driver,
    dev: Arc<dyn Device>,
    ring: u32,
    geo: Geometry,
    /// Shared with the device's IOMMU entry (its coherent view) while mapped.
    mem: Arc<DmaMemory>,
    iova: u64,
    cq_off: usize,
    fence_off: usize,
    state: Mutex<State>,
    eventfd: Arc<OwnedFd>,
    /// Back-pressure / `run` timeout in milliseconds.
    timeout_ms: AtomicU64,
    /// Set when the owning CommandQueue is dropped (the ring is disabled).
    closed: AtomicBool,
    /// Blocking-wait wake-ups that found the eventfd signalled (see `irq_wakeups`).
    irq_wakeups: AtomicU64,
}

impl std::fmt::Debug for CommandQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandQueue")
            .field("ring", &self.core.ring)
            .field("size", &self.core.geo.size())
            .field("iova", &format_args!("{:#x}", self.core.iova))
            .finish_non_exhaustive()
    }
}

impl CommandQueue {
    /// Set how long `Backpressure::Wait` and `run` wait before [`Error::Timeout`].
    /// `Duration::MAX` (or anything past `u64::MAX` ms) means no practical limit.
    pub fn set_timeout(&mut self, timeout: Duration) {
        // Relaxed: a setting, not a synchronisation point.
        self.core
            .timeout_ms
            .store(crate::submitter::millis(timeout), Ordering::Relaxed);
    }

    pub(crate) fn new(driver: Driver, ring_idx: u32, size: u32) -> Result<CommandQueue> {
        let dev = driver.ring_device()?.clone();
        let caps = dev.read32(regs::CAPS);
        let count = caps & 0xff;
        if ring_idx >= count {
            return Err(Error::NoSuchRing {
                ring: ring_idx,
                count,
            });
        }
        let geo = Geometry::new(size)?;
        if size > 1 << ((caps >> 8) & 0xff) {
            return Err(Error::RingSize(userptr_ring::GeometryError::Size(size)));
        }
        // Before anything is built whose drop would disable the ring: a refused open
        // must leave the queue already driving it untouched.
        let claim = driver.claim_ring(ring_idx)?;
        if dev.read32(ring_reg(ring_idx, ring::CONTROL)) & ring::CONTROL_ENABLE != 0 {
            // Enabled by something other than a queue of this driver.
            return Err(Error::RingBusy { ring: ring_idx });
        }
        let cq_off = size as usize * DESCRIPTOR_SIZE;
        let fence_off = cq_off + size as usize * COMPLETION_SIZE;
        let mem = Arc::new(DmaMemory::new(fence_off + 8)?);
        // Driver-owned for the queue's whole life: mapped as coherent memory (pinned
        // and permission-checked like any mapping; the reference device reaches it
        // through a view of its own instead of a DMA transfer).
        let iova = driver.map_coherent_reclaiming(&mem, Perm::READ_WRITE)?;
        let q = QueueCore {
            driver,
            dev: dev.clone(),
            ring: ring_idx,
            geo,
            mem,
            iova,
            cq_off,
            fence_off,
            state: Mutex::new(State {
                prod: Producer::new(geo, &SqRegs(&*dev, ring_idx)),
                cons: Consumer::new(geo, &CqRegs(&*dev, ring_idx)),
                next_seqno: 1,
                in_flight: 0,
                done: store::Store::new(size),
                max_reaped: 0,
            }),
            eventfd: Arc::new(
                rustix::event::eventfd(
                    0,
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
                )
                .map_err(|e| Error::sys("eventfd", e.into()))?,
            ),
            timeout_ms: AtomicU64::new(30_000),
            closed: AtomicBool::new(false),
            irq_wakeups: AtomicU64::new(0),
        };
        // From here on, Drop undoes whatever was done.
        let q = CommandQueue {
            core: Arc::new(q),
            _claim: claim,
        };
        q.program()?;
        Ok(q)
    }
}

impl QueueCore {
    fn timeout(&self) -> Duration {
        // Relaxed: a setting, not a synchronisation point.
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn dev(&self) -> &dyn Device {
        &*self.dev
    }

    fn reg(&self, r: u32) -> u32 {
        ring_reg(self.ring, r)
    }

    fn program(&self) -> Result<()> {
        let dev = self.dev();
        if dev.read32(self.reg(ring::CONTROL)) & ring::CONTROL_ENABLE != 0 {
            return Err(Error::RingBusy { ring: self.ring });
        }
        let split = |v: u64| (v as u32, (v >> 32) as u32);
        for (lo, hi, v) in [
            (ring::SQ_BASE_LO, ring::SQ_BASE_HI, self.iova),
            (
                ring::CQ_BASE_LO,
                ring::CQ_BASE_HI,
                self.iova + self.cq_off as u64,
            ),
            (
                ring::FENCE_LO,
                ring::FENCE_HI,
                self.iova + self.fence_off as u64,
            ),
        ] {
            let (l, h) = split(v);
            dev.write32(self.reg(lo), l);
            dev.write32(self.reg(hi), h);
        }
        dev.write32(self.reg(ring::SIZE_LOG2), self.geo.size().trailing_zeros());
        dev.set_irq_eventfd(self.ring, Some(self.eventfd.clone()))?;
        // Interrupts are armed by a blocking waiter when it is about to sleep
        // (IRQ_ARM), not raised for every batch: a ring nobody sleeps on costs the
        // device no eventfd write. Cleared in case something left the bit set.
        self.driver.irq_enable(self.ring, false);
        dev.write32(self.reg(ring::CONTROL), ring::CONTROL_ENABLE);
        let code = dev.read32(self.reg(ring::ERROR));
        if code != 0 {
            return Err(Error::RingConfig {
                ring: self.ring,
                code,
            });
        }
        // The ring starts with zeroed indices: restart our view of them.
        let mut st = self.lock();
        st.prod = Producer::new(self.geo, &SqRegs(dev, self.ring));
        st.cons = Consumer::new(self.geo, &CqRegs(dev, self.ring));
        Ok(())
    }

    fn lock(&self) -> crate::driver_section::Locked<MutexGuard<'_, State>> {
        crate::driver_section::lock(&self.state)
    }

    /// The ring index on the device.
    pub fn ring(&self) -> u32 {
        self.ring
    }

    /// Slots (the most commands in flight).
    pub fn size(&self) -> u32 {
        self.geo.size()
    }

    /// Commands submitted and not yet reaped.
    pub fn in_flight(&self) -> u32 {
        let mut st = self.lock();
        let _ = self.reap(&mut st);
        st.in_flight
    }

    /// How many times a blocking wait ([`WaitMode::Block`]) on this queue found the
    /// ring's eventfd signalled by the device: the wake-ups that came from the
    /// interrupt, not from the waiter's safety time slice (which reads the eventfd
    /// empty). For tests and diagnostics: a device that never signals leaves it at 0.
    pub fn irq_wakeups(&self) -> u64 {
        // Relaxed: a statistic.
        self.irq_wakeups.load(Ordering::Relaxed)
    }

    /// The last seqno the device wrote into the fence word (a hint: see module doc).
    pub fn completed_seqno(&self) -> u64 {
        self.mem.load_u64(self.fence_off)
    }

    /// Entries in the store of unclaimed completions (bounded by the ring size: see
    /// [`store`]). For tests and diagnostics.
    pub fn unclaimed_entries(&self) -> usize {
        let mut st = self.lock();
        let _ = self.reap(&mut st);
        st.done.entries()
    }

    /// The IOVA range of this queue's ring memory (descriptors, completions, fence:
    /// one block, mapped as coherent memory). For tests and diagnostics: what the
    /// device reaches there is subject to that mapping's translation and permission.
    pub fn ring_memory(&self) -> std::ops::Range<u64> {
        self.iova..self.iova + self.mem.len() as u64
    }

    /// The IOMMU domain this queue's device translates through.
    pub fn domain(&self) -> &Arc<dyn crate::iommu::IommuDomain> {
        self.driver.domain()
    }
}

impl Drop for CommandQueue {
    fn drop(&mut self) {
        let q = &*self.core;
        let dev = q.dev.clone();
        // The disable returns once the device finished any batch of this ring.
        dev.write32(q.reg(ring::CONTROL), 0);
        // Release: a waiter that sees `closed` also sees the ring disabled.
        q.closed.store(true, Ordering::Release);
        q.driver.irq_enable(q.ring, false);
        let _ = dev.set_irq_eventfd(q.ring, None);
        // Commands still queued are abandoned with the ring; the device may be in the
        // middle of one, and unmapping waits for nothing: its pin is released when the
        // in-flight transfer completes (io_uring holds its own reference).
        if let Err(e) = q.driver.unmap_raw(q.iova, q.mem.len() as u64) {
            tracing::error!("unmapping ring {} memory: {e}", q.ring);
        }
    }
}
