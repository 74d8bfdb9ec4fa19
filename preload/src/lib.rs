//! The LD_PRELOAD shim: for processes that cannot install a seccomp filter.
//!
//! Loaded with `LD_PRELOAD=libuserptr_preload.so`, it interposes libc's `munmap`,
//! `madvise`, `mprotect`, `mremap`, `mmap`/`mmap64` (with `MAP_FIXED`), `brk`, `sbrk`
//! and `shmdt`. Each call is reported to the hooks that userptr installs through
//! [`userptr_preload_install`] (`monitor::preload` in the driver) *before* the real
//! function runs, and ended after it returns.
//!
//! What it cannot see, by construction (the reason seccomp is the default source):
//! calls glibc makes internally (`free()` → `munmap`, `realloc()` → `mremap`), raw
//! `syscall()`, statically linked code, and anything that binds to libc before the
//! shim. Until hooks are installed every call passes straight through.
//!
//! Written by hand because no crate offers symbol interposition; it is a thin layer
//! over `dlsym(RTLD_NEXT, …)`.

#![deny(missing_docs)]

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Kind passed to the start hook (the driver maps them to its causes): the pages go.
pub const KIND_UNMAP: u32 = 0;
/// Kind: a destructive `madvise`.
pub const KIND_DISCARD: u32 = 1;
/// Kind: a moving `mremap` (the argument is the destination, 0: the kernel chose).
pub const KIND_REMAP: u32 = 2;
/// Kind: `mprotect` (the argument is the new protection).
pub const KIND_PROTECT: u32 = 3;

/// The hooks userptr installs. `start` returns a token (0: nothing to end) that is
/// passed to `end` after the real call.
#[repr(C)]
pub struct Hooks {
    /// Passed back to both hooks.
    pub ctx: *mut c_void,
    /// Called before the real call with the page range, the kind and its argument.
    pub start: extern "C" fn(ctx: *mut c_void, start: u64, end: u64, kind: u32, arg: u64) -> u64,
    /// Called after the real call with `start`'s token (when it was not 0).
    pub end: extern "C" fn(ctx: *mut c_void, token: u64),
}

static HOOKS: AtomicPtr<Hooks> = AtomicPtr::new(std::ptr::null_mut());

/// Install (or, with null, remove) the hooks. The pointer must stay valid while
/// installed. Returns the shim's ABI version (1).
///
/// # Safety
/// `hooks` is null or points to a `Hooks` that outlives its installation.
#[no_mangle]
pub unsafe extern "C" fn userptr_preload_install(hooks: *const Hooks) -> c_int {
    // Release: the hooks' fields are visible to a caller that loads the pointer.
    HOOKS.store(hooks as *mut Hooks, Ordering::Release);
    1
}

/// Resolve the next definition of `name` (libc's), cached in `slot`.
fn real(slot: &AtomicUsize, name: &[u8]) -> usize {
    // Relaxed: a benign race; every thread resolves the same address.
    let mut f = slot.load(Ordering::Relaxed);
    if f == 0 {
        // SAFETY: `name` is a NUL-terminated literal; RTLD_NEXT finds libc's symbol.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) } as usize;
        slot.store(f, Ordering::Relaxed);
    }
    f
}

fn page_range(addr: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let end = addr.checked_add(len)?.checked_next_multiple_of(4096)?;
    Some((addr & !4095, end))
}

/// Run `call` between the start and end hooks for `range`.
fn around<R>(range: Option<(u64, u64)>, kind: u32, arg: u64, call: impl FnOnce() -> R) -> R {
    let h = HOOKS.load(Ordering::Acquire);
    let (Some((s, e)), false) = (range, h.is_null()) else {
        return call();
    };
    // SAFETY: installed hooks outlive their installation (the installer's contract).
    let h = unsafe { &*h };
    let token = (h.start)(h.ctx, s, e, kind, arg);
    let r = call();
    if token != 0 {
        (h.end)(h.ctx, token);
    }
    r
}

macro_rules! real_fn {
    ($slot:ident, $name:literal, $ty:ty) => {{
        static $slot: AtomicUsize = AtomicUsize::new(0);
        let f = real(&$slot, concat!($name, "\0").as_bytes());
        assert!(f != 0, concat!("userptr-preload: libc has no ", $name));
        // SAFETY: dlsym returned libc's function of this exact C signature.
        unsafe { std::mem::transmute::<usize, $ty>(f) }
    }};
}

/// # Safety
/// As libc's `munmap`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let f = real_fn!(
        F,
        "munmap",
        unsafe extern "C" fn(*mut c_void, usize) -> c_int
    );
    around(
        page_range(addr as u64, len as u64),
        KIND_UNMAP,
        0,
        // SAFETY: the caller's own arguments, passed on to libc's function (the caller
        // keeps libc's contract, as this function's `# Safety` says).
        || unsafe { f(addr, len) },
    )
}

