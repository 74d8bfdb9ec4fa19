//! The registry and the queues under faults and misuse (issue 12): batches that do not
//! fit, failed and abandoned invalidations, teardown with work stuck on the device,
//! permission downgrades of every permission, a domain that runs out, queues of
//! another driver, `Duration::MAX`, monitor start/stop cycles, unclaimed completions,
//! and application code (build callbacks, observers) that runs outside the driver.
//!
//! A test whose old failure was a hang runs the call on a thread and gives up on it
//! after [`T`], so that it fails instead of hanging the suite.

mod common;
use common::{MapTest as _, RegisterTest as _};

use common::{is_child, run_child, Anon, PinCheck};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use userptr::driver::driver_section;
use userptr::driver::registry::RegionObserver;
use userptr::{
    Backpressure, Cause, CommandQueue, Descriptor, Driver, Error, Perm, ReferenceConfig, Registry,
    RegistryConfig, Status, UringIommuConfig, Userptr, WaitMode,
};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const T: Duration = Duration::from_secs(30);

fn setup(cfg: RegistryConfig) -> (Driver, CommandQueue, Registry) {
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 32).unwrap();
    let reg = Registry::new(drv.clone(), cfg);
    (drv, q, reg)
}

/// Run `f` on its own thread; `None` if it did not return within `T` (the thread is
/// left behind: the test fails instead of hanging).
fn bounded<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(T).ok()
}

fn fill(reg: &Registry, q: &CommandQueue, u: &Userptr, b: u8) -> Status {
    let len = u.len();
    let f = reg
        .submit(q, &[u], |iova| vec![Descriptor::fill(iova[0], len, b)])
        .unwrap();
    q.wait_completion(f.end, WaitMode::Block, T).unwrap().status
}

fn range_of(a: &Anon) -> std::ops::Range<u64> {
    a.addr as u64..(a.addr + a.len) as u64
}

// ---------------------------------------------------------------------------------
// 1. Batches and the pin budget.
// ---------------------------------------------------------------------------------

#[test]
fn a_batch_larger_than_the_budget_fails_at_once_saying_what_it_needs() {
    let pins = PinCheck::start();
    for (count, each, budget) in [(2, 5 * MIB, 8 * MIB), (17, MIB, 16 * MIB)] {
        let (_drv, q, reg) = setup(RegistryConfig {
            pin_budget: Some(budget as u64),
            ..Default::default()
        });
        let bufs: Vec<Anon> = (0..count).map(|_| Anon::new(each)).collect();
        // Registered lazily: the registrations fit one at a time (each evicts another).
        let us: Vec<Userptr> = bufs
            .iter()
            .map(|b| reg.register_test(b.addr, each, Perm::READ_WRITE).unwrap())
            .collect();
        let before = reg.stats();
        let (reg2, q2) = (reg.clone(), q);
        let r = bounded(move || {
            let refs: Vec<&Userptr> = us.iter().collect();
            let r = reg2.submit(&q2, &refs, |_| vec![Descriptor::nop()]);
            (r.map(|_| ()), q2)
        });
        let (r, q) = r.unwrap_or_else(|| {
            panic!("{count} x {each:#x} under {budget:#x}: submit never returned")
        });
        let e = r.unwrap_err();
        let need = (count * each) as u64;
        assert!(
            matches!(e, Error::BatchTooLarge { need: n, budget: b, .. } if n == need && b == budget as u64),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{need:#x}")) && msg.contains(&format!("{budget:#x}")),
            "the message says what it needs and the budget: {msg}"
        );
        let after = reg.stats();
        assert_eq!(
            (after.pins, after.evictions, after.retries),
            (before.pins, before.evictions, before.retries),
            "refused before pinning or evicting anything: {after}"
        );
        drop((q, reg));
    }
    pins.check();
}

#[test]
fn a_batch_that_fits_never_evicts_its_own_references() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig {
        pin_budget: Some(16 * MIB as u64),
        ..Default::default()
    });
    // Something idle in the cache, and 16 separate (never merging) 1 MiB buffers that
    // fill the budget exactly: resolving the last must evict the idle region and
    // nothing the batch resolved before.
    let bufs: Vec<Anon> = (0..16).map(|_| Anon::new(MIB)).collect();
    let us: Vec<Userptr> = bufs
        .iter()
        .map(|b| reg.register_test(b.addr, MIB, Perm::READ_WRITE).unwrap())
        .collect();
    // Start from a cold cache for the batch: only `other` is cached.
    for b in &bufs {
        reg.invalidate(range_of(b), Cause::Release).unwrap();
    }
    let other = Anon::new(MIB);
    reg.register_test(other.addr, MIB, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(reg.mappings(), 1);
    let before = reg.stats();
    let reg2 = reg.clone();
    let r = bounded(move || {
        let refs: Vec<&Userptr> = us.iter().collect();
        let f = reg2.submit(&q, &refs, |iova| {
            iova.iter()
                .enumerate()
                .map(|(i, &a)| Descriptor::fill(a, MIB as u64, 0x40 + i as u8))
                .collect()
        });
        let st = f.map(|f| q.wait_completion(f.end, WaitMode::Block, T).unwrap().status);
        (st, q)
    });
    let (st, q) = r.expect("submit never returned");
    assert_eq!(st.unwrap(), Status::Ok);
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.read().iter().all(|&x| x == 0x40 + i as u8), "buffer {i}");
    }
    let s = reg.stats();
    assert_eq!(s.retries, before.retries, "the batch started over: {s}");
    assert_eq!(
        s.evictions - before.evictions,
        1,
        "only the idle region went: {s}"
    );
    assert_eq!(s.pins - before.pins, 16, "{s}");
    drop((q, reg));
    pins.check();
}

