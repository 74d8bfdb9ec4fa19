//! GPU VMs on the reference device (datasheet section 10, `driver/src/gpuvm/`): bound
//! userptrs and device memory at GPU VAs, DMA faults with their kind, the invalidation
//! order and why it matters, and the per-cause policy, all with real pins.
//!
//! The two hazard tests run their scenario twice: with the protection, the device
//! must not reach another buffer's pages; with the protection switched off (a
//! `DebugKnobs` switch on the driver), it must: proof that each protection is what
//! stops it.

mod common;

use common::{Anon, MapTest, PinCheck, RegisterTest, VmSubmitTest};
use std::time::Duration;
use userptr::driver::gpuvm::{DebugKnobs, Gpu, GpuVm, VmConfig};
use userptr::ring::regs::fault_kind;
use userptr::{
    AccessKind, Cause, CommandQueue, Completion, Descriptor, Driver, Perm, Registry,
    RegistryConfig, Status, WaitMode,
};

const T: Duration = Duration::from_secs(30);
const VA: u64 = 0x40_0000_0000;
const VA2: u64 = 0x80_0000_0000;
const LEN: usize = 64 << 10;

struct Setup {
    drv: Driver,
    reg: Registry,
    _gpu: Gpu,
    vm: GpuVm,
    q: CommandQueue,
}

fn setup(cfg: VmConfig) -> Setup {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    let vm = gpu.create_vm(cfg).unwrap();
    let q = drv.queue(0, 16).unwrap();
    vm.attach(&q).unwrap();
    Setup {
        drv,
        reg,
        _gpu: gpu,
        vm,
        q,
    }
}

fn run(s: &Setup, d: Descriptor) -> Completion {
    let f = s.vm.submit_test(&s.q, &[d]).unwrap();
    s.q.wait_completion(f.end, WaitMode::Block, T).unwrap()
}

fn all(buf: &Anon, b: u8) -> bool {
    buf.read().iter().all(|&x| x == b)
}

#[test]
fn bound_userptrs_and_device_memory_at_gpu_vas() {
    let pins = PinCheck::start();
    let s = setup(VmConfig::bound());
    let a = Anon::new(LEN);
    let b = Anon::new(LEN);
    b.fill(0);
    let ua = s.reg.register_test(a.addr, LEN, Perm::READ_WRITE).unwrap();
    let ub = s.reg.register_test(b.addr, LEN, Perm::READ_WRITE).unwrap();
    let ba = s.vm.bind(&ua, VA).unwrap();
    let bb = s.vm.bind(&ub, VA2).unwrap();
    // What the device walks is what the driver wrote.
    for off in [0, 4096, LEN as u64 - 4096] {
        let leaf = s.vm.leaf(VA + off).expect("mapped");
        assert_eq!(s.vm.device_leaf(VA + off), Some(leaf));
    }
    assert_eq!(s.vm.device_leaf(VA + LEN as u64), None);
    let c = run(&s, Descriptor::fill(ba.va(), LEN as u64, 0x5a));
    assert_eq!(c.status, Status::Ok);
    assert!(all(&a, 0x5a));
    let c = run(&s, Descriptor::copy(ba.va(), bb.va_at(0), LEN as u64));
    assert_eq!(c.status, Status::Ok);
    assert!(all(&b, 0x5a));
    let c = run(&s, Descriptor::crc32c(bb.va(), LEN as u64, 0));
    assert_eq!(c.result as u32, crc32c::crc32c(&b.read()));

    // Device memory: written and read by commands only.
    let dm = s.vm.bind_device_memory(0x10_0000_0000, 3 << 20).unwrap();
    let c = run(&s, Descriptor::fill(dm.va(), 3 << 20, 0xc3));
    assert_eq!(c.status, Status::Ok);
    let c = run(&s, Descriptor::copy(dm.va_at(5 << 12), ba.va(), LEN as u64));
    assert_eq!(c.status, Status::Ok);
    assert!(
        all(&a, 0xc3),
        "device memory reached through a device-memory PTE"
    );
    // A SAXPY across device memory and a userptr.
    a.fill(0);
    let c = run(&s, Descriptor::saxpy(1.0, dm.va(), ba.va(), LEN as u64 / 4));
    assert_eq!(c.status, Status::Ok);
    assert!(all(&a, 0xc3));
    // Bindings cannot overlap; VAs must be aligned and inside 48 bits.
    assert!(s.vm.bind(&ua, VA + 4096).is_err());
    assert!(s.vm.bind(&ua, 0x123).is_err());
    assert!(s.vm.bind(&ua, 1 << 48).is_err());
    s.vm.unbind(dm).unwrap();
    s.vm.unbind(ba).unwrap();
    s.vm.unbind(bb).unwrap();
    assert_eq!(s.vm.pt_pages(), 1, "unbind freed every table but the root");
    drop((ua, ub, s));
    pins.check();
}

