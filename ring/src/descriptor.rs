//! Submission descriptors: 64 bytes, little-endian, versioned.
//!
//! ```text
//! offset size field
//!  0      1   version   (must be DESCRIPTOR_VERSION)
//!  1      1   opcode    (Opcode)
//!  2      2   flags     (Flags; unknown bits are rejected)
//!  4      4   reserved  (must be 0)
//!  8      8   seqno     fence seqno, written to the fence page on completion
//! 16      8   src_iova  source operand (device reads it)
//! 24      8   dst_iova  destination operand (device writes it)
//! 32      8   len       bytes (FILL, COPY, CRC32C) or f32 elements (SAXPY)
//! 40      8   arg0      FILL: byte pattern; SAXPY: `a` as f32 bits; WRITE_FENCE: value;
//!                       CRC32C: initial crc
//! 48      8   arg1      reserved for future opcodes (must be 0)
//! 56      8   reserved  (must be 0)
//! ```
//!
//! The device decodes with [`Descriptor::decode`], which rejects anything it does not
//! understand; such a command completes with [`crate::Status::BadDescriptor`] and the
//! device keeps running.

use thiserror::Error;

/// Size of one encoded descriptor in bytes.
pub const DESCRIPTOR_SIZE: usize = 64;
/// The descriptor layout version this crate writes and accepts.
pub const DESCRIPTOR_VERSION: u8 = 1;

/// What the device is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Do nothing; complete (and write the fence).
    Nop = 0,
    /// Write the 8-byte `arg0` to `dst_iova` by DMA.
    WriteFence = 1,
    /// Fill `len` bytes at `dst_iova` with the byte `arg0 & 0xff`.
    Fill = 2,
    /// Copy `len` bytes from `src_iova` to `dst_iova`.
    Copy = 3,
    /// `y = a * x + y` on `len` f32 elements: x at `src_iova`, y at `dst_iova`, `a` in `arg0`.
    Saxpy = 4,
    /// CRC32C of `len` bytes at `src_iova`, seeded with `arg0`; result in the completion.
    Crc32c = 5,
}

impl Opcode {
    /// All opcodes, in numeric order.
    pub const ALL: [Opcode; 6] = [
        Opcode::Nop,
        Opcode::WriteFence,
        Opcode::Fill,
        Opcode::Copy,
        Opcode::Saxpy,
        Opcode::Crc32c,
    ];

    /// Decode a raw opcode byte.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Opcode::ALL.get(v as usize).copied()
    }

    /// Whether this opcode reads host memory at `src_iova`.
    pub fn reads_src(self) -> bool {
        matches!(self, Opcode::Copy | Opcode::Saxpy | Opcode::Crc32c)
    }

    /// Whether this opcode writes host memory at `dst_iova`.
    pub fn writes_dst(self) -> bool {
        matches!(
            self,
            Opcode::WriteFence | Opcode::Fill | Opcode::Copy | Opcode::Saxpy
        )
    }
}

/// Descriptor flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// Raise the ring's interrupt (signal its eventfd) when this command completes.
    pub const INTERRUPT: Flags = Flags(1 << 0);
    /// Every bit the current version defines.
    pub const KNOWN: Flags = Flags(1 << 0);

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// Why a descriptor was rejected. Carried in [`crate::Completion::detail`] as its code.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DescriptorError {
    /// The version byte is not [`DESCRIPTOR_VERSION`].
    #[error("descriptor version {0} is not supported (expected {DESCRIPTOR_VERSION})")]
    Version(u8),
    /// The opcode byte names no [`Opcode`].
    #[error("unknown opcode {0}")]
    Opcode(u8),
    /// Flag bits outside [`Flags`] are set.
    #[error("unknown flag bits {0:#06x}")]
    Flags(u16),
    /// A reserved field is not zero.
    #[error("reserved field is not zero")]
    Reserved,
    /// The opcode moves data but the length is zero.
    #[error("{0:?} needs a non-zero length")]
    ZeroLength(Opcode),
    /// An operand range wraps around the 64-bit IOVA space.
    #[error("{op:?} operand range at {iova:#x} + {len:#x} overflows the IOVA space")]
    Overflow {
        /// The command.
        op: Opcode,
        /// The operand's first IOVA.
        iova: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// An operand is not aligned as the opcode requires (SAXPY: 4 bytes).
    #[error("{0:?} operand is not aligned as the opcode requires")]
    Misaligned(Opcode),
}

