//! The error type's message helpers and constructors (kept apart so that
//! `error.rs` holds the enum alone).

use super::Error;
use std::io;

pub(super) fn driver_text(d: &Option<String>) -> String {
    match d {
        Some(d) => format!("bound to {d}"),
        None => "unbound".to_string(),
    }
}

pub(super) fn errno_text(errno: Option<i32>) -> String {
    match errno {
        Some(e) => format!(" ({})", io::Error::from_raw_os_error(e)),
        None => String::new(),
    }
}

pub(super) fn fault_text(f: &Option<userptr_ring::FaultRecord>) -> String {
    match f {
        Some(f) => format!(" ({:?} fault at IOVA {:#x})", f.access, f.iova),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn sys(op: &'static str, source: io::Error) -> Error {
        Error::Sys { op, source }
    }

    /// A failed sysfs read or write on a PCI device, with the likely cause from the errno.
    pub(crate) fn pci_sysfs(
        op: &'static str,
        bdf: impl std::fmt::Display,
        path: std::path::PathBuf,
        source: io::Error,
    ) -> Error {
        let hint = match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => {
                "writing PCI sysfs attributes needs root (CAP_SYS_ADMIN): run it with sudo"
            }
            Some(libc::EROFS) => {
                "sysfs is mounted read-only here (a container?): run it on the host or in a \
                 privileged container"
            }
            Some(libc::ENOENT) => {
                "the device or the attribute is gone (hot-unplugged? a kernel without \
                 driver_override?)"
            }
            Some(libc::ENODEV) => "the kernel no longer knows the device (removed?)",
            Some(libc::EBUSY) => "the device is in use: stop whatever holds it and retry",
            _ if source.kind() == io::ErrorKind::InvalidData => {
                "sysfs shows something this tool cannot parse (an unusual kernel?)"
            }
            _ => "the kernel refused; `dmesg` says why",
        };
        Error::PciSysfs {
            op,
            bdf: bdf.to_string(),
            path,
            source,
            hint,
        }
    }
}
