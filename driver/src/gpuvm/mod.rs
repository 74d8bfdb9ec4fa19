//! GPU virtual memory, the driver side (`docs/reference-device.md` section 10): per-
//! context VMs whose page tables (in device memory) mirror userptrs, device memory,
//! and, in shared-virtual-memory mode, the process's own address space, kept coherent
//! through the registry.
//!
//! * [`Gpu`]: the device's VM manager, one per device: the page-table and
//!   device-memory allocators, the VM ids, the fault queue and its handler thread;
//! * [`GpuVm`]: one VM: create/destroy, attach rings, bind/unbind a
//!   [`crate::Userptr`] or device memory at a GPU VA, submit with fences;
//! * invalidation (`mirror`): the registry tells every VM before a region's IOVA
//!   mapping goes away, with the cause, and the VM runs Xe's order: wait for the
//!   fences of its work (VMs without replayable faults) → zap the PTEs → TLB
//!   invalidation (waited for) → return, after which the registry unmaps the IOVA and
//!   unpins. `munmap` frees the page tables of the range, a destructive `madvise`
//!   keeps them, an `mprotect` downgrade clears the write bits without an unpin, an
//!   upgrade does nothing until the next fault;
//! * faults (`fault`): a VM created with replayable faults holds a command on a
//!   non-present or read-only page; the handler thread maps it and replays, or fails
//!   the command. In SVM mode (GPU VA == CPU VA) it pins and binds the faulting chunk
//!   through the registry (2 MiB / 64 KiB / 4 KiB, `svm`), after checking that the
//!   process itself could make the access (`populate`), so that nothing the
//!   application could not touch is ever pinned.
//!
//! Files: this one (the manager), `vm` (a VM, its state, submit), `bind`
//! (bind/unbind), `mirror` (the
//! registry's notices), `fault` (the fault queue and handler), `svm` (chunks),
//! `pagetable` (the tree and its entry writes), `hw` (the registers), `populate` (the
//! access check), `stats` (counters), `target` (bindings of driver-owned memory that
//! moves: buffer objects, retargeted in Xe's order).
//!
//! Locks: a VM's state lock is never held across a registry call (the registry calls
//! back into the VM, from its own unmap paths, while it may hold nothing of the VM's);
//! under it the VM takes the device-wide allocator and register locks only.

mod bind;
mod fault;
mod hw;
mod mirror;
mod pagetable;
mod populate;
mod stats;
mod svm;
mod target;
mod vm;

pub use stats::GpuVmStats;
pub use target::Target;
pub use vm::{Binding, DebugKnobs, GpuVm, VmConfig};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use crate::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use userptr_ring::regs;

/// VM ids in use, and the VMs (for the fault handler).
pub(super) struct VmTable {
    taken: [bool; regs::MAX_VMS as usize + 1],
    vms: Vec<Weak<vm::VmInner>>,
}

/// What the manager, its VMs and its fault thread share.
pub(crate) struct GpuShared {
    pub(super) registry: Registry,
    pub(super) hw: hw::Hw,
    pub(super) pt_alloc: Mutex<IovaAllocator>,
    pub(super) devmem_alloc: Mutex<IovaAllocator>,
    pub(super) vms: Mutex<VmTable>,
    pub(super) faults: fault::FaultQueue,
    stop: AtomicBool,
}

impl GpuShared {
    /// The VM with id `id`, if it exists.
    pub(super) fn vm(&self, id: u32) -> Option<Arc<vm::VmInner>> {
        let t = self.vms.lock().expect("vm table poisoned");
        t.vms.get(id as usize)?.upgrade()
    }
}

pub(crate) struct GpuInner {
    pub(super) shared: Arc<GpuShared>,
    handler: Mutex<Option<JoinHandle<()>>>,
}

/// The GPU-VM manager of one device (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<GpuInner>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").finish_non_exhaustive()
    }
}

/// Devices whose VMs a `Gpu` manages (by the address of their `Device`).
static OPEN: Mutex<Vec<(usize, Weak<GpuShared>)>> = Mutex::new(Vec::new());

