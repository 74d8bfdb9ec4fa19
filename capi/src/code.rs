//! The stable error codes: one per [`userptr::Error`] variant (a failed command one per
//! completion status), plus the few that only the bindings produce (a null pointer, a
//! bad argument, an operand outside its registration, a caught panic).
//!
//! The numbers are ABI: they never change once published, new ones are appended in
//! their family's range. The mapping is one exhaustive `match`, so a new driver error
//! does not compile until it has a code.

use std::ffi::CStr;
use userptr::{Error, Status};

/// What a call returned: `USERPTR_CODE_OK` (0) or the error's code. The message of the
/// failure is in `userptr_last_error_message()`.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UserptrCode {
    /// Success.
    Ok = 0,

    // The bindings' own (1..9).
    /// A pointer argument that must not be NULL was NULL.
    NullPointer = 1,
    /// An argument outside its domain: an unknown enum value or flag, a reference
    /// index past the references array, a fence of another ring, no commands.
    InvalidArgument = 2,
    /// A command operand (offset + length) that does not lie inside its registration.
    OperandRange = 3,
    /// A Rust panic inside the library, caught at the boundary (a bug: please report).
    Panic = 4,

    // Ranges and memory (10..19).
    /// A range of length zero.
    ZeroLength = 10,
    /// A range not aligned as the operation requires.
    Unaligned = 11,
    /// A range that wraps around the address space.
    Overflow = 12,
    /// Host memory the kernel would not pin: unmapped, PROT_NONE or not writable.
    BadAddress = 13,
    /// Host memory of a kind the domain cannot pin (a shared file mapping).
    UnsupportedMemory = 14,
    /// Memory whose pages could be replaced behind the pin (unsealed shared memory, a
    /// file): refused by the backing policy.
    ReplaceablePages = 15,
    /// What backs the memory could not be determined (is /proc mounted?).
    BackingUnknown = 16,

    // Pins and limits (20..29).
    /// The pin would exceed RLIMIT_MEMLOCK.
    PinLimit = 20,
    /// The kernel refused the pin for now (EAGAIN), after retries.
    PinAgain = 21,
    /// The pin does not fit the registry's pin budget, even after eviction.
    PinBudget = 22,
    /// The domain holds as many mappings as it can.
    TooManyMappings = 23,
    /// One mapping larger than the domain allows.
    MappingTooLarge = 24,
    /// A batch whose buffers cannot fit the pin budget or the mapping limit at once.
    BatchTooLarge = 25,
    /// A registration of another registry than the one it was handed to.
    ForeignUserptr = 26,

    // IOVA space (30..39).
    /// No free IOVA range of the size asked for.
    IovaExhausted = 30,
    /// An IOVA range outside the domain's usable ranges.
    IovaOutOfRange = 31,
    /// An IOVA range that overlaps an existing mapping.
    IovaBusy = 32,
    /// An IOVA range that is not a mapping of the domain.
    NotMapped = 33,

    // Rings and queues (40..49).
    /// The ring has no room for the commands now (or never: more than its size).
    RingFull = 40,
    /// A ring index the device does not have.
    NoSuchRing = 41,
    /// The ring is already open.
    RingBusy = 42,
    /// A ring size the protocol cannot use (a power of two, within the device's maximum).
    RingSize = 43,
    /// The device refused the ring's configuration.
    RingConfig = 44,
    /// A descriptor that fails validation (a zero length, a misaligned SAXPY operand).
    Descriptor = 45,
    /// No completion to claim for that fence: never submitted, or already waited for.
    NoCompletion = 46,
    /// The ring stopped (a configuration fault, a reset).
    RingStopped = 47,
    /// The driver has no ring-protocol device.
    NoRingDevice = 48,
    /// A queue of another driver than the registry's.
    ForeignQueue = 49,

    // Commands and waiting (50..59).
    /// A wait ran out before the fence was reached.
    Timeout = 50,
    /// A command touched an IOVA that is unmapped or lacks the permission the access
    /// needs; the fault's IOVA and access are in the completion and the last error.
    DmaFault = 51,
    /// The device rejected a command as malformed.
    BadDescriptor = 52,
    /// A command did not complete: the device was reset while it was queued or running.
    Aborted = 53,
    /// The device failed a command for another reason.
    DeviceError = 54,
    /// The device did not finish an operation in time.
    DeviceTimeout = 55,
    /// An invalidation gave up waiting for the device.
    InvalidationFailed = 56,
    /// A submission restarted too often (invalidations kept hitting its buffers).
    TooManyRetries = 57,
    /// An invalidation window stayed open past the registry's window timeout.
    WindowTimeout = 58,

    // The environment (60..69).
    /// A system call failed.
    Sys = 60,
    /// io_uring cannot be used (the reference device's IOMMU needs it).
    IoUringUnavailable = 61,
    /// The call was made in a fork child, which owns no device state.
    ForkedChild = 62,
    /// A monitor cannot run here (the message says why).
    MonitorUnavailable = 63,
    /// A monitor cannot be installed alongside what is already there.
    MonitorConflict = 64,

    // VFIO, NVMe, PCI (70..79).
    /// A VFIO operation failed.
    Vfio = 70,
    /// An NVMe operation failed.
    Nvme = 71,
    /// An NVMe command whose DMA the IOMMU blocked.
    NvmeIommuFault = 72,
    /// An NVMe command completed with an error status.
    NvmeStatus = 73,
    /// A PCI address that does not parse.
    BadBdf = 74,
    /// No PCI device at that address.
    NoSuchPciDevice = 75,
    /// A sysfs read or write on a PCI device failed.
    PciSysfs = 76,
    /// A device VFIO cannot use.
    PciVfioUnusable = 77,
    /// vfio-pci did not take the device.
    PciBindFailed = 78,

    // GPU virtual memory (80..89).
    /// The device has no GPU virtual memory (register map 1.1 needed).
    GpuVmUnsupported = 80,
    /// The device's GPU VMs are managed by another `Gpu` handle already.
    GpuVmBusy = 81,
    /// Every VM context of the device is in use.
    NoFreeVm = 82,
    /// A GPU VA range that cannot be bound there.
    GpuVaBusy = 83,
    /// Device memory (page tables, the device-memory heap) ran out.
    VramExhausted = 84,
    /// A queue used with a GPU VM it is not attached to.
    QueueNotAttached = 85,
    /// No binding of the GPU VM starts at that GPU VA.
    NoSuchBinding = 86,

    // Buffer objects (90..99).
    /// A buffer object size that cannot be allocated (zero, larger than VRAM).
    BoSize = 90,
    /// As many buffer objects alive as the fault path's table holds.
    BoLimit = 91,
    /// A buffer object used (through a handle) after it was freed.
    BoFreed = 92,
    /// A buffer object handed to a manager that did not make it.
    BoForeign = 93,
    /// A range outside a buffer object, or empty.
    BoRange = 94,
    /// A buffer-object manager started before bo::install_fault_handler().
    BoFaultHandlerMissing = 95,
    /// A device without a CPU-mappable aperture onto its memory.
    NoAperture = 96,
    /// A buffer object cannot be mapped by a second process.
    BoNotShareable = 97,
}

