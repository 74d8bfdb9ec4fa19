//! Driver and queue handles: the reference device, and its command rings.

use crate::boundary::{arg, close_handle, into_handle, Out};
use crate::code::UserptrCode;
use crate::failure::guard;
use crate::failure::Failure;
use userptr::{CommandQueue, Driver};

/// A command queue the bindings own. A second open of a ring that is open is the
/// driver's own refusal (`Error::RingBusy`): the driver claims a ring before it
/// touches its registers, so the refusal leaves the open queue running.
#[derive(Debug)]
pub struct OwnedQueue {
    queue: CommandQueue,
}

impl std::ops::Deref for OwnedQueue {
    type Target = CommandQueue;
    fn deref(&self) -> &CommandQueue {
        &self.queue
    }
}

impl OwnedQueue {
    /// Open ring `ring` of `driver` with `size` slots.
    pub fn open(driver: &Driver, ring: u32, size: u32) -> Result<OwnedQueue, Failure> {
        Ok(OwnedQueue {
            queue: driver.queue(ring, size)?,
        })
    }

    /// The ring this queue holds.
    pub fn ring(&self) -> u32 {
        self.queue.ring()
    }
}

/// A driver bound to one device (opaque). Made by `userptr_driver_open_reference`,
/// closed by `userptr_driver_close`; queues and registries made from it keep the
/// device alive after it is closed. May be used from several threads at once.
pub struct UserptrDriver {
    pub(crate) driver: Driver,
    /// Who made what: a queue and a registry submit together only when made from
    /// the same driver handle.
    pub(crate) id: Identity,
}

/// An identity for handles (compared with `Arc::ptr_eq`).
pub(crate) type Identity = std::sync::Arc<()>;

/// One command ring of the device (opaque). Made by `userptr_queue_open`, closed by
/// `userptr_queue_close` (which disables the ring: commands still queued on it never
/// complete, and registrations stop waiting for them). May be used from several
/// threads at once.
pub struct UserptrQueue {
    pub(crate) queue: OwnedQueue,
    pub(crate) driver_id: Identity,
}

/// Open a new instance of the embedded reference device (a software device whose
/// IOMMU pins memory for real, through io_uring fixed buffers) with 4 rings, and a
/// driver for it; `*out` receives the driver.
///
/// Errors: `USERPTR_CODE_IO_URING_UNAVAILABLE` (io_uring disabled or blocked),
/// `USERPTR_CODE_SYS`, `USERPTR_CODE_NULL_POINTER`.
///
/// # Safety
/// `out` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn userptr_driver_open_reference(
    out: *mut *mut UserptrDriver,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { Out::new(out, "out") }?;
        let driver = Driver::reference()?;
        out.put(into_handle(UserptrDriver {
            driver,
            id: Identity::default(),
        }));
        Ok(())
    })
}

/// Close a driver handle (NULL: nothing). What was made from it stays usable.
///
/// # Safety
/// `driver` is NULL or a handle from `userptr_driver_open_reference`, not closed
/// before, and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn userptr_driver_close(driver: *mut UserptrDriver) {
    guard(|| {
        // SAFETY: the caller's promise.
        unsafe { close_handle(driver) };
        Ok(())
    });
}

/// Open command ring `ring` (0 to the device's ring count - 1) with `size` slots (a
/// power of two from 2 to the device's maximum); `*out` receives the queue.
///
/// Errors: `USERPTR_CODE_NO_SUCH_RING`, `USERPTR_CODE_RING_BUSY` (already open),
/// `USERPTR_CODE_RING_SIZE`, `USERPTR_CODE_NULL_POINTER`, pin and IOVA errors for the
/// ring's own memory.
///
/// # Safety
/// `driver` is NULL or a live driver handle; `out` is NULL or valid for writing one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn userptr_queue_open(
    driver: *const UserptrDriver,
    ring: u32,
    size: u32,
    out: *mut *mut UserptrQueue,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `driver` and `out`.
        let (d, out) = unsafe { (arg(driver, "driver")?, Out::new(out, "out")?) };
        let queue = OwnedQueue::open(&d.driver, ring, size)?;
        out.put(into_handle(UserptrQueue {
            queue,
            driver_id: d.id.clone(),
        }));
        Ok(())
    })
}

/// The ring number of a queue (for messages); `*out` receives it.
///
/// # Safety
/// `queue` is NULL or a live queue handle; `out` is NULL or valid for writing one
/// `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn userptr_queue_ring(
    queue: *const UserptrQueue,
    out: *mut u32,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `queue` and `out`.
        let (q, out) = unsafe { (arg(queue, "queue")?, Out::new(out, "out")?) };
        out.put(q.queue.ring());
        Ok(())
    })
}

/// Close a queue (NULL: nothing): the ring is disabled and its memory unmapped.
///
/// # Safety
/// `queue` is NULL or a handle from `userptr_queue_open`, not closed before, and no
/// other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn userptr_queue_close(queue: *mut UserptrQueue) {
    guard(|| {
        // SAFETY: the caller's promise.
        unsafe { close_handle(queue) };
        Ok(())
    });
}

/// Pause (`enabled` false) or resume (true) the device's command processing:
/// paused, submitted commands wait in their rings (a wait for them times out) until
/// it resumes. Pausing does not wait for the batch in progress.
///
/// # Safety
/// `driver` is NULL or a live driver handle.
#[no_mangle]
pub unsafe extern "C" fn userptr_driver_set_enabled(
    driver: *const UserptrDriver,
    enabled: bool,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promise on `driver`.
        let d = unsafe { arg(driver, "driver") }?;
        d.driver.set_enabled(enabled);
        Ok(())
    })
}
