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

use crate::error::{Error, Result};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

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
    pub fn domain(&self) -> u32 {
        self.domain
    }
    pub fn bus(&self) -> u8 {
        self.bus
    }
    pub fn dev(&self) -> u8 {
        self.dev
    }
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

/// Where sysfs, and `/dev`, are: `/` on a real system, a temporary directory in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysRoot {
    root: PathBuf,
}

impl SysRoot {
    /// The running system's `/sys` and `/dev`.
    pub fn system() -> SysRoot {
        SysRoot::at("/")
    }
    /// A tree laid out like `/` (with `sys/` and `dev/` under `root`).
    pub fn at(root: impl Into<PathBuf>) -> SysRoot {
        SysRoot { root: root.into() }
    }
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
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass, programming interface (`0x010802`: NVMe).
    pub class: u32,
    pub subsystem_vendor: Option<u16>,
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
    DevNodeMissing { group: u32 },
    /// `/dev/vfio/<group>` exists but this process cannot open it read-write.
    DevNodeNoAccess { group: u32, errno: i32 },
    /// Other members of the IOMMU group are bound to host drivers:
    /// (device, driver) pairs.
    GroupNotViable {
        group: u32,
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
fn dev_node_verdict(root: &SysRoot, group: u32) -> Result<(), VfioUnusable> {
    use rustix::fs::{access, Access};
    let r = access(
        root.vfio_group_node(group),
        Access::READ_OK | Access::WRITE_OK,
    );
    access_verdict(group, r.map_err(io::Error::from))
}

fn access_verdict(group: u32, r: io::Result<()>) -> Result<(), VfioUnusable> {
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

/// What [`bind_vfio`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindReport {
    pub bdf: Bdf,
    /// The driver the device was bound to before (`None`: unbound).
    pub previous: Option<String>,
    /// It was already bound to vfio-pci: nothing was written.
    pub already_bound: bool,
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

/// A usable device's IOMMU group, or why it is not usable: what a VFIO backend checks
/// before opening `/dev/vfio/<group>`.
pub fn vfio_group(root: &SysRoot, bdf: Bdf) -> Result<u32> {
    let dev = PciDevice::read(root, bdf)?;
    dev.vfio_usable(root)
        .map_err(|reason| reason.into_error(bdf))?;
    dev.iommu_group
        .ok_or_else(|| VfioUnusable::NoIommuGroup.into_error(bdf))
}

fn wait_for_dev_node(root: &SysRoot, bdf: Bdf, group: u32) -> Result<()> {
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
fn write_attr(op: &'static str, bdf: Bdf, path: &Path, value: &str) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| Error::pci_sysfs(op, bdf, path.to_path_buf(), e))
}

/// A sysfs attribute, trimmed; `None` when it does not exist.
fn read_attr(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The last component of a symlink's target (`driver` -> `.../drivers/nvme`: `nvme`).
fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn parse_hex(s: &str) -> Option<u32> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u32::from_str_radix(digits, 16).ok()
}

fn is_vfio_driver(name: &str) -> bool {
    name == VFIO_PCI || name.ends_with("vfio_pci") || name.ends_with("vfio-pci")
}

fn is_bridge_class(class: u32) -> bool {
    matches!(class >> 8, 0x0604 | 0x0607 | 0x0609)
}

/// The devices this project is brought up on, and the usual company in a QEMU guest.
pub fn device_name(vendor: u16, device: u16) -> Option<&'static str> {
    Some(match (vendor, device) {
        (0x1234, 0x11e8) => "QEMU edu",
        (0x1234, 0x1111) => "QEMU VGA",
        (0x1b36, 0x0010) => "QEMU NVMe",
        (0x1b36, 0x0001) => "QEMU PCI bridge",
        (0x1b36, 0x0008) => "QEMU PCIe host bridge",
        (0x1b36, 0x000c) => "QEMU PCIe root port",
        (0x8086, 0x29c0) => "Intel Q35 host bridge",
        (0x8086, 0x1237) => "Intel 440FX host bridge",
        (0x8086, 0x2918) => "Intel ICH9 LPC",
        (0x8086, 0x2922) => "Intel ICH9 SATA",
        (0x8086, 0x2930) => "Intel ICH9 SMBus",
        (0x8086, 0x7000) => "Intel PIIX3 ISA",
        (0x8086, 0x7010) => "Intel PIIX3 IDE",
        (0x8086, 0x7113) => "Intel PIIX4 ACPI",
        (0x8086, 0x100e) => "Intel 82540EM (e1000)",
        (0x8086, 0x10d3) => "Intel 82574L (e1000e)",
        (0x1af4, d) => virtio_name(d)?,
        _ => return None,
    })
}

/// virtio devices: transitional ids 0x1000.., modern ids 0x1040 + the virtio device id.
fn virtio_name(device: u16) -> Option<&'static str> {
    let id = match device {
        0x1000 => 1,
        0x1001 => 2,
        0x1002 => 5,
        0x1003 => 3,
        0x1004 => 8,
        0x1005 => 4,
        0x1009 => 9,
        0x1040..=0x107f => device - 0x1040,
        _ => return None,
    };
    Some(match id {
        1 => "virtio net",
        2 => "virtio block",
        3 => "virtio console",
        4 => "virtio rng",
        5 => "virtio balloon",
        8 => "virtio SCSI",
        9 => "virtio 9p",
        16 => "virtio GPU",
        18 => "virtio input",
        19 => "virtio vsock",
        20 => "virtio crypto",
        23 => "virtio IOMMU",
        24 => "virtio mem",
        26 => "virtio fs",
        27 => "virtio pmem",
        _ => "virtio",
    })
}

/// A few vendors by name.
pub fn vendor_name(vendor: u16) -> Option<&'static str> {
    Some(match vendor {
        0x8086 => "Intel",
        0x1af4 => "virtio",
        0x1b36 | 0x1234 => "QEMU",
        0x1022 => "AMD",
        0x1002 => "AMD/ATI",
        0x10de => "NVIDIA",
        0x144d => "Samsung",
        0x15b3 => "Mellanox",
        0x1d0f => "Amazon",
        _ => return None,
    })
}

/// The PCI class code's meaning, coarsely.
pub fn class_name(class: u32) -> &'static str {
    match class >> 8 {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0106 => "SATA controller",
        0x0108 => "NVMe controller",
        0x0200 => "Ethernet controller",
        0x0300 => "VGA controller",
        0x0302 => "3D controller",
        0x0403 => "audio device",
        0x0600 => "host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0c03 => "USB controller",
        0x0c05 => "SMBus controller",
        _ => match class >> 16 {
            0x01 => "storage controller",
            0x02 => "network controller",
            0x03 => "display controller",
            0x04 => "multimedia device",
            0x05 => "memory controller",
            0x06 => "bridge",
            0x07 => "communication controller",
            0x08 => "system peripheral",
            0x0c => "serial bus controller",
            0x12 => "processing accelerator",
            0xff => "device (unassigned class)",
            _ => "device",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake `/` with `sys/` and `dev/`, removed on drop.
    struct FakeSys {
        root: SysRoot,
    }

    impl FakeSys {
        fn new(tag: &str) -> FakeSys {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "userptr-pci-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("sys/bus/pci/devices")).unwrap();
            fs::create_dir_all(dir.join("sys/bus/pci/drivers")).unwrap();
            fs::create_dir_all(dir.join("sys/kernel/iommu_groups")).unwrap();
            fs::write(dir.join("sys/bus/pci/drivers_probe"), "").unwrap();
            FakeSys {
                root: SysRoot::at(dir),
            }
        }
        fn path(&self, rel: &str) -> PathBuf {
            self.root.root().join(rel)
        }
        fn driver(&self, name: &str) -> &Self {
            let d = self.root.driver_dir(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("unbind"), "").unwrap();
            fs::write(d.join("bind"), "").unwrap();
            self
        }
        /// A device with ids, class, optionally a driver and a group (the group's
        /// `devices/` entry links back to the device, as in sysfs).
        fn device(
            &self,
            bdf: &str,
            ids: (u16, u16),
            class: u32,
            driver: Option<&str>,
            group: Option<u32>,
        ) -> &Self {
            let d = self.root.pci_devices().join(bdf);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("vendor"), format!("{:#06x}\n", ids.0)).unwrap();
            fs::write(d.join("device"), format!("{:#06x}\n", ids.1)).unwrap();
            fs::write(d.join("class"), format!("{class:#08x}\n")).unwrap();
            fs::write(d.join("subsystem_vendor"), "0x1af4\n").unwrap();
            fs::write(d.join("subsystem_device"), "0x1100\n").unwrap();
            fs::write(d.join("driver_override"), "(null)\n").unwrap();
            if let Some(drv) = driver {
                self.driver(drv);
                symlink(format!("../../drivers/{drv}"), d.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gd = self.root.group_devices(g);
                fs::create_dir_all(&gd).unwrap();
                symlink(&d, gd.join(bdf)).unwrap();
                symlink(
                    format!("../../../../kernel/iommu_groups/{g}"),
                    d.join("iommu_group"),
                )
                .unwrap();
            }
            self
        }
        fn dev_node(&self, group: u32) -> &Self {
            let p = self.root.vfio_group_node(group);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "").unwrap();
            self
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.root.root());
        }
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn pci_bdf_parses_long_and_short_forms() {
        let b = bdf("0000:00:04.0");
        assert_eq!((b.domain(), b.bus(), b.dev(), b.func()), (0, 0, 4, 0));
        assert_eq!(b.to_string(), "0000:00:04.0");
        assert_eq!(bdf("00:04.0"), b);
        assert_eq!(bdf(" 0000:00:04.0\n"), b);
        let b = bdf("0001:FF:1f.7");
        assert_eq!((b.domain(), b.bus(), b.dev(), b.func()), (1, 0xff, 0x1f, 7));
        assert_eq!(b.to_string(), "0001:ff:1f.7");
        let vmd = bdf("10000:e0:00.0");
        assert_eq!(vmd.domain(), 0x10000);
        assert_eq!(vmd.to_string(), "10000:e0:00.0");
        assert!(bdf("0000:00:04.0") < bdf("0000:00:04.1"));
        assert!(bdf("0000:00:1f.0") < bdf("0000:01:00.0"));
        assert!(bdf("0000:ff:00.0") < bdf("0001:00:00.0"));
        assert_eq!(Bdf::new(0, 1, 2, 3).unwrap().to_string(), "0000:01:02.3");
        assert!(Bdf::new(0, 0, 0x20, 0).is_none());
        assert!(Bdf::new(0, 0, 0, 8).is_none());
    }

    #[test]
    fn pci_bdf_rejects_garbage_with_a_reason() {
        for bad in [
            "",
            "garbage",
            "0000:00:04",
            "0000:00:04.8",
            "0000:00:20.0",
            "0000:00:04.00",
            "0000:000:04.0",
            "000000000:00:04.0",
            "0000:00:+4.0",
            "0000:00:04.g",
            "0000::04.0",
            "a:b:c:d.0",
            "04.0",
        ] {
            match bad.parse::<Bdf>() {
                Err(Error::BadBdf { input, reason }) => {
                    assert_eq!(input, bad);
                    assert!(!reason.is_empty());
                    let msg = bad.parse::<Bdf>().unwrap_err().to_string();
                    assert!(msg.contains("DDDD:BB:DD.F"), "{msg}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn pci_list_reads_and_sorts_devices() {
        let fake = FakeSys::new("list");
        fake.device(
            "0000:00:05.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            None,
        )
        .device("0000:00:00.0", (0x8086, 0x29c0), 0x060000, None, None)
        .device(
            "0000:00:04.0",
            (0x1234, 0x11e8),
            0x00ff00,
            Some("vfio-pci"),
            Some(3),
        );
        fs::create_dir_all(fake.path("sys/bus/pci/devices/not-a-bdf")).unwrap();
        fs::write(
            fake.path("sys/bus/pci/devices/0000:00:05.0/driver_override"),
            "vfio-pci\n",
        )
        .unwrap();
        let devs = list(&fake.root).unwrap();
        let bdfs: Vec<String> = devs.iter().map(|d| d.bdf.to_string()).collect();
        assert_eq!(bdfs, ["0000:00:00.0", "0000:00:04.0", "0000:00:05.0"]);
        let host = &devs[0];
        assert_eq!(
            (host.vendor, host.device, host.class),
            (0x8086, 0x29c0, 0x060000)
        );
        assert_eq!(host.driver, None);
        assert_eq!(host.iommu_group, None);
        assert_eq!(host.driver_override, None);
        assert_eq!(host.name(), "Intel Q35 host bridge");
        let edu = &devs[1];
        assert_eq!(edu.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(edu.iommu_group, Some(3));
        assert_eq!(edu.subsystem_vendor, Some(0x1af4));
        assert_eq!(edu.subsystem_device, Some(0x1100));
        assert_eq!(edu.name(), "QEMU edu");
        let nvme = &devs[2];
        assert_eq!(nvme.driver.as_deref(), Some("nvme"));
        assert_eq!(nvme.driver_override.as_deref(), Some("vfio-pci"));
        assert_eq!(nvme.name(), "QEMU NVMe");
        // No PCI bus at all: an empty list, not an error.
        let empty = SysRoot::at(fake.path("nonexistent"));
        assert!(list(&empty).unwrap().is_empty());
        assert!(!HostSupport::read(&empty).pci_bus);
    }

    #[test]
    fn pci_names_come_from_the_table_or_vendor_and_class() {
        assert_eq!(device_name(0x1af4, 0x1041), Some("virtio net"));
        assert_eq!(device_name(0x1af4, 0x1001), Some("virtio block"));
        assert_eq!(device_name(0x1af4, 0x1053), Some("virtio vsock"));
        let d = |vendor, device, class| PciDevice {
            bdf: bdf("00:01.0"),
            vendor,
            device,
            class,
            subsystem_vendor: None,
            subsystem_device: None,
            driver: None,
            iommu_group: None,
            driver_override: None,
        };
        assert_eq!(d(0x8086, 0x0d57, 0x060000).name(), "Intel host bridge");
        assert_eq!(d(0xabcd, 0x0001, 0x010802).name(), "NVMe controller");
        assert_eq!(d(0xabcd, 0x0001, 0x020000).name(), "Ethernet controller");
    }

    #[test]
    fn pci_read_of_a_missing_device_says_so() {
        let fake = FakeSys::new("missing");
        match PciDevice::read(&fake.root, bdf("0000:ff:1f.7")) {
            Err(Error::NoSuchPciDevice { bdf: b, path }) => {
                assert_eq!(b, "0000:ff:1f.7");
                assert!(path.ends_with("sys/bus/pci/devices/0000:ff:1f.7"));
            }
            other => panic!("{other:?}"),
        }
    }

    fn verdict(fake: &FakeSys, b: &str) -> Result<(), VfioUnusable> {
        PciDevice::read(&fake.root, bdf(b))
            .unwrap()
            .vfio_usable(&fake.root)
    }

    #[test]
    fn pci_verdict_usable() {
        let fake = FakeSys::new("usable");
        fake.device(
            "0000:00:04.0",
            (0x1234, 0x11e8),
            0x00ff00,
            Some("vfio-pci"),
            Some(3),
        )
        .dev_node(3);
        assert_eq!(verdict(&fake, "0000:00:04.0"), Ok(()));
        assert_eq!(vfio_group(&fake.root, bdf("0000:00:04.0")).unwrap(), 3);
    }

    #[test]
    fn pci_verdict_no_iommu_group() {
        let fake = FakeSys::new("nogroup");
        fake.driver("vfio-pci").device(
            "0000:00:04.0",
            (0x1af4, 0x1041),
            0x020000,
            Some("virtio-pci"),
            None,
        );
        let v = verdict(&fake, "0000:00:04.0");
        assert_eq!(v, Err(VfioUnusable::NoIommuGroup));
        assert!(v.unwrap_err().hint().contains("intel_iommu=on"));
        let host = HostSupport::read(&fake.root);
        assert_eq!(host.iommu_groups, 0);
        let p = host.problems().join("\n");
        assert!(
            p.contains("no IOMMU groups") && p.contains("intel_iommu=on"),
            "{p}"
        );
        assert!(!p.contains("vfio-pci is not loaded"), "{p}");
    }

    #[test]
    fn pci_verdict_vfio_pci_not_loaded() {
        let fake = FakeSys::new("noload");
        fake.device(
            "0000:00:04.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            Some(3),
        );
        let v = verdict(&fake, "0000:00:04.0");
        assert_eq!(v, Err(VfioUnusable::VfioPciNotLoaded));
        assert!(v.unwrap_err().hint().contains("modprobe vfio-pci"));
        let p = HostSupport::read(&fake.root).problems().join("\n");
        assert!(
            p.contains("modprobe vfio-pci") && !p.contains("no IOMMU groups"),
            "{p}"
        );
    }

    #[test]
    fn pci_verdict_bound_to_another_driver_or_none() {
        let fake = FakeSys::new("other");
        fake.driver("vfio-pci")
            .device(
                "0000:00:04.0",
                (0x1b36, 0x0010),
                0x010802,
                Some("nvme"),
                Some(3),
            )
            .device("0000:00:05.0", (0x1234, 0x11e8), 0x00ff00, None, Some(4));
        let v = verdict(&fake, "0000:00:04.0");
        assert_eq!(v, Err(VfioUnusable::BoundToOther("nvme".into())));
        let v = v.unwrap_err();
        assert!(v.to_string().contains("nvme") && v.hint().contains("userptr bind"));
        let v = verdict(&fake, "0000:00:05.0");
        assert_eq!(v, Err(VfioUnusable::NotBound));
        assert!(v.unwrap_err().hint().contains("userptr bind"));
    }

    #[test]
    fn pci_verdict_dev_node_missing_or_inaccessible() {
        let fake = FakeSys::new("node");
        fake.device(
            "0000:00:04.0",
            (0x1234, 0x11e8),
            0x00ff00,
            Some("vfio-pci"),
            Some(7),
        );
        assert_eq!(
            verdict(&fake, "0000:00:04.0"),
            Err(VfioUnusable::DevNodeMissing { group: 7 })
        );
        // Permission bits do not stop root, so check the errno mapping directly.
        let denied = access_verdict(7, Err(io::Error::from_raw_os_error(libc::EACCES)));
        let v = denied.unwrap_err();
        assert_eq!(
            v,
            VfioUnusable::DevNodeNoAccess {
                group: 7,
                errno: libc::EACCES
            }
        );
        assert!(
            v.to_string().contains("/dev/vfio/7 is not accessible"),
            "{v}"
        );
        assert!(v.hint().contains("root"));
        let missing = access_verdict(7, Err(io::Error::from_raw_os_error(libc::ENOENT)));
        assert_eq!(missing, Err(VfioUnusable::DevNodeMissing { group: 7 }));
    }

    #[test]
    fn pci_verdict_bridge() {
        let fake = FakeSys::new("bridge");
        fake.device(
            "0000:00:1c.0",
            (0x1b36, 0x000c),
            0x060400,
            Some("pcieport"),
            Some(1),
        );
        assert_eq!(verdict(&fake, "0000:00:1c.0"), Err(VfioUnusable::Bridge));
    }

    #[test]
    fn pci_group_viability() {
        let fake = FakeSys::new("viable");
        fake.device(
            "0000:01:00.0",
            (0x10de, 0x1eb8),
            0x030000,
            Some("vfio-pci"),
            Some(9),
        )
        .device(
            "0000:01:00.1",
            (0x10de, 0x10f8),
            0x040300,
            Some("snd_hda_intel"),
            Some(9),
        )
        .device(
            "0000:00:01.0",
            (0x8086, 0x1901),
            0x060400,
            Some("pcieport"),
            Some(9),
        )
        .device("0000:01:00.2", (0x10de, 0x1ad8), 0x0c0330, None, Some(9))
        .device(
            "0000:01:00.3",
            (0x10de, 0x1ad9),
            0x0c8000,
            Some("pci-stub"),
            Some(9),
        )
        .dev_node(9);
        let v = verdict(&fake, "0000:01:00.0");
        assert_eq!(
            v,
            Err(VfioUnusable::GroupNotViable {
                group: 9,
                blockers: vec![("0000:01:00.1".into(), "snd_hda_intel".into())],
            })
        );
        let v = v.unwrap_err();
        assert!(
            v.to_string()
                .contains("IOMMU group 9 is not viable: 0000:01:00.1 is bound to snd_hda_intel"),
            "{v}"
        );
        assert!(v.hint().contains("every device of the group"));
        match vfio_group(&fake.root, bdf("0000:01:00.0")) {
            Err(e @ Error::PciVfioUnusable { .. }) => {
                assert!(e.to_string().contains("snd_hda_intel"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // Move the audio function to vfio-pci as well: the group becomes viable.
        let audio = fake.root.device_dir(bdf("0000:01:00.1")).join("driver");
        fs::remove_file(&audio).unwrap();
        symlink("../../drivers/vfio-pci", &audio).unwrap();
        assert_eq!(verdict(&fake, "0000:01:00.0"), Ok(()));
        assert!(group_blockers(&fake.root, 9, None).is_empty());
    }

    #[test]
    fn pci_bind_checks_before_writing_anything() {
        let fake = FakeSys::new("bindpre");
        fake.device(
            "0000:00:04.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            None,
        )
        .device(
            "0000:00:05.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            Some(3),
        );
        let override_of = |b: &str| {
            fs::read_to_string(fake.root.device_dir(bdf(b)).join("driver_override")).unwrap()
        };
        match bind_vfio(&fake.root, bdf("0000:ff:1f.7")) {
            Err(e @ Error::NoSuchPciDevice { .. }) => {
                assert!(e.to_string().contains("userptr list"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        match bind_vfio(&fake.root, bdf("0000:00:04.0")) {
            Err(Error::PciVfioUnusable { reason, .. })
                if reason == VfioUnusable::NoIommuGroup.to_string() => {}
            other => panic!("{other:?}"),
        }
        match bind_vfio(&fake.root, bdf("0000:00:05.0")) {
            Err(e @ Error::PciVfioUnusable { .. })
                if e.to_string()
                    .contains(&VfioUnusable::VfioPciNotLoaded.to_string()) =>
            {
                assert!(e.to_string().contains("modprobe vfio-pci"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(override_of("0000:00:04.0"), "(null)\n");
        assert_eq!(override_of("0000:00:05.0"), "(null)\n");
        let unbind = fake.root.driver_dir("nvme").join("unbind");
        assert_eq!(fs::read_to_string(unbind).unwrap(), "");
    }

    #[test]
    fn pci_bind_rolls_back_when_vfio_pci_does_not_take_the_device() {
        // A fake tree cannot move the `driver` link, so the probe "fails": the bind must
        // write the override, unbind, probe, see nvme still there, and roll back.
        let fake = FakeSys::new("rollback");
        fake.driver("vfio-pci").device(
            "0000:00:05.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            Some(3),
        );
        let b = bdf("0000:00:05.0");
        match bind_vfio(&fake.root, b) {
            Err(e @ Error::PciBindFailed { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("vfio-pci did not take 0000:00:05.0"), "{msg}");
                assert!(msg.contains("nvme"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(fake.root.driver_dir("nvme").join("unbind")),
            "0000:00:05.0"
        );
        assert_eq!(read(fake.root.drivers_probe()), "0000:00:05.0");
        assert_eq!(read(fake.root.device_dir(b).join("driver_override")), "\n");
    }

    #[test]
    fn pci_unbind_writes_unbind_clears_the_override_and_leaves_others_alone() {
        let fake = FakeSys::new("unbind");
        fake.device(
            "0000:00:04.0",
            (0x1234, 0x11e8),
            0x00ff00,
            Some("vfio-pci"),
            Some(3),
        )
        .device(
            "0000:00:05.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            Some(4),
        );
        let dir = fake.root.device_dir(bdf("0000:00:04.0"));
        fs::write(dir.join("driver_override"), "vfio-pci\n").unwrap();
        // The fake `driver` link cannot go away, so the device "stays" on vfio-pci.
        let now = unbind_vfio(&fake.root, bdf("0000:00:04.0")).unwrap();
        assert_eq!(now.as_deref(), Some("vfio-pci"));
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(fake.root.driver_dir("vfio-pci").join("unbind")),
            "0000:00:04.0"
        );
        assert_eq!(read(dir.join("driver_override")), "\n");
        // Bound to a host driver without our override: nothing is written.
        let now = unbind_vfio(&fake.root, bdf("0000:00:05.0")).unwrap();
        assert_eq!(now.as_deref(), Some("nvme"));
        assert_eq!(read(fake.root.driver_dir("nvme").join("unbind")), "");
        assert!(matches!(
            unbind_vfio(&fake.root, bdf("0000:ff:1f.7")),
            Err(Error::NoSuchPciDevice { .. })
        ));
    }

    #[test]
    fn pci_sysfs_errors_name_the_cause() {
        let e = Error::pci_sysfs(
            "set driver_override",
            bdf("0000:00:04.0"),
            PathBuf::from("/sys/bus/pci/devices/0000:00:04.0/driver_override"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        let msg = e.to_string();
        assert!(
            msg.contains("0000:00:04.0") && msg.contains("driver_override"),
            "{msg}"
        );
        assert!(msg.contains("root"), "{msg}");
    }
}
