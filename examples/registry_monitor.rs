//! The registry, a seccomp monitor and submissions, in the working order; then memory
//! the monitor protects being unmapped while registered.
//!
//! The seccomp monitor installs a filter for the rest of the process (an example is a
//! process of its own). Where it cannot run (no seccomp, a foreign SIGSYS handler), the
//! example says why and goes on with explicit invalidations instead.
//!
//! `cargo run --example registry_monitor`

use std::time::Duration;
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Cause, Descriptor, Driver, Error, Perm, Registry, RegistryConfig, WaitMode};

const T: Duration = Duration::from_secs(30);

fn main() -> userptr::Result<()> {
    let drv = Driver::reference()?;
    let q = drv.queue(0, 64)?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let monitor = match SeccompMonitor::install(&reg) {
        Ok(m) => Some(m),
        Err(e @ Error::MonitorUnavailable { .. }) => {
            println!("registry_monitor: no seccomp monitor here ({e}); explicit invalidation");
            None
        }
        Err(e) => return Err(e),
    };

    // SAXPY over registered slices, in four batches of two commands each.
    let n = 1 << 18;
    let x: Vec<f32> = (0..n).map(|i| (i % 100) as f32).collect();
    let mut y = vec![1.0f32; n];
    let ux = reg.register_slice_ref(&x)?;
    let uy = reg.register_slice(&mut y)?;
    let quarter = (n / 4) as u64;
    for k in 0..4u64 {
        let f = reg.submit(&q, &[&ux, &uy], |iova| {
            let (xo, yo) = (iova[0] + k * quarter * 4, iova[1] + k * quarter * 4);
            let half = quarter / 2;
            vec![
                Descriptor::saxpy(2.0, xo, yo, half),
                Descriptor::saxpy(2.0, xo + half * 4, yo + half * 4, quarter - half),
            ]
        })?;
        // `Err` if any command of the batch failed.
        q.wait_batch(f, WaitMode::Block, T)?;
    }
    reg.unregister(uy)?; // waits for device work left on `y`, unpins it, ends the borrow
    drop(ux);
    assert!(y.iter().zip(&x).all(|(y, x)| *y == 1.0 + 2.0 * x));
    println!("registry_monitor: SAXPY over {n} floats in 4 batches: ok");

    // Registered memory the program unmaps: with the monitor, `munmap` is trapped and
    // the registry invalidates the range first; without it, the program says so itself.
    let len = 64 << 10;
    // SAFETY: a fresh private anonymous mapping of our own.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: our own mapping; it is read only after the command that writes it is
    // waited for, and unmapped only through the monitor or the explicit invalidation
    // below, which invalidate the registration first.
    let u = unsafe { reg.register(p as usize, len, Perm::READ_WRITE)? };
    let f = reg.submit(&q, &[&u], |iova| {
        vec![Descriptor::fill(iova[0], len as u64, 0x5a)]
    })?;
    q.wait_batch(f, WaitMode::Block, T)?;
    // SAFETY: the command that wrote the mapping completed; no reference is held.
    let first = unsafe { *(p as *const u8) };
    assert_eq!(first, 0x5a);
    let range = p as u64..p as u64 + len as u64;
    let inv = match monitor {
        Some(_) => None,
        None => Some(reg.invalidate_start(range, Cause::Unmap)?),
    };
    // SAFETY: unmapping our own mapping; the registry is told (monitor or explicit).
    assert_eq!(unsafe { libc::munmap(p, len) }, 0, "munmap");
    if let Some(inv) = inv {
        reg.invalidate_end(inv);
    }
    let unmaps = reg.stats().invalidations[Cause::Unmap.index()];
    assert_eq!(unmaps, 1, "the unmap was seen");
    assert_eq!(reg.pinned_bytes(), 0, "nothing of it stays pinned");
    drop(u);
    if let Some(m) = monitor {
        let traps = m
            .counters()
            .traps
            .load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "registry_monitor: munmap of a registered range invalidated first ({traps} traps): ok"
        );
        m.stop();
    } else {
        println!("registry_monitor: munmap of a registered range invalidated first (explicit): ok");
    }
    Ok(())
}
