//! Where the suites run: the embedded reference device (the default), or a VFIO NVMe
//! function (`--device BDF`), opened once and shared by every suite (a VFIO group can
//! be opened by one container at a time).
//!
//! Each target also names the raw kernel operation its map wraps, the pin and
//! invalidate suites' baseline: an io_uring buffer registration for the reference
//! device, `VFIO_IOMMU_MAP_DMA` / `UNMAP_DMA` on the same container for VFIO.

use crate::raw_pin::RawPin;
use std::sync::Arc;
use std::time::Duration;
use userptr::driver::vfio::nvme::{IoQueue, Nvme, NvmeCommand};
use userptr::{Driver, Perm, WaitMode};

pub enum Target {
    /// A fresh reference device per suite.
    Reference,
    /// One NVMe function bound to vfio-pci.
    Vfio {
        bdf: String,
        drv: Driver,
        nvme: Arc<Nvme>,
    },
}

/// The accelerator of the QEMU guest this runs in (`kvm` or `tcg`), as
/// tools/vfio-guest/run.sh exports it; `None` outside such a guest.
pub fn guest_accel() -> Option<String> {
    std::env::var("USERPTR_GUEST_ACCEL")
        .ok()
        .filter(|a| !a.is_empty())
}

impl Target {
    /// Open `--device BDF`, or the reference device without one.
    pub fn open(device: Option<&str>) -> Result<Target, String> {
        let Some(bdf) = device else {
            return Ok(Target::Reference);
        };
        let (pci, drv) = crate::vfio_cmd::open(bdf)?;
        let nvme = Nvme::new(pci, &drv).map_err(|e| {
            format!(
                "{}\n(the suites run on an NVMe controller: is {bdf} one?)",
                crate::explain(&e)
            )
        })?;
        Ok(Target::Vfio {
            bdf: bdf.to_string(),
            drv,
            nvme,
        })
    }

    /// What the JSON records as the device.
    pub fn describe(&self) -> String {
        match self {
            Target::Reference => "reference (embedded, io_uring IOMMU)".to_string(),
            Target::Vfio { bdf, nvme, .. } => {
                let mut d = format!("vfio {bdf} (NVMe {})", nvme.info().model.trim());
                if let Some(accel) = guest_accel() {
                    d += &format!(", in a QEMU guest under {accel}");
                }
                d
            }
        }
    }

    /// The driver the suite maps with: a fresh reference device, or the VFIO one.
    pub fn driver(&self) -> Result<Driver, String> {
        match self {
            Target::Reference => Driver::reference().map_err(|e| crate::explain(&e)),
            Target::Vfio { drv, .. } => Ok(drv.clone()),
        }
    }

    /// The raw map + unmap under this target's map (see the module docs).
    pub fn raw(&self) -> Result<RawMap, String> {
        match self {
            Target::Reference => RawPin::new()
                .map(|r| RawMap::Uring(Box::new(r)))
                .map_err(|e| format!("io_uring for the raw baseline: {e}")),
            Target::Vfio { drv, .. } => {
                // The top of the last usable IOVA range: the driver's allocator is
                // first-fit from the bottom, so the two never meet in a bench run.
                let top = drv
                    .domain()
                    .iova_ranges()
                    .last()
                    .map(|r| r.end)
                    .ok_or("the VFIO domain reports no usable IOVA range")?;
                Ok(RawMap::Vfio {
                    drv: drv.clone(),
                    top,
                    mapped: std::cell::Cell::new(None),
                })
            }
        }
    }

    /// An NVMe I/O queue (qid 1; a suite drops it before the next one opens its own).
    pub fn nvme_queue(&self) -> Result<Option<IoQueue>, String> {
        match self {
            Target::Reference => Ok(None),
            Target::Vfio { nvme, .. } => nvme
                .io_queue(1, 17)
                .map(Some)
                .map_err(|e| crate::explain(&e)),
        }
    }
}

/// The raw kernel map + unmap of one range, the baseline of the pin and invalidate
/// suites.
pub enum RawMap {
    /// `IORING_REGISTER_BUFFERS_UPDATE` into a private one-slot table.
    Uring(Box<RawPin>),
    /// `VFIO_IOMMU_MAP_DMA` / `UNMAP_DMA` straight on the target's container, at an
    /// IOVA below `top` (no IOVA allocator, no registry).
    Vfio {
        drv: Driver,
        top: u64,
        mapped: std::cell::Cell<Option<(u64, u64)>>,
    },
}

impl RawMap {
    /// The baseline's name for a size label.
    pub fn name(&self, label: &str) -> String {
        match self {
            RawMap::Uring(_) => format!("io_uring_register_unregister_{label}"),
            RawMap::Vfio { .. } => format!("vfio_map_unmap_dma_{label}"),
        }
    }

    /// Pin and map `len` bytes at `addr`.
    pub fn pin(&self, addr: usize, len: usize) -> Result<(), String> {
        match self {
            RawMap::Uring(r) => r.pin(addr, len).map_err(|e| e.to_string()),
            RawMap::Vfio { drv, top, mapped } => {
                let len = len as u64;
                let iova = (top - len) & !((2 << 20) - 1);
                drv.domain()
                    .map(iova, addr as u64, len, Perm::READ_WRITE)
                    .map_err(|e| e.to_string())?;
                mapped.set(Some((iova, len)));
                Ok(())
            }
        }
    }

    /// Undo `pin`.
    pub fn unpin(&self) -> Result<(), String> {
        match self {
            RawMap::Uring(r) => r.unpin().map_err(|e| e.to_string()),
            RawMap::Vfio { drv, mapped, .. } => match mapped.take() {
                Some((iova, len)) => drv.domain().unmap(iova, len).map_err(|e| e.to_string()),
                None => Ok(()),
            },
        }
    }
}

/// Wait for an NVMe batch and check every completion.
pub fn nvme_wait(q: &IoQueue, b: userptr::driver::vfio::nvme::NvmeBatch) -> Result<(), String> {
    for c in q
        .wait(b, WaitMode::Poll, Duration::from_secs(30))
        .map_err(|e| crate::explain(&e))?
    {
        c.into_result().map_err(|e| crate::explain(&e))?;
    }
    Ok(())
}

/// An NVMe command that moves no data (the NVMe counterpart of a NOP).
pub fn nvme_flush(q: &IoQueue) -> NvmeCommand {
    NvmeCommand::flush(q.nvme().namespace())
}
