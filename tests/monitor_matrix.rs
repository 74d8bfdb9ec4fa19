//! The coverage matrix: for every monitor source and every way a process changes its
//! address space, does the device's next write reach the memory the process sees?
//!
//! Each (source, path) pair runs in its own child process (a monitor is process-wide
//! state): register a buffer, mutate it by that path (telling the registry only if
//! the source is `explicit`), have the reference device FILL it through the registry,
//! and look. `caught` means the write is visible (for an `mprotect` downgrade: the
//! device write faults instead of landing); `stale` means it went to pages the
//! process no longer maps. The `none` column is the hazard itself.
//!
//! The test prints the matrix as markdown; `tools/update-matrix.sh` pastes it into the
//! README. It asserts what must hold: `explicit` and `seccomp` catch every path, and
//! `none` shows the hazard on the paths that are hazards.

mod common;

use common::{is_child, Anon};
use std::time::Duration;
use userptr::driver::monitor::uffd::UffdMonitor;
use userptr::{
    CommandQueue, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, Userptr, WaitMode,
};

const PATHS: &[&str] = &[
    "munmap",
    "free_malloc",
    "realloc_move",
    "raw_syscall_munmap",
    "raw_syscall_madvise",
    "madv_dontneed",
    "madv_free",
    "madv_remove",
    "mprotect_downgrade",
    "mmap_fixed",
    "mremap_move",
    "brk_shrink",
    "shmdt",
    "fork",
];
const SOURCES: &[&str] = &["none", "explicit", "seccomp", "uffd", "preload"];
/// Paths where the `none` column must show the hazard.
const HAZARDS: &[&str] = &[
    "munmap",
    "free_malloc",
    "realloc_move",
    "brk_shrink",
    "raw_syscall_munmap",
    "raw_syscall_madvise",
    "madv_dontneed",
    "mprotect_downgrade",
    "mmap_fixed",
    "mremap_move",
];

const LEN: usize = 1 << 20;
/// A path's result when another thread's allocation landed in the hole it made (a
/// test-environment event, retried).
const HOLE_TAKEN: &str = "hole-taken";

/// FILL `u` through the registry. A submission the registry refuses (the range could not
/// be pinned, e.g. read-only after a missed invalidation) reads as a device error.
fn fill(reg: &Registry, q: &CommandQueue, u: &Userptr, b: u8) -> Status {
    let len = u.len();
    let Ok(f) = reg.submit(q, &[u], |i| vec![Descriptor::fill(i[0], len, b)]) else {
        return Status::DeviceError;
    };
    q.wait(f.end, WaitMode::Block, Duration::from_secs(30))
        .unwrap()
        .status
}

fn read(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the caller's mapping is live and readable for `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

/// Map fresh memory into a hole this test just made. MAP_FIXED_NOREPLACE: an
/// allocation another thread placed in the hole meanwhile is never clobbered.
fn map_hole(addr: usize, len: usize, raw: bool) {
    assert!(
        try_map_hole(addr, len, raw),
        "another mapping took the hole at {addr:#x}"
    );
}

/// As `map_hole`, but says whether the hole was still free. Test buffers from `Anon`
/// sit far below the mmap frontier where nothing else lands; a hole malloc left is at
/// the frontier, and another thread may take it.
fn try_map_hole(addr: usize, len: usize, raw: bool) -> bool {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: maps at the test's own former address, refusing to replace anything.
    let p = unsafe {
        if raw {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, -1, 0) as *mut libc::c_void
        } else {
            libc::mmap(addr as *mut _, len, prot, flags, -1, 0)
        }
    };
    if p as usize == addr {
        return true;
    }
    if p != libc::MAP_FAILED {
        // SAFETY: an older kernel treated NOREPLACE as a hint and mapped elsewhere;
        // that mapping is ours alone.
        unsafe { libc::munmap(p, len) };
    }
    false
}

fn mmap_fixed(addr: usize, len: usize) {
    // SAFETY: maps fresh anonymous memory over the test's own range.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, addr);
}

/// Runs one path with the registry told (or not) and returns "caught" or "stale".
struct Ctx<'a> {
    reg: &'a Registry,
    q: &'a CommandQueue,
    explicit: bool,
    uffd: Option<&'a UffdMonitor>,
}

