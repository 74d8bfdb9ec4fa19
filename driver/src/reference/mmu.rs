//! The engine's MMU: stage 1 of a VM ring's translation (`docs/reference-device.md`
//! sections 10.3 and 10.4). A GPU VA is looked up in the [`Tlb`], and on a miss the
//! VM's four-level page table in VRAM is walked (one 64-bit atomic load per level);
//! the leaf gives an IOVA, which the IOMMU then translates again (stage 2, in
//! [`super::dma_port`]), or a device-memory offset.
//!
//! Pure over [`PtMemory`]: no engine state, so the translation measurements
//! (`userptr bench --suite gpuvm`: `tlb_hit`, `page_walk`) and the unit tests drive it
//! directly.

use super::tlb::{Tlb, Translation};
use super::vram::PtMemory;
use std::sync::Arc;
use userptr_ring::regs::{fault_kind, pte};
use userptr_ring::AccessKind;

/// Where the page-table region and the device-memory heap lie in VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// VRAM offset of the page-table region (the [`PtMemory`]'s offset 0).
    pub pt_base: u64,
    /// Its size in bytes.
    pub pt_size: u64,
    /// VRAM offset of the device-memory heap.
    pub devmem_base: u64,
    /// Its size in bytes.
    pub devmem_size: u64,
}

/// A VM context as a round of the engine sees it (the context's registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmCtx {
    /// VM id, 1..=15.
    pub id: u8,
    /// VRAM offset of the level-3 table.
    pub root: u64,
    /// `CONTROL.ENABLE`.
    pub enabled: bool,
    /// `CONTROL.REPLAYABLE`.
    pub replayable: bool,
}

/// A fault on a VM ring: stage 1 (a page-table kind) or stage 2 (`fault_kind::IOMMU`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuFault {
    /// The faulting GPU VA.
    pub va: u64,
    /// Read or write.
    pub access: AccessKind,
    /// [`fault_kind`].
    pub kind: u8,
    /// The VM.
    pub vm: u8,
    /// Whether it goes to the fault queue and holds the command.
    pub replayable: bool,
    /// Bytes of the faulting transfer from `va`.
    pub len: u64,
}

/// Stage 1: the TLB and the page walker.
pub struct Mmu {
    /// The TLB (public for the measurements: hit and miss counts).
    pub tlb: Tlb,
    pt: Arc<PtMemory>,
    layout: Layout,
    /// Page walks done (TLB misses that walked).
    pub walks: u64,
}

impl Mmu {
    /// An MMU over page tables in `pt`, laid out as `layout`, with a TLB of
    /// `tlb_entries` entries.
    pub fn new(pt: Arc<PtMemory>, layout: Layout, tlb_entries: usize) -> Mmu {
        Mmu {
            tlb: Tlb::new(tlb_entries),
            pt,
            layout,
            walks: 0,
        }
    }

    fn in_pt(&self, table: u64) -> bool {
        table % 4096 == 0
            && table >= self.layout.pt_base
            && table
                .checked_add(4096)
                .is_some_and(|e| e <= self.layout.pt_base + self.layout.pt_size)
    }

