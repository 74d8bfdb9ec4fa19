//! Shared test support: serialisation of tests that read process-wide pin counters,
//! the pin-leak check, anonymous memory regions, and child-process re-execution for
//! tests that change process-wide state (rlimits, credentials, seccomp filters).
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};
use userptr::proc_status::pinned_bytes;
use userptr::{Driver, Perm, Registry, UserMapping, Userptr};

/// `Registry::register` for the tests, which hand memory over by address everywhere
/// (an mmap they own, a page they punch a hole in, a range they remap on purpose).
pub trait RegisterTest {
    /// `unsafe` `Registry::register`, under the tests' blanket contract (see the impl).
    fn register_test(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
    ) -> userptr::Result<Userptr<'static>>;
}

impl RegisterTest for Registry {
    fn register_test(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
    ) -> userptr::Result<Userptr<'static>> {
        // SAFETY: test memory, owned by the test for its duration: the buffers are the
        // test's own mappings, which it reads only after waiting for the commands that
        // write them (or copies out through `Anon::read`, holding no reference); the
        // tests that unmap, discard or remap registered memory do so under a monitor
        // or an explicit invalidation, or on purpose to show the stale-pin hazard on
        // pages the kernel keeps pinned (never a Rust value's memory). Ranges that are
        // not mapped at all are refused with an error, touching nothing.
        unsafe { self.register(addr, len, perm) }
    }
}

/// `Driver::map_user` for the tests, as [`RegisterTest`] is for the registry.
pub trait MapTest {
    /// `unsafe` `Driver::map_user`, under the tests' blanket contract (see the impl).
    fn map_user_test(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
    ) -> userptr::Result<UserMapping<'static>>;
}

impl MapTest for Driver {
    fn map_user_test(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
    ) -> userptr::Result<UserMapping<'static>> {
        // SAFETY: as in `RegisterTest for Registry`: test memory owned by the test for
        // its duration, read only after the device's commands on it are waited for.
        unsafe { self.map_user(addr, len, perm) }
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Tests in one binary run on parallel threads of one process, but `VmPin` is
/// per process: every test that checks it holds this lock.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records `VmPin` at creation; `check` asserts it is back there.
pub struct PinCheck {
    start: u64,
    _serial: MutexGuard<'static, ()>,
}

impl PinCheck {
    pub fn start() -> PinCheck {
        let g = serial();
        PinCheck {
            start: pinned_bytes().expect("VmPin readable"),
            _serial: g,
        }
    }

