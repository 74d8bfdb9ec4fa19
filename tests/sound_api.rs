//! The sound API (issue 13 part 1): a registration that borrows its buffer unregisters
//! on drop (waiting for the device work on it), `Registry::unregister`, registrations
//! belong to their registry, and a failed command cannot be waited for as `Ok` (one by
//! one or anywhere in a batch).

mod common;
use common::RegisterTest as _;

use common::PinCheck;
use std::time::Duration;
use userptr::{
    AccessKind, Cause, Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status, WaitMode,
};

const T: Duration = Duration::from_secs(30);

fn setup() -> (Driver, userptr::CommandQueue, Registry) {
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    (drv, q, reg)
}

fn releases(reg: &Registry) -> u64 {
    reg.stats().invalidations[Cause::Release.index()]
}

/// Dropping a borrowed registration while its command is still running waits for the
/// command: when `drop` returns, the device is done with the buffer and the borrow may
/// end. (With the lazy `'static` behaviour the drop returns at once, long before a
/// 64 MiB FILL through the reference device completes.)
#[test]
fn dropping_a_borrowed_registration_waits_for_the_device_and_unpins() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup();
    let mut buf = vec![0u8; 64 << 20];
    let u = reg.register_slice(&mut buf).unwrap();
    assert!(u.unregisters_on_drop());
    let len = u.len();
    let f = reg
        .submit(&q, &[&u], |i| vec![Descriptor::fill(i[0], len, 0x5a)])
        .unwrap();
    drop(u);
    assert!(
        q.completed_seqno() >= f.end.seqno,
        "the borrow ended while the device could still write the buffer"
    );
    assert_eq!(releases(&reg), 1, "the drop unregistered (Cause::Release)");
    assert_eq!(reg.pinned_bytes(), 0, "nothing of the buffer stays pinned");
    assert!(buf.iter().all(|&b| b == 0x5a));
    q.wait(f.end, WaitMode::Block, T).unwrap();
    drop((reg, q, drv));
    pins.check();
}

/// `unregister` does what the drop does, and reports the result; a registry refuses
/// registrations another one made.
#[test]
fn unregister_releases_one_registration_and_registries_keep_to_their_own() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup();
    let other = Registry::new(drv.clone(), RegistryConfig::default());
    let mut a = vec![0u32; 4096];
    let mut b = vec![0u32; 4096];
    let ua = reg.register_slice(&mut a).unwrap();
    let ub = reg.register_slice(&mut b).unwrap();
    let pinned = reg.pinned_bytes();
    assert!(pinned > 0);

    let e = other
        .submit(&q, &[&ua], |i| vec![Descriptor::fill(i[0], 4, 1)])
        .unwrap_err();
    assert!(matches!(e, Error::ForeignUserptr { .. }), "{e}");
    assert!(matches!(other.iova(&ua), Err(Error::ForeignUserptr { .. })));
    let e = other.unregister(ua).unwrap_err();
    assert!(matches!(e, Error::ForeignUserptr { .. }), "{e}");
    // The refused unregistration dropped `ua`, which unregistered through its own
    // registry.
    assert_eq!(releases(&reg), 1);
    assert_eq!(releases(&other), 0);

    reg.unregister(ub).unwrap();
    assert_eq!(releases(&reg), 2);
    assert_eq!(reg.pinned_bytes(), 0);
    // Both buffers are the program's again.
    a[0] = 1;
    b[0] = 2;
    assert_eq!(a[0] + b[0], 3);
    drop((other, reg, q, drv));
    pins.check();
}

/// A registration by address (`'static`) keeps the lazy cache: dropping it leaves the
/// pin, and registering the range again is a hit. It can be cloned; a borrowed one
/// cannot (a compile-time property: see the facade's `compile_fail` doc tests).
#[test]
fn a_raw_registration_keeps_its_pin_cached_on_drop() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup();
    let buf = common::Anon::new(1 << 20);
    let u = reg
        .register_test(buf.addr, buf.len, Perm::READ_WRITE)
        .unwrap();
    assert!(!u.unregisters_on_drop());
    let twin = u.clone();
    assert_eq!(twin, u);
    drop((u, twin));
    assert_eq!(releases(&reg), 0);
    assert!(reg.pinned_bytes() >= 1 << 20, "still cached");
    let hits = reg.stats().hits;
    let _again = reg
        .register_test(buf.addr, buf.len, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(reg.stats().hits, hits + 1);
    reg.clear().unwrap();
    drop((reg, q, drv));
    pins.check();
}

