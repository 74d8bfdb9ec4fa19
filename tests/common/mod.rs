//! Shared test support: serialisation of tests that read process-wide pin counters,
//! the pin-leak check, anonymous memory regions, and child-process re-execution for
//! tests that change process-wide state (rlimits, credentials, seccomp filters).
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};
use userptr::proc_status::pinned_bytes;

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
