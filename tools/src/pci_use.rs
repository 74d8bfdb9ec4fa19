//! Whether the system is using a PCI function, so that `bind` does not take it away
//! (as `dpdk-devbind.py` and SPDK's `setup.sh` refuse to): a disk with a mounted
//! filesystem or active swap on it (or on a partition, or on a device-mapper / md
//! device built on it), a network interface that is up, the boot VGA device.
//!
//! Everything is read under a [`SysRoot`] (`--sysroot`), so a fake tree tests it:
//! * block devices: `sys/class/block/*` whose sysfs path lies under the function's
//!   (NVMe namespaces, SATA/SCSI disks, virtio-blk, their partitions), each with its
//!   `dev` (major:minor) and `holders/`;
//! * mounts: `proc/self/mountinfo` (field 3, major:minor, and the mount source), swap:
//!   `proc/swaps`;
//! * network interfaces: `sys/class/net/*` under the function, `flags` (IFF_UP) and
//!   `operstate`;
//! * `sys/bus/pci/devices/<bdf>/boot_vga`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use userptr::driver::vfio::pci::{Bdf, SysRoot};

/// One reason the system is using the function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InUse {
    /// A filesystem on `dev` (the function's disk or one built on it) is mounted.
    Mounted { dev: String, on: String },
    /// Swap is active on `dev`.
    Swap { dev: String },
    /// Network interface `name` is up.
    InterfaceUp { name: String },
    /// The firmware's boot display device (the console may be on it).
    BootVga,
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InUse::Mounted { dev, on } => write!(f, "/dev/{dev} is mounted on {on}"),
            InUse::Swap { dev } => write!(f, "/dev/{dev} is active swap"),
            InUse::InterfaceUp { name } => write!(f, "network interface {name} is up"),
            InUse::BootVga => write!(f, "it is the boot VGA device (the console may be on it)"),
        }
    }
}

fn read(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The entries of a class directory (`sys/class/block`, `sys/class/net`) whose
/// device lies under `dev_dir`: (name, its sysfs directory).
fn class_members(root: &SysRoot, class: &str, dev_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(dev) = fs::canonicalize(dev_dir) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(root.root().join("sys/class").join(class)) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let path = fs::canonicalize(e.path()).ok()?;
            path.starts_with(&dev)
                .then(|| (e.file_name().to_string_lossy().into_owned(), path))
        })
        .collect();
    out.sort();
    out
}

/// Block devices on the function, and everything stacked on them (holders: dm, md),
/// as (name, major:minor).
fn block_devices(root: &SysRoot, dev_dir: &Path) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<(String, PathBuf)> = class_members(root, "block", dev_dir);
    let mut out = Vec::new();
    while let Some((name, dir)) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(dev) = read(&dir.join("dev")) {
            out.push((name.clone(), dev));
        }
        // Partitions are subdirectories with a `partition` file; holders link to the
        // devices built on this one.
        if let Ok(sub) = fs::read_dir(&dir) {
            for e in sub.flatten() {
                if e.path().join("partition").exists() {
                    todo.push((e.file_name().to_string_lossy().into_owned(), e.path()));
                }
            }
        }
        if let Ok(h) = fs::read_dir(dir.join("holders")) {
            for e in h.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let p = root.root().join("sys/class/block").join(&n);
                let p = fs::canonicalize(&p).unwrap_or(p);
                todo.push((n, p));
            }
        }
    }
    out.sort();
    out
}

/// Why the system is using `bdf` (empty: it is not, as far as sysfs and /proc show).
pub fn in_use(root: &SysRoot, bdf: Bdf) -> Vec<InUse> {
    let dir = root.device_dir(bdf);
    let mut out = Vec::new();
    let disks = block_devices(root, &dir);
    if !disks.is_empty() {
        let mountinfo = read(&root.root().join("proc/self/mountinfo")).unwrap_or_default();
        for line in mountinfo.lines() {
            // id parent major:minor root mountpoint options... - fstype source super
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(majmin), Some(on)) = (f.get(2), f.get(4)) else {
                continue;
            };
            let source = line
                .split(" - ")
                .nth(1)
                .and_then(|s| s.split_whitespace().nth(1))
                .unwrap_or("");
            for (name, dev) in &disks {
                if majmin == dev || source == format!("/dev/{name}") {
                    out.push(InUse::Mounted {
                        dev: name.clone(),
                        on: on.replace("\\040", " "),
                    });
                }
            }
        }
        let swaps = read(&root.root().join("proc/swaps")).unwrap_or_default();
        for line in swaps.lines().skip(1) {
            let Some(src) = line.split_whitespace().next() else {
                continue;
            };
            for (name, _) in &disks {
                if src == format!("/dev/{name}") {
                    out.push(InUse::Swap { dev: name.clone() });
                }
            }
        }
    }
    for (name, ndir) in class_members(root, "net", &dir) {
        let flags = read(&ndir.join("flags"))
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok());
        let oper = read(&ndir.join("operstate")).unwrap_or_default();
        if flags.is_some_and(|f| f & 1 != 0) || oper == "up" {
            out.push(InUse::InterfaceUp { name });
        }
    }
    if read(&dir.join("boot_vga")).as_deref() == Some("1") {
        out.push(InUse::BootVga);
    }
    out.dedup();
    out
}
