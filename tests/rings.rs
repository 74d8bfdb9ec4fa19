//! Command rings on the reference device: every opcode against a CPU model, several
//! rings and several submitting threads at once, both completion-wait modes.

mod common;
use common::MapTest as _;

use common::{Anon, PinCheck};
use std::time::Duration;
use userptr::{
    Backpressure, CommandQueue, Completion, Descriptor, Driver, Flags, Perm, Status, WaitMode,
};

const T: Duration = Duration::from_secs(30);

#[test]
fn every_opcode_matches_the_cpu() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 32).unwrap();
    // Sizes chosen to cross the device's 1 MiB chunking and page boundaries.
    let n = (3 << 20) / 4 + 123;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.25).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut x_dev = x.clone();
    let mut y_dev = y.clone();
    let mx = drv.map_slice(&mut x_dev).unwrap();
    let my = drv.map_slice(&mut y_dev).unwrap();
    q.run(Descriptor::saxpy(1.5, mx.iova(), my.iova(), n as u64))
        .unwrap();
    for (y, x) in y.iter_mut().zip(&x) {
        *y += 1.5 * *x;
    }
    drop((mx, my));
    assert_eq!(y_dev, y, "SAXPY must match the CPU bit for bit");

    let mut bytes: Vec<u8> = (0..(5 << 20) + 17).map(|i| (i * 31 % 251) as u8).collect();
    let mut copy = vec![0u8; bytes.len()];
    let mb = drv.map_slice(&mut bytes).unwrap();
    let mc = drv.map_slice(&mut copy).unwrap();
    let c = q.run(Descriptor::crc32c(mb.iova(), mb.len(), 0)).unwrap();
    q.run(Descriptor::copy(mb.iova(), mc.iova(), mb.len()))
        .unwrap();
    let c2 = q.run(Descriptor::crc32c(mb.iova_at(7), 1000, 0)).unwrap();
    q.run(Descriptor::fill(mc.iova_at(10), 20, 0xee)).unwrap();
    q.run(Descriptor::write_fence(
        mc.iova_at(40),
        0x0123_4567_89ab_cdef,
    ))
    .unwrap();
    drop((mb, mc));
    assert_eq!(c.result as u32, crc32c::crc32c(&bytes));
    assert_eq!(c2.result as u32, crc32c::crc32c(&bytes[7..1007]));
    let mut expect = bytes.clone();
    expect[10..30].fill(0xee);
    expect[40..48].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    assert!(
        copy == expect,
        "COPY, FILL and WRITE_FENCE must match the CPU model"
    );
    drop((q, drv));
    pins.check();
}

#[test]
fn completions_arrive_in_order_with_monotonic_fences_in_both_wait_modes() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let mut last = 0;
    for i in 0..200u64 {
        let f = q.submit(Descriptor::nop(), Backpressure::Wait).unwrap();
        assert!(f.seqno > last);
        last = f.seqno;
        let mode = if i % 2 == 0 {
            WaitMode::Poll
        } else {
            WaitMode::Block
        };
        let c = q.wait_completion(f, mode, T).unwrap();
        assert_eq!((c.seqno, c.status), (f.seqno, Status::Ok));
        assert!(q.completed_seqno() >= f.seqno);
    }
    // Batches: one doorbell, many commands; waiting on the last covers the rest.
    let f = q
        .submit_batch(&[Descriptor::nop(); 64], Backpressure::Wait)
        .unwrap();
    q.wait(f.end, WaitMode::Poll, T).unwrap();
    assert!(q.completed_seqno() >= f.end.seqno);
    for s in f.start.seqno..f.end.seqno {
        let c = q
            .wait(userptr::Fence { ring: 0, seqno: s }, WaitMode::Poll, T)
            .unwrap();
        assert_eq!(c.seqno, s);
    }
    // A completion can be claimed once.
    let e = q.wait(f.end, WaitMode::Poll, T).unwrap_err();
    assert!(matches!(e, userptr::Error::NoCompletion { .. }), "{e}");
    drop((q, drv));
    pins.check();
}

