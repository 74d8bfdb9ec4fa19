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
use std::hint::black_box;
use std::time::Duration;
use userptr::{Driver, Perm};

mod support;
use support::{Anon, RawRing};

const SIZES: [(usize, &str); 4] = [
    (4 << 10, "4KiB"),
    (64 << 10, "64KiB"),
    (2 << 20, "2MiB"),
    (64 << 20, "64MiB"),
];

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
                // SAFETY: the bench's own anonymous mapping, unmapped again at once
                // with no command on it.
                let m = unsafe { drv.map_user(black_box(mem.addr), len, Perm::READ_WRITE) }
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
