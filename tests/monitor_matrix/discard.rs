//! Advice the first matrix did not give: guard regions (`MADV_GUARD_INSTALL` zaps the
//! range), `MADV_DONTNEED_LOCKED`, and `process_madvise` on this very process (which
//! accepts any advice on current kernels).

use super::{errno, failed_change, Ctx, LEN};
use crate::common::Anon;
use userptr::{Cause, Perm};

const MADV_DONTNEED_LOCKED: i32 = 24;
const MADV_GUARD_INSTALL: i32 = 102;
const MADV_GUARD_REMOVE: i32 = 103;

/// `process_madvise(pidfd_open(getpid()), {addr, len}, 1, advice, 0)`: the bytes
/// advised, or the errno.
fn process_madvise_self(addr: usize, len: usize, advice: i32) -> Result<isize, i32> {
    // SAFETY: a pidfd for this process, closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
    if pidfd < 0 {
        return Err(errno());
    }
    let iov = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: len,
    };
    // SAFETY: advises the test's own range; `iov` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_process_madvise, pidfd, &iov, 1, advice, 0) };
    let e = errno();
    // SAFETY: closes the pidfd opened above.
    unsafe { libc::close(pidfd) };
    if r < 0 {
        Err(e)
    } else {
        Ok(r as isize)
    }
}

fn madvise(addr: usize, len: usize, advice: i32) -> Result<(), i32> {
    // SAFETY: advises the test's own range.
    match unsafe { libc::madvise(addr as *mut _, len, advice) } {
        0 => Ok(()),
        _ => Err(errno()),
    }
}

pub(crate) fn run(ctx: &Ctx<'_>, path: &str) -> &'static str {
    let buf = Anon::new(LEN);
    let a = buf.addr;
    let u = match ctx.register(a, LEN, Perm::READ_WRITE) {
        Ok(u) => u,
        Err(cell) => return cell,
    };
    let mut outcome = Ok(());
    ctx.change(a..a + LEN, Cause::Discard, || {
        outcome = match path {
            "madv_dontneed_locked" => madvise(a, LEN, MADV_DONTNEED_LOCKED),
            // Guard pages read as a fault; removing them leaves zero-fill pages.
            "madv_guard_install" => madvise(a, LEN, MADV_GUARD_INSTALL)
                .and_then(|()| madvise(a, LEN, MADV_GUARD_REMOVE)),
            "process_madvise_self" => process_madvise_self(a, LEN, libc::MADV_DONTNEED).map(drop),
            "process_madvise_guard" => process_madvise_self(a, LEN, MADV_GUARD_INSTALL)
                .and_then(|_| process_madvise_self(a, LEN, MADV_GUARD_REMOVE))
                .map(drop),
            _ => unreachable!("{path}"),
        };
    });
    match outcome {
        Ok(()) => ctx.look(&u, a, LEN),
        Err(e) => failed_change(ctx, path, e, &u, a, LEN),
    }
}

/// Guard regions (Linux 6.13) and `process_madvise` with any advice on this process
/// (6.13 too); probed on a scratch page before any monitor is installed.
pub(crate) fn probe() -> Option<String> {
    let scratch = Anon::new(4096);
    if let Err(e) = madvise(scratch.addr, 4096, MADV_GUARD_INSTALL) {
        return Some(format!(
            "MADV_GUARD_INSTALL: {} (a kernel older than 6.13)",
            std::io::Error::from_raw_os_error(e)
        ));
    }
    if let Err(e) = process_madvise_self(scratch.addr, 4096, libc::MADV_DONTNEED) {
        return Some(format!(
            "process_madvise(MADV_DONTNEED) on this process: {}",
            std::io::Error::from_raw_os_error(e)
        ));
    }
    None
}
