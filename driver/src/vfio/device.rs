//! [`VfioPci`]: one PCI function bound to vfio-pci, opened into a [`VfioDomain`].
//!
//! * Regions: BARs 0–5 and PCI config space, read and written with `pread`/`pwrite`
//!   on the device fd at the region's offset (`vfio-ioctls`' own region accessors
//!   only log failures; a driver needs the errno). A BAR whose region has
//!   `VFIO_REGION_INFO_FLAG_MMAP` can be mapped ([`VfioPci::map_bar`]) and accessed
//!   with volatile 32-bit loads and stores ([`Mmio`]).
//! * Bus mastering: vfio-pci leaves the command register's Bus Master bit clear; no
//!   DMA happens until [`VfioPci::enable_bus_master`].
//! * Interrupts: MSI-X, MSI or INTx delivered to eventfds (`VFIO_DEVICE_SET_IRQS`
//!   through `vfio-ioctls`).
//! * Function reset: `VFIO_DEVICE_RESET`.

use super::{domain::VfioDomain, sys_err, vfio_err};
use crate::error::{Error, Result};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

/// `VFIO_DEVICE_RESET`: `_IO(';', 100 + 11)`.
const VFIO_DEVICE_RESET: u32 = ((b';' as u32) << 8) | 111;

/// PCI command register and its bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_STATUS: u64 = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_CAPABILITY_LIST: u64 = 0x34;

/// One BAR as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR number (0–5).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Whether the region can be mmapped.
    pub mmap: bool,
    /// Readable through the device fd.
    pub read: bool,
    /// Writable through the device fd.
    pub write: bool,
}

/// An interrupt type of a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    /// Legacy line interrupt.
    Intx,
    /// MSI.
    Msi,
    /// MSI-X.
    Msix,
}

impl IrqKind {
    fn index(self) -> u32 {
        match self {
            IrqKind::Intx => VFIO_PCI_INTX_IRQ_INDEX,
            IrqKind::Msi => VFIO_PCI_MSI_IRQ_INDEX,
            IrqKind::Msix => VFIO_PCI_MSIX_IRQ_INDEX,
        }
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            IrqKind::Intx => "INTx",
            IrqKind::Msi => "MSI",
            IrqKind::Msix => "MSI-X",
        }
    }
}

/// A PCI function opened through VFIO.
pub struct VfioPci {
    bdf: String,
    dev: VfioDevice,
    domain: Arc<VfioDomain>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("bdf", &self.bdf)
            .finish_non_exhaustive()
    }
}

