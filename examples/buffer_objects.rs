//! Buffer objects: memory the driver allocates in VRAM or system memory, mapped into
//! the process at one fixed address for its whole life, moved between the two by the
//! device while a CPU thread keeps writing it.
//!
//! `cargo run --example buffer_objects`

use userptr::driver::bo::{self, BoConfig, BoManager, Placement};
use userptr::driver::gpuvm::Gpu;
use userptr::{Driver, Registry, RegistryConfig};

fn main() -> userptr::Result<()> {
    // The fault handler is process-wide: install it first, before other threads.
    bo::install_fault_handler()?;
    let drv = Driver::reference()?;
    let reg = Registry::new(drv, RegistryConfig::default());
    let gpu = Gpu::open(&reg)?;
    let mgr = BoManager::new(&gpu, BoConfig::default())?;

    let mut b = mgr.create(4 << 20, Placement::Vram)?;
    b.as_mut_slice().fill(7); // the CPU writes VRAM through the aperture
    let addr = b.as_slice().as_ptr();
    let h = b.handle(); // names the BO for moves; no access to its bytes

    std::thread::scope(|s| {
        // The CPU keeps using the BO (through its slice) while another thread moves
        // it: an access in mid-move waits in the fault handler, then goes on.
        let mover = s.spawn(|| {
            for to in [Placement::System, Placement::Vram, Placement::System] {
                mgr.migrate(&h, to).expect("move");
            }
        });
        let mut sum = 0u64;
        for _ in 0..50 {
            sum += b.as_slice().iter().map(|&x| x as u64).sum::<u64>();
        }
        mover.join().unwrap();
        assert_eq!(sum, 50 * 7 * (4 << 20));
    });
    assert_eq!(b.placement(), Placement::System);
    assert_eq!(b.as_slice().as_ptr(), addr, "the CPU address never changes");

    // The device sees the same bytes, wherever the BO is.
    mgr.fill(&mut b, 0, 4096, 1)?;
    let crc = mgr.crc32c(&b, 0, b.len())?;
    println!(
        "BO of {} bytes at {addr:p}, now in {:?}; device CRC32C {crc:#010x}; {:?}",
        b.len(),
        b.placement(),
        mgr.stats()
    );
    mgr.free(b)?;
    Ok(())
}
