//! The userfaultfd monitor: for each way a process changes its address space, a
//! buffer registered with the registry is changed *without* telling the registry; the
//! monitor must turn the kernel's event into an invalidation, so that the reference
//! device's next FILL through the registry lands in the memory the process sees (no
//! stale pin). `mprotect` produces no event: shown as not caught.
//!
//! A userfaultfd monitor is process-wide state, so every test runs its body in a child
//! process (`common::run_child`): the `#[ignore]`d `*_child` tests are those bodies.
//! Events are asynchronous: each test waits for the monitor with `UffdMonitor::sync`
//! (bounded), then checks the registry's invalidation counters.

mod common;
use common::RegisterTest as _;

use common::{is_child, run_child, Anon, PinCheck};
use std::time::{Duration, Instant};
use userptr::driver::monitor::uffd::{measure_madvise, UffdMonitor};
use userptr::{
    CommandQueue, Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status, Userptr,
    WaitMode,
};

const LEN: usize = 256 << 10;
const T: Duration = Duration::from_secs(30);
const SYNC: Duration = Duration::from_secs(10);
/// `Cause::index` values.
const UNMAP: usize = 0;
const DISCARD: usize = 1;
const REMAP: usize = 2;

/// A parent test that runs its body in a child process, and the body.
macro_rules! in_child {
    ($(#[doc = $doc:literal])* $parent:ident, $child:ident, $body:block) => {
        $(#[doc = $doc])*
        #[test]
        fn $parent() {
            let _serial = common::serial();
            let out = run_child(stringify!($child));
            // Show what the child printed (measurements, "not caught" notes).
            // (libtest prints them after "test name ... " on the same line.)
            for l in out.lines().filter_map(|l| l.find("uffd").map(|i| &l[i..])) {
                println!("{l}");
            }
        }

        #[test]
        #[ignore = "child process body (a userfaultfd monitor is process-wide state)"]
        fn $child() {
            assert!(is_child(), concat!("run through ", stringify!($parent)));
            $body
        }
    };
}

struct Env {
    pins: PinCheck,
    q: CommandQueue,
    reg: Registry,
    mon: UffdMonitor,
}

fn setup() -> Env {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv, RegistryConfig::default());
    let mon = UffdMonitor::start(&reg).unwrap();
    Env { pins, q, reg, mon }
}

impl Env {
    /// FILL `u` with `b` through the registry and wait.
    fn fill(&self, u: &Userptr, b: u8) -> Status {
        let len = u.len();
        let f = self
            .reg
            .submit(&self.q, &[u], |i| vec![Descriptor::fill(i[0], len, b)])
            .unwrap();
        self.q
            .wait_completion(f.end, WaitMode::Block, T)
            .unwrap()
            .status
    }

    /// Wait until the monitor has handled every event delivered so far.
    fn settle(&self) {
        assert!(
            self.mon.sync(SYNC),
            "the monitor did not handle the events in time:\n{}",
            self.mon.counters()
        );
    }

    fn invalidations(&self, cause: usize) -> u64 {
        self.reg.stats().invalidations[cause]
    }

    /// Stop the monitor, release everything, check no pin leaked.
    fn finish(self) {
        let c = self.mon.counters();
        assert_eq!(c.pagefault, 0, "no page fault may ever be delivered:\n{c}");
        assert_eq!(c.invalidation_errors, 0, "{c}");
        self.mon.stop();
        drop((self.q, self.reg));
        self.pins.check();
    }
}

fn all(v: &[u8], b: u8) -> bool {
    v.iter().all(|&x| x == b)
}

/// The shared shape: register `buf`, `mutate` it behind the registry's back, wait for
/// the monitor, check the invalidation of `cause`, FILL, and look.
fn caught_after(env: &Env, buf: &mut Anon, cause: usize, mutate: impl FnOnce(&mut Anon)) {
    let u = env
        .reg
        .register_test(buf.addr, LEN, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(env.fill(&u, 0x01), Status::Ok);
    assert!(all(&buf.read(), 0x01));
    let before = env.invalidations(cause);
    mutate(buf);
    env.settle();
    assert!(
        env.invalidations(cause) > before,
        "no invalidation of cause {cause}: {}\n{}",
        env.reg.stats(),
        env.mon.counters()
    );
    assert_eq!(env.fill(&u, 0xab), Status::Ok);
    assert!(
        all(&buf.read(), 0xab),
        "the device wrote to pages the process no longer sees (stale pin)"
    );
}

in_child!(
    /// madvise(MADV_DONTNEED): REMOVE → Discard.
    madv_dontneed_is_caught,
    madv_dontneed_child,
    {
        let env = setup();
        let mut buf = Anon::new(LEN);
        caught_after(&env, &mut buf, DISCARD, |b| b.madvise(libc::MADV_DONTNEED));
        assert!(env.mon.counters().remove >= 1);
        assert!(env.mon.counters().registered >= 1);
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// madvise(MADV_FREE): also REMOVE (an innocent invalidation: the pinned pages keep
    /// their data), so the next FILL re-pins and is visible.
    madv_free_is_caught,
    madv_free_child,
    {
        let env = setup();
        let mut buf = Anon::new(LEN);
        caught_after(&env, &mut buf, DISCARD, |b| b.madvise(libc::MADV_FREE));
        assert!(env.mon.counters().remove >= 1);
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// munmap, then mmap(MAP_FIXED) of fresh memory at the same address: UNMAP.
    munmap_then_map_again_is_caught,
    munmap_then_map_again_child,
    {
        let env = setup();
        let mut buf = Anon::new(LEN);
        caught_after(&env, &mut buf, UNMAP, |b| {
            b.unmap();
            b.remap_fixed(0x22);
        });
        assert!(env.mon.counters().unmap >= 1);
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// mmap(MAP_FIXED) straight over the registered range: UNMAP of the old mapping.
    mmap_fixed_over_is_caught,
    mmap_fixed_over_child,
    {
        let env = setup();
        let mut buf = Anon::new(LEN);
        caught_after(&env, &mut buf, UNMAP, |b| b.remap_fixed(0x22));
        assert!(env.mon.counters().unmap >= 1);
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// mremap moving the range away (REMAP, then UNMAP of the old range); fresh memory
    /// is then mapped at the old address. The FILL must land there, and not in the
    /// moved pages (which the stale pin still holds).
    mremap_move_is_caught,
    mremap_move_child,
    {
        let env = setup();
        let mut buf = Anon::new(LEN);
        let dest = Anon::new(LEN);
        buf.fill(0x33);
        let before_unmap = env.invalidations(UNMAP);
        caught_after(&env, &mut buf, REMAP, |b| {
            // SAFETY: moves our buffer onto our other buffer's range (MREMAP_FIXED
            // replaces it).
            let p = unsafe {
                libc::mremap(
                    b.addr as *mut _,
                    LEN,
                    LEN,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    dest.addr as *mut libc::c_void,
                )
            };
            assert_eq!(p as usize, dest.addr, "mremap failed");
            b.remap_fixed(0x44);
        });
        assert!(
            all(&dest.read(), 0x01),
            "the moved pages kept the data they had, and got no device write"
        );
        let c = env.mon.counters();
        assert!(c.remap >= 1 && c.unmap >= 1, "{c}");
        assert!(env.invalidations(UNMAP) > before_unmap);
        drop((buf, dest));
        env.finish();
    }
);

in_child!(
    /// free() of a large (mmapped) malloc block, then malloc returning the same
    /// address with new pages: UNMAP (glibc's own munmap).
    free_then_malloc_is_caught,
    free_then_malloc_child,
    {
        // A fixed mmap threshold: glibc otherwise raises it when an mmapped block is
        // freed, and the next large malloc would come from the heap instead.
        // SAFETY: a malloc tuning call before any large allocation of this child.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
        let env = setup();
        // Warm the monitor's threads up (their first allocations create their malloc
        // arenas, which must not land in the hole the free leaves).
        let mut scratch = Anon::new(LEN);
        caught_after(&env, &mut scratch, DISCARD, |b| b.madvise(libc::MADV_DONTNEED));
        drop(scratch);
        env.settle();

        let n = 4 << 20;
        // SAFETY: a large malloc (mmapped by glibc), written through its pointer.
        let p = unsafe { libc::malloc(n) } as usize;
        assert_ne!(p, 0);
        // SAFETY: our block of `n` bytes.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, n) };
        let u = env.reg.register_test(p, n, Perm::READ_WRITE).unwrap();
        assert_eq!(env.fill(&u, 0x02), Status::Ok);
        let before = env.invalidations(UNMAP);
        // SAFETY: freeing our block, then allocating the same size again.
        let again = unsafe {
            libc::free(p as *mut _);
            libc::malloc(n) as usize
        };
        assert_eq!(
            again, p,
            "malloc did not return the same address: this test's premise failed"
        );
        // SAFETY: our new block; the fresh pages are zero, write something else.
        unsafe { std::ptr::write_bytes(again as *mut u8, 3, n) };
        env.settle();
        assert!(env.invalidations(UNMAP) > before, "{}", env.reg.stats());
        assert_eq!(env.fill(&u, 0xab), Status::Ok);
        let mut seen = vec![0u8; n];
        // SAFETY: our block is mapped and readable for `n` bytes.
        unsafe { std::ptr::copy_nonoverlapping(again as *const u8, seen.as_mut_ptr(), n) };
        assert!(all(&seen, 0xab), "stale pin: the FILL went to the freed pages");
        // SAFETY: our block.
        unsafe { libc::free(again as *mut _) };
        env.finish();
    }
);

in_child!(
    /// MADV_REMOVE on a shared memfd mapping (shmem): REMOVE, when the kernel can
    /// write-protect-register shmem (UFFD_FEATURE_WP_HUGETLBFS_SHMEM). The driver
    /// registers only sealed shmem (`backing`), on which the hole punch itself fails
    /// (EPERM); the kernel sends REMOVE first all the same.
    madv_remove_on_shmem_is_caught,
    madv_remove_on_shmem_child,
    {
        use std::os::fd::AsRawFd;
        let env = setup();
        let fd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("uffd")
            .unwrap();
        fd.as_file().set_len(LEN as u64).unwrap();
        // SAFETY: a shared mapping of our own memfd.
        let a = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(a, libc::MAP_FAILED);
        let a = a as usize;
        let read = || {
            let mut v = vec![0u8; LEN];
            // SAFETY: our mapping, readable for LEN bytes.
            unsafe { std::ptr::copy_nonoverlapping(a as *const u8, v.as_mut_ptr(), LEN) };
            v
        };
        let e = env.reg.register_test(a, LEN, Perm::READ_WRITE).unwrap_err();
        assert!(matches!(e, Error::ReplaceablePages { .. }), "unsealed: {e}");
        let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::FUTURE_WRITE;
        rustix::fs::fcntl_add_seals(fd.as_file(), seals).unwrap();
        let u = env.reg.register_test(a, LEN, Perm::READ_WRITE).unwrap();
        assert_eq!(env.fill(&u, 0x01), Status::Ok);
        let c = env.mon.counters();
        if c.registered == 0 {
            assert!(c.register_unsupported >= 1, "{c}");
            println!("uffd madv_remove on shmem: not monitored (kernel lacks shmem WP)");
        } else {
            let before = env.invalidations(DISCARD);
            // SAFETY: (trying to) punch a hole in our own shared mapping.
            let r = unsafe { libc::madvise(a as *mut _, LEN, libc::MADV_REMOVE) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((r, errno), (-1, Some(libc::EPERM)), "sealed: no hole");
            env.settle();
            assert!(env.invalidations(DISCARD) > before);
            assert_eq!(env.fill(&u, 0xab), Status::Ok);
            assert!(all(&read(), 0xab), "stale pin after MADV_REMOVE");
        }
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(a as *mut _, LEN) };
        env.finish();
    }
);

in_child!(
    /// mprotect produces no userfaultfd event: NOT CAUGHT by this monitor. The device
    /// mapping stays writable and the FILL lands in the now read-only range (the
    /// permission hazard; the seccomp monitor or explicit invalidation catch it).
    mprotect_is_not_caught,
    mprotect_child,
    {
        let env = setup();
        let buf = Anon::new(LEN);
        let u = env.reg.register_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
        let inv_before = env.reg.stats().invalidations;
        let ev_before = env.mon.counters().events();
        buf.mprotect(libc::PROT_READ);
        env.settle();
        assert_eq!(env.mon.counters().events(), ev_before, "mprotect raised an event");
        assert_eq!(env.reg.stats().invalidations, inv_before);
        assert_eq!(env.fill(&u, 0xab), Status::Ok, "not caught: the device still writes");
        assert!(all(&buf.read(), 0xab));
        println!("uffd mprotect: not caught (no userfaultfd event for mprotect)");
        buf.mprotect(libc::PROT_READ | libc::PROT_WRITE);
        drop(buf);
        env.finish();
    }
);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Fork a child that writes its own copy of `buf`, discards and unmaps it, and exits;
/// wait for it (bounded: a child stuck on an unreleased userfaultfd is killed and the
/// test fails).
fn fork_and_wait(buf: &Anon) {
    // SAFETY: the child only writes its own copy of the buffer, discards and unmaps
    // it (async-signal-safe syscalls) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the child's own copy of the buffer; then leave without running the
        // parent's destructors.
        unsafe {
            std::ptr::write_bytes(buf.addr as *mut u8, 7, buf.len);
            libc::madvise(buf.addr as *mut _, buf.len, libc::MADV_DONTNEED);
            libc::munmap(buf.addr as *mut _, buf.len);
            libc::_exit(0);
        }
    }
    let t0 = Instant::now();
    let status = loop {
        let mut st = 0;
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            // SAFETY: killing and reaping our own hung child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            panic!("the fork child hung (its userfaultfd was not released)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
}

in_child!(
    /// fork: the kernel hands the monitor a userfaultfd for the child, which it closes
    /// at once. The child can change its copy of a registered range without hanging
    /// (with nobody reading a still-open child userfaultfd, its munmap would block
    /// forever), and the parent keeps working.
    fork_child_and_parent_keep_working,
    fork_child,
    {
        let env = setup();
        let buf = Anon::new(LEN);
        let u = env.reg.register_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
        assert_eq!(env.fill(&u, 0x01), Status::Ok);
        let fds = open_fds();
        fork_and_wait(&buf);
        env.settle();
        let c = env.mon.counters();
        assert!(c.fork >= 1, "no FORK event:\n{c}");
        assert_eq!(open_fds(), fds, "the child's userfaultfd was not closed");
        // The parent: its pages are still the pinned ones; it writes and the device
        // writes, both visible.
        assert!(all(&buf.read(), 0x01), "the child's writes leaked into the parent");
        buf.fill(3);
        assert_eq!(env.fill(&u, 0xab), Status::Ok);
        assert!(all(&buf.read(), 0xab));
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// Regions pinned before the monitor started are watched too.
    regions_pinned_before_start_are_watched,
    pinned_before_start_child,
    {
        let pins = PinCheck::start();
        let drv = Driver::reference().unwrap();
        let q = drv.queue(0, 16).unwrap();
        let reg = Registry::new(drv, RegistryConfig::default());
        let mut buf = Anon::new(LEN);
        let _u = reg.register_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
        let mon = UffdMonitor::start(&reg).unwrap();
        assert!(mon.counters().registered >= 1);
        let env = Env { pins, q, reg, mon };
        caught_after(&env, &mut buf, DISCARD, |b| b.madvise(libc::MADV_DONTNEED));
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// Without privilege (vm.unprivileged_userfaultfd = 0) the monitor retries with
    /// UFFD_USER_MODE_ONLY and works the same.
    unprivileged_start_uses_user_mode_only,
    unprivileged_child,
    {
        // SAFETY: plain syscalls changing this child process's own credentials.
        unsafe {
            if libc::geteuid() == 0 {
                assert_eq!(libc::setgid(65534), 0);
                assert_eq!(libc::setuid(65534), 0);
            }
        }
        let env = setup();
        let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
            .unwrap_or_default();
        if sysctl.trim() == "0" {
            assert!(env.mon.user_mode_only());
        }
        println!(
            "uffd unprivileged: user_mode_only = {}, fork_events = {}",
            env.mon.user_mode_only(),
            env.mon.fork_events()
        );
        let mut buf = Anon::new(LEN);
        caught_after(&env, &mut buf, DISCARD, |b| b.madvise(libc::MADV_DONTNEED));
        // A fork child is unmonitored either way and does not hang.
        fork_and_wait(&buf);
        env.settle();
        let u = env.reg.register_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
        assert_eq!(env.fill(&u, 0xcd), Status::Ok);
        assert!(all(&buf.read(), 0xcd));
        drop(buf);
        env.finish();
    }
);

in_child!(
    /// The cost on the calling thread: madvise(DONTNEED) of a registered 4 KiB page with
    /// the monitor on, against the raw call. Printed, not asserted.
    madvise_cost_with_the_monitor,
    madvise_cost_child,
    {
        let pins = PinCheck::start();
        let (monitored, raw) = measure_madvise(1000).unwrap();
        println!("uffd_registered_madvise: {monitored:.2} us (raw {raw:.2} us)");
        pins.check();
    }
);

in_child!(
    /// No timeout, however large, panics: `Duration::MAX` means "no deadline".
    sync_takes_any_timeout,
    sync_takes_any_timeout_child,
    {
        let env = setup();
        assert!(env.mon.sync(Duration::MAX), "sync with no deadline");
        println!("uffd sync: Duration::MAX ok");
    }
);
