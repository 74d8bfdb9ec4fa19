//! The userfaultfd kernel ABI (`<linux/userfaultfd.h>`): the handshake, the ioctls
//! and the event messages, decoded from bytes.

use crate::error::{Error, Result};
use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode, Updater};
use std::os::fd::OwnedFd;

pub(super) const UFFD_API: u64 = 0xaa;
/// `userfaultfd()` flag: handle user-mode faults only (needed without privilege when
/// `vm.unprivileged_userfaultfd` is 0).
pub(super) const UFFD_USER_MODE_ONLY: u32 = 1;

pub(super) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub(super) const UFFD_EVENT_FORK: u8 = 0x13;
pub(super) const UFFD_EVENT_REMAP: u8 = 0x14;
pub(super) const UFFD_EVENT_REMOVE: u8 = 0x15;
pub(super) const UFFD_EVENT_UNMAP: u8 = 0x16;

pub(super) const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub(super) const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub(super) const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub(super) const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub(super) const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub(super) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

/// Features the monitor cannot work without, with their names for the error.
pub(super) const REQUIRED: [(u64, &str); 5] = [
    (
        UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        "UFFD_FEATURE_PAGEFAULT_FLAG_WP (write-protect registration)",
    ),
    (UFFD_FEATURE_EVENT_REMOVE, "UFFD_FEATURE_EVENT_REMOVE"),
    (UFFD_FEATURE_EVENT_UNMAP, "UFFD_FEATURE_EVENT_UNMAP"),
    (UFFD_FEATURE_EVENT_REMAP, "UFFD_FEATURE_EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_FORK, "UFFD_FEATURE_EVENT_FORK"),
];
/// Requested when the kernel has them.
pub(super) const OPTIONAL: u64 = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
/// Required, but dropped when the kernel refuses it for lack of privilege: EVENT_FORK
/// needs CAP_SYS_PTRACE. Without it the kernel unregisters a fork child's ranges by
/// itself (`dup_userfaultfd` resets them), which is the same outcome as closing the
/// child's userfaultfd: the child is unmonitored. Only the FORK counter is lost.
pub(super) const NEEDS_PTRACE: u64 = UFFD_FEATURE_EVENT_FORK;

pub(super) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
pub(super) struct UffdioApi {
    pub(super) api: u64,
    pub(super) features: u64,
    pub(super) ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
pub(super) struct UffdioRange {
    pub(super) start: u64,
    pub(super) len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
pub(super) struct UffdioRegister {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
pub(super) struct UffdioWriteprotect {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
}

pub(super) const UFFDIO_API: Opcode = opcode::read_write::<UffdioApi>(0xaa, 0x3f);
pub(super) const UFFDIO_REGISTER: Opcode = opcode::read_write::<UffdioRegister>(0xaa, 0x00);
pub(super) const UFFDIO_WRITEPROTECT: Opcode = opcode::read_write::<UffdioWriteprotect>(0xaa, 0x06);

// The values <linux/userfaultfd.h> gives on x86_64 and aarch64.
const _: () = assert!(UFFDIO_API as u64 == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER as u64 == 0xc020_aa00);
const _: () = assert!(UFFDIO_WRITEPROTECT as u64 == 0xc018_aa06);

/// Size of `struct uffd_msg`, which rustix does not define. Its layout (packed, 32
/// bytes):
///
/// ```text
/// offset 0   u8  event            (UFFD_EVENT_*)
/// offset 1   u8  reserved1, u16 reserved2, u32 reserved3
/// offset 8   union arg:
///              pagefault { u64 flags; u64 address; u32 ptid; }
///              fork      { u32 ufd; }
///              remap     { u64 from; u64 to; u64 len; }
///              remove    { u64 start; u64 end; }   (REMOVE and UNMAP)
/// ```
///
/// Messages are decoded from bytes ([`Event::parse`]): no unsafe cast.
pub(super) const MSG_SIZE: usize = 32;
/// Messages read per `read()`.
pub(super) const BATCH: usize = 64;

/// One decoded `struct uffd_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Remap { from: u64, to: u64, len: u64 },
    Fork { ufd: u32 },
    Pagefault { flags: u64, address: u64 },
    Unknown(u8),
}

impl Event {
    pub(super) fn parse(m: &[u8]) -> Event {
        let u64_at = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(m[o..o + 4].try_into().expect("4 bytes"));
        match m[0] {
            UFFD_EVENT_REMOVE => Event::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: u64_at(8),
                end: u64_at(16),
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            UFFD_EVENT_FORK => Event::Fork { ufd: u32_at(8) },
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                flags: u64_at(8),
                address: u64_at(16),
            },
            other => Event::Unknown(other),
        }
    }
}

pub(super) fn uffdio_api(fd: &OwnedFd, features: u64) -> rustix::io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API is _IOWR with `struct uffdio_api`, which `UffdioApi` mirrors
    // (three u64s, repr(C)); the kernel reads and writes only that struct.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<UFFDIO_API, UffdioApi>::new(&mut api))? };
    Ok(api)
}

/// Create a userfaultfd; returns it and whether it is user-mode-only.
pub(super) fn open_uffd() -> Result<(OwnedFd, bool)> {
    use rustix::mm::UserfaultfdFlags as F;
    let flags = F::CLOEXEC | F::NONBLOCK;
    // SAFETY: creating the fd is harmless in itself; what makes userfaultfd unsafe is
    // registering memory whose faults nobody serves. This module registers in WP mode
    // only and never write-protects, so no fault is ever left waiting on it.
    match unsafe { rustix::mm::userfaultfd(flags) } {
        Ok(fd) => return Ok((fd, false)),
        Err(Errno::PERM) => {}
        Err(e) => {
            return Err(Error::MonitorUnavailable {
                monitor: "userfaultfd",
                reason: format!("userfaultfd() failed: {e}"),
            })
        }
    }
    // SAFETY: as above.
    match unsafe { rustix::mm::userfaultfd(flags | F::from_bits_retain(UFFD_USER_MODE_ONLY)) } {
        Ok(fd) => Ok((fd, true)),
        Err(e) => Err(Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!(
                "userfaultfd() failed ({e}), also with UFFD_USER_MODE_ONLY: \
                 vm.unprivileged_userfaultfd is 0 and the process lacks CAP_SYS_PTRACE, \
                 or a seccomp policy forbids it"
            ),
        }),
    }
}

