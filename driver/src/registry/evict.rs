//! Eviction: idle regions go, in clock (second-chance) order, when the pin budget, the
//! registry's mapping limit or the domain's (shared with everything else mapped in it)
//! is reached; regions with device work in flight never do, and neither do regions a
//! batch is resolving now (held: see `region::Held`).

use super::region::{perm_slot, Region};
use super::stats::Stats;
use super::Inner;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Inner {
    /// Unmap retired regions whose device work is done.
    pub(super) fn reclaim_draining(&self) {
        let done: Vec<Arc<Region>> = {
            let mut g = self.notifier.write();
            if g.draining.is_empty() {
                return;
            }
            let (done, keep): (Vec<_>, Vec<_>) = g.draining.drain(..).partition(|r| r.idle());
            g.draining = keep;
            // Listed as retiring, in this exclusive section, until they are unmapped:
            // see `retire`.
            g.retiring.extend(done.iter().cloned());
            done
        };
        self.retire(&done, super::UnmapReason::Merge);
    }

    /// Unmap `regions`, which the caller moved out of the index (or out of the
    /// draining list) into `retiring` in the same exclusive section, telling the
    /// mirrors first; then take them off `retiring`.
    ///
    /// Why they stay listed: the unmap runs outside the lock, and the mirrors are told
    /// only there. An invalidation of their range that ran in between would find them
    /// neither in the index nor draining, return without telling the mirrors, and
    /// let the address-space change take effect while a GPU VM's entries still point
    /// at the old pages (pinned until this unmap): a device write there after the
    /// change is lost. Listed as retiring, the invalidation tells the mirrors about
    /// them itself before it returns (`Registry::invalidate_start`'s `stale`).
    pub(super) fn retire(&self, regions: &[Arc<Region>], why: super::UnmapReason) {
        if regions.is_empty() {
            return;
        }
        for r in regions {
            self.unmap_region(r, why);
        }
        let mut g = self.notifier.write();
        g.retiring
            .retain(|r| !regions.iter().any(|v| Arc::ptr_eq(v, r)));
    }

    /// Take `regions` out of the index (those still in it: one another path took out
    /// is that path's to unmap) and retire them whole.
    pub(super) fn retire_whole(
        &self,
        regions: impl Iterator<Item = Arc<Region>>,
        why: super::UnmapReason,
    ) {
        let out: Vec<Arc<Region>> = {
            let mut g = self.notifier.write();
            let mut out = Vec::new();
            for r in regions {
                let slot = perm_slot(r.perm);
                let here = g.maps[slot]
                    .covering(r.range.start..r.range.start + 1)
                    .is_some_and(|(_, x)| Arc::ptr_eq(x, &r));
                if here {
                    g.maps[slot].remove(r.range.start);
                    r.epoch.bump(&g);
                    // Listed as retiring until unmapped: see `retire`.
                    g.retiring.push(r.clone());
                    out.push(r);
                }
            }
            out
        };
        self.retire(&out, why);
    }

    /// Domain mappings beyond what this registry may let the domain hold with `n`
    /// more (0: room for them).
    fn domain_excess(&self, n: usize) -> usize {
        (self.driver.domain().mappings() + n).saturating_sub(self.domain_cap)
    }

    /// Evict idle regions (clock order) until `len` more bytes and `n` more mappings
    /// fit the budget, the registry's mapping limit and the domain's; when this
    /// registry has nothing idle left and the domain is still full, the other caches on
    /// the driver are asked too ([`crate::driver::Reclaim`]).
    pub(super) fn make_room(&self, len: u64, n: usize) -> Result<()> {
        let bytes_fit = || self.pinned.load(Ordering::Relaxed).saturating_add(len) <= self.budget;
        let maps_fit = || self.mappings.load(Ordering::Relaxed) + n <= self.max_mappings;
        if bytes_fit() && maps_fit() && self.domain_excess(n) == 0 {
            return Ok(());
        }
        self.reclaim_draining();
        let need_bytes =
            (self.pinned.load(Ordering::Relaxed).saturating_add(len)).saturating_sub(self.budget);
        let need_maps = (self.mappings.load(Ordering::Relaxed) + n)
            .saturating_sub(self.max_mappings)
            .max(self.domain_excess(n));
        self.evict(need_bytes, need_maps);
        let excess = self.domain_excess(n);
        if excess > 0 {
            self.driver.reclaim(0, excess);
        }
        if !bytes_fit() {
            Err(Error::PinBudget {
                len,
                budget: self.budget,
            })
        } else if !maps_fit() {
            Err(Error::TooManyMappings {
                limit: self.max_mappings,
            })
        } else if self.domain_excess(n) > 0 {
            Err(Error::TooManyMappings {
                limit: self.domain_cap,
            })
        } else {
            Ok(())
        }
    }

    /// Evict idle, unheld regions in clock order until `need_bytes` bytes and
    /// `need_maps` mappings are free (or nothing evictable is left). Returns the bytes
    /// unpinned.
    pub(super) fn evict(&self, mut need_bytes: u64, mut need_maps: usize) -> u64 {
        if need_bytes == 0 && need_maps == 0 {
            return 0;
        }
        let _section = crate::driver_section::enter();
        let _span = tracing::debug_span!("evict", need_bytes, need_maps).entered();
        let mut victims = Vec::new();
        {
            let mut g = self.notifier.write();
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
                        // A region a batch is resolving keeps its accessed bit too: it is
                        // in use, not a candidate.
                        if region.held() {
                            continue;
                        }
                        // Relaxed: see resolve.
                        if region.accessed.swap(false, Ordering::Relaxed) || !region.idle() {
                            continue;
                        }
                        g.maps[slot].remove(r.start);
                        region.epoch.bump(&g);
                        need_bytes = need_bytes.saturating_sub(region.len());
                        need_maps = need_maps.saturating_sub(region.chunks.count());
                        victims.push(region);
                    }
                    g.hands[slot] = hand;
                }
            }
            // Listed as retiring until unmapped: see `retire`.
            g.retiring.extend(victims.iter().cloned());
        }
        Stats::add(&self.stats.evictions, victims.len() as u64);
        self.retire(&victims, super::UnmapReason::Eviction);
        victims.iter().map(|v| v.len()).sum()
    }
}
