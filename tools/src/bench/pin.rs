//! pin: map + unmap of a fresh userptr per size, next to the raw kernel map + unmap of
//! the same memory, interleaved: io_uring register + unregister on the reference
//! device, `VFIO_IOMMU_MAP_DMA` + `UNMAP_DMA` on the same container with `--device`.

use super::measure::{interleaved, time_us, Mem};
use super::target::Target;
use super::{Ctx, Measurement};
use userptr::Perm;

pub fn run(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    let drv = target.driver()?;
    let raw = target.raw()?;
    let vfio = matches!(target, Target::Vfio { .. });
    let mut sizes: Vec<(usize, &str)> = vec![
        (4 << 10, "4KiB"),
        (64 << 10, "64KiB"),
        (2 << 20, "2MiB"),
        (64 << 20, "64MiB"),
    ];
    if !ctx.quick && !vfio {
        // (A QEMU guest with VFIO rarely has a spare GiB.)
        sizes.push((1 << 30, "1GiB"));
    }
    let mut out = Vec::new();
    for (len, label) in sizes {
        if !ctx.fits("pin", &format!("map_unmap_{label}"), len as u64) {
            continue;
        }
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
                // SAFETY: the bench's own mapping, mapped and unmapped again at once
                // with no command on it.
                time_us(
                    || match unsafe { drv.map_user(mem.addr, len, Perm::READ_WRITE) } {
                        Ok(m) => drop(m),
                        Err(e) => err = Some(crate::explain(&e)),
                    },
                )
            },
            || {
                time_us(|| {
                    if let Err(e) = raw.pin(mem.addr, len).and_then(|()| raw.unpin()) {
                        raw_err = Some(e);
                    }
                })
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(e) = raw_err {
            return Err(format!("the raw baseline ({}) failed: {e}\nhint: raise `ulimit -l` or run with CAP_IPC_LOCK", raw.name(label)));
        }
        out.push(
            Measurement::new("pin", format!("map_unmap_{label}"), "us", ours)
                .with_baseline(raw.name(label), base),
        );
    }
    Ok(out)
}
