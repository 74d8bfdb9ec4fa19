//! Submission: the read side of the notifier contract. Resolve every reference (the
//! fast path: all cache hits, in one shared section; else one by one, pinning what
//! misses), holding each region it resolved; build the commands outside every lock and
//! outside the driver section; then, under the shared lock, `read_retry` every region
//! and only then submit and attach the fence.

use super::region::{attach, perm_slot, Held};
use super::stats::Stats;
use super::{Registry, Userptr};
use crate::error::{Error, Result};
use crate::iommu::IommuDomain;
use crate::submitter::Submitter;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Whether two handles name the same domain (the data pointers: vtable pointers of
/// one type may differ between codegen units).
fn same_domain(a: &Arc<dyn IommuDomain>, b: &Arc<dyn IommuDomain>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Registry {
    /// Submit the commands `build` makes from the device addresses of `refs` (in
    /// order), as one batch, on `q`. Follows the read side of the notifier protocol:
    /// it never submits with a stale pin, starting over when an invalidation hits a
    /// referenced region between its lookup and the commit.
    ///
    /// `build` is application code: it runs outside every registry lock and outside
    /// the driver section (its address-space calls are monitored; it may call back
    /// into the registry, invalidate its own buffers included). It **may run more than
    /// once**: when the registry starts over, it builds again from the new addresses;
    /// only the commands of the last run are submitted.
    ///
    /// Errors, besides the pin errors: [`Error::ForeignQueue`] if `q`'s device does not
    /// translate through this registry's domain; [`Error::ForeignUserptr`] if another
    /// registry made one of `refs` (its unregistration would not wait for this
    /// submission); [`Error::BatchTooLarge`] at once if
    /// the distinct pages of `refs` exceed the pin budget or the mapping limit (the
    /// batch would have to evict its own buffers); [`Error::TooManyRetries`] after
    /// [`RegistryConfig::submit_retries`](super::RegistryConfig::submit_retries)
    /// starts over.
    pub fn submit<Q, F>(&self, q: &Q, refs: &[&Userptr<'_>], build: F) -> Result<Q::Fence>
    where
        Q: Submitter,
        F: Fn(&[u64]) -> Vec<Q::Command>,
    {
        let _section = crate::driver_section::enter();
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let inner = &*self.inner;
        if !same_domain(q.domain(), inner.driver.domain()) {
            return Err(Error::ForeignQueue {
                queue: q.queue_id(),
            });
        }
        for u in refs {
            self.check_owner(u)?;
        }
        self.check_fits(refs)?;
        let mut trimmed = false;
        let mut retries = 0;
        loop {
            let resolved = match self.resolve_batch(refs) {
                Ok(r) => r,
                // The batch fits the limits (checked above), but not beside the regions
                // its own references hit (cached regions larger than it needs, merged
                // neighbours): once, evict every idle region, its own included, and
                // resolve it afresh at its own size.
                Err(Error::PinBudget { .. } | Error::TooManyMappings { .. }) if !trimmed => {
                    trimmed = true;
                    Stats::add(&inner.stats.trims, 1);
                    inner.evict(u64::MAX, usize::MAX);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let iovas: Vec<u64> = refs
                .iter()
                .zip(&resolved)
                .map(|(u, (r, _))| r.iova + (u.addr - r.range.start))
                .collect();
            let descs = crate::driver_section::outside(|| build(&iovas));
            if descs.len() > q.capacity() {
                return Err(Error::RingFull {
                    ring: q.queue_id(),
                    size: q.capacity() as u32,
                });
            }
            let full = {
                let g = inner.notifier.read();
                let stale = resolved
                    .iter()
                    .any(|(r, seq)| inner.notifier.read_retry(&g, &r.epoch, *seq));
                if stale {
                    None
                } else {
                    match q.try_submit(&descs) {
                        Ok((f, seqno)) => {
                            let queue = q.tracker();
                            for (r, _) in &resolved {
                                attach(r, &queue, seqno);
                            }
                            return Ok(f);
                        }
                        Err(Error::RingFull { .. }) => Some(descs.len()),
                        Err(e) => return Err(e),
                    }
                }
            };
            // Let go of the regions before waiting for anything.
            drop(resolved);
            if retries >= inner.cfg.submit_retries {
                return Err(Error::TooManyRetries {
                    what: "a submission",
                    retries,
                });
            }
            retries += 1;
            match full {
                // Wait for room outside the lock, then start over (the pins may have
                // been invalidated meanwhile).
                Some(n) => q.wait_for_room(n)?,
                None => Stats::add(&inner.stats.retries, 1),
            }
        }
    }

    /// Refuse, before pinning anything, a batch whose distinct pages exceed the pin
    /// budget or whose buffers need more mappings than the registry keeps: resolving
    /// it would evict its own references.
    fn check_fits(&self, refs: &[&Userptr<'_>]) -> Result<()> {
        let inner = &*self.inner;
        let max_len = inner.driver.domain().max_mapping_len().max(1);
        let (mut need, mut mappings) = (0u64, 0usize);
        for slot in 0..3 {
            let mut pages: Vec<Range<u64>> = refs
                .iter()
                .filter(|u| perm_slot(u.perm) == slot)
                .map(|u| u.pages.clone())
                .collect();
            pages.sort_by_key(|r| r.start);
            // Overlapping or touching ranges may share a region.
            let mut runs: Vec<Range<u64>> = Vec::new();
            for p in pages {
                match runs.last_mut() {
                    Some(last) if p.start <= last.end => last.end = last.end.max(p.end),
                    _ => runs.push(p),
                }
            }
            for r in runs {
                let len = r.end - r.start;
                need = need.saturating_add(len);
                // As many mappings as its regions are mapped as (their chunks).
                let n = super::chunks::geometry(&r, inner.chunk, inner.chunk_cap).2;
                mappings = mappings.saturating_add(n.max(len.div_ceil(max_len) as usize));
            }
        }
        if need > inner.budget || mappings > inner.max_mappings {
            return Err(Error::BatchTooLarge {
                need,
                budget: inner.budget,
                mappings,
                max_mappings: inner.max_mappings,
            });
        }
        Ok(())
    }

    /// Every reference resolved, held, with its epoch: the fast path if every one is a
    /// cache hit, else one by one.
    fn resolve_batch(&self, refs: &[&Userptr<'_>]) -> Result<Vec<(Held, u64)>> {
        if !self.inner.cfg.validate {
            if let Some(hits) = self.lookup_all_hits(refs) {
                return Ok(hits);
            }
        }
        refs.iter().map(|u| self.resolve(u)).collect()
    }

    /// The fast path: when every reference is a cache hit, look them all up, hold them
    /// and snapshot their epochs in *one* shared section. `None` sends the caller to
    /// the general path (a miss, or a downgrade in progress, which it waits for).
    pub(super) fn lookup_all_hits(&self, refs: &[&Userptr<'_>]) -> Option<Vec<(Held, u64)>> {
        let inner = &*self.inner;
        let g = inner.notifier.read();
        let mut hits = Vec::with_capacity(refs.len());
        for u in refs {
            let (_, r) = g.maps[perm_slot(u.perm)].covering(u.pages.clone())?;
            // Relaxed: under the shared lock, which orders it after the downgrade's
            // exclusive section that set it; the general path waits for it to clear.
            if r.perm_pending.load(Ordering::Relaxed) {
                return None;
            }
            // A chunk a partial invalidation took: the general path re-pins it.
            if !r.chunks.present(&u.pages) {
                return None;
            }
            hits.push((Held::new(r), r.epoch.get()));
        }
        drop(g);
        for (r, _) in &hits {
            // Relaxed: the clock bit is a hint for eviction.
            r.accessed.store(true, Ordering::Relaxed);
        }
        Stats::add(&inner.stats.hits, refs.len() as u64);
        Some(hits)
    }
}
