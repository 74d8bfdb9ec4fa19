//! proptest: the registry's interval index, merge, split and invalidation policy
//! against a naive model, on the reference device with real pins.
//!
//! The model is a list of regions per permission (read, write, read-write), in pages of
//! one test buffer, updated by the rules `driver/src/registry/mod.rs` promises:
//!
//! * **register** `[a, b)` with `P`: a hit (one `P` region covers every page of it)
//!   changes nothing. A miss pins one new `P` region: the union of the registration's
//!   pages and every live `P` region that is not device-read-only and overlaps *or
//!   touches* them (the merge probe is one byte wider on each side), and retires those
//!   regions. A device-read-only `P` region (write-protected memory) is never widened
//!   into a writable one: if the union overlaps it, it is retired and its pages outside
//!   the union come back as device-read-only regions. The union is limited
//!   by the domain's mapping length and the pin budget; both are far above the test
//!   buffer (asserted), so the union is always taken. The new region is not
//!   device-read-only.
//! * **chunks** (the registry runs with 4-page chunks here, so both kinds of region
//!   occur): a region of more than 4 pages is mapped as aligned 4-page chunks (the
//!   buffer starts on a chunk boundary), one of at most 4 pages as one mapping. A
//!   registration that one region covers but that touches chunks of it a partial
//!   invalidation took re-pins exactly those (a miss, the regions otherwise unchanged).
//! * **invalidate** `[a, b)` (rounded out to pages), per cause:
//!   - unmap, discard, remap, release, `mprotect` without read and write: a chunked
//!     region the range does not wholly cover stays, less every chunk the range
//!     touches (unless that leaves none: then it is dropped); every other region of every permission that overlaps the range is
//!     dropped; its parts outside the
//!     range come back as new regions (split), device-read-only if the region was
//!     (re-pinned writable they would hand the device write access to write-protected
//!     memory);
//!   - `mprotect` to read-only (write removed): a read-write region wholly inside the
//!     range becomes device-read-only in place; one that sticks out is dropped and its
//!     outside parts come back (split, as above); a write-only region is dropped (and
//!     split) whether inside or not: without write the device may do nothing with it,
//!     and "device-read-only" would widen it; read-only regions are untouched;
//!   - `mprotect` with write: device-read-only regions wholly inside the range get
//!     write back;
//!   - fork: nothing.
//!
//! After every operation the test checks, besides equality of the registry's regions
//! (`Registry::regions`: range, permission, device-read-only) with the model:
//! permissions only ever narrow (no write-only region is device-read-only: the device
//! could then read what it was only allowed to write);
//! the merge property on its own (after a miss, the region that now holds the
//! registration holds every previously live region of its permission that overlapped
//! or touched it, and nothing else changed; after a hit, nothing changed); the lookup
//! (the miss counter moves exactly on the model's misses, and `Registry::iova` of the
//! registration lies in its region); regions of one permission never overlap and
//! neither do their IOVA ranges; every page registered since its last invalidation is
//! still covered (mapped, or in a chunk its next use re-pins); a registration's pages
//! are all mapped once it returns; nothing of the range stays mapped after an
//! invalidation that drops; `pinned_bytes` is the sum of the regions less their
//! missing chunks, `mappings` the number of chunks mapped, and so is the domain's own
//! mapping count; `may_overlap` has no false negative; and `VmPin`, the kernel's count, moved
//! since the driver and registry were created by exactly `pinned_bytes`.
//!
//! `VmPin` is exact here: the buffer is `MADV_NOHUGEPAGE` (io_uring accounts a large
//! folio once per registered buffer set, 4 KiB pages once per buffer, which is what
//! the registry counts), no queue exists (no ring memory is pinned), no device work
//! is in flight (so an io_uring buffer is released, and unaccounted, synchronously on
//! unregistration, and a merge's retired regions are unmapped before `pin` returns).
//! Only the teardown of an io_uring that still has buffers registered releases them
//! asynchronously; a passing case never leaves one (see `settle_vm_pin`).

