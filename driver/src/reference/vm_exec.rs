//! The engine's VM rounds (`docs/reference-device.md` section 10): translating a
//! round's transfers through the VM (stage 1) before the DMA port translates them
//! again (stage 2), device-memory pieces, the precheck of whole operands, TLB
//! invalidation safe points, and holding a command on a replayable fault until the
//! driver's `REPLAY`.

use super::dma_port::{Direction, DmaError, Transfer};
use super::engine::{Engine, FAULTREC_OFF};
use super::mmu::{GpuFault, VmCtx};
use std::sync::atomic::Ordering;
use userptr_ring::regs::fault_record::FaultQueueRecord;
use userptr_ring::regs::{self, fault_kind, ring};
use userptr_ring::{AccessKind, Completion, Descriptor, FaultRecord, Opcode};

/// How far a multi-round command got: bytes done, and CRC32C's running checksum.
#[derive(Clone, Copy, Debug)]
pub(super) struct Progress {
    pub(super) done: u64,
    pub(super) crc: u32,
}

impl Progress {
    /// A command not started.
    pub(super) fn fresh(d: &Descriptor) -> Progress {
        Progress {
            done: 0,
            crc: if d.opcode == Opcode::Crc32c {
                d.arg0 as u32
            } else {
                0
            },
        }
    }
}

/// A command held on a replayable fault.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hold {
    pub(super) seqno: u64,
    pub(super) progress: Progress,
    pub(super) fault: GpuFault,
    /// The driver's REPLAY decision, once taken (0: none yet).
    pub(super) decision: u32,
}

impl Hold {
    /// The completion of a held command the driver failed, if it did.
    pub(super) fn failed(&self) -> Option<Completion> {
        (self.decision == ring::REPLAY_FAIL).then(|| fault_completion(self.seqno, &self.fault))
    }
}

/// One translated piece of a VM round.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    /// The piece, with `iova` the stage-1 result (an IOVA, or a VRAM offset).
    pub(super) tr: Transfer,
    /// Which transfer of the round it belongs to.
    transfer: usize,
    /// Its first GPU VA.
    va: u64,
    devmem: bool,
}

/// The completion of a command that faulted on a VM ring: the GPU VA, and the kind and
/// VM in `detail`.
pub(super) fn fault_completion(seqno: u64, g: &GpuFault) -> Completion {
    Completion {
        detail: g.kind as u32 | (g.vm as u32) << 8,
        ..Completion::fault(
            seqno,
            FaultRecord {
                iova: g.va,
                access: g.access,
            },
        )
    }
}

fn access_of(dir: Direction) -> AccessKind {
    match dir {
        Direction::ToDevice => AccessKind::Read,
        Direction::FromDevice => AccessKind::Write,
    }
}

impl Engine {
    /// A safe point: apply the TLB invalidation requests posted so far.
    pub(super) fn tlb_sync(&mut self) {
        self.shared.gpu.tlb.take(&mut self.mmu.tlb);
    }

    /// The executing command's VM context (a disabled one if the ring names none).
    fn vm_ctx(&self) -> VmCtx {
        self.shared.gpu.vm_ctx(self.vm_id).unwrap_or(VmCtx {
            id: self.vm_id.min(255) as u8,
            root: 0,
            enabled: false,
            replayable: false,
        })
    }

    fn stage2_fault(&self, vm: &VmCtx, f: FaultRecord, va_of: impl Fn(u64) -> u64) -> DmaError {
        DmaError::Translation(GpuFault {
            va: va_of(f.iova),
            access: f.access,
            kind: fault_kind::IOMMU,
            vm: vm.id,
            replayable: false,
            len: 0,
        })
    }