impl Ctx<'_> {
    /// Run `change` on `range`, wrapped in invalidate_start/end if explicit.
    fn change(&self, range: std::ops::Range<usize>, cause: userptr::Cause, change: impl FnOnce()) {
        let inv = self.explicit.then(|| {
            self.reg
                .invalidate_start(range.start as u64..range.end as u64, cause)
                .unwrap()
        });
        change();
        if let Some(inv) = inv {
            self.reg.invalidate_end(inv);
        }
        if let Some(m) = self.uffd {
            // Events are asynchronous: wait until every event delivered so far has
            // been handled (bounded).
            m.sync(Duration::from_secs(2));
        }
    }

    fn visible(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
        mutate: impl FnOnce(&Self, usize) -> usize,
    ) -> &'static str {
        let u_addr = addr;
        let u = match self.reg.register(u_addr, len, perm) {
            Ok(u) => u,
            // Memory whose pages a file operation could take away is not registered at
            // all (driver/src/backing/): no stale pin can arise.
            Err(userptr::Error::ReplaceablePages { .. }) => return "refused",
            Err(e) => panic!("register: {e}"),
        };
        let now = mutate(self, addr);
        if fill(self.reg, self.q, &u, 0xab) != Status::Ok {
            return "error";
        }
        if read(now, len).iter().all(|&b| b == 0xab) {
            "caught"
        } else {
            "stale"
        }
    }
}

