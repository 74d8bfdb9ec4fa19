//! userptr-driver: map ordinary process memory into a device's IOMMU domain and drive
//! the device through command rings.
//!
//! Modules, each one concept:
//! * [`driver`]: the [`Driver`] handle: a device, its domain, its IOVA space;
//! * [`mapping`]: [`UserMapping`], ordinary memory pinned and mapped at an IOVA;
//! * [`queue`]: [`CommandQueue`], the driver end of a command ring;
//! * [`iommu`]: the [`IommuDomain`] trait every IOMMU backend implements;
//! * [`iova`]: IOVA space allocation;
//! * [`device`]: the [`Device`] trait (registers, domain, interrupts);
//! * [`regs`]: the reference device's BAR0 register map (the device ABI);
//! * [`reference`]: the reference device: io_uring IOMMU, memfd VRAM, engine thread;
//! * [`uring_iommu`]: the IOMMU built on io_uring fixed buffers (real kernel pins);
//! * [`fault_injection`]: [`PinFaults`], failing the reference IOMMU's pin attempts on
//!   purpose (`userptr torture --inject`);
//! * [`vram`]: device-local memory (memfd);
//! * [`dma_memory`]: driver-owned DMA memory for ring structures;
//! * [`proc_status`]: pinned-memory accounting (`VmPin`, `RLIMIT_MEMLOCK`);
//! * [`registry`]: the userptr registry: epochs, invalidation, pin cache;
//! * [`monitor`]: address-space monitors (seccomp trap, userfaultfd) feeding the registry;
//! * [`pci`]: PCI devices in sysfs, their VFIO readiness, binding to vfio-pci and back;
//! * [`vfio`]: real devices through VFIO: the type1v2 IOMMU domain, PCI functions
//!   (BARs, config space, interrupts, reset), IOMMU faults from the kernel log;
//! * [`nvme`]: an NVMe controller over VFIO, its I/O queues driven by the registry;
//! * [`edu`]: QEMU's edu DMA device, for bring-up checks;
//! * [`fork`]: the fork policy and its atfork handler;
//! * [`error`]: the [`Error`] type.
//!
//! `unsafe` lives only in the modules that own one kernel interface each:
//! `uring_iommu` (io_uring), `dma_memory` and `vram` (mmap), `fork` (pthread_atfork),
//! `monitor::seccomp` (seccomp, signals, the syscall trampoline), `monitor::uffd`
//! (userfaultfd), `vfio::domain` (VFIO IOMMU ioctls) and `vfio::device` (the device
//! fd: BAR mmap, MMIO, `VFIO_DEVICE_RESET`).

// IOVA ranges are lists of `Range`s; a list with one range is not a mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod device;
pub mod dma_memory;
pub mod driver;
pub mod driver_section;
pub mod error;
pub mod fork;
pub mod iommu;
pub mod iova;
pub mod mapping;
pub mod monitor;
pub mod proc_status;
pub mod queue;
pub mod reference;
pub mod registry;
pub mod submitter;
pub mod vfio;

pub use device::Device;
pub use driver::Driver;
pub use error::{Error, Result};
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
