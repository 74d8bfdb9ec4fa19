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
/// The value of [`VERSION`]: 1.2 (1.0 plus GPU virtual memory: VM contexts, the TLB,
/// replayable faults, see [`vm`], [`pte`], [`fault_record`]; 1.2 adds [`IRQ_ARM`]).
pub const VERSION_VALUE: u32 = 0x0001_0002;
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
/// the INTERRUPT flag and when armed ([`IRQ_ARM`]).
pub const IRQ_MASK: u32 = 0x018;
/// RO: DMA faults since creation.
pub const FAULT_COUNT: u32 = 0x01C;
/// RO: IOVA of the most recent DMA fault, low half.
pub const FAULT_IOVA_LO: u32 = 0x020;
/// RO: IOVA of the most recent DMA fault, high half.
pub const FAULT_IOVA_HI: u32 = 0x024;
/// RO: the most recent DMA fault: bits 7:0 access kind (1 read, 2 write), 15:8 ring,
/// 23:16 fault kind ([`fault_kind`]; 0 for an IOMMU fault), 27:24 VM id (0: none).
pub const FAULT_INFO: u32 = 0x028;
/// RO: commands completed since creation (wraps).
pub const COMPLETED: u32 = 0x02C;

/// RO: GPU virtual memory capabilities: bits 7:0 VM contexts, bit 8
/// [`VM_CAPS_REPLAYABLE`], bit 9 [`VM_CAPS_2M`], bits 31:16 TLB entries.
pub const VM_CAPS: u32 = 0x030;
/// VM_CAPS bit 8: replayable faults (the fault queue).
pub const VM_CAPS_REPLAYABLE: u32 = 1 << 8;
/// VM_CAPS bit 9: 2 MiB leaves.
pub const VM_CAPS_2M: u32 = 1 << 9;
/// RO: VRAM offset of the page-table region.
pub const PT_BASE: u32 = 0x034;
/// RO: size of the page-table region in bytes.
pub const PT_SIZE: u32 = 0x038;
/// RO: VRAM offset of the device-memory heap.
pub const DEVMEM_BASE: u32 = 0x03C;
/// RO: size of the device-memory heap in bytes.
pub const DEVMEM_SIZE: u32 = 0x040;
/// RW: VRAM offset of the window's 64-bit word (8-aligned, inside the page-table
/// region; elsewhere writes are ignored and reads return 0).
pub const VRAM_INDEX: u32 = 0x044;
/// RW: bits 31:0 of the word at VRAM_INDEX (a write is latched).
pub const VRAM_DATA_LO: u32 = 0x048;
/// RW: bits 63:32 of the word at VRAM_INDEX. A write stores `HI << 32 | latched LO`
/// with one 64-bit store and advances VRAM_INDEX by 8.
pub const VRAM_DATA_HI: u32 = 0x04C;
/// RW: VM id of the next TLB invalidation request (0: every VM).
pub const TLB_INV_VM: u32 = 0x050;
/// RW: first GPU VA of the request, low half.
pub const TLB_INV_VA_LO: u32 = 0x054;
/// RW: first GPU VA of the request, high half.
pub const TLB_INV_VA_HI: u32 = 0x058;
/// RW: 4 KiB pages of the request (0: the whole VM).
pub const TLB_INV_PAGES: u32 = 0x05C;
/// WO: post a TLB invalidation request (the three registers above, as they are now).
pub const TLB_INV_REQ: u32 = 0x060;
/// RO: TLB invalidation requests posted (wraps).
pub const TLB_INV_POSTED: u32 = 0x064;
/// RO: TLB invalidation requests completed, in posting order (wraps).
pub const TLB_INV_DONE: u32 = 0x068;
/// RO: stage-1 (page-table) faults since creation, every VM.
pub const VM_FAULTS: u32 = 0x06C;
/// RW: IOVA of the fault queue (32-byte aligned), low half.
pub const FAULTQ_BASE_LO: u32 = 0x070;
/// RW: IOVA of the fault queue, high half.
pub const FAULTQ_BASE_HI: u32 = 0x074;
/// RW: log2 of the fault queue's record count (1..=12).
pub const FAULTQ_SIZE_LOG2: u32 = 0x078;
/// RW: bit 0 ENABLE: 0 → 1 checks base and size (refused: stays 0), zeroes HEAD and
/// TAIL, and samples base and size.
pub const FAULTQ_CONTROL: u32 = 0x07C;
/// RO: fault records written (free-running).
pub const FAULTQ_TAIL: u32 = 0x080;
/// RW: fault records consumed by the driver (free-running).
pub const FAULTQ_HEAD: u32 = 0x084;
/// RO: replayable faults that could not be queued; their commands failed instead.
pub const FAULTQ_LOST: u32 = 0x088;
/// RW1S: interrupt arm, bit n for ring n (version 1.2). Writing 1s sets those bits,
/// 0s leave bits alone. An armed ring signals its interrupt once, after the next
/// batch of completions it publishes, and the device clears the bit as it does: a
/// driver arms before it sleeps, then looks at the fence once more, and the device
/// raises no interrupt for batches nobody sleeps on (datasheet section 8).
pub const IRQ_ARM: u32 = 0x08C;
/// The interrupt vector of the fault queue (`Device::set_irq_eventfd`) and its bit in
/// IRQ_STATUS (raised for every record, whatever IRQ_MASK says).
pub const FAULT_VECTOR: u32 = 16;