impl VfioPci {
    pub(super) fn open(domain: &Arc<VfioDomain>, bdf: &str) -> Result<Arc<VfioPci>> {
        let sysfs = PathBuf::from("/sys/bus/pci/devices").join(bdf);
        if !sysfs.exists() {
            return Err(Error::Vfio {
                op: "find device",
                device: bdf.to_string(),
                reason: format!("{} does not exist", sysfs.display()),
                errno: Some(libc::ENOENT),
                hint: "no PCI function at this address (`userptr list` shows them)",
            });
        }
        if !sysfs.join("iommu_group").exists() {
            return Err(Error::Vfio {
                op: "find group",
                device: bdf.to_string(),
                reason: "the device has no IOMMU group".into(),
                errno: None,
                hint: super::hint_for("find group", None, false),
            });
        }
        let ops: Arc<dyn vfio_ioctls::VfioOps> = domain.container().clone();
        let dev = VfioDevice::new(&sysfs, ops, false).map_err(|e| {
            let op = match e {
                vfio_ioctls::VfioError::OpenGroup(..) => "open group",
                vfio_ioctls::VfioError::GroupViable => "open group",
                vfio_ioctls::VfioError::ContainerSetIOMMU(_) => "set IOMMU type",
                _ => "open device",
            };
            vfio_err(op, bdf, e)
        })?;
        Ok(Arc::new(VfioPci {
            bdf: bdf.to_string(),
            dev,
            domain: domain.clone(),
        }))
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The domain the function's DMA goes through.
    pub fn domain(&self) -> &Arc<VfioDomain> {
        &self.domain
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the device fd is open for as long as `self.dev` lives, which
        // outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.dev.as_raw_fd()) }
    }

    /// The BARs that exist (size > 0).
    pub fn bars(&self) -> Vec<BarInfo> {
        (0..6)
            .filter_map(|i| {
                let size = self.dev.get_region_size(i);
                let flags = self.dev.get_region_flags(i);
                (size > 0).then_some(BarInfo {
                    index: i,
                    size,
                    mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
                    read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
                    write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
                })
            })
            .collect()
    }

    fn region_bounds(&self, index: u32, off: u64, len: usize) -> Result<u64> {
        let size = self.dev.get_region_size(index);
        if off.checked_add(len as u64).is_none_or(|e| e > size) {
            return Err(Error::Vfio {
                op: "region access",
                device: self.bdf.clone(),
                reason: format!(
                    "{len} bytes at {off:#x} are outside region {index} ({size:#x} bytes)"
                ),
                errno: Some(libc::EINVAL),
                hint: "`userptr info BDF` lists the regions and their sizes",
            });
        }
        Ok(self.dev.get_region_offset(index) + off)
    }

    /// Read `buf.len()` bytes of region `index` at `off`.
    pub fn region_read(&self, index: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.region_bounds(index, off, buf.len())?;
        let n = rustix::io::pread(self.fd(), &mut *buf, at)
            .map_err(|e| sys_err("region read", &self.bdf, e.into()))?;
        if n != buf.len() {
            return Err(sys_err(
                "region read",
                &self.bdf,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    /// Write `buf` to region `index` at `off`.
    pub fn region_write(&self, index: u32, off: u64, buf: &[u8]) -> Result<()> {
        let at = self.region_bounds(index, off, buf.len())?;
        let n = rustix::io::pwrite(self.fd(), buf, at)
            .map_err(|e| sys_err("region write", &self.bdf, e.into()))?;
        if n != buf.len() {
            return Err(sys_err(
                "region write",
                &self.bdf,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    /// Read a config-space byte.
    pub fn config_read8(&self, off: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)?;
        Ok(b[0])
    }

    /// Read a config-space half-word.
    pub fn config_read16(&self, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Read a config-space word.
    pub fn config_read32(&self, off: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Write a config-space half-word.
    pub fn config_write16(&self, off: u64, v: u16) -> Result<()> {
        self.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
    }

    /// Vendor and device id.
    pub fn ids(&self) -> Result<(u16, u16)> {
        Ok((self.config_read16(0)?, self.config_read16(2)?))
    }

    /// Set Memory Space and Bus Master in the command register: without Bus Master
    /// the function cannot DMA (vfio-pci leaves it clear).
    pub fn enable_bus_master(&self) -> Result<()> {
        let cmd = self.config_read16(PCI_COMMAND)?;
        self.config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    }

    /// Clear Bus Master: the function can no longer DMA.
    pub fn disable_bus_master(&self) -> Result<()> {
        let cmd = self.config_read16(PCI_COMMAND)?;
        self.config_write16(PCI_COMMAND, cmd & !PCI_COMMAND_MASTER)
    }

    /// The standard capability list: (capability id, config offset).
    pub fn capabilities(&self) -> Result<Vec<(u8, u8)>> {
        let mut caps = Vec::new();
        if self.config_read16(PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
            return Ok(caps);
        }
        let mut at = self.config_read8(PCI_CAPABILITY_LIST)? & !3;
        // At most 48 capabilities fit in 256 bytes of config space: a bound that
        // also stops a looping list.
        while at >= 0x40 && caps.len() < 48 {
            let id = self.config_read8(at as u64)?;
            caps.push((id, at));
            at = self.config_read8(at as u64 + 1)? & !3;
        }
        Ok(caps)
    }

    /// How many vectors of `kind` the function has (0: none).
    pub fn irq_count(&self, kind: IrqKind) -> u32 {
        self.dev.get_irq_info(kind.index()).map_or(0, |i| i.count)
    }

    /// Deliver vectors `0..fds.len()` of `kind` to `fds`.
    pub fn enable_irqs(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<()> {
        let have = self.irq_count(kind);
        if have == 0 || (have as usize) < fds.len() {
            return Err(Error::Vfio {
                op: "VFIO_DEVICE_SET_IRQS",
                device: self.bdf.clone(),
                reason: format!("{} vectors asked, {have} available", fds.len()),
                errno: Some(libc::EINVAL),
                hint: "the function has fewer vectors of this kind; try MSI or INTx",
            });
        }
        self.dev
            .enable_irq(kind.index(), fds.to_vec())
            .map_err(|e| vfio_err("VFIO_DEVICE_SET_IRQS", &self.bdf, e))?;
        if kind == IrqKind::Intx {
            // INTx is level-triggered and starts masked after each delivery.
            self.dev
                .unmask_irq(kind.index())
                .map_err(|e| vfio_err("VFIO_DEVICE_SET_IRQS (unmask)", &self.bdf, e))?;
        }
        Ok(())
    }

    /// Stop delivering `kind`.
    pub fn disable_irqs(&self, kind: IrqKind) -> Result<()> {
        self.dev
            .disable_irq(kind.index())
            .map_err(|e| vfio_err("VFIO_DEVICE_SET_IRQS (disable)", &self.bdf, e))
    }

    /// Unmask INTx after handling one (it masks itself on delivery).
    pub fn unmask_intx(&self) -> Result<()> {
        self.dev
            .unmask_irq(VFIO_PCI_INTX_IRQ_INDEX)
            .map_err(|e| vfio_err("VFIO_DEVICE_SET_IRQS (unmask)", &self.bdf, e))
    }

    /// Function-level reset (`VFIO_DEVICE_RESET`).
    pub fn reset(&self) -> Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is this device's.
        let rc = unsafe { libc::ioctl(self.dev.as_raw_fd(), VFIO_DEVICE_RESET as _) };
        if rc < 0 {
            return Err(sys_err(
                "VFIO_DEVICE_RESET",
                &self.bdf,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// BAR `index` as a CPU-mappable [`Aperture`](crate::device::Aperture) onto device
    /// memory (a GPU's large BAR, an NVMe controller memory buffer): the device fd (a
    /// duplicate, which keeps the function open while the aperture lives) at the
    /// region's offset, `vram_base` 0 (the aperture shows the BAR from its first byte).
    /// The CPU mapping code of buffer objects maps it exactly as it maps the reference
    /// device's VRAM memfd (`mmap(MAP_SHARED | MAP_FIXED)` at `file_offset + x`).
    ///
    /// Refused, before anything is mapped, for a BAR that does not exist, is not
    /// memory space, is not prefetchable (registers, where a CPU mapping's reads have
    /// side effects), or that vfio-pci does not let the process mmap.
    pub fn aperture(&self, index: u32) -> Result<crate::device::Aperture> {
        let refuse = |reason: String| Error::Vfio {
            op: "BAR aperture",
            device: self.bdf.clone(),
            reason,
            errno: Some(libc::EINVAL),
            hint: "`userptr info BDF` lists the BARs; an aperture is a prefetchable \
                   memory BAR that can be mmapped",
        };
        if index > 5 {
            return Err(refuse(format!("BAR {index} does not exist (0..=5)")));
        }
        let size = self.dev.get_region_size(index);
        let flags = self.dev.get_region_flags(index);
        if size == 0 {
            return Err(refuse(format!("BAR {index} is not implemented")));
        }
        let bar = self.config_read32(0x10 + 4 * index as u64)?;
        if bar & 1 != 0 {
            return Err(refuse(format!("BAR {index} is I/O space")));
        }
        if bar & (1 << 3) == 0 {
            return Err(refuse(format!(
                "BAR {index} ({size:#x} bytes) is not prefetchable: registers, not memory"
            )));
        }
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(refuse(format!(
                "vfio-pci does not let BAR {index} ({size:#x} bytes) be mmapped"
            )));
        }
        let fd = self
            .fd()
            .try_clone_to_owned()
            .map_err(|e| sys_err("dup(device fd)", &self.bdf, e))?;
        Ok(crate::device::Aperture {
            fd: Arc::new(fd),
            file_offset: self.dev.get_region_offset(index),
            vram_base: 0,
            len: size,
        })
    }

    /// mmap BAR `index` for register access.
    pub fn map_bar(self: &Arc<Self>, index: u32) -> Result<Mmio> {
        if index > 5 {
            return Err(Error::Vfio {
                op: "mmap BAR",
                device: self.bdf.clone(),
                reason: format!("BAR {index} does not exist (0..=5)"),
                errno: Some(libc::EINVAL),
                hint: "`userptr info BDF` lists the BARs",
            });
        }
        let size = self.dev.get_region_size(index);
        let flags = self.dev.get_region_flags(index);
        if size == 0 || flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(Error::Vfio {
                op: "mmap BAR",
                device: self.bdf.clone(),
                reason: format!("BAR {index} ({size:#x} bytes) cannot be mmapped"),
                errno: Some(libc::EINVAL),
                hint: "use region_read/region_write for this BAR",
            });
        }
        let off = self.dev.get_region_offset(index);
        // SAFETY: a fresh shared mapping of the device fd at the region's offset,
        // placed by the kernel (aliases nothing of ours); unmapped in Mmio::drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                size as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                self.fd().as_fd(),
                off,
            )
        }
        .map_err(|e| sys_err("mmap BAR", &self.bdf, e.into()))?;
        Ok(Mmio {
            ptr: ptr.cast(),
            len: size as usize,
            _dev: self.clone(),
        })
    }
}

/// An mmapped BAR: 32-bit volatile register access. Holds the device open (closing
/// it would reset the function under the mapping).
pub struct Mmio {
    ptr: *mut u8,
    len: usize,
    _dev: Arc<VfioPci>,
}

// SAFETY: the mapping is device memory accessed only with volatile loads and stores
// of whole registers; the device serialises concurrent accesses itself.
unsafe impl Send for Mmio {}
// SAFETY: as above.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Size of the BAR in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the BAR is empty (never, for a mapped BAR).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, off: usize, width: usize) -> *mut u8 {
        // Offsets are driver constants or derived from the device's own capability
        // registers and checked at setup: an access outside is a driver bug.
        assert!(
            off % width == 0 && off + width <= self.len,
            "register access at {off:#x} outside a {:#x}-byte BAR",
            self.len
        );
        // SAFETY: in bounds per the assertion.
        unsafe { self.ptr.add(off) }
    }

    /// Load a 32-bit register.
    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: aligned, inside the live mapping; MMIO must be volatile.
        unsafe { std::ptr::read_volatile(self.at(off, 4) as *const u32) }
    }

    /// Store a 32-bit register. Ordered after every earlier store to memory the
    /// device reads (a queue entry before its doorbell): the fence is a `sfence` on
    /// x86, a `dmb` elsewhere.
    pub fn write32(&self, off: usize, v: u32) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: aligned, inside the live mapping; MMIO must be volatile.
        unsafe { std::ptr::write_volatile(self.at(off, 4) as *mut u32, v) }
    }

    /// Load a 64-bit register as two 32-bit loads (low, then high).
    pub fn read64(&self, off: usize) -> u64 {
        self.read32(off) as u64 | (self.read32(off + 4) as u64) << 32
    }

    /// Store a 64-bit register as two 32-bit stores (low, then high).
    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes; no reference into it outlives self.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) } {
            tracing::error!("munmap of a BAR: {e}");
        }
    }
}

/// Sleep until interrupt eventfd `fd` fires or `timeout` passes; consume the count.
/// Returns whether it fired.
pub fn wait_irq(fd: &EventFd, timeout: Duration) -> bool {
    // SAFETY: `fd` is open for the duration of this borrow (it is borrowed from `fd`).
    let bfd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let mut pfd = [rustix::event::PollFd::new(
        &bfd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    let fired = matches!(rustix::event::poll(&mut pfd, Some(&ts)), Ok(n) if n > 0);
    if fired {
        let _ = fd.read(); // nonblocking: clears the counter
    }
    fired
}
