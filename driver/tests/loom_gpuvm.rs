//! loom models of GPU-VM fault-and-replay against invalidation, driving the real
//! engine TLB (`reference::tlb::Tlb`), the real TLB-invalidation handshake
//! (`reference::tlb::TlbRequests`, whose lock and atomics are loom's with
//! `--cfg loom`) and the real `InvalidationLog` the VM checks installs against.
//!
//! The device, the VM and the registry need the whole driver, so the steps around
//! those types are copies here, one line each, in the order the code runs them:
//!
//! | model                                   | driver / device                                      |
//! |-----------------------------------------|------------------------------------------------------|
//! | `pte` (0: not present, else an IOVA)    | the leaf in the VM's page table (`gpuvm::pagetable`)  |
//! | `St::log`, the `St` mutex               | `VmState::log` under the VM lock (`gpuvm::vm`)        |
//! | `region` (0 while being invalidated)    | the registry's index: what `Registry::iova` resolves  |
//! | `unmapped[i]`                           | the IOMMU unmap + unpin of IOVA `i` (after the hook)   |
//! | `device`: `take`, lookup / walk, access | `Engine::dma`: `tlb_sync`, `Mmu::translate`, the DMA  |
//! | `fault` / `replay`                      | the fault record and the ring's `REPLAY` register     |
//! | `handler`: gen, resolve, check, install | `VmInner::resolve` → `svm_fault` / `refault`, `install`|
//! | `invalidate`: remove, record+zap, post, wait, unmap | the registry's unmap path and `RangeMirror::unmapping` |
//!
//! A device access that uses an IOVA the IOMMU has unmapped is the violation: the
//! allocator hands freed IOVAs out again, so in the driver it would reach another
//! buffer's pages (tests/gpuvm.rs shows that for real).
//!
//! Each model names the removals it catches; each was tried (removed, loom found the
//! failure, restored).
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-driver --test loom_gpuvm --release`
//! (three preemptions by default, see `model`; `LOOM_MAX_PREEMPTIONS` overrides).
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use userptr_driver::reference::tlb::{InvRequest, Tlb, TlbRequests, Translation};
use userptr_driver::registry::notifier::InvalidationLog;

const VM: u8 = 1;
const VA: u64 = 0x10_0000;
const RANGE: std::ops::Range<u64> = 0x7000_0000..0x7001_0000;

struct St {
    log: InvalidationLog,
}

/// The model's own hand-offs, under `World::bell`.
#[derive(Default)]
struct Flags {
    /// The device raised a fault record.
    fault: bool,
    /// The handler wrote REPLAY.
    replay: bool,
    device_done: bool,
    inv_done: bool,
    /// What `Registry::iova` resolves the range to now (0: being invalidated).
    region: u64,
}

/// Everything the threads share. Every wait is on `bell` (a predicate checked under
/// its lock; the model's own flags live under it, the real types' state changes
/// before a `ring`): the stricter stand-in for the engine's unpark, the eventfd and
/// the bounded polls, which cannot lose a wake-up for good where a condvar can (loom
/// reports a deadlock then).
struct World {
    st: Mutex<St>,
    rq: TlbRequests,
    pte: AtomicU64,
    unmapped: [AtomicBool; 3],
    bell: Mutex<Flags>,
    cv: Condvar,
}

impl World {
    fn new(pte: u64) -> Arc<World> {
        Arc::new(World {
            st: Mutex::new(St {
                log: InvalidationLog::with_capacity(4),
            }),
            rq: TlbRequests::new(),
            pte: AtomicU64::new(pte),
            unmapped: Default::default(),
            bell: Mutex::new(Flags {
                region: 1,
                ..Flags::default()
            }),
            cv: Condvar::new(),
        })
    }

    /// Wake every waiter (after a change to a real type's state).
    fn ring(&self) {
        drop(self.bell.lock().unwrap());
        self.cv.notify_all();
    }

    /// Change the flags, then wake every waiter.
    fn set(&self, f: impl FnOnce(&mut Flags)) {
        f(&mut self.bell.lock().unwrap());
        self.cv.notify_all();
    }

    /// Wait until `pred` holds; returns what `take` takes from the flags then.
    fn wait<R>(&self, pred: impl Fn(&Flags) -> bool, take: impl FnOnce(&mut Flags) -> R) -> R {
        let mut g = self.bell.lock().unwrap();
        while !pred(&g) {
            g = self.cv.wait(g).unwrap();
        }
        take(&mut g)
    }
}

/// `loom::model`, bounded to three preemptions unless `LOOM_MAX_PREEMPTIONS` says
/// otherwise: three threads with a condvar are too many interleavings unbounded (the
/// failures listed at each model show up within two).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

fn leaf(iova: u64) -> Translation {
    Translation {
        page: VA,
        size_log2: 12,
        target: iova,
        writable: true,
        devmem: false,
    }
}

/// One DMA round of the engine: a safe point (requests taken), the translation, the
/// access. `None`: the page is not present.
fn round(w: &World, tlb: &mut Tlb) -> Option<u64> {
    if w.rq.take(tlb) > 0 {
        w.ring();
    }
    let t = tlb.lookup(VM, VA).or_else(|| {
        let p = w.pte.load(SeqCst);
        (p != 0).then(|| {
            tlb.insert(VM, leaf(p));
            leaf(p)
        })
    })?;
    assert!(
        !w.unmapped[t.target as usize].load(SeqCst),
        "the device used IOVA {} after it was unmapped",
        t.target
    );
    Some(t.target)
}

/// The engine: run the command (faulting and waiting for the replay as needed), take
/// the requests posted while the invalidation runs, then run one later command.
fn device(w: &World, replayable: bool) -> Option<u64> {
    let mut tlb = Tlb::new(16);
    if w.pte.load(SeqCst) != 0 {
        // A warm TLB: an earlier command used the page.
        round(w, &mut tlb);
    }
    let used = loop {
        if let Some(i) = round(w, &mut tlb) {
            break Some(i);
        }
        if !replayable {
            break None; // DmaFault
        }
        w.set(|f| f.fault = true);
        // Held: the engine's loop goes on taking invalidation requests meanwhile
        // (the fault may need this very invalidation to end before it is resolved).
        loop {
            let replay = w.wait(
                |f| f.replay || w.rq.pending(),
                |f| std::mem::take(&mut f.replay),
            );
            if w.rq.take(&mut tlb) > 0 {
                w.ring();
            }
            if replay {
                break;
            }
        }
    };
    w.set(|f| f.device_done = true);
    loop {
        let done = w.wait(|f| f.inv_done || w.rq.pending(), |f| f.inv_done);
        if w.rq.take(&mut tlb) > 0 {
            w.ring();
        }
        if done {
            break;
        }
    }
    // A later command on the same page.
    round(w, &mut tlb);
    used
}

/// The fault handler: for each fault, generation, resolve, check, install, replay.
fn handler(w: &World) -> u32 {
    let mut retries = 0;
    loop {
        let fault = w.wait(
            |f| f.fault || f.device_done,
            |f| std::mem::take(&mut f.fault),
        );
        if !fault {
            return retries;
        }
        loop {
            let gen = w.st.lock().unwrap().log.generation();
            // Registry::iova: waits while the range is being invalidated.
            let iova = w.wait(|f| f.region != 0, |f| f.region);
            let st = w.st.lock().unwrap();
            if st.log.invalidated_since(gen, &RANGE) {
                retries += 1;
                continue;
            }
            w.pte.store(iova, SeqCst);
            break;
        }
        w.set(|f| f.replay = true);
    }
}

/// The registry's invalidation of the range with the VM's notice in it.
fn invalidate(w: &World) {
    // The region leaves the registry's index (its window opens).
    w.set(|f| f.region = 0);
    // The notice, under the VM lock: record, zap what points into the region.
    {
        let mut st = w.st.lock().unwrap();
        st.log.record(RANGE);
        if w.pte.load(SeqCst) == 1 {
            w.pte.store(0, SeqCst);
        }
    }
    // The TLB invalidation, waited for.
    let k = w.rq.post(InvRequest {
        vm: VM,
        va: VA,
        pages: 1,
    });
    w.ring();
    w.wait(|_| w.rq.is_complete(k), |_| ());
    // Only now: the IOMMU unmap and the unpin; the window closes and the next pin
    // of the range gets the new pages at IOVA 2.
    w.unmapped[1].store(true, SeqCst);
    w.set(|f| {
        f.region = 2;
        f.inv_done = true;
    });
}

/// Fault-and-replay (SVM, or a bound userptr in a VM with replayable faults) against
/// an invalidation of the page: under every interleaving the device never uses IOVA 1
/// after its unmap, the command completes through IOVA 1 (before) or 2 (after), no
/// stale entry is left in the table, and the handler retries at most once.
///
/// Catches (each tried): the handler installing without `invalidated_since` (it
/// installs the IOVA it resolved before the invalidation, after the unmap); the
/// invalidation unmapping before the TLB request completed, or not waiting for it at
/// all; the zap done after the TLB invalidation instead of before it (a walk in
/// between caches the old entry).
#[test]
fn fault_and_replay_never_reach_an_unmapped_iova() {
    model(|| {
        let w = World::new(0);
        let d = {
            let w = w.clone();
            thread::spawn(move || device(&w, true))
        };
        let h = {
            let w = w.clone();
            thread::spawn(move || handler(&w))
        };
        invalidate(&w);
        let used = d.join().unwrap();
        let retries = h.join().unwrap();
        assert!(matches!(used, Some(1 | 2)), "{used:?}");
        assert!(retries <= 1, "{retries} retries");
        assert_ne!(
            w.pte.load(SeqCst),
            1,
            "a PTE still points at the unmapped IOVA"
        );
    });
}

/// A bound userptr in a VM without replayable faults, its translation cached in the
/// TLB, against the invalidation: the device completes through IOVA 1 (the command
/// ran before) or faults (it ran after the zap), never through a stale entry after
/// the unmap.
///
/// Catches (each tried): the invalidation not waiting for the TLB request, or
/// unmapping before it completed; requests taken between a round's translation and
/// its access (not at a safe point: the engine's `tlb_sync` runs before a round's
/// translation, never inside it); the zap after the TLB invalidation.
#[test]
fn a_cached_translation_is_never_used_after_the_unmap() {
    model(|| {
        let w = World::new(1);
        let d = {
            let w = w.clone();
            thread::spawn(move || device(&w, false))
        };
        invalidate(&w);
        let used = d.join().unwrap();
        assert!(matches!(used, Some(1) | None), "{used:?}");
    });
}
