//! The LD_PRELOAD monitor, one interposed libc function at a time.
//!
//! Each test runs its case in a child process started with `LD_PRELOAD` set to the
//! shim (`preload_so()`, built by `cargo build -p userptr-preload`, which `test.sh`
//! does first), with the reference device: register a buffer, change it through that
//! function, have the device FILL it through the registry, and look. `caught`: the
//! process sees the fill (for a protection downgrade: the device write faults instead
//! of landing); `stale`: the device wrote pages the process no longer maps.
//!
//! Every hazard case runs twice in its child: first without the monitor, where it must
//! show the hazard (so the case can fail: a change the monitor missed reads `stale`),
//! then with `PreloadMonitor` installed, where it must be caught. The advice cases
//! check `Registry::stats()` too: advice the kernel does not know is invalidated
//! (counted) although the kernel then answers EINVAL; harmless advice is not.
//!
//! `errno_fidelity` calls each wrapper with invalid arguments, first with the shim's
//! hooks uninstalled and then installed, and compares return values and errno.
//! `mmap_fixed_hugetlb` needs two free 2 MiB huge pages (`vm.nr_hugepages`) and says
//! SKIP without them.

mod common;
use common::RegisterTest as _;

use common::{is_child, map_isolated, Anon};
use std::time::Duration;
use userptr::driver::monitor::preload::PreloadMonitor;
use userptr::{
    CommandQueue, Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status, Userptr,
    WaitMode,
};

const LEN: usize = 256 << 10;
const PAGE: usize = 4096;
/// Not an errno the kernel uses: what a call that sets none leaves behind.
const SENTINEL: i32 = 4242;
/// An advice value no kernel knows (yet): EINVAL.
const UNKNOWN_ADVICE: i32 = 77;
const MADV_DONTNEED_LOCKED: i32 = 24;
const MADV_COLD: i32 = 20;
const MADV_GUARD_INSTALL: i32 = 102;
const MADV_GUARD_REMOVE: i32 = 103;
/// `Cause::index` of a discard (destructive advice).
const DISCARD: usize = 1;

extern "C" {
    // glibc 2.27 and 2.36; the libc crate does not declare them.
    fn pkey_mprotect(addr: *mut libc::c_void, len: usize, prot: i32, pkey: i32) -> i32;
    fn process_madvise(
        pidfd: i32,
        iov: *const libc::iovec,
        vlen: usize,
        advice: i32,
        flags: u32,
    ) -> isize;
}

/// The shim, built next to this test's binary.
fn preload_so() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let so = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("libuserptr_preload.so");
    assert!(
        so.exists(),
        "{} is missing: run `cargo build -p userptr-preload` first",
        so.display()
    );
    so
}

/// Run `case_child` for `case` in a child with the shim preloaded; panics if it failed
/// or hung (a generous bound: a case takes well under a second).
fn run_case(case: &str) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "case_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(common::CHILD_ENV, "1")
        .env("USERPTR_PRELOAD_CASE", case)
        .env("LD_PRELOAD", preload_so())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child test");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = out.join().unwrap() + &err.join().unwrap();
    let Some(status) = status else {
        panic!("case {case} hung:\n{text}");
    };
    assert!(status.success(), "case {case} failed ({status}):\n{text}");
    assert!(
        text.contains("1 passed"),
        "case {case} did not run:\n{text}"
    );
    assert!(
        text.contains("CASE OK"),
        "case {case} did not finish:\n{text}"
    );
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run_case(stringify!($name)); })*
    };
}

cases!(
    munmap,
    mmap_fixed,
    mmap64_fixed,
    mremap_move,
    mremap_onto,
    madvise_dontneed,
    madvise_dontneed_locked,
    madvise_guard_install,
    madvise_unknown_advice,
    madvise_cold_is_harmless,
    posix_madvise,
    process_madvise_two_ranges,
    process_madvise_vlen_over_32_bits,
    mmap_fixed_hugetlb,
    mprotect_downgrade,
    pkey_mprotect_downgrade,
    mprotect_growsdown,
    brk_shrink,
    sbrk_shrink,
    shmat_remap,
    shmdt_split_segment,
    remap_file_pages,
    errno_fidelity,
    one_monitor_at_a_time,
    threads_while_installing,
);

/// What a case works with.
struct T<'a> {
    reg: &'a Registry,
    q: &'a CommandQueue,
}

