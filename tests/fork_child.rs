//! A fork child is recognised by its address space, not by `pthread_atfork`: a child
//! made by a raw `syscall(SYS_fork)` (no atfork handler runs) finds every driver object
//! inert. Dropping them there neither unpins the parent's pages nor stops its ring, and
//! returns at once.

mod common;
use common::RegisterTest as _;

use common::{is_child, run_child, Anon};
use std::time::{Duration, Instant};
use userptr::{Descriptor, Driver, Error, Perm, Registry, RegistryConfig, WaitMode};

#[test]
fn a_raw_fork_child_cannot_touch_the_parents_device() {
    let out = run_child("raw_fork_child");
    assert!(out.contains("raw fork ok"), "{out}");
}

#[test]
#[ignore = "child process body of a_raw_fork_child_cannot_touch_the_parents_device"]
fn raw_fork_child() {
    assert!(is_child());
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Anon::new(1 << 20);
    let u = reg
        .register_test(buf.addr, 1 << 20, Perm::READ_WRITE)
        .unwrap();
    let mut direct = vec![0u8; 1 << 16];
    let m = drv.map_slice(&mut direct).unwrap();
    let pins = userptr::proc_status::pinned_bytes().unwrap();
    assert!(pins > 0);
    // SAFETY: a raw fork; the child only drops driver objects, calls the registry and
    // exits with _exit.
    let pid = unsafe { libc::syscall(libc::SYS_fork) } as i32;
    if pid == 0 {
        let code = (|| {
            if !matches!(
                reg.register_test(buf.addr, 4096, Perm::READ_WRITE),
                Err(Error::ForkedChild)
            ) {
                return 2;
            }
            drop(m);
            drop(q);
            drop(reg);
            drop(drv);
            0
        })();
        // SAFETY: leave the child without running the parent's destructors again.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed");
    // The child must be done promptly (its drops do not wait for a device it lacks).
    let t0 = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: reaping our own child, without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the fork child hung in a driver drop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    // The parent's pins, mapping, ring and registration are untouched.
    assert_eq!(userptr::proc_status::pinned_bytes().unwrap(), pins);
    q.run(Descriptor::fill(m.iova(), m.len(), 0x5a)).unwrap();
    let f = reg
        .submit(&q, &[&u], |i| vec![Descriptor::fill(i[0], 1 << 20, 0xa5)])
        .unwrap();
    q.wait(f.end, WaitMode::Block, Duration::from_secs(10))
        .unwrap();
    drop(m);
    assert!(direct.iter().all(|&b| b == 0x5a));
    assert!(buf.read().iter().all(|&b| b == 0xa5));
    println!("raw fork ok");
}
