//! The exception hierarchy: `userptr.Error` (with `code` and `code_name`, the C API's
//! stable codes) and a subclass per family of failures, chosen from the code.
//!
//! ```text
//! Error
//!  ├─ ArgumentError        an argument outside its domain (an index past the references, ...)
//!  ├─ AddressError         ranges and memory: zero length, unmapped or read-only memory,
//!  │   │                   unregistrable memory, an operand outside its registration
//!  │   └─ ReadOnlyBufferError   a buffer that is not writable (bytes, a read-only view)
//!  ├─ PinLimitError        RLIMIT_MEMLOCK, the pin budget, mapping and IOVA limits
//!  ├─ DeviceError          the device, rings and commands
//!  │   ├─ DmaFault         a command touched memory it may not (iova, access, seqno, ring)
//!  │   └─ DeviceTimeoutError    a wait ran out
//!  └─ MonitorUnavailable   a monitor cannot run here, or conflicts with one that does
//! ```

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{create_exception, PyErr};
use userptr::AccessKind;
use userptr_capi::code::UserptrCode as C;
use userptr_capi::failure::Failure;

create_exception!(
    userptr,
    Error,
    PyException,
    "Every userptr failure; `code` and `code_name` are the C API's stable error code."
);
create_exception!(
    userptr,
    ArgumentError,
    Error,
    "An argument outside its domain."
);
create_exception!(
    userptr,
    AddressError,
    Error,
    "A range or memory the device cannot use: zero length, unmapped or read-only memory, \
     memory whose pages could be replaced, an operand outside its registration."
);
create_exception!(
    userptr,
    ReadOnlyBufferError,
    AddressError,
    "The object's buffer is read-only (bytes, a read-only memoryview or array): the device \
     may write registered memory."
);
create_exception!(
    userptr,
    PinLimitError,
    Error,
    "A pin over RLIMIT_MEMLOCK or the registry's pin budget, or past the domain's mapping \
     or IOVA limits."
);
create_exception!(
    userptr,
    DeviceError,
    Error,
    "The device, its rings or a command failed."
);
create_exception!(
    userptr,
    DmaFault,
    DeviceError,
    "A command touched an IOVA that is unmapped or lacks the permission the access needs; \
     `iova`, `access` ('read' or 'write'), `seqno` and `ring` say where."
);
create_exception!(
    userptr,
    DeviceTimeoutError,
    DeviceError,
    "A wait ran out before the commands completed (nothing was claimed: wait again)."
);
create_exception!(
    userptr,
    MonitorUnavailable,
    Error,
    "A monitor cannot run here, or conflicts with one already installed."
);

/// The exception for `f`, with `code` and `code_name` set (and, for a DMA fault,
/// `iova`, `access`, `seqno` and `ring`).
pub fn to_pyerr(py: Python<'_>, f: Failure) -> PyErr {
    let e = match f.code {
        C::NullPointer | C::InvalidArgument => ArgumentError::new_err(f.message),
        C::OperandRange
        | C::ZeroLength
        | C::Unaligned
        | C::Overflow
        | C::BadAddress
        | C::UnsupportedMemory
        | C::ReplaceablePages
        | C::BackingUnknown => AddressError::new_err(f.message),
        C::PinLimit
        | C::PinAgain
        | C::PinBudget
        | C::TooManyMappings
        | C::MappingTooLarge
        | C::BatchTooLarge
        | C::IovaExhausted => PinLimitError::new_err(f.message),
        C::DmaFault => DmaFault::new_err(f.message),
        C::Timeout | C::DeviceTimeout => DeviceTimeoutError::new_err(f.message),
        C::IovaOutOfRange
        | C::IovaBusy
        | C::NotMapped
        | C::RingFull
        | C::NoSuchRing
        | C::RingBusy
        | C::RingSize
        | C::RingConfig
        | C::Descriptor
        | C::NoCompletion
        | C::RingStopped
        | C::NoRingDevice
        | C::BadDescriptor
        | C::Aborted
        | C::DeviceError
        | C::InvalidationFailed
        | C::TooManyRetries
        | C::WindowTimeout
        | C::ForeignQueue
        | C::ForeignUserptr
        | C::IoUringUnavailable
        | C::Vfio
        | C::Nvme
        | C::NvmeIommuFault
        | C::NvmeStatus
        | C::BadBdf
        | C::NoSuchPciDevice
        | C::PciSysfs
        | C::PciVfioUnusable
        | C::PciBindFailed
        | C::GpuVmUnsupported
        | C::GpuVmBusy
        | C::NoFreeVm
        | C::GpuVaBusy
        | C::VramExhausted
        | C::QueueNotAttached
        | C::NoSuchBinding
        | C::BoSize
        | C::BoLimit
        | C::BoFreed
        | C::BoForeign
        | C::BoRange
        | C::BoFaultHandlerMissing
        | C::NoAperture
        | C::BoNotShareable => DeviceError::new_err(f.message),
        C::MonitorUnavailable | C::MonitorConflict => MonitorUnavailable::new_err(f.message),
        C::Ok | C::Panic | C::Sys | C::ForkedChild => Error::new_err(f.message),
    };
    let v = e.value(py);
    // An exception instance takes attributes; should one not, the exception is still
    // raised with its message.
    let _ = v.setattr("code", f.code as i32);
    let _ = v.setattr("code_name", f.code.name().to_str().unwrap_or_default());
    if let Some(fault) = f.fault {
        let access = match fault.record.access {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
        };
        let _ = v.setattr("iova", fault.record.iova);
        let _ = v.setattr("access", access);
        let _ = v.setattr("seqno", fault.seqno);
        let _ = v.setattr("ring", fault.ring);
    }
    e
}

/// Register the exception classes in the module.
pub fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("ArgumentError", py.get_type::<ArgumentError>())?;
    m.add("AddressError", py.get_type::<AddressError>())?;
    m.add("ReadOnlyBufferError", py.get_type::<ReadOnlyBufferError>())?;
    m.add("PinLimitError", py.get_type::<PinLimitError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("DmaFault", py.get_type::<DmaFault>())?;
    m.add("DeviceTimeoutError", py.get_type::<DeviceTimeoutError>())?;
    m.add("MonitorUnavailable", py.get_type::<MonitorUnavailable>())?;
    Ok(())
}
