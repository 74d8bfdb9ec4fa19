//! Device-local memory of the reference device ("VRAM"): a memfd, mapped into the
//! engine for compute and used as the file side of every io_uring DMA transfer.
//!
//! Only the engine thread touches it through the mapping, and only while no transfer
//! is in flight: [`crate::reference::uring_iommu::DmaPort::run`] returns after reaping every
//! request it submitted, so outside `run` the kernel is not writing the memfd.

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

impl Drop for Vram {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no slice into it outlives `&self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
