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
        for (i, w) in self.encode_words().iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// The wire format as four little-endian 64-bit words (word `i`: bytes
    /// `8i..8i + 8`), built in registers for whole-word stores into a CQ slot.
    #[inline]
    pub fn encode_words(&self) -> [u64; COMPLETION_SIZE / 8] {
        let (access, iova) = match self.fault {
            Some(f) => (f.access as u64, f.iova),
            None => (0, 0),
        };
        [
            self.seqno,
            self.status as u16 as u64 | access << 16 | (self.detail as u64) << 32,
            iova,
            self.result,
        ]
    }

    /// Decode the 32-byte wire format.
    pub fn decode(b: &[u8; COMPLETION_SIZE]) -> Completion {
        Completion::decode_words(&std::array::from_fn(|i| {
            u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        }))
    }

    /// Decode the wire format given as four little-endian words (see
    /// [`Completion::encode_words`]).
    #[inline]
    pub fn decode_words(w: &[u64; COMPLETION_SIZE / 8]) -> Completion {
        let access = match (w[1] >> 16) as u8 {
            1 => Some(AccessKind::Read),
            2 => Some(AccessKind::Write),
            _ => None,
        };
        Completion {
            seqno: w[0],
            status: Status::from_u16(w[1] as u16),
            fault: access.map(|access| FaultRecord { iova: w[2], access }),
            detail: (w[1] >> 32) as u32,
            result: w[3],
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

    /// The byte offsets of docs/ring-protocol.md, written out: the word encoding must
    /// put every field where the wire format has it.
    #[test]
    fn wire_bytes_match_the_protocol() {
        let mut c = Completion::fault(
            0x0102_0304_0506_0708,
            FaultRecord {
                iova: 0x1122_3344_5566_7788,
                access: AccessKind::Write,
            },
        );
        c.detail = 0xa1b2_c3d4;
        c.result = 0x99;
        let b = c.encode();
        assert_eq!(b[0..8], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[8..10], (Status::DmaFault as u16).to_le_bytes());
        assert_eq!(b[10], AccessKind::Write as u8);
        assert_eq!(b[11], 0);
        assert_eq!(b[12..16], 0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(b[16..24], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[24..32], 0x99u64.to_le_bytes());
    }
}