    /// Run the round in `self.transfers`, whose addresses are GPU VAs.
    pub(super) fn dma_vm(&mut self) -> Result<(), DmaError> {
        let vm = self.vm_ctx();
        self.pieces.clear();
        let mut devmem = false;
        for k in 0..self.transfers.len() {
            let tr = self.transfers[k];
            let access = access_of(tr.dir);
            let mut off = 0;
            while off < tr.len {
                let va = tr.iova + off;
                let t = self.mmu.translate(&vm, va, access).map_err(|mut g| {
                    g.len = tr.len - off;
                    DmaError::Translation(g)
                })?;
                let n = (t.end() - va).min(tr.len - off);
                let target = t.addr(va);
                devmem |= t.devmem;
                match self.pieces.last_mut() {
                    Some(p)
                        if p.transfer == k
                            && p.devmem == t.devmem
                            && p.tr.iova + p.tr.len == target =>
                    {
                        p.tr.len += n
                    }
                    _ => self.pieces.push(Piece {
                        tr: Transfer {
                            dir: tr.dir,
                            iova: target,
                            len: n,
                            vram_off: tr.vram_off + off,
                            then: tr.then,
                        },
                        transfer: k,
                        va,
                        devmem: t.devmem,
                    }),
                }
                off += n;
            }
        }
        let pieces = std::mem::take(&mut self.pieces);
        let va_of = |iova: u64| {
            pieces
                .iter()
                .find(|p| !p.devmem && p.tr.iova <= iova && iova < p.tr.iova + p.tr.len)
                .map_or(iova, |p| p.va + (iova - p.tr.iova))
        };
        let r = if !devmem {
            self.xlated.clear();
            self.xlated.extend(pieces.iter().map(|p| p.tr));
            match self.port.run(&self.vram, &self.xlated) {
                Err(DmaError::Fault(f)) => Err(self.stage2_fault(&vm, f, va_of)),
                r => r,
            }
        } else {
            // Device memory in the round: one piece at a time, in list order, which
            // keeps every `then` ordering.
            let mut r = Ok(());
            for p in &pieces {
                if p.devmem {
                    match p.tr.dir {
                        Direction::ToDevice => {
                            self.vram.copy_within(p.tr.iova, p.tr.vram_off, p.tr.len)
                        }
                        Direction::FromDevice => {
                            self.vram.copy_within(p.tr.vram_off, p.tr.iova, p.tr.len)
                        }
                    }
                    continue;
                }
                let single = [p.tr];
                match self.port.run(&self.vram, &single) {
                    Ok(()) => {}
                    Err(DmaError::Fault(f)) => {
                        r = Err(self.stage2_fault(&vm, f, va_of));
                        break;
                    }
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
            r
        };
        self.pieces = pieces;
        r
    }

    /// Check `[va, va + len)` through both stages for `access` (the precheck).
    pub(super) fn precheck_vm(
        &mut self,
        va: u64,
        len: u64,
        access: AccessKind,
    ) -> Result<(), DmaError> {
        self.tlb_sync();
        let vm = self.vm_ctx();
        let end = va.saturating_add(len);
        // A run of contiguous IOVAs, checked at stage 2 in one lookup: (iova, len, va).
        let mut run: Option<(u64, u64, u64)> = None;
        let check = |e: &Engine, run: Option<(u64, u64, u64)>| -> Result<(), DmaError> {
            let Some((iova, n, v)) = run else {
                return Ok(());
            };
            e.port
                .check(iova, n, access)
                .map_err(|f| e.stage2_fault(&vm, f, |i| v + (i - iova)))
        };
        let mut at = va;
        while at < end {
            let t = self.mmu.translate(&vm, at, access).map_err(|mut g| {
                g.len = end - at;
                DmaError::Translation(g)
            })?;
            let n = (t.end() - at).min(end - at);
            let target = t.addr(at);
            match &mut run {
                Some((s, l, _)) if !t.devmem && *s + *l == target => *l += n,
                _ => {
                    check(self, run.take())?;
                    if !t.devmem {
                        run = Some((target, n, at));
                    }
                }
            }
            at += n;
        }
        check(self, run)
    }

    /// Whether ring `r` may run: it holds nothing, or the driver has decided.
    pub(super) fn hold_decided(&mut self, r: u32) -> bool {
        let shared = self.shared.clone();
        let Some(h) = self.holds[r as usize].as_mut() else {
            return true;
        };
        if h.decision == 0 {
            // AcqRel: takes the decision once; pairs with the REPLAY write's Release.
            h.decision = shared.ring[r as usize].replay.swap(0, Ordering::AcqRel);
        }
        h.decision != 0
    }

    /// Take ring `r`'s hold (its command is about to run, or fail).
    pub(super) fn take_hold(&mut self, r: u32) -> Option<Hold> {
        let h = self.holds[r as usize].take()?;
        // Release: a driver that reads HOLD clear sees the command running again.
        self.shared.ring[r as usize]
            .hold
            .store(0, Ordering::Release);
        Some(h)
    }

    /// Forget ring `r`'s hold (a reset aborts the command).
    pub(super) fn drop_hold(&mut self, r: u32) {
        let _ = self.take_hold(r);
    }

    /// A replayable fault of command `d` on ring `r`: write a fault record and hold
    /// the ring. `None` when held; otherwise the record could not be queued and the
    /// command fails with the returned completion (datasheet section 10.6).
    pub(super) fn hold(
        &mut self,
        r: u32,
        d: &Descriptor,
        progress: Progress,
        g: GpuFault,
    ) -> Option<Completion> {
        let shared = self.shared.clone();
        let fq = &shared.gpu.fq;
        let rr = &shared.ring[r as usize];
        let lost = || {
            // Relaxed: a statistics register.
            fq.lost.fetch_add(1, Ordering::Relaxed);
            Some(fault_completion(d.seqno, &g))
        };
        // Acquire: pairs with the enable's Release, after which base and the zeroed
        // indices are visible.
        let log2 = fq.sampled_log2.load(Ordering::Acquire);
        if log2 == 0 {
            return lost();
        }
        let size = 1u32 << log2;
        // Relaxed: only the engine writes TAIL. Acquire on HEAD: the driver is done
        // with the slots below it.
        let tail = fq.tail.load(Ordering::Relaxed);
        if tail.wrapping_sub(fq.head.load(Ordering::Acquire)) >= size {
            return lost();
        }
        let rec = FaultQueueRecord {
            va: g.va,
            seqno: d.seqno,
            vm: g.vm,
            ring: r as u8,
            access: g.access,
            kind: g.kind,
            len: g.len.min(u32::MAX as u64) as u32,
            id: tail,
        };
        self.vram
            .bytes_mut(FAULTREC_OFF, regs::fault_record::SIZE as u64)
            .copy_from_slice(&rec.encode());
        // The ring reads held before the record is visible, so a REPLAY the driver
        // writes after reading the record is taken (Release; Relaxed on replay: the
        // HOLD store orders it).
        rr.replay.store(0, Ordering::Relaxed);
        rr.hold
            .store(ring::HOLD_HELD | (g.kind as u32) << 8, Ordering::Release);
        let slot = [Transfer {
            dir: Direction::FromDevice,
            iova: fq.sampled_base.load(Ordering::Relaxed)
                + (tail & (size - 1)) as u64 * regs::fault_record::SIZE as u64,
            len: regs::fault_record::SIZE as u64,
            vram_off: FAULTREC_OFF,
            then: false,
        }];
        if self.port.run(&self.vram, &slot).is_err() {
            rr.hold.store(0, Ordering::Release);
            return lost();
        }
        // Release: the record's DMA is complete before the driver sees the new tail.
        fq.tail.store(tail.wrapping_add(1), Ordering::Release);
        self.holds[r as usize] = Some(Hold {
            seqno: d.seqno,
            progress,
            fault: g,
            decision: 0,
        });
        shared
            .irq_status
            .fetch_or(1 << regs::FAULT_VECTOR, Ordering::AcqRel);
        let fd = shared
            .gpu
            .fault_irq
            .lock()
            .expect("irq table lock poisoned")
            .clone();
        if let Some(fd) = fd {
            // As for the ring interrupts: a failed eventfd write means it is due anyway.
            let _ = rustix::io::write(&*fd, &1u64.to_ne_bytes());
        }
        None
    }
}
