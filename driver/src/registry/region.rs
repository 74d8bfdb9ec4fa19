//! A region: a pinned, IOVA-mapped range of one permission (mapped as one or more
//! chunks, `chunks`), the fences of the device work that may still reach it, and the
//! holds of the batches resolving it now.

use super::chunks::Chunks;
use super::notifier::Epoch;
use crate::iommu::Perm;
use crate::submitter::FenceTracker;
pub(super) use crate::submitter::PendingWork as InFlight;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Attach a submission's fence to a region it references. A ring completes in order,
/// so per queue only the latest seqno matters: the list stays one entry per queue.
pub(super) fn attach(r: &Region, queue: &Weak<dyn FenceTracker>, seqno: u64) {
    let mut fl = crate::driver_section::lock(&r.inflight);
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
    /// Batches resolving the region now ([`Held`]): eviction leaves it alone, so that
    /// resolving one reference of a batch never evicts another reference of it.
    pub(super) users: AtomicUsize,
    pub(super) inflight: Mutex<Vec<InFlight>>,
    /// Validation mode: the frames pinned, per page (a chunk re-pin updates its part).
    pub(super) pfns: Option<Mutex<Vec<u64>>>,
    /// How the region is mapped: chunks at `iova + offset` inside one reservation.
    pub(super) chunks: Chunks,
}

impl Region {
    pub(super) fn new(
        range: Range<u64>,
        perm: Perm,
        iova: u64,
        device_ro: bool,
        chunks: Chunks,
    ) -> Region {
        Region {
            range,
            perm,
            iova,
            chunks,
            epoch: Epoch::new(),
            downgraded: AtomicBool::new(device_ro),
            perm_pending: AtomicBool::new(false),
            accessed: AtomicBool::new(true),
            users: AtomicUsize::new(0),
            inflight: Mutex::new(Vec::new()),
            pfns: None,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// Chunk `k`'s host range and IOVA.
    pub(super) fn chunk(&self, k: usize) -> (Range<u64>, u64) {
        (
            self.chunks.range_of(k),
            self.iova + self.chunks.offset_of(k),
        )
    }

    /// What the device may do through the region's mappings now: read-only once
    /// downgraded (see `read_only`). Read under the notifier lock.
    pub(super) fn map_perm(&self) -> Option<Perm> {
        // Relaxed: downgraded is written only under the exclusive lock.
        if self.downgraded.load(Ordering::Relaxed) {
            read_only(self.perm)
        } else {
            Some(self.perm)
        }
    }

    pub(super) fn idle(&self) -> bool {
        let mut f = crate::driver_section::lock(&self.inflight);
        f.retain(|x| !x.done());
        f.is_empty()
    }

    /// Whether a batch holds the region now (see [`Held`]). Read under the exclusive
    /// notifier lock, which orders it after every hold taken under either side.
    pub(super) fn held(&self) -> bool {
        // Relaxed: the notifier lock orders it (see above).
        self.users.load(Ordering::Relaxed) > 0
    }

    /// The fences of the work that may still reach the region. Copied, not taken: a
    /// concurrent invalidation overlapping the same region must wait for them too.
    pub(super) fn inflight(&self) -> Vec<InFlight> {
        crate::driver_section::lock(&self.inflight).clone()
    }

    /// Wait (outside every lock, until `deadline`) until a downgrade in progress has
    /// made the device mapping read-only. Returns false on timeout.
    pub(super) fn wait_perm(&self, deadline: Instant) -> bool {
        // Acquire: pairs with the Release store after set_perm.
        while self.perm_pending.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        true
    }
}

/// A batch's hold on a region it resolved: while one is alive, eviction skips the
/// region. Taken under the notifier lock (either side), where eviction's exclusive
/// section sees it.
#[derive(Debug)]
pub(super) struct Held(Arc<Region>);

impl Held {
    /// Hold `r`. The caller holds the notifier lock.
    pub(super) fn new(r: &Arc<Region>) -> Held {
        // Relaxed: ordered by the notifier lock the caller holds (see Region::held).
        r.users.fetch_add(1, Ordering::Relaxed);
        Held(r.clone())
    }
}

impl std::ops::Deref for Held {
    type Target = Arc<Region>;
    fn deref(&self) -> &Arc<Region> {
        &self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Relaxed: a release that eviction sees late only spares the region once more.
        self.0.users.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) fn perm_slot(p: Perm) -> usize {
    match (p.read(), p.write()) {
        (true, false) => 0,
        (false, true) => 1,
        _ => 2,
    }
}

/// What the device may do to a region of `perm` that is device-read-only: `perm`
/// without write, never more. `None` for a write-only one (it may do nothing: such a
/// region is dropped instead of downgraded).
pub(super) fn read_only(perm: Perm) -> Option<Perm> {
    perm.read().then_some(Perm::READ)
}
