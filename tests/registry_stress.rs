//! Stress: submitter threads write one buffer through the registry while invalidator
//! threads discard (`MADV_DONTNEED`) or replace (`mmap(MAP_FIXED)`) random overlapping
//! page ranges of it, telling the registry first, as a monitor would.
//!
//! The buffer is cut into slots; slot `s` belongs to submitter `s % SUBMITTERS`, the
//! only one whose commands write it. A submitter's registrations, though, reach over
//! its neighbours' slots (up to two slots either side, at unaligned byte boundaries,
//! read-write or write-only), so the submitters register, miss, pin, merge and retire
//! overlapping regions concurrently, and their in-flight commands use regions other
//! submitters' merges retire. Each command FILLs its owned slots with a byte, or COPYs
//! into them from a constant source buffer (a read registration at a random byte
//! offset; invalidators also release random ranges of it, which leaves its bytes as
//! they are). Every completed command is checked byte for byte, every byte of every
//! slot it wrote: a byte must be the one the command wrote, or zero if a discard or
//! replacement of its page *started* after the command was prepared (its count is
//! snapshotted before the registration). Any other byte is a device write lost to a
//! stale pin, or a write where none belongs: a violation. Because one slot has one
//! writer, nobody else's command can explain a byte. And a command writing a range
//! when its invalidation begins must be finished when `invalidate_start` returns (the
//! invalidation waits for the device): one still running is a violation too.
//!
//! The same run with the invalidators *not* telling the registry must find violations:
//! that proves the checker can see the bug the registry prevents. A watchdog aborts the
//! process on a deadlock; the registry's pins and `VmPin` must be back at the start.

mod common;
use common::RegisterTest as _;

use common::{Anon, PinCheck};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userptr::{Cause, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, WaitMode};

const SLOTS: usize = 32;
const SLOT: usize = 64 << 10;
const PAGE: usize = 4096;
const PAGES_PER_SLOT: usize = SLOT / PAGE;
const SUBMITTERS: usize = 3;
/// The COPY source: constant, never zero (a zero byte in a slot means "discarded").
const SRC_LEN: usize = 4 * SLOT;

/// The source byte at offset `i`: position-dependent, so that a copy from the wrong
/// offset shows; high bit set, so never zero and never a FILL byte (1..=0x7f).
fn pattern(i: usize) -> u8 {
    0x80 | ((i as u32).wrapping_mul(0x9e37_79b1) >> 25) as u8
}

#[derive(Default)]
struct Outcome {
    fills: AtomicU64,
    copies: AtomicU64,
    checked_bytes: AtomicU64,
    invalidations: AtomicU64,
    source_releases: AtomicU64,
    violations: AtomicU64,
    /// Commands still in flight on a range when its `invalidate_start` returned.
    in_flight_after_invalidation: AtomicU64,
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
    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
}

/// Compare the page at `addr` with `expect` (one page). Returns `None` when they are
/// equal, else whether every differing byte is zero (what a discard leaves).
fn compare_page(addr: usize, expect: &[u8]) -> Option<bool> {
    let mut equal = true;
    let mut zeros = true;
    for (w, e) in expect.chunks_exact(8).enumerate() {
        // SAFETY: the buffer stays mapped (MAP_FIXED replaces, never unmaps) and the
        // slot is written by no device command now (only its owner's, which has
        // completed); a read races only the invalidators' zapping, which is what is
        // being checked.
        let got = unsafe { std::ptr::read_volatile((addr + w * 8) as *const u64) };
        let want = u64::from_ne_bytes(e.try_into().unwrap());
        if got != want {
            equal = false;
            for (g, e) in got.to_ne_bytes().iter().zip(e) {
                if g != e && *g != 0 {
                    zeros = false;
                }
            }
        }
    }
    (!equal).then_some(zeros)
}

