//! intercept: the added cost of each monitor source per intercepted call, next to the
//! raw call in the same run. The seccomp filter cannot be removed once installed, so
//! the measurements run in a child process (`userptr intercept-child`), which prints
//! them as JSON lines; the parent measures the unmonitored baselines it needs.

use super::measure::{interleaved, repeat, time_us, Mem, Sample};
use super::{Ctx, Measurement};
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Driver, Perm, Registry, RegistryConfig};

fn getppid_us(n: usize) -> f64 {
    time_us(|| {
        for _ in 0..n {
            // SAFETY: getppid has no arguments and no side effects.
            std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
        }
    }) / n as f64
}

fn getpid_us(n: usize) -> f64 {
    time_us(|| {
        for _ in 0..n {
            // SAFETY: a plain syscall without arguments.
            std::hint::black_box(unsafe { libc::getpid() });
        }
    }) / n as f64
}

/// The LD_PRELOAD shim, if it was built next to this binary (or in the other profile).
fn preload_so() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    ["", "../debug", "../release"]
        .iter()
        .map(|sub| dir.join(sub).join("libuserptr_preload.so"))
        .find(|p| p.exists())
}

pub fn run(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    let mut res = child_results(ctx, None)?;
    res.extend(child_results_of(ctx, "floor", None)?);
    match preload_so() {
        Some(so) => res.extend(child_results(ctx, Some(&so))?),
        None => {
            for n in ["preload_unregistered_madvise", "preload_registered_madvise"] {
                ctx.skip(
                    "intercept",
                    n,
                    "the LD_PRELOAD shim is not built next to this binary \
                     (cargo build --release -p userptr-preload)"
                        .into(),
                );
            }
        }
    }
    Ok(res)
}

fn read_us(n: usize) -> f64 {
    let f = std::fs::File::open("/dev/zero").expect("/dev/zero");
    let mut b = [0u8; 1];
    time_us(|| {
        for _ in 0..n {
            std::hint::black_box(std::io::Read::read(&mut &f, &mut b).ok());
        }
    }) / n as f64
}

fn child_results(ctx: &Ctx, preload: Option<&std::path::Path>) -> Result<Vec<Measurement>, String> {
    match preload {
        Some(so) => child_results_of(ctx, "preload", Some(so)),
        None => child_results_of(ctx, "seccomp", None),
    }
}

/// Run the intercept child for `source` (seccomp and uffd, preload, or the trap floor).
fn child_results_of(
    ctx: &Ctx,
    source: &str,
    preload: Option<&std::path::Path>,
) -> Result<Vec<Measurement>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["intercept-child", &ctx.samples.to_string()])
        .env("USERPTR_INTERCEPT_SOURCE", source);
    if let Some(so) = preload {
        cmd.env("LD_PRELOAD", so);
    }
    // Read its lines as they come: one progress step per figure.
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running the intercept child: {e}"))?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        })
    });
    let mut res = Vec::new();
    let stdout = child
        .stdout
        .take()
        .ok_or("the intercept child has no stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        crate::progress::tick(1);
        if let Some(name) = v["skip"].as_str() {
            ctx.skip(
                "intercept",
                name,
                v["reason"].as_str().unwrap_or("?").to_string(),
            );
            continue;
        }
        let vals = |k: &str| Sample {
            values: v[k]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default(),
        };
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let mut m = Measurement::new("intercept", name.clone(), "us", vals("ours"));
        if let Some(b) = v["baseline"].as_str() {
            m = m.with_baseline(b, vals("base"));
        }
        res.push(m);
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the intercept child: {e}"))?;
    let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        return Err(format!("the intercept child failed ({status}): {err}"));
    }
    Ok(res)
}

/// Tell the parent a figure cannot be measured here, and why.
fn emit_skip(name: &str, reason: &str) {
    println!("{}", serde_json::json!({ "skip": name, "reason": reason }));
}

/// Print one measurement as a JSON line for the parent.
fn emit(name: &str, ours: &Sample, base: Option<(&str, &Sample)>) {
    let mut v = serde_json::json!({ "name": name, "ours": ours.values });
    if let Some((b, s)) = base {
        v["baseline"] = serde_json::json!(b);
        v["base"] = serde_json::json!(s.values);
    }
    println!("{v}");
}

