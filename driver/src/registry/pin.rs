//! The miss path: resolving a registration to a region, pinning (merged with its
//! neighbours) outside every lock, and installing the pin unless an invalidation
//! raced it (the fresh-pin half of the notifier contract).

use super::chunks::Chunks;
use super::region::{perm_slot, read_only, Held, Region};
use super::stats::Stats;
use super::{validate, Cause, Registry, Userptr, PAGE};
use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::submitter::{deadline_after, millis};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Rounds of evict-and-retry a pin that the domain or the kernel refused for want of
/// room gets.
const RECLAIM_ROUNDS: u32 = 8;

/// Whether `e` says there is no room (the locked-memory limit, the domain's slots or
/// IOVA space), which evicting idle regions can cure.
fn exhausted(e: &Error) -> bool {
    matches!(
        e,
        Error::PinLimit { .. } | Error::TooManyMappings { .. } | Error::IovaExhausted { .. }
    )
}

impl Registry {
    /// Resolve `u` to a live region covering it, held (see [`Held`]), and that region's
    /// epoch.
    pub(super) fn resolve(&self, u: &Userptr<'_>) -> Result<(Held, u64)> {
        let inner = &*self.inner;
        let slot = perm_slot(u.perm);
        let mut downgrade_waits = 0;
        let mut gone = 0;
        loop {
            let hit = {
                let g = inner.notifier.read();
                g.maps[slot]
                    .covering(u.pages.clone())
                    .map(|(_, r)| (Held::new(r), r.epoch.get(), r.chunks.present(&u.pages)))
            };
            let Some((r, seq, present)) = hit else { break };
            // Relaxed: the clock bit is a hint for eviction.
            r.accessed.store(true, Ordering::Relaxed);
            // A downgrade in progress: no submission until the device mapping is
            // read-only. Wait outside every lock, then look up again: the region may
            // have gone meanwhile (its epoch then moved past anything read here).
            // Relaxed: a hint; wait_perm's Acquire load decides.
            if r.perm_pending.load(Ordering::Relaxed) {
                drop(r);
                self.wait_downgrade(&u.pages, slot, &mut downgrade_waits)?;
                continue;
            }
            if inner.cfg.validate && !self.still_current(&r, &u.pages) {
                Stats::add(&inner.stats.validation_failures, 1);
                drop(r);
                let inv = self.invalidate_start(u.pages.clone(), Cause::Release)?;
                self.invalidate_end(inv);
                break;
            }
            if !present {
                // A partial invalidation unmapped chunks the reference needs: re-pin
                // them at the same IOVA. `None`: the region left the index meanwhile.
                Stats::add(&inner.stats.misses, 1);
                match self.repin(&r, &u.pages)? {
                    Some(seq) => return Ok((r, seq)),
                    None => {
                        drop(r);
                        gone += 1;
                        if gone > inner.cfg.submit_retries.max(1) {
                            return Err(Error::TooManyRetries {
                                what: "a lookup of a region that keeps going away",
                                retries: gone - 1,
                            });
                        }
                        continue;
                    }
                }
            }
            Stats::add(&inner.stats.hits, 1);
            return Ok((r, seq));
        }
        Stats::add(&inner.stats.misses, 1);
        let _span = tracing::debug_span!(
            "pin_miss",
            start = u.pages.start,
            end = u.pages.end,
            perm = ?u.perm
        )
        .entered();
        self.pin(u.pages.clone(), u.perm, true, true, false)
    }

    /// Wait (bounded) for the downgrade in progress on the region covering `pages`.
    fn wait_downgrade(&self, pages: &Range<u64>, slot: usize, waits: &mut u32) -> Result<()> {
        let inner = &*self.inner;
        *waits += 1;
        if *waits > inner.cfg.submit_retries.max(1) {
            return Err(Error::TooManyRetries {
                what: "a lookup behind permission downgrades",
                retries: *waits - 1,
            });
        }
        let r = {
            let g = inner.notifier.read();
            g.maps[slot].covering(pages.clone()).map(|(_, r)| r.clone())
        };
        let Some(r) = r else { return Ok(()) };
        if !r.wait_perm(deadline_after(inner.cfg.window_timeout)) {
            return Err(Error::WindowTimeout {
                start: pages.start,
                end: pages.end,
                waited_ms: millis(inner.cfg.window_timeout),
            });
        }
        Ok(())
    }

