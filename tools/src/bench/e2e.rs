//! e2e: device COPY and SAXPY bandwidth next to `memcpy` and a single-threaded CPU
//! SAXPY, interleaved; and COPY again with an invalidation storm beside it.

use super::measure::{interleaved, repeat, Mem};
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
    let (src, dst) = (Mem::new(len)?, Mem::new(len)?);
    let ms = drv
        .map_user(src.addr, len, Perm::READ)
        .map_err(|e| crate::explain(&e))?;
    let md = drv
        .map_user(dst.addr, len, Perm::READ_WRITE)
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

    let n = 16usize << 20;
    let x = vec![1.5f32; n];
    let mut y = vec![2.0f32; n];
    let mx = drv
        .map_user(x.as_ptr() as usize, n * 4, Perm::READ)
        .map_err(|e| crate::explain(&e))?;
    let my = drv.map_slice(&mut y).map_err(|e| crate::explain(&e))?;
    let (yiova, xiova) = (my.iova(), mx.iova());
    let mut ycpu = vec![2.0f32; n];
    let bytes = (n * 12) as f64;
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

    // COPY through the registry while another thread invalidates unrelated and
    // related ranges (a storm of discards on a third buffer and on the destination).
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let clen = 16usize << 20;
    let (a, b, c) = (Mem::new(clen)?, Mem::new(clen)?, Mem::new(clen)?);
    let ua = reg
        .register(a.addr, clen, Perm::READ)
        .map_err(|e| crate::explain(&e))?;
    let ub = reg
        .register(b.addr, clen, Perm::READ_WRITE)
        .map_err(|e| crate::explain(&e))?;
    let _uc = reg
        .register(c.addr, clen, Perm::READ_WRITE)
        .map_err(|e| crate::explain(&e))?;
    let stop = AtomicBool::new(false);
    let storm = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for m in [&c, &b] {
                    let _ = reg.invalidate(m.addr as u64..(m.addr + 4096) as u64, Cause::Discard);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        let r = repeat(samples, 1, || {
            let t = Instant::now();
            let f = reg.submit(&q, &[&ua, &ub], |i| {
                vec![Descriptor::copy(i[0], i[1], clen as u64)]
            });
            if let Ok(f) = f {
                let _ = q.wait(f.end, userptr::WaitMode::Block, Duration::from_secs(30));
            }
            clen as f64 / t.elapsed().as_secs_f64() / 1e9
        });
        stop.store(true, Ordering::Relaxed);
        r
    });
    out.push(Measurement::new(
        "e2e",
        "copy_16MiB_invalidation_storm",
        "GB/s",
        storm,
    ));
    Ok(out)
}
