//! migrate: buffer objects moving between VRAM and system memory (`driver::bo`).
//!
//! * `migrate_to_vram_<size>` / `migrate_to_system_<size>` (2 MiB, 64 MiB; GB/s): one
//!   move of a BO whose every page the CPU touched, all of it: CPU access blocked, the
//!   device's COPY, the PTE switch with its TLB invalidation, the CPU remap, the
//!   gate opened (and the old place given up: the system backing's unpin or the VRAM
//!   range), against `memcpy_<size>`: a `memcpy` of the same size in the same run,
//!   interleaved;
//! * `cpu_access_mid_migration_2MiB` (µs): the latency of one 8-byte CPU read that
//!   hit a 2 MiB BO in mid-move (it faulted and waited in the handler for the gate),
//!   against `migration_2MiB`: the move it waited for, measured around the same move;
//! * `cpu_access_vram_bo_2MiB` / `cpu_access_system_bo_2MiB` (GB/s): a pass of 8-byte
//!   writes then reads over a mapped, settled BO, against `cpu_access_plain_2MiB`: the
//!   same pass over plain anonymous memory. No fault is taken in the steady state, so
//!   they must be equal (within noise).

use super::measure::{interleaved, Mem};
use super::{Ctx, Measurement};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use userptr::driver::bo::{self, Bo, BoConfig, BoManager, Placement};
use userptr::driver::gpuvm::Gpu;
use userptr::{Driver, ReferenceConfig, Registry, RegistryConfig};

const SUITE: &str = "migrate";

fn gbps(bytes: usize, us: f64) -> f64 {
    bytes as f64 / (us.max(1e-3) * 1e3)
}

/// One pass over `len` bytes at `p`: 8-byte writes, then 8-byte reads summed.
fn pass(p: *mut u64, len: usize) -> u64 {
    let n = len / 8;
    for i in 0..n {
        // SAFETY: the caller's buffer of `len` bytes, accessed by this thread alone.
        unsafe { p.add(i).write_volatile(i as u64) };
    }
    let mut s = 0u64;
    for i in 0..n {
        // SAFETY: as above.
        s = s.wrapping_add(unsafe { p.add(i).read_volatile() });
    }
    s
}

pub fn run(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    bo::install_fault_handler().map_err(e)?;
    let mut cfg = ReferenceConfig::default();
    cfg.gpu.device_memory_bytes = 72 << 20;
    let drv = Driver::with_reference(cfg).map_err(e)?;
    let reg = Registry::new(drv, RegistryConfig::default());
    let gpu = Gpu::open(&reg).map_err(e)?;
    let mgr = BoManager::new(&gpu, BoConfig::default()).map_err(e)?;
    let mut out = Vec::new();
    for (name, len) in [("2MiB", 2usize << 20), ("64MiB", 64 << 20)] {
        if !ctx.fits(SUITE, &format!("migrate_to_vram_{name}"), len as u64) {
            continue;
        }
        let mut b = mgr.create(len as u64, Placement::Vram).map_err(e)?;
        b.as_mut_slice().fill(1);
        let src = Mem::new(len)?;
        let dst = Mem::new(len)?;
        let memcpy = || {
            let t = Instant::now();
            // SAFETY: two distinct buffers of ours, `len` bytes each.
            unsafe {
                std::ptr::copy_nonoverlapping(src.addr as *const u8, dst.addr as *mut u8, len)
            };
            gbps(len, t.elapsed().as_secs_f64() * 1e6)
        };
        for to in [Placement::Vram, Placement::System] {
            let back = match to {
                Placement::Vram => Placement::System,
                Placement::System => Placement::Vram,
            };
            let err = Cell::new(None);
            let h = b.handle();
            let (ours, base) = interleaved(
                ctx.samples,
                1,
                || {
                    if let Err(x) = mgr.migrate(&h, back) {
                        err.set(Some(crate::explain(&x)));
                    }
                    let t = Instant::now();
                    if let Err(x) = mgr.migrate(&h, to) {
                        err.set(Some(crate::explain(&x)));
                    }
                    gbps(len, t.elapsed().as_secs_f64() * 1e6)
                },
                memcpy,
            );
            if let Some(x) = err.take() {
                return Err(x);
            }
            let dir = match to {
                Placement::Vram => "vram",
                Placement::System => "system",
            };
            out.push(
                Measurement::new(SUITE, format!("migrate_to_{dir}_{name}"), "GB/s", ours)
                    .with_baseline(format!("memcpy_{name}"), base),
            );
        }
        if b.as_slice().iter().any(|&x| x != 1) {
            return Err(format!("a {name} BO lost its contents across the moves"));
        }
        mgr.free(b).map_err(e)?;
    }
    out.push(mid_migration(ctx, &mgr)?);
    out.extend(steady(ctx, &mgr)?);
    Ok(out)
}

