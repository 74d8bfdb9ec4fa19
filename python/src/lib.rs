//! # userptr-python: the `userptr` Python module
//!
//! Built with maturin (`python/pyproject.toml`; `./test.sh` builds it into
//! `target/pyenv` and runs `python/tests` with pytest). The same driver, registry and
//! monitors as the Rust and C APIs, and the same checks: it shares the C API's error
//! codes, command format and batch wait (`userptr-capi`).
//!
//! ```python
//! import numpy as np, userptr
//! drv = userptr.Driver()                       # the reference device
//! q = drv.queue()                              # ring 0, 64 slots
//! reg = userptr.Registry(drv)
//! x = np.arange(1 << 20, dtype=np.float32)
//! y = np.ones(1 << 20, dtype=np.float32)
//! with reg.register(x, "r") as rx, reg.register(y) as ry:
//!     f = reg.submit(q, [rx, ry], [userptr.saxpy(3.0, x=0, y=1)])
//!     q.wait(f)                                # y = 3x + y
//! ```
//!
//! Modules: [`device`] (Driver, Queue, Fence), [`registry`] (Registry, Registration,
//! Monitor), [`commands`] (the command functions), [`errors`] (the exceptions).

#![deny(missing_docs)]

pub mod commands;
pub mod device;
pub mod errors;
pub mod registry;

use pyo3::prelude::*;

/// Map ordinary process memory (numpy arrays, bytearrays, memoryviews) into a device's
/// IOMMU domain, keep it coherent, and run commands on it.
#[pymodule(name = "userptr")]
fn userptr_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<device::Driver>()?;
    m.add_class::<device::Queue>()?;
    m.add_class::<device::Fence>()?;
    m.add_class::<registry::Registry>()?;
    m.add_class::<registry::Registration>()?;
    m.add_class::<registry::Monitor>()?;
    commands::add(m)?;
    errors::add(m)?;
    Ok(())
}
