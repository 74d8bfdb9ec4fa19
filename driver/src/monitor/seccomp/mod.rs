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
//! The SIGSYS handler decodes the call into a range and a [`Cause`] (only destructive
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

use crate::error::{Error, Result};
use crate::registry::{Cause, Invalidation, Registry};
use std::ffi::c_void;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.userptr_trampoline,\"ax\",@progbits",
    ".globl userptr_syscall_trampoline",
    ".type userptr_syscall_trampoline,@function",
    "userptr_syscall_trampoline:",
    "    mov rax, rdi",
    "    mov rdi, rsi",
    "    mov rsi, rdx",
    "    mov rdx, rcx",
    "    mov r10, r8",
    "    mov r8, r9",
    "    mov r9, [rsp + 8]",
    "    syscall",
    ".globl userptr_trampoline_after_syscall",
    "userptr_trampoline_after_syscall:",
    "    ret",
    ".size userptr_syscall_trampoline, . - userptr_syscall_trampoline",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn userptr_syscall_trampoline(
        nr: i64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
        a6: u64,
    ) -> i64;
    static userptr_trampoline_after_syscall: u8;
}

/// Make a syscall through the trampoline (the only call site the filter lets through).
/// Returns the raw kernel result (`-errno` on failure).
fn raw_syscall(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: the trampoline is a plain `syscall` with the System V argument registers
    // moved into the kernel's; the caller passes the arguments of a call the
    // application itself made (or a harmless query), so it has that call's effects.
    unsafe { userptr_syscall_trampoline(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

fn trampoline_ip() -> u64 {
    // Taking the address of a label defined in global_asm above (no access).
    std::ptr::addr_of!(userptr_trampoline_after_syscall) as u64
}

const SLOTS: usize = 64;
const FREE: u32 = 0;
const CLAIMED: u32 = 1;
const START: u32 = 2;
const STARTED: u32 = 3;
const END: u32 = 4;

/// Cause encodings in a slot (a signal handler cannot build an enum in shared memory
/// portably; this is the wire format between handler and worker).
const K_UNMAP: u32 = 0;
const K_DISCARD: u32 = 1;
const K_REMAP: u32 = 2;
const K_PROTECT: u32 = 3;
const K_SHMDT: u32 = 4;

struct Slot {
    state: AtomicU32,
    start: AtomicU64,
    end: AtomicU64,
    kind: AtomicU32,
    arg: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    state: AtomicU32::new(FREE),
    start: AtomicU64::new(0),
    end: AtomicU64::new(0),
    kind: AtomicU32::new(0),
    arg: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
/// The worker's eventfd, -1 when no worker runs.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
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

fn futex_wait(word: &AtomicU32, expect: u32) {
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 that lives for the program (a static
    // slot); spurious wake-ups and EINTR are handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expect,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 (a static slot).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

fn wake_worker() {
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes from a local to an eventfd: async-signal-safe.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn page_range(start: u64, len: u64) -> Option<Range<u64>> {
    if len == 0 {
        return None;
    }
    let end = start.checked_add(len)?.checked_next_multiple_of(4096)?;
    Some(start & !4095..end)
}

/// What a trapped call means for the registry: a range, a cause kind and argument.
fn decode(nr: i64, a: [u64; 6]) -> Option<(Range<u64>, u32, u64)> {
    match nr {
        libc::SYS_munmap => Some((page_range(a[0], a[1])?, K_UNMAP, 0)),
        libc::SYS_madvise => {
            let destructive = matches!(
                a[2] as i32,
                libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
            ) || a[2] as i32 == 24; // MADV_DONTNEED_LOCKED
            destructive.then(|| Some((page_range(a[0], a[1])?, K_DISCARD, 0)))?
        }
        libc::SYS_mprotect => Some((page_range(a[0], a[1])?, K_PROTECT, a[2])),
        libc::SYS_mremap => {
            let to = if a[3] & libc::MREMAP_FIXED as u64 != 0 {
                a[4]
            } else {
                0
            };
            Some((page_range(a[0], a[1])?, K_REMAP, to))
        }
        libc::SYS_mmap if a[3] & libc::MAP_FIXED as u64 != 0 => {
            Some((page_range(a[0], a[1])?, K_UNMAP, 0))
        }
        libc::SYS_brk => {
            let cur = raw_syscall(libc::SYS_brk, [0; 6]) as u64;
            (a[0] != 0 && a[0] < cur).then(|| Some((page_range(a[0], cur - a[0])?, K_UNMAP, 0)))?
        }
        libc::SYS_shmdt => Some((a[0] & !4095..(a[0] & !4095) + 4096, K_SHMDT, 0)),
        libc::SYS_process_madvise => {
            let advice = a[3] as i32;
            if !matches!(
                advice,
                libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
            ) {
                return None;
            }
            // The union of the iovecs: conservative, and needs no allocation.
            let (iov, n) = (a[1] as *const libc::iovec, a[2] as usize);
            let (mut lo, mut hi) = (u64::MAX, 0u64);
            for i in 0..n.min(1024) {
                // SAFETY: the caller passed `n` iovecs at `iov` to the kernel; reading
                // them here is what the kernel would do. A bad pointer would fault the
                // call anyway (EFAULT), so an application cannot rely on it.
                let v = unsafe { std::ptr::read_volatile(iov.add(i)) };
                lo = lo.min(v.iov_base as u64);
                hi = hi.max(v.iov_base as u64 + v.iov_len as u64);
            }
            (lo < hi).then(|| Some((page_range(lo, hi - lo)?, K_DISCARD, 0)))?
        }
        _ => None,
    }
}

/// Handle one trapped call; returns the value for `rax`.
fn handle(nr: i64, a: [u64; 6], saved_mask: &mut u64) -> i64 {
    if nr == libc::SYS_rt_sigprocmask || nr == libc::SYS_rt_sigaction {
        return keep_sigsys_unblocked(nr, a, saved_mask);
    }
    let shared = ACTIVE.load(Ordering::Acquire);
    if shared.is_null() || crate::fork::in_forked_child() {
        return raw_syscall(nr, a);
    }
    // SAFETY: ACTIVE points at a leaked Shared, never freed.
    let s = unsafe { &*shared };
    // SeqCst: a Dekker handshake with `shutdown` (store ACTIVE = null, then load
    // users): either it sees us counted and waits, or we see ACTIVE cleared and leave.
    s.users.fetch_add(1, Ordering::SeqCst);
    let _user = User(&s.users);
    if ACTIVE.load(Ordering::SeqCst) != shared {
        return raw_syscall(nr, a);
    }
    // Relaxed: statistics.
    s.counters.traps.fetch_add(1, Ordering::Relaxed);
    if crate::driver_section::in_driver() {
        s.counters.reentrant.fetch_add(1, Ordering::Relaxed);
        return raw_syscall(nr, a);
    }
    let Some((range, kind, arg)) = decode(nr, a) else {
        s.counters.passthrough.fetch_add(1, Ordering::Relaxed);
        return perform(s, nr, a);
    };
    // mremap with MREMAP_FIXED also unmaps whatever was at the destination.
    let dest = (nr == libc::SYS_mremap && kind == K_REMAP && arg != 0)
        .then(|| page_range(arg, a[2]))
        .flatten();
    let hit = |r: &Range<u64>| s.registry().may_overlap(r);
    let first = hit(&range).then_some((range, kind, arg));
    let second = dest.filter(hit).map(|d| (d, K_UNMAP, 0));
    if first.is_none() && second.is_none() {
        s.counters.passthrough.fetch_add(1, Ordering::Relaxed);
        return perform(s, nr, a);
    }
    // A child that has not yet run the atfork handler (or a vfork child) has no worker:
    // recognise it by its pid (getpid is not trapped). Only here, on the slow path.
    if raw_syscall(libc::SYS_getpid, [0; 6]) as i32 != INSTALL_PID.load(Ordering::Relaxed) {
        return raw_syscall(nr, a);
    }
    s.counters.invalidating.fetch_add(1, Ordering::Relaxed);
    let slots = [
        first.map(start_invalidation),
        second.map(start_invalidation),
    ];
    let r = perform(s, nr, a);
    for slot in slots.into_iter().flatten() {
        // Release: hand the slot back for invalidate_end.
        slot.state.store(END, Ordering::Release);
    }
    wake_worker();
    r
}

/// Make the trapped call; if it made a range executable (`dlopen`, a JIT), cover that
/// code with a filter of its own before the caller can run it.
fn perform(s: &Shared, nr: i64, a: [u64; 6]) -> i64 {
    let r = raw_syscall(nr, a);
    if let Some(range) = new_exec_range(nr, a, r) {
        add_exec_range(s, range);
    }
    r
}

/// Post an invalidation to the worker and wait until it has started.
fn start_invalidation((range, kind, arg): (Range<u64>, u32, u64)) -> &'static Slot {
    let slot = claim();
    slot.start.store(range.start, Ordering::Relaxed);
    slot.end.store(range.end, Ordering::Relaxed);
    slot.kind.store(kind, Ordering::Relaxed);
    slot.arg.store(arg, Ordering::Relaxed);
    // Release: the fields above are visible to the worker that sees START.
    slot.state.store(START, Ordering::Release);
    wake_worker();
    loop {
        // Acquire: pairs with the worker's Release store of STARTED.
        let st = slot.state.load(Ordering::Acquire);
        if st == STARTED {
            return slot;
        }
        futex_wait(&slot.state, st);
    }
}

const SIGSYS_BIT: u64 = 1 << (libc::SIGSYS - 1);

/// Emulate `rt_sigprocmask` / perform `rt_sigaction` with SIGSYS kept out of every
/// mask, and refuse a foreign SIGSYS handler.
///
/// `rt_sigprocmask` cannot simply be performed from the handler: returning from the
/// handler (`rt_sigreturn`) restores the mask saved when SIGSYS was delivered, which
/// would undo the call. So the new mask is computed here and written into the
/// interrupted context's saved mask, which `rt_sigreturn` then installs.
fn keep_sigsys_unblocked(nr: i64, a: [u64; 6], saved_mask: &mut u64) -> i64 {
    if nr == libc::SYS_rt_sigprocmask {
        let (how, set, oldset) = (a[0] as i32, a[1] as *const u64, a[2] as *mut u64);
        if a[3] != 8 {
            return -(libc::EINVAL as i64);
        }
        let cur = *saved_mask;
        let new = if set.is_null() {
            cur
        } else {
            // SAFETY: the caller passed an 8-byte sigset at `set` (checked size), which
            // the kernel would read the same way.
            let v = unsafe { std::ptr::read_volatile(set) };
            match how {
                libc::SIG_BLOCK => cur | v,
                libc::SIG_UNBLOCK => cur & !v,
                libc::SIG_SETMASK => v,
                _ => return -(libc::EINVAL as i64),
            }
        };
        if !oldset.is_null() {
            // SAFETY: the caller passed an 8-byte sigset to receive the old mask.
            unsafe { std::ptr::write_volatile(oldset, cur) };
        }
        let unblockable = SIGSYS_BIT | 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);
        *saved_mask = new & !unblockable;
        return 0;
    }
    // rt_sigaction(sig, act, oact, sigsetsize); the kernel's struct on x86_64 is
    // { handler, flags, restorer, mask }.
    let (sig, act) = (a[0] as i32, a[1] as *const [u64; 4]);
    if act.is_null() {
        return raw_syscall(nr, a);
    }
    // SAFETY: the caller passed a kernel sigaction at `act`; read it as the kernel would.
    let mut k = unsafe { std::ptr::read_volatile(act) };
    if sig == libc::SIGSYS && k[0] != on_sigsys as *const () as u64 {
        return -(libc::EINVAL as i64);
    }
    k[3] &= !SIGSYS_BIT;
    raw_syscall(nr, [a[0], &k as *const [u64; 4] as u64, a[2], a[3], 0, 0])
}

fn claim() -> &'static Slot {
    loop {
        for s in &TABLE {
            // Acquire: the slot's previous use is complete before we reuse it.
            if s.state
                .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return s;
            }
        }
        // Every slot busy (64 threads inside trapped calls): wait for one to free.
        futex_wait(&TABLE[0].state, TABLE[0].state.load(Ordering::Relaxed));
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: __errno_location returns this thread's errno; a handler must preserve it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let g = &uc.uc_mcontext.gregs;
    // After a seccomp trap the kernel rolls rax back to the syscall number.
    let nr = g[libc::REG_RAX as usize];
    let a = [
        g[libc::REG_RDI as usize] as u64,
        g[libc::REG_RSI as usize] as u64,
        g[libc::REG_RDX as usize] as u64,
        g[libc::REG_R10 as usize] as u64,
        g[libc::REG_R8 as usize] as u64,
        g[libc::REG_R9 as usize] as u64,
    ];
    // The mask rt_sigreturn will restore: its first word holds signals 1..=64.
    let mask = &mut uc.uc_sigmask as *mut libc::sigset_t as *mut u64;
    // SAFETY: sigset_t is at least 8 bytes and suitably aligned inside ucontext_t.
    let mut saved = unsafe { *mask };
    let r = handle(nr, a, &mut saved);
    // SAFETY: as above.
    unsafe { *mask = saved };
    uc.uc_mcontext.gregs[libc::REG_RAX as usize] = r;
    // SAFETY: restore errno (see above).
    unsafe { *libc::__errno_location() = errno };
}

/// The worker: runs the registry side of trapped calls.
fn worker(shared: &'static Shared, wake: OwnedFd, stop: Arc<AtomicBool>) {
    // The worker's own calls (its allocations) pass through.
    let _section = crate::driver_section::enter();
    let mut tokens: Vec<Option<Invalidation>> = (0..SLOTS).map(|_| None).collect();
    let mut buf = [0u8; 8];
    loop {
        // Acquire: pairs with stop()'s Release store.
        if stop.load(Ordering::Acquire) {
            break;
        }
        for (i, s) in TABLE.iter().enumerate() {
            // Acquire: pairs with the handler's Release stores of START / END.
            match s.state.load(Ordering::Acquire) {
                START => {
                    let range = s.start.load(Ordering::Relaxed)..s.end.load(Ordering::Relaxed);
                    let arg = s.arg.load(Ordering::Relaxed);
                    let (range, cause) = match s.kind.load(Ordering::Relaxed) {
                        K_DISCARD => (range, Cause::Discard),
                        K_REMAP => (range, Cause::Remap { to: arg }),
                        K_PROTECT => (
                            range,
                            Cause::Protect {
                                new_prot: arg as i32,
                            },
                        ),
                        K_SHMDT => (shm_range(range.start).unwrap_or(range), Cause::Unmap),
                        _ => (range, Cause::Unmap),
                    };
                    match shared.registry().invalidate_start(range, cause) {
                        Ok(inv) => tokens[i] = Some(inv),
                        Err(e) => tracing::error!("seccomp monitor: invalidation failed: {e}"),
                    }
                    // Release: the invalidation happened before the call proceeds.
                    s.state.store(STARTED, Ordering::Release);
                    futex_wake(&s.state);
                }
                END => {
                    if let Some(inv) = tokens[i].take() {
                        shared.registry().invalidate_end(inv);
                    }
                    s.state.store(FREE, Ordering::Release);
                    futex_wake(&s.state);
                    futex_wake(&TABLE[0].state);
                }
                _ => {}
            }
        }
        // Sleep until a handler posts (or stop); a post that raced the scan above left
        // the eventfd readable, so nothing is lost.
        let mut fds = [rustix::event::PollFd::new(
            &wake,
            rustix::event::PollFlags::IN,
        )];
        let _ = rustix::event::poll(&mut fds, None);
        let _ = rustix::io::read(&wake, &mut buf);
    }
}

/// The extent of the shared-memory mapping at `addr`, from /proc/self/maps.
fn shm_range(addr: u64) -> Option<Range<u64>> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut range: Option<Range<u64>> = None;
    let mut inode = None;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (a, b) = f.next()?.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let ino = f.nth(3)?.to_string();
        match (&mut range, &inode) {
            (None, _) if a == addr => {
                range = Some(a..b);
                inode = Some(ino);
            }
            (Some(r), Some(i)) if r.end == a && *i == ino => r.end = b,
            (Some(_), _) => break,
            _ => {}
        }
    }
    range
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

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

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

/// The executable mappings of the process now (the code whose calls are monitored).
fn text_ranges() -> Vec<Range<u64>> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut v: Vec<Range<u64>> = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.contains('x') || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        match v.last_mut() {
            Some(l) if l.end == a => l.end = b,
            _ => v.push(a..b),
        }
    }
    v
}

/// The calls trapped (besides `mmap` with `MAP_FIXED` or `PROT_EXEC`).
const TRAPPED: [i64; 9] = [
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_shmdt,
    libc::SYS_process_madvise,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
];

/// Executable ranges mapped after installation that got a filter of their own.
pub const MAX_EXEC_RANGES: usize = 256;

/// The executable ranges added after installation: (start, end), written once each.
/// A fixed table of atomics: the handler reads and appends without allocating.
static EXEC_RANGES: [(AtomicU64, AtomicU64); MAX_EXEC_RANGES] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_EXEC_RANGES];
static EXEC_COUNT: AtomicU32 = AtomicU32::new(0);

