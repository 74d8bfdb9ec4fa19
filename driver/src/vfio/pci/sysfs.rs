//! The sysfs model: where sysfs is, one PCI function as it describes it, the list of
//! them, and what the host offers VFIO as a whole.

use super::names::{class_name, device_name, vendor_name};
use super::readiness::{dev_node_verdict, group_blockers, VfioUnusable};
use super::{Bdf, VFIO_PCI};
use crate::error::{Error, Result};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where sysfs, and `/dev`, are: `/` on a real system, a temporary directory in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysRoot {
    pub(super) root: PathBuf,
}

impl SysRoot {
    /// The running system's `/sys` and `/dev`.
    pub fn system() -> SysRoot {
        SysRoot::at("/")
    }
    /// A tree laid out like `/` (with `sys/` and `dev/` under `root`).
    /// A tree rooted at `root` (tests: a fake `/`).
    pub fn at(root: impl Into<PathBuf>) -> SysRoot {
        SysRoot { root: root.into() }
    }
    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `/sys/bus/pci/devices`.
    pub fn pci_devices(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }
    /// `/sys/bus/pci/devices/<bdf>`.
    pub fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.pci_devices().join(bdf.to_string())
    }
    /// `/sys/bus/pci/drivers/<name>`.
    pub fn driver_dir(&self, name: &str) -> PathBuf {
        self.root.join("sys/bus/pci/drivers").join(name)
    }
    /// `/sys/bus/pci/drivers_probe`.
    pub fn drivers_probe(&self) -> PathBuf {
        self.root.join("sys/bus/pci/drivers_probe")
    }
    /// `/sys/kernel/iommu_groups`.
    pub fn iommu_groups(&self) -> PathBuf {
        self.root.join("sys/kernel/iommu_groups")
    }
    /// `/sys/kernel/iommu_groups/<group>/devices`.
    pub fn group_devices(&self, group: u32) -> PathBuf {
        self.iommu_groups().join(group.to_string()).join("devices")
    }
    /// `/sys/class/iommu`: the IOMMU units the kernel registered (dmar0, ivhd0, ...).
    pub fn iommu_units(&self) -> PathBuf {
        self.root.join("sys/class/iommu")
    }
    /// `/dev/vfio/<group>`: the group's character device.
    pub fn vfio_group_node(&self, group: u32) -> PathBuf {
        self.root.join("dev/vfio").join(group.to_string())
    }
    /// `/dev/vfio/vfio`: the VFIO container device.
    pub fn vfio_container(&self) -> PathBuf {
        self.root.join("dev/vfio/vfio")
    }
}

/// One PCI function as sysfs describes it (a snapshot: read it again after a bind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address.
    pub bdf: Bdf,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// Base class, subclass, programming interface (`0x010802`: NVMe).
    pub class: u32,
    /// Subsystem vendor id, where sysfs has it.
    pub subsystem_vendor: Option<u16>,
    /// Subsystem device id, where sysfs has it.
    pub subsystem_device: Option<u16>,
    /// The bound driver (the `driver` link's name), `None` when unbound.
    pub driver: Option<String>,
    /// The IOMMU group number, `None` when the kernel has no IOMMU for the device.
    pub iommu_group: Option<u32>,
    /// `driver_override`, `None` when unset (sysfs shows `(null)`).
    pub driver_override: Option<String>,
}

impl PciDevice {
    /// Read `/sys/bus/pci/devices/<bdf>/`.
    pub fn read(root: &SysRoot, bdf: Bdf) -> Result<PciDevice> {
        let dir = root.device_dir(bdf);
        if !dir.exists() {
            return Err(Error::NoSuchPciDevice {
                bdf: bdf.to_string(),
                path: dir,
            });
        }
        let hex = |name: &'static str| -> Result<Option<u32>> {
            let path = dir.join(name);
            match read_attr(&path) {
                Ok(None) => Ok(None),
                Ok(Some(s)) => parse_hex(&s).map(Some).ok_or_else(|| {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("`{s}` is not a hex number"),
                    );
                    Error::pci_sysfs(name, bdf, path, e)
                }),
                Err(e) => Err(Error::pci_sysfs(name, bdf, path, e)),
            }
        };
        let required = |name: &'static str| -> Result<u32> {
            hex(name)?.ok_or_else(|| {
                let e = io::Error::from(io::ErrorKind::NotFound);
                Error::pci_sysfs(name, bdf, dir.join(name), e)
            })
        };
        let driver_override = {
            let path = dir.join("driver_override");
            read_attr(&path)
                .map_err(|e| Error::pci_sysfs("driver_override", bdf, path, e))?
                .filter(|s| !s.is_empty() && s != "(null)")
        };
        Ok(PciDevice {
            bdf,
            vendor: required("vendor")? as u16,
            device: required("device")? as u16,
            class: required("class")?,
            subsystem_vendor: hex("subsystem_vendor")?.map(|v| v as u16),
            subsystem_device: hex("subsystem_device")?.map(|v| v as u16),
            driver: link_name(&dir.join("driver")),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
            driver_override,
        })
    }

    /// A PCI-to-PCI or CardBus bridge (vfio-pci takes only normal, type 0, functions).
    pub fn is_bridge(&self) -> bool {
        is_bridge_class(self.class)
    }

    /// Bound to vfio-pci (or a vendor's vfio-pci variant driver).
    pub fn is_vfio_bound(&self) -> bool {
        self.driver.as_deref().is_some_and(is_vfio_driver)
    }

    /// A name for people: the built-in table's, else vendor and class.
    pub fn name(&self) -> String {
        if let Some(n) = device_name(self.vendor, self.device) {
            return n.to_string();
        }
        match vendor_name(self.vendor) {
            Some(v) => format!("{v} {}", class_name(self.class)),
            None => class_name(self.class).to_string(),
        }
    }

    /// Whether VFIO can drive the device now, and if not, the first thing missing
    /// (in the order they have to be fixed).
    pub fn vfio_usable(&self, root: &SysRoot) -> Result<(), VfioUnusable> {
        if self.is_bridge() {
            return Err(VfioUnusable::Bridge);
        }
        let group = self.iommu_group.ok_or(VfioUnusable::NoIommuGroup)?;
        match self.driver.as_deref() {
            Some(d) if is_vfio_driver(d) => {}
            _ if !root.driver_dir(VFIO_PCI).exists() => return Err(VfioUnusable::VfioPciNotLoaded),
            Some(d) => return Err(VfioUnusable::BoundToOther(d.to_string())),
            None => return Err(VfioUnusable::NotBound),
        }
        dev_node_verdict(root, group)?;
        let blockers = group_blockers(root, group, Some(self.bdf));
        if !blockers.is_empty() {
            return Err(VfioUnusable::GroupNotViable { group, blockers });
        }
        Ok(())
    }
}

