//! The harmless-advice proof: every entry of
//! `userptr::driver::monitor::advice::HARMLESS` (the advice every monitor lets pass
//! without invalidating) leaves a pinned page where it is.
//!
//! For each entry, iterating over the list itself (so that adding a wrong entry fails
//! here): pin a buffer (register it on the reference device and FILL it once), give
//! the advice, and check (a) every page's PFN in `/proc/self/pagemap` is unchanged
//! (PFNs need CAP_SYS_ADMIN: without it that half is skipped, saying so), and (b) a
//! device FILL afterwards is what the process reads. Nobody tells the registry about
//! the advice: if it moved or dropped a page, the device writes the old one and (b)
//! fails too. `MADV_HUGEPAGE`, `MADV_NOHUGEPAGE` and `MADV_COLLAPSE` get a 2 MiB
//! aligned buffer (the unit they act on). A control, `MADV_DONTNEED`, shows that the
//! PFN reading sees a page change and that the visibility check sees a stale pin.

mod common;
use common::RegisterTest as _;

use common::{pfns, pfns_visible, PinCheck};
use std::time::Duration;
use userptr::driver::monitor::advice::{is_destructive, HARMLESS};
use userptr::{
    CommandQueue, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, Userptr, WaitMode,
};

const SMALL: usize = 64 << 10;
const HUGE: usize = 2 << 20;

/// `len` bytes of fresh anonymous memory aligned to `align`, every page touched;
/// unmapped on drop.
struct Aligned {
    map: usize,
    map_len: usize,
    addr: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Aligned {
        let map_len = len + align;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = (p as usize).next_multiple_of(align);
        // SAFETY: `[addr, addr + len)` lies inside the mapping just made.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0x11, len) };
        Aligned {
            map: p as usize,
            map_len,
            addr,
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made.
        unsafe { libc::munmap(self.map as *mut _, self.map_len) };
    }
}

/// FILL `u` with `b` through the registry and say whether the process reads it.
fn device_write_visible(reg: &Registry, q: &CommandQueue, u: &Userptr, b: u8) -> bool {
    let f = reg
        .submit(q, &[u], |i| vec![Descriptor::fill(i[0], u.len(), b)])
        .unwrap();
    let c = q
        .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
        .unwrap();
    assert_eq!(c.status, Status::Ok);
    read(u.addr() as usize, u.len() as usize).is_some_and(|v| v.iter().all(|&x| x == b))
}

/// The process's view of `[addr, addr + len)`, read with `process_vm_readv` so that a
/// page an advice made unreadable (a guard page) is an answer, not a crash.
fn read(addr: usize, len: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; len];
    let local = libc::iovec {
        iov_base: v.as_mut_ptr() as *mut _,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: len,
    };
    // SAFETY: copies from this process's own range into `v`, which has `len` bytes;
    // the kernel checks the source.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == len as isize).then_some(v)
}

/// The advice that act on whole huge pages.
fn huge(advice: i32) -> bool {
    advice == libc::MADV_HUGEPAGE || advice == libc::MADV_NOHUGEPAGE || advice == MADV_COLLAPSE
}

const MADV_COLLAPSE: i32 = 25;

/// What `madvise` may answer and still count as given: `MADV_COLLAPSE` fails with
/// `EAGAIN` on pinned pages (the kernel will not collapse them, which is the point).
fn accepted(advice: i32, errno: i32) -> bool {
    advice == MADV_COLLAPSE && errno == libc::EAGAIN
}

#[test]
fn every_harmless_advice_leaves_pinned_pages_in_place() {
    let pins = PinCheck::start();
    let see_pfns = pfns_visible();
    if !see_pfns {
        println!("PFNs are hidden (not root): checking device-write visibility only");
    }
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let mut failures = Vec::new();
    for &(advice, name) in HARMLESS {
        assert!(!is_destructive(advice), "{name} is in HARMLESS");
        let len = if huge(advice) { HUGE } else { SMALL };
        let buf = Aligned::new(len, if huge(advice) { HUGE } else { 4096 });
        let u = reg.register_test(buf.addr, len, Perm::READ_WRITE).unwrap();
        assert!(device_write_visible(&reg, &q, &u, 0x5a), "{name}: before");
        let before = pfns(buf.addr, len);
        // SAFETY: advises the test's own buffer; nobody tells the registry.
        let r = unsafe { libc::madvise(buf.addr as *mut _, len, advice) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let given = if r == 0 {
            "ok".to_string()
        } else if accepted(advice, errno) {
            format!("{}", std::io::Error::from_raw_os_error(errno))
        } else {
            failures.push(format!(
                "{name}: madvise failed ({}): nothing proven",
                std::io::Error::from_raw_os_error(errno)
            ));
            continue;
        };
        let after = pfns(buf.addr, len);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        if see_pfns && moved > 0 {
            failures.push(format!(
                "{name}: {moved} of {} pinned pages changed PFN",
                before.len()
            ));
        }
        if !device_write_visible(&reg, &q, &u, 0xa5) {
            failures.push(format!(
                "{name}: the device write after the advice is not what the process reads"
            ));
        }
        println!("{name:22} madvise: {given}; pages moved: {moved}");
        reg.clear().unwrap();
    }
    drop((q, reg, drv));
    assert!(
        failures.is_empty(),
        "advice listed as harmless is not:\n{}",
        failures.join("\n")
    );
    pins.check();
}

#[test]
fn the_checks_see_a_destructive_advice() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Aligned::new(SMALL, 4096);
    let u = reg
        .register_test(buf.addr, SMALL, Perm::READ_WRITE)
        .unwrap();
    assert!(device_write_visible(&reg, &q, &u, 0x5a));
    let before = pfns(buf.addr, SMALL);
    assert!(is_destructive(libc::MADV_DONTNEED));
    // SAFETY: discards the test's own buffer (untold), then touches it again.
    unsafe {
        assert_eq!(
            libc::madvise(buf.addr as *mut _, SMALL, libc::MADV_DONTNEED),
            0
        );
        std::ptr::write_bytes(buf.addr as *mut u8, 0x11, SMALL);
    }
    let after = pfns(buf.addr, SMALL);
    if pfns_visible() {
        assert!(
            before.iter().zip(&after).all(|(a, b)| a != b),
            "the PFN reading did not see the pages change: {before:?} -> {after:?}"
        );
    } else {
        println!("PFNs are hidden (not root): the PFN half of the control is skipped");
    }
    assert!(
        !device_write_visible(&reg, &q, &u, 0xa5),
        "the visibility check did not see the stale pin"
    );
    drop((q, reg, drv));
    pins.check();
}
