//! The chunk re-pin: the miss path of a region that is still in the index but lost
//! chunks to a partial invalidation (`chunks`). The missing chunks are pinned again at
//! their old IOVA (inside the region's reservation), so every address a submission
//! computed from the region stays what it was; nothing else of the region is touched.
//!
//! It follows the fresh-pin half of the notifier contract (`pin`): read the
//! invalidation generation, wait for the windows over the chunks, pin outside the
//! notifier lock, then, under the exclusive lock, install (set the present bits)
//! unless an invalidation of the chunks *started* meanwhile, the region left the index,
//! or its permission changed; then the fresh mappings are taken away and it starts
//! over, a bounded number of times. The region's mutex is held from the look at the
//! mapped chunks to the install, so two re-pins of one region, or a re-pin and the
//! region's unmap, never interleave.

use super::region::{perm_slot, Held};
use super::stats::Stats;
use super::Registry;
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Registry {
    /// Re-pin the chunks of `r` that `pages` touches and that are not present. Returns
    /// the region's epoch once they are all present, or `None` if the region left the
    /// index meanwhile (look it up again).
    pub(super) fn repin(&self, r: &Held, pages: &Range<u64>) -> Result<Option<u64>> {
        let inner = &*self.inner;
        let slot = perm_slot(r.perm);
        let ks = r.chunks.touching(pages);
        let want = r.chunks.range_of(ks.start).start..r.chunks.range_of(ks.end - 1).end;
        let _span =
            tracing::debug_span!("chunk_repin", start = want.start, end = want.end).entered();
        let mut retries = 0;
        loop {
            // The generation first, then the window wait: see InvalidationLog.
            let gen = inner.notifier.read().invalidations.generation();
            self.wait_window(&want, true)?;
            // Room for what is missing now, before the region's mutex is taken: the
            // eviction it may run unmaps other (unheld) regions under their own.
            let (perm, missing_bytes, missing) = {
                let g = inner.notifier.read();
                let here = g.maps[slot]
                    .covering(r.range.start..r.range.start + 1)
                    .is_some_and(|(_, x)| Arc::ptr_eq(x, r));
                if !here {
                    return Ok(None);
                }
                if r.chunks.present(pages) {
                    return Ok(Some(r.epoch.get()));
                }
                let missing: Vec<usize> = ks.clone().filter(|&k| !r.chunks.is_present(k)).collect();
                let bytes = missing
                    .iter()
                    .map(|&k| r.chunks.range_of(k))
                    .map(|h| h.end - h.start)
                    .sum::<u64>();
                (r.map_perm(), bytes, missing.len())
            };
            let perm = perm.ok_or(Error::BadAddress {
                addr: want.start,
                len: want.end - want.start,
            })?;
            inner.make_room(missing_bytes, missing)?;
            let mut maps = r.chunks.maps();
            if maps.released {
                return Ok(None);
            }
            // A chunk still mapped but not present is being unmapped by an invalidation
            // that started after the window wait: wait for its window again.
            let clearing = ks
                .clone()
                .any(|k| maps.mapped[k] && !r.chunks.is_present(k));
            let mut fresh = Vec::new();
            let mut failed = None;
            if !clearing {
                let todo: Vec<usize> = ks.clone().filter(|&k| !maps.mapped[k]).collect();
                for k in todo {
                    let (host, iova) = r.chunk(k);
                    let len = host.end - host.start;
                    match self.with_room(len, || {
                        inner.driver.map_user_at(iova, host.start, len, perm)
                    }) {
                        Ok(()) => {
                            maps.mapped[k] = true;
                            fresh.push(k);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            let installed = failed.is_none() && !clearing && {
                if let Some(pfns) = &r.pfns {
                    if let Ok(now) = super::validate::pfns(want.start, want.end) {
                        let off = ((want.start - r.range.start) / super::PAGE) as usize;
                        let mut p = crate::driver_section::lock(pfns);
                        p[off..off + now.len()].copy_from_slice(&now);
                    }
                }
                let g = inner.notifier.write();
                let here = g.maps[slot]
                    .covering(r.range.start..r.range.start + 1)
                    .is_some_and(|(_, x)| Arc::ptr_eq(x, r));
                // Every chunk the reference touches is present once this installs:
                // freshly mapped here, or present all along (a clear since then would
                // have been logged over `want` and failed the check before it).
                let ok = here
                    && !g.invalidations.invalidated_since(gen, &want)
                    && r.map_perm() == Some(perm)
                    && ks
                        .clone()
                        .all(|k| fresh.contains(&k) || r.chunks.is_present(k));
                if ok {
                    for &k in &fresh {
                        r.chunks.set_present(k);
                    }
                    let bytes: u64 = fresh
                        .iter()
                        .map(|&k| r.chunks.range_of(k))
                        .map(|h| h.end - h.start)
                        .sum();
                    // Counted before the lock is released: once it is, an invalidation
                    // may unmap the chunks and uncount them.
                    inner.pinned.fetch_add(bytes, Ordering::Relaxed);
                    inner.mappings.fetch_add(fresh.len(), Ordering::Relaxed);
                    Stats::add(&inner.stats.chunk_repins, fresh.len() as u64);
                    Stats::add(&inner.stats.pinned_bytes, bytes);
                }
                ok
            };
            if installed {
                let seq = r.epoch.get();
                drop(maps);
                self.tell_observers(&want);
                return Ok(Some(seq));
            }
            // Not installed: what this round mapped goes again.
            for k in fresh {
                let (host, iova) = r.chunk(k);
                match inner.driver.unmap_at(iova, host.end - host.start) {
                    Ok(()) => maps.mapped[k] = false,
                    Err(e) => tracing::error!("unmapping a chunk re-pin that raced: {e}"),
                }
            }
            drop(maps);
            if let Some(e) = failed {
                return Err(e);
            }
            Stats::add(&inner.stats.retries, 1);
            retries += 1;
            if retries > inner.cfg.submit_retries {
                return Err(Error::TooManyRetries {
                    what: "a chunk re-pin",
                    retries: retries - 1,
                });
            }
        }
    }
}