#[test]
fn a_batch_hitting_an_oversized_cached_region_is_trimmed_once_and_fits() {
    // The batch needs 4 KiB of a 6 MiB cached region and 4 MiB elsewhere: under an
    // 8 MiB budget it fits only if the big region is re-pinned at the size it needs.
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig {
        pin_budget: Some(8 * MIB as u64),
        ..Default::default()
    });
    let big = Anon::new(6 * MIB);
    let other = Anon::new(4 * MIB);
    let u = reg
        .register_test(other.addr, 4 * MIB, Perm::READ_WRITE)
        .unwrap();
    reg.invalidate(range_of(&other), Cause::Release).unwrap();
    reg.register_test(big.addr, 6 * MIB, Perm::READ_WRITE)
        .unwrap();
    let small = reg.register_test(big.addr, PAGE, Perm::READ_WRITE).unwrap();
    assert_eq!(reg.regions().len(), 1, "only the big region is cached");
    let f = reg
        .submit(&q, &[&small, &u], |i| {
            vec![
                Descriptor::fill(i[0], PAGE as u64, 0x31),
                Descriptor::fill(i[1], 4 * MIB as u64, 0x32),
            ]
        })
        .unwrap();
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert!(big.read()[..PAGE].iter().all(|&x| x == 0x31));
    assert!(other.read().iter().all(|&x| x == 0x32));
    assert_eq!(reg.stats().trims, 1);
    drop((q, reg));
    pins.check();
}

#[test]
fn retries_are_bounded_and_build_runs_again_on_each() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig {
        submit_retries: 5,
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let builds = Arc::new(AtomicU32::new(0));
    let (reg2, b2) = (reg.clone(), builds.clone());
    let range = range_of(&buf);
    let r = bounded(move || {
        // Every build invalidates the buffer it was given: every attempt is stale.
        let r = reg2.submit(&q, &[&u], |i| {
            b2.fetch_add(1, Ordering::SeqCst);
            reg2.invalidate(range.clone(), Cause::Discard).unwrap();
            vec![Descriptor::fill(i[0], MIB as u64, 1)]
        });
        (r.map(|_| ()), q)
    });
    let (r, q) = r.expect("submit never returned");
    let e = r.unwrap_err();
    assert!(matches!(e, Error::TooManyRetries { retries: 5, .. }), "{e}");
    assert_eq!(
        builds.load(Ordering::SeqCst),
        6,
        "the first try and five retries"
    );
    assert!(
        buf.read().iter().all(|&x| x == 0x11),
        "nothing was submitted"
    );
    drop((q, reg));
    pins.check();
}

// ---------------------------------------------------------------------------------
// 2. Failed and abandoned invalidations.
// ---------------------------------------------------------------------------------

