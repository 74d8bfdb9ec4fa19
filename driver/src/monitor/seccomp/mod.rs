//! The seccomp-trap monitor: the complete pre-notifier.
//!
//! A seccomp filter (installed on every thread with `SECCOMP_FILTER_FLAG_TSYNC`) makes
//! every call that can unmap, replace, discard, move or change the protection of pages
//! raise SIGSYS in the calling thread *before* it runs, on every ABI the kernel accepts
//! from this process (x86_64; i386 through `int 0x80`; x32 calls are refused), unless
//! the call is made from one of the driver's own syscall instructions
//! ([`crate::trampoline`]). That covers libc wrappers, glibc-internal calls (`free()`
//! → `munmap`), raw `syscall()`, inline `int 0x80` and static code alike.
//!
//! **What is trapped** (x86_64 numbers; the i386 equivalents likewise, see `abi`):
//! `munmap`, `mprotect`, `pkey_mprotect`, `madvise`, `process_madvise`, `mremap`,
//! `brk`, `mmap` with `MAP_FIXED` (or `PROT_EXEC`: exec tracking), `shmat` with
//! `SHM_REMAP` (or `SHM_EXEC`), `shmdt`, `remap_file_pages`, `ioctl` `UFFDIO_MOVE` /
//! `UFFDIO_POISON` (an application's own userfaultfd moving or poisoning pages),
//! `io_uring_setup` and `io_uring_register` (the application's rings are restricted:
//! `IORING_OP_MADVISE` is refused by the kernel on them, see `io_uring`); the
//! signal-mask calls (`rt_sigprocmask`, `rt_sigaction`, `rt_sigreturn`,
//! `rt_sigsuspend`, and `ppoll`, `pselect6`, `epoll_pwait(2)`, `io_uring_enter` with a
//! mask), which keep SIGSYS unblocked (see `signals`); `personality`. Syscall numbers
//! newer than the table are refused (`ENOSYS`) from monitored code; so is `clone3`,
//! whose flags the filter cannot read (glibc falls back to `clone`).
//!
//! **What it does with them.** The handler decodes the call into ranges and a
//! [`Cause`](crate::Cause) (advice is classified fail-safe by [`super::advice`]).
//! Calls that touch no registered range (the registry's lock-free `may_overlap`) are
//! performed at once: they cost only the trap. Otherwise the handler posts the
//! invalidation to the monitor's worker thread and waits for it (`invalidate_start`),
//! performs the call, stores the result in the interrupted context's `rax` exactly as
//! the kernel would have returned it (so libc sets `errno` as usual), and posts
//! `invalidate_end`. Every pointer argument is read through the kernel
//! (`user_memory`), so a bad one gives `EFAULT`, as it would without the monitor.
//!
//! Why a worker thread: the handler may interrupt a thread inside `malloc` (glibc
//! trims its heap with `brk`/`madvise` while holding an arena lock), so the handler
//! itself never allocates or locks: it talks to the worker through a fixed table of
//! slots with atomics and futexes, all async-signal-safe.
//!
//! **Whose calls pass through.** Only the driver's own: a thread inside a
//! [`crate::driver_section`], and the driver's own threads (the worker, the reference
//! device's engine), which block every application signal for their life, so a
//! process-directed signal's handler never runs there. While the monitor is active,
//! a driver section defers asynchronous signals until it ends, and the application
//! callbacks the driver runs (`Registry::submit`'s `build`) run outside it, so
//! application code is monitored whichever thread runs it. A task sharing the address
//! space (a thread, a `vfork` or `clone(CLONE_VM)` child) is monitored; a fork child,
//! which has a copy of its own, passes through (decided by the address space, see
//! [`crate::fork`], not by the pid).
//!
//! **Correct with:**
//! * many threads: each trapped call has its own slot; the worker serves them in turn;
//! * signals inside the handler: it is installed with `SA_NODEFER`, so a trapped call
//!   made by a signal handler that interrupts ours is handled too;
//! * SIGSYS blocked by any means (a mask call, a handler's mask, a handler writing its
//!   frame's saved mask, a temporary mask): would make the kernel kill the process at
//!   the next trap; the handler keeps SIGSYS out of every mask (`signals`); installing
//!   another SIGSYS disposition fails with `EINVAL`;
//! * another SIGSYS user at install time: refused with [`Error::MonitorConflict`];
//! * threads at install: a thread with SIGSYS blocked (one glibc is still creating has
//!   every signal blocked for a moment) is waited for, briefly, then install refuses
//!   naming it; io_uring's kernel workers (`PF_IO_WORKER`) never run application code
//!   and are not waited for, so install works after the device has done DMA;
//! * a failed install undoes what it did: no monitor is published, the worker stops,
//!   the registry handle (and so its pins) is released, and a later install can try
//!   again (the filter, once loaded, is permanent: it then stays, inert);
//! * fork: the filter and handler are inherited; the child passes every call through;
//! * exec: the filter survives `execve`, the handler does not. The filter therefore
//!   traps only calls made from code mapped when it was installed or followed since
//!   (`exec_ranges`): a new image maps its code elsewhere (ASLR) and runs unmonitored.
//!   With ASLR off it would land on the same ranges and die at its first trapped call,
//!   so install refuses a process with `ADDR_NO_RANDOMIZE` or a system with
//!   `kernel.randomize_va_space = 0`, and `personality` may not turn it off later. The
//!   residual risk, documented rather than hidden: a non-PIE image exec'd over a
//!   non-PIE image (both at their fixed address), or an image that ASLR places, by
//!   chance, on a covered range;
//! * code made executable after installation (`dlopen`, JITs, `mremap` of code,
//!   `SHM_EXEC`): covered by a filter of its own (`exec_ranges`); when the table is full
//!   the call is refused instead.
//!
//! A seccomp filter cannot be removed: [`SeccompMonitor::stop`] turns the handler into
//! a pass-through (the signal-mask and exec-range duties go on), so the trap's cost
//! remains for the life of the process.
//!
//! Files, one concept each:
//! * this file: installing and stopping the monitor, its shared state and counters;
//! * `abi`: the syscall ABIs and the calls of each the monitor knows;
//! * `bpf`: the filter programs (which calls trap, and from which code);
//! * `handler`: the SIGSYS handler, run in the thread that made the call;
//! * `decode`: what a trapped call means for the registry (ranges and cause);
//! * `signals`: SIGSYS is never blocked;
//! * `io_uring`: the application's rings are restricted;
//! * `user_memory`: reading the application's pointers without faulting;
//! * `worker`: the hand-off from the handler to the worker thread, and the worker;
//! * `exec_ranges`: which code the filters cover, and filters for code made
//!   executable later;
//! * `trap_floor`: the bare cost of a trap, for the benchmark harness.

