//! Where the engine thread runs: never for long on the CPU of the thread that rings
//! its doorbells.
//!
//! The engine polls its doorbells for a while after its last work and then parks
//! (engine.rs). The doorbell that unparks it is a futex wake from the submitting
//! thread, and the scheduler often places the woken engine on the waker's own CPU.
//! Both then spin on one CPU, each waiting for the other to yield, and every command
//! costs two context switches: measured here, a batch-of-1 NOP loop fell from about
//! 2 Mops/s to 0.1 while the other vCPU stood idle, until the load balancer moved one
//! of them milliseconds later (`examples` run; the `ring` suite showed it after each
//! of its limit samples, which let the engine park).
//!
//! A hardware device runs on silicon of its own; this one gets closest by moving off
//! the submitter's CPU when it finds itself there: it drops that CPU from its
//! affinity mask (the kernel migrates it at once) and puts its mask back right after,
//! so it is never pinned. Pinning is what not to do: io_uring's io-wq workers take the
//! affinity of the task that creates them, and the data path needs them on every
//! core. No io_uring submission happens between the two calls, so no worker is
//! created with the narrowed mask. The look is cheap (`sched_getcpu` through the
//! vDSO) and taken only while idle, when the clock is read anyway; a move is tried at
//! most once per [`MIN_GAP`]. A process allowed a single CPU is left alone.
//!
//! No `unsafe` here: rustix's `sched_getcpu` / `sched_{get,set}affinity`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Least time between two moves.
const MIN_GAP: Duration = Duration::from_millis(1);

/// Says no CPU (nothing rang yet).
pub(super) const NO_CPU: u32 = u32::MAX;

/// The CPU of the latest doorbell, written by the register file on the submitter's
/// thread.
#[derive(Debug)]
pub(super) struct DoorbellCpu(AtomicU32);

impl DoorbellCpu {
    pub(super) fn new() -> DoorbellCpu {
        DoorbellCpu(AtomicU32::new(NO_CPU))
    }

    /// Note the calling thread's CPU. Stores only on a change, so that a submitter
    /// that stays put does not take the cache line from the engine on every doorbell.
    pub(super) fn note(&self) {
        let cpu = rustix::thread::sched_getcpu() as u32;
        // Relaxed: a hint for placement; nothing is published through it.
        if self.0.load(Ordering::Relaxed) != cpu {
            self.0.store(cpu, Ordering::Relaxed);
        }
    }

    fn get(&self) -> u32 {
        // Relaxed: see `note`.
        self.0.load(Ordering::Relaxed)
    }
}

/// The engine's side: its own affinity mask and when it last moved.
pub(super) struct Placement {
    /// The mask the engine started with (inherited from the device's creator); None
    /// when it could not be read or allows one CPU only.
    allowed: Option<rustix::thread::CpuSet>,
    last_move: Option<Instant>,
    /// Moves made (for tests and tracing).
    pub(super) moves: u64,
}

impl Placement {
    /// Read the calling thread's (the engine's) mask.
    pub(super) fn new() -> Placement {
        let allowed = rustix::thread::sched_getaffinity(None)
            .ok()
            .filter(|m| m.count() > 1);
        Placement {
            allowed,
            last_move: None,
            moves: 0,
        }
    }

    /// If the engine runs on the CPU that rang the latest doorbell, move it to
    /// another of its allowed CPUs and restore its mask. Failures change nothing (the
    /// engine keeps working where it is).
    pub(super) fn keep_off(&mut self, doorbell: &DoorbellCpu) {
        let Some(allowed) = &self.allowed else { return };
        let theirs = doorbell.get();
        if theirs == NO_CPU || rustix::thread::sched_getcpu() as u32 != theirs {
            return;
        }
        if self.last_move.is_some_and(|t| t.elapsed() < MIN_GAP) {
            return;
        }
        self.last_move = Some(Instant::now());
        let mut elsewhere = *allowed;
        elsewhere.unset(theirs as usize);
        if elsewhere.count() == 0 {
            return;
        }
        if rustix::thread::sched_setaffinity(None, &elsewhere).is_ok() {
            self.moves += 1;
            tracing::trace!(
                from = theirs,
                "reference engine moved off the submitter's CPU"
            );
        }
        // Back to the full mask at once: the engine is never left pinned.
        if let Err(e) = rustix::thread::sched_setaffinity(None, allowed) {
            tracing::warn!("reference engine could not restore its CPU mask: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the doorbell's CPU, `keep_off` moves the thread elsewhere and leaves its
    /// mask as it was; off it, it does nothing. In a thread of its own (affinity is
    /// per thread).
    #[test]
    fn keep_off_moves_off_the_doorbell_cpu_and_restores_the_mask() {
        std::thread::spawn(|| {
            let before = rustix::thread::sched_getaffinity(None).unwrap();
            if before.count() < 2 {
                eprintln!("skipped: one CPU allowed");
                return;
            }
            let mut p = Placement::new();
            let bell = DoorbellCpu::new();
            // The scheduler may move the thread between `note` and the look in
            // `keep_off` (which then rightly does nothing): a few tries.
            for _ in 0..100 {
                bell.note();
                p.keep_off(&bell);
                if p.moves == 1 {
                    break;
                }
            }
            assert_eq!(p.moves, 1, "no move from the doorbell's CPU");
            assert_ne!(rustix::thread::sched_getcpu() as u32, bell.get());
            assert!(
                rustix::thread::sched_getaffinity(None).unwrap() == before,
                "the mask was not restored"
            );
            // Off the doorbell's CPU (and within the gap anyway): nothing.
            p.keep_off(&bell);
            assert_eq!(p.moves, 1);
        })
        .join()
        .unwrap();
    }
}
