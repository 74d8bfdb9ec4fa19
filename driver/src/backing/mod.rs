//! Which memory may be pinned: the file-side policy.
//!
//! A pin holds the pages that backed a range when it was taken. The monitors keep
//! the registry coherent with *address-space* changes of this process (munmap,
//! madvise, mprotect, mremap, ...). Memory backed by a file can also lose its pages
//! through the *file*: `fallocate(FALLOC_FL_PUNCH_HOLE)`, `ftruncate`, or
//! `madvise(MADV_REMOVE)` (a hole punch through a mapping), by this process or by any
//! other process holding the file. None of those is an address-space change of this
//! process that a monitor sees, and the page the device keeps reaching is no longer the
//! page the process maps (`tests/hazard.rs` shows it with raw kernel pins). So every
//! user-memory pin ([`crate::Driver::map_user`], [`crate::UserMapping`] and the
//! registry's pin path) is checked here right after the pin is taken, and refused
//! (unpinned, with [`Error::ReplaceablePages`]) unless nobody can take its pages away:
//!
//! | backing | accepted when |
//! |---|---|
//! | private anonymous (heap, stack, `MAP_PRIVATE \| MAP_ANONYMOUS`) | always |
//! | private file mapping (`MAP_PRIVATE` of a file) | the registration is device-writable **and** the file is sealed with `F_SEAL_SHRINK` |
//! | shared memory backed by a file (`MAP_SHARED` of a memfd, a tmpfs or hugetlbfs file) | the file is sealed with `F_SEAL_SHRINK` and (`F_SEAL_WRITE` or `F_SEAL_FUTURE_WRITE`): in practice a memfd made with `MFD_ALLOW_SEALING` |
//! | SysV shared memory, `MAP_SHARED \| MAP_ANONYMOUS` | never: they cannot be sealed |
//!
//! Why each rule (every fact checked on Linux 6.18 by `tests/backing.rs` and
//! `tests/hazard.rs`):
//! * **Shared file memory.** `shmem_fallocate` refuses `FALLOC_FL_PUNCH_HOLE` (and so
//!   `MADV_REMOVE`, which punches through the mapping) with `EPERM` under either write
//!   seal, and `F_SEAL_SHRINK` makes every shrinking `ftruncate` fail with `EPERM`.
//!   Seals can be added, never removed, so once sealed the file stays so. These are the
//!   seals the kernel's own udmabuf demands before it exports memfd pages to devices.
//!   Only memfds created with `MFD_ALLOW_SEALING` can be sealed: other tmpfs files,
//!   SysV segments and shared anonymous memory carry `F_SEAL_SEAL` from birth, and
//!   regular files do not support seals at all (`F_GET_SEALS` fails with `EINVAL`).
//!   (hugetlbfs memfds, `MFD_HUGETLB`, refuse hole punching and shrinking under the
//!   same seals; that is from the kernel's source, as this machine reserves no huge
//!   pages to test it with.)
//! * **Private file mappings.** The device-writable pin (`FOLL_WRITE`) breaks
//!   copy-on-write, so the pinned pages are anonymous copies, and hole punching leaves
//!   copies alone. A *shrinking `ftruncate`* does not: the kernel zaps the private copies
//!   beyond the new end from every mapping of the file (`truncate_pagecache`, "even
//!   COWs"), so the process faults in fresh file pages once the file grows back while
//!   the device keeps the old copies. Hence `F_SEAL_SHRINK`, for private mappings too.
//!   A device-read-only registration is refused outright: a pin without `FOLL_WRITE`
//!   (VFIO's, for a read-only mapping) may hold the file's page-cache page itself, which
//!   a hole punch or truncation by anyone replaces. (Recent kernels break copy-on-write
//!   on read-only long-term pins of private mappings too, `gup_must_unshare`, which
//!   makes that pin an anonymous copy; the driver does not rely on it, and this machine
//!   has no read-only long-term pin to check it with: io_uring always pins with
//!   `FOLL_WRITE`.)
//! * **Private anonymous memory** has no file: only this process's own address-space
//!   calls change it, and the monitors see those.
//!
//! # What another process holding the same sealed file can still do
//!
//! With `F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE` in place, another process that has the
//! memfd (it inherited or was sent the descriptor, or opened `/proc/<pid>/fd/<n>`):
//! * **writes data** through writable shared mappings it made *before* the seal
//!   (`F_SEAL_FUTURE_WRITE` refuses new writable mappings and `write(2)`): it changes the
//!   contents of the very pages the device has pinned, so the device and the process
//!   both see it (data, not pages; ordering it against DMA is the applications'
//!   business, as with any shared memory);
//! * **grows the file** (`ftruncate` to a larger size, `fallocate` without
//!   `FALLOC_FL_PUNCH_HOLE`), unless `F_SEAL_GROW` is set too: new pages past the old
//!   end, none of them pinned ones;
//! * reads it, maps it read-only, and changes *its own* mappings of it (munmap,
//!   `MADV_DONTNEED`, `remap_file_pages`): its own page tables, not this process's;
//! * adds more seals (`F_SEAL_GROW`; `F_SEAL_WRITE` only once no writable mapping
//!   remains).
//!
//! It cannot punch holes (`fallocate(FALLOC_FL_PUNCH_HOLE)` and `MADV_REMOVE` fail with
//! `EPERM`), shrink the file (`EPERM`), or remove a seal: nothing it can do replaces a
//! page this process maps. Reclaim and migration leave pinned pages where they are
//! (their reference count), so `MADV_PAGEOUT` by anyone at most unmaps them until the
//! next fault finds the same page. With `F_SEAL_WRITE` instead of `F_SEAL_FUTURE_WRITE`, nobody can write at
//! all (the seal is only granted while no writable mapping exists).
//!
//! # What this module does not cover
//!
//! `remap_file_pages` rearranges which file pages a *shared* mapping of this process
//! shows. On a sealed memfd the kernel refuses it (`EPERM`) on a writable mapping, but
//! allows it once the mapping has been made read-only (`mprotect`), and no monitor traps
//! it yet: `tests/hazard.rs` demonstrates it; the monitors must treat it as an unmap of
//! its range.
//!
//! # How it is checked, and what it costs
//!
//! After the pin, one `PROCMAP_QUERY` ioctl on `/proc/self/maps` (Linux 6.11+; the text
//! of `/proc/self/maps` is parsed where the ioctl is missing) per VMA the range spans,
//! usually one, whatever the range's size: a few hundred nanoseconds. Private anonymous
//! memory needs nothing more. For file-backed VMAs the seals are read through a
//! descriptor for the mapped file: `/proc/self/map_files/<start>-<end>` where it can be
//! opened (it needs `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`), otherwise a descriptor
//! in `/proc/self/fd` whose device and inode are the mapping's; no descriptor, no
//! acceptance. What cannot be classified is refused ([`Error::BackingUnknown`]).
//!
//! `unsafe` here: the one `PROCMAP_QUERY` ioctl ([`vma`]), which this module owns.

