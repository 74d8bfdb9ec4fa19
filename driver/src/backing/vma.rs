//! The VMAs of a range, as the kernel reports them: the `PROCMAP_QUERY` ioctl on
//! `/proc/self/maps` (Linux 6.11+; one call per VMA, whatever its size), or the text of
//! `/proc/self/maps` where the kernel lacks it. The only `unsafe` of [`super`]: the
//! ioctl.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// VMAs looked up so far (statistics, [`super::stats`]).
pub(super) static VMAS: AtomicU64 = AtomicU64::new(0);

/// The file a mapping shows, as `/proc/self/maps` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// Major number of the file's device (its superblock).
    pub dev_major: u32,
    /// Minor number of the file's device.
    pub dev_minor: u32,
    /// Inode number.
    pub inode: u64,
}

/// One VMA: what the kernel reports for a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// The VMA's address range.
    pub range: Range<u64>,
    /// A shared mapping (`VM_MAYSHARE`: `MAP_SHARED`, SysV shm).
    pub shared: bool,
    /// The mapped file, if any (shared anonymous memory and SysV shm have one, inside
    /// the kernel's tmpfs).
    pub file: Option<FileId>,
    /// The VMA's name (`/memfd:x (deleted)`, `/SYSV00000000 (deleted)`, a path), as
    /// `/proc/self/maps` shows it; kept for shared file-backed VMAs only (the policy
    /// tells SysV shm and shared anonymous memory by it), empty otherwise.
    pub name: String,
}

/// The VMAs overlapping `range`, in address order (`PROCMAP_QUERY`, or the text of
/// `/proc/self/maps` where the kernel lacks the ioctl).
pub fn vmas(range: Range<u64>) -> io::Result<Vec<Vma>> {
    // Relaxed: a sticky hint; either path gives the same answer.
    if !NO_QUERY.load(Ordering::Relaxed) {
        match query::vmas(range.clone()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                NO_QUERY.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    vmas_parsed(range)
}

static NO_QUERY: AtomicBool = AtomicBool::new(false);

/// The VMAs overlapping `range`, from the text of `/proc/self/maps` (the fallback).
pub fn vmas_parsed(range: Range<u64>) -> io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let v = parse_maps_line(line).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unparsable /proc/self/maps line `{line}`"),
            )
        })?;
        if v.range.start < range.end && range.start < v.range.end {
            // Relaxed: statistics.
            VMAS.fetch_add(1, Ordering::Relaxed);
            out.push(v);
        }
    }
    Ok(out)
}

/// One line of `/proc/self/maps`: `start-end perms offset major:minor inode name`.
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut rest = line;
    let mut field = || {
        let s = rest.trim_start();
        let end = s.find(' ').unwrap_or(s.len());
        rest = &s[end..];
        Some(&s[..end]).filter(|f| !f.is_empty())
    };
    let (a, b) = field()?.split_once('-')?;
    let perms = field()?.as_bytes();
    let _offset = field()?;
    let (maj, min) = field()?.split_once(':')?;
    let inode: u64 = field()?.parse().ok()?;
    let range = u64::from_str_radix(a, 16).ok()?..u64::from_str_radix(b, 16).ok()?;
    let id = FileId {
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode,
    };
    let file = (id.inode != 0 || id.dev_major != 0 || id.dev_minor != 0).then_some(id);
    Some(Vma {
        range,
        shared: *perms.get(3)? == b's',
        file,
        name: if file.is_some() && perms.get(3) == Some(&b's') {
            rest.trim_start().to_string()
        } else {
            String::new()
        },
    })
}

/// The `PROCMAP_QUERY` ioctl on a cached `/proc/self/maps` descriptor.
mod query {
    use super::{FileId, Vma, VMAS};
    use std::fs::File;
    use std::io;
    use std::ops::Range;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    /// `struct procmap_query` (include/uapi/linux/fs.h).
    #[repr(C)]
    #[derive(Default)]
    struct ProcmapQuery {
        size: u64,
        query_flags: u64,
        query_addr: u64,
        vma_start: u64,
        vma_end: u64,
        vma_flags: u64,
        vma_page_size: u64,
        vma_offset: u64,
        inode: u64,
        dev_major: u32,
        dev_minor: u32,
        vma_name_size: u32,
        build_id_size: u32,
        vma_name_addr: u64,
        build_id_addr: u64,
    }