#[test]
fn faults_in_a_vm_without_replay_fail_the_command_with_the_gpu_va_and_kind() {
    // Pins, and runs apart from the tests that check VmPin.
    let _serial = common::serial();
    let s = setup(VmConfig::bound());
    let a = Anon::new(LEN);
    let ua = s.reg.register_test(a.addr, LEN, Perm::READ).unwrap();
    let ba = s.vm.bind(&ua, VA).unwrap();
    // Nothing bound there.
    let c = run(&s, Descriptor::fill(VA2 + 8192, 4096, 1));
    assert_eq!(c.status, Status::DmaFault);
    let f = c.fault.unwrap();
    assert_eq!((f.iova, f.access), (VA2 + 8192, AccessKind::Write));
    assert_eq!(c.detail, fault_kind::NOT_PRESENT as u32 | s.vm.id() << 8);
    // A write through a read-only binding.
    let c = run(&s, Descriptor::fill(ba.va() + 4096, 4096, 1));
    assert_eq!(c.status, Status::DmaFault);
    assert_eq!(c.detail & 0xff, fault_kind::WRITE_PROTECTED as u32);
    assert_eq!(c.fault.unwrap().iova, ba.va() + 4096);
    // Reads work; the ring kept running.
    let c = run(&s, Descriptor::crc32c(ba.va(), LEN as u64, 0));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.result as u32, crc32c::crc32c(&a.read()));
    // A ring without the VM still takes IOVAs.
    let q1 = s.drv.queue(1, 16).unwrap();
    let m = s.drv.map_user_test(a.addr, LEN, Perm::READ).unwrap();
    let c = q1.run(Descriptor::crc32c(m.iova(), LEN as u64, 0)).unwrap();
    assert_eq!(c.result as u32, crc32c::crc32c(&a.read()));
}

/// Bind A, let the device touch it, discard A (the registry is told), register B
/// (the allocator hands it A's old IOVA), then write A's GPU VA again. Returns
/// whether B was written (it must not be) and whether A got the write.
fn recycled_iova_scenario(cfg: VmConfig, knobs: DebugKnobs) -> (bool, bool) {
    let s = setup(cfg);
    s.vm.set_debug_knobs(knobs);
    let a = Anon::new(LEN);
    let ua = s.reg.register_test(a.addr, LEN, Perm::READ_WRITE).unwrap();
    let ba = s.vm.bind(&ua, VA).unwrap();
    assert_eq!(
        run(&s, Descriptor::fill(ba.va(), LEN as u64, 0x11)).status,
        Status::Ok
    );
    assert!(all(&a, 0x11));
    let old_iova = s.reg.iova(&ua).unwrap();
    let range = a.addr as u64..(a.addr + LEN) as u64;
    let inv = s.reg.invalidate_start(range, Cause::Discard).unwrap();
    a.madvise(libc::MADV_DONTNEED);
    s.reg.invalidate_end(inv);
    let b = Anon::new(LEN);
    b.fill(0xbb);
    let ub = s.reg.register_test(b.addr, LEN, Perm::READ_WRITE).unwrap();
    assert_eq!(
        s.reg.iova(&ub).unwrap(),
        old_iova,
        "precondition: B got A's recycled IOVA"
    );
    let c = run(&s, Descriptor::fill(ba.va(), LEN as u64, 0x22));
    assert_eq!(c.status, Status::Ok, "{c:?}");
    (!all(&b, 0xbb), all(&a, 0x22))
}

