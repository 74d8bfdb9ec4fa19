//! An NVMe controller driven over VFIO: the ring engine of a device nobody here wrote.
//!
//! This is the proof that the library's ring path is not shaped around its own
//! reference device: the same [`Registry`](crate::Registry) (pin cache, epochs,
//! invalidation waits) drives NVMe I/O queues whose data pointers (PRPs) are userptr
//! IOVAs, through the [`Submitter`]/[`FenceTracker`] traits.
//!
//! What it does, per the NVMe base specification:
//! * bring-up: Bus Master on, BAR0 mapped, controller disabled (`CC.EN = 0`, wait
//!   `CSTS.RDY = 0`), admin queues programmed (`AQA`, `ASQ`, `ACQ`), enabled with
//!   4 KiB memory pages and 64/16-byte queue entries, `CSTS.RDY` awaited within
//!   `CAP.TO`;
//! * admin commands: Identify controller and namespace, Set Features (number of
//!   queues), Create/Delete I/O completion and submission queues;
//! * I/O queue pairs ([`IoQueue`]): commands built with [`NvmeCommand`], data described
//!   by one contiguous IOVA range and turned into PRP1/PRP2 or a PRP list (one list
//!   page per command slot, in DMA memory of the queue) at submission; completions
//!   found by the phase bit, by polling or by sleeping on the queue's MSI-X vector
//!   (an eventfd); without MSI-X, one MSI or INTx vector that all queues share (INTx
//!   unmasked after each delivery);
//! * completions may come in any order: a batch is done when all its commands are,
//!   and [`FenceTracker::is_done`] answers for every batch up to a sequence number;
//! * a DMA write the IOMMU blocked completes "successfully" on the device's side:
//!   [`IoQueue::wait`] checks each claimed data command against the IOMMU faults the
//!   kernel logged ([`crate::vfio::faults`]) and reports a hit as
//!   [`Error::NvmeIommuFault`];
//! * [`FenceTracker::abort`] disables the controller (`CC.EN = 0`): the spec's
//!   controller reset, after which no queued command is processed; the queues are
//!   then dead and report it.
//!
//! Not done: namespaces other than the first active one, SGLs, multiple controllers
//! behind one queue, and arbitration settings (the defaults serve).

use crate::dma_memory::DmaMemory;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::queue::WaitMode;
use crate::submitter::{FenceTracker, Submitter};
use crate::vfio::{IrqKind, Mmio, VfioPci};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Controller registers (BAR0).
mod reg {
    pub const CAP: usize = 0x00;
    pub const VS: usize = 0x08;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1c;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    pub const DOORBELLS: usize = 0x1000;
}

/// Admin opcodes.
mod admin {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes.
pub mod opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write: host memory → media (the device reads the IOVA).
    pub const WRITE: u8 = 0x01;
    /// Read: media → host memory (the device writes the IOVA).
    pub const READ: u8 = 0x02;
}

const PAGE: u64 = 4096;
const SQE: usize = 64;
const CQE: usize = 16;
/// Entries per PRP list page.
const PRP_PER_PAGE: u64 = PAGE / 8;

/// One command for an I/O queue. Data is one contiguous IOVA range (a userptr
/// region is IOVA-contiguous); the queue turns it into PRPs when it submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeCommand {
    pub opcode: u8,
    pub nsid: u32,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
    /// Data transfer: (IOVA, length in bytes).
    pub data: Option<(u64, u32)>,
}

impl NvmeCommand {
    fn rw(op: u8, ns: &Namespace, lba: u64, iova: u64, len: u32) -> NvmeCommand {
        let blocks = (len as u64 >> ns.lba_shift).max(1);
        NvmeCommand {
            opcode: op,
            nsid: ns.nsid,
            cdw: [
                lba as u32,
                (lba >> 32) as u32,
                (blocks - 1) as u32 & 0xffff,
                0,
                0,
                0,
            ],
            data: Some((iova, len)),
        }
    }

