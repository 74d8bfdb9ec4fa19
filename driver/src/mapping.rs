//! A mapping of ordinary process memory (a `Vec`, a `malloc` block, an `mmap`) into the
//! device's IOMMU domain: the enclosing whole pages are pinned and mapped at a fresh
//! IOVA; the device address of the first byte keeps the buffer's offset in its page.
//!
//! The pin is taken at map time and holds the pages that backed the range *then*. If
//! the process later unmaps, discards (`MADV_DONTNEED`) or remaps the range without
//! telling the driver, the device keeps reaching the old pages: the stale-pin hazard
//! (`tests/hazard.rs`). The registry and the monitors exist to keep that from
//! happening; a bare `UserMapping` is the raw mechanism underneath them.
//!
//! Memory whose pages can be replaced through its file, which no monitor sees, is
//! refused at map time ([`crate::backing`]).

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;

const PAGE: u64 = 4096;

/// Ordinary memory mapped for the device. Unmapped (and unpinned) on drop.
#[derive(Debug)]
pub struct UserMapping {
    driver: Driver,
    map_iova: u64,
    map_len: u64,
    addr: u64,
    len: u64,
    perm: Perm,
}

impl UserMapping {
    pub(crate) fn new(driver: &Driver, addr: u64, len: u64, perm: Perm) -> Result<UserMapping> {
        if len == 0 {
            return Err(Error::ZeroLength { addr });
        }
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE))
            .ok_or(Error::Overflow { addr, len })?;
        let start = addr & !(PAGE - 1);
        let map_len = end - start;
        // A domain out of room gets idle cached mappings reclaimed first; the pages
        // must pass the backing policy.
        let map_iova = driver.map_user_reclaiming(start, map_len, perm)?;
        Ok(UserMapping {
            driver: driver.clone(),
            map_iova,
            map_len,
            addr,
            len,
            perm,
        })
    }

    /// Device address of the first byte of the buffer.
    pub fn iova(&self) -> u64 {
        self.map_iova + (self.addr - (self.addr & !(PAGE - 1)))
    }

    /// Device address of byte `offset` of the buffer.
    pub fn iova_at(&self, offset: u64) -> u64 {
        self.iova() + offset
    }

    /// Host address of the buffer.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length of the buffer in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: zero-length mappings are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes pinned (whole pages).
    pub fn pinned_len(&self) -> u64 {
        self.map_len
    }

    /// Device permissions.
    pub fn perm(&self) -> Perm {
        self.perm
    }

    /// Unmap now, reporting failure (dropping unmaps too, logging failure).
    pub fn unmap(mut self) -> Result<()> {
        let r = self.driver.unmap_raw(self.map_iova, self.map_len);
        self.map_len = 0;
        r
    }
}

impl Drop for UserMapping {
    fn drop(&mut self) {
        if self.map_len != 0 {
            if let Err(e) = self.driver.unmap_raw(self.map_iova, self.map_len) {
                tracing::error!("unmapping userptr at IOVA {:#x}: {e}", self.map_iova);
            }
        }
    }
}
