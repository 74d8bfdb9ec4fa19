//! The GPU-virtual-memory registers of the reference device (`docs/reference-device.md`
//! section 10.2): `VM_CAPS`, the page-table and device-memory regions, the VRAM window,
//! TLB invalidation, the fault queue, and the VM context blocks. The register file
//! ([`super::Shared`]) hands these offsets here; the engine reads the same state.

use super::mmu::{Layout, VmCtx};
use super::tlb::{InvRequest, TlbRequests};
use super::vram::PtMemory;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use userptr_ring::regs::{self, vm};

/// One VM context's registers.
#[derive(Default)]
pub(super) struct VmRegs {
    root: [AtomicU32; 2],
    control: AtomicU32,
    pub(super) faults: AtomicU32,
}

/// The fault queue's registers, and what its enable sampled.
#[derive(Default)]
pub(super) struct FaultQueueRegs {
    base: [AtomicU32; 2],
    size_log2: AtomicU32,
    control: AtomicU32,
    pub(super) tail: AtomicU32,
    pub(super) head: AtomicU32,
    pub(super) lost: AtomicU32,
    /// Base and log2 size sampled by the enable (0: disabled).
    pub(super) sampled_base: AtomicU64,
    pub(super) sampled_log2: AtomicU32,
}

/// The GPU-VM part of the register file.
pub(super) struct GpuRegs {
    pub(super) layout: Layout,
    pub(super) tlb_entries: u32,
    /// The page-table region, shared with the engine's walker.
    pub(super) pt: Arc<PtMemory>,
    window_index: AtomicU32,
    window_lo: AtomicU32,
    /// TLB_INV_VM, TLB_INV_VA_LO, TLB_INV_VA_HI, TLB_INV_PAGES.
    inv: [AtomicU32; 4],
    pub(super) tlb: TlbRequests,
    pub(super) vm_faults: AtomicU32,
    pub(super) fq: FaultQueueRegs,
    vms: [VmRegs; regs::MAX_VMS as usize + 1],
    /// The fault vector's eventfd.
    pub(super) fault_irq: Mutex<Option<Arc<OwnedFd>>>,
}

/// What a register write asks of the register file afterwards.
pub(super) enum Written {
    /// Not one of these registers.
    No,
    /// Done.
    Done,
    /// Done; wake the engine.
    Wake,
}

impl GpuRegs {
    pub(super) fn new(layout: Layout, tlb_entries: u32, pt: Arc<PtMemory>) -> GpuRegs {
        GpuRegs {
            layout,
            tlb_entries,
            pt,
            window_index: AtomicU32::new(0),
            window_lo: AtomicU32::new(0),
            inv: Default::default(),
            tlb: TlbRequests::new(),
            vm_faults: AtomicU32::new(0),
            fq: FaultQueueRegs::default(),
            vms: Default::default(),
            fault_irq: Mutex::new(None),
        }
    }

    fn caps(&self) -> u32 {
        regs::MAX_VMS | regs::VM_CAPS_REPLAYABLE | regs::VM_CAPS_2M | self.tlb_entries << 16
    }

    /// The window's offset into the page-table region, if it points inside it.
    fn window(&self) -> Option<u64> {
        // Acquire: register accesses are Acquire/Release (the Device contract).
        let i = self.window_index.load(Ordering::Acquire) as u64;
        let l = &self.layout;
        (i % 8 == 0 && i >= l.pt_base && i + 8 <= l.pt_base + l.pt_size).then(|| i - l.pt_base)
    }

    /// The VM context `id` as the engine uses it now (`None`: no such context).
    pub(super) fn vm_ctx(&self, id: u32) -> Option<VmCtx> {
        if id == 0 || id > regs::MAX_VMS {
            return None;
        }
        let v = &self.vms[id as usize];
        // Acquire: pairs with the driver's Release register writes.
        let c = v.control.load(Ordering::Acquire);
        let root = v.root[0].load(Ordering::Acquire) as u64
            | (v.root[1].load(Ordering::Acquire) as u64) << 32;
        Some(VmCtx {
            id: id as u8,
            root,
            enabled: c & vm::CONTROL_ENABLE != 0,
            replayable: c & vm::CONTROL_REPLAYABLE != 0,
        })
    }

