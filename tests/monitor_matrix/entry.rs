//! Kernel entry points besides the 64-bit calls the first matrix makes: SysV `shmat`
//! with `SHM_REMAP`, `pkey_mprotect`, `IORING_OP_MADVISE` on the application's own
//! io_uring, the i386 ABI through `int 0x80`, and the x32 ABI.

use super::{errno, failed_change, map_hole, Ctx, LEN};
use crate::common::{int80, map_low, Anon};
use userptr::{Cause, Perm};

/// `SHM_REMAP` (linux/shm.h): attach over an existing mapping.
const SHM_REMAP: i32 = 0o40000;
/// The x32 ABI's bit in the system call number.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl).
mod i386 {
    pub const MUNMAP: u32 = 91;
    pub const MPROTECT: u32 = 125;
    pub const MREMAP: u32 = 163;
    pub const MMAP2: u32 = 192;
    pub const MADVISE: u32 = 219;
}

/// Low memory (for the i386 calls), unmapped on drop.
struct Low(usize);

impl Drop for Low {
    fn drop(&mut self) {
        // SAFETY: our own mapping (or the hole a path left, which is harmless).
        unsafe { libc::munmap(self.0 as *mut _, LEN) };
    }
}

pub(crate) fn run(ctx: &Ctx<'_>, path: &str) -> &'static str {
    match path {
        "shmat_remap" => shmat_remap(ctx),
        "pkey_mprotect_downgrade" => pkey_mprotect(ctx),
        "io_uring_madvise" => io_uring_madvise(ctx),
        "x32_munmap" => x32_munmap(ctx),
        _ => int80_path(ctx, path),
    }
}

fn shmat_remap(ctx: &Ctx<'_>) -> &'static str {
    let buf = Anon::new(LEN);
    // SAFETY: a fresh private SysV segment.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600) };
    if id < 0 {
        eprintln!("shmget: {}", std::io::Error::last_os_error());
        return "error";
    }
    let a = buf.addr;
    let r = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => {
            let mut e = 0;
            ctx.change(a..a + LEN, Cause::Unmap, || {
                // SAFETY: attaches the fresh segment over the test's own buffer.
                let p = unsafe { libc::shmat(id, a as *const _, SHM_REMAP) };
                if p as usize != a {
                    e = errno();
                }
            });
            if e != 0 {
                failed_change(ctx, "shmat(SHM_REMAP)", e, &u, a, LEN)
            } else {
                ctx.look(&u, a, LEN)
            }
        }
        Err(cell) => cell,
    };
    // SAFETY: detaches and removes the segment this path made.
    unsafe {
        libc::shmdt(buf.addr as *const _);
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
    }
    r
}

fn pkey_mprotect(ctx: &Ctx<'_>) -> &'static str {
    // SAFETY: allocates a protection key (or fails where pkeys are unsupported).
    let pkey = unsafe { libc::syscall(libc::SYS_pkey_alloc, 0, 0) } as i32;
    if pkey < 0 {
        eprintln!(
            "pkey_alloc: {} (no protection keys here): pkey -1",
            std::io::Error::last_os_error()
        );
    }
    let buf = Anon::new(LEN);
    let u = match ctx.register(buf.addr, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    let a = buf.addr;
    let cause = Cause::Protect {
        new_prot: libc::PROT_READ,
    };
    let mut e = 0;
    ctx.change(a..a + LEN, cause, || {
        // SAFETY: downgrades the test's own buffer.
        let r = unsafe { libc::syscall(libc::SYS_pkey_mprotect, a, LEN, libc::PROT_READ, pkey) };
        if r != 0 {
            e = errno();
        }
    });
    let r = if e != 0 {
        failed_change(ctx, "pkey_mprotect", e, &u, a, LEN)
    } else {
        ctx.downgraded(&u)
    };
    if pkey >= 0 {
        // SAFETY: frees the key this path allocated.
        unsafe { libc::syscall(libc::SYS_pkey_free, pkey) };
    }
    r
}

fn io_uring_madvise(ctx: &Ctx<'_>) -> &'static str {
    use io_uring::{opcode, IoUring};
    let buf = Anon::new(LEN);
    let a = buf.addr;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    // The application's own ring, made after the monitor was installed.
    let mut ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) if ctx.monitored => {
            eprintln!("io_uring_setup refused: {e}");
            // Refused only if the pages are the pinned ones still.
            let c = ctx.look(&u, a, LEN);
            return if c == "caught" { "refused" } else { c };
        }
        Err(e) => {
            eprintln!("io_uring_setup: {e}");
            return "error";
        }
    };
    let sqe = opcode::Madvise::new(a as *const libc::c_void, LEN as i64, libc::MADV_DONTNEED)
        .build()
        .user_data(1);
    let mut res = 0;
    ctx.change(a..a + LEN, Cause::Discard, || {
        // SAFETY: the entry names the test's own buffer, which outlives the ring.
        unsafe { ring.submission().push(&sqe).expect("submission queue full") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        res = ring.completion().next().expect("a completion").result();
    });
    if res < 0 {
        return failed_change(ctx, "IORING_OP_MADVISE", -res, &u, a, LEN);
    }
    ctx.look(&u, a, LEN)
}

fn x32_munmap(ctx: &Ctx<'_>) -> &'static str {
    let low = Low(map_low(LEN));
    let a = low.0;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    let (mut r, mut e) = (0, 0);
    ctx.change(a..a + LEN, Cause::Unmap, || {
        // SAFETY: unmaps the test's own buffer (x32 munmap takes the same arguments).
        r = unsafe { libc::syscall(libc::SYS_munmap | X32_SYSCALL_BIT, a, LEN) };
        e = errno();
    });
    if r != 0 {
        return failed_change(ctx, "x32 munmap", e, &u, a, LEN);
    }
    map_hole(a, LEN, true);
    ctx.look(&u, a, LEN)
}

/// `int 0x80` works (a kernel may lack 32-bit emulation).
pub(crate) fn int80_probe() -> Option<String> {
    (!crate::common::int80_works())
        .then(|| "int 0x80 does not work here (no 32-bit emulation in this kernel)".into())
}

/// The kernel runs x32 calls (CONFIG_X86_X32_ABI).
pub(crate) fn x32_probe() -> Option<String> {
    // SAFETY: getpid has no effect.
    let r = unsafe { libc::syscall(libc::SYS_getpid | X32_SYSCALL_BIT) };
    (r < 0).then(|| {
        format!(
            "the kernel has no x32 ABI (x32 getpid: {})",
            std::io::Error::last_os_error()
        )
    })
}

fn int80_path(ctx: &Ctx<'_>, path: &str) -> &'static str {
    let low = Low(map_low(LEN));
    let dest = Low(map_low(LEN));
    let a = low.0;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    let (a32, len32) = (a as u32, LEN as u32);
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    let (nr, args, cause, expect) = match path {
        "int80_munmap" => (i386::MUNMAP, [a32, len32, 0, 0, 0, 0], Cause::Unmap, 0),
        "int80_madvise" => {
            let advice = libc::MADV_DONTNEED as u32;
            let args = [a32, len32, advice, 0, 0, 0];
            (i386::MADVISE, args, Cause::Discard, 0)
        }
        "int80_mprotect_downgrade" => {
            let prot = libc::PROT_READ;
            let args = [a32, len32, prot as u32, 0, 0, 0];
            (i386::MPROTECT, args, Cause::Protect { new_prot: prot }, 0)
        }
        "int80_mremap_move" => {
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u32;
            let to = dest.0 as u32;
            let args = [a32, len32, len32, flags, to, 0];
            (i386::MREMAP, args, Cause::Remap { to: to as u64 }, to)
        }
        "int80_mmap2_fixed" => {
            let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u32;
            let args = [a32, len32, rw, flags, u32::MAX, 0];
            (i386::MMAP2, args, Cause::Unmap, a32)
        }
        _ => unreachable!("{path}"),
    };
    let mut r = 0;
    ctx.change(a..a + LEN, cause, || {
        // SAFETY: an i386 call on the test's own low buffers.
        r = unsafe { int80(nr, args) };
    });
    if r < 0 {
        return failed_change(ctx, path, -r, &u, a, LEN);
    }
    assert_eq!(r as u32, expect, "{path}: the kernel's result");
    match path {
        "int80_mprotect_downgrade" => ctx.downgraded(&u),
        "int80_munmap" | "int80_mremap_move" => {
            map_hole(a, LEN, true);
            ctx.look(&u, a, LEN)
        }
        _ => ctx.look(&u, a, LEN),
    }
}
