//! I/O queue pairs as the registry drives them: batches, completions in any order,
//! waiting by polling or interrupt, the IOMMU fault check.

use super::command::{sqe, NvmeCommand, NvmeCompletion};
use super::controller::{Nvme, Shared};
use super::pair::Pair;
use super::{admin, opcode, PAGE, PRP_PER_PAGE};
use crate::dma_memory::DmaMemory;
use crate::error::{Error, Result};
use crate::queue::WaitMode;
use crate::submitter::{FenceTracker, Submitter};
use crate::vfio::IrqKind;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// A batch in flight or completed and not yet claimed.
pub(super) struct Batch {
    pub(super) remaining: usize,
    pub(super) results: Vec<Option<NvmeCompletion>>,
    /// Each command's data range, for the IOMMU fault check at claim time.
    pub(super) data: Vec<Option<(u64, u32)>>,
}

/// What a command slot (CID) holds while its command is outstanding: the batch's
/// seqno, the index in the batch and the opcode.
pub(super) type Slot = (u64, usize, u8);

pub(super) struct IoState {
    pub(super) pair: Pair,
    /// Per CID: (batch seqno, index in the batch, opcode).
    pub(super) cids: Vec<Option<Slot>>,
    /// Check the kernel's IOMMU fault log for each data command when its batch is
    /// claimed, waiting up to this long for a late record; `None`: no check.
    pub(super) fault_check: Option<Duration>,
    pub(super) free: Vec<u16>,
    pub(super) next_seqno: u64,
    pub(super) batches: BTreeMap<u64, Batch>,
    /// Batches with commands outstanding.
    pub(super) pending: BTreeSet<u64>,
}

pub(super) struct IoCore {
    pub(super) shared: Arc<Shared>,
    pub(super) qid: u16,
    pub(super) state: Mutex<IoState>,
    /// One PRP list page per CID.
    pub(super) prp: DmaMemory,
    pub(super) prp_iova: u64,
    pub(super) irq: Option<usize>,
    pub(super) nvme: Weak<Nvme>,
    /// Interrupts this queue's waiters were woken by.
    pub(super) irqs: std::sync::atomic::AtomicU64,
}

/// A submitted batch: wait on it with [`IoQueue::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeBatch {
    /// The batch's sequence number on its queue.
    pub seqno: u64,
    /// Commands in the batch.
    pub commands: usize,
}

/// An NVMe I/O queue pair. Implements [`Submitter`], so
/// `Registry::submit` drives it with userptr IOVAs.
pub struct IoQueue {
    pub(super) nvme: Arc<Nvme>,
    pub(super) core: Arc<IoCore>,
    pub(super) created: AtomicBool,
}

