//! The call decoder: what a trapped call means for the registry (a range, a cause).

use super::handler::raw_syscall;
use super::worker::{K_DISCARD, K_PROTECT, K_REMAP, K_SHMDT, K_UNMAP};
use std::ops::Range;

pub(super) fn page_range(start: u64, len: u64) -> Option<Range<u64>> {
    if len == 0 {
        return None;
    }
    let end = start.checked_add(len)?.checked_next_multiple_of(4096)?;
    Some(start & !4095..end)
}

/// What a trapped call means for the registry: a range, a cause kind and argument.
pub(super) fn decode(nr: i64, a: [u64; 6]) -> Option<(Range<u64>, u32, u64)> {
    match nr {
        libc::SYS_munmap => Some((page_range(a[0], a[1])?, K_UNMAP, 0)),
        libc::SYS_madvise => {
            let destructive = matches!(
                a[2] as i32,
                libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
            ) || a[2] as i32 == 24; // MADV_DONTNEED_LOCKED
            destructive.then(|| Some((page_range(a[0], a[1])?, K_DISCARD, 0)))?
        }
        libc::SYS_mprotect => Some((page_range(a[0], a[1])?, K_PROTECT, a[2])),
        libc::SYS_mremap => {
            let to = if a[3] & libc::MREMAP_FIXED as u64 != 0 {
                a[4]
            } else {
                0
            };
            Some((page_range(a[0], a[1])?, K_REMAP, to))
        }
        libc::SYS_mmap if a[3] & libc::MAP_FIXED as u64 != 0 => {
            Some((page_range(a[0], a[1])?, K_UNMAP, 0))
        }
        libc::SYS_brk => {
            let cur = raw_syscall(libc::SYS_brk, [0; 6]) as u64;
            (a[0] != 0 && a[0] < cur).then(|| Some((page_range(a[0], cur - a[0])?, K_UNMAP, 0)))?
        }
        libc::SYS_shmdt => Some((a[0] & !4095..(a[0] & !4095) + 4096, K_SHMDT, 0)),
        libc::SYS_process_madvise => {
            let advice = a[3] as i32;
            if !matches!(
                advice,
                libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
            ) {
                return None;
            }
            // The union of the iovecs: conservative, and needs no allocation.
            let (iov, n) = (a[1] as *const libc::iovec, a[2] as usize);
            let (mut lo, mut hi) = (u64::MAX, 0u64);
            for i in 0..n.min(1024) {
                // SAFETY: the caller passed `n` iovecs at `iov` to the kernel; reading
                // them here is what the kernel would do. A bad pointer would fault the
                // call anyway (EFAULT), so an application cannot rely on it.
                let v = unsafe { std::ptr::read_volatile(iov.add(i)) };
                lo = lo.min(v.iov_base as u64);
                hi = hi.max(v.iov_base as u64 + v.iov_len as u64);
            }
            (lo < hi).then(|| Some((page_range(lo, hi - lo)?, K_DISCARD, 0)))?
        }
        _ => None,
    }
}

/// The extent of the shared-memory mapping at `addr`, from /proc/self/maps.
pub(super) fn shm_range(addr: u64) -> Option<Range<u64>> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut range: Option<Range<u64>> = None;
    let mut inode = None;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (a, b) = f.next()?.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let ino = f.nth(3)?.to_string();
        match (&mut range, &inode) {
            (None, _) if a == addr => {
                range = Some(a..b);
                inode = Some(ino);
            }
            (Some(r), Some(i)) if r.end == a && *i == ino => r.end = b,
            (Some(_), _) => break,
            _ => {}
        }
    }
    range
}