impl T<'_> {
    /// FILL `u` through the registry. A submission the registry refuses reads as a
    /// device error.
    fn fill(&self, u: &Userptr, b: u8) -> Status {
        let len = u.len();
        let Ok(f) = self
            .reg
            .submit(self.q, &[u], |i| vec![Descriptor::fill(i[0], len, b)])
        else {
            return Status::DeviceError;
        };
        self.q
            .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
            .unwrap()
            .status
    }

    /// Register `[addr, addr + len)`, run `change`, FILL the registration and say
    /// whether the process sees the fill at `addr` afterwards.
    fn visible(&self, addr: usize, len: usize, change: impl FnOnce()) -> &'static str {
        let u = self.reg.register_test(addr, len, Perm::READ_WRITE).unwrap();
        change();
        self.seen(&u, addr, len)
    }

    /// FILL `u` and look at `[addr, addr + len)`. A submission refused because the
    /// pages now behind `u` may not be pinned (driver/src/backing/: the change put
    /// SysV or unsealed shared memory there) counts as caught: no stale pin reached them.
    fn seen(&self, u: &Userptr, addr: usize, len: usize) -> &'static str {
        let n = u.len();
        if let Err(Error::ReplaceablePages { .. }) = self
            .reg
            .submit(self.q, &[u], |i| vec![Descriptor::fill(i[0], n, 0)])
            .map(|f| self.q.wait(f.end, WaitMode::Block, Duration::from_secs(30)))
        {
            return "caught";
        }
        match self.fill(u, 0xab) {
            Status::Ok if read(addr, len).iter().all(|&b| b == 0xab) => "caught",
            Status::Ok => "stale",
            _ => "error",
        }
    }

    /// FILL `u` after a protection downgrade: the write must fault.
    fn faults(&self, u: &Userptr) -> &'static str {
        match self.fill(u, 0xab) {
            Status::DmaFault => "caught",
            Status::Ok => "stale",
            _ => "error",
        }
    }

    fn discards(&self) -> u64 {
        self.reg.stats().invalidations[DISCARD]
    }

    fn unmaps(&self) -> u64 {
        self.reg.stats().invalidations[userptr::Cause::Unmap.index()]
    }

    /// Run `scenario` (which returns the unmap invalidations it expects with the
    /// monitor) without the monitor and with it, and check the count of each run: for
    /// changes on memory the registry does not accept, where only the report can be seen.
    fn counted_unmaps(&self, scenario: impl Fn(&Self) -> u64) {
        // Registered pages at both ends of the address space, so that the registry's
        // cheap pre-check (its lowest and highest pinned address) lets every report of
        // the scenario through to the invalidation, which counts it.
        let anchor = |flags: i32| {
            // SAFETY: a fresh anonymous page of the case's own.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            self.reg
                .register_test(p as usize, PAGE, Perm::READ_WRITE)
                .unwrap()
        };
        let _low = anchor(libc::MAP_32BIT);
        let _high = anchor(0);
        let before = self.unmaps();
        scenario(self);
        assert_eq!(
            self.unmaps(),
            before,
            "no unmap reported without the monitor"
        );
        let m = PreloadMonitor::install(self.reg).unwrap();
        let before = self.unmaps();
        let want = scenario(self);
        let got = self.unmaps() - before;
        drop(m);
        assert_eq!(got, want, "unmaps reported with the monitor");
    }

    fn invalidations(&self) -> u64 {
        self.reg.stats().invalidations.iter().sum()
    }

    /// Run `scenario` without the monitor (it must show the hazard) and with it (it
    /// must be caught). Each run starts from an empty cache.
    fn hazard(&self, scenario: impl Fn(&Self) -> &'static str) {
        let without = scenario(self);
        self.reg.clear().unwrap();
        assert_eq!(without, "stale", "without the monitor the change is missed");
        let m = PreloadMonitor::install(self.reg).unwrap();
        let with = scenario(self);
        drop(m);
        self.reg.clear().unwrap();
        assert_eq!(with, "caught", "the monitor must catch the change");
    }

    /// Run `scenario` (which returns the discards it expects with the monitor) without
    /// the monitor and with it, and check the discard count of each run.
    fn counted(&self, scenario: impl Fn(&Self) -> u64) {
        let before = self.discards();
        scenario(self);
        assert_eq!(self.discards(), before, "no discard without the monitor");
        self.reg.clear().unwrap();
        let m = PreloadMonitor::install(self.reg).unwrap();
        let before = self.discards();
        let want = scenario(self);
        let got = self.discards() - before;
        drop(m);
        self.reg.clear().unwrap();
        assert_eq!(got, want, "discards counted with the monitor");
    }
}

