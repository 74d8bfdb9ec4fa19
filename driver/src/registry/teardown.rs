//! Letting go of regions: waiting for the device (bounded, then a reset, then bounded
//! again), unmapping under the IOVA-reuse rule, and the registry's own drop. The rules
//! are in the module docs' "Teardown and reset".

use super::region::{InFlight, Region};
use super::stats::Stats;
use super::Inner;
use crate::error::{Error, Result};
use crate::submitter::deadline_after;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

impl Inner {
    /// Unmap a region that is out of the index. Its IOVA range goes back to the
    /// allocator only if no device work may still reach it; otherwise the driver
    /// quarantines it until that work is proven finished (the translation goes now
    /// either way, so a late access faults instead of reaching someone else's pages).
    /// The device-side mirrors are told first, for `why` (`mirror`: their entries
    /// go before the IOMMU mapping does).
    pub(super) fn unmap_region(&self, r: &Region, why: super::UnmapReason) {
        tracing::trace!(
            start = r.range.start,
            end = r.range.end,
            iova = r.iova,
            ?why,
            "region unmapping"
        );
        self.tell_unmapping(r, why);
        let pending: Vec<InFlight> = r.inflight().into_iter().filter(|w| !w.done()).collect();
        match self.unmap_chunks(r, pending) {
            Ok((bytes, n, quarantined)) => {
                if quarantined {
                    Stats::add(&self.stats.quarantined, 1);
                }
                self.pinned.fetch_sub(bytes, Ordering::Relaxed);
                self.mappings.fetch_sub(n, Ordering::Relaxed);
                Stats::add(&self.stats.unpins, 1);
                Stats::add(&self.stats.unpinned_bytes, bytes);
            }
            Err(e) => {
                if !crate::fork::in_forked_child() {
                    tracing::error!(
                        "unmapping region {:#x}..{:#x}: {e}",
                        r.range.start,
                        r.range.end
                    );
                }
            }
        }
    }

