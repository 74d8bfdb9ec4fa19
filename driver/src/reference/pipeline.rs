//! The engine's pipelined commands: COPY and SAXPY of IOVAs (rings without a VM)
//! through a rolling staging window (`docs/reference-device.md` section 4). Staging is
//! cut into 1 MiB slots (a COPY's slot is a staging FIFO, [`super::fifo`], where the
//! device has them); each slot's transfers are a tagged stage of the DMA port
//! ([`DmaPort::start`](super::dma_port::DmaPort::start)), reaped as they finish, and a
//! slot whose work is out takes the next chunk at once, so the kernel's workers are
//! never left idle waiting for a whole round, and SAXPY's arithmetic on one slot pair
//! overlaps the other pairs' transfers.
//!
//! The engine touches a slot through its mapping only after reaping the stage that
//! filled it and before starting the one that empties it; no other transfer in
//! flight touches that slot. Every stage started is reaped before the command
//! returns, on success or error, so nothing runs into staging the next command uses.

use super::dma_port::{Direction, DmaError, Staging, Transfer, TAGS};
use super::engine::{Engine, STAGING_OFF};
use super::uring_iommu::CHUNK;
use super::vm_exec::Progress;
use userptr_ring::Descriptor;

/// Most slot pairs a SAXPY keeps in flight. Enough for the kernel's workers to bring
/// the next pairs in and send the last ones out while the engine computes on one
/// (both cores busy), and no more: every pair more in flight costs CPU time per byte
/// here, as the staging the pairs cycle through falls out of the caches (measured
/// for 16 M elements: 16 pairs 57-61 ms of CPU, 8 pairs 48-54, 4 pairs 40-49).
const SAXPY_PAIRS: u16 = 4;
// Both stages of every pair have a tag of their own.
const _: () = assert!(2 * SAXPY_PAIRS <= TAGS);

/// The bookkeeping both pipelined commands share: the free slots, the chunk
/// (offset, length) each busy slot carries, the next chunk to hand out, the first
/// error, and the chunks finished past the all-done prefix (chunks finish out of
/// order; the prefix is what `Progress::done` may say).
struct Window {
    free: Vec<u16>,
    chunk: u64,
    carrying: [(u64, u64); TAGS as usize],
    past: Vec<(u64, u64)>,
    next: u64,
    total: u64,
    err: Option<DmaError>,
}

impl Window {
    fn new(slots: u16, chunk: u64, done: u64, total: u64) -> Window {
        Window {
            free: (0..slots).rev().collect(),
            chunk,
            carrying: [(0, 0); TAGS as usize],
            past: Vec::new(),
            next: done,
            total,
            err: None,
        }
    }

    /// The next chunk for a free slot: `(slot, offset, length)`; none once the
    /// command is all handed out, has failed, or every slot is busy.
    fn take(&mut self) -> Option<(u16, u64, u64)> {
        if self.err.is_some() || self.next >= self.total {
            return None;
        }
        let slot = self.free.pop()?;
        let (off, n) = (self.next, (self.total - self.next).min(self.chunk));
        self.carrying[slot as usize] = (off, n);
        self.next += n;
        Some((slot, off, n))
    }

    /// The first stage of `slot`'s chunk did not start: nothing of it runs; no new
    /// chunk starts after this.
    fn not_started(&mut self, slot: u16, e: DmaError) {
        self.free.push(slot);
        self.err.get_or_insert(e);
    }

    /// `slot`'s chunk is over (`ok`: all its bytes are where they belong); the slot
    /// is free again, and `done` advances over every chunk that now joins the prefix.
    fn finished(&mut self, slot: u16, ok: Result<(), DmaError>, done: &mut u64) {
        match ok {
            Ok(()) => {
                self.past.push(self.carrying[slot as usize]);
                self.past.sort_unstable();
                let mut k = 0;
                while k < self.past.len() && self.past[k].0 == *done {
                    *done += self.past[k].1;
                    k += 1;
                }
                self.past.drain(..k);
            }
            Err(e) => {
                self.err.get_or_insert(e);
            }
        }
        self.free.push(slot);
    }

    fn result(self) -> Result<u64, DmaError> {
        self.err.map_or(Ok(0), Err)
    }
}

