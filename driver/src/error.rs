//! The driver's error type: one enum, every variant saying what was asked and why it
//! could not be done, with the errno where the kernel said no.

use std::io;
use thiserror::Error;
use userptr_ring::{DescriptorError, Status};

/// Everything the driver can refuse or fail at.
#[derive(Debug, Error)]
pub enum Error {
    #[error("zero-length range at {addr:#x}")]
    ZeroLength { addr: u64 },
    #[error("range {addr:#x} + {len:#x} is not aligned to {align:#x} bytes")]
    Unaligned { addr: u64, len: u64, align: u64 },
    #[error("range {addr:#x} + {len:#x} overflows the address space")]
    Overflow { addr: u64, len: u64 },
    #[error(
        "host range {addr:#x} + {len:#x} cannot be pinned: it is not mapped, is PROT_NONE, \
         or is not writable (EFAULT from the kernel)"
    )]
    BadAddress { addr: u64, len: u64 },
    #[error(
        "host range {addr:#x} + {len:#x} is a file mapping the reference IOMMU cannot pin \
         (only anonymous, shmem and hugetlb memory can be registered)"
    )]
    UnsupportedMemory { addr: u64, len: u64 },
    #[error(
        "pinning {len} more bytes exceeds RLIMIT_MEMLOCK ({limit} bytes, {pinned} already \
         pinned): raise `ulimit -l` or grant CAP_IPC_LOCK"
    )]
    PinLimit { len: u64, limit: u64, pinned: u64 },
    #[error(
        "the kernel could not pin {len:#x} bytes at {addr:#x} right now (EAGAIN); the \
         registry retried and gave up: try again"
    )]
    PinAgain { addr: u64, len: u64 },
    #[error("IOVA space exhausted: no free range of {len:#x} bytes aligned to {align:#x}")]
    IovaExhausted { len: u64, align: u64 },
    #[error("IOVA range {iova:#x} + {len:#x} is outside the domain's usable IOVA ranges")]
    IovaOutOfRange { iova: u64, len: u64 },
    #[error("IOVA range {iova:#x} + {len:#x} overlaps an existing mapping")]
    IovaBusy { iova: u64, len: u64 },
    #[error("IOVA range {iova:#x} + {len:#x} is not a mapping of this domain")]
    NotMapped { iova: u64, len: u64 },
    #[error("the domain's mapping-count limit ({limit}) is reached")]
    TooManyMappings { limit: usize },
    #[error("a single mapping of {len:#x} bytes exceeds the domain's largest ({max:#x})")]
    MappingTooLarge { len: u64, max: u64 },
    #[error("io_uring is unavailable ({source}): the reference device's IOMMU needs it; {hint}")]
    IoUringUnavailable {
        source: io::Error,
        hint: &'static str,
    },
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ring {ring} is full ({size} commands in flight)")]
    RingFull { ring: u32, size: u32 },
    #[error("ring {ring} does not exist: the device has {count} rings")]
    NoSuchRing { ring: u32, count: u32 },
    #[error("ring {ring} is already in use")]
    RingBusy { ring: u32 },
    #[error("invalid ring size: {0}")]
    RingSize(#[from] userptr_ring::GeometryError),
    #[error("the device refused ring {ring}'s configuration (error code {code})")]
    RingConfig { ring: u32, code: u32 },
    #[error("invalid descriptor: {0}")]
    Descriptor(#[from] DescriptorError),
    #[error("timed out after {waited_ms} ms waiting for fence {seqno} on ring {ring}")]
    Timeout {
        ring: u32,
        seqno: u64,
        waited_ms: u64,
    },
    #[error("command {seqno} on ring {ring} failed: {status:?}{}", fault_text(.fault))]
    Command {
        ring: u32,
        seqno: u64,
        status: Status,
        fault: Option<userptr_ring::FaultRecord>,
    },
    #[error(
        "no completion for seqno {seqno} on ring {ring}: never submitted, already claimed, \
         or dropped unclaimed"
    )]
    NoCompletion { ring: u32, seqno: u64 },
    #[error(
        "this is a fork child: it has no device mappings and must not touch the \
         parent's device (open a new Driver after exec)"
    )]
    ForkedChild,
    #[error(
        "pinning {len:#x} bytes would exceed the pin budget ({budget:#x} bytes) even after \
         evicting every idle mapping; raise the budget (RLIMIT_MEMLOCK) or register less"
    )]
    PinBudget { len: u64, budget: u64 },
    #[error("invalidation of {start:#x}..{end:#x} gave up waiting for the device: {reason}")]
    InvalidationFailed {
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("the {monitor} monitor is unavailable: {reason}")]
    MonitorUnavailable {
        monitor: &'static str,
        reason: String,
    },
    #[error("cannot install the monitor: {what}")]
    MonitorConflict { what: &'static str },
    #[error("the device did not finish {what} within {waited_ms} ms")]
    DeviceTimeout { what: &'static str, waited_ms: u64 },
    #[error("ring {ring} stopped: {reason}")]
    RingStopped { ring: u32, reason: String },
    #[error("VFIO {op} on {device} failed: {reason}{}; likely cause: {hint}", errno_text(*.errno))]
    Vfio {
        /// The operation (`VFIO_IOMMU_MAP_DMA`, `open group`, ...).
        op: &'static str,
        /// The device (a PCI address) or `container`.
        device: String,
        /// What the kernel or the crate said.
        reason: String,
        /// The errno, where the kernel gave one.
        errno: Option<i32>,
        /// The likely cause, in words.
        hint: &'static str,
    },
    #[error("{device} has no userptr ring-protocol device (it is driven by its own engine)")]
    NoRingDevice { device: String },
    #[error("NVMe {what} on {device} failed: {reason}")]
    Nvme {
        what: &'static str,
        device: String,
        reason: String,
    },
    #[error(
        "NVMe command {opcode:#04x} (cid {cid}) completed, but the IOMMU blocked its DMA at \
         IOVA {iova:#x} ({reason}): its data did not reach memory"
    )]
    NvmeIommuFault {
        opcode: u8,
        cid: u16,
        iova: u64,
        reason: String,
    },
    #[error("NVMe command {opcode:#04x} (cid {cid}) failed: status {status:#06x} ({text})")]
    NvmeStatus {
        opcode: u8,
        cid: u16,
        status: u16,
        text: &'static str,
    },
    #[error(
        "invalid PCI address `{input}`: {reason}; expected DDDD:BB:DD.F or BB:DD.F in hex, \
         e.g. 0000:00:04.0"
    )]
    BadBdf { input: String, reason: &'static str },
    #[error(
        "no PCI device {bdf}: {} does not exist; `userptr list` shows the devices present",
        .path.display()
    )]
    NoSuchPciDevice {
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        path: std::path::PathBuf,
    },
    #[error("{bdf}: {op} failed ({}): {source}; likely cause: {hint}", .path.display())]
    PciSysfs {
        /// What was being done (`set driver_override`, `unbind from its driver`, ...).
        op: &'static str,
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        /// The sysfs file read or written.
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
        /// The likely cause, from the errno.
        hint: &'static str,
    },
    #[error("{bdf} cannot be used through VFIO: {reason}; {hint}")]
    PciVfioUnusable {
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        /// Why (`vfio::pci::VfioUnusable`, in words).
        reason: String,
        /// What to do about it.
        hint: &'static str,
    },
    #[error(
        "vfio-pci did not take {bdf}; rolled back (driver_override cleared, device \
         re-probed: now {}); `dmesg` says why vfio-pci refused it",
        driver_text(.driver)
    )]
    PciBindFailed {
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        /// The driver the device is on after the roll-back.
        driver: Option<String>,
    },
}

fn driver_text(d: &Option<String>) -> String {
    match d {
        Some(d) => format!("bound to {d}"),
        None => "unbound".to_string(),
    }
}

fn errno_text(errno: Option<i32>) -> String {
    match errno {
        Some(e) => format!(" ({})", io::Error::from_raw_os_error(e)),
        None => String::new(),
    }
}

fn fault_text(f: &Option<userptr_ring::FaultRecord>) -> String {
    match f {
        Some(f) => format!(" ({:?} fault at IOVA {:#x})", f.access, f.iova),
        None => String::new(),
    }
}

/// The driver's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