pub mod vma;

pub use vma::{parse_maps_line, vmas, vmas_parsed, FileId, Vma};

use crate::error::{Error, Result};
use crate::iommu::Perm;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// `F_SEAL_SEAL`: no more seals can be added.
pub const F_SEAL_SEAL: u32 = 0x01;
/// `F_SEAL_SHRINK`: the file cannot shrink.
pub const F_SEAL_SHRINK: u32 = 0x02;
/// `F_SEAL_GROW`: the file cannot grow.
pub const F_SEAL_GROW: u32 = 0x04;
/// `F_SEAL_WRITE`: the contents cannot change.
pub const F_SEAL_WRITE: u32 = 0x08;
/// `F_SEAL_FUTURE_WRITE`: no new writable mappings or writes; existing mappings keep
/// writing.
pub const F_SEAL_FUTURE_WRITE: u32 = 0x10;
/// What kind of shared memory a shared VMA is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedKind {
    /// A file the process mapped (a memfd, a tmpfs, hugetlbfs or regular file).
    File,
    /// A SysV shared-memory segment (`shmat`).
    SysV,
    /// `MAP_SHARED | MAP_ANONYMOUS` (the kernel's `/dev/zero` or `anon_hugepage` file).
    Anonymous,
}

/// What the seals of a mapped file say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seals {
    /// The seals, as `F_GET_SEALS` reads them (`F_SEAL_*` bits).
    Read(u32),
    /// The file does not support seals (`F_GET_SEALS` fails with `EINVAL`: not shmem
    /// or hugetlbfs).
    NotSealable,
    /// No descriptor for the file could be opened, so the seals are unknown.
    NoDescriptor,
}

