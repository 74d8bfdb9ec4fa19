//! How far a call reaches beyond the range its arguments name, for the calls where
//! the kernel decides: a mapping's length rounded up to its huge page, a SysV segment's
//! size, the mappings `shmdt` takes, the mapping a `PROT_GROWSDOWN` change extends
//! to. Each answer is the kernel's range or a superset of it.

use crate::{PAGE, TOP};
use std::ffi::c_int;

/// Largest huge page a mapping may use here (x86-64: 1 GiB).
const MAX_HUGE_PAGE: u64 = 1 << 30;

/// What the kernel rounds a mapping's length up to: the huge page of `MAP_HUGETLB`
/// (its default size unknown here: the largest) or of a hugetlbfs file, else a page.
pub(crate) fn map_unit(flags: c_int, fd: c_int) -> u64 {
    if flags & libc::MAP_ANONYMOUS != 0 {
        if flags & libc::MAP_HUGETLB == 0 {
            return PAGE;
        }
        return match (flags >> libc::MAP_HUGE_SHIFT) & libc::MAP_HUGE_MASK {
            0 => MAX_HUGE_PAGE,
            log => 1u64 << log.min(40),
        };
    }
    // SAFETY: an all-zero statfs is valid (plain integers); fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs (a bad fd is EBADF, and so is the mmap).
    let hugetlbfs =
        unsafe { libc::fstatfs(fd, &mut st) } == 0 && st.f_type == libc::HUGETLBFS_MAGIC;
    if hugetlbfs {
        (st.f_bsize as u64).max(PAGE)
    } else {
        PAGE
    }
}

/// The range `shmat(id, addr, SHM_REMAP | …)` replaces: `[addr, addr + size)`, the size
/// the segment's (from `IPC_STAT`) rounded up as the kernel maps it: to pages, or to
/// the huge page a hugetlb segment uses, which is at most the alignment `addr` must
/// have (the shim cannot tell the two apart, so it rounds to that alignment).
pub(crate) fn shm_remap_range(id: c_int, addr: u64, flags: c_int) -> Option<(u64, u64)> {
    // SHMLBA is the page size on x86-64.
    let a = if flags & libc::SHM_RND != 0 {
        addr & !(PAGE - 1)
    } else {
        addr
    };
    // SAFETY: an all-zero shmid_ds is valid (plain integers); IPC_STAT fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds into `ds`.
    if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } != 0 {
        // No size to be had (the shmat will most likely fail too): everything above.
        return Some((a & !(PAGE - 1), TOP));
    }
    let unit = (1u64 << a.trailing_zeros().min(63)).clamp(PAGE, MAX_HUGE_PAGE);
    let end = a
        .checked_add(ds.shm_segsz as u64)?
        .checked_next_multiple_of(unit)?;
    crate::page_range(a, end - a)
}

/// One line of /proc/self/maps: range, file offset, device and inode, SysV shm or not.
pub(crate) struct Vma {
    pub(crate) start: u64,
    pub(crate) end: u64,
    offset: u64,
    file: (String, u64),
    sysv: bool,
}

fn parse_vma(line: &str) -> Option<Vma> {
    let mut f = line.split_whitespace();
    let (a, b) = f.next()?.split_once('-')?;
    let _perms = f.next()?;
    let offset = u64::from_str_radix(f.next()?, 16).ok()?;
    let dev = f.next()?.to_string();
    let inode = f.next()?.parse().ok()?;
    Some(Vma {
        start: u64::from_str_radix(a, 16).ok()?,
        end: u64::from_str_radix(b, 16).ok()?,
        offset,
        file: (dev, inode),
        sysv: f.next().is_some_and(|p| p.starts_with("/SYSV")),
    })
}

/// The mappings of this process (`None`: /proc/self/maps cannot be read).
pub(crate) fn vmas() -> Option<Vec<Vma>> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    Some(maps.lines().filter_map(parse_vma).collect())
}

/// What `shmdt(addr)` may unmap. The kernel finds the first SysV mapping from `addr` up
/// whose file offset is its distance from `addr` (the attach itself, or a fragment of
/// it that `mprotect` or `munmap` left), then unmaps every fragment of that attach
/// within the segment's size: all of it lies between `addr` and the end of the last
/// mapping of the same file. `None`: nothing matches, the kernel answers EINVAL.
pub(crate) fn shm_detach_range(addr: u64) -> Option<(u64, u64)> {
    if addr % PAGE != 0 {
        return None;
    }
    let Some(mut vmas) = vmas() else {
        return Some((addr, TOP)); // cannot tell: everything above
    };
    vmas.retain(|v| v.end > addr);
    let first = vmas
        .iter()
        .find(|v| v.sysv && v.start.wrapping_sub(addr) / PAGE == v.offset / PAGE)?;
    let end = vmas
        .iter()
        .filter(|v| v.file == first.file)
        .map(|v| v.end)
        .max()?;
    Some((addr.min(first.start), end))
}