impl UserptrCode {
    /// Every code, in numeric order.
    pub const ALL: [UserptrCode; 71] = {
        use UserptrCode::*;
        [
            Ok,
            NullPointer,
            InvalidArgument,
            OperandRange,
            Panic,
            ZeroLength,
            Unaligned,
            Overflow,
            BadAddress,
            UnsupportedMemory,
            ReplaceablePages,
            BackingUnknown,
            PinLimit,
            PinAgain,
            PinBudget,
            TooManyMappings,
            MappingTooLarge,
            BatchTooLarge,
            ForeignUserptr,
            IovaExhausted,
            IovaOutOfRange,
            IovaBusy,
            NotMapped,
            RingFull,
            NoSuchRing,
            RingBusy,
            RingSize,
            RingConfig,
            Descriptor,
            NoCompletion,
            RingStopped,
            NoRingDevice,
            ForeignQueue,
            Timeout,
            DmaFault,
            BadDescriptor,
            Aborted,
            DeviceError,
            DeviceTimeout,
            InvalidationFailed,
            TooManyRetries,
            WindowTimeout,
            Sys,
            IoUringUnavailable,
            ForkedChild,
            MonitorUnavailable,
            MonitorConflict,
            Vfio,
            Nvme,
            NvmeIommuFault,
            NvmeStatus,
            BadBdf,
            NoSuchPciDevice,
            PciSysfs,
            PciVfioUnusable,
            PciBindFailed,
            GpuVmUnsupported,
            GpuVmBusy,
            NoFreeVm,
            GpuVaBusy,
            VramExhausted,
            QueueNotAttached,
            NoSuchBinding,
            BoSize,
            BoLimit,
            BoFreed,
            BoForeign,
            BoRange,
            BoFaultHandlerMissing,
            NoAperture,
            BoNotShareable,
        ]
    };

