//! The device side of the reference IOMMU: a [`DmaPort`] translates IOVAs through the
//! [`UringIommu`]'s table (permission-checked) and moves data between the pinned pages
//! and device memory with `IORING_OP_READ_FIXED` / `WRITE_FIXED`, several requests in
//! flight. The device side of a transfer is device memory or, for a COPY's chunk, a
//! staging FIFO ([`Staging`]). Ring structures in driver-owned coherent memory are
//! moved instead through the device's own view of it, after the same check
//! ([`DmaPort::run_coherent`]). The translate-then-submit rule (under the table's
//! shared lock) is written down in `uring_iommu`'s module doc.

use super::uring_iommu::{UringIommu, CHUNK};
use super::vram::Vram;
use crate::dma_memory::DmaMemory;
use crate::iommu::Perm;
use io_uring::{opcode, squeue, types};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use userptr_ring::{AccessKind, FaultRecord};

/// Which way a transfer moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Host memory → device memory: the device *reads* the IOVA.
    ToDevice,
    /// Device memory → host memory: the device *writes* the IOVA.
    FromDevice,
}

/// One DMA transfer between an IOVA range and device memory.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// To or from device memory.
    pub dir: Direction,
    /// The host side, as an IOVA (translated and permission-checked).
    pub iova: u64,
    /// Bytes to move.
    pub len: u64,
    /// The device-memory side, as an offset into VRAM.
    pub vram_off: u64,
    /// The next transfer in the batch starts only after this one finished.
    pub then: bool,
}

/// Why a batch of transfers failed.
#[derive(Debug)]
pub enum DmaError {
    /// Translation failed: nothing of the batch was started.
    Fault(FaultRecord),
    /// On a ring bound to a VM: stage 1 (the page table) or stage 2 (the IOMMU)
    /// refused a GPU VA; nothing of the batch was started.
    Translation(crate::reference::mmu::GpuFault),
    /// The kernel failed a transfer.
    Io(io::Error),
}

/// Where the device side of a batch's transfers lies.
#[derive(Clone, Copy)]
pub enum Staging<'a> {
    /// Device memory, at each transfer's `vram_off` (through the file that holds it:
    /// [`Vram::file_at`]).
    Vram(&'a Vram),
    /// A staging FIFO ([`super::fifo`]): `ToDevice` transfers write into its write
    /// end and `FromDevice` ones read from its read end, in batch order (`vram_off`
    /// is not used).
    Fifo {
        /// The end the device writes into.
        write: RawFd,
        /// The end the device reads from.
        read: RawFd,
    },
}

#[derive(Clone, Copy)]
pub(super) struct Sqe {
    slot: u16,
    host: u64,
    len: u32,
    /// The device-memory side: a file (VRAM, a staging lane, a FIFO's end) and an
    /// offset in it (`u64::MAX`, the current position, for a FIFO).
    fd: RawFd,
    file_off: u64,
    dir: Direction,
    link: bool,
    /// Straight to the kernel's workers as concurrent work (`IOSQE_ASYNC`): the
    /// pipeline stages ([`DmaPort::start`]).
    worker: bool,
    tag: u16,
}

/// Tags a pipeline may give its batches ([`DmaPort::start`]); [`DmaPort::run`] uses
/// the one above them.
pub const TAGS: u16 = 64;
const RUN_TAG: u16 = TAGS;

/// The device side of a [`UringIommu`]: translates IOVAs and moves data.
pub struct DmaPort {
    pub(super) iommu: Arc<UringIommu>,
    pub(super) scratch: Vec<Sqe>,
    /// Requests the kernel has (or will have, once submitted), by `user_data`.
    pub(super) sent: Vec<Option<Sqe>>,
    pub(super) free_ids: Vec<u32>,
    /// Per tag: requests not yet completed, and the first error among them.
    pub(super) left: Vec<u32>,
    pub(super) errs: Vec<Option<io::Error>>,
    /// Tags whose requests have all completed, in the order they did.
    pub(super) finished: std::collections::VecDeque<u16>,
}

impl DmaPort {
    /// The IOMMU this port belongs to.
    pub fn iommu(&self) -> &Arc<UringIommu> {
        &self.iommu
    }

    /// Check that all of `[iova, iova + len)` is mapped with the permission `access`
    /// needs; the first IOVA that is not is the fault.
    pub fn check(&self, iova: u64, len: u64, access: AccessKind) -> Result<(), FaultRecord> {
        let need = match access {
            AccessKind::Read => Perm::READ,
            AccessKind::Write => Perm::WRITE,
        };
        let fault = |iova| FaultRecord { iova, access };
        let end = iova.checked_add(len).ok_or(fault(iova))?;
        let table = crate::driver_section::read(&self.iommu.table);
        let mut at = iova;
        while at < end {
            let (start, e) = table.lookup(at).ok_or(fault(at))?;
            if !e.perm.allows(need) {
                return Err(fault(at));
            }
            at = start + e.len;
        }
        Ok(())
    }