impl DescriptorError {
    /// A stable numeric code for the completion entry's `detail` field.
    pub fn code(&self) -> u32 {
        match self {
            DescriptorError::Version(_) => 1,
            DescriptorError::Opcode(_) => 2,
            DescriptorError::Flags(_) => 3,
            DescriptorError::Reserved => 4,
            DescriptorError::ZeroLength(_) => 5,
            DescriptorError::Overflow { .. } => 6,
            DescriptorError::Misaligned(_) => 7,
        }
    }
}

/// A decoded, validated submission descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// What the device does.
    pub opcode: Opcode,
    /// Per-command flags (interrupt on completion, ...).
    pub flags: Flags,
    /// The command's sequence number, assigned by the queue at submission.
    pub seqno: u64,
    /// Source operand IOVA (device reads), 0 where the opcode has none.
    pub src_iova: u64,
    /// Destination operand IOVA (device writes), 0 where the opcode has none.
    pub dst_iova: u64,
    /// Operand length in bytes.
    pub len: u64,
    /// Opcode-specific argument (FILL's byte, SAXPY's `a` as f32 bits, the fence value).
    pub arg0: u64,
}

impl Descriptor {
    /// A descriptor with every operand zero.
    pub fn new(opcode: Opcode) -> Descriptor {
        Descriptor {
            opcode,
            flags: Flags::default(),
            seqno: 0,
            src_iova: 0,
            dst_iova: 0,
            len: 0,
            arg0: 0,
        }
    }

    /// NOP.
    pub fn nop() -> Descriptor {
        Descriptor::new(Opcode::Nop)
    }

    /// Write `value` (8 bytes) to `dst_iova`.
    pub fn write_fence(dst_iova: u64, value: u64) -> Descriptor {
        Descriptor {
            dst_iova,
            arg0: value,
            ..Descriptor::new(Opcode::WriteFence)
        }
    }

    /// Fill `len` bytes at `dst_iova` with `byte`.
    pub fn fill(dst_iova: u64, len: u64, byte: u8) -> Descriptor {
        Descriptor {
            dst_iova,
            len,
            arg0: byte as u64,
            ..Descriptor::new(Opcode::Fill)
        }
    }

    /// Copy `len` bytes from `src_iova` to `dst_iova`.
    pub fn copy(src_iova: u64, dst_iova: u64, len: u64) -> Descriptor {
        Descriptor {
            src_iova,
            dst_iova,
            len,
            ..Descriptor::new(Opcode::Copy)
        }
    }

    /// `y = a * x + y` over `n` f32 elements.
    pub fn saxpy(a: f32, x_iova: u64, y_iova: u64, n: u64) -> Descriptor {
        Descriptor {
            src_iova: x_iova,
            dst_iova: y_iova,
            len: n,
            arg0: a.to_bits() as u64,
            ..Descriptor::new(Opcode::Saxpy)
        }
    }

    /// CRC32C of `len` bytes at `src_iova`, seeded with `init` (0 for a fresh checksum).
    pub fn crc32c(src_iova: u64, len: u64, init: u32) -> Descriptor {
        Descriptor {
            src_iova,
            len,
            arg0: init as u64,
            ..Descriptor::new(Opcode::Crc32c)
        }
    }

    /// Set flags (builder style).
    pub fn with_flags(mut self, flags: Flags) -> Descriptor {
        self.flags = flags;
        self
    }

