//! ring: NOP submit + complete throughput by batch size and by ring count, and the
//! fence round trip (one command, polling). With `--device`, the same on an NVMe I/O
//! queue, with Flush (no data) as the NOP: `flush_batch_<n>` and `fence_roundtrip`.
//! On the reference device also the blocking round trip and, next to them, the
//! machine's floors ([`limits`]): the shared-memory round trip, the eventfd wake-up,
//! and the ring protocol's own traffic for batches of 1 and 64 (`nop_batch_1_limit`,
//! `nop_batched_limit`), each sampled between the samples of the row it bounds; and
//! the driver's own cost per descriptor on submit and on reap next to the device's
//! ([`overhead`]).

use super::limits;
use super::measure::{repeat, time_us, Sample};
use super::target::{nvme_flush, nvme_wait, Target};
use super::{Ctx, Measurement};
use std::time::{Duration, Instant};
use userptr::driver::vfio::nvme::IoQueue;
use userptr::ring::regs::{ring, ring_reg};
use userptr::{Backpressure, CommandQueue, Descriptor, Driver, WaitMode};

const T: Duration = Duration::from_secs(30);

pub fn run(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    if let Some(q) = target.nvme_queue()? {
        return run_nvme(ctx, &q);
    }
    let drv = target.driver()?;
    let q = drv.queue(0, 256).map_err(|e| crate::explain(&e))?;
    let mut out = Vec::new();
    let rounds = if ctx.quick { 20 } else { 100 };
    // The limits (the ring protocol's shared-memory traffic alone, `limits`) are
    // sampled between the samples of the rows they bound: the same machine state for
    // both, whatever the host does to the vCPUs meanwhile.
    let mut protocol_limits = Vec::new();
    for batch in [1usize, 8, 64] {
        let descs = vec![Descriptor::nop(); batch];
        let mut err = None;
        let mut sample = || {
            let t = Instant::now();
            for _ in 0..rounds {
                match q
                    .submit_batch(&descs, Backpressure::Wait)
                    .and_then(|f| q.wait(f.end, WaitMode::Poll, T))
                {
                    Ok(_) => {}
                    Err(e) => err = Some(crate::explain(&e)),
                }
            }
            (rounds * batch) as f64 / t.elapsed().as_secs_f64() / 1e6
        };
        let limit_name = match batch {
            1 => Some("nop_batch_1_limit"),
            64 => Some("nop_batched_limit"),
            _ => None,
        };
        let (s, limit) = interleave(
            ctx.samples,
            &mut sample,
            limit_name.map(|_| move || limits::ring_protocol(batch)),
        );
        if let Some(e) = err {
            return Err(e);
        }
        let name = if batch == 64 {
            "nop_batched".to_string()
        } else {
            format!("nop_batch_{batch}")
        };
        let m = Measurement::new("ring", name, "Mops/s", s);
        out.push(match (limit_name, limit) {
            (Some(n), Some(l)) => {
                protocol_limits.push(Measurement::new("ring", n, "Mops/s", l.clone()));
                m.with_baseline(n, l)
            }
            _ => m,
        });
    }
    let mut err = None;
    // Five round trips of ours to each sample of the limit (itself the mean of
    // thousands).
    let mut five = || {
        let v: Vec<f64> = (0..5)
            .map(|_| {
                time_us(|| {
                    if let Err(e) = q
                        .submit(Descriptor::nop(), Backpressure::Wait)
                        .and_then(|f| q.wait(f, WaitMode::Poll, T))
                    {
                        err = Some(crate::explain(&e));
                    }
                })
            })
            .collect();
        v
    };
    let mut rt = Vec::new();
    let mut rt_limit = Vec::new();
    five();
    for _ in 0..ctx.samples {
        // Untimed first, as in `interleave`.
        five();
        rt.extend(five());
        rt_limit.push(limits::fence_roundtrip());
        crate::progress::tick(5);
    }
    if let Some(e) = err {
        return Err(e);
    }
    let rt_limit = Sample { values: rt_limit };
    out.push(
        Measurement::new("ring", "fence_roundtrip", "us", Sample { values: rt })
            .with_baseline("fence_roundtrip_limit", rt_limit.clone()),
    );
    let mut err = None;
    let rt = repeat(ctx.samples * 5, 5, || {
        time_us(|| {
            if let Err(e) = q
                .submit(Descriptor::nop(), Backpressure::Wait)
                .and_then(|f| q.wait(f, WaitMode::Block, T))
            {
                err = Some(crate::explain(&e));
            }
        })
    });
    if let Some(e) = err {
        return Err(e);
    }
    out.push(Measurement::new(
        "ring",
        "fence_roundtrip_blocking",
        "us",
        rt,
    ));
    out.push(Measurement::new(
        "ring",
        "fence_roundtrip_blocking_sleep",
        "us",
        blocking_sleep(ctx, &drv, &q)?,
    ));
    let (submit, reap, device) = overhead(ctx, &drv, &q)?;
    out.push(
        Measurement::new("ring", "submit_overhead_per_descriptor", "ns", submit)
            .with_baseline("device_per_descriptor", device.clone()),
    );
    out.push(
        Measurement::new("ring", "reap_overhead_per_descriptor", "ns", reap)
            .with_baseline("device_per_descriptor", device),
    );
    drop(q);
    // The machine's floors, also as rows of their own (sampled above, interleaved).
    out.push(Measurement::new(
        "ring",
        "fence_roundtrip_limit",
        "us",
        rt_limit,
    ));
    out.push(Measurement::new(
        "ring",
        "eventfd_wakeup_limit",
        "us",
        limits::eventfd_wakeup(ctx.samples)?,
    ));
    out.extend(protocol_limits);
    // Several rings, one submitting thread each, batches of 64.
    for rings in [1u32, 2, 4] {
        let qs: Vec<_> = (0..rings)
            .map(|r| drv.queue(r, 256))
            .collect::<Result<_, _>>()
            .map_err(|e| crate::explain(&e))?;
        let mut values = Vec::new();
        for _ in 0..ctx.samples.min(10) {
            let t = Instant::now();
            std::thread::scope(|s| {
                for q in &qs {
                    s.spawn(move || {
                        let descs = vec![Descriptor::nop(); 64];
                        for _ in 0..rounds / 2 {
                            let f = q.submit_batch(&descs, Backpressure::Wait).expect("submit");
                            q.wait(f.end, WaitMode::Poll, T).expect("wait");
                        }
                    });
                }
            });
            values
                .push((rounds / 2 * 64 * rings as usize) as f64 / t.elapsed().as_secs_f64() / 1e6);
            crate::progress::tick(1);
        }
        out.push(Measurement::new(
            "ring",
            format!("nop_batched_{rings}_rings"),
            "Mops/s",
            Sample { values },
        ));
    }
    Ok(out)
}

