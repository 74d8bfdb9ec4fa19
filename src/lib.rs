//! # userptr
//!
//! Map ordinary process memory (a `Vec`, a `malloc` block, an `mmap`) into a device's
//! IOMMU domain with VFIO type1 semantics (pages are pinned at map time), keep those
//! mappings coherent while the program changes its address space, and drive the device
//! through command rings.
//!
//! This facade re-exports the public API of the workspace crates:
//! * [`ring`] (`userptr-ring`): the command ring protocol, both ends;
//! * [`driver`] (`userptr-driver`): IOMMU domains, the reference device, queues,
//!   mappings, the registry and its monitors; its main types are re-exported at the
//!   top level.
//!
//! # The working order: a registry, a monitor, a submission
//!
//! A [`Registry`] keeps pinned regions of process memory for the device, reuses them
//! across submissions, and is told about every address-space change (`munmap`,
//! destructive `madvise`, `mremap`, `mprotect`, `fork`) that touches them by a
//! *monitor*, which invalidates the range first (waiting for the device work that may
//! reach it). [`Registry::submit`] resolves each registration to its current device
//! address (pinning again what an invalidation dropped) and never submits a stale one.
//!
//! ```
//! use std::time::Duration;
//! use userptr::driver::monitor::seccomp::SeccompMonitor;
//! use userptr::{Descriptor, Driver, Registry, RegistryConfig, WaitMode};
//!
//! // 1. The device (here the embedded reference device), a ring, a registry.
//! let drv = Driver::reference()?;
//! let q = drv.queue(0, 64)?; // ring 0, 64 slots
//! let reg = Registry::new(drv.clone(), RegistryConfig::default());
//!
//! // 2. A monitor, before the program's other threads exist: from here on, the
//! //    process's munmap / madvise / mremap / mprotect calls on registered memory are
//! //    seen (a seccomp trap) and invalidate it first. (It stays installed for the rest
//! //    of the process: rustdoc runs each doc test as a process of its own.)
//! let monitor = SeccompMonitor::install(&reg)?;
//!
//! // 3. Register the buffers. `register_slice` borrows `y` mutably for as long as the
//! //    registration lives, `register_slice_ref` borrows `x` shared (device reads only).
//! let n = 1 << 20;
//! let x = vec![1.0f32; n];
//! let mut y = vec![2.0f32; n];
//! let ux = reg.register_slice_ref(&x)?;
//! let uy = reg.register_slice(&mut y)?;
//!
//! // 4. Submit: the closure gets the registrations' device addresses now.
//! let f = reg.submit(&q, &[&ux, &uy], |iova| {
//!     vec![Descriptor::saxpy(3.0, iova[0], iova[1], n as u64)] // y = 3x + y
//! })?;
//! // Waiting is `Err` if any command of the batch failed (a DMA fault, a reset...).
//! q.wait_batch(f, WaitMode::Block, Duration::from_secs(30))?;
//!
//! // 5. Hand `y` back: unregistering waits for any device work left on it and unpins
//! //    it (dropping `uy` does the same, logging an error instead of returning it).
//! reg.unregister(uy)?;
//! assert!(y.iter().all(|&v| v == 5.0));
//! drop(ux);
//! monitor.stop();
//! # Ok::<(), userptr::Error>(())
//! ```
//!
//! Without a monitor, tell the registry yourself around each change
//! ([`Registry::invalidate_start`] / [`Registry::invalidate_end`]), or do not change
//! registered memory while it is registered. `examples/` has these as programs
//! (`cargo run --example registry_monitor`, `mapping`, `errors`, `nvme_vfio`).
//!
//! # A plain mapping
//!
//! [`Driver::map_slice`] maps a slice for the device (no cache, no monitor) and
//! borrows it until the mapping is dropped; dropping unmaps it, and the unmap waits for
//! the device's transfers in flight.
//!
//! ```
//! use userptr::{Descriptor, Driver};
//! let drv = Driver::reference()?;
//! let q = drv.queue(0, 64)?;
//! let mut buf = vec![0u8; 1 << 20];
//! let m = drv.map_slice(&mut buf)?;
//! q.run(Descriptor::fill(m.iova(), m.len(), 0xab))?; // submit, wait, check the status
//! drop(m); // ends the borrow: `buf` is the program's again
//! assert!(buf.iter().all(|&b| b == 0xab));
//! # Ok::<(), userptr::Error>(())
//! ```
//!
//! # Errors, and a failed command
//!
//! Every error is a [`Error`] variant (bad ranges, memory the kernel will not pin,
//! limits, a full ring, timeouts, a device reset, a monitor that cannot run here: the
//! message names the cause). A command the device did not complete OK is
//! [`Error::Command`], with its status and fault record, from
//! [`QueueCore::wait`], [`QueueCore::wait_batch`]
//! (any command of the batch) and [`QueueCore::run`];
//! [`QueueCore::wait_completion`] returns the raw
//! [`Completion`] whatever its status, for diagnostics.
//!
//! ```
//! use std::time::Duration;
//! use userptr::{AccessKind, Descriptor, Driver, Error, Registry, RegistryConfig, Status, WaitMode};
//! let drv = Driver::reference()?;
//! let q = drv.queue(0, 8)?;
//! let reg = Registry::new(drv.clone(), RegistryConfig::default());
//! let table = vec![7u8; 4096];
//! let ro = reg.register_slice_ref(&table)?; // the device may read it, not write it
//! let f = reg.submit(&q, &[&ro], |iova| vec![Descriptor::fill(iova[0], 4096, 0)])?;
//! match q.wait_batch(f, WaitMode::Block, Duration::from_secs(10)) {
//!     Err(Error::Command { status: Status::DmaFault, fault: Some(fault), .. }) => {
//!         assert_eq!(fault.access, AccessKind::Write); // blocked by the IOMMU
//!     }
//!     other => panic!("expected a DMA fault, got {other:?}"),
//! }
//! assert!(table.iter().all(|&b| b == 7));
//! # Ok::<(), userptr::Error>(())
//! ```
//!
//! # Raw addresses are `unsafe`
//!
//! [`Driver::map_user`] and [`Registry::register`] take an address and a length (memory
//! no slice describes: an `mmap`, a `malloc` block from C). They are `unsafe fn`: the
//! caller promises what the slice borrow enforces: the range stays mapped with the same
//! pages (or, for a registration, a monitor or explicit invalidation is told about each
//! change), and the program does not race the device's access to it while a command
//! that may reach it runs; their `# Safety` sections say it exactly. A raw registration
//! is `'static` and keeps its pin cached when dropped (the lazy-unpin cache), until
//! [`Registry::unregister`], [`Registry::clear`] or an invalidation.
//!
//! # What the borrow checker refuses
//!
//! A buffer the device may write cannot be read, written or dropped while the mapping
//! or registration that borrows it lives:
//!
//! ```compile_fail,E0502
//! # use userptr::{Descriptor, Driver};
//! # let drv = Driver::reference().unwrap();
//! # let q = drv.queue(0, 8).unwrap();
//! let mut buf = vec![0u8; 4096];
//! let m = drv.map_slice(&mut buf).unwrap();
//! let f = q.submit(Descriptor::fill(m.iova(), 4096, 1), userptr::Backpressure::Wait).unwrap();
//! println!("{}", buf[0]); // the device may be writing it: does not compile
//! drop(m);
//! ```
//!
//! ```compile_fail,E0505
//! # use userptr::{Registry, RegistryConfig, Driver};
//! # let drv = Driver::reference().unwrap();
//! # let reg = Registry::new(drv.clone(), RegistryConfig::default());
//! let mut buf = vec![0u8; 4096];
//! let u = reg.register_slice(&mut buf).unwrap();
//! drop(buf); // freeing memory the device may still write: does not compile
//! drop(u);
//! ```
//!
//! ```compile_fail,E0597
//! # use userptr::{Registry, RegistryConfig, Driver};
//! # let drv = Driver::reference().unwrap();
//! # let reg = Registry::new(drv.clone(), RegistryConfig::default());
//! let u;
//! {
//!     let mut buf = vec![0u8; 4096];
//!     u = reg.register_slice(&mut buf).unwrap(); // does not compile: `buf` dies first
//! }
//! drop(u);
//! ```
//!
//! A buffer the device reads cannot be written meanwhile:
//!
//! ```compile_fail,E0502
//! # use userptr::{Registry, RegistryConfig, Driver};
//! # let drv = Driver::reference().unwrap();
//! # let reg = Registry::new(drv.clone(), RegistryConfig::default());
//! let mut src = vec![0u8; 4096];
//! let u = reg.register_slice_ref(&src).unwrap();
//! src[0] = 1; // the device may be reading it: does not compile
//! drop(u);
//! ```
//!
//! A registration that borrows its buffer cannot be cloned (two handles would each
//! unregister it); only a raw, `'static` one can:
//!
//! ```compile_fail,E0597
//! # use userptr::{Registry, RegistryConfig, Driver};
//! # let drv = Driver::reference().unwrap();
//! # let reg = Registry::new(drv.clone(), RegistryConfig::default());
//! let mut buf = vec![0u8; 4096];
//! let u = reg.register_slice(&mut buf).unwrap();
//! let twin = u.clone(); // does not compile: `Clone` is for `Userptr<'static>` only
//! # drop((u, twin));
//! ```
//!
//! The device may write any bytes: an element type with invalid bit patterns
//! (`bool`, `char`, references, enums) or with padding cannot be handed over:
//!
//! ```compile_fail,E0277
//! # use userptr::Driver;
//! # let drv = Driver::reference().unwrap();
//! let mut flags = vec![false; 4096];
//! let m = drv.map_slice(&mut flags[..]).unwrap(); // `bool` is not `AnyBitPattern`
//! ```
//!
//! ```compile_fail,E0277
//! # use userptr::Driver;
//! # let drv = Driver::reference().unwrap();
//! let byte = 0u8;
//! let mut refs = vec![&byte; 512];
//! let m = drv.map_slice(&mut refs[..]).unwrap(); // a device-written `&u8` is not a reference
//! ```
//!
//! Element types of your own derive [`bytemuck::Pod`] (re-exported as
//! [`bytemuck`]).
//!
//! ## What the borrow does not cover: leaking the handle
//!
//! `std::mem::forget` on a [`UserMapping`] or a borrowed [`Userptr`] ends the borrow
//! without unmapping: the device address stays mapped (and pinned) although the
//! program owns the memory again. Nothing this crate submits on its own reaches it,
//! but a raw [`Descriptor`] naming that device address would: do not leak these
//! handles (drop them, or [`UserMapping::unmap`] / [`Registry::unregister`]).

#![deny(missing_docs)]

pub use userptr_driver as driver;
pub use userptr_ring as ring;

pub use userptr_driver::bytemuck;
pub use userptr_driver::{
    proc_status, Backpressure, BatchFences, Cause, CommandQueue, CompletionExt, Device, Driver,
    Error, Invalidation, IommuDomain, Perm, PinFaults, QueueCore, ReferenceConfig, ReferenceDevice,
    Registry, RegistryConfig, Result, StatsSnapshot, UringIommuConfig, UserMapping, Userptr,
    WaitMode, CAUSE_NAMES,
};
pub use userptr_ring::{
    AccessKind, Completion, Descriptor, FaultRecord, Fence, Flags, Opcode, Status,
};
