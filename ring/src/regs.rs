//! The BAR0 register map of a device that speaks the ring protocol: the ABI between
//! the driver (`userptr-driver`'s queues) and the device (the reference device's
//! register file and engine). `docs/reference-device.md` is the prose version of this
//! file; keep them in step.
//!
//! All registers are 32 bits wide, little-endian, at 4-byte-aligned offsets. 64-bit
//! addresses are split into `_LO`/`_HI` halves. Reads have Acquire and writes Release
//! semantics (a real device's MMIO accessors put the barriers there).

/// Size of BAR0.
pub const BAR0_SIZE: u32 = 0x1000;

/// RO: identity, `0x5550_5452`: "UPTR" read most-significant byte first (the bytes
/// in memory, little-endian, are "RTPU").
pub const ID: u32 = 0x000;
/// The value of [`ID`].
pub const ID_VALUE: u32 = 0x5550_5452;
/// RO: register-map version, major in bits 31:16, minor in 15:0.
pub const VERSION: u32 = 0x004;
/// The value of [`VERSION`]: 1.0.
pub const VERSION_VALUE: u32 = 0x0001_0000;
/// RO: capabilities. Bits 7:0 number of rings; 15:8 log2 of the largest ring;
/// 31:16 bitmap of supported opcodes (bit n: `Opcode` n).
pub const CAPS: u32 = 0x008;
/// RW: device control. See `CONTROL_*`.
pub const CONTROL: u32 = 0x00C;
/// CONTROL bit 0: the engine runs. Clear it to pause command processing.
pub const CONTROL_ENABLE: u32 = 1 << 0;
/// CONTROL bit 1 (write 1): reset. Every queued command of every ring completes with
/// status `Aborted` and its fence is written; ring configuration is kept. Self-clears
/// when done; STATUS_RESETTING is set meanwhile.
pub const CONTROL_RESET: u32 = 1 << 1;
/// RO: device status. See `STATUS_*`.
pub const STATUS: u32 = 0x010;
/// STATUS bit 0: the engine thread is alive.
pub const STATUS_ALIVE: u32 = 1 << 0;
/// STATUS bit 1: a reset is in progress.
pub const STATUS_RESETTING: u32 = 1 << 1;
/// RW1C: interrupt status, bit n for ring n. Write 1s to acknowledge.
pub const IRQ_STATUS: u32 = 0x014;
/// RW: interrupt enable, bit n for ring n. An enabled ring signals its interrupt (its
/// eventfd) after every batch of completions; a disabled one only for commands with
/// the INTERRUPT flag.
pub const IRQ_MASK: u32 = 0x018;
/// RO: DMA faults since creation.
pub const FAULT_COUNT: u32 = 0x01C;
/// RO: IOVA of the most recent DMA fault, low half.
pub const FAULT_IOVA_LO: u32 = 0x020;
/// RO: IOVA of the most recent DMA fault, high half.
pub const FAULT_IOVA_HI: u32 = 0x024;
/// RO: the most recent DMA fault: bits 7:0 access kind (1 read, 2 write), 15:8 ring.
pub const FAULT_INFO: u32 = 0x028;
/// RO: commands completed since creation (wraps).
pub const COMPLETED: u32 = 0x02C;

/// Most rings a reference device has.
pub const MAX_RINGS: u32 = 8;
/// Largest ring, log2 of the slot count.
pub const MAX_RING_LOG2: u32 = 12;
/// Offset of ring 0's register block.
pub const RING_BASE: u32 = 0x100;
/// Size of one ring's register block.
pub const RING_STRIDE: u32 = 0x40;

/// Per-ring registers, offsets inside the ring's block (see [`ring_reg`]).
pub mod ring {
    /// RW: IOVA of the submission queue (64-byte aligned), low half.
    pub const SQ_BASE_LO: u32 = 0x00;
    /// RW: IOVA of the submission queue, high half.
    pub const SQ_BASE_HI: u32 = 0x04;
    /// RW: IOVA of the completion queue (32-byte aligned), low half.
    pub const CQ_BASE_LO: u32 = 0x08;
    /// RW: IOVA of the completion queue, high half.
    pub const CQ_BASE_HI: u32 = 0x0C;
    /// RW: IOVA of the 8-byte fence word (8-byte aligned), low half.
    pub const FENCE_LO: u32 = 0x10;
    /// RW: IOVA of the fence word, high half.
    pub const FENCE_HI: u32 = 0x14;
    /// RW: log2 of the slot count of both queues.
    pub const SIZE_LOG2: u32 = 0x18;
    /// RW: bit 0 ENABLE. Setting it checks the configuration, zeroes the four index
    /// registers and starts the ring; on a bad configuration ERROR is set instead.
    pub const CONTROL: u32 = 0x1C;
    /// CONTROL bit 0.
    pub const CONTROL_ENABLE: u32 = 1;
    /// RW: submission tail, the **doorbell**: the driver writes its new tail here.
    pub const SQ_TAIL: u32 = 0x20;
    /// RO: submission head: descriptors below it have been fetched.
    pub const SQ_HEAD: u32 = 0x24;
    /// RO: completion tail: entries below it are written.
    pub const CQ_TAIL: u32 = 0x28;
    /// RW: completion head, written by the driver when it has read entries.
    pub const CQ_HEAD: u32 = 0x2C;
    /// RO: why the ring stopped (`ERROR_*`), 0 while healthy.
    pub const ERROR: u32 = 0x30;

    /// The configuration was refused (size, alignment or a zero address).
    pub const ERROR_CONFIG: u32 = 1;
    /// Fetching descriptors faulted (the SQ is not mapped readable).
    pub const ERROR_SQ_FAULT: u32 = 2;
    /// Writing completions or the fence faulted (the CQ or fence is not mapped writable).
    pub const ERROR_CQ_FAULT: u32 = 3;
    /// The index registers were inconsistent (tail more than a ring ahead of head).
    pub const ERROR_INDEX: u32 = 4;
    /// An I/O error inside the device.
    pub const ERROR_IO: u32 = 5;
}

/// Absolute BAR0 offset of register `reg` of ring `r`.
pub const fn ring_reg(r: u32, reg: u32) -> u32 {
    RING_BASE + r * RING_STRIDE + reg
}

/// A human-readable name for a ring error code.
pub fn ring_error_name(code: u32) -> &'static str {
    match code {
        0 => "none",
        ring::ERROR_CONFIG => "configuration refused",
        ring::ERROR_SQ_FAULT => "DMA fault fetching descriptors",
        ring::ERROR_CQ_FAULT => "DMA fault writing completions or fence",
        ring::ERROR_INDEX => "corrupt ring indices",
        ring::ERROR_IO => "device I/O error",
        _ => "unknown",
    }
}
