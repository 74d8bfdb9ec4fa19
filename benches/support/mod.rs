//! Shared by the benches: page-touched anonymous memory and a raw io_uring buffer
//! table (the kernel operation the reference IOMMU wraps).
#![allow(dead_code)]

use io_uring::IoUring;

/// An anonymous private read-write mapping, every page touched, unmapped on drop.
pub struct Anon {
    pub addr: usize,
    pub len: usize,
}

impl Anon {
    pub fn new(len: usize) -> Anon {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        let addr = p as usize;
        for off in (0..len).step_by(4096) {
            // SAFETY: in bounds of the read-write mapping created above, which nothing
            // else references.
            unsafe { ((addr + off) as *mut u8).write_volatile(1) };
        }
        Anon { addr, len }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; every pin of it was released before the drop.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A private io_uring with a one-slot sparse buffer table.
pub struct RawRing {
    ring: IoUring,
}

impl RawRing {
    pub fn new() -> RawRing {
        let ring = IoUring::new(8).expect("io_uring_setup");
        ring.submitter()
            .register_buffers_sparse(1)
            .expect("IORING_REGISTER_BUFFERS2 (sparse)");
        RawRing { ring }
    }

    pub fn update(&self, iov: libc::iovec) {
        // SAFETY: the iovec is either a live anonymous mapping owned by the caller
        // (pinned by the kernel for as long as it stays registered, and unregistered
        // before that mapping is dropped) or {null, 0}, which clears the slot. No
        // request is ever submitted on this ring, so the kernel never accesses the
        // buffer through it; registration only pins it.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(0, &[iov], None)
        }
        .expect("IORING_REGISTER_BUFFERS_UPDATE");
    }

    pub fn register(&self, addr: usize, len: usize) {
        self.update(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        });
    }

    pub fn unregister(&self) {
        self.update(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
    }

    pub fn register_unregister(&self, addr: usize, len: usize) {
        self.update(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        });
        self.update(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
    }
}
