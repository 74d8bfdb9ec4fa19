//! The reference device: a software device with a documented BAR0 (the register map
//! is [`userptr_ring::regs`], the prose `docs/reference-device.md`). Everything that is
//! the reference device lives in this folder:
//! * this file: the register file ([`ReferenceDevice`], the [`Device`] it implements)
//!   and the [`Driver`] constructors for it;
//! * [`uring_iommu`]: its IOMMU, built on io_uring fixed buffers (real kernel pins);
//! * [`dma_port`]: the device side of that IOMMU: translation and transfers;
//! * [`fault_injection`]: [`PinFaults`](fault_injection::PinFaults), failing the IOMMU's
//!   pin attempts on purpose (`userptr torture --inject`);
//! * [`vram`]: device-local memory in a memfd; [`fifo`]: the staging FIFOs (pipes)
//!   COPY goes through;
//! * `engine`: the engine thread that executes the ring protocol; `commands`: what it
//!   does for each opcode;
//! * GPU virtual memory (datasheet section 10): `gpu_regs` (its registers), [`mmu`]
//!   (stage 1: the page walk), [`tlb`] (the TLB and its invalidation handshake),
//!   `vm_exec` (the engine's VM rounds: translation, device memory, hold and replay).
//!
//! It is the embedded default device: everything the driver does against a real
//! device it does against this one, with real kernel pins.
//!
//! Its BAR0 is process memory (atomics) rather than MMIO; a register write's side
//! effect, such as waking the engine on a doorbell, happens in the writing thread, the
//! way a trapped MMIO write would be handled.

mod commands;
pub mod dma_port;
mod engine;
pub mod fault_injection;
pub mod fifo;
mod gpu_regs;
pub mod mmu;
mod pipeline;
mod placement;
pub mod tlb;
pub mod uring_iommu;
mod vm_exec;
pub mod vram;

use crate::device::Device;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::IommuDomain;
use crate::reference::uring_iommu::{UringIommu, UringIommuConfig};
use crate::reference::vram::Vram;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use userptr_ring::regs::{self, ring};
use userptr_ring::{Counter, IndexRefs, SharedIndices};

/// How to build a reference device.
#[derive(Clone, Debug)]
pub struct ReferenceConfig {
    /// The IOMMU: mapping-count limit, IOVA ranges, requests in flight.
    pub iommu: UringIommuConfig,
    /// Number of rings (1..=8).
    pub rings: u32,
    /// Bytes of device memory used to stage data (at least 4 MiB, rounded up to
    /// 1 MiB).
    pub staging_bytes: usize,
    /// Files the staging area is striped across (1..=16): the kernel runs buffered
    /// writes to one file one at a time, so transfers into staging spread over
    /// several files run in parallel (`vram` module doc).
    pub staging_lanes: usize,
    /// Whether COPY of IOVAs goes through staging FIFOs (pipes, one per 1 MiB of
    /// staging up to 16, made at the first COPY; datasheet section 4.1) rather than
    /// the staging area of VRAM: the kernel's workers run transfers through different
    /// pipes in parallel.
    pub copy_fifos: bool,
    /// GPU virtual memory: page-table memory, device memory, the TLB.
    pub gpu: GpuConfig,
}

/// The GPU-virtual-memory part of a reference device (datasheet section 10).
#[derive(Clone, Debug)]
pub struct GpuConfig {
    /// Bytes of VRAM for page tables (4 KiB each; at least 64 KiB).
    pub page_table_bytes: usize,
    /// Bytes of VRAM for device-memory bindings (rounded up to 2 MiB).
    pub device_memory_bytes: usize,
    /// TLB entries (a power of two, 16..=4096).
    pub tlb_entries: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            page_table_bytes: 8 << 20,
            device_memory_bytes: 16 << 20,
            tlb_entries: 256,
        }
    }
}

impl Default for ReferenceConfig {
    fn default() -> Self {
        ReferenceConfig {
            iommu: UringIommuConfig::default(),
            rings: 4,
            staging_bytes: 32 << 20,
            staging_lanes: 4,
            copy_fifos: true,
            gpu: GpuConfig::default(),
        }
    }
}