fn read(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the caller's mapping is live and readable for `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

fn errno() -> i32 {
    // SAFETY: this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: i32) {
    // SAFETY: this thread's errno.
    unsafe { *libc::__errno_location() = e }
}

/// Map fresh anonymous memory into the hole a case just made (never over another
/// mapping: MAP_FIXED_NOREPLACE, so another thread's allocation there fails the case).
fn map_hole(addr: usize, len: usize) {
    // SAFETY: maps at the case's own former address, refusing to replace anything.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, addr, "another mapping took the hole");
}

/// A shared mapping of a fresh memfd of `size` bytes, `len` of them mapped from 0.
fn memfd_mapping(size: usize, len: usize) -> (memfd::Memfd, usize) {
    use std::os::fd::AsRawFd;
    let fd = memfd::MemfdOptions::default().create("preload").unwrap();
    fd.as_file().set_len(size as u64).unwrap();
    // SAFETY: a shared mapping of our own memfd.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(a, libc::MAP_FAILED);
    (fd, a as usize)
}

/// A private SysV segment of `len` bytes (see `remove_segment`).
fn segment(len: usize) -> i32 {
    // SAFETY: a plain SysV call.
    unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        id
    }
}

fn remove_segment(id: i32) {
    // SAFETY: removing our own segment.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
}

fn pidfd_self() -> i32 {
    // SAFETY: pidfd_open of this process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    fd
}

