//! The userptr registry: the userspace equivalent of the kernel's
//! `mmu_interval_notifier` plus a registration (pin) cache.
//!
//! * A [`Userptr`] is a registration: a virtual range and the device permissions the
//!   application asked for. It is resolved, on every submission, to a **region**: a
//!   pinned, IOVA-mapped range of one permission. Regions of one permission never
//!   overlap; a registration over, next to, or partly over existing regions pins their
//!   union and retires them (*merge*), so the mapping count stays low.
//! * Regions outlive submissions (lazy unpin) until an invalidation or an eviction
//!   (clock/LRU under a pinned-bytes budget and the domain's mapping-count limit;
//!   regions with device work in flight are never evicted).
//! * Submission and invalidation follow the protocol written down in [`notifier`]:
//!   a cache hit snapshots the region's epoch under the shared lock and re-checks it
//!   with `read_retry` before it writes the descriptors and attaches the fence; a miss
//!   pins outside every lock. Invalidation opens a window (no new mapping of the range
//!   until it closes), bumps epochs under the exclusive lock, waits for the fences of
//!   in-flight work (bounded: on timeout the device is reset, so that work completes
//!   with `Aborted`), then unmaps.
//! * A fresh pin is checked against the invalidations that *started* while it was
//!   being taken ([`notifier::InvalidationLog`]: a generation and a short log of
//!   ranges, under the same lock), so a pin that raced an invalidation is dropped and
//!   retaken, never installed stale. `driver/tests/loom_registry.rs` model-checks both
//!   paths, the fence wait and eviction.
//! * Causes carry context and the policy uses it (see [`Cause`]).

pub mod interval;
pub mod notifier;
mod stats;
pub mod validate;

pub use stats::{Stats, StatsSnapshot, CAUSE_NAMES};

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::submitter::{FenceTracker, Submitter};
use interval::IntervalMap;
use notifier::{Epoch, InvalidationLog, Notifier, WindowId};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// Why a range is being invalidated. The policy depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `munmap` (or `mmap(MAP_FIXED)`, `brk` shrink, `shmdt`): the pages go away.
    Unmap,
    /// A destructive `madvise`: `MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`.
    Discard,
    /// `mremap` moved the range to `to` (0: the kernel chose). The old range is
    /// dropped like an unmap: the pages now live at `to`, and registrations there pin
    /// them on their next use (eagerly re-pinning a destination nobody may use would
    /// only spend pins). With `MREMAP_FIXED`, whatever was mapped at the destination
    /// goes away too: the monitors report that range separately, as [`Cause::Unmap`].
    Remap { to: u64 },
    /// `mprotect` to `new_prot` (`PROT_*` bits). Write removed: the device mapping
    /// becomes read-only before the call returns. `PROT_NONE`: invalidated. Write
    /// added: downgraded regions get write back, nothing is unpinned.
    Protect { new_prot: i32 },
    /// The process forked. The parent keeps its pages (see [`crate::fork`]): nothing
    /// to do.
    Fork,
    /// Teardown: the application or the registry releases the range.
    Release,
}

impl Cause {
    /// Index into [`CAUSE_NAMES`] and the per-cause counters.
    pub fn index(&self) -> usize {
        match self {
            Cause::Unmap => 0,
            Cause::Discard => 1,
            Cause::Remap { .. } => 2,
            Cause::Protect { .. } => 3,
            Cause::Fork => 4,
            Cause::Release => 5,
        }
    }
}

/// What an invalidation does to the regions it overlaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Nothing (fork in the parent).
    Nothing,
    /// Give downgraded regions their write permission back (protection upgrade).
    Restore,
    /// Make writable regions device-read-only (protection downgrade).
    Downgrade,
    /// Unmap and unpin; the parts outside the range are re-mapped (split).
    Drop,
}

fn policy(cause: Cause) -> Action {
    match cause {
        Cause::Fork => Action::Nothing,
        Cause::Protect { new_prot } if new_prot & (libc::PROT_READ | libc::PROT_WRITE) == 0 => {
            Action::Drop
        }
        Cause::Protect { new_prot } if new_prot & libc::PROT_WRITE == 0 => Action::Downgrade,
        Cause::Protect { .. } => Action::Restore,
        Cause::Unmap | Cause::Discard | Cause::Remap { .. } | Cause::Release => Action::Drop,
    }
}

