//! proptest: the index protocol, driven by a random sequence of pushes, publishes and
//! pops from one thread, against a `VecDeque` model with the same capacity.
#![cfg(not(loom))]

use proptest::prelude::*;
use std::collections::VecDeque;
use userptr_ring::{Consumer, Geometry, Producer, RingIndices, SharedIndices};

#[derive(Clone, Debug)]
enum Op {
    Push(u64),
    Publish,
    Pop(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u64>().prop_map(Op::Push),
        2 => Just(Op::Publish),
        2 => (1u32..10).prop_map(Op::Pop),
    ]
}

proptest! {
    #[test]
    fn matches_vecdeque(log2 in 1u32..5, start in any::<u32>(), ops in proptest::collection::vec(op(), 1..200)) {
        let size = 1u32 << log2;
        let geo = Geometry::new(size).unwrap();
        let idx = RingIndices::new();
        // Start anywhere in the counter space, so wraparound at 2^32 is exercised.
        idx.store_head(start);
        idx.store_tail(start);
        let mut slots = vec![0u64; size as usize];
        let mut p = Producer::new(geo, &idx);
        let mut c = Consumer::new(geo, &idx);
                let mut published: VecDeque<u64> = VecDeque::new();
        let mut unpublished: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Push(v) => {
                    let full = published.len() + unpublished.len() == size as usize;
                    match p.next_slot(&idx) {
                        Some(slot) => {
                            prop_assert!(!full);
                            slots[slot] = v;
                            unpublished.push(v);
                        }
                        None => prop_assert!(full),
                    }
                }
                Op::Publish => {
                    let tail = p.publish(&idx);
                    published.extend(unpublished.drain(..));
                    prop_assert_eq!(idx.tail(), tail);
                }
                Op::Pop(n) => {
                    let avail = c.available(&idx).unwrap();
                    // The consumer may see fewer than published only if its cache is
                    // stale, which it refreshes when it thinks the queue is empty.
                    prop_assert!(avail as usize <= published.len());
                    if published.is_empty() {
                        prop_assert_eq!(avail, 0);
                    } else {
                        prop_assert!(avail > 0);
                    }
                    let take = n.min(avail);
                    for i in 0..take {
                        prop_assert_eq!(Some(slots[c.slot(i)]), published.pop_front());
                    }
                    c.release(&idx, take);
                }
            }
            prop_assert_eq!(idx.tail().wrapping_sub(idx.head()) as usize, published.len());
        }
    }
}
