//! Command ring costs on the reference device, with NOPs (no data movement):
//!
//! * `ring/nop_batch/{1,8,64}`: submit a batch with one doorbell (`submit_batch`) and
//!   poll for the fence of its last command; throughput in commands per second. Only
//!   the last completion is claimed; the queue keeps the others (bounded), as it does
//!   for any caller that waits on a batch's end fence only.
//! * `ring/fence_roundtrip/{poll,block}`: one NOP submitted and waited for, spinning on
//!   the fence word (`WaitMode::Poll`) or sleeping on the ring's interrupt eventfd
//!   (`WaitMode::Block`).
//!
//! The engine spins for 50 µs after its last work before parking, so back-to-back
//! iterations measure a warm engine; the round trip includes the engine's fetch of the
//! descriptor and its writes of the completion entry and the fence word, which for a
//! queue's ring memory go through the device's coherent view after the IOMMU's
//! translation and permission check (datasheet section 5.1), not through io_uring.
//! These are the `userptr bench --suite ring` rows `nop_batch_<n>`, `fence_roundtrip`
//! and `fence_roundtrip_blocking`, measured the same way.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use userptr::{Backpressure, CommandQueue, Descriptor, Driver, Status, WaitMode};

const TIMEOUT: Duration = Duration::from_secs(10);

fn submit_and_wait(q: &CommandQueue, descs: &[Descriptor], mode: WaitMode) {
    let fences = q
        .submit_batch(descs, Backpressure::Wait)
        .expect("submit_batch");
    let c = q.wait(fences.end, mode, TIMEOUT).expect("wait");
    assert_eq!(c.status, Status::Ok);
}

fn ring(c: &mut Criterion) {
    let drv = Driver::reference().expect("reference device (needs io_uring)");
    let q = drv.queue(0, 256).expect("queue");
    let nops = [Descriptor::nop(); 64];

    let mut g = c.benchmark_group("ring/nop_batch");
    for n in [1usize, 8, 64] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| submit_and_wait(&q, &nops[..n], WaitMode::Poll))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("ring/fence_roundtrip");
    for (name, mode) in [("poll", WaitMode::Poll), ("block", WaitMode::Block)] {
        g.bench_function(name, |b| b.iter(|| submit_and_wait(&q, &nops[..1], mode)));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = ring
}
criterion_main!(benches);
