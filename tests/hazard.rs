//! The hazard this project exists for, shown with real kernel pins.
//!
//! A mapping pins the pages that back a range *at map time*. If the process then
//! changes its address space without telling the driver, the device keeps reaching the
//! old pages: device writes vanish from the process's point of view. Re-mapping (a
//! fresh pin of the current pages) makes them visible again. The registry and the
//! monitors exist to do that re-mapping at the right moment; these tests pin down the
//! underlying behaviour they must manage.

mod common;

use common::{Anon, PinCheck};
use userptr::{Descriptor, Driver, Perm};

const LEN: usize = 2 << 20;

#[test]
fn device_write_is_visible_while_the_pin_is_current() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(LEN);
    let m = drv.map_user(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xab)).unwrap();
    assert!(buf.read().iter().all(|&b| b == 0xab));
    drop((m, q, drv));
    pins.check();
}

#[test]
fn madvise_dontneed_leaves_a_stale_pin_and_remapping_fixes_it() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(LEN);
    let m = drv.map_user(buf.addr, LEN, Perm::READ_WRITE).unwrap();

    // The process throws its pages away without telling the driver...
    buf.madvise(libc::MADV_DONTNEED);
    // ...and the device writes through the old pin.
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xab)).unwrap();
    let seen = buf.read();
    assert!(
        seen.iter().all(|&b| b == 0),
        "the process must NOT see the device's write (it went to the stale pinned pages)"
    );

    // Re-mapping pins the pages the process maps now: the write is visible.
    drop(m);
    let m = drv.map_user(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xcd)).unwrap();
    assert!(buf.read().iter().all(|&b| b == 0xcd));
    drop((m, q, drv));
    pins.check();
}

#[test]
fn munmap_and_reuse_of_the_address_leaves_a_stale_pin() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let mut buf = Anon::new(LEN);
    let m = drv.map_user(buf.addr, LEN, Perm::READ_WRITE).unwrap();

    // free() + malloc() returning the same address, in miniature.
    buf.unmap();
    buf.remap_fixed(0x22);
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xab)).unwrap();
    assert!(
        buf.read().iter().all(|&b| b == 0x22),
        "the new memory at the old address must not see writes through the old pin"
    );
    drop(m);
    let m = drv.map_user(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xcd)).unwrap();
    assert!(buf.read().iter().all(|&b| b == 0xcd));
    drop((m, q, drv));
    pins.check();
}

#[test]
fn device_reads_stale_data_after_discard() {
    // The other direction: after MADV_DONTNEED the process sees zeros, but the device
    // still reads the old contents from the pinned pages.
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let src = Anon::new(LEN);
    src.fill(0x5a);
    let dst = Anon::new(LEN);
    let ms = drv.map_user(src.addr, LEN, Perm::READ).unwrap();
    let md = drv.map_user(dst.addr, LEN, Perm::READ_WRITE).unwrap();
    src.madvise(libc::MADV_DONTNEED);
    assert!(src.read().iter().all(|&b| b == 0));
    q.run(Descriptor::copy(ms.iova(), md.iova(), LEN as u64))
        .unwrap();
    assert!(
        dst.read().iter().all(|&b| b == 0x5a),
        "device read the stale pages"
    );
    drop((ms, md, q, drv));
    pins.check();
}
