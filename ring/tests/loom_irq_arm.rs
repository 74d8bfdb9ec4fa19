//! loom model of interrupt arming (`regs::IRQ_ARM`, datasheet section 8): a driver
//! about to sleep on a ring's interrupt, against the device publishing the batch that
//! completes the driver's command. The steps are copies, one line each, of
//! `QueueCore::wait_completion` (`WaitMode::Block`) and the engine's `take_arm`:
//!
//! | model                     | driver / device                                        |
//! |---------------------------|--------------------------------------------------------|
//! | `arm.fetch_or`            | the waiter's `IRQ_ARM` write (the register's `fetch_or`) |
//! | `fence(SeqCst)`, `fence.load` | the waiter's second look at the fence word         |
//! | `fence.store`             | the engine's fence write-back (Release)                |
//! | `fence(SeqCst)`, `arm.load`/`fetch_and` | `take_arm` after the publish             |
//!
//! The check: the waiter saw its fence (it does not sleep), or the device raised the
//! interrupt (it is woken). With either SeqCst fence removed, loom finds the run in
//! which both sides miss the other's write: the waiter sleeps and nobody wakes it
//! (tried: removed, loom failed, restored).
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-ring --test loom_irq_arm --release`
#![cfg(loom)]

use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

struct Dev {
    arm: AtomicU32,
    fence: AtomicU64,
    raised: AtomicBool,
}

#[test]
fn an_armed_sleeper_is_never_left_without_its_interrupt() {
    loom::model(|| {
        let d = Arc::new(Dev {
            arm: AtomicU32::new(0),
            fence: AtomicU64::new(0),
            raised: AtomicBool::new(false),
        });
        let dd = d.clone();
        let device = thread::spawn(move || {
            dd.fence.store(1, Ordering::Release);
            fence(Ordering::SeqCst);
            let armed = dd.arm.load(Ordering::Relaxed) & 1 != 0
                && dd.arm.fetch_and(!1, Ordering::AcqRel) & 1 != 0;
            if armed {
                dd.raised.store(true, Ordering::Release);
            }
        });
        d.arm.fetch_or(1, Ordering::AcqRel);
        fence(Ordering::SeqCst);
        let saw = d.fence.load(Ordering::Acquire) >= 1;
        device.join().unwrap();
        assert!(
            saw || d.raised.load(Ordering::Acquire),
            "the waiter slept and the device raised no interrupt"
        );
    });
}
