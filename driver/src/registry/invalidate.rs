//! Invalidation: the write side of the notifier contract. Open the window, retire or
//! downgrade the overlapping regions under the exclusive lock, wait for the device,
//! unmap, re-pin the parts outside the range (split); restore on an upgrade. Every
//! path out of `invalidate_start` closes the window it opened, unless it hands it to
//! the [`Invalidation`] it returns (which closes it when ended or dropped).

use super::cause::{policy, Action};
use super::notifier::{Notifier, WindowId};
use super::region::{read_only, Region};
use super::stats::Stats;
use super::{page_range, Cause, Index, Invalidation, Registry, PAGE};
use crate::error::{Error, Result};
use crate::submitter::{deadline_after, millis};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An open window, closed on drop unless handed on with `keep`.
struct WindowGuard<'a> {
    notifier: &'a Notifier<Index>,
    id: Option<WindowId>,
}

impl WindowGuard<'_> {
    fn keep(mut self) -> WindowId {
        self.id.take().expect("a guard holds its window until kept")
    }
}

impl Drop for WindowGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.notifier.close_window(id);
        }
    }
}

impl Registry {
    /// Begin invalidating `[start, end)` for `cause`. When this returns `Ok`, the device
    /// no longer uses the range (or its work failed after a device reset), and no new
    /// mapping of it can be established until [`Registry::invalidate_end`] (or until the
    /// [`Invalidation`] is dropped).
    ///
    /// An error means the device's work on the range could not be proven finished (the
    /// device did not finish or reset in time, the ring stopped): the range's regions
    /// are unmapped all the same, with their IOVA ranges quarantined (see the module
    /// docs' "Teardown and reset"), and no window stays open.
    pub fn invalidate_start(&self, range: Range<u64>, cause: Cause) -> Result<Invalidation> {
        let _section = crate::driver_section::enter();
        let inner = &*self.inner;
        Stats::add(&inner.stats.invalidations[cause.index()], 1);
        let range = if range.start >= range.end {
            range.start..range.start
        } else {
            page_range(range.start, range.end - range.start)?
        };
        let none = Invalidation {
            window: None,
            range: range.clone(),
            owner: Arc::downgrade(&self.inner),
        };
        if range.is_empty() || crate::fork::in_forked_child() {
            return Ok(none);
        }
        let action = policy(cause);
        match action {
            Action::Nothing => return Ok(none),
            Action::Restore => {
                self.restore(&range);
                return Ok(none);
            }
            Action::Downgrade | Action::Drop => {}
        }
        let window = WindowGuard {
            notifier: &inner.notifier,
            id: Some(inner.notifier.open_window(range.clone())),
        };
        let mut victims = Vec::new();
        let mut downgrades = Vec::new();
        let mut others_downgrading = Vec::new();
        let mut fences = Vec::new();
        let mut survivors = Vec::new();
        // Chunked regions the range covers only part of: (region, the chunks whose
        // present bit this call cleared). Their other chunks stay mapped.
        let mut chunked: Vec<(Arc<Region>, Vec<usize>)> = Vec::new();
        let mut stale_chunks: Vec<(Arc<Region>, usize)> = Vec::new();
        let stale = {
            let mut g = inner.notifier.write();
            g.invalidations.record(range.clone());
            for slot in 0..3 {
                let hits: Vec<u64> = g.maps[slot]
                    .overlapping(range.clone())
                    .map(|(r, _)| r.start)
                    .collect();
                for s in hits {
                    if action == Action::Drop {
                        let (rr, r) = g.maps[slot].covering(s..s + 1).expect("hit is present");
                        let inside = range.start <= rr.start && rr.end <= range.end;
                        if !inside && r.chunks.count() > 1 {
                            // Only the chunks the range touches go; the region stays in
                            // the index. The bump fails every submission that looked it
                            // up before (its chunks may be among them); the next use
                            // re-pins the missing chunks (`repin`).
                            let r = r.clone();
                            r.epoch.bump(&g);
                            fences.extend(r.inflight());
                            let mut mine = Vec::new();
                            for k in r.chunks.touching(&range) {
                                if r.chunks.take_present(k) {
                                    mine.push(k);
                                } else {
                                    // Another invalidation is unmapping it (or did): its
                                    // mirror entries go before this call returns too.
                                    stale_chunks.push((r.clone(), k));
                                }
                            }
                            // Nothing of it left mapped: out of the index and retired
                            // whole, so that no empty region lingers (a merge would pin
                            // its released pages again).
                            if (0..r.chunks.count()).all(|k| !r.chunks.is_present(k)) {
                                g.maps[slot].remove(s);
                                victims.push(r);
                                continue;
                            }
                            chunked.push((r, mine));
                            continue;
                        }
                    }
                    if action == Action::Downgrade {
                        let (rr, r) = g.maps[slot].covering(s..s + 1).expect("hit is present");
                        if !r.perm.write() {
                            continue;
                        }
                        // A region wholly inside the range becomes device-read-only in
                        // place. One that sticks out is dropped and split instead: its
                        // outside parts must stay writable for the device. A write-only
                        // one is dropped too: without write the device may do nothing
                        // with it (read-only would widen it).
                        if range.start <= rr.start
                            && rr.end <= range.end
                            && read_only(r.perm).is_some()
                        {
                            let r = r.clone();
                            // Whatever may still write it is waited for, even when
                            // another downgrade got there first (then its set_perm is
                            // waited for too, below).
                            fences.extend(r.inflight());
                            // Relaxed: downgraded is written only under the exclusive lock.
                            if !r.downgraded.swap(true, Ordering::Relaxed) {
                                // Relaxed: under the exclusive lock (see submit_all_hits).
                                r.perm_pending.store(true, Ordering::Relaxed);
                                // Submissions that read the epoch before this retry and
                                // then wait for perm_pending (see resolve).
                                r.epoch.bump(&g);
                                downgrades.push(r);
                            } else {
                                others_downgrading.push(r);
                            }
                            continue;
                        }
                    }
                    let (_, r) = g.maps[slot].remove(s).expect("hit is present");
                    r.epoch.bump(&g);
                    // The parts outside the range come back; device-read-only if the
                    // region was (re-pinned writable, they would give the device write
                    // access to memory the process write-protected).
                    // Relaxed: downgraded is written only under the exclusive lock.
                    let ro = r.downgraded.load(Ordering::Relaxed);
                    if inner.cfg.split {
                        if r.range.start < range.start {
                            survivors.push((r.range.start..range.start, r.perm, ro));
                        }
                        if range.end < r.range.end {
                            survivors.push((range.end..r.range.end, r.perm, ro));
                        }
                    }
                    victims.push(r);
                }
            }
            let overlaps = |r: &Arc<Region>| r.range.start < range.end && range.start < r.range.end;
            // Regions another invalidation has retired and is still waiting for, and
            // (below) merged ones still draining: a device-side mirror may hold their
            // translations, which must go before this call returns (`mirror`).
            let mut stale: Vec<Arc<Region>> = Vec::new();
            for r in g.retiring.iter().filter(|r| overlaps(r)) {
                fences.extend(r.inflight());
                stale.push(r.clone());
            }
            if action == Action::Drop {
                let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut g.draining)
                    .into_iter()
                    .partition(overlaps);
                g.draining = keep;
                victims.extend(hit);
            } else {
                for r in g.draining.iter().filter(|r| overlaps(r)) {
                    fences.extend(r.inflight());
                    stale.push(r.clone());
                }
            }
            for r in &victims {
                fences.extend(r.inflight());
            }
            g.retiring.extend(victims.iter().cloned());
            stale
        };
        inner.tell_invalidating(&range, cause);
        let waited = inner.wait_work(&fences, &range);
        inner.tell_stale(&stale, cause);
        let why = super::UnmapReason::Invalidation(cause);
        for (r, k) in &stale_chunks {
            let (host, iova) = r.chunk(*k);
            inner.tell_unmapping_range(host.clone(), iova, host.end - host.start, why);
        }
        // Unmapped whatever the wait says: a region whose work may still run keeps its
        // IOVA range out of circulation (quarantined) until the work is proven done.
        inner.retire(&victims, why);
        if waited.is_ok() {
            for (r, ks) in &chunked {
                inner.unmap_some_chunks(r, ks, why);
            }
        } else {
            // The work may still run: a chunk re-pinned at the same IOVA could be
            // reached by it. The regions go whole instead, their IOVA ranges quarantined.
            inner.retire_whole(chunked.into_iter().map(|(r, _)| r), why);
        }
        for r in &downgrades {
            inner.tell_downgrading(r);
            let ro = read_only(r.perm).expect("only readable regions are downgraded");
            match inner.set_region_perm(r, ro, false) {
                Ok(()) => Stats::add(&inner.stats.downgrades, 1),
                Err(e) => tracing::error!("downgrading region: {e}"),
            }
            // Release: the read-only device mapping is in place before hits proceed.
            r.perm_pending.store(false, Ordering::Release);
        }
        let mut result = waited;
        for r in &others_downgrading {
            if !r.wait_perm(deadline_after(inner.cfg.window_timeout)) && result.is_ok() {
                result = Err(Error::WindowTimeout {
                    start: r.range.start,
                    end: r.range.end,
                    waited_ms: millis(inner.cfg.window_timeout),
                });
            }
        }
        for (s, perm, ro) in survivors {
            let _span = tracing::debug_span!("split_repin", start = s.start, end = s.end).entered();
            // Best effort: the pages outside the range are untouched; if re-pinning
            // fails they are re-pinned on next use instead.
            // Never wait for another window here: the caller may be a monitor's only
            // worker, which must return to close that very window.
            if self.pin(s, perm, false, false, ro).is_ok() {
                Stats::add(&inner.stats.splits, 1);
            }
        }
        // On an error the guard closes the window here.
        result?;
        Ok(Invalidation {
            window: Some(window.keep()),
            range,
            owner: Arc::downgrade(&self.inner),
        })
    }

    /// End an invalidation: new mappings of the range may be established again.
    /// (Dropping the [`Invalidation`] does the same.)
    pub fn invalidate_end(&self, inv: Invalidation) {
        let _section = crate::driver_section::enter();
        drop(inv);
    }

    /// `invalidate_start` + `invalidate_end`, for a change that already happened or
    /// is being made by the caller with nothing to do in between.
    pub fn invalidate(&self, range: Range<u64>, cause: Cause) -> Result<()> {
        let inv = self.invalidate_start(range, cause)?;
        self.invalidate_end(inv);
        Ok(())
    }

    /// Unmap everything (teardown). Waits for in-flight work like any invalidation.
    pub fn clear(&self) -> Result<()> {
        self.invalidate(0..!(PAGE - 1), Cause::Release)
    }

    pub(super) fn restore(&self, range: &Range<u64>) {
        let inner = &*self.inner;
        let mut up = Vec::new();
        {
            let g = inner.notifier.read();
            for slot in 0..3 {
                for (rr, r) in g.maps[slot].overlapping(range.clone()) {
                    // Only a region wholly inside the upgraded range gets write back:
                    // part of one that sticks out may still be read-only in the process.
                    let inside = range.start <= rr.start && rr.end <= range.end;
                    // Relaxed: a flag; the region's mutex orders the device update.
                    if inside && r.downgraded.swap(false, Ordering::Relaxed) {
                        up.push(r.clone());
                    }
                }
            }
        }
        // Outside the notifier lock (a region's mutex is never taken under it). A
        // downgrade that came in between has set the flag again: it makes the mapping
        // read-only after taking the same mutex, or already did, and then this skips.
        for r in up {
            let perm = r.perm;
            if let Err(e) = inner.set_region_perm(&r, perm, true) {
                tracing::error!("restoring region permissions: {e}");
            } else {
                Stats::add(&inner.stats.restores, 1);
            }
        }
    }
}
