//! `userptr.Registry`, `userptr.Registration` and `userptr.Monitor`: register any
//! object exporting a writable, contiguous buffer, submit commands naming the
//! registrations, and watch the address space.
//!
//! A registration holds the exporter's buffer (`Py_buffer`, which keeps a reference
//! to the object) for as long as it is registered: while a buffer is exported, the
//! object cannot be resized or freed (a `bytearray` refuses to resize, a numpy array
//! refuses `resize`), so the memory stays mapped with the same pages, the contract the
//! registry asks for. `unregister()` (or garbage collection, or leaving a `with`
//! block) drops the pins, waiting for device work in flight, and releases the buffer.

use crate::commands::Command;
use crate::device::{timeout_from, Driver, Fence, Queue};
use crate::errors::{to_pyerr, AddressError, ReadOnlyBufferError};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use userptr::{Perm, RegistryConfig, Userptr};
use userptr_capi::failure::Failure;
use userptr_capi::monitor::Monitor as AnyMonitor;
use userptr_capi::registry::{register_raw, release};
use userptr_capi::submit::submit;

/// The userptr registry of one driver: pinned regions, reused across submissions
/// until an invalidation or an eviction (under `pin_budget` bytes, 0: RLIMIT_MEMLOCK).
#[pyclass(frozen, module = "userptr")]
pub struct Registry {
    registry: userptr::Registry,
    driver: Py<Driver>,
}

fn perm_from(perm: &str) -> PyResult<Perm> {
    match perm {
        "r" => Ok(Perm::READ),
        "w" => Ok(Perm::WRITE),
        "rw" => Ok(Perm::READ_WRITE),
        _ => Err(PyValueError::new_err(format!(
            "perm {perm:?} is not 'r', 'w' or 'rw'"
        ))),
    }
}

