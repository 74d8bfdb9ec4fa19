//! gpuvm: GPU virtual memory on the reference device (datasheet section 10).
//!
//! * `fault_replay_4KiB` / `_64KiB` / `_2MiB`: a FILL of fresh (CPU-touched) memory
//!   through an SVM VM, first touch: the fault record, the handler's access check,
//!   the registry pin of a chunk of that size, the bind, the replay and the FILL;
//!   next to the same FILL again in the same sample (`prebound_hit_*`: bound, no
//!   fault), interleaved;
//! * `tlb_hit` / `page_walk`: the engine's stage-1 translation of one address, a TLB
//!   hit next to a four-level walk, measured on the device's MMU directly
//!   (`reference::mmu`: ns per access, no DMA around it);
//! * `invalidate_bound_2MiB`: the invalidation of a 2 MiB userptr bound in a VM
//!   (the VM's notice: PTE zap and TLB invalidation, then the unmap and the unpin),
//!   next to `idle_2MiB_discard`: the same without a VM.

use super::measure::{interleaved, time_us, Mem};
use super::target::Target;
use super::{Ctx, Measurement};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userptr::driver::gpuvm::{Gpu, VmConfig};
use userptr::driver::reference::mmu::{Layout, Mmu, VmCtx};
use userptr::driver::reference::vram::PtMemory;
use userptr::ring::regs::pte;
use userptr::{AccessKind, Cause, Descriptor, Driver, Perm, Registry, RegistryConfig, WaitMode};

const T: Duration = Duration::from_secs(30);

pub fn run(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    if !matches!(target, Target::Reference) {
        return Err("the gpuvm suite needs the reference device: GPU VMs are its register map 1.1\nhint: drop --device".to_string());
    }
    let mut out = fault_replay(ctx)?;
    out.extend(translation(ctx)?);
    out.push(invalidate_bound(ctx)?);
    Ok(out)
}

/// Anonymous memory of `len` bytes at a `len`-aligned address (so that an SVM fault
/// binds a chunk of exactly `len`), every page touched; unmapped on drop.
struct Aligned {
    addr: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Result<Aligned, String> {
        let span = 2 * len;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of {span} bytes failed"));
        }
        let base = p as usize;
        let addr = base.next_multiple_of(len);
        // SAFETY: trimming our own fresh mapping to the aligned `len` bytes inside it.
        unsafe {
            if addr > base {
                libc::munmap(p, addr - base);
            }
            let end = addr + len;
            if base + span > end {
                libc::munmap(end as *mut _, base + span - end);
            }
            std::ptr::write_bytes(addr as *mut u8, 1, len);
        }
        Ok(Aligned { addr, len })
    }

    fn range(&self) -> std::ops::Range<u64> {
        self.addr as u64..(self.addr + self.len) as u64
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: our mapping; the registry was told before (see the callers).
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

fn fault_replay(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let drv = Driver::reference().map_err(e)?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).map_err(e)?;
    let vm = gpu.create_vm(VmConfig::svm()).map_err(e)?;
    let q = drv.queue(0, 16).map_err(e)?;
    vm.attach(&q).map_err(e)?;
    let mut out = Vec::new();
    for (name, len) in [
        ("4KiB", 4usize << 10),
        ("64KiB", 64 << 10),
        ("2MiB", 2 << 20),
    ] {
        let cur: RefCell<Option<Aligned>> = RefCell::new(None);
        let err: RefCell<Option<String>> = RefCell::new(None);
        let fill = |a: &Aligned, b: u8| -> f64 {
            let t = Instant::now();
            // SAFETY: `a` is this bench's own buffer, not touched while the FILL runs
            // (waited for right here).
            let r = unsafe { vm.submit(&q, &[Descriptor::fill(a.addr as u64, a.len as u64, b)]) }
                .and_then(|f| q.wait(f.end, WaitMode::Block, T));
            let us = t.elapsed().as_secs_f64() * 1e6;
            match r {
                Ok(c) if c.status == userptr::Status::Ok => {}
                Ok(c) => *err.borrow_mut() = Some(format!("FILL {name}: {:?}", c.status)),
                Err(x) => *err.borrow_mut() = Some(crate::explain(&x)),
            }
            us
        };
        let faults0 = vm.stats().faults;
        let (ours, base) = interleaved(
            ctx.samples,
            2,
            || match Aligned::new(len) {
                Ok(a) => {
                    let us = fill(&a, 7);
                    *cur.borrow_mut() = Some(a);
                    us
                }
                Err(x) => {
                    *err.borrow_mut() = Some(x);
                    0.0
                }
            },
            || {
                let Some(a) = cur.borrow_mut().take() else {
                    return 0.0;
                };
                let us = fill(&a, 8);
                // The application unmaps it: the registry is told (no monitor here).
                if let Err(x) = reg.invalidate(a.range(), Cause::Unmap) {
                    *err.borrow_mut() = Some(crate::explain(&x));
                }
                drop(a);
                us
            },
        );
        if let Some(x) = err.into_inner() {
            return Err(x);
        }
        let faults = vm.stats().faults - faults0;
        if faults < ctx.samples as u64 {
            return Err(format!(
                "fault_replay_{name}: {faults} faults for {} first touches",
                ctx.samples
            ));
        }
        out.push(
            Measurement::new("gpuvm", format!("fault_replay_{name}"), "us", ours)
                .with_baseline(format!("prebound_hit_{name}"), base),
        );
    }
    Ok(out)
}