#[test]
fn skipping_the_tlb_invalidation_lets_a_stale_entry_write_another_buffer() {
    // Pins, and runs apart from the tests that check VmPin.
    let _serial = common::serial();
    let (b_hit, a_ok) = recycled_iova_scenario(VmConfig::bound(), DebugKnobs::default());
    assert!(!b_hit, "B's pages were written through A's GPU VA");
    assert!(a_ok, "A's current pages did not get the write");
    let (b_hit, _) = recycled_iova_scenario(
        VmConfig::bound(),
        DebugKnobs {
            skip_tlb_invalidation: true,
            ..Default::default()
        },
    );
    assert!(
        b_hit,
        "control: with the TLB invalidation skipped the stale entry must reach B"
    );
}

#[test]
fn unpinning_before_the_pte_zap_lets_the_device_write_another_buffer() {
    // Pins, and runs apart from the tests that check VmPin.
    let _serial = common::serial();
    // A VM with replayable faults: the write to A's VA faults and the handler binds
    // A's current pages, unless a stale PTE answers first.
    let cfg = VmConfig {
        replayable_faults: true,
        svm: false,
    };
    let (b_hit, a_ok) = recycled_iova_scenario(cfg, DebugKnobs::default());
    assert!(!b_hit, "B's pages were written through A's GPU VA");
    assert!(a_ok, "the fault handler did not bind A's current pages");
    let (b_hit, _) = recycled_iova_scenario(
        cfg,
        DebugKnobs {
            skip_pte_zap: true,
            ..Default::default()
        },
    );
    assert!(
        b_hit,
        "control: with the PTEs left in place past the unpin, the device must reach B"
    );
}

