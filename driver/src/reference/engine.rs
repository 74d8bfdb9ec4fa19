//! The reference device's engine thread: fetches descriptors through the IOMMU,
//! executes them against device memory, writes completions and fences back by DMA,
//! and raises interrupts.
//!
//! Per ring and per batch (at most [`BATCH`] descriptors):
//! 1. load SQ_TAIL (Acquire, the doorbell) and DMA the new descriptors into VRAM;
//! 2. decode and execute each in order; a malformed one completes with
//!    `BadDescriptor`, a translation or permission failure with `DmaFault` and a
//!    fault record; the device keeps running;
//! 3. DMA the completion entries into the CQ, then the last seqno into the fence word
//!    (ordered: the fence never lands before the entries it covers);
//! 4. publish SQ_HEAD and CQ_TAIL (Release) and, if the ring's `IRQ_MASK` bit is set,
//!    a command asked for it or a waiter armed it (`IRQ_ARM`, see `take_arm`), signal
//!    the ring's eventfd.
//!
//! Ring structures in driver-owned coherent memory (every queue's) are fetched and
//! written through the device's own view of it, after the IOMMU's translation and
//! permission check (`DmaPort::run_coherent`, datasheet section 5.1); everything a
//! command addresses, and a ring placed in any other memory, goes through the pinned
//! pages (io_uring transfers).
//!
//! Idle, it spins for `SPIN` (looking at the clock every few rounds, yielding the CPU
//! every ~10 µs and right after an interrupt, moving off the submitter's CPU if it
//! finds itself there: placement.rs) and then parks; a doorbell write unparks it.
//!
//! A ring bound to a VM (datasheet section 10) translates its commands' addresses
//! through the VM's page table first and may hold a command on a replayable fault:
//! that part is `vm_exec`; every DMA round starts at a TLB-invalidation safe point.

use super::commands::Exec;
use super::mmu::Mmu;
use super::placement::Placement;
use super::vm_exec::{Hold, Piece, Progress};
use super::Shared;
use crate::reference::dma_port::{Direction, DmaError, DmaPort, Transfer};
use crate::reference::fifo::Fifos;
use crate::reference::uring_iommu::CHUNK;
use crate::reference::vram::Vram;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userptr_ring::regs::{self, ring};
use userptr_ring::{
    Completion, Consumer, Descriptor, FaultRecord, Geometry, Producer, Status, COMPLETION_SIZE,
    DESCRIPTOR_SIZE,
};

/// Most descriptors fetched and completed per batch.
pub const BATCH: u32 = 64;
const FETCH_OFF: u64 = 0;
const CQE_OFF: u64 = FETCH_OFF + BATCH as u64 * DESCRIPTOR_SIZE as u64;
const FENCE_OFF: u64 = CQE_OFF + BATCH as u64 * COMPLETION_SIZE as u64;
pub(super) const SCRATCH_OFF: u64 = FENCE_OFF + 64;
/// Where a fault-queue record is built before its DMA (datasheet section 10.6).
pub(super) const FAULTREC_OFF: u64 = SCRATCH_OFF + 64;
pub(super) const FILL_OFF: u64 = 1 << 20;
/// Where data staging starts in VRAM; everything above is staging.
pub const STAGING_OFF: u64 = FILL_OFF + CHUNK;
/// Most staging FIFOs a device makes for COPY (datasheet section 4.1): 16 MiB of pipe
/// capacity, a quarter of the default per-user pipe-page quota; more in flight gained
/// nothing measurable on two cores (16 and 32 both 29-31 ms of CPU per 64 MiB).
pub(super) const FIFOS: usize = 16;
/// How long the engine spins on the doorbells before parking.
const SPIN: Duration = Duration::from_micros(50);
/// Idle rounds between two looks at the clock while spinning.
const SPIN_CLOCK_EVERY: u32 = 32;
/// Idle rounds between two yields of the CPU while spinning (every eighth look at the
/// clock, some 10 µs here). A yield is a system call, and a doorbell rung while it
/// runs waits for it: yielding at every look at the clock cost a batch of 64 NOPs a
/// tenth of its time. Sharing a CPU with the submitter, the case the yield is for, is
/// mostly handled by moving off it (placement.rs). After an interrupt the engine
/// yields at its next look at the clock instead: the thread the interrupt woke may
/// have been queued on this very CPU (a blocking wait measured 40 µs from completion
/// to return with yields this rare, 26 µs with one at every look, on 2 vCPUs).
const SPIN_YIELD_EVERY: u32 = 8 * SPIN_CLOCK_EVERY;

