//! The seccomp-trap monitor: the complete pre-notifier.
//!
//! A seccomp filter (installed on every thread with `SECCOMP_FILTER_FLAG_TSYNC`)
//! makes `munmap`, `madvise`, `mprotect`, `mremap`, `mmap` with `MAP_FIXED`, `brk`,
//! `shmdt` and `process_madvise` raise SIGSYS in the calling thread *before* they run,
//! unless the call is made from the driver's own syscall trampoline (the filter
//! compares the instruction pointer with the address right after the trampoline's
//! `syscall` instruction). That covers libc wrappers,
//! glibc-internal calls (`free()` → `munmap`), raw `syscall()` and static code alike.
//!
//! The SIGSYS handler decodes the call into a range and a [`Cause`](crate::Cause) (only destructive
//! `madvise` advice invalidates; `mprotect` carries the new protection). Calls that
//! touch no registered range (the registry's lock-free `may_overlap`) are performed
//! through the trampoline at once: they cost only the trap. Otherwise the handler
//! posts the invalidation to the monitor's worker thread and waits for it
//! (`invalidate_start`), performs the call through the trampoline, stores the result
//! in the interrupted context's `rax` exactly as the kernel would have returned it
//! (so libc sets `errno` as usual), and posts `invalidate_end`.
//!
//! Why a worker thread: the handler may interrupt a thread inside `malloc` (glibc
//! trims its heap with `brk`/`madvise` while holding an arena lock), so the handler
//! itself never allocates or locks: it talks to the worker through a fixed table of
//! slots with atomics, an eventfd and futexes, all async-signal-safe.
//!
//! Correct with:
//! * many threads: each trapped call has its own slot; the worker serves them in turn;
//! * signals inside the handler: it is installed with `SA_NODEFER`, so a trapped call
//!   made by a signal handler that interrupts ours is handled too;
//! * blocked signals: a trapped call made while SIGSYS is blocked would make the kernel
//!   kill the process (glibc blocks every signal before it `madvise`s a dying thread's
//!   stack). So the filter also traps `rt_sigprocmask` and `rt_sigaction`, and the
//!   handler strips SIGSYS from every mask the process sets: SIGSYS is never blocked;
//!   installing another SIGSYS handler fails with `EINVAL`;
//! * the driver's own calls: threads inside a [`crate::driver_section`], and the
//!   worker itself, pass through;
//! * another SIGSYS user at install time: refused with [`Error::MonitorConflict`];
//! * threads starting up at install time: a thread that glibc is still creating has
//!   every signal blocked until it restores its mask, and that restore would be trapped
//!   while SIGSYS is blocked, which is fatal. Install the monitor when no thread is
//!   being created (at start-up, before spawning workers); the monitor's own worker is
//!   waited for;
//! * fork: the filter and handler are inherited; the child has no device mappings and
//!   no worker, so in the child every call passes straight through;
//! * exec: the filter survives `execve` but the handler does not. The filter therefore
//!   traps only calls made from the code mapped when it was installed (every
//!   executable mapping in `/proc/self/maps`, libc included): a new image maps its
//!   code elsewhere (ASLR) and runs unmonitored. A residual risk, documented rather
//!   than hidden: code of the new image that lands on a range the filters cover (a
//!   non-PIE image exec'd over a non-PIE image at the same fixed address, or, by
//!   chance of ASLR, over a range added for JIT code) would be trapped without a
//!   handler;
//! * code mapped after installation (`dlopen`, JITs): the filter also traps `mmap`
//!   with `PROT_EXEC`, and `mprotect` is trapped anyway; when either makes a range
//!   executable, the handler stacks one more small filter that traps the monitored
//!   calls made from that range (filters stack, and TRAP wins over ALLOW). At most
//!   [`MAX_EXEC_RANGES`] such ranges; beyond that, or for a range that straddles a
//!   4 GiB boundary, the range is counted in `exec_ranges_unmonitored`.
//!
//! A seccomp filter cannot be removed: [`SeccompMonitor::stop`] turns the handler into
//! a pass-through, so the trap's cost remains for the life of the process.
//!
//! Files, one concept each:
//! * this file: installing and stopping the monitor, its shared state and counters;
//! * `bpf`: the filter program (which calls trap, and from which code);
//! * `trampoline`: the driver's own syscall site, the one the filter lets through;
//! * `handler`: the SIGSYS handler, run in the thread that made the call;
//! * `decode`: what a trapped call means for the registry (range and cause);
//! * `worker`: the hand-off from the handler to the worker thread, and the worker;
//! * `exec_ranges`: which code the filters cover, and filters for code made
//!   executable later;
//! * `trap_floor`: the bare cost of a trap, for the benchmark harness.