fn run_path(ctx: &Ctx<'_>, path: &str) -> &'static str {
    use userptr::Cause;
    match path {
        "munmap" | "raw_syscall_munmap" => {
            let buf = Anon::new(LEN);
            let raw = path.starts_with("raw");
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Unmap, || {
                    // SAFETY: unmapping the test's own buffer, then mapping it again.
                    unsafe {
                        if raw {
                            libc::syscall(libc::SYS_munmap, a, LEN);
                        } else {
                            libc::munmap(a as *mut _, LEN);
                        }
                    }
                    map_hole(a, LEN, raw);
                });
                a
            })
        }
        "free_malloc" => {
            let n = 4 << 20;
            // SAFETY: plain malloc/free of a large (mmapped) block, then malloc again.
            let p = unsafe { libc::malloc(n) } as usize;
            // SAFETY: the block just allocated, n bytes.
            unsafe { std::ptr::write_bytes(p as *mut u8, 1, n) };
            let u = ctx.reg.register(p, n, Perm::READ_WRITE).unwrap();
            let mut again = 0;
            // SAFETY: frees the block, then allocates one of the same size.
            ctx.change(p & !4095..(p + n + 4095) & !4095, Cause::Unmap, || unsafe {
                libc::free(p as *mut _);
                again = libc::malloc(n) as usize;
            });
            if again != p {
                return "n/a";
            }
            // SAFETY: our new block.
            unsafe { std::ptr::write_bytes(again as *mut u8, 2, n) };
            if fill(ctx.reg, ctx.q, &u, 0xab) != Status::Ok {
                return "error";
            }
            let r = if read(again, n).iter().all(|&b| b == 0xab) {
                "caught"
            } else {
                "stale"
            };
            // SAFETY: frees the block this case allocated.
            unsafe { libc::free(again as *mut _) };
            r
        }
        "realloc_move" => {
            let n = 4 << 20;
            // SAFETY: malloc/realloc of large blocks; a hole after p is blocked so the
            // realloc must move.
            let p = unsafe { libc::malloc(n) } as usize;
            // SAFETY: the block just allocated, n bytes.
            unsafe { std::ptr::write_bytes(p as *mut u8, 1, n) };
            let u = ctx.reg.register(p, n, Perm::READ_WRITE).unwrap();
            let mut moved = 0;
            // SAFETY: grows the block this case allocated (it moves).
            ctx.change(p & !4095..(p + n + 4095) & !4095, Cause::Unmap, || unsafe {
                moved = libc::realloc(p as *mut _, 64 << 20) as usize;
            });
            if moved == p {
                // SAFETY: frees the block this case allocated.
                unsafe { libc::free(moved as *mut _) };
                return "n/a";
            }
            // The old address gets new memory (what a later malloc would do).
            let base = p & !4095;
            let len = ((p + n + 4095) & !4095) - base;
            if !try_map_hole(base, len, true) {
                // SAFETY: frees the block this case allocated.
                unsafe { libc::free(moved as *mut _) };
                return HOLE_TAKEN;
            }
            let r = if fill(ctx.reg, ctx.q, &u, 0xab) != Status::Ok {
                "error"
            } else if read(p, n).iter().all(|&b| b == 0xab) {
                "caught"
            } else {
                "stale"
            };
            // SAFETY: unmap the page range we mapped; free the moved block.
            unsafe {
                libc::munmap(base as *mut _, len);
                libc::free(moved as *mut _);
            }
            r
        }
        "raw_syscall_madvise" | "madv_dontneed" | "madv_free" => {
            let buf = Anon::new(LEN);
            let advice = if path == "madv_free" {
                libc::MADV_FREE
            } else {
                libc::MADV_DONTNEED
            };
            let raw = path.starts_with("raw");
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Discard, || unsafe {
                    // SAFETY: advising the test's own buffer.
                    if raw {
                        libc::syscall(libc::SYS_madvise, a, LEN, advice);
                    } else {
                        libc::madvise(a as *mut _, LEN, advice);
                    }
                });
                a
            })
        }
        "madv_remove" => {
            let fd = memfd::MemfdOptions::default().create("matrix").unwrap();
            fd.as_file().set_len(LEN as u64).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: a shared mapping of our memfd.
            let a = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            } as usize;
            // SAFETY: the mapping just made, LEN bytes.
            unsafe { std::ptr::write_bytes(a as *mut u8, 1, LEN) };
            let r = ctx.visible(a, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Discard, || unsafe {
                    // SAFETY: punching a hole in our own shared mapping.
                    libc::madvise(a as *mut _, LEN, libc::MADV_REMOVE);
                });
                a
            });
            // SAFETY: unmaps the mapping this case made.
            unsafe { libc::munmap(a as *mut _, LEN) };
            r
        }
        "mprotect_downgrade" => {
            let buf = Anon::new(LEN);
            let u = ctx.reg.register(buf.addr, LEN, Perm::READ_WRITE).unwrap();
            let a = buf.addr;
            ctx.change(
                a..a + LEN,
                Cause::Protect {
                    new_prot: libc::PROT_READ,
                },
                || buf.mprotect(libc::PROT_READ),
            );
            match fill(ctx.reg, ctx.q, &u, 0xab) {
                Status::DmaFault => "caught",
                Status::Ok => "stale",
                _ => "error",
            }
        }
        "mmap_fixed" => {
            let buf = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Unmap, || mmap_fixed(a, LEN));
                a
            })
        }
        "mremap_move" => {
            let buf = Anon::new(LEN);
            let dest = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(
                    a..a + LEN,
                    Cause::Remap {
                        to: dest.addr as u64,
                    },
                    || unsafe {
                        // SAFETY: moves our buffer onto our other buffer's range.
                        let p = libc::mremap(
                            a as *mut _,
                            LEN,
                            LEN,
                            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                            dest.addr as *mut libc::c_void,
                        );
                        assert_eq!(p as usize, dest.addr);
                    },
                );
                map_hole(a, LEN, false);
                a
            })
        }
        "brk_shrink" => {
            // SAFETY: grows the heap by a page-aligned block, registers it, shrinks the
            // heap back and grows it again (new, zeroed pages at the same address).
            unsafe {
                let cur = libc::sbrk(0) as usize;
                let start = (cur + 4095) & !4095;
                if libc::brk((start + LEN) as *mut _) != 0 {
                    return "n/a";
                }
                std::ptr::write_bytes(start as *mut u8, 1, LEN);
                let r = ctx.visible(start, LEN, Perm::READ_WRITE, |c, a| {
                    c.change(a..a + LEN, Cause::Unmap, || {
                        libc::brk(a as *mut _);
                    });
                    libc::brk((a + LEN) as *mut _);
                    a
                });
                libc::brk(start as *mut _);
                r
            }
        }
        "shmdt" => {
            // SAFETY: a private SysV segment attached, detached and attached again at
            // the same address.
            unsafe {
                let id = libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600);
                if id < 0 {
                    return "n/a";
                }
                let a = libc::shmat(id, std::ptr::null(), 0) as usize;
                std::ptr::write_bytes(a as *mut u8, 1, LEN);
                let id2 = libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600);
                let r = ctx.visible(a, LEN, Perm::READ_WRITE, |c, a| {
                    c.change(a..a + LEN, Cause::Unmap, || {
                        libc::shmdt(a as *const _);
                    });
                    let b = libc::shmat(id2, a as *const _, 0) as usize;
                    assert_eq!(b, a);
                    a
                });
                libc::shmdt(a as *const _);
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                libc::shmctl(id2, libc::IPC_RMID, std::ptr::null_mut());
                r
            }
        }
        "fork" => {
            let buf = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |_c, a| {
                // SAFETY: the child writes its own copy of the buffer and exits.
                unsafe {
                    let pid = libc::fork();
                    if pid == 0 {
                        std::ptr::write_bytes(a as *mut u8, 7, LEN);
                        libc::_exit(0);
                    }
                    let mut st = 0;
                    libc::waitpid(pid, &mut st, 0);
                }
                // The parent writes too (its pages stay the pinned ones).
                buf.fill(3);
                a
            })
        }
        _ => unreachable!(),
    }
}