    pub(super) fn still_current(&self, r: &Region, pages: &Range<u64>) -> bool {
        let Some(pinned) = &r.pfns else { return true };
        let off = ((pages.start - r.range.start) / PAGE) as usize;
        let n = ((pages.end - pages.start) / PAGE) as usize;
        match validate::pfns(pages.start, pages.end) {
            Ok(now) => now == crate::driver_section::lock(pinned)[off..off + n],
            Err(_) => true,
        }
    }

    /// Wait (bounded) until no invalidation window is open over `want`; with `may_wait`
    /// false, an open window is an error instead.
    pub(super) fn wait_window(&self, want: &Range<u64>, may_wait: bool) -> Result<()> {
        let inner = &*self.inner;
        if !inner.notifier.window_open(want) {
            return Ok(());
        }
        if !may_wait {
            return Err(Error::InvalidationFailed {
                start: want.start,
                end: want.end,
                reason: "an invalidation window is open on the range".into(),
            });
        }
        let _span =
            tracing::debug_span!("window_wait", start = want.start, end = want.end).entered();
        let t0 = Instant::now();
        match inner
            .notifier
            .wait_no_window_for(want, inner.cfg.window_timeout)
        {
            Some(true) => {
                Stats::add(&inner.stats.window_waits, 1);
                Stats::add(&inner.stats.window_wait_ns, t0.elapsed().as_nanos() as u64);
                Ok(())
            }
            Some(false) => Ok(()),
            None => Err(Error::WindowTimeout {
                start: want.start,
                end: want.end,
                waited_ms: millis(inner.cfg.window_timeout),
            }),
        }
    }

