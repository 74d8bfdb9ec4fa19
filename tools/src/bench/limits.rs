//! The machine's own floors for the control path, measured in the same run as the
//! rows they bound (`ring` suite): `fence_roundtrip_limit`, a round trip through shared
//! memory between two threads (what a polled fence can at best cost: the submitter
//! writes, the other side sees it and answers), and `eventfd_wakeup_limit`, an eventfd
//! write waking a thread blocked in `read` on it (what a blocking wait can at best
//! cost). And `nop_batched_limit` / `nop_batch_1_limit`: the ring protocol's own
//! memory traffic between two threads, without a driver or a device around it (what
//! a batch of NOPs can at best cost, [`ring_protocol`]). No `unsafe` here: atomics and
//! rustix's eventfd.

use super::measure::{repeat, Sample};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips per sample of `fence_roundtrip_limit`.
const PINGS: u64 = 2000;

/// Microseconds per shared-memory round trip: this thread stores `n`, the other thread
/// spins until it sees `n` and stores `n` back in the answer word, this thread spins
/// until it sees that. One sample, the mean of [`PINGS`] round trips after as many
/// for warm-up, with a thread started for it and stopped after: the caller
/// interleaves the samples with those of the row this one bounds, so that both see
/// the machine in the same state (a vCPU's placement on the host changes what a
/// cache line costs, by 4x here, from one minute to the next).
pub fn fence_roundtrip() -> f64 {
    // Two words on separate cache lines, as a doorbell and a fence are.
    #[repr(align(128))]
    struct Line(AtomicU64);
    let ping = Arc::new(Line(AtomicU64::new(0)));
    let pong = Arc::new(Line(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (ping, pong, stop) = (ping.clone(), pong.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0;
            // Relaxed on `stop`: a flag read in a loop, nothing to publish.
            while !stop.load(Ordering::Relaxed) {
                // Acquire/Release: the pair is a message passed each way, as a
                // device's fence write and the driver's read of it are.
                let v = ping.0.load(Ordering::Acquire);
                if v != seen {
                    seen = v;
                    pong.0.store(v, Ordering::Release);
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let mut n = 0u64;
    let mut roundtrips = || {
        let t = Instant::now();
        for _ in 0..PINGS {
            n += 1;
            ping.0.store(n, Ordering::Release);
            // Bounded: the echo thread may be descheduled, never gone.
            let deadline = Instant::now() + Duration::from_secs(5);
            while pong.0.load(Ordering::Acquire) != n {
                std::hint::spin_loop();
                if Instant::now() > deadline {
                    break;
                }
            }
        }
        t.elapsed().as_secs_f64() * 1e6 / PINGS as f64
    };
    roundtrips();
    let v = roundtrips();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    v
}

/// Microseconds from an eventfd write to the return of a `read` blocked on it in
/// another thread, with the reader's CPU left idle before each write (so the figure
/// includes waking an idle vCPU, as a blocking wait on a quiet machine does).
pub fn eventfd_wakeup(samples: usize) -> Result<Sample, String> {
    use rustix::event::{eventfd, EventfdFlags};
    let fd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| format!("eventfd: {e}"))?);
    let base = Instant::now();
    // Nanoseconds since `base` at the write, and at the reader's wake-up.
    let sent = Arc::new(AtomicU64::new(0));
    let woke = Arc::new(AtomicU64::new(0));
    let reader = {
        let (fd, sent, woke) = (fd.clone(), sent.clone(), woke.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            loop {
                if rustix::io::read(&*fd, &mut buf).is_err() {
                    return;
                }
                let now = base.elapsed().as_nanos() as u64;
                // Release: the waiter below reads `woke` after seeing it change.
                woke.store(now, Ordering::Release);
                // Relaxed: `sent` is only a value; u64::MAX says stop.
                if sent.load(Ordering::Relaxed) == u64::MAX {
                    return;
                }
            }
        })
    };
    let mut one = || {
        // Let the reader block and its CPU go idle.
        std::thread::sleep(Duration::from_micros(500));
        let before = woke.load(Ordering::Acquire);
        let t = base.elapsed().as_nanos() as u64;
        sent.store(t, Ordering::Relaxed);
        let _ = rustix::io::write(&*fd, &1u64.to_ne_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let w = woke.load(Ordering::Acquire);
            if w != before {
                return w.saturating_sub(t) as f64 / 1e3;
            }
            if Instant::now() > deadline {
                return f64::NAN;
            }
            std::thread::yield_now();
        }
    };
    let s = repeat(samples * 5, 5, &mut one);
    sent.store(u64::MAX, Ordering::Relaxed);
    let _ = rustix::io::write(&*fd, &1u64.to_ne_bytes());
    let _ = reader.join();
    if s.values.iter().any(|v| v.is_nan()) {
        return Err("eventfd_wakeup_limit: the reader did not wake within 5 s".into());
    }
    Ok(s)
}

/// Slots of the shared-memory rings of [`ring_protocol`], as the bench's queue has.
const SLOTS: usize = 256;
/// Batches per sample of [`ring_protocol`].
const BATCHES: usize = 2000;

/// Commands per second (millions) through the ring protocol's shared memory alone, in
/// batches of `batch`, one batch in flight (as the `nop_batch_<n>` rows run): the
/// submitter writes `batch` 64-byte descriptors and the tail; the other thread sees
/// the tail, reads the descriptors, writes one 32-byte completion each and the fence;
/// the submitter sees the fence, reads the completions and the head moves on. The
/// same bytes cross between the two cores as between the driver and the engine, and
/// nothing else happens: no validation, no decoding, no locks. One sample, as
/// [`fence_roundtrip`] takes it (after a warm-up of as many batches, in a thread of
/// its own), for the caller to interleave with the row's own.
pub fn ring_protocol(batch: usize) -> f64 {
    // Each index on a cache line of its own, as in a real ring's layout.
    #[repr(align(128))]
    struct Line(AtomicU64);
    struct Rings {
        sq: Vec<AtomicU64>,
        cq: Vec<AtomicU64>,
        tail: Line,
        fence: Line,
        stop: AtomicBool,
    }
    const DESC_WORDS: usize = 8;
    const CQE_WORDS: usize = 4;
    let batch = batch.clamp(1, SLOTS);
    let rings = Arc::new(Rings {
        sq: (0..SLOTS * DESC_WORDS).map(|_| AtomicU64::new(0)).collect(),
        cq: (0..SLOTS * CQE_WORDS).map(|_| AtomicU64::new(0)).collect(),
        tail: Line(AtomicU64::new(0)),
        fence: Line(AtomicU64::new(0)),
        stop: AtomicBool::new(false),
    });
    let device = {
        let r = rings.clone();
        std::thread::spawn(move || {
            let mut head = 0u64;
            // Relaxed on `stop`: a flag read in a loop, nothing to publish.
            while !r.stop.load(Ordering::Relaxed) {
                // Acquire: pairs with the submitter's Release store of the tail, so
                // the descriptors below it are written.
                let tail = r.tail.0.load(Ordering::Acquire);
                if tail == head {
                    std::hint::spin_loop();
                    continue;
                }
                let mut last = 0;
                while head != tail {
                    let s = head as usize % SLOTS;
                    // Relaxed: ordered by the Acquire of the tail above.
                    let d: [u64; DESC_WORDS] =
                        std::array::from_fn(|w| r.sq[s * DESC_WORDS + w].load(Ordering::Relaxed));
                    last = d[1];
                    for (w, v) in [d[1], 0, 0, 0].into_iter().enumerate() {
                        // Relaxed: published by the Release store of the fence below.
                        r.cq[s * CQE_WORDS + w].store(v, Ordering::Relaxed);
                    }
                    head += 1;
                }
                // Release: the completions above are visible to whoever sees it.
                r.fence.0.store(last, Ordering::Release);
            }
        })
    };
    let mut tail = 0u64;
    let mut seqno = 0u64;
    let mut run = || {
        let t = Instant::now();
        for _ in 0..BATCHES {
            for _ in 0..batch {
                seqno += 1;
                let s = tail as usize % SLOTS;
                let d = [1u64, seqno, 0, 0, 0, 0, 0, 0];
                for (w, v) in d.into_iter().enumerate() {
                    // Relaxed: published by the Release store of the tail below.
                    rings.sq[s * DESC_WORDS + w].store(v, Ordering::Relaxed);
                }
                tail += 1;
            }
            // Release: the descriptors above are visible to whoever sees this tail.
            rings.tail.0.store(tail, Ordering::Release);
            // Bounded: the other thread may be descheduled, never gone.
            let deadline = Instant::now() + Duration::from_secs(5);
            // Acquire: pairs with the Release store of the fence.
            while rings.fence.0.load(Ordering::Acquire) != seqno {
                std::hint::spin_loop();
                if Instant::now() > deadline {
                    break;
                }
            }
            let mut sum = 0u64;
            for k in 0..batch as u64 {
                let s = (tail - batch as u64 + k) as usize % SLOTS;
                for w in 0..CQE_WORDS {
                    // Relaxed: ordered by the Acquire of the fence above.
                    sum = sum.wrapping_add(rings.cq[s * CQE_WORDS + w].load(Ordering::Relaxed));
                }
            }
            std::hint::black_box(sum);
        }
        (BATCHES * batch) as f64 / t.elapsed().as_secs_f64() / 1e6
    };
    run();
    let v = run();
    rings.stop.store(true, Ordering::Relaxed);
    let _ = device.join();
    v
}