mod common;
use common::RegisterTest as _;

use common::{Anon, PinCheck};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use userptr::proc_status::pinned_bytes;
use userptr::{Cause, Driver, Perm, Registry, RegistryConfig};

const PAGES: usize = 64;
const PAGE: usize = 4096;
/// The registry's chunk size in the model's runs, in pages: small, so that regions of
/// more than 4 pages are chunked and those of 4 or fewer are not (both paths run).
const CHUNK: usize = 4;
/// Model permission slots, in the registry's order.
const PERMS: [Perm; 3] = [Perm::READ, Perm::WRITE, Perm::READ_WRITE];
const PERM_NAMES: [&str; 3] = ["read", "write", "read-write"];

fn slot_of(p: Perm) -> usize {
    PERMS
        .iter()
        .position(|&q| q == p)
        .expect("a modelled permission")
}

/// A region in the model: pages `start..end` of the buffer, and its chunks a partial
/// invalidation unmapped (page ranges, ascending).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MRegion {
    slot: usize,
    start: usize,
    end: usize,
    read_only: bool,
    missing: Vec<(usize, usize)>,
}

impl MRegion {
    /// The region's chunks (pages; the buffer starts on a chunk boundary): one if it
    /// is no larger than a chunk, else aligned pieces, the ends clipped.
    fn chunks(&self) -> Vec<(usize, usize)> {
        if self.end - self.start <= CHUNK {
            return vec![(self.start, self.end)];
        }
        let mut v = Vec::new();
        let mut at = self.start;
        while at < self.end {
            let e = ((at / CHUNK + 1) * CHUNK).min(self.end);
            v.push((at, e));
            at = e;
        }
        v
    }

    fn is_missing(&self, page: usize) -> bool {
        self.missing.iter().any(|&(s, e)| s <= page && page < e)
    }

    /// Pages mapped now, and mappings (chunks) mapped now.
    fn mapped(&self) -> (usize, usize) {
        let gone: usize = self.missing.iter().map(|(s, e)| e - s).sum();
        (
            self.end - self.start - gone,
            self.chunks().len() - self.missing.len(),
        )
    }
}

/// What a registration did in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Hit,
    /// A region covered it but some chunks it touches were missing: re-pinned.
    Repin,
    Miss,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Nothing,
    Restore,
    Downgrade,
    Drop,
}

/// The causes exercised, with the action the policy documents for each.
const CAUSES: [(Cause, Action); 11] = [
    (Cause::Unmap, Action::Drop),
    (Cause::Discard, Action::Drop),
    (Cause::Remap { to: 0x7000_0000 }, Action::Drop),
    (Cause::Release, Action::Drop),
    (
        Cause::Protect {
            new_prot: libc::PROT_NONE,
        },
        Action::Drop,
    ),
    (
        Cause::Protect {
            new_prot: libc::PROT_EXEC,
        },
        Action::Drop,
    ),
    (
        Cause::Protect {
            new_prot: libc::PROT_READ,
        },
        Action::Downgrade,
    ),
    (
        Cause::Protect {
            new_prot: libc::PROT_READ | libc::PROT_EXEC,
        },
        Action::Downgrade,
    ),
    (
        Cause::Protect {
            new_prot: libc::PROT_READ | libc::PROT_WRITE,
        },
        Action::Restore,
    ),
    (
        Cause::Protect {
            new_prot: libc::PROT_WRITE,
        },
        Action::Restore,
    ),
    (Cause::Fork, Action::Nothing),
];

/// The pieces of device-read-only region `r` outside pages `start..end`.
fn ro_leftovers(r: &MRegion, start: usize, end: usize) -> Vec<MRegion> {
    let mut v = Vec::new();
    if r.start < start {
        v.push(MRegion {
            end: start,
            missing: Vec::new(),
            ..r.clone()
        });
    }
    if end < r.end {
        v.push(MRegion {
            start: end,
            missing: Vec::new(),
            ..r.clone()
        });
    }
    v
}