    const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);
    /// `_IOWR('f', 17, struct procmap_query)`.
    const PROCMAP_QUERY: u64 =
        (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16) | (0x66 << 8) | 17;
    const VMA_SHARED: u64 = 0x08;
    const COVERING_OR_NEXT_VMA: u64 = 0x10;

    /// The descriptor, opened once. The kernel binds a maps descriptor to the address
    /// space of the process that opened it, so a fork child (which inherits this one)
    /// opens its own instead. Serialised: some kernels keep per-descriptor state in
    /// the ioctl.
    static MAPS: Mutex<Option<File>> = Mutex::new(None);

    pub(super) fn vmas(range: Range<u64>) -> io::Result<Vec<Vma>> {
        crate::fork::install();
        if crate::fork::in_forked_child() {
            return walk(&File::open("/proc/self/maps")?, range);
        }
        let mut g = crate::driver_section::lock(&MAPS);
        if g.is_none() {
            *g = Some(File::open("/proc/self/maps")?);
        }
        walk(g.as_ref().expect("opened above"), range)
    }

    /// One PROCMAP_QUERY: the VMA covering `at` or the next one (`None`: none), with
    /// its name in `name` if given.
    fn query(maps: &File, at: u64, name: Option<&mut [u8]>) -> io::Result<Option<ProcmapQuery>> {
        let (addr, size) = name.map_or((0, 0), |n| (n.as_mut_ptr() as u64, n.len() as u32));
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_flags: COVERING_OR_NEXT_VMA,
            query_addr: at,
            vma_name_addr: addr,
            vma_name_size: size,
            ..Default::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes the `ProcmapQuery` it is given (its
        // `size` says how much) and writes at most `vma_name_size` bytes to
        // `vma_name_addr`, the caller's buffer (or nothing: size 0, address 0); no
        // build ID is asked for (size 0, address 0). Both outlive the call; the kernel
        // keeps no pointer.
        let r = unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY as _, &mut q) };
        if r == 0 {
            return Ok(Some(q));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        }
    }

    fn file_of(q: &ProcmapQuery) -> Option<FileId> {
        let id = FileId {
            dev_major: q.dev_major,
            dev_minor: q.dev_minor,
            inode: q.inode,
        };
        (id.inode != 0 || id.dev_major != 0 || id.dev_minor != 0).then_some(id)
    }

    fn walk(maps: &File, range: Range<u64>) -> io::Result<Vec<Vma>> {
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            // Without the name first: asking for it costs the kernel an allocation
            // and a path walk, and only shared file memory needs it.
            let Some(mut q) = query(maps, at, None)? else {
                break;
            };
            let mut name = String::new();
            if q.vma_flags & VMA_SHARED != 0 && file_of(&q).is_some() {
                let mut buf = vec![0u8; 4096];
                // Asked again, and this answer taken whole (the VMA may have changed).
                let Some(again) = query(maps, at, Some(&mut buf))? else {
                    break;
                };
                q = again;
                // The name's size includes its terminating NUL.
                let n = (q.vma_name_size as usize).min(buf.len());
                name = String::from_utf8_lossy(&buf[..n.saturating_sub(1)]).into_owned();
            }
            if q.vma_start >= range.end || q.vma_end <= at {
                break;
            }
            // Relaxed: statistics.
            VMAS.fetch_add(1, Ordering::Relaxed);
            let file = file_of(&q);
            let shared = q.vma_flags & VMA_SHARED != 0;
            out.push(Vma {
                range: q.vma_start..q.vma_end,
                shared,
                file,
                name: if shared && file.is_some() {
                    name
                } else {
                    String::new()
                },
            });
            at = q.vma_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let v = parse_maps_line(
            "7f12a0000000-7f12a0010000 rw-s 00000000 00:01 4242  /memfd:x (deleted)",
        )
        .unwrap();
        assert_eq!(v.range, 0x7f12a0000000..0x7f12a0010000);
        assert!(v.shared);
        assert_eq!(
            v.file,
            Some(FileId {
                dev_major: 0,
                dev_minor: 1,
                inode: 4242
            })
        );
        assert_eq!(v.name, "/memfd:x (deleted)");
        let a =
            parse_maps_line("55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0   [heap]").unwrap();
        assert!(!a.shared);
        assert_eq!((a.file, a.name.as_str()), (None, ""));
        let f = parse_maps_line("400000-401000 r--p 00001000 fd:0a 123 /usr/bin/a b").unwrap();
        assert_eq!(f.file.unwrap().dev_major, 0xfd);
        assert_eq!(f.file.unwrap().dev_minor, 0x0a);
        assert_eq!(f.name, "", "private: no name kept");
        let g = parse_maps_line("400000-401000 rw-s 00000000 00:05 7 /dev/shm/a b").unwrap();
        assert_eq!(g.name, "/dev/shm/a b");
        assert!(parse_maps_line("garbage").is_none());
        assert!(parse_maps_line("1-2 rw-p 0 00:00").is_none());
    }
}
