//! The registry's policies, one cause at a time, on the reference device, with the
//! application telling the registry about each change through the explicit API (what
//! the monitors will do automatically). Each test would fail with the protection off:
//! `tests/hazard.rs` shows what the device does without it.

mod common;
use common::{MapTest as _, RegisterTest as _};

use common::{Anon, PinCheck};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use userptr::proc_status::pinned_bytes;
use userptr::{
    Cause, CommandQueue, Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status,
    Userptr, WaitMode,
};

const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(30);
/// `mprotect` taking write away, and giving it back.
const DOWN: Cause = Cause::Protect {
    new_prot: libc::PROT_READ,
};
const UP: Cause = Cause::Protect {
    new_prot: libc::PROT_READ | libc::PROT_WRITE,
};

fn setup(cfg: RegistryConfig) -> (Driver, CommandQueue, Registry) {
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), cfg);
    (drv, q, reg)
}

/// FILL `u` with `b` through the registry and wait; returns the completion status.
fn fill(reg: &Registry, q: &CommandQueue, u: &Userptr, b: u8) -> Status {
    let len = u.len();
    let f = reg
        .submit(q, &[u], |iova| vec![Descriptor::fill(iova[0], len, b)])
        .unwrap();
    q.wait_completion(f.end, WaitMode::Block, T).unwrap().status
}

#[test]
fn registrations_hit_the_cache_and_adjacent_ones_merge() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(4 * MIB);
    let a = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!((reg.mappings(), reg.stats().pins), (1, 1));
    // Inside: a hit, no pin.
    let inside = reg
        .register_test(buf.addr + 4096, 8192, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(reg.stats().pins, 1);
    // Adjacent and overlapping: merged into one mapping.
    let b = reg
        .register_test(buf.addr + MIB, MIB, Perm::READ_WRITE)
        .unwrap();
    let c = reg
        .register_test(buf.addr + MIB / 2, 2 * MIB, Perm::READ_WRITE)
        .unwrap();
    let s = reg.stats();
    assert!(s.merges >= 2, "{s}");
    // Retired regions are unmapped once idle; one live region covers everything (mapped
    // as one mapping per 2 MiB chunk it touches).
    assert_eq!(fill(&reg, &q, &c, 1), Status::Ok);
    assert_eq!(reg.regions().len(), 1, "{}", reg.stats());
    let r = &reg.regions()[0];
    let chunks =
        (r.range.end.next_multiple_of(2 << 20) - (r.range.start & !((2 << 20) - 1))) / (2 << 20);
    assert_eq!(reg.mappings(), chunks as usize, "{}", reg.stats());
    assert_eq!(reg.pinned_bytes(), 5 * MIB as u64 / 2);
    for (u, byte) in [(&a, 2u8), (&inside, 3), (&b, 4)] {
        assert_eq!(fill(&reg, &q, u, byte), Status::Ok);
    }
    let seen = buf.read();
    assert!(seen[..4096].iter().all(|&x| x == 2));
    assert!(seen[4096..12288].iter().all(|&x| x == 3));
    assert!(seen[MIB..2 * MIB].iter().all(|&x| x == 4));
    // A read-only registration of the same range is a separate mapping: the device
    // must not be able to write through it.
    let ro = reg.register_test(buf.addr, MIB, Perm::READ).unwrap();
    assert_eq!(fill(&reg, &q, &ro, 9), Status::DmaFault);
    assert_eq!(reg.regions().len(), 2);
    assert_eq!(reg.mappings(), chunks as usize + 1);
    drop((q, reg));
    pins.check();
}

#[test]
fn discard_invalidates_and_the_next_submission_repins() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(2 * MIB);
    let u = reg
        .register_test(buf.addr, 2 * MIB, Perm::READ_WRITE)
        .unwrap();
    let inv = reg
        .invalidate_start(buf.addr as u64..(buf.addr + 2 * MIB) as u64, Cause::Discard)
        .unwrap();
    buf.madvise(libc::MADV_DONTNEED);
    reg.invalidate_end(inv);
    assert_eq!(reg.pinned_bytes(), 0);
    assert_eq!(fill(&reg, &q, &u, 0xab), Status::Ok);
    assert!(
        buf.read().iter().all(|&b| b == 0xab),
        "the process sees the device's write"
    );
    let s = reg.stats();
    assert_eq!((s.invalidations[1], s.pins, s.unpins), (1, 2, 1), "{s}");
    // Idempotent: the same invalidation again finds nothing more to do... after the
    // re-pin above, it unpins once; a third finds nothing.
    reg.invalidate(buf.addr as u64..(buf.addr + 2 * MIB) as u64, Cause::Discard)
        .unwrap();
    reg.invalidate(buf.addr as u64..(buf.addr + 2 * MIB) as u64, Cause::Discard)
        .unwrap();
    assert_eq!(reg.stats().unpins, 2);
    drop((q, reg));
    pins.check();
}

