//! Commands as data: an opcode and operands that name a registration (by index into
//! the submission's references) plus an offset, checked against that registration
//! before anything is submitted, and turned into descriptors once the registry has
//! resolved the references to IOVAs.

use crate::code::UserptrCode;
use crate::failure::Failure;
use userptr::{Descriptor, Flags, Opcode, Userptr};

/// What the device does (the ring protocol's opcodes).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserptrOpcode {
    /// Nothing (the command just completes). No operands.
    Nop = 0,
    /// Write the 8-byte `arg` at `dst` (8-byte aligned).
    WriteFence = 1,
    /// Fill `len` bytes at `dst` with the byte `arg` (0..255).
    Fill = 2,
    /// Copy `len` bytes from `src` to `dst`.
    Copy = 3,
    /// `y = a * x + y` over `len` f32 elements: x at `src`, y at `dst` (both 4-byte
    /// aligned), `a` in the command's `a`.
    Saxpy = 4,
    /// CRC32C of `len` bytes at `src`, seeded with `arg` (a `uint32_t`; 0 for a fresh
    /// checksum); the checksum is the completion's `result`.
    Crc32c = 5,
}

/// How a command ended (a completion's `status`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserptrStatus {
    /// Completed; its effects are visible in host memory.
    Ok = 0,
    /// The device touched an IOVA that is unmapped or lacks the permission the access
    /// needs (see the completion's `fault_access` and `fault_iova`).
    DmaFault = 1,
    /// The device rejected the descriptor; nothing was done.
    BadDescriptor = 2,
    /// The device was reset before the command completed.
    Aborted = 3,
    /// The device failed for another reason.
    DeviceError = 4,
}

/// How the device accessed memory when it faulted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserptrAccess {
    /// No fault.
    None = 0,
    /// The device read host memory.
    Read = 1,
    /// The device wrote host memory.
    Write = 2,
}

/// `userptr_command.flags`: raise the ring's interrupt when the command completes.
pub const USERPTR_COMMAND_INTERRUPT: u32 = 1;

/// One operand: a registration and a byte offset into it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserptrOperand {
    /// Index into the submission's references array.
    pub index: u32,
    /// Byte offset from the registration's first byte.
    pub offset: u64,
}

/// One command. Operands an opcode does not use are ignored; those it uses must lie
/// inside their registration (`offset` + the bytes the command touches <= its
/// length), or the whole submission is refused with `USERPTR_CODE_OPERAND_RANGE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UserptrCommand {
    /// A `userptr_opcode` value.
    pub opcode: u32,
    /// `USERPTR_COMMAND_*` bits (0 or `USERPTR_COMMAND_INTERRUPT`).
    pub flags: u32,
    /// Source operand (COPY, SAXPY's x, CRC32C).
    pub src: UserptrOperand,
    /// Destination operand (WRITE_FENCE, FILL, COPY, SAXPY's y).
    pub dst: UserptrOperand,
    /// Bytes (FILL, COPY, CRC32C) or f32 elements (SAXPY); not zero.
    pub len: u64,
    /// FILL: the byte; CRC32C: the seed; WRITE_FENCE: the value. Else 0.
    pub arg: u64,
    /// SAXPY: the multiplier `a`. Else ignored.
    pub a: f32,
}

/// A `userptr_opcode` value as an opcode.
pub fn opcode_from(v: u32) -> Result<Opcode, Failure> {
    u8::try_from(v)
        .ok()
        .and_then(Opcode::from_u8)
        .ok_or_else(|| {
            Failure::invalid(format!(
                "{v} is not a userptr_opcode (NOP = 0, WRITE_FENCE = 1, FILL = 2, COPY = 3, \
                 SAXPY = 4, CRC32C = 5)"
            ))
        })
}

/// Checked commands, waiting for their references' IOVAs.
#[derive(Clone, Debug)]
pub struct Plan {
    cmds: Vec<Planned>,
}

