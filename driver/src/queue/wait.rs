//! Completion: reaping the completion queue, and waiting for a fence by polling the
//! fence word or sleeping on the ring's interrupt eventfd.

use super::submit::{Backpressure, BatchFences};
use super::{CqRegs, QueueCore, State};
use crate::error::{Error, Result};
use crate::submitter::{deadline_after, millis};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use userptr_ring::regs::{self, ring};
use userptr_ring::{Completion, Descriptor, Fence, Status, COMPLETION_SIZE};

/// Fence-word loads between two looks at the ring's error register and the clock
/// while polling.
const POLL_CHECK_EVERY: u32 = 64;

/// How long a blocking wait polls the fence before it arms the interrupt and sleeps:
/// a command that completes within it costs no sleep and no wake-up (an idle vCPU's
/// wake-up is 5-40 µs here). i915 spins the same way before sleeping on a request
/// (`CONFIG_DRM_I915_MAX_REQUEST_BUSYWAIT`, 8 µs by default); this is shorter than a
/// wake-up, so a wait that does sleep is delayed by less than the wake-up it pays.
const BLOCK_SPIN: Duration = Duration::from_micros(4);

/// How `wait` waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin on the fence word (lowest latency, burns a CPU).
    Poll,
    /// Sleep on the ring's interrupt eventfd, after polling the fence for a few
    /// microseconds (`BLOCK_SPIN`, 4 µs): a command done by then is never slept on.
    Block,
}

impl QueueCore {
    /// Drain the completion queue into the completion store.
    pub(super) fn reap(&self, st: &mut State) -> Result<()> {
        let cq = CqRegs(self.dev(), self.ring);
        let n = st.cons.available(&cq).map_err(|e| Error::RingStopped {
            ring: self.ring,
            reason: e.to_string(),
        })?;
        if n == 0 {
            return Ok(());
        }
        // Consecutive plain completions (most) go into the store as one run.
        let mut run = 0..0;
        for i in 0..n {
            let w: [u64; COMPLETION_SIZE / 8] = self
                .mem
                .read_words(self.cq_off + st.cons.slot(i) * COMPLETION_SIZE);
            let seqno = w[0];
            st.max_reaped = st.max_reaped.max(seqno);
            // Words 1 and 3 zero: status OK, no fault, no detail, result 0, a plain
            // completion (most are) known without decoding it.
            let c = (w[1] != 0 || w[3] != 0).then(|| Completion::decode_words(&w));
            let plain = c.as_ref().is_none_or(super::store::plain);
            if plain && (run.is_empty() || run.end == seqno) {
                if run.is_empty() {
                    run = seqno..seqno;
                }
                run.end += 1;
                continue;
            }
            st.done.insert_plain_run(std::mem::replace(&mut run, 0..0));
            match c {
                Some(c) if !plain => st.done.insert(c),
                _ => run = seqno..seqno + 1,
            }
        }
        st.done.insert_plain_run(run);
        st.cons.release(&cq, n);
        st.in_flight -= n.min(st.in_flight);
        Ok(())
    }

    pub(super) fn check_ring(&self) -> Result<()> {
        let code = self.dev().read32(self.reg(ring::ERROR));
        if code != 0 {
            return Err(Error::RingStopped {
                ring: self.ring,
                reason: regs::ring_error_name(code).to_string(),
            });
        }
        Ok(())
    }

    pub(super) fn take(&self, seqno: u64) -> Result<Option<Completion>> {
        let mut st = self.lock();
        self.reap(&mut st)?;
        if let Some(c) = st.done.take(seqno) {
            return Ok(Some(c));
        }
        // The ring completes in order: a reaped seqno the store does not hold was
        // claimed already or dropped unclaimed (see `store`).
        if seqno <= st.max_reaped || seqno >= st.next_seqno {
            return Err(Error::NoCompletion {
                ring: self.ring,
                seqno,
            });
        }
        Ok(None)
    }

    /// Wait until `fence`'s command completed, and return its completion if its status
    /// is OK; a command that did not succeed (a DMA fault, a bad descriptor, aborted by
    /// a reset...) is [`Error::Command`], with its status and fault record.
    /// [`QueueCore::wait_completion`] returns the completion whatever its status.
    ///
    /// Each completion can be claimed once; an earlier fence of a batch can still be
    /// waited for after its last (the rule is in [`super::store`]). A batch, as the
    /// registry's `submit` and [`QueueCore::submit_batch`] return it, is waited for
    /// with [`QueueCore::wait_batch`], which reports a failure of *any* of its
    /// commands.
    pub fn wait(&self, fence: Fence, mode: WaitMode, timeout: Duration) -> Result<Completion> {
        self.wait_completion(fence, mode, timeout)?
            .into_result(self.ring)
    }