use crate::error::{Error, Result};
use crate::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

mod abi;
mod bpf;
mod decode;
mod exec_ranges;
mod handler;
mod io_uring;
mod signals;
mod trap_floor;
mod user_memory;
mod worker;

pub use exec_ranges::MAX_EXEC_RANGES;
pub use trap_floor::install_trap_floor;

use handler::on_sigsys;
use signals::SIGSYS_BIT;
use worker::{wake_worker, FREE, TABLE};

/// The active monitor's shared state; null when stopped (pass-through).
static ACTIVE: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
/// Whether the filter was loaded in this process (it is permanent).
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Serialises installs and stops (an install is a sequence of steps).
static INSTALL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Counters of the seccomp monitor: process-wide, since the filter and handler are
/// (they add up over every monitor installed in the process).
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
    /// SIGSYS dispositions refused (another handler, `SIG_DFL`, `SIG_IGN`).
    pub sigsys_refused: AtomicU64,
    /// Calls refused: syscalls newer than the monitor's table, i386 io_uring calls,
    /// `personality` turning off ASLR, code the exec-range table has no room for.
    pub refused: AtomicU64,
    /// Trapped i386 (`int 0x80`) calls.
    pub i386_calls: AtomicU64,
    /// Application io_uring instances created restricted (`MADVISE` refused on them).
    pub rings_restricted: AtomicU64,
    /// Executable ranges mapped after installation (`dlopen`, JITs) that got a filter
    /// of their own.
    pub exec_ranges_added: AtomicU64,
    /// Executable ranges that could not get one (the table was full): the calls that
    /// would have made them were refused, but for a race, counted here too.
    pub exec_ranges_unmonitored: AtomicU64,
}

const fn counters() -> Counters {
    Counters {
        traps: AtomicU64::new(0),
        passthrough: AtomicU64::new(0),
        invalidating: AtomicU64::new(0),
        reentrant: AtomicU64::new(0),
        sigsys_refused: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        i386_calls: AtomicU64::new(0),
        rings_restricted: AtomicU64::new(0),
        exec_ranges_added: AtomicU64::new(0),
        exec_ranges_unmonitored: AtomicU64::new(0),
    }
}

/// The process's counters.
static COUNTERS: Counters = counters();

struct Shared {
    /// Taken (and dropped, releasing its pins) by `shutdown` once no handler uses it.
    registry: std::cell::UnsafeCell<Option<Registry>>,
    /// Handlers between their check of ACTIVE and their last use of `registry`.
    users: AtomicU32,
}

// SAFETY: `registry` is written only by `shutdown` (or a failed install), after ACTIVE
// is cleared (or was never set) and every handler that saw it has left (the `users`
// handshake); everything else is atomics.
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

fn unavailable(reason: String) -> Error {
    Error::MonitorUnavailable {
        monitor: "seccomp",
        reason,
    }
}