    /// Set the seqno (builder style). The driver's queue does this on submission.
    pub fn with_seqno(mut self, seqno: u64) -> Descriptor {
        self.seqno = seqno;
        self
    }

    /// Bytes of host memory read at `src_iova` (0 if the opcode reads none).
    pub fn src_bytes(&self) -> u64 {
        match self.opcode {
            Opcode::Copy | Opcode::Crc32c => self.len,
            Opcode::Saxpy => self.len.saturating_mul(4),
            _ => 0,
        }
    }

    /// Bytes of host memory written at `dst_iova` (0 if the opcode writes none).
    pub fn dst_bytes(&self) -> u64 {
        match self.opcode {
            Opcode::WriteFence => 8,
            Opcode::Fill | Opcode::Copy => self.len,
            Opcode::Saxpy => self.len.saturating_mul(4),
            _ => 0,
        }
    }

    /// Check the operands an opcode needs. Both ends call this: the driver before it
    /// writes a descriptor, the device after it decodes one.
    pub fn validate(&self) -> Result<(), DescriptorError> {
        let op = self.opcode;
        if self.flags.0 & !Flags::KNOWN.0 != 0 {
            return Err(DescriptorError::Flags(self.flags.0));
        }
        match op {
            Opcode::Nop => {}
            Opcode::WriteFence => {
                if self.dst_iova % 8 != 0 {
                    return Err(DescriptorError::Misaligned(op));
                }
            }
            Opcode::Fill | Opcode::Copy | Opcode::Crc32c | Opcode::Saxpy => {
                if self.len == 0 {
                    return Err(DescriptorError::ZeroLength(op));
                }
            }
        }
        if op == Opcode::Saxpy && (self.src_iova % 4 != 0 || self.dst_iova % 4 != 0) {
            return Err(DescriptorError::Misaligned(op));
        }
        if op == Opcode::Saxpy && self.len > u64::MAX / 4 {
            return Err(DescriptorError::Overflow {
                op,
                iova: self.src_iova,
                len: self.len,
            });
        }
        for (iova, len) in [
            (self.src_iova, self.src_bytes()),
            (self.dst_iova, self.dst_bytes()),
        ] {
            if len != 0 && iova.checked_add(len).is_none() {
                return Err(DescriptorError::Overflow { op, iova, len });
            }
        }
        Ok(())
    }

