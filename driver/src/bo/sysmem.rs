//! The system-memory backing of a buffer object (the only `unsafe` here: the driver's
//! own mapping of it): a memfd, mapped once by the driver and pinned and
//! IOMMU-mapped through that mapping in the same domain as userptrs
//! (`Driver::map_raw`: `VmPin` counts it), mapped a second time over the object's CPU
//! range. Sealed against growing and shrinking at birth (no truncation can take a
//! pinned page away), and against new writable mappings (`F_SEAL_FUTURE_WRITE`) once
//! the CPU range maps it: a copy of the fd reaching another process cannot map it
//! writable, and a second mapping is refused (see `bo`'s module docs).

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use std::os::fd::{AsFd, BorrowedFd};

/// A buffer object's system memory.
pub(super) struct SysMem {
    fd: memfd::Memfd,
    kaddr: usize,
    len: usize,
    iova: u64,
    driver: Driver,
}

impl std::fmt::Debug for SysMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SysMem")
            .field("iova", &self.iova)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn memfd_err(op: &'static str, e: memfd::Error) -> Error {
    Error::sys(op, std::io::Error::other(e))
}

impl SysMem {
    /// `len` bytes (4 KiB multiple) of zeroed system memory, pinned and mapped at a
    /// fresh IOVA, device-readable and -writable.
    pub(super) fn new(driver: &Driver, len: usize) -> Result<SysMem> {
        let fd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create("userptr-bo")
            .map_err(|e| memfd_err("memfd_create(buffer object)", e))?;
        fd.as_file()
            .set_len(len as u64)
            .map_err(|e| Error::sys("ftruncate(buffer object)", e))?;
        fd.add_seals(&[memfd::FileSeal::SealGrow, memfd::FileSeal::SealShrink])
            .map_err(|e| memfd_err("F_ADD_SEALS(buffer object)", e))?;
        let _section = crate::driver_section::enter();
        // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen address.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd.as_file(),
                0,
            )
        }
        .map_err(|e| Error::sys("mmap(buffer object, driver view)", e.into()))?;
        let kaddr = p as usize;
        match driver.map_raw(kaddr as u64, len as u64, Perm::READ_WRITE) {
            Ok(iova) => Ok(SysMem {
                fd,
                kaddr,
                len,
                iova,
                driver: driver.clone(),
            }),
            Err(e) => {
                // SAFETY: our own mapping, just made, never handed out.
                let _ = unsafe { rustix::mm::munmap(p, len) };
                Err(e)
            }
        }
    }

    /// The memfd (to map over the CPU range).
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_file().as_fd()
    }

    /// Where the device reaches it.
    pub(super) fn iova(&self) -> u64 {
        self.iova
    }

    /// No new writable mapping from now on (the CPU range maps it already).
    pub(super) fn seal_mappings(&self) -> Result<()> {
        self.fd
            .add_seals(&[memfd::FileSeal::SealFutureWrite, memfd::FileSeal::SealSeal])
            .map_err(|e| memfd_err("F_ADD_SEALS(F_SEAL_FUTURE_WRITE)", e))
    }

    /// The seals on the memfd (`F_GET_SEALS` bits), for checks.
    pub(super) fn seals(&self) -> u32 {
        let mut bits = 0u32;
        if let Ok(s) = self.fd.seals() {
            for x in s {
                bits |= match x {
                    memfd::FileSeal::SealSeal => libc::F_SEAL_SEAL,
                    memfd::FileSeal::SealShrink => libc::F_SEAL_SHRINK,
                    memfd::FileSeal::SealGrow => libc::F_SEAL_GROW,
                    memfd::FileSeal::SealWrite => libc::F_SEAL_WRITE,
                    memfd::FileSeal::SealFutureWrite => libc::F_SEAL_FUTURE_WRITE,
                } as u32;
            }
        }
        bits
    }
}

impl Drop for SysMem {
    fn drop(&mut self) {
        // The device's view went first (the caller retargeted or unbound the GPU
        // entries and invalidated the TLB): now the IOVA mapping and the pin.
        if let Err(e) = self.driver.unmap_raw(self.iova, self.len as u64) {
            tracing::error!("buffer object: unmapping IOVA {:#x}: {e}", self.iova);
        }
        let _section = crate::driver_section::enter();
        // SAFETY: our own mapping; the pin that used it is gone (above).
        let _ = unsafe { rustix::mm::munmap(self.kaddr as *mut _, self.len) };
    }
}