    /// Wait until every command of `batch` completed and claim their completions. `Ok`
    /// (the last command's completion) only if every one of them succeeded; otherwise
    /// [`Error::Command`] for the first that did not (lowest seqno).
    ///
    /// The queue keeps a failed completion until it is claimed, whatever else comes
    /// back meanwhile, unless more failures than the store holds pile up unclaimed
    /// (see [`super::store`]): a batch one of whose commands may have been such a
    /// dropped failure is [`Error::NoCompletion`] for that seqno, never `Ok`.
    /// Completions of the batch claimed earlier one by one (by [`QueueCore::wait`])
    /// were reported then, and are not again.
    pub fn wait_batch(
        &self,
        batch: BatchFences,
        mode: WaitMode,
        timeout: Duration,
    ) -> Result<Completion> {
        if batch.start.ring != batch.end.ring || batch.start.seqno > batch.end.seqno {
            return Err(Error::NoCompletion {
                ring: self.ring,
                seqno: batch.start.seqno,
            });
        }
        // The ring completes in order: the last one done, all are (and reaped).
        let last = self.wait_completion(batch.end, mode, timeout)?;
        let earlier = {
            let mut st = self.lock();
            st.done.take_range(batch.start.seqno..batch.end.seqno)
        };
        if let Some(failed) = earlier.failed {
            return failed.into_result(self.ring);
        }
        if let Some(seqno) = earlier.maybe_lost {
            return Err(Error::NoCompletion {
                ring: self.ring,
                seqno,
            });
        }
        last.into_result(self.ring)
    }