/// The range a successful call made executable, if any.
fn new_exec_range(nr: i64, a: [u64; 6], r: i64) -> Option<Range<u64>> {
    let prot = a[2];
    if prot & libc::PROT_EXEC as u64 == 0 || r < 0 {
        return None;
    }
    match nr {
        libc::SYS_mmap => page_range(r as u64, a[1]),
        libc::SYS_mprotect if r == 0 => page_range(a[0], a[1]),
        _ => None,
    }
}

/// Whether `r` lies inside code the filters already cover.
fn exec_covered(s: &Shared, r: &Range<u64>) -> bool {
    let inside = |a: u64, b: u64| a <= r.start && r.end <= b;
    if s.text.iter().any(|t| inside(t.start, t.end)) {
        return true;
    }
    // Acquire: pairs with the Release stores in `add_exec_range`.
    let n = (EXEC_COUNT.load(Ordering::Acquire) as usize).min(MAX_EXEC_RANGES);
    EXEC_RANGES[..n]
        .iter()
        .any(|(a, b)| inside(a.load(Ordering::Acquire), b.load(Ordering::Acquire)))
}

/// After a call made `r` executable: stack a filter that traps the monitored calls
/// made from it. Async-signal-safe: a fixed program on the stack and one syscall.
fn add_exec_range(s: &Shared, r: Range<u64>) {
    if exec_covered(s, &r) {
        return;
    }
    let straddles = r.start >> 32 != (r.end - 1) >> 32;
    // Relaxed: a slot index; the slot's contents are published below.
    let i = EXEC_COUNT.fetch_add(1, Ordering::Relaxed) as usize;
    if straddles || i >= MAX_EXEC_RANGES {
        s.counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    use libc::{BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    const N: usize = TRAPPED.len() + 1;
    let mut p = [ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW); 4 + N + 1 + 6 + 1];
    p[0] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 4);
    p[1] = ins(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, AUDIT_ARCH_X86_64);
    // p[2]: ALLOW (another architecture)
    p[3] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0);
    for (k, nr) in TRAPPED.iter().chain([&libc::SYS_mmap]).enumerate() {
        // Match: skip the remaining compares and the ALLOW, to the IP check.
        p[4 + k] = ins(BPF_JMP | BPF_JEQ | BPF_K, (N - k) as u8, 0, *nr as u32);
    }
    // p[4 + N]: ALLOW (not a monitored call)
    let at = 4 + N + 1;
    let lo_end = r.end as u32;
    p[at] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 12);
    p[at + 1] = ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 4, (r.start >> 32) as u32);
    p[at + 2] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 8);
    p[at + 3] = ins(BPF_JMP | BPF_JGE | BPF_K, 0, 2, r.start as u32);
    p[at + 4] = if lo_end == 0 {
        ins(BPF_JMP | BPF_JA, 0, 0, 0) // ends at a 4 GiB boundary: any low word is below
    } else {
        ins(BPF_JMP | BPF_JGE | BPF_K, 1, 0, lo_end)
    };
    p[at + 5] = ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_TRAP);
    // p[at + 6]: ALLOW
    let prog = libc::sock_fprog {
        len: p.len() as u16,
        filter: p.as_ptr() as *mut _,
    };
    // SAFETY: a complete program that outlives the call; NO_NEW_PRIVS was set at
    // install; TSYNC puts it on every thread, as the first filter is.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        s.counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Release: a reader that sees the end sees the start (written first).
    EXEC_RANGES[i].0.store(r.start, Ordering::Release);
    EXEC_RANGES[i].1.store(r.end, Ordering::Release);
    s.counters.exec_ranges_added.fetch_add(1, Ordering::Relaxed);
}

