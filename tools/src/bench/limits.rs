//! The machine's own floors for the control path, measured in the same run as the
//! rows they bound (`ring` suite): `fence_roundtrip_limit`, a round trip through shared
//! memory between two threads (what a polled fence can at best cost: the submitter
//! writes, the other side sees it and answers), and `eventfd_wakeup_limit`, an eventfd
//! write waking a thread blocked in `read` on it (what a blocking wait can at best
//! cost). No `unsafe` here: atomics and rustix's eventfd.

use super::measure::{repeat, Sample};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips per sample of `fence_roundtrip_limit`.
const PINGS: u64 = 2000;

/// Microseconds per shared-memory round trip: this thread stores `n`, the other thread
/// spins until it sees `n` and stores `n` back in the answer word, this thread spins
/// until it sees that. Each sample is the mean of [`PINGS`] round trips.
pub fn fence_roundtrip(samples: usize) -> Sample {
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
    let s = repeat(samples, 2, &mut roundtrips);
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    s
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
