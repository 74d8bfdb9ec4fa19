//! loom models of chunked regions (registry/chunks.rs, registry/repin.rs): a partial
//! invalidation that takes one chunk of a region away, against a submission spanning
//! the region's chunks that re-pins what is missing. They drive the real `Notifier`,
//! `Epoch` and `InvalidationLog` (built with `--cfg loom`); the steps around them are
//! copies, one line each, in the order the registry runs them:
//!
//! | model                                   | registry                                          |
//! |-----------------------------------------|---------------------------------------------------|
//! | `Index::present[k]`                     | `Chunks::present` (written under the exclusive lock) |
//! | `Region::maps` (a mutex)                | `Chunks::maps` (`Maps::mapped`)                    |
//! | `Region::iommu[k]`: the page mapped     | the IOMMU mapping of chunk `k` (pins a page)      |
//! | `pages[k]` (1, then 2 after the change) | which page the process maps in chunk `k`         |
//! | `invalidate`                            | `invalidate_start`'s chunk path, `unmap_some_chunks`, the change, `invalidate_end` |
//! | `repin`                                 | `Registry::repin`                                 |
//! | `submit`                                | `resolve` (snapshot under one shared section), `read_retry`, the device access |
//!
//! The device access happens inside the submission's shared section here (on the real
//! device it runs later, and the invalidation waits for its fence: model 2 of
//! `loom_registry.rs` checks that wait); the check is that it reaches, through the
//! IOMMU, the page the process maps, in every chunk it spans.
//!
//! Each model names the removals it catches; every one was tried (removed, loom found
//! the failure, restored).
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-driver --test loom_chunks --release`
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;
use std::ops::Range;
use userptr_driver::registry::notifier::{Epoch, InvalidationLog, Notifier};

/// Two chunks: `0..10` and `10..20`.
const CHUNKS: [Range<u64>; 2] = [0..10, 10..20];

#[derive(Default)]
struct Index {
    invalidations: InvalidationLog,
    present: [bool; 2],
}

struct World {
    n: Notifier<Index>,
    epoch: Epoch,
    /// The region's mutex: which chunks are mapped.
    maps: Mutex<[bool; 2]>,
    /// The IOMMU: the page each chunk's mapping pins (changed under `maps`).
    iommu: Mutex<[Option<u64>; 2]>,
    pages: [AtomicU64; 2],
}

fn world(present: [bool; 2]) -> Arc<World> {
    Arc::new(World {
        n: Notifier::new(Index {
            invalidations: InvalidationLog::default(),
            present,
        }),
        epoch: Epoch::new(),
        maps: Mutex::new(present),
        iommu: Mutex::new([present[0].then_some(1), present[1].then_some(1)]),
        pages: [AtomicU64::new(1), AtomicU64::new(1)],
    })
}

/// A discard of part of chunk `k` (the range `k`'s first page): the chunk path of
/// `invalidate_start`, then the change (the page is replaced), then `invalidate_end`.
fn invalidate(w: &World, k: usize) {
    let range = CHUNKS[k].start..CHUNKS[k].start + 1;
    let win = w.n.open_window(range.clone());
    let mine = {
        let mut g = w.n.write();
        g.invalidations.record(range.clone());
        w.epoch.bump(&g);
        std::mem::replace(&mut g.present[k], false)
    };
    // (the fence wait: loom_registry's model 2)
    if mine {
        // unmap_some_chunks: under the region's mutex.
        let mut maps = w.maps.lock().unwrap();
        maps[k] = false;
        w.iommu.lock().unwrap()[k] = None;
    }
    // invalidate_start returned: the kernel changes the mapping.
    w.pages[k].store(2, SeqCst);
    w.n.close_window(win);
}

/// `Registry::repin` for every chunk: `Some(epoch)` once all are present.
fn repin(w: &World) -> Option<u64> {
    let want = CHUNKS[0].start..CHUNKS[1].end;
    for _ in 0..4 {
        let gen = w.n.read().invalidations.generation();
        w.n.wait_no_window_for(&want, std::time::Duration::from_secs(30))
            .expect("the window closes");
        {
            let g = w.n.read();
            if g.present.iter().all(|&p| p) {
                return Some(w.epoch.get());
            }
        }
        let mut maps = w.maps.lock().unwrap();
        // A chunk mapped but not present is being unmapped: wait for its window.
        let clearing = {
            let g = w.n.read();
            (0..2).any(|k| maps[k] && !g.present[k])
        };
        if clearing {
            continue;
        }
        let mut fresh = Vec::new();
        for k in 0..2 {
            if !maps[k] {
                // map_user_at: pins the page the process maps now, outside the lock.
                maps[k] = true;
                w.iommu.lock().unwrap()[k] = Some(w.pages[k].load(SeqCst));
                fresh.push(k);
            }
        }
        let mut g = w.n.write();
        let ok = !g.invalidations.invalidated_since(gen, &want)
            && (0..2).all(|k| fresh.contains(&k) || g.present[k]);
        if ok {
            for &k in &fresh {
                g.present[k] = true;
            }
            return Some(w.epoch.get());
        }
        drop(g);
        for k in fresh {
            maps[k] = false;
            w.iommu.lock().unwrap()[k] = None;
        }
    }
    None
}

/// A submission spanning both chunks: the snapshot (present bits and epoch under one
/// shared section, else the re-pin), then `read_retry` and the device access in one
/// shared section. Returns whether it reached the device.
fn submit(w: &World) -> bool {
    for _ in 0..4 {
        let hit = {
            let g = w.n.read();
            g.present.iter().all(|&p| p).then(|| w.epoch.get())
        };
        let Some(seq) = hit.or_else(|| repin(w)) else {
            return false;
        };
        // (build the descriptors: outside the lock)
        let g = w.n.read();
        if w.n.read_retry(&g, &w.epoch, seq) {
            continue;
        }
        // The device: through the IOMMU, into each chunk.
        let iommu = w.iommu.lock().unwrap();
        for k in 0..2 {
            let now = w.pages[k].load(SeqCst);
            assert_eq!(
                iommu[k],
                Some(now),
                "chunk {k}: the device reached {:?} while the process maps page {now}",
                iommu[k]
            );
        }
        return true;
    }
    false
}

/// Every chunk present; an invalidation takes chunk 1 while a submission spanning both
/// runs (and re-pins chunk 1 if it looks after the invalidation).
///
/// Catches: the epoch bump removed from the chunk path (a submission that looked
/// before commits after the unmap: chunk 1 not mapped); the present bit not cleared
/// (no re-pin: the device reaches nothing in chunk 1).
#[test]
fn a_submission_never_reaches_a_chunk_an_invalidation_took() {
    loom::model(|| {
        let w = world([true, true]);
        let inv = {
            let w = w.clone();
            thread::spawn(move || invalidate(&w, 1))
        };
        let reached = submit(&w);
        inv.join().unwrap();
        // One invalidation forces at most a retry or two: the submission gets there.
        assert!(reached, "the submission gave up");
    });
}

/// Chunk 1 missing already (an earlier invalidation), and invalidated again while a
/// submission re-pins it: the re-pin never installs the page the process no longer
/// maps.
///
/// Catches: `invalidated_since` removed from the re-pin's install (it installs page
/// 1 after the change); the window wait before the generation read; the epoch bump
/// or the present clear removed. The re-pin's `clearing` check and its all-present
/// install check are a second line behind `invalidated_since` (removed alone or
/// together, loom finds nothing: the log catches the same interleavings); with all
/// three removed this model fails.
#[test]
fn a_re_pin_never_installs_a_replaced_page() {
    loom::model(|| {
        let w = world([true, false]);
        let inv = {
            let w = w.clone();
            thread::spawn(move || invalidate(&w, 1))
        };
        let reached = submit(&w);
        inv.join().unwrap();
        assert!(reached, "the submission gave up");
        // And what is left installed is the new page.
        let g = w.n.read();
        if g.present[1] {
            assert_eq!(w.iommu.lock().unwrap()[1], Some(2));
        }
    });
}
