//! loom model of the index protocol: one producer thread, one consumer thread, a
//! two-slot queue and three items, so every run wraps and hits "full" and "empty".
//! The slots are loom `UnsafeCell`s: if the Acquire/Release pairs in `index.rs` were
//! weakened, loom would report the concurrent slot access as a data race.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-ring --test loom --release`
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use userptr_ring::{Consumer, Geometry, Producer, RingIndices};

struct Queue {
    idx: RingIndices,
    slots: [UnsafeCell<u64>; 2],
}

// SAFETY: slot access is serialised by the index protocol under test; loom checks it.
unsafe impl Sync for Queue {}

#[test]
fn producer_consumer_never_race_on_a_slot() {
    loom::model(|| {
        let q = Arc::new(Queue {
            idx: RingIndices::new(),
            slots: [UnsafeCell::new(0), UnsafeCell::new(0)],
        });
        let geo = Geometry::new(2).unwrap();
        const ITEMS: u64 = 3;

        let qp = q.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(geo, &qp.idx);
            let mut next = 1;
            while next <= ITEMS {
                match p.next_slot(&qp.idx) {
                    Some(slot) => {
                        // SAFETY: the slot is the producer's until it publishes (the
                        // protocol under test; loom reports a race if it is not).
                        qp.slots[slot].with_mut(|v| unsafe { *v = next });
                        p.publish(&qp.idx);
                        next += 1;
                    }
                    None => thread::yield_now(),
                }
            }
        });

        let mut c = Consumer::new(geo, &q.idx);
        let mut expect = 1;
        while expect <= ITEMS {
            let n = c.available(&q.idx).unwrap();
            if n == 0 {
                thread::yield_now();
                continue;
            }
            for i in 0..n {
                // SAFETY: published slots are the consumer's until it releases them.
                let v = q.slots[c.slot(i)].with(|v| unsafe { *v });
                assert_eq!(v, expect, "items arrive once, in order");
                expect += 1;
            }
            c.release(&q.idx, n);
        }
        producer.join().unwrap();
    });
}