#[test]
fn unmap_and_reuse_of_the_address_repins_the_new_memory() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let mut buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let inv = reg
        .invalidate_start(buf.addr as u64..(buf.addr + MIB) as u64, Cause::Unmap)
        .unwrap();
    buf.unmap();
    buf.remap_fixed(0x22);
    reg.invalidate_end(inv);
    assert_eq!(fill(&reg, &q, &u, 0xcd), Status::Ok);
    assert!(buf.read().iter().all(|&b| b == 0xcd));
    assert_eq!(reg.stats().invalidations[0], 1);
    drop((q, reg));
    pins.check();
}

#[test]
fn protection_downgrade_makes_the_device_mapping_read_only_and_upgrade_restores_it() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let range = buf.addr as u64..(buf.addr + MIB) as u64;
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(fill(&reg, &q, &u, 1), Status::Ok);
    let before = reg.stats();

    let inv = reg.invalidate_start(range.clone(), DOWN).unwrap();
    buf.mprotect(libc::PROT_READ);
    reg.invalidate_end(inv);
    // The device can still read, but a write faults instead of landing silently.
    assert_eq!(fill(&reg, &q, &u, 2), Status::DmaFault);
    assert!(buf.read().iter().all(|&b| b == 1));
    let other = Anon::new(MIB);
    let o = reg
        .register_test(other.addr, MIB, Perm::READ_WRITE)
        .unwrap();
    let f = reg
        .submit(&q, &[&u, &o], |i| {
            vec![Descriptor::copy(i[0], i[1], MIB as u64)]
        })
        .unwrap();
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert!(other.read().iter().all(|&b| b == 1));

    // Upgrade: write back, and nothing was unpinned or re-pinned for either change.
    buf.mprotect(libc::PROT_READ | libc::PROT_WRITE);
    reg.invalidate(range.clone(), UP).unwrap();
    assert_eq!(fill(&reg, &q, &u, 3), Status::Ok);
    assert!(buf.read().iter().all(|&b| b == 3));
    let after = reg.stats();
    assert_eq!(after.unpins, before.unpins, "{after}");
    assert_eq!(
        after.pins,
        before.pins + 1,
        "only `other` was pinned: {after}"
    );
    assert_eq!((after.downgrades, after.restores), (1, 1));

    // PROT_NONE invalidates.
    reg.invalidate(
        range,
        Cause::Protect {
            new_prot: libc::PROT_NONE,
        },
    )
    .unwrap();
    assert_eq!(reg.stats().unpins, before.unpins + 1);
    drop((q, reg));
    pins.check();
}

#[test]
fn a_partial_invalidation_splits_the_region() {
    let pins = PinCheck::start();
    // Regions mapped whole (no chunks): the split path.
    let (_drv, q, reg) = setup(RegistryConfig {
        chunk_size: 0,
        ..RegistryConfig::default()
    });
    let buf = Anon::new(4 * MIB);
    let whole = reg
        .register_test(buf.addr, 4 * MIB, Perm::READ_WRITE)
        .unwrap();
    let head = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    let tail = reg
        .register_test(buf.addr + 3 * MIB, MIB, Perm::READ_WRITE)
        .unwrap();
    let mid = (buf.addr + MIB) as u64..(buf.addr + 3 * MIB) as u64;
    reg.invalidate(mid, Cause::Discard).unwrap();
    let s = reg.stats();
    assert_eq!(s.splits, 2, "{s}");
    assert_eq!(reg.pinned_bytes(), 2 * MIB as u64);
    assert_eq!(reg.mappings(), 2);
    let pins_before = s.pins;
    assert_eq!(fill(&reg, &q, &head, 5), Status::Ok);
    assert_eq!(fill(&reg, &q, &tail, 6), Status::Ok);
    assert_eq!(
        reg.stats().pins,
        pins_before,
        "the surviving parts were hits"
    );
    // The whole range re-pins (and merges) on its next use.
    assert_eq!(fill(&reg, &q, &whole, 7), Status::Ok);
    assert!(buf.read().iter().all(|&b| b == 7));
    drop((q, reg));
    pins.check();
}

#[test]
fn fork_and_remap_causes_follow_their_policy() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let range = buf.addr as u64..(buf.addr + MIB) as u64;
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    reg.invalidate(range.clone(), Cause::Fork).unwrap();
    assert_eq!(reg.stats().unpins, 0, "fork costs the parent nothing");
    reg.invalidate(range, Cause::Remap { to: 0x7000_0000 })
        .unwrap();
    assert_eq!(reg.stats().unpins, 1);
    assert_eq!(fill(&reg, &q, &u, 8), Status::Ok);
    drop((q, reg));
    pins.check();
}

