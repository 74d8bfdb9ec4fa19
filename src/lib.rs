//! # userptr
//!
//! Map ordinary process memory (a `Vec`, a `malloc` block, an `mmap`) into a device's
//! IOMMU domain with VFIO type1 semantics (pages are pinned at map time), and drive the
//! device through command rings.
//!
//! This facade re-exports the public API of the workspace crates:
//! * [`ring`] (`userptr-ring`): the command ring protocol, both ends;
//! * [`driver`] (`userptr-driver`): IOMMU domains, the reference device, queues and
//!   mappings; its main types are re-exported at the top level.
//!
//! ```no_run
//! use userptr::{Driver, Descriptor};
//! let drv = Driver::reference()?;
//! let q = drv.queue(0, 64)?;
//! let mut buf = vec![0u8; 1 << 20];
//! let m = drv.map_slice(&mut buf)?;
//! q.run(Descriptor::fill(m.iova(), m.len(), 0xab))?;
//! drop(m);
//! assert!(buf.iter().all(|&b| b == 0xab));
//! # Ok::<(), userptr::Error>(())
//! ```

#![deny(missing_docs)]

pub use userptr_driver as driver;
pub use userptr_ring as ring;

pub use userptr_driver::{
    proc_status, Backpressure, BatchFences, Cause, CommandQueue, CompletionExt, Device, Driver,
    Error, Invalidation, IommuDomain, Perm, PinFaults, ReferenceConfig, ReferenceDevice, Registry,
    RegistryConfig, Result, StatsSnapshot, UringIommuConfig, UserMapping, Userptr, WaitMode,
    CAUSE_NAMES,
};
pub use userptr_ring::{
    AccessKind, Completion, Descriptor, FaultRecord, Fence, Flags, Opcode, Status,
};
