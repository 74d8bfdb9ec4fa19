//! Errno fidelity of the seccomp monitor: a trapped call returns exactly what the
//! kernel would (the same return value, the same errno, no crash), for invalid
//! arguments too (bad pointers, bad lengths, bad flags, unaligned addresses, holes).
//!
//! Each row of the table is a call made with raw `libc::syscall` (so that no libc
//! wrapper checks the arguments first), or with `int 0x80` for the i386 rows. In its
//! own child process (a row that kills its process must not hide the others), the
//! row runs once BEFORE `SeccompMonitor::install` and once AFTER, on fresh memory
//! each time, and prints both observations; the parent compares them and reports
//! every row that differs or whose child died, not just the first. A registered
//! range is live in the child, and some rows name it, so that both the handler's
//! fast path (no registered range touched) and its invalidating path are taken.

mod common;
use common::RegisterTest as _;

use common::{int80, int80_works, is_child, map_isolated, Anon};
use std::time::Duration;
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Driver, Perm, Registry, RegistryConfig};

/// What a call did: its return value, its errno (0 if it succeeded), and anything
/// else a row checks (the mask or action the kernel applied before failing).
#[derive(Debug, PartialEq, Eq)]
struct Obs {
    ret: i64,
    errno: i32,
    extra: String,
}

impl std::fmt::Display for Obs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ret={} errno={}", self.ret, self.errno)?;
        if self.errno != 0 {
            write!(f, " ({})", std::io::Error::from_raw_os_error(self.errno))?;
        }
        if !self.extra.is_empty() {
            write!(f, " {}", self.extra)?;
        }
        Ok(())
    }
}

/// The memory a row may name: a registered range, a scratch page of its own, a hole.
struct Env {
    registered: usize,
}

/// A raw system call, its errno read at once.
fn sys(nr: i64, a: [u64; 6]) -> Obs {
    // SAFETY: errno is this thread's; cleared so that a stale value cannot leak in.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: every row passes invalid arguments on purpose, naming only memory it
    // owns (or none): the kernel refuses them without touching anything else.
    let ret = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    let errno = if ret == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    } else {
        0
    };
    Obs {
        ret,
        errno,
        extra: String::new(),
    }
}

/// An i386 call through `int 0x80`, as the same (ret, errno) pair.
fn sys32(nr: u32, a: [u32; 6]) -> Obs {
    // SAFETY: invalid arguments on purpose (see `sys`).
    let r = unsafe { int80(nr, a) };
    Obs {
        ret: if r < 0 { -1 } else { r as i64 },
        errno: if r < 0 { -r } else { 0 },
        extra: String::new(),
    }
}

/// A fresh page of our own, leaked (a child process is short-lived).
fn scratch() -> u64 {
    std::mem::ManuallyDrop::new(Anon::new(4096)).addr as u64
}

/// A hole: a range that was just mapped and unmapped.
fn hole(len: usize) -> u64 {
    let p = map_isolated(len, libc::PROT_READ);
    // SAFETY: unmaps the mapping just made.
    unsafe { libc::munmap(p, len) };
    p as u64
}

/// A hole below 4 GiB, for the i386 rows.
fn low_hole() -> u32 {
    let p = common::map_low(4096);
    // SAFETY: unmaps the mapping just made.
    unsafe { libc::munmap(p as *mut _, 4096) };
    p as u32
}

fn pidfd() -> u64 {
    // SAFETY: a pidfd for this process (leaked with the child).
    unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) as u64 }
}

/// One valid iovec (over a scratch page) at the very end of a page that is followed
/// by an inaccessible page: reading a second iovec faults.
fn iovec_at_page_end() -> u64 {
    let two = std::mem::ManuallyDrop::new(Anon::new(8192));
    // SAFETY: the second page of our own mapping.
    unsafe { libc::mprotect((two.addr + 4096) as *mut _, 4096, libc::PROT_NONE) };
    let at = two.addr + 4096 - std::mem::size_of::<libc::iovec>();
    let v = libc::iovec {
        iov_base: scratch() as *mut _,
        iov_len: 4096,
    };
    // SAFETY: `at` is inside the first (writable) page, aligned for an iovec.
    unsafe { std::ptr::write(at as *mut libc::iovec, v) };
    at as u64
}

/// Whether `sig` is blocked on this thread now.
fn blocked(sig: i32) -> bool {
    let mut cur = 0u64;
    // SAFETY: reads this thread's mask into a local.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            0,
            &mut cur as *mut u64,
            8,
        )
    };
    cur & (1 << (sig - 1)) != 0
}