/// Whether task `tid` is one of io_uring's kernel workers (`PF_IO_WORKER` in the task
/// flags, the 9th field of `/proc/self/task/<tid>/stat`): it never runs application
/// code, so its all-blocked mask does not matter.
fn is_io_worker(tid: &str) -> bool {
    const PF_IO_WORKER: u64 = 0x10;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
        return false;
    };
    rest.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_IO_WORKER != 0)
}

/// Wait (bounded) until no thread of the process that runs user code has SIGSYS
/// blocked. A thread that glibc is still creating blocks every signal until it restores
/// its mask, and that restore would be trapped with SIGSYS blocked: fatal. Checked
/// through `/proc/self/task/*/status` (`SigBlk`).
fn wait_for_sigsys_unblocked() -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut blocked = None;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let tid = t.file_name().to_string_lossy().into_owned();
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                let mask = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigBlk:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .unwrap_or(0);
                if mask & SIGSYS_BIT != 0 && !is_io_worker(&tid) {
                    blocked = Some(tid);
                }
            }
        }
        match blocked {
            None => return Ok(()),
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            Some(tid) => {
                return Err(unavailable(format!(
                    "thread {tid} keeps SIGSYS blocked; a trapped call on it would kill \
                     the process (unblock SIGSYS in it, or install the monitor before it starts)"
                )))
            }
        }
    }
}

/// What stops the monitor from being installed at all, checked before anything changes.
fn preflight() -> Result<()> {
    if !cfg!(target_arch = "x86_64") {
        return Err(unavailable(
            "the syscall trampoline exists for x86_64 only".into(),
        ));
    }
    if crate::fork::in_forked_child() {
        return Err(Error::ForkedChild);
    }
    // The current SIGSYS disposition.
    let mut old = [0u64; 4];
    // SAFETY: rt_sigaction query into a local kernel sigaction.
    let r = unsafe {
        crate::trampoline::syscall(
            libc::SYS_rt_sigaction,
            [libc::SIGSYS as u64, 0, old.as_mut_ptr() as u64, 8, 0, 0],
        )
    };
    let ours = on_sigsys as *const () as u64;
    if r == 0 && old[0] != libc::SIG_DFL as u64 && old[0] != libc::SIG_IGN as u64 && old[0] != ours
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
    // SAFETY: personality(0xffffffff) only queries.
    let persona =
        unsafe { crate::trampoline::syscall(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]) }
            as u64;
    if persona & libc::ADDR_NO_RANDOMIZE as u64 != 0 {
        return Err(unavailable(
            "the process runs with ASLR off (ADDR_NO_RANDOMIZE: `setarch -R`, or gdb's \
             default): every program it executes would load its code where the filter \
             traps, with no handler, and die at its first munmap; run it with ASLR on \
             (in gdb: `set disable-randomization off`)"
                .into(),
        ));
    }
    if persona & libc::READ_IMPLIES_EXEC as u64 != 0 {
        return Err(unavailable(
            "the process runs with READ_IMPLIES_EXEC (every readable mapping is \
             executable, so new code could appear where the monitor cannot follow it); \
             rebuild the program with a non-executable stack (PT_GNU_STACK)"
                .into(),
        ));
    }
    if std::fs::read_to_string("/proc/sys/kernel/randomize_va_space").is_ok_and(|v| v.trim() == "0")
    {
        return Err(unavailable(
            "kernel.randomize_va_space is 0 (ASLR off system-wide): every program this \
             process executes would load its code where the filter traps and die; set it \
             to 2 (`sysctl kernel.randomize_va_space=2`)"
                .into(),
        ));
    }
    let rings = io_uring::foreign_rings();
    if !rings.is_empty() {
        return Err(unavailable(format!(
            "the process already holds io_uring instances (fds {rings:?}) that the monitor \
             cannot restrict any more (IORING_OP_MADVISE on them would go unseen); install \
             the monitor before creating them"
        )));
    }
    wait_for_sigsys_unblocked()
}