#[test]
fn invalidation_waits_for_in_flight_device_work() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(8 * MIB);
    let u = reg
        .register_test(buf.addr, 8 * MIB, Perm::READ_WRITE)
        .unwrap();
    drv.set_enabled(false);
    let f = reg
        .submit(&q, &[&u], |i| {
            vec![Descriptor::fill(i[0], 8 * MIB as u64, 0x44)]
        })
        .unwrap();
    let returned = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            reg.invalidate(buf.addr as u64..(buf.addr + 8 * MIB) as u64, Cause::Discard)
                .unwrap();
            returned.store(true, Ordering::SeqCst);
            q.is_done(f.end.seqno)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !returned.load(Ordering::SeqCst),
            "invalidation returned while the device was still busy"
        );
        drv.set_enabled(true);
        assert!(
            h.join().unwrap(),
            "the command was complete when invalidation returned"
        );
    });
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert!(reg.stats().fence_waits >= 1);
    drop((q, reg));
    pins.check();
}

#[test]
fn a_hung_device_is_reset_and_its_work_fails_loudly() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig {
        fence_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    drv.set_enabled(false); // the device stops making progress
    let f = reg
        .submit(&q, &[&u], |i| {
            vec![Descriptor::fill(i[0], MIB as u64, 0x55)]
        })
        .unwrap();
    reg.invalidate(buf.addr as u64..(buf.addr + MIB) as u64, Cause::Unmap)
        .unwrap();
    assert_eq!(reg.stats().device_resets, 1);
    let c = q.wait_completion(f.end, WaitMode::Block, T).unwrap();
    assert_eq!(
        c.status,
        Status::Aborted,
        "the work completed with an error, not silently"
    );
    assert!(buf.read().iter().all(|&b| b == 0x11), "nothing was written");
    drv.set_enabled(true);
    drop((q, reg));
    pins.check();
}

#[test]
fn no_new_mapping_is_established_inside_an_invalidation_window() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let range = buf.addr as u64..(buf.addr + MIB) as u64;
    let inv = reg.invalidate_start(range, Cause::Discard).unwrap();
    let ended = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
            (ended.load(Ordering::SeqCst), u)
        });
        std::thread::sleep(Duration::from_millis(100));
        buf.madvise(libc::MADV_DONTNEED);
        ended.store(true, Ordering::SeqCst);
        reg.invalidate_end(inv);
        let (after_end, u) = h.join().unwrap();
        assert!(after_end, "registration completed inside the window");
        assert_eq!(fill(&reg, &q, &u, 0x66), Status::Ok);
    });
    assert!(buf.read().iter().all(|&b| b == 0x66));
    let s = reg.stats();
    assert!(s.window_waits >= 1, "{s}");
    assert!(s.window_wait_ns > 0, "the window wait was not timed: {s}");
    drop((q, reg));
    pins.check();
}