/// A FILL on `u` queued on a paused device, whose ring then stops at the next thing
/// the device does (a corrupt completion head): the work can never be proven done.
fn stuck_work(drv: &Driver, q: &CommandQueue, reg: &Registry, u: &Userptr) -> userptr::Fence {
    use userptr::ring::regs::{ring, ring_reg};
    drv.set_enabled(false);
    let len = u.len();
    let f = reg
        .submit(q, &[u], |i| vec![Descriptor::fill(i[0], len, 0x99)])
        .unwrap();
    drv.device()
        .unwrap()
        .write32(ring_reg(q.ring(), ring::CQ_HEAD), 1000);
    f.end
}

#[test]
fn a_failed_invalidation_closes_its_window_and_quarantines_the_iova() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig {
        fence_timeout: Duration::from_millis(100),
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let old_iova = reg.iova(&u).unwrap();
    let _work = stuck_work(&drv, &q, &reg, &u);
    let e = reg
        .invalidate_start(range_of(&buf), Cause::Unmap)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidationFailed { .. }), "{e}");
    // The window is closed: the range registers again (the old code blocked here).
    let (reg2, addr) = (reg.clone(), buf.addr);
    let u2 = bounded(move || reg2.register_test(addr, MIB, Perm::READ_WRITE))
        .expect("register blocked on the failed invalidation's window")
        .unwrap();
    // The work may still run one day: its IOVA range is not handed out again.
    assert_eq!(reg.stats().quarantined, 1);
    assert_eq!(drv.quarantined_iova(), MIB as u64);
    let new_iova = reg.iova(&u2).unwrap();
    assert!(
        new_iova + MIB as u64 <= old_iova || old_iova + MIB as u64 <= new_iova,
        "the quarantined IOVA {old_iova:#x} was handed out again ({new_iova:#x})"
    );
    // Once its queue is gone the device cannot reach it: the next allocation frees it.
    drop(q);
    drv.set_enabled(true);
    reg.invalidate(range_of(&buf), Cause::Release).unwrap();
    reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(drv.quarantined_iova(), 0);
    drop(reg);
    pins.check();
}

#[test]
fn a_dropped_invalidation_ends_itself() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let inv = reg
        .invalidate_start(range_of(&buf), Cause::Discard)
        .unwrap();
    drop(inv); // no invalidate_end
    let (reg2, addr) = (reg.clone(), buf.addr);
    let u = bounded(move || reg2.register_test(addr, MIB, Perm::READ_WRITE))
        .expect("register blocked on an abandoned invalidation's window")
        .unwrap();
    assert_eq!(fill(&reg, &q, &u, 0x5e), Status::Ok);
    assert!(buf.read().iter().all(|&x| x == 0x5e));
    drop((q, reg));
    pins.check();
}

#[test]
fn a_window_wait_is_bounded() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig {
        window_timeout: Duration::from_millis(50),
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let inv = reg
        .invalidate_start(range_of(&buf), Cause::Discard)
        .unwrap();
    let (reg2, addr) = (reg.clone(), buf.addr);
    let e = bounded(move || reg2.register_test(addr, MIB, Perm::READ_WRITE).map(|_| ()))
        .expect("the window wait did not end")
        .unwrap_err();
    assert!(matches!(e, Error::WindowTimeout { .. }), "{e}");
    reg.invalidate_end(inv);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(fill(&reg, &q, &u, 0x5f), Status::Ok);
    drop((q, reg));
    pins.check();
}

// ---------------------------------------------------------------------------------
// 3. Teardown with work stuck on the device.
// ---------------------------------------------------------------------------------

#[test]
fn teardown_aborts_stuck_work_before_its_iova_is_reused() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let cfg = || RegistryConfig {
        fence_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let a = Registry::new(drv.clone(), cfg());
    let buf_a = Anon::new(MIB);
    let ua = a.register_test(buf_a.addr, MIB, Perm::READ_WRITE).unwrap();
    let iova_a = a.iova(&ua).unwrap();
    drv.set_enabled(false); // the device stops making progress
    let f = a
        .submit(&q, &[&ua], |i| {
            vec![Descriptor::fill(i[0], MIB as u64, 0xaa)]
        })
        .unwrap();
    drop(a);
    // A new owner: the allocator hands out the lowest free IOVA, the one just freed.
    let b = Registry::new(drv.clone(), cfg());
    let buf_b = Anon::new(MIB);
    let ub = b.register_test(buf_b.addr, MIB, Perm::READ_WRITE).unwrap();
    let iova_b = b.iova(&ub).unwrap();
    drv.set_enabled(true);
    let c = q.wait_completion(f.end, WaitMode::Block, T).unwrap();
    assert_eq!(
        c.status,
        Status::Aborted,
        "the orphaned command ran (IOVA {iova_a:#x}, new owner {iova_b:#x})"
    );
    assert!(
        buf_b.read().iter().all(|&x| x == 0x11),
        "it wrote the new owner's pages"
    );
    assert!(buf_a.read().iter().all(|&x| x == 0x11));
    drop((q, b));
    pins.check();
}

