//! Who makes the call: a child that shares this process's mm (`clone(CLONE_VM)`,
//! `vfork`), application code the registry runs (`Registry::submit`'s build closure),
//! and signal handlers (raised inside registry code; process-directed, while the only
//! threads that do not block the signal are the driver's own).

use super::{map_hole, submit_error, Ctx, LEN};
use crate::common::Anon;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use userptr::driver::RegionObserver;
use userptr::{Cause, Descriptor, Perm, Registry, Status, WaitMode};

pub(crate) fn run(ctx: &Ctx<'_>, path: &str) -> &'static str {
    match path {
        "clone_vm_munmap" => mm_sharing_child(ctx, false),
        "vfork_munmap" => mm_sharing_child(ctx, true),
        "submit_closure_munmap" => submit_closure(ctx),
        "signal_in_registry" => signal_in_registry(ctx),
        "signal_to_driver_thread" => signal_to_driver_thread(ctx),
        _ => unreachable!("{path}"),
    }
}

/// Start a child that shares this mm, by `vfork` (on this very stack; this thread
/// waits until it exits) or by `clone(CLONE_VM | SIGCHLD)` on `stack_top` (no
/// CLONE_THREAD, no TLS of its own). The child makes raw `syscall`s only, from this
/// test's own code: munmap(addr, len), then mmap(addr, len, RW, MAP_PRIVATE |
/// MAP_ANONYMOUS | MAP_FIXED_NOREPLACE), then exit 0 (1: the munmap failed, 2: the
/// mmap did). Returns the child's pid (or -errno).
///
/// # Safety
/// `[addr, addr + len)` is the caller's own mapping, which nobody uses meanwhile;
/// `stack_top` (for clone) is the top of a writable mapping the caller keeps until
/// the child has exited.
unsafe fn spawn_unmapper(vfork: bool, stack_top: usize, addr: usize, len: usize) -> i64 {
    let (nr, flags) = if vfork {
        (libc::SYS_vfork, 0)
    } else {
        (libc::SYS_clone, (libc::CLONE_VM | libc::SIGCHLD) as u64)
    };
    let ret: i64;
    // SAFETY: the parent comes back from the first `syscall` with only rax, rcx and
    // r11 changed (declared); the child never returns to Rust code: it exits by
    // `exit(2)` at the end of the block. With vfork, the child runs on this stack
    // below rsp while this thread is suspended; with clone, on the caller's stack.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            // The child.
            "mov eax, 11", // munmap
            "mov rdi, r12",
            "mov rsi, r13",
            "syscall",
            "test rax, rax",
            "jnz 3f",
            "mov eax, 9", // mmap
            "mov rdi, r12",
            "mov rsi, r13",
            "mov edx, 3",         // PROT_READ | PROT_WRITE
            "mov r10d, 0x100022", // MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
            "mov r8, -1",
            "xor r9d, r9d",
            "syscall",
            "cmp rax, r12",
            "jne 4f",
            "xor edi, edi",
            "mov eax, 60", // exit
            "syscall",
            "3:",
            "mov edi, 1",
            "mov eax, 60",
            "syscall",
            "4:",
            "mov edi, 2",
            "mov eax, 60",
            "syscall",
            "2:",
            inout("rax") nr => ret,
            inout("rdi") flags => _,
            inout("rsi") stack_top => _,
            inout("rdx") 0u64 => _,
            inout("r10") 0u64 => _,
            inout("r8") 0u64 => _,
            inout("r9") 0u64 => _,
            in("r12") addr,
            in("r13") len,
            out("rcx") _,
            out("r11") _,
        );
    }
    ret
}

