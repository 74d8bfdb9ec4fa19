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
//!
//! # Who may touch the memory while it is mapped
//!
//! A `UserMapping<'a>` made from a slice ([`Driver::map_slice`],
//! [`Driver::map_slice_ref`]) *borrows* it for `'a`: the program cannot read, write,
//! move or free the buffer while the device may reach it, and dropping the mapping
//! (which unmaps it, and the IOMMU's unmap waits for the transfers in flight) ends the
//! borrow. A `UserMapping<'static>` from the `unsafe` [`Driver::map_user`] borrows
//! nothing: the caller promises what the borrow would have enforced (its `# Safety`
//! section).

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use std::marker::PhantomData;

const PAGE: u64 = 4096;

/// Ordinary memory mapped for the device. Unmapped (and unpinned) on drop.
///
/// `'a` is the borrow of the buffer it maps (see the module docs): a mapping made from
/// a slice keeps the slice borrowed until it is dropped or [`UserMapping::unmap`]ped.
#[derive(Debug)]
#[must_use = "dropping the mapping unmaps it at once"]
pub struct UserMapping<'a> {
    driver: Driver,
    map_iova: u64,
    map_len: u64,
    addr: u64,
    len: u64,
    perm: Perm,
    /// The buffer's borrow (none for the `unsafe` raw-address mapping: `'static`).
    _buffer: PhantomData<&'a mut [u8]>,
}

impl<'a> UserMapping<'a> {
    /// Map `len` bytes at `addr`. The caller ties `'a` to what keeps the memory
    /// handed over (a borrow of the slice, or the raw contract of `Driver::map_user`).
    pub(crate) fn new(driver: &Driver, addr: u64, len: u64, perm: Perm) -> Result<UserMapping<'a>> {
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
            _buffer: PhantomData,
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

    /// Unmap now, reporting failure (dropping unmaps too, logging failure). The
    /// translation is gone before the transfers in flight are waited for, so an error
    /// (the reference IOMMU: transfers still running after its bound, see
    /// `reference::uring_iommu`) leaves no new access possible, only the late end of
    /// one already started.
    pub fn unmap(mut self) -> Result<()> {
        let r = self.driver.unmap_raw(self.map_iova, self.map_len);
        self.map_len = 0;
        r
    }
}

impl Drop for UserMapping<'_> {
    fn drop(&mut self) {
        if self.map_len != 0 {
            if let Err(e) = self.driver.unmap_raw(self.map_iova, self.map_len) {
                tracing::error!("unmapping userptr at IOVA {:#x}: {e}", self.map_iova);
            }
        }
    }
}
