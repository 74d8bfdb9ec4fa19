//! The userptr registry: the userspace equivalent of the kernel's
//! `mmu_interval_notifier` plus a registration (pin) cache.
//!
//! * A [`Userptr`] is a registration: a virtual range and the device permissions the
//!   application asked for. It is resolved, on every submission, to a **region**: a
//!   pinned, IOVA-mapped range of one permission. Regions of one permission never
//!   overlap; a registration over, next to, or partly over existing regions pins their
//!   union and retires them (*merge*), so the mapping count stays low. A large region
//!   is mapped as chunks (`chunks`: 2 MiB by default, inside one IOVA range), so a
//!   small invalidation inside it unmaps one chunk, which the next use re-pins, instead
//!   of the whole region.
//! * Regions outlive submissions (lazy unpin) until an invalidation or an eviction
//!   (clock/LRU under a pinned-bytes budget and the domain's mapping-count limit;
//!   regions with device work in flight are never evicted).
//! * Submission and invalidation follow the protocol written down in [`notifier`]:
//!   a cache hit snapshots the region's epoch under the shared lock, the commands are
//!   built with no lock held, and `read_retry` re-checks every epoch under the shared
//!   lock before the descriptors are written and the fence attached; a miss pins
//!   outside every lock. Invalidation opens a window (no new mapping of the range
//!   until it closes), bumps epochs under the exclusive lock, waits for the fences of
//!   in-flight work (bounded: on timeout the device is reset, so that work completes
//!   with `Aborted`), then unmaps.
//! * A fresh pin is checked against the invalidations that *started* while it was
//!   being taken ([`notifier::InvalidationLog`]: a generation and a short log of
//!   ranges, under the same lock), so a pin that raced an invalidation is dropped and
//!   retaken, never installed stale. `driver/tests/loom_registry.rs` model-checks both
//!   paths, the fence wait and eviction.
//! * Causes carry context and the policy uses it (see [`Cause`]). A permission change
//!   only ever narrows what the device may do: a downgrade takes write away (a
//!   write-only region, which would be left with nothing, is dropped instead), an
//!   upgrade gives back at most what the registration asked for.
//! * A batch is resolved as a whole: every region one of its references resolved is
//!   *held* until the batch is submitted, and eviction skips held regions, so that
//!   resolving one reference never evicts another of the same batch. A batch whose
//!   distinct pages exceed the pin budget or the mapping limit is refused at once
//!   ([`Error::BatchTooLarge`]); starting over is bounded
//!   ([`RegistryConfig::submit_retries`]).
//! * The domain is shared: besides its own limits, the registry counts every mapping
//!   the domain holds against the domain's limit less 64 (kept for ring memory and
//!   direct mappings), and when the domain runs out of slots, IOVA space or locked
//!   memory it evicts idle regions (its own first, then those of the other caches on
//!   the driver, through [`Reclaim`](crate::driver::Reclaim)), as it does for its budget.
//! * Application code never runs under a registry lock or inside a driver section: the
//!   descriptors a submission builds and the [`RegionObserver`]s are called through
//!   [`driver_section::outside`](crate::driver_section::outside), with no lock held.
//!
//! # Teardown and reset
//!
//! What happens to device work still in flight when the registry lets go of memory:
//! * **Invalidation** waits for the work that may reach the range, up to
//!   [`RegistryConfig::fence_timeout`]; then it resets the device (the work that has
//!   not started completes with `Aborted`, on every queue of the device) and waits
//!   again, bounded the same way (a command the device is executing when the reset
//!   comes finishes first). If the work still cannot be proven finished (the
//!   reset timed out, the ring stopped), `invalidate_start` returns an error, *and* the
//!   regions are unmapped anyway with their IOVA ranges quarantined: the device's late
//!   accesses fault, and the IOVAs are not handed out again until the work is proven
//!   finished (see [`crate::driver`]). The window is closed on every path out.
//! * **Teardown** (dropping the last [`Registry`] handle) does the same for everything
//!   it holds, with *one* deadline for all its waits (not one per region): wait up to
//!   `fence_timeout`, reset the device, wait up to `fence_timeout` again, then unmap
//!   every region, quarantining the IOVAs of any work still not proven finished. Work
//!   that was still queued completes `Aborted`; it never runs later into memory that
//!   a new registration got.
//! * **Eviction** only ever picks idle regions; a merge's retired regions are unmapped
//!   once idle.
//! * An open [`Invalidation`] dropped without [`Registry::invalidate_end`] ends itself.
//!
//! Files, one concept each: this one (the types: [`Registry`], [`Userptr`],
//! [`Invalidation`], the index), [`notifier`] (the contract and its primitives),
//! `cause` (the policy per cause), `config` ([`RegistryConfig`]), `region` (a pinned
//! region, its fences and holds), `chunks` (how a region is mapped in pieces), `pin` (the miss path: resolve, merge, pin, install),
//! `repin` (re-pinning the chunks a partial invalidation took),
//! `submit` (the read side), `invalidate` (the write side: retire, downgrade, wait,
//! split, restore), `evict` (clock eviction under the budget and the domain's limits),
//! `teardown` (waiting for the device, resetting it, unmapping, the registry's drop),
//! [`interval`] (the index), `stats` (the counters), [`validate`] (the PFN
//! cross-check).

