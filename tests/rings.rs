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
    use userptr::ring::regs::{IRQ_ARM, IRQ_MASK, IRQ_STATUS};
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
    let bit = 1 << RING;
    assert_eq!(
        mask & bit,
        0,
        "an open queue arms its interrupt, never masks it on"
    );

    // The blocking wait arms before it sleeps: with the ring masked and no INTERRUPT
    // flag its sleeper is still woken through the eventfd; then the command's own
    // flag, and the mask set (every batch signals), wake it too. (A wait that finds
    // its completion on its first check reads no eventfd: a few tries, in case the
    // resumer thread outran the waiter; a wait that never arms fails every one.)
    for (irq_mask, flags) in [
        (mask, Flags::default()),
        (mask, Flags::INTERRUPT),
        (mask | bit, Flags::default()),
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
    // Moderation, at the registers (after the waits above: the interrupts raised here
    // are read by no waiter, and a count left in the eventfd would give a later wait
    // a wake-up it did not earn): a batch nobody armed for raises no interrupt
    // (IRQ_STATUS stays clear); an armed ring raises it for its next batch and the
    // arm is used up.
    dev.write32(IRQ_MASK, mask);
    let nop_and_status = || {
        dev.write32(IRQ_STATUS, bit);
        q.submit(Descriptor::nop(), Backpressure::Wait)
            .and_then(|f| q.wait(f, WaitMode::Poll, T))
            .unwrap();
        dev.read32(IRQ_STATUS) & bit
    };
    assert_eq!(
        nop_and_status(),
        0,
        "an unarmed, masked ring raised its interrupt"
    );
    dev.write32(IRQ_ARM, bit);
    assert_eq!(
        dev.read32(IRQ_ARM) & bit,
        bit,
        "IRQ_ARM reads back the armed bit"
    );
    assert_eq!(
        nop_and_status(),
        bit,
        "an armed ring did not raise its interrupt"
    );
    assert_eq!(
        dev.read32(IRQ_ARM) & bit,
        0,
        "the interrupt did not use up the arm"
    );
    assert_eq!(nop_and_status(), 0, "an arm raised more than one interrupt");

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

/// Write `bytes` into an `Anon` buffer.
fn put(a: &Anon, bytes: &[u8]) {
    assert_eq!(a.len, bytes.len());
    // SAFETY: the buffer is mapped read-write for `len` bytes; no command writes it
    // meanwhile.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), a.addr as *mut u8, a.len) };
}

/// A COPY whose source and destination are each several IOVA mappings, with
/// boundaries that fall inside staging chunks and differ between the two sides: a
/// chunk's read-in and write-out are then split into different pieces, all of which
/// must pass through the chunk's staging FIFO (or VRAM slot) in order, for an odd
/// length, many times over a small staging area. Both staging kinds.
#[test]
fn a_copy_whose_chunks_straddle_mapping_boundaries_is_exact() {
    let pins = PinCheck::start();
    for fifos in [true, false] {
        let drv = Driver::with_reference(userptr::ReferenceConfig {
            staging_bytes: 4 << 20,
            copy_fifos: fifos,
            ..Default::default()
        })
        .unwrap();
        let q = drv.queue(0, 8).unwrap();
        let d = drv.domain();
        let len = (9 << 20) + 5 * 4096;
        let (src, dst) = (Anon::new(len), Anon::new(len));
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8 ^ 0x5a).collect();
        put(&src, &bytes);
        dst.fill(0);
        // IOVAs far from the driver's own allocations; three pieces of the source,
        // two of the destination, cut at page (not chunk) boundaries.
        let (s0, d0) = (1u64 << 37, (1u64 << 37) + (1 << 30));
        let cuts = |bounds: &[usize]| -> Vec<(usize, usize)> {
            let mut v = Vec::new();
            let mut at = 0;
            for &b in bounds.iter().chain([len].iter()) {
                v.push((at, b - at));
                at = b;
            }
            v
        };
        let src_parts = cuts(&[(1 << 20) + 3 * 4096, (5 << 20) + 4096]);
        let dst_parts = cuts(&[(2 << 20) + 2 * 4096]);
        for &(off, n) in &src_parts {
            d.map(
                s0 + off as u64,
                (src.addr + off) as u64,
                n as u64,
                Perm::READ,
            )
            .unwrap();
        }
        for &(off, n) in &dst_parts {
            d.map(
                d0 + off as u64,
                (dst.addr + off) as u64,
                n as u64,
                Perm::WRITE,
            )
            .unwrap();
        }
        let n = len as u64 - 100;
        for _ in 0..3 {
            q.run(Descriptor::copy(s0, d0, n)).unwrap();
        }
        let got = dst.read();
        assert!(
            got[..n as usize] == bytes[..n as usize],
            "fifos {fifos}: first wrong byte at {:?}",
            got.iter().zip(&bytes).position(|(a, b)| a != b)
        );
        assert!(got[n as usize..].iter().all(|&b| b == 0), "past the end");
        for &(off, n) in &src_parts {
            d.unmap(s0 + off as u64, n as u64).unwrap();
        }
        for &(off, n) in &dst_parts {
            d.unmap(d0 + off as u64, n as u64).unwrap();
        }
        drop((q, drv));
    }
    pins.check();
}