struct RingState {
    generation: u32,
    geo: Geometry,
    sq_base: u64,
    cq_base: u64,
    fence: u64,
    sq: Consumer,
    cq: Producer,
}

pub(super) struct Engine {
    pub(super) shared: Arc<Shared>,
    pub(super) port: DmaPort,
    pub(super) vram: Vram,
    rings: Vec<Option<RingState>>,
    pub(super) transfers: Vec<Transfer>,
    pub(super) fill_byte: Option<u8>,
    pub(super) staging: u64,
    /// COPY's staging FIFOs, one per staging slot (none: COPY stages in VRAM).
    pub(super) fifos: Fifos,
    /// Stage 1 of VM rings: the TLB and the page walker.
    pub(super) mmu: Mmu,
    /// The VM of the command executing now (0: none, addresses are IOVAs; always 0
    /// while ring structures are moved).
    pub(super) vm_id: u32,
    /// Per ring: the command held on a replayable fault.
    pub(super) holds: Vec<Option<Hold>>,
    /// A VM round's translated pieces, and the IOVA transfers among them.
    pub(super) pieces: Vec<Piece>,
    pub(super) xlated: Vec<Transfer>,
    /// Keeping off the submitter's CPU (placement.rs).
    placement: Placement,
    /// An interrupt was raised since the idle spin last yielded.
    interrupted: bool,
}

impl Engine {
    pub(super) fn new(
        shared: Arc<Shared>,
        port: DmaPort,
        vram: Vram,
        staging: u64,
        fifos: Fifos,
    ) -> Engine {
        let g = &shared.gpu;
        let mmu = Mmu::new(g.pt.clone(), g.layout, g.tlb_entries as usize);
        Engine {
            rings: (0..shared.rings).map(|_| None).collect(),
            holds: (0..shared.rings).map(|_| None).collect(),
            shared,
            port,
            vram,
            transfers: Vec::with_capacity(256),
            fill_byte: None,
            staging,
            fifos,
            mmu,
            vm_id: 0,
            pieces: Vec::with_capacity(256),
            xlated: Vec::with_capacity(256),
            placement: Placement::new(),
            interrupted: false,
        }
    }