/// What backs one VMA, as far as the policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    PrivateAnonymous,
    /// A private mapping of a file, with the file's seals.
    PrivateFile(Seals),
    /// Shared memory of a kind, with its file's seals.
    Shared(SharedKind, Seals),
}

/// Why a range was refused ([`Error::ReplaceablePages`]); the message names the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A device-read-only registration of a private file mapping.
    ReadOnlyPrivateFile,
    /// A file without the seals the policy needs (`seals`: what it has).
    Unsealed {
        /// A shared mapping (else private).
        shared: bool,
        /// The seals it has (`F_SEAL_*` bits).
        seals: u32,
    },
    /// A file that does not support seals (a regular file).
    NotSealable {
        /// A shared mapping (else private).
        shared: bool,
    },
    /// SysV shared memory.
    SysV,
    /// `MAP_SHARED | MAP_ANONYMOUS` memory.
    SharedAnonymous,
    /// No descriptor for the mapped file could be found to check its seals.
    NoDescriptor,
}

const FIX: &str = "seal the memfd with F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE, as udmabuf requires";

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Refusal::ReadOnlyPrivateFile => write!(
                f,
                "it is a private file mapping registered device-read-only: a pin without \
                 FOLL_WRITE may hold the file's page-cache page, which truncation or hole \
                 punching by any process holding the file replaces; register it \
                 device-writable (the pin then breaks copy-on-write) or copy the data to \
                 anonymous memory"
            ),
            Refusal::Unsealed {
                shared: true,
                seals,
            } => {
                write!(
                    f,
                    "it is a shared mapping of a file not sealed against page removal (seals: \
                     {}): any process holding the file can punch holes (fallocate, \
                     MADV_REMOVE) or truncate it, replacing the pages behind the pin; {FIX}",
                    SealNames(seals)
                )?;
                cannot_seal(f, seals)
            }
            Refusal::Unsealed {
                shared: false,
                seals,
            } => {
                write!(
                    f,
                    "it is a private mapping of a file not sealed against shrinking (seals: \
                     {}): an ftruncate by any process holding the file takes the private \
                     copies out of this process's mapping while the device keeps them; seal \
                     the memfd with F_SEAL_SHRINK, or use anonymous memory",
                    SealNames(seals)
                )?;
                cannot_seal(f, seals)
            }
            Refusal::NotSealable { shared } => write!(
                f,
                "it is a {} mapping of a file that does not support seals (only memfds do): \
                 any process that can open the file may truncate it or punch holes in it; \
                 map a memfd instead and {FIX}",
                if shared { "shared" } else { "private" }
            ),
            Refusal::SysV => write!(
                f,
                "it is SysV shared memory, which cannot be sealed: another process attached \
                 to it can punch holes (MADV_REMOVE) and replace the pages behind the pin; \
                 use a memfd instead and {FIX}"
            ),
            Refusal::SharedAnonymous => write!(
                f,
                "it is shared anonymous memory (MAP_SHARED | MAP_ANONYMOUS), which cannot be \
                 sealed: another process sharing it (a fork child) can punch holes \
                 (MADV_REMOVE) and replace the pages behind the pin; use a memfd instead \
                 and {FIX}"
            ),
            Refusal::NoDescriptor => write!(
                f,
                "it is a file mapping whose seals cannot be checked: /proc/self/map_files \
                 needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and no descriptor in \
                 /proc/self/fd is the mapped file; keep the memfd open while it is \
                 registered"
            ),
        }
    }
}