impl IoCore {
    pub(super) fn lock(&self) -> MutexGuard<'_, IoState> {
        self.state.lock().expect("NVMe queue lock poisoned")
    }

    pub(super) fn dead(&self) -> bool {
        // Acquire: pairs with the Release in Shared::disable.
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Reap every posted completion; ring the CQ doorbell once.
    pub(super) fn reap(&self, st: &mut IoState) {
        let mut n = 0;
        while let Some((cid, status, result)) = st.pair.pop() {
            n += 1;
            let Some((seq, idx, op)) = st.cids.get_mut(cid as usize).and_then(|c| c.take()) else {
                tracing::warn!("NVMe queue {}: completion for unknown cid {cid}", self.qid);
                continue;
            };
            st.free.push(cid);
            if let Some(b) = st.batches.get_mut(&seq) {
                b.results[idx] = Some(NvmeCompletion {
                    result,
                    cid,
                    status,
                    opcode: op,
                    iommu_fault: None,
                });
                b.remaining -= 1;
                if b.remaining == 0 {
                    st.pending.remove(&seq);
                }
            }
        }
        if n > 0 {
            self.shared
                .bar
                .write32(self.shared.cq_doorbell(self.qid), st.pair.cq_head as u32);
        }
    }

    /// After a controller reset: every outstanding command completes aborted.
    pub(super) fn abort_outstanding(&self, st: &mut IoState) {
        for cid in 0..st.cids.len() {
            if let Some((seq, idx, op)) = st.cids[cid].take() {
                st.free.push(cid as u16);
                if let Some(b) = st.batches.get_mut(&seq) {
                    b.results[idx] = Some(NvmeCompletion::aborted(cid as u16, op));
                    b.remaining -= 1;
                }
            }
        }
        st.pending.clear();
    }

    pub(super) fn done_locked(&self, st: &mut IoState, seqno: u64) -> bool {
        if self.dead() {
            self.abort_outstanding(st);
            return true;
        }
        self.reap(st);
        st.pending.first().is_none_or(|&m| m > seqno)
    }

    /// Sleep on the queue's vector, or yield, for at most `left`.
    pub(super) fn pause(&self, mode: WaitMode, left: Duration, spins: &mut u32) {
        match (mode, self.irq) {
            (WaitMode::Block, Some(v)) => {
                let Some(nvme) = self.nvme.upgrade() else {
                    return;
                };
                // At most 100 ms at a time: a lost or coalesced interrupt costs a
                // re-check, never a hang.
                if crate::vfio::wait_irq(&nvme.vectors[v], left.min(Duration::from_millis(100))) {
                    // Relaxed: a statistic.
                    self.irqs.fetch_add(1, Ordering::Relaxed);
                    if nvme.irq_kind == Some(IrqKind::Intx) {
                        // vfio-pci masks INTx on delivery; the caller reaps next, which
                        // lets the device drop the line.
                        let _ = nvme.shared.pci.unmask_intx();
                    }
                }
            }
            _ => {
                *spins += 1;
                if *spins < 256 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    pub(super) fn wait_seq(&self, seqno: u64, mode: WaitMode, timeout: Duration) -> Result<()> {
        let deadline = crate::submitter::deadline_after(timeout);
        let mut spins = 0;
        loop {
            if self.done_locked(&mut self.lock(), seqno) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    ring: self.qid as u32,
                    seqno,
                    waited_ms: crate::submitter::millis(timeout),
                });
            }
            self.pause(mode, deadline - now, &mut spins);
        }
    }
}

impl FenceTracker for IoCore {
    fn is_done(&self, seqno: u64) -> bool {
        self.done_locked(&mut self.lock(), seqno)
    }

    fn wait_done(&self, seqno: u64, timeout: Duration) -> Result<()> {
        self.wait_seq(seqno, WaitMode::Block, timeout)
    }

    fn abort(&self, _timeout: Duration) -> Result<()> {
        self.shared.disable()?;
        self.abort_outstanding(&mut self.lock());
        Ok(())
    }
}

impl IoQueue {
    /// Queue number.
    pub fn qid(&self) -> u16 {
        self.core.qid
    }

    /// Check the kernel's IOMMU fault log for every data command when [`IoQueue::wait`]
    /// claims its batch, waiting up to `settle` for a record that is logged after the
    /// completion is seen (`None`: no check; the default is a check without waiting
    /// where the log is readable: one non-blocking read of `/dev/kmsg`). A hit turns
    /// the completion into [`Error::NvmeIommuFault`].
    pub fn set_fault_check(&self, settle: Option<Duration>) {
        let avail = self.core.shared.pci.domain().faults().available().is_ok();
        self.core.lock().fault_check = settle.filter(|_| avail);
    }

    /// Interrupts (MSI-X) that woke a blocking wait on this queue so far.
    pub fn interrupts(&self) -> u64 {
        self.core.irqs.load(Ordering::Relaxed)
    }

    /// The controller.
    pub fn nvme(&self) -> &Arc<Nvme> {
        &self.nvme
    }

