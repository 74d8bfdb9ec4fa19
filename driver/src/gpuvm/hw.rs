//! The GPU-VM registers as the driver uses them (`docs/reference-device.md` section
//! 10.2): page-table writes through the VRAM window, TLB invalidation with its bounded
//! completion wait, VM context programming, a ring's VM and REPLAY registers. Only
//! the [`Device`] trait: this works against any device with that register map.

use crate::device::Device;
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use userptr_ring::regs::{self, ring, vm};

/// How long a TLB invalidation may take before the driver gives up on the device.
pub(super) const TLB_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the page-table region and the device-memory heap are (read from the device).
#[derive(Clone, Copy, Debug)]
pub(super) struct Regions {
    pub(super) pt_base: u64,
    pub(super) pt_size: u64,
    pub(super) devmem_base: u64,
    pub(super) devmem_size: u64,
}

/// The device's GPU-VM register interface.
pub(crate) struct Hw {
    pub(super) dev: Arc<dyn Device>,
    pub(super) regions: Regions,
    /// The window's index and data registers are one shared state.
    window: Mutex<()>,
    /// The four request registers and the POSTED read are one step.
    tlb: Mutex<()>,
}

impl Hw {
    pub(super) fn new(dev: Arc<dyn Device>) -> Hw {
        let regions = Regions {
            pt_base: dev.read32(regs::PT_BASE) as u64,
            pt_size: dev.read32(regs::PT_SIZE) as u64,
            devmem_base: dev.read32(regs::DEVMEM_BASE) as u64,
            devmem_size: dev.read32(regs::DEVMEM_SIZE) as u64,
        };
        Hw {
            dev,
            regions,
            window: Mutex::new(()),
            tlb: Mutex::new(()),
        }
    }

    /// Store `words` at consecutive 8-byte slots from VRAM offset `off` (inside the
    /// page-table region), each with one 64-bit store (the window's DATA_HI write).
    pub(super) fn write_words(&self, off: u64, words: &[u64]) {
        if words.is_empty() {
            return;
        }
        let _g = self.window.lock().expect("vram window lock poisoned");
        self.dev.write32(regs::VRAM_INDEX, off as u32);
        for w in words {
            self.dev.write32(regs::VRAM_DATA_LO, *w as u32);
            self.dev.write32(regs::VRAM_DATA_HI, (*w >> 32) as u32);
        }
    }

    /// Zero the 4 KiB table at VRAM offset `off`.
    pub(super) fn zero_table(&self, off: u64) {
        self.write_words(off, &[0u64; 512]);
    }

    /// The word at VRAM offset `off` (through the window; for tests and checks).
    pub(super) fn read_word(&self, off: u64) -> u64 {
        let _g = self.window.lock().expect("vram window lock poisoned");
        self.dev.write32(regs::VRAM_INDEX, off as u32);
        self.dev.read32(regs::VRAM_DATA_LO) as u64
            | (self.dev.read32(regs::VRAM_DATA_HI) as u64) << 32
    }

    /// Post one invalidation request of VM `vm` over `va` (0 pages: the whole VM).
    fn post(&self, vm: u32, va: u64, pages: u32) -> u32 {
        let _g = self.tlb.lock().expect("tlb register lock poisoned");
        self.dev.write32(regs::TLB_INV_VM, vm);
        self.dev.write32(regs::TLB_INV_VA_LO, va as u32);
        self.dev.write32(regs::TLB_INV_VA_HI, (va >> 32) as u32);
        self.dev.write32(regs::TLB_INV_PAGES, pages);
        self.dev.write32(regs::TLB_INV_REQ, 1);
        self.dev.read32(regs::TLB_INV_POSTED)
    }

    /// Invalidate VM `vm`'s translations of `ranges` (none: the whole VM) and wait,
    /// bounded, until the device reports every request complete: from then on no
    /// access uses a translation made before.
    pub(super) fn tlb_invalidate(&self, vm: u32, ranges: &[Range<u64>]) -> Result<()> {
        let mut last = None;
        if ranges.is_empty() {
            last = Some(self.post(vm, 0, 0));
        }
        for r in ranges {
            let start = r.start & !0xfff;
            let pages = (r.end.saturating_sub(start)).div_ceil(4096);
            // A request names at most u32::MAX pages; larger ranges take the whole VM.
            let k = match u32::try_from(pages) {
                Ok(p) if p > 0 => self.post(vm, start, p),
                _ => self.post(vm, 0, 0),
            };
            last = Some(k);
        }
        let Some(k) = last else { return Ok(()) };
        // Requests complete in posting order: the last one covers all.
        let deadline = Instant::now() + TLB_TIMEOUT;
        let mut spins = 0u32;
        loop {
            let done = self.dev.read32(regs::TLB_INV_DONE);
            if done.wrapping_sub(k) as i32 >= 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::DeviceTimeout {
                    what: "a TLB invalidation",
                    waited_ms: TLB_TIMEOUT.as_millis() as u64,
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 1024 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Program VM context `id`: its root table and control bits.
    pub(super) fn program_vm(&self, id: u32, root: u64, replayable: bool) {
        self.dev.write32(regs::vm_reg(id, vm::ROOT_LO), root as u32);
        self.dev
            .write32(regs::vm_reg(id, vm::ROOT_HI), (root >> 32) as u32);
        let c = vm::CONTROL_ENABLE
            | if replayable {
                vm::CONTROL_REPLAYABLE
            } else {
                0
            };
        self.dev.write32(regs::vm_reg(id, vm::CONTROL), c);
    }

    /// Disable VM context `id` (every access through it faults from now on).
    pub(super) fn disable_vm(&self, id: u32) {
        self.dev.write32(regs::vm_reg(id, vm::CONTROL), 0);
    }

    /// Bind ring `r` to VM `id` (0: IOVAs again).
    pub(super) fn set_ring_vm(&self, r: u32, id: u32) {
        self.dev.write32(regs::ring_reg(r, ring::VM), id);
    }

    /// Ring `r`'s VM register.
    pub(super) fn ring_vm(&self, r: u32) -> u32 {
        self.dev.read32(regs::ring_reg(r, ring::VM))
    }

    /// Answer ring `r`'s held command: replay it or fail it.
    pub(super) fn replay(&self, r: u32, retry: bool) {
        let v = if retry {
            ring::REPLAY_RETRY
        } else {
            ring::REPLAY_FAIL
        };
        self.dev.write32(regs::ring_reg(r, ring::REPLAY), v);
    }
}