    pub fn check(self) {
        let now = pinned_bytes().expect("VmPin readable");
        assert_eq!(
            now, self.start,
            "pinned memory leaked: VmPin {} -> {now}",
            self.start
        );
    }
}

/// Test buffers live far below the kernel's mmap frontier, each at its own address
/// from a bump counter. The kernel's top-down allocator takes the highest free gap
/// that fits, and the free space just below its frontier always comes first, so a
/// hole a test punches here (munmap, then re-map the same address) is never taken by
/// another thread's mmap in the meantime: a monitor thread's allocation, say.
const ISOLATED_BASE: usize = 0x100_0000_0000; // 1 TiB
static NEXT_ISOLATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Map `len` bytes anonymous at the next isolated address (2 MiB aligned, with at
/// least one 2 MiB gap to the neighbour); falls back to a kernel-chosen address if
/// something is there already.
pub fn map_isolated(len: usize, prot: i32) -> *mut libc::c_void {
    const STEP: usize = 2 << 20;
    let span = len.div_ceil(STEP) * STEP + STEP;
    // Relaxed: the counter only hands out distinct offsets; no other memory is
    // published through it.
    let off = NEXT_ISOLATED.fetch_add(span, std::sync::atomic::Ordering::Relaxed);
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: NOREPLACE never replaces an existing mapping; a fresh anonymous
    // mapping aliases nothing.
    let p = unsafe {
        libc::mmap(
            (ISOLATED_BASE + off) as *mut _,
            len,
            prot,
            flags | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p != libc::MAP_FAILED {
        return p;
    }
    // SAFETY: as above, at a kernel-chosen address.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap failed");
    p
}

/// An anonymous private mapping, every page touched, unmapped on drop (unless
/// `forget`-ed by a test that unmaps it itself).
pub struct Anon {
    pub addr: usize,
    pub len: usize,
    live: bool,
}

impl Anon {
    pub fn new(len: usize) -> Anon {
        Anon::with_prot(len, libc::PROT_READ | libc::PROT_WRITE)
    }

    pub fn with_prot(len: usize, prot: i32) -> Anon {
        let p = map_isolated(len, prot);
        let a = Anon {
            addr: p as usize,
            len,
            live: true,
        };
        if prot & libc::PROT_WRITE != 0 {
            a.fill(0x11);
        }
        a
    }

    pub fn fill(&self, b: u8) {
        // SAFETY: the region is mapped read-write for `len` bytes while `live`.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, b, self.len) }
    }

    /// A copy of the bytes as the process sees them now.
    pub fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: mapped and readable for `len` bytes; copied out so no reference is held
        // while a device may write.
        unsafe { std::ptr::copy_nonoverlapping(self.addr as *const u8, v.as_mut_ptr(), self.len) };
        v
    }

    pub fn madvise(&self, advice: i32) {
        // SAFETY: advising our own mapping.
        let r = unsafe { libc::madvise(self.addr as *mut _, self.len, advice) };
        assert_eq!(r, 0, "madvise failed: {}", std::io::Error::last_os_error());
    }

    pub fn mprotect(&self, prot: i32) {
        // SAFETY: changing protection of our own mapping.
        let r = unsafe { libc::mprotect(self.addr as *mut _, self.len, prot) };
        assert_eq!(r, 0, "mprotect failed");
    }

    /// Unmap now and keep the address (for tests that need a hole).
    pub fn unmap(&mut self) {
        if self.live {
            // SAFETY: our mapping; nothing references it.
            unsafe { libc::munmap(self.addr as *mut _, self.len) };
            self.live = false;
        }
    }

    /// Map fresh anonymous memory at the same address, touched with `b`: MAP_FIXED
    /// over the live mapping, or, after `unmap` left a hole, MAP_FIXED_NOREPLACE, so
    /// that an allocation another thread made there meanwhile is never clobbered (the
    /// test fails instead).
    pub fn remap_fixed(&mut self, b: u8) {
        let fixed = if self.live {
            libc::MAP_FIXED
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
        // SAFETY: maps over our own mapping, or into our own former (now empty) range.
        let p = unsafe {
            libc::mmap(
                self.addr as *mut _,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
                -1,
                0,
            )
        };
        assert_eq!(p as usize, self.addr, "another mapping took the hole");
        self.live = true;
        self.fill(b);
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// Environment variable that marks a re-executed child.
pub const CHILD_ENV: &str = "USERPTR_TEST_CHILD";

/// Re-run this test binary with only the (ignored) test `name`, as a child process,
/// and return its combined output; panics if it failed.
pub fn run_child(name: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("spawn child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {name} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {name} did not run:\n{text}"
    );
    text
}

/// Whether this process is a re-executed child.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// How a child process ended, with everything it printed.
pub struct ChildRun {
    /// `None`: it ran past its time limit and was killed.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// How long it ran.
    pub elapsed: std::time::Duration,
}

impl ChildRun {
    /// Standard output, then standard error.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.status.and_then(|s| s.signal())
    }

    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit 0", "killed by SIGSYS (31)", "timed out".
    pub fn describe(&self) -> String {
        match (self.status, self.signal()) {
            (None, _) => "timed out (killed)".into(),
            (Some(_), Some(sig)) => format!("killed by {}", signal_name(sig)),
            (Some(s), None) => format!("exit {}", s.code().unwrap_or(-1)),
        }
    }
}

/// `SIGSYS (31)`, for failure messages.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSYS => "SIGSYS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGFPE => "SIGFPE",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        _ => "signal",
    };
    format!("{name} ({sig})")
}

/// This test binary, re-run with only the (ignored) test `name`, marked as a child.
pub fn child_command(name: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        name,
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1");
    cmd
}

/// Run `cmd` to its end or until `limit` has passed (then its whole process group is
/// killed): a child that hangs is a failure that reports, never a hung test.
pub fn run_bounded(mut cmd: std::process::Command, limit: std::time::Duration) -> ChildRun {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        // Its own process group, so that a kill takes what it spawned too (and the
        // pipes close).
        .process_group(0);
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().expect("spawn child test");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break Some(s);
        }
        if std::time::Instant::now() >= deadline {
            // SAFETY: signals the process group this function created for the child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    ChildRun {
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Run every job's command, `parallel` at a time (the machine has few cores), each
/// bounded by `limit`; results in the jobs' order.
pub fn run_all<K: Send>(
    jobs: Vec<(K, std::process::Command)>,
    parallel: usize,
    limit: std::time::Duration,
) -> Vec<(K, ChildRun)> {
    let n = jobs.len();
    // Popped from the back: reversed, so the jobs start in their order.
    let queue = Mutex::new(jobs.into_iter().enumerate().rev().collect::<Vec<_>>());
    let done = Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| loop {
                let Some((i, (k, cmd))) = queue.lock().unwrap().pop() else {
                    break;
                };
                let r = run_bounded(cmd, limit);
                done.lock().unwrap().push((i, k, r));
            });
        }
    });
    let mut done = done.into_inner().unwrap();
    done.sort_by_key(|d| d.0);
    done.into_iter().map(|(_, k, r)| (k, r)).collect()
}

