//! The engine's pipelined commands: COPY and SAXPY of IOVAs (rings without a VM)
//! through a rolling staging window (`docs/reference-device.md` section 4). Staging is
//! cut into 1 MiB slots; each slot's transfers are a tagged stage of the DMA port
//! ([`DmaPort::start`](super::dma_port::DmaPort::start)), reaped as they finish, and a
//! slot whose work is out takes the next chunk at once, so the kernel's workers are
//! never left idle waiting for a whole round, and SAXPY's arithmetic on one slot pair
//! overlaps the other pairs' transfers.
//!
//! The engine touches a slot through its mapping only after reaping the stage that
//! filled it and before starting the one that empties it; no other transfer in
//! flight touches that slot. Every stage started is reaped before the command
//! returns, on success or error, so nothing runs into staging the next command uses.

use super::dma_port::{Direction, DmaError, Transfer, TAGS};
use super::engine::{Engine, STAGING_OFF};
use super::uring_iommu::CHUNK;
use super::vm_exec::Progress;
use userptr_ring::Descriptor;

/// Advance the all-done prefix `done` over the chunks in `past` (offset, length) that
/// finished out of order and now join it.
fn advance(done: &mut u64, past: &mut Vec<(u64, u64)>) {
    past.sort_unstable();
    let mut k = 0;
    while k < past.len() && past[k].0 == *done {
        *done += past[k].1;
        k += 1;
    }
    past.drain(..k);
}

impl Engine {
    /// COPY of IOVAs through a rolling staging window: every staging slot carries one
    /// chunk's ordered pair (in, then out) as a pipeline stage of its own, and a slot
    /// whose pair finished takes the next chunk at once, so the transfers never wait
    /// for a whole window (the kernel's workers stay busy to the end). On a fault or
    /// an I/O error no new chunk starts, the ones in flight are reaped, and
    /// `prog.done` is where the chunks stop being all done (a replay, or the report,
    /// starts there).
    pub(super) fn copy_rolling(
        &mut self,
        d: &Descriptor,
        prog: &mut Progress,
    ) -> Result<u64, DmaError> {
        let slots = ((self.staging / CHUNK) as usize).min(TAGS as usize);
        // Per slot: the chunk (offset, length) it carries; the chunks done past the
        // prefix, to advance `prog.done` over.
        let mut carrying: [(u64, u64); TAGS as usize] = [(0, 0); TAGS as usize];
        let mut done_past: Vec<(u64, u64)> = Vec::new();
        let mut free: Vec<u16> = (0..slots as u16).rev().collect();
        let mut next = prog.done;
        let mut err = None;
        loop {
            while err.is_none() && next < d.len {
                let Some(slot) = free.pop() else { break };
                let n = (d.len - next).min(CHUNK);
                let v = STAGING_OFF + slot as u64 * CHUNK;
                let pair = [
                    Transfer {
                        dir: Direction::ToDevice,
                        iova: d.src_iova + next,
                        len: n,
                        vram_off: v,
                        then: true,
                    },
                    Transfer {
                        dir: Direction::FromDevice,
                        iova: d.dst_iova + next,
                        len: n,
                        vram_off: v,
                        then: false,
                    },
                ];
                // Each stage starts at a TLB-invalidation safe point, as a round does.
                self.tlb_sync();
                match self.port.start(&self.vram, &pair, slot) {
                    Ok(()) => {
                        carrying[slot as usize] = (next, n);
                        next += n;
                    }
                    Err(e) => {
                        free.push(slot);
                        err = Some(e);
                    }
                }
            }
            let Some((slot, r)) = self.port.finish() else {
                break;
            };
            if let Err(e) = r {
                err.get_or_insert(DmaError::Io(e));
            } else {
                done_past.push(carrying[slot as usize]);
                advance(&mut prog.done, &mut done_past);
            }
            free.push(slot);
        }
        match err {
            Some(e) => Err(e),
            None => Ok(0),
        }
    }

    /// SAXPY of IOVAs, pipelined: each pair of staging slots carries one chunk of x
    /// and y in (one stage), then the engine computes on it while the other chunks'
    /// transfers run, then y goes out (a second stage); a slot pair whose y is out
    /// takes the next chunk. Errors and `prog.done` as in `copy_rolling`: a chunk's y
    /// is written back whole or not at all, so a replay from `prog.done` is exact.
    pub(super) fn saxpy_rolling(
        &mut self,
        d: &Descriptor,
        a: f32,
        prog: &mut Progress,
    ) -> Result<u64, DmaError> {
        let bytes = d.len * 4;
        let slots = ((self.staging / (2 * CHUNK)) as usize).min(TAGS as usize / 2) as u16;
        let mut carrying: [(u64, u64); TAGS as usize] = [(0, 0); TAGS as usize];
        let mut done_past: Vec<(u64, u64)> = Vec::new();
        let mut free: Vec<u16> = (0..slots).rev().collect();
        let mut next = prog.done;
        let mut err = None;
        let x_of = |k: u16| STAGING_OFF + 2 * k as u64 * CHUNK;
        loop {
            while err.is_none() && next < bytes {
                let Some(k) = free.pop() else { break };
                let n = (bytes - next).min(CHUNK);
                let stage = [
                    Transfer {
                        dir: Direction::ToDevice,
                        iova: d.src_iova + next,
                        len: n,
                        vram_off: x_of(k),
                        then: false,
                    },
                    Transfer {
                        dir: Direction::ToDevice,
                        iova: d.dst_iova + next,
                        len: n,
                        vram_off: x_of(k) + CHUNK,
                        then: false,
                    },
                ];
                self.tlb_sync();
                match self.port.start(&self.vram, &stage, k) {
                    Ok(()) => {
                        carrying[k as usize] = (next, n);
                        next += n;
                    }
                    Err(e) => {
                        free.push(k);
                        err = Some(e);
                    }
                }
            }
            let Some((tag, r)) = self.port.finish() else {
                break;
            };
            let (k, out) = (tag % slots.max(1), tag >= slots);
            let (off, n) = carrying[k as usize];
            match r {
                Err(e) => {
                    err.get_or_insert(DmaError::Io(e));
                    free.push(k);
                }
                Ok(()) if out => {
                    done_past.push((off, n));
                    advance(&mut prog.done, &mut done_past);
                    free.push(k);
                }
                // x and y are in: compute (this slot pair only; the transfers in
                // flight use other slots), then send y out, unless the command has
                // already failed.
                Ok(()) if err.is_some() => free.push(k),
                Ok(()) => {
                    let (x, y) = self.vram.f32_pair_mut(x_of(k), x_of(k) + CHUNK, n / 4);
                    for (y, x) in y.iter_mut().zip(x) {
                        *y += a * *x;
                    }
                    let stage = [Transfer {
                        dir: Direction::FromDevice,
                        iova: d.dst_iova + off,
                        len: n,
                        vram_off: x_of(k) + CHUNK,
                        then: false,
                    }];
                    self.tlb_sync();
                    if let Err(e) = self.port.start(&self.vram, &stage, k + slots) {
                        err = Some(e);
                        free.push(k);
                    }
                }
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(0),
        }
    }
}
