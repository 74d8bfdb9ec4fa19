//! The LD_PRELOAD shim: for processes that cannot install a seccomp filter.
//!
//! Loaded with `LD_PRELOAD=libuserptr_preload.so`, it interposes every exported libc
//! entry point that changes the pages behind a range: `munmap`, `mmap`/`mmap64` (with
//! `MAP_FIXED`), `mremap`, `madvise`, `posix_madvise`, `process_madvise`, `mprotect`,
//! `pkey_mprotect`, `brk`, `sbrk`/`__sbrk`, `shmat` (with `SHM_REMAP`), `shmdt` and
//! `remap_file_pages`. Each call is reported to the hooks that userptr installs
//! through [`userptr_preload_install`] (`monitor::preload` in the driver) *before* the
//! real function runs, and ended after it returns.
//!
//! **It classifies nothing.** Every advice, harmless or not, known or not, is reported
//! as [`KIND_ADVISE`] with the advice as the argument; the driver decides (with the one
//! classification every monitor uses, `monitor::advice`). A range is reported whenever
//! the call *may* change it, as far as the kernel reaches (a huge page, a whole SysV
//! segment, a `PROT_GROWSDOWN` mapping: the `extent` module); a call the kernel will
//! refuse may be reported too (that costs at most a re-pin), and when the shim cannot
//! tell which range a call touches it reports everything from the address up.
//!
//! **It changes nothing either.** Every wrapper returns what libc's function returns,
//! with the same `errno` (the hooks and the shim's own look-ups keep the caller's
//! `errno`), for valid and invalid arguments alike, and never touches memory the
//! caller points to except through the kernel (`process_madvise`'s iovec array is read
//! with `process_vm_readv`, which answers `EFAULT` where the caller would fault).
//!
//! What it cannot see is listed in the driver's `monitor::preload` module doc. Until
//! hooks are installed every call passes straight through.
//!
//! Written by hand because no crate offers symbol interposition; it is a thin layer
//! over `dlsym(RTLD_NEXT, …)`.

#![deny(missing_docs)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

mod extent;

/// The hook ABI this shim speaks, returned by [`userptr_preload_install`]. 1: the shim
/// classified advice itself (`KIND_DISCARD`); 2: every advice is reported as
/// [`KIND_ADVISE`].
pub const ABI_VERSION: c_int = 2;

/// Kind passed to the start hook (the driver maps them to its causes): the pages go.
pub const KIND_UNMAP: u32 = 0;
/// Kind: a moving `mremap` (the argument is the destination, 0: the kernel chose).
pub const KIND_REMAP: u32 = 2;
/// Kind: `mprotect` or `pkey_mprotect` (the argument is the new protection).
pub const KIND_PROTECT: u32 = 3;
/// Kind: `madvise`, `posix_madvise` or `process_madvise`, whatever the advice (the
/// argument is the advice, the C `int` sign-extended). Kind 1 (ABI 1's destructive
/// advice) is never sent.
pub const KIND_ADVISE: u32 = 4;

pub(crate) const PAGE: u64 = 4096;
/// The last page-aligned address: "from here to the top", when a range is unknown.
pub(crate) const TOP: u64 = !(PAGE - 1);
/// The kernel's limit on an iovec array (`UIO_MAXIOV`).
const UIO_MAXIOV: usize = 1024;

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
/// installed. Returns the shim's ABI version ([`ABI_VERSION`]), so that a caller can
/// also ask for it with null before installing anything.
///
/// # Safety
/// `hooks` is null or points to a `Hooks` that outlives its installation.
#[no_mangle]
pub unsafe extern "C" fn userptr_preload_install(hooks: *const Hooks) -> c_int {
    // Release: the hooks' fields are visible to a caller that loads the pointer.
    HOOKS.store(hooks as *mut Hooks, Ordering::Release);
    ABI_VERSION
}

fn installed() -> bool {
    // Relaxed: only a hint that spares the look-ups before an uninstalled call;
    // `around` loads the pointer again, with Acquire, before using it.
    !HOOKS.load(Ordering::Relaxed).is_null()
}

fn errno() -> c_int {
    // SAFETY: glibc's thread-local errno, valid for the calling thread.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e }
}

/// Run `f` (the shim's own look-ups) and give the caller its `errno` back.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let e = errno();
    let r = f();
    set_errno(e);
    r
}

/// Resolve the next definition of `name` (libc's), cached in `slot`; 0 if none.
fn real(slot: &AtomicUsize, name: &[u8]) -> usize {
    // Relaxed: a benign race; every thread resolves the same address.
    let mut f = slot.load(Ordering::Relaxed);
    if f == 0 {
        // SAFETY: `name` is a NUL-terminated literal; RTLD_NEXT finds libc's symbol.
        f = quietly(|| unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) })
            as usize;
        slot.store(f, Ordering::Relaxed);
    }
    f
}