#[test]
fn teardown_waits_one_timeout_for_all_its_regions() {
    const REGIONS: usize = 16;
    let timeout = Duration::from_millis(500);
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 32).unwrap();
    let reg = Registry::new(
        drv.clone(),
        RegistryConfig {
            fence_timeout: timeout,
            ..Default::default()
        },
    );
    let bufs: Vec<Anon> = (0..REGIONS).map(|_| Anon::new(MIB)).collect();
    let us: Vec<Userptr> = bufs
        .iter()
        .map(|b| reg.register_test(b.addr, MIB, Perm::READ_WRITE).unwrap())
        .collect();
    assert_eq!(reg.mappings(), REGIONS);
    drv.set_enabled(false);
    let fences: Vec<_> = us
        .iter()
        .map(|u| {
            reg.submit(&q, &[u], |i| vec![Descriptor::fill(i[0], MIB as u64, 0x77)])
                .unwrap()
        })
        .collect();
    let t0 = Instant::now();
    drop(reg);
    let took = t0.elapsed();
    drv.set_enabled(true);
    // One timeout, a reset, and the reset's completions: far less than a timeout per
    // region one after the other (the old teardown: REGIONS x timeout).
    assert!(
        took < timeout * (REGIONS as u32) / 4,
        "teardown took {took:?} for {REGIONS} regions with a {timeout:?} timeout"
    );
    for f in fences {
        let c = q.wait_completion(f.end, WaitMode::Block, T).unwrap();
        assert_eq!(c.status, Status::Aborted);
    }
    for b in &bufs {
        assert!(b.read().iter().all(|&x| x == 0x11));
    }
    drop(q);
    pins.check();
}

