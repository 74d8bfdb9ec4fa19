//! The NVMe engine over VFIO: bring up an NVMe controller bound to vfio-pci, WRITE a
//! registered buffer to the disk and READ it back into another, through the registry
//! (cached pins, commands built from the registrations' device addresses); then a READ
//! into memory registered read-only, which the IOMMU refuses: an error from `wait`.
//!
//! Needs a VFIO guest: `USERPTR_VFIO_NVME` names the controller's PCI address
//! (`tools/vfio-guest/run.sh` binds QEMU's NVMe to vfio-pci and sets it, and
//! `tools/vfio-guest/test-in-guest.sh` runs this example there). Elsewhere it says why
//! it skips and exits 0; inside the guest (`USERPTR_IN_GUEST`) a missing controller is
//! an error.
//!
//! `cargo run --example nvme_vfio`

use std::time::Duration;
use userptr::driver::vfio::nvme::{Nvme, NvmeCommand};
use userptr::driver::vfio::VfioDomain;
use userptr::{Driver, Error, Registry, RegistryConfig, WaitMode};

const LEN: usize = 16 << 10;
const T: Duration = Duration::from_secs(20);

fn main() -> userptr::Result<()> {
    let bdf = match std::env::var("USERPTR_VFIO_NVME") {
        Ok(b) if !b.is_empty() => b,
        _ if std::env::var_os("USERPTR_IN_GUEST").is_some() => {
            eprintln!("nvme_vfio: in the VFIO guest, but USERPTR_VFIO_NVME is not set");
            std::process::exit(1);
        }
        _ => {
            println!(
                "nvme_vfio: SKIP: no NVMe controller bound to vfio-pci here (USERPTR_VFIO_NVME \
                 unset); tools/vfio-guest/test-in-guest.sh runs this example in a QEMU guest"
            );
            return Ok(());
        }
    };
    let domain = VfioDomain::new()?;
    let pci = domain.open(&bdf)?;
    let drv = Driver::for_domain(domain, "vfio");
    let nvme = Nvme::new(pci, &drv)?;
    let q = nvme.io_queue(1, 16)?;
    let ns = *nvme.namespace();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());

    let src: Vec<u8> = (0..LEN).map(|i| (i * 31 + 3) as u8).collect();
    let mut dst = vec![0u8; LEN];
    let us = reg.register_slice_ref(&src)?;
    let ud = reg.register_slice(&mut dst)?;
    let b = reg.submit(&q, &[&us], |io| {
        vec![NvmeCommand::write(&ns, 0, io[0], LEN as u32)]
    })?;
    // `wait` is `Err` if a command of the batch failed; `wait_completions` is the raw form.
    q.wait(b, WaitMode::Block, T)?;
    let b = reg.submit(&q, &[&ud], |io| {
        vec![NvmeCommand::read(&ns, 0, io[0], LEN as u32)]
    })?;
    q.wait(b, WaitMode::Block, T)?;
    reg.unregister(ud)?;
    assert_eq!(dst, src, "the data read back differs");
    println!("nvme_vfio: {LEN} bytes WRITE then READ through the registry ({bdf}): ok");

    // A READ into read-only memory: the IOMMU blocks the controller's write.
    q.set_fault_check(Some(Duration::from_millis(500)));
    let b = reg.submit(&q, &[&us], |io| {
        vec![NvmeCommand::read(&ns, 0, io[0], 4096)]
    })?;
    match q.wait(b, WaitMode::Block, T) {
        Err(e @ (Error::NvmeIommuFault { .. } | Error::NvmeStatus { .. })) => {
            println!("nvme_vfio: READ into read-only memory refused: {e}");
        }
        // The memory (checked below) is the proof; a controller may also report the
        // blocked transfer late or not at all.
        Ok(_) => println!("nvme_vfio: READ into read-only memory: no error reported"),
        Err(e) => return Err(e),
    }
    drop(us);
    assert!(src
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i * 31 + 3) as u8));
    println!("nvme_vfio: ok");
    Ok(())
}