    fn in_devmem(&self, addr: u64, len: u64) -> bool {
        addr >= self.layout.devmem_base
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.layout.devmem_base + self.layout.devmem_size)
    }

    /// Walk `vm`'s table for `va`, bypassing the TLB. `Err` is a fault kind.
    pub fn walk(&self, vm: &VmCtx, va: u64) -> Result<Translation, u8> {
        if !vm.enabled || !self.in_pt(vm.root) {
            return Err(fault_kind::VM_DISABLED);
        }
        if va >> pte::VA_BITS != 0 {
            return Err(fault_kind::BAD_PTE);
        }
        let mut table = vm.root;
        for level in (0..pte::LEVELS).rev() {
            let e = self
                .pt
                .load(table - self.layout.pt_base + pte::index(va, level) * 8);
            if e & pte::V == 0 {
                return Err(fault_kind::NOT_PRESENT);
            }
            if e & pte::RESERVED != 0 {
                return Err(fault_kind::BAD_PTE);
            }
            let addr = e & pte::ADDR;
            if e & pte::L != 0 {
                if level >= 2 {
                    return Err(fault_kind::BAD_PTE);
                }
                let size_log2 = pte::shift(level);
                let size = 1u64 << size_log2;
                if addr & (size - 1) != 0 {
                    return Err(fault_kind::BAD_PTE);
                }
                let devmem = e & pte::D != 0;
                if devmem && !self.in_devmem(addr, size) {
                    return Err(fault_kind::BAD_PTE);
                }
                return Ok(Translation {
                    page: va & !(size - 1),
                    size_log2,
                    target: addr,
                    writable: e & pte::W != 0,
                    devmem,
                });
            }
            if level == 0 || !self.in_pt(addr) {
                return Err(fault_kind::BAD_PTE);
            }
            table = addr;
        }
        Err(fault_kind::BAD_PTE)
    }

    /// Translate `va` for `access`: the TLB, else a walk that fills it.
    pub fn translate(
        &mut self,
        vm: &VmCtx,
        va: u64,
        access: AccessKind,
    ) -> Result<Translation, GpuFault> {
        let fault = |kind: u8| GpuFault {
            va,
            access,
            kind,
            vm: vm.id,
            replayable: vm.replayable
                && (kind == fault_kind::NOT_PRESENT || kind == fault_kind::WRITE_PROTECTED),
            len: 0,
        };
        let t = match self.tlb.lookup(vm.id, va) {
            Some(t) => t,
            None => {
                self.walks += 1;
                let t = self.walk(vm, va).map_err(fault)?;
                self.tlb.insert(vm.id, t);
                t
            }
        };
        if access == AccessKind::Write && !t.writable {
            return Err(fault(fault_kind::WRITE_PROTECTED));
        }
        Ok(t)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const LAYOUT: Layout = Layout {
        pt_base: 0x10_0000,
        pt_size: 16 * 4096,
        devmem_base: 0x80_0000,
        devmem_size: 4 << 20,
    };

    /// Tables at pt_base + k * 4096: root (L3) k=0, L2 k=1, L1 k=2, L0 k=3.
    fn tables(pt: &PtMemory, va: u64) {
        let t = |k: u64| LAYOUT.pt_base + k * 4096;
        pt.store(pte::index(va, 3) * 8, pte::table(t(1)));
        pt.store(4096 + pte::index(va, 2) * 8, pte::table(t(2)));
        pt.store(2 * 4096 + pte::index(va, 1) * 8, pte::table(t(3)));
    }

    fn vm() -> VmCtx {
        VmCtx {
            id: 1,
            root: LAYOUT.pt_base,
            enabled: true,
            replayable: true,
        }
    }

    #[test]
    fn walks_4k_and_2m_leaves_and_reports_each_fault_kind() {
        let pt = Arc::new(PtMemory::anonymous(16 * 4096).unwrap());
        let mut mmu = Mmu::new(pt.clone(), LAYOUT, 64);
        let va = 0x7f00_1234_5000u64;
        tables(&pt, va);
        let vm = vm();
        let e = mmu.translate(&vm, va, AccessKind::Read).unwrap_err();
        assert_eq!((e.kind, e.replayable), (fault_kind::NOT_PRESENT, true));
        pt.store(
            3 * 4096 + pte::index(va, 0) * 8,
            pte::leaf(0xabc000, false, false),
        );
        let t = mmu.translate(&vm, va + 0x10, AccessKind::Read).unwrap();
        assert_eq!(t.addr(va + 0x10), 0xabc010);
        let e = mmu.translate(&vm, va, AccessKind::Write).unwrap_err();
        assert_eq!(e.kind, fault_kind::WRITE_PROTECTED);
        // A 2 MiB leaf at level 1, device memory.
        let big = 0x7f00_4000_0000u64;
        tables(&pt, big);
        pt.store(
            2 * 4096 + pte::index(big, 1) * 8,
            pte::leaf(LAYOUT.devmem_base + (2 << 20), true, true),
        );
        let t = mmu
            .translate(&vm, big + 0x1f_f000, AccessKind::Write)
            .unwrap();
        assert!(t.devmem && t.size_log2 == 21);
        assert_eq!(
            t.addr(big + 0x1f_f000),
            LAYOUT.devmem_base + (2 << 20) + 0x1f_f000
        );
        // Malformed: a misaligned 2 MiB leaf; reserved bits; devmem outside the heap.
        pt.store(
            2 * 4096 + pte::index(big, 1) * 8,
            pte::leaf(0x1000, true, false),
        );
        assert_eq!(mmu.walk(&vm, big), Err(fault_kind::BAD_PTE));
        pt.store(
            2 * 4096 + pte::index(big, 1) * 8,
            pte::leaf(0, true, false) | 0x10,
        );
        assert_eq!(mmu.walk(&vm, big), Err(fault_kind::BAD_PTE));
        pt.store(2 * 4096 + pte::index(big, 1) * 8, pte::leaf(0, true, true));
        assert_eq!(mmu.walk(&vm, big), Err(fault_kind::BAD_PTE));
        assert_eq!(mmu.walk(&vm, 1 << 50), Err(fault_kind::BAD_PTE));
        let off = VmCtx {
            enabled: false,
            ..vm
        };
        let e = mmu.translate(&off, 0x5000, AccessKind::Read).unwrap_err();
        assert_eq!((e.kind, e.replayable), (fault_kind::VM_DISABLED, false));
    }

    #[test]
    fn a_changed_pte_is_not_seen_until_the_tlb_entry_is_dropped() {
        let pt = Arc::new(PtMemory::anonymous(16 * 4096).unwrap());
        let mut mmu = Mmu::new(pt.clone(), LAYOUT, 64);
        let va = 0x4000_0000u64;
        tables(&pt, va);
        let leaf = 3 * 4096 + pte::index(va, 0) * 8;
        pt.store(leaf, pte::leaf(0x1000, true, false));
        let vm = vm();
        assert_eq!(
            mmu.translate(&vm, va, AccessKind::Read).unwrap().target,
            0x1000
        );
        pt.store(leaf, 0); // zapped, no invalidation
        assert_eq!(
            mmu.translate(&vm, va, AccessKind::Read).unwrap().target,
            0x1000,
            "the stale entry still translates"
        );
        mmu.tlb.invalidate(1, va, 1);
        assert!(mmu.translate(&vm, va, AccessKind::Read).is_err());
    }
}