    /// READ `len` bytes (a multiple of the block size) from block `lba` into `iova`.
    pub fn read(ns: &Namespace, lba: u64, iova: u64, len: u32) -> NvmeCommand {
        NvmeCommand::rw(opcode::READ, ns, lba, iova, len)
    }

    /// WRITE `len` bytes from `iova` to block `lba`.
    pub fn write(ns: &Namespace, lba: u64, iova: u64, len: u32) -> NvmeCommand {
        NvmeCommand::rw(opcode::WRITE, ns, lba, iova, len)
    }

    /// FLUSH the namespace.
    pub fn flush(ns: &Namespace) -> NvmeCommand {
        NvmeCommand {
            opcode: opcode::FLUSH,
            nsid: ns.nsid,
            cdw: [0; 6],
            data: None,
        }
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeCompletion {
    /// Command-specific result (DW0).
    pub result: u32,
    /// Command identifier.
    pub cid: u16,
    /// Status field (SCT in bits 8–10, SC in bits 0–7; DNR/M/CRD above); 0 = success.
    pub status: u16,
    /// The opcode of the command it completes.
    pub opcode: u8,
    /// The IOVA of an IOMMU fault the kernel logged inside this command's data range
    /// (the DMA was blocked; the device did not know). See [`crate::vfio::faults`].
    pub iommu_fault: Option<u64>,
}

impl NvmeCompletion {
    /// Whether the command succeeded.
    pub fn ok(&self) -> bool {
        self.status & 0x7ff == 0 && self.iommu_fault.is_none()
    }

    /// A completion as a result: [`Error::NvmeStatus`] unless it succeeded.
    pub fn into_result(self) -> Result<NvmeCompletion> {
        if let Some(iova) = self.iommu_fault {
            return Err(Error::NvmeIommuFault {
                opcode: self.opcode,
                cid: self.cid,
                iova,
                reason: match self.opcode {
                    opcode::READ => "the device may not write there".into(),
                    _ => "the device may not access it".into(),
                },
            });
        }
        if self.ok() {
            Ok(self)
        } else {
            Err(Error::NvmeStatus {
                opcode: self.opcode,
                cid: self.cid,
                status: self.status,
                text: status_text(self.status),
            })
        }
    }

    /// A host-side abort (controller reset before the command completed).
    fn aborted(cid: u16, opcode: u8) -> NvmeCompletion {
        NvmeCompletion {
            result: 0,
            cid,
            // Generic status, "Command Aborted due to SQ Deletion" (0x08).
            status: 0x08,
            opcode,
            iommu_fault: None,
        }
    }
}

/// The generic and media status codes a driver meets, in words.
pub fn status_text(status: u16) -> &'static str {
    let sct = (status >> 8) & 0x7;
    let sc = status & 0xff;
    match (sct, sc) {
        (0, 0x00) => "success",
        (0, 0x01) => "invalid command opcode",
        (0, 0x02) => "invalid field in command",
        (0, 0x04) => "data transfer error (a DMA the IOMMU refused, or a bus error)",
        (0, 0x06) => "internal error",
        (0, 0x07) => "command abort requested",
        (0, 0x08) => "command aborted (queue deleted or controller reset)",
        (0, 0x0b) => "invalid namespace or format",
        (0, 0x13) => "invalid PRP offset",
        (0, 0x80) => "LBA out of range",
        (0, 0x81) => "capacity exceeded",
        (1, 0x01) => "invalid completion queue",
        (1, 0x02) => "invalid queue identifier",
        (1, 0x03) => "invalid queue size",
        (1, 0x08) => "invalid interrupt vector",
        (2, 0x80) => "write fault",
        (2, 0x81) => "unrecovered read error",
        (2, 0x86) => "access denied",
        _ => "see the NVMe status code tables",
    }
}

/// The first active namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub nsid: u32,
    /// log2 of the block size.
    pub lba_shift: u32,
    /// Size in blocks.
    pub blocks: u64,
}

impl Namespace {
    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.lba_shift
    }
}

