//! `userptr.Driver` (the reference device), `userptr.Queue` (a command ring) and
//! `userptr.Fence` (a submitted batch).

use crate::errors::to_pyerr;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::time::Duration;
use userptr_capi::driver::OwnedQueue;
use userptr_capi::failure::Failure;
use userptr_capi::submit::{check_fence, wait, UserptrFence};

/// A driver for a new instance of the embedded reference device: a software device
/// whose IOMMU pins memory for real (io_uring fixed buffers), with 4 command rings.
#[pyclass(frozen, module = "userptr")]
pub struct Driver {
    pub(crate) driver: userptr::Driver,
}

#[pymethods]
impl Driver {
    #[new]
    fn new(py: Python<'_>) -> PyResult<Driver> {
        let driver = userptr::Driver::reference().map_err(|e| to_pyerr(py, e.into()))?;
        Ok(Driver { driver })
    }

    /// Open command ring `ring` (0..3) with `size` slots (a power of two).
    #[pyo3(signature = (ring = 0, size = 64))]
    fn queue(slf: &Bound<'_, Self>, ring: u32, size: u32) -> PyResult<Queue> {
        let py = slf.py();
        let d = slf.get();
        let q = OwnedQueue::open(&d.driver, ring, size).map_err(|f| to_pyerr(py, f))?;
        Ok(Queue {
            queue: Some(q),
            driver: slf.clone().unbind(),
            ring,
        })
    }

    /// Pause (`False`) or resume (`True`) the device's command processing: paused,
    /// submitted commands wait in their rings (a wait for them times out).
    fn set_enabled(&self, enabled: bool) {
        self.driver.set_enabled(enabled);
    }

    fn __repr__(&self) -> String {
        format!("userptr.Driver({})", self.driver.name())
    }
}

/// One command ring of the device. `close()` (or garbage collection) disables it.
#[pyclass(module = "userptr")]
pub struct Queue {
    queue: Option<OwnedQueue>,
    pub(crate) driver: Py<Driver>,
    ring: u32,
}

impl Queue {
    pub(crate) fn open(&self) -> PyResult<&OwnedQueue> {
        self.queue
            .as_ref()
            .ok_or_else(|| PyValueError::new_err(format!("queue {} is closed", self.ring)))
    }
}

/// `seconds` as a duration, or a ValueError.
pub(crate) fn timeout_from(seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        PyValueError::new_err(format!("timeout {seconds} is not a number of seconds >= 0"))
    })
}

#[pymethods]
impl Queue {
    /// The ring number.
    #[getter]
    fn ring(&self) -> u32 {
        self.ring
    }

    /// Wait up to `timeout` seconds for every command of the batch `fence` and claim
    /// their completions; returns each command's result (CRC32C: the checksum, else
    /// 0). Raises `DmaFault` (with `iova` and `access`) or another `DeviceError` for the
    /// first command that did not complete OK, `DeviceTimeoutError` if the batch did
    /// not complete in time (nothing claimed: wait again).
    #[pyo3(signature = (fence, timeout = 5.0))]
    fn wait(&self, py: Python<'_>, fence: &Fence, timeout: f64) -> PyResult<Vec<u64>> {
        let q = self.open()?;
        let timeout = timeout_from(timeout)?;
        let f = check_fence(q, fence.fence).map_err(|f| to_pyerr(py, f))?;
        let (all, status) = py
            .detach(|| wait(q, f, timeout))
            .map_err(|f| to_pyerr(py, f))?;
        status.map_err(|f: Failure| to_pyerr(py, f))?;
        Ok(all.iter().map(|c| c.result).collect())
    }

    /// Disable the ring (commands still queued never complete). Idempotent.
    fn close(&mut self, py: Python<'_>) {
        if let Some(q) = self.queue.take() {
            py.detach(|| drop(q));
        }
    }

    fn __repr__(&self) -> String {
        let state = if self.queue.is_some() {
            "open"
        } else {
            "closed"
        };
        format!("userptr.Queue(ring={}, {state})", self.ring)
    }
}

/// A submitted batch: its ring and the seqnos of its first and last commands.
#[pyclass(frozen, module = "userptr")]
#[derive(Clone, Copy)]
pub struct Fence {
    pub(crate) fence: UserptrFence,
}

#[pymethods]
impl Fence {
    /// The ring the batch was submitted on.
    #[getter]
    fn ring(&self) -> u32 {
        self.fence.ring
    }

    /// The first command's seqno.
    #[getter]
    fn first(&self) -> u64 {
        self.fence.first
    }

    /// The last command's seqno.
    #[getter]
    fn last(&self) -> u64 {
        self.fence.last
    }

    fn __repr__(&self) -> String {
        let f = self.fence;
        format!(
            "userptr.Fence(ring={}, seqnos {}..={})",
            f.ring, f.first, f.last
        )
    }
}