/// Registry settings.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Most bytes pinned at once (soft: concurrent pins may overshoot by one region).
    /// Default: RLIMIT_MEMLOCK, or a quarter of RAM with CAP_IPC_LOCK / no limit.
    pub pin_budget: Option<u64>,
    /// Most regions mapped at once. Default: the domain's limit less 64 (kept for
    /// ring memory and direct mappings).
    pub max_mappings: Option<usize>,
    /// How long an invalidation waits for in-flight work before resetting the device.
    pub fence_timeout: Duration,
    /// Split partially invalidated regions (re-map the surviving parts) instead of
    /// dropping them whole.
    pub split: bool,
    /// Validation mode: on every cache hit, check via `/proc/self/pagemap` that the
    /// pinned pages are still the ones the process maps (root only; a debugging aid).
    pub validate: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            pin_budget: None,
            max_mappings: None,
            fence_timeout: Duration::from_secs(5),
            split: true,
            validate: false,
        }
    }
}

fn default_budget() -> u64 {
    let limit = crate::proc_status::memlock_limit();
    let cap_ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 14/* CAP_IPC_LOCK */) != 0);
    if limit == u64::MAX || cap_ipc_lock {
        let ram = rustix::system::sysinfo().totalram as u64;
        (ram / 4).max(limit.min(ram))
    } else {
        limit
    }
}

/// A submission the device may still be working on.
#[derive(Clone, Debug)]
struct InFlight {
    queue: Weak<dyn FenceTracker>,
    seqno: u64,
}

impl InFlight {
    fn done(&self) -> bool {
        self.queue.upgrade().is_none_or(|q| q.is_done(self.seqno))
    }
}

/// Attach a submission's fence to a region it references. A ring completes in order,
/// so per queue only the latest seqno matters: the list stays one entry per queue.
fn attach(r: &Region, queue: &Weak<dyn FenceTracker>, seqno: u64) {
    let mut fl = r.inflight.lock().expect("inflight lock poisoned");
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
struct Region {
    range: Range<u64>,
    perm: Perm,
    iova: u64,
    epoch: Epoch,
    downgraded: AtomicBool,
    /// Set (with `downgraded`) when a downgrade starts, cleared once the device
    /// mapping is read-only: until then a cache hit waits instead of submitting.
    perm_pending: AtomicBool,
    accessed: AtomicBool,
    inflight: Mutex<Vec<InFlight>>,
    pfns: Option<Vec<u64>>,
}

impl Region {
    fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    fn idle(&self) -> bool {
        let mut f = self.inflight.lock().expect("inflight lock poisoned");
        f.retain(|x| !x.done());
        f.is_empty()
    }

    /// The fences of the work that may still reach the region. Copied, not taken: a
    /// concurrent invalidation overlapping the same region must wait for them too.
    fn inflight(&self) -> Vec<InFlight> {
        self.inflight
            .lock()
            .expect("inflight lock poisoned")
            .clone()
    }

    /// Wait (outside every lock) until a downgrade in progress has made the device
    /// mapping read-only.
    fn wait_perm(&self) {
        // Acquire: pairs with the Release store after set_perm.
        while self.perm_pending.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

fn perm_slot(p: Perm) -> usize {
    match (p.read(), p.write()) {
        (true, false) => 0,
        (false, true) => 1,
        _ => 2,
    }
}

/// What the notifier lock protects.
#[derive(Default)]
struct Index {
    maps: [IntervalMap<Arc<Region>>; 3],
    /// Retired by a merge: out of the maps, unmapped once their work is done.
    draining: Vec<Arc<Region>>,
    /// Retired by an invalidation in progress (out of the maps, waited for, then
    /// unmapped by that invalidation): a concurrent invalidation overlapping them
    /// waits for their fences too.
    retiring: Vec<Arc<Region>>,
    /// Invalidations started so far, and the ranges of the most recent ones.
    invalidations: InvalidationLog,
    /// Clock hands for eviction, per map.
    hands: [u64; 3],
}

struct Inner {
    driver: Driver,
    notifier: Notifier<Index>,
    cfg: RegistryConfig,
    budget: u64,
    max_mappings: usize,
    pinned: AtomicU64,
    mappings: AtomicUsize,
    stats: Stats,
    /// Lowest start and highest end of any range ever pinned (never shrinks until
    /// `clear`): the lock-free "could this touch a registered range" pre-check.
    lo: AtomicU64,
    hi: AtomicU64,
    observers: Mutex<Vec<Arc<dyn RegionObserver>>>,
}

/// The userptr registry of one driver. Cheap to clone (shared).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("pinned", &self.pinned_bytes())
            .field("mappings", &self.mappings())
            .finish_non_exhaustive()
    }
}

/// A registration: a range of process memory the device may access with `perm`.
/// Resolved to a pinned mapping at each submission; cheap to keep around.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Userptr {
    addr: u64,
    len: u64,
    perm: Perm,
    pages: Range<u64>,
}

