//! A region: a pinned, IOVA-mapped range of one permission, and the fences of the
//! device work that may still reach it.

use super::notifier::Epoch;
use crate::iommu::Perm;
use crate::submitter::FenceTracker;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

/// A submission the device may still be working on.
#[derive(Clone, Debug)]
pub(super) struct InFlight {
    pub(super) queue: Weak<dyn FenceTracker>,
    pub(super) seqno: u64,
}

impl InFlight {
    pub(super) fn done(&self) -> bool {
        self.queue.upgrade().is_none_or(|q| q.is_done(self.seqno))
    }
}

/// Attach a submission's fence to a region it references. A ring completes in order,
/// so per queue only the latest seqno matters: the list stays one entry per queue.
pub(super) fn attach(r: &Region, queue: &Weak<dyn FenceTracker>, seqno: u64) {
    let mut fl = r.inflight.lock().expect("inflight lock poisoned");
    match fl.iter_mut().find(|x| Weak::ptr_eq(&x.queue, queue)) {
        Some(x) => x.seqno = x.seqno.max(seqno),
        None => fl.push(InFlight {
            queue: queue.clone(),
            seqno,
        }),
    }
}

/// A pinned, mapped range of one permission.
#[derive(Debug)]
pub(super) struct Region {
    pub(super) range: Range<u64>,
    pub(super) perm: Perm,
    pub(super) iova: u64,
    pub(super) epoch: Epoch,
    pub(super) downgraded: AtomicBool,
    /// Set (with `downgraded`) when a downgrade starts, cleared once the device
    /// mapping is read-only: until then a cache hit waits instead of submitting.
    pub(super) perm_pending: AtomicBool,
    pub(super) accessed: AtomicBool,
    pub(super) inflight: Mutex<Vec<InFlight>>,
    pub(super) pfns: Option<Vec<u64>>,
}

impl Region {
    pub(super) fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    pub(super) fn idle(&self) -> bool {
        let mut f = self.inflight.lock().expect("inflight lock poisoned");
        f.retain(|x| !x.done());
        f.is_empty()
    }

    /// The fences of the work that may still reach the region. Copied, not taken: a
    /// concurrent invalidation overlapping the same region must wait for them too.
    pub(super) fn inflight(&self) -> Vec<InFlight> {
        self.inflight
            .lock()
            .expect("inflight lock poisoned")
            .clone()
    }

    /// Wait (outside every lock) until a downgrade in progress has made the device
    /// mapping read-only.
    pub(super) fn wait_perm(&self) {
        // Acquire: pairs with the Release store after set_perm.
        while self.perm_pending.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

pub(super) fn perm_slot(p: Perm) -> usize {
    match (p.read(), p.write()) {
        (true, false) => 0,
        (false, true) => 1,
        _ => 2,
    }
}
