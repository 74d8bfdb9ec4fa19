//! The in-kernel baseline for invalidation: what the kernel's own mmu_notifier costs
//! on the work an invalidation of ours does (`invalidate` suite,
//! `kernel_notifier_2MiB`).
//!
//! A KVM virtual machine (the rust-vmm `kvm-ioctls` crate) gets a memory slot over a
//! 2 MiB anonymous buffer; a few instructions of 32-bit guest code write one byte to
//! every 4 KiB page of it, so the secondary MMU (EPT, or shadow pages) maps every
//! page. Then `madvise(MADV_DONTNEED)` of the buffer is timed: the kernel runs KVM's
//! `invalidate_range_start` / `_end`, which zaps those mappings and flushes the guest
//! TLBs, before the pages go. The baseline is the same `madvise` on a buffer of the
//! same size that no slot covers (the notifier is called for it too, and finds nothing
//! to do), interleaved. The difference (`added_us`) is the kernel's mmu_notifier cost,
//! to read next to `idle_2MiB_discard` and the seccomp monitor's
//! `seccomp_registered_madvise`.
//!
//! This module owns the KVM interface of the tool; its one `unsafe` is the memory slot.

use super::measure::{interleaved, time_us, Mem};
use super::{Ctx, Measurement};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const LEN: usize = 2 << 20;
/// Guest-physical addresses: the code page, and the buffer's slot.
const CODE_GPA: u64 = 0x1000;
const BUF_GPA: u64 = 0x20_0000;

/// 32-bit flat code: write one byte to each of the buffer's 512 pages, then halt.
const TOUCH: [u8; 23] = [
    0xbf, 0x00, 0x00, 0x20, 0x00, // mov edi, BUF_GPA
    0xb9, 0x00, 0x02, 0x00, 0x00, // mov ecx, 512
    0xc6, 0x07, 0x01, // loop: mov byte [edi], 1
    0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add edi, 4096
    0x49, // dec ecx
    0x75, 0xf4, // jnz loop
    0xf4, // hlt
];

/// A one-vCPU VM whose guest can touch every page of `buf`.
struct Guest {
    // Kept for the VM's life: the vCPU and the slots belong to it.
    _vm: VmFd,
    vcpu: VcpuFd,
}

fn kvm_err(what: &str, e: kvm_ioctls::Error) -> String {
    format!("{what}: {e}\nhint: /dev/kvm must exist and be readable and writable by this user")
}

impl Guest {
    fn new(code: &Mem, buf: &Mem) -> Result<Guest, String> {
        let kvm = Kvm::new().map_err(|e| kvm_err("open /dev/kvm", e))?;
        let vm = kvm.create_vm().map_err(|e| kvm_err("KVM_CREATE_VM", e))?;
        code.fill_with(|i| TOUCH.get(i).copied().unwrap_or(0xf4));
        for (slot, gpa, m) in [(0, CODE_GPA, code), (1, BUF_GPA, buf)] {
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: gpa,
                memory_size: m.len as u64,
                userspace_addr: m.addr as u64,
                flags: 0,
            };
            // SAFETY: `m` is a live anonymous mapping of `m.len` bytes that outlives
            // the VM (the caller keeps both `Mem`s until the `Guest` is dropped), and
            // the guest only ever writes plain bytes into it.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| kvm_err("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
        let mut sregs = vcpu.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
        // Protected mode, no paging, flat 4 GiB segments: guest-linear = guest-physical.
        for (seg, type_) in [
            (&mut sregs.cs, 0xb),
            (&mut sregs.ds, 0x3),
            (&mut sregs.es, 0x3),
            (&mut sregs.ss, 0x3),
        ] {
            seg.base = 0;
            seg.limit = 0xffff_ffff;
            seg.selector = if type_ == 0xb { 0x08 } else { 0x10 };
            seg.type_ = type_;
            seg.present = 1;
            seg.dpl = 0;
            seg.db = 1;
            seg.s = 1;
            seg.l = 0;
            seg.g = 1;
        }
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs)
            .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
        Ok(Guest { _vm: vm, vcpu })
    }

    /// Run the guest once: every page of the buffer written.
    fn touch(&mut self) -> Result<(), String> {
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_GPA,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| kvm_err("KVM_SET_REGS", e))?;
        match self.vcpu.run().map_err(|e| kvm_err("KVM_RUN", e))? {
            VcpuExit::Hlt => Ok(()),
            other => Err(format!(
                "the guest that touches the slot stopped with {other:?}, not HLT\n\
                 hint: KVM here cannot run the 32-bit guest; the row is left out"
            )),
        }
    }
}

/// `kernel_notifier_2MiB`, or a skip with the reason where KVM is missing.
pub fn kernel_notifier(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    const NAME: &str = "kernel_notifier_2MiB";
    if !std::path::Path::new("/dev/kvm").exists() {
        ctx.skip("invalidate", NAME, "no /dev/kvm on this machine".into());
        return Ok(Vec::new());
    }
    let (code, slot, plain) = (Mem::new(4096)?, Mem::new(LEN)?, Mem::new(LEN)?);
    let mut guest = match Guest::new(&code, &slot).and_then(|mut g| g.touch().map(|()| g)) {
        Ok(g) => g,
        Err(e) => {
            ctx.skip("invalidate", NAME, e);
            return Ok(Vec::new());
        }
    };
    let discard = |m: &Mem| {
        // SAFETY: discarding our own buffer's pages (the guest's slot over it stays
        // valid: the next guest access faults fresh zero pages in).
        unsafe { libc::madvise(m.addr as *mut _, m.len, libc::MADV_DONTNEED) };
    };
    // The guest's writes land in the buffer: discarded to zeros, then touched, every
    // page starts with the guest's 1 (so the slot really is mapped, page by page).
    discard(&slot);
    guest.touch()?;
    let bytes = slot.bytes();
    if let Some(page) = (0..LEN / 4096).find(|p| bytes[p * 4096] != 1) {
        ctx.skip(
            "invalidate",
            NAME,
            format!("the guest's write to page {page} of its slot did not reach the buffer"),
        );
        return Ok(Vec::new());
    }
    let mut err = None;
    let (ours, base) = interleaved(
        ctx.samples,
        2,
        || {
            if let Err(e) = guest.touch() {
                err = Some(e);
            }
            time_us(|| discard(&slot))
        },
        || {
            plain.fill_with(|_| 1);
            time_us(|| discard(&plain))
        },
    );
    drop(guest);
    if let Some(e) = err {
        return Err(e);
    }
    Ok(vec![Measurement::new("invalidate", NAME, "us", ours)
        .with_baseline("raw_madvise_2MiB_no_slot", base)])
}
