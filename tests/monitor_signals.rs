//! The seccomp monitor and signals: a signal whose handler discards a registered
//! range, delivered at random points of a register/submit/invalidate loop (zero stale
//! pins, and a negative control without the monitor that must see stale pins); and
//! every way a process can have SIGSYS blocked when it makes a trapped call (none may
//! kill it); installing late (after DMA), a failed install, and ASLR off. Each case
//! runs in a child process of its own (a seccomp filter cannot be removed); a child
//! killed by a signal is a failure that names the signal.

mod common;
use common::RegisterTest as _;

use common::{is_child, Anon};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Cause, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, WaitMode};

/// How long one child may take (the longest, the timing loop, stops itself at 8 s).
const LIMIT: Duration = Duration::from_secs(30);

/// Run the child test `name` with `env` set, bounded; panics naming the signal that
/// killed it, or with its output if it failed. Returns its output.
fn child(name: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = common::child_command(name);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run = common::run_bounded(cmd, LIMIT);
    let text = run.text();
    assert!(
        run.success(),
        "child {name} {env:?}: {}",
        common::failure_summary(&run)
    );
    assert!(
        text.contains("1 passed"),
        "child {name} did not run:\n{text}"
    );
    text
}

fn setup() -> (Driver, Registry) {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    (drv, reg)
}

fn set_mask(how: i32, set: &libc::sigset_t) -> libc::sigset_t {
    // SAFETY: changes this thread's mask; both sets are valid.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        assert_eq!(libc::pthread_sigmask(how, set, &mut old), 0);
        old
    }
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: fills a local set.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for &g in sigs {
            libc::sigaddset(&mut s, g);
        }
        s
    }
}

fn all_signals() -> libc::sigset_t {
    // SAFETY: fills a local set.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut s);
        s
    }
}