    /// Encode into the 64-byte wire format.
    pub fn encode(&self) -> [u8; DESCRIPTOR_SIZE] {
        let mut b = [0u8; DESCRIPTOR_SIZE];
        for (i, w) in self.encode_words().iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// The wire format as eight 64-bit words, word `i` being bytes `8i..8i + 8` read
    /// little-endian: what a driver stores into a submission slot. Built in registers,
    /// it is stored with whole-word writes; a byte array assembled field by field on
    /// the stack and copied on costs the CPU a store-forwarding stall per 16 bytes.
    #[inline]
    pub fn encode_words(&self) -> [u64; DESCRIPTOR_SIZE / 8] {
        [
            DESCRIPTOR_VERSION as u64 | (self.opcode as u64) << 8 | (self.flags.0 as u64) << 16,
            self.seqno,
            self.src_iova,
            self.dst_iova,
            self.len,
            self.arg0,
            0,
            0,
        ]
    }

    /// The seqno field of a raw descriptor, readable even when the rest is malformed
    /// (so a rejected command can still be completed against its fence).
    pub fn raw_seqno(b: &[u8; DESCRIPTOR_SIZE]) -> u64 {
        u64_at(b, 8)
    }

    /// Decode and validate the 64-byte wire format.
    pub fn decode(b: &[u8; DESCRIPTOR_SIZE]) -> Result<Descriptor, DescriptorError> {
        Descriptor::decode_words(&std::array::from_fn(|i| u64_at(b, i * 8)))
    }

    /// Decode and validate the wire format given as eight little-endian words (see
    /// [`Descriptor::encode_words`]): what a device loads from a submission slot.
    #[inline]
    pub fn decode_words(w: &[u64; DESCRIPTOR_SIZE / 8]) -> Result<Descriptor, DescriptorError> {
        let version = w[0] as u8;
        if version != DESCRIPTOR_VERSION {
            return Err(DescriptorError::Version(version));
        }
        let op = (w[0] >> 8) as u8;
        let opcode = Opcode::from_u8(op).ok_or(DescriptorError::Opcode(op))?;
        let flags = Flags((w[0] >> 16) as u16);
        if w[0] >> 32 != 0 || w[6] != 0 || w[7] != 0 {
            return Err(DescriptorError::Reserved);
        }
        let d = Descriptor {
            opcode,
            flags,
            seqno: w[1],
            src_iova: w[2],
            dst_iova: w[3],
            len: w[4],
            arg0: w[5],
        };
        d.validate()?;
        Ok(d)
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_opcode() {
        let ds = [
            Descriptor::nop(),
            Descriptor::write_fence(0x1000, 7),
            Descriptor::fill(0x2000, 4096, 0xab),
            Descriptor::copy(0x1000, 0x9000, 123),
            Descriptor::saxpy(2.5, 0x1000, 0x2000, 1024),
            Descriptor::crc32c(0x1000, 77, 0),
        ];
        for d in ds {
            let d = d.with_seqno(42).with_flags(Flags::INTERRUPT);
            assert_eq!(Descriptor::decode(&d.encode()), Ok(d));
        }
    }

    /// The byte offsets of docs/ring-protocol.md, written out (see `encode_words`).
    #[test]
    fn wire_bytes_match_the_protocol() {
        let d = Descriptor::copy(0x1111, 0x2222, 0x3333)
            .with_seqno(0x0102_0304_0506_0708)
            .with_flags(Flags::INTERRUPT);
        let b = d.encode();
        assert_eq!(b[0], DESCRIPTOR_VERSION);
        assert_eq!(b[1], Opcode::Copy as u8);
        assert_eq!(b[2..4], Flags::INTERRUPT.0.to_le_bytes());
        assert_eq!(b[4..8], [0; 4]);
        assert_eq!(b[8..16], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[16..24], 0x1111u64.to_le_bytes());
        assert_eq!(b[24..32], 0x2222u64.to_le_bytes());
        assert_eq!(b[32..40], 0x3333u64.to_le_bytes());
        assert_eq!(b[40..64], [0; 24]);
    }

    #[test]
    fn malformed_descriptors_are_rejected() {
        let good = Descriptor::copy(0x1000, 0x2000, 64).encode();
        let mut b = good;
        b[0] = 9;
        assert_eq!(Descriptor::decode(&b), Err(DescriptorError::Version(9)));
        let mut b = good;
        b[1] = 200;
        assert_eq!(Descriptor::decode(&b), Err(DescriptorError::Opcode(200)));
        let mut b = good;
        b[3] = 0x80;
        assert_eq!(Descriptor::decode(&b), Err(DescriptorError::Flags(0x8000)));
        let mut b = good;
        b[60] = 1;
        assert_eq!(Descriptor::decode(&b), Err(DescriptorError::Reserved));
        let zero = Descriptor::copy(0x1000, 0x2000, 0).encode();
        assert_eq!(
            Descriptor::decode(&zero),
            Err(DescriptorError::ZeroLength(Opcode::Copy))
        );
        let over = Descriptor::fill(u64::MAX - 10, 64, 0).encode();
        assert!(matches!(
            Descriptor::decode(&over),
            Err(DescriptorError::Overflow { .. })
        ));
        let mis = Descriptor::write_fence(0x1004, 1).encode();
        assert_eq!(
            Descriptor::decode(&mis),
            Err(DescriptorError::Misaligned(Opcode::WriteFence))
        );
        assert_eq!(Descriptor::raw_seqno(&good), 0);
    }
}