mod cause;
mod chunks;
mod config;
mod evict;
pub mod interval;
mod invalidate;
pub mod mirror;
pub mod notifier;
mod pin;
mod region;
mod repin;
mod stats;
mod submit;
mod teardown;
mod userptr;
pub mod validate;

pub use cause::Cause;
pub use config::RegistryConfig;
pub use mirror::{RangeMirror, UnmapReason};

pub use stats::{Stats, StatsSnapshot, CAUSE_NAMES};
pub use userptr::Userptr;

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use config::default_budget;
use interval::IntervalMap;
use notifier::{InvalidationLog, Notifier, WindowId};
use region::Region;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Domain mapping slots no registry takes: kept for ring memory and direct mappings.
pub const RESERVED_MAPPINGS: usize = 64;

const PAGE: u64 = 4096;

/// What the notifier lock protects.
#[derive(Default)]
struct Index {
    maps: [IntervalMap<Arc<Region>>; 3],
    /// Retired by a merge: out of the maps, unmapped once their work is done.
    draining: Vec<Arc<Region>>,
    /// Out of the maps (or out of `draining`) and not unmapped yet: retired by an
    /// invalidation in progress (waited for, then unmapped by it), or by an eviction
    /// or a merge's reclaim on its way to the unmap. A concurrent invalidation
    /// overlapping them waits for their fences too and tells the mirrors about them
    /// before it returns (`Inner::retire`).
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
    /// The most mappings the whole domain may hold before this registry maps no more
    /// (its limit less [`RESERVED_MAPPINGS`]).
    domain_cap: usize,
    /// The chunk size (`RegistryConfig::chunk_size` rounded up to a power of two of
    /// at least a page; 0: no chunks) and the most chunks one region is mapped as
    /// (`chunks::geometry`).
    chunk: u64,
    chunk_cap: usize,
    pinned: AtomicU64,
    mappings: AtomicUsize,
    stats: Stats,
    /// Lowest start and highest end of any range ever pinned (never shrinks until
    /// `clear`): the lock-free "could this touch a registered range" pre-check.
    lo: AtomicU64,
    hi: AtomicU64,
    observers: Mutex<Vec<(u64, Arc<dyn RegionObserver>)>>,
    next_observer: AtomicU64,
    /// Device-side mirrors, told before a region's mapping goes away (`mirror`).
    mirrors: Mutex<Vec<std::sync::Weak<dyn RangeMirror>>>,
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

/// Told about every region the registry pins (after it is installed), so that a
/// monitor can start watching its range (userfaultfd registers it, for example).
/// Called outside every registry lock and outside the driver section (an observer may
/// be application code: its address-space calls are monitored), on the thread that
/// pinned.
pub trait RegionObserver: Send + Sync {
    /// `range` (whole pages) was pinned and mapped.
    fn pinned(&self, range: Range<u64>);
}

/// An observer's registration, for [`Registry::remove_observer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObserverId(u64);

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
    /// Host ranges of the region's chunks that a partial invalidation unmapped and no
    /// use has re-pinned yet (ascending): the device reaches nothing there until then.
    pub missing: Vec<Range<u64>>,
}