impl SeccompMonitor {
    /// Install the filter and the SIGSYS handler for the whole process and start the
    /// worker. Works at any point of the process's life; one monitor at a time; refuses
    /// (with nothing changed) if another SIGSYS handler exists, or if the process is in
    /// a state the filter would turn fatal (see the module doc).
    pub fn install(registry: &Registry) -> Result<SeccompMonitor> {
        let _serial = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        crate::fork::install();
        preflight()?;
        user_memory::map_low_scratch();
        io_uring::probe_kernel();
        // Leaked: a handler may still touch it after `shutdown` (see `handler`); the
        // registry inside is taken out on shutdown or on a failed install.
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            registry: std::cell::UnsafeCell::new(Some(registry.clone())),
            users: AtomicU32::new(0),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("userptr-seccomp".into())
            .spawn(move || {
                crate::driver_section::block_signals_for_thread();
                let _ = ready_tx.send(());
                worker::worker(shared, stop2)
            });
        let worker = match spawned {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: never published: no handler or worker uses it.
                drop(unsafe { (*shared.registry.get()).take() });
                return Err(Error::sys("spawn(seccomp worker)", e));
            }
        };
        // A thread still starting up has every signal blocked until glibc restores
        // its mask, and that restore would be trapped with SIGSYS blocked (fatal):
        // the filter goes in only once the worker runs.
        let _ = ready_rx.recv();
        let mut mon = SeccompMonitor {
            shared,
            stop,
            worker: Some(worker),
        };
        if !INSTALLED.load(Ordering::Acquire) {
            if let Err(e) = load_filter() {
                // Nothing was published: stop the worker and release the registry.
                mon.shutdown();
                return Err(e);
            }
            INSTALLED.store(true, Ordering::Release);
            // Handlers installed before us must not block SIGSYS either.
            signals::sweep_handler_masks();
        }
        // Release: the handler that sees ACTIVE sees `shared` initialised.
        ACTIVE.store(shared as *const Shared as *mut Shared, Ordering::Release);
        crate::driver_section::set_defer_signals(true);
        Ok(mon)
    }

    /// The monitor's counters (process-wide: see [`Counters`]).
    pub fn counters(&self) -> &'static Counters {
        &COUNTERS
    }

    /// Turn the handler into a pass-through and stop the worker. The filter stays (it
    /// cannot be removed): trapped calls still cost the trap.
    pub fn stop(mut self) {
        let _serial = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if std::ptr::eq(ACTIVE.load(Ordering::Acquire), self.shared) {
            crate::driver_section::set_defer_signals(false);
        }
        // SeqCst: see the handshake in `handler::monitored`.
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
        // SeqCst: the worker stores its futex word ASLEEP (SeqCst) and then loads
        // `stop` (SeqCst): either it sees `stop`, or wake_worker's store of AWAKE
        // comes after its ASLEEP and its futex wait returns at once.
        self.stop.store(true, Ordering::SeqCst);
        wake_worker();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        // Nobody uses the registry any more (no handler inside, worker joined): drop
        // this handle to it, so the registry can release its pins.
        // SAFETY: see `Shared`'s Sync.
        drop(unsafe { (*self.shared.registry.get()).take() });
    }
}

/// Install the SIGSYS handler, set NO_NEW_PRIVS and load the main filter on every
/// thread. On failure the SIGSYS disposition is put back; nothing else changed.
fn load_filter() -> Result<()> {
    let text = exec_ranges::set_text(exec_ranges::text_ranges());
    let gates = bpf::Gates {
        x86_64: [
            crate::trampoline::after_syscall_ip(),
            crate::trampoline::after_sigreturn_ip(),
        ],
        i386: [
            crate::trampoline::after_int80_ip(),
            crate::trampoline::i386_sigreturn_gates()[0].1,
            crate::trampoline::i386_sigreturn_gates()[1].1,
        ],
    };
    let mut buf = vec![
        libc::sock_filter {
            code: 0,
            jt: 0,
            jf: 0,
            k: 0,
        };
        4096
    ];
    let Some(prog) = bpf::main_filter(&mut buf, text, gates) else {
        return Err(unavailable(format!(
            "too many executable mappings ({}) for one filter",
            text.len()
        )));
    };
    let prog = prog.to_vec();
    let r = signals::install_handler(on_sigsys as *const () as u64);
    if r != 0 {
        return Err(Error::sys(
            "rt_sigaction(SIGSYS)",
            std::io::Error::from_raw_os_error(-r as i32),
        ));
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers; it only restricts this process.
    let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    let r = if nnp != 0 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EPERM) as i64)
    } else {
        bpf::load(&prog)
    };
    if r != 0 {
        // Back to the default disposition: no filter means no SIGSYS of ours.
        let dfl = [libc::SIG_DFL as u64, 0, 0, 0];
        // SAFETY: rt_sigaction restoring SIGSYS's default, from a local.
        unsafe {
            crate::trampoline::syscall(
                libc::SYS_rt_sigaction,
                [libc::SIGSYS as u64, dfl.as_ptr() as u64, 0, 8, 0, 0],
            )
        };
        let why = if r > 0 {
            format!("thread {r} could not take the filter (TSYNC)")
        } else {
            std::io::Error::from_raw_os_error(-r as i32).to_string()
        };
        return Err(unavailable(format!(
            "installing the filter failed ({why}); seccomp filters may be disallowed here"
        )));
    }
    Ok(())
}

impl Drop for SeccompMonitor {
    fn drop(&mut self) {
        if self.worker.is_some() && !crate::fork::in_forked_child() {
            let _serial = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            self.shutdown();
        }
    }
}
