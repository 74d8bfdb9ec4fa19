//! The raw kernel operation under the reference IOMMU's map: an io_uring buffer
//! registration into a one-slot sparse table, and its removal. The pin suite's
//! baseline.

use io_uring::IoUring;

/// A private io_uring with a one-slot sparse buffer table.
pub struct RawPin {
    ring: IoUring,
}

impl RawPin {
    pub fn new() -> std::io::Result<RawPin> {
        let ring = IoUring::new(8)?;
        ring.submitter().register_buffers_sparse(1)?;
        Ok(RawPin { ring })
    }

    fn update(&self, base: usize, len: usize) -> std::io::Result<()> {
        let iov = libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `base..base+len` is live memory the caller owns for as long as it is
        // registered (it unregisters before freeing), or {null, 0}, which clears the
        // slot. No request is ever submitted on this ring: registration only pins.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(0, &[iov], None)
        }
    }

    /// Pin `len` bytes at `addr` (slot 0).
    pub fn pin(&self, addr: usize, len: usize) -> std::io::Result<()> {
        self.update(addr, len)
    }

    /// Release slot 0.
    pub fn unpin(&self) -> std::io::Result<()> {
        self.update(0, 0)
    }
}