/// Create a userfaultfd and complete the handshake with every required feature.
/// Returns the fd, whether it is user-mode-only, and the features granted.
pub(super) fn open_with_features() -> Result<(OwnedFd, bool, u64)> {
    // The handshake can be done once per fd: probe what the kernel offers on one,
    // then ask for exactly what we use on another.
    let (probe, _) = open_uffd()?;
    let offered = uffdio_api(&probe, 0)
        .map_err(|e| Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!("UFFDIO_API handshake failed: {e}"),
        })?
        .features;
    drop(probe);
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(f, _)| offered & f == 0)
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!(
                "the kernel lacks {} (offered features {offered:#x})",
                missing.join(", ")
            ),
        });
    }
    let mut want = REQUIRED.iter().fold(0, |a, (f, _)| a | f) | (OPTIONAL & offered);
    let (mut fd, mut user_mode_only) = open_uffd()?;
    let mut r = uffdio_api(&fd, want);
    if r.as_ref().err() == Some(&Errno::PERM) {
        // Unprivileged: no EVENT_FORK (see NEEDS_PTRACE). A fresh fd for the retry.
        want &= !NEEDS_PTRACE;
        (fd, user_mode_only) = open_uffd()?;
        r = uffdio_api(&fd, want);
    }
    let api = r.map_err(|e| Error::MonitorUnavailable {
        monitor: "userfaultfd",
        reason: format!("UFFDIO_API refused features {want:#x}: {e}"),
    })?;
    if api.features & want != want {
        return Err(Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!(
                "UFFDIO_API granted features {:#x}, not all of {want:#x}",
                api.features
            ),
        });
    }
    Ok((fd, user_mode_only, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, words: [u64; 3]) -> [u8; MSG_SIZE] {
        let mut m = [0u8; MSG_SIZE];
        m[0] = kind;
        for (i, w) in words.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn messages_decode() {
        assert_eq!(
            Event::parse(&msg(0x15, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            Event::parse(&msg(0x16, [0x1000, 0x3000, 0])),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            Event::parse(&msg(0x14, [0x1000, 0x9000, 0x2000])),
            Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        // fork's ufd is a u32 at offset 8.
        assert_eq!(Event::parse(&msg(0x13, [7, 0, 0])), Event::Fork { ufd: 7 });
        assert_eq!(Event::parse(&msg(0x42, [0; 3])), Event::Unknown(0x42));
    }

    #[test]
    fn abi_struct_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
    }
}
