//! Moving a device to vfio-pci and giving it back (root only).

use super::readiness::{dev_node_verdict, VfioUnusable};
use super::sysfs::{is_vfio_driver, link_name, PciDevice, SysRoot};
use super::{Bdf, DEV_NODE_WAIT, VFIO_PCI};
use crate::error::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What [`bind_vfio`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindReport {
    /// The device.
    pub bdf: Bdf,
    /// The driver the device was bound to before (`None`: unbound).
    pub previous: Option<String>,
    /// It was already bound to vfio-pci: nothing was written.
    pub already_bound: bool,
    /// Its IOMMU group.
    pub group: u32,
    /// `/dev/vfio/<group>`.
    pub dev_node: PathBuf,
}

/// Move `bdf` to vfio-pci: set `driver_override`, unbind the current driver, probe,
/// check that vfio-pci took it and that `/dev/vfio/<group>` appeared (waiting up to
/// [`DEV_NODE_WAIT`]). Nothing is written unless the device exists, has an IOMMU group,
/// is not a bridge and vfio-pci is loaded. When vfio-pci does not take the device, the
/// override is cleared and the device re-probed, so its driver can take it back.
/// Needs root.
pub fn bind_vfio(root: &SysRoot, bdf: Bdf) -> Result<BindReport> {
    let dev = PciDevice::read(root, bdf)?;
    let unusable = |reason: VfioUnusable| reason.into_error(bdf);
    if dev.is_bridge() {
        return Err(unusable(VfioUnusable::Bridge));
    }
    let group = dev
        .iommu_group
        .ok_or_else(|| unusable(VfioUnusable::NoIommuGroup))?;
    let dev_node = root.vfio_group_node(group);
    if dev.is_vfio_bound() {
        wait_for_dev_node(root, bdf, group)?;
        return Ok(BindReport {
            bdf,
            previous: dev.driver,
            already_bound: true,
            group,
            dev_node,
        });
    }
    if !root.driver_dir(VFIO_PCI).is_dir() {
        return Err(unusable(VfioUnusable::VfioPciNotLoaded));
    }
    let dir = root.device_dir(bdf);
    let (name, override_path, probe_path) = (
        bdf.to_string(),
        dir.join("driver_override"),
        root.drivers_probe(),
    );
    let clear_override = || write_attr("clear driver_override", bdf, &override_path, "\n");
    let probe = || write_attr("probe drivers", bdf, &probe_path, &name);
    write_attr("set driver_override", bdf, &override_path, VFIO_PCI)?;
    if dev.driver.is_some() {
        let unbind = dir.join("driver/unbind");
        if let Err(e) = write_attr("unbind from its driver", bdf, &unbind, &name) {
            let _ = clear_override();
            return Err(e);
        }
    }
    let probed = probe();
    if probed.is_err() || !link_name(&dir.join("driver")).is_some_and(|d| is_vfio_driver(&d)) {
        // Roll back: let the previous (or default) driver have the device again.
        let _ = clear_override();
        if link_name(&dir.join("driver")).is_none() {
            let _ = probe();
        }
        probed?;
        return Err(Error::PciBindFailed {
            bdf: bdf.to_string(),
            driver: link_name(&dir.join("driver")),
        });
    }
    wait_for_dev_node(root, bdf, group)?;
    Ok(BindReport {
        bdf,
        previous: dev.driver,
        already_bound: false,
        group,
        dev_node,
    })
}

/// Give `bdf` back to the host: unbind it from vfio-pci, clear a `vfio-pci`
/// `driver_override` and re-probe, so its default driver takes it. Returns the driver
/// it ends on (`None`: no driver took it). A device neither bound to vfio-pci nor
/// overridden to it is left alone (its driver is returned). Needs root.
pub fn unbind_vfio(root: &SysRoot, bdf: Bdf) -> Result<Option<String>> {
    let dev = PciDevice::read(root, bdf)?;
    let dir = root.device_dir(bdf);
    let ours = dev.driver_override.as_deref() == Some(VFIO_PCI);
    if !dev.is_vfio_bound() && !ours {
        return Ok(dev.driver);
    }
    if dev.is_vfio_bound() {
        let unbind = dir.join("driver/unbind");
        write_attr("unbind from vfio-pci", bdf, &unbind, &bdf.to_string())?;
    }
    if ours {
        let path = dir.join("driver_override");
        write_attr("clear driver_override", bdf, &path, "\n")?;
    }
    if link_name(&dir.join("driver")).is_none() {
        let probe = root.drivers_probe();
        write_attr("probe drivers", bdf, &probe, &bdf.to_string())?;
    }
    Ok(link_name(&dir.join("driver")))
}

pub(super) fn wait_for_dev_node(root: &SysRoot, bdf: Bdf, group: u32) -> Result<()> {
    let start = Instant::now();
    loop {
        match dev_node_verdict(root, group) {
            Ok(()) => return Ok(()),
            Err(reason) if start.elapsed() >= DEV_NODE_WAIT => return Err(reason.into_error(bdf)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Write a sysfs attribute in one `write` (sysfs takes a store in one call).
pub(super) fn write_attr(op: &'static str, bdf: Bdf, path: &Path, value: &str) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| Error::pci_sysfs(op, bdf, path.to_path_buf(), e))
}
