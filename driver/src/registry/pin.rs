//! The miss path: resolving a registration to a region, pinning (merged with its
//! neighbours) outside every lock, and installing the pin unless an invalidation
//! raced it (the fresh-pin half of the notifier contract).

use super::notifier::Epoch;
use super::region::{perm_slot, Region};
use super::stats::Stats;
use super::{validate, Cause, Registry, Userptr, PAGE};
use crate::error::{Error, Result};
use crate::iommu::Perm;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

impl Registry {
    /// Resolve `u` to a live region covering it, and that region's epoch.
    pub(super) fn resolve(&self, u: &Userptr) -> Result<(Arc<Region>, u64)> {
        let slot = perm_slot(u.perm);
        let hit = {
            let g = self.inner.notifier.read();
            g.maps[slot]
                .covering(u.pages.clone())
                .map(|(_, r)| (r.clone(), r.epoch.get()))
        };
        if let Some((r, mut seq)) = hit {
            // Relaxed: the clock bit is a hint for eviction.
            r.accessed.store(true, Ordering::Relaxed);
            // A downgrade in progress: no submission until the device mapping is
            // read-only. Its epoch bump came before the flag, so the epoch read after
            // the wait is the post-downgrade one.
            // Relaxed: a hint; wait_perm's Acquire load decides.
            if r.perm_pending.load(Ordering::Relaxed) {
                r.wait_perm();
                seq = r.epoch.get();
            }
            if self.inner.cfg.validate && !self.still_current(&r, &u.pages) {
                Stats::add(&self.inner.stats.validation_failures, 1);
                let inv = self.invalidate_start(u.pages.clone(), Cause::Release)?;
                self.invalidate_end(inv);
            } else {
                Stats::add(&self.inner.stats.hits, 1);
                return Ok((r, seq));
            }
        }
        Stats::add(&self.inner.stats.misses, 1);
        let _span = tracing::debug_span!(
            "pin_miss",
            start = u.pages.start,
            end = u.pages.end,
            perm = ?u.perm
        )
        .entered();
        self.pin(u.pages.clone(), u.perm, true, true, false)
    }

    pub(super) fn still_current(&self, r: &Region, pages: &Range<u64>) -> bool {
        let Some(pinned) = &r.pfns else { return true };
        let off = ((pages.start - r.range.start) / PAGE) as usize;
        let n = ((pages.end - pages.start) / PAGE) as usize;
        match validate::pfns(pages.start, pages.end) {
            Ok(now) => now == pinned[off..off + n],
            Err(_) => true,
        }
    }

