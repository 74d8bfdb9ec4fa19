//! The userptr command ring protocol, both ends.
//!
//! A command ring is a pair of queues living in DMA-able host memory that the device
//! reaches through its IOMMU like any other buffer:
//!
//! * the **submission queue** (SQ): an array of fixed-size, versioned [`Descriptor`]s
//!   (64 bytes each) written by the driver (producer) and fetched by the device
//!   (consumer);
//! * the **completion queue** (CQ): an array of [`Completion`] entries (32 bytes each)
//!   written by the device (producer) and read by the driver (consumer), one per
//!   descriptor, carrying a per-command [`Status`] and, on a DMA fault, a
//!   [`FaultRecord`];
//! * a **fence word**: the device writes the seqno of the last completed descriptor
//!   into a fence page by DMA, so "has command N finished" is one load (see [`Fence`]).
//!
//! Modules:
//! * [`descriptor`]: the descriptor layout, opcodes, encoding and validation;
//! * [`completion`]: completion entries, statuses, fault records;
//! * [`index`]: the producer/consumer index protocol (free-running `u32` head and
//!   tail, power-of-two wraparound, acquire/release ordering) shared by both queues;
//! * [`fence`]: fence seqnos and their ordering;
//! * [`regs`]: the device's BAR0 register map, through which a driver programs the
//!   rings and rings their doorbells (the reference device implements it; a hardware
//!   implementation would too).
//!
//! The crate is pure protocol: it owns no memory and no threads. The driver
//! (`userptr-driver`) places the queues in mapped memory and implements the doorbell
//! for each device. Both ends import from here, so the register map sits below the
//! driver's queue and the device model alike.

#![deny(missing_docs)]

pub mod completion;
pub mod descriptor;
pub mod fence;
pub mod index;
pub mod regs;

pub use completion::{AccessKind, Completion, FaultRecord, Status, COMPLETION_SIZE};
pub use descriptor::{
    Descriptor, DescriptorError, Flags, Opcode, DESCRIPTOR_SIZE, DESCRIPTOR_VERSION,
};
pub use fence::Fence;
pub use index::{
    Consumer, Counter, Geometry, GeometryError, IndexError, IndexRefs, Producer, RingIndices,
    SharedIndices,
};