#[test]
fn teardown_quarantines_the_iova_of_work_it_cannot_prove_finished() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(
        drv.clone(),
        RegistryConfig {
            fence_timeout: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let old = reg.iova(&u).unwrap();
    let _work = stuck_work(&drv, &q, &reg, &u);
    drop(reg);
    assert_eq!(drv.quarantined_iova(), MIB as u64);
    drv.set_enabled(true);
    // Whatever maps next, never at the quarantined range.
    let m = drv.map_user_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert!(
        m.iova() + MIB as u64 <= old || old + MIB as u64 <= m.iova(),
        "the quarantined IOVA {old:#x} was handed out again"
    );
    drop(m);
    // The queue goes: its work can no longer run, so the range is released.
    drop(q);
    let m = drv.map_user_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(drv.quarantined_iova(), 0);
    drop(m);
    assert!(buf.read().iter().all(|&x| x == 0x11));
    drop(drv);
    pins.check();
}

// ---------------------------------------------------------------------------------
// 4. Permission changes only narrow.
// ---------------------------------------------------------------------------------

#[test]
fn a_downgrade_only_ever_narrows_what_the_device_may_do() {
    const DOWN: Cause = Cause::Protect {
        new_prot: libc::PROT_READ,
    };
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let submit_status = |u: &Userptr, d: fn(u64, u64) -> Descriptor| -> Option<Status> {
        let len = u.len();
        let f = reg.submit(&q, &[u], |i| vec![d(i[0], len)]).ok()?;
        Some(q.wait_completion(f.end, WaitMode::Block, T).unwrap().status)
    };
    let crc = |a, len| Descriptor::crc32c(a, len, 0);
    let write = |a, len| Descriptor::fill(a, len, 0x66);
    for (perm, may_read, may_write) in [
        (Perm::READ, true, false),
        (Perm::WRITE, false, false),
        (Perm::READ_WRITE, true, false),
    ] {
        let buf = Anon::new(MIB);
        let u = reg.register_test(buf.addr, MIB, perm).unwrap();
        let inv = reg.invalidate_start(range_of(&buf), DOWN).unwrap();
        buf.mprotect(libc::PROT_READ);
        reg.invalidate_end(inv);
        let read = submit_status(&u, crc);
        let wrote = submit_status(&u, write);
        assert_eq!(
            read == Some(Status::Ok),
            may_read,
            "{perm:?} after a downgrade: device read {read:?}"
        );
        assert_eq!(
            wrote == Some(Status::Ok),
            may_write,
            "{perm:?} after a downgrade: device write {wrote:?}"
        );
        assert!(
            buf.read().iter().all(|&x| x == 0x11),
            "{perm:?}: a write landed"
        );
        buf.mprotect(libc::PROT_READ | libc::PROT_WRITE);
        reg.invalidate(range_of(&buf), Cause::Release).unwrap();
    }
    drop((q, reg));
    pins.check();
}

// ---------------------------------------------------------------------------------
// 6. A domain that runs out.
// ---------------------------------------------------------------------------------

fn small_domain(slots: u32, iova: std::ops::Range<u64>) -> Driver {
    Driver::with_reference(ReferenceConfig {
        iommu: UringIommuConfig {
            slots,
            iova_ranges: vec![iova],
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn domain_slot_exhaustion_evicts_idle_regions_and_keeps_the_ring_reserve() {
    const SLOTS: usize = 200;
    let pins = PinCheck::start();
    let drv = small_domain(SLOTS as u32, 0x10_0000..1 << 39);
    let q = drv.queue(0, 16).unwrap();
    let (a, b) = (
        Registry::new(drv.clone(), RegistryConfig::default()),
        Registry::new(drv.clone(), RegistryConfig::default()),
    );
    assert_eq!(a.max_mappings(), SLOTS - 64);
    // Every other page, so nothing merges.
    let buf = Anon::new(2 * SLOTS * 2 * PAGE);
    let page = |i: usize| buf.addr + 2 * i * PAGE;
    for i in 0..SLOTS - 64 {
        a.register_test(page(i), PAGE, Perm::READ_WRITE).unwrap();
    }
    // B's registrations find the domain at its limit for registries: idle regions
    // (A's, for B's first ones) make room.
    let ub: Vec<Userptr> = (SLOTS..2 * SLOTS - 64)
        .map(|i| b.register_test(page(i), PAGE, Perm::READ_WRITE).unwrap())
        .collect();
    assert!(a.stats().evictions >= 1, "{}", a.stats());
    assert!(
        drv.domain().mappings() <= SLOTS - 64,
        "{}",
        drv.domain().mappings()
    );
    // The slots kept for ring memory are still there.
    let q2 = drv.queue(1, 16).unwrap();
    assert_eq!(fill(&b, &q2, &ub[0], 0x12), Status::Ok);
    drop((q, q2, a, b));
    pins.check();
}

#[test]
fn iova_exhaustion_evicts_idle_regions_for_registrations_and_rings() {
    const PAGES: u64 = 32;
    let pins = PinCheck::start();
    let drv = small_domain(1024, 0x10_0000..0x10_0000 + PAGES * PAGE as u64);
    let q = drv.queue(0, 16).unwrap(); // one page of the IOVA space
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let buf = Anon::new(2 * 64 * PAGE);
    let us: Vec<Userptr> = (0..48)
        .map(|i| {
            reg.register_test(buf.addr + 2 * i * PAGE, PAGE, Perm::READ_WRITE)
                .unwrap()
        })
        .collect();
    assert!(reg.stats().evictions >= 16, "{}", reg.stats());
    // A ring needs IOVA space too: idle regions make room for it.
    let q2 = drv.queue(1, 16).unwrap();
    assert_eq!(fill(&reg, &q2, &us[0], 0x13), Status::Ok);
    assert_eq!(fill(&reg, &q, &us[47], 0x14), Status::Ok);
    drop((q, q2, reg));
    pins.check();
}

// ---------------------------------------------------------------------------------
// 7. A queue of another driver.
// ---------------------------------------------------------------------------------

#[test]
fn a_queue_of_another_driver_is_refused() {
    let pins = PinCheck::start();
    let (_x, qx, reg) = setup(RegistryConfig::default());
    let y = Driver::reference().unwrap();
    let qy = y.queue(0, 16).unwrap();
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let e = reg
        .submit(&qy, &[&u], |i| vec![Descriptor::fill(i[0], MIB as u64, 1)])
        .unwrap_err();
    assert!(matches!(e, Error::ForeignQueue { queue: 0 }), "{e}");
    // Y's ring is untouched and keeps working; X's queue works with the registry.
    qy.run(Descriptor::nop()).unwrap();
    assert_eq!(fill(&reg, &qx, &u, 2), Status::Ok);
    drop((qx, qy, reg, y));
    pins.check();
}

// ---------------------------------------------------------------------------------
// 8. Duration::MAX.
// ---------------------------------------------------------------------------------

#[test]
fn duration_max_is_no_deadline_and_panics_nowhere() {
    let pins = PinCheck::start();
    let (drv, mut q, reg) = setup(RegistryConfig {
        fence_timeout: Duration::MAX,
        window_timeout: Duration::MAX,
        ..Default::default()
    });
    q.set_timeout(Duration::MAX);
    let f = q.submit(Descriptor::nop(), Backpressure::Wait).unwrap();
    q.wait(f, WaitMode::Block, Duration::MAX).unwrap();
    let f = q.submit(Descriptor::nop(), Backpressure::Wait).unwrap();
    q.wait(f, WaitMode::Poll, Duration::MAX).unwrap();
    q.wait_done(f.seqno, Duration::MAX).unwrap();
    q.wait_for_room(1).unwrap();
    drv.reset(Duration::MAX).unwrap();
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    drv.set_enabled(false);
    let f = reg
        .submit(&q, &[&u], |i| {
            vec![Descriptor::fill(i[0], MIB as u64, 0x21)]
        })
        .unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| reg.invalidate(range_of(&buf), Cause::Discard));
        std::thread::sleep(Duration::from_millis(50));
        drv.set_enabled(true);
        h.join().expect("the invalidation panicked").unwrap();
    });
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, Duration::MAX)
            .unwrap()
            .status,
        Status::Ok
    );
    assert_eq!(reg.pinned_bytes(), 0, "a region stayed pinned");
    assert_eq!(fill(&reg, &q, &u, 0x22), Status::Ok);
    drop((q, reg));
    pins.check();
}