/// A COPY that fails half way through its rolling window (an injected kernel failure
/// of one chunk's write-out, after its read-in filled the chunk's staging FIFO) fails
/// that command only: the chunks in flight are reaped, the command completes with a
/// device error, the command queued behind it completes exactly, and so do the
/// COPYs after it through every FIFO again (a FIFO left holding the failed chunk
/// would hand those bytes to the next chunk through it, or stall it for good). The
/// same for SAXPY, whose staging is VRAM. In a child process, bounded: a stalled
/// engine is a failure that reports, never a hung test.
#[test]
fn a_command_failing_mid_window_fails_alone_and_leaves_staging_clean() {
    let name = "child_a_command_failing_mid_window_fails_alone_and_leaves_staging_clean";
    let r = common::run_bounded(common::child_command(name), Duration::from_secs(120));
    assert!(
        r.success() && r.text().contains("1 passed"),
        "child {name}: {}\n{}",
        r.describe(),
        common::failure_summary(&r)
    );
}

#[test]
#[ignore = "run in a child process by a_command_failing_mid_window_fails_alone_and_leaves_staging_clean"]
fn child_a_command_failing_mid_window_fails_alone_and_leaves_staging_clean() {
    if !common::is_child() {
        return;
    }
    use userptr::driver::reference::fault_injection::TransferFaults;
    let pins = PinCheck::start();
    // The sixth chunk's write-out of the first command fails; four FIFOs.
    let faults = TransferFaults::nth(5);
    let drv = Driver::with_reference(userptr::ReferenceConfig {
        staging_bytes: 4 << 20,
        iommu: userptr::UringIommuConfig {
            transfer_faults: Some(faults.clone()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let q = drv.queue(0, 8).unwrap();
    let len = (16 << 20) + 4096;
    let pattern = |seed: usize| -> Vec<u8> {
        (0..len)
            .map(|i| ((i / 4096 + seed) * 31 + i % 4096) as u8)
            .collect()
    };
    let mut src = pattern(1);
    let mut dst = vec![0u8; len];
    let mut src2 = pattern(2);
    let mut dst2 = vec![0u8; len];
    {
        let (ms, md) = (
            drv.map_slice(&mut src).unwrap(),
            drv.map_slice(&mut dst).unwrap(),
        );
        let (ms2, md2) = (
            drv.map_slice(&mut src2).unwrap(),
            drv.map_slice(&mut dst2).unwrap(),
        );
        faults.set_enabled(true);
        let failing = q
            .submit(
                Descriptor::copy(ms.iova(), md.iova(), len as u64),
                Backpressure::Wait,
            )
            .unwrap();
        let behind = q
            .submit(
                Descriptor::copy(ms2.iova(), md2.iova(), len as u64),
                Backpressure::Wait,
            )
            .unwrap();
        let e = q.wait(failing, WaitMode::Block, T).unwrap_err();
        assert!(
            matches!(
                e,
                userptr::Error::Command {
                    status: Status::DeviceError,
                    ..
                }
            ),
            "{e}"
        );
        q.wait(behind, WaitMode::Block, T).unwrap();
        faults.set_enabled(false);
        assert_eq!(faults.injected(), 1);
    }
    assert!(dst2 == src2, "the command behind the failed one");
    // Every FIFO carries chunks again, several times each.
    for seed in 3..6 {
        let mut src = pattern(seed);
        let mut dst = vec![0u8; len];
        let (ms, md) = (
            drv.map_slice(&mut src).unwrap(),
            drv.map_slice(&mut dst).unwrap(),
        );
        q.run(Descriptor::copy(ms.iova(), md.iova(), len as u64))
            .unwrap();
        drop((ms, md));
        assert!(
            dst == src,
            "COPY {seed} after the failed one: first wrong byte at {:?}",
            dst.iter().zip(&src).position(|(a, b)| a != b)
        );
    }

    // SAXPY: the sixth chunk's y write-out fails; the next SAXPY is exact.
    let n = (12 << 20) / 4;
    let x: Vec<f32> = (0..n).map(|i| (i % 991) as f32).collect();
    let mut xd = x.clone();
    let mut yd = vec![1.0f32; n];
    let mx = drv.map_slice(&mut xd).unwrap();
    let my = drv.map_slice(&mut yd).unwrap();
    faults.set_enabled(true);
    let e = q
        .run(Descriptor::saxpy(2.0, mx.iova(), my.iova(), n as u64))
        .unwrap_err();
    faults.set_enabled(false);
    assert!(
        matches!(
            e,
            userptr::Error::Command {
                status: Status::DeviceError,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(faults.injected(), 2);
    drop(my);
    let mut y = vec![1.0f32; n];
    let mut yd = y.clone();
    let my = drv.map_slice(&mut yd).unwrap();
    q.run(Descriptor::saxpy(2.0, mx.iova(), my.iova(), n as u64))
        .unwrap();
    drop((mx, my));
    for (y, x) in y.iter_mut().zip(&x) {
        *y += 2.0 * *x;
    }
    assert!(yd == y, "the SAXPY after the failed one");
    drop((q, drv));
    pins.check();
}

/// Ring memory goes to the device through its own coherent view, but only after the
/// IOMMU's translation and permission check: taking the write permission away stops
/// the ring at its completion write, unmapping it stops the ring at the next fetch.
#[test]
fn ring_memory_is_reached_only_through_its_iommu_translation_and_permission() {
    use userptr::ring::regs::{ring, ring_reg};
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let dev = drv.device().unwrap().clone();

    let q = drv.queue(0, 8).unwrap();
    q.run(Descriptor::nop()).unwrap();
    let mem = q.ring_memory();
    q.domain()
        .set_perm(mem.start, mem.end - mem.start, Perm::READ)
        .unwrap();
    let e = q
        .submit(Descriptor::nop(), Backpressure::Wait)
        .and_then(|f| q.wait(f, WaitMode::Poll, T))
        .unwrap_err();
    assert!(matches!(e, userptr::Error::RingStopped { .. }), "{e}");
    assert_eq!(dev.read32(ring_reg(0, ring::ERROR)), ring::ERROR_CQ_FAULT);
    drop(q);

    let q = drv.queue(1, 8).unwrap();
    q.run(Descriptor::nop()).unwrap();
    let mem = q.ring_memory();
    q.domain().unmap(mem.start, mem.end - mem.start).unwrap();
    let e = q
        .submit(Descriptor::nop(), Backpressure::Wait)
        .and_then(|f| q.wait(f, WaitMode::Block, T))
        .unwrap_err();
    assert!(matches!(e, userptr::Error::RingStopped { .. }), "{e}");
    assert_eq!(dev.read32(ring_reg(1, ring::ERROR)), ring::ERROR_SQ_FAULT);
    // Its memory outlives the unmap on the driver's side only; the device has none left.
    assert_eq!(q.completed_seqno(), 1);
    drop(q);
    // Nothing of the coherent path stays pinned or mapped.
    assert_eq!(drv.domain().mappings(), 0);
    drop((dev, drv));
    pins.check();
}

/// A ring the application placed in its own memory (registers programmed by hand) is
/// reached through its pins like any user memory, never through a coherent view: after
/// the process discards the pages, the device still fetches the descriptors from the
/// pinned (old) pages and writes the completion and fence there, where the process no
/// longer sees them.
#[test]
fn a_ring_in_user_memory_is_reached_through_its_pins() {
    use userptr::ring::regs::{ring, ring_reg};
    const N: usize = 4;
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let dev = drv.device().unwrap().clone();
    let a = Anon::new(4096);
    let (sq_off, cq_off, fence_off) = (0usize, N * 64, N * 64 + N * 32);
    {
        // SAFETY: the test's own fresh mapping, not otherwise referenced here.
        let buf = unsafe { std::slice::from_raw_parts_mut(a.addr as *mut u8, a.len) };
        buf.fill(0);
        let nop = Descriptor::nop().with_seqno(7).encode();
        buf[sq_off..sq_off + 64].copy_from_slice(&nop);
    }
    let m = drv.map_user_test(a.addr, a.len, Perm::READ_WRITE).unwrap();
    let iova = m.iova();
    let r = 3;
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    for (lo, hi, v) in [
        (ring::SQ_BASE_LO, ring::SQ_BASE_HI, iova + sq_off as u64),
        (ring::CQ_BASE_LO, ring::CQ_BASE_HI, iova + cq_off as u64),
        (ring::FENCE_LO, ring::FENCE_HI, iova + fence_off as u64),
    ] {
        let (l, h) = split(v);
        dev.write32(ring_reg(r, lo), l);
        dev.write32(ring_reg(r, hi), h);
    }
    dev.write32(ring_reg(r, ring::SIZE_LOG2), N.trailing_zeros());
    dev.write32(ring_reg(r, ring::CONTROL), ring::CONTROL_ENABLE);
    assert_eq!(dev.read32(ring_reg(r, ring::ERROR)), 0);
    // The process's view of the ring goes; the pin keeps the old pages.
    // SAFETY: the test's own mapping; nothing holds a reference into it across this.
    let rc = unsafe { libc::madvise(a.addr as *mut libc::c_void, a.len, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    dev.write32(ring_reg(r, ring::SQ_TAIL), 1);
    let deadline = std::time::Instant::now() + T;
    while dev.read32(ring_reg(r, ring::CQ_TAIL)) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never completed"
        );
        std::thread::yield_now();
    }
    assert_eq!(dev.read32(ring_reg(r, ring::ERROR)), 0);
    // SAFETY: as above; reads of the process's (fresh, zero) pages.
    let buf = unsafe { std::slice::from_raw_parts(a.addr as *const u8, a.len) };
    assert!(
        buf.iter().all(|&b| b == 0),
        "the device wrote the process's current pages: the ring was not reached through its pins"
    );
    dev.write32(ring_reg(r, ring::CONTROL), 0);
    drop((m, dev, drv));
    pins.check();
}
