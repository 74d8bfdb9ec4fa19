//! Eviction: idle regions go, in clock (second-chance) order, when the pin budget or
//! the mapping limit is reached; regions with device work in flight never do.

use super::region::Region;
use super::stats::Stats;
use super::Registry;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Registry {
    /// Unmap retired regions whose device work is done.
    pub(super) fn reclaim_draining(&self) {
        let done: Vec<Arc<Region>> = {
            let mut g = self.inner.notifier.write();
            if g.draining.is_empty() {
                return;
            }
            let (done, keep): (Vec<_>, Vec<_>) = g.draining.drain(..).partition(|r| r.idle());
            g.draining = keep;
            done
        };
        for r in done {
            self.unmap_region(&r, super::UnmapReason::Merge);
        }
    }

    /// Evict idle regions (clock order) until `len` more bytes and one more mapping fit.
    pub(super) fn make_room(&self, len: u64) -> Result<()> {
        let inner = &*self.inner;
        let fits = || {
            inner.pinned.load(Ordering::Relaxed).saturating_add(len) <= inner.budget
                && inner.mappings.load(Ordering::Relaxed) < inner.max_mappings
        };
        if fits() {
            return Ok(());
        }
        self.reclaim_draining();
        let need_bytes = (inner.pinned.load(Ordering::Relaxed) + len).saturating_sub(inner.budget);
        let need_maps =
            (inner.mappings.load(Ordering::Relaxed) + 1).saturating_sub(inner.max_mappings);
        self.evict(need_bytes, need_maps);
        if fits() {
            Ok(())
        } else {
            Err(Error::PinBudget {
                len,
                budget: inner.budget,
            })
        }
    }

    /// Evict idle regions in clock order until `need_bytes` bytes and `need_maps`
    /// mappings are free (or nothing idle is left). Returns the bytes unpinned.
    pub(super) fn evict(&self, mut need_bytes: u64, mut need_maps: usize) -> u64 {
        let _span = tracing::debug_span!("evict", need_bytes, need_maps).entered();
        let inner = &*self.inner;
        let mut victims = Vec::new();
        {
            let mut g = inner.notifier.write();
            // Two sweeps of the clock: the first clears accessed bits.
            for _sweep in 0..2 {
                for slot in 0..3 {
                    let mut hand = g.hands[slot];
                    let n = g.maps[slot].len();
                    for _ in 0..n {
                        if need_bytes == 0 && need_maps == 0 {
                            break;
                        }
                        let next = g.maps[slot]
                            .first_from(hand)
                            .or_else(|| g.maps[slot].first_from(0))
                            .map(|(r, v)| (r, v.clone()));
                        let Some((r, region)) = next else { break };
                        hand = r.end;
                        // Relaxed: see resolve.
                        if region.accessed.swap(false, Ordering::Relaxed) || !region.idle() {
                            continue;
                        }
                        g.maps[slot].remove(r.start);
                        region.epoch.bump(&g);
                        need_bytes = need_bytes.saturating_sub(region.len());
                        need_maps = need_maps.saturating_sub(1);
                        victims.push(region);
                    }
                    g.hands[slot] = hand;
                }
            }
        }
        Stats::add(&inner.stats.evictions, victims.len() as u64);
        for v in &victims {
            self.unmap_region(v, super::UnmapReason::Eviction);
        }
        victims.iter().map(|v| v.len()).sum()
    }
}