    /// The code of a driver error.
    pub fn of(e: &Error) -> UserptrCode {
        use UserptrCode as C;
        match e {
            Error::ZeroLength { .. } => C::ZeroLength,
            Error::Unaligned { .. } => C::Unaligned,
            Error::Overflow { .. } => C::Overflow,
            Error::BadAddress { .. } => C::BadAddress,
            Error::UnsupportedMemory { .. } => C::UnsupportedMemory,
            Error::ReplaceablePages { .. } => C::ReplaceablePages,
            Error::BackingUnknown { .. } => C::BackingUnknown,
            Error::PinLimit { .. } => C::PinLimit,
            Error::PinAgain { .. } => C::PinAgain,
            Error::IovaExhausted { .. } => C::IovaExhausted,
            Error::IovaOutOfRange { .. } => C::IovaOutOfRange,
            Error::IovaBusy { .. } => C::IovaBusy,
            Error::NotMapped { .. } => C::NotMapped,
            Error::TooManyMappings { .. } => C::TooManyMappings,
            Error::MappingTooLarge { .. } => C::MappingTooLarge,
            Error::IoUringUnavailable { .. } => C::IoUringUnavailable,
            Error::Sys { .. } => C::Sys,
            Error::RingFull { .. } => C::RingFull,
            Error::NoSuchRing { .. } => C::NoSuchRing,
            Error::RingBusy { .. } => C::RingBusy,
            Error::RingSize(_) => C::RingSize,
            Error::RingConfig { .. } => C::RingConfig,
            Error::Descriptor(_) => C::Descriptor,
            Error::Timeout { .. } => C::Timeout,
            Error::Command { status, .. } => UserptrCode::of_status(*status),
            Error::NoCompletion { .. } => C::NoCompletion,
            Error::ForkedChild => C::ForkedChild,
            Error::PinBudget { .. } => C::PinBudget,
            Error::BatchTooLarge { .. } => C::BatchTooLarge,
            Error::TooManyRetries { .. } => C::TooManyRetries,
            Error::WindowTimeout { .. } => C::WindowTimeout,
            Error::ForeignQueue { .. } => C::ForeignQueue,
            Error::ForeignUserptr { .. } => C::ForeignUserptr,
            Error::InvalidationFailed { .. } => C::InvalidationFailed,
            Error::MonitorUnavailable { .. } => C::MonitorUnavailable,
            Error::MonitorConflict { .. } => C::MonitorConflict,
            Error::DeviceTimeout { .. } => C::DeviceTimeout,
            Error::RingStopped { .. } => C::RingStopped,
            Error::Vfio { .. } => C::Vfio,
            Error::NoRingDevice { .. } => C::NoRingDevice,
            Error::Nvme { .. } => C::Nvme,
            Error::NvmeIommuFault { .. } => C::NvmeIommuFault,
            Error::NvmeStatus { .. } => C::NvmeStatus,
            Error::BadBdf { .. } => C::BadBdf,
            Error::NoSuchPciDevice { .. } => C::NoSuchPciDevice,
            Error::PciSysfs { .. } => C::PciSysfs,
            Error::PciVfioUnusable { .. } => C::PciVfioUnusable,
            Error::PciBindFailed { .. } => C::PciBindFailed,
            Error::GpuVmUnsupported { .. } => C::GpuVmUnsupported,
            Error::GpuVmBusy { .. } => C::GpuVmBusy,
            Error::NoFreeVm { .. } => C::NoFreeVm,
            Error::GpuVaBusy { .. } => C::GpuVaBusy,
            Error::VramExhausted { .. } => C::VramExhausted,
            Error::QueueNotAttached { .. } => C::QueueNotAttached,
            Error::NoSuchBinding { .. } => C::NoSuchBinding,
            Error::BoSize { .. } => C::BoSize,
            Error::BoLimit { .. } => C::BoLimit,
            Error::BoFreed { .. } => C::BoFreed,
            Error::BoForeign { .. } => C::BoForeign,
            Error::BoRange { .. } => C::BoRange,
            Error::BoFaultHandlerMissing => C::BoFaultHandlerMissing,
            Error::NoAperture { .. } => C::NoAperture,
            Error::BoNotShareable { .. } => C::BoNotShareable,
        }
    }

