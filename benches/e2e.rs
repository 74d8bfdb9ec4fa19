//! End-to-end device work on mapped process memory, next to the CPU doing the same:
//!
//! * `e2e/copy/{1,16,64}MiB`: the device's COPY between two mapped buffers (`device`)
//!   vs `copy_from_slice` (`memcpy`); throughput in bytes copied.
//! * `e2e/saxpy/{1M,16M}`: the device's SAXPY `y = a*x + y` on mapped `f32` buffers
//!   (`device`) vs a CPU loop (`cpu`); throughput in elements.
//!
//! Buffers are mapped once per size, outside the timed loop: this measures the
//! device's data path (io_uring READ_FIXED / WRITE_FIXED through memfd staging), not
//! pinning (see `benches/pin.rs`). The device commands are waited for with
//! `CommandQueue::run`, which sleeps on the ring's eventfd: on a small machine a
//! polling waiter would compete with the kernel workers moving the data.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::hint::black_box;
use std::time::Duration;
use userptr::{CommandQueue, Descriptor, Driver, Perm, UserMapping};

const MIB: usize = 1 << 20;

/// Map `v` by address (the mapping holds no borrow of it, so the bench can compare
/// it between device commands).
///
/// # Safety
///
/// [`Driver::map_user`]'s: the caller keeps `v` alive and unmoved while the mapping
/// exists, and touches it only between device commands.
unsafe fn map<T>(drv: &Driver, v: &[T], perm: Perm) -> UserMapping<'static> {
    // SAFETY: passed on to the caller (this function's own contract).
    unsafe { drv.map_user(v.as_ptr() as usize, std::mem::size_of_val(v), perm) }.expect("map_user")
}

fn copy(c: &mut Criterion, drv: &Driver, q: &CommandQueue) {
    for (len, label) in [(MIB, "1MiB"), (16 * MIB, "16MiB"), (64 * MIB, "64MiB")] {
        let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut dst = vec![0u8; len];
        // SAFETY: `src` and `dst` outlive the mappings (dropped at the end of the
        // iteration) and are read only between device commands (`run` waits).
        let (ms, md) = unsafe { (map(drv, &src, Perm::READ), map(drv, &dst, Perm::READ_WRITE)) };
        let desc = Descriptor::copy(ms.iova(), md.iova(), len as u64);
        q.run(desc).expect("device copy");
        assert!(dst == src, "device copy of {label} is wrong");

        let mut g = c.benchmark_group(format!("e2e/copy/{label}"));
        g.throughput(Throughput::Bytes(len as u64));
        if len >= 16 * MIB {
            g.sample_size(10).sampling_mode(SamplingMode::Flat);
        }
        g.bench_function("device", |b| {
            b.iter(|| q.run(black_box(desc)).expect("device copy"))
        });
        g.bench_function("memcpy", |b| {
            b.iter(|| black_box(&mut dst[..]).copy_from_slice(black_box(&src[..])))
        });
        g.finish();
        drop((ms, md));
    }
}

fn cpu_saxpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

fn saxpy(c: &mut Criterion, drv: &Driver, q: &CommandQueue) {
    const A: f32 = 0.5;
    for (n, label) in [(1usize << 20, "1M"), (16 << 20, "16M")] {
        let x = vec![1.0f32; n];
        let mut y = vec![0.0f32; n];
        // SAFETY: `x` and `y` outlive the mappings (dropped at the end of the
        // iteration) and are touched only between device commands (`run` waits).
        let (mx, my) = unsafe { (map(drv, &x, Perm::READ), map(drv, &y, Perm::READ_WRITE)) };
        let desc = Descriptor::saxpy(A, mx.iova(), my.iova(), n as u64);
        q.run(desc).expect("device saxpy");
        assert!(
            y.iter().all(|&v| v == A),
            "device saxpy of {label} is wrong"
        );

        let mut g = c.benchmark_group(format!("e2e/saxpy/{label}"));
        g.throughput(Throughput::Elements(n as u64));
        if n >= 16 << 20 {
            g.sample_size(10).sampling_mode(SamplingMode::Flat);
        }
        g.bench_function("device", |b| {
            b.iter(|| q.run(black_box(desc)).expect("device saxpy"))
        });
        g.bench_function("cpu", |b| {
            b.iter(|| cpu_saxpy(black_box(A), black_box(&x[..]), black_box(&mut y[..])))
        });
        g.finish();
        drop((mx, my));
    }
}

fn e2e(c: &mut Criterion) {
    let drv = Driver::reference().expect("reference device (needs io_uring)");
    let q = drv.queue(0, 64).expect("queue");
    copy(c, &drv, &q);
    saxpy(c, &drv, &q);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = e2e
}
criterion_main!(benches);