fn run(protect: bool, seconds: f64) -> Outcome {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Anon::new(SLOTS * SLOT);
    let src = Anon::new(SRC_LEN);
    let source: Vec<u8> = (0..SRC_LEN).map(pattern).collect();
    // SAFETY: `src` is mapped read-write for SRC_LEN bytes and nothing else uses it yet.
    unsafe { std::ptr::copy_nonoverlapping(source.as_ptr(), src.addr as *mut u8, SRC_LEN) };
    let (base, src_base) = (buf.addr, src.addr);
    // Per page of `buf`: discards and replacements started so far.
    let discards: Vec<AtomicU64> = (0..SLOTS * PAGES_PER_SLOT)
        .map(|_| AtomicU64::new(0))
        .collect();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let out = Outcome::default();
    let queues: Vec<_> = (0..SUBMITTERS)
        .map(|t| drv.queue(t as u32, 16).unwrap())
        .collect();
    // Per slot: the command writing it now (`seqno << 2 | submitter`, 0: none). A slot
    // has one writer, so one word per slot.
    let inflight: Vec<AtomicU64> = (0..SLOTS).map(|_| AtomicU64::new(0)).collect();

    std::thread::scope(|s| {
        for (t, q) in queues.iter().enumerate() {
            let (reg, discards, source, out, inflight) =
                (&reg, &discards, &source, &out, &inflight);
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + t as u64);
                let owned = (t..SLOTS).step_by(SUBMITTERS).count();
                let mut byte = 0u8;
                while Instant::now() < deadline {
                    // A slot of ours, and a registration reaching 0..=2 slots past it
                    // on either side, into the neighbours' slots.
                    let o = t + SUBMITTERS * rng.below(owned);
                    let a = o.saturating_sub(rng.below(3));
                    let b = (o + 1 + rng.below(3)).min(SLOTS);
                    let mine: Vec<usize> = (a..b).filter(|s| s % SUBMITTERS == t).collect();
                    // Unaligned ends where the end slot is someone else's.
                    let head = if a % SUBMITTERS == t {
                        0
                    } else {
                        rng.below(SLOT)
                    };
                    let tail = if (b - 1) % SUBMITTERS == t {
                        0
                    } else {
                        rng.below(SLOT)
                    };
                    let (start, end) = (base + a * SLOT + head, base + b * SLOT - tail);
                    let perm = if rng.below(4) == 0 {
                        Perm::WRITE
                    } else {
                        Perm::READ_WRITE
                    };
                    let copy = rng.below(2) == 0;
                    let src_off = rng.below(SRC_LEN - SLOT + 1);
                    byte = byte % 0x7f + 1;
                    // The discard counts of the pages we check, before anything is
                    // prepared: a discard counted later may legitimately zero a page.
                    let before: Vec<Vec<u64>> = mine
                        .iter()
                        .map(|&s| {
                            (s * PAGES_PER_SLOT..(s + 1) * PAGES_PER_SLOT)
                                .map(|p| discards[p].load(Ordering::SeqCst))
                                .collect()
                        })
                        .collect();
                    let dst = reg.register_test(start, end - start, perm).unwrap();
                    let offsets: Vec<u64> = mine
                        .iter()
                        .map(|&s| (base + s * SLOT - start) as u64)
                        .collect();
                    let f = if copy {
                        let from = reg
                            .register_test(src_base + src_off, SLOT, Perm::READ)
                            .unwrap();
                        reg.submit(q, &[&from, &dst], |i| {
                            offsets
                                .iter()
                                .map(|&off| Descriptor::copy(i[0], i[1] + off, SLOT as u64))
                                .collect()
                        })
                    } else {
                        reg.submit(q, &[&dst], |i| {
                            offsets
                                .iter()
                                .map(|&off| Descriptor::fill(i[0] + off, SLOT as u64, byte))
                                .collect()
                        })
                    }
                    .unwrap();
                    // SeqCst: an invalidator that reads this before it starts knows the
                    // command was submitted before its invalidation began.
                    for &s in &mine {
                        inflight[s].store(f.end.seqno << 2 | t as u64, Ordering::SeqCst);
                    }
                    let c = q
                        .wait_completion(f.end, WaitMode::Poll, Duration::from_secs(30))
                        .unwrap();
                    for &s in &mine {
                        inflight[s].store(0, Ordering::SeqCst);
                    }
                    assert_eq!(c.status, Status::Ok);
                    if copy {
                        out.copies.fetch_add(1, Ordering::Relaxed);
                    } else {
                        out.fills.fetch_add(1, Ordering::Relaxed);
                    }
                    let fill = [byte; PAGE];
                    for (k, &s) in mine.iter().enumerate() {
                        for i in 0..PAGES_PER_SLOT {
                            let expect = if copy {
                                &source[src_off + i * PAGE..src_off + (i + 1) * PAGE]
                            } else {
                                &fill[..]
                            };
                            let p = s * PAGES_PER_SLOT + i;
                            if let Some(only_zeros) = compare_page(base + p * PAGE, expect) {
                                // Loaded after the page was read: a zap seen there was
                                // counted before it happened.
                                let discarded = discards[p].load(Ordering::SeqCst) != before[k][i];
                                if !(only_zeros && discarded) {
                                    out.violations.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        out.checked_bytes.fetch_add(SLOT as u64, Ordering::Relaxed);
                    }
                }
            });
        }
        for t in 0..2u64 {
            let (reg, discards, out, inflight, queues) =
                (&reg, &discards, &out, &inflight, &queues);
            s.spawn(move || {
                let mut rng = Rng(0x1234_5678 + t);
                while Instant::now() < deadline {
                    if rng.below(5) == 0 {
                        // Release part of the source: its pins go, its bytes stay.
                        if protect {
                            let a = rng.below(SRC_LEN / PAGE);
                            let b = (a + 1 + rng.below(SRC_LEN / PAGE)).min(SRC_LEN / PAGE);
                            let r = (src_base + a * PAGE) as u64..(src_base + b * PAGE) as u64;
                            reg.invalidate(r, Cause::Release).unwrap();
                            out.source_releases.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    // Any page range up to four slots long.
                    let a = rng.below(SLOTS * PAGES_PER_SLOT);
                    let b = (a + 1 + rng.below(4 * PAGES_PER_SLOT)).min(SLOTS * PAGES_PER_SLOT);
                    let (start, len) = (base + a * PAGE, (b - a) * PAGE);
                    let replace = rng.next() % 2 == 0;
                    let cause = if replace {
                        Cause::Unmap
                    } else {
                        Cause::Discard
                    };
                    // Commands writing the range now were submitted before the
                    // invalidation begins: it must wait for them, so each is done when
                    // invalidate_start returns.
                    let busy: Vec<u64> = inflight[a / PAGES_PER_SLOT..b.div_ceil(PAGES_PER_SLOT)]
                        .iter()
                        .map(|w| w.load(Ordering::SeqCst))
                        .filter(|&e| e != 0)
                        .collect();
                    let inv = protect.then(|| {
                        reg.invalidate_start(start as u64..(start + len) as u64, cause)
                            .unwrap()
                    });
                    for e in busy {
                        if !queues[(e & 3) as usize].is_done(e >> 2) {
                            out.in_flight_after_invalidation
                                .fetch_add(1, Ordering::Relaxed);
                            out.violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Counted before the change: a checker that reads a zapped page
                    // then sees the count moved.
                    for d in &discards[a..b] {
                        d.fetch_add(1, Ordering::SeqCst);
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
                    out.invalidations.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
    });
    let stats = reg.stats();
    eprintln!(
        "protect={protect}: {} fills, {} copies, {} MiB checked, {} invalidations, \
         {} source releases, {} violations ({} in flight after invalidate_start)\n{stats}",
        out.fills.load(Ordering::Relaxed),
        out.copies.load(Ordering::Relaxed),
        out.checked_bytes.load(Ordering::Relaxed) >> 20,
        out.invalidations.load(Ordering::Relaxed),
        out.source_releases.load(Ordering::Relaxed),
        out.violations.load(Ordering::Relaxed),
        out.in_flight_after_invalidation.load(Ordering::Relaxed)
    );
    if protect {
        // Overlapping registrations from different threads must have merged.
        assert!(stats.merges > 0, "no merges: the run did not exercise them");
    }
    reg.clear().unwrap();
    assert_eq!(
        (reg.pinned_bytes(), reg.mappings()),
        (0, 0),
        "the registry holds pins after clear"
    );
    drop(reg);
    drop((queues, buf, src));
    out
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
    let (fills, copies) = (o.fills.into_inner(), o.copies.into_inner());
    assert!(
        fills > 25 && copies > 25 && o.invalidations.into_inner() > 50,
        "the run did too little to mean anything"
    );
    assert!(o.source_releases.into_inner() > 0);
    assert_eq!(
        o.violations.into_inner(),
        0,
        "device writes were lost to stale pins"
    );
    pins.check();
}

#[test]
fn without_the_registry_being_told_the_checker_finds_violations() {
    let pins = PinCheck::start();
    let done = watchdog(Duration::from_secs(120));
    let o = run(false, 1.0);
    done.store(true, Ordering::SeqCst);
    assert!(
        o.violations.into_inner() > 0,
        "the checker must see lost writes when nobody invalidates"
    );
    pins.check();
}