impl RegionInfo {
    /// The largest part of the region around `within` (which must lie in it) that has
    /// no missing chunk: where the device can reach the memory now.
    pub fn mapped_run(&self, within: &Range<u64>) -> Range<u64> {
        let mut run = self.range.clone();
        for m in &self.missing {
            if m.end <= within.start {
                run.start = run.start.max(m.end);
            } else if within.end <= m.start {
                run.end = run.end.min(m.start);
            }
        }
        run
    }
}

/// An open invalidation (between `invalidate_start` and `invalidate_end`). Dropping
/// it ends it, as [`Registry::invalidate_end`] does.
#[must_use = "call invalidate_end once the address-space change is done (dropping it ends it too)"]
pub struct Invalidation {
    window: Option<WindowId>,
    range: Range<u64>,
    /// The registry whose window it holds (weakly: an open invalidation does not keep
    /// a registry alive).
    owner: Weak<Inner>,
}

impl Invalidation {
    /// The page-aligned range being invalidated.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }
}

impl std::fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidation")
            .field(
                "range",
                &format_args!("{:#x}..{:#x}", self.range.start, self.range.end),
            )
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        if let Some(w) = self.window.take() {
            if let Some(inner) = self.owner.upgrade() {
                inner.notifier.close_window(w);
            }
        }
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
        let domain_cap = driver
            .domain()
            .max_mappings()
            .saturating_sub(RESERVED_MAPPINGS)
            .max(1);
        let max_mappings = cfg.max_mappings.unwrap_or(domain_cap).clamp(1, domain_cap);
        let chunk = match cfg.chunk_size {
            0 => 0,
            c => c.max(PAGE).checked_next_power_of_two().unwrap_or(1 << 63),
        };
        let inner = Arc::new(Inner {
            driver,
            notifier: Notifier::new(Index::default()),
            cfg,
            budget,
            max_mappings,
            domain_cap,
            chunk,
            chunk_cap: max_mappings / 32,
            pinned: AtomicU64::new(0),
            mappings: AtomicUsize::new(0),
            stats: Stats::default(),
            lo: AtomicU64::new(u64::MAX),
            hi: AtomicU64::new(0),
            observers: Mutex::new(Vec::new()),
            next_observer: AtomicU64::new(0),
            mirrors: Mutex::new(Vec::new()),
        });
        // When the domain runs out, the driver (or another registry on it) may ask
        // this one for its idle regions.
        let weak: Weak<dyn crate::driver::Reclaim> = Arc::downgrade(&inner) as Weak<_>;
        inner.driver.add_reclaimer(weak);
        Registry { inner }
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
    /// (VFIO: `dma_entry_limit`) less [`RESERVED_MAPPINGS`] kept for the driver's own
    /// ring memory and direct mappings, unless [`RegistryConfig::max_mappings`] says
    /// less. (Every mapping of the domain counts against that limit too.)
    pub fn max_mappings(&self) -> usize {
        self.inner.max_mappings
    }

    /// Bytes pinned by the registry now.
    pub fn pinned_bytes(&self) -> u64 {
        // Relaxed: a reading for display and tests.
        self.inner.pinned.load(Ordering::Relaxed)
    }

    /// IOMMU mappings the registry holds now: one per mapped chunk of each region (a
    /// region larger than [`RegistryConfig::chunk_size`] is mapped as several).
    pub fn mappings(&self) -> usize {
        self.inner.mappings.load(Ordering::Relaxed)
    }

    /// Add an observer of newly pinned regions (see [`RegionObserver`]); remove it
    /// with [`Registry::remove_observer`].
    pub fn add_observer(&self, o: Arc<dyn RegionObserver>) -> ObserverId {
        // Relaxed: a unique number, nothing is published through it.
        let id = self.inner.next_observer.fetch_add(1, Ordering::Relaxed);
        crate::driver_section::lock(&self.inner.observers).push((id, o));
        ObserverId(id)
    }

    /// Remove an observer [`Registry::add_observer`] added. Returns whether it was
    /// there. Once this returns, pins that start later do not call it (one in progress
    /// may still).
    pub fn remove_observer(&self, id: ObserverId) -> bool {
        let mut v = crate::driver_section::lock(&self.inner.observers);
        let before = v.len();
        v.retain(|(i, _)| *i != id.0);
        v.len() != before
    }

    /// Observers registered now.
    pub fn observers(&self) -> usize {
        crate::driver_section::lock(&self.inner.observers).len()
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
                missing: (0..r.chunks.count())
                    .filter(|&k| !r.chunks.is_present(k))
                    .map(|k| r.chunks.range_of(k))
                    .collect(),
            })
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Register `len` bytes at `addr` for device access with `perm`, pinning them now
    /// (so errors surface here) or reusing / merging cached mappings. By address: the
    /// registration borrows nothing, and dropping it leaves the pin cached. Prefer
    /// [`Registry::register_slice`] / [`Registry::register_slice_ref`], which borrow the
    /// buffer for the registration's life.
    ///
    /// # Safety
    ///
    /// From this call until the range is unregistered ([`Registry::unregister`],
    /// [`Registry::clear`], an invalidation covering it, the registry's drop; dropping
    /// the `Userptr` is not one: the pin stays cached) — and, for every submission that
    /// references the registration, until that submission completes:
    /// * the range stays mapped in the process with the same pages, **unless** this
    ///   registry is told before each change: a monitor installed on it (seccomp,
    ///   userfaultfd, `LD_PRELOAD`) or an explicit [`Registry::invalidate_start`] by
    ///   the caller. Then the application may `munmap`, `madvise(MADV_DONTNEED)`,
    ///   `mremap`, `mprotect` or `free` registered memory: the monitor invalidates the
    ///   range first, waiting for the device work that may reach it;
    /// * the program does not access it in a way that races the device's access
    ///   `perm` allows: with [`Perm::WRITE`], no reference to it is held and nothing
    ///   reads or writes it while a submission that may write it runs; with
    ///   [`Perm::READ`], nothing writes it while a submission that may read it runs.
    ///   Waiting for the submission's fence ends its access.
    ///
    /// The bytes of the first and last page outside `addr..addr + len` are pinned and
    /// mapped too (the IOMMU maps whole pages): the same rules hold for them for every
    /// command that reaches them.
    pub unsafe fn register(&self, addr: usize, len: usize, perm: Perm) -> Result<Userptr<'static>> {
        self.register_range(addr as u64, len as u64, perm, false)
    }

    /// Register a slice for device reads and writes ([`Perm::READ_WRITE`]). The
    /// registration borrows the slice mutably while it lives: the program cannot read,
    /// write or free it meanwhile. Dropping it unregisters the range (an invalidation
    /// with [`Cause::Release`], waiting for the device work that may reach it), so no
    /// device access outlives the borrow; [`Registry::unregister`] does the same and
    /// reports the error.
    ///
    /// The device may write any bytes: `T` must be valid for every bit pattern
    /// ([`bytemuck::AnyBitPattern`]) and, since the device also reads it, have no
    /// padding ([`bytemuck::NoUninit`]).
    pub fn register_slice<'a, T>(&self, s: &'a mut [T]) -> Result<Userptr<'a>>
    where
        T: bytemuck::AnyBitPattern + bytemuck::NoUninit,
    {
        let len = std::mem::size_of_val(s) as u64;
        self.register_range(s.as_mut_ptr() as u64, len, Perm::READ_WRITE, true)
    }

    /// Register a slice for device reads only ([`Perm::READ`]: a device write faults).
    /// The registration borrows the slice (shared) while it lives: the program may
    /// read it meanwhile, not write it. Dropped, it unregisters like
    /// [`Registry::register_slice`]'s. `T` must have no padding
    /// ([`bytemuck::NoUninit`]); its `Copy` bound rules out interior mutability.
    pub fn register_slice_ref<'a, T>(&self, s: &'a [T]) -> Result<Userptr<'a>>
    where
        T: bytemuck::NoUninit,
    {
        let len = std::mem::size_of_val(s) as u64;
        self.register_range(s.as_ptr() as u64, len, Perm::READ, true)
    }

    fn register_range<'a>(
        &self,
        addr: u64,
        len: u64,
        perm: Perm,
        unregister_on_drop: bool,
    ) -> Result<Userptr<'a>> {
        let _section = crate::driver_section::enter();
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let pages = page_range(addr, len)?;
        let mut u = Userptr {
            addr,
            len,
            perm,
            pages,
            owner: Arc::downgrade(&self.inner),
            // Not before it is registered: a failed registration has nothing to undo.
            unregister_on_drop: false,
            _buffer: PhantomData,
        };
        drop(self.resolve(&u)?);
        u.unregister_on_drop = unregister_on_drop;
        Stats::add(&self.inner.stats.registrations, 1);
        Ok(u)
    }

    /// Unregister `u`: its range (whole pages) is invalidated with [`Cause::Release`],
    /// which waits for the device work that may reach it, then unmaps and unpins it.
    /// Other registrations sharing those pages lose their cached pin too and pin again
    /// on their next use. What dropping a registration that borrows its buffer does,
    /// with the error reported: on an error the range is unmapped all the same (see
    /// [`Registry::invalidate_start`]).
    ///
    /// [`Error::ForeignUserptr`] if another registry made `u` (then dropping it does
    /// what its own registry's unregistration does).
    pub fn unregister(&self, mut u: Userptr<'_>) -> Result<()> {
        if !u.made_by(&self.inner) {
            return Err(Error::ForeignUserptr {
                addr: u.addr,
                len: u.len,
            });
        }
        u.unregister_on_drop = false;
        self.release(&u)
    }

    /// The unregistration itself.
    fn release(&self, u: &Userptr<'_>) -> Result<()> {
        self.invalidate(u.pages.clone(), Cause::Release)
    }

    /// Refuse a registration another registry made.
    fn check_owner(&self, u: &Userptr<'_>) -> Result<()> {
        if u.made_by(&self.inner) {
            Ok(())
        } else {
            Err(Error::ForeignUserptr {
                addr: u.addr,
                len: u.len,
            })
        }
    }

    /// The device address of `u`'s first byte now (pinning if needed). Only meaningful
    /// until the next invalidation: submit through [`Registry::submit`], which
    /// validates it.
    pub fn iova(&self, u: &Userptr<'_>) -> Result<u64> {
        let _section = crate::driver_section::enter();
        self.check_owner(u)?;
        let (r, _) = self.resolve(u)?;
        Ok(r.iova + (u.addr - r.range.start))
    }
}

impl Inner {
    /// How a new region over `range` is mapped.
    fn chunks_for(&self, range: &Range<u64>) -> chunks::Chunks {
        chunks::Chunks::new(range.clone(), self.chunk, self.chunk_cap)
    }
}

impl crate::driver::Reclaim for Inner {
    fn reclaim(&self, bytes: u64, mappings: usize) -> bool {
        self.evict(bytes, mappings) > 0
    }
}