    /// Unmap every mapped chunk of `r` and give its IOVA range back (quarantined while
    /// `pending` may still run); after this nothing maps into it again. Returns the
    /// bytes and mappings unmapped, and whether the range was quarantined. A chunk whose
    /// unmap fails keeps the whole range out of the allocator (leaked, never reused).
    pub(super) fn unmap_chunks(
        &self,
        r: &Region,
        pending: Vec<InFlight>,
    ) -> Result<(u64, usize, bool)> {
        let mut maps = r.chunks.maps();
        if maps.released {
            return Ok((0, 0, false));
        }
        maps.released = true;
        let (mut bytes, mut n, mut failed) = (0, 0, None);
        for k in 0..r.chunks.count() {
            if !maps.mapped[k] {
                continue;
            }
            let (host, iova) = r.chunk(k);
            let len = host.end - host.start;
            match self.driver.unmap_at(iova, len) {
                Ok(()) => {
                    maps.mapped[k] = false;
                    bytes += len;
                    n += 1;
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => Ok((bytes, n, self.driver.release_iova(r.iova, r.len(), pending))),
            Some(e) => Err(e),
        }
    }

    /// Unmap chunks `ks` of `r`, whose present bits the caller cleared (a partial
    /// invalidation, after its fence wait), telling the mirrors first; the IOVA range
    /// stays reserved for their re-pin. Nothing if the region was unmapped whole
    /// meanwhile.
    pub(super) fn unmap_some_chunks(&self, r: &Region, ks: &[usize], why: super::UnmapReason) {
        for &k in ks {
            let (host, iova) = r.chunk(k);
            self.tell_unmapping_range(host.clone(), iova, host.end - host.start, why);
        }
        let mut maps = r.chunks.maps();
        if maps.released {
            return;
        }
        for &k in ks {
            if !maps.mapped[k] {
                continue;
            }
            let (host, iova) = r.chunk(k);
            let len = host.end - host.start;
            match self.driver.unmap_at(iova, len) {
                Ok(()) => {
                    maps.mapped[k] = false;
                    self.pinned.fetch_sub(len, Ordering::Relaxed);
                    self.mappings.fetch_sub(1, Ordering::Relaxed);
                    Stats::add(&self.stats.chunk_unmaps, 1);
                    Stats::add(&self.stats.unpinned_bytes, len);
                }
                // Left mapped (and not present): the region's unmap tries again.
                Err(e) => tracing::error!("unmapping chunk {host:#x?} of a region: {e}"),
            }
        }
    }

    /// Set the device permission of every mapped chunk of `r` (a downgrade, or with
    /// `restoring` its restore), under the region's mutex so that it never interleaves
    /// with a chunk's re-pin or unmap. A restore finding the region downgraded again
    /// does nothing: that downgrade sets its read-only permission after taking the same
    /// mutex, or already has.
    pub(super) fn set_region_perm(
        &self,
        r: &Region,
        perm: crate::iommu::Perm,
        restoring: bool,
    ) -> Result<()> {
        let maps = r.chunks.maps();
        // Relaxed: the downgrade's swap comes before its own set_region_perm, ordered
        // for this reading by the mutex when that one ran first.
        if maps.released || (restoring && r.downgraded.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let mut result = Ok(());
        for k in (0..r.chunks.count()).filter(|&k| maps.mapped[k]) {
            let (host, iova) = r.chunk(k);
            if let Err(e) = self
                .driver
                .domain()
                .set_perm(iova, host.end - host.start, perm)
            {
                result = Err(e);
            }
        }
        result
    }

    /// Wait for `work` with one deadline (`fence_timeout`) for all of it; on timeout
    /// reset the device (its queued work completes `Aborted`) and wait again, bounded
    /// the same way. `range` names what is waited for, in errors. An error means some
    /// of the work may still run.
    pub(super) fn wait_work(&self, work: &[InFlight], range: &Range<u64>) -> Result<()> {
        let pending: Vec<&InFlight> = work.iter().filter(|f| !f.done()).collect();
        if pending.is_empty() {
            return Ok(());
        }
        let _span = tracing::debug_span!(
            "invalidate_wait",
            start = range.start,
            end = range.end,
            fences = pending.len()
        )
        .entered();
        Stats::add(&self.stats.fence_waits, 1);
        let t0 = Instant::now();
        let timeout = self.cfg.fence_timeout;
        let mut deadline = deadline_after(timeout);
        let mut reset = false;
        let mut result = Ok(());
        let failed = |reason: String| Error::InvalidationFailed {
            start: range.start,
            end: range.end,
            reason,
        };
        for f in pending {
            let Some(q) = f.queue.upgrade() else { continue };
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match q.wait_done(f.seqno, left) {
                    Ok(()) => break,
                    Err(Error::Timeout { .. }) if !reset => {
                        let _span = tracing::info_span!(
                            "device_reset",
                            start = range.start,
                            end = range.end,
                            seqno = f.seqno
                        )
                        .entered();
                        tracing::warn!("timed out waiting for the device: resetting it");
                        Stats::add(&self.stats.device_resets, 1);
                        reset = true;
                        if let Err(e) = q.abort(timeout) {
                            result = Err(failed(format!("the device reset failed: {e}")));
                            break;
                        }
                        // The reset's aborted completions: waited for afresh.
                        deadline = deadline_after(timeout);
                    }
                    Err(e) => {
                        result = Err(failed(e.to_string()));
                        break;
                    }
                }
            }
        }
        Stats::add(&self.stats.wait_ns, t0.elapsed().as_nanos() as u64);
        result
    }
}

/// The fences of `regions`, one per queue (the highest seqno: a queue answers for
/// the whole prefix).
fn fences(regions: &[Arc<Region>]) -> Vec<InFlight> {
    let mut out: Vec<InFlight> = Vec::new();
    for f in regions.iter().flat_map(|r| r.inflight()) {
        match out.iter_mut().find(|x| Weak::ptr_eq(&x.queue, &f.queue)) {
            Some(x) => x.seqno = x.seqno.max(f.seqno),
            None => out.push(f),
        }
    }
    out
}

impl Drop for Inner {
    /// Teardown: one bounded wait for everything in flight, a device reset if that ran
    /// out and a second bounded wait, then every region unmapped (quarantining the
    /// IOVAs of work still not proven finished). See the module docs.
    fn drop(&mut self) {
        let _section = crate::driver_section::enter();
        if crate::fork::in_forked_child() {
            return; // the parent owns the pins
        }
        let all: Vec<Arc<Region>> = {
            let mut g = self.notifier.write();
            let mut all: Vec<Arc<Region>> = std::mem::take(&mut g.draining);
            all.extend(std::mem::take(&mut g.retiring));
            for m in &mut g.maps {
                all.extend(m.iter().map(|(_, r)| r.clone()));
                *m = Default::default();
            }
            all
        };
        if let Err(e) = self.wait_work(&fences(&all), &(0..u64::MAX)) {
            tracing::error!("registry teardown: {e}; the IOVAs it may reach are quarantined");
        }
        for r in &all {
            self.unmap_region(r, super::UnmapReason::Invalidation(super::Cause::Release));
        }
    }
}