/// One ring's registers.
///
/// The four index registers are kept by who writes them, each group on cache lines
/// of its own: SQ_TAIL and CQ_HEAD (the driver), SQ_HEAD, CQ_TAIL and the busy mark
/// (the engine), apart from the configuration the engine's idle pass reads on every
/// round. A store then takes from the other core only the line the other side has to
/// see anyway; with all of them on one line, each side's stores and the idle pass's
/// loads pulled it back and forth several times per command.
#[derive(Default)]
struct RingRegs {
    sq_base: [AtomicU32; 2],
    cq_base: [AtomicU32; 2],
    fence: [AtomicU32; 2],
    size_log2: AtomicU32,
    control: AtomicU32,
    /// SQ_TAIL, CQ_HEAD.
    driver_side: Line<[Counter; 2]>,
    device_side: Line<DeviceSide>,
    error: AtomicU32,
    /// Bumped on every enable, so the engine rebuilds its view of the ring.
    generation: AtomicU32,
    /// The VM register (0: IOVAs).
    vm: AtomicU32,
    /// The HOLD register, set and cleared by the engine.
    hold: AtomicU32,
    /// The last REPLAY decision written while the ring was held (0: none yet).
    replay: AtomicU32,
}

/// Two cache lines (the adjacent-line prefetcher moves pairs) to itself.
#[derive(Default)]
#[repr(align(128))]
struct Line<T>(T);

/// The index registers the engine writes, and its busy mark.
#[derive(Default)]
struct DeviceSide {
    sq_head: Counter,
    cq_tail: Counter,
    /// Set by the engine while it works on a batch of this ring; a disable waits for
    /// it to clear, so a disabled ring's memory is never touched again.
    busy: AtomicBool,
}

impl RingRegs {
    /// The SQ's counters (head on the engine's line, tail on the driver's).
    fn sq(&self) -> IndexRefs<'_> {
        IndexRefs::new(&self.device_side.0.sq_head, &self.driver_side.0[0])
    }
    /// The CQ's counters (head on the driver's line, tail on the engine's).
    fn cq(&self) -> IndexRefs<'_> {
        IndexRefs::new(&self.driver_side.0[1], &self.device_side.0.cq_tail)
    }
    fn busy(&self) -> &AtomicBool {
        &self.device_side.0.busy
    }
}

/// The register file and the device state shared with the engine thread.
struct Shared {
    rings: u32,
    control: AtomicU32,
    status: AtomicU32,
    irq_status: AtomicU32,
    irq_mask: AtomicU32,
    /// IRQ_ARM: rings whose next published batch raises the interrupt.
    irq_arm: AtomicU32,
    fault_count: AtomicU32,
    fault_iova: [AtomicU32; 2],
    fault_info: AtomicU32,
    completed: AtomicU32,
    ring: [RingRegs; regs::MAX_RINGS as usize],
    reset_requested: AtomicBool,
    shutdown: AtomicBool,
    irq: Mutex<Vec<Option<Arc<OwnedFd>>>>,
    engine: OnceLock<Thread>,
    /// The CPU the latest doorbell was rung from (the engine keeps off it).
    doorbell_cpu: placement::DoorbellCpu,
    /// GPU virtual memory (datasheet section 10).
    gpu: gpu_regs::GpuRegs,
}

impl Shared {
    fn wake(&self) {
        if let Some(t) = self.engine.get() {
            t.unpark();
        }
    }

    fn caps(&self) -> u32 {
        let ops: u32 = userptr_ring::Opcode::ALL
            .iter()
            .fold(0, |m, op| m | 1 << (*op as u32));
        self.rings | regs::MAX_RING_LOG2 << 8 | ops << 16
    }