fn cannot_seal(f: &mut fmt::Formatter<'_>, seals: u32) -> fmt::Result {
    if seals & F_SEAL_SEAL != 0 {
        write!(
            f,
            " (this file carries F_SEAL_SEAL, so it can never be sealed: create the memfd \
             with MFD_ALLOW_SEALING)"
        )?;
    }
    Ok(())
}

/// `F_SEAL_*` bits in words.
struct SealNames(u32);

impl fmt::Display for SealNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u32, &str); 5] = [
            (F_SEAL_SEAL, "F_SEAL_SEAL"),
            (F_SEAL_SHRINK, "F_SEAL_SHRINK"),
            (F_SEAL_GROW, "F_SEAL_GROW"),
            (F_SEAL_WRITE, "F_SEAL_WRITE"),
            (F_SEAL_FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
        ];
        let mut any = false;
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if any { " | " } else { "" })?;
                any = true;
            }
        }
        if !any {
            write!(f, "none")?;
        }
        Ok(())
    }
}

/// The policy, on what backs one VMA and the registration's device permissions.
pub fn decide(backing: Backing, perm: Perm) -> Result<(), Refusal> {
    match backing {
        Backing::PrivateAnonymous => Ok(()),
        Backing::PrivateFile(_) if !perm.write() => Err(Refusal::ReadOnlyPrivateFile),
        Backing::PrivateFile(Seals::Read(s)) if s & F_SEAL_SHRINK != 0 => Ok(()),
        Backing::PrivateFile(Seals::Read(seals)) => Err(Refusal::Unsealed {
            shared: false,
            seals,
        }),
        Backing::PrivateFile(Seals::NotSealable) => Err(Refusal::NotSealable { shared: false }),
        Backing::PrivateFile(Seals::NoDescriptor) => Err(Refusal::NoDescriptor),
        Backing::Shared(_, Seals::Read(s))
            if s & F_SEAL_SHRINK != 0 && s & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0 =>
        {
            Ok(())
        }
        Backing::Shared(SharedKind::SysV, _) => Err(Refusal::SysV),
        Backing::Shared(SharedKind::Anonymous, _) => Err(Refusal::SharedAnonymous),
        Backing::Shared(SharedKind::File, Seals::Read(seals)) => Err(Refusal::Unsealed {
            shared: true,
            seals,
        }),
        Backing::Shared(SharedKind::File, Seals::NotSealable) => {
            Err(Refusal::NotSealable { shared: true })
        }
        Backing::Shared(SharedKind::File, Seals::NoDescriptor) => Err(Refusal::NoDescriptor),
    }
}

/// Counters, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackingStats {
    /// Ranges checked.
    pub checks: u64,
    /// VMAs looked up (`PROCMAP_QUERY` calls or parsed lines).
    pub vmas: u64,
    /// Seal lookups (a descriptor opened for a file-backed VMA).
    pub seal_lookups: u64,
    /// Ranges refused.
    pub refusals: u64,
}

static CHECKS: AtomicU64 = AtomicU64::new(0);
static SEAL_LOOKUPS: AtomicU64 = AtomicU64::new(0);
static REFUSALS: AtomicU64 = AtomicU64::new(0);

/// The counters so far (process-wide).
pub fn stats() -> BackingStats {
    // Relaxed: independent statistics counters.
    BackingStats {
        checks: CHECKS.load(Ordering::Relaxed),
        vmas: vma::VMAS.load(Ordering::Relaxed),
        seal_lookups: SEAL_LOOKUPS.load(Ordering::Relaxed),
        refusals: REFUSALS.load(Ordering::Relaxed),
    }
}

