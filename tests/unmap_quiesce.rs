//! Unmapping is a fence for the device, as on a real IOMMU: once a mapping is dropped,
//! no transfer still reaches its pages. (The reference IOMMU's device accesses are
//! io_uring requests, which hold their own reference to the pinned buffer: without the
//! wait in `unmap`, the transfers in flight at the drop would land after it.)

mod common;

use std::time::Duration;
use userptr::{Backpressure, Descriptor, Driver, WaitMode};

#[test]
fn no_device_write_lands_after_a_mapping_is_dropped() {
    let _g = common::serial();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 4).unwrap();
    const LEN: usize = 64 << 20;
    let mut buf = vec![0u8; LEN];
    let mut late = 0;
    for round in 0..20u8 {
        let m = drv.map_slice(&mut buf).unwrap();
        let b = round.wrapping_mul(7) | 1;
        let f = q
            .submit(Descriptor::fill(m.iova(), m.len(), b), Backpressure::Wait)
            .unwrap();
        // Let the device get going, then take the mapping away mid-command.
        std::thread::sleep(Duration::from_micros(300 + 100 * round as u64));
        drop(m);
        let snapshot = buf.clone();
        std::thread::sleep(Duration::from_millis(20));
        if buf != snapshot {
            late += 1;
        }
        // The command ends one way or the other: done before the drop, or faulted on
        // the IOVA that is no longer mapped.
        let c = q
            .wait_completion(f, WaitMode::Block, Duration::from_secs(30))
            .unwrap();
        assert!(
            matches!(c.status, userptr::Status::Ok | userptr::Status::DmaFault),
            "{c:?}"
        );
    }
    assert_eq!(
        late, 0,
        "device writes landed after the mapping was dropped"
    );
}