impl Userptr {
    /// Host address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: zero-length registrations are refused.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Device permissions.
    pub fn perm(&self) -> Perm {
        self.perm
    }
}

/// Told about every region the registry pins (after it is installed), so that a
/// monitor can start watching its range (userfaultfd registers it, for example).
/// Called outside every registry lock, on the thread that pinned.
pub trait RegionObserver: Send + Sync {
    /// `range` (whole pages) was pinned and mapped.
    fn pinned(&self, range: Range<u64>);
}

/// A live region as [`Registry::regions`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Host virtual range (whole pages).
    pub range: Range<u64>,
    /// The permission registrations asked for.
    pub perm: Perm,
    /// Device address of `range.start`.
    pub iova: u64,
    /// Made device-read-only by a protection downgrade.
    pub device_read_only: bool,
}

/// An open invalidation (between `invalidate_start` and `invalidate_end`).
#[derive(Debug)]
#[must_use = "call invalidate_end once the address-space change is done"]
pub struct Invalidation {
    window: Option<WindowId>,
    range: Range<u64>,
}

impl Invalidation {
    /// The page-aligned range being invalidated.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }
}

fn page_range(addr: u64, len: u64) -> Result<Range<u64>> {
    if len == 0 {
        return Err(Error::ZeroLength { addr });
    }
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(PAGE))
        .ok_or(Error::Overflow { addr, len })?;
    Ok(addr & !(PAGE - 1)..end)
}