/// `madvise(advice)` over a registered buffer and a FILL.
fn advise(t: &T<'_>, advice: i32) -> &'static str {
    let buf = Anon::new(LEN);
    t.visible(buf.addr, LEN, || buf.madvise(advice))
}

fn run(t: &T<'_>, case: &str) {
    match case {
        "munmap" => t.hazard(|t| {
            let buf = Anon::new(LEN);
            t.visible(buf.addr, LEN, || {
                // SAFETY: unmapping the case's own buffer, then mapping it again.
                assert_eq!(unsafe { libc::munmap(buf.addr as *mut _, LEN) }, 0);
                map_hole(buf.addr, LEN);
            })
        }),
        "mmap_fixed" | "mmap64_fixed" => t.hazard(|t| {
            let buf = Anon::new(LEN);
            t.visible(buf.addr, LEN, || {
                let (prot, flags) = (
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                );
                let a = buf.addr as *mut libc::c_void;
                // SAFETY: fresh anonymous memory over the case's own buffer.
                let p = unsafe {
                    if case == "mmap_fixed" {
                        libc::mmap(a, LEN, prot, flags, -1, 0)
                    } else {
                        libc::mmap64(a, LEN, prot, flags, -1, 0)
                    }
                };
                assert_eq!(p, a);
            })
        }),
        "mremap_move" | "mremap_onto" => t.hazard(|t| {
            let (src, dest) = (Anon::new(LEN), Anon::new(LEN));
            src.fill(1);
            let onto = case == "mremap_onto";
            // Registered: the moved range, or the destination the move replaces.
            let at = if onto { dest.addr } else { src.addr };
            t.visible(at, LEN, || {
                // SAFETY: moves the case's buffer onto its other buffer's range.
                let p = unsafe {
                    libc::mremap(
                        src.addr as *mut _,
                        LEN,
                        LEN,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        dest.addr as *mut libc::c_void,
                    )
                };
                assert_eq!(p as usize, dest.addr);
                map_hole(src.addr, LEN);
            })
        }),
        "madvise_dontneed" => t.hazard(|t| advise(t, libc::MADV_DONTNEED)),
        "madvise_dontneed_locked" => t.hazard(|t| advise(t, MADV_DONTNEED_LOCKED)),
        "madvise_guard_install" => t.hazard(|t| {
            let buf = Anon::new(LEN);
            let u = t
                .reg
                .register_test(buf.addr, LEN, Perm::READ_WRITE)
                .unwrap();
            let before = t.discards();
            // Zaps the range (and puts guard markers in it).
            buf.madvise(MADV_GUARD_INSTALL);
            let counted = t.discards() - before;
            buf.madvise(MADV_GUARD_REMOVE);
            // Caught only if the install itself invalidated.
            match (counted, t.seen(&u, buf.addr, LEN)) {
                (0, "stale") => "stale",
                (n, "caught") if n > 0 => "caught",
                _ => "caught late, or not at all",
            }
        }),
        "madvise_unknown_advice" => t.counted(|t| {
            let buf = Anon::new(LEN);
            let u = t
                .reg
                .register_test(buf.addr, LEN, Perm::READ_WRITE)
                .unwrap();
            set_errno(SENTINEL);
            // SAFETY: advice the kernel refuses: nothing changes.
            let r = unsafe { libc::madvise(buf.addr as *mut _, LEN, UNKNOWN_ADVICE) };
            assert_eq!(
                (r, errno()),
                (-1, libc::EINVAL),
                "the kernel must refuse it"
            );
            assert_eq!(t.seen(&u, buf.addr, LEN), "caught");
            1
        }),
        "madvise_cold_is_harmless" => {
            let m = PreloadMonitor::install(t.reg).unwrap();
            let buf = Anon::new(LEN);
            let u = t
                .reg
                .register_test(buf.addr, LEN, Perm::READ_WRITE)
                .unwrap();
            let before = t.invalidations();
            buf.madvise(MADV_COLD);
            assert_eq!(t.invalidations(), before, "harmless advice invalidated");
            assert_eq!(t.seen(&u, buf.addr, LEN), "caught");
            drop(m);
        }
        "posix_madvise" => t.hazard(|t| {
            let buf = Anon::new(LEN);
            t.visible(buf.addr, LEN, || {
                // glibc hands any advice but POSIX_MADV_DONTNEED to the kernel.
                // SAFETY: discarding the case's own buffer.
                let r = unsafe { libc::posix_madvise(buf.addr as *mut _, LEN, 24) };
                assert_eq!(r, 0);
            })
        }),
        "process_madvise_two_ranges" | "process_madvise_vlen_over_32_bits" => {
            let pidfd = pidfd_self();
            // The kernel takes vlen as a 32-bit count: 2^32 + 2 is 2 iovecs.
            let vlen = if case == "process_madvise_two_ranges" {
                2
            } else {
                (1 << 32) + 2
            };
            t.hazard(|t| {
                let (a, b) = (Anon::new(LEN), Anon::new(LEN));
                let ua = t.reg.register_test(a.addr, LEN, Perm::READ_WRITE).unwrap();
                let ub = t.reg.register_test(b.addr, LEN, Perm::READ_WRITE).unwrap();
                let iov = [
                    libc::iovec {
                        iov_base: b.addr as *mut _,
                        iov_len: LEN,
                    },
                    libc::iovec {
                        iov_base: a.addr as *mut _,
                        iov_len: LEN,
                    },
                ];
                // SAFETY: discarding the case's own buffers.
                let r =
                    unsafe { process_madvise(pidfd, iov.as_ptr(), vlen, libc::MADV_DONTNEED, 0) };
                assert_eq!(r, 2 * LEN as isize, "{}", std::io::Error::last_os_error());
                let (ra, rb) = (t.seen(&ua, a.addr, LEN), t.seen(&ub, b.addr, LEN));
                assert_eq!(ra, rb, "both ranges alike");
                ra
            });
            // SAFETY: our pidfd.
            unsafe { libc::close(pidfd) };
        }
        "mmap_fixed_hugetlb" => {
            const HUGE: usize = 2 << 20;
            let huge = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: a fresh huge page, unmapped again.
            let probe = unsafe { libc::mmap(std::ptr::null_mut(), 2 * HUGE, rw, huge, -1, 0) };
            if probe == libc::MAP_FAILED {
                println!("SKIP: no two free 2 MiB huge pages here (vm.nr_hugepages)");
                return;
            }
            // SAFETY: our probe mapping.
            unsafe { libc::munmap(probe, 2 * HUGE) };
            t.hazard(|t| {
                // SAFETY: a fresh huge page, replaced by another through a 4 KiB
                // MAP_FIXED (the kernel rounds the length up to the huge page).
                unsafe {
                    let a = libc::mmap(std::ptr::null_mut(), HUGE, rw, huge, -1, 0) as usize;
                    assert_ne!(a, libc::MAP_FAILED as usize);
                    std::ptr::write_bytes(a as *mut u8, 1, HUGE);
                    // The second half: outside the 4 KiB the call names.
                    let half = a + HUGE / 2;
                    let r = t.visible(half, HUGE / 2, || {
                        let p = libc::mmap(a as *mut _, PAGE, rw, huge | libc::MAP_FIXED, -1, 0);
                        assert_eq!(p as usize, a);
                    });
                    libc::munmap(a as *mut _, HUGE);
                    r
                }
            });
        }
        "mprotect_growsdown" => t.hazard(|t| {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN;
            // SAFETY: a fresh mapping that may grow down, write-protected whole through
            // its top page, unmapped at the end.
            unsafe {
                let a = libc::mmap(std::ptr::null_mut(), LEN, rw, flags, -1, 0) as usize;
                assert_ne!(a, libc::MAP_FAILED as usize);
                std::ptr::write_bytes(a as *mut u8, 1, LEN);
                // Everything below the top page: outside the range the call names.
                let u = t
                    .reg
                    .register_test(a, LEN - PAGE, Perm::READ_WRITE)
                    .unwrap();
                let top = (a + LEN - PAGE) as *mut libc::c_void;
                let r = libc::mprotect(top, PAGE, libc::PROT_READ | libc::PROT_GROWSDOWN);
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                // The write must not land: a fault, or a refused re-pin.
                let r = match t.fill(&u, 0xab) {
                    Status::Ok => "stale",
                    _ => "caught",
                };
                libc::munmap(a as *mut _, LEN);
                r
            }
        }),
        "mprotect_downgrade" | "pkey_mprotect_downgrade" => t.hazard(|t| {
            let buf = Anon::new(LEN);
            let u = t
                .reg
                .register_test(buf.addr, LEN, Perm::READ_WRITE)
                .unwrap();
            let a = buf.addr as *mut libc::c_void;
            // SAFETY: write-protecting the case's own buffer (pkey -1: no key).
            let r = unsafe {
                if case == "mprotect_downgrade" {
                    libc::mprotect(a, LEN, libc::PROT_READ)
                } else {
                    pkey_mprotect(a, LEN, libc::PROT_READ, -1)
                }
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            t.faults(&u)
        }),
        "brk_shrink" | "sbrk_shrink" => t.hazard(|t| {
            // SAFETY: grows the heap by a page-aligned block, registers it, shrinks the
            // heap back and grows it again (new, zeroed pages at the same address).
            unsafe {
                let cur = libc::sbrk(0) as usize;
                let start = (cur + PAGE - 1) & !(PAGE - 1);
                assert_eq!(libc::brk((start + LEN) as *mut _), 0);
                std::ptr::write_bytes(start as *mut u8, 1, LEN);
                let r = t.visible(start, LEN, || {
                    if case == "brk_shrink" {
                        assert_eq!(libc::brk(start as *mut _), 0);
                    } else {
                        assert_eq!(libc::sbrk(-(LEN as isize)) as usize, start + LEN);
                    }
                    assert_eq!(libc::brk((start + LEN) as *mut _), 0);
                });
                libc::brk(start as *mut _);
                r
            }
        }),
        "shmat_remap" => t.hazard(|t| {
            let buf = Anon::new(LEN);
            let id = segment(LEN);
            let r = t.visible(buf.addr, LEN, || {
                // SAFETY: the segment replaces the case's own buffer.
                let p = unsafe { libc::shmat(id, buf.addr as *const _, libc::SHM_REMAP) };
                assert_eq!(p as usize, buf.addr, "{}", std::io::Error::last_os_error());
            });
            // SAFETY: detaching what this case attached.
            unsafe { libc::shmdt(buf.addr as *const _) };
            remove_segment(id);
            r
        }),
        // SysV memory cannot be registered (driver/src/backing/), so no registered page
        // can lie in an attach: the detach is checked by what the shim reports.
        "shmdt_split_segment" => t.counted_unmaps(|_| {
            let id = segment(LEN);
            // SAFETY: attaches the case's segment; its first page is made read-only, so
            // that the attach is two mappings; detaching takes both.
            unsafe {
                let a = libc::shmat(id, std::ptr::null(), 0) as usize;
                assert_eq!(libc::mprotect(a as *mut _, PAGE, libc::PROT_READ), 0);
                assert_eq!(libc::shmdt(a as *const _), 0);
            }
            remove_segment(id);
            // One report, covering the whole attach (both pieces).
            1
        }),
        // Shared file memory is registrable only sealed, and on a sealed memfd the
        // kernel refuses remap_file_pages while the mapping is writable (which a pin
        // needs): checked by the report, on a read-only mapping where it is allowed.
        "remap_file_pages" => t.counted_unmaps(|_| {
            let (fd, a) = memfd_mapping(2 * LEN, LEN);
            // SAFETY: the case's shared mapping, made read-only, then shows the file's
            // second half.
            unsafe {
                assert_eq!(libc::mprotect(a as *mut _, LEN, libc::PROT_READ), 0);
                let r = libc::remap_file_pages(a as *mut _, LEN, 0, LEN / PAGE, 0);
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                // Raw, so that the shim does not report the clean-up too.
                libc::syscall(libc::SYS_munmap, a, LEN);
            }
            drop(fd);
            1
        }),
        "errno_fidelity" => errno_fidelity_case(t),
        "one_monitor_at_a_time" => {
            let m = PreloadMonitor::install(t.reg).unwrap();
            match PreloadMonitor::install(t.reg) {
                Err(Error::MonitorConflict { .. }) => {}
                r => panic!("a second monitor was installed: {:?}", r.err()),
            }
            // The first one still works after the refusal, and a new one may follow.
            assert_eq!(advise(t, libc::MADV_DONTNEED), "caught");
            drop(m);
            let m = PreloadMonitor::install(t.reg).unwrap();
            assert_eq!(advise(t, libc::MADV_DONTNEED), "caught");
            drop(m);
        }
        "threads_while_installing" => threads_case(t),
        _ => panic!("no case {case}"),
    }
}

/// Child body: run the case in `USERPTR_PRELOAD_CASE`, then check that every pin is
/// gone with the registry.
#[test]
#[ignore = "child process body of the tests in this file"]
fn case_child() {
    assert!(is_child(), "run through the tests of this file");
    let case = std::env::var("USERPTR_PRELOAD_CASE").unwrap();
    let pins_start = userptr::proc_status::pinned_bytes().unwrap();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    run(&T { reg: &reg, q: &q }, &case);
    drop(q);
    drop(reg);
    drop(drv);
    assert_eq!(
        userptr::proc_status::pinned_bytes().unwrap(),
        pins_start,
        "{case}: pins left after the monitor and the registry were dropped"
    );
    println!("CASE OK");
}

/// One call: its result and errno, errno set to [`SENTINEL`] before.
type Call<'a> = (&'static str, Box<dyn Fn() -> (i64, i32) + 'a>);

fn call(name: &'static str, f: impl Fn() -> i64 + 'static) -> Call<'static> {
    (
        name,
        Box::new(move || {
            set_errno(SENTINEL);
            let r = f();
            (r, errno())
        }),
    )
}

/// The invalid calls, each expected to fail (or, marked so, to succeed) without
/// changing anything the next call depends on.
fn invalid_calls(b: usize, hole: usize, edge: usize, id: i32, pidfd: i32) -> Vec<Call<'static>> {
    use libc::{c_void, iovec};
    let p = |a: usize| a as *mut c_void;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    let top = 0xffff_8000_0000_0000usize;
    let iov = edge as *const iovec;
    // SAFETY: every closure below passes invalid arguments on purpose (bad pointers,
    // unaligned or zero lengths, bad flags), which the kernel refuses without a change,
    // or makes a harmless call on the case's own buffer `b`.
    unsafe {
        vec![
            call("munmap unaligned", move || {
                libc::munmap(p(b + 1), PAGE) as i64
            }),
            call("munmap zero length", move || libc::munmap(p(b), 0) as i64),
            call("munmap kernel address", move || {
                libc::munmap(p(top), PAGE) as i64
            }),
            call("mmap unaligned", move || {
                libc::mmap(p(b + 1), PAGE, rw, anon, -1, 0) as i64
            }),
            call("mmap zero length", move || {
                libc::mmap(p(b), 0, rw, anon, -1, 0) as i64
            }),
            call("mmap bad flags", move || {
                libc::mmap(p(b), PAGE, rw, libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0) as i64
            }),
            call("mmap bad fd", move || {
                libc::mmap(p(b), PAGE, rw, libc::MAP_SHARED | libc::MAP_FIXED, -1, 0) as i64
            }),
            call("mmap64 unaligned", move || {
                libc::mmap64(p(b + 1), PAGE, rw, anon, -1, 0) as i64
            }),
            call("mmap64 bad flags", move || {
                libc::mmap64(p(b), PAGE, rw, libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0) as i64
            }),
            call("mremap unaligned", move || {
                libc::mremap(p(b + 1), PAGE, PAGE, 0, p(0)) as i64
            }),
            call("mremap bad flags", move || {
                libc::mremap(p(b), PAGE, 2 * PAGE, 0x80, p(0)) as i64
            }),
            call("mremap fixed without maymove", move || {
                libc::mremap(p(b), PAGE, PAGE, libc::MREMAP_FIXED, p(hole)) as i64
            }),
            call("mremap zero length", move || {
                libc::mremap(p(b), PAGE, 0, libc::MREMAP_MAYMOVE, p(0)) as i64
            }),
            call("mremap unmapped", move || {
                libc::mremap(p(hole), PAGE, PAGE, 0, p(0)) as i64
            }),
            call("madvise unaligned", move || {
                libc::madvise(p(b + 1), PAGE, libc::MADV_DONTNEED) as i64
            }),
            call("madvise unknown advice", move || {
                libc::madvise(p(b), LEN, UNKNOWN_ADVICE) as i64
            }),
            call("madvise unmapped", move || {
                libc::madvise(p(hole), PAGE, libc::MADV_DONTNEED) as i64
            }),
            call("madvise zero length (ok)", move || {
                libc::madvise(p(b), 0, libc::MADV_DONTNEED) as i64
            }),
            call("madvise wrapping length", move || {
                libc::madvise(p(b), usize::MAX - PAGE, libc::MADV_DONTNEED) as i64
            }),
            call("madvise cold (ok)", move || {
                libc::madvise(p(b), LEN, MADV_COLD) as i64
            }),
            call("posix_madvise unaligned", move || {
                libc::posix_madvise(p(b + 1), PAGE, 0) as i64
            }),
            call("posix_madvise unknown advice", move || {
                libc::posix_madvise(p(b), LEN, UNKNOWN_ADVICE) as i64
            }),
            call("mprotect unaligned", move || {
                libc::mprotect(p(b + 1), PAGE, rw) as i64
            }),
            call("mprotect bad prot", move || {
                libc::mprotect(p(b), PAGE, 0x1000) as i64
            }),
            call("mprotect unmapped", move || {
                libc::mprotect(p(hole), PAGE, rw) as i64
            }),
            call("mprotect same (ok)", move || {
                libc::mprotect(p(b), LEN, rw) as i64
            }),
            call("pkey_mprotect unallocated key", move || {
                pkey_mprotect(p(b), PAGE, rw, 7) as i64
            }),
            call("pkey_mprotect unaligned", move || {
                pkey_mprotect(p(b + 1), PAGE, rw, -1) as i64
            }),
            call("pkey_mprotect same (ok)", move || {
                pkey_mprotect(p(b), LEN, rw, -1) as i64
            }),
            // glibc's brk fails only when the kernel's break ends up below the address.
            call("brk below the heap (ok)", move || libc::brk(p(PAGE)) as i64),
            call("brk above the address space", move || {
                libc::brk(p(usize::MAX & !(PAGE - 1))) as i64
            }),
            call("sbrk below 0", move || libc::sbrk(-(1 << 60)) as i64),
            call("sbrk too far", move || libc::sbrk(1 << 60) as i64),
            call("shmat bad id", move || libc::shmat(-1, p(0), 0) as i64),
            call("shmat remap at null", move || {
                libc::shmat(id, p(0), libc::SHM_REMAP) as i64
            }),
            call("shmat remap unaligned", move || {
                libc::shmat(id, p(b + 1), libc::SHM_REMAP) as i64
            }),
            call("shmat remap bad id", move || {
                libc::shmat(-1, p(b), libc::SHM_REMAP) as i64
            }),
            call("shmat occupied", move || libc::shmat(id, p(b), 0) as i64),
            call("shmdt unaligned", move || libc::shmdt(p(b + 1)) as i64),
            call("shmdt not a segment", move || libc::shmdt(p(b)) as i64),
            call("shmdt unmapped", move || libc::shmdt(p(hole)) as i64),
            call("remap_file_pages private", move || {
                libc::remap_file_pages(p(b), PAGE, 0, 0, 0) as i64
            }),
            call("remap_file_pages prot", move || {
                libc::remap_file_pages(p(b), PAGE, libc::PROT_READ, 0, 0) as i64
            }),
            call("remap_file_pages unmapped", move || {
                libc::remap_file_pages(p(hole), PAGE, 0, 0, 0) as i64
            }),
            call("process_madvise unmapped iovecs", move || {
                process_madvise(pidfd, hole as *const iovec, 1, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise null iovecs", move || {
                process_madvise(pidfd, std::ptr::null(), 1, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise iovecs across a hole", move || {
                process_madvise(pidfd, iov, 2, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise vlen 1025", move || {
                process_madvise(pidfd, iov, 1025, libc::MADV_DONTNEED, 0) as i64
            }),
            // The kernel takes vlen as a 32-bit count: 2^40 is 0 iovecs.
            call("process_madvise vlen 2^40 (ok)", move || {
                process_madvise(pidfd, iov, 1 << 40, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise vlen 2^40 + 1025", move || {
                process_madvise(pidfd, iov, (1 << 40) + 1025, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise vlen 2^32 + 2, across a hole", move || {
                process_madvise(pidfd, iov, (1 << 32) + 2, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise vlen max", move || {
                process_madvise(pidfd, iov, usize::MAX, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise bad flags", move || {
                process_madvise(pidfd, iov, 1, libc::MADV_DONTNEED, 1) as i64
            }),
            call("process_madvise bad flags, unmapped iovecs", move || {
                process_madvise(pidfd, hole as *const iovec, 1, libc::MADV_DONTNEED, 1) as i64
            }),
            call("process_madvise bad pidfd", move || {
                process_madvise(-1, iov, 1, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise unknown advice", move || {
                process_madvise(pidfd, iov, 1, UNKNOWN_ADVICE, 0) as i64
            }),
            call("process_madvise unaligned range", move || {
                let v = [iovec {
                    iov_base: p(b + 1),
                    iov_len: PAGE,
                }];
                process_madvise(pidfd, v.as_ptr(), 1, libc::MADV_DONTNEED, 0) as i64
            }),
            call("process_madvise cold (ok)", move || {
                process_madvise(pidfd, iov, 1, MADV_COLD, 0) as i64
            }),
        ]
    }
}

fn errno_fidelity_case(t: &T<'_>) {
    let b = Anon::new(LEN);
    let _u = t.reg.register_test(b.addr, LEN, Perm::READ_WRITE).unwrap();
    // An address with nothing mapped.
    let hole = map_isolated(PAGE, libc::PROT_READ) as usize;
    // SAFETY: unmapping the page just mapped.
    unsafe { libc::munmap(hole as *mut _, PAGE) };
    // One iovec (over `b`) in the last bytes of a page, the next page unmapped: one
    // iovec is readable, two are not.
    let pages = map_isolated(2 * PAGE, libc::PROT_READ | libc::PROT_WRITE) as usize;
    // SAFETY: unmapping the second page of the two just mapped.
    unsafe { libc::munmap((pages + PAGE) as *mut _, PAGE) };
    let edge = pages + PAGE - std::mem::size_of::<libc::iovec>();
    // SAFETY: `edge` is in the first page, mapped read-write, aligned for an iovec.
    unsafe {
        (edge as *mut libc::iovec).write(libc::iovec {
            iov_base: b.addr as *mut _,
            iov_len: LEN,
        })
    };
    let id = segment(LEN);
    let pidfd = pidfd_self();
    let calls = invalid_calls(b.addr, hole, edge, id, pidfd);
    let without: Vec<(i64, i32)> = calls.iter().map(|(_, f)| f()).collect();
    let m = PreloadMonitor::install(t.reg).unwrap();
    let with: Vec<(i64, i32)> = calls.iter().map(|(_, f)| f()).collect();
    drop(m);
    let mut bad = Vec::new();
    for (((name, _), w), m) in calls.iter().zip(&without).zip(&with) {
        println!("{name:45} without {w:?} with {m:?}");
        if w != m {
            bad.push(format!("{name}: without the monitor {w:?}, with it {m:?}"));
        }
        // The case means what it says: a failure with an errno, or a success that set
        // none (posix_madvise returns its error instead of setting errno).
        let ok = name.ends_with("(ok)");
        let failed = if name.starts_with("posix_madvise") {
            w.0 > 0 && w.1 == SENTINEL
        } else {
            (w.0 == -1 || w.0 == libc::MAP_FAILED as i64) && w.1 != SENTINEL
        };
        if ok == failed || (ok && w.1 != SENTINEL) {
            bad.push(format!("{name}: unexpected {w:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // SAFETY: our pidfd, segment and page.
    unsafe {
        libc::close(pidfd);
        libc::munmap(pages as *mut _, PAGE);
    }
    remove_segment(id);
}

/// Application threads change registered memory while the monitor is installed and
/// removed over and over: every hook call meets a monitor that is there, stopping or
/// gone, and none may crash, hang, or keep the registry alive.
fn threads_case(t: &T<'_>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Barrier;
    const THREADS: usize = 3;
    const TOGGLES: usize = 300;
    let first = Barrier::new(THREADS + 1);
    let started = Barrier::new(THREADS + 1);
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let reg = t.reg;
    let mut m = Some(PreloadMonitor::install(reg).unwrap());
    let before = t.invalidations();
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let buf = Anon::new(4 * PAGE);
                first.wait();
                let mut i = 0u64;
                // Relaxed: a stop flag; the scope's join orders the rest.
                while i == 0 || !stop.load(Ordering::Relaxed) {
                    // Re-pins after every discard.
                    let _u = reg
                        .register_test(buf.addr, 4 * PAGE, Perm::READ_WRITE)
                        .unwrap();
                    match i % 3 {
                        0 => buf.madvise(libc::MADV_DONTNEED),
                        1 => buf.mprotect(libc::PROT_READ | libc::PROT_WRITE),
                        _ => buf.madvise(MADV_COLD),
                    }
                    if i == 0 {
                        // The first round ran with the monitor installed.
                        started.wait();
                    }
                    i += 1;
                }
                // Relaxed: a count read after the join.
                calls.fetch_add(i, Ordering::Relaxed);
            });
        }
        first.wait();
        started.wait();
        let n = t.invalidations() - before;
        assert!(n >= THREADS as u64, "the first round is monitored");
        for _ in 0..TOGGLES {
            m = match m.take() {
                Some(mon) => {
                    drop(mon);
                    None
                }
                None => Some(PreloadMonitor::install(reg).unwrap()),
            };
            std::thread::yield_now();
        }
        // Relaxed: see above.
        stop.store(true, Ordering::Relaxed);
    });
    println!(
        "{TOGGLES} toggles, {} calls, {} invalidations",
        calls.load(Ordering::Relaxed),
        t.invalidations() - before
    );
    drop(m);
    t.reg.clear().unwrap();
}