impl Engine {
    /// COPY of IOVAs through a rolling window of staging slots: every slot carries one
    /// chunk's ordered pair (in, then out) as a pipeline stage of its own, through the
    /// slot's staging FIFO (or, for a slot whose FIFO is not usable, or on a device
    /// without FIFOs, its piece of staging in device memory), and a slot whose pair
    /// finished takes the next chunk at once, so the transfers never wait for a whole
    /// window (the kernel's workers stay busy to the end). On a fault or an I/O error
    /// no new chunk starts, the ones in flight are reaped (a FIFO whose chunk failed
    /// is cleared), and `prog.done` is where the chunks stop being all done (a
    /// replay, or the report, starts there).
    pub(super) fn copy_rolling(
        &mut self,
        d: &Descriptor,
        prog: &mut Progress,
    ) -> Result<u64, DmaError> {
        if let Err(e) = self.fifos.ready() {
            tracing::warn!(error = %e, "no staging FIFOs: COPY stages in device memory");
        }
        let mut slots = ((self.staging / CHUNK) as usize).min(TAGS as usize) as u16;
        if !self.fifos.is_empty() {
            // One slot per FIFO: a slot without one would stage in device memory.
            slots = slots.min(self.fifos.len() as u16);
        }
        let chunk = if self.fifos.is_empty() {
            CHUNK
        } else {
            self.fifos.chunk()
        };
        let mut w = Window::new(slots, chunk, prog.done, d.len);
        loop {
            while let Some((slot, off, n)) = w.take() {
                let v = STAGING_OFF + slot as u64 * CHUNK;
                let pair = [
                    Transfer {
                        dir: Direction::ToDevice,
                        iova: d.src_iova + off,
                        len: n,
                        vram_off: v,
                        then: true,
                    },
                    Transfer {
                        dir: Direction::FromDevice,
                        iova: d.dst_iova + off,
                        len: n,
                        vram_off: v,
                        then: false,
                    },
                ];
                // Each stage starts at a TLB-invalidation safe point, as a round does.
                self.tlb_sync();
                let staging = if self.fifos.usable(slot as usize) {
                    let (write, read) = self.fifos.ends(slot as usize);
                    Staging::Fifo { write, read }
                } else {
                    Staging::Vram(&self.vram)
                };
                if let Err(e) = self.port.start(staging, &pair, slot) {
                    w.not_started(slot, e);
                }
            }
            let Some((slot, r)) = self.port.finish() else {
                break;
            };
            if r.is_err() && self.fifos.usable(slot as usize) {
                // The pair stopped half way (its other transfers are cancelled, and
                // all of it is reaped): bytes may be left in the FIFO.
                self.fifos.clear(slot as usize);
            }
            w.finished(slot, r.map_err(DmaError::Io), &mut prog.done);
        }
        w.result()
    }

    /// SAXPY of IOVAs, pipelined: each pair of staging slots carries one chunk of x
    /// and y in (one stage, tagged with the pair), then the engine computes on it
    /// while the other chunks' transfers run, then y goes out (a second stage, tagged
    /// with the pair plus `slots`); a pair whose y is out takes the next chunk. Errors
    /// and `prog.done` as in `copy_rolling`: a chunk's y is written back whole or not
    /// at all, so a replay from `prog.done` is exact.
    pub(super) fn saxpy_rolling(
        &mut self,
        d: &Descriptor,
        a: f32,
        prog: &mut Progress,
    ) -> Result<u64, DmaError> {
        let slots = ((self.staging / (2 * CHUNK)) as usize).min(SAXPY_PAIRS as usize) as u16;
        let mut w = Window::new(slots, CHUNK, prog.done, d.len * 4);
        // Pair k's x in slot k, its y in slot `slots + k`: when the pairs are a
        // multiple of the staging lanes (4 and 4 by default), both in the same lane,
        // so that the kernel's worker on that lane brings a pair in whole before it
        // moves on, and the pairs of different lanes come in on different workers.
        let x_of = |k: u16| STAGING_OFF + k as u64 * CHUNK;
        let y_of = |k: u16| STAGING_OFF + (slots + k) as u64 * CHUNK;
        let in_stage = |k: u16, off: u64, n: u64| {
            [(d.src_iova, x_of(k)), (d.dst_iova, y_of(k))].map(|(iova, v)| Transfer {
                dir: Direction::ToDevice,
                iova: iova + off,
                len: n,
                vram_off: v,
                then: false,
            })
        };
        loop {
            while let Some((k, off, n)) = w.take() {
                self.tlb_sync();
                if let Err(e) = self
                    .port
                    .start(Staging::Vram(&self.vram), &in_stage(k, off, n), k)
                {
                    w.not_started(k, e);
                }
            }
            let Some((tag, r)) = self.port.finish() else {
                break;
            };
            let (k, out) = (tag % slots, tag >= slots);
            match r {
                // y is out, or a stage failed: the chunk is over either way.
                Err(e) => w.finished(k, Err(DmaError::Io(e)), &mut prog.done),
                Ok(()) if out => w.finished(k, Ok(()), &mut prog.done),
                // x and y are in, but the command has already failed: y stays.
                Ok(()) if w.err.is_some() => w.free.push(k),
                // x and y are in: compute (this slot pair only; the transfers in
                // flight use other slots), then send y out.
                Ok(()) => {
                    let (off, n) = w.carrying[k as usize];
                    let (x, y) = self.vram.f32_pair_mut(x_of(k), y_of(k), n / 4);
                    for (y, x) in y.iter_mut().zip(x) {
                        *y += a * *x;
                    }
                    let stage = [Transfer {
                        dir: Direction::FromDevice,
                        iova: d.dst_iova + off,
                        len: n,
                        vram_off: y_of(k),
                        then: false,
                    }];
                    self.tlb_sync();
                    if let Err(e) = self
                        .port
                        .start(Staging::Vram(&self.vram), &stage, k + slots)
                    {
                        w.not_started(k, e);
                    }
                }
            }
        }
        w.result()
    }
}