    /// Pin `want` (merged with same-permission neighbours if `merge`) as a new region
    /// and install it, unless an invalidation raced the pin (then retry).
    /// With `may_wait` false, a range under an open window is not pinned (an error)
    /// instead of waiting for the window to close. With `device_ro`, the region is
    /// mapped device-read-only from the start (a piece of a downgraded region).
    ///
    /// A device-read-only region (its memory write-protected) is never widened into a
    /// writable one: a merge leaves it out, and if the new region overlaps it, it is
    /// retired and its pages outside the new region come back device-read-only.
    pub(super) fn pin(
        &self,
        want: Range<u64>,
        perm: Perm,
        merge: bool,
        may_wait: bool,
        device_ro: bool,
    ) -> Result<(Arc<Region>, u64)> {
        let merge = merge && !device_ro;
        let map_perm = if device_ro { Perm::READ } else { perm };
        let inner = &*self.inner;
        let slot = perm_slot(perm);
        let max_len = inner.driver.domain().max_mapping_len();
        loop {
            // The generation first, then the window wait: see InvalidationLog.
            let gen = inner.notifier.read().invalidations.generation();
            if !may_wait && inner.notifier.window_open(&want) {
                return Err(Error::InvalidationFailed {
                    start: want.start,
                    end: want.end,
                    reason: "an invalidation window is open on the range".into(),
                });
            }
            if inner.notifier.window_open(&want) {
                let _span = tracing::debug_span!("window_wait", start = want.start, end = want.end)
                    .entered();
                let t0 = Instant::now();
                if inner.notifier.wait_no_window(&want) {
                    Stats::add(&inner.stats.window_waits, 1);
                    Stats::add(&inner.stats.window_wait_ns, t0.elapsed().as_nanos() as u64);
                }
            }
            let mut range = want.clone();
            if merge {
                let g = inner.notifier.read();
                let probe = want.start.saturating_sub(1)..want.end.saturating_add(1);
                for (r, region) in g.maps[slot].overlapping(probe) {
                    // Not a device-read-only region (see above).
                    // Relaxed: downgraded is written only under the exclusive lock.
                    if region.downgraded.load(Ordering::Relaxed) {
                        continue;
                    }
                    let u = r.start.min(range.start)..r.end.max(range.end);
                    if u.end - u.start <= max_len {
                        range = u;
                    }
                }
                // Merge only what fits beside what is pinned now: a merge must not
                // force evictions (or a budget error) that `want` alone would not.
                let grown = (range.end - range.start) - (want.end - want.start);
                if inner.pinned.load(Ordering::Relaxed) + grown + (want.end - want.start)
                    > inner.budget
                {
                    range = want.clone();
                }
            }
            let len = range.end - range.start;
            if len > inner.budget {
                return Err(Error::PinBudget {
                    len,
                    budget: inner.budget,
                });
            }
            self.make_room(len)?;
            let pin_span =
                tracing::debug_span!("pin", start = range.start, end = range.end).entered();
            let iova = match self.map_pinned(range.start, len, map_perm) {
                Ok(iova) => iova,
                // A merged neighbour may cover memory that is gone: pin just the range.
                Err(Error::BadAddress { .. }) if range != want => {
                    range = want.clone();
                    self.map_pinned(range.start, range.end - range.start, map_perm)?
                }
                Err(e) => return Err(e),
            };
            drop(pin_span);
            let len = range.end - range.start;
            let pfns = if inner.cfg.validate {
                validate::pfns(range.start, range.end).ok()
            } else {
                None
            };
            let region = Arc::new(Region {
                range: range.clone(),
                perm,
                iova,
                epoch: Epoch::new(),
                downgraded: AtomicBool::new(device_ro),
                perm_pending: AtomicBool::new(false),
                accessed: AtomicBool::new(true),
                inflight: Mutex::new(Vec::new()),
                pfns,
            });
            // Widen the pre-check bounds before the region becomes visible.
            // Release: see may_overlap.
            inner.lo.fetch_min(range.start, Ordering::Release);
            inner.hi.fetch_max(range.end, Ordering::Release);
            let mut g = inner.notifier.write();
            if g.invalidations.invalidated_since(gen, &range) {
                drop(g);
                let _ = inner.driver.unmap_raw(iova, len);
                Stats::add(&inner.stats.retries, 1);
                continue;
            }
            // Retire whatever overlaps (the regions merged in, or one another thread
            // installed meanwhile): out of the index, unmapped once idle.
            let olds: Vec<u64> = g.maps[slot]
                .overlapping(range.clone())
                .map(|(r, _)| r.start)
                .collect();
            let mut ro_leftovers = Vec::new();
            for s in olds {
                if let Some((_, old)) = g.maps[slot].remove(s) {
                    // Relaxed: downgraded is written only under the exclusive lock.
                    if old.downgraded.load(Ordering::Relaxed) {
                        if old.range.start < range.start {
                            ro_leftovers.push(old.range.start..range.start);
                        }
                        if range.end < old.range.end {
                            ro_leftovers.push(range.end..old.range.end);
                        }
                    }
                    old.epoch.bump(&g);
                    Stats::add(&inner.stats.merges, 1);
                    g.draining.push(old);
                }
            }
            let seq = region.epoch.get();
            g.maps[slot]
                .insert(range.clone(), region.clone())
                .expect("overlaps were removed");
            // Counted before the lock is released: once it is, an invalidation may
            // unmap the region and uncount it.
            inner.pinned.fetch_add(len, Ordering::Relaxed);
            inner.mappings.fetch_add(1, Ordering::Relaxed);
            drop(g);
            Stats::add(&inner.stats.pins, 1);
            Stats::add(&inner.stats.pinned_bytes, len);
            let observers = inner
                .observers
                .lock()
                .expect("observers lock poisoned")
                .clone();
            for o in observers {
                o.pinned(range.clone());
            }
            for piece in ro_leftovers {
                // Best effort, like a split: on failure they re-pin on next use.
                let _ = self.pin(piece, perm, false, false, true);
            }
            self.reclaim_draining();
            return Ok((region, seq));
        }
    }

    /// Map and pin `[host, host + len)`, handling the kernel's transient refusals:
    /// `EAGAIN` ([`Error::PinAgain`]) is retried a few times with a short back-off, and
    /// `ENOMEM` ([`Error::PinLimit`]: the locked-memory limit or the kernel's memory)
    /// evicts idle regions worth `len` bytes from the cache and tries once more. What
    /// still fails is returned, counted in `pin_failures`.
    pub(super) fn map_pinned(&self, host: u64, len: u64, perm: Perm) -> Result<u64> {
        const AGAIN_TRIES: u32 = 4;
        let inner = &*self.inner;
        let mut again = 0;
        let mut evicted = false;
        loop {
            match inner.driver.map_user_pages(host, len, perm) {
                Ok(iova) => return Ok(iova),
                Err(Error::PinAgain { .. }) if again < AGAIN_TRIES => {
                    again += 1;
                    Stats::add(&inner.stats.pin_retries, 1);
                    std::thread::sleep(std::time::Duration::from_micros(50 << again));
                }
                Err(Error::PinLimit { .. }) if !evicted && self.evict(len, 0) > 0 => {
                    evicted = true;
                    Stats::add(&inner.stats.pin_retries, 1);
                }
                Err(e) => {
                    Stats::add(&inner.stats.pin_failures, 1);
                    let _slow = tracing::debug_span!("pin_failed", host, len, %e).entered();
                    return Err(e);
                }
            }
        }
    }

    pub(super) fn unmap_region(&self, r: &Region, why: super::UnmapReason) {
        let inner = &*self.inner;
        self.tell_unmapping(r, why);
        if let Err(e) = inner.driver.unmap_raw(r.iova, r.len()) {
            if !crate::fork::in_forked_child() {
                tracing::error!(
                    "unmapping region {:#x}..{:#x}: {e}",
                    r.range.start,
                    r.range.end
                );
            }
            return;
        }
        inner.pinned.fetch_sub(r.len(), Ordering::Relaxed);
        inner.mappings.fetch_sub(1, Ordering::Relaxed);
        Stats::add(&inner.stats.unpins, 1);
        Stats::add(&inner.stats.unpinned_bytes, r.len());
    }
}