/// The naive model: a flat list of regions, searched linearly.
#[derive(Default)]
struct Model {
    regions: Vec<MRegion>,
    /// Chunked regions the last invalidation left with no chunk, and dropped.
    emptied: Vec<MRegion>,
}

impl Model {
    fn sorted(&self) -> Vec<MRegion> {
        let mut v = self.regions.clone();
        v.sort();
        v
    }

    /// Register pages `want` with permission `slot`.
    fn register(&mut self, slot: usize, want: std::ops::Range<usize>) -> Outcome {
        if let Some(r) = self
            .regions
            .iter_mut()
            .find(|r| r.slot == slot && r.start <= want.start && want.end <= r.end)
        {
            let before = r.missing.len();
            r.missing.retain(|&(s, e)| e <= want.start || want.end <= s);
            return if r.missing.len() == before {
                Outcome::Hit
            } else {
                Outcome::Repin
            };
        }
        let (mut start, mut end) = (want.start, want.end);
        self.regions.retain(|r| {
            // Overlapping or touching: the probe is one byte wider on each side.
            let absorbed =
                r.slot == slot && !r.read_only && r.start <= want.end && want.start <= r.end;
            if absorbed {
                start = start.min(r.start);
                end = end.max(r.end);
            }
            !absorbed
        });
        // Device-read-only regions the new one overlaps are retired, not merged; their
        // pages outside it come back device-read-only.
        let mut leftovers = Vec::new();
        self.regions.retain(|r| {
            let hit = r.slot == slot && r.read_only && r.start < end && start < r.end;
            if hit {
                leftovers.extend(ro_leftovers(r, start, end));
            }
            !hit
        });
        self.regions.extend(leftovers);
        self.regions.push(MRegion {
            slot,
            start,
            end,
            read_only: false,
            missing: Vec::new(),
        });
        Outcome::Miss
    }