/// What Identify Controller says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    pub vendor: u16,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    /// Version register (major.minor.tertiary).
    pub version: (u16, u8, u8),
    /// Largest transfer in bytes (from MDTS; `None`: no limit).
    pub max_transfer: Option<u32>,
    /// Namespaces the controller supports.
    pub namespaces: u32,
    /// Maximum queue entries (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// I/O queue pairs granted by Set Features.
    pub io_queues: u16,
}

/// A submission/completion queue pair in DMA memory.
struct Pair {
    qid: u16,
    size: u16,
    sq: DmaMemory,
    cq: DmaMemory,
    sq_iova: u64,
    cq_iova: u64,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
}

impl Pair {
    fn new(drv: &Driver, qid: u16, size: u16) -> Result<Pair> {
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

    fn release(&self, drv: &Driver) {
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
    fn push(&mut self, sqe: &[u8; SQE]) {
        self.sq.write(self.sq_tail as usize * SQE, sqe);
        self.sq_tail = (self.sq_tail + 1) % self.size;
    }

    /// The next completion, if the device has posted it.
    fn pop(&mut self) -> Option<(u16, u16, u32)> {
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

fn sqe(cid: u16, op: u8, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 6]) -> [u8; SQE] {
    let mut b = [0u8; SQE];
    let dw0 = op as u32 | (cid as u32) << 16;
    b[0..4].copy_from_slice(&dw0.to_le_bytes());
    b[4..8].copy_from_slice(&nsid.to_le_bytes());
    b[24..32].copy_from_slice(&prp1.to_le_bytes());
    b[32..40].copy_from_slice(&prp2.to_le_bytes());
    for (i, d) in cdw.iter().enumerate() {
        b[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
    }
    b
}

/// The parts of a controller every queue uses.
struct Shared {
    pci: Arc<VfioPci>,
    bar: Mmio,
    driver: Driver,
    /// Doorbell stride in bytes.
    dstrd: usize,
    timeout: Duration,
    /// Set by a controller reset: queues are gone.
    dead: AtomicBool,
}

impl Shared {
    fn name(&self) -> String {
        format!("NVMe {}", self.pci.bdf())
    }

    fn sq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + 2 * qid as usize * self.dstrd
    }

    fn cq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + (2 * qid as usize + 1) * self.dstrd
    }

    fn err(&self, what: &'static str, reason: impl Into<String>) -> Error {
        Error::Nvme {
            what,
            device: self.pci.bdf().to_string(),
            reason: reason.into(),
        }
    }

    fn wait_ready(&self, ready: bool) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let csts = self.bar.read32(reg::CSTS);
            if csts == u32::MAX {
                return Err(self.err("reset", "CSTS reads all ones: the device is gone"));
            }
            if csts & 2 != 0 {
                return Err(self.err("reset", "controller fatal status (CSTS.CFS)"));
            }
            if (csts & 1 == 1) == ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.err(
                    "reset",
                    format!("CSTS.RDY did not become {} within CAP.TO", ready as u8),
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Controller reset: no queued command is processed after this.
    fn disable(&self) -> Result<()> {
        self.dead.store(true, Ordering::Release);
        let cc = self.bar.read32(reg::CC);
        self.bar.write32(reg::CC, cc & !1);
        self.wait_ready(false)
    }
}

/// An NVMe controller behind VFIO.
pub struct Nvme {
    shared: Arc<Shared>,
    admin: Mutex<Pair>,
    info: ControllerInfo,
    ns: Namespace,
    /// MSI-X: vector 0 is the admin queue's, I/O queue `qid` uses vector `qid`. MSI
    /// or INTx (the fallbacks): one vector that every queue shares.
    vectors: Vec<EventFd>,
    /// The interrupt type in use, if any.
    irq_kind: Option<IrqKind>,
    qids: Mutex<BTreeSet<u16>>,
}

impl std::fmt::Debug for Nvme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvme")
            .field("bdf", &self.shared.pci.bdf())
            .field("info", &self.info)
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

/// Admin queue depth.
const ADMIN_ENTRIES: u16 = 32;

impl Nvme {
    /// Bring up the controller at `pci` (opened into `driver`'s VFIO domain): reset,
    /// admin queues, Identify, the number of I/O queues, and interrupts: MSI-X where
    /// the function has it, else MSI, else INTx.
    pub fn new(pci: Arc<VfioPci>, driver: &Driver) -> Result<Arc<Nvme>> {
        Nvme::with_interrupts(pci, driver, None)
    }

    /// As [`Nvme::new`], with the interrupt type chosen (`Some`), for bring-up and
    /// tests of the fallbacks; `None` picks the best the function offers.
    pub fn with_interrupts(
        pci: Arc<VfioPci>,
        driver: &Driver,
        kind: Option<IrqKind>,
    ) -> Result<Arc<Nvme>> {
        pci.enable_bus_master()?;
        let bar = pci.map_bar(0)?;
        let cap = bar.read64(reg::CAP);
        let mqes = (cap & 0xffff) as u32 + 1;
        let dstrd = 4usize << ((cap >> 32) & 0xf);
        let to = Duration::from_millis(((cap >> 24) & 0xff).max(1) * 500);
        let mpsmin = (cap >> 48) & 0xf;
        let css_nvm = (cap >> 37) & 1 == 1;
        let shared = Arc::new(Shared {
            pci: pci.clone(),
            bar,
            driver: driver.clone(),
            dstrd,
            timeout: to,
            dead: AtomicBool::new(false),
        });
        if mpsmin != 0 {
            return Err(shared.err(
                "bring-up",
                format!(
                    "smallest memory page is {} bytes; only 4 KiB is supported",
                    4096u64 << mpsmin
                ),
            ));
        }
        if !css_nvm {
            return Err(shared.err("bring-up", "the controller has no NVM command set"));
        }
        // Disable, program the admin queues, enable.
        shared.bar.write32(reg::CC, 0);
        shared.wait_ready(false)?;
        let admin_size = ADMIN_ENTRIES.min(mqes as u16);
        let adm = Pair::new(driver, 0, admin_size)?;
        let a = admin_size as u32 - 1;
        shared.bar.write32(reg::AQA, a << 16 | a);
        shared.bar.write64(reg::ASQ, adm.sq_iova);
        shared.bar.write64(reg::ACQ, adm.cq_iova);
        // EN, CSS = NVM (0), MPS = 0 (4 KiB), AMS = round robin, IOSQES = 6, IOCQES = 4.
        let cc = 1 | 6 << 16 | 4 << 20;
        shared.bar.write32(reg::CC, cc);
        if let Err(e) = shared.wait_ready(true) {
            adm.release(driver);
            return Err(e);
        }
        // Interrupts: one MSI-X vector per queue where the function has MSI-X;
        // otherwise one MSI or INTx vector for all queues.
        let kind = kind.or_else(|| {
            [IrqKind::Msix, IrqKind::Msi, IrqKind::Intx]
                .into_iter()
                .find(|k| pci.irq_count(*k) > 0)
        });
        let nvec = match kind {
            Some(IrqKind::Msix) => pci.irq_count(IrqKind::Msix).min(16) as usize,
            Some(_) => 1,
            None => 0,
        };
        let mut vectors = Vec::new();
        for _ in 0..nvec {
            vectors.push(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("eventfd", e))?);
        }
        if let (Some(k), false) = (kind, vectors.is_empty()) {
            let refs: Vec<&EventFd> = vectors.iter().collect();
            pci.enable_irqs(k, &refs)?;
        }
        let irq_kind = kind.filter(|_| !vectors.is_empty());
        let mut me = Nvme {
            shared,
            admin: Mutex::new(adm),
            info: ControllerInfo {
                vendor: 0,
                model: String::new(),
                serial: String::new(),
                firmware: String::new(),
                version: (0, 0, 0),
                max_transfer: None,
                namespaces: 0,
                max_queue_entries: mqes,
                io_queues: 0,
            },
            ns: Namespace {
                nsid: 0,
                lba_shift: 9,
                blocks: 0,
            },
            vectors,
            irq_kind,
            qids: Mutex::new(BTreeSet::new()),
        };
        me.identify()?;
        Ok(Arc::new(me))
    }

    fn identify(&mut self) -> Result<()> {
        let page = DmaMemory::new(PAGE as usize)?;
        let drv = self.shared.driver.clone();
        let iova = drv.map_raw(page.addr(), PAGE, Perm::READ_WRITE)?;
        let r = (|| {
            // Identify Controller (CNS 1).
            self.admin_cmd(admin::IDENTIFY, 0, iova, [1, 0, 0, 0, 0, 0])?;
            let mut id = vec![0u8; PAGE as usize];
            page.read(0, &mut id);
            let text =
                |r: std::ops::Range<usize>| String::from_utf8_lossy(&id[r]).trim().to_string();
            let vs = self.shared.bar.read32(reg::VS);
            self.info.vendor = u16::from_le_bytes([id[0], id[1]]);
            self.info.serial = text(4..24);
            self.info.model = text(24..64);
            self.info.firmware = text(64..72);
            self.info.version = ((vs >> 16) as u16, (vs >> 8) as u8, vs as u8);
            let mdts = id[77];
            self.info.max_transfer = (mdts != 0).then(|| (PAGE as u32) << mdts.min(20));
            self.info.namespaces = u32::from_le_bytes(id[516..520].try_into().expect("4 bytes"));
            // Number of queues: ask for 15 pairs, take what is granted.
            let c = self.admin_cmd(admin::SET_FEATURES, 0, 0, [0x07, 14 << 16 | 14, 0, 0, 0, 0])?;
            let granted = (c.result & 0xffff).min(c.result >> 16) + 1;
            self.info.io_queues = granted as u16;
            // The first active namespace (Identify Namespace, CNS 0).
            for nsid in 1..=self.info.namespaces.clamp(1, 16) {
                self.admin_cmd(admin::IDENTIFY, nsid, iova, [0, 0, 0, 0, 0, 0])?;
                page.read(0, &mut id);
                let nsze = u64::from_le_bytes(id[0..8].try_into().expect("8 bytes"));
                if nsze == 0 {
                    continue;
                }
                let fmt = (id[26] & 0xf) as usize;
                let lbaf = u32::from_le_bytes(
                    id[128 + 4 * fmt..132 + 4 * fmt]
                        .try_into()
                        .expect("4 bytes"),
                );
                self.ns = Namespace {
                    nsid,
                    lba_shift: (lbaf >> 16) & 0xff,
                    blocks: nsze,
                };
                return Ok(());
            }
            Err(self.shared.err("identify", "no active namespace"))
        })();
        let _ = drv.unmap_raw(iova, PAGE);
        r
    }

    /// Run one admin command to completion (polled; admin commands are rare).
    fn admin_cmd(&self, op: u8, nsid: u32, prp1: u64, cdw: [u32; 6]) -> Result<NvmeCompletion> {
        if self.shared.dead.load(Ordering::Acquire) {
            return Err(self.shared.err("admin command", "the controller was reset"));
        }
        if self.shared.bar.read32(reg::CSTS) & 1 == 0 {
            // Disabled under us (a function reset): nothing queued will run.
            self.shared.dead.store(true, Ordering::Release);
            return Err(self.shared.err(
                "admin command",
                "the controller is not ready (CSTS.RDY = 0)",
            ));
        }
        let mut q = self.admin.lock().expect("admin queue lock poisoned");
        // One admin command at a time: the CID is the SQ slot.
        let cid = q.sq_tail;
        q.push(&sqe(cid, op, nsid, prp1, 0, cdw));
        self.shared
            .bar
            .write32(self.shared.sq_doorbell(0), q.sq_tail as u32);
        let deadline = Instant::now() + self.shared.timeout.max(Duration::from_secs(5));
        loop {
            if let Some((c, status, result)) = q.pop() {
                self.shared
                    .bar
                    .write32(self.shared.cq_doorbell(0), q.cq_head as u32);
                if c != cid {
                    continue; // a stale entry of an earlier, abandoned command
                }
                return NvmeCompletion {
                    result,
                    cid,
                    status,
                    opcode: op,
                    iommu_fault: None,
                }
                .into_result();
            }
            if Instant::now() > deadline {
                return Err(self.shared.err(
                    "admin command",
                    format!("opcode {op:#04x} did not complete"),
                ));
            }
            std::thread::yield_now();
        }
    }

    /// What Identify reported.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// The namespace I/O goes to.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The PCI function.
    pub fn pci(&self) -> &Arc<VfioPci> {
        &self.shared.pci
    }

    /// The driver (IOMMU domain, IOVA space) the controller's memory is mapped through.
    pub fn driver(&self) -> &Driver {
        &self.shared.driver
    }

    /// Whether completions can be waited for by interrupt.
    pub fn has_interrupts(&self) -> bool {
        !self.vectors.is_empty()
    }

    /// The interrupt type in use (`None`: completions are polled).
    pub fn interrupt_kind(&self) -> Option<IrqKind> {
        self.irq_kind
    }

    /// Create I/O queue pair `qid` (1..=granted) with `size` entries.
    pub fn io_queue(self: &Arc<Self>, qid: u16, size: u16) -> Result<IoQueue> {
        if qid == 0 || qid > self.info.io_queues {
            return Err(self.shared.err(
                "create I/O queue",
                format!("queue id {qid} outside 1..={}", self.info.io_queues),
            ));
        }
        if size < 2 || size as u32 > self.info.max_queue_entries {
            return Err(self.shared.err(
                "create I/O queue",
                format!("size {size} outside 2..={}", self.info.max_queue_entries),
            ));
        }
        if !self.qids.lock().expect("qid lock poisoned").insert(qid) {
            return Err(self
                .shared
                .err("create I/O queue", format!("queue {qid} exists")));
        }
        let drv = &self.shared.driver;
        let made = (|| {
            let pair = Pair::new(drv, qid, size)?;
            let prp = DmaMemory::new(size as usize * PAGE as usize)?;
            let prp_iova = match drv.map_raw(prp.addr(), prp.len() as u64, Perm::READ) {
                Ok(i) => i,
                Err(e) => {
                    pair.release(drv);
                    return Err(e);
                }
            };
            Ok((pair, prp, prp_iova))
        })();
        let (pair, prp, prp_iova) = match made {
            Ok(x) => x,
            Err(e) => {
                self.qids.lock().expect("qid lock poisoned").remove(&qid);
                return Err(e);
            }
        };
        // The queue's vector: its own under MSI-X, the shared one under MSI or INTx.
        let vector_index = match self.irq_kind {
            Some(IrqKind::Msix) => ((qid as usize) < self.vectors.len()).then_some(qid as usize),
            Some(_) => Some(0),
            None => None,
        };
        let vector = vector_index.is_some();
        let q = IoQueue {
            nvme: self.clone(),
            core: Arc::new(IoCore {
                shared: self.shared.clone(),
                qid,
                state: Mutex::new(IoState {
                    pair,
                    cids: vec![None; size as usize],
                    fault_check: self
                        .shared
                        .pci
                        .domain()
                        .faults()
                        .available()
                        .is_ok()
                        .then_some(Duration::ZERO),
                    free: (0..size - 1).rev().collect(),
                    next_seqno: 1,
                    batches: BTreeMap::new(),
                    pending: BTreeSet::new(),
                }),
                prp,
                prp_iova,
                irq: vector_index,
                nvme: Arc::downgrade(self),
                irqs: std::sync::atomic::AtomicU64::new(0),
            }),
            created: AtomicBool::new(false),
        };
        // Create the CQ (physically contiguous, interrupts on its vector if any),
        // then the SQ bound to it.
        let (sq_iova, cq_iova) = {
            let st = q.core.lock();
            (st.pair.sq_iova, st.pair.cq_iova)
        };
        let ien = if vector { 2 } else { 0 };
        self.admin_cmd(
            admin::CREATE_CQ,
            0,
            cq_iova,
            [
                ((size as u32 - 1) << 16) | qid as u32,
                (vector_index.unwrap_or(0) as u32) << 16 | ien | 1,
                0,
                0,
                0,
                0,
            ],
        )?;
        if let Err(e) = self.admin_cmd(
            admin::CREATE_SQ,
            0,
            sq_iova,
            [
                ((size as u32 - 1) << 16) | qid as u32,
                (qid as u32) << 16 | 1,
                0,
                0,
                0,
                0,
            ],
        ) {
            let _ = self.admin_cmd(admin::DELETE_CQ, 0, 0, [qid as u32, 0, 0, 0, 0, 0]);
            return Err(e);
        }
        q.created.store(true, Ordering::Release);
        Ok(q)
    }

    /// Controller reset (`CC.EN = 0`): nothing queued is processed any more; every
    /// queue reports its outstanding commands aborted.
    pub fn reset(&self) -> Result<()> {
        self.shared.disable()
    }
}

impl Drop for Nvme {
    fn drop(&mut self) {
        if let Some(k) = self.irq_kind {
            let _ = self.shared.pci.disable_irqs(k);
        }
        if let Err(e) = self.shared.disable() {
            tracing::error!("disabling {}: {e}", self.shared.name());
        }
        let _ = self.shared.pci.disable_bus_master();
        self.admin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(&self.shared.driver);
    }
}

/// A batch in flight or completed and not yet claimed.
struct Batch {
    remaining: usize,
    results: Vec<Option<NvmeCompletion>>,
    /// Each command's data range, for the IOMMU fault check at claim time.
    data: Vec<Option<(u64, u32)>>,
}

/// What a command slot (CID) holds while its command is outstanding: the batch's
/// seqno, the index in the batch and the opcode.
type Slot = (u64, usize, u8);

struct IoState {
    pair: Pair,
    /// Per CID: (batch seqno, index in the batch, opcode).
    cids: Vec<Option<Slot>>,
    /// Check the kernel's IOMMU fault log for each data command when its batch is
    /// claimed, waiting up to this long for a late record; `None`: no check.
    fault_check: Option<Duration>,
    free: Vec<u16>,
    next_seqno: u64,
    batches: BTreeMap<u64, Batch>,
    /// Batches with commands outstanding.
    pending: BTreeSet<u64>,
}

struct IoCore {
    shared: Arc<Shared>,
    qid: u16,
    state: Mutex<IoState>,
    /// One PRP list page per CID.
    prp: DmaMemory,
    prp_iova: u64,
    irq: Option<usize>,
    nvme: Weak<Nvme>,
    /// Interrupts this queue's waiters were woken by.
    irqs: std::sync::atomic::AtomicU64,
}

/// A submitted batch: wait on it with [`IoQueue::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeBatch {
    pub seqno: u64,
    pub commands: usize,
}

/// An NVMe I/O queue pair. Implements [`Submitter`], so
/// [`Registry::submit`](crate::Registry::submit) drives it with userptr IOVAs.
pub struct IoQueue {
    nvme: Arc<Nvme>,
    core: Arc<IoCore>,
    created: AtomicBool,
}

impl IoCore {
    fn lock(&self) -> MutexGuard<'_, IoState> {
        self.state.lock().expect("NVMe queue lock poisoned")
    }