/// A registration outliving its registry: the registry's teardown unmapped it, and
/// the drop has nothing left to do (no panic, no error).
#[test]
fn a_borrowed_registration_may_outlive_its_registry() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup();
    let mut buf = vec![7u64; 1024];
    let u = reg.register_slice(&mut buf).unwrap();
    drop((reg, q, drv));
    drop(u);
    assert!(buf.iter().all(|&v| v == 7));
    pins.check();
}

/// `wait` on a faulted command is the fault as an error; `wait_completion` gives the
/// raw completion.
#[test]
fn waiting_for_a_faulted_command_is_an_error() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup();
    let src = vec![1u8; 8192];
    let ro = reg.register_slice_ref(&src).unwrap();
    let fill = |i: &[u64]| vec![Descriptor::fill(i[0], 4096, 9)];
    let f = reg.submit(&q, &[&ro], fill).unwrap();
    match q.wait(f.end, WaitMode::Block, T) {
        Err(Error::Command {
            status: Status::DmaFault,
            fault: Some(fr),
            ..
        }) => assert_eq!(fr.access, AccessKind::Write),
        r => panic!("expected the DMA fault, got {r:?}"),
    }
    let f = reg.submit(&q, &[&ro], fill).unwrap();
    let c = q.wait_completion(f.end, WaitMode::Block, T).unwrap();
    assert_eq!(c.status, Status::DmaFault);
    assert!(
        src.iter().all(|&b| b == 1),
        "the device wrote read-only memory"
    );
    drop((ro, reg, q, drv));
    pins.check();
}

/// A batch whose *first* command faults and whose last succeeds: waiting for its last
/// fence alone is `Ok`; `wait_batch` is the fault. The same batch with no fault waits
/// clean.
#[test]
fn a_batch_wait_reports_a_fault_in_any_command() {
    let pins = PinCheck::start();
    let (drv, q, reg) = setup();
    let src = vec![1u8; 4096];
    let mut dst = vec![0u8; 4096];
    let ro = reg.register_slice_ref(&src).unwrap();
    let rw = reg.register_slice(&mut dst).unwrap();
    let faulty = |i: &[u64]| {
        vec![
            Descriptor::fill(i[0], 4096, 9), // into read-only memory: faults
            Descriptor::fill(i[1], 4096, 3),
        ]
    };
    let f = reg.submit(&q, &[&ro, &rw], faulty).unwrap();
    assert_ne!(f.start, f.end);
    let last = q.wait(f.end, WaitMode::Block, T).unwrap();
    assert_eq!(last.status, Status::Ok, "the last command alone succeeded");

    let f = reg.submit(&q, &[&ro, &rw], faulty).unwrap();
    let e = q.wait_batch(f, WaitMode::Block, T).unwrap_err();
    assert!(
        matches!(e, Error::Command { status: Status::DmaFault, seqno, .. } if seqno == f.start.seqno),
        "{e}"
    );
    // Claimed with the batch: the first fence has nothing left.
    assert!(matches!(
        q.wait_completion(f.start, WaitMode::Poll, T),
        Err(Error::NoCompletion { .. })
    ));

    let clean = |i: &[u64]| {
        vec![
            Descriptor::fill(i[0], 2048, 4),
            Descriptor::fill(i[0] + 2048, 2048, 5),
        ]
    };
    let f = reg.submit(&q, &[&rw], clean).unwrap();
    q.wait_batch(f, WaitMode::Block, T).unwrap();
    reg.unregister(rw).unwrap();
    assert!(dst[..2048].iter().all(|&b| b == 4) && dst[2048..].iter().all(|&b| b == 5));
    drop((ro, reg, q, drv));
    pins.check();
}
