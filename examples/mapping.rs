//! A plain mapping: map slices for the reference device, run commands on them, and
//! read the results once the mappings (which borrow the buffers) are dropped.
//!
//! `cargo run --example mapping`

use userptr::{Descriptor, Driver};

fn main() -> userptr::Result<()> {
    let drv = Driver::reference()?;
    let q = drv.queue(0, 16)?;

    let src: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut dst = vec![0u8; 1 << 20];
    {
        // The device reads `src` (shared borrow: the program may read it too) and
        // writes `dst` (mutable borrow: the program cannot touch it meanwhile).
        let ms = drv.map_slice_ref(&src)?;
        let md = drv.map_slice(&mut dst)?;
        // `run` submits, waits, and turns a failed command into an error.
        q.run(Descriptor::copy(ms.iova(), md.iova(), ms.len()))?;
        let crc = q.run(Descriptor::crc32c(ms.iova(), ms.len(), 0))?.result as u32;
        println!("device CRC32C of the source: {crc:#010x}");
    } // both mappings dropped: unmapped, the borrows end
    assert_eq!(dst, src, "the device copy differs");

    let mut y = vec![1.0f32; 4096];
    let x = vec![0.5f32; 4096];
    let (mx, my) = (drv.map_slice_ref(&x)?, drv.map_slice(&mut y)?);
    q.run(Descriptor::saxpy(4.0, mx.iova(), my.iova(), 4096))?;
    my.unmap()?; // unmapping explicitly reports a failure; dropping only logs it
    drop(mx);
    assert!(y.iter().all(|&v| v == 3.0));
    println!("mapping: COPY of 1 MiB, CRC32C and SAXPY of 4096 floats on mapped slices: ok");
    Ok(())
}