/// Check the pinned, page-aligned range `[range.start, range.end)` against the policy.
/// `Ok` if every VMA in it is acceptable for `perm`; otherwise the first refused part
/// ([`Error::ReplaceablePages`]), a hole ([`Error::BadAddress`]: the range is not
/// mapped any more) or [`Error::BackingUnknown`].
pub fn check(range: Range<u64>, perm: Perm) -> Result<()> {
    // Relaxed: statistics.
    CHECKS.fetch_add(1, Ordering::Relaxed);
    let refuse = |e: Error| {
        // Relaxed: statistics.
        REFUSALS.fetch_add(1, Ordering::Relaxed);
        Err(e)
    };
    let list = match vmas(range.clone()) {
        Ok(l) => l,
        Err(source) => {
            return refuse(Error::BackingUnknown {
                addr: range.start,
                len: range.end - range.start,
                source,
            })
        }
    };
    let mut at = range.start;
    for v in &list {
        if v.range.start > at {
            return refuse(Error::BadAddress {
                addr: at,
                len: v.range.start.min(range.end) - at,
            });
        }
        let part = at..v.range.end.min(range.end);
        if let Err(reason) = decide(backing_of(v), perm) {
            return refuse(Error::ReplaceablePages {
                addr: part.start,
                len: part.end - part.start,
                reason,
            });
        }
        at = part.end;
    }
    if at < range.end {
        return refuse(Error::BadAddress {
            addr: at,
            len: range.end - at,
        });
    }
    Ok(())
}

/// What backs `v`: its kind, and for a file-backed VMA its seals (a descriptor lookup).
pub fn backing_of(v: &Vma) -> Backing {
    let Some(id) = v.file else {
        // A shared VMA always has a file; one without is not something to trust.
        return if v.shared {
            Backing::Shared(SharedKind::Anonymous, Seals::NoDescriptor)
        } else {
            Backing::PrivateAnonymous
        };
    };
    let seals = seals_of(v, id);
    if !v.shared {
        return Backing::PrivateFile(seals);
    }
    let kind = if v.name.starts_with("/SYSV") && v.name.ends_with(" (deleted)") {
        SharedKind::SysV
    } else if v.name == "/dev/zero (deleted)" || v.name == "/anon_hugepage (deleted)" {
        SharedKind::Anonymous
    } else {
        SharedKind::File
    };
    Backing::Shared(kind, seals)
}

fn same_file(m: &std::fs::Metadata, id: FileId) -> bool {
    let dev = m.dev();
    m.ino() == id.inode
        && rustix::fs::major(dev) == id.dev_major
        && rustix::fs::minor(dev) == id.dev_minor
}

/// A descriptor for the file `v` maps: its `/proc/self/map_files` entry, or a matching
/// descriptor the process holds.
fn open_mapped_file(v: &Vma, id: FileId) -> Option<File> {
    let direct = format!("/proc/self/map_files/{:x}-{:x}", v.range.start, v.range.end);
    if let Ok(f) = File::open(direct) {
        if f.metadata().is_ok_and(|m| same_file(&m, id)) {
            return Some(f);
        }
    }
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let p = e.path();
        // The target's identity first: only the mapped file is opened (a FIFO, which
        // an open could block on, is never mapped).
        if !std::fs::metadata(&p).is_ok_and(|m| same_file(&m, id)) {
            continue;
        }
        if let Ok(f) = File::open(&p) {
            // The descriptor may have been closed and reused in between.
            if f.metadata().is_ok_and(|m| same_file(&m, id)) {
                return Some(f);
            }
        }
    }
    None
}

fn seals_of(v: &Vma, id: FileId) -> Seals {
    // Relaxed: statistics.
    SEAL_LOOKUPS.fetch_add(1, Ordering::Relaxed);
    let Some(f) = open_mapped_file(v, id) else {
        return Seals::NoDescriptor;
    };
    match rustix::fs::fcntl_get_seals(&f) {
        Ok(s) => Seals::Read(s.bits()),
        Err(rustix::io::Errno::INVAL) => Seals::NotSealable,
        Err(_) => Seals::NoDescriptor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_names_read_as_words() {
        assert_eq!(SealNames(0).to_string(), "none");
        assert_eq!(
            SealNames(F_SEAL_SEAL | F_SEAL_FUTURE_WRITE).to_string(),
            "F_SEAL_SEAL | F_SEAL_FUTURE_WRITE"
        );
    }
}