fn translation(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    // A four-level table in page-table memory of the device's shape: root, level 2,
    // level 1, level 0, one 4 KiB leaf.
    let pt = Arc::new(PtMemory::anonymous(4 * 4096).map_err(|e| crate::explain(&e))?);
    let va = 0x7f12_3456_7000u64;
    for level in (1..4u32).rev() {
        let table = (3 - level as u64) * 4096;
        pt.store(table + pte::index(va, level) * 8, pte::table(table + 4096));
    }
    pt.store(
        3 * 4096 + pte::index(va, 0) * 8,
        pte::leaf(0x1234_5000, true, false),
    );
    let layout = Layout {
        pt_base: 0,
        pt_size: 4 * 4096,
        devmem_base: 1 << 40,
        devmem_size: 0,
    };
    let mmu = Mmu::new(pt, layout, 256);
    let vm = VmCtx {
        id: 1,
        root: 0,
        enabled: true,
        replayable: false,
    };
    if mmu.walk(&vm, va).map(|t| t.addr(va)) != Ok(0x1234_5000) {
        return Err("the translation benchmark's table does not translate".into());
    }
    const N: u32 = 10_000;
    let mmu = RefCell::new(mmu);
    let (hit, walk) = interleaved(
        ctx.samples,
        3,
        || {
            let mut m = mmu.borrow_mut();
            let t = Instant::now();
            for i in 0..N {
                let a = va + (i as u64 & 0xff8);
                std::hint::black_box(m.translate(&vm, std::hint::black_box(a), AccessKind::Read))
                    .ok();
            }
            t.elapsed().as_secs_f64() * 1e9 / N as f64
        },
        || {
            let m = mmu.borrow();
            let t = Instant::now();
            for i in 0..N {
                let a = va + (i as u64 & 0xff8);
                std::hint::black_box(m.walk(&vm, std::hint::black_box(a))).ok();
            }
            t.elapsed().as_secs_f64() * 1e9 / N as f64
        },
    );
    let m = mmu.borrow();
    if m.walks != 1 || m.tlb.misses != 1 {
        return Err(format!(
            "tlb_hit: {} walks and {} misses where one of each was expected",
            m.walks, m.tlb.misses
        ));
    }
    Ok(vec![
        Measurement::new("gpuvm", "tlb_hit", "ns", hit).with_baseline("page_walk", walk.clone()),
        Measurement::new("gpuvm", "page_walk", "ns", walk),
    ])
}

fn invalidate_bound(ctx: &Ctx) -> Result<Measurement, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let drv = Driver::reference().map_err(e)?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    // The baseline: a registry of the same device that no VM mirrors.
    let plain = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).map_err(e)?;
    let vm = gpu.create_vm(VmConfig::bound()).map_err(e)?;
    let q = drv.queue(0, 16).map_err(e)?;
    vm.attach(&q).map_err(e)?;
    let len = 2usize << 20;
    let (mem, mem2) = (Mem::new(len)?, Mem::new(len)?);
    // SAFETY: `mem` is this bench's own buffer, alive past the registry, only written
    // by the device's FILLs, each waited for.
    let u = unsafe { reg.register(mem.addr, len, Perm::READ_WRITE) }.map_err(e)?;
    let b = vm.bind(&u, 0x40_0000_0000).map_err(e)?;
    let discard = |m: &Mem| {
        // SAFETY: discarding our own buffer's pages.
        unsafe { libc::madvise(m.addr as *mut _, m.len, libc::MADV_DONTNEED) };
    };
    let err: RefCell<Option<String>> = RefCell::new(None);
    let zapped0 = vm.stats().ptes_zapped;
    let (ours, base) = interleaved(
        ctx.samples,
        2,
        || {
            // Bound and present again: the submission rebinds it (not timed).
            // SAFETY: a bound VM: the FILL reaches the registration above.
            let r = unsafe { vm.submit(&q, &[Descriptor::fill(b.va(), 4096, 1)]) }
                .and_then(|f| q.wait(f.end, WaitMode::Block, T));
            if let Err(x) = r {
                *err.borrow_mut() = Some(crate::explain(&x));
            }
            let range = mem.addr as u64..(mem.addr + len) as u64;
            time_us(|| match reg.invalidate_start(range, Cause::Discard) {
                Ok(inv) => {
                    discard(&mem);
                    reg.invalidate_end(inv);
                }
                Err(x) => *err.borrow_mut() = Some(crate::explain(&x)),
            })
        },
        || {
            // SAFETY: `mem2` is this bench's own buffer, never touched by the device.
            if let Err(x) = unsafe { plain.register(mem2.addr, len, Perm::READ_WRITE) } {
                *err.borrow_mut() = Some(crate::explain(&x));
            }
            let range = mem2.addr as u64..(mem2.addr + len) as u64;
            time_us(|| match plain.invalidate_start(range, Cause::Discard) {
                Ok(inv) => {
                    discard(&mem2);
                    plain.invalidate_end(inv);
                }
                Err(x) => *err.borrow_mut() = Some(crate::explain(&x)),
            })
        },
    );
    if let Some(x) = err.into_inner() {
        return Err(x);
    }
    if vm.stats().ptes_zapped == zapped0 {
        return Err("invalidate_bound_2MiB: the VM zapped nothing".into());
    }
    Ok(
        Measurement::new("gpuvm", "invalidate_bound_2MiB", "us", ours)
            .with_baseline("idle_2MiB_discard", base),
    )
}
