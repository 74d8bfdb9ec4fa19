//! Completion entries: 32 bytes, little-endian, one per descriptor, in submission order.
//!
//! ```text
//! offset size field
//!  0      8   seqno        the descriptor's seqno
//!  8      2   status       Status
//! 10      1   fault_access AccessKind of a DMA fault (0 when none)
//! 11      1   reserved
//! 12      4   detail       DescriptorError::code() for BadDescriptor, the errno for
//!                          DeviceError, else 0
//! 16      8   fault_iova   first IOVA that faulted (DMA fault only)
//! 24      8   result       opcode result (CRC32C: the checksum)
//! ```

/// Size of one encoded completion entry in bytes.
pub const COMPLETION_SIZE: usize = 32;

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Completed; its effects are visible in host memory.
    Ok = 0,
    /// The device touched an IOVA that is unmapped or lacks the permission the access
    /// needs. Nothing past the faulting chunk was written; the fault record says where.
    DmaFault = 1,
    /// The descriptor was malformed; nothing was done.
    BadDescriptor = 2,
    /// The device was reset while the command was queued or running; it did not complete.
    Aborted = 3,
    /// The device failed for another reason (an internal I/O error).
    DeviceError = 4,
}

impl Status {
    /// Decode a raw status; unknown values map to `DeviceError`.
    pub fn from_u16(v: u16) -> Status {
        match v {
            0 => Status::Ok,
            1 => Status::DmaFault,
            2 => Status::BadDescriptor,
            3 => Status::Aborted,
            _ => Status::DeviceError,
        }
    }
}

/// The kind of device access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AccessKind {
    /// The device read host memory (DMA to the device).
    Read = 1,
    /// The device wrote host memory (DMA from the device).
    Write = 2,
}

/// Where and how a DMA fault happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultRecord {
    /// The IOVA the device tried to reach.
    pub iova: u64,
    /// Read or write.
    pub access: AccessKind,
}

/// A decoded completion entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The seqno of the command it completes.
    pub seqno: u64,
    /// How it ended.
    pub status: Status,
    /// The DMA fault, for [`Status::DmaFault`].
    pub fault: Option<FaultRecord>,
    /// `DescriptorError::code()` for `BadDescriptor`, the errno for `DeviceError`,
    /// otherwise 0.
    pub detail: u32,
    /// The opcode's result (CRC32C: the checksum), otherwise 0.
    pub result: u64,
}

impl Completion {
    /// A successful completion.
    pub fn ok(seqno: u64, result: u64) -> Completion {
        Completion {
            seqno,
            status: Status::Ok,
            fault: None,
            detail: 0,
            result,
        }
    }

    /// A completion with an error status.
    pub fn error(seqno: u64, status: Status, detail: u32) -> Completion {
        Completion {
            seqno,
            status,
            fault: None,
            detail,
            result: 0,
        }
    }

    /// A DMA-fault completion.
    pub fn fault(seqno: u64, fault: FaultRecord) -> Completion {
        Completion {
            seqno,
            status: Status::DmaFault,
            fault: Some(fault),
            detail: 0,
            result: 0,
        }
    }

    /// Encode into the 32-byte wire format.
    pub fn encode(&self) -> [u8; COMPLETION_SIZE] {
        let mut b = [0u8; COMPLETION_SIZE];
        b[0..8].copy_from_slice(&self.seqno.to_le_bytes());
        b[8..10].copy_from_slice(&(self.status as u16).to_le_bytes());
        if let Some(f) = self.fault {
            b[10] = f.access as u8;
            b[16..24].copy_from_slice(&f.iova.to_le_bytes());
        }
        b[12..16].copy_from_slice(&self.detail.to_le_bytes());
        b[24..32].copy_from_slice(&self.result.to_le_bytes());
        b
    }

    /// Decode the 32-byte wire format.
    pub fn decode(b: &[u8; COMPLETION_SIZE]) -> Completion {
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let access = match b[10] {
            1 => Some(AccessKind::Read),
            2 => Some(AccessKind::Write),
            _ => None,
        };
        Completion {
            seqno: u64_at(0),
            status: Status::from_u16(u16::from_le_bytes([b[8], b[9]])),
            fault: access.map(|access| FaultRecord {
                iova: u64_at(16),
                access,
            }),
            detail: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            result: u64_at(24),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for c in [
            Completion::ok(1, 0xdead_beef),
            Completion::error(2, Status::BadDescriptor, 3),
            Completion::error(3, Status::Aborted, 0),
            Completion::fault(
                4,
                FaultRecord {
                    iova: 0x1234_5000,
                    access: AccessKind::Write,
                },
            ),
        ] {
            assert_eq!(Completion::decode(&c.encode()), c);
        }
    }
}
