//! pin: map + unmap of a fresh userptr per size, next to the raw io_uring register +
//! unregister of the same memory, interleaved.

use super::measure::{interleaved, time_us, Mem};
use super::{Ctx, Measurement};
use crate::raw_pin::RawPin;
use userptr::{Driver, Perm};

pub fn run(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    let drv = Driver::reference().map_err(|e| crate::explain(&e))?;
    let raw = RawPin::new().map_err(|e| format!("io_uring for the raw baseline: {e}"))?;
    let mut sizes: Vec<(usize, &str)> = vec![
        (4 << 10, "4KiB"),
        (64 << 10, "64KiB"),
        (2 << 20, "2MiB"),
        (64 << 20, "64MiB"),
    ];
    if !ctx.quick {
        sizes.push((1 << 30, "1GiB"));
    }
    let mut out = Vec::new();
    for (len, label) in sizes {
        let mem = Mem::new(len)?;
        let n = if len >= 1 << 30 {
            3.max(ctx.samples / 5)
        } else {
            ctx.samples
        };
        let mut err = None;
        let mut raw_err = None;
        let (ours, base) = interleaved(
            n,
            2,
            || {
                time_us(|| match drv.map_user(mem.addr, len, Perm::READ_WRITE) {
                    Ok(m) => drop(m),
                    Err(e) => err = Some(crate::explain(&e)),
                })
            },
            || {
                time_us(|| {
                    if let Err(e) = raw.pin(mem.addr, len).and_then(|_| raw.unpin()) {
                        raw_err = Some(e);
                    }
                })
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(e) = raw_err {
            return Err(format!("the raw io_uring baseline failed for {label}: {e}\nhint: raise `ulimit -l` or run with CAP_IPC_LOCK"));
        }
        out.push(
            Measurement::new("pin", format!("map_unmap_{label}"), "us", ours)
                .with_baseline(format!("io_uring_register_unregister_{label}"), base),
        );
    }
    Ok(out)
}