    pub(super) fn check(&self, c: &NvmeCommand) -> Result<()> {
        let Some((iova, len)) = c.data else {
            return Ok(());
        };
        let bad = |why: String| Err(self.core.shared.err("submit", why));
        if len == 0 || iova % 4 != 0 {
            return bad(format!(
                "data {iova:#x} + {len:#x}: empty or not dword aligned"
            ));
        }
        let pages = (iova % PAGE + len as u64).div_ceil(PAGE);
        if pages > PRP_PER_PAGE + 1 {
            return bad(format!(
                "{len} bytes need {pages} PRP entries; at most {} fit one list",
                PRP_PER_PAGE + 1
            ));
        }
        if let Some(max) = self.nvme.info.max_transfer {
            if len > max {
                return bad(format!(
                    "{len} bytes exceed the controller's MDTS ({max} bytes)"
                ));
            }
        }
        if matches!(c.opcode, opcode::READ | opcode::WRITE) {
            let ns = &self.nvme.ns;
            let blocks = (c.cdw[2] & 0xffff) as u64 + 1;
            if (blocks << ns.lba_shift) != len as u64 {
                return bad(format!(
                    "{blocks} blocks of {} bytes but {len} data bytes",
                    ns.block_size()
                ));
            }
            let lba = c.cdw[0] as u64 | (c.cdw[1] as u64) << 32;
            if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
                return bad(format!(
                    "blocks {lba}..+{blocks} beyond the namespace ({} blocks)",
                    ns.blocks
                ));
            }
        }
        Ok(())
    }

    /// Submit `cmds` as one batch if the queue has room now.
    pub fn submit_batch(&self, cmds: &[NvmeCommand]) -> Result<NvmeBatch> {
        if self.core.dead() {
            return Err(Error::RingStopped {
                ring: self.core.qid as u32,
                reason: "the NVMe controller was reset".into(),
            });
        }
        for c in cmds {
            self.check(c)?;
        }
        let mut st = self.core.lock();
        if st.free.len() < cmds.len() {
            self.core.reap(&mut st);
            if st.free.len() < cmds.len() {
                return Err(Error::RingFull {
                    ring: self.core.qid as u32,
                    size: st.pair.size as u32 - 1,
                });
            }
        }
        let seqno = st.next_seqno;
        st.next_seqno += 1;
        for (i, c) in cmds.iter().enumerate() {
            let cid = st.free.pop().expect("room checked above");
            st.cids[cid as usize] = Some((seqno, i, c.opcode));
            let (p1, p2) = self.prps(cid, c.data);
            st.pair.push(&sqe(cid, c.opcode, c.nsid, p1, p2, c.cdw));
        }
        st.batches.insert(
            seqno,
            Batch {
                remaining: cmds.len(),
                results: vec![None; cmds.len()],
                data: cmds.iter().map(|c| c.data).collect(),
            },
        );
        if !cmds.is_empty() {
            st.pending.insert(seqno);
        }
        // The doorbell store is ordered after the entries (Mmio::write32's fence).
        self.core.shared.bar.write32(
            self.core.shared.sq_doorbell(self.core.qid),
            st.pair.sq_tail as u32,
        );
        Ok(NvmeBatch {
            seqno,
            commands: cmds.len(),
        })
    }

    /// Wait for `batch` and claim its completions (in submission order), `Ok` only if
    /// every command of it succeeded: otherwise the error of the first that did not
    /// ([`Error::NvmeStatus`], or [`Error::NvmeIommuFault`] for a DMA the IOMMU
    /// blocked; see [`NvmeCompletion::into_result`]).
    /// [`IoQueue::wait_completions`] returns them whatever their status.
    pub fn wait(
        &self,
        batch: NvmeBatch,
        mode: WaitMode,
        timeout: Duration,
    ) -> Result<Vec<NvmeCompletion>> {
        let cs = self.wait_completions(batch, mode, timeout)?;
        if let Some(failed) = cs.iter().find(|c| !c.ok()) {
            failed.into_result()?;
        }
        Ok(cs)
    }

    /// Wait for `batch` and claim its completions (in submission order) whatever their
    /// status: a command that failed is a completion with a non-zero status (or an
    /// IOMMU fault), not an error. For tests and diagnostics.
    pub fn wait_completions(
        &self,
        batch: NvmeBatch,
        mode: WaitMode,
        timeout: Duration,
    ) -> Result<Vec<NvmeCompletion>> {
        let deadline = crate::submitter::deadline_after(timeout);
        let mut spins = 0;
        loop {
            {
                let mut st = self.core.lock();
                if self.core.dead() {
                    self.core.abort_outstanding(&mut st);
                } else {
                    self.core.reap(&mut st);
                }
                match st.batches.get(&batch.seqno) {
                    None => {
                        return Err(self.core.shared.err(
                            "wait",
                            format!("batch {} unknown or already claimed", batch.seqno),
                        ))
                    }
                    Some(b) if b.remaining == 0 => {
                        let b = st.batches.remove(&batch.seqno).expect("present");
                        let check = st.fault_check;
                        drop(st);
                        return Ok(self.with_faults(b, check));
                    }
                    Some(_) => {}
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    ring: self.core.qid as u32,
                    seqno: batch.seqno,
                    waited_ms: crate::submitter::millis(timeout),
                });
            }
            self.core.pause(mode, deadline - now, &mut spins);
        }
    }

    /// The claimed batch's completions, each data command checked against the IOMMU
    /// faults the kernel logged for this device inside its IOVA range: a blocked DMA
    /// write never reaches the device as an error. Runs in the claimant's context,
    /// outside every lock, since it may wait `settle` for a late record.
    pub(super) fn with_faults(&self, b: Batch, check: Option<Duration>) -> Vec<NvmeCompletion> {
        let pci = &self.core.shared.pci;
        b.results
            .into_iter()
            .zip(b.data)
            .map(|(r, data)| {
                let mut c = r.expect("complete");
                if let (Some((iova, len)), Some(settle)) = (data, check) {
                    if c.status & 0x7ff == 0 {
                        c.iommu_fault = pci
                            .domain()
                            .faults()
                            .take_hit(pci.bdf(), &[(iova, len as u64)], settle)
                            .map(|f| f.iova);
                    }
                }
                c
            })
            .collect()
    }

    /// Submit one command, wait, and turn a failed status into an error.
    pub fn run(&self, cmd: NvmeCommand, timeout: Duration) -> Result<NvmeCompletion> {
        let b = loop {
            match self.submit_batch(&[cmd]) {
                Err(Error::RingFull { .. }) => self.wait_for_room(1)?,
                r => break r?,
            }
        };
        let c = self.wait_completions(b, WaitMode::Block, timeout)?;
        c[0].into_result()
    }
}

