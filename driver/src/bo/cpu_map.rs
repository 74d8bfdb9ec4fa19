//! The CPU range of a buffer object (the only `unsafe` here: `mmap`, `mprotect`,
//! `madvise`, `munmap`, all through the driver's own syscall site, inside a driver
//! section, so no monitor traps them): one fixed virtual range reserved for the
//! object's whole life, mapped `MAP_SHARED | MAP_FIXED` over whichever backing the
//! object has (the aperture's file at the object's VRAM offset, or its system
//! memfd), made inaccessible while it moves.
//!
//! `MAP_FIXED` replaces the old mapping in one step: the range is never unmapped, so
//! no other `mmap` of the process can take it in between. The range is
//! `MADV_DONTFORK`: a fork child does not inherit it (a second process never maps a
//! buffer object, see the module docs of `bo`). A fresh mapping is made `PROT_NONE`,
//! marked, and only then opened, so that a fork in between gives the child nothing it
//! could use.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd};

/// A buffer object's fixed CPU range.
#[derive(Debug)]
pub(super) struct CpuRange {
    addr: usize,
    len: usize,
}

fn sys(nr: i64, a: [u64; 6], op: &'static str) -> Result<u64> {
    let _section = crate::driver_section::enter();
    // SAFETY: every call made through here is on this module's own range (or creates
    // it): see the callers.
    let r = unsafe { crate::trampoline::syscall(nr, a) };
    if r < 0 {
        return Err(Error::sys(op, std::io::Error::from_raw_os_error(-r as i32)));
    }
    Ok(r as u64)
}

const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;

impl CpuRange {
    /// Reserve `len` bytes (a 4 KiB multiple) of address space, inaccessible.
    pub(super) fn reserve(len: usize) -> Result<CpuRange> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // A fresh PROT_NONE anonymous mapping at a kernel-chosen address aliases nothing.
        let addr = sys(
            libc::SYS_mmap,
            [
                0,
                len as u64,
                libc::PROT_NONE as u64,
                flags as u64,
                u64::MAX,
                0,
            ],
            "mmap(buffer object range)",
        )? as usize;
        Ok(CpuRange { addr, len })
    }

    /// First byte.
    pub(super) fn addr(&self) -> usize {
        self.addr
    }

    /// Map `fd` at file offset `off` over the whole range, read-write.
    pub(super) fn map(&self, fd: BorrowedFd<'_>, off: u64) -> Result<()> {
        let flags = libc::MAP_SHARED | libc::MAP_FIXED;
        // MAP_FIXED over our own reservation (or previous backing): replaces only it.
        sys(
            libc::SYS_mmap,
            [
                self.addr as u64,
                self.len as u64,
                libc::PROT_NONE as u64,
                flags as u64,
                fd.as_raw_fd() as u64,
                off,
            ],
            "mmap(MAP_FIXED, buffer object backing)",
        )?;
        sys(
            libc::SYS_madvise,
            [
                self.addr as u64,
                self.len as u64,
                libc::MADV_DONTFORK as u64,
                0,
                0,
                0,
            ],
            "madvise(MADV_DONTFORK, buffer object)",
        )?;
        self.unblock()
    }

    /// Map nothing over the range any more (inaccessible anonymous memory), keeping
    /// the reservation.
    pub(super) fn clear(&self) -> Result<()> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED;
        // MAP_FIXED over our own range only.
        sys(
            libc::SYS_mmap,
            [
                self.addr as u64,
                self.len as u64,
                libc::PROT_NONE as u64,
                flags as u64,
                u64::MAX,
                0,
            ],
            "mmap(MAP_FIXED, PROT_NONE, buffer object)",
        )
        .map(drop)
    }

    /// Zero the whole range (mapped read-write: right after [`CpuRange::map`], before
    /// the object is handed out).
    pub(super) fn zero(&self) {
        // SAFETY: the range is ours and mapped read-write; no reference into it exists
        // yet (the object is being created) and no device work targets it.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, 0, self.len) };
    }

    /// Take CPU access away (every access faults from now on).
    pub(super) fn block(&self) -> Result<()> {
        sys(
            libc::SYS_mprotect,
            [
                self.addr as u64,
                self.len as u64,
                libc::PROT_NONE as u64,
                0,
                0,
                0,
            ],
            "mprotect(PROT_NONE, buffer object)",
        )
        .map(drop)
    }

    /// Give CPU access back over the current backing.
    pub(super) fn unblock(&self) -> Result<()> {
        sys(
            libc::SYS_mprotect,
            [self.addr as u64, self.len as u64, RW, 0, 0, 0],
            "mprotect(PROT_READ | PROT_WRITE, buffer object)",
        )
        .map(drop)
    }
}

impl Drop for CpuRange {
    fn drop(&mut self) {
        // Our own range; nothing borrows it any more (the object is being freed).
        if let Err(e) = sys(
            libc::SYS_munmap,
            [self.addr as u64, self.len as u64, 0, 0, 0, 0],
            "munmap(buffer object range)",
        ) {
            tracing::error!("{e}");
        }
    }
}