    fn invalidate(&mut self, range: std::ops::Range<usize>, action: Action) {
        let inside = |r: &MRegion| range.start <= r.start && r.end <= range.end;
        let overlaps = |r: &MRegion| r.start < range.end && range.start < r.end;
        match action {
            Action::Nothing => {}
            Action::Restore => {
                for r in &mut self.regions {
                    if inside(r) {
                        r.read_only = false;
                    }
                }
            }
            Action::Downgrade | Action::Drop => {
                let mut survivors = Vec::new();
                let mut kept = Vec::new();
                for mut r in std::mem::take(&mut self.regions) {
                    if !overlaps(&r) {
                        kept.push(r);
                        continue;
                    }
                    // A partial drop of a chunked region: the chunks the range touches
                    // go, the region stays.
                    if action == Action::Drop && !inside(&r) && r.chunks().len() > 1 {
                        for c in r.chunks() {
                            if c.0 < range.end && range.start < c.1 && !r.missing.contains(&c) {
                                r.missing.push(c);
                            }
                        }
                        r.missing.sort();
                        // Every chunk gone: the region goes too (its pages pin
                        // afresh on their next use).
                        if r.missing.len() < r.chunks().len() {
                            kept.push(r);
                        } else {
                            self.emptied.push(r);
                        }
                        continue;
                    }
                    if action == Action::Downgrade {
                        if PERMS[r.slot] == Perm::READ {
                            kept.push(r);
                            continue;
                        }
                        // Write-only: dropped (and split) below, never made readable.
                        if inside(&r) && PERMS[r.slot] == Perm::READ_WRITE {
                            r.read_only = true;
                            kept.push(r);
                            continue;
                        }
                    }
                    // Dropped; the parts outside the range are re-pinned, fresh,
                    // device-read-only if the region was.
                    if r.start < range.start {
                        survivors.push(MRegion {
                            end: range.start,
                            missing: Vec::new(),
                            ..r.clone()
                        });
                    }
                    if range.end < r.end {
                        survivors.push(MRegion {
                            start: range.end,
                            missing: Vec::new(),
                            ..r
                        });
                    }
                }
                kept.extend(survivors);
                self.regions = kept;
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Register bytes `start..end` of the buffer (not necessarily page-aligned).
    Register {
        start: usize,
        end: usize,
        perm: usize,
    },
    /// Register `pages` pages right before (`before`) or after the `nth` live region,
    /// so that adjacency merges are frequent; with `same`, in that region's permission.
    Beside {
        nth: usize,
        before: bool,
        pages: usize,
        same: bool,
        perm: usize,
    },
    Invalidate {
        start: usize,
        end: usize,
        cause: usize,
    },
    /// Invalidate around the `nth` live region (device-read-only, for a restore), its
    /// ends moved by `-2..=2` pages each, so that "wholly inside" (downgrade in place,
    /// restore) is frequent.
    Around {
        nth: usize,
        grow: (i64, i64),
        cause: usize,
    },
}

/// A byte range of the buffer from a page, a page count and sub-page trims at both
/// ends (mostly none).
fn byte_range(max_pages: usize) -> impl Strategy<Value = (usize, usize)> {
    let trim = || prop_oneof![4 => Just(0usize), 1 => Just(1usize), 1 => 0..PAGE];
    (0..PAGES, 1..=max_pages, trim(), trim()).prop_map(|(page, pages, head, tail)| {
        let start = page * PAGE + head;
        let end = ((page + pages).min(PAGES) * PAGE).saturating_sub(tail);
        (start, end.max(start + 1))
    })
}

/// How far `Around` moves a region's end outwards: mostly out (the region wholly
/// inside), sometimes in.
fn grow() -> impl Strategy<Value = i64> {
    prop_oneof![3 => 0i64..=2, 1 => -2i64..=-1]
}

fn op() -> impl Strategy<Value = Op> {
    let register = (byte_range(12), 0..3usize).prop_map(|((start, end), perm)| Op::Register {
        start,
        end,
        perm,
    });
    let beside = (
        any::<usize>(),
        any::<bool>(),
        1usize..8,
        prop::bool::weighted(0.8),
        0..3usize,
    )
        .prop_map(|(nth, before, pages, same, perm)| Op::Beside {
            nth,
            before,
            pages,
            same,
            perm,
        });
    let invalidate = (byte_range(20), 0..CAUSES.len())
        .prop_map(|((start, end), cause)| Op::Invalidate { start, end, cause });
    let around = (any::<usize>(), (grow(), grow()), 0..CAUSES.len())
        .prop_map(|(nth, grow, cause)| Op::Around { nth, grow, cause });
    prop_oneof![3 => register, 2 => beside, 2 => invalidate, 2 => around]
}

/// Pages `start..end` bytes touch: rounded out, as the registry rounds.
fn pages_of(start: usize, end: usize) -> std::ops::Range<usize> {
    start / PAGE..end.div_ceil(PAGE)
}

/// `VmPin` when the first case started.
static VM_PIN_AT_START: OnceLock<u64> = OnceLock::new();

/// A case that passes leaves `VmPin` where it found it (checked). One that fails may
/// leave behind regions a broken registry lost track of; the kernel releases their
/// pins when the driver's io_uring is torn down, which it does asynchronously
/// (`io_ring_exit_work`, observed: `VmPin` falling during the next case). Wait for that
/// (bounded) before a case, so that a shrinking run measures each case on its own.
fn settle_vm_pin() {
    let start = *VM_PIN_AT_START.get_or_init(|| pinned_bytes().expect("VmPin readable"));
    let t0 = Instant::now();
    while pinned_bytes().expect("VmPin readable") != start && t0.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn merges_splits_and_invalidations_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run_case(ops)?;
    }
}

/// One case: run `ops` against the registry and the model, checking after each.
fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    settle_vm_pin();
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(
        drv.clone(),
        RegistryConfig {
            chunk_size: (CHUNK * PAGE) as u64,
            ..RegistryConfig::default()
        },
    );
    // One chunk more than the model's pages, so that they can start on a chunk boundary.
    let buf = Anon::new((PAGES + CHUNK) * PAGE);
    // 4 KiB pages only, so that VmPin counts what the registry counts (see the top).
    buf.madvise(libc::MADV_NOHUGEPAGE);
    // The model takes every union; make sure the limits cannot refuse one: all
    // three permissions' regions together stay under 3 buffers, a merge adds at
    // most one more.
    let total = (PAGES * PAGE) as u64;
    prop_assert!(drv.domain().max_mapping_len() >= total);
    prop_assert!(
        reg.budget() >= 4 * total,
        "budget {} too small for the model",
        reg.budget()
    );
    prop_assert!(reg.max_mappings() >= 3 * PAGES);
    // Baselines after the driver and registry exist: whatever they pin or map
    // themselves is not the registry's regions.
    let vm_pin0 = pinned_bytes().expect("VmPin readable");
    let dom_maps0 = drv.domain().mappings();
    let base = buf.addr.next_multiple_of(CHUNK * PAGE);
    let page_addr = |p: usize| (base + p * PAGE) as u64;
    let mut model = Model::default();
    // Pages a registration made since their last invalidation need covered, per
    // permission slot.
    let mut needed: [BTreeSet<usize>; 3] = Default::default();
    for (step, op) in ops.into_iter().enumerate() {
        // Resolve `Beside` and `Around` against the model's live regions.
        let op = match op {
            Op::Beside {
                nth,
                before,
                pages,
                same,
                perm,
            } => {
                let live = model.sorted();
                match live.get(nth % live.len().max(1)) {
                    None => Op::Register {
                        start: (nth % PAGES) * PAGE,
                        end: ((nth % PAGES + pages).min(PAGES)) * PAGE,
                        perm,
                    },
                    Some(r) => {
                        let perm = if same { r.slot } else { perm };
                        let (s, e) = if r.start == 0 && r.end == PAGES {
                            (0, PAGES) // the whole buffer: a hit
                        } else if (before && r.start > 0) || r.end == PAGES {
                            (r.start.saturating_sub(pages), r.start)
                        } else {
                            (r.end, (r.end + pages).min(PAGES))
                        };
                        Op::Register {
                            start: s * PAGE,
                            end: e * PAGE,
                            perm,
                        }
                    }
                }
            }
            Op::Around { nth, grow, cause } => {
                let mut live = model.sorted();
                // A restore around a device-read-only region, where there is one.
                if CAUSES[cause].1 == Action::Restore && live.iter().any(|r| r.read_only) {
                    live.retain(|r| r.read_only);
                }
                let (s, e) = match live.get(nth % live.len().max(1)) {
                    None => (0, PAGES),
                    Some(r) => {
                        let s = (r.start as i64 - grow.0).clamp(0, PAGES as i64 - 1) as usize;
                        let e = (r.end as i64 + grow.1).clamp(s as i64 + 1, PAGES as i64) as usize;
                        (s, e)
                    }
                };
                Op::Invalidate {
                    start: s * PAGE,
                    end: e * PAGE,
                    cause,
                }
            }
            op => op,
        };
        let before = model.sorted();
        let stats0 = reg.stats();
        let mut registered = None;
        match op {
            Op::Register {
                start,
                end,
                perm: slot,
            } => {
                let want = pages_of(start, end);
                let u = reg
                    .register_test(base + start, end - start, PERMS[slot])
                    .unwrap();
                let outcome = model.register(slot, want.clone());
                needed[slot].extend(want.clone());
                let s = reg.stats();
                prop_assert_eq!(
                    s.misses - stats0.misses,
                    (outcome != Outcome::Hit) as u64,
                    "step {}: the lookup disagrees on hit/miss for pages {:?} ({})",
                    step,
                    want,
                    PERM_NAMES[slot]
                );
                registered = Some((u, slot, want, outcome));
            }
            Op::Beside { .. } | Op::Around { .. } => unreachable!("resolved above"),
            Op::Invalidate { start, end, cause } => {
                let (cause, action) = CAUSES[cause];
                let pages = pages_of(start, end);
                reg.invalidate((base + start) as u64..(base + end) as u64, cause)
                    .unwrap();
                model.invalidate(pages.clone(), action);
                // A registration whose region lost every chunk is pinned afresh on its
                // next use: its pages are no longer covered until then.
                for r in std::mem::take(&mut model.emptied) {
                    for p in r.start..r.end {
                        needed[r.slot].remove(&p);
                    }
                }
                let slots: &[usize] = match action {
                    Action::Drop => &[0, 1, 2],
                    Action::Downgrade => &[1, 2],
                    Action::Restore | Action::Nothing => &[],
                };
                for &s in slots {
                    for p in pages.clone() {
                        needed[s].remove(&p);
                    }
                }
                if action == Action::Drop {
                    // Nothing of the range stays mapped: a region overlapping it is
                    // chunked and has lost every chunk there.
                    for r in reg.regions() {
                        for p in pages.clone() {
                            let at = page_addr(p);
                            prop_assert!(
                                !r.range.contains(&at) || r.missing.iter().any(|m| m.contains(&at)),
                                "step {}: page {} of region {:x?} survived the invalidation \
                                 ({:?}) of pages {:?} (missing {:x?})",
                                step,
                                p,
                                r.range,
                                cause,
                                pages,
                                r.missing
                            );
                        }
                    }
                }
            }
        }
        let regions = reg.regions();
        let mut actual = Vec::with_capacity(regions.len());
        for r in &regions {
            prop_assert!(
                r.range.start >= page_addr(0)
                    && r.range.end <= page_addr(PAGES)
                    && r.range.start < r.range.end,
                "step {}: region {:x?} outside the buffer",
                step,
                r.range
            );
            let page_of = |a: u64| (a - page_addr(0)) as usize / PAGE;
            actual.push(MRegion {
                slot: slot_of(r.perm),
                start: page_of(r.range.start),
                end: page_of(r.range.end),
                read_only: r.device_read_only,
                missing: r
                    .missing
                    .iter()
                    .map(|m| (page_of(m.start), page_of(m.end)))
                    .collect(),
            });
        }
        actual.sort();
        // Permissions only narrow: a device-read-only region was readable to begin with.
        for r in &actual {
            prop_assert!(
                !r.read_only || PERMS[r.slot].read(),
                "step {}: write-only region {:?} made device-readable after {:?}",
                step,
                r,
                op
            );
        }
        // The merge property, stated on its own before the model comparison.
        if let Some((u, slot, want, outcome)) = &registered {
            let holder = actual
                .iter()
                .find(|r| r.slot == *slot && r.start <= want.start && want.end <= r.end);
            prop_assert!(
                holder.is_some(),
                "step {}: no {} region holds the registration of pages {:?}: {:?}",
                step,
                PERM_NAMES[*slot],
                want,
                actual
            );
            let holder = holder.unwrap().clone();
            prop_assert!(
                want.clone().all(|p| !holder.is_missing(p)),
                "step {}: pages {:?} registered but a chunk of them is not mapped: {:?}",
                step,
                want,
                holder
            );
            if *outcome == Outcome::Miss {
                let (absorbed, others): (Vec<_>, Vec<_>) = before.iter().cloned().partition(|r| {
                    r.slot == *slot && !r.read_only && r.start <= want.end && want.start <= r.end
                });
                for a in &absorbed {
                    prop_assert!(
                        holder.start <= a.start && a.end <= holder.end,
                        "step {}: registering pages {:?} ({}) did not merge the \
                         overlapping or adjacent region {:?}: it is in {:?}",
                        step,
                        want,
                        PERM_NAMES[*slot],
                        a,
                        holder
                    );
                }
                let lo = absorbed
                    .iter()
                    .map(|r| r.start)
                    .chain([want.start])
                    .min()
                    .unwrap();
                let hi = absorbed
                    .iter()
                    .map(|r| r.end)
                    .chain([want.end])
                    .max()
                    .unwrap();
                prop_assert_eq!(
                    (holder.start, holder.end),
                    (lo, hi),
                    "step {}: the merged region is not the union of the registration and \
                     its neighbours",
                    step
                );
                // Device-read-only regions the merged one overlaps are retired with it,
                // their pages outside it back as device-read-only pieces.
                let mut expect = Vec::new();
                for r in others {
                    if r.slot == *slot
                        && r.read_only
                        && r.start < holder.end
                        && holder.start < r.end
                    {
                        expect.extend(ro_leftovers(&r, holder.start, holder.end));
                    } else {
                        expect.push(r);
                    }
                }
                expect.push(holder.clone());
                expect.sort();
                prop_assert_eq!(
                    &actual,
                    &expect,
                    "step {}: a miss changed more than the merged regions",
                    step
                );
            } else if *outcome == Outcome::Hit {
                prop_assert_eq!(
                    &actual,
                    &before,
                    "step {}: a cache hit changed the regions",
                    step
                );
            }
            // The lookup: the registration's device address lies in its region.
            let iova = reg.iova(u).unwrap();
            let info = regions
                .iter()
                .find(|r| slot_of(r.perm) == *slot && r.range.start == page_addr(holder.start))
                .unwrap();
            prop_assert_eq!(
                iova,
                info.iova + (u.addr() - info.range.start),
                "step {}: iova of the registration is not in its region",
                step
            );
        }
        prop_assert_eq!(
            &actual,
            &model.sorted(),
            "step {}: registry and model differ after {:?}",
            step,
            op
        );
        for slot in 0..3 {
            let mine: Vec<_> = actual.iter().filter(|r| r.slot == slot).collect();
            for w in mine.windows(2) {
                prop_assert!(
                    w[0].end <= w[1].start,
                    "step {}: regions overlap: {:?}",
                    step,
                    w
                );
            }
            for &p in &needed[slot] {
                prop_assert!(
                    // (Mapped, or in a chunk the invalidation of a neighbouring page
                    // took, which its next use re-pins.)
                    mine.iter().any(|r| r.start <= p && p < r.end),
                    "step {}: page {} ({}) is not covered",
                    step,
                    p,
                    PERM_NAMES[slot]
                );
            }
        }
        let mut iovas: Vec<_> = regions
            .iter()
            .map(|r| (r.iova, r.iova + (r.range.end - r.range.start)))
            .collect();
        iovas.sort();
        for w in iovas.windows(2) {
            prop_assert!(
                w[0].1 <= w[1].0,
                "step {}: IOVA ranges overlap: {:x?}",
                step,
                w
            );
        }
        for r in &regions {
            prop_assert!(
                reg.may_overlap(&r.range),
                "step {}: may_overlap misses {:x?}",
                step,
                r.range
            );
        }
        let vm_pin = pinned_bytes().expect("VmPin readable");
        prop_assert_eq!(
            vm_pin as i64 - vm_pin0 as i64,
            reg.pinned_bytes() as i64,
            "step {}: VmPin moved by other than the registry's pinned bytes",
            step
        );
        // What is mapped: the regions less their missing chunks.
        let (pages, maps) = actual
            .iter()
            .map(MRegion::mapped)
            .fold((0, 0), |(p, m), (a, b)| (p + a, m + b));
        prop_assert_eq!(
            reg.pinned_bytes(),
            (pages * PAGE) as u64,
            "step {}: pinned bytes are not the regions' mapped sum",
            step
        );
        prop_assert_eq!(reg.mappings(), maps, "step {}: mapping count", step);
        prop_assert_eq!(
            drv.domain().mappings() - dom_maps0,
            maps,
            "step {}: domain mapping count",
            step
        );
    }
    reg.clear().unwrap();
    prop_assert_eq!(reg.pinned_bytes(), 0);
    prop_assert_eq!(reg.mappings(), 0);
    prop_assert!(reg.regions().is_empty());
    prop_assert_eq!(pinned_bytes().expect("VmPin readable"), vm_pin0);
    drop((reg, drv));
    pins.check();
    Ok(())
}
