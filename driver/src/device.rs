//! The device abstraction: what a queue needs from a device that speaks the userptr
//! ring protocol: a register window (BAR0), an IOMMU domain, and interrupts delivered
//! to eventfds (as VFIO delivers MSI-X).

use crate::error::Result;
use crate::iommu::IommuDomain;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// A device with the reference register map (see [`userptr_ring::regs`]).
pub trait Device: Send + Sync {
    /// A short description for messages.
    fn name(&self) -> String;

    /// The IOMMU domain the device reaches host memory through.
    fn domain(&self) -> Arc<dyn IommuDomain>;

    /// Read a BAR0 register. Acquire semantics.
    fn read32(&self, offset: u32) -> u32;

    /// Write a BAR0 register. Release semantics; side effects (a doorbell) take effect
    /// before the call returns, as a posted MMIO write reaching the device would.
    fn write32(&self, offset: u32, value: u32);

    /// Deliver ring `ring`'s interrupt to `eventfd` (or nowhere).
    fn set_irq_eventfd(&self, ring: u32, eventfd: Option<Arc<OwnedFd>>) -> Result<()>;
}
