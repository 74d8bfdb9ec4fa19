//! The call decoder: what a trapped call means for the registry (the ranges it
//! changes and why), whatever its ABI.
//!
//! Every pointer argument is read through [`super::user_memory`]; a call whose
//! arguments cannot be read is one the kernel will refuse (`EFAULT`), so it changes
//! nothing and needs no invalidation. Advice is classified by
//! [`crate::monitor::advice::is_destructive`]: anything not known to be harmless
//! invalidates.

use super::abi::{Abi, Op, NR_BRK, NR_SHMCTL, SHM_REMAP, UFFDIO_MOVE, UFFDIO_POISON};
use super::user_memory;
use super::worker::{K_DISCARD, K_PROTECT, K_REMAP, K_SHMDT, K_UNMAP};
use crate::monitor::advice::is_destructive;
use std::ops::Range;

/// One range a call changes: the range, the cause kind (`worker::K_*`) and its argument.
pub(super) type Change = (Range<u64>, u32, u64);

/// The page range `[start, start + len)` rounded out to pages; `None` if empty or it
/// overflows (the kernel refuses such a call).
pub(super) fn page_range(start: u64, len: u64) -> Option<Range<u64>> {
    if len == 0 {
        return None;
    }
    let end = start.checked_add(len)?.checked_next_multiple_of(4096)?;
    Some(start & !4095..end)
}

fn query(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: queries with no effect on memory (`brk(0)`, `shmctl(IPC_STAT)` into a
    // local of ours).
    unsafe { crate::trampoline::syscall(nr, a) }
}

/// The size of SysV segment `id`, from `shmctl(IPC_STAT)`.
pub(super) fn shm_size(id: u64) -> Option<u64> {
    // SAFETY: shmid_ds is plain data; all zeroes is a valid value to be overwritten.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    let r = query(
        NR_SHMCTL,
        [
            id,
            libc::IPC_STAT as u64,
            &mut ds as *mut libc::shmid_ds as u64,
            0,
            0,
            0,
        ],
    );
    (r == 0).then_some(ds.shm_segsz as u64)
}

/// The ranges a call with arguments `a` changes (at most two: a moving `mremap`'s source
/// and destination, `UFFDIO_MOVE`'s source and destination).
pub(super) fn decode(abi: Abi, op: Op, a: [u64; 6]) -> [Option<Change>; 2] {
    let one = |c: Option<Change>| [c, None];
    match op {
        Op::Munmap | Op::RemapFilePages => one(page_range(a[0], a[1]).map(|r| (r, K_UNMAP, 0))),
        Op::Mprotect | Op::PkeyMprotect => {
            one(page_range(a[0], a[1]).map(|r| (r, K_PROTECT, a[2] & 0xffff_ffff)))
        }
        Op::Madvise if is_destructive(a[2] as i32) => {
            one(page_range(a[0], a[1]).map(|r| (r, K_DISCARD, 0)))
        }
        Op::ProcessMadvise => one(process_madvise(abi, a)),
        Op::Mremap => {
            let fixed = a[3] & libc::MREMAP_FIXED as u64 != 0;
            let to = if fixed { a[4] } else { 0 };
            let dest = fixed
                .then(|| page_range(a[4], a[2]))
                .flatten()
                .map(|r| (r, K_UNMAP, 0));
            [page_range(a[0], a[1]).map(|r| (r, K_REMAP, to)), dest]
        }
        Op::Brk => {
            let cur = query(NR_BRK, [0; 6]) as u64;
            one((a[0] != 0 && a[0] < cur)
                .then(|| page_range(a[0], cur - a[0]))
                .flatten()
                .map(|r| (r, K_UNMAP, 0)))
        }
        Op::Mmap if a[3] & libc::MAP_FIXED as u64 != 0 => {
            one(page_range(a[0], a[1]).map(|r| (r, K_UNMAP, 0)))
        }
        Op::OldMmap => match old_mmap_args(a[0]) {
            Some(m) if m[3] & libc::MAP_FIXED as u64 != 0 => {
                one(page_range(m[0], m[1]).map(|r| (r, K_UNMAP, 0)))
            }
            _ => [None, None],
        },
        Op::Shmat => one(shmat(a[0], a[1], a[2])),
        Op::Shmdt => one(Some((a[0] & !4095..(a[0] & !4095) + 4096, K_SHMDT, 0))),
        Op::Ipc => match a[0] & 0xffff {
            // ipc(SHMAT, shmid, shmflg, &raddr, shmaddr)
            21 => one(shmat(a[1], a[4], a[2])),
            // ipc(SHMDT, 0, 0, 0, shmaddr)
            22 => one(Some((a[4] & !4095..(a[4] & !4095) + 4096, K_SHMDT, 0))),
            _ => [None, None],
        },
        Op::Ioctl => uffd_ioctl(a[1] as u32, a[2]),
        _ => [None, None],
    }
}

/// i386 `mmap(struct mmap_arg_struct *)`: `{ addr, len, prot, flags, fd, offset }`,
/// 32 bits each.
pub(super) fn old_mmap_args(ptr: u64) -> Option<[u64; 6]> {
    let mut raw = [0u8; 24];
    if !user_memory::read(ptr, &mut raw) {
        return None;
    }
    let mut m = [0u64; 6];
    for (i, v) in m.iter_mut().enumerate() {
        *v = u32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().unwrap()) as u64;
    }
    Some(m)
}