#[test]
fn per_cause_policy_discard_keeps_tables_downgrade_keeps_pins_munmap_frees_tables() {
    let pins = PinCheck::start();
    let s = setup(VmConfig {
        replayable_faults: true,
        svm: false,
    });
    let mut a = Anon::new(LEN);
    let ua = s.reg.register_test(a.addr, LEN, Perm::READ_WRITE).unwrap();
    let ba = s.vm.bind(&ua, VA).unwrap();
    let range = a.addr as u64..(a.addr + LEN) as u64;
    let pages = (LEN / 4096) as u64;
    let tables = s.vm.pt_pages();
    assert_eq!(tables, 4, "root, level 2, level 1, level 0");

    // A destructive madvise: entries zapped, tables kept, the pin released.
    let before = (s.vm.stats(), s.reg.stats());
    let inv = s
        .reg
        .invalidate_start(range.clone(), Cause::Discard)
        .unwrap();
    a.madvise(libc::MADV_DONTNEED);
    s.reg.invalidate_end(inv);
    let (vs, rs) = (s.vm.stats(), s.reg.stats());
    assert_eq!(vs.ptes_zapped - before.0.ptes_zapped, pages);
    assert_eq!(
        vs.pt_pages_freed, before.0.pt_pages_freed,
        "discard keeps tables"
    );
    assert_eq!(s.vm.pt_pages(), tables);
    assert_eq!(rs.unpins - before.1.unpins, 1);
    assert!(s.vm.leaf(VA).is_none());
    // The next access faults and the handler maps the current pages.
    assert_eq!(
        run(&s, Descriptor::fill(ba.va(), LEN as u64, 0x31)).status,
        Status::Ok
    );
    assert!(all(&a, 0x31));
    assert!(s.vm.stats().rebinds > before.0.rebinds);

    // A protection downgrade: write bits cleared, no unpin.
    let before = (s.vm.stats(), s.reg.stats());
    a.mprotect(libc::PROT_READ);
    s.reg
        .invalidate(
            range.clone(),
            Cause::Protect {
                new_prot: libc::PROT_READ,
            },
        )
        .unwrap();
    let (vs, rs) = (s.vm.stats(), s.reg.stats());
    assert_eq!(vs.write_bits_cleared - before.0.write_bits_cleared, pages);
    assert_eq!(rs.unpins, before.1.unpins, "a downgrade keeps the pin");
    assert!(vs.tlb_invalidations > before.0.tlb_invalidations);
    assert_eq!(vs.ptes_zapped, before.0.ptes_zapped);
    let leaf = s.vm.leaf(VA).unwrap();
    assert_eq!(leaf & userptr::ring::regs::pte::W, 0);
    // Reads work; a write faults, and the process could not write either: failed.
    let c = run(&s, Descriptor::crc32c(ba.va(), LEN as u64, 0));
    assert_eq!(c.status, Status::Ok);
    let c = run(&s, Descriptor::fill(ba.va(), 4096, 0x32));
    assert_eq!(c.status, Status::DmaFault);
    assert!(all(&a, 0x31));
    // An upgrade does nothing to the VM...
    a.mprotect(libc::PROT_READ | libc::PROT_WRITE);
    s.reg
        .invalidate(
            range.clone(),
            Cause::Protect {
                new_prot: libc::PROT_READ | libc::PROT_WRITE,
            },
        )
        .unwrap();
    assert_eq!(s.vm.leaf(VA).unwrap() & userptr::ring::regs::pte::W, 0);
    // ...until the next write fault, which gives the bit back.
    assert_eq!(
        run(&s, Descriptor::fill(ba.va(), LEN as u64, 0x33)).status,
        Status::Ok
    );
    assert!(all(&a, 0x33));
    assert_ne!(s.vm.leaf(VA).unwrap() & userptr::ring::regs::pte::W, 0);

    // munmap: entries zapped and the tables of the range freed.
    let before = s.vm.stats();
    a.unmap();
    s.reg.invalidate(range.clone(), Cause::Unmap).unwrap();
    let vs = s.vm.stats();
    assert_eq!(vs.pt_pages_freed - before.pt_pages_freed, 3);
    assert_eq!(s.vm.pt_pages(), 1, "only the root is left");
    // The memory is gone: the access faults and the handler fails it.
    let c = run(&s, Descriptor::fill(ba.va(), 4096, 0x34));
    assert_eq!(c.status, Status::DmaFault);
    drop((ua, ba, s));
    pins.check();
}

#[test]
fn a_vm_id_and_its_tables_are_given_back_on_drop() {
    // Pins, and runs apart from the tests that check VmPin.
    let _serial = common::serial();
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    assert!(matches!(
        Gpu::open(&reg),
        Err(userptr::Error::GpuVmBusy { .. })
    ));
    let vms: Vec<GpuVm> = (0..15)
        .map(|_| gpu.create_vm(VmConfig::bound()).unwrap())
        .collect();
    assert!(matches!(
        gpu.create_vm(VmConfig::bound()),
        Err(userptr::Error::NoFreeVm { limit: 15 })
    ));
    assert_eq!(gpu.pt_pages_in_use(), 15);
    drop(vms);
    assert_eq!(gpu.pt_pages_in_use(), 0);
    let vm = gpu.create_vm(VmConfig::bound()).unwrap();
    let q = drv.queue(0, 16).unwrap();
    let a = Anon::new(LEN);
    assert!(matches!(
        vm.submit_test(&q, &[Descriptor::nop()]),
        Err(userptr::Error::QueueNotAttached { .. })
    ));
    let ua = reg.register_test(a.addr, LEN, Perm::READ_WRITE).unwrap();
    vm.bind(&ua, VA).unwrap();
    vm.attach(&q).unwrap();
    drop(vm);
    // The ring got its IOVAs back when the VM went.
    let m = drv.map_user_test(a.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 7)).unwrap();
    assert!(all(&a, 7));
    assert_eq!(gpu.pt_pages_in_use(), 0);
}