#[test]
fn concurrent_invalidations_of_disjoint_ranges_do_not_serialise() {
    let pins = PinCheck::start();
    // A fence timeout far beyond the test: A's invalidation cannot give up and reset
    // the device on its own, it returns only once the device is resumed.
    let (drv, q, reg) = setup(RegistryConfig {
        fence_timeout: Duration::from_secs(600),
        ..Default::default()
    });
    let (a, b) = (Anon::new(MIB), Anon::new(MIB));
    let range = |x: &Anon| x.addr as u64..(x.addr + x.len) as u64;
    let ua = reg.register_test(a.addr, MIB, Perm::READ_WRITE).unwrap();
    let ub = reg.register_test(b.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(reg.mappings(), 2, "two separate regions");
    drv.set_enabled(false);
    let f = reg
        .submit(&q, &[&ua], |i| {
            vec![Descriptor::fill(i[0], MIB as u64, 0x5a)]
        })
        .unwrap();
    let a_returned = AtomicBool::new(false);
    let r = &reg;
    std::thread::scope(|s| {
        let ha = s.spawn(|| {
            r.invalidate(range(&a), Cause::Discard).unwrap();
            a_returned.store(true, Ordering::SeqCst);
        });
        // A is waiting for the paused device once it counted its fence wait.
        let deadline = Instant::now() + T;
        while reg.stats().fence_waits == 0 {
            assert!(Instant::now() < deadline, "A's invalidation never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!a_returned.load(Ordering::SeqCst));
        // B, disjoint and with no work in flight, must finish while A still waits.
        // (It runs on its own thread so that a B stuck behind A fails the test after
        // the bound below instead of hanging it.)
        let (tx, rx) = mpsc::channel();
        let br = range(&b);
        s.spawn(move || {
            r.invalidate(br, Cause::Unmap).unwrap();
            tx.send(()).unwrap();
        });
        let b_returned = rx.recv_timeout(T).is_ok();
        let a_still_waiting = !a_returned.load(Ordering::SeqCst);
        let after_b = reg.stats();
        drv.set_enabled(true);
        assert!(b_returned, "B's invalidation waited for A's in-flight work");
        assert!(
            a_still_waiting,
            "A returned while its device work was paused"
        );
        assert_eq!(
            after_b.unpins, 1,
            "B's region was unmapped, A's not yet: {after_b}"
        );
        assert_eq!(after_b.fence_waits, 1, "B waited for no fence: {after_b}");
        ha.join().unwrap();
    });
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert!(a.read().iter().all(|&x| x == 0x5a));
    let s = reg.stats();
    assert_eq!((s.unpins, reg.mappings()), (2, 0), "{s}");
    for (u, x, byte) in [(&ua, &a, 1u8), (&ub, &b, 2)] {
        assert_eq!(fill(&reg, &q, u, byte), Status::Ok);
        assert!(x.read().iter().all(|&v| v == byte));
    }
    drop((q, reg));
    pins.check();
}

#[test]
fn release_tears_regions_down_and_registrations_repin_on_next_use() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    // VmPin with the driver's own ring memory pinned, no registry region yet.
    let base = pinned_bytes().unwrap();
    let (a, b) = (Anon::new(2 * MIB), Anon::new(MIB));
    let ua = reg
        .register_test(a.addr, 2 * MIB, Perm::READ_WRITE)
        .unwrap();
    let ub = reg.register_test(b.addr, MIB, Perm::READ_WRITE).unwrap();
    let ub_ro = reg.register_test(b.addr, MIB, Perm::READ).unwrap();
    assert_eq!(fill(&reg, &q, &ua, 1), Status::Ok);
    assert_eq!(fill(&reg, &q, &ub, 2), Status::Ok);
    assert_eq!(reg.mappings(), 3);
    assert!(pinned_bytes().unwrap() >= base + 4 * MIB as u64);

    // Releasing a range drops every region over it, of every permission, and
    // nothing else.
    reg.invalidate(b.addr as u64..(b.addr + MIB) as u64, Cause::Release)
        .unwrap();
    let s = reg.stats();
    assert_eq!(s.invalidations[5], 1, "{s}");
    assert_eq!((s.unpins, reg.mappings()), (2, 1), "{s}");
    assert_eq!(reg.pinned_bytes(), 2 * MIB as u64);

    // Teardown releases everything: no region, no pin left, with the registry alive.
    reg.clear().unwrap();
    let s = reg.stats();
    assert_eq!(s.invalidations[5], 2, "{s}");
    assert_eq!((reg.mappings(), reg.pinned_bytes()), (0, 0), "{s}");
    assert!(reg.regions().is_empty());
    assert_eq!(
        pinned_bytes().unwrap(),
        base,
        "VmPin back to the driver's own"
    );

    // The registrations stay valid: their next use pins again, and the device
    // reaches the memory the process sees.
    let pins_before = s.pins;
    assert_eq!(fill(&reg, &q, &ua, 3), Status::Ok);
    assert_eq!(fill(&reg, &q, &ub, 4), Status::Ok);
    assert_eq!(fill(&reg, &q, &ub_ro, 5), Status::DmaFault);
    assert!(a.read().iter().all(|&x| x == 3));
    assert!(b.read().iter().all(|&x| x == 4));
    assert_eq!(reg.stats().pins, pins_before + 3);
    drop((q, reg));
    pins.check();
}

#[test]
fn non_destructive_madvise_costs_nothing() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(2 * MIB);
    let range = buf.addr as u64..(buf.addr + 2 * MIB) as u64;
    let u = reg
        .register_test(buf.addr, 2 * MIB, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(fill(&reg, &q, &u, 1), Status::Ok);
    let before = reg.stats();
    let regions = reg.regions();
    let vm_pin = pinned_bytes().unwrap();
    let validate = userptr::driver::registry::validate::available();
    let pfns = || userptr::driver::registry::validate::pfns(range.start, range.end).unwrap();
    let pfns_before = validate.then(pfns);
    // Only MADV_DONTNEED, MADV_FREE and MADV_REMOVE are discards (Cause::Discard); the
    // monitors let every other advice through with no invalidation at all. So nobody
    // tells the registry here, and the pinned pages must still be the process's.
    for advice in [
        libc::MADV_WILLNEED,
        libc::MADV_SEQUENTIAL,
        libc::MADV_RANDOM,
        libc::MADV_COLD,
        libc::MADV_NORMAL,
    ] {
        buf.madvise(advice);
        let byte = 0x40 + advice as u8;
        assert_eq!(fill(&reg, &q, &u, byte), Status::Ok);
        assert!(
            buf.read().iter().all(|&x| x == byte),
            "after advice {advice} the device wrote pages the process no longer maps"
        );
    }
    let after = reg.stats();
    assert_eq!(
        (after.pins, after.unpins, after.misses, after.retries),
        (before.pins, before.unpins, before.misses, before.retries),
        "{after}"
    );
    assert_eq!(after.invalidations, before.invalidations);
    assert_eq!(reg.regions(), regions, "same region, same IOVA");
    assert_eq!(pinned_bytes().unwrap(), vm_pin, "VmPin unchanged");
    if let Some(p) = pfns_before {
        assert_eq!(pfns(), p, "the same physical pages");
    }
    drop((q, reg));
    pins.check();
}

#[test]
fn large_mappings_get_iovas_congruent_to_the_host_address_modulo_2mib() {
    const HUGE: u64 = 2 << 20;
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(8 * MIB);
    // Distinct host phases modulo 2 MiB, each mapping at least 2 MiB (the first exactly).
    for (off, len) in [
        (0x5000, 2 * MIB),
        (0x13_3000, 2 * MIB + 4096),
        (3 * MIB / 2 + 0x1000, 3 * MIB),
    ] {
        let host = (buf.addr + off) as u64;
        let m = drv
            .map_user_test(buf.addr + off, len, Perm::READ_WRITE)
            .unwrap();
        assert_eq!(
            m.iova() % HUGE,
            host % HUGE,
            "IOVA {:#x} for host {host:#x}",
            m.iova()
        );
    }
    // The registry's regions are placed the same way.
    let u = reg
        .register_test(buf.addr + 0x7000, 3 * MIB, Perm::READ_WRITE)
        .unwrap();
    let r = reg.regions();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].iova % HUGE, r[0].range.start % HUGE, "{r:?}");
    assert_eq!(reg.iova(&u).unwrap() % HUGE, u.addr() % HUGE);
    assert_eq!(fill(&reg, &q, &u, 0x21), Status::Ok);
    assert!(buf.read()[0x7000..0x7000 + 3 * MIB]
        .iter()
        .all(|&x| x == 0x21));
    drop((q, reg));
    pins.check();
}