/// libc's function `$name` of type `$ty`, or `None` when this libc has none (then
/// the wrapper makes the system call itself).
macro_rules! real_opt {
    ($name:literal, $ty:ty) => {{
        static F: AtomicUsize = AtomicUsize::new(0);
        match real(&F, concat!($name, "\0").as_bytes()) {
            0 => None,
            // SAFETY: dlsym returned libc's function of this exact C signature.
            f => Some(unsafe { std::mem::transmute::<usize, $ty>(f) }),
        }
    }};
}

/// libc's function `$name`, which every glibc has.
macro_rules! real_fn {
    ($name:literal, $ty:ty) => {{
        let f = real_opt!($name, $ty);
        f.expect(concat!("userptr-preload: libc has no ", $name))
    }};
}

/// The pages of `[addr, addr + len)`; `None` for an empty range or one that wraps
/// (the kernel refuses those without changing anything).
pub(crate) fn page_range(addr: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let end = addr.checked_add(len)?.checked_next_multiple_of(PAGE)?;
    Some((addr & !(PAGE - 1), end))
}

/// Run `call` between the start and end hooks for `range`.
fn around<R>(range: Option<(u64, u64)>, kind: u32, arg: u64, call: impl FnOnce() -> R) -> R {
    match range {
        Some(r) => around_all(std::slice::from_ref(&r), kind, arg, call),
        None => call(),
    }
}

/// Run `call` between the start and end hooks for every range of `ranges` (disjoint).
/// The caller's `errno` reaches the real call, and the real call's the caller.
fn around_all<R>(ranges: &[(u64, u64)], kind: u32, arg: u64, call: impl FnOnce() -> R) -> R {
    let h = HOOKS.load(Ordering::Acquire);
    if h.is_null() || ranges.is_empty() {
        return call();
    }
    // SAFETY: installed hooks outlive their installation (the installer's contract).
    let h = unsafe { &*h };
    let saved = errno();
    let mut one = [0u64; 1];
    let mut many = Vec::new();
    let tokens: &mut [u64] = if ranges.len() == 1 {
        &mut one
    } else {
        many.resize(ranges.len(), 0);
        &mut many
    };
    for (t, &(s, e)) in tokens.iter_mut().zip(ranges) {
        *t = (h.start)(h.ctx, s, e, kind, arg);
    }
    set_errno(saved);
    let r = call();
    let after = errno();
    for &t in tokens.iter().rev() {
        if t != 0 {
            (h.end)(h.ctx, t);
        }
    }
    set_errno(after);
    r
}

/// # Safety
/// As libc's `munmap`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let f = real_fn!("munmap", unsafe extern "C" fn(*mut c_void, usize) -> c_int);
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(
        page_range(addr as u64, len as u64),
        KIND_UNMAP,
        0,
        || unsafe { f(addr, len) },
    )
}

/// # Safety
/// As libc's `madvise`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let f = real_fn!(
        "madvise",
        unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int
    );
    let range = page_range(addr as u64, len as u64);
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, KIND_ADVISE, advice as i64 as u64, || unsafe {
        f(addr, len, advice)
    })
}

/// `posix_madvise` hands its advice to the kernel's `madvise` (glibc skips only
/// `POSIX_MADV_DONTNEED`, which is reported anyway: the driver treats it as
/// `MADV_DONTNEED`, which costs a re-pin at most).
///
/// # Safety
/// As libc's `posix_madvise`.
#[no_mangle]
pub unsafe extern "C" fn posix_madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let f = real_fn!(
        "posix_madvise",
        unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int
    );
    let range = page_range(addr as u64, len as u64);
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, KIND_ADVISE, advice as i64 as u64, || unsafe {
        f(addr, len, advice)
    })
}

/// What the shim could learn of an iovec array.
enum Iovecs {
    /// A copy of it, read as the kernel will read it.
    Copied(Vec<libc::iovec>),
    /// Part of it is not readable: the kernel answers `EFAULT` and advises nothing.
    Unreadable,
    /// `process_vm_readv` is not allowed here: the ranges are unknown.
    Unknown,
}

/// Read `n` (1..=UIO_MAXIOV) iovecs at `iov` through the kernel, never faulting.
fn read_iovecs(iov: *const libc::iovec, n: usize) -> Iovecs {
    let bytes = n * std::mem::size_of::<libc::iovec>();
    let mut v: Vec<libc::iovec> = Vec::with_capacity(n);
    let local = libc::iovec {
        iov_base: v.as_mut_ptr() as *mut c_void,
        iov_len: bytes,
    };
    let remote = libc::iovec {
        iov_base: iov as *mut c_void,
        iov_len: bytes,
    };
    // SAFETY: the kernel writes at most `bytes` into our own buffer of that capacity,
    // and reads the caller's memory itself (a bad address is EFAULT or a short count,
    // never a fault here).
    let r = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if r == bytes as isize {
        // SAFETY: all `n` iovecs were written by the kernel (iovec has no invalid
        // bit patterns).
        unsafe { v.set_len(n) };
        Iovecs::Copied(v)
    } else if r >= 0 || errno() == libc::EFAULT {
        Iovecs::Unreadable
    } else {
        Iovecs::Unknown
    }
}

