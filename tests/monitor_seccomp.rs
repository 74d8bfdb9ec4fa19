//! The seccomp monitor beyond the coverage matrix: exec, a foreign SIGSYS user, errno
//! semantics, signal masks, and many threads at once. Each test runs in a child process
//! (a seccomp filter cannot be removed).

mod common;
use common::RegisterTest as _;

use common::{is_child, run_child, Anon};
use std::time::Duration;
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status, WaitMode};

fn setup() -> (Driver, Registry) {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    (drv, reg)
}

#[test]
fn exec_and_errno_and_masks_behave() {
    let out = run_child("exec_child");
    assert!(out.contains("exec ok"), "{out}");
}

#[test]
#[ignore = "child process body of exec_and_errno_and_masks_behave"]
fn exec_child() {
    assert!(is_child());
    let (_drv, reg) = setup();
    let m = SeccompMonitor::install(&reg).unwrap();
    // A new image maps its code elsewhere and runs unmonitored (no handler there).
    let st = std::process::Command::new("/bin/sh")
        .args(["-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(7), "the exec'd image must run normally");
    // errno is exactly what the kernel would say.
    // SAFETY: invalid arguments on purpose: nothing is unmapped.
    let r = unsafe { libc::munmap(0x1001 as *mut _, 4096) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EINVAL)
    );
    // SIGSYS can never be blocked, and blocking other signals still works.
    // SAFETY: plain sigprocmask calls on this thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut old: libc::sigset_t = std::mem::zeroed();
        assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old), 0);
        let mut now: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut now);
        assert_eq!(
            libc::sigismember(&now, libc::SIGSYS),
            0,
            "SIGSYS got blocked"
        );
        assert_eq!(libc::sigismember(&now, libc::SIGUSR1), 1);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        // Another SIGSYS handler is refused.
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_IGN;
        assert_eq!(libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()), -1);
    }
    assert!(
        m.counters()
            .traps
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    println!("exec ok");
}

#[test]
fn a_foreign_sigsys_handler_is_refused_at_install() {
    let out = run_child("conflict_child");
    assert!(out.contains("conflict ok"), "{out}");
}

extern "C" fn foreign(_: libc::c_int) {}

#[test]
#[ignore = "child process body of a_foreign_sigsys_handler_is_refused_at_install"]
fn conflict_child() {
    assert!(is_child());
    // SAFETY: installs a handler in this child only.
    unsafe { libc::signal(libc::SIGSYS, foreign as *const () as libc::sighandler_t) };
    let (_drv, reg) = setup();
    let e = SeccompMonitor::install(&reg).unwrap_err();
    assert!(matches!(e, Error::MonitorConflict { .. }), "{e}");
    println!("conflict ok: {e}");
}

#[test]
fn many_threads_discarding_and_writing_at_once() {
    let out = run_child("threads_child");
    assert!(out.contains("threads ok"), "{out}");
}

#[test]
#[ignore = "child process body of many_threads_discarding_and_writing_at_once"]
fn threads_child() {
    assert!(is_child());
    let (drv, reg) = setup();
    let queues: Vec<_> = (0..4).map(|r| drv.queue(r, 16).unwrap()).collect();
    let _m = SeccompMonitor::install(&reg).unwrap();
    std::thread::scope(|s| {
        for (t, q) in queues.iter().enumerate() {
            let reg = &reg;
            s.spawn(move || {
                let buf = Anon::new(256 << 10);
                let u = reg
                    .register_test(buf.addr, buf.len, Perm::READ_WRITE)
                    .unwrap();
                for i in 0..50u8 {
                    // Nobody tells the registry: the monitor must.
                    buf.madvise(libc::MADV_DONTNEED);
                    let b = i.wrapping_mul(3).wrapping_add(t as u8) | 1;
                    let f = reg
                        .submit(q, &[&u], |iova| {
                            vec![Descriptor::fill(iova[0], buf.len as u64, b)]
                        })
                        .unwrap();
                    let c = q
                        .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
                        .unwrap();
                    assert_eq!(c.status, Status::Ok);
                    assert!(
                        buf.read().iter().all(|&x| x == b),
                        "thread {t} iteration {i}: stale pin"
                    );
                }
            });
        }
    });
    println!("threads ok: {}", reg.stats().invalidations[1]);
}

#[test]
fn signal_handlers_that_change_memory_inside_trapped_calls() {
    let out = run_child("signals_child");
    assert!(out.contains("signals ok"), "{out}");
}