    /// The code of a command that completed with `status` (`Ok` for `Status::Ok`).
    pub fn of_status(status: Status) -> UserptrCode {
        match status {
            Status::Ok => UserptrCode::Ok,
            Status::DmaFault => UserptrCode::DmaFault,
            Status::BadDescriptor => UserptrCode::BadDescriptor,
            Status::Aborted => UserptrCode::Aborted,
            Status::DeviceError => UserptrCode::DeviceError,
        }
    }

    /// The code with this number, if there is one.
    pub fn from_i32(v: i32) -> Option<UserptrCode> {
        UserptrCode::ALL.iter().copied().find(|c| *c as i32 == v)
    }

    /// The code's name as the header spells it (`USERPTR_CODE_BAD_ADDRESS`).
    pub fn name(self) -> &'static CStr {
        use UserptrCode::*;
        match self {
            Ok => c"USERPTR_CODE_OK",
            NullPointer => c"USERPTR_CODE_NULL_POINTER",
            InvalidArgument => c"USERPTR_CODE_INVALID_ARGUMENT",
            OperandRange => c"USERPTR_CODE_OPERAND_RANGE",
            Panic => c"USERPTR_CODE_PANIC",
            ZeroLength => c"USERPTR_CODE_ZERO_LENGTH",
            Unaligned => c"USERPTR_CODE_UNALIGNED",
            Overflow => c"USERPTR_CODE_OVERFLOW",
            BadAddress => c"USERPTR_CODE_BAD_ADDRESS",
            UnsupportedMemory => c"USERPTR_CODE_UNSUPPORTED_MEMORY",
            ReplaceablePages => c"USERPTR_CODE_REPLACEABLE_PAGES",
            BackingUnknown => c"USERPTR_CODE_BACKING_UNKNOWN",
            PinLimit => c"USERPTR_CODE_PIN_LIMIT",
            PinAgain => c"USERPTR_CODE_PIN_AGAIN",
            PinBudget => c"USERPTR_CODE_PIN_BUDGET",
            TooManyMappings => c"USERPTR_CODE_TOO_MANY_MAPPINGS",
            MappingTooLarge => c"USERPTR_CODE_MAPPING_TOO_LARGE",
            BatchTooLarge => c"USERPTR_CODE_BATCH_TOO_LARGE",
            ForeignUserptr => c"USERPTR_CODE_FOREIGN_USERPTR",
            ForeignQueue => c"USERPTR_CODE_FOREIGN_QUEUE",
            TooManyRetries => c"USERPTR_CODE_TOO_MANY_RETRIES",
            WindowTimeout => c"USERPTR_CODE_WINDOW_TIMEOUT",
            IovaExhausted => c"USERPTR_CODE_IOVA_EXHAUSTED",
            IovaOutOfRange => c"USERPTR_CODE_IOVA_OUT_OF_RANGE",
            IovaBusy => c"USERPTR_CODE_IOVA_BUSY",
            NotMapped => c"USERPTR_CODE_NOT_MAPPED",
            RingFull => c"USERPTR_CODE_RING_FULL",
            NoSuchRing => c"USERPTR_CODE_NO_SUCH_RING",
            RingBusy => c"USERPTR_CODE_RING_BUSY",
            RingSize => c"USERPTR_CODE_RING_SIZE",
            RingConfig => c"USERPTR_CODE_RING_CONFIG",
            Descriptor => c"USERPTR_CODE_DESCRIPTOR",
            NoCompletion => c"USERPTR_CODE_NO_COMPLETION",
            RingStopped => c"USERPTR_CODE_RING_STOPPED",
            NoRingDevice => c"USERPTR_CODE_NO_RING_DEVICE",
            Timeout => c"USERPTR_CODE_TIMEOUT",
            DmaFault => c"USERPTR_CODE_DMA_FAULT",
            BadDescriptor => c"USERPTR_CODE_BAD_DESCRIPTOR",
            Aborted => c"USERPTR_CODE_ABORTED",
            DeviceError => c"USERPTR_CODE_DEVICE_ERROR",
            DeviceTimeout => c"USERPTR_CODE_DEVICE_TIMEOUT",
            InvalidationFailed => c"USERPTR_CODE_INVALIDATION_FAILED",
            Sys => c"USERPTR_CODE_SYS",
            IoUringUnavailable => c"USERPTR_CODE_IO_URING_UNAVAILABLE",
            ForkedChild => c"USERPTR_CODE_FORKED_CHILD",
            MonitorUnavailable => c"USERPTR_CODE_MONITOR_UNAVAILABLE",
            MonitorConflict => c"USERPTR_CODE_MONITOR_CONFLICT",
            Vfio => c"USERPTR_CODE_VFIO",
            Nvme => c"USERPTR_CODE_NVME",
            NvmeIommuFault => c"USERPTR_CODE_NVME_IOMMU_FAULT",
            NvmeStatus => c"USERPTR_CODE_NVME_STATUS",
            BadBdf => c"USERPTR_CODE_BAD_BDF",
            NoSuchPciDevice => c"USERPTR_CODE_NO_SUCH_PCI_DEVICE",
            PciSysfs => c"USERPTR_CODE_PCI_SYSFS",
            PciVfioUnusable => c"USERPTR_CODE_PCI_VFIO_UNUSABLE",
            PciBindFailed => c"USERPTR_CODE_PCI_BIND_FAILED",
            GpuVmUnsupported => c"USERPTR_CODE_GPU_VM_UNSUPPORTED",
            GpuVmBusy => c"USERPTR_CODE_GPU_VM_BUSY",
            NoFreeVm => c"USERPTR_CODE_NO_FREE_VM",
            GpuVaBusy => c"USERPTR_CODE_GPU_VA_BUSY",
            VramExhausted => c"USERPTR_CODE_VRAM_EXHAUSTED",
            QueueNotAttached => c"USERPTR_CODE_QUEUE_NOT_ATTACHED",
            NoSuchBinding => c"USERPTR_CODE_NO_SUCH_BINDING",
            BoSize => c"USERPTR_CODE_BO_SIZE",
            BoLimit => c"USERPTR_CODE_BO_LIMIT",
            BoFreed => c"USERPTR_CODE_BO_FREED",
            BoForeign => c"USERPTR_CODE_BO_FOREIGN",
            BoRange => c"USERPTR_CODE_BO_RANGE",
            BoFaultHandlerMissing => c"USERPTR_CODE_BO_FAULT_HANDLER_MISSING",
            NoAperture => c"USERPTR_CODE_NO_APERTURE",
            BoNotShareable => c"USERPTR_CODE_BO_NOT_SHAREABLE",
        }
    }
}