// ---------------------------------------------------------------------------------
// 9. userfaultfd monitor start/stop cycles.
// ---------------------------------------------------------------------------------

#[test]
fn uffd_start_stop_cycles_leave_nothing_behind() {
    let _serial = common::serial();
    let out = run_child("uffd_cycles_child");
    assert!(out.contains("cycles ok"), "{out}");
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

/// The monitor's threads alive now (the kernel's io_uring workers come and go).
fn monitor_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("userptr-uffd"))
        .count()
}

/// [`monitor_threads`] once it stops changing towards zero: a joined thread's
/// `/proc/self/task` entry can outlive the join by a moment (the kernel wakes the joiner
/// before it reaps the task), so wait, bounded, for such entries to go.
fn settled_monitor_threads() -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while monitor_threads() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    monitor_threads()
}

/// Child body: a userfaultfd monitor is process-wide state.
#[test]
#[ignore = "child process body of uffd_start_stop_cycles_leave_nothing_behind"]
fn uffd_cycles_child() {
    use userptr::driver::monitor::uffd::UffdMonitor;
    assert!(
        is_child(),
        "run through uffd_start_stop_cycles_leave_nothing_behind"
    );
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    UffdMonitor::start(&reg).unwrap().stop();
    let (fds, threads, observers) = (
        count_dir("/proc/self/fd"),
        settled_monitor_threads(),
        reg.observers(),
    );
    assert_eq!(observers, 0, "stop left its observer behind");
    for _ in 0..200 {
        let m = UffdMonitor::start(&reg).unwrap();
        assert_eq!(reg.observers(), 1);
        reg.invalidate(range_of(&buf), Cause::Discard).unwrap();
        assert_eq!(fill(&reg, &q, &u, 0x23), Status::Ok);
        m.stop();
    }
    assert_eq!(reg.observers(), observers, "observers piled up");
    assert_eq!(count_dir("/proc/self/fd"), fds, "file descriptors piled up");
    assert_eq!(
        (threads, settled_monitor_threads()),
        (0, 0),
        "monitor threads left behind"
    );
    drop((q, reg));
    pins.check();
    println!("cycles ok");
}

// ---------------------------------------------------------------------------------
// 10. Unclaimed completions.
// ---------------------------------------------------------------------------------