/// VM contexts: ids 1..=15 (0 in a ring's VM register: no VM).
pub const MAX_VMS: u32 = 15;
/// Offset of VM context 0's register block (block 0 is reserved; see [`vm_reg`]).
pub const VM_BASE: u32 = 0x300;
/// Size of one VM context's register block.
pub const VM_STRIDE: u32 = 0x10;

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
    /// RW: 0: descriptor addresses are IOVAs; 1..=15: GPU VAs in that VM context.
    /// Sampled at the start of each batch.
    pub const VM: u32 = 0x34;
    /// RO: bit 0 [`HOLD_HELD`]: the ring's next command is held on a replayable
    /// fault; bits 15:8 the fault kind.
    pub const HOLD: u32 = 0x38;
    /// HOLD bit 0.
    pub const HOLD_HELD: u32 = 1;
    /// WO: what to do with the held command: [`REPLAY_RETRY`] or [`REPLAY_FAIL`].
    pub const REPLAY: u32 = 0x3C;
    /// REPLAY value: execute the held command again, from the round that faulted.
    pub const REPLAY_RETRY: u32 = 1;
    /// REPLAY value: complete the held command with `DmaFault`.
    pub const REPLAY_FAIL: u32 = 2;

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

/// Absolute BAR0 offset of register `reg` of VM context `v` (1..=[`MAX_VMS`]).
pub const fn vm_reg(v: u32, reg: u32) -> u32 {
    VM_BASE + v * VM_STRIDE + reg
}

/// VM context registers, offsets inside the context's block (see [`vm_reg`]).
pub mod vm {
    /// RW: VRAM offset of the VM's level-3 table (4 KiB aligned), low half.
    pub const ROOT_LO: u32 = 0x0;
    /// RW: high half of the root.
    pub const ROOT_HI: u32 = 0x4;
    /// RW: [`CONTROL_ENABLE`] | [`CONTROL_REPLAYABLE`].
    pub const CONTROL: u32 = 0x8;
    /// CONTROL bit 0: the VM translates; clear, every access faults (`VM_DISABLED`).
    pub const CONTROL_ENABLE: u32 = 1 << 0;
    /// CONTROL bit 1: non-present and write-protection faults are replayable: they go
    /// to the fault queue and hold the command.
    pub const CONTROL_REPLAYABLE: u32 = 1 << 1;
    /// RO: stage-1 faults taken in this VM (wraps).
    pub const FAULTS: u32 = 0xC;
}

/// The page-table entry format: 64 bits, little-endian, 512 per 4 KiB table, four
/// levels (`VA[47:39]`, `[38:30]`, `[29:21]`, `[20:12]`).
pub mod pte {
    /// Present.
    pub const V: u64 = 1 << 0;
    /// Writable (leaves).
    pub const W: u64 = 1 << 1;
    /// Leaf: every level-0 entry, a 2 MiB level-1 entry; clear in table pointers.
    pub const L: u64 = 1 << 2;
    /// Device memory (leaves): the address is a VRAM offset in the device-memory heap.
    pub const D: u64 = 1 << 3;
    /// Reserved bits (must be 0).
    pub const RESERVED: u64 = 0xff0;
    /// The address bits (63:12).
    pub const ADDR: u64 = !0xfff;
    /// Entries per table.
    pub const ENTRIES: u64 = 512;
    /// Levels (3 is the root).
    pub const LEVELS: u32 = 4;
    /// Significant VA bits.
    pub const VA_BITS: u32 = 48;