    fn dead(&self) -> bool {
        // Acquire: pairs with the Release in Shared::disable.
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Reap every posted completion; ring the CQ doorbell once.
    fn reap(&self, st: &mut IoState) {
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
    fn abort_outstanding(&self, st: &mut IoState) {
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

    fn done_locked(&self, st: &mut IoState, seqno: u64) -> bool {
        if self.dead() {
            self.abort_outstanding(st);
            return true;
        }
        self.reap(st);
        st.pending.first().is_none_or(|&m| m > seqno)
    }

    /// Sleep on the queue's vector, or yield, for at most `left`.
    fn pause(&self, mode: WaitMode, left: Duration, spins: &mut u32) {
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

    fn wait_seq(&self, seqno: u64, mode: WaitMode, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
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
                    waited_ms: timeout.as_millis() as u64,
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

    fn check(&self, c: &NvmeCommand) -> Result<()> {
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

    /// PRP1 and PRP2 for a command in slot `cid` (writing its PRP list if needed).
    fn prps(&self, cid: u16, data: Option<(u64, u32)>) -> (u64, u64) {
        let Some((iova, len)) = data else {
            return (0, 0);
        };
        let first_page = iova & !(PAGE - 1);
        let end = iova + len as u64;
        let pages = (end - first_page).div_ceil(PAGE);
        match pages {
            1 => (iova, 0),
            2 => (iova, first_page + PAGE),
            _ => {
                let list_off = cid as usize * PAGE as usize;
                let mut list = Vec::with_capacity((pages as usize - 1) * 8);
                for i in 1..pages {
                    list.extend_from_slice(&(first_page + i * PAGE).to_le_bytes());
                }
                self.core.prp.write(list_off, &list);
                (iova, self.core.prp_iova + list_off as u64)
            }
        }
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

    /// Wait for `batch` and claim its completions (in submission order). A command
    /// that failed is a completion with a non-zero status, not an error: see
    /// [`NvmeCompletion::into_result`].
    pub fn wait(
        &self,
        batch: NvmeBatch,
        mode: WaitMode,
        timeout: Duration,
    ) -> Result<Vec<NvmeCompletion>> {
        let deadline = Instant::now() + timeout;
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
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            self.core.pause(mode, deadline - now, &mut spins);
        }
    }

    /// The claimed batch's completions, each data command checked against the IOMMU
    /// faults the kernel logged for this device inside its IOVA range: a blocked DMA
    /// write never reaches the device as an error. Runs in the claimant's context,
    /// outside every lock, since it may wait `settle` for a late record.
    fn with_faults(&self, b: Batch, check: Option<Duration>) -> Vec<NvmeCompletion> {
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
        let c = self.wait(b, WaitMode::Block, timeout)?;
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

    fn try_submit(&self, cmds: &[NvmeCommand]) -> Result<(NvmeBatch, u64)> {
        let b = self.submit_batch(cmds)?;
        Ok((b, b.seqno))
    }

    fn wait_for_room(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + self.core.shared.timeout.max(Duration::from_secs(5));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_entry_layout() {
        let b = sqe(
            0x1234,
            opcode::READ,
            1,
            0xaaaa_0000,
            0xbbbb_0000,
            [1, 2, 3, 4, 5, 6],
        );
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0x1234_0002);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            0xaaaa_0000
        );
        assert_eq!(
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            0xbbbb_0000
        );
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[60..64].try_into().unwrap()), 6);
    }

    #[test]
    fn read_command_counts_blocks_zero_based() {
        let ns = Namespace {
            nsid: 1,
            lba_shift: 9,
            blocks: 1 << 20,
        };
        let c = NvmeCommand::read(&ns, 0x1_0000_0002, 0x10000, 4096);
        assert_eq!(c.cdw[0], 2);
        assert_eq!(c.cdw[1], 1);
        assert_eq!(c.cdw[2], 7);
        assert_eq!(c.data, Some((0x10000, 4096)));
    }

    #[test]
    fn status_words_read_as_text() {
        assert_eq!(
            status_text(0x0004),
            "data transfer error (a DMA the IOMMU refused, or a bus error)"
        );
        assert_eq!(status_text(0x0080), "LBA out of range");
        let ok = NvmeCompletion {
            result: 0,
            cid: 1,
            status: 0,
            opcode: 2,
            iommu_fault: None,
        };
        assert!(ok.ok());
        let faulted = NvmeCompletion {
            iommu_fault: Some(0x34000),
            ..ok
        };
        assert!(!faulted.ok());
        assert!(matches!(
            faulted.into_result(),
            Err(Error::NvmeIommuFault { iova: 0x34000, .. })
        ));
        assert!(NvmeCompletion::aborted(1, 2).into_result().is_err());
    }
}