/// Submit `desc` with the device paused, then wait for it blocking while another
/// thread resumes the device, so that the wait starts before the completion exists.
/// Returns the completion and the eventfd wake-ups the wait counted.
fn paused_blocking_wait(drv: &Driver, q: &CommandQueue, desc: Descriptor) -> (Completion, u64) {
    drv.set_enabled(false);
    let f = q.submit(desc, Backpressure::Wait).unwrap();
    let before = q.irq_wakeups();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            drv.set_enabled(true);
        });
        let c = q.wait_completion(f, WaitMode::Block, T).unwrap();
        (c, q.irq_wakeups() - before)
    })
}

#[test]
fn blocking_wait_sleeps_on_the_ring_eventfd() {
    use userptr::ring::regs::IRQ_MASK;
    const RING: u32 = 2;
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(RING, 8).unwrap();
    let buf = Anon::new(8 << 20);
    let m = drv
        .map_user_test(buf.addr, buf.len, Perm::READ_WRITE)
        .unwrap();
    let dev = drv.device().unwrap();
    let mask = dev.read32(IRQ_MASK);
    assert_ne!(mask & 1 << RING, 0, "an open queue's interrupt is enabled");

    // Control: with the ring's interrupt masked and no INTERRUPT flag the device does
    // not signal. The wait still completes (its safety slice re-checks), but counts no
    // eventfd wake-up: the counter sees only the device's signals.
    dev.write32(IRQ_MASK, mask & !(1 << RING));
    let (c, woke) = paused_blocking_wait(&drv, &q, Descriptor::fill(m.iova(), m.len(), 1));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(woke, 0, "no interrupt, yet an eventfd wake-up was counted");

    // Masked, but the command asks for an interrupt; then unmasked, every batch
    // signals. Either way the blocked waiter must be woken through the eventfd. (A
    // wait that finds its completion on its first check reads no eventfd: a few
    // tries, in case the resumer thread outran the waiter; a device that does not
    // signal fails every one.)
    for (irq_mask, flags) in [
        (mask & !(1 << RING), Flags::INTERRUPT),
        (mask, Flags::default()),
    ] {
        dev.write32(IRQ_MASK, irq_mask);
        let mut woke = 0;
        for byte in 2..7u8 {
            let desc = Descriptor::fill(m.iova(), m.len(), byte).with_flags(flags);
            let (c, w) = paused_blocking_wait(&drv, &q, desc);
            assert_eq!(c.status, Status::Ok);
            assert!(buf.read().iter().all(|&b| b == byte));
            woke = w;
            if woke > 0 {
                break;
            }
        }
        assert!(
            woke > 0,
            "the completion ({flags:?}, IRQ_MASK {irq_mask:#x}) was not signalled through the eventfd"
        );
    }
    drop((m, q, drv));
    pins.check();
}

#[test]
fn several_rings_and_threads_run_at_once() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let rings = drv.rings();
    assert!(rings >= 4);
    std::thread::scope(|s| {
        for r in 0..4 {
            let drv = drv.clone();
            s.spawn(move || {
                let q = drv.queue(r, 8).unwrap();
                let mut data = vec![0u8; 256 << 10];
                let m = drv.map_slice(&mut data).unwrap();
                for i in 0..50u8 {
                    let b = i.wrapping_mul(7).wrapping_add(r as u8);
                    q.run(Descriptor::fill(m.iova(), m.len(), b)).unwrap();
                    let c = q.run(Descriptor::crc32c(m.iova(), m.len(), 0)).unwrap();
                    assert_eq!(c.result as u32, crc32c::crc32c(&vec![b; 256 << 10]));
                }
                drop(m);
                assert!(data
                    .iter()
                    .all(|&x| x == 49u8.wrapping_mul(7).wrapping_add(r as u8)));
            });
        }
    });
    // Several threads sharing one queue.
    let q = drv.queue(0, 8).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..100 {
                    q.run(Descriptor::nop()).unwrap();
                }
            });
        }
    });
    assert_eq!(q.in_flight(), 0);
    drop((q, drv));
    pins.check();
}

#[test]
fn dropping_a_queue_with_work_in_flight_leaks_nothing() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let buf = Anon::new(16 << 20);
    let m = drv
        .map_user_test(buf.addr, buf.len, Perm::READ_WRITE)
        .unwrap();
    for _ in 0..5 {
        let q = drv.queue(0, 8).unwrap();
        for _ in 0..8 {
            q.submit(Descriptor::fill(m.iova(), m.len(), 1), Backpressure::Wait)
                .unwrap();
        }
        drop(q);
    }
    drop((m, drv));
    pins.check();
}

