//! The application's io_uring rings under the seccomp monitor: restricted so that the
//! kernel refuses `IORING_OP_MADVISE` on them, and otherwise as usable as before
//! (registered buffers, linked requests, fixed reads, the application's own
//! restrictions). Each case in a child process (the filter is permanent).

mod common;

use common::{is_child, run_child};
use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Driver, Registry, RegistryConfig};

const EACCES: i32 = -libc::EACCES;

fn complete(ring: &mut IoUring, entries: &[squeue::Entry]) -> Vec<i32> {
    for e in entries {
        // SAFETY: the entries' buffers (if any) outlive the wait below.
        unsafe { ring.submission().push(e).unwrap() };
    }
    ring.submit_and_wait(entries.len()).unwrap();
    let mut v: Vec<(u64, i32)> = ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    v.sort();
    v.into_iter().map(|x| x.1).collect()
}

fn madvise(p: &mut [u8]) -> squeue::Entry {
    opcode::Madvise::new(p.as_mut_ptr().cast(), p.len() as _, libc::MADV_DONTNEED)
        .build()
        .user_data(99)
}

#[test]
fn application_rings_work_but_cannot_madvise() {
    let out = run_child("rings_child");
    assert!(out.contains("rings ok"), "{out}");
}

#[test]
#[ignore = "child process body of application_rings_work_but_cannot_madvise"]
fn rings_child() {
    assert!(is_child());
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let _m = SeccompMonitor::install(&reg).unwrap();
    let mut page = vec![7u8; 4096];

    // A plain ring, created after install: restricted by the monitor.
    let mut ring = IoUring::new(8).unwrap();
    let mut buf = vec![1u8; 8192];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the buffer outlives the ring's use of it (unregistered below).
    unsafe { ring.submitter().register_buffers(&iov).unwrap() };
    let zero = std::fs::File::open("/dev/zero").unwrap();
    use std::os::fd::AsRawFd;
    let read = opcode::ReadFixed::new(types::Fd(zero.as_raw_fd()), buf.as_mut_ptr(), 4096, 0)
        .build()
        .user_data(1)
        .flags(squeue::Flags::IO_LINK);
    let nop = opcode::Nop::new().build().user_data(2);
    assert_eq!(complete(&mut ring, &[read, nop]), [4096, 0]);
    assert!(buf[..4096].iter().all(|&b| b == 0), "the fixed read landed");
    ring.submitter().unregister_buffers().unwrap();
    assert_eq!(complete(&mut ring, &[madvise(&mut page)]), [EACCES]);
    assert!(page.iter().all(|&b| b == 7), "the page was not discarded");

    // A ring the application restricts itself, allowing MADVISE: the monitor takes it
    // out of the list.
    let mut ring = IoUring::builder().setup_r_disabled().build(8).unwrap();
    ring.submitter()
        .register_restrictions(&mut [
            Restriction::sqe_op(opcode::Nop::CODE),
            Restriction::sqe_op(opcode::Madvise::CODE),
        ])
        .unwrap();
    ring.submitter().register_enable_rings().unwrap();
    let nop = opcode::Nop::new().build().user_data(1);
    assert_eq!(complete(&mut ring, &[nop, madvise(&mut page)]), [0, EACCES]);

    // A ring created disabled and enabled without restrictions of its own: ours apply.
    let mut ring = IoUring::builder().setup_r_disabled().build(8).unwrap();
    ring.submitter().register_enable_rings().unwrap();
    assert_eq!(complete(&mut ring, &[madvise(&mut page)]), [EACCES]);
    assert!(page.iter().all(|&b| b == 7));
    println!("rings ok");
}

#[test]
fn rings_made_before_install_make_it_refuse() {
    let out = run_child("early_ring_child");
    assert!(out.contains("early ring ok"), "{out}");
}

#[test]
#[ignore = "child process body of rings_made_before_install_make_it_refuse"]
fn early_ring_child() {
    assert!(is_child());
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let ring = IoUring::new(8).unwrap();
    match SeccompMonitor::install(&reg) {
        Err(userptr::Error::MonitorUnavailable { reason, .. }) => {
            assert!(reason.contains("io_uring"), "{reason}")
        }
        other => panic!("install with an unrestricted ring: {other:?}"),
    }
    drop(ring);
    // Without it, install works (the reference device's own ring does not count).
    let _m = SeccompMonitor::install(&reg).unwrap();
    println!("early ring ok");
}