/// Child body: run every path for the source in `USERPTR_MATRIX_SOURCE`.
#[test]
#[ignore = "child process body of coverage_matrix"]
fn matrix_child() {
    assert!(is_child(), "run through coverage_matrix");
    let source = std::env::var("USERPTR_MATRIX_SOURCE").unwrap();
    // A fixed mmap threshold: glibc otherwise raises it when an mmapped block is
    // freed, and the next large malloc would come from the heap instead.
    // SAFETY: a malloc tuning call before any large allocation of this child.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
    let pins_start = userptr::proc_status::pinned_bytes().unwrap();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let _seccomp = (source == "seccomp")
        .then(|| userptr::driver::monitor::seccomp::SeccompMonitor::install(&reg).unwrap());
    let uffd = (source == "uffd").then(|| UffdMonitor::start(&reg).unwrap());
    let _preload = (source == "preload")
        .then(|| userptr::driver::monitor::preload::PreloadMonitor::install(&reg).unwrap());
    let ctx = Ctx {
        reg: &reg,
        q: &q,
        explicit: source == "explicit",
        uffd: uffd.as_ref(),
    };
    eprintln!("START {source}");
    for path in PATHS {
        eprintln!("PATH {path}");
        let mut r = run_path(&ctx, path);
        for _ in 0..4 {
            if r != HOLE_TAKEN {
                break;
            }
            // Not the monitor's doing: try again from a clean cache.
            eprintln!("RETRY {path}: {r}");
            if let Some(m) = &uffd {
                m.sync(Duration::from_secs(2));
            }
            reg.clear().unwrap();
            r = run_path(&ctx, path);
        }
        println!("\nMATRIX {source} {path} {r}");
        // Each path starts from an empty cache: without a monitor, a region left
        // stale by one path would otherwise be hit by the next path's buffer. With
        // userfaultfd, the events of this path's teardown are handled first, so that
        // none arrives late and hits the next path's buffer at a reused address.
        if let Some(m) = &uffd {
            m.sync(Duration::from_secs(2));
        }
        reg.clear().unwrap();
    }
    // Stopping the monitor releases its hold on the registry: with everything
    // dropped, every pin is gone (a monitor that kept a registry handle would keep
    // the registry's pins, and the queue's ring memory, pinned for good).
    // One region still pinned when everything is dropped.
    let last = Anon::new(LEN);
    let u = reg.register(last.addr, LEN, Perm::READ_WRITE).unwrap();
    assert_eq!(fill(&reg, &q, &u, 0x5a), Status::Ok);
    let pinned = reg.regions().len();
    drop(_seccomp);
    drop(uffd);
    drop(_preload);
    drop(q);
    drop(reg);
    drop(drv);
    let now = userptr::proc_status::pinned_bytes().unwrap();
    assert_eq!(
        now, pins_start,
        "{source}: pins left after the monitor and the registry were dropped ({pinned} regions before)"
    );
}

/// The shim, built next to this test's binary (`cargo build -p userptr-preload`;
/// `test.sh` does it first).
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

#[test]
fn coverage_matrix() {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for source in SOURCES {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "matrix_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(common::CHILD_ENV, "1")
        .env("USERPTR_MATRIX_SOURCE", source);
        if *source == "preload" {
            cmd.env("LD_PRELOAD", preload_so());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "matrix child for {source} failed ({}):\n{text}",
            out.status
        );
        for l in text
            .lines()
            .filter_map(|l| l.split_once("MATRIX ").map(|x| x.1))
        {
            let f: Vec<&str> = l.split_whitespace().collect();
            rows.push((f[0].into(), f[1].into(), f[2].into()));
        }
    }
    let get = |s: &str, p: &str| {
        rows.iter()
            .find(|r| r.0 == s && r.1 == p)
            .map(|r| r.2.as_str())
            .unwrap_or("missing")
    };
    let mut md = String::from("| path |");
    for s in SOURCES {
        md += &format!(" {s} |");
    }
    md += "\n|---|";
    md += &"---|".repeat(SOURCES.len());
    md += "\n";
    for p in PATHS {
        md += &format!("| `{p}` |");
        for s in SOURCES {
            md += &format!(" {} |", get(s, p));
        }
        md += "\n";
    }
    println!("{md}");
    if let Some(path) = std::env::var_os("USERPTR_MATRIX_OUT") {
        std::fs::write(path, &md).unwrap();
    }
    for p in PATHS {
        for s in ["explicit", "seccomp"] {
            let r = get(s, p);
            assert!(
                r == "caught" || r == "n/a" || r == "refused",
                "{s} must catch {p}, got {r}\n{md}"
            );
        }
    }
    for p in HAZARDS {
        assert_eq!(
            get("none", p),
            "stale",
            "{p} must show the hazard without a monitor\n{md}"
        );
    }
}
