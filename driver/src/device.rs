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

    /// The CPU-mappable window onto device memory, if the device has one (the
    /// reference device's BAR2, a GPU's large BAR). `None` by default.
    fn aperture(&self) -> Option<Aperture> {
        None
    }
}

/// A CPU-mappable window onto device memory: a BAR region. `mmap(MAP_SHARED)` of
/// `fd` at file offset `file_offset + x` shows the CPU the device memory at VRAM
/// offset `vram_base + x`, for `x < len`. On the reference device `fd` is its VRAM
/// memfd (datasheet section 11); through VFIO it is the device fd at the BAR's region
/// offset (`VFIO_DEVICE_GET_REGION_INFO`): `VfioPci::aperture` in the `vfio` module.
#[derive(Clone, Debug)]
pub struct Aperture {
    /// The file to map.
    pub fd: Arc<OwnedFd>,
    /// File offset of the aperture's first byte.
    pub file_offset: u64,
    /// VRAM offset the aperture's first byte shows.
    pub vram_base: u64,
    /// Bytes of device memory the aperture shows.
    pub len: u64,
}