/// Every PCI function, sorted by address. Entries that vanish while being read (hot
/// unplug) are skipped; no PCI bus at all gives an empty list.
pub fn list(root: &SysRoot) -> Result<Vec<PciDevice>> {
    let dir = root.pci_devices();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::sys("read /sys/bus/pci/devices", e)),
    };
    let mut bdfs: Vec<Bdf> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    bdfs.sort();
    let mut out = Vec::with_capacity(bdfs.len());
    for bdf in bdfs {
        match PciDevice::read(root, bdf) {
            Ok(d) => out.push(d),
            Err(Error::NoSuchPciDevice { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What the host offers VFIO as a whole, for explaining an empty or unusable list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSupport {
    /// `/sys/bus/pci/devices` exists.
    pub pci_bus: bool,
    /// Entries in `/sys/kernel/iommu_groups`.
    pub iommu_groups: usize,
    /// `/sys/class/iommu` entries (dmar0, ivhd0, ...).
    pub iommu_units: Vec<String>,
    /// `/sys/bus/pci/drivers/vfio-pci` exists.
    pub vfio_pci_loaded: bool,
    /// `/dev/vfio/vfio` exists.
    pub vfio_container: bool,
}

impl HostSupport {
    /// Read it from `root`.
    pub fn read(root: &SysRoot) -> HostSupport {
        let names = |p: PathBuf| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        HostSupport {
            pci_bus: root.pci_devices().is_dir(),
            iommu_groups: names(root.iommu_groups()).len(),
            iommu_units: names(root.iommu_units()),
            vfio_pci_loaded: root.driver_dir(VFIO_PCI).is_dir(),
            vfio_container: root.vfio_container().exists(),
        }
    }

    /// What is missing for VFIO on this host, one sentence with its cure each; empty
    /// when nothing host-wide is.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.pci_bus {
            p.push(
                "no PCI bus: /sys/bus/pci/devices does not exist (a container without \
                 sysfs, or a machine without PCI)"
                    .to_string(),
            );
        }
        if self.iommu_groups == 0 {
            let units = if self.iommu_units.is_empty() {
                "and no IOMMU is registered (/sys/class/iommu is empty): the kernel has no \
                 IOMMU enabled"
                    .to_string()
            } else {
                format!(
                    "although IOMMU units {} are registered: no device was attached to \
                     them (dmesg says why)",
                    self.iommu_units.join(", ")
                )
            };
            p.push(format!(
                "no IOMMU groups (/sys/kernel/iommu_groups is empty) {units}, so no device \
                 can be used through VFIO; boot with intel_iommu=on (AMD: amd_iommu=on; \
                 QEMU: -device intel-iommu) and load vfio-pci"
            ));
        }
        if !self.vfio_pci_loaded {
            p.push(
                "vfio-pci is not loaded (/sys/bus/pci/drivers/vfio-pci does not exist): \
                 `modprobe vfio-pci`"
                    .to_string(),
            );
        }
        if self.vfio_pci_loaded && !self.vfio_container {
            p.push(
                "/dev/vfio/vfio does not exist: VFIO is loaded but its device node is \
                 missing (no devtmpfs in this mount namespace?)"
                    .to_string(),
            );
        }
        p
    }
}

/// A sysfs attribute, trimmed; `None` when it does not exist.
pub(super) fn read_attr(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The last component of a symlink's target (`driver` -> `.../drivers/nvme`: `nvme`).
pub(super) fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

pub(super) fn parse_hex(s: &str) -> Option<u32> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u32::from_str_radix(digits, 16).ok()
}

pub(super) fn is_vfio_driver(name: &str) -> bool {
    name == VFIO_PCI || name.ends_with("vfio_pci") || name.ends_with("vfio-pci")
}

pub(super) fn is_bridge_class(class: u32) -> bool {
    matches!(class >> 8, 0x0604 | 0x0607 | 0x0609)
}