    fn read(&self, off: u32) -> u32 {
        // Acquire on every register read: the Device contract.
        let ld = |a: &AtomicU32| a.load(Ordering::Acquire);
        if (regs::RING_BASE..regs::RING_BASE + regs::MAX_RINGS * regs::RING_STRIDE).contains(&off) {
            let r = ((off - regs::RING_BASE) / regs::RING_STRIDE) as usize;
            let rr = &self.ring[r];
            return match (off - regs::RING_BASE) % regs::RING_STRIDE {
                ring::SQ_BASE_LO => ld(&rr.sq_base[0]),
                ring::SQ_BASE_HI => ld(&rr.sq_base[1]),
                ring::CQ_BASE_LO => ld(&rr.cq_base[0]),
                ring::CQ_BASE_HI => ld(&rr.cq_base[1]),
                ring::FENCE_LO => ld(&rr.fence[0]),
                ring::FENCE_HI => ld(&rr.fence[1]),
                ring::SIZE_LOG2 => ld(&rr.size_log2),
                ring::CONTROL => ld(&rr.control),
                ring::SQ_TAIL => rr.sq().load_tail(),
                ring::SQ_HEAD => rr.sq().load_head(),
                ring::CQ_TAIL => rr.cq().load_tail(),
                ring::CQ_HEAD => rr.cq().load_head(),
                ring::ERROR => ld(&rr.error),
                ring::VM => ld(&rr.vm),
                ring::HOLD => ld(&rr.hold),
                _ => 0,
            };
        }
        if let Some(v) = self.gpu.read(off) {
            return v;
        }
        match off {
            regs::ID => regs::ID_VALUE,
            regs::VERSION => regs::VERSION_VALUE,
            regs::CAPS => self.caps(),
            regs::CONTROL => ld(&self.control),
            regs::STATUS => ld(&self.status),
            regs::IRQ_STATUS => ld(&self.irq_status),
            regs::IRQ_MASK => ld(&self.irq_mask),
            regs::IRQ_ARM => ld(&self.irq_arm),
            regs::FAULT_COUNT => ld(&self.fault_count),
            regs::FAULT_IOVA_LO => ld(&self.fault_iova[0]),
            regs::FAULT_IOVA_HI => ld(&self.fault_iova[1]),
            regs::FAULT_INFO => ld(&self.fault_info),
            regs::COMPLETED => ld(&self.completed),
            _ => 0,
        }
    }

    fn write(&self, off: u32, v: u32) {
        // Release on every register write: the Device contract.
        let st = |a: &AtomicU32| a.store(v, Ordering::Release);
        if (regs::RING_BASE..regs::RING_BASE + regs::MAX_RINGS * regs::RING_STRIDE).contains(&off) {
            let r = ((off - regs::RING_BASE) / regs::RING_STRIDE) as usize;
            if r as u32 >= self.rings {
                return;
            }
            let rr = &self.ring[r];
            match (off - regs::RING_BASE) % regs::RING_STRIDE {
                ring::SQ_BASE_LO => st(&rr.sq_base[0]),
                ring::SQ_BASE_HI => st(&rr.sq_base[1]),
                ring::CQ_BASE_LO => st(&rr.cq_base[0]),
                ring::CQ_BASE_HI => st(&rr.cq_base[1]),
                ring::FENCE_LO => st(&rr.fence[0]),
                ring::FENCE_HI => st(&rr.fence[1]),
                ring::SIZE_LOG2 => st(&rr.size_log2),
                ring::CONTROL => self.ring_control(rr, v),
                ring::SQ_TAIL => {
                    rr.sq().store_tail(v);
                    self.doorbell_cpu.note();
                    self.wake();
                }
                ring::CQ_HEAD => {
                    rr.cq().store_head(v);
                    self.wake();
                }
                ring::VM => st(&rr.vm),
                // Only a held ring takes a decision (Acquire: the engine set HOLD with
                // Release before it published the fault record).
                ring::REPLAY
                    if rr.hold.load(Ordering::Acquire) & ring::HOLD_HELD != 0
                        && (v == ring::REPLAY_RETRY || v == ring::REPLAY_FAIL) =>
                {
                    st(&rr.replay);
                    self.wake();
                }
                _ => {}
            }
            return;
        }
        match self.gpu.write(off, v) {
            gpu_regs::Written::Done => return,
            gpu_regs::Written::Wake => {
                self.wake();
                return;
            }
            gpu_regs::Written::No => {}
        }
        match off {
            regs::CONTROL => {
                if v & regs::CONTROL_RESET != 0 {
                    // Relaxed on the bits: STATUS and the flag are re-read by the
                    // engine after the Release store of reset_requested below.
                    self.status
                        .fetch_or(regs::STATUS_RESETTING, Ordering::Relaxed);
                    self.reset_requested.store(true, Ordering::Release);
                }
                self.control
                    .store(v & regs::CONTROL_ENABLE, Ordering::Release);
                self.wake();
            }
            // AcqRel: a read-modify-write on a register other writers also change.
            regs::IRQ_STATUS => {
                self.irq_status.fetch_and(!v, Ordering::AcqRel);
            }
            regs::IRQ_MASK => st(&self.irq_mask),
            // AcqRel: a read-modify-write on a register the engine clears bits of; the
            // arming driver's SeqCst fence after this write is the other half of the
            // handshake in the engine's `raise_if_armed`.
            regs::IRQ_ARM => {
                self.irq_arm
                    .fetch_or(v & ((1 << self.rings) - 1), Ordering::AcqRel);
            }
            _ => {}
        }
    }

