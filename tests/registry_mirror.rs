//! The registry's device-side mirrors (`registry::mirror`) against a region that has
//! left the index but is not unmapped yet: a merge's reclaim of the region it
//! replaced, and an eviction. The unmap (and the mirrors' notice) runs outside the
//! registry's lock; an invalidation of the range that runs in between must still tell
//! the mirrors about that region before it returns, or a GPU VM keeps entries that
//! point at the old pages (still pinned until the unmap) after the address-space
//! change: the device's next write there is lost (what `torture --gpuvm` found).
//!
//! A mirror here records every notice and holds the thread that unmaps the region
//! inside its notice, so the invalidation runs exactly in that gap.

mod common;

use common::Anon;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use userptr::driver::registry::{RangeMirror, UnmapReason};
use userptr::{Cause, Driver, Perm, Registry, RegistryConfig};

const T: Duration = Duration::from_secs(10);

/// Records `(iova, reason)` per notice; holds the first notice whose reason is
/// `hold` until released.
struct Recorder {
    hold: UnmapReason,
    st: Mutex<State>,
    cv: Condvar,
}

#[derive(Default)]
struct State {
    seen: Vec<(u64, UnmapReason)>,
    holding: bool,
    held_once: bool,
    released: bool,
}

impl Recorder {
    fn new(hold: UnmapReason) -> Arc<Recorder> {
        Arc::new(Recorder {
            hold,
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
        })
    }

    /// Wait (bounded) until a notice is being held.
    fn wait_holding(&self) {
        let st = self.st.lock().unwrap();
        let (st, to) = self.cv.wait_timeout_while(st, T, |s| !s.holding).unwrap();
        assert!(
            !to.timed_out() && st.holding,
            "no {:?} notice came",
            self.hold
        );
    }

    fn release(&self) {
        self.st.lock().unwrap().released = true;
        self.cv.notify_all();
    }

    fn told(&self, iova: u64) -> Vec<UnmapReason> {
        let st = self.st.lock().unwrap();
        st.seen
            .iter()
            .filter(|(i, _)| *i == iova)
            .map(|x| x.1)
            .collect()
    }
}

impl RangeMirror for Recorder {
    fn unmapping(&self, _host: Range<u64>, iova: u64, _len: u64, reason: UnmapReason) {
        let mut st = self.st.lock().unwrap();
        st.seen.push((iova, reason));
        if reason == self.hold && !st.held_once {
            st.held_once = true;
            st.holding = true;
            self.cv.notify_all();
            let (mut st, _) = self.cv.wait_timeout_while(st, T, |s| !s.released).unwrap();
            st.holding = false;
        }
    }

    fn downgrading(&self, _host: Range<u64>, _iova: u64, _len: u64) {}
}

fn iova_of(reg: &Registry, range: Range<u64>) -> u64 {
    reg.regions()
        .into_iter()
        .find(|r| r.range == range)
        .unwrap_or_else(|| panic!("no region {range:x?}: {:x?}", reg.regions()))
        .iova
}

/// The invalidation, run while the other thread is held in the mirror's notice of
/// the region at `old`: the mirror must have been told about `old` by the time
/// `invalidate_start` returns.
fn invalidate_in_the_gap(reg: &Registry, m: &Recorder, range: Range<u64>, old: u64) {
    m.wait_holding();
    let inv = reg.invalidate_start(range, Cause::Discard).unwrap();
    let told = m.told(old);
    reg.invalidate_end(inv);
    m.release();
    assert!(
        told.contains(&UnmapReason::Invalidation(Cause::Discard)),
        "the invalidation returned without telling the mirror about the region at \
         {old:#x}, which had left the index and was still mapped (told only {told:?})"
    );
}

#[test]
fn an_invalidation_tells_the_mirrors_about_a_merged_region_on_its_way_out() {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv, RegistryConfig::default());
    let buf = Anon::new(256 << 10);
    let p = buf.addr as u64;
    let m = Recorder::new(UnmapReason::Merge);
    let mirror: Arc<dyn RangeMirror> = m.clone();
    reg.add_mirror(Arc::downgrade(&mirror));
    // SAFETY: the test's own mapping, alive until the end; nothing reads it while the
    // device could (nothing is submitted).
    drop(unsafe { reg.register(buf.addr, 64 << 10, Perm::READ_WRITE) }.unwrap());
    let old = iova_of(&reg, p..p + (64 << 10));
    std::thread::scope(|s| {
        // A registration covering the first one: a new region replaces it, and the old
        // one (idle) is unmapped right away by the merge's reclaim.
        s.spawn(|| {
            // SAFETY: as above.
            drop(unsafe { reg.register(buf.addr, 128 << 10, Perm::READ_WRITE) }.unwrap());
        });
        invalidate_in_the_gap(&reg, &m, p..p + 4096, old);
    });
}

#[test]
fn an_invalidation_tells_the_mirrors_about_an_evicted_region_on_its_way_out() {
    let drv = Driver::reference().unwrap();
    let cfg = RegistryConfig {
        pin_budget: Some(128 << 10),
        ..RegistryConfig::default()
    };
    let reg = Registry::new(drv, cfg);
    let a = Anon::new(64 << 10);
    let b = Anon::new(128 << 10);
    let m = Recorder::new(UnmapReason::Eviction);
    let mirror: Arc<dyn RangeMirror> = m.clone();
    reg.add_mirror(Arc::downgrade(&mirror));
    // SAFETY: the test's own mappings, alive until the end; nothing is submitted.
    drop(unsafe { reg.register(a.addr, a.len, Perm::READ_WRITE) }.unwrap());
    let pa = a.addr as u64;
    let old = iova_of(&reg, pa..pa + a.len as u64);
    std::thread::scope(|s| {
        // Fits the budget only once the idle first region is evicted.
        s.spawn(|| {
            // SAFETY: as above.
            drop(unsafe { reg.register(b.addr, b.len, Perm::READ_WRITE) }.unwrap());
        });
        invalidate_in_the_gap(&reg, &m, pa..pa + 4096, old);
    });
}

#[test]
fn an_invalidation_tells_the_mirrors_about_a_region_another_invalidation_is_retiring() {
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv, RegistryConfig::default());
    let buf = Anon::new(128 << 10);
    let p = buf.addr as u64;
    let m = Recorder::new(UnmapReason::Invalidation(Cause::Unmap));
    let mirror: Arc<dyn RangeMirror> = m.clone();
    reg.add_mirror(Arc::downgrade(&mirror));
    // SAFETY: the test's own mapping, alive until the end; nothing is submitted.
    drop(unsafe { reg.register(buf.addr, buf.len, Perm::READ_WRITE) }.unwrap());
    let old = iova_of(&reg, p..p + buf.len as u64);
    std::thread::scope(|s| {
        // The first invalidation retires the region and is held in its notice; the
        // second, of an overlapping range, finds it neither in the index nor draining.
        s.spawn(|| {
            reg.invalidate(p + (64 << 10)..p + (128 << 10), Cause::Unmap)
                .unwrap();
        });
        invalidate_in_the_gap(&reg, &m, p..p + 4096, old);
    });
}