/// # Safety
/// As libc's `madvise`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let f = real_fn!(
        F,
        "madvise",
        unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int
    );
    let destructive = matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
    );
    let range = if destructive {
        page_range(addr as u64, len as u64)
    } else {
        None
    };
    // SAFETY: the caller's own arguments, passed on to libc's function (the caller
    // keeps libc's contract, as this function's `# Safety` says).
    around(range, KIND_DISCARD, 0, || unsafe { f(addr, len, advice) })
}

/// # Safety
/// As libc's `mprotect`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    let f = real_fn!(
        F,
        "mprotect",
        unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int
    );
    around(
        page_range(addr as u64, len as u64),
        KIND_PROTECT,
        prot as u64,
        // SAFETY: the caller's own arguments, passed on to libc's function (the caller
        // keeps libc's contract, as this function's `# Safety` says).
        || unsafe { f(addr, len, prot) },
    )
}

/// # Safety
/// As libc's `mremap` (the optional fifth argument is passed through).
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let f = real_fn!(
        F,
        "mremap",
        unsafe extern "C" fn(*mut c_void, usize, usize, c_int, *mut c_void) -> *mut c_void
    );
    let to = if flags & libc::MREMAP_FIXED != 0 {
        new_addr as u64
    } else {
        0
    };
    // With MREMAP_FIXED whatever was at the destination is unmapped too.
    let dest = if to != 0 {
        page_range(to, new_len as u64)
    } else {
        None
    };
    around(dest, KIND_UNMAP, 0, || {
        around(
            page_range(old as u64, old_len as u64),
            KIND_REMAP,
            to,
            // SAFETY: the caller's own arguments, passed on to libc's function (the caller
            // keeps libc's contract, as this function's `# Safety` says).
            || unsafe { f(old, old_len, new_len, flags, new_addr) },
        )
    })
}

/// # Safety
/// As libc's `mmap`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let f = real_fn!(
        F,
        "mmap",
        unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void
    );
    let range = if flags & libc::MAP_FIXED != 0 {
        page_range(addr as u64, len as u64)
    } else {
        None
    };
    // SAFETY: the caller's own arguments, passed on to libc's function (the caller
    // keeps libc's contract, as this function's `# Safety` says).
    around(range, KIND_UNMAP, 0, || unsafe {
        f(addr, len, prot, flags, fd, off)
    })
}

/// # Safety
/// As libc's `mmap64`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off64_t,
) -> *mut c_void {
    // SAFETY: the caller's own arguments, passed on to libc's function (the caller
    // keeps libc's contract, as this function's `# Safety` says).
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

fn current_brk() -> u64 {
    // SAFETY: brk(0) only queries.
    unsafe { libc::syscall(libc::SYS_brk, 0) as u64 }
}

/// # Safety
/// As libc's `brk`.
#[no_mangle]
pub unsafe extern "C" fn brk(addr: *mut c_void) -> c_int {
    let f = real_fn!(F, "brk", unsafe extern "C" fn(*mut c_void) -> c_int);
    let cur = current_brk();
    let range = if (addr as u64) < cur {
        page_range(addr as u64, cur - addr as u64)
    } else {
        None
    };
    // SAFETY: the caller's own arguments, passed on to libc's function (the caller
    // keeps libc's contract, as this function's `# Safety` says).
    around(range, KIND_UNMAP, 0, || unsafe { f(addr) })
}

/// # Safety
/// As libc's `sbrk`.
#[no_mangle]
pub unsafe extern "C" fn sbrk(incr: libc::intptr_t) -> *mut c_void {
    let f = real_fn!(
        F,
        "sbrk",
        unsafe extern "C" fn(libc::intptr_t) -> *mut c_void
    );
    let range = if incr < 0 {
        let cur = current_brk();
        page_range(cur - incr.unsigned_abs() as u64, incr.unsigned_abs() as u64)
    } else {
        None
    };
    // SAFETY: the caller's own arguments, passed on to libc's function (the caller
    // keeps libc's contract, as this function's `# Safety` says).
    around(range, KIND_UNMAP, 0, || unsafe { f(incr) })
}

/// The extent of the mapping that starts at `addr` (for `shmdt`), from /proc/self/maps.
fn mapping_at(addr: u64) -> Option<(u64, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let (a, b) = l.split_whitespace().next()?.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        (a == addr).then_some((a, b))
    })
}

/// # Safety
/// As libc's `shmdt`.
#[no_mangle]
pub unsafe extern "C" fn shmdt(addr: *const c_void) -> c_int {
    let f = real_fn!(F, "shmdt", unsafe extern "C" fn(*const c_void) -> c_int);
    let range = if HOOKS.load(Ordering::Acquire).is_null() {
        None
    } else {
        mapping_at(addr as u64)
    };
    // SAFETY: the caller's own arguments, passed on to libc's function (the caller
    // keeps libc's contract, as this function's `# Safety` says).
    around(range, KIND_UNMAP, 0, || unsafe { f(addr) })
}
