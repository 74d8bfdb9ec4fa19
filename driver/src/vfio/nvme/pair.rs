//! A submission/completion queue pair in DMA memory: the entries, the tail, the
//! phase bit.

use super::{CQE, SQE};
use crate::dma_memory::DmaMemory;
use crate::driver::Driver;
use crate::error::Result;
use crate::iommu::Perm;

/// A submission/completion queue pair in DMA memory.
pub(super) struct Pair {
    pub(super) qid: u16,
    pub(super) size: u16,
    pub(super) sq: DmaMemory,
    pub(super) cq: DmaMemory,
    pub(super) sq_iova: u64,
    pub(super) cq_iova: u64,
    pub(super) sq_tail: u16,
    pub(super) cq_head: u16,
    pub(super) phase: bool,
}

impl Pair {
    pub(super) fn new(drv: &Driver, qid: u16, size: u16) -> Result<Pair> {
        let sq = DmaMemory::new(size as usize * SQE)?;
        let cq = DmaMemory::new(size as usize * CQE)?;
        // The device reads the SQ and writes the CQ.
        let sq_iova = drv.map_raw(sq.addr(), sq.len() as u64, Perm::READ)?;
        let cq_iova = match drv.map_raw(cq.addr(), cq.len() as u64, Perm::READ_WRITE) {
            Ok(i) => i,
            Err(e) => {
                let _ = drv.unmap_raw(sq_iova, sq.len() as u64);
                return Err(e);
            }
        };
        Ok(Pair {
            qid,
            size,
            sq,
            cq,
            sq_iova,
            cq_iova,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        })
    }

    pub(super) fn release(&self, drv: &Driver) {
        for (iova, len) in [
            (self.sq_iova, self.sq.len() as u64),
            (self.cq_iova, self.cq.len() as u64),
        ] {
            if let Err(e) = drv.unmap_raw(iova, len) {
                tracing::error!("unmapping NVMe queue {} memory: {e}", self.qid);
            }
        }
    }

    /// Write one entry at the tail (no doorbell yet).
    pub(super) fn push(&mut self, sqe: &[u8; SQE]) {
        self.sq.write(self.sq_tail as usize * SQE, sqe);
        self.sq_tail = (self.sq_tail + 1) % self.size;
    }

    /// The next completion, if the device has posted it.
    pub(super) fn pop(&mut self) -> Option<(u16, u16, u32)> {
        let off = self.cq_head as usize * CQE;
        // Acquire (inside load_u64): the phase bit is read first; the rest of the
        // entry, written by the device before it, is read after.
        let hi = self.cq.load_u64(off + 8);
        let p = (hi >> 48) & 1 == 1;
        if p != self.phase {
            return None;
        }
        let lo = self.cq.load_u64(off);
        let cid = (hi >> 32) as u16;
        let status = (hi >> 49) as u16;
        self.cq_head += 1;
        if self.cq_head == self.size {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some((cid, status, lo as u32))
    }
}
