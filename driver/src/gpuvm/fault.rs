//! The fault queue and its handler thread (`docs/reference-device.md` section 10.6):
//! the device writes a record per replayable fault into a queue in host memory and
//! raises the fault vector; the handler reads the records, has the faulting VM
//! resolve each (`GpuVm`'s fault path: rebind a bound userptr, or an SVM chunk), and
//! answers the held command with `REPLAY` `RETRY` or `FAIL`.
//!
//! The handler is a driver thread: it blocks every asynchronous signal and runs in a
//! driver section for its life (its registry calls pin and may wait for an
//! invalidation window, never while it holds a VM's lock).

use super::hw::Hw;
use super::GpuShared;
use crate::dma_memory::DmaMemory;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::registry::Registry;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use userptr_ring::regs::{self, fault_record};

/// Records in the queue (a power of two, more than the device's rings).
const RECORDS: u32 = 64;

/// The driver's end of the fault queue.
pub(crate) struct FaultQueue {
    driver: Driver,
    mem: DmaMemory,
    iova: u64,
    eventfd: Arc<OwnedFd>,
    /// Records consumed (the FAULTQ_HEAD the driver wrote last).
    head: std::sync::Mutex<u32>,
    handled: AtomicU64,
}

impl FaultQueue {
    /// Allocate and map the queue, program and enable it, connect the fault vector.
    pub(super) fn new(driver: &Driver, hw: &Hw) -> Result<FaultQueue> {
        let mem = DmaMemory::new(RECORDS as usize * fault_record::SIZE)?;
        let iova = driver.map_raw(mem.addr(), mem.len() as u64, Perm::READ_WRITE)?;
        let eventfd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::sys("eventfd", e.into()));
        let eventfd = match eventfd {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = driver.unmap_raw(iova, mem.len() as u64);
                return Err(e);
            }
        };
        let dev = &hw.dev;
        dev.write32(regs::FAULTQ_CONTROL, 0);
        dev.write32(regs::FAULTQ_BASE_LO, iova as u32);
        dev.write32(regs::FAULTQ_BASE_HI, (iova >> 32) as u32);
        dev.write32(regs::FAULTQ_SIZE_LOG2, RECORDS.trailing_zeros());
        dev.write32(regs::FAULTQ_CONTROL, 1);
        let q = FaultQueue {
            driver: driver.clone(),
            mem,
            iova,
            eventfd,
            head: std::sync::Mutex::new(0),
            handled: AtomicU64::new(0),
        };
        if dev.read32(regs::FAULTQ_CONTROL) & 1 == 0 {
            q.shutdown_regs(hw);
            return Err(Error::RingConfig {
                ring: regs::FAULT_VECTOR,
                code: 1,
            });
        }
        dev.set_irq_eventfd(regs::FAULT_VECTOR, Some(q.eventfd.clone()))?;
        Ok(q)
    }

    fn shutdown_regs(&self, hw: &Hw) {
        hw.dev.write32(regs::FAULTQ_CONTROL, 0);
        let _ = hw.dev.set_irq_eventfd(regs::FAULT_VECTOR, None);
        if let Err(e) = self.driver.unmap_raw(self.iova, self.mem.len() as u64) {
            tracing::error!("unmapping the fault queue: {e}");
        }
    }

    /// Disable the queue and unmap it (the manager's teardown).
    pub(super) fn shutdown(&self, _registry: &Registry, hw: &Hw) {
        if crate::fork::in_forked_child() {
            return;
        }
        self.shutdown_regs(hw);
    }

    /// Wake the handler (teardown).
    pub(super) fn wake(&self) {
        let _ = rustix::io::write(&*self.eventfd, &1u64.to_ne_bytes());
    }

    /// Records handled so far.
    pub(super) fn handled(&self) -> u64 {
        // Relaxed: a statistic.
        self.handled.load(Ordering::Relaxed)
    }

    /// Wait for the fault vector (at most 20 ms: the teardown check's period).
    fn wait(&self) {
        let mut fds = [rustix::event::PollFd::new(
            &*self.eventfd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&*self.eventfd, &mut buf);
    }

    /// The records written since the last call, consumed (FAULTQ_HEAD advanced).
    fn drain(&self, hw: &Hw) -> Vec<fault_record::FaultQueueRecord> {
        let mut head = self.head.lock().expect("fault queue lock poisoned");
        // Acquire (the register read): the records below TAIL are written.
        let tail = hw.dev.read32(regs::FAULTQ_TAIL);
        let mut out = Vec::new();
        while *head != tail {
            let slot = (*head % RECORDS) as usize;
            let mut raw = [0u8; fault_record::SIZE];
            self.mem.read(slot * fault_record::SIZE, &mut raw);
            match fault_record::FaultQueueRecord::decode(&raw) {
                Some(r) => out.push(r),
                None => tracing::error!("undecodable fault record at slot {slot}"),
            }
            *head = head.wrapping_add(1);
        }
        hw.dev.write32(regs::FAULTQ_HEAD, *head);
        out
    }
}

/// The handler thread's loop: until the manager is dropped.
pub(super) fn run(shared: &GpuShared) {
    let _section = crate::driver_section::enter();
    loop {
        // Acquire: pairs with the Release in GpuInner::drop.
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        for rec in shared.faults.drain(&shared.hw) {
            let retry = match shared.vm(rec.vm as u32) {
                Some(vm) => vm.resolve_fault(&rec),
                None => false,
            };
            shared.hw.replay(rec.ring as u32, retry);
            // Relaxed: a statistic.
            shared.faults.handled.fetch_add(1, Ordering::Relaxed);
        }
        shared.faults.wait();
    }
}