impl Registry {
    /// A registry over `driver`'s device.
    pub fn new(driver: Driver, cfg: RegistryConfig) -> Registry {
        // Whatever the domain, a fork child must find the registry fenced off.
        crate::fork::install();
        let budget = cfg.pin_budget.unwrap_or_else(default_budget);
        let max_mappings = cfg
            .max_mappings
            .unwrap_or_else(|| driver.domain().max_mappings().saturating_sub(64).max(1));
        Registry {
            inner: Arc::new(Inner {
                driver,
                notifier: Notifier::new(Index::default()),
                cfg,
                budget,
                max_mappings,
                pinned: AtomicU64::new(0),
                mappings: AtomicUsize::new(0),
                stats: Stats::default(),
                lo: AtomicU64::new(u64::MAX),
                hi: AtomicU64::new(0),
                observers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The driver.
    pub fn driver(&self) -> &Driver {
        &self.inner.driver
    }

    /// The pin budget in bytes.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// The most regions the registry keeps mapped at once: the domain's mapping limit
    /// (VFIO: `dma_entry_limit`) less 64 kept for the driver's own ring memory,
    /// unless [`RegistryConfig::max_mappings`] says otherwise.
    pub fn max_mappings(&self) -> usize {
        self.inner.max_mappings
    }

    /// Bytes pinned by the registry now.
    pub fn pinned_bytes(&self) -> u64 {
        // Relaxed: a reading for display and tests.
        self.inner.pinned.load(Ordering::Relaxed)
    }

    /// Regions mapped now.
    pub fn mappings(&self) -> usize {
        self.inner.mappings.load(Ordering::Relaxed)
    }

    /// Add an observer of newly pinned regions (see [`RegionObserver`]).
    pub fn add_observer(&self, o: Arc<dyn RegionObserver>) {
        self.inner
            .observers
            .lock()
            .expect("observers lock poisoned")
            .push(o);
    }

    /// Whether `range` may overlap a registered range. Lock-free and allocation-free
    /// (safe to call from a signal handler); false positives are possible, false
    /// negatives are not.
    pub fn may_overlap(&self, range: &Range<u64>) -> bool {
        // Acquire: pairs with the Release updates in `pin`, which happen before the
        // region is installed; a check that misses them also misses the region.
        let lo = self.inner.lo.load(Ordering::Acquire);
        let hi = self.inner.hi.load(Ordering::Acquire);
        range.start < hi && lo < range.end
    }

    /// The live regions (pinned mappings), ascending by address within each
    /// permission: for inspection, tests and the tool.
    pub fn regions(&self) -> Vec<RegionInfo> {
        let _section = crate::driver_section::enter();
        let g = self.inner.notifier.read();
        g.maps
            .iter()
            .flat_map(|m| m.iter())
            .map(|(range, r)| RegionInfo {
                range,
                perm: r.perm,
                iova: r.iova,
                // Relaxed: a reading for display.
                device_read_only: r.downgraded.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Register `len` bytes at `addr` for device access with `perm`, pinning them now
    /// (so errors surface here) or reusing / merging cached mappings.
    pub fn register(&self, addr: usize, len: usize, perm: Perm) -> Result<Userptr> {
        let _section = crate::driver_section::enter();
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let pages = page_range(addr as u64, len as u64)?;
        let u = Userptr {
            addr: addr as u64,
            len: len as u64,
            perm,
            pages,
        };
        self.resolve(&u)?;
        Stats::add(&self.inner.stats.registrations, 1);
        Ok(u)
    }

    /// Register a slice for device reads and writes.
    pub fn register_slice<T: Copy>(&self, s: &mut [T]) -> Result<Userptr> {
        self.register(
            s.as_mut_ptr() as usize,
            std::mem::size_of_val(s),
            Perm::READ_WRITE,
        )
    }

    /// The device address of `u`'s first byte now (pinning if needed). Only meaningful
    /// until the next invalidation: submit through [`Registry::submit`], which
    /// validates it.
    pub fn iova(&self, u: &Userptr) -> Result<u64> {
        let _section = crate::driver_section::enter();
        let (r, _) = self.resolve(u)?;
        Ok(r.iova + (u.addr - r.range.start))
    }

    /// Resolve `u` to a live region covering it, and that region's epoch.
    fn resolve(&self, u: &Userptr) -> Result<(Arc<Region>, u64)> {
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

    fn still_current(&self, r: &Region, pages: &Range<u64>) -> bool {
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
    fn pin(
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
    fn map_pinned(&self, host: u64, len: u64, perm: Perm) -> Result<u64> {
        const AGAIN_TRIES: u32 = 4;
        let inner = &*self.inner;
        let mut again = 0;
        let mut evicted = false;
        loop {
            match inner.driver.map_raw(host, len, perm) {
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

    fn unmap_region(&self, r: &Region) {
        let inner = &*self.inner;
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

    /// Unmap retired regions whose device work is done.
    fn reclaim_draining(&self) {
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
            self.unmap_region(&r);
        }
    }

    /// Evict idle regions (clock order) until `len` more bytes and one more mapping fit.
    fn make_room(&self, len: u64) -> Result<()> {
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
    fn evict(&self, mut need_bytes: u64, mut need_maps: usize) -> u64 {
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
            self.unmap_region(v);
        }
        victims.iter().map(|v| v.len()).sum()
    }

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
    fn submit_all_hits<Q, F>(&self, q: &Q, refs: &[&Userptr], build: &F) -> Option<Result<Q::Fence>>
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

    /// Begin invalidating `[start, end)` for `cause`. When this returns, the device no
    /// longer uses the range (or its work failed after a device reset), and no new
    /// mapping of it can be established until [`Registry::invalidate_end`].
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
        let window = inner.notifier.open_window(range.clone());
        let mut victims = Vec::new();
        let mut downgrades = Vec::new();
        let mut others_downgrading = Vec::new();
        let mut fences = Vec::new();
        let mut survivors = Vec::new();
        {
            let mut g = inner.notifier.write();
            g.invalidations.record(range.clone());
            for slot in 0..3 {
                let hits: Vec<u64> = g.maps[slot]
                    .overlapping(range.clone())
                    .map(|(r, _)| r.start)
                    .collect();
                for s in hits {
                    if action == Action::Downgrade {
                        let (rr, r) = g.maps[slot].covering(s..s + 1).expect("hit is present");
                        if !r.perm.write() {
                            continue;
                        }
                        // A region wholly inside the range becomes device-read-only in
                        // place. One that sticks out is dropped and split instead: its
                        // outside parts must stay writable for the device.
                        if range.start <= rr.start && rr.end <= range.end {
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
            // Regions another invalidation has retired and is still waiting for.
            for r in g.retiring.iter().filter(|r| overlaps(r)) {
                fences.extend(r.inflight());
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
                }
            }
            for r in &victims {
                fences.extend(r.inflight());
            }
            g.retiring.extend(victims.iter().cloned());
        }
        let waited = self.wait_fences(&fences, &range);
        for r in &victims {
            self.unmap_region(r);
        }
        if !victims.is_empty() {
            let mut g = inner.notifier.write();
            g.retiring
                .retain(|r| !victims.iter().any(|v| Arc::ptr_eq(v, r)));
        }
        for r in &downgrades {
            match inner.driver.domain().set_perm(r.iova, r.len(), Perm::READ) {
                Ok(()) => Stats::add(&inner.stats.downgrades, 1),
                Err(e) => tracing::error!("downgrading region: {e}"),
            }
            // Release: the read-only device mapping is in place before hits proceed.
            r.perm_pending.store(false, Ordering::Release);
        }
        for r in &others_downgrading {
            r.wait_perm();
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
        waited?;
        Ok(Invalidation {
            window: Some(window),
            range,
        })
    }

    /// End an invalidation: new mappings of the range may be established again.
    pub fn invalidate_end(&self, inv: Invalidation) {
        let _section = crate::driver_section::enter();
        if let Some(w) = inv.window {
            self.inner.notifier.close_window(w);
        }
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

    fn restore(&self, range: &Range<u64>) {
        let inner = &*self.inner;
        let g = inner.notifier.read();
        for slot in 0..3 {
            for (rr, r) in g.maps[slot].overlapping(range.clone()) {
                // Only a region wholly inside the upgraded range gets write back: part
                // of one that sticks out may still be read-only in the process.
                let inside = range.start <= rr.start && rr.end <= range.end;
                // Relaxed: a flag; set_perm's own lock orders the device update.
                if inside && r.downgraded.swap(false, Ordering::Relaxed) {
                    if let Err(e) = inner.driver.domain().set_perm(r.iova, r.len(), r.perm) {
                        tracing::error!("restoring region permissions: {e}");
                    } else {
                        Stats::add(&inner.stats.restores, 1);
                    }
                }
            }
        }
    }

    /// Wait for `fences`; on timeout reset the device (queued work completes with
    /// `Aborted`) and wait again.
    fn wait_fences(&self, fences: &[InFlight], range: &Range<u64>) -> Result<()> {
        let inner = &*self.inner;
        let pending: Vec<&InFlight> = fences.iter().filter(|f| !f.done()).collect();
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
        Stats::add(&inner.stats.fence_waits, 1);
        let t0 = Instant::now();
        let deadline = t0 + inner.cfg.fence_timeout;
        let mut reset = false;
        let mut result = Ok(());
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
                        tracing::warn!(
                            "invalidation timed out waiting for the device: resetting it"
                        );
                        Stats::add(&inner.stats.device_resets, 1);
                        reset = true;
                        if let Err(e) = q.abort(inner.cfg.fence_timeout) {
                            result = Err(e);
                            break;
                        }
                    }
                    Err(e) => {
                        result = Err(Error::InvalidationFailed {
                            start: range.start,
                            end: range.end,
                            reason: e.to_string(),
                        });
                        break;
                    }
                }
            }
        }
        Stats::add(&inner.stats.wait_ns, t0.elapsed().as_nanos() as u64);
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _section = crate::driver_section::enter();
        if crate::fork::in_forked_child() {
            return; // the parent owns the pins
        }
        let g = self.notifier.write();
        let mut all: Vec<Arc<Region>> = g.draining.clone();
        for m in &g.maps {
            all.extend(m.iter().map(|(_, r)| r.clone()));
        }
        drop(g);
        for r in all {
            for f in r.inflight() {
                if let Some(q) = f.queue.upgrade() {
                    let _ = q.wait_done(f.seqno, self.cfg.fence_timeout);
                }
            }
            let _ = self.driver.unmap_raw(r.iova, r.len());
        }
    }
}