impl Gpu {
    /// Take over the GPU VMs of `registry`'s device: its page-table region, its
    /// device-memory heap and its fault queue. One `Gpu` per device
    /// ([`Error::GpuVmBusy`] otherwise); [`Error::GpuVmUnsupported`] on a device without
    /// GPU virtual memory.
    pub fn open(registry: &Registry) -> Result<Gpu> {
        let _section = crate::driver_section::enter();
        let driver = registry.driver().clone();
        let dev: Arc<dyn Device> = driver.ring_device()?.clone();
        if dev.read32(regs::VM_CAPS) & 0xff == 0 {
            return Err(Error::GpuVmUnsupported {
                device: driver.name().to_string(),
            });
        }
        let key = Arc::as_ptr(&dev) as *const () as usize;
        let mut open = OPEN.lock().expect("gpu table poisoned");
        open.retain(|(_, w)| w.strong_count() > 0);
        if open.iter().any(|(k, _)| *k == key) {
            return Err(Error::GpuVmBusy {
                device: driver.name().to_string(),
            });
        }
        let hw = hw::Hw::new(dev);
        let r = hw.regions;
        let faults = fault::FaultQueue::new(&driver, &hw)?;
        let shared = Arc::new(GpuShared {
            registry: registry.clone(),
            pt_alloc: Mutex::new(IovaAllocator::new(&[r.pt_base..r.pt_base + r.pt_size])),
            devmem_alloc: Mutex::new(IovaAllocator::new(&[
                r.devmem_base..r.devmem_base + r.devmem_size
            ])),
            hw,
            vms: Mutex::new(VmTable {
                taken: [false; regs::MAX_VMS as usize + 1],
                vms: (0..=regs::MAX_VMS).map(|_| Weak::new()).collect(),
            }),
            faults,
            stop: AtomicBool::new(false),
        });
        open.push((key, Arc::downgrade(&shared)));
        drop(open);
        let s2 = shared.clone();
        let handler = std::thread::Builder::new()
            .name("userptr-gpu-faults".into())
            .spawn(move || {
                crate::driver_section::block_signals_for_thread();
                fault::run(&s2)
            })
            .map_err(|e| Error::sys("spawn(gpu fault handler)", e))?;
        Ok(Gpu {
            inner: Arc::new(GpuInner {
                shared,
                handler: Mutex::new(Some(handler)),
            }),
        })
    }

    /// A new VM.
    pub fn create_vm(&self, cfg: VmConfig) -> Result<GpuVm> {
        GpuVm::create(self.inner.clone(), cfg)
    }

    /// The registry VMs pin through.
    pub fn registry(&self) -> &Registry {
        &self.inner.shared.registry
    }

    /// Page-table pages in use on the device, over every VM.
    pub fn pt_pages_in_use(&self) -> u64 {
        let r = self.inner.shared.hw.regions;
        let free = self
            .inner
            .shared
            .pt_alloc
            .lock()
            .expect("page-table allocator poisoned")
            .free_bytes();
        (r.pt_size - free) / 4096
    }

    /// Fault records the handler thread has processed.
    pub fn faults_handled(&self) -> u64 {
        self.inner.shared.faults.handled()
    }
}

impl GpuInner {
    pub(super) fn take_vm_id(&self) -> Result<u32> {
        let mut t = self.shared.vms.lock().expect("vm table poisoned");
        let id = (1..=regs::MAX_VMS as usize)
            .find(|&i| !t.taken[i])
            .ok_or(Error::NoFreeVm {
                limit: regs::MAX_VMS,
            })?;
        t.taken[id] = true;
        Ok(id as u32)
    }

    pub(super) fn publish_vm(&self, id: u32, vm: Weak<vm::VmInner>) {
        let mut t = self.shared.vms.lock().expect("vm table poisoned");
        t.vms[id as usize] = vm;
    }

    pub(super) fn release_vm_id(&self, id: u32) {
        let mut t = self.shared.vms.lock().expect("vm table poisoned");
        t.taken[id as usize] = false;
        t.vms[id as usize] = Weak::new();
    }
}

impl Drop for GpuInner {
    fn drop(&mut self) {
        // Release: the handler loads `stop` with Acquire.
        self.shared.stop.store(true, Ordering::Release);
        self.shared.faults.wake();
        let h = self.handler.lock().expect("handler lock poisoned").take();
        if let Some(h) = h {
            // The last VM may be dropped by the handler itself (it holds one while it
            // resolves a fault): it then exits on its own.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for GpuShared {
    fn drop(&mut self) {
        self.faults.shutdown(&self.registry, &self.hw);
    }
}