#[test]
fn the_pin_budget_evicts_idle_regions_and_refuses_what_cannot_fit() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig {
        pin_budget: Some(4 * MIB as u64),
        ..Default::default()
    });
    let bufs: Vec<Anon> = (0..3).map(|_| Anon::new(2 * MIB)).collect();
    let us: Vec<Userptr> = bufs
        .iter()
        .map(|b| {
            reg.register_test(b.addr, 2 * MIB, Perm::READ_WRITE)
                .unwrap()
        })
        .collect();
    assert!(reg.pinned_bytes() <= 4 * MIB as u64);
    assert!(reg.stats().evictions >= 1);
    for (i, u) in us.iter().enumerate() {
        assert_eq!(fill(&reg, &q, u, i as u8 + 1), Status::Ok);
        assert!(bufs[i].read().iter().all(|&b| b == i as u8 + 1));
    }
    let big = Anon::new(8 * MIB);
    let e = reg
        .register_test(big.addr, 8 * MIB, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::PinBudget { .. }), "{e}");
    // Regions with work in flight are never evicted: with the device paused and
    // both budget slots busy, a third registration fails instead.
    drv.set_enabled(false);
    let f0 = reg
        .submit(&q, &[&us[0]], |i| {
            vec![Descriptor::fill(i[0], 2 * MIB as u64, 9)]
        })
        .unwrap();
    let f1 = reg
        .submit(&q, &[&us[1]], |i| {
            vec![Descriptor::fill(i[0], 2 * MIB as u64, 9)]
        })
        .unwrap();
    let e = reg
        .register_test(bufs[2].addr, 2 * MIB, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::PinBudget { .. }), "{e}");
    drv.set_enabled(true);
    for f in [f0, f1] {
        assert_eq!(
            q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
            Status::Ok
        );
    }
    drop((q, reg));
    pins.check();
}

#[test]
fn the_mapping_count_limit_evicts() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig {
        max_mappings: Some(4),
        ..Default::default()
    });
    let buf = Anon::new(64 * 4096);
    // Every other page, so nothing merges.
    let us: Vec<Userptr> = (0..16)
        .map(|i| {
            reg.register_test(buf.addr + 2 * i * 4096, 4096, Perm::READ_WRITE)
                .unwrap()
        })
        .collect();
    assert!(reg.mappings() <= 4);
    assert!(reg.stats().evictions >= 12);
    for u in &us {
        assert_eq!(fill(&reg, &q, u, 0x77), Status::Ok);
    }
    drop((q, reg));
    pins.check();
}