/// The latency of a CPU access that hits a move.
fn mid_migration(ctx: &Ctx, mgr: &BoManager) -> Result<Measurement, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    const LEN: usize = 2 << 20;
    let b = mgr.create(LEN as u64, Placement::Vram).map_err(e)?;
    let h = b.handle();
    let stop = AtomicBool::new(false);
    let worst = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    // SAFETY: the reader thread only reads word 0 of `b`, which lives past the scope.
    let p = unsafe { b.as_ptr() } as usize;
    let r = std::thread::scope(|sc| {
        sc.spawn(|| {
            // Relaxed everywhere here: measurement counters and a stop flag.
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // SAFETY: word 0 of the BO, read-only; nothing writes it.
                let _ = unsafe { (p as *const u64).read_volatile() };
                let ns = t.elapsed().as_nanos() as u64;
                worst.fetch_max(ns, Ordering::Relaxed);
                reads.fetch_add(1, Ordering::Relaxed);
            }
        });
        let moved_us = Cell::new(0.0);
        let err = Cell::new(None);
        let mut to = Placement::System;
        let (ours, base) = interleaved(
            ctx.samples,
            1,
            || {
                // Until a read met the move (the reader may not run inside it).
                for _ in 0..50 {
                    let waits = bo::cpu_waits();
                    worst.store(0, Ordering::Relaxed);
                    let t = Instant::now();
                    if let Err(x) = mgr.migrate(&h, to) {
                        err.set(Some(crate::explain(&x)));
                        return 0.0;
                    }
                    moved_us.set(t.elapsed().as_secs_f64() * 1e6);
                    to = match to {
                        Placement::Vram => Placement::System,
                        Placement::System => Placement::Vram,
                    };
                    // The read that waited has finished once a later one has.
                    let n = reads.load(Ordering::Relaxed);
                    while reads.load(Ordering::Relaxed) < n + 2 {
                        std::hint::spin_loop();
                    }
                    if bo::cpu_waits() > waits {
                        return worst.load(Ordering::Relaxed) as f64 / 1e3;
                    }
                }
                err.set(Some("no CPU read met a move in 50 tries".into()));
                0.0
            },
            || moved_us.get(),
        );
        stop.store(true, Ordering::Relaxed);
        match err.take() {
            Some(x) => Err(x),
            None => Ok(
                Measurement::new(SUITE, "cpu_access_mid_migration_2MiB", "us", ours)
                    .with_baseline("migration_2MiB", base),
            ),
        }
    });
    mgr.free(b).map_err(e)?;
    r
}

/// Steady-state CPU access to a mapped BO, against plain memory.
fn steady(ctx: &Ctx, mgr: &BoManager) -> Result<Vec<Measurement>, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    const LEN: usize = 2 << 20;
    let plain = Mem::new(LEN)?;
    let mut out = Vec::new();
    for (name, place) in [("vram", Placement::Vram), ("system", Placement::System)] {
        let mut b: Bo = mgr.create(LEN as u64, place).map_err(e)?;
        b.as_mut_slice().fill(0);
        let ptr = b.as_mut_slice().as_mut_ptr() as *mut u64;
        let (ours, base) = interleaved(
            ctx.samples,
            2,
            || {
                let t = Instant::now();
                std::hint::black_box(pass(ptr, LEN));
                gbps(2 * LEN, t.elapsed().as_secs_f64() * 1e6)
            },
            || {
                let t = Instant::now();
                std::hint::black_box(pass(plain.addr as *mut u64, LEN));
                gbps(2 * LEN, t.elapsed().as_secs_f64() * 1e6)
            },
        );
        out.push(
            Measurement::new(SUITE, format!("cpu_access_{name}_bo_2MiB"), "GB/s", ours)
                .with_baseline("cpu_access_plain_2MiB", base),
        );
        mgr.free(b).map_err(e)?;
    }
    Ok(out)
}
