//! QEMU's `edu` teaching device over VFIO: a DMA engine for bring-up checks.
//!
//! BAR0 (QEMU `hw/misc/edu.c`): `0x00` identification (`0x010000ed`), `0x04`
//! liveness (reads back the bitwise NOT of what was written), `0x24` interrupt
//! status, `0x60` raise interrupt (ORs the value into the status), `0x64` acknowledge
//! (clears those bits; the line drops when the status is 0; MSI when enabled, INTx
//! otherwise), `0x80` DMA source,
//! `0x88` DMA destination, `0x90` count, `0x98` command (bit 0 start / busy, bit 1
//! direction: set = device buffer → RAM, bit 2 interrupt when done). The device
//! buffer is 4 KiB at device address `0x40000`.
//!
//! Quirks respected here: edu masks DMA addresses to 28 bits, so its IOVAs must lie
//! below 256 MiB; QEMU 7.2's bounds check is off by one and aborts the whole VM on a
//! transfer that reaches `0x41000`, so transfers stay below 4 KiB; each transfer
//! takes about 100 ms (a timer), so this is for bring-up, not throughput.

use crate::error::{Error, Result};
use crate::vfio::{Mmio, VfioPci};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ID: usize = 0x00;
const LIVENESS: usize = 0x04;
const IRQ_STATUS: usize = 0x24;
const IRQ_RAISE: usize = 0x60;
const IRQ_ACK: usize = 0x64;
const DMA_SRC: usize = 0x80;
const DMA_DST: usize = 0x88;
const DMA_COUNT: usize = 0x90;
const DMA_CMD: usize = 0x98;
const CMD_START: u32 = 1;
const CMD_TO_RAM: u32 = 2;

/// Device address of edu's internal buffer.
pub const EDU_BUFFER: u64 = 0x40000;
/// Largest transfer this driver issues (QEMU 7.2 aborts at 0x41000).
pub const EDU_MAX_TRANSFER: u32 = 4095;
/// edu's DMA address mask: IOVAs must be below this.
pub const EDU_DMA_LIMIT: u64 = 1 << 28;

/// The edu function.
pub struct Edu {
    pci: Arc<VfioPci>,
    bar: Mmio,
}

impl Edu {
    /// Check the identification and liveness registers and enable bus mastering.
    pub fn new(pci: Arc<VfioPci>) -> Result<Edu> {
        let bar = pci.map_bar(0)?;
        let id = bar.read32(ID);
        if id & 0xff != 0xed {
            return Err(Error::Vfio {
                op: "edu identify",
                device: pci.bdf().to_string(),
                reason: format!("identification register reads {id:#010x}, not 0x..ed"),
                errno: None,
                hint: "this is not QEMU's edu device (1234:11e8)",
            });
        }
        bar.write32(LIVENESS, 0x1234_5678);
        let back = bar.read32(LIVENESS);
        if back != !0x1234_5678u32 {
            return Err(Error::Vfio {
                op: "edu liveness",
                device: pci.bdf().to_string(),
                reason: format!(
                    "liveness reads {back:#010x}, expected {:#010x}",
                    !0x1234_5678u32
                ),
                errno: None,
                hint: "the BAR mapping does not reach the device",
            });
        }
        pci.enable_bus_master()?;
        Ok(Edu { pci, bar })
    }

    /// Version from the identification register (major, minor).
    pub fn version(&self) -> (u8, u8) {
        let id = self.bar.read32(ID);
        ((id >> 24) as u8, (id >> 16) as u8)
    }

    /// Raise an interrupt with status bits `v` (the device ORs them in).
    pub fn raise_irq(&self, v: u32) {
        self.bar.write32(IRQ_RAISE, v);
    }

    /// Acknowledge status bits `v`.
    pub fn ack_irq(&self, v: u32) {
        self.bar.write32(IRQ_ACK, v);
    }

    /// The interrupt status register.
    pub fn irq_status(&self) -> u32 {
        self.bar.read32(IRQ_STATUS)
    }

    /// The PCI function.
    pub fn pci(&self) -> &Arc<VfioPci> {
        &self.pci
    }

    /// One DMA transfer: `to_ram` moves the device buffer (at `EDU_BUFFER + off`) to
    /// `iova`, otherwise `iova` to the device buffer. Waits for it (bounded).
    pub fn dma(&self, iova: u64, off: u32, len: u32, to_ram: bool) -> Result<Duration> {
        let bad = |why: String| Error::Vfio {
            op: "edu DMA",
            device: self.pci.bdf().to_string(),
            reason: why,
            errno: Some(libc::EINVAL),
            hint: "edu DMA addresses are 28 bits and transfers stay inside its 4 KiB buffer",
        };
        if len == 0 || off as u64 + len as u64 > EDU_MAX_TRANSFER as u64 {
            return Err(bad(format!("{len} bytes at buffer offset {off}")));
        }
        if iova
            .checked_add(len as u64)
            .is_none_or(|e| e > EDU_DMA_LIMIT)
        {
            return Err(bad(format!("IOVA {iova:#x} is not below 256 MiB")));
        }
        let dev = EDU_BUFFER + off as u64;
        let (src, dst) = if to_ram { (dev, iova) } else { (iova, dev) };
        self.bar.write64(DMA_SRC, src);
        self.bar.write64(DMA_DST, dst);
        self.bar.write64(DMA_COUNT, len as u64);
        let t0 = Instant::now();
        self.bar
            .write32(DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
        while self.bar.read32(DMA_CMD) & CMD_START != 0 {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(Error::DeviceTimeout {
                    what: "an edu DMA",
                    waited_ms: 10_000,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(t0.elapsed())
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        let _ = self.pci.disable_bus_master();
    }
}
