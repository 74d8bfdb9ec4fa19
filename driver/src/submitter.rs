//! The traits every device queue implements: submit a batch without waiting, and
//! later tell whether (or wait until) that batch is done. They sit beside the queue
//! abstraction ([`crate::queue`]) so that queues implement them without knowing who
//! drives them; the registry (a layer above) is what does.
//!
//! The registry is not tied to one ring format. The reference device's
//! [`CommandQueue`](crate::queue::CommandQueue) (userptr ring protocol, in-order
//! completion) and the NVMe I/O queue (`vfio::nvme::IoQueue`, phase-bit completion
//! queue, completions in any order) both implement these traits, so the same pin
//! cache, epoch protocol and invalidation waits drive both.
//!
//! The contract a queue keeps:
//! * every batch gets a sequence number, increasing per queue;
//! * `is_done(s)` is monotonic and true only when *every* batch numbered `<= s` has
//!   finished with the memory it references (completed, aborted, or the queue is gone
//!   and the device can no longer reach it). The registry keeps only the highest
//!   sequence number per queue and region, so a queue whose completions come out of
//!   order must answer for the whole prefix, not for one batch.
//! * `domain()` is the IOMMU domain the queue's device translates through: the device
//!   addresses a submission carries mean something only there, so whoever hands the
//!   queue device addresses (the registry) checks it on every submission.
//!
//! Deadlines: every wait here takes a `Duration`, and a deadline computed from it
//! saturates ([`deadline_after`]): `Duration::MAX` means "no deadline", never an
//! overflow.

use crate::error::Result;
use crate::iommu::IommuDomain;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// `now + timeout`, saturating: a timeout too large to add (`Duration::MAX`) gives a
/// deadline centuries away instead of a panic.
pub fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        // A century fits every clock this runs on; a second as the last resort keeps
        // the function total.
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .or_else(|| now.checked_add(Duration::from_secs(1)))
        .unwrap_or(now)
}

/// Milliseconds of `d` for messages, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A batch a device may still be working on: its queue's completion side (held
/// weakly: a record never keeps a queue open) and its sequence number.
#[derive(Clone, Debug)]
pub struct PendingWork {
    /// The queue's completion side.
    pub queue: Weak<dyn FenceTracker>,
    /// The batch's sequence number.
    pub seqno: u64,
}

impl PendingWork {
    /// Whether the batch (and every earlier one of its queue) is finished, or its queue
    /// is gone (then the device can no longer reach its memory).
    pub fn done(&self) -> bool {
        self.queue.upgrade().is_none_or(|q| q.is_done(self.seqno))
    }
}

/// The completion side of a queue, as invalidation sees it.
pub trait FenceTracker: Send + Sync {
    /// Whether every batch numbered `<= seqno` is finished. Never blocks.
    fn is_done(&self, seqno: u64) -> bool;

    /// Wait up to `timeout` until `is_done(seqno)`; [`crate::Error::Timeout`] if not.
    fn wait_done(&self, seqno: u64, timeout: Duration) -> Result<()>;

    /// Make every outstanding batch finish now (a device or controller reset: the
    /// work completes aborted). Called when an invalidation waited `timeout` in vain.
    fn abort(&self, timeout: Duration) -> Result<()>;
}

/// The submission side of a queue, as `Registry::submit` (a layer above) drives it.
pub trait Submitter {
    /// One ring entry (a reference descriptor, an NVMe command).
    type Command;
    /// What a submission hands back to wait on.
    type Fence;

    /// The most commands one batch may hold (the ring's size).
    fn capacity(&self) -> usize;

    /// An identifier for messages (ring or queue number).
    fn queue_id(&self) -> u32;

    /// The IOMMU domain the queue's device translates device addresses through.
    fn domain(&self) -> &Arc<dyn IommuDomain>;

    /// Queue `cmds` as one batch without waiting for room: [`crate::Error::RingFull`]
    /// if the ring cannot take them now. Returns the fence and the batch's sequence
    /// number.
    fn try_submit(&self, cmds: &[Self::Command]) -> Result<(Self::Fence, u64)>;

    /// Wait until `n` commands fit (bounded by the queue's timeout).
    fn wait_for_room(&self, n: usize) -> Result<()>;

    /// The queue's completion side, held weakly: a region never keeps a queue open.
    fn tracker(&self) -> Weak<dyn FenceTracker>;
}