/// Install `handler` (SA_SIGINFO) for `sig` with `mask` blocked while it runs.
fn on_signal(
    sig: i32,
    handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void),
    mask: libc::sigset_t,
    flags: i32,
) {
    // SAFETY: installs a handler in this child process only.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_mask = mask;
        sa.sa_flags = libc::SA_SIGINFO | flags;
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

/// FILL `buf` through the registry and say whether the process sees it.
fn device_write_visible(reg: &Registry, q: &userptr::CommandQueue, buf: &Anon, b: u8) -> bool {
    let u = reg
        .register_test(buf.addr, buf.len, Perm::READ_WRITE)
        .unwrap();
    let f = reg
        .submit(q, &[&u], |i| {
            vec![Descriptor::fill(i[0], buf.len as u64, b)]
        })
        .unwrap();
    let c = q
        .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
        .unwrap();
    assert_eq!(c.status, Status::Ok);
    buf.read().iter().all(|&x| x == b)
}

// --- The signal-timing test -------------------------------------------------------

const TIMING_LEN: usize = 64 << 10;
static TIMING_BUF: AtomicUsize = AtomicUsize::new(0);
/// Bumped by the handler after each discard.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Set when the timer is armed, cleared by the handler.
static ARMED: AtomicBool = AtomicBool::new(false);

extern "C" fn discard_on_alarm(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SeqCst: the main loop reads the generation around its own reads of the buffer.
    let a = TIMING_BUF.load(Ordering::SeqCst);
    // SAFETY: discards the test's own buffer; madvise is async-signal-safe.
    unsafe { libc::madvise(a as *mut _, TIMING_LEN, libc::MADV_DONTNEED) };
    GENERATION.fetch_add(1, Ordering::SeqCst);
    ARMED.store(false, Ordering::SeqCst);
}

#[test]
fn a_discard_from_a_signal_at_random_points_never_leaves_a_stale_pin() {
    let control = child("timing_child", &[("USERPTR_TIMING_MONITOR", "none")]);
    let monitored = child("timing_child", &[("USERPTR_TIMING_MONITOR", "seccomp")]);
    let parse = |text: &str, key: &str| -> u64 {
        let line = text
            .lines()
            .find_map(|l| l.split_once("TIMING ").map(|x| x.1))
            .unwrap_or_else(|| panic!("no TIMING line:\n{text}"));
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            .unwrap()
            .parse()
            .unwrap()
    };
    println!(
        "control: {}",
        control.lines().find(|l| l.contains("TIMING")).unwrap()
    );
    println!(
        "seccomp: {}",
        monitored.lines().find(|l| l.contains("TIMING")).unwrap()
    );
    // The checker can fail: without a monitor, the handler's discard is told to
    // nobody and the device writes stale pages.
    assert!(
        parse(&control, "stale") > 0,
        "the negative control saw no stale pin: the check cannot fail\n{control}"
    );
    assert!(
        parse(&monitored, "signals") > 0,
        "no signal landed\n{monitored}"
    );
    assert_eq!(
        parse(&monitored, "stale"),
        0,
        "stale pins with the seccomp monitor installed\n{monitored}"
    );
}

/// A small xorshift generator (the delays need no quality, only spread).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
#[ignore = "child process body of a_discard_from_a_signal_at_random_points_never_leaves_a_stale_pin"]
fn timing_child() {
    assert!(is_child());
    let monitored = std::env::var("USERPTR_TIMING_MONITOR").unwrap() == "seccomp";
    let (drv, reg) = setup();
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(TIMING_LEN);
    let other = Anon::new(TIMING_LEN);
    TIMING_BUF.store(buf.addr, Ordering::SeqCst);
    // SA_RESTART: the loop is about stale pins, not about EINTR.
    on_signal(
        libc::SIGALRM,
        discard_on_alarm,
        sigset(&[]),
        libc::SA_RESTART,
    );
    let _m = monitored.then(|| SeccompMonitor::install(&reg).unwrap());
    // A one-shot timer aimed at this thread (the harness's main thread would take a
    // process-directed SIGALRM).
    // SAFETY: creates a timer for this thread; `timer` receives its id.
    let timer = unsafe {
        let mut ev: libc::sigevent = std::mem::zeroed();
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = libc::SIGALRM;
        ev.sigev_notify_thread_id = libc::gettid();
        let mut timer: libc::timer_t = std::ptr::null_mut();
        assert_eq!(
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer),
            0
        );
        timer
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    let alarm = sigset(&[libc::SIGALRM]);
    let (mut rounds, mut stale, mut first_stale) = (0u64, 0u64, None);
    let deadline = Instant::now() + Duration::from_secs(8);
    while rounds < 10_000 && Instant::now() < deadline {
        if !ARMED.swap(true, Ordering::SeqCst) {
            let us = 20 + rng.next() % 481;
            let t = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: (us * 1000) as i64,
                },
            };
            // SAFETY: arms our own timer.
            let r = unsafe { libc::timer_settime(timer, 0, &t, std::ptr::null_mut()) };
            assert_eq!(r, 0);
        }
        let b = (rounds % 250) as u8 + 1;
        let gen0 = GENERATION.load(Ordering::SeqCst);
        let u = reg
            .register_test(buf.addr, buf.len, Perm::READ_WRITE)
            .unwrap();
        let f = reg
            .submit(&q, &[&u], |i| {
                vec![Descriptor::fill(i[0], TIMING_LEN as u64, b)]
            })
            .unwrap();
        let c = q
            .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
            .unwrap();
        assert_eq!(c.status, Status::Ok, "round {rounds}");
        // Look with the signal held off: a discard between the submit and this read
        // (the generation moved) may legitimately have zeroed the buffer.
        let old = set_mask(libc::SIG_BLOCK, &alarm);
        let gen1 = GENERATION.load(Ordering::SeqCst);
        let ok = buf.read().iter().all(|&x| x == b);
        set_mask(libc::SIG_SETMASK, &old);
        if gen0 == gen1 && !ok {
            stale += 1;
            first_stale.get_or_insert(rounds);
        }
        // Invalidation code too: an explicit invalidation of a disjoint range that
        // is registered (so it has work to do).
        reg.register_test(other.addr, other.len, Perm::READ_WRITE)
            .unwrap();
        let r = other.addr as u64..(other.addr + other.len) as u64;
        reg.invalidate(r, Cause::Unmap).unwrap();
        rounds += 1;
    }
    // SAFETY: deletes our own timer; a signal still pending is handled harmlessly.
    unsafe { libc::timer_delete(timer) };
    println!(
        "\nTIMING rounds={rounds} signals={} stale={stale} first_stale={first_stale:?}",
        GENERATION.load(Ordering::SeqCst)
    );
}

