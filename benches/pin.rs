//! Map + unmap cost of a userptr on the reference device, next to the raw io_uring
//! buffer register + unregister of the same memory.
//!
//! The reference IOMMU's `map` is an `IORING_REGISTER_BUFFERS_UPDATE` into a sparse
//! buffer table (a FOLL_LONGTERM pin of every page) plus bookkeeping: IOVA
//! allocation, the translation table, permission checks. `raw_io_uring` is the kernel
//! part alone, on a private ring with a one-slot sparse table; the difference between
//! the two is the driver's overhead.
//!
//! Each size gets its own anonymous mapping with every page touched first, so neither
//! side pays for first-touch page faults. Transparent huge pages follow the system
//! setting (`/sys/kernel/mm/transparent_hugepage/enabled`), which changes the absolute
//! numbers for 2 MiB and up but not which side pays for what: both pin the same pages.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use io_uring::IoUring;
use std::hint::black_box;
use std::time::Duration;
use userptr::{Driver, Perm};

const SIZES: [(usize, &str); 4] = [
    (4 << 10, "4KiB"),
    (64 << 10, "64KiB"),
    (2 << 20, "2MiB"),
    (64 << 20, "64MiB"),
];

/// An anonymous private read-write mapping, every page touched, unmapped on drop.
struct Anon {
    addr: usize,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Anon {
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
struct RawRing {
    ring: IoUring,
}

impl RawRing {
    fn new() -> RawRing {
        let ring = IoUring::new(8).expect("io_uring_setup");
        ring.submitter()
            .register_buffers_sparse(1)
            .expect("IORING_REGISTER_BUFFERS2 (sparse)");
        RawRing { ring }
    }

    fn update(&self, iov: libc::iovec) {
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

    fn register_unregister(&self, addr: usize, len: usize) {
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

fn pin(c: &mut Criterion) {
    let drv = Driver::reference().expect("reference device (needs io_uring)");
    let raw = RawRing::new();
    for (len, label) in SIZES {
        let mem = Anon::new(len);
        let mut g = c.benchmark_group(format!("pin/{label}"));
        g.sample_size(20).measurement_time(Duration::from_secs(2));
        if len >= 2 << 20 {
            // Milliseconds per iteration: flat sampling keeps the run short.
            g.sample_size(10).sampling_mode(SamplingMode::Flat);
        }
        g.bench_function("userptr", |b| {
            b.iter(|| {
                let m = drv
                    .map_user(black_box(mem.addr), len, Perm::READ_WRITE)
                    .expect("map_user");
                drop(black_box(m));
            })
        });
        g.bench_function("raw_io_uring", |b| {
            b.iter(|| raw.register_unregister(black_box(mem.addr), len))
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500));
    targets = pin
}
criterion_main!(benches);