    /// Pin `want` (merged with same-permission neighbours if `merge`) as a new region
    /// and install it, held, unless an invalidation raced the pin (then retry, a
    /// bounded number of times). With `may_wait` false, a range under an open window
    /// is not pinned (an error) instead of waiting (bounded) for the window to close.
    /// With `device_ro`, the region is mapped device-read-only from the start (a piece
    /// of a downgraded region).
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
    ) -> Result<(Held, u64)> {
        let merge = merge && !device_ro;
        // Device-read-only: the registration's permission without write, never more.
        let map_perm = if device_ro {
            read_only(perm).ok_or(Error::BadAddress {
                addr: want.start,
                len: want.end - want.start,
            })?
        } else {
            perm
        };
        let inner = &*self.inner;
        let slot = perm_slot(perm);
        let max_len = inner.driver.domain().max_mapping_len();
        let mut retries = 0;
        loop {
            // The generation first, then the window wait: see InvalidationLog.
            let gen = inner.notifier.read().invalidations.generation();
            self.wait_window(&want, may_wait)?;
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
            let mut chunks = inner.chunks_for(&range);
            inner.make_room(len, chunks.count())?;
            let pin_span =
                tracing::debug_span!("pin", start = range.start, end = range.end).entered();
            let iova = match self.map_region(&range, &chunks, map_perm) {
                Ok(iova) => iova,
                // A merged neighbour may cover memory that is gone: pin just the range.
                Err(Error::BadAddress { .. }) if range != want => {
                    range = want.clone();
                    chunks = inner.chunks_for(&range);
                    self.map_region(&range, &chunks, map_perm)?
                }
                Err(e) => return Err(e),
            };
            drop(pin_span);
            let len = range.end - range.start;
            let pfns = if inner.cfg.validate {
                validate::pfns(range.start, range.end)
                    .ok()
                    .map(std::sync::Mutex::new)
            } else {
                None
            };
            let region = Arc::new(Region {
                pfns,
                ..Region::new(range.clone(), perm, iova, device_ro, chunks)
            });
            // Widen the pre-check bounds before the region becomes visible.
            // Release: see may_overlap.
            inner.lo.fetch_min(range.start, Ordering::Release);
            inner.hi.fetch_max(range.end, Ordering::Release);
            let mut g = inner.notifier.write();
            if g.invalidations.invalidated_since(gen, &range) {
                drop(g);
                // Never installed, never counted: unmapped and given back at once.
                let _ = inner.unmap_chunks(&region, Vec::new());
                Stats::add(&inner.stats.retries, 1);
                retries += 1;
                if retries > inner.cfg.submit_retries {
                    return Err(Error::TooManyRetries {
                        what: "a pin",
                        retries: retries - 1,
                    });
                }
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
            tracing::trace!(
                start = range.start,
                end = range.end,
                iova = region.iova,
                slot,
                "region installed"
            );
            g.maps[slot]
                .insert(range.clone(), region.clone())
                .expect("overlaps were removed");
            // Held before the lock is released, so no eviction can take it before the
            // caller uses it.
            let held = Held::new(&region);
            // Counted before the lock is released: once it is, an invalidation may
            // unmap the region and uncount it.
            inner.pinned.fetch_add(len, Ordering::Relaxed);
            inner
                .mappings
                .fetch_add(region.chunks.count(), Ordering::Relaxed);
            drop(g);
            Stats::add(&inner.stats.pins, 1);
            Stats::add(&inner.stats.pinned_bytes, len);
            self.tell_observers(&range);
            for piece in ro_leftovers {
                // Best effort, like a split: on failure they re-pin on next use.
                let _ = self.pin(piece, perm, false, false, true);
            }
            inner.reclaim_draining();
            return Ok((held, seq));
        }
    }

    /// Call the observers of new regions: outside every lock and outside the driver
    /// section (an observer may be application code).
    pub(super) fn tell_observers(&self, range: &Range<u64>) {
        let observers: Vec<_> = self
            .inner
            .observers
            .lock()
            .expect("observers lock poisoned")
            .iter()
            .map(|(_, o)| o.clone())
            .collect();
        for o in observers {
            crate::driver_section::outside(|| o.pinned(range.clone()));
        }
    }

    /// Reserve the IOVA range of a new region over `range` and map its chunks there
    /// (see [`Registry::with_room`] for the refusals handled). On an error nothing is
    /// left mapped or reserved.
    fn map_region(&self, range: &Range<u64>, chunks: &Chunks, perm: Perm) -> Result<u64> {
        let inner = &*self.inner;
        let len = range.end - range.start;
        let iova = self.with_room(len, || inner.driver.reserve_iova(range.start, len))?;
        for k in 0..chunks.count() {
            let host = chunks.range_of(k);
            let at = iova + chunks.offset_of(k);
            let clen = host.end - host.start;
            if let Err(e) = self.with_room(clen, || {
                inner.driver.map_user_at(at, host.start, clen, perm)
            }) {
                for j in 0..k {
                    let h = chunks.range_of(j);
                    if let Err(u) = inner
                        .driver
                        .unmap_at(iova + chunks.offset_of(j), h.end - h.start)
                    {
                        tracing::error!("unmapping a chunk of a failed pin: {u}");
                    }
                }
                inner.driver.release_iova(iova, len, Vec::new());
                return Err(e);
            }
        }
        Ok(iova)
    }

    /// Run `op` (an IOVA reservation or a mapping of `len` bytes), handling the
    /// kernel's and the domain's refusals: `EAGAIN` ([`Error::PinAgain`]) is retried a
    /// few times with a short back-off; no room ([`Error::PinLimit`]: the locked-memory
    /// limit or the kernel's memory; [`Error::TooManyMappings`],
    /// [`Error::IovaExhausted`]: the domain's slots or IOVA space) evicts idle regions
    /// worth `len` bytes and a mapping (this registry's first, then those of the other
    /// caches on the driver) and tries again, a bounded number of times. What still
    /// fails is returned, counted in `pin_failures`.
    pub(super) fn with_room<T>(&self, len: u64, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        const AGAIN_TRIES: u32 = 4;
        let inner = &*self.inner;
        let mut again = 0;
        let mut reclaims = 0;
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(Error::PinAgain { .. }) if again < AGAIN_TRIES => {
                    again += 1;
                    Stats::add(&inner.stats.pin_retries, 1);
                    std::thread::sleep(std::time::Duration::from_micros(50 << again));
                }
                Err(e)
                    if exhausted(&e)
                        && reclaims < RECLAIM_ROUNDS
                        && (inner.evict(len, 1) > 0 || inner.driver.reclaim(len, 1)) =>
                {
                    reclaims += 1;
                    Stats::add(&inner.stats.pin_retries, 1);
                }
                Err(e) => {
                    Stats::add(&inner.stats.pin_failures, 1);
                    let _slow = tracing::debug_span!("pin_failed", len, %e).entered();
                    return Err(e);
                }
            }
        }
    }
}
