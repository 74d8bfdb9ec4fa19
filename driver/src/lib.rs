//! userptr-driver: map ordinary process memory into a device's IOMMU domain and drive
//! the device through command rings.
//!
//! # Layout
//!
//! One folder per concern, one concept per file. Arrows run downwards only: a module
//! uses the modules of its own layer and of the layers below, never one above
//! (`tests/layering.rs` checks it).
//!
//! ```text
//!   bo/                      buffer objects: VRAM or system memory, CPU-mapped, migrating
//!     │
//!   monitor/                 address-space monitors feeding the registry
//!     │        gpuvm/        GPU VMs: page tables mirroring the registry's ranges
//!     │
//!   registry/                epochs, invalidation, pin cache
//!     │        reference/    the reference device      vfio/   real devices through VFIO
//!     │            │                                     │
//!   the core: driver, queue, submitter, mapping, backing, device, iommu, iova,
//!             dma_memory, driver_section, fork, proc_status, error
//!     │
//!   userptr-ring             the ring protocol and the register map, both ends
//! ```
//!
//! The shared core (the root of this crate):
//! * [`driver`]: the [`Driver`] handle: a device, its domain, its IOVA space;
//! * [`queue`]: [`CommandQueue`], the driver end of a command ring;
//! * [`submitter`]: [`Submitter`] and [`FenceTracker`], what every device queue
//!   implements for whoever drives it (the registry);
//! * [`mapping`]: [`UserMapping`], ordinary memory pinned and mapped at an IOVA;
//! * [`backing`]: which memory may be pinned (the file-side policy: shared memory only
//!   from sealed memfds);
//! * [`device`]: the [`Device`] trait (registers, domain, interrupts);
//! * [`iommu`]: the [`IommuDomain`] trait every IOMMU backend implements;
//! * [`iova`]: IOVA space allocation;
//! * [`dma_memory`]: driver-owned DMA memory for ring structures;
//! * [`driver_section`]: which address-space calls are the driver's own;
//! * [`trampoline`]: the driver's own syscall instructions, which no monitor traps;
//! * [`fork`]: the fork policy and its atfork handler;
//! * [`proc_status`]: pinned-memory accounting (`VmPin`, `RLIMIT_MEMLOCK`);
//! * [`error`]: the [`Error`] type.
//!
//! The wings:
//! * [`mod@reference`]: the reference device: its register file, the io_uring IOMMU
//!   (real kernel pins), VRAM in a memfd, pin fault injection, the engine thread;
//! * [`vfio`]: real devices through VFIO: the type1v2 domain, PCI functions, the IOMMU
//!   fault log, the sysfs model (`vfio::pci`), and the drivers that run on a
//!   function: NVMe (`vfio::nvme`) and QEMU's edu (`vfio::edu`);
//! * [`registry`]: the userptr registry: the notifier contract, the cause policy,
//!   pinning, merging and splitting, eviction;
//! * [`monitor`]: address-space monitors (seccomp trap, userfaultfd, LD_PRELOAD);
//! * [`gpuvm`]: GPU virtual memory on a device with VM contexts (the reference
//!   device's register map 1.1): page tables in device memory mirroring userptrs,
//!   device memory and (SVM) the process's own address space, invalidated through the
//!   registry's mirror hook, with replayable faults;
//! * [`bo`]: buffer objects on a GPU-VM device: allocated in VRAM or system memory,
//!   evicted least recently used first, mapped into the process at one fixed CPU
//!   range for their life, migrated by the device's COPY while a `SIGSEGV` handler
//!   holds CPU accesses until the move is over (seed 003).
//!
//! `unsafe` lives only in the modules that own one kernel interface each:
//! `reference::uring_iommu` (io_uring), `dma_memory` and `reference::vram` (mmap),
//! `gpuvm::populate` (the access check, `madvise(MADV_POPULATE_*)`),
//! `bo::fault` (`sigaction`, `futex`), `bo::cpu_map` (the fixed CPU range: `mmap`,
//! `mprotect`, and the slice views of it in `bo::object`), `bo::sysmem` (a BO's memfd
//! mapping),
//! `fork` (pthread_atfork), `trampoline` (the driver's syscall instructions),
//! `backing::vma` (the `PROCMAP_QUERY` ioctl on `/proc/self/maps`),
//! `monitor::seccomp` (seccomp, signals, the syscall
//! trampoline), `monitor::uffd` (userfaultfd), `vfio::domain` (VFIO IOMMU ioctls) and
//! `vfio::device` (the device fd: BAR mmap, MMIO, `VFIO_DEVICE_RESET`). Every `unsafe`
//! block carries its `// SAFETY:` note (`clippy::undocumented_unsafe_blocks` is denied
//! workspace-wide, and so is `unsafe_op_in_unsafe_fn`).

#![deny(missing_docs)]
// IOVA ranges are lists of `Range`s; a list with one range is not a mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod backing;
pub mod bo;
pub mod device;
pub mod dma_memory;
pub mod driver;
pub mod driver_section;
pub mod error;
pub mod fork;
pub mod gpuvm;
pub mod iommu;
pub mod iova;
pub mod mapping;
pub mod monitor;
pub mod proc_status;
pub mod queue;
pub mod reference;
pub mod registry;
pub mod submitter;
pub mod trampoline;
pub mod vfio;

/// The element-type bounds of the slice entry points ([`Driver::map_slice`],
/// [`Registry::register_slice`]): `Pod`-like types the device may read and write.
pub use bytemuck;
pub use device::Device;
pub use driver::Driver;
pub use error::{Error, Result};
pub use gpuvm::{Binding, Gpu, GpuVm, GpuVmStats, VmConfig};
pub use iommu::{IommuDomain, Perm};
pub use mapping::UserMapping;
pub use queue::{Backpressure, BatchFences, CommandQueue, CompletionExt, QueueCore, WaitMode};
pub use reference::fault_injection::PinFaults;
pub use reference::uring_iommu::UringIommuConfig;
pub use reference::{ReferenceConfig, ReferenceDevice};
pub use registry::{
    Cause, Invalidation, RegionInfo, RegionObserver, Registry, RegistryConfig, StatsSnapshot,
    Userptr, CAUSE_NAMES,
};
pub use submitter::{FenceTracker, Submitter};
