//! Driver-owned, page-aligned DMA-able memory (anonymous mmap) for ring structures:
//! submission and completion queues and fence pages. It is mapped into the device's
//! IOMMU like any user buffer; this module owns the mmap and the raw accesses.

use crate::error::{Error, Result};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// A page-aligned anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub struct DmaMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all accesses go through
// methods that copy bytes or use atomics, so sharing across threads is sound.
unsafe impl Send for DmaMemory {}
// SAFETY: see Send; `&self` methods never hand out references into the memory.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    /// Map `len` bytes (rounded up to whole pages), zeroed and populated.
    pub fn new(len: usize) -> Result<DmaMemory> {
        let len = len.max(1).next_multiple_of(4096);
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::POPULATE,
            )
        }
        .map_err(|e| Error::sys("mmap(ring memory)", e.into()))?;
        Ok(DmaMemory {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Host virtual address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len),
            "DmaMemory access {off}+{n} out of bounds ({})",
            self.len
        );
    }

    /// Copy `data` in at `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        // SAFETY: in bounds (checked); raw copy without forming a reference to the
        // destination, which the device may be reading elsewhere in the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        }
    }

    /// Store `words` at `off` (8-aligned), word `i` at `off + 8i`, little-endian: a
    /// submission slot's descriptor (`Descriptor::encode_words`), stored from
    /// registers with whole-word writes.
    #[inline]
    pub fn write_words<const N: usize>(&self, off: usize, words: &[u64; N]) {
        self.check(off, N * 8);
        assert_eq!(off % 8, 0, "unaligned word store");
        let words = words.map(u64::to_le);
        // SAFETY: in bounds (checked) and 8-aligned (the mapping is page-aligned); a
        // raw store without forming a reference to the destination, as in `write`.
        unsafe { std::ptr::write(self.ptr.as_ptr().add(off).cast::<[u64; N]>(), words) }
    }

    /// Load `N` little-endian words from `off` (8-aligned): a completion entry
    /// (`Completion::decode_words`).
    #[inline]
    pub fn read_words<const N: usize>(&self, off: usize) -> [u64; N] {
        self.check(off, N * 8);
        assert_eq!(off % 8, 0, "unaligned word load");
        // SAFETY: in bounds (checked) and 8-aligned; a raw load of plain integers
        // (any bit pattern is valid), without forming a reference, as in `read`.
        let w = unsafe { std::ptr::read(self.ptr.as_ptr().add(off).cast::<[u64; N]>()) };
        w.map(u64::from_le)
    }

    /// Copy out `buf.len()` bytes from `off`.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        // SAFETY: in bounds (checked); see `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        }
    }

    /// Load the 8-byte word at `off` (8-aligned) with Acquire ordering.
    pub fn load_u64(&self, off: usize) -> u64 {
        self.check(off, 8);
        assert_eq!(off % 8, 0, "unaligned u64 load");
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the memory
        // lives as long as `self`. Acquire: the device's fence write is the last thing
        // it does for a command; see queue.rs for why the fence is confirmed through
        // the completion queue rather than trusted alone.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast()) }.load(Ordering::Acquire)
    }

    /// Store the 8-byte word at `off` (8-aligned).
    pub fn store_u64(&self, off: usize, v: u64) {
        self.check(off, 8);
        assert_eq!(off % 8, 0, "unaligned u64 store");
        // SAFETY: as in `load_u64`. Release: orders earlier writes before the value.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast()) }
            .store(v, Ordering::Release)
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and no reference into it outlives `self`. If the
        // device still had it mapped, its pin keeps the pages alive (no use after free
        // in this process); the queue unmaps it from the IOMMU before dropping it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
