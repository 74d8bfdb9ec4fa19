//! Two registry notices of one region to a GPU VM (`driver/src/gpuvm/mirror.rs`): a
//! merge's reclaim is unmapping the region the VM's binding points into, and an
//! invalidation of the same range (which the registry tells about the region on its
//! way out) arrives while the first notice has marked the binding but not yet zapped
//! its entries. The invalidation must not return while the VM still translates into
//! the region: its address-space change would then go ahead with the device writing
//! the old pages (still pinned until the first notice's thread gets to the unmap).
//! That is what `torture --gpuvm --only madv_dontneed` found, on both VM kinds.
//!
//! The first notice is held between marking and zapping by a debug knob, so the
//! second one runs in that window every time.

mod common;

use common::{Anon, RegisterTest, VmSubmitTest};
use std::time::{Duration, Instant};
use userptr::driver::gpuvm::{DebugKnobs, Gpu, VmConfig};
use userptr::{Cause, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, WaitMode};

const VA: u64 = 0x40_0000_0000;
const LEN: usize = 64 << 10;

fn scenario(cfg: VmConfig) {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    let vm = gpu.create_vm(cfg).unwrap();
    let q = drv.queue(0, 16).unwrap();
    vm.attach(&q).unwrap();
    let buf = Anon::new(2 * LEN);
    let u = reg.register_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    let b = vm.bind(&u, VA).unwrap();
    // The entries are made present by a submission.
    let f = vm
        .submit_test(&q, &[Descriptor::fill(b.va(), LEN as u64, 1)])
        .unwrap();
    let c = q
        .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
        .unwrap();
    assert_eq!(c.status, Status::Ok);
    assert!(vm.leaf(VA).is_some(), "the binding is mapped");
    vm.set_debug_knobs(DebugKnobs {
        notice_pause_ms: 500,
        ..Default::default()
    });
    let before = vm.stats().invalidations;
    std::thread::scope(|s| {
        // A registration covering the first one and the next 64 KiB: the registry
        // pins the union, and its reclaim unmaps the old region, telling the VM,
        // which marks the binding and is then held.
        s.spawn(|| {
            drop(
                reg.register_test(buf.addr, 2 * LEN, Perm::READ_WRITE)
                    .unwrap(),
            );
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while vm.stats().invalidations == before {
            assert!(Instant::now() < deadline, "the merge's notice never came");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The first notice has marked the binding and holds its entries: an
        // invalidation of the range must take them away itself before it returns.
        let range = buf.addr as u64..(buf.addr + LEN) as u64;
        let inv = reg.invalidate_start(range, Cause::Discard).unwrap();
        let leaf = vm.leaf(VA);
        reg.invalidate_end(inv);
        assert_eq!(
            leaf, None,
            "the invalidation returned while the VM still mapped the old region"
        );
    });
    vm.set_debug_knobs(DebugKnobs::default());
}

#[test]
fn a_second_notice_of_a_region_waits_for_its_entries_on_a_vm_of_bound_userptrs() {
    let _serial = common::serial();
    scenario(VmConfig::bound());
}

#[test]
fn a_second_notice_of_a_region_waits_for_its_entries_on_a_vm_with_replayable_faults() {
    let _serial = common::serial();
    scenario(VmConfig {
        replayable_faults: true,
        svm: false,
    });
}
