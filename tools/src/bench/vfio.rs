//! The `vfio` suite (`userptr bench --suite vfio --device BDF`): what VFIO type1 costs
//! next to the reference device, measured in the same process on the same kernel
//! (inside the QEMU guest, that is the guest's kernel for both).
//!
//! * `vfio_map_unmap_<size>`: map + unmap of fresh memory through the VFIO domain
//!   (`VFIO_IOMMU_MAP_DMA` pins, `UNMAP_DMA` unpins), baseline: the same through the
//!   reference device's io_uring domain, interleaved;
//! * `nvme_read4k_qd1`: one 4 KiB NVMe READ into a userptr buffer through the
//!   registry's pin cache, baseline: the same with a fresh VFIO map + unmap around
//!   every command (what a driver without a pin cache pays);
//! * `nvme_read4k_iops_qd16`: 4 KiB READs, 16 in flight, cached pins; baseline: the
//!   same with a VFIO map + unmap around every command.

use super::measure::{interleaved, time_us, Measurement, Sample};
use super::target::Target;
use super::Ctx;
use crate::vfio_cmd::{iops, qd1_latency};
use userptr::{Driver, Perm};

pub fn run(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let Target::Vfio { drv, .. } = target else {
        return Err("the vfio suite needs a device: --device BDF".into());
    };
    let reference = Driver::reference().map_err(e)?;
    let mut out = Vec::new();
    let sizes: &[(usize, &str)] = if ctx.quick {
        &[(4 << 10, "4KiB"), (2 << 20, "2MiB")]
    } else {
        &[
            (4 << 10, "4KiB"),
            (64 << 10, "64KiB"),
            (2 << 20, "2MiB"),
            (16 << 20, "16MiB"),
        ]
    };
    for &(len, label) in sizes {
        if !ctx.fits("vfio", &format!("vfio_map_unmap_{label}"), len as u64) {
            continue;
        }
        let m = super::measure::Mem::new(len)?;
        let once = |d: &Driver| {
            time_us(|| {
                // SAFETY: the bench's own mapping, unmapped at once with no command on it.
                let u = unsafe { d.map_user(m.addr, len, Perm::READ_WRITE) }.expect("map");
                u.unmap().expect("unmap");
            })
        };
        let (ours, base) = interleaved(ctx.samples, 3, || once(drv), || once(&reference));
        out.push(
            Measurement::new("vfio", format!("vfio_map_unmap_{label}"), "us", ours)
                .with_baseline("reference io_uring map+unmap", base),
        );
    }
    let q = target
        .nvme_queue()?
        .expect("a VFIO target has an NVMe queue");
    let n = if ctx.quick { 200 } else { 1000 };
    let cached = qd1_latency(&q, drv, n, true)?;
    let repinned = qd1_latency(&q, drv, n, false)?;
    out.push(
        Measurement::new("vfio", "nvme_read4k_qd1", "us", cached)
            .with_baseline("re-pinned each command", repinned),
    );
    let (mut cached, mut repinned) = (Vec::new(), Vec::new());
    for _ in 0..ctx.samples.min(5) {
        cached.push(iops(&q, drv, n, 16, true)?);
        repinned.push(iops(&q, drv, n, 16, false)?);
    }
    out.push(
        Measurement::new(
            "vfio",
            "nvme_read4k_iops_qd16",
            "IO/s",
            Sample { values: cached },
        )
        .with_baseline("re-pinned each command", Sample { values: repinned }),
    );
    Ok(out)
}