/// The filter program. Layout:
/// ```text
///   arch != x86_64            → ALLOW
///   nr == mmap && !MAP_FIXED && !PROT_EXEC → ALLOW
///   nr not in TRAPPED         → ALLOW
///   ip == trampoline          → ALLOW
///   ip in a text range        → TRAP
///   otherwise                 → ALLOW
/// ```
fn bpf_filter(trampoline: u64, text: &[Range<u64>]) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W,
    };
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const TRAP: u32 = libc::SECCOMP_RET_TRAP;
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ld = |k: u32| ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, k);
    let ret = |k: u32| ins(BPF_RET | BPF_K, 0, 0, k);
    let jeq = |k: u32, jt: u8, jf: u8| ins(BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k);
    let trapped = TRAPPED;
    // seccomp_data: nr @0, arch @4, instruction_pointer @8 (lo) / @12 (hi), args[i] @16+8i.
    let mut p = vec![
        ld(4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(ALLOW),
        ld(0),
        jeq(libc::SYS_mmap as u32, 0, 6),
        ld(16 + 3 * 8),
        ins(BPF_JMP | BPF_JSET | BPF_K, 3, 0, libc::MAP_FIXED as u32),
        ld(16 + 2 * 8),
        ins(BPF_JMP | BPF_JSET | BPF_K, 1, 0, libc::PROT_EXEC as u32),
        ret(ALLOW),
        // MAP_FIXED or PROT_EXEC: to the IP checks.
        ins(BPF_JMP | BPF_JA, 0, 0, trapped.len() as u32 + 1),
    ];
    for (i, nr) in trapped.iter().enumerate() {
        let to_ip = (trapped.len() - i) as u8; // skip the rest and the ALLOW
        p.push(jeq(*nr as u32, to_ip, 0));
    }
    p.push(ret(ALLOW));
    // IP checks. The trampoline first.
    p.push(ld(12));
    p.push(jeq((trampoline >> 32) as u32, 0, 3));
    p.push(ld(8));
    p.push(jeq(trampoline as u32, 0, 1));
    p.push(ret(ALLOW));
    // Then each text range [a, b): trap if a <= ip < b. Compares the high word, then
    // the low word (ranges never straddle a 4 GiB boundary in practice; one that does
    // is split).
    let mut pieces = Vec::new();
    for r in text {
        let mut a = r.start;
        while a < r.end {
            let b = r.end.min((a | 0xffff_ffff) + 1);
            pieces.push((a, b));
            a = b;
        }
    }
    for (a, b) in pieces {
        // ld hi; jeq hi(a) ? next : skip 5; ld lo; jge lo(a) ? next : skip 3;
        // jge lo(b) ? skip 1 : next; ret TRAP
        let lo_b = b as u32;
        let ends_at_boundary = lo_b == 0;
        p.push(ld(12));
        p.push(jeq((a >> 32) as u32, 0, 4));
        p.push(ld(8));
        p.push(ins(BPF_JMP | BPF_JGE | BPF_K, 0, 2, a as u32));
        if ends_at_boundary {
            p.push(ins(BPF_JMP | BPF_JA, 0, 0, 0));
        } else {
            p.push(ins(BPF_JMP | BPF_JGE | BPF_K, 1, 0, lo_b));
        }
        p.push(ret(TRAP));
    }
    p.push(ret(ALLOW));
    p
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
                let _ = ready_tx.send(());
                worker(shared, wake, stop2)
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

/// Perform `madvise` through the trampoline (unmonitored): the raw baseline for
/// benchmarks, and the way driver code can bypass the trap.
pub fn raw_madvise(addr: usize, len: usize, advice: i32) -> i64 {
    raw_syscall(
        libc::SYS_madvise,
        [addr as u64, len as u64, advice as u64, 0, 0, 0],
    )
}

/// For measuring the physical floor of a seccomp trap on this machine: from now on,
/// `getppid` is trapped by a filter with `SECCOMP_RET_TRAP` and answered (with 1) by a
/// SIGSYS handler that does nothing else, so a timed `getppid` costs signal delivery,
/// the handler call and `rt_sigreturn` — what every trapped call pays before the
/// monitor does any work.
///
/// For benchmarks only, in a process of its own: the filter cannot be removed, and it
/// takes SIGSYS, so the monitor can never be installed in that process afterwards.
pub fn install_trap_floor() -> Result<()> {
    extern "C" fn answer(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut c_void) {
        // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
        let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = 1;
    }
    if INSTALLED.load(Ordering::Acquire) {
        return Err(Error::MonitorConflict {
            what: "the seccomp monitor is installed in this process; measure the floor in another",
        });
    }
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 4),
        ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),
        ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, libc::SYS_getppid as u32),
        ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_TRAP),
        ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) = answer;
    // SAFETY: installs a SIGSYS handler that only writes the saved rax of the trapped
    // call, then NO_NEW_PRIVS and a filter for this thread; `prog` and `filter`
    // outlive the calls.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        // The monitor's flags, so that the two traps compare like for like.
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            -1
        } else {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            ) as i32
        }
    };
    if r != 0 {
        return Err(Error::MonitorUnavailable {
            monitor: "seccomp",
            reason: format!(
                "installing the floor filter failed ({})",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}
