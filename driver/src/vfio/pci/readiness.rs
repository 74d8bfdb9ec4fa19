//! Whether VFIO can use a device, and if not, why and what to do about it.

use super::sysfs::{
    is_bridge_class, is_vfio_driver, link_name, parse_hex, read_attr, PciDevice, SysRoot,
};
use super::Bdf;
use crate::error::{Error, Result};
use std::fmt;
use std::fs;
use std::io;

/// Why a device cannot be used through VFIO (yet); [`VfioUnusable::hint`] says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfioUnusable {
    /// A PCI bridge: vfio-pci does not take bridges.
    Bridge,
    /// The device has no IOMMU group: the kernel runs without an IOMMU (or without one
    /// for this device). vfio-pci's no-IOMMU mode is not supported.
    NoIommuGroup,
    /// `/sys/bus/pci/drivers/vfio-pci` does not exist.
    VfioPciNotLoaded,
    /// No driver is bound.
    NotBound,
    /// Bound to a host driver, not vfio-pci.
    BoundToOther(String),
    /// `/dev/vfio/<group>` does not exist.
    DevNodeMissing {
        /// The IOMMU group.
        group: u32,
    },
    /// `/dev/vfio/<group>` exists but this process cannot open it read-write.
    DevNodeNoAccess {
        /// The IOMMU group.
        group: u32,
        /// Why `open` failed.
        errno: i32,
    },
    /// Other members of the IOMMU group are bound to host drivers:
    /// (device, driver) pairs.
    GroupNotViable {
        /// The IOMMU group.
        group: u32,
        /// (device, driver) of each member bound to a host driver.
        blockers: Vec<(String, String)>,
    },
}

impl VfioUnusable {
    /// The error for `bdf`, carrying this verdict in words.
    pub fn into_error(self, bdf: Bdf) -> Error {
        Error::PciVfioUnusable {
            bdf: bdf.to_string(),
            reason: self.to_string(),
            hint: self.hint(),
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            VfioUnusable::Bridge => "use an endpoint device, not a bridge",
            VfioUnusable::NoIommuGroup => {
                "boot with an IOMMU enabled (intel_iommu=on, or amd_iommu=on; in QEMU add \
                 -device intel-iommu) and check dmesg for DMAR / AMD-Vi; vfio-pci's no-IOMMU \
                 mode is not supported"
            }
            VfioUnusable::VfioPciNotLoaded => "load it: `modprobe vfio-pci`",
            VfioUnusable::NotBound | VfioUnusable::BoundToOther(_) => {
                "`userptr bind <BDF>` moves it to vfio-pci"
            }
            VfioUnusable::DevNodeMissing { .. } => {
                "the node appears when vfio-pci binds a device of the group; without \
                 devtmpfs or udev, create it with mknod (the `vfio` major in /proc/devices)"
            }
            VfioUnusable::DevNodeNoAccess { .. } => {
                "run as root, or give the user the group node (`chown $USER /dev/vfio/<group>`) \
                 and enough `ulimit -l`"
            }
            VfioUnusable::GroupNotViable { .. } => {
                "bind every device of the group to vfio-pci (`userptr bind <BDF>`) or unbind it \
                 from its driver; the group is usable only as a whole"
            }
        }
    }
}

impl fmt::Display for VfioUnusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VfioUnusable::Bridge => write!(f, "a PCI bridge"),
            VfioUnusable::NoIommuGroup => write!(f, "no IOMMU group (no IOMMU enabled)"),
            VfioUnusable::VfioPciNotLoaded => write!(f, "vfio-pci is not loaded"),
            VfioUnusable::NotBound => write!(f, "not bound to any driver"),
            VfioUnusable::BoundToOther(d) => write!(f, "bound to {d}, not vfio-pci"),
            VfioUnusable::DevNodeMissing { group } => {
                write!(f, "/dev/vfio/{group} does not exist")
            }
            VfioUnusable::DevNodeNoAccess { group, errno } => write!(
                f,
                "/dev/vfio/{group} is not accessible ({})",
                io::Error::from_raw_os_error(*errno)
            ),
            VfioUnusable::GroupNotViable { group, blockers } => {
                write!(f, "IOMMU group {group} is not viable: ")?;
                for (i, (dev, drv)) in blockers.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{dev} is bound to {drv}")?;
                }
                Ok(())
            }
        }
    }
}

/// The `/dev/vfio/<group>` verdict.
pub(super) fn dev_node_verdict(root: &SysRoot, group: u32) -> Result<(), VfioUnusable> {
    use rustix::fs::{access, Access};
    let r = access(
        root.vfio_group_node(group),
        Access::READ_OK | Access::WRITE_OK,
    );
    access_verdict(group, r.map_err(io::Error::from))
}

pub(super) fn access_verdict(group: u32, r: io::Result<()>) -> Result<(), VfioUnusable> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(VfioUnusable::DevNodeMissing { group })
        }
        Err(e) => Err(VfioUnusable::DevNodeNoAccess {
            group,
            errno: e.raw_os_error().unwrap_or(libc::EACCES),
        }),
    }
}

/// The members of `group` (other than `except`) that make it not viable: bound to a
/// driver that is not a VFIO driver, pci-stub or pcieport, and not a bridge.
/// Returns (device name, driver) pairs, sorted by name.
pub fn group_blockers(root: &SysRoot, group: u32, except: Option<Bdf>) -> Vec<(String, String)> {
    let except = except.map(|b| b.to_string());
    let dir = root.group_devices(group);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if except.as_deref() == Some(name.as_str()) {
                return None;
            }
            let member = dir.join(&name);
            let driver = link_name(&member.join("driver"))?;
            if is_vfio_driver(&driver) || driver == "pci-stub" || driver == "pcieport" {
                return None;
            }
            let class = read_attr(&member.join("class"))
                .ok()
                .flatten()
                .and_then(|s| parse_hex(&s));
            if class.is_some_and(is_bridge_class) {
                return None;
            }
            Some((name, driver))
        })
        .collect();
    out.sort();
    out
}

/// A usable device's IOMMU group, or why it is not usable: what a VFIO backend checks
/// before opening `/dev/vfio/<group>`.
pub fn vfio_group(root: &SysRoot, bdf: Bdf) -> Result<u32> {
    let dev = PciDevice::read(root, bdf)?;
    dev.vfio_usable(root)
        .map_err(|reason| reason.into_error(bdf))?;
    dev.iommu_group
        .ok_or_else(|| VfioUnusable::NoIommuGroup.into_error(bdf))
}