/// The page ranges of `iovs`, sorted and merged (the empty and wrapping ones dropped:
/// the kernel advises nothing there).
fn merged_ranges(iovs: &[libc::iovec]) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = iovs
        .iter()
        .filter_map(|v| page_range(v.iov_base as u64, v.iov_len as u64))
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Treated as applying to this process, whatever `pidfd` names (conservative).
///
/// # Safety
/// As libc's `process_madvise`.
#[no_mangle]
pub unsafe extern "C" fn process_madvise(
    pidfd: c_int,
    iov: *const libc::iovec,
    vlen: usize,
    advice: c_int,
    flags: c_uint,
) -> isize {
    type F = unsafe extern "C" fn(c_int, *const libc::iovec, usize, c_int, c_uint) -> isize;
    let f = real_opt!("process_madvise", F);
    let call = |iov: *const libc::iovec| match f {
        // SAFETY: the caller's own arguments (or our copy of its iovecs), passed on to
        // libc's function (the caller keeps libc's contract).
        Some(f) => unsafe { f(pidfd, iov, vlen, advice, flags) },
        // SAFETY: as above, through the system call this libc does not wrap.
        None => unsafe {
            libc::syscall(libc::SYS_process_madvise, pidfd, iov, vlen, advice, flags) as isize
        },
    };
    // The kernel takes vlen as a 32-bit count (`import_iovec`'s `nr_segs`): 2^32 + 2
    // reads 2 iovecs. Over UIO_MAXIOV: EINVAL before the kernel reads anything.
    let n = vlen as u32 as usize;
    if !installed() || n == 0 || n > UIO_MAXIOV {
        return call(iov);
    }
    let arg = advice as i64 as u64;
    match quietly(|| read_iovecs(iov, n)) {
        // The kernel is handed the very iovecs that were reported (another thread may
        // rewrite the caller's array meanwhile).
        Iovecs::Copied(v) => around_all(&merged_ranges(&v), KIND_ADVISE, arg, || call(v.as_ptr())),
        // No advice is given; an address the kernel never reads from makes sure of
        // it, should another thread map the caller's array meanwhile (EFAULT, or the
        // EINVAL of bad flags, which the kernel checks first: what the caller gets).
        Iovecs::Unreadable => call(TOP as *const libc::iovec),
        Iovecs::Unknown => around(Some((0, TOP)), KIND_ADVISE, arg, || call(iov)),
    }
}

/// What `mprotect(addr, len, prot)` may change, and as what. With `PROT_GROWSDOWN`
/// (`PROT_GROWSUP`) the kernel extends the range down to the start (up to the end) of
/// the mapping there, if that mapping may grow so: that wider range is reported as an
/// unmap, which is safe whether or not the kernel then changes it (a downgrade of
/// pages the kernel left writable would not be).
fn protect_report(addr: u64, len: u64, prot: c_int) -> (Option<(u64, u64)>, u32) {
    let Some((s, e)) = page_range(addr, len) else {
        return (None, KIND_PROTECT);
    };
    let (down, up) = (
        prot & libc::PROT_GROWSDOWN != 0,
        prot & libc::PROT_GROWSUP != 0,
    );
    if !(down || up) {
        return (Some((s, e)), KIND_PROTECT);
    }
    let vma = if installed() {
        quietly(extent::vmas).and_then(|v| v.into_iter().find(|v| v.end > s))
    } else {
        None
    };
    let r = match vma {
        Some(v) if down => (v.start.min(s), e),
        Some(v) => (s, v.end.max(e)),
        None if down => (0, e),
        None => (s, TOP),
    };
    (Some(r), KIND_UNMAP)
}

/// # Safety
/// As libc's `mprotect`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    let f = real_fn!(
        "mprotect",
        unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int
    );
    let (range, kind) = protect_report(addr as u64, len as u64, prot);
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, kind, prot as u64, || unsafe { f(addr, len, prot) })
}

