//! NVMe commands and completions as the I/O queues take and give them: the NVM
//! command set's READ, WRITE and FLUSH, the 64-byte submission entry, the completion
//! status in words.

use super::{opcode, SQE};
use crate::error::{Error, Result};

/// One command for an I/O queue. Data is one contiguous IOVA range (a userptr
/// region is IOVA-contiguous); the queue turns it into PRPs when it submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeCommand {
    /// The NVM command set opcode ([`opcode`](super::opcode)).
    pub opcode: u8,
    /// The namespace.
    pub nsid: u32,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
    /// Data transfer: (IOVA, length in bytes).
    pub data: Option<(u64, u32)>,
}

impl NvmeCommand {
    pub(super) fn rw(op: u8, ns: &Namespace, lba: u64, iova: u64, len: u32) -> NvmeCommand {
        let blocks = (len as u64 >> ns.lba_shift).max(1);
        NvmeCommand {
            opcode: op,
            nsid: ns.nsid,
            cdw: [
                lba as u32,
                (lba >> 32) as u32,
                (blocks - 1) as u32 & 0xffff,
                0,
                0,
                0,
            ],
            data: Some((iova, len)),
        }
    }

    /// READ `len` bytes (a multiple of the block size) from block `lba` into `iova`.
    pub fn read(ns: &Namespace, lba: u64, iova: u64, len: u32) -> NvmeCommand {
        NvmeCommand::rw(opcode::READ, ns, lba, iova, len)
    }

    /// WRITE `len` bytes from `iova` to block `lba`.
    pub fn write(ns: &Namespace, lba: u64, iova: u64, len: u32) -> NvmeCommand {
        NvmeCommand::rw(opcode::WRITE, ns, lba, iova, len)
    }

    /// FLUSH the namespace.
    pub fn flush(ns: &Namespace) -> NvmeCommand {
        NvmeCommand {
            opcode: opcode::FLUSH,
            nsid: ns.nsid,
            cdw: [0; 6],
            data: None,
        }
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeCompletion {
    /// Command-specific result (DW0).
    pub result: u32,
    /// Command identifier.
    pub cid: u16,
    /// Status field (SCT in bits 8–10, SC in bits 0–7; DNR/M/CRD above); 0 = success.
    pub status: u16,
    /// The opcode of the command it completes.
    pub opcode: u8,
    /// The IOVA of an IOMMU fault the kernel logged inside this command's data range
    /// (the DMA was blocked; the device did not know). See [`crate::vfio::faults`].
    pub iommu_fault: Option<u64>,
}

impl NvmeCompletion {
    /// Whether the command succeeded.
    pub fn ok(&self) -> bool {
        self.status & 0x7ff == 0 && self.iommu_fault.is_none()
    }

    /// A completion as a result: [`Error::NvmeStatus`] unless it succeeded.
    pub fn into_result(self) -> Result<NvmeCompletion> {
        if let Some(iova) = self.iommu_fault {
            return Err(Error::NvmeIommuFault {
                opcode: self.opcode,
                cid: self.cid,
                iova,
                reason: match self.opcode {
                    opcode::READ => "the device may not write there".into(),
                    _ => "the device may not access it".into(),
                },
            });
        }
        if self.ok() {
            Ok(self)
        } else {
            Err(Error::NvmeStatus {
                opcode: self.opcode,
                cid: self.cid,
                status: self.status,
                text: status_text(self.status),
            })
        }
    }

    /// A host-side abort (controller reset before the command completed).
    pub(super) fn aborted(cid: u16, opcode: u8) -> NvmeCompletion {
        NvmeCompletion {
            result: 0,
            cid,
            // Generic status, "Command Aborted due to SQ Deletion" (0x08).
            status: 0x08,
            opcode,
            iommu_fault: None,
        }
    }
}

/// The generic and media status codes a driver meets, in words.
pub fn status_text(status: u16) -> &'static str {
    let sct = (status >> 8) & 0x7;
    let sc = status & 0xff;
    match (sct, sc) {
        (0, 0x00) => "success",
        (0, 0x01) => "invalid command opcode",
        (0, 0x02) => "invalid field in command",
        (0, 0x04) => "data transfer error (a DMA the IOMMU refused, or a bus error)",
        (0, 0x06) => "internal error",
        (0, 0x07) => "command abort requested",
        (0, 0x08) => "command aborted (queue deleted or controller reset)",
        (0, 0x0b) => "invalid namespace or format",
        (0, 0x13) => "invalid PRP offset",
        (0, 0x80) => "LBA out of range",
        (0, 0x81) => "capacity exceeded",
        (1, 0x01) => "invalid completion queue",
        (1, 0x02) => "invalid queue identifier",
        (1, 0x03) => "invalid queue size",
        (1, 0x08) => "invalid interrupt vector",
        (2, 0x80) => "write fault",
        (2, 0x81) => "unrecovered read error",
        (2, 0x86) => "access denied",
        _ => "see the NVMe status code tables",
    }
}

/// The first active namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// The namespace identifier.
    pub nsid: u32,
    /// log2 of the block size.
    pub lba_shift: u32,
    /// Size in blocks.
    pub blocks: u64,
}

impl Namespace {
    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.lba_shift
    }
}

pub(super) fn sqe(cid: u16, op: u8, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 6]) -> [u8; SQE] {
    let mut b = [0u8; SQE];
    let dw0 = op as u32 | (cid as u32) << 16;
    b[0..4].copy_from_slice(&dw0.to_le_bytes());
    b[4..8].copy_from_slice(&nsid.to_le_bytes());
    b[24..32].copy_from_slice(&prp1.to_le_bytes());
    b[32..40].copy_from_slice(&prp2.to_le_bytes());
    for (i, d) in cdw.iter().enumerate() {
        b[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_entry_layout() {
        let b = sqe(
            0x1234,
            opcode::READ,
            1,
            0xaaaa_0000,
            0xbbbb_0000,
            [1, 2, 3, 4, 5, 6],
        );
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0x1234_0002);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            0xaaaa_0000
        );
        assert_eq!(
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            0xbbbb_0000
        );
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[60..64].try_into().unwrap()), 6);
    }

    #[test]
    fn read_command_counts_blocks_zero_based() {
        let ns = Namespace {
            nsid: 1,
            lba_shift: 9,
            blocks: 1 << 20,
        };
        let c = NvmeCommand::read(&ns, 0x1_0000_0002, 0x10000, 4096);
        assert_eq!(c.cdw[0], 2);
        assert_eq!(c.cdw[1], 1);
        assert_eq!(c.cdw[2], 7);
        assert_eq!(c.data, Some((0x10000, 4096)));
    }

    #[test]
    fn status_words_read_as_text() {
        assert_eq!(
            status_text(0x0004),
            "data transfer error (a DMA the IOMMU refused, or a bus error)"
        );
        assert_eq!(status_text(0x0080), "LBA out of range");
        let ok = NvmeCompletion {
            result: 0,
            cid: 1,
            status: 0,
            opcode: 2,
            iommu_fault: None,
        };
        assert!(ok.ok());
        let faulted = NvmeCompletion {
            iommu_fault: Some(0x34000),
            ..ok
        };
        assert!(!faulted.ok());
        assert!(matches!(
            faulted.into_result(),
            Err(Error::NvmeIommuFault { iova: 0x34000, .. })
        ));
        assert!(NvmeCompletion::aborted(1, 2).into_result().is_err());
    }
}