/// `samples` samples of `ours` after 2 for warm-up, and when there is a `limit`, one
/// of it after each of ours. With a limit, each sample of ours follows one untimed
/// run of it: the limit's threads take both CPUs for a while, the engine parks, and
/// the first commands after that pay for its wake-up (and, now and then, for a
/// scheduler that placed it on the submitter's CPU until it moves off), which is not
/// what the row measures.
fn interleave<L: FnMut() -> f64>(
    samples: usize,
    ours: &mut impl FnMut() -> f64,
    mut limit: Option<L>,
) -> (Sample, Option<Sample>) {
    ours();
    ours();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        if limit.is_some() {
            ours();
        }
        a.push(ours());
        if let Some(l) = limit.as_mut() {
            b.push(l());
        }
        crate::progress::tick(1);
    }
    (Sample { values: a }, limit.map(|_| Sample { values: b }))
}

/// A blocking wait that does sleep: the device paused, a NOP submitted, this thread
/// blocked in `wait(Block)` (past its 4 µs of polling) when a helper thread resumes
/// the device 20 µs later. Microseconds from the resume to the wait's return: the
/// engine's look at its doorbells (it is still spinning, a NOP ran just before), the
/// NOP, the interrupt, and the waiter's wake-up; next to `eventfd_wakeup_limit`,
/// the wake-up alone. The helper lives across samples (a thread that exits as the
/// engine wakes would be measured too).
fn blocking_sleep(ctx: &Ctx, drv: &Driver, q: &CommandQueue) -> Result<Sample, String> {
    use std::sync::mpsc;
    let base = Instant::now();
    let nop = || {
        q.submit(Descriptor::nop(), Backpressure::Wait)
            .map_err(|e| crate::explain(&e))
    };
    std::thread::scope(|s| {
        let (go, go_rx) = mpsc::channel::<()>();
        let (resumed_tx, resumed) = mpsc::channel::<Duration>();
        s.spawn(move || {
            for () in go_rx {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(20) {
                    std::hint::spin_loop();
                }
                let at = base.elapsed();
                drv.set_enabled(true);
                if resumed_tx.send(at).is_err() {
                    return;
                }
            }
        });
        let mut values = Vec::new();
        for _ in 0..ctx.samples {
            // A NOP first, so the engine is awake (spinning) when the resume comes.
            nop().and_then(|f| q.wait(f, WaitMode::Poll, T).map_err(|e| crate::explain(&e)))?;
            drv.set_enabled(false);
            let f = nop()?;
            go.send(())
                .map_err(|_| "ring: the resumer thread is gone".to_string())?;
            let r = q.wait(f, WaitMode::Block, T);
            let done = base.elapsed();
            let at = resumed
                .recv()
                .map_err(|_| "ring: the resumer thread is gone".to_string())?;
            r.map_err(|e| crate::explain(&e))?;
            values.push(done.saturating_sub(at).as_secs_f64() * 1e6);
            crate::progress::tick(1);
        }
        drop(go);
        Ok(Sample { values })
    })
}