use crate::error::{Error, Result};
use crate::registry::Registry;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

mod bpf;
mod decode;
mod exec_ranges;
mod handler;
mod trap_floor;
mod worker;

pub use exec_ranges::MAX_EXEC_RANGES;
pub use trap_floor::install_trap_floor;

use crate::trampoline::after_syscall_ip as trampoline_ip;
use bpf::bpf_filter;
use exec_ranges::text_ranges;
use handler::{on_sigsys, SIGSYS_BIT};
use worker::{wake_worker, FREE, TABLE, WAKE_FD};

/// The active monitor's shared state; null when stopped (pass-through).
static ACTIVE: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
/// Whether a filter was ever installed in this process.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The pid of the process whose worker serves the handler.
static INSTALL_PID: AtomicI32 = AtomicI32::new(0);

/// Counters of the seccomp monitor.
#[derive(Debug, Default)]
pub struct Counters {
    /// Trapped calls.
    pub traps: AtomicU64,
    /// Trapped calls that touched no registered range (cost: the trap only).
    pub passthrough: AtomicU64,
    /// Trapped calls that invalidated.
    pub invalidating: AtomicU64,
    /// Calls passed through because the thread was inside the driver.
    pub reentrant: AtomicU64,
    /// Foreign SIGSYS handlers refused.
    pub sigsys_refused: AtomicU64,
    /// Executable ranges mapped after installation (`dlopen`, JITs) that got a filter
    /// of their own.
    pub exec_ranges_added: AtomicU64,
    /// Executable ranges mapped after installation that could not get one (the
    /// table is full, or the range straddles a 4 GiB boundary): calls made from their
    /// code are not monitored.
    pub exec_ranges_unmonitored: AtomicU64,
}

struct Shared {
    /// Taken (and dropped, releasing its pins) by `shutdown` once no handler uses it.
    registry: std::cell::UnsafeCell<Option<Registry>>,
    /// Handlers between their check of ACTIVE and their last use of `registry`.
    users: AtomicU32,
    counters: Counters,
    /// The executable ranges the first filter covers (read-only after install).
    text: Vec<Range<u64>>,
}

// SAFETY: `registry` is written only by `shutdown`, after ACTIVE is cleared and every
// handler that saw it has left (the `users` handshake); everything else is atomics.
unsafe impl Sync for Shared {}

impl Shared {
    fn registry(&self) -> &Registry {
        // SAFETY: called only by a handler inside the `users` handshake, or by the
        // worker, which `shutdown` joins before taking the registry.
        unsafe {
            (*self.registry.get())
                .as_ref()
                .expect("registry present while in use")
        }
    }
}

/// Keeps `users` counted for the rest of a handler invocation.
struct User<'a>(&'a AtomicU32);
impl Drop for User<'_> {
    fn drop(&mut self) {
        // Release: our uses of the registry happen before shutdown sees zero.
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// The installed seccomp monitor.
pub struct SeccompMonitor {
    shared: &'static Shared,
    stop: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SeccompMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeccompMonitor").finish_non_exhaustive()
    }
}

/// Wait (bounded) until no thread of the process has SIGSYS blocked. A thread that
/// glibc is still creating blocks every signal until it restores its mask, and that
/// restore would be trapped with SIGSYS blocked: fatal. Checked through
/// `/proc/self/task/*/status` (`SigBlk`).
fn wait_for_sigsys_unblocked() -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut blocked = None;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                let mask = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigBlk:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .unwrap_or(0);
                if mask & SIGSYS_BIT != 0 {
                    blocked = Some(t.file_name().to_string_lossy().into_owned());
                }
            }
        }
        match blocked {
            None => return Ok(()),
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            Some(tid) => {
                return Err(Error::MonitorUnavailable {
                    monitor: "seccomp",
                    reason: format!(
                        "thread {tid} keeps SIGSYS blocked; a trapped call on it would kill \
                         the process (unblock SIGSYS, or install the monitor before it starts)"
                    ),
                })
            }
        }
    }
}

