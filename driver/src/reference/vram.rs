//! Device-local memory of the reference device ("VRAM"): a memfd, mapped into the
//! engine for compute and used as the file side of every io_uring DMA transfer.
//!
//! Only the engine thread touches it through the mapping, and only while no transfer
//! is in flight: [`crate::reference::dma_port::DmaPort::run`] returns after reaping every
//! request it submitted, so outside `run` the kernel is not writing the memfd.
//!
//! The device-memory heap is shared with the CPU too: it is the device's BAR2
//! aperture (`docs/reference-device.md` section 11, [`crate::device::Aperture`]), which
//! the CPU maps `MAP_SHARED` from a duplicate of this memfd; the engine reaches the heap
//! only for device-memory pieces of commands, which the driver keeps apart from CPU
//! accesses to the same bytes.
//!
//! The page-table region (GPU virtual memory, `docs/reference-device.md` section 10) is
//! the exception: the driver writes it through the register window while the engine
//! walks it, so it has a mapping of its own, [`PtMemory`], accessed only with 64-bit
//! atomics, and no DMA transfer ever targets it.

use crate::error::{Error, Result};
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

/// The device's local memory.
pub struct Vram {
    fd: memfd::Memfd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and accessed through `&self`/`&mut self`
// methods only, so moving it to the engine thread is sound.
unsafe impl Send for Vram {}

impl Vram {
    /// Create `len` bytes of device memory (sparse until touched).
    pub fn new(len: usize) -> Result<Vram> {
        let len = len.next_multiple_of(4096);
        let fd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .create("userptr-vram")
            .map_err(|e| Error::sys("memfd_create(vram)", std::io::Error::other(e)))?;
        fd.as_file()
            .set_len(len as u64)
            .map_err(|e| Error::sys("ftruncate(vram)", e))?;
        // SAFETY: a fresh shared mapping of our own memfd, at a kernel-chosen address.
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
        .map_err(|e| Error::sys("mmap(vram)", e.into()))?;
        Ok(Vram {
            fd,
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// The memfd, for DMA transfers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_file().as_fd()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, off: u64, n: u64) -> usize {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len as u64),
            "vram access {off}+{n} out of bounds ({})",
            self.len
        );
        off as usize
    }

    /// Bytes at `off`.
    pub fn bytes(&self, off: u64, n: u64) -> &[u8] {
        let o = self.check(off, n);
        // SAFETY: in bounds; no transfer is in flight outside DmaPort::run (module doc),
        // and `&self` excludes the engine's own `&mut` accessors.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(o), n as usize) }
    }

    /// Mutable bytes at `off`.
    pub fn bytes_mut(&mut self, off: u64, n: u64) -> &mut [u8] {
        let o = self.check(off, n);
        // SAFETY: as in `bytes`, and `&mut self` makes this the only live view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(o), n as usize) }
    }

    /// Copy `n` bytes from `src` to `dst` inside device memory (the engine's
    /// device-memory accesses; the ranges must not overlap).
    pub fn copy_within(&mut self, src: u64, dst: u64, n: u64) {
        let s = self.check(src, n);
        let d = self.check(dst, n);
        assert!(src + n <= dst || dst + n <= src, "vram copy ranges overlap");
        // SAFETY: both in bounds (checked) and disjoint; `&mut self` makes this the only
        // access; no transfer in flight (module doc).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(s),
                self.ptr.as_ptr().add(d),
                n as usize,
            )
        }
    }

    /// A second mapping of `[off, off + len)` (page-aligned) for the page tables,
    /// shared between the register file (the window) and the engine (the walker).
    pub fn page_table_view(&self, off: u64, len: u64) -> Result<PtMemory> {
        assert!(
            off % 4096 == 0 && len % 4096 == 0 && len > 0,
            "page-aligned view"
        );
        self.check(off, len);
        // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen address;
        // the range lies inside the file (checked above).
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                self.fd.as_file(),
                off,
            )
        }
        .map_err(|e| Error::sys("mmap(vram page tables)", e.into()))?;
        Ok(PtMemory {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len: len as usize,
        })
    }

    /// Two disjoint f32 arrays of `n` elements: `x` (read) and `y` (read-write).
    pub fn f32_pair_mut(&mut self, x_off: u64, y_off: u64, n: u64) -> (&[f32], &mut [f32]) {
        let bytes = n.checked_mul(4).expect("f32 count overflows");
        let xo = self.check(x_off, bytes);
        let yo = self.check(y_off, bytes);
        assert!(
            x_off % 4 == 0 && y_off % 4 == 0,
            "f32 arrays must be 4-aligned"
        );
        assert!(
            x_off + bytes <= y_off || y_off + bytes <= x_off,
            "f32 arrays overlap"
        );
        // SAFETY: both in bounds, 4-aligned (page-aligned base), disjoint (checked);
        // `&mut self` makes these the only views; no transfer in flight (module doc).
        unsafe {
            (
                std::slice::from_raw_parts(self.ptr.as_ptr().add(xo).cast(), n as usize),
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(yo).cast(), n as usize),
            )
        }
    }
}

/// The page-table region of device memory (or, for measurements, anonymous memory of
/// the same shape): 64-bit words, read and written only with atomics, so the driver's
/// window writes and the engine's page walks may run at the same time.
pub struct PtMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: every access is a 64-bit atomic on memory owned by this value.
unsafe impl Send for PtMemory {}
// SAFETY: as for Send: `&self` methods only do atomic loads and stores.
unsafe impl Sync for PtMemory {}

impl PtMemory {
    /// Anonymous memory laid out like the page-table region, zeroed: for the
    /// translation measurements (`userptr bench --suite gpuvm`) and unit tests.
    pub fn anonymous(len: usize) -> Result<PtMemory> {
        let len = len.max(4096).next_multiple_of(4096);
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::sys("mmap(page-table memory)", e.into()))?;
        Ok(PtMemory {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn word(&self, off: u64) -> Option<&std::sync::atomic::AtomicU64> {
        if off % 8 != 0 || off.checked_add(8).is_none_or(|e| e > self.len as u64) {
            return None;
        }
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the memory
        // lives as long as `self`, and is only ever accessed through atomics.
        Some(unsafe {
            std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(off as usize).cast())
        })
    }

    /// The word at byte offset `off` (8-aligned, in bounds; else 0). Acquire: a walk
    /// that reads an entry sees the table it points to as the driver wrote it.
    pub fn load(&self, off: u64) -> u64 {
        self.word(off)
            .map_or(0, |w| w.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Store `v` at byte offset `off` (8-aligned, in bounds; else ignored; returns
    /// whether it was stored). Release: pairs with `load`.
    pub fn store(&self, off: u64, v: u64) -> bool {
        match self.word(off) {
            Some(w) => {
                w.store(v, std::sync::atomic::Ordering::Release);
                true
            }
            None => false,
        }
    }
}

impl Drop for PtMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no reference into it outlives `&self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Drop for Vram {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no slice into it outlives `&self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