    /// Ring structures: run `batch` through the device's coherent view of driver-owned
    /// ring memory ([`IommuDomain::map_coherent`](crate::iommu::IommuDomain::map_coherent))
    /// with plain loads and stores, after the same translation and permission check as
    /// [`DmaPort::run`], all under the table's shared lock (an `unmap` waits for it,
    /// and the entry keeps the view alive meanwhile). On a fault nothing is moved.
    /// Returns `Ok(false)`, having moved nothing, when some transfer is not wholly
    /// inside one coherent mapping (a ring placed in any other memory): the caller
    /// then runs the batch through [`DmaPort::run`], the pinned pages.
    ///
    /// Order: transfers run one after the other, in batch order (which satisfies every
    /// `then`). An 8-byte, 8-aligned write (a fence word) is one atomic Release store,
    /// so a driver that loads it with Acquire sees every earlier write of the batch
    /// (the completion entries) and never a torn value; everything else is a plain
    /// copy, ordered for the driver by the Release of the index registers published
    /// after it (and for the device by its Acquire load of SQ_TAIL before it reads).
    pub fn run_coherent(&self, vram: &mut Vram, batch: &[Transfer]) -> Result<bool, DmaError> {
        const MOST: usize = 4;
        if batch.len() > MOST {
            return Ok(false);
        }
        let table = crate::driver_section::read(&self.iommu.table);
        let mut views: [Option<(&DmaMemory, usize)>; MOST] = [None; MOST];
        let mut coherent = true;
        for (tr, view) in batch.iter().zip(views.iter_mut()) {
            let (need, access) = match tr.dir {
                Direction::ToDevice => (Perm::READ, AccessKind::Read),
                Direction::FromDevice => (Perm::WRITE, AccessKind::Write),
            };
            let fault = |iova| DmaError::Fault(FaultRecord { iova, access });
            let end = tr.iova.checked_add(tr.len).ok_or(fault(tr.iova))?;
            let (start, e) = table.lookup(tr.iova).ok_or(fault(tr.iova))?;
            if !e.perm.allows(need) {
                return Err(fault(tr.iova));
            }
            match &e.coherent {
                // `map_coherent` maps the view whole at `start`.
                Some(mem) if end <= start + e.len => {
                    *view = Some((&**mem, (tr.iova - start) as usize));
                }
                // Not ring memory, or the range runs on into another mapping (whose
                // translation `run` checks): the pinned pages, as for any access.
                _ => coherent = false,
            }
        }
        if !coherent {
            return Ok(false);
        }
        for (tr, view) in batch.iter().zip(views) {
            let (mem, off) = view.expect("every transfer translated above");
            match tr.dir {
                Direction::ToDevice => mem.read(off, vram.bytes_mut(tr.vram_off, tr.len)),
                Direction::FromDevice if tr.len == 8 && off % 8 == 0 => {
                    let word = vram.bytes(tr.vram_off, 8).try_into().expect("8 bytes");
                    mem.store_u64(off, u64::from_le_bytes(word));
                }
                Direction::FromDevice => mem.write(off, vram.bytes(tr.vram_off, tr.len)),
            }
        }
        drop(table);
        Ok(true)
    }