impl SeccompMonitor {
    /// Install the filter and the SIGSYS handler for the whole process and start the
    /// worker. Only one monitor per process; refuses if another SIGSYS handler exists.
    pub fn install(registry: &Registry) -> Result<SeccompMonitor> {
        if !cfg!(target_arch = "x86_64") {
            return Err(Error::MonitorUnavailable {
                monitor: "seccomp",
                reason: "the syscall trampoline exists for x86_64 only".into(),
            });
        }
        // SAFETY: querying the current SIGSYS disposition into a zeroed struct.
        let old = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut old);
            old
        };
        let ours = on_sigsys as *const () as usize;
        if old.sa_sigaction != libc::SIG_DFL
            && old.sa_sigaction != libc::SIG_IGN
            && old.sa_sigaction != ours
        {
            return Err(Error::MonitorConflict {
                what: "another SIGSYS handler is installed (a sandbox or another seccomp user); \
                       chaining is not supported: use the userfaultfd monitor instead",
            });
        }
        if !ACTIVE.load(Ordering::Acquire).is_null() {
            return Err(Error::MonitorConflict {
                what: "a seccomp monitor is already active in this process",
            });
        }
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::sys("eventfd(seccomp monitor)", e.into()))?;
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            registry: std::cell::UnsafeCell::new(Some(registry.clone())),
            users: AtomicU32::new(0),
            counters: Counters::default(),
            text: text_ranges(),
        }));
        WAKE_FD.store(wake.as_raw_fd(), Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("userptr-seccomp".into())
            .spawn(move || {
                crate::driver_section::block_signals_for_thread();
                let _ = ready_tx.send(());
                worker::worker(shared, wake, stop2)
            })
            .map_err(|e| Error::sys("spawn(seccomp worker)", e))?;
        // A thread still starting up has every signal blocked until glibc restores
        // its mask, and that restore would be trapped with SIGSYS blocked (fatal):
        // the filter goes in only once the worker runs.
        let _ = ready_rx.recv();
        // Relaxed: published by the Release store of ACTIVE below.
        INSTALL_PID.store(std::process::id() as i32, Ordering::Relaxed);
        // Release: the handler that sees ACTIVE sees `shared` initialised.
        ACTIVE.store(shared as *const Shared as *mut Shared, Ordering::Release);
        if !INSTALLED.swap(true, Ordering::AcqRel) {
            // SAFETY: installs our handler for SIGSYS; the struct is fully initialised.
            let r = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = ours;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
            };
            if r != 0 {
                return Err(Error::sys(
                    "sigaction(SIGSYS)",
                    std::io::Error::last_os_error(),
                ));
            }
            wait_for_sigsys_unblocked()?;
            let filter = bpf_filter(trampoline_ip(), &shared.text);
            if filter.len() > u16::MAX as usize {
                return Err(Error::MonitorUnavailable {
                    monitor: "seccomp",
                    reason: "too many executable mappings for one filter".into(),
                });
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            // SAFETY: NO_NEW_PRIVS then a filter for every thread (TSYNC); `prog`
            // and `filter` outlive the calls.
            let r = unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    -1
                } else {
                    libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        libc::SECCOMP_FILTER_FLAG_TSYNC,
                        &prog as *const libc::sock_fprog,
                    ) as i32
                }
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                ACTIVE.store(std::ptr::null_mut(), Ordering::Release);
                INSTALLED.store(false, Ordering::Release);
                return Err(Error::MonitorUnavailable {
                    monitor: "seccomp",
                    reason: format!(
                        "installing the filter failed ({e}); seccomp filters may be disallowed \
                         here, or another thread blocks TSYNC"
                    ),
                });
            }
        }
        crate::driver_section::set_defer_signals(true);
        Ok(SeccompMonitor {
            shared,
            stop,
            worker: Some(worker),
        })
    }

    /// The monitor's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Turn the handler into a pass-through and stop the worker. The filter stays (it
    /// cannot be removed): trapped calls still cost the trap.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        crate::driver_section::set_defer_signals(false);
        // SeqCst: see the handshake in `handle`.
        ACTIVE.store(std::ptr::null_mut(), Ordering::SeqCst);
        while self.shared.users.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        // Let in-flight handler calls finish: each owns a slot until it reaches END and
        // the worker frees it.
        while TABLE
            .iter()
            .any(|s| s.state.load(Ordering::Acquire) != FREE)
        {
            wake_worker();
            std::thread::yield_now();
        }
        self.stop.store(true, Ordering::Release);
        wake_worker();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        WAKE_FD.store(-1, Ordering::Release);
        // Nobody uses the registry any more (no handler inside, worker joined): drop
        // this handle to it, so the registry can release its pins.
        // SAFETY: see `Shared`'s Sync.
        drop(unsafe { (*self.shared.registry.get()).take() });
    }
}

impl Drop for SeccompMonitor {
    fn drop(&mut self) {
        if self.worker.is_some() && !crate::fork::in_forked_child() {
            self.shutdown();
        }
    }
}