// --- SIGSYS blocked, by every means ----------------------------------------------

/// A page a handler unmaps (a trapped call), and what its munmap returned.
static SCRATCH: AtomicUsize = AtomicUsize::new(0);
static HANDLER_RESULT: AtomicI64 = AtomicI64::new(i64::MIN);

fn scratch_page() -> usize {
    std::mem::ManuallyDrop::new(Anon::new(4096)).addr
}

/// A trapped call: munmap of a page of our own. Returns the raw result.
fn trapped_call() -> i64 {
    // SAFETY: unmaps a fresh page of our own.
    unsafe { libc::syscall(libc::SYS_munmap, scratch_page(), 4096) }
}

extern "C" fn unmap_scratch(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let a = SCRATCH.load(Ordering::SeqCst);
    // SAFETY: unmaps the page the test set aside for this handler.
    let r = unsafe { libc::syscall(libc::SYS_munmap, a, 4096) };
    HANDLER_RESULT.store(r, Ordering::SeqCst);
}

extern "C" fn block_sigsys_on_return(_: i32, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted context; its saved mask is what
    // rt_sigreturn installs.
    unsafe {
        libc::sigaddset(
            &mut (*(uc as *mut libc::ucontext_t)).uc_sigmask,
            libc::SIGSYS,
        )
    };
    HANDLER_RESULT.store(0, Ordering::SeqCst);
}

