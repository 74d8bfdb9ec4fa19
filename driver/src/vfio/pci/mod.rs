//! PCI devices as sysfs shows them, and moving one to vfio-pci and back: the VFIO
//! bring-up steps a user would otherwise do by hand with `echo` into `/sys`.
//!
//! Every path goes through a [`SysRoot`] (`/` on a real system), so the parsing and the
//! verdicts can be tested against a fake tree in a temporary directory.
//!
//! What the module reads, per device, under `/sys/bus/pci/devices/<bdf>/`:
//! `vendor`, `device`, `class`, `subsystem_vendor`, `subsystem_device`,
//! `driver_override`, and the links `driver` (the bound driver) and `iommu_group`.
//! What it writes: `driver_override`, `driver/unbind` and `/sys/bus/pci/drivers_probe`
//! (root only). What makes a device usable through VFIO ([`PciDevice::vfio_usable`]):
//! an IOMMU group, vfio-pci loaded and bound to it, `/dev/vfio/<group>` present and
//! accessible, and a viable group (no other member bound to a host driver).
//!
//! Files, one concept each: this one (the PCI address, [`Bdf`]), `sysfs` (the sysfs
//! model: [`SysRoot`], [`PciDevice`], [`list`], [`HostSupport`]), `readiness`
//! ([`VfioUnusable`] and the verdicts), `bind` ([`bind_vfio`], [`unbind_vfio`]),
//! `names` (vendor, device and class names), `tests` (against a fake tree).

mod bind;
mod names;
mod readiness;
mod sysfs;
#[cfg(test)]
mod tests;

pub use bind::{bind_vfio, unbind_vfio, BindReport};
pub use names::{class_name, device_name, vendor_name};
pub use readiness::{group_blockers, vfio_group, VfioUnusable};
pub use sysfs::{list, HostSupport, PciDevice, SysRoot};

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The driver VFIO needs a PCI device bound to.
pub const VFIO_PCI: &str = "vfio-pci";

/// How long [`bind_vfio`] waits for `/dev/vfio/<group>` to appear after the bind
/// (devtmpfs creates it at once; udev may take a moment to set its permissions).
pub const DEV_NODE_WAIT: Duration = Duration::from_secs(2);

/// A PCI address: domain, bus, device, function (`DDDD:BB:DD.F`).
///
/// Ordered by domain, bus, device, function: the order `lspci` lists them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    dev: u8,
    func: u8,
}

impl Bdf {
    /// The address `domain:bus:dev.func`; `None` when `dev` > 0x1f or `func` > 7.
    pub fn new(domain: u32, bus: u8, dev: u8, func: u8) -> Option<Bdf> {
        (dev <= 0x1f && func <= 7).then_some(Bdf {
            domain,
            bus,
            dev,
            func,
        })
    }
    /// The PCI domain (segment).
    pub fn domain(&self) -> u32 {
        self.domain
    }
    /// The bus.
    pub fn bus(&self) -> u8 {
        self.bus
    }
    /// The device on the bus.
    pub fn dev(&self) -> u8 {
        self.dev
    }
    /// The function of the device.
    pub fn func(&self) -> u8 {
        self.func
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.dev, self.func
        )
    }
}

impl FromStr for Bdf {
    type Err = Error;

    /// `DDDD:BB:DD.F` (the domain may have up to 8 hex digits, as VMD domains do) or
    /// the short `BB:DD.F`, meaning domain 0000. Hex, either case.
    fn from_str(s: &str) -> Result<Bdf> {
        let bad = |reason: &'static str| Error::BadBdf {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("it is empty"));
        }
        let (head, func) = t
            .rsplit_once('.')
            .ok_or_else(|| bad("there is no `.function`"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, dev) = match parts.as_slice() {
            [bus, dev] => ("0", *bus, *dev),
            [domain, bus, dev] => (*domain, *bus, *dev),
            _ => {
                return Err(bad(
                    "it needs two or three `:`-separated fields before the `.`",
                ))
            }
        };
        let hex = |field: &str, max_digits: usize, what: &'static str| -> Result<u32> {
            if field.is_empty()
                || field.len() > max_digits
                || !field.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(bad(what));
            }
            u32::from_str_radix(field, 16).map_err(|_| bad(what))
        };
        let domain = hex(domain, 8, "the domain is not 1 to 8 hex digits")?;
        let bus = hex(bus, 2, "the bus is not 1 or 2 hex digits")?;
        let dev = hex(dev, 2, "the device is not 1 or 2 hex digits")?;
        let func = hex(func, 1, "the function is not one hex digit")?;
        if dev > 0x1f {
            return Err(bad("the device number is above 1f"));
        }
        if func > 7 {
            return Err(bad("the function number is above 7"));
        }
        Ok(Bdf {
            domain,
            bus: bus as u8,
            dev: dev as u8,
            func: func as u8,
        })
    }
}