/// An i386 system call made with `int 0x80` from this 64-bit process: the kernel runs
/// it as a 32-bit (compat) call, and seccomp sees it as `AUDIT_ARCH_I386`. Arguments
/// go in ebx, ecx, edx, esi, edi, ebp; the kernel's raw result comes back (`-errno` on
/// failure).
///
/// # Safety
/// The call's effects (on memory, signals, ...) are the caller's to justify.
#[cfg(target_arch = "x86_64")]
pub unsafe fn int80(nr: u32, a: [u32; 6]) -> i32 {
    let ret: i32;
    // SAFETY: rbx and rbp cannot be asm operands, so they are swapped in and restored
    // around the instruction (push/pop leave rsp as it was); r8-r11 are declared
    // clobbered (older kernels did not preserve them across int 0x80). What the call
    // itself does is the caller's contract.
    unsafe {
        std::arch::asm!(
            "xchg {b:r}, rbx",
            "push rbp",
            "mov ebp, {p:e}",
            "int 0x80",
            "pop rbp",
            "xchg {b:r}, rbx",
            b = inout(reg) a[0] as u64 => _,
            p = in(reg) a[5],
            inout("eax") nr as i32 => ret,
            in("ecx") a[1],
            in("edx") a[2],
            in("esi") a[3],
            in("edi") a[4],
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
        );
    }
    ret
}

/// Whether `int 0x80` works in this process (the kernel may be built or booted without
/// 32-bit emulation, and then the instruction kills the caller): probed in a forked
/// child that makes the i386 `getpid` (20).
pub fn int80_works() -> bool {
    // SAFETY: the child makes one system call and exits at once, touching nothing
    // of the parent's state.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let me = int80(20, [0; 6]);
            libc::_exit(if me > 0 { 0 } else { 1 });
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0
    }
}

/// Anonymous read-write memory below 4 GiB (MAP_32BIT), every page touched: the only
/// memory an i386 call made with `int 0x80` can name.
pub fn map_low(len: usize) -> usize {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen low address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap(MAP_32BIT)");
    assert!((p as usize) + len <= 1 << 32);
    // SAFETY: the mapping just made, len bytes.
    unsafe { std::ptr::write_bytes(p as *mut u8, 0x11, len) };
    p as usize
}

/// The page frame number behind each page of `[addr, addr + len)` as
/// `/proc/self/pagemap` reports it (0: not present, or PFNs hidden: they need
/// CAP_SYS_ADMIN). Read here, independently of the driver's own reader.
pub fn pfns(addr: usize, len: usize) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").expect("open pagemap");
    let pages = len.div_ceil(4096);
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (addr / 4096 * 8) as u64)
        .expect("read pagemap");
    buf.chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            if e & (1 << 63) != 0 {
                e & ((1 << 55) - 1)
            } else {
                0
            }
        })
        .collect()
}

/// Whether this process sees real PFNs in pagemap (root, CAP_SYS_ADMIN).
pub fn pfns_visible() -> bool {
    let probe = Anon::new(4096);
    pfns(probe.addr, 4096)[0] != 0
}

/// What a failed child said, briefly: how it ended, and its panic message (or the
/// last lines of its output), without the backtrace.
pub fn failure_summary(run: &ChildRun) -> String {
    let text = run.text();
    let lines: Vec<&str> = text.lines().collect();
    let msg: Vec<&str> = match lines.iter().position(|l| l.contains("panicked at")) {
        Some(i) => lines[i..]
            .iter()
            .take_while(|l| !l.starts_with("stack backtrace:") && !l.starts_with("note:"))
            .take(12)
            .copied()
            .collect(),
        None => {
            let err: Vec<&str> = run
                .stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect();
            err[err.len().saturating_sub(12)..].to_vec()
        }
    };
    if msg.is_empty() {
        return run.describe();
    }
    format!("{}\n    {}", run.describe(), msg.join("\n    "))
}

/// `GpuVm::submit` for the tests, as [`RegisterTest`] is for the registry.
pub trait VmSubmitTest {
    /// `unsafe` `GpuVm::submit`, under the tests' blanket contract (see the impl).
    fn submit_test(
        &self,
        q: &userptr::CommandQueue,
        descs: &[userptr::Descriptor],
    ) -> userptr::Result<userptr::BatchFences>;
}

impl VmSubmitTest for userptr::driver::gpuvm::GpuVm {
    fn submit_test(
        &self,
        q: &userptr::CommandQueue,
        descs: &[userptr::Descriptor],
    ) -> userptr::Result<userptr::BatchFences> {
        // SAFETY: as in `RegisterTest for Registry`: the commands reach the test's own
        // buffers (bound, or SVM pointers into them), which it reads only after waiting
        // for the commands.
        unsafe { self.submit(q, descs) }
    }
}
