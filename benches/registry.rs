//! The registry's costs: a cache hit per buffer reference (lookup + epoch validation),
//! a full submission referencing 1 / 8 / 64 cached buffers, lookup of one of 100 000
//! registered objects (512 bytes each, in 14 286 one-page regions, as many as the reference IOMMU maps) and in a
//! 100 000-entry interval index, and invalidating an idle 2 MiB region next to the raw kernel unpin
//! of the same 2 MiB (io_uring unregister) in the same run.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use std::time::Duration;
use userptr::driver::registry::interval::IntervalMap;
use userptr::{Cause, Descriptor, Driver, Perm, Registry, RegistryConfig, WaitMode};

mod support;
use support::{Anon, RawRing};

fn cache(c: &mut Criterion) {
    let drv = Driver::reference().expect("reference device (needs io_uring)");
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let q = drv.queue(0, 64).unwrap();
    // 64 separate 64 KiB buffers, every other slot of one mapping so nothing merges.
    let mem = Anon::new(128 * (64 << 10));
    let us: Vec<_> = (0..64)
        .map(|i| {
            // SAFETY: the bench's own anonymous mapping, which outlives the registry;
            // the device commands submitted are NOPs that touch no memory.
            unsafe { reg.register(mem.addr + 2 * i * (64 << 10), 64 << 10, Perm::READ_WRITE) }
                .unwrap()
        })
        .collect();
    let mut g = c.benchmark_group("cache");
    g.sample_size(30).measurement_time(Duration::from_secs(2));
    g.bench_function("hit_lookup", |b| {
        b.iter(|| black_box(reg.iova(black_box(&us[7])).unwrap()))
    });
    for n in [1usize, 8, 64] {
        let refs: Vec<_> = us.iter().take(n).collect();
        g.bench_function(format!("submit_{n}_refs"), |b| {
            b.iter(|| {
                let f = reg
                    .submit(&q, &refs, |_iovas| vec![Descriptor::nop()])
                    .unwrap();
                q.wait(f.end, WaitMode::Poll, Duration::from_secs(10))
                    .unwrap();
            })
        });
    }
    g.finish();

    drop(us);
    // 100 000 objects of 512 bytes, seven to a page, a gap page between two pages.
    let objects_mem = Anon::new(14_286 * 2 * 4096);
    let mut objects = Vec::with_capacity(100_000);
    for r in 0..14_286 {
        let base = objects_mem.addr + r * 2 * 4096;
        // SAFETY: the bench's own anonymous mapping, which outlives the registry; no
        // command touches it.
        unsafe { reg.register(base, 4096, Perm::READ_WRITE) }.unwrap();
        for p in 0..7 {
            if objects.len() < 100_000 {
                // SAFETY: as above.
                let u = unsafe { reg.register(base + p * 512, 512, Perm::READ_WRITE) };
                objects.push(u.unwrap());
            }
        }
    }
    c.bench_function("cache/lookup_100k", |b| {
        let mut k = 0usize;
        b.iter(|| {
            k = (k + 7919) % 100_000;
            black_box(reg.iova(&objects[k]).unwrap())
        })
    });
    drop(objects);
    reg.clear().unwrap();

    let mut index = IntervalMap::new();
    for i in 0..100_000u64 {
        index.insert(i * 8192..i * 8192 + 4096, i).unwrap();
    }
    c.bench_function("cache/index_lookup_100k", |b| {
        let mut k = 0u64;
        b.iter(|| {
            k = (k + 7919) % 100_000;
            black_box(index.covering(k * 8192 + 100..k * 8192 + 200))
        })
    });
}

fn invalidate(c: &mut Criterion) {
    let drv = Driver::reference().expect("reference device (needs io_uring)");
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let raw = RawRing::new();
    let mem = Anon::new(2 << 20);
    let range = mem.addr as u64..mem.addr as u64 + (2 << 20);
    let mut g = c.benchmark_group("invalidate/idle_2MiB");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    g.bench_function("userptr_discard", |b| {
        b.iter_batched(
            // SAFETY: the bench's own anonymous mapping, which outlives the registry; no
            // command touches it.
            || unsafe { reg.register(mem.addr, 2 << 20, Perm::READ_WRITE) }.unwrap(),
            |_u| reg.invalidate(range.clone(), Cause::Discard).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("raw_unpin", |b| {
        b.iter_batched(
            || raw.register(mem.addr, 2 << 20),
            |_| raw.unregister(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500));
    targets = cache, invalidate
}
criterion_main!(benches);