    /// Bit position of a level's index in the VA (level 0: 12, ... level 3: 39).
    pub const fn shift(level: u32) -> u32 {
        12 + 9 * level
    }

    /// The index of `va` at `level`.
    pub const fn index(va: u64, level: u32) -> u64 {
        (va >> shift(level)) & (ENTRIES - 1)
    }

    /// A table pointer to the table at VRAM offset `table`.
    pub const fn table(table: u64) -> u64 {
        (table & ADDR) | V
    }

    /// A leaf mapping `addr` (an IOVA, or with `devmem` a VRAM offset).
    pub const fn leaf(addr: u64, writable: bool, devmem: bool) -> u64 {
        (addr & ADDR) | V | L | if writable { W } else { 0 } | if devmem { D } else { 0 }
    }
}

/// Stage-1 fault kinds (FAULT_INFO bits 23:16, a completion's `detail` bits 7:0, a
/// fault record's `kind`). 0 is a stage-2 (IOMMU) fault.
pub mod fault_kind {
    /// The IOMMU refused the IOVA a PTE gave (or the ring has no VM).
    pub const IOMMU: u8 = 0;
    /// An entry on the walk is not present.
    pub const NOT_PRESENT: u8 = 1;
    /// A write through a leaf without W.
    pub const WRITE_PROTECTED: u8 = 2;
    /// A malformed entry, or a VA above 48 bits.
    pub const BAD_PTE: u8 = 3;
    /// The ring's VM is disabled or does not exist.
    pub const VM_DISABLED: u8 = 4;

    /// A name for messages.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            IOMMU => "IOMMU fault",
            NOT_PRESENT => "not present",
            WRITE_PROTECTED => "write to a read-only page",
            BAD_PTE => "malformed page-table entry",
            VM_DISABLED => "VM disabled",
            _ => "unknown",
        }
    }
}

/// The fault queue's records: 32 bytes, little-endian.
pub mod fault_record {
    use crate::AccessKind;

    /// Size of one record.
    pub const SIZE: usize = 32;

    /// One replayable fault, as the device writes it into the fault queue.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FaultQueueRecord {
        /// The faulting GPU VA.
        pub va: u64,
        /// The held command's seqno.
        pub seqno: u64,
        /// VM id.
        pub vm: u8,
        /// Ring index.
        pub ring: u8,
        /// Read or write.
        pub access: AccessKind,
        /// [`super::fault_kind`]: NOT_PRESENT or WRITE_PROTECTED.
        pub kind: u8,
        /// Bytes of the faulting transfer from `va` (a hint).
        pub len: u32,
        /// The record's number (the FAULTQ_TAIL it was written at).
        pub id: u32,
    }

    impl FaultQueueRecord {
        /// Encode into the 32-byte wire format.
        pub fn encode(&self) -> [u8; SIZE] {
            let mut b = [0u8; SIZE];
            b[0..8].copy_from_slice(&self.va.to_le_bytes());
            b[8..16].copy_from_slice(&self.seqno.to_le_bytes());
            b[16] = self.vm;
            b[17] = self.ring;
            b[18] = self.access as u8;
            b[19] = self.kind;
            b[20..24].copy_from_slice(&self.len.to_le_bytes());
            b[24..28].copy_from_slice(&self.id.to_le_bytes());
            b
        }

        /// Decode; `None` if the access byte is neither read nor write.
        pub fn decode(b: &[u8; SIZE]) -> Option<FaultQueueRecord> {
            let u64_at = |o: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b[o..o + 8]);
                u64::from_le_bytes(w)
            };
            let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let access = match b[18] {
                1 => AccessKind::Read,
                2 => AccessKind::Write,
                _ => return None,
            };
            Some(FaultQueueRecord {
                va: u64_at(0),
                seqno: u64_at(8),
                vm: b[16],
                ring: b[17],
                access,
                kind: b[19],
                len: u32_at(20),
                id: u32_at(24),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn record_roundtrip() {
            let r = FaultQueueRecord {
                va: 0x7f12_3456_7000,
                seqno: 99,
                vm: 3,
                ring: 1,
                access: AccessKind::Write,
                kind: crate::regs::fault_kind::WRITE_PROTECTED,
                len: 4096,
                id: 7,
            };
            assert_eq!(FaultQueueRecord::decode(&r.encode()), Some(r));
            let mut bad = r.encode();
            bad[18] = 0;
            assert_eq!(FaultQueueRecord::decode(&bad), None);
        }
    }
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