#[test]
fn validation_mode_catches_a_missed_invalidation() {
    let pins = PinCheck::start();
    if !userptr::driver::registry::validate::available() {
        eprintln!("SKIP: /proc/self/pagemap PFNs need CAP_SYS_ADMIN");
        return;
    }
    let (_drv, q, reg) = setup(RegistryConfig {
        validate: true,
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    buf.madvise(libc::MADV_DONTNEED); // nobody tells the registry
    buf.fill(0x12); // fault in new pages
    assert_eq!(fill(&reg, &q, &u, 0x34), Status::Ok);
    assert!(
        buf.read().iter().all(|&b| b == 0x34),
        "validation re-pinned the new pages"
    );
    assert_eq!(reg.stats().validation_failures, 1);
    drop((q, reg));
    pins.check();
}

#[test]
fn a_fork_child_gets_no_device_and_the_parent_keeps_working() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    // SAFETY: the child only calls register (which checks an atomic and returns an
    // error without allocating or locking) and then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = match reg.register_test(buf.addr, 4096, Perm::READ) {
            Err(Error::ForkedChild) => 0,
            _ => 1,
        };
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child saw a usable device"
    );
    reg.invalidate(buf.addr as u64..(buf.addr + MIB) as u64, Cause::Fork)
        .unwrap();
    assert_eq!(fill(&reg, &q, &u, 0x99), Status::Ok);
    assert!(buf.read().iter().all(|&b| b == 0x99));
    assert_eq!(reg.stats().unpins, 0);
    drop((q, reg));
    pins.check();
}

#[test]
fn bad_registrations_are_typed_errors() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let e = reg.register_test(0x1000, 0, Perm::READ).unwrap_err();
    assert!(matches!(e, Error::ZeroLength { .. }), "{e}");
    let e = reg
        .register_test(usize::MAX - 10, 100, Perm::READ)
        .unwrap_err();
    assert!(matches!(e, Error::Overflow { .. }), "{e}");
    let none = Anon::with_prot(MIB, libc::PROT_NONE);
    let e = reg.register_test(none.addr, MIB, Perm::READ).unwrap_err();
    assert!(matches!(e, Error::BadAddress { .. }), "{e}");
    assert_eq!(reg.mappings(), 0);
    drop((q, reg));
    pins.check();
}