    /// Count a stage-1 fault of VM `id`.
    pub(super) fn count_fault(&self, id: u8) {
        // Relaxed: statistics registers.
        self.vm_faults.fetch_add(1, Ordering::Relaxed);
        if let Some(v) = self.vms.get(id as usize) {
            v.faults.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn read(&self, off: u32) -> Option<u32> {
        let ld = |a: &AtomicU32| a.load(Ordering::Acquire);
        let vm_end = regs::VM_BASE + (regs::MAX_VMS + 1) * regs::VM_STRIDE;
        if (regs::VM_BASE..vm_end).contains(&off) {
            let v = ((off - regs::VM_BASE) / regs::VM_STRIDE) as usize;
            if v == 0 {
                return Some(0);
            }
            let r = &self.vms[v];
            return Some(match (off - regs::VM_BASE) % regs::VM_STRIDE {
                vm::ROOT_LO => ld(&r.root[0]),
                vm::ROOT_HI => ld(&r.root[1]),
                vm::CONTROL => ld(&r.control),
                vm::FAULTS => ld(&r.faults),
                _ => 0,
            });
        }
        let l = &self.layout;
        Some(match off {
            regs::VM_CAPS => self.caps(),
            regs::PT_BASE => l.pt_base as u32,
            regs::PT_SIZE => l.pt_size as u32,
            regs::DEVMEM_BASE => l.devmem_base as u32,
            regs::DEVMEM_SIZE => l.devmem_size as u32,
            regs::VRAM_INDEX => ld(&self.window_index),
            regs::VRAM_DATA_LO => self.window().map_or(0, |o| self.pt.load(o) as u32),
            regs::VRAM_DATA_HI => self.window().map_or(0, |o| (self.pt.load(o) >> 32) as u32),
            regs::TLB_INV_VM => ld(&self.inv[0]),
            regs::TLB_INV_VA_LO => ld(&self.inv[1]),
            regs::TLB_INV_VA_HI => ld(&self.inv[2]),
            regs::TLB_INV_PAGES => ld(&self.inv[3]),
            regs::TLB_INV_POSTED => self.tlb.posted(),
            regs::TLB_INV_DONE => self.tlb.done(),
            regs::VM_FAULTS => ld(&self.vm_faults),
            regs::FAULTQ_BASE_LO => ld(&self.fq.base[0]),
            regs::FAULTQ_BASE_HI => ld(&self.fq.base[1]),
            regs::FAULTQ_SIZE_LOG2 => ld(&self.fq.size_log2),
            regs::FAULTQ_CONTROL => ld(&self.fq.control),
            regs::FAULTQ_TAIL => ld(&self.fq.tail),
            regs::FAULTQ_HEAD => ld(&self.fq.head),
            regs::FAULTQ_LOST => ld(&self.fq.lost),
            _ => return None,
        })
    }

    pub(super) fn write(&self, off: u32, v: u32) -> Written {
        let st = |a: &AtomicU32| a.store(v, Ordering::Release);
        let vm_end = regs::VM_BASE + (regs::MAX_VMS + 1) * regs::VM_STRIDE;
        if (regs::VM_BASE..vm_end).contains(&off) {
            let i = ((off - regs::VM_BASE) / regs::VM_STRIDE) as usize;
            if i == 0 {
                return Written::Done;
            }
            let r = &self.vms[i];
            match (off - regs::VM_BASE) % regs::VM_STRIDE {
                vm::ROOT_LO => st(&r.root[0]),
                vm::ROOT_HI => st(&r.root[1]),
                vm::CONTROL => {
                    r.control.store(
                        v & (vm::CONTROL_ENABLE | vm::CONTROL_REPLAYABLE),
                        Ordering::Release,
                    );
                }
                _ => {}
            }
            return Written::Done;
        }
        match off {
            regs::VRAM_INDEX => st(&self.window_index),
            regs::VRAM_DATA_LO => st(&self.window_lo),
            regs::VRAM_DATA_HI => {
                if let Some(o) = self.window() {
                    let lo = self.window_lo.load(Ordering::Acquire) as u64;
                    self.pt.store(o, lo | (v as u64) << 32);
                    // Relaxed: the index is the writer's own state (the driver
                    // serialises window users); the Release is on the entry itself.
                    self.window_index.fetch_add(8, Ordering::Relaxed);
                }
            }
            regs::TLB_INV_VM => st(&self.inv[0]),
            regs::TLB_INV_VA_LO => st(&self.inv[1]),
            regs::TLB_INV_VA_HI => st(&self.inv[2]),
            regs::TLB_INV_PAGES => st(&self.inv[3]),
            regs::TLB_INV_REQ => {
                let ld = |a: &AtomicU32| a.load(Ordering::Acquire);
                self.tlb.post(InvRequest {
                    vm: ld(&self.inv[0]).min(255) as u8,
                    va: ld(&self.inv[1]) as u64 | (ld(&self.inv[2]) as u64) << 32,
                    pages: ld(&self.inv[3]),
                });
                return Written::Wake;
            }
            regs::FAULTQ_BASE_LO => st(&self.fq.base[0]),
            regs::FAULTQ_BASE_HI => st(&self.fq.base[1]),
            regs::FAULTQ_SIZE_LOG2 => st(&self.fq.size_log2),
            regs::FAULTQ_CONTROL => self.faultq_control(v),
            regs::FAULTQ_HEAD => st(&self.fq.head),
            _ => return Written::No,
        }
        Written::Done
    }

    fn faultq_control(&self, v: u32) {
        let fq = &self.fq;
        if v & 1 == 0 {
            fq.sampled_log2.store(0, Ordering::Release);
            fq.control.store(0, Ordering::Release);
            return;
        }
        if fq.control.load(Ordering::Acquire) & 1 != 0 {
            return;
        }
        let base = fq.base[0].load(Ordering::Acquire) as u64
            | (fq.base[1].load(Ordering::Acquire) as u64) << 32;
        let log2 = fq.size_log2.load(Ordering::Acquire);
        if base == 0 || base % 32 != 0 || !(1..=12).contains(&log2) {
            return;
        }
        fq.head.store(0, Ordering::Relaxed);
        fq.tail.store(0, Ordering::Relaxed);
        fq.sampled_base.store(base, Ordering::Relaxed);
        // Release: the engine loads the size with Acquire, then sees base and indices.
        fq.sampled_log2.store(log2, Ordering::Release);
        fq.control.store(1, Ordering::Release);
    }
}
