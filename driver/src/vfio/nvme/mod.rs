//! An NVMe controller driven over VFIO: the ring engine of a device nobody here wrote.
//!
//! This is the proof that the library's ring path is not shaped around its own
//! reference device: the same `Registry` (pin cache, epochs,
//! invalidation waits) drives NVMe I/O queues whose data pointers (PRPs) are userptr
//! IOVAs, through the [`Submitter`](crate::Submitter)/[`FenceTracker`](crate::FenceTracker) traits.
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
//!   and [`FenceTracker::is_done`](crate::FenceTracker::is_done) answers for every batch up to a sequence number;
//! * a DMA write the IOMMU blocked completes "successfully" on the device's side:
//!   [`IoQueue::wait`] checks each claimed data command against the IOMMU faults the
//!   kernel logged ([`crate::vfio::faults`]) and reports a hit as
//!   [`Error::NvmeIommuFault`](crate::Error::NvmeIommuFault);
//! * [`FenceTracker::abort`](crate::FenceTracker::abort) disables the controller (`CC.EN = 0`): the spec's
//!   controller reset, after which no queued command is processed; the queues are
//!   then dead and report it.
//!
//! Not done: namespaces other than the first active one, SGLs, multiple controllers
//! behind one queue, and arbitration settings (the defaults serve).
//!
//! Files, one concept each: `controller` (bring-up, admin commands, creating queues,
//! reset), `pair` (a queue pair in DMA memory), `io_queue` (batches, completions,
//! waits, the registry's traits), `prp` (PRP lists), `command` (commands, completions,
//! status codes).

mod command;
mod controller;
mod io_queue;
mod pair;
mod prp;

pub use command::{status_text, Namespace, NvmeCommand, NvmeCompletion};
pub use controller::{ControllerInfo, Nvme};
pub use io_queue::{IoQueue, NvmeBatch};

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