/// A registry on a reference device whose pin attempts fail on purpose.
fn faulty(faults: &userptr::PinFaults) -> (Driver, Registry) {
    let drv = Driver::with_reference(userptr::ReferenceConfig {
        iommu: userptr::UringIommuConfig {
            pin_faults: Some(faults.clone()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    (drv, reg)
}

#[test]
fn a_transient_eagain_pin_failure_is_retried() {
    let pins = PinCheck::start();
    let faults = userptr::PinFaults::with_errnos(2, &[libc::EAGAIN]);
    let (drv, reg) = faulty(&faults);
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(MIB);
    faults.set_enabled(true);
    // Attempt 1 fails with EAGAIN, the retry (attempt 2) pins.
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    faults.set_enabled(false);
    assert_eq!(faults.injected_eagain(), 1);
    let s = reg.stats();
    assert_eq!((s.pin_retries, s.pin_failures, s.pins), (1, 0, 1));
    assert_eq!(fill(&reg, &q, &u, 0x3c), Status::Ok);
    assert!(buf.read().iter().all(|&b| b == 0x3c));
    drop((u, q, reg, drv));
    pins.check();
}

#[test]
fn a_persistent_pin_failure_is_a_typed_error_and_leaks_nothing() {
    let pins = PinCheck::start();
    let faults = userptr::PinFaults::with_errnos(1, &[libc::EAGAIN]);
    let (drv, reg) = faulty(&faults);
    let buf = Anon::new(MIB);
    let maps = drv.domain().mappings();
    faults.set_enabled(true);
    let e = reg
        .register_test(buf.addr, MIB, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::PinAgain { .. }), "{e}");
    assert_eq!(
        faults.injected_eagain(),
        5,
        "the first try and four retries"
    );
    let s = reg.stats();
    assert_eq!((s.pin_retries, s.pin_failures, s.pins), (4, 1, 0));
    // Nothing half-done: no domain mapping (buffer-table slot), no pin, no region.
    assert_eq!(drv.domain().mappings(), maps);
    assert_eq!(reg.mappings(), 0);
    assert_eq!(reg.pinned_bytes(), 0);
    // ENOMEM with nothing idle to evict: PinLimit at once.
    let faults2 = userptr::PinFaults::with_errnos(1, &[libc::ENOMEM]);
    let (drv2, reg2) = faulty(&faults2);
    faults2.set_enabled(true);
    let e = reg2
        .register_test(buf.addr, MIB, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::PinLimit { .. }), "{e}");
    assert_eq!(faults2.injected_enomem(), 1);
    // Once the kernel agrees again, the same range registers (its IOVA space was freed).
    faults.set_enabled(false);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(reg.stats().pins, 1);
    drop((u, reg, drv, reg2, drv2));
    pins.check();
}

#[test]
fn an_enomem_pin_failure_evicts_idle_regions_and_retries() {
    let pins = PinCheck::start();
    let faults = userptr::PinFaults::with_errnos(2, &[libc::ENOMEM]);
    let (drv, reg) = faulty(&faults);
    let q = drv.queue(0, 16).unwrap();
    // Two ranges a MiB apart, so they never merge.
    let buf = Anon::new(3 * MIB);
    let (a, b) = (buf.addr, buf.addr + 2 * MIB);
    reg.register_test(a, MIB, Perm::READ_WRITE).unwrap(); // cached, idle
    assert_eq!(reg.mappings(), 1);
    faults.set_enabled(true);
    // Attempt 1: ENOMEM; the idle region is evicted; attempt 2 pins.
    let u = reg.register_test(b, MIB, Perm::READ_WRITE).unwrap();
    faults.set_enabled(false);
    let s = reg.stats();
    assert_eq!(
        (faults.injected_enomem(), s.pin_retries, s.pin_failures),
        (1, 1, 0)
    );
    assert_eq!((s.evictions, s.unpins, reg.mappings()), (1, 1, 1));
    assert_eq!(fill(&reg, &q, &u, 0x4d), Status::Ok);
    assert!(buf.read()[2 * MIB..].iter().all(|&x| x == 0x4d));
    drop((u, q, reg, drv));
    pins.check();
}

#[test]
fn the_default_pin_budget_follows_rlimit_memlock_or_ram() {
    // (The RLIMIT_MEMLOCK case, without CAP_IPC_LOCK, runs as nobody in
    // tests/bad_input.rs `pin_limit_child`.)
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig::default());
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads this process's limit into a local.
    assert_eq!(
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) },
        0
    );
    // SAFETY: fills a local struct.
    let ram = unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        assert_eq!(libc::sysinfo(&mut si), 0);
        si.totalram as u64 * si.mem_unit as u64
    };
    if caps & (1 << 14) != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        // CAP_IPC_LOCK or no limit: a quarter of RAM (or the limit, if larger and
        // below RAM).
        assert_eq!(reg.budget(), (ram / 4).max(lim.rlim_cur.min(ram)));
    } else {
        assert_eq!(reg.budget(), lim.rlim_cur);
    }
    // A request larger than the budget is refused with a clear error.
    let cfg = RegistryConfig {
        pin_budget: Some(MIB as u64),
        ..Default::default()
    };
    let (_drv2, _q2, small) = setup(cfg);
    let buf = Anon::new(2 * MIB);
    let e = small
        .register_test(buf.addr, 2 * MIB, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::PinBudget { .. }), "{e}");
    drop((q, reg, drv, _q2, small, _drv2));
    pins.check();
}