fn mm_sharing_child(ctx: &Ctx<'_>, vfork: bool) -> &'static str {
    let buf = Anon::new(LEN);
    let stack = Anon::new(1 << 20);
    let a = buf.addr;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    let mut status = 0;
    let mut pid = 0;
    ctx.change(a..a + LEN, Cause::Unmap, || {
        // SAFETY: the child unmaps and maps again the test's own buffer; the stack
        // lives until it was waited for.
        pid = unsafe { spawn_unmapper(vfork, stack.addr + stack.len, a, LEN) };
        if pid > 0 {
            // SAFETY: waits for the child just made.
            unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        }
    });
    let how = if vfork { "vfork" } else { "clone(CLONE_VM)" };
    if pid <= 0 {
        eprintln!("{how}: {}", std::io::Error::from_raw_os_error(-pid as i32));
        return "error";
    }
    if libc::WIFSIGNALED(status) {
        eprintln!(
            "the {how} child was killed by {}",
            crate::common::signal_name(libc::WTERMSIG(status))
        );
        return "crashed";
    }
    match libc::WEXITSTATUS(status) {
        0 => ctx.look(&u, a, LEN),
        // The munmap failed: refused, if a monitor did it and the pages stayed.
        1 if ctx.monitored => {
            eprintln!("the {how} child's munmap failed");
            match ctx.look(&u, a, LEN) {
                "caught" => "refused",
                c => c,
            }
        }
        n => {
            eprintln!("the {how} child failed: its munmap (1) / mmap (2) failed: {n}");
            "error"
        }
    }
}

fn submit_closure(ctx: &Ctx<'_>) -> &'static str {
    let buf = Anon::new(LEN);
    let a = buf.addr;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    let changed = AtomicBool::new(false);
    let r = ctx.reg.submit(ctx.q, &[&u], |iova| {
        // Application code: the first time it is called, it unmaps the range it was
        // handed and maps fresh memory there.
        if !changed.swap(true, Ordering::SeqCst) {
            let inv = ctx.tell_start(a..a + LEN, Cause::Unmap);
            // SAFETY: unmaps the test's own buffer, then maps it again.
            unsafe { libc::munmap(a as *mut _, LEN) };
            map_hole(a, LEN, false);
            ctx.tell_end(inv);
        }
        vec![Descriptor::fill(iova[0], LEN as u64, 0xab)]
    });
    let f = match r {
        Ok(f) => f,
        Err(e) => return submit_error(&e),
    };
    let st = ctx
        .q
        .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
        .map(|c| c.status);
    ctx.sync();
    match st {
        Ok(Status::Ok) if super::read(a, LEN).iter().all(|&b| b == 0xab) => "caught",
        Ok(Status::Ok) => "stale",
        other => {
            eprintln!("the command ended {other:?}");
            "error"
        }
    }
}

/// What the SIGUSR1 handler discards, and who ran it.
struct Target {
    addr: AtomicUsize,
    /// `explicit`: the handler tells this registry (a leaked clone; null otherwise).
    reg: AtomicPtr<Registry>,
    hits: AtomicUsize,
    tid: AtomicI32,
}

// SeqCst throughout: the handler and the path hand each other plain values, rarely.
static TARGET: Target = Target {
    addr: AtomicUsize::new(0),
    reg: AtomicPtr::new(std::ptr::null_mut()),
    hits: AtomicUsize::new(0),
    tid: AtomicI32::new(0),
};

extern "C" fn discard_handler(_: libc::c_int) {
    let a = TARGET.addr.load(Ordering::SeqCst);
    let reg = TARGET.reg.load(Ordering::SeqCst);
    // SAFETY: a non-null `reg` is the registry clone `arm` leaked, freed only after
    // the handler is disarmed.
    let reg = unsafe { reg.as_ref() };
    let range = a as u64..(a + LEN) as u64;
    let inv = reg.map(|r| r.invalidate_start(range, Cause::Discard).unwrap());
    // SAFETY: discards the test's own buffer.
    unsafe { libc::madvise(a as *mut _, LEN, libc::MADV_DONTNEED) };
    if let (Some(r), Some(inv)) = (reg, inv) {
        r.invalidate_end(inv);
    }
    // SAFETY: gettid has no preconditions.
    TARGET
        .tid
        .store(unsafe { libc::gettid() }, Ordering::SeqCst);
    TARGET.hits.fetch_add(1, Ordering::SeqCst);
}

/// Point the SIGUSR1 handler at `addr` and install it.
fn arm(ctx: &Ctx<'_>, addr: usize) {
    TARGET.addr.store(addr, Ordering::SeqCst);
    if ctx.explicit {
        let reg = Box::into_raw(Box::new(ctx.reg.clone()));
        TARGET.reg.store(reg, Ordering::SeqCst);
    }
    // SAFETY: installs the handler in this child process only.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = discard_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Put SIGUSR1 back to its default and drop the handler's registry handle.
fn disarm() {
    // SAFETY: restores the default disposition (nothing is pending any more).
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_DFL) };
    let reg = TARGET.reg.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !reg.is_null() {
        // SAFETY: the clone `arm` leaked; the handler can no longer run.
        drop(unsafe { Box::from_raw(reg) });
    }
}

/// Calls `raise(SIGUSR1)` from inside the registry, once: when the registry tells its
/// observers about a new pin.
struct RaiseOnce(AtomicBool);

impl RegionObserver for RaiseOnce {
    fn pinned(&self, _range: std::ops::Range<u64>) {
        if !self.0.swap(true, Ordering::SeqCst) {
            // SAFETY: raises a signal whose handler this path installed.
            unsafe { libc::raise(libc::SIGUSR1) };
        }
    }
}

fn signal_in_registry(ctx: &Ctx<'_>) -> &'static str {
    let buf = Anon::new(LEN);
    let a = buf.addr;
    arm(ctx, a);
    ctx.reg
        .add_observer(Arc::new(RaiseOnce(AtomicBool::new(false))));
    // The pin made here raises the signal from inside the registry.
    let r = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => {
            ctx.sync();
            if TARGET.hits.load(Ordering::SeqCst) != 1 {
                eprintln!("the handler did not run by the time register returned");
                "error"
            } else {
                ctx.look(&u, a, LEN)
            }
        }
        Err(cell) => cell,
    };
    disarm();
    r
}

/// The short name of thread `tid` of this process.
fn comm(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The driver's own threads (and the kernel's io_uring workers, which take no
/// signals): every other thread is the application's.
fn is_driver_thread(name: &str) -> bool {
    name.starts_with("userptr-") || name.starts_with("iou-")
}

static MASK_ACKS: AtomicUsize = AtomicUsize::new(0);

/// SIGUSR2 handler: the interrupted thread returns with SIGUSR1 blocked too.
extern "C" fn block_usr1_on_return(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted context; its saved mask is what
    // rt_sigreturn installs.
    unsafe {
        libc::sigaddset(
            &mut (*(uc as *mut libc::ucontext_t)).uc_sigmask,
            libc::SIGUSR1,
        )
    };
    MASK_ACKS.fetch_add(1, Ordering::SeqCst);
}

/// Block SIGUSR1 on every application thread but this one (the test harness's main
/// thread, say), so that a process-directed SIGUSR1 can only go to a driver thread
/// or stay pending until this thread unblocks it.
fn block_usr1_on_other_application_threads() {
    // SAFETY: installs a SIGUSR2 handler in this child process only.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = block_usr1_on_return as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        // SIGUSR1 is blocked while the handler runs too: the handler acknowledges
        // before its sigreturn installs the new mask, and without this the SIGUSR1
        // sent right after the acknowledgement could land in that window.
        libc::sigaddset(&mut sa.sa_mask, libc::SIGUSR1);
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    // SAFETY: gettid/getpid have no preconditions.
    let (me, pid) = unsafe { (libc::gettid(), libc::getpid()) };
    let mut sent = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let tid: i32 = t.file_name().to_string_lossy().parse().unwrap();
        if tid != me && !is_driver_thread(&comm(tid)) {
            // SAFETY: signals a thread of this process, whose handler is installed.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) };
            sent += 1;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while MASK_ACKS.load(Ordering::SeqCst) < sent {
        assert!(
            std::time::Instant::now() < deadline,
            "application threads did not take SIGUSR2"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn sigusr1_mask(how: i32) {
    // SAFETY: changes this thread's mask only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        assert_eq!(libc::pthread_sigmask(how, &set, std::ptr::null_mut()), 0);
    }
}

fn signal_to_driver_thread(ctx: &Ctx<'_>) -> &'static str {
    let buf = Anon::new(LEN);
    let a = buf.addr;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    // The pin is made and cached: the engine (and a monitor's worker) run by now.
    assert_eq!(ctx.fill(&u, LEN, 1).unwrap(), Status::Ok);
    arm(ctx, a);
    sigusr1_mask(libc::SIG_BLOCK);
    block_usr1_on_other_application_threads();
    // SAFETY: a process-directed signal to this process, whose handler is installed.
    unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(50));
    // Delivered here now, if no other thread took it.
    sigusr1_mask(libc::SIG_UNBLOCK);
    ctx.sync();
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let hits = TARGET.hits.load(Ordering::SeqCst);
    let tid = TARGET.tid.load(Ordering::SeqCst);
    let r = if hits != 1 {
        eprintln!("the handler ran {hits} times");
        "error"
    } else if tid != me {
        let name = comm(tid);
        eprintln!("the application's SIGUSR1 handler ran on thread {tid} ({name}), not on the application's thread");
        "error"
    } else {
        ctx.look(&u, a, LEN)
    };
    disarm();
    r
}