/// SIGUSR2's handler now, as the kernel reports it.
fn usr2_handler() -> u64 {
    let mut k = [0u64; 4];
    // SAFETY: reads the action into a local of the kernel's layout.
    unsafe { libc::syscall(libc::SYS_rt_sigaction, libc::SIGUSR2, 0, k.as_mut_ptr(), 8) };
    k[0]
}

fn set_usr2_default() {
    let k = [libc::SIG_DFL as u64, 0, 0, 0];
    // SAFETY: restores the default action of SIGUSR2.
    unsafe { libc::syscall(libc::SYS_rt_sigaction, libc::SIGUSR2, k.as_ptr(), 0, 8) };
}

const USR2: u64 = 1 << (libc::SIGUSR2 - 1);

type Row = (&'static str, fn(&Env) -> Obs);

const ROWS: &[Row] = &[
    ("munmap_len_0", |_| {
        sys(libc::SYS_munmap, [scratch(), 0, 0, 0, 0, 0])
    }),
    ("munmap_unaligned", |_| {
        sys(libc::SYS_munmap, [scratch() + 1, 4096, 0, 0, 0, 0])
    }),
    ("munmap_hole", |_| {
        sys(libc::SYS_munmap, [hole(4096), 4096, 0, 0, 0, 0])
    }),
    ("munmap_registered_unaligned", |e| {
        sys(
            libc::SYS_munmap,
            [e.registered as u64 + 1, 4096, 0, 0, 0, 0],
        )
    }),
    ("madvise_unaligned", |_| {
        let a = [scratch() + 1, 4096, libc::MADV_DONTNEED as u64, 0, 0, 0];
        sys(libc::SYS_madvise, a)
    }),
    ("madvise_len_overflow", |_| {
        let a = [
            scratch(),
            u64::MAX - 4095,
            libc::MADV_DONTNEED as u64,
            0,
            0,
            0,
        ];
        sys(libc::SYS_madvise, a)
    }),
    ("madvise_unknown_advice", |_| {
        sys(libc::SYS_madvise, [scratch(), 4096, 9999, 0, 0, 0])
    }),
    ("madvise_unknown_advice_registered", |e| {
        sys(
            libc::SYS_madvise,
            [e.registered as u64, 4096, 9999, 0, 0, 0],
        )
    }),
    ("madvise_hole", |_| {
        let a = [hole(4096), 4096, libc::MADV_NORMAL as u64, 0, 0, 0];
        sys(libc::SYS_madvise, a)
    }),
    ("madvise_dontneed_hole", |_| {
        let a = [hole(4096), 4096, libc::MADV_DONTNEED as u64, 0, 0, 0];
        sys(libc::SYS_madvise, a)
    }),
    ("mprotect_bad_prot", |_| {
        sys(libc::SYS_mprotect, [scratch(), 4096, 0x1000, 0, 0, 0])
    }),
    ("mprotect_bad_prot_registered", |e| {
        sys(
            libc::SYS_mprotect,
            [e.registered as u64, 4096, 0x1000, 0, 0, 0],
        )
    }),
    ("mprotect_hole", |_| {
        let a = [hole(4096), 4096, libc::PROT_READ as u64, 0, 0, 0];
        sys(libc::SYS_mprotect, a)
    }),
    ("mremap_bad_flags", |_| {
        sys(libc::SYS_mremap, [scratch(), 4096, 4096, 0x100, 0, 0])
    }),
    ("mremap_fixed_without_maymove", |_| {
        let a = [
            scratch(),
            4096,
            4096,
            libc::MREMAP_FIXED as u64,
            scratch(),
            0,
        ];
        sys(libc::SYS_mremap, a)
    }),
    ("mremap_old_len_0_private", |_| {
        let a = [scratch(), 0, 4096, libc::MREMAP_MAYMOVE as u64, 0, 0];
        sys(libc::SYS_mremap, a)
    }),
    ("mmap_fixed_unaligned", |_| {
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        sys(
            libc::SYS_mmap,
            [scratch() + 1, 4096, prot, flags, u64::MAX, 0],
        )
    }),
    ("brk_1", |_| {
        // brk(1) fails and returns the current break (which other allocations may
        // have moved between the two runs): compare that, not the address.
        let cur = sys(libc::SYS_brk, [0; 6]).ret;
        let mut o = sys(libc::SYS_brk, [1, 0, 0, 0, 0, 0]);
        o.extra = format!("returned-current-break={}", o.ret == cur);
        o.ret = 0;
        o
    }),
    ("shmdt_bad_addr", |_| {
        sys(libc::SYS_shmdt, [hole(4096), 0, 0, 0, 0, 0])
    }),
    ("shmdt_unaligned", |_| {
        sys(libc::SYS_shmdt, [scratch() + 1, 0, 0, 0, 0, 0])
    }),
    ("shmat_bad_id", |_| {
        sys(libc::SYS_shmat, [u64::MAX, 0, 0, 0, 0, 0])
    }),
    ("pkey_mprotect_bad_pkey", |_| {
        let a = [scratch(), 4096, libc::PROT_READ as u64, 99, 0, 0];
        sys(libc::SYS_pkey_mprotect, a)
    }),
    ("process_madvise_bad_iovec", |_| {
        let a = [pidfd(), hole(4096), 1, libc::MADV_DONTNEED as u64, 0, 0];
        sys(libc::SYS_process_madvise, a)
    }),
    ("process_madvise_vlen_1025", |_| {
        let a = [
            pidfd(),
            iovec_at_page_end(),
            1025,
            libc::MADV_DONTNEED as u64,
            0,
            0,
        ];
        sys(libc::SYS_process_madvise, a)
    }),
    ("process_madvise_bad_pidfd", |_| {
        let a = [
            9999,
            iovec_at_page_end(),
            1,
            libc::MADV_DONTNEED as u64,
            0,
            0,
        ];
        sys(libc::SYS_process_madvise, a)
    }),
    ("process_madvise_flags", |_| {
        let a = [
            pidfd(),
            iovec_at_page_end(),
            1,
            libc::MADV_DONTNEED as u64,
            1,
            0,
        ];
        sys(libc::SYS_process_madvise, a)
    }),
    ("process_madvise_registered_flags", |e| {
        let v = libc::iovec {
            iov_base: e.registered as *mut _,
            iov_len: 4096,
        };
        let a = [
            pidfd(),
            &v as *const _ as u64,
            1,
            libc::MADV_DONTNEED as u64,
            1,
            0,
        ];
        sys(libc::SYS_process_madvise, a)
    }),
    ("rt_sigprocmask_bad_set", |_| {
        let a = [libc::SIG_BLOCK as u64, hole(4096), 0, 8, 0, 0];
        sys(libc::SYS_rt_sigprocmask, a)
    }),
    ("rt_sigprocmask_bad_oldset", |_| {
        // The kernel applies the new mask, then fails to write the old one.
        let set = USR2;
        let a = [
            libc::SIG_BLOCK as u64,
            &set as *const u64 as u64,
            hole(4096),
            8,
            0,
            0,
        ];
        let mut o = sys(libc::SYS_rt_sigprocmask, a);
        o.extra = format!("SIGUSR2-blocked-after={}", blocked(libc::SIGUSR2));
        let un = [
            libc::SIG_UNBLOCK as u64,
            &set as *const u64 as u64,
            0,
            8,
            0,
            0,
        ];
        sys(libc::SYS_rt_sigprocmask, un);
        o
    }),
    ("rt_sigprocmask_sigsetsize_7", |_| {
        let set = USR2;
        let a = [
            libc::SIG_BLOCK as u64,
            &set as *const u64 as u64,
            0,
            7,
            0,
            0,
        ];
        sys(libc::SYS_rt_sigprocmask, a)
    }),
    ("rt_sigprocmask_bad_how", |_| {
        let set = USR2;
        let a = [99, &set as *const u64 as u64, 0, 8, 0, 0];
        sys(libc::SYS_rt_sigprocmask, a)
    }),
    ("rt_sigaction_bad_act", |_| {
        let a = [libc::SIGUSR2 as u64, hole(4096), 0, 8, 0, 0];
        sys(libc::SYS_rt_sigaction, a)
    }),
    ("rt_sigaction_bad_oldact", |_| {
        // The kernel installs the new action, then fails to write the old one.
        let k = [libc::SIG_IGN as u64, 0, 0, 0];
        let a = [libc::SIGUSR2 as u64, k.as_ptr() as u64, hole(4096), 8, 0, 0];
        let mut o = sys(libc::SYS_rt_sigaction, a);
        o.extra = format!(
            "SIGUSR2-ignored-after={}",
            usr2_handler() == libc::SIG_IGN as u64
        );
        set_usr2_default();
        o
    }),
    ("rt_sigaction_sigkill", |_| {
        let k = [libc::SIG_IGN as u64, 0, 0, 0];
        sys(
            libc::SYS_rt_sigaction,
            [libc::SIGKILL as u64, k.as_ptr() as u64, 0, 8, 0, 0],
        )
    }),
    ("rt_sigaction_sigsetsize_7", |_| {
        let k = [libc::SIG_IGN as u64, 0, 0, 0];
        let a = [libc::SIGUSR2 as u64, k.as_ptr() as u64, 0, 7, 0, 0];
        let o = sys(libc::SYS_rt_sigaction, a);
        set_usr2_default();
        o
    }),
    ("rt_sigaction_sigsys_bad_act", |_| {
        let a = [libc::SIGSYS as u64, hole(4096), 0, 8, 0, 0];
        sys(libc::SYS_rt_sigaction, a)
    }),
    ("int80_munmap_unaligned", |_| {
        let a = common::map_low(4096) as u32;
        sys32(91, [a + 1, 4096, 0, 0, 0, 0])
    }),
    ("int80_madvise_unknown_advice", |_| {
        let a = common::map_low(4096) as u32;
        sys32(219, [a, 4096, 9999, 0, 0, 0])
    }),
    ("int80_madvise_hole", |_| {
        sys32(219, [low_hole(), 4096, libc::MADV_DONTNEED as u32, 0, 0, 0])
    }),
    ("int80_mprotect_hole", |_| {
        sys32(125, [low_hole(), 4096, libc::PROT_READ as u32, 0, 0, 0])
    }),
    ("io_uring_setup_entries_0", |_| {
        let mut params = [0u8; 120];
        sys(
            libc::SYS_io_uring_setup,
            [0, params.as_mut_ptr() as u64, 0, 0, 0, 0],
        )
    }),
];

#[test]
fn trapped_calls_fail_exactly_as_the_kernel_fails_them() {
    let jobs = ROWS
        .iter()
        .map(|(name, _)| {
            let mut cmd = common::child_command("errno_child");
            cmd.env("USERPTR_ERRNO_ROW", name);
            (*name, cmd)
        })
        .collect();
    let runs = common::run_all(jobs, 2, Duration::from_secs(20));
    let mut table = String::new();
    let mut failures = Vec::new();
    for (name, run) in &runs {
        let line = run
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ERRNO {name} ")))
            .map(str::to_string);
        let verdict = match (&line, run.success()) {
            (Some(l), true) if l.starts_with("same") => "same".to_string(),
            (Some(l), true) => {
                failures.push(format!("{name}: {l}"));
                "DIFFERS".into()
            }
            _ => {
                let kernel = run
                    .stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("BEFORE {name} ")))
                    .unwrap_or("not reached");
                failures.push(format!(
                    "{name}: after install, the child: {} (the kernel before install: \
                     {kernel})",
                    common::failure_summary(run)
                ));
                run.describe()
            }
        };
        table += &format!("{name:40} {verdict}  {}\n", line.unwrap_or_default());
    }
    println!("{table}");
    assert!(
        failures.is_empty(),
        "{} of {} rows differ from the kernel or killed their process:\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "child process body of trapped_calls_fail_exactly_as_the_kernel_fails_them"]
fn errno_child() {
    assert!(is_child());
    let name = std::env::var("USERPTR_ERRNO_ROW").unwrap();
    let (_, row) = ROWS.iter().find(|r| r.0 == name).expect("a known row");
    if name.starts_with("int80") && !int80_works() {
        println!("\nERRNO {name} same (n/a: int 0x80 does not work here)");
        return;
    }
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Anon::new(64 << 10);
    let _u = reg
        .register_test(buf.addr, buf.len, Perm::READ_WRITE)
        .unwrap();
    let env = Env {
        registered: buf.addr,
    };
    let before = row(&env);
    // Printed now: if the row kills the process, the report still says what the
    // kernel answered.
    println!("\nBEFORE {name} {before}");
    let _m = SeccompMonitor::install(&reg).unwrap();
    let after = row(&env);
    // Still alive, and the monitor still works: one more trapped call.
    let alive = sys(libc::SYS_munmap, [scratch(), 4096, 0, 0, 0, 0]);
    assert_eq!(alive.ret, 0, "a valid munmap after the row: {alive}");
    if before == after {
        println!("\nERRNO {name} same: {before}");
    } else {
        println!("\nERRNO {name} before install: {before}; after: {after}");
    }
}