/// With a monitor of `source` active on `reg`: `madvise(DONTNEED)` through libc on an
/// unregistered page (the interception and its pre-check only) and on a registered,
/// idle page (plus the invalidation), each interleaved with the raw call through the
/// driver's trampoline, which no monitor sees.
fn madvise_costs(source: &str, reg: &Registry, samples: usize) -> Result<(), String> {
    let (page, far, anchor) = (Mem::new(4096)?, Mem::new(4096)?, Mem::new(4096)?);
    // A registered page somewhere, so the fast pre-check has bounds to test against.
    // SAFETY: the bench's own page, which no command references (nothing is
    // submitted); it outlives the registration.
    let _anchor = unsafe { reg.register(anchor.addr, 4096, Perm::READ_WRITE) }
        .map_err(|e| crate::explain(&e))?;
    let madv = |m: &Mem| {
        // SAFETY: discarding our own page, through libc (and so through the monitor).
        unsafe { libc::madvise(m.addr as *mut _, 4096, libc::MADV_DONTNEED) };
    };
    let raw = |m: &Mem| {
        // SAFETY: discarding our own page, through the driver's syscall site.
        unsafe { userptr::driver::trampoline::madvise(m.addr, 4096, libc::MADV_DONTNEED) };
    };
    let (ours, base) = interleaved(
        samples,
        3,
        || time_us(|| (0..100).for_each(|_| madv(&far))) / 100.0,
        || time_us(|| (0..100).for_each(|_| raw(&far))) / 100.0,
    );
    emit(
        &format!("{source}_unregistered_madvise"),
        &ours,
        Some(("raw_madvise", &base)),
    );
    let (ours, base) = interleaved(
        samples,
        3,
        || {
            // SAFETY: the bench's own page, never referenced by a command; its
            // discard goes through the monitor, which invalidates it first.
            let _ = unsafe { reg.register(page.addr, 4096, Perm::READ_WRITE) };
            time_us(|| madv(&page))
        },
        || time_us(|| raw(&page)),
    );
    emit(
        &format!("{source}_registered_madvise"),
        &ours,
        Some(("raw_madvise", &base)),
    );
    Ok(())
}

/// Time `ours` against `raw`, interleaved, and emit the pair.
fn pair(name: &str, base: &str, samples: usize, ours: impl FnMut(), raw: impl FnMut()) {
    let (mut ours, mut raw) = (ours, raw);
    let (o, b) = interleaved(
        samples,
        3,
        || time_us(|| (0..100).for_each(|_| ours())) / 100.0,
        || time_us(|| (0..100).for_each(|_| raw())) / 100.0,
    );
    emit(name, &o, Some((base, &b)));
}

/// The entry points the seccomp monitor traps beyond madvise, each on memory no
/// registration covers (the cost of the trap and the decoding), against the same call
/// through the driver's own syscall site, which the filter lets through.
fn entry_point_costs(samples: usize) -> Result<(), String> {
    use userptr::driver::trampoline::{syscall, syscall_i386};
    // Below 4 GiB: far from every registered range (the registry's pre-check bounds), so
    // these are the unregistered costs, and reachable by the i386 call.
    let low = Mem::new_32bit(4096)?;
    let page = &low;
    let a = page.addr as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    // SAFETY (every closure below): the calls change only our own scratch pages, in ways
    // that leave them as they were (same protection, a discard of an unused page).
    let pkey = [a, 4096, rw, u64::MAX, 0, 0];
    pair(
        "seccomp_unregistered_pkey_mprotect",
        "raw_pkey_mprotect",
        samples,
        // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
        || unsafe {
            libc::syscall(libc::SYS_pkey_mprotect, a, 4096, rw, -1i64);
        },
        // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
        || unsafe {
            syscall(libc::SYS_pkey_mprotect, pkey);
        },
    );
    let dontneed = libc::MADV_DONTNEED as u64;
    let l = low.addr as u64;
    pair(
        "seccomp_unregistered_int80_madvise",
        "raw_int80_madvise",
        samples,
        || {
            let r: i64;
            // SAFETY: i386 madvise(DONTNEED) of our own page below 4 GiB; rbx is saved
            // around the call (LLVM reserves it).
            unsafe {
                std::arch::asm!(
                    "xchg rbx, {b}",
                    "int 0x80",
                    "xchg rbx, {b}",
                    b = inout(reg) l => _,
                    inlateout("rax") 219i64 => r,
                    in("rcx") 4096u64,
                    in("rdx") dontneed,
                );
            }
            std::hint::black_box(r);
        },
        // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
        || unsafe {
            syscall_i386(219, [l, 4096, dontneed, 0, 0, 0]);
        },
    );
    let iov = [libc::iovec {
        iov_base: page.addr as *mut _,
        iov_len: 4096,
    }];
    // SAFETY: a pidfd for ourselves.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if pidfd >= 0 {
        let args = [pidfd as u64, iov.as_ptr() as u64, 1, dontneed, 0, 0];
        pair(
            "seccomp_unregistered_process_madvise",
            "raw_process_madvise",
            samples,
            // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
            || unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd,
                    iov.as_ptr(),
                    1,
                    dontneed,
                    0,
                );
            },
            // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
            || unsafe {
                syscall(libc::SYS_process_madvise, args);
            },
        );
    }
    let mut old = 0u64;
    let oldp = &mut old as *mut u64 as u64;
    pair(
        "seccomp_rt_sigprocmask",
        "raw_rt_sigprocmask",
        samples,
        // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
        || unsafe {
            libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_BLOCK, 0usize, oldp, 8);
        },
        // SAFETY: see entry_point_costs: our own scratch pages, left as they were.
        || unsafe {
            syscall(
                libc::SYS_rt_sigprocmask,
                [libc::SIG_BLOCK as u64, 0, oldp, 8, 0, 0],
            );
        },
    );
    Ok(())
}

