use userptr::*;
#[test]
fn smoke() {
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 64).unwrap();
    let mut a = vec![0u8; 3 << 20];
    let mut b = vec![0u8; 3 << 20];
    let ma = drv.map_slice(&mut a).unwrap();
    let mb = drv.map_slice(&mut b).unwrap();
    q.run(Descriptor::fill(ma.iova(), ma.len(), 0x5a)).unwrap();
    q.run(Descriptor::copy(ma.iova(), mb.iova(), ma.len()))
        .unwrap();
    let c = q.run(Descriptor::crc32c(mb.iova(), mb.len(), 0)).unwrap();
    assert!(a.iter().all(|&x| x == 0x5a));
    assert!(b.iter().all(|&x| x == 0x5a));
    assert_eq!(c.result as u32, crc32c::crc32c(&b));
    eprintln!("VmPin {:?}", proc_status::pinned_bytes());
}