/// The driver's cost per descriptor, batches of 64 NOPs, next to the device's, one
/// sample of each per round:
/// * submit: `submit_batch` with the device paused (so the engine takes nothing
///   meanwhile): encoding, the stores into the SQ, the doorbell;
/// * device: from resuming the device until it published the 64 completions
///   (`CQ_TAIL`): fetch, execute, completions, fence, interrupt;
/// * reap: `wait_batch` once they are published: draining the CQ into the store and
///   claiming the batch.
///
/// A round in which the engine took part of the batch before the pause held (seen in
/// `SQ_HEAD`) is measured again.
fn overhead(ctx: &Ctx, drv: &Driver, q: &CommandQueue) -> Result<(Sample, Sample, Sample), String> {
    const N: usize = 64;
    let dev = drv.device().ok_or("the ring suite needs a device")?.clone();
    let reg = |r| dev.read32(ring_reg(q.ring(), r));
    let descs = vec![Descriptor::nop(); N];
    let per = |d: Duration| d.as_secs_f64() * 1e9 / N as f64;
    let (mut submit, mut reap, mut device) = (Vec::new(), Vec::new(), Vec::new());
    let mut rounds = 0;
    while device.len() < ctx.samples {
        rounds += 1;
        if rounds > 10 * ctx.samples + 10 {
            return Err("ring overhead: the device kept taking work while paused".into());
        }
        drv.set_enabled(false);
        // Any engine pass that saw the device enabled is over by now (a pass takes
        // a few µs). Spun, not slept, and shorter than the engine's 50 µs of polling
        // before it parks: once its vCPU has gone idle, each descriptor store that
        // takes a line from that core costs ~10x more (measured here: 20-27 ns per
        // descriptor after a 5-50 µs pause, 200-310 ns after 200 µs), which is the
        // machine waking a core, not the driver's cost.
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        let (sq0, cq0) = (reg(ring::SQ_HEAD), reg(ring::CQ_TAIL));
        let t = Instant::now();
        let f = q
            .submit_batch(&descs, Backpressure::WouldBlock)
            .map_err(|e| crate::explain(&e))?;
        let s = t.elapsed();
        let raced = reg(ring::SQ_HEAD) != sq0;
        let t = Instant::now();
        drv.set_enabled(true);
        while reg(ring::CQ_TAIL).wrapping_sub(cq0) < N as u32 {
            if t.elapsed() > Duration::from_secs(5) {
                return Err("ring overhead: the device did not complete 64 NOPs in 5 s".into());
            }
            std::hint::spin_loop();
        }
        let d = t.elapsed();
        let t = Instant::now();
        q.wait_batch(f, WaitMode::Poll, T)
            .map_err(|e| crate::explain(&e))?;
        let r = t.elapsed();
        // The first two rounds warm up.
        if raced || rounds <= 2 {
            continue;
        }
        submit.push(per(s));
        device.push(per(d));
        reap.push(per(r));
        crate::progress::tick(1);
    }
    Ok((
        Sample { values: submit },
        Sample { values: reap },
        Sample { values: device },
    ))
}

/// The NVMe form: batches of Flush commands per doorbell, and one command's round trip.
fn run_nvme(ctx: &Ctx, q: &IoQueue) -> Result<Vec<Measurement>, String> {
    let mut out = Vec::new();
    let rounds = if ctx.quick { 10 } else { 50 };
    let mut err = None;
    for batch in [1usize, 8, 16] {
        let cmds = vec![nvme_flush(q); batch];
        let s = repeat(ctx.samples, 2, || {
            let t = Instant::now();
            for _ in 0..rounds {
                if let Err(e) = q
                    .submit_batch(&cmds)
                    .map_err(|e| crate::explain(&e))
                    .and_then(|b| nvme_wait(q, b))
                {
                    err = Some(e);
                }
            }
            (rounds * batch) as f64 / t.elapsed().as_secs_f64() / 1e6
        });
        out.push(Measurement::new(
            "ring",
            format!("flush_batch_{batch}"),
            "Mops/s",
            s,
        ));
    }
    let rt = repeat(ctx.samples * 5, 5, || {
        time_us(|| {
            if let Err(e) = q
                .submit_batch(&[nvme_flush(q)])
                .map_err(|e| crate::explain(&e))
                .and_then(|b| nvme_wait(q, b))
            {
                err = Some(e);
            }
        })
    });
    out.push(Measurement::new("ring", "fence_roundtrip", "us", rt));
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