    fn ring_control(&self, rr: &RingRegs, v: u32) {
        let was = rr.control.load(Ordering::Acquire) & ring::CONTROL_ENABLE;
        let now = v & ring::CONTROL_ENABLE;
        if now == 0 {
            // SeqCst pairs with the engine's SeqCst busy-store / control-load (a
            // Dekker handshake): either the engine sees the ring disabled before it
            // starts a batch, or we see it busy and wait for the batch to finish.
            rr.control.store(0, Ordering::SeqCst);
            while rr.busy().load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            return;
        }
        if was != 0 {
            return;
        }
        let log2 = rr.size_log2.load(Ordering::Acquire);
        let addr = |p: &[AtomicU32; 2]| {
            p[0].load(Ordering::Acquire) as u64 | (p[1].load(Ordering::Acquire) as u64) << 32
        };
        let (sq, cq, fence) = (addr(&rr.sq_base), addr(&rr.cq_base), addr(&rr.fence));
        let ok = (1..=regs::MAX_RING_LOG2).contains(&log2)
            && sq != 0
            && cq != 0
            && fence != 0
            && sq % 64 == 0
            && cq % 32 == 0
            && fence % 8 == 0;
        if !ok {
            rr.error.store(ring::ERROR_CONFIG, Ordering::Release);
            return;
        }
        rr.sq().reset();
        rr.cq().reset();
        rr.error.store(0, Ordering::Relaxed);
        // A hold does not survive a disable (the engine drops its own state at the new
        // generation).
        rr.hold.store(0, Ordering::Relaxed);
        rr.replay.store(0, Ordering::Relaxed);
        // Release: the configuration and zeroed indices above are visible to the engine
        // once it sees the new generation (it loads it with Acquire).
        rr.generation.fetch_add(1, Ordering::Release);
        rr.control.store(ring::CONTROL_ENABLE, Ordering::Release);
        self.wake();
    }
}

/// The reference device.
pub struct ReferenceDevice {
    shared: Arc<Shared>,
    iommu: Arc<UringIommu>,
    engine: Option<JoinHandle<()>>,
    /// BAR2: the device-memory heap, mappable by the CPU (datasheet section 11).
    aperture: crate::device::Aperture,
}