#[derive(Clone, Debug)]
struct Planned {
    /// The descriptor, with operand IOVAs 0 until [`Plan::build`].
    desc: Descriptor,
    src: Option<UserptrOperand>,
    dst: Option<UserptrOperand>,
}

fn operand(
    i: usize,
    op: Opcode,
    which: &str,
    o: UserptrOperand,
    bytes: u64,
    refs: &[&Userptr<'_>],
) -> Result<UserptrOperand, Failure> {
    let Some(u) = refs.get(o.index as usize) else {
        return Err(Failure::invalid(format!(
            "command {i} ({op:?}): {which} names reference {} but the submission has {} \
             references",
            o.index,
            refs.len()
        )));
    };
    if o.offset.checked_add(bytes).is_none_or(|end| end > u.len()) {
        return Err(Failure::new(
            UserptrCode::OperandRange,
            format!(
                "command {i} ({op:?}): {which} operand at offset {:#x} + {bytes:#x} bytes lies \
                 outside reference {} ({:#x} bytes registered)",
                o.offset,
                o.index,
                u.len()
            ),
        ));
    }
    Ok(o)
}

impl Plan {
    /// Check `cmds` against `refs` (the registrations their operands index).
    pub fn new(cmds: &[UserptrCommand], refs: &[&Userptr<'_>]) -> Result<Plan, Failure> {
        if cmds.is_empty() {
            return Err(Failure::invalid("a submission needs at least one command"));
        }
        let cmds = cmds
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let op = opcode_from(c.opcode)?;
                if c.flags & !USERPTR_COMMAND_INTERRUPT != 0 {
                    return Err(Failure::invalid(format!(
                        "command {i}: unknown flag bits {:#x}",
                        c.flags & !USERPTR_COMMAND_INTERRUPT
                    )));
                }
                let desc = match op {
                    Opcode::Nop => Descriptor::nop(),
                    Opcode::WriteFence => Descriptor::write_fence(0, c.arg),
                    Opcode::Fill => {
                        let b = u8::try_from(c.arg).map_err(|_| {
                            Failure::invalid(format!(
                                "command {i} (Fill): the fill value {:#x} is not a byte",
                                c.arg
                            ))
                        })?;
                        Descriptor::fill(0, c.len, b)
                    }
                    Opcode::Copy => Descriptor::copy(0, 0, c.len),
                    Opcode::Saxpy => Descriptor::saxpy(c.a, 0, 0, c.len),
                    Opcode::Crc32c => {
                        let seed = u32::try_from(c.arg).map_err(|_| {
                            Failure::invalid(format!(
                                "command {i} (Crc32c): the seed {:#x} is not a uint32_t",
                                c.arg
                            ))
                        })?;
                        Descriptor::crc32c(0, c.len, seed)
                    }
                };
                let desc = desc.with_flags(Flags(c.flags as u16));
                let src = op
                    .reads_src()
                    .then(|| operand(i, op, "source", c.src, desc.src_bytes(), refs))
                    .transpose()?;
                let dst = op
                    .writes_dst()
                    .then(|| operand(i, op, "destination", c.dst, desc.dst_bytes(), refs))
                    .transpose()?;
                Ok(Planned { desc, src, dst })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(Plan { cmds })
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Always false: a plan has at least one command.
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// The descriptors, given the IOVA of each reference's first byte (in order).
    pub fn build(&self, iovas: &[u64]) -> Vec<Descriptor> {
        let at = |o: UserptrOperand| {
            // In range: `new` checked every index against the same references.
            iovas
                .get(o.index as usize)
                .map_or(0, |iova| iova.saturating_add(o.offset))
        };
        self.cmds
            .iter()
            .map(|p| {
                let mut d = p.desc;
                if let Some(o) = p.src {
                    d.src_iova = at(o);
                }
                if let Some(o) = p.dst {
                    d.dst_iova = at(o);
                }
                d
            })
            .collect()
    }
}