/// A protection change like `mprotect` (the key only restricts the CPU's access).
///
/// # Safety
/// As libc's `pkey_mprotect`.
#[no_mangle]
pub unsafe extern "C" fn pkey_mprotect(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    pkey: c_int,
) -> c_int {
    type F = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int) -> c_int;
    let f = real_opt!("pkey_mprotect", F);
    let (range, kind) = protect_report(addr as u64, len as u64, prot);
    around(range, kind, prot as u64, || match f {
        // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
        Some(f) => unsafe { f(addr, len, prot, pkey) },
        // SAFETY: as above, through the system call this libc does not wrap.
        None => unsafe { libc::syscall(libc::SYS_pkey_mprotect, addr, len, prot, pkey) as c_int },
    })
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
    type F = unsafe extern "C" fn(*mut c_void, usize, usize, c_int, *mut c_void) -> *mut c_void;
    let f = real_fn!("mremap", F);
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
            // SAFETY: the caller's arguments, passed on to libc (the caller keeps its
            // contract).
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
    type F =
        unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
    let f = real_fn!("mmap", F);
    let range = if flags & libc::MAP_FIXED != 0 && installed() {
        let unit = quietly(|| extent::map_unit(flags, fd));
        page_range(
            addr as u64,
            (len as u64).checked_next_multiple_of(unit).unwrap_or(0),
        )
    } else {
        None
    };
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
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
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

fn current_brk() -> u64 {
    // SAFETY: brk(0) only queries (and returns an address: errno is never set).
    unsafe { libc::syscall(libc::SYS_brk, 0) as u64 }
}

/// # Safety
/// As libc's `brk`.
#[no_mangle]
pub unsafe extern "C" fn brk(addr: *mut c_void) -> c_int {
    let f = real_fn!("brk", unsafe extern "C" fn(*mut c_void) -> c_int);
    let cur = if installed() { current_brk() } else { 0 };
    let range = if (addr as u64) < cur {
        page_range(addr as u64, cur - addr as u64)
    } else {
        None
    };
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, KIND_UNMAP, 0, || unsafe { f(addr) })
}

/// # Safety
/// As libc's `sbrk`.
#[no_mangle]
pub unsafe extern "C" fn sbrk(incr: libc::intptr_t) -> *mut c_void {
    let f = real_fn!("sbrk", unsafe extern "C" fn(libc::intptr_t) -> *mut c_void);
    let range = if incr < 0 && installed() {
        let n = incr.unsigned_abs() as u64;
        // A decrement below 0 is refused (ENOMEM) without a change.
        current_brk().checked_sub(n).and_then(|s| page_range(s, n))
    } else {
        None
    };
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, KIND_UNMAP, 0, || unsafe { f(incr) })
}

/// # Safety
/// As glibc's `__sbrk` (the same function as `sbrk`, exported under both names).
#[no_mangle]
pub unsafe extern "C" fn __sbrk(incr: libc::intptr_t) -> *mut c_void {
    // SAFETY: the caller's own argument, as `sbrk`'s contract.
    unsafe { sbrk(incr) }
}

/// # Safety
/// As libc's `shmat`.
#[no_mangle]
pub unsafe extern "C" fn shmat(id: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
    let f = real_fn!(
        "shmat",
        unsafe extern "C" fn(c_int, *const c_void, c_int) -> *mut c_void
    );
    // Only SHM_REMAP replaces what is mapped (without it an occupied address is EINVAL).
    let range = if flags & libc::SHM_REMAP != 0 && !addr.is_null() && installed() {
        quietly(|| extent::shm_remap_range(id, addr as u64, flags))
    } else {
        None
    };
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, KIND_UNMAP, 0, || unsafe { f(id, addr, flags) })
}

/// # Safety
/// As libc's `shmdt`.
#[no_mangle]
pub unsafe extern "C" fn shmdt(addr: *const c_void) -> c_int {
    let f = real_fn!("shmdt", unsafe extern "C" fn(*const c_void) -> c_int);
    let range = if installed() {
        quietly(|| extent::shm_detach_range(addr as u64))
    } else {
        None
    };
    // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
    around(range, KIND_UNMAP, 0, || unsafe { f(addr) })
}

/// The range's pages are replaced by other pages of the file: an unmap.
///
/// # Safety
/// As libc's `remap_file_pages`.
#[no_mangle]
pub unsafe extern "C" fn remap_file_pages(
    addr: *mut c_void,
    size: usize,
    prot: c_int,
    pgoff: usize,
    flags: c_int,
) -> c_int {
    type F = unsafe extern "C" fn(*mut c_void, usize, c_int, usize, c_int) -> c_int;
    let f = real_opt!("remap_file_pages", F);
    let range = page_range(addr as u64, size as u64);
    around(range, KIND_UNMAP, 0, || match f {
        // SAFETY: the caller's arguments, passed on to libc (the caller keeps its contract).
        Some(f) => unsafe { f(addr, size, prot, pgoff, flags) },
        // SAFETY: as above, through the system call this libc does not wrap.
        None => unsafe {
            libc::syscall(libc::SYS_remap_file_pages, addr, size, prot, pgoff, flags) as c_int
        },
    })
}
