//! The reference device's commands: what the engine does with each opcode's operands
//! (datasheet section 5, step 4). Every operand access is a DMA round through the
//! IOMMU's pinned pages (or, on a VM ring, through the VM first): a range is checked
//! whole before any of it is touched, so a command that faults writes nothing, and a
//! multi-round command keeps its position in `Progress` so that one held on a fault
//! continues where it stopped.

use super::engine::{Engine, FILL_OFF, SCRATCH_OFF, STAGING_OFF};
use super::mmu::GpuFault;
use super::vm_exec::Progress;
use crate::reference::dma_port::{Direction, DmaError, Transfer};
use crate::reference::uring_iommu::CHUNK;
use userptr_ring::{AccessKind, Completion, Descriptor, Opcode, Status};

/// What executing a command came to.
pub(super) enum Exec {
    /// It completed (whatever its status).
    Done(Completion),
    /// It faulted replayably: hold it.
    Fault(Progress, GpuFault),
}

impl Engine {
    pub(super) fn execute(&mut self, d: &Descriptor, prog: &mut Progress) -> Exec {
        let r = match d.opcode {
            Opcode::Nop => Ok(0),
            Opcode::WriteFence => self.write_fence(d),
            Opcode::Fill => self.fill(d, prog),
            Opcode::Copy => self.copy(d, prog),
            Opcode::Saxpy => self.saxpy(d, prog),
            Opcode::Crc32c => self.crc32c(d, prog),
        };
        Exec::Done(match r {
            Ok(result) => Completion::ok(d.seqno, result),
            Err(DmaError::Fault(f)) => Completion::fault(d.seqno, f),
            Err(DmaError::Translation(g)) => {
                if g.kind != userptr_ring::regs::fault_kind::IOMMU {
                    self.shared.gpu.count_fault(g.vm);
                }
                if g.replayable {
                    return Exec::Fault(*prog, g);
                }
                super::vm_exec::fault_completion(d.seqno, &g)
            }
            Err(DmaError::Io(e)) => Completion::error(
                d.seqno,
                Status::DeviceError,
                e.raw_os_error().unwrap_or(0) as u32,
            ),
        })
    }

    fn write_fence(&mut self, d: &Descriptor) -> Result<u64, DmaError> {
        self.vram
            .bytes_mut(SCRATCH_OFF, 8)
            .copy_from_slice(&d.arg0.to_le_bytes());
        self.transfers.clear();
        self.transfers.push(Transfer {
            dir: Direction::FromDevice,
            iova: d.dst_iova,
            len: 8,
            vram_off: SCRATCH_OFF,
            then: false,
        });
        self.dma().map(|_| 0)
    }

    /// Check a whole operand range before touching any of it, so a command that
    /// faults writes nothing. On a VM ring: both translation stages.
    fn precheck(&mut self, iova: u64, len: u64, access: AccessKind) -> Result<(), DmaError> {
        if self.vm_id != 0 {
            return self.precheck_vm(iova, len, access);
        }
        self.port.check(iova, len, access).map_err(DmaError::Fault)
    }

    // The multi-round commands keep their position in `prog`, updated after each round
    // that completed, so that a command held on a fault between rounds continues where
    // it stopped (a fresh command starts at 0: the 1.0 behaviour).

    fn fill(&mut self, d: &Descriptor, prog: &mut Progress) -> Result<u64, DmaError> {
        self.precheck(d.dst_iova + prog.done, d.len - prog.done, AccessKind::Write)?;
        let byte = d.arg0 as u8;
        if self.fill_byte != Some(byte) {
            self.vram.bytes_mut(FILL_OFF, CHUNK).fill(byte);
            self.fill_byte = Some(byte);
        }
        let mut done = prog.done;
        while done < d.len {
            self.transfers.clear();
            // Up to 64 chunks in flight per round.
            while done < d.len && self.transfers.len() < 64 {
                let n = (d.len - done).min(CHUNK);
                self.transfers.push(Transfer {
                    dir: Direction::FromDevice,
                    iova: d.dst_iova + done,
                    len: n,
                    vram_off: FILL_OFF,
                    then: false,
                });
                done += n;
            }
            self.dma()?;
            prog.done = done;
        }
        Ok(0)
    }

