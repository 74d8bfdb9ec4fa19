//! The driver's error type: one enum, every variant saying what was asked and why it
//! could not be done, with the errno where the kernel said no.

mod text;

use std::io;
use text::{driver_text, errno_text, fault_text};
use thiserror::Error;
use userptr_ring::{DescriptorError, Status};

/// Everything the driver can refuse or fail at.
#[derive(Debug, Error)]
pub enum Error {
    /// A range of length zero.
    #[error("zero-length range at {addr:#x}")]
    ZeroLength {
        /// Host virtual address.
        addr: u64,
    },
    /// A range not aligned as the operation requires.
    #[error("range {addr:#x} + {len:#x} is not aligned to {align:#x} bytes")]
    Unaligned {
        /// Host virtual address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// A range that wraps around the address space.
    #[error("range {addr:#x} + {len:#x} overflows the address space")]
    Overflow {
        /// Host virtual address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Host memory the kernel would not pin (unmapped, `PROT_NONE`, read-only).
    #[error(
        "host range {addr:#x} + {len:#x} cannot be pinned: it is not mapped, is PROT_NONE, \
         or is not writable (EFAULT from the kernel)"
    )]
    BadAddress {
        /// Host virtual address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Host memory of a kind the domain cannot pin (a file mapping).
    #[error(
        "host range {addr:#x} + {len:#x} is a file mapping the reference IOMMU cannot pin \
         (only anonymous, shmem and hugetlb memory can be registered)"
    )]
    UnsupportedMemory {
        /// Host virtual address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Memory whose pages could be replaced behind the pin without any call a monitor
    /// sees (a hole punch or truncation of the file backing it): the policy of
    /// [`crate::backing`]. Nothing stays pinned.
    #[error("host range {addr:#x} + {len:#x} cannot be registered: {reason}")]
    ReplaceablePages {
        /// Host virtual address (of the refused part of the range).
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why, and what to do instead.
        reason: crate::backing::Refusal,
    },
    /// What backs the memory could not be determined, so it is refused (fail safe).
    #[error(
        "cannot tell what backs host range {addr:#x} + {len:#x} ({source}): refused, since \
         the driver pins only memory it can classify (is /proc mounted?)"
    )]
    BackingUnknown {
        /// Host virtual address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why the lookup failed.
        #[source]
        source: io::Error,
    },
    /// The pin would exceed `RLIMIT_MEMLOCK` (the kernel said `ENOMEM`).
    #[error(
        "pinning {len} more bytes exceeds RLIMIT_MEMLOCK ({limit} bytes, {pinned} already \
         pinned): raise `ulimit -l` or grant CAP_IPC_LOCK"
    )]
    PinLimit {
        /// Length in bytes.
        len: u64,
        /// The limit.
        limit: u64,
        /// Bytes pinned already.
        pinned: u64,
    },
    /// The kernel refused the pin for now (`EAGAIN`), after retries.
    #[error(
        "the kernel could not pin {len:#x} bytes at {addr:#x} right now (EAGAIN); the \
         registry retried and gave up: try again"
    )]
    PinAgain {
        /// Host virtual address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// No free IOVA range of the size and alignment asked for.
    #[error("IOVA space exhausted: no free range of {len:#x} bytes aligned to {align:#x}")]
    IovaExhausted {
        /// Length in bytes.
        len: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// An IOVA range outside the domain's usable ranges.
    #[error("IOVA range {iova:#x} + {len:#x} is outside the domain's usable IOVA ranges")]
    IovaOutOfRange {
        /// Device address.
        iova: u64,
        /// Length in bytes.
        len: u64,
    },
    /// An IOVA range that overlaps an existing mapping.
    #[error("IOVA range {iova:#x} + {len:#x} overlaps an existing mapping")]
    IovaBusy {
        /// Device address.
        iova: u64,
        /// Length in bytes.
        len: u64,
    },
    /// An IOVA range that is not a mapping of this domain.
    #[error("IOVA range {iova:#x} + {len:#x} is not a mapping of this domain")]
    NotMapped {
        /// Device address.
        iova: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The domain holds as many mappings as it can.
    #[error("the domain's mapping-count limit ({limit}) is reached")]
    TooManyMappings {
        /// The limit.
        limit: usize,
    },
    /// One mapping larger than the domain allows.
    #[error("a single mapping of {len:#x} bytes exceeds the domain's largest ({max:#x})")]
    MappingTooLarge {
        /// Length in bytes.
        len: u64,
        /// The largest allowed, in bytes.
        max: u64,
    },
    /// io_uring cannot be used (disabled, seccomp-blocked, too old a kernel).
    #[error("io_uring is unavailable ({source}): the reference device's IOMMU needs it; {hint}")]
    IoUringUnavailable {
        /// The underlying error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The operation.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The ring has no room for the commands now.
    #[error("ring {ring} is full ({size} commands in flight)")]
    RingFull {
        /// The ring index.
        ring: u32,
        /// Slots in the ring.
        size: u32,
    },
    /// A ring index the device does not have.
    #[error("ring {ring} does not exist: the device has {count} rings")]
    NoSuchRing {
        /// The ring index.
        ring: u32,
        /// Rings the device has.
        count: u32,
    },
    /// The ring is already open.
    #[error("ring {ring} is already in use")]
    RingBusy {
        /// The ring index.
        ring: u32,
    },
    /// A ring size the protocol cannot use.
    #[error("invalid ring size: {0}")]
    RingSize(#[from] userptr_ring::GeometryError),
    /// The device refused the ring's configuration.
    #[error("the device refused ring {ring}'s configuration (error code {code})")]
    RingConfig {
        /// The ring index.
        ring: u32,
        /// The device's error code.
        code: u32,
    },
    /// A descriptor that fails validation.
    #[error("invalid descriptor: {0}")]
    Descriptor(#[from] DescriptorError),
    /// A wait ran out before the fence was reached.
    #[error("timed out after {waited_ms} ms waiting for fence {seqno} on ring {ring}")]
    Timeout {
        /// The ring index.
        ring: u32,
        /// The command's seqno.
        seqno: u64,
        /// How long it waited, in milliseconds.
        waited_ms: u64,
    },
    /// A command completed with a status other than OK.
    #[error("command {seqno} on ring {ring} failed: {status:?}{}", fault_text(.fault))]
    Command {
        /// The ring index.
        ring: u32,
        /// The command's seqno.
        seqno: u64,
        /// The completion status.
        status: Status,
        /// The DMA fault, if the command faulted.
        fault: Option<userptr_ring::FaultRecord>,
    },
    /// No completion to claim for that seqno.
    #[error(
        "no completion for seqno {seqno} on ring {ring}: never submitted, already claimed, \
         or dropped unclaimed"
    )]
    NoCompletion {
        /// The ring index.
        ring: u32,
        /// The command's seqno.
        seqno: u64,
    },
    /// The call was made in a fork child, which owns no device state.
    #[error(
        "this is a fork child: it has no device mappings and must not touch the \
         parent's device (open a new Driver after exec)"
    )]
    ForkedChild,
    /// The pin does not fit the pin budget, even after eviction.
    #[error(
        "pinning {len:#x} bytes would exceed the pin budget ({budget:#x} bytes) even after \
         evicting every idle mapping; raise the budget (RLIMIT_MEMLOCK) or register less"
    )]
    PinBudget {
        /// Length in bytes.
        len: u64,
        /// The pin budget in bytes.
        budget: u64,
    },
    /// A batch whose distinct pages cannot all be pinned at once: it would evict its
    /// own buffers.
    #[error(
        "the batch references {need:#x} bytes of distinct pages in at least {mappings} \
         mappings, but the registry pins at most {budget:#x} bytes in {max_mappings} \
         mappings at once: split it into smaller batches, or raise the pin budget \
         (RLIMIT_MEMLOCK, RegistryConfig::pin_budget)"
    )]
    BatchTooLarge {
        /// Bytes of distinct pages the batch references.
        need: u64,
        /// The pin budget in bytes.
        budget: u64,
        /// The fewest mappings the batch's buffers need.
        mappings: usize,
        /// The most mappings the registry keeps.
        max_mappings: usize,
    },
    /// An operation that kept being invalidated under it and gave up.
    #[error(
        "{what} gave up after {retries} retries: invalidations kept hitting its buffers \
         between lookup and commit; try again once the address-space changes settle"
    )]
    TooManyRetries {
        /// What was retried.
        what: &'static str,
        /// How many times.
        retries: u32,
    },
    /// An invalidation window stayed open longer than the registry waits.
    #[error(
        "an invalidation window on {start:#x}..{end:#x} stayed open for {waited_ms} ms: \
         an invalidate_start without its invalidate_end, or an address-space change that \
         does not finish"
    )]
    WindowTimeout {
        /// Start of the range waited for.
        start: u64,
        /// End of the range.
        end: u64,
        /// How long it waited, in milliseconds.
        waited_ms: u64,
    },
    /// A queue whose device does not translate through the registry's IOMMU domain.
    #[error(
        "queue {queue} belongs to a device outside this registry's IOMMU domain: its \
         device addresses would reach another device's mappings; submit through a queue \
         of the registry's own driver"
    )]
    ForeignQueue {
        /// The queue's identifier (ring or queue number).
        queue: u32,
    },
    /// A registration made by another registry: its unregistration waits only for
    /// that registry's device work, so this one may not submit it.
    #[error(
        "the registration of {addr:#x} + {len:#x} belongs to another registry: submit, \
         look up or unregister it through the registry that made it"
    )]
    ForeignUserptr {
        /// Host address of the registration.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// An invalidation could not be completed.
    #[error("invalidation of {start:#x}..{end:#x} gave up waiting for the device: {reason}")]
    InvalidationFailed {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// Why, in words.
        reason: String,
    },
    /// A monitor cannot run here.
    #[error("the {monitor} monitor is unavailable: {reason}")]
    MonitorUnavailable {
        /// Which monitor.
        monitor: &'static str,
        /// Why, in words.
        reason: String,
    },
    /// A monitor cannot be installed alongside what is already there.
    #[error("cannot install the monitor: {what}")]
    MonitorConflict {
        /// What was being done.
        what: &'static str,
    },
    /// The device did not finish an operation in time.
    #[error("the device did not finish {what} within {waited_ms} ms")]
    DeviceTimeout {
        /// What was being done.
        what: &'static str,
        /// How long it waited, in milliseconds.
        waited_ms: u64,
    },
    /// The ring stopped (a configuration or DMA fault, a reset).
    #[error("ring {ring} stopped: {reason}")]
    RingStopped {
        /// The ring index.
        ring: u32,
        /// Why, in words.
        reason: String,
    },
    /// A VFIO operation failed.
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
    /// The driver has no ring-protocol device (a domain-only driver).
    #[error("{device} has no userptr ring-protocol device (it is driven by its own engine)")]
    NoRingDevice {
        /// The device, for messages.
        device: String,
    },
    /// An NVMe operation failed.
    #[error("NVMe {what} on {device} failed: {reason}")]
    Nvme {
        /// What was being done.
        what: &'static str,
        /// The device, for messages.
        device: String,
        /// Why, in words.
        reason: String,
    },
    /// An NVMe command whose DMA the IOMMU blocked.
    #[error(
        "NVMe command {opcode:#04x} (cid {cid}) completed, but the IOMMU blocked its DMA at \
         IOVA {iova:#x} ({reason}): its data did not reach memory"
    )]
    NvmeIommuFault {
        /// The command's opcode.
        opcode: u8,
        /// The command identifier.
        cid: u16,
        /// Device address.
        iova: u64,
        /// Why, in words.
        reason: String,
    },
    /// An NVMe command that completed with an error status.
    #[error("NVMe command {opcode:#04x} (cid {cid}) failed: status {status:#06x} ({text})")]
    NvmeStatus {
        /// The command's opcode.
        opcode: u8,
        /// The command identifier.
        cid: u16,
        /// The completion status.
        status: u16,
        /// The status in words.
        text: &'static str,
    },
    /// A PCI address that does not parse.
    #[error(
        "invalid PCI address `{input}`: {reason}; expected DDDD:BB:DD.F or BB:DD.F in hex, \
         e.g. 0000:00:04.0"
    )]
    BadBdf {
        /// What was given.
        input: String,
        /// Why, in words.
        reason: &'static str,
    },
    /// No PCI device at that address.
    #[error(
        "no PCI device {bdf}: {} does not exist; `userptr list` shows the devices present",
        .path.display()
    )]
    NoSuchPciDevice {
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        /// The sysfs path.
        path: std::path::PathBuf,
    },
    /// A sysfs read or write on a PCI device failed.
    #[error("{bdf}: {op} failed ({}): {source}; likely cause: {hint}", .path.display())]
    PciSysfs {
        /// What was being done (`set driver_override`, `unbind from its driver`, ...).
        op: &'static str,
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        /// The sysfs file read or written.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
        /// The likely cause, from the errno.
        hint: &'static str,
    },
    /// A device VFIO cannot use (yet).
    #[error("{bdf} cannot be used through VFIO: {reason}; {hint}")]
    PciVfioUnusable {
        /// The PCI address, `DDDD:BB:DD.F`.
        bdf: String,
        /// Why (`vfio::pci::VfioUnusable`, in words).
        reason: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// vfio-pci did not take the device; the bind was rolled back.
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
    /// The device has no GPU virtual memory (`VM_CAPS` reads 0).
    #[error(
        "{device} has no GPU virtual memory (VM_CAPS reads 0): GPU VMs need a device with \
         register map 1.1 (the reference device)"
    )]
    GpuVmUnsupported {
        /// The device, for messages.
        device: String,
    },
    /// The device's VMs are managed by another `Gpu` handle already.
    #[error(
        "the GPU VMs of {device} are already managed by another `Gpu` in this process: \
         create VMs from that one"
    )]
    GpuVmBusy {
        /// The device, for messages.
        device: String,
    },
    /// Every VM context is in use.
    #[error("all {limit} VM contexts of the device are in use: drop a GpuVm first")]
    NoFreeVm {
        /// VM contexts the device has.
        limit: u32,
    },
    /// A GPU VA range that cannot be bound there.
    #[error("GPU VA range {va:#x} + {len:#x} cannot be bound: {reason}")]
    GpuVaBusy {
        /// First GPU VA.
        va: u64,
        /// Length in bytes.
        len: u64,
        /// Why, in words.
        reason: &'static str,
    },
    /// Device memory (page tables, the device-memory heap) ran out.
    #[error(
        "the device's {what} is exhausted ({len:#x} bytes asked for): enlarge it \
         (ReferenceConfig::gpu) or unbind something"
    )]
    VramExhausted {
        /// Which part of device memory.
        what: &'static str,
        /// Bytes asked for.
        len: u64,
    },
    /// A queue used with a VM it is not attached to.
    #[error("ring {ring} is not attached to GPU VM {vm}: call GpuVm::attach first")]
    QueueNotAttached {
        /// The ring index.
        ring: u32,
        /// The VM id.
        vm: u32,
    },
    /// No binding starts at that GPU VA.
    #[error("no binding of GPU VM {vm} starts at GPU VA {va:#x}")]
    NoSuchBinding {
        /// The VM id.
        vm: u32,
        /// The GPU VA.
        va: u64,
    },
    /// A buffer object size that cannot be allocated.
    #[error("buffer object of {len:#x} bytes refused: {reason}")]
    BoSize {
        /// Bytes asked for.
        len: u64,
        /// Why, in words.
        reason: &'static str,
    },
    /// As many buffer objects alive as the fault path's table holds.
    #[error("{limit} buffer objects are alive already (the fault path's table is full)")]
    BoLimit {
        /// The most at once.
        limit: u64,
    },
    /// A buffer object used after it was freed (through a handle).
    #[error("buffer object {id} was freed")]
    BoFreed {
        /// Its id.
        id: u64,
    },
    /// A buffer object handed to a manager that did not make it.
    #[error("buffer object {id} belongs to another BoManager")]
    BoForeign {
        /// Its id.
        id: u64,
    },
    /// A range outside a buffer object (or empty).
    #[error("range {off:#x} + {len:#x} is not inside the buffer object of {size:#x} bytes (or is empty)")]
    BoRange {
        /// Offset in the object.
        off: u64,
        /// Length.
        len: u64,
        /// The object's size.
        size: u64,
    },
    /// A buffer-object manager started before its fault handler was installed.
    #[error(
        "buffer objects need their SIGSEGV handler (process-wide): call \
         bo::install_fault_handler() first, before other threads and monitors start"
    )]
    BoFaultHandlerMissing,
    /// A device without a CPU-mappable aperture onto its memory.
    #[error("{device} has no CPU-mappable aperture onto its memory (no large BAR)")]
    NoAperture {
        /// The device.
        device: String,
    },
    /// A buffer object cannot be shared with another process.
    #[error("a buffer object cannot be mapped by a second process: {reason}")]
    BoNotShareable {
        /// Why, in words.
        reason: &'static str,
    },
}

/// The driver's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