#[test]
fn completions_a_batch_leaves_unclaimed_stay_bounded_by_the_ring_size() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let bound = (q.size() as usize).max(userptr::driver::queue::store::MIN_CAP);
    let mut last = None;
    for i in 0..3000u64 {
        // Three commands, one with a result, and only the last fence waited for.
        let f = reg
            .submit(&q, &[&u], |a| {
                vec![
                    Descriptor::fill(a[0], PAGE as u64, i as u8),
                    Descriptor::crc32c(a[0], PAGE as u64, 0),
                    Descriptor::nop(),
                ]
            })
            .unwrap();
        q.wait(f.end, WaitMode::Block, T).unwrap();
        assert!(
            q.unclaimed_entries() <= bound,
            "{} entries",
            q.unclaimed_entries()
        );
        last = Some(f);
    }
    // An earlier fence of the last batch still answers, with its own completion.
    let f = last.unwrap();
    let c = q.wait_completion(f.start, WaitMode::Block, T).unwrap();
    assert_eq!((c.seqno, c.status), (f.start.seqno, Status::Ok));
    let crc = q
        .wait(
            userptr::Fence {
                ring: 0,
                seqno: f.start.seqno + 1,
            },
            WaitMode::Block,
            T,
        )
        .unwrap();
    assert_eq!(crc.result as u32, crc32c::crc32c(&[2999u64 as u8; PAGE]));
    drop((q, reg));
    pins.check();
}

// ---------------------------------------------------------------------------------
// A and B. Application code runs outside the driver.
// ---------------------------------------------------------------------------------

#[test]
fn a_build_that_remaps_its_own_buffer_lands_in_the_new_pages() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Arc::new(std::sync::Mutex::new(Anon::new(MIB)));
    let (addr, range) = {
        let b = buf.lock().unwrap();
        (b.addr, range_of(&b))
    };
    let u = reg.register_test(addr, MIB, Perm::READ_WRITE).unwrap();
    let builds = Arc::new(AtomicU32::new(0));
    let outside = Arc::new(AtomicBool::new(true));
    let (reg2, buf2, b2, o2) = (reg.clone(), buf.clone(), builds.clone(), outside.clone());
    let r = bounded(move || {
        let f = reg2.submit(&q, &[&u], |i| {
            o2.fetch_and(!driver_section::in_driver(), Ordering::SeqCst);
            // The first build replaces the buffer's pages, telling the registry.
            if b2.fetch_add(1, Ordering::SeqCst) == 0 {
                let inv = reg2.invalidate_start(range.clone(), Cause::Unmap).unwrap();
                buf2.lock().unwrap().remap_fixed(0x44);
                reg2.invalidate_end(inv);
            }
            vec![Descriptor::fill(i[0], MIB as u64, 0x55)]
        });
        let st = f.map(|f| q.wait_completion(f.end, WaitMode::Block, T).unwrap().status);
        (st, q)
    });
    let (st, q) = r.expect("a build that invalidates its own buffer deadlocked");
    assert_eq!(st.unwrap(), Status::Ok);
    assert!(
        outside.load(Ordering::SeqCst),
        "build ran inside the driver section"
    );
    assert_eq!(
        builds.load(Ordering::SeqCst),
        2,
        "built again after the invalidation"
    );
    assert!(
        buf.lock().unwrap().read().iter().all(|&x| x == 0x55),
        "the command did not land in the pages the process sees"
    );
    drop((q, reg));
    pins.check();
}

struct Outside(AtomicU32, AtomicBool);

impl RegionObserver for Outside {
    fn pinned(&self, _range: std::ops::Range<u64>) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1
            .fetch_and(!driver_section::in_driver(), Ordering::SeqCst);
    }
}

#[test]
fn observers_run_outside_the_driver_section_and_can_be_removed() {
    let pins = PinCheck::start();
    let (_drv, _q, reg) = setup(RegistryConfig::default());
    let o = Arc::new(Outside(AtomicU32::new(0), AtomicBool::new(true)));
    let id = reg.add_observer(o.clone());
    let buf = Anon::new(2 * MIB);
    reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(o.0.load(Ordering::SeqCst), 1);
    assert!(
        o.1.load(Ordering::SeqCst),
        "the observer ran inside the driver section"
    );
    assert!(reg.remove_observer(id));
    assert!(!reg.remove_observer(id));
    reg.register_test(buf.addr + MIB, MIB, Perm::READ).unwrap();
    assert_eq!(
        o.0.load(Ordering::SeqCst),
        1,
        "a removed observer was called"
    );
    drop((_q, reg));
    pins.check();
}