    fn copy(&mut self, d: &Descriptor, prog: &mut Progress) -> Result<u64, DmaError> {
        let rest = d.len - prog.done;
        self.precheck(d.src_iova + prog.done, rest, AccessKind::Read)?;
        self.precheck(d.dst_iova + prog.done, rest, AccessKind::Write)?;
        if self.vm_id == 0 {
            return self.copy_rolling(d, prog);
        }
        let mut done = prog.done;
        while done < d.len {
            self.transfers.clear();
            let mut staged = 0;
            // One window of staging: each chunk is read in and written out as an
            // ordered pair; pairs run in parallel.
            while done < d.len && staged + CHUNK <= self.staging {
                let n = (d.len - done).min(CHUNK);
                let v = STAGING_OFF + staged;
                self.transfers.push(Transfer {
                    dir: Direction::ToDevice,
                    iova: d.src_iova + done,
                    len: n,
                    vram_off: v,
                    then: true,
                });
                self.transfers.push(Transfer {
                    dir: Direction::FromDevice,
                    iova: d.dst_iova + done,
                    len: n,
                    vram_off: v,
                    then: false,
                });
                done += n;
                staged += CHUNK;
            }
            self.dma()?;
            prog.done = done;
        }
        Ok(0)
    }

    fn saxpy(&mut self, d: &Descriptor, prog: &mut Progress) -> Result<u64, DmaError> {
        let bytes = d.len * 4;
        let rest = bytes - prog.done;
        self.precheck(d.src_iova + prog.done, rest, AccessKind::Read)?;
        self.precheck(d.dst_iova + prog.done, rest, AccessKind::Read)?;
        self.precheck(d.dst_iova + prog.done, rest, AccessKind::Write)?;
        let a = f32::from_bits(d.arg0 as u32);
        if self.vm_id == 0 {
            return self.saxpy_rolling(d, a, prog);
        }
        let half = (self.staging / 2) & !(CHUNK - 1);
        let (x_off, y_off) = (STAGING_OFF, STAGING_OFF + half);
        let mut done = prog.done;
        while done < bytes {
            let n = (bytes - done).min(half);
            self.transfers.clear();
            self.push_chunks(Direction::ToDevice, d.src_iova + done, n, x_off);
            self.push_chunks(Direction::ToDevice, d.dst_iova + done, n, y_off);
            self.dma()?;
            let (x, y) = self.vram.f32_pair_mut(x_off, y_off, n / 4);
            for (y, x) in y.iter_mut().zip(x) {
                *y += a * *x;
            }
            self.transfers.clear();
            self.push_chunks(Direction::FromDevice, d.dst_iova + done, n, y_off);
            // A fault here leaves y untouched (nothing of a round is submitted before
            // all of it translated): the round is redone whole on a replay.
            self.dma()?;
            done += n;
            prog.done = done;
        }
        Ok(0)
    }

    fn crc32c(&mut self, d: &Descriptor, prog: &mut Progress) -> Result<u64, DmaError> {
        self.precheck(d.src_iova + prog.done, d.len - prog.done, AccessKind::Read)?;
        let mut crc = prog.crc;
        let window = self.staging & !(CHUNK - 1);
        let mut done = prog.done;
        while done < d.len {
            let n = (d.len - done).min(window);
            self.transfers.clear();
            self.push_chunks(Direction::ToDevice, d.src_iova + done, n, STAGING_OFF);
            self.dma()?;
            crc = crc32c::crc32c_append(crc, self.vram.bytes(STAGING_OFF, n));
            done += n;
            (prog.done, prog.crc) = (done, crc);
        }
        Ok(crc as u64)
    }

    fn push_chunks(&mut self, dir: Direction, iova: u64, len: u64, vram_off: u64) {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK);
            self.transfers.push(Transfer {
                dir,
                iova: iova + off,
                len: n,
                vram_off: vram_off + off,
                then: false,
            });
            off += n;
        }
    }
}