#[test]
fn unclaimed_completions_stay_bounded_and_duration_max_is_no_deadline() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let mut q = drv.queue(0, 16).unwrap();
    q.set_timeout(Duration::MAX);
    let mut data = vec![7u8; 4096];
    let m = drv.map_slice(&mut data).unwrap();
    let bound = (q.size() as usize).max(userptr::driver::queue::store::MIN_CAP);
    let mut last = None;
    for _ in 0..2000 {
        // Plain completions, one with a result, and only the last fence waited for,
        // as the registry's batches are.
        let f = q
            .submit_batch(
                &[
                    Descriptor::nop(),
                    Descriptor::crc32c(m.iova(), 4096, 0),
                    Descriptor::nop(),
                ],
                Backpressure::Wait,
            )
            .unwrap();
        q.wait(f.end, WaitMode::Block, Duration::MAX).unwrap();
        assert!(
            q.unclaimed_entries() <= bound,
            "{} entries",
            q.unclaimed_entries()
        );
        last = Some(f);
    }
    // The earlier fences of the last batch still answer, each with its own entry.
    let f = last.unwrap();
    let c = q
        .wait_completion(f.start, WaitMode::Poll, Duration::MAX)
        .unwrap();
    assert_eq!((c.seqno, c.status), (f.start.seqno, Status::Ok));
    let crc = userptr::Fence {
        ring: 0,
        seqno: f.start.seqno + 1,
    };
    let c = q.wait(crc, WaitMode::Block, T).unwrap();
    assert_eq!(c.result as u32, crc32c::crc32c(&[7u8; 4096]));
    // Long-gone ones were dropped unclaimed: an error, not a hang.
    let e = q
        .wait(userptr::Fence { ring: 0, seqno: 1 }, WaitMode::Poll, T)
        .unwrap_err();
    assert!(matches!(e, userptr::Error::NoCompletion { .. }), "{e}");
    // Every other wait takes Duration::MAX as "no deadline" too.
    q.wait_done(f.end.seqno, Duration::MAX).unwrap();
    q.wait_for_room(1).unwrap();
    let e = q.wait_for_room(u32::MAX).unwrap_err();
    assert!(matches!(e, userptr::Error::RingFull { .. }), "{e}");
    drv.reset(Duration::MAX).unwrap();
    q.run(Descriptor::nop()).unwrap();
    drop((m, q, drv));
    pins.check();
}

/// COPY and SAXPY many times longer than a small staging area (4 slots, 3 lanes): the
/// rolling window reuses every slot many times, chunks finish out of order, and the
/// result must still be exact; pins come back.
#[test]
fn long_copy_and_saxpy_reuse_every_staging_slot() {
    let pins = PinCheck::start();
    let drv = Driver::with_reference(userptr::ReferenceConfig {
        staging_bytes: 4 << 20,
        staging_lanes: 3,
        ..Default::default()
    })
    .unwrap();
    let q = drv.queue(0, 8).unwrap();
    let mut src: Vec<u8> = (0..(37 << 20) + 4093)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    let mut dst = vec![0u8; src.len()];
    let ms = drv.map_slice(&mut src).unwrap();
    let md = drv.map_slice(&mut dst).unwrap();
    q.run(Descriptor::copy(ms.iova(), md.iova(), ms.len()))
        .unwrap();
    drop((ms, md));
    assert!(dst == src, "a 37 MiB COPY through 4 MiB of staging");

    let n = (21 << 20) / 4 + 77;
    let x: Vec<f32> = (0..n).map(|i| (i % 997) as f32 * 0.5).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
    let (mut xd, mut yd) = (x.clone(), y.clone());
    let mx = drv.map_slice(&mut xd).unwrap();
    let my = drv.map_slice(&mut yd).unwrap();
    q.run(Descriptor::saxpy(-2.0, mx.iova(), my.iova(), n as u64))
        .unwrap();
    drop((mx, my));
    for (y, x) in y.iter_mut().zip(&x) {
        *y += -2.0 * *x;
    }
    assert!(yd == y, "a 21 MiB SAXPY through 4 MiB of staging");
    drop(q);
    drop(drv);
    pins.check();
}