    pub(super) fn run(mut self) {
        // The engine is driver code: its own calls (its allocator trimming memory, say)
        // must pass through a monitor, which may be waiting for this very engine.
        let _section = crate::driver_section::enter();
        let mut idle_since = Instant::now();
        // Idle rounds since the last check of the clock: reading it on every round
        // would cost more than the round itself.
        let mut idle_rounds = 0u32;
        loop {
            // Acquire: pairs with the Release stores of the device's owner / register
            // writers; nothing else is published through these flags.
            if self.shared.shutdown.load(Ordering::Acquire) {
                break;
            }
            if self.shared.reset_requested.load(Ordering::Acquire) {
                self.reset();
            }
            // A safe point: no access is in flight here (datasheet section 10.5).
            self.tlb_sync();
            let enabled = self.shared.control.load(Ordering::Acquire) & regs::CONTROL_ENABLE != 0;
            let mut busy = false;
            if enabled {
                for r in 0..self.shared.rings {
                    busy |= self.service(r, false);
                }
            }
            if busy {
                idle_rounds = 0;
                continue;
            }
            idle_rounds += 1;
            // The spin is timed from the first look at the clock, SPIN_CLOCK_EVERY
            // rounds in: a doorbell that comes sooner (a driver's next command) costs
            // no clock reading at all.
            if idle_rounds == SPIN_CLOCK_EVERY {
                idle_since = Instant::now();
                // Idle: the moment to find out whether this spin is keeping the
                // submitter from its CPU (placement.rs).
                self.placement.keep_off(&self.shared.doorbell_cpu);
            }
            if idle_rounds % SPIN_CLOCK_EVERY != 0 {
                std::hint::spin_loop();
            } else if idle_since.elapsed() < SPIN {
                // Give the CPU away now and then: on a machine whose other cores are
                // busy the driver thread may be waiting for this very core, and would
                // otherwise get it only when the spin ends (tens of µs a command).
                if self.interrupted || idle_rounds % SPIN_YIELD_EVERY == 0 {
                    self.interrupted = false;
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::park_timeout(Duration::from_millis(20));
                idle_rounds = 0;
            }
        }
        let status = &self.shared.status;
        status.fetch_and(!regs::STATUS_ALIVE, Ordering::AcqRel);
    }

    /// Abort every queued command of every ring (status `Aborted`), then clear the
    /// reset request.
    fn reset(&mut self) {
        // Take the request first: a reset written while this pass runs sets it again
        // and gets a pass of its own instead of being lost.
        // AcqRel: pairs with the Release store in the CONTROL write handler.
        while self.shared.reset_requested.swap(false, Ordering::AcqRel) {
            for r in 0..self.shared.rings {
                while self.service(r, true) {}
            }
        }
        self.shared
            .status
            .fetch_and(!regs::STATUS_RESETTING, Ordering::AcqRel);
    }

    /// The engine's view of ring `r`, rebuilt when the driver re-enabled it.
    fn ring_state(&mut self, r: u32) -> Option<&mut RingState> {
        let rr = &self.shared.ring[r as usize];
        if rr.control.load(Ordering::Acquire) & ring::CONTROL_ENABLE == 0 {
            return None;
        }
        // Acquire: pairs with the Release increment in ring_control, after which the
        // configuration registers and the zeroed indices are visible.
        let generation = rr.generation.load(Ordering::Acquire);
        let stale = match &self.rings[r as usize] {
            Some(st) => st.generation != generation,
            None => true,
        };
        if stale {
            // A hold does not survive a disable and enable.
            self.holds[r as usize] = None;
            let addr = |p: &[std::sync::atomic::AtomicU32; 2]| {
                p[0].load(Ordering::Acquire) as u64 | (p[1].load(Ordering::Acquire) as u64) << 32
            };
            let geo = Geometry::new(1 << rr.size_log2.load(Ordering::Acquire)).ok()?;
            self.rings[r as usize] = Some(RingState {
                generation,
                geo,
                sq_base: addr(&rr.sq_base),
                cq_base: addr(&rr.cq_base),
                fence: addr(&rr.fence),
                sq: Consumer::new(geo, &rr.sq()),
                cq: Producer::new(geo, &rr.cq()),
            });
        }
        self.rings[r as usize].as_mut()
    }

    fn ring_error(&mut self, r: u32, code: u32) {
        let rr = &self.shared.ring[r as usize];
        rr.error.store(code, Ordering::Release);
        rr.control.store(0, Ordering::Release);
        self.rings[r as usize] = None;
        tracing::warn!(
            ring = r,
            code,
            "reference device stopped a ring: {}",
            regs::ring_error_name(code)
        );
        self.interrupt(r);
    }

    fn interrupt(&mut self, r: u32) {
        self.interrupted = true;
        self.shared.irq_status.fetch_or(1 << r, Ordering::AcqRel);
        let fd = crate::driver_section::lock(&self.shared.irq)[r as usize].clone();
        if let Some(fd) = fd {
            // An eventfd write only fails if the counter would overflow, in which case
            // the waiter is already due to wake.
            let _ = rustix::io::write(&*fd, &1u64.to_ne_bytes());
        }
    }

    /// Process one batch on ring `r`. Returns whether there was work.
    fn service(&mut self, r: u32, abort: bool) -> bool {
        if !abort && self.nothing_to_do(r) {
            return false;
        }
        let shared = self.shared.clone();
        let rr = &shared.ring[r as usize];
        // SeqCst: see ring_control; after this the driver's disable waits for us.
        rr.busy().store(true, Ordering::SeqCst);
        let worked = rr.control.load(Ordering::SeqCst) & ring::CONTROL_ENABLE != 0
            && self.service_batch(r, abort);
        // Release: our DMA to the ring's memory is done before the disable returns.
        rr.busy().store(false, Ordering::Release);
        worked
    }

    /// The idle pass's cheap look, at registers only (no ring memory, so no busy
    /// handshake): a disabled ring, or an enabled one with no hold whose SQ_TAIL has
    /// not moved since its last batch, has nothing to do. Anything else takes the full
    /// path of `service`, which looks again under the handshake.
    fn nothing_to_do(&self, r: u32) -> bool {
        let rr = &self.shared.ring[r as usize];
        // Acquire: as in `ring_state`; a stale answer only delays the full path by a
        // pass (the doorbell's Release store is seen on a later load).
        if rr.control.load(Ordering::Acquire) & ring::CONTROL_ENABLE == 0 {
            return true;
        }
        match &self.rings[r as usize] {
            Some(st) => {
                self.holds[r as usize].is_none()
                    && st.generation == rr.generation.load(Ordering::Acquire)
                    && rr.sq().tail() == st.sq.head()
            }
            None => false,
        }
    }

    fn service_batch(&mut self, r: u32, abort: bool) -> bool {
        let shared = self.shared.clone();
        let rr = &shared.ring[r as usize];
        if self.ring_state(r).is_none() {
            return false;
        }
        // A held ring waits for the driver's REPLAY, unless a reset aborts the held
        // command with the rest (datasheet section 10.6).
        if abort {
            self.drop_hold(r);
        } else if !self.hold_decided(r) {
            return false;
        }
        let st = self.rings[r as usize].as_mut().expect("ring state present");
        let avail = match st.sq.available(&rr.sq()) {
            Ok(n) => n,
            Err(_) => {
                self.ring_error(r, ring::ERROR_INDEX);
                return true;
            }
        };
        // A pause (CONTROL.ENABLE cleared) written before the doorbell of these
        // descriptors is seen here, however late the pass that read ENABLE set at its
        // top: `available` loads SQ_TAIL with Acquire, pairing with the doorbell's
        // Release store, which follows the pause in the writer's order. Such
        // descriptors wait for the resume (datasheet section 7); a reset's abort pass
        // runs paused or not.
        if !abort && shared.control.load(Ordering::Acquire) & regs::CONTROL_ENABLE == 0 {
            return false;
        }
        // A CQ_HEAD written past CQ_TAIL would read as "no room" forever: an error.
        if rr.cq().tail().wrapping_sub(rr.cq().head()) > st.geo.size() {
            self.ring_error(r, ring::ERROR_INDEX);
            return true;
        }
        let n = avail.min(BATCH).min(st.cq.free(&rr.cq()));
        if n == 0 {
            return false;
        }
        // 1. Fetch: the descriptors, possibly in two pieces around the wrap.
        let (geo, sq_base, cq_base, fence) = (st.geo, st.sq_base, st.cq_base, st.fence);
        let first = st.sq.slot(0) as u64;
        let k1 = (n as u64).min(geo.size() as u64 - first);
        self.transfers.clear();
        self.transfers.push(Transfer {
            dir: Direction::ToDevice,
            iova: sq_base + first * DESCRIPTOR_SIZE as u64,
            len: k1 * DESCRIPTOR_SIZE as u64,
            vram_off: FETCH_OFF,
            then: false,
        });
        if (n as u64) > k1 {
            self.transfers.push(Transfer {
                dir: Direction::ToDevice,
                iova: sq_base,
                len: (n as u64 - k1) * DESCRIPTOR_SIZE as u64,
                vram_off: FETCH_OFF + k1 * DESCRIPTOR_SIZE as u64,
                then: false,
            });
        }
        if let Err(e) = self.ring_dma() {
            self.ring_error(r, dma_ring_error(&e, ring::ERROR_SQ_FAULT));
            return true;
        }
        // 2. Execute. A command held on a replayable fault ends the batch: only the
        // commands before it are completed (datasheet section 10.6).
        let mut want_irq = shared.irq_mask.load(Ordering::Acquire) & (1 << r) != 0;
        let mut last_seqno = 0;
        let vm_id = rr.vm.load(Ordering::Acquire);
        let mut executed = n;
        for i in 0..n as u64 {
            // Loaded as words (the wire format's little-endian u64s) straight from the
            // fetched copy, without a byte copy on the stack in between.
            let raw = self.vram.bytes(
                FETCH_OFF + i * DESCRIPTOR_SIZE as u64,
                DESCRIPTOR_SIZE as u64,
            );
            let words: [u64; DESCRIPTOR_SIZE / 8] = std::array::from_fn(|k| {
                u64::from_le_bytes(raw[k * 8..k * 8 + 8].try_into().expect("8 bytes"))
            });
            let seqno = words[1];
            let aborting = abort || shared.reset_requested.load(Ordering::Acquire);
            // The held command, if this is it: it continues where it stopped.
            let held = if i == 0 { self.take_hold(r) } else { None };
            let c = match Descriptor::decode_words(&words) {
                Err(e) => Completion::error(seqno, Status::BadDescriptor, e.code()),
                Ok(_) if aborting => Completion::error(seqno, Status::Aborted, 0),
                Ok(d) => {
                    let (mut prog, fail) = match held {
                        Some(h) if h.seqno == d.seqno => (h.progress, h.failed()),
                        _ => (Progress::fresh(&d), None),
                    };
                    let out = match fail {
                        Some(c) => Exec::Done(c),
                        None => {
                            self.vm_id = vm_id;
                            let out = self.execute(&d, &mut prog);
                            self.vm_id = 0;
                            out
                        }
                    };
                    let c = match out {
                        Exec::Done(c) => c,
                        Exec::Fault(prog, g) => match self.hold(r, &d, prog, g) {
                            None => {
                                executed = i as u32;
                                break;
                            }
                            Some(c) => c,
                        },
                    };
                    want_irq |= d.flags.contains(userptr_ring::Flags::INTERRUPT);
                    c
                }
            };
            if let Some(f) = c.fault {
                self.record_fault(r, f, c.detail);
            }
            let cqe = self
                .vram
                .bytes_mut(CQE_OFF + i * COMPLETION_SIZE as u64, COMPLETION_SIZE as u64);
            for (k, w) in c.encode_words().iter().enumerate() {
                cqe[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            last_seqno = seqno;
        }
        let n = executed;
        if n == 0 {
            return true;
        }
        // 3. Completions, then the fence, in one ordered chain.
        self.vram
            .bytes_mut(FENCE_OFF, 8)
            .copy_from_slice(&last_seqno.to_le_bytes());
        let Some(st) = self.rings[r as usize].as_mut() else {
            return true;
        };
        // At most two runs of slots: the batch is contiguous but for the wrap.
        let mut slots = [(0u64, 0u64); 2];
        let mut runs = 0;
        for _ in 0..n {
            let s = st.cq.next_slot(&rr.cq()).expect("CQ space was checked") as u64;
            match slots[..runs].last_mut() {
                Some((start, len)) if *start + *len == s => *len += 1,
                _ => {
                    slots[runs] = (s, 1);
                    runs += 1;
                }
            }
        }
        self.transfers.clear();
        let mut off = CQE_OFF;
        for &(s, k) in &slots[..runs] {
            self.transfers.push(Transfer {
                dir: Direction::FromDevice,
                iova: cq_base + s * COMPLETION_SIZE as u64,
                len: k * COMPLETION_SIZE as u64,
                vram_off: off,
                then: true,
            });
            off += k * COMPLETION_SIZE as u64;
        }
        self.transfers.push(Transfer {
            dir: Direction::FromDevice,
            iova: fence,
            len: 8,
            vram_off: FENCE_OFF,
            then: false,
        });
        if let Err(e) = self.ring_dma() {
            self.ring_error(r, dma_ring_error(&e, ring::ERROR_CQ_FAULT));
            return true;
        }
        // 4. Publish (Release, inside SharedIndices) and interrupt.
        let st = self.rings[r as usize].as_mut().expect("ring state present");
        st.sq.release(&rr.sq(), n);
        st.cq.publish(&rr.cq());
        shared.completed.fetch_add(n, Ordering::AcqRel);
        let armed = self.take_arm(r);
        if want_irq || armed {
            self.interrupt(r);
        }
        true
    }

    /// Whether ring `r` was armed (IRQ_ARM), clearing the bit if so. Called after the
    /// batch's fence and indices are published.
    ///
    /// The handshake with a driver about to sleep: it sets the bit, issues a SeqCst
    /// fence and looks at the fence word again; here the fence word was stored, then
    /// a SeqCst fence, then the bit is loaded. Of two SeqCst fences one comes first in
    /// their single total order, so either the driver's second look sees this batch's
    /// fence (and it does not sleep) or this load sees its arm (and the interrupt
    /// wakes it): a sleeper is never left without the interrupt for the batch that
    /// completes its command. A batch that completes nothing a sleeper waits for may
    /// take the arm; the woken driver looks, finds its fence not reached, and arms
    /// again.
    fn take_arm(&self, r: u32) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let bit = 1 << r;
        // Relaxed on the first load: a cheap look that skips the read-modify-write on
        // the (usual) unarmed path; the fence above orders it after the publication.
        // AcqRel on the clear: a read-modify-write racing the driver's setting of
        // other bits.
        self.shared.irq_arm.load(Ordering::Relaxed) & bit != 0
            && self.shared.irq_arm.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// The fault registers; `detail` is a VM fault's kind | VM id << 8 (0 otherwise).
    fn record_fault(&self, r: u32, f: FaultRecord, detail: u32) {
        let s = &self.shared;
        s.fault_iova[0].store(f.iova as u32, Ordering::Release);
        s.fault_iova[1].store((f.iova >> 32) as u32, Ordering::Release);
        let gpu = (detail & 0xff) << 16 | ((detail >> 8) & 0xf) << 24;
        s.fault_info
            .store(f.access as u32 | r << 8 | gpu, Ordering::Release);
        s.fault_count.fetch_add(1, Ordering::AcqRel);
    }

    /// One DMA round: a safe point for TLB invalidations, then the transfers (through
    /// the VM first on a VM ring).
    pub(super) fn dma(&mut self) -> Result<(), DmaError> {
        self.tlb_sync();
        if self.vm_id != 0 {
            return self.dma_vm();
        }
        self.port.run(&self.vram, &self.transfers)
    }

    /// A DMA round on ring structures (descriptors, completions, the fence; never on
    /// a VM: their addresses are IOVAs): through the device's coherent view where the
    /// ring lies in driver-owned coherent memory, after the same translation and
    /// permission check (datasheet section 5.1); otherwise, as any other memory,
    /// through the IOMMU's transfers.
    fn ring_dma(&mut self) -> Result<(), DmaError> {
        debug_assert_eq!(self.vm_id, 0, "ring structures are IOVAs");
        self.tlb_sync();
        if self.port.run_coherent(&mut self.vram, &self.transfers)? {
            return Ok(());
        }
        self.port.run(&self.vram, &self.transfers)
    }
}

fn dma_ring_error(e: &DmaError, fault_code: u32) -> u32 {
    match e {
        DmaError::Fault(_) | DmaError::Translation(_) => fault_code,
        DmaError::Io(_) => ring::ERROR_IO,
    }
}