/// `shmat(id, addr, flags)` with `SHM_REMAP` replaces what is mapped at `addr`.
fn shmat(id: u64, addr: u64, flags: u64) -> Option<Change> {
    if flags as u32 & SHM_REMAP == 0 || addr == 0 {
        return None;
    }
    let size = shm_size(id)?;
    page_range(addr, size).map(|r| (r, K_UNMAP, 0))
}

/// `process_madvise(pidfd, iov, vlen, advice, flags)`: the union of the iovecs (one
/// range, conservative), when the advice is destructive. The pidfd is not resolved:
/// every call is taken to apply to this process (another process's destructive advice
/// is refused by the kernel anyway; the invalidation is then merely innocent).
fn process_madvise(abi: Abi, a: [u64; 6]) -> Option<Change> {
    const UIO_MAXIOV: u64 = 1024;
    let (iov, vlen, advice, flags) = (a[1], a[2], a[3] as i32, a[4]);
    if flags != 0 || vlen == 0 || vlen > UIO_MAXIOV || !is_destructive(advice) {
        return None; // the kernel refuses it, or it leaves pages in place
    }
    let size = if abi == Abi::X86_64 { 16 } else { 8 };
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let mut chunk = [0u8; 512];
    let per = chunk.len() / size;
    let mut i = 0;
    while i < vlen as usize {
        let n = per.min(vlen as usize - i);
        let buf = &mut chunk[..n * size];
        if !user_memory::read(iov + (i * size) as u64, buf) {
            return None; // EFAULT: nothing happens
        }
        for v in buf.chunks_exact(size) {
            let (base, len) = if size == 16 {
                (
                    u64::from_le_bytes(v[0..8].try_into().unwrap()),
                    u64::from_le_bytes(v[8..16].try_into().unwrap()),
                )
            } else {
                (
                    u32::from_le_bytes(v[0..4].try_into().unwrap()) as u64,
                    u32::from_le_bytes(v[4..8].try_into().unwrap()) as u64,
                )
            };
            if len != 0 {
                lo = lo.min(base);
                hi = hi.max(base.saturating_add(len));
            }
        }
        i += n;
    }
    (lo < hi)
        .then(|| page_range(lo, hi - lo))
        .flatten()
        .map(|r| (r, K_DISCARD, 0))
}

/// `ioctl(uffd, UFFDIO_MOVE | UFFDIO_POISON, arg)` on the application's own
/// userfaultfd: pages move from `src` to `dst`, or a range is poisoned.
fn uffd_ioctl(cmd: u32, arg: u64) -> [Option<Change>; 2] {
    let mut raw = [0u8; 40];
    let word =
        |raw: &[u8; 40], i: usize| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap());
    match cmd {
        UFFDIO_MOVE if user_memory::read(arg, &mut raw) => {
            // struct uffdio_move { dst, src, len, mode, move }
            let (dst, src, len) = (word(&raw, 0), word(&raw, 1), word(&raw, 2));
            [
                page_range(src, len).map(|r| (r, K_REMAP, dst)),
                page_range(dst, len).map(|r| (r, K_UNMAP, 0)),
            ]
        }
        UFFDIO_POISON if user_memory::read(arg, &mut raw[..32]) => {
            // struct uffdio_poison { range { start, len }, mode, updated }
            [
                page_range(word(&raw, 0), word(&raw, 1)).map(|r| (r, K_DISCARD, 0)),
                None,
            ]
        }
        _ => [None, None],
    }
}

/// The extent of the shared-memory mapping at `addr`, from /proc/self/maps (read by the
/// worker, which may allocate).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_is_classified_fail_safe() {
        let d =
            |adv: u64| decode(Abi::X86_64, Op::Madvise, [0x1000, 4096, adv, 0, 0, 0])[0].clone();
        assert!(d(libc::MADV_DONTNEED as u64).is_some());
        assert!(d(102).is_some(), "MADV_GUARD_INSTALL");
        assert!(d(24).is_some(), "MADV_DONTNEED_LOCKED");
        assert!(d(77).is_some(), "an advice no kernel knows yet");
        assert!(d(libc::MADV_WILLNEED as u64).is_none());
        assert!(d(20).is_none(), "MADV_COLD");
    }

    #[test]
    fn process_madvise_with_a_bad_iovec_or_count_changes_nothing() {
        let iov = [libc::iovec {
            iov_base: 0x10_0000 as *mut _,
            iov_len: 8192,
        }];
        let p = iov.as_ptr() as u64;
        let call = |iov, vlen, adv| {
            decode(Abi::X86_64, Op::ProcessMadvise, [3, iov, vlen, adv, 0, 0])[0].clone()
        };
        assert_eq!(
            call(p, 1, libc::MADV_DONTNEED as u64).map(|c| c.0),
            Some(0x10_0000..0x10_2000)
        );
        assert!(call(16, 1, libc::MADV_DONTNEED as u64).is_none(), "EFAULT");
        assert!(
            call(p, 1025, libc::MADV_DONTNEED as u64).is_none(),
            "EINVAL, not read"
        );
        assert!(call(p, 1, libc::MADV_COLD as u64).is_none());
    }
}