static SIG_BUF: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SIG_HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn discard_in_handler(_: libc::c_int) {
    let a = SIG_BUF.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: discards the test's own buffer; madvise is async-signal-safe, and the
    // monitor's SIGSYS handler nests (SA_NODEFER) inside this one.
    unsafe { libc::madvise(a as *mut _, 64 << 10, libc::MADV_DONTNEED) };
    SIG_HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[test]
#[ignore = "child process body of signal_handlers_that_change_memory_inside_trapped_calls"]
fn signals_child() {
    use std::sync::atomic::Ordering;
    assert!(is_child());
    let (drv, reg) = setup();
    let q = drv.queue(0, 16).unwrap();
    let a = Anon::new(64 << 10);
    let b = Anon::new(64 << 10);
    SIG_BUF.store(a.addr, Ordering::SeqCst);
    let _ua = reg.register_test(a.addr, a.len, Perm::READ_WRITE).unwrap();
    let ub = reg.register_test(b.addr, b.len, Perm::READ_WRITE).unwrap();
    // SAFETY: installs a SIGUSR1 handler in this child only.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            discard_in_handler as *const () as libc::sighandler_t,
        )
    };
    let _m = SeccompMonitor::install(&reg).unwrap();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // A signal storm aimed at the main thread, which is mostly inside trapped calls.
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: signalling our own thread.
                unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        for i in 0..200u32 {
            b.madvise(libc::MADV_DONTNEED);
            let byte = (i % 250) as u8 + 1;
            let f = reg
                .submit(&q, &[&ub], |iova| {
                    vec![Descriptor::fill(iova[0], b.len as u64, byte)]
                })
                .unwrap();
            let c = q
                .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
                .unwrap();
            assert_eq!(c.status, Status::Ok);
            assert!(
                b.read().iter().all(|&x| x == byte),
                "iteration {i}: stale pin"
            );
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert!(SIG_HITS.load(Ordering::SeqCst) > 0);
    println!(
        "signals ok: {} handler discards",
        SIG_HITS.load(Ordering::SeqCst)
    );
}

/// `mov eax, 28 (madvise); syscall; ret`: a JIT-compiled function that makes the
/// system call itself, from code that did not exist when the monitor was installed.
const JIT_MADVISE: [u8; 8] = [0xb8, 0x1c, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xc3];

#[test]
fn code_made_executable_after_install_is_monitored_too() {
    let out = run_child("jit_child");
    assert!(out.contains("jit ok"), "{out}");
}

#[test]
#[ignore = "child process body of code_made_executable_after_install_is_monitored_too"]
fn jit_child() {
    assert!(is_child());
    let (drv, reg) = setup();
    let q = drv.queue(0, 16).unwrap();
    let m = SeccompMonitor::install(&reg).unwrap();
    // The JIT: write the code, then make it executable (mprotect, trapped: the
    // handler sees PROT_EXEC and covers the range with a filter of its own).
    let code = Anon::new(4096);
    // SAFETY: our own writable page; 8 bytes of machine code.
    unsafe {
        std::ptr::copy_nonoverlapping(JIT_MADVISE.as_ptr(), code.addr as *mut u8, 8);
    }
    code.mprotect(libc::PROT_READ | libc::PROT_EXEC);
    let added = m
        .counters()
        .exec_ranges_added
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(added, 1, "the JIT page got a filter");
    // SAFETY: the page holds a complete function with the C ABI (rdi, rsi, rdx are the
    // syscall's arguments as they arrive); it returns the syscall's result.
    let jit_madvise: extern "C" fn(usize, usize, i32) -> i64 =
        unsafe { std::mem::transmute(code.addr as *const u8) };
    const LEN: usize = 1 << 20;
    let buf = Anon::new(LEN);
    let u = reg.register_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    let fill = |b: u8| {
        let f = reg
            .submit(&q, &[&u], |i| vec![Descriptor::fill(i[0], LEN as u64, b)])
            .unwrap();
        q.wait_completion(f.end, WaitMode::Block, Duration::from_secs(10))
            .unwrap()
            .status
    };
    assert_eq!(fill(0x11), Status::Ok); // pinned and cached
                                        // The discard, made by the JIT code's own `syscall` instruction.
    assert_eq!(jit_madvise(buf.addr, LEN, libc::MADV_DONTNEED), 0);
    assert_eq!(fill(0xab), Status::Ok);
    assert!(
        buf.read().iter().all(|&b| b == 0xab),
        "a discard from JIT code left a stale pin: the device wrote the old pages"
    );
    // Making already covered code executable again adds nothing.
    code.mprotect(libc::PROT_READ | libc::PROT_EXEC);
    assert_eq!(
        m.counters()
            .exec_ranges_added
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    println!("jit ok");
}