impl Submitter for IoQueue {
    type Command = NvmeCommand;
    type Fence = NvmeBatch;

    fn capacity(&self) -> usize {
        self.core.lock().pair.size as usize - 1
    }

    fn queue_id(&self) -> u32 {
        self.core.qid as u32
    }

    fn domain(&self) -> &Arc<dyn crate::iommu::IommuDomain> {
        self.core.shared.driver.domain()
    }

    fn try_submit(&self, cmds: &[NvmeCommand]) -> Result<(NvmeBatch, u64)> {
        let b = self.submit_batch(cmds)?;
        Ok((b, b.seqno))
    }

    fn wait_for_room(&self, n: usize) -> Result<()> {
        let deadline =
            crate::submitter::deadline_after(self.core.shared.timeout.max(Duration::from_secs(5)));
        let mut spins = 0;
        loop {
            {
                let mut st = self.core.lock();
                self.core.reap(&mut st);
                if st.free.len() >= n || self.core.dead() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    ring: self.core.qid as u32,
                    seqno: 0,
                    waited_ms: 0,
                });
            }
            self.core.pause(WaitMode::Poll, Duration::ZERO, &mut spins);
        }
    }

    fn tracker(&self) -> Weak<dyn FenceTracker> {
        let w: Weak<IoCore> = Arc::downgrade(&self.core);
        w
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        let qid = self.core.qid as u32;
        if self.created.load(Ordering::Acquire) && !self.core.dead() {
            // Deleting the SQ aborts what is still queued; after the CQ goes too,
            // the controller no longer touches this queue's memory.
            let a = self
                .nvme
                .admin_cmd(admin::DELETE_SQ, 0, 0, [qid, 0, 0, 0, 0, 0]);
            let b = self
                .nvme
                .admin_cmd(admin::DELETE_CQ, 0, 0, [qid, 0, 0, 0, 0, 0]);
            if let Err(e) = a.and(b) {
                tracing::error!("deleting NVMe queue {qid}: {e}");
            }
        }
        {
            let mut st = self.core.lock();
            self.core.abort_outstanding(&mut st);
        }
        let drv = &self.core.shared.driver;
        self.core.lock().pair.release(drv);
        if let Err(e) = drv.unmap_raw(self.core.prp_iova, self.core.prp.len() as u64) {
            tracing::error!("unmapping NVMe PRP lists: {e}");
        }
        self.nvme
            .qids
            .lock()
            .expect("qid lock poisoned")
            .remove(&self.core.qid);
    }
}
