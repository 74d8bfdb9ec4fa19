//! File-side changes of shared memory: the pages of a `MAP_SHARED` memfd mapping go
//! away (or are replaced) by calls on the file, not on the address space:
//! `fallocate(PUNCH_HOLE)`, `ftruncate`, `remap_file_pages`. Unsealed, the memory
//! policy refuses the registration; sealed `F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE`, the
//! kernel refuses the changes.

use super::{errno, failed_change, Ctx, LEN};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use userptr::{Cause, Perm};

const F_SEAL_FUTURE_WRITE: i32 = 0x0010;

/// A memfd of `len` bytes mapped `MAP_SHARED` read-write, page `i` filled with
/// `b'A' + i`; sealed against shrinking and new writes (after the mapping) if `seal`.
struct SharedFile {
    fd: OwnedFd,
    addr: usize,
    len: usize,
}

impl SharedFile {
    fn new(len: usize, seal: bool) -> SharedFile {
        // SAFETY: creates a memfd this struct owns.
        let fd = unsafe { libc::memfd_create(c"matrix".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", errno());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizes our memfd and maps it shared.
        let addr = unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as i64), 0);
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", errno());
        let addr = addr as usize;
        for i in 0..len / 4096 {
            // SAFETY: a page of the mapping just made.
            unsafe {
                std::ptr::write_bytes((addr + i * 4096) as *mut u8, b'A' + (i % 26) as u8, 4096)
            };
        }
        if seal {
            let seals = libc::F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE;
            // SAFETY: seals our memfd.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(r, 0, "F_ADD_SEALS: {}", errno());
        }
        SharedFile { fd, addr, len }
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// Run `f` (returning 0 or -1 with errno) as the change.
fn change(
    ctx: &Ctx<'_>,
    range: std::ops::Range<usize>,
    cause: Cause,
    f: impl FnOnce() -> i32,
) -> Result<(), i32> {
    let mut r = Ok(());
    ctx.change(range, cause, || {
        if f() != 0 {
            r = Err(errno());
        }
    });
    r
}

pub(crate) fn run(ctx: &Ctx<'_>, path: &str) -> &'static str {
    match path {
        "memfd_punch_hole" | "memfd_ftruncate" | "memfd_sealed_punch_hole" => {
            let sealed = path == "memfd_sealed_punch_hole";
            let m = SharedFile::new(LEN, sealed);
            let (a, fd) = (m.addr, m.fd.as_raw_fd());
            let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
                Ok(u) => u,
                Err(cell) => return cell,
            };
            let r = change(ctx, a..a + LEN, Cause::Discard, || {
                // SAFETY: changes our own memfd.
                unsafe {
                    if path == "memfd_ftruncate" {
                        if libc::ftruncate(fd, 0) != 0 {
                            return -1;
                        }
                        libc::ftruncate(fd, LEN as i64)
                    } else {
                        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                        libc::fallocate(fd, mode, 0, LEN as i64)
                    }
                }
            });
            match r {
                Ok(()) if sealed => {
                    eprintln!("the kernel punched a hole in a sealed memfd");
                    ctx.look(&u, a, LEN)
                }
                Ok(()) => ctx.look(&u, a, LEN),
                // The seal refuses it: the pages stay, as they must.
                Err(libc::EPERM) if sealed => ctx.look(&u, a, LEN),
                Err(e) => failed_change(ctx, path, e, &u, a, LEN),
            }
        }
        "remap_file_pages" | "remap_file_pages_unsealed" => {
            let sealed = path == "remap_file_pages";
            let m = SharedFile::new(2 * 4096, sealed);
            let a = m.addr;
            let u = match ctx.register(a, 2 * 4096, Perm::READ_WRITE) {
                Ok(u) => u,
                Err(cell) => return cell,
            };
            // The first page is to show file page 1.
            let r = change(ctx, a..a + 4096, Cause::Unmap, || {
                // SAFETY: rearranges our own shared mapping.
                unsafe { libc::syscall(libc::SYS_remap_file_pages, a, 4096, 0, 1, 0) as i32 }
            });
            match r {
                // The device fills the first page: is it the page the process sees
                // there?
                Ok(()) => ctx.look(&u, a, 4096),
                Err(libc::EPERM) if sealed => {
                    // F_SEAL_FUTURE_WRITE refuses the new writable shared mapping
                    // remap_file_pages makes: the pages stay.
                    eprintln!("remap_file_pages on the sealed memfd: EPERM");
                    ctx.look(&u, a, 4096)
                }
                Err(e) => failed_change(ctx, path, e, &u, a, 4096),
            }
        }
        _ => unreachable!("{path}"),
    }
}
