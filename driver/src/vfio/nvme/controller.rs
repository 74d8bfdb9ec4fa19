//! Controller bring-up: reset, admin queues, Identify, the I/O queue count,
//! interrupts; creating and deleting I/O queue pairs; the controller reset.

use super::command::{sqe, Namespace, NvmeCompletion};
use super::io_queue::{IoCore, IoQueue, IoState};
use super::pair::Pair;
use super::{admin, reg, PAGE};
use crate::dma_memory::DmaMemory;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::vfio::{IrqKind, Mmio, VfioPci};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What Identify Controller says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI vendor id.
    pub vendor: u16,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware revision.
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

/// The parts of a controller every queue uses.
pub(super) struct Shared {
    pub(super) pci: Arc<VfioPci>,
    pub(super) bar: Mmio,
    pub(super) driver: Driver,
    /// Doorbell stride in bytes.
    pub(super) dstrd: usize,
    pub(super) timeout: Duration,
    /// Set by a controller reset: queues are gone.
    pub(super) dead: AtomicBool,
}

impl Shared {
    pub(super) fn name(&self) -> String {
        format!("NVMe {}", self.pci.bdf())
    }

    pub(super) fn sq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + 2 * qid as usize * self.dstrd
    }

    pub(super) fn cq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + (2 * qid as usize + 1) * self.dstrd
    }

    pub(super) fn err(&self, what: &'static str, reason: impl Into<String>) -> Error {
        Error::Nvme {
            what,
            device: self.pci.bdf().to_string(),
            reason: reason.into(),
        }
    }

    pub(super) fn wait_ready(&self, ready: bool) -> Result<()> {
        let deadline = crate::submitter::deadline_after(self.timeout);
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
    pub(super) fn disable(&self) -> Result<()> {
        self.dead.store(true, Ordering::Release);
        let cc = self.bar.read32(reg::CC);
        self.bar.write32(reg::CC, cc & !1);
        self.wait_ready(false)
    }
}

/// An NVMe controller behind VFIO.
pub struct Nvme {
    pub(super) shared: Arc<Shared>,
    pub(super) admin: Mutex<Pair>,
    pub(super) info: ControllerInfo,
    pub(super) ns: Namespace,
    /// MSI-X: vector 0 is the admin queue's, I/O queue `qid` uses vector `qid`. MSI
    /// or INTx (the fallbacks): one vector that every queue shares.
    pub(super) vectors: Vec<EventFd>,
    /// The interrupt type in use, if any.
    pub(super) irq_kind: Option<IrqKind>,
    pub(super) qids: Mutex<BTreeSet<u16>>,
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
pub(super) const ADMIN_ENTRIES: u16 = 32;

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

    pub(super) fn identify(&mut self) -> Result<()> {
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
    pub(super) fn admin_cmd(
        &self,
        op: u8,
        nsid: u32,
        prp1: u64,
        cdw: [u32; 6],
    ) -> Result<NvmeCompletion> {
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
        let deadline =
            crate::submitter::deadline_after(self.shared.timeout.max(Duration::from_secs(5)));
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
