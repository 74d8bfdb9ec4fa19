//! e2e: device COPY and SAXPY bandwidth next to `memcpy` and a single-threaded CPU
//! SAXPY, interleaved; and both again through the registry with an invalidation storm
//! beside them, next to the same without the storm (counting only the bytes of the
//! commands that completed).

use super::measure::{interleaved, Mem};
use super::{Ctx, Measurement};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use userptr::{Cause, Descriptor, Driver, Perm, Registry, RegistryConfig};

pub fn run(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    let drv = Driver::reference().map_err(|e| crate::explain(&e))?;
    let q = drv.queue(0, 64).map_err(|e| crate::explain(&e))?;
    let mut out = Vec::new();
    let samples = ctx.samples.min(if ctx.quick { 5 } else { 15 });

    let len = 64usize << 20;
    if ctx.fits("e2e", "copy_64MiB", 2 * len as u64) {
        let (src, dst) = (Mem::new(len)?, Mem::new(len)?);
        // SAFETY: the bench's own mappings (`Mem`), which outlive the mappings; `dst`
        // is read only after the commands that write it are waited for.
        let ms =
            unsafe { drv.map_user(src.addr, len, Perm::READ) }.map_err(|e| crate::explain(&e))?;
        // SAFETY: as above.
        let md = unsafe { drv.map_user(dst.addr, len, Perm::READ_WRITE) }
            .map_err(|e| crate::explain(&e))?;
        let gb = |secs: f64| len as f64 / secs / 1e9;
        let mut err = None;
        let (ours, base) = interleaved(
            samples,
            1,
            || {
                let t = Instant::now();
                if let Err(e) = q.run(Descriptor::copy(ms.iova(), md.iova(), len as u64)) {
                    err = Some(crate::explain(&e));
                }
                gb(t.elapsed().as_secs_f64())
            },
            || {
                let t = Instant::now();
                // SAFETY: both mappings are ours, `len` bytes, disjoint.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.addr as *const u8, dst.addr as *mut u8, len)
                };
                gb(t.elapsed().as_secs_f64())
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        out.push(
            Measurement::new("e2e", "copy_64MiB", "GB/s", ours).with_baseline("memcpy_64MiB", base),
        );
        drop((ms, md));
    }

    let n = 16usize << 20;
    if ctx.fits("e2e", "saxpy_16M", 8 * n as u64) {
        let x = vec![1.5f32; n];
        let mut y = vec![2.0f32; n];
        let mx = drv.map_slice_ref(&x).map_err(|e| crate::explain(&e))?;
        let my = drv.map_slice(&mut y).map_err(|e| crate::explain(&e))?;
        let (yiova, xiova) = (my.iova(), mx.iova());
        let mut ycpu = vec![2.0f32; n];
        let bytes = (n * 12) as f64;
        let mut err = None;
        let (ours, base) = interleaved(
            samples,
            1,
            || {
                let t = Instant::now();
                if let Err(e) = q.run(Descriptor::saxpy(0.5, xiova, yiova, n as u64)) {
                    err = Some(crate::explain(&e));
                }
                bytes / t.elapsed().as_secs_f64() / 1e9
            },
            || {
                let t = Instant::now();
                for (y, x) in ycpu.iter_mut().zip(&x) {
                    *y += 0.5 * *x;
                }
                std::hint::black_box(&ycpu);
                bytes / t.elapsed().as_secs_f64() / 1e9
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        out.push(
            Measurement::new("e2e", "saxpy_16M", "GB/s", ours).with_baseline("cpu_saxpy_16M", base),
        );
        drop((mx, my));
    }
    let clen = 16usize << 20;
    if !ctx.fits("e2e", "copy_16MiB_invalidation_storm", 3 * clen as u64) {
        ctx.skip(
            "e2e",
            "saxpy_4M_invalidation_storm",
            ctx.budget.refusal(3 * clen as u64),
        );
        return Ok(out);
    }

    // COPY and SAXPY through the registry while another thread invalidates unrelated
    // and related ranges (a storm of discards on a third buffer and on the
    // destination), each next to the same command with the storm paused, interleaved.
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let (a, b, c) = (Mem::new(clen)?, Mem::new(clen)?, Mem::new(clen)?);
    let e = |e: userptr::Error| crate::explain(&e);
    // SAFETY: the bench's own mappings (`Mem`), which outlive the registry; the
    // storm discards them only through the registry's invalidation (or the monitor),
    // and they are read only after the commands that write them are waited for.
    let (ua, ub, _uc) = unsafe {
        (
            reg.register(a.addr, clen, Perm::READ).map_err(e)?,
            reg.register(b.addr, clen, Perm::READ_WRITE).map_err(e)?,
            reg.register(c.addr, clen, Perm::READ_WRITE).map_err(e)?,
        )
    };
    let (stop, storming) = (AtomicBool::new(false), AtomicBool::new(false));
    let n = (clen / 4) as u64;
    type Build = fn(&[u64], u64) -> Vec<Descriptor>;
    let ops: [(&str, Build, u64); 2] = [
        (
            "copy_16MiB",
            |i, len| vec![Descriptor::copy(i[0], i[1], len)],
            clen as u64,
        ),
        // y = 2x + y over 4 M f32: 16 MiB read twice, written once.
        (
            "saxpy_4M",
            |i, n| vec![Descriptor::saxpy(2.0, i[0], i[1], n)],
            n,
        ),
    ];
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if storming.load(Ordering::Relaxed) {
                    for m in [&c, &b] {
                        let _ =
                            reg.invalidate(m.addr as u64..(m.addr + 4096) as u64, Cause::Discard);
                    }
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        for (name, build, arg) in ops {
            let bytes = if name.starts_with("saxpy") {
                3 * clen
            } else {
                clen
            };
            // Four commands back to back per sample, so that the re-pins a storm
            // causes land in the storm's own samples; the quiet samples start pinned.
            const K: usize = 4;
            let run = |storm: bool| {
                if !storm {
                    let _ = (reg.iova(&ua), reg.iova(&ub));
                }
                storming.store(storm, Ordering::Relaxed);
                let t = Instant::now();
                // Only the bytes of commands that completed count: a submission the
                // storm made fail (or a command that failed) moved no data.
                let mut done = 0;
                for _ in 0..K {
                    if let Ok(f) = reg.submit(&q, &[&ua, &ub], |i| build(i, arg)) {
                        if q.wait(f.end, userptr::WaitMode::Block, Duration::from_secs(30))
                            .is_ok()
                        {
                            done += 1;
                        }
                    }
                }
                storming.store(false, Ordering::Relaxed);
                (done * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9
            };
            let (ours, quiet) = interleaved(samples, 1, || run(true), || run(false));
            out.push(
                Measurement::new("e2e", format!("{name}_invalidation_storm"), "GB/s", ours)
                    .with_baseline(format!("{name}_no_storm"), quiet),
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
    Ok(out)
}
