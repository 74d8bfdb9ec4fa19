//! Commands as Python values: `userptr.fill(...)`, `copy`, `saxpy`, `crc32c`,
//! `write_fence`, `nop`. Operands name a registration by its index in the
//! submission's references, plus a byte offset; a length left out runs to the end of
//! the operand's registration. They become the C API's commands at submission, where
//! the same checks apply (an operand outside its registration is an `AddressError`).

use pyo3::prelude::*;
use userptr::Userptr;
use userptr_capi::code::UserptrCode;
use userptr_capi::command::{UserptrCommand, UserptrOpcode, UserptrOperand};
use userptr_capi::failure::Failure;

/// One command for `Registry.submit`. Made by the module's functions (`fill`, `copy`,
/// `saxpy`, `crc32c`, `write_fence`, `nop`).
#[pyclass(frozen, module = "userptr")]
#[derive(Clone, Debug)]
pub struct Command {
    op: UserptrOpcode,
    src: Option<(u32, u64)>,
    dst: Option<(u32, u64)>,
    /// Bytes, or f32 elements for SAXPY; `None`: to the end of the operand.
    len: Option<u64>,
    arg: u64,
    a: f32,
}

#[pymethods]
impl Command {
    fn __repr__(&self) -> String {
        let mut s = format!("userptr.Command({:?}", self.op);
        if let Some((i, o)) = self.src {
            s += &format!(", src=({i}, {o:#x})");
        }
        if let Some((i, o)) = self.dst {
            s += &format!(", dst=({i}, {o:#x})");
        }
        if let Some(n) = self.len {
            s += &format!(", len={n}");
        }
        s + ")"
    }

    /// The opcode's name ("FILL", "COPY", ...).
    #[getter]
    fn opcode(&self) -> &'static str {
        match self.op {
            UserptrOpcode::Nop => "NOP",
            UserptrOpcode::WriteFence => "WRITE_FENCE",
            UserptrOpcode::Fill => "FILL",
            UserptrOpcode::Copy => "COPY",
            UserptrOpcode::Saxpy => "SAXPY",
            UserptrOpcode::Crc32c => "CRC32C",
        }
    }
}

fn rest(refs: &[&Userptr<'_>], (index, offset): (u32, u64), unit: u64) -> Result<u64, Failure> {
    let Some(u) = refs.get(index as usize) else {
        // Plan::new names the bad index.
        return Ok(1);
    };
    u.len()
        .checked_sub(offset)
        .filter(|&n| n > 0)
        .map(|n| n / unit)
        .ok_or_else(|| {
            Failure::new(
                UserptrCode::OperandRange,
                format!(
                    "offset {offset:#x} lies outside reference {index} ({:#x} bytes registered)",
                    u.len()
                ),
            )
        })
}

impl Command {
    fn new(op: UserptrOpcode) -> Command {
        Command {
            op,
            src: None,
            dst: None,
            len: None,
            arg: 0,
            a: 0.0,
        }
    }

    /// The C API's command, given the submission's references (for default lengths).
    pub fn resolve(&self, refs: &[&Userptr<'_>]) -> Result<UserptrCommand, Failure> {
        let operand = |o: Option<(u32, u64)>| {
            o.map_or(UserptrOperand::default(), |(index, offset)| {
                UserptrOperand { index, offset }
            })
        };
        let len = match (self.len, self.op) {
            (Some(n), _) => n,
            (None, UserptrOpcode::Nop | UserptrOpcode::WriteFence) => 0,
            (None, UserptrOpcode::Saxpy) => rest(refs, self.dst.unwrap_or_default(), 4)?,
            (None, UserptrOpcode::Fill | UserptrOpcode::Copy) => {
                rest(refs, self.dst.unwrap_or_default(), 1)?
            }
            (None, UserptrOpcode::Crc32c) => rest(refs, self.src.unwrap_or_default(), 1)?,
        };
        Ok(UserptrCommand {
            opcode: self.op as u32,
            flags: 0,
            src: operand(self.src),
            dst: operand(self.dst),
            len,
            arg: self.arg,
            a: self.a,
        })
    }
}

/// NOP: the command just completes.
#[pyfunction]
pub fn nop() -> Command {
    Command::new(UserptrOpcode::Nop)
}

/// WRITE_FENCE: write the 8-byte `value` at `offset` (8-byte aligned) of reference `dst`.
#[pyfunction]
#[pyo3(signature = (dst, value, offset = 0))]
pub fn write_fence(dst: u32, value: u64, offset: u64) -> Command {
    Command {
        dst: Some((dst, offset)),
        arg: value,
        ..Command::new(UserptrOpcode::WriteFence)
    }
}

/// FILL: set `length` bytes (default: to the end) of reference `dst` from `offset` to
/// the byte `value`.
#[pyfunction]
#[pyo3(signature = (dst, value, length = None, offset = 0))]
pub fn fill(dst: u32, value: u8, length: Option<u64>, offset: u64) -> Command {
    Command {
        dst: Some((dst, offset)),
        len: length,
        arg: value.into(),
        ..Command::new(UserptrOpcode::Fill)
    }
}

/// COPY: `length` bytes (default: to the end of `dst`) from reference `src` to
/// reference `dst`.
#[pyfunction]
#[pyo3(signature = (src, dst, length = None, src_offset = 0, dst_offset = 0))]
pub fn copy(src: u32, dst: u32, length: Option<u64>, src_offset: u64, dst_offset: u64) -> Command {
    Command {
        src: Some((src, src_offset)),
        dst: Some((dst, dst_offset)),
        len: length,
        ..Command::new(UserptrOpcode::Copy)
    }
}

/// SAXPY: `y = a * x + y` over `n` float32 elements (default: to the end of `y`), x
/// in reference `x`, y in reference `y` (both 4-byte aligned).
#[pyfunction]
#[pyo3(signature = (a, x, y, n = None, x_offset = 0, y_offset = 0))]
pub fn saxpy(a: f32, x: u32, y: u32, n: Option<u64>, x_offset: u64, y_offset: u64) -> Command {
    Command {
        src: Some((x, x_offset)),
        dst: Some((y, y_offset)),
        len: n,
        a,
        ..Command::new(UserptrOpcode::Saxpy)
    }
}

/// CRC32C of `length` bytes (default: to the end) of reference `src` from `offset`,
/// seeded with `seed`; the checksum is the command's result in `Queue.wait`.
#[pyfunction]
#[pyo3(signature = (src, length = None, seed = 0, offset = 0))]
pub fn crc32c(src: u32, length: Option<u64>, seed: u32, offset: u64) -> Command {
    Command {
        src: Some((src, offset)),
        len: length,
        arg: seed.into(),
        ..Command::new(UserptrOpcode::Crc32c)
    }
}

/// Register the command functions in the module.
pub fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Command>()?;
    m.add_function(wrap_pyfunction!(nop, m)?)?;
    m.add_function(wrap_pyfunction!(write_fence, m)?)?;
    m.add_function(wrap_pyfunction!(fill, m)?)?;
    m.add_function(wrap_pyfunction!(copy, m)?)?;
    m.add_function(wrap_pyfunction!(saxpy, m)?)?;
    m.add_function(wrap_pyfunction!(crc32c, m)?)?;
    Ok(())
}