    /// Wait until `fence`'s command completed and return its completion entry whatever
    /// its status: for tests and diagnostics, which look at a failure themselves. Each
    /// completion can be claimed once, as with [`QueueCore::wait`].
    pub fn wait_completion(
        &self,
        fence: Fence,
        mode: WaitMode,
        timeout: Duration,
    ) -> Result<Completion> {
        // The first look is free of the clock: a command already done (the common
        // case of a batch's earlier fences) costs one fence load and one claim.
        if fence.is_signalled_by(self.completed_seqno()) {
            if let Some(c) = self.take(fence.seqno)? {
                return Ok(c);
            }
        }
        // Taken at the first look at the clock (after a round of polling, or before
        // the first sleep): a command that completes within the first round never
        // reads it. The bound starts that much later, which only lengthens a timeout by
        // a round.
        let mut deadline = None;
        let mut spins = 0u32;
        if mode == WaitMode::Block && self.spin_until(fence, BLOCK_SPIN) {
            if let Some(c) = self.take(fence.seqno)? {
                return Ok(c);
            }
        }
        loop {
            if mode == WaitMode::Poll {
                // Spin on the fence word alone (one Acquire load a round); the ring's
                // error register and the clock are looked at every POLL_CHECK_EVERY
                // rounds only: reading the clock each round cost a tenth of the
                // polling thread's time.
                let mut k = 0;
                while k < POLL_CHECK_EVERY && !fence.is_signalled_by(self.completed_seqno()) {
                    k += 1;
                    spins += 1;
                    if spins % 128 == 0 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            if mode == WaitMode::Block || fence.is_signalled_by(self.completed_seqno()) {
                if let Some(c) = self.take(fence.seqno)? {
                    return Ok(c);
                }
            }
            self.check_ring()?;
            let now = Instant::now();
            let deadline = *deadline.get_or_insert_with(|| deadline_after(timeout));
            if now >= deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno: fence.seqno,
                    waited_ms: millis(timeout),
                });
            }
            match mode {
                // Spun above.
                WaitMode::Poll => {}
                WaitMode::Block => {
                    // Arm the ring's interrupt, then look at the fence once more: the
                    // device raises the interrupt only for an armed ring, and the SeqCst
                    // fence between the arm and this look pairs with the one between
                    // its fence write and its look at the arm (datasheet section 8):
                    // either this look sees the fence, or the device sees the arm.
                    self.dev().write32(regs::IRQ_ARM, 1 << self.ring);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if fence.is_signalled_by(self.completed_seqno()) {
                        continue;
                    }
                    // Sleep until the device signals (or a slice passes, so that several
                    // waiters sharing the eventfd all re-check).
                    let slice = (deadline - now).min(Duration::from_millis(5));
                    let mut fds = [rustix::event::PollFd::new(
                        &*self.eventfd,
                        rustix::event::PollFlags::IN,
                    )];
                    let ts = rustix::event::Timespec {
                        tv_sec: slice.as_secs() as i64,
                        tv_nsec: slice.subsec_nanos() as i64,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&ts));
                    let mut buf = [0u8; 8];
                    // The read succeeds only if the device signalled since the last
                    // read (a nonzero counter); a slice that merely ran out, or a
                    // waiter beaten to the signal by another, reads EAGAIN.
                    if let Ok(8) = rustix::io::read(&*self.eventfd, &mut buf) {
                        // Relaxed: a statistic.
                        self.irq_wakeups.fetch_add(1, Ordering::Relaxed);
                    }
                    self.dev().write32(regs::IRQ_STATUS, 1 << self.ring);
                }
            }
        }
    }

    /// Poll the fence word for `fence` for up to `limit` (the clock read every
    /// [`POLL_CHECK_EVERY`] loads). Whether it was reached.
    fn spin_until(&self, fence: Fence, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            for _ in 0..POLL_CHECK_EVERY {
                if fence.is_signalled_by(self.completed_seqno()) {
                    return true;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= limit {
                return false;
            }
        }
    }

    /// Wait until the command with `seqno` has completed (its entry was reaped), without
    /// claiming its completion; or until the queue was closed (its ring disabled, so
    /// the device no longer works on it). For invalidation, which must know the device
    /// stopped using memory but must not steal the submitter's completion.
    pub fn wait_done(&self, seqno: u64, timeout: Duration) -> Result<()> {
        let deadline = deadline_after(timeout);
        let mut spins = 0u32;
        loop {
            // Acquire: pairs with the Release in CommandQueue::drop.
            if self.closed.load(Ordering::Acquire) {
                return Ok(());
            }
            {
                let mut st = self.lock();
                self.reap(&mut st)?;
                if st.max_reaped >= seqno {
                    return Ok(());
                }
            }
            self.check_ring()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno,
                    waited_ms: millis(timeout),
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Wait until `n` more commands fit (the device reaped enough), up to the queue's
    /// timeout.
    /// More than the ring holds never fits: [`Error::RingFull`] at once.
    pub fn wait_for_room(&self, n: u32) -> Result<()> {
        if n > self.geo.size() {
            return Err(Error::RingFull {
                ring: self.ring,
                size: self.geo.size(),
            });
        }
        let deadline = deadline_after(self.timeout());
        let mut spins = 0u32;
        loop {
            {
                let mut st = self.lock();
                self.reap(&mut st)?;
                if st.in_flight.saturating_add(n) <= self.geo.size() {
                    return Ok(());
                }
            }
            self.check_ring()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno: 0,
                    waited_ms: millis(self.timeout()),
                });
            }
            spins += 1;
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Whether `seqno` is known complete without waiting (cheap: the fence word, then
    /// the reaped entries).
    pub fn is_done(&self, seqno: u64) -> bool {
        // Acquire: see wait_done.
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        if self.completed_seqno() < seqno {
            return false;
        }
        let mut st = self.lock();
        let _ = self.reap(&mut st);
        st.max_reaped >= seqno
    }

    /// Submit `desc`, wait for it (blocking), and turn a non-OK status into an error.
    pub fn run(&self, desc: Descriptor) -> Result<Completion> {
        let fence = self.submit(desc, Backpressure::Wait)?;
        self.wait(fence, WaitMode::Block, self.timeout())
    }
}

impl crate::submitter::FenceTracker for QueueCore {
    fn is_done(&self, seqno: u64) -> bool {
        QueueCore::is_done(self, seqno)
    }

    fn wait_done(&self, seqno: u64, timeout: Duration) -> Result<()> {
        QueueCore::wait_done(self, seqno, timeout)
    }

    /// A device reset: every queued command of every ring completes `Aborted`.
    fn abort(&self, timeout: Duration) -> Result<()> {
        self.driver.reset(timeout)
    }
}

/// Turning a completion into a `Result`.
pub trait CompletionExt {
    /// `Ok(self)` when the status is OK, else [`Error::Command`].
    fn into_result(self, ring: u32) -> Result<Completion>;
}

impl CompletionExt for Completion {
    fn into_result(self, ring: u32) -> Result<Completion> {
        if self.status == Status::Ok {
            Ok(self)
        } else {
            Err(Error::Command {
                ring,
                seqno: self.seqno,
                status: self.status,
                fault: self.fault,
            })
        }
    }
}