#[test]
fn pieces_of_a_downgraded_region_stay_device_read_only() {
    // Only the registry's policy is under test: the process memory itself is left
    // writable (the registry is told of a downgrade that the kernel would otherwise
    // also enforce at pin time), so a piece re-pinned writable would take the write.
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup(RegistryConfig::default());
    let buf = Anon::new(MIB);
    let range = buf.addr as u64..(buf.addr + MIB) as u64;
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    assert_eq!(fill(&reg, &q, &u, 1), Status::Ok);
    reg.invalidate(range.clone(), DOWN).unwrap();
    let middle = reg
        .register_test(buf.addr + MIB / 2, MIB / 4, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(fill(&reg, &q, &middle, 2), Status::DmaFault);

    // A discard of the first quarter splits the region: the rest comes back, still
    // device-read-only.
    reg.invalidate(range.start..range.start + MIB as u64 / 4, Cause::Discard)
        .unwrap();
    assert!(reg.stats().splits >= 1);
    assert_eq!(
        fill(&reg, &q, &middle, 3),
        Status::DmaFault,
        "split piece writable"
    );

    // A writable registration overlapping the piece does not widen over it: its pages
    // outside the new region stay device-read-only.
    let head = reg
        .register_test(buf.addr, MIB / 4 + 4096, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(fill(&reg, &q, &head, 4), Status::Ok);
    assert_eq!(
        fill(&reg, &q, &middle, 5),
        Status::DmaFault,
        "merged writable"
    );
    let b = buf.read();
    assert!(b[..MIB / 4 + 4096].iter().all(|&x| x == 4));
    assert!(
        b[MIB / 4 + 4096..].iter().all(|&x| x == 1),
        "a write landed"
    );

    // The upgrade gives write back to the device-read-only pieces inside its range.
    reg.invalidate(range.clone(), UP).unwrap();
    assert_eq!(fill(&reg, &q, &middle, 6), Status::Ok);
    drop((q, reg));
    pins.check();
}

/// Runs `second` on its own thread while `first` waits for device work on a paused
/// device; resumes the device after giving `second` time to return early, and returns
/// whether the work was done when `second` returned (it must have been).
fn second_invalidation_waits_too(
    drv: &Driver,
    q: &CommandQueue,
    reg: &Registry,
    first: impl FnOnce() + Send,
    second: impl FnOnce() + Send,
    work: userptr::ring::Fence,
) -> bool {
    std::thread::scope(|s| {
        let ha = s.spawn(first);
        let deadline = Instant::now() + T;
        while reg.stats().fence_waits == 0 {
            assert!(
                Instant::now() < deadline,
                "the first invalidation never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let hb = s.spawn(move || {
            second();
            q.is_done(work.seqno)
        });
        // Room for a second invalidation that does not wait to return (the old bug);
        // the assertion below is about order, not time.
        std::thread::sleep(Duration::from_millis(100));
        drv.set_enabled(true);
        ha.join().unwrap();
        hb.join().unwrap()
    })
}

#[test]
fn an_invalidation_overlapping_one_in_progress_waits_for_the_same_work() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig {
        fence_timeout: Duration::from_secs(600),
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let half = buf.addr as u64 + MIB as u64 / 2;
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    drv.set_enabled(false);
    let f = reg
        .submit(&q, &[&u], |i| {
            vec![Descriptor::fill(i[0], MIB as u64, 0x6b)]
        })
        .unwrap();
    // The first invalidation takes the region out of the index and waits; the second,
    // over the other half, finds no region of its own but the same work in flight.
    let (r, lo, hi) = (&reg, buf.addr as u64..half, half..(buf.addr + MIB) as u64);
    let done = second_invalidation_waits_too(
        &drv,
        &q,
        &reg,
        move || r.invalidate(lo, Cause::Discard).unwrap(),
        move || r.invalidate(hi, Cause::Unmap).unwrap(),
        f.end,
    );
    assert!(
        done,
        "the second invalidation returned while the device still wrote the range"
    );
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    drop((q, reg));
    pins.check();
}

/// A paused device with a FILL in flight on a 1 MiB registration.
fn busy(
    fill_byte: u8,
) -> (
    PinCheck,
    Driver,
    CommandQueue,
    Registry,
    Anon,
    Userptr<'static>,
    userptr::ring::Fence,
) {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup(RegistryConfig {
        fence_timeout: Duration::from_secs(600),
        ..Default::default()
    });
    let buf = Anon::new(MIB);
    let u = reg.register_test(buf.addr, MIB, Perm::READ_WRITE).unwrap();
    drv.set_enabled(false);
    let f = reg
        .submit(&q, &[&u], |i| {
            vec![Descriptor::fill(i[0], MIB as u64, fill_byte)]
        })
        .unwrap();
    (pins, drv, q, reg, buf, u, f.end)
}

#[test]
fn a_second_downgrade_waits_for_the_first() {
    let (pins, drv, q, reg, buf, u, work) = busy(0x7c);
    let range = buf.addr as u64..(buf.addr + MIB) as u64;
    let (r, r1, r2) = (&reg, range.clone(), range);
    let done = second_invalidation_waits_too(
        &drv,
        &q,
        &reg,
        move || r.invalidate(r1, DOWN).unwrap(),
        move || r.invalidate(r2, DOWN).unwrap(),
        work,
    );
    assert!(
        done,
        "the second downgrade returned while the device still wrote the range"
    );
    assert_eq!(
        q.wait_completion(work, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert_eq!(fill(&reg, &q, &u, 0x22), Status::DmaFault);
    assert!(buf.read().iter().all(|&x| x == 0x7c));
    drop((q, reg));
    pins.check();
}

#[test]
fn a_write_submitted_during_a_downgrade_waits_for_the_read_only_mapping() {
    let (pins, drv, q, reg, buf, u, work) = busy(0x7c);
    let range = buf.addr as u64..(buf.addr + MIB) as u64;
    let late = std::sync::Mutex::new(None);
    let (r, ur, lr, qr) = (&reg, &u, &late, &q);
    second_invalidation_waits_too(
        &drv,
        &q,
        &reg,
        move || r.invalidate(range, DOWN).unwrap(),
        // A cache hit on a region whose device mapping is about to become read-only.
        move || *lr.lock().unwrap() = Some(fill(r, qr, ur, 0x11)),
        work,
    );
    assert_eq!(
        q.wait_completion(work, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert_eq!(
        late.lock().unwrap().take(),
        Some(Status::DmaFault),
        "a write submitted during the downgrade reached the memory"
    );
    assert!(buf.read().iter().all(|&x| x == 0x7c));
    drop((q, reg));
    pins.check();
}
