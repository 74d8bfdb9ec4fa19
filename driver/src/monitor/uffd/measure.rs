//! The cost of a monitored `madvise`, for the benchmark harness.

use super::{UffdMonitor, PAGE};
use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::registry::{Registry, RegistryConfig};
use std::time::{Duration, Instant};

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One private anonymous page, unmapped on drop.
pub(super) struct Page(*mut std::ffi::c_void);

impl Page {
    fn new() -> Result<Page> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                PAGE as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::sys("mmap(measure_madvise)", e.into()))?;
        Ok(Page(p))
    }

    fn touch(&self) {
        // SAFETY: our own page, mapped read-write; a volatile store so the page is
        // really faulted in before each madvise.
        unsafe { std::ptr::write_volatile(self.0.cast::<u8>(), 1) };
    }

    /// Time one `madvise(MADV_DONTNEED)` of the page, in µs.
    fn time_dontneed(&self) -> Result<f64> {
        let t0 = Instant::now();
        // SAFETY: discarding our own page, which nothing references.
        unsafe { rustix::mm::madvise(self.0, PAGE as usize, rustix::mm::Advice::LinuxDontNeed) }
            .map_err(|e| Error::sys("madvise(measure_madvise)", e.into()))?;
        Ok(t0.elapsed().as_secs_f64() * 1e6)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing references it any more.
        let _ = unsafe { rustix::mm::munmap(self.0, PAGE as usize) };
    }
}

/// The price of the monitor on the calling thread, for the benchmark harness:
/// `(monitored, raw)`, the medians in µs over `iters` calls each of
/// `madvise(MADV_DONTNEED)` on a 4 KiB page, (1) registered with a registry on a fresh
/// reference device that has a running [`UffdMonitor`] (re-pinned before every call,
/// outside the timing, and the event handled before the next), and (2) on a page
/// nothing watches, with no monitor started yet. The difference is the userfaultfd
/// round trip: the caller sleeps until the reader thread has read the event.
pub fn measure_madvise(iters: usize) -> Result<(f64, f64)> {
    let iters = iters.max(1);
    let raw_page = Page::new()?;
    let mut raw = Vec::with_capacity(iters);
    for _ in 0..iters {
        raw_page.touch();
        raw.push(raw_page.time_dontneed()?);
    }
    drop(raw_page);

    let drv = crate::driver::Driver::reference()?;
    let reg = Registry::new(drv, RegistryConfig::default());
    let mon = UffdMonitor::start(&reg)?;
    let page = Page::new()?;
    let mut monitored = Vec::with_capacity(iters);
    for _ in 0..iters {
        page.touch();
        // SAFETY: `page` is this function's own anonymous page, which no device command
        // ever references (nothing is submitted); the DONTNEED that follows is seen by
        // the monitor running on `reg`, which invalidates first; `reg.clear()` below
        // unregisters it before the page is unmapped.
        unsafe { reg.register(page.0 as usize, PAGE as usize, Perm::READ_WRITE)? };
        monitored.push(page.time_dontneed()?);
        mon.sync(Duration::from_secs(5));
    }
    let handled = mon.counters().handled;
    mon.stop();
    reg.clear()?;
    drop(page);
    if handled < iters as u64 {
        tracing::warn!("measure_madvise: only {handled} of {iters} events were handled");
    }
    Ok((median(monitored), median(raw)))
}
