//! Stress: submitter threads FILL random ranges of one buffer through the registry
//! while invalidator threads discard (`MADV_DONTNEED`) or replace (`mmap(MAP_FIXED)`)
//! random overlapping ranges, telling the registry first, as a monitor would. Every
//! completed command is checked: each page it filled must show its byte, unless that
//! page was discarded after the command was submitted. A page that shows zero without
//! such a discard is a device write lost to a stale pin: a violation.
//!
//! The same run with the invalidators *not* telling the registry must find violations:
//! that proves the checker can see the bug the registry prevents. A watchdog aborts the
//! process on a deadlock; pins must be back to zero at the end.

mod common;

use common::{Anon, PinCheck};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use userptr::{Cause, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, WaitMode};

const SLOTS: usize = 32;
const SLOT: usize = 64 << 10;
const PAGES_PER_SLOT: usize = SLOT / 4096;

struct Outcome {
    commands: u64,
    invalidations: u64,
    violations: u64,
}

/// A small xorshift, so the test needs no RNG crate and each thread differs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, max: usize) -> (usize, usize) {
        let a = self.next() as usize % max;
        let len = 1 + self.next() as usize % 4;
        (a, (a + len).min(max))
    }
}

fn run(protect: bool, seconds: f64) -> Outcome {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Anon::new(SLOTS * SLOT);
    let base = buf.addr;
    let discards: Arc<Vec<AtomicU64>> = Arc::new(
        (0..SLOTS * PAGES_PER_SLOT)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let slot_locks: Arc<Vec<Mutex<()>>> = Arc::new((0..SLOTS).map(|_| Mutex::new(())).collect());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let commands = AtomicU64::new(0);
    let invalidations = AtomicU64::new(0);
    let violations = AtomicU64::new(0);

    std::thread::scope(|s| {
        for t in 0..2u32 {
            let q = drv.queue(t, 16).unwrap();
            let (reg, discards, slot_locks) = (&reg, discards.clone(), slot_locks.clone());
            let (commands, violations) = (&commands, &violations);
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + t as u64);
                let mut byte = 0u8;
                while Instant::now() < deadline {
                    let (a, b) = rng.range(SLOTS);
                    let _held: Vec<_> = (a..b).map(|i| slot_locks[i].lock().unwrap()).collect();
                    byte = byte.wrapping_add(1).max(1);
                    let pages = a * PAGES_PER_SLOT..b * PAGES_PER_SLOT;
                    let before: Vec<u64> = pages
                        .clone()
                        .map(|p| discards[p].load(Ordering::SeqCst))
                        .collect();
                    let u = reg
                        .register(base + a * SLOT, (b - a) * SLOT, Perm::READ_WRITE)
                        .unwrap();
                    let len = u.len();
                    let f = reg
                        .submit(&q, &[&u], |i| vec![Descriptor::fill(i[0], len, byte)])
                        .unwrap();
                    let c = q
                        .wait(f.end, WaitMode::Poll, Duration::from_secs(30))
                        .unwrap();
                    assert_eq!(c.status, Status::Ok);
                    commands.fetch_add(1, Ordering::Relaxed);
                    for (k, p) in pages.enumerate() {
                        // SAFETY: the buffer stays mapped (MAP_FIXED replaces, never
                        // unmaps); a byte read races only the invalidators' zapping,
                        // which is what is being checked.
                        let first =
                            unsafe { std::ptr::read_volatile((base + p * 4096) as *const u8) };
                        if first != byte {
                            let discarded = discards[p].load(Ordering::SeqCst) != before[k];
                            if first != 0 || !discarded {
                                violations.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        }
        for t in 0..2u64 {
            let (reg, discards) = (&reg, discards.clone());
            let invalidations = &invalidations;
            s.spawn(move || {
                let mut rng = Rng(0x1234_5678 + t);
                while Instant::now() < deadline {
                    let (a, b) = rng.range(SLOTS);
                    let (start, len) = (base + a * SLOT, (b - a) * SLOT);
                    let replace = rng.next() % 2 == 0;
                    let cause = if replace {
                        Cause::Unmap
                    } else {
                        Cause::Discard
                    };
                    let inv = protect.then(|| {
                        reg.invalidate_start(start as u64..(start + len) as u64, cause)
                            .unwrap()
                    });
                    // Counted before the change: a checker that reads a zapped page
                    // then sees the count moved.
                    for p in a * PAGES_PER_SLOT..b * PAGES_PER_SLOT {
                        discards[p].fetch_add(1, Ordering::SeqCst);
                    }
                    // SAFETY: changes the test's own buffer in place; it stays mapped.
                    unsafe {
                        if replace {
                            let p = libc::mmap(
                                start as *mut _,
                                len,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                                -1,
                                0,
                            );
                            assert_eq!(p as usize, start);
                        } else {
                            assert_eq!(libc::madvise(start as *mut _, len, libc::MADV_DONTNEED), 0);
                        }
                    }
                    if let Some(inv) = inv {
                        reg.invalidate_end(inv);
                    }
                    invalidations.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
    });
    let stats = reg.stats();
    eprintln!(
        "protect={protect}: {} commands, {} invalidations, {} violations\n{stats}",
        commands.load(Ordering::Relaxed),
        invalidations.load(Ordering::Relaxed),
        violations.load(Ordering::Relaxed)
    );
    drop(reg);
    drop(buf);
    Outcome {
        commands: commands.into_inner(),
        invalidations: invalidations.into_inner(),
        violations: violations.into_inner(),
    }
}

fn watchdog(limit: Duration) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !d.load(Ordering::SeqCst) {
            if t0.elapsed() > limit {
                eprintln!("watchdog: the stress test deadlocked");
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    done
}

#[test]
fn submitters_and_invalidators_never_see_a_stale_pin() {
    let pins = PinCheck::start();
    let done = watchdog(Duration::from_secs(120));
    let o = run(true, 2.0);
    done.store(true, Ordering::SeqCst);
    assert!(
        o.commands > 50 && o.invalidations > 50,
        "the run did too little to mean anything"
    );
    assert_eq!(o.violations, 0, "device writes were lost to stale pins");
    pins.check();
}

#[test]
fn without_the_registry_being_told_the_checker_finds_violations() {
    let pins = PinCheck::start();
    let done = watchdog(Duration::from_secs(120));
    let o = run(false, 1.0);
    done.store(true, Ordering::SeqCst);
    assert!(
        o.violations > 0,
        "the checker must see lost writes when nobody invalidates"
    );
    pins.check();
}