/// The buffer of `obj`, if it is writable and contiguous.
fn writable_buffer(obj: &Bound<'_, PyAny>) -> PyResult<PyUntypedBuffer> {
    let py = obj.py();
    let buf = PyUntypedBuffer::get(obj).map_err(|e| {
        let err = PyTypeError::new_err(format!(
            "{} does not export a buffer (register a bytearray, a numpy array, a writable \
             memoryview, ...)",
            type_name(obj)
        ));
        err.set_cause(py, Some(e));
        err
    })?;
    if buf.readonly() {
        let what = type_name(obj);
        buf.release(py);
        return Err(ReadOnlyBufferError::new_err(format!(
            "the buffer of this {what} is read-only; the device may write registered memory, \
             so only writable buffers can be registered (a bytearray, a writable numpy array \
             or memoryview)"
        )));
    }
    if !buf.is_c_contiguous() && !buf.is_fortran_contiguous() {
        let what = type_name(obj);
        buf.release(py);
        return Err(AddressError::new_err(format!(
            "the buffer of this {what} is not contiguous; a registration is one range of \
             memory (register the array it is a view of, or a contiguous one)"
        )));
    }
    Ok(buf)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

#[pymethods]
impl Registry {
    #[new]
    #[pyo3(signature = (driver, pin_budget = 0))]
    fn new(driver: Bound<'_, Driver>, pin_budget: u64) -> Registry {
        let cfg = RegistryConfig {
            pin_budget: (pin_budget != 0).then_some(pin_budget),
            ..RegistryConfig::default()
        };
        Registry {
            registry: userptr::Registry::new(driver.get().driver.clone(), cfg),
            driver: driver.unbind(),
        }
    }

    /// Register the memory of `obj` (any object exporting a writable, contiguous
    /// buffer: a numpy array, a bytearray, a memoryview of one) for device access with
    /// `perm` ('r', 'w' or 'rw'). It is pinned now, so memory the device cannot use is
    /// refused here. The registration keeps `obj` (and its exported buffer) until it
    /// is unregistered.
    ///
    /// The contract (the C API's `userptr_register`): while a submitted command that
    /// may write the memory runs, Python code neither reads nor writes `obj`; while
    /// one that may read it runs, it does not write `obj`. `Queue.wait` on the
    /// command's fence ends its access. Unmapping or discarding the memory behind the
    /// exporter's back (mmap, madvise through ctypes) needs a `Monitor`.
    #[pyo3(signature = (obj, perm = "rw"))]
    fn register(
        slf: &Bound<'_, Self>,
        obj: &Bound<'_, PyAny>,
        perm: &str,
    ) -> PyResult<Registration> {
        let py = slf.py();
        let perm = perm_from(perm)?;
        let buf = writable_buffer(obj)?;
        let (addr, len) = (buf.buf_ptr() as usize, buf.len_bytes());
        let registry = &slf.get().registry;
        // SAFETY: `buf` stays exported until the registration is released (it is kept
        // in the Registration and released only after `release`): the exporter can
        // neither free nor resize the memory meanwhile, so it stays mapped with the
        // same pages; Python code that munmaps or madvises it behind the exporter's back
        // needs a monitor, as in C. Not racing the device's access is the caller's
        // part of the contract, documented in this method's docstring as in C's
        // `userptr_register`.
        let u = unsafe { register_raw(registry, addr, len, perm) };
        match u {
            Ok(userptr) => Ok(Registration {
                held: Some(Held { userptr, buf }),
                registry: slf.clone().unbind(),
                inner: registry.clone(),
            }),
            Err(f) => {
                buf.release(py);
                Err(to_pyerr(py, f))
            }
        }
    }

    /// Submit `commands` on `queue` as one batch; their operands name `refs` (a list of
    /// this registry's registrations) by index. Returns the batch's `Fence`. Nothing is
    /// submitted when a command is refused (`AddressError` for an operand outside its
    /// registration, `ArgumentError` for an index past `refs`).
    fn submit(
        slf: &Bound<'_, Self>,
        queue: PyRef<'_, Queue>,
        refs: Vec<PyRef<'_, Registration>>,
        commands: Vec<PyRef<'_, Command>>,
    ) -> PyResult<Fence> {
        let py = slf.py();
        let me = slf.get();
        if !queue.driver.is(&me.driver) {
            return Err(PyValueError::new_err(
                "the queue belongs to another driver than the registry",
            ));
        }
        let q = queue.open()?;
        let users = refs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if !r.registry.is(slf) {
                    return Err(PyValueError::new_err(format!(
                        "refs[{i}] is a registration of another registry"
                    )));
                }
                r.userptr()
            })
            .collect::<PyResult<Vec<&Userptr<'_>>>>()?;
        let cmds = commands
            .iter()
            .map(|c| c.resolve(&users))
            .collect::<Result<Vec<_>, Failure>>()
            .map_err(|f| to_pyerr(py, f))?;
        let registry = &me.registry;
        let fences = py
            .detach(|| submit(registry, q, &users, &cmds))
            .map_err(|f| to_pyerr(py, f))?;
        Ok(Fence {
            fence: fences.into(),
        })
    }

    /// Install a monitor ('seccomp', 'uffd' or 'preload') on the registry: from then
    /// on registered memory may be freed, unmapped or madvised while registered.
    /// Process-wide (a seccomp filter cannot be removed). Raises `MonitorUnavailable`.
    fn install_monitor(&self, py: Python<'_>, kind: &str) -> PyResult<Monitor> {
        let k = match kind {
            "seccomp" => 1,
            "uffd" => 2,
            "preload" => 3,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "monitor {kind:?} is not 'seccomp', 'uffd' or 'preload'"
                )))
            }
        };
        let m = AnyMonitor::install(k, &self.registry).map_err(|f| to_pyerr(py, f))?;
        Ok(Monitor {
            monitor: Some(m),
            kind: kind.to_string(),
        })
    }

    /// Bytes the registry has pinned now.
    #[getter]
    fn pinned_bytes(&self) -> u64 {
        self.registry.pinned_bytes()
    }
}