/// A signal sent to this thread and handled by an empty handler: delivery and
/// `rt_sigreturn` (which the monitor traps, to keep SIGSYS out of the frame's mask).
fn signal_roundtrip_us(n: usize) -> f64 {
    extern "C" fn empty(_: libc::c_int) {}
    // SAFETY: an empty handler for SIGUSR2, installed once per call (idempotent), and
    // tgkill to this thread: no other effect.
    unsafe {
        libc::signal(libc::SIGUSR2, empty as *const () as libc::sighandler_t);
        let (pid, tid) = (libc::getpid(), libc::syscall(libc::SYS_gettid));
        time_us(|| {
            for _ in 0..n {
                libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2);
            }
        }) / n as f64
    }
}

/// The child: installs a monitor and measures.
pub fn child(samples: usize) -> Result<(), String> {
    let drv = Driver::reference().map_err(|e| crate::explain(&e))?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    if std::env::var("USERPTR_INTERCEPT_SOURCE").as_deref() == Ok("floor") {
        // The cost of any seccomp trap: an empty SIGSYS handler, in a process of its
        // own (the filter stays, and it takes SIGSYS).
        let plain = repeat(samples, 3, || getppid_us(100));
        userptr::driver::monitor::seccomp::install_trap_floor().map_err(|e| crate::explain(&e))?;
        let trapped = repeat(samples, 3, || getppid_us(100));
        emit(
            "seccomp_trap_floor",
            &trapped,
            Some(("getppid_before_filter", &plain)),
        );
        return Ok(());
    }
    if std::env::var("USERPTR_INTERCEPT_SOURCE").as_deref() == Ok("preload") {
        // Started with LD_PRELOAD: the shim's added cost.
        let _m = userptr::driver::monitor::preload::PreloadMonitor::install(&reg)
            .map_err(|e| crate::explain(&e))?;
        return madvise_costs("preload", &reg, samples);
    }
    // userfaultfd first: once the seccomp filter is in, madvise would pay its trap too.
    let (mut uffd_on, mut uffd_raw) = (Vec::new(), Vec::new());
    let mut uffd_err = None;
    for _ in 0..samples.min(10) {
        match userptr::driver::monitor::uffd::measure_madvise(50) {
            Ok((on, raw)) => {
                uffd_on.push(on);
                uffd_raw.push(raw);
            }
            Err(e) => {
                uffd_err = Some(e.to_string());
                break;
            }
        }
    }
    match uffd_err {
        // userfaultfd refused (vm.unprivileged_userfaultfd, a container's seccomp
        // profile): the seccomp figures can still be taken.
        Some(e) => emit_skip("uffd_registered_madvise", &e),
        None => emit(
            "uffd_registered_madvise",
            &Sample { values: uffd_on },
            Some(("raw_madvise", &Sample { values: uffd_raw })),
        ),
    }
    // The unrelated-syscall baselines, in this same process before the filter exists.
    let getpid_before = repeat(samples, 3, || getpid_us(1000));
    let read_before = repeat(samples, 3, || read_us(1000));
    let signal_before = repeat(samples, 3, || signal_roundtrip_us(100));
    let monitor = SeccompMonitor::install(&reg).map_err(|e| crate::explain(&e))?;
    madvise_costs("seccomp", &reg, samples)?;
    entry_point_costs(samples)?;
    let on = repeat(samples, 3, || signal_roundtrip_us(100));
    emit(
        "seccomp_signal_roundtrip",
        &on,
        Some(("signal_roundtrip_before_install", &signal_before)),
    );
    let on = repeat(samples, 3, || getpid_us(1000));
    emit(
        "seccomp_getpid",
        &on,
        Some(("getpid_before_install", &getpid_before)),
    );
    let on = repeat(samples, 3, || read_us(1000));
    emit(
        "seccomp_read",
        &on,
        Some(("read_before_install", &read_before)),
    );
    drop(monitor);
    Ok(())
}