impl ReferenceDevice {
    /// Create the device and start its engine. Fails with
    /// [`Error::IoUringUnavailable`] where io_uring is not allowed.
    pub fn new(cfg: ReferenceConfig) -> Result<Arc<ReferenceDevice>> {
        let rings = cfg.rings.clamp(1, regs::MAX_RINGS);
        let iommu = UringIommu::new(cfg.iommu.clone())?;
        let port = iommu.take_port().expect("fresh IOMMU has its port");
        // VRAM: the engine's areas and staging, then the page-table region, then the
        // device-memory heap (datasheet section 4), each 2 MiB-aligned.
        let staging = (cfg.staging_bytes.max(4 << 20) as u64).next_multiple_of(vram::STRIPE);
        let pt_base = (engine::STAGING_OFF + staging).next_multiple_of(2 << 20);
        let pt_size = (cfg.gpu.page_table_bytes.max(64 << 10) as u64).next_multiple_of(4096);
        let devmem_base = (pt_base + pt_size).next_multiple_of(2 << 20);
        let devmem_size = (cfg.gpu.device_memory_bytes as u64).next_multiple_of(2 << 20);
        let layout = mmu::Layout {
            pt_base,
            pt_size,
            devmem_base,
            devmem_size,
        };
        let mut vram = Vram::new((devmem_base + devmem_size) as usize)?;
        vram.stripe(engine::STAGING_OFF, staging, cfg.staging_lanes.clamp(1, 16))?;
        let fifos = if cfg.copy_fifos {
            let slots = ((staging / uring_iommu::CHUNK) as usize).min(engine::FIFOS);
            fifo::Fifos::lazy(slots, uring_iommu::CHUNK)
        } else {
            fifo::Fifos::lazy(0, uring_iommu::CHUNK)
        };
        let pt = Arc::new(vram.page_table_view(pt_base, pt_size)?);
        let aperture = crate::device::Aperture {
            fd: Arc::new(
                vram.fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::sys("dup(vram memfd)", e))?,
            ),
            file_offset: devmem_base,
            vram_base: devmem_base,
            len: devmem_size,
        };
        let tlb_entries = cfg.gpu.tlb_entries.clamp(16, 4096).next_power_of_two();
        let shared = Arc::new(Shared {
            rings,
            control: AtomicU32::new(regs::CONTROL_ENABLE),
            status: AtomicU32::new(regs::STATUS_ALIVE),
            irq_status: AtomicU32::new(0),
            irq_mask: AtomicU32::new(0),
            irq_arm: AtomicU32::new(0),
            fault_count: AtomicU32::new(0),
            fault_iova: Default::default(),
            fault_info: AtomicU32::new(0),
            completed: AtomicU32::new(0),
            ring: Default::default(),
            reset_requested: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            irq: Mutex::new(vec![None; rings as usize]),
            engine: OnceLock::new(),
            doorbell_cpu: placement::DoorbellCpu::new(),
            gpu: gpu_regs::GpuRegs::new(layout, tlb_entries, pt),
        });
        let s2 = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("userptr-ref-engine".into())
            .spawn(move || {
                // Driver code for its whole life: no application signal handler runs
                // here (see driver_section).
                crate::driver_section::block_signals_for_thread();
                let _ = ready_tx.send(());
                engine::Engine::new(s2, port, vram, staging, fifos).run()
            })
            .map_err(|e| Error::sys("spawn(engine thread)", e))?;
        // Return only once the engine runs: a thread still starting up has every
        // signal blocked, which a seccomp monitor installed next must not meet.
        let _ = ready_rx.recv();
        let _ = shared.engine.set(handle.thread().clone());
        Ok(Arc::new(ReferenceDevice {
            shared,
            iommu,
            engine: Some(handle),
            aperture,
        }))
    }

    /// The io_uring IOMMU (for tests and the bench harness).
    pub fn iommu(&self) -> &Arc<UringIommu> {
        &self.iommu
    }
}

/// The reference device as a [`Driver`]: the embedded default.
impl Driver {
    /// A new reference device with the default configuration.
    pub fn reference() -> Result<Driver> {
        Driver::with_reference(ReferenceConfig::default())
    }

    /// A new reference device with `cfg`.
    pub fn with_reference(cfg: ReferenceConfig) -> Result<Driver> {
        let dev: Arc<dyn Device> = ReferenceDevice::new(cfg)?;
        Ok(Driver::new(dev))
    }
}

impl Device for ReferenceDevice {
    fn aperture(&self) -> Option<crate::device::Aperture> {
        Some(self.aperture.clone())
    }

    fn name(&self) -> String {
        format!(
            "reference device ({} rings, io_uring IOMMU)",
            self.shared.rings
        )
    }

    fn domain(&self) -> Arc<dyn IommuDomain> {
        self.iommu.clone()
    }

    fn read32(&self, offset: u32) -> u32 {
        self.shared.read(offset)
    }

    fn write32(&self, offset: u32, value: u32) {
        // In a fork child the register file is a copy and the engine thread is not
        // there: writes would only wait for an engine that never answers (a ring
        // disable waits for its batch). The child's device is inert.
        if crate::fork::in_forked_child() {
            return;
        }
        self.shared.write(offset, value)
    }

    fn set_irq_eventfd(&self, ring: u32, eventfd: Option<Arc<OwnedFd>>) -> Result<()> {
        if ring == regs::FAULT_VECTOR {
            let mut f = crate::driver_section::lock(&self.shared.gpu.fault_irq);
            *f = eventfd;
            return Ok(());
        }
        let mut irq = crate::driver_section::lock(&self.shared.irq);
        let slot = irq.get_mut(ring as usize).ok_or(Error::NoSuchRing {
            ring,
            count: self.shared.rings,
        })?;
        *slot = eventfd;
        Ok(())
    }
}

impl Drop for ReferenceDevice {
    fn drop(&mut self) {
        if crate::fork::in_forked_child() {
            // The engine thread exists only in the parent: nothing to stop or join.
            std::mem::forget(self.engine.take());
            return;
        }
        // Release: the engine loads shutdown with Acquire before exiting.
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
    }
}