    /// Run `batch` against device memory `vram` and return when every transfer has
    /// finished. Transfers run concurrently except where `then` orders them. All
    /// translations are checked first: on a fault nothing is started. No batch of
    /// [`DmaPort::start`] may be in flight.
    pub fn run(&mut self, vram: &Vram, batch: &[Transfer]) -> Result<(), DmaError> {
        debug_assert_eq!(self.in_flight(), 0, "run with a pipeline in flight");
        let started = self.submit(Staging::Vram(vram), batch, RUN_TAG);
        // Reap everything that was accepted, even after an error: no transfer may be
        // left running into device memory the engine is about to reuse.
        let mut first_err = None;
        while let Some((_, r)) = self.finish() {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        started?;
        match first_err {
            None => Ok(()),
            Some(e) => Err(DmaError::Io(e)),
        }
    }

    /// Start `batch` as a pipeline stage named `tag` (below [`TAGS`], not in flight)
    /// and return without waiting; [`DmaPort::finish`] says when it is done.
    ///
    /// A stage's requests go to the kernel's io-wq workers at once, marked
    /// `IOSQE_ASYNC`, which is what makes io-wq treat them as *concurrent* work: for
    /// that it starts another worker whenever none is free, where for other work it
    /// starts one only when none of its kind is running, so that all the transfers
    /// of a pipeline (every memfd access is punted to io-wq anyway) would run on one
    /// worker, one core. Buffered writes to one file still run one at a time (io-wq
    /// hashes them by inode): the staging lanes and FIFOs spread them. Checked
    /// and translated like [`DmaPort::run`] (on a fault nothing of it starts). The
    /// caller reaps every started stage before it touches the device memory the
    /// stage uses or lets the engine go on to another command. `staging` says where
    /// the device side lies: device memory, or a staging FIFO (which the stage must
    /// leave empty: as many bytes in as out, the ins ordered before the outs).
    pub fn start(
        &mut self,
        staging: Staging<'_>,
        batch: &[Transfer],
        tag: u16,
    ) -> Result<(), DmaError> {
        assert!(
            tag < TAGS && self.left[tag as usize] == 0,
            "a free pipeline tag"
        );
        self.submit(staging, batch, tag)
    }

    /// Stages (and `run`'s batch) in flight.
    pub fn in_flight(&self) -> usize {
        self.left.iter().filter(|&&n| n > 0).count() + self.finished.len()
    }

    /// Wait for the next stage to finish: its tag and whether every transfer of it
    /// moved all its bytes; `None` when nothing is in flight. A failure to wait at all
    /// (the ring itself) is reported as the failure of every stage in flight.
    pub fn finish(&mut self) -> Option<(u16, Result<(), io::Error>)> {
        loop {
            if let Some(tag) = self.finished.pop_front() {
                let r = self.errs[tag as usize].take().map_or(Ok(()), Err);
                return Some((tag, r));
            }
            if self.left.iter().all(|&n| n == 0) {
                return None;
            }
            if let Err(e) = self.iommu.uring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Nothing more can be reaped: give every stage up, reporting the error.
                for tag in 0..self.left.len() {
                    if self.left[tag] > 0 {
                        self.left[tag] = 0;
                        self.errs[tag].get_or_insert(io::Error::new(e.kind(), e.to_string()));
                        self.finished.push_back(tag as u16);
                    }
                }
                continue;
            }
            // SAFETY: only this port (one per IOMMU, owned by the engine thread) touches
            // the completion queue.
            let cq = unsafe { self.iommu.uring.completion_shared() };
            for cqe in cq {
                let id = cqe.user_data() as usize;
                let Some(s) = self.sent[id].take() else {
                    continue;
                };
                self.free_ids.push(id as u32);
                // Release: the transfer's effect on the pages is done before an unmap
                // or a permission change waiting for the slot sees it finished.
                self.iommu.inflight[s.slot as usize].fetch_sub(1, Ordering::Release);
                let tag = s.tag as usize;
                if cqe.result() != s.len as i32 && self.errs[tag].is_none() {
                    self.errs[tag] = Some(if cqe.result() < 0 {
                        io::Error::from_raw_os_error(-cqe.result())
                    } else {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "short device transfer")
                    });
                }
                if self.left[tag] > 0 {
                    self.left[tag] -= 1;
                    if self.left[tag] == 0 {
                        self.finished.push_back(tag as u16);
                    }
                }
            }
        }
    }

    /// Translate `batch` and submit it under `tag`, all under the table's shared lock.
    fn submit(
        &mut self,
        staging: Staging<'_>,
        batch: &[Transfer],
        tag: u16,
    ) -> Result<(), DmaError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.scratch.clear();
        let iommu = self.iommu.clone();
        let table = crate::driver_section::read(&iommu.table);
        let mut prev_then = false;
        for tr in batch {
            let (need, access) = match tr.dir {
                Direction::ToDevice => (Perm::READ, AccessKind::Read),
                Direction::FromDevice => (Perm::WRITE, AccessKind::Write),
            };
            let fault = |iova| DmaError::Fault(FaultRecord { iova, access });
            let first = self.scratch.len();
            let mut iova = tr.iova;
            let end = tr.iova.checked_add(tr.len).ok_or(fault(tr.iova))?;
            let mut vram_off = tr.vram_off;
            while iova < end {
                let (start, e) = table.lookup(iova).ok_or(fault(iova))?;
                if !e.perm.allows(need) {
                    return Err(fault(iova));
                }
                let seg_end = end.min(start + e.len);
                while iova < seg_end {
                    let (fd, file_off, run) = match staging {
                        Staging::Vram(vram) => {
                            let (file, file_off, run) = vram.file_at(vram_off);
                            (file.as_raw_fd(), file_off, run)
                        }
                        Staging::Fifo { write, read } => {
                            let fd = match tr.dir {
                                Direction::ToDevice => write,
                                Direction::FromDevice => read,
                            };
                            (fd, u64::MAX, u64::MAX)
                        }
                    };
                    let n = (seg_end - iova).min(CHUNK).min(run);
                    // An injected failure (`TransferFaults`): no file, so the kernel
                    // fails the request when it issues it.
                    let fd = match &self.iommu.cfg.transfer_faults {
                        Some(f)
                            if tag != RUN_TAG && tr.dir == Direction::FromDevice && f.next() =>
                        {
                            -1
                        }
                        _ => fd,
                    };
                    self.scratch.push(Sqe {
                        slot: e.slot,
                        host: e.host + (iova - start),
                        len: n as u32,
                        fd,
                        file_off,
                        dir: tr.dir,
                        link: tr.then,
                        worker: tag != RUN_TAG,
                        tag,
                    });
                    iova += n;
                    vram_off += n;
                }
            }
            // A transfer that follows an ordered one must wait for it as a whole, so
            // its pieces join the chain.
            if prev_then {
                let last = self.scratch.len() - 1;
                for s in &mut self.scratch[first..last] {
                    s.link = true;
                }
            }
            prev_then = tr.then;
        }
        if let Some(last) = self.scratch.last_mut() {
            last.link = false;
        }
        // Submit under the shared lock: io_uring takes its reference on each buffer at
        // submission, after which an unmap can no longer pull the slot from under it.
        let submitted = self.submit_all();
        drop(table);
        submitted.map_err(DmaError::Io)
    }

    /// Push every scratch entry, submitting whenever the queue fills (never in the
    /// middle of a linked chain). Every entry pushed is counted in its tag and will
    /// complete (an entry left in the queue by a failed submit goes with the next),
    /// so the error is the caller's to report after reaping.
    fn submit_all(&mut self) -> std::result::Result<(), io::Error> {
        let cap = self.iommu.cfg.sq_entries.max(8) as usize;
        let mut i = 0;
        while i < self.scratch.len() {
            // The chain starting at i: up to and including the first unlinked entry.
            let mut j = i;
            while self.scratch[j].link {
                j += 1;
            }
            let chain = j + 1 - i;
            // SAFETY: only this port touches the submission queue (see `run`).
            let mut sq = unsafe { self.iommu.uring.submission_shared() };
            if cap - sq.len() < chain.min(cap) {
                drop(sq);
                self.iommu.uring.submit()?;
                // SAFETY: as above: only this port touches the submission queue.
                sq = unsafe { self.iommu.uring.submission_shared() };
            }
            for k in i..=j {
                let s = self.scratch[k];
                let fd = types::Fd(s.fd);
                let entry = match s.dir {
                    Direction::ToDevice => {
                        opcode::WriteFixed::new(fd, s.host as *const u8, s.len, s.slot)
                            .offset(s.file_off)
                            .build()
                    }
                    Direction::FromDevice => {
                        opcode::ReadFixed::new(fd, s.host as *mut u8, s.len, s.slot)
                            .offset(s.file_off)
                            .build()
                    }
                };
                let mut flags = if s.link {
                    squeue::Flags::IO_LINK
                } else {
                    squeue::Flags::empty()
                };
                if s.worker {
                    flags |= squeue::Flags::ASYNC;
                }
                let id = match self.free_ids.pop() {
                    Some(id) => id as usize,
                    None => {
                        self.sent.push(None);
                        self.sent.len() - 1
                    }
                };
                let entry = entry.flags(flags).user_data(id as u64);
                // SAFETY: the buffer is a registered slot (checked by translation under
                // the table lock, which is held until submission), the host address lies
                // inside that registration, and the files (VRAM, its lanes, the FIFOs)
                // outlive the request (io_uring looks a linked request's descriptor up
                // only when it issues it): the engine reaps every request it started
                // before the command that started it completes (`run`, or a pipeline's
                // drain), owns the files for its whole life, and clears a FIFO only
                // with nothing in flight on it.
                while unsafe { sq.push(&entry) }.is_err() {
                    drop(sq);
                    if let Err(e) = self.iommu.uring.submit() {
                        self.free_ids.push(id as u32);
                        return Err(e);
                    }
                    // SAFETY: as above: only this port touches the submission queue.
                    sq = unsafe { self.iommu.uring.submission_shared() };
                }
                // Counted once queued, before the kernel is told (the next submit),
                // under the table's shared lock: an unmap (exclusive lock) that follows
                // waits for it. Relaxed: the lock orders it.
                self.iommu.inflight[s.slot as usize].fetch_add(1, Ordering::Relaxed);
                self.sent[id] = Some(s);
                self.left[s.tag as usize] += 1;
            }
            drop(sq);
            i = j + 1;
        }
        self.iommu.uring.submit()?;
        Ok(())
    }
}
