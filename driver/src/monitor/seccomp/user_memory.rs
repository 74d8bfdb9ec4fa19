//! Reading and writing the memory a trapped call points at, without ever faulting.
//!
//! A trapped call's pointers are the application's: a bad one must give the
//! application what the kernel would (`EFAULT`), not kill it with `SIGSEGV` inside the
//! handler. So the handler never dereferences them: it copies through the kernel,
//! which checks. `process_vm_readv` / `process_vm_writev` on this process (always
//! permitted on oneself); where a sandbox refuses those (`EPERM`, `ENOSYS`), a pipe:
//! `write(2)` from the pointer fails with `EFAULT` if it is bad, and `read(2)` into it
//! likewise. Both are async-signal-safe; nothing allocates.

use crate::trampoline::syscall;

fn pid() -> u64 {
    // SAFETY: getpid has no arguments and no effect.
    unsafe { syscall(libc::SYS_getpid, [0; 6]) as u64 }
}

fn close(fd: i64) {
    // SAFETY: closes a pipe end this module opened.
    unsafe { syscall(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]) };
}

/// Copy through a fresh pipe: `src` → pipe → `dst` (one side is the application's).
fn via_pipe(src: u64, dst: u64, len: usize) -> bool {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into a local.
    let r = unsafe {
        syscall(
            libc::SYS_pipe2,
            [
                fds.as_mut_ptr() as u64,
                (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
                0,
                0,
                0,
                0,
            ],
        )
    };
    if r != 0 {
        return false;
    }
    let (rd, wr) = (fds[0] as i64, fds[1] as i64);
    // SAFETY: write(2) reads `len` bytes at `src`; a bad address makes it fail with
    // EFAULT (the kernel checks), never fault.
    let w = unsafe { syscall(libc::SYS_write, [wr as u64, src, len as u64, 0, 0, 0]) };
    // SAFETY: read(2) writes at most `len` bytes at `dst`; a bad address: EFAULT.
    let ok = w == len as i64
        && unsafe { syscall(libc::SYS_read, [rd as u64, dst, len as u64, 0, 0, 0]) } == len as i64;
    close(rd);
    close(wr);
    ok
}

/// `process_vm_readv`/`writev` (`nr`) on this process: local `[local, +len)`, remote
/// (the application's pointer) `[remote, +len)`. `None` if the call is unavailable.
fn vm_copy(nr: i64, local: u64, remote: u64, len: usize) -> Option<bool> {
    let l = libc::iovec {
        iov_base: local as *mut libc::c_void,
        iov_len: len,
    };
    let r = libc::iovec {
        iov_base: remote as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: one local and one remote iovec, both locals; the kernel checks the remote
    // range (a bad one: EFAULT, or a short count) and never faults us.
    let n = unsafe {
        syscall(
            nr,
            [
                pid(),
                &l as *const libc::iovec as u64,
                1,
                &r as *const libc::iovec as u64,
                1,
                0,
            ],
        )
    };
    match n {
        n if n == len as i64 => Some(true),
        n if n == -(libc::ENOSYS as i64) || n == -(libc::EPERM as i64) => None,
        _ => Some(false),
    }
}

/// Copy `out.len()` bytes from the application's address `addr`; false if any of it
/// is not readable (the kernel would answer `EFAULT`).
pub(super) fn read(addr: u64, out: &mut [u8]) -> bool {
    if out.is_empty() {
        return true;
    }
    let local = out.as_mut_ptr() as u64;
    vm_copy(libc::SYS_process_vm_readv, local, addr, out.len())
        .unwrap_or_else(|| via_pipe(addr, local, out.len()))
}

/// Copy `data` to the application's address `addr`; false if any of it is not
/// writable.
pub(super) fn write(addr: u64, data: &[u8]) -> bool {
    if data.is_empty() {
        return true;
    }
    let local = data.as_ptr() as u64;
    vm_copy(libc::SYS_process_vm_writev, local, addr, data.len())
        .unwrap_or_else(|| via_pipe(local, addr, data.len()))
}

/// Read a little-endian `u64` at `addr`.
pub(super) fn read_u64(addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read(addr, &mut b).then(|| u64::from_le_bytes(b))
}

/// Read a little-endian `u32` at `addr`.
pub(super) fn read_u32(addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read(addr, &mut b).then(|| u32::from_le_bytes(b))
}

/// Scratch memory below 4 GiB, for the copies an i386 call is handed (its pointers are
/// 32 bits wide): one page mapped with `MAP_32BIT` at install, in [`CELLS`] cells of
/// [`CELL`] bytes, claimed with an atomic bitmap (no lock: a handler interrupted by
/// another handler on the same thread just takes another cell).
pub(super) const CELL: usize = 64;
/// Cells in the scratch page.
pub(super) const CELLS: usize = 64;
static LOW_PAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static LOW_USED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Map the scratch page (once; at install). Without it, i386 calls that need a copy
/// are refused with `ENOMEM`.
pub(super) fn map_low_scratch() {
    use std::sync::atomic::Ordering;
    // Relaxed: install runs before any handler can need it, and the page address is
    // published to handlers by the monitor's own Release store of its state.
    if LOW_PAGE.load(Ordering::Relaxed) != 0 {
        return;
    }
    // SAFETY: a fresh anonymous page of our own below 4 GiB.
    let p = unsafe {
        syscall(
            libc::SYS_mmap,
            [
                0,
                (CELL * CELLS) as u64,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT) as u64,
                u64::MAX,
                0,
            ],
        )
    };
    if p > 0 {
        LOW_PAGE.store(p as u64, Ordering::Relaxed);
    }
}

/// A claimed scratch cell (below 4 GiB), freed on drop.
pub(super) struct LowCell(usize);

impl LowCell {
    /// Claim a free cell; `None` when there is no scratch page or every cell is taken.
    pub(super) fn claim() -> Option<LowCell> {
        use std::sync::atomic::Ordering;
        // Relaxed: see map_low_scratch.
        if LOW_PAGE.load(Ordering::Relaxed) == 0 {
            return None;
        }
        // Acquire: the previous user's writes are done (its Release below).
        let mut used = LOW_USED.load(Ordering::Acquire);
        loop {
            let free = (!used).trailing_zeros() as usize;
            if free >= CELLS {
                return None;
            }
            match LOW_USED.compare_exchange_weak(
                used,
                used | 1 << free,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(LowCell(free)),
                Err(now) => used = now,
            }
        }
    }

    /// The cell's address (below 4 GiB).
    pub(super) fn addr(&self) -> u64 {
        // Relaxed: see map_low_scratch.
        LOW_PAGE.load(std::sync::atomic::Ordering::Relaxed) + (self.0 * CELL) as u64
    }

    /// Put `data` (at most [`CELL`] bytes) in the cell; returns its address.
    pub(super) fn put(&self, data: &[u8]) -> u64 {
        assert!(data.len() <= CELL, "scratch cell overflow");
        // SAFETY: the cell is ours (claimed) and lies in the mapped scratch page.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr() as *mut u8, data.len()) };
        self.addr()
    }
}

impl Drop for LowCell {
    fn drop(&mut self) {
        // Release: our uses of the cell happen before the next claimer's Acquire.
        LOW_USED.fetch_and(!(1 << self.0), std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pointers_read_as_false_not_as_a_crash() {
        let v = 0x1122_3344_5566_7788u64;
        assert_eq!(read_u64(&v as *const u64 as u64), Some(v));
        assert_eq!(read_u64(8), None);
        assert_eq!(read_u64(u64::MAX - 3), None);
        let mut dst = 0u64;
        assert!(write(&mut dst as *mut u64 as u64, &7u64.to_le_bytes()));
        assert_eq!(dst, 7);
        assert!(!write(16, &[1, 2, 3]));
        // The pipe path, which sandboxes without process_vm_* fall back to.
        let mut out = 0u64;
        assert!(via_pipe(
            &v as *const u64 as u64,
            &mut out as *mut u64 as u64,
            8
        ));
        assert_eq!(out, v);
        assert!(!via_pipe(24, &mut out as *mut u64 as u64, 8));
    }
}
