//! Submission: the read side of the notifier contract, the fast path (every
//! reference a cache hit, one shared section) and the general one (`read_retry`).

use super::region::{attach, perm_slot, Region};
use super::stats::Stats;
use super::{Registry, Userptr};
use crate::error::{Error, Result};
use crate::submitter::Submitter;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Registry {
    /// Submit the commands `build` makes from the device addresses of `refs` (in
    /// order), as one batch, on `q`. Follows the read side of the notifier protocol:
    /// it never submits with a stale pin, retrying when an invalidation hits a
    /// referenced region between its lookup and the commit. `build` may run under the
    /// shared notifier lock: it must not call back into the registry.
    pub fn submit<Q, F>(&self, q: &Q, refs: &[&Userptr], build: F) -> Result<Q::Fence>
    where
        Q: Submitter,
        F: Fn(&[u64]) -> Vec<Q::Command>,
    {
        let _section = crate::driver_section::enter();
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let inner = &*self.inner;
        if !inner.cfg.validate {
            if let Some(r) = self.submit_all_hits(q, refs, &build) {
                return r;
            }
        }
        let mut resolved = Vec::with_capacity(refs.len());
        let mut iovas = Vec::with_capacity(refs.len());
        loop {
            resolved.clear();
            iovas.clear();
            for u in refs {
                let (r, seq) = self.resolve(u)?;
                iovas.push(r.iova + (u.addr - r.range.start));
                resolved.push((r, seq));
            }
            let descs = build(&iovas);
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
            match full {
                // Wait for room outside the lock, then start over (the pins may have
                // been invalidated meanwhile).
                Some(n) => q.wait_for_room(n)?,
                None => Stats::add(&inner.stats.retries, 1),
            }
        }
    }

    /// The fast path of `submit`: when every reference is a cache hit, look them up,
    /// write the descriptors and attach the fence in *one* shared section. No
    /// invalidation can run inside it (it needs the exclusive side), so the epochs
    /// read here cannot move before the commit and no `read_retry` is needed. `None`
    /// sends the caller to the general path (a miss, or a full ring).
    pub(super) fn submit_all_hits<Q, F>(
        &self,
        q: &Q,
        refs: &[&Userptr],
        build: &F,
    ) -> Option<Result<Q::Fence>>
    where
        Q: Submitter,
        F: Fn(&[u64]) -> Vec<Q::Command>,
    {
        let inner = &*self.inner;
        let g = inner.notifier.read();
        let mut hits: Vec<&Arc<Region>> = Vec::with_capacity(refs.len());
        let mut iovas = Vec::with_capacity(refs.len());
        for u in refs {
            let (_, r) = g.maps[perm_slot(u.perm)].covering(u.pages.clone())?;
            // Relaxed: under the shared lock, which orders it after the downgrade's
            // exclusive section that set it; the general path waits for it to clear.
            if r.perm_pending.load(Ordering::Relaxed) {
                return None;
            }
            iovas.push(r.iova + (u.addr - r.range.start));
            hits.push(r);
        }
        let descs = build(&iovas);
        if descs.len() > q.capacity() {
            return Some(Err(Error::RingFull {
                ring: q.queue_id(),
                size: q.capacity() as u32,
            }));
        }
        let (f, seqno) = match q.try_submit(&descs) {
            Ok(x) => x,
            Err(Error::RingFull { .. }) => return None,
            Err(e) => return Some(Err(e)),
        };
        let queue = q.tracker();
        for r in hits {
            // Relaxed: the clock bit is a hint for eviction.
            r.accessed.store(true, Ordering::Relaxed);
            attach(r, &queue, seqno);
        }
        Stats::add(&inner.stats.hits, refs.len() as u64);
        Some(Ok(f))
    }
}
