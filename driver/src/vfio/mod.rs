//! VFIO: real devices passed through to this process, behind the kernel's type1 IOMMU.
//!
//! * [`domain`]: [`VfioDomain`], one VFIO container = one IOMMU domain, implementing
//!   [`IommuDomain`](crate::IommuDomain) over `VFIO_IOMMU_MAP_DMA`/`UNMAP_DMA` (pins at
//!   map time: the semantics the whole library is built around). Several devices
//!   (groups) opened through one domain share its mappings.
//! * [`device`]: [`VfioPci`], one PCI function: BAR regions (read/write and mmap),
//!   config space, bus mastering, function reset, MSI/MSI-X/INTx to eventfds.
//! * [`faults`]: [`FaultLog`], the IOMMU faults the kernel logged (the only way a
//!   blocked DMA write ever becomes visible to a userspace driver).
//! * [`pci`]: PCI devices in sysfs, their VFIO readiness, binding to vfio-pci and back.
//!
//! The device drivers that run on a function opened here:
//! * [`nvme`]: an NVMe controller, its I/O queues driven by the registry;
//! * [`edu`]: QEMU's edu DMA device, for bring-up checks.
//!
//! Built on the rust-vmm crates: `vfio-ioctls` opens the container, groups and devices
//! and does the read-write DMA map and the unmap; `vfio-bindings` gives the ABI structs
//! for what `vfio-ioctls` does not wrap (`VFIO_IOMMU_GET_INFO` with its capability
//! chain, read-only `MAP_DMA`), issued here with `ioctl(2)`. `vfio-ioctls` is used
//! without its default `kvm` feature: there is no VMM and no KVM-VFIO device here.
//!
//! Errors are [`Error::Vfio`]: the operation, the device, the errno, and the likely
//! cause in words ([`hint_for`]).

pub mod device;
pub mod domain;
pub mod edu;
pub mod faults;
pub mod nvme;
pub mod pci;

pub use device::{wait_irq, BarInfo, IrqKind, Mmio, VfioPci};
pub use domain::{Type1Info, VfioDomain};
pub use faults::{FaultLog, IommuFault};

use crate::error::Error;
use vfio_ioctls::VfioError;

/// The errno inside a `vfio-ioctls` error, where it carries one.
fn errno_of(e: &VfioError) -> Option<i32> {
    use VfioError as V;
    match e {
        V::OpenContainer(io) | V::OpenGroup(io, _) => io.raw_os_error(),
        V::ContainerSetIOMMU(s)
        | V::GroupGetDeviceFD(s)
        | V::VfioDeviceGetInfo(s)
        | V::VfioDeviceGetRegionInfo(s)
        | V::IommuDmaMap(s)
        | V::IommuDmaUnmap(s)
        | V::SetDeviceAttr(s) => Some(s.errno()),
        _ => None,
    }
}

/// The likely cause of a failed VFIO operation, in words a person bringing up a device
/// can act on.
pub fn hint_for(op: &str, errno: Option<i32>, group_not_viable: bool) -> &'static str {
    if group_not_viable {
        return "the IOMMU group is not viable: bind every device of the group to vfio-pci \
                (`userptr list` shows the group, `userptr bind BDF` binds)";
    }
    match (op, errno) {
        ("open container", Some(libc::ENOENT)) => {
            "no /dev/vfio/vfio: this kernel has no VFIO, or vfio-pci is not loaded \
             (`modprobe vfio-pci`)"
        }
        ("open group", Some(libc::ENOENT)) | ("find group", _) => {
            "the device is not bound to vfio-pci (`userptr bind BDF`), or the kernel runs \
             without an IOMMU (boot with intel_iommu=on / amd_iommu=on)"
        }
        (_, Some(libc::EACCES)) | (_, Some(libc::EPERM)) => {
            "no permission on /dev/vfio/N: run as root or give this user the group file"
        }
        (_, Some(libc::EBUSY)) => "the group or device is already open in another process",
        ("VFIO_IOMMU_MAP_DMA", Some(libc::ENOMEM)) => {
            "RLIMIT_MEMLOCK is too low for the pinned memory: raise `ulimit -l` or grant \
             CAP_IPC_LOCK"
        }
        ("VFIO_IOMMU_MAP_DMA", Some(libc::ENOSPC)) => {
            "the container holds dma_entry_limit mappings already (vfio_iommu_type1 module \
             parameter)"
        }
        ("VFIO_IOMMU_MAP_DMA", Some(libc::EINVAL)) => {
            "IOVA, address or length not aligned to the IOMMU page size, or outside the \
             usable IOVA ranges"
        }
        ("VFIO_IOMMU_UNMAP_DMA", Some(libc::EINVAL)) => {
            "type1v2 unmaps whole mappings only: the range must be one earlier map"
        }
        ("set IOMMU type", _) => "the kernel has no type1v2 IOMMU backend (vfio_iommu_type1)",
        _ => "see the errno; `userptr info BDF` shows what the device and IOMMU report",
    }
}

/// Turn a `vfio-ioctls` error into [`Error::Vfio`].
pub(crate) fn vfio_err(op: &'static str, device: &str, e: VfioError) -> Error {
    let viable = matches!(e, VfioError::GroupViable);
    let errno = errno_of(&e);
    Error::Vfio {
        op,
        device: device.to_string(),
        reason: e.to_string(),
        errno,
        hint: hint_for(op, errno, viable),
    }
}

/// An [`Error::Vfio`] from an errno of a call made here.
pub(crate) fn sys_err(op: &'static str, device: &str, e: std::io::Error) -> Error {
    let errno = e.raw_os_error();
    Error::Vfio {
        op,
        device: device.to_string(),
        reason: e.to_string(),
        errno,
        hint: hint_for(op, errno, false),
    }
}

#[cfg(test)]
mod tests {
    use super::hint_for;

    #[test]
    fn each_likely_cause_is_named() {
        let cases = [
            (
                hint_for("open container", Some(libc::ENOENT), false),
                "no VFIO",
            ),
            (
                hint_for("open group", Some(libc::ENOENT), false),
                "not bound to vfio-pci",
            ),
            (hint_for("find group", None, false), "without an IOMMU"),
            (hint_for("open group", None, true), "not viable"),
            (
                hint_for("open group", Some(libc::EACCES), false),
                "no permission",
            ),
            (
                hint_for("VFIO_IOMMU_MAP_DMA", Some(libc::ENOMEM), false),
                "RLIMIT_MEMLOCK",
            ),
            (
                hint_for("VFIO_IOMMU_MAP_DMA", Some(libc::ENOSPC), false),
                "dma_entry_limit",
            ),
            (
                hint_for("open group", Some(libc::EBUSY), false),
                "another process",
            ),
        ];
        for (hint, want) in cases {
            assert!(hint.contains(want), "{hint:?} lacks {want:?}");
        }
    }
}
