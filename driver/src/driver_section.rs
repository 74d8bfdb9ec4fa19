//! The driver-section guard: which calls are the driver's own.
//!
//! While a thread runs driver code (a [`DriverSection`] is alive), the address-space
//! calls it makes (freeing its own buffers, say) are the driver's, not the
//! application's: the monitors (`monitor/`, a layer above) let them through unmonitored. The
//! driver never changes memory the application registered, and monitoring its own
//! calls while it holds its locks would deadlock.
//!
//! It sits in the core, below both the registry and the device models that enter it,
//! and below the monitors that read it.

use std::cell::Cell;

thread_local! {
    // const-initialised, no destructor: safe to touch from a signal handler.
    static IN_DRIVER: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as running driver code until dropped.
pub struct DriverSection(());

/// Enter a driver section (nests).
pub fn enter() -> DriverSection {
    IN_DRIVER.with(|c| c.set(c.get() + 1));
    DriverSection(())
}

impl Drop for DriverSection {
    fn drop(&mut self) {
        IN_DRIVER.with(|c| c.set(c.get() - 1));
    }
}

/// Whether the current thread is inside a driver section.
pub fn in_driver() -> bool {
    IN_DRIVER.with(|c| c.get() > 0)
}