struct Held {
    userptr: Userptr<'static>,
    /// Dropped (released) after the pins, in `Registration::release`.
    buf: PyUntypedBuffer,
}

/// A registered buffer. `unregister()` ends it (also on garbage collection and at the
/// end of a `with` block).
#[pyclass(module = "userptr")]
pub struct Registration {
    held: Option<Held>,
    registry: Py<Registry>,
    inner: userptr::Registry,
}

impl Registration {
    fn userptr(&self) -> PyResult<&Userptr<'static>> {
        self.held
            .as_ref()
            .map(|h| &h.userptr)
            .ok_or_else(|| PyValueError::new_err("the registration was unregistered"))
    }

    /// Drop the pins, then the buffer; the result of dropping the pins.
    fn release(&mut self, py: Python<'_>) -> Result<(), Failure> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let inner = &self.inner;
        let done = py.detach(|| release(inner, &h.userptr));
        // Whatever the outcome, the registry holds no registration of this memory now;
        // if the device could not be stopped, its pin stays in the registry until the
        // registry goes, and the buffer is given back all the same.
        h.buf.release(py);
        done
    }
}

#[pymethods]
impl Registration {
    /// End the registration: the pins go (after device work in flight on them
    /// finished), then the buffer is released. Idempotent.
    fn unregister(&mut self, py: Python<'_>) -> PyResult<()> {
        self.release(py).map_err(|f| to_pyerr(py, f))
    }

    /// Whether it is still registered.
    #[getter]
    fn registered(&self) -> bool {
        self.held.is_some()
    }

    /// The host address of the first byte.
    #[getter]
    fn addr(&self) -> PyResult<u64> {
        Ok(self.userptr()?.addr())
    }

    /// The length in bytes.
    #[getter]
    fn length(&self) -> PyResult<u64> {
        Ok(self.userptr()?.len())
    }

    /// The object whose buffer is registered (None once unregistered).
    #[getter]
    fn obj<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.held.as_ref().and_then(|h| h.buf.obj(py).cloned())
    }

    /// The device address of the first byte now (pinning it if needed); only
    /// meaningful until the next invalidation of its pages (for diagnostics).
    fn iova(&self, py: Python<'_>) -> PyResult<u64> {
        let u = self.userptr()?;
        self.inner.iova(u).map_err(|e| to_pyerr(py, e.into()))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(
        &mut self,
        py: Python<'_>,
        _args: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        self.unregister(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match &self.held {
            Some(h) => format!(
                "userptr.Registration({:#x}, {} bytes)",
                h.userptr.addr(),
                h.userptr.len()
            ),
            None => "userptr.Registration(unregistered)".into(),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.held.is_some() {
            Python::attach(|py| {
                if let Err(f) = self.release(py) {
                    to_pyerr(py, f).write_unraisable(py, None);
                }
            });
        }
    }
}

/// An installed monitor. `stop()` (or garbage collection) stops it.
#[pyclass(module = "userptr", unsendable)]
pub struct Monitor {
    monitor: Option<AnyMonitor>,
    kind: String,
}

#[pymethods]
impl Monitor {
    /// Which monitor ('seccomp', 'uffd' or 'preload').
    #[getter]
    fn kind(&self) -> &str {
        &self.kind
    }

    /// Wait up to `timeout` seconds until every change made before this call has
    /// reached the registry (only the userfaultfd monitor lags; the others return at
    /// once). Raises `DeviceTimeoutError` if it did not catch up.
    #[pyo3(signature = (timeout = 5.0))]
    fn sync(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let t = timeout_from(timeout)?;
        match &self.monitor {
            Some(m) => m.sync(t).map_err(|f| to_pyerr(py, f)),
            None => Err(PyValueError::new_err("the monitor was stopped")),
        }
    }

    /// Stop the monitor (a seccomp filter stays, passing calls through). Idempotent.
    fn stop(&mut self) {
        self.monitor = None;
    }
}
