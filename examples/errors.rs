//! Handling errors: a DMA fault (a command writing memory registered read-only), the
//! raw completion for diagnostics, and registrations the registry refuses.
//!
//! `cargo run --example errors`

use std::time::Duration;
use userptr::{
    AccessKind, Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status, WaitMode,
};

const T: Duration = Duration::from_secs(10);

fn main() -> userptr::Result<()> {
    let drv = Driver::reference()?;
    let q = drv.queue(0, 16)?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());

    // A DMA fault: the IOMMU blocks the device's write into read-only memory, and the
    // wait says so.
    let table = vec![7u8; 8192];
    let ro = reg.register_slice_ref(&table)?;
    let f = reg.submit(&q, &[&ro], |iova| {
        vec![Descriptor::nop(), Descriptor::fill(iova[0], 4096, 0)]
    })?;
    match q.wait_batch(f, WaitMode::Block, T) {
        Err(Error::Command {
            seqno,
            status: Status::DmaFault,
            fault: Some(fault),
            ..
        }) => {
            assert_eq!(fault.access, AccessKind::Write);
            println!(
                "errors: command {seqno} faulted writing IOVA {:#x}: refused, as it should be",
                fault.iova
            );
        }
        other => panic!("expected a DMA fault, got {other:?}"),
    }
    assert!(
        table.iter().all(|&b| b == 7),
        "read-only memory was written"
    );

    // The same fault, looked at raw (tests, diagnostics): `wait_completion` returns the
    // completion whatever its status.
    let f = reg.submit(&q, &[&ro], |iova| vec![Descriptor::fill(iova[0], 4096, 0)])?;
    let c = q.wait_completion(f.end, WaitMode::Block, T)?;
    assert_eq!(c.status, Status::DmaFault);
    println!(
        "errors: raw completion {}: {:?}, fault {:?}",
        c.seqno, c.status, c.fault
    );

    // The device keeps working after a fault.
    let mut out = vec![0u8; 4096];
    let rw = reg.register_slice(&mut out)?;
    let f = reg.submit(&q, &[&rw], |iova| vec![Descriptor::fill(iova[0], 4096, 1)])?;
    q.wait_batch(f, WaitMode::Block, T)?;
    reg.unregister(rw)?;
    assert!(out.iter().all(|&b| b == 1));

    // Registrations the registry refuses, with a typed error and nothing pinned.
    let mut empty: [u32; 0] = [];
    match reg.register_slice(&mut empty) {
        Err(e @ Error::ZeroLength { .. }) => println!("errors: empty slice refused: {e}"),
        other => panic!("expected ZeroLength, got {other:?}"),
    }
    // An address range with nothing mapped there (the first page is never mapped).
    // SAFETY: the range is refused before anything is pinned or mapped (nothing is
    // there to pin), so no memory is handed to the device.
    match unsafe { reg.register(0x1000, 4096, Perm::READ_WRITE) } {
        Err(e @ Error::BadAddress { .. }) => println!("errors: unmapped range refused: {e}"),
        other => panic!("expected BadAddress, got {other:?}"),
    }
    println!("errors: ok");
    Ok(())
}