/// Run the child test `name` once per case (`env_key` = the case), two at a time,
/// and report every case that failed or was killed, naming the signal.
fn cases(name: &str, env_key: &str, cases: &[&str], ok: &str) {
    let jobs = cases
        .iter()
        .map(|c| {
            let mut cmd = common::child_command(name);
            cmd.env(env_key, c);
            (*c, cmd)
        })
        .collect();
    let failures: Vec<String> = common::run_all(jobs, 2, LIMIT)
        .into_iter()
        .filter(|(c, run)| !(run.success() && run.stdout.contains(&format!("{ok}: {c}"))))
        .map(|(c, run)| format!("{c}: {}", common::failure_summary(&run)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn sigsys_blocked_by_every_means_never_kills() {
    cases(
        "sigsys_child",
        "USERPTR_SIGSYS_CASE",
        &[
            "pthread_sigmask",
            "sigprocmask",
            "raw_rt_sigprocmask",
            "handler_sa_mask_all",
            "handler_returns_with_sigsys_in_uc_sigmask",
            "sigsuspend",
            "ppoll",
            "pselect6",
            "epoll_pwait",
        ],
        "sigsys ok",
    );
}

#[test]
#[ignore = "child process body of sigsys_blocked_by_every_means_never_kills"]
fn sigsys_child() {
    assert!(is_child());
    let case = std::env::var("USERPTR_SIGSYS_CASE").unwrap();
    let (drv, reg) = setup();
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(64 << 10);
    // Installed before the device runs anything (installing later is
    // `install_after_the_device_did_dma`'s case).
    let _m = SeccompMonitor::install(&reg).unwrap();
    assert!(device_write_visible(&reg, &q, &buf, 1));
    SCRATCH.store(scratch_page(), Ordering::SeqCst);
    let usr1 = sigset(&[libc::SIGUSR1]);
    // Everything but SIGUSR1: a wait's mask with SIGSYS in it.
    // SAFETY: edits a local set.
    let all_but_usr1 = unsafe {
        let mut s = all_signals();
        libc::sigdelset(&mut s, libc::SIGUSR1);
        s
    };
    match case.as_str() {
        "pthread_sigmask" | "sigprocmask" | "raw_rt_sigprocmask" => {
            let all = all_signals();
            // SAFETY: sets this thread's mask (the process has one thread of ours).
            let old = unsafe {
                let mut old: libc::sigset_t = std::mem::zeroed();
                match case.as_str() {
                    "pthread_sigmask" => {
                        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
                    }
                    "sigprocmask" => {
                        libc::sigprocmask(libc::SIG_SETMASK, &all, &mut old);
                    }
                    _ => {
                        let every = u64::MAX;
                        libc::syscall(
                            libc::SYS_rt_sigprocmask,
                            libc::SIG_SETMASK,
                            &every as *const u64,
                            &mut old as *mut libc::sigset_t,
                            8,
                        );
                    }
                }
                old
            };
            assert_eq!(
                trapped_call(),
                0,
                "a trapped call with every signal blocked"
            );
            // A discard of a registered range, with every signal blocked, is still
            // monitored.
            buf.madvise(libc::MADV_DONTNEED);
            set_mask(libc::SIG_SETMASK, &old);
            assert!(
                device_write_visible(&reg, &q, &buf, 2),
                "a discard made with every signal blocked was not seen"
            );
        }
        "handler_sa_mask_all" => {
            on_signal(libc::SIGUSR1, unmap_scratch, all_signals(), 0);
            // SAFETY: raises a signal whose handler is installed.
            unsafe { libc::raise(libc::SIGUSR1) };
            assert_eq!(HANDLER_RESULT.load(Ordering::SeqCst), 0);
        }
        "handler_returns_with_sigsys_in_uc_sigmask" => {
            on_signal(libc::SIGUSR1, block_sigsys_on_return, sigset(&[]), 0);
            // SAFETY: raises a signal whose handler is installed.
            unsafe { libc::raise(libc::SIGUSR1) };
            assert_eq!(HANDLER_RESULT.load(Ordering::SeqCst), 0);
            assert_eq!(
                trapped_call(),
                0,
                "a trapped call after the handler returned"
            );
        }
        wait => {
            on_signal(libc::SIGUSR1, unmap_scratch, sigset(&[]), 0);
            // SIGUSR1 pending, then a wait whose mask lets only SIGUSR1 in: the
            // handler runs with that mask (SIGSYS included).
            let old = set_mask(libc::SIG_BLOCK, &usr1);
            // SAFETY: raises a signal whose handler is installed (blocked for now).
            unsafe { libc::raise(libc::SIGUSR1) };
            let ts = libc::timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            // SAFETY: each wait gets valid arguments and returns on the signal.
            let r = unsafe {
                match wait {
                    "sigsuspend" => libc::sigsuspend(&all_but_usr1) as i64,
                    "ppoll" => libc::syscall(
                        libc::SYS_ppoll,
                        0usize,
                        0usize,
                        &ts as *const libc::timespec,
                        &all_but_usr1 as *const libc::sigset_t,
                        8,
                    ),
                    "pselect6" => {
                        let arg: [usize; 2] = [&all_but_usr1 as *const _ as usize, 8];
                        libc::syscall(
                            libc::SYS_pselect6,
                            0,
                            0usize,
                            0usize,
                            0usize,
                            &ts as *const libc::timespec,
                            arg.as_ptr(),
                        )
                    }
                    "epoll_pwait" => {
                        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                        assert!(ep >= 0);
                        let mut ev: libc::epoll_event = std::mem::zeroed();
                        libc::syscall(
                            libc::SYS_epoll_pwait,
                            ep,
                            &mut ev as *mut libc::epoll_event,
                            1,
                            5000,
                            &all_but_usr1 as *const libc::sigset_t,
                            8,
                        )
                    }
                    _ => unreachable!("{wait}"),
                }
            };
            let e = std::io::Error::last_os_error().raw_os_error();
            set_mask(libc::SIG_SETMASK, &old);
            assert_eq!((r, e), (-1, Some(libc::EINTR)), "{wait} was interrupted");
            assert_eq!(
                HANDLER_RESULT.load(Ordering::SeqCst),
                0,
                "the handler's trapped call inside {wait}"
            );
        }
    }
    println!("sigsys ok: {case}");
}

// --- Installing late, failing to install, ASLR off --------------------------------

#[test]
fn install_after_the_device_did_dma() {
    let out = child("late_install_child", &[]);
    assert!(out.contains("late install ok"), "{out}");
}

#[test]
#[ignore = "child process body of install_after_the_device_did_dma"]
fn late_install_child() {
    assert!(is_child());
    // As the README's example: the device has run a command (io_uring workers exist).
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 64).unwrap();
    let mut v = vec![0u8; 1 << 20];
    let m = drv.map_slice(&mut v).unwrap();
    q.run(Descriptor::fill(m.iova(), m.len(), 0xab)).unwrap();
    drop(m);
    assert!(v.iter().all(|&b| b == 0xab));
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Anon::new(64 << 10);
    assert!(device_write_visible(&reg, &q, &buf, 1));
    let _m = match SeccompMonitor::install(&reg) {
        Ok(m) => m,
        Err(e) => panic!("install after DMA failed: {e}"),
    };
    buf.madvise(libc::MADV_DONTNEED);
    assert!(
        device_write_visible(&reg, &q, &buf, 2),
        "a discard after a late install was not seen"
    );
    println!("late install ok");
}

extern "C" fn foreign_sigsys(_: i32) {}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Everything is back where it was: pins, threads of the monitor, descriptors.
fn assert_undone(pins: u64, fds: usize, what: &str) {
    assert_eq!(
        userptr::proc_status::pinned_bytes().unwrap(),
        pins,
        "{what}: VmPin is not back where it was"
    );
    assert!(
        !thread_names().iter().any(|n| n == "userptr-seccomp"),
        "{what}: the monitor's worker thread is still running: {:?}",
        thread_names()
    );
    assert_eq!(open_fds(), fds, "{what}: descriptors left open");
}

#[test]
fn a_failed_install_undoes_everything() {
    cases(
        "failed_install_child",
        "USERPTR_FAILED_INSTALL",
        &["foreign_handler", "thread_blocks_sigsys"],
        "failed install ok",
    );
}

#[test]
#[ignore = "child process body of a_failed_install_undoes_everything"]
fn failed_install_child() {
    assert!(is_child());
    let case = std::env::var("USERPTR_FAILED_INSTALL").unwrap();
    let pins = userptr::proc_status::pinned_bytes().unwrap();
    let buf = Anon::new(64 << 10);
    {
        // Warm up what the driver keeps open for the life of the process (the VMA
        // query's /proc/self/maps), so that the count below sees only the install's.
        let (_drv, reg) = setup();
        reg.register_test(buf.addr, buf.len, Perm::READ_WRITE)
            .unwrap();
    }
    let fds = open_fds();
    // The way to make the install fail.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let blocker = match case.as_str() {
        "foreign_handler" => {
            // SAFETY: installs a handler in this child only.
            unsafe {
                libc::signal(
                    libc::SIGSYS,
                    foreign_sigsys as *const () as libc::sighandler_t,
                )
            };
            None
        }
        _ => {
            // A thread that keeps SIGSYS blocked (and, once the install is done,
            // makes a trapped call with it blocked).
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let t = std::thread::spawn(move || {
                set_mask(libc::SIG_BLOCK, &sigset(&[libc::SIGSYS]));
                tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                trapped_call()
            });
            rx.recv().unwrap();
            Some(t)
        }
    };
    {
        // Pins to leak, if the failed install kept a hold on the registry (registered
        // only: no device command before the install).
        let (drv, reg) = setup();
        let q = drv.queue(0, 16).unwrap();
        reg.register_test(buf.addr, buf.len, Perm::READ_WRITE)
            .unwrap();
        assert!(userptr::proc_status::pinned_bytes().unwrap() > pins);
        match SeccompMonitor::install(&reg) {
            Err(e) => {
                println!("install refused: {e}");
                drop(q);
                drop(reg);
                drop(drv);
                assert_undone(pins, fds, "after the failed install");
            }
            Ok(m) => {
                // Installed anyway (the monitor found a way): then the blocking
                // thread's trapped call must not kill the process.
                assert_ne!(
                    case, "foreign_handler",
                    "a foreign SIGSYS handler was accepted"
                );
                stop.store(true, Ordering::SeqCst);
                let r = blocker.map(|t| t.join().unwrap());
                assert_eq!(r, Some(0), "the blocking thread's trapped call");
                println!("install succeeded with a thread blocking SIGSYS");
                drop(m);
                println!("failed install ok: {case}");
                return;
            }
        }
    }
    // Take away the cause, and install again: it works, and monitors.
    stop.store(true, Ordering::SeqCst);
    if let Some(t) = blocker {
        // Its trapped call ran before any filter existed.
        assert_eq!(t.join().unwrap(), 0);
    }
    // SAFETY: restores the default SIGSYS disposition in this child.
    unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
    let (drv, reg) = setup();
    let q = drv.queue(0, 16).unwrap();
    let m = SeccompMonitor::install(&reg).expect("the second install");
    assert!(device_write_visible(&reg, &q, &buf, 2));
    buf.madvise(libc::MADV_DONTNEED);
    assert!(
        device_write_visible(&reg, &q, &buf, 3),
        "the second install does not monitor"
    );
    drop(m);
    println!("failed install ok: {case}");
}

#[test]
fn aslr_off_never_turns_a_spawn_into_a_sigsys_death() {
    use std::os::unix::process::CommandExt;
    const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0004_0000;
    let mut cmd = common::child_command("aslr_child");
    // SAFETY: personality() is async-signal-safe; it only changes the new process's
    // persona (as `setarch -R` does) before the exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::personality(ADDR_NO_RANDOMIZE) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let run = common::run_bounded(cmd, LIMIT);
    let text = run.text();
    assert!(
        run.success(),
        "the ASLR-off child: {}",
        common::failure_summary(&run)
    );
    assert!(text.contains("aslr ok"), "{text}");
}

#[test]
#[ignore = "child process body of aslr_off_never_turns_a_spawn_into_a_sigsys_death"]
fn aslr_child() {
    use std::os::unix::process::ExitStatusExt;
    assert!(is_child());
    // SAFETY: 0xffffffff queries the persona without changing it.
    let persona = unsafe { libc::personality(0xffff_ffff) };
    assert_ne!(persona & 0x0004_0000, 0, "ASLR is still on in the child");
    let (_drv, reg) = setup();
    match SeccompMonitor::install(&reg) {
        Err(e) => {
            // Refused: it must say why, as a typed error.
            assert!(
                matches!(
                    e,
                    userptr::Error::MonitorUnavailable { .. }
                        | userptr::Error::MonitorConflict { .. }
                ),
                "install refused with an unexpected error: {e:?}"
            );
            println!("aslr ok: install refused: {e}");
        }
        Ok(_m) => {
            let st = std::process::Command::new("/bin/sh")
                .args(["-c", "exit 7"])
                .status()
                .unwrap();
            assert_ne!(
                st.signal(),
                Some(libc::SIGSYS),
                "the spawned shell died of SIGSYS"
            );
            assert_eq!(st.code(), Some(7), "the spawned shell: {st}");
            println!("aslr ok: the shell ran");
        }
    }
}
