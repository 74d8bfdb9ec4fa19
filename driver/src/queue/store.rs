//! The completion store: completions reaped from the ring and not claimed by a `wait`
//! yet, in memory bounded by the ring size.
//!
//! A batch is often waited for through its last fence only (the registry's batches
//! are: `BatchFences::end`), so the earlier completions of every batch would pile up
//! unclaimed. The store keeps them compactly:
//! * a *plain* completion (status OK, no result, no detail, no fault: what most
//!   commands end with) is kept as part of a run of consecutive unclaimed seqnos, so
//!   the plain completions of a batch cost one entry however long the batch is;
//! * any other completion (an error status, a result such as a CRC, a fault record) is
//!   kept whole;
//! * at most `cap` entries (runs and whole completions together), `cap` being the
//!   ring size but at least [`MIN_CAP`]: beyond that the oldest entry is dropped.
//!
//! The rule for waiters: each completion can be claimed once, in any order. Waiting
//! for an earlier fence of a batch after its last one was claimed still answers with
//! that command's own completion (a plain one comes back equal to what the device
//! wrote), unless `cap` newer entries have been kept since; then the wait answers
//! [`Error::NoCompletion`](crate::Error::NoCompletion) ("dropped unclaimed").

use std::collections::BTreeMap;
use userptr_ring::{Completion, Status};

/// The least number of entries a store keeps, whatever the ring size.
pub const MIN_CAP: usize = 64;

/// Unclaimed completions of one queue (see the module docs).
#[derive(Debug)]
pub(super) struct Store {
    /// Completions that carry something beyond "OK", by seqno.
    whole: BTreeMap<u64, Completion>,
    /// Runs of unclaimed plain completions: start → end (exclusive).
    runs: BTreeMap<u64, u64>,
    cap: usize,
}

fn plain(c: &Completion) -> bool {
    c.status == Status::Ok && c.result == 0 && c.detail == 0 && c.fault.is_none()
}

impl Store {
    /// A store for a ring of `size` slots.
    pub(super) fn new(size: u32) -> Store {
        Store {
            whole: BTreeMap::new(),
            runs: BTreeMap::new(),
            cap: (size as usize).max(MIN_CAP),
        }
    }

    /// Entries held (runs and whole completions): never more than the cap.
    pub(super) fn entries(&self) -> usize {
        self.whole.len() + self.runs.len()
    }

    /// Keep `c` until it is claimed (or dropped as the oldest).
    pub(super) fn insert(&mut self, c: Completion) {
        if !plain(&c) {
            self.whole.insert(c.seqno, c);
        } else {
            let s = c.seqno;
            let before = self
                .runs
                .range(..=s)
                .next_back()
                .map(|(&start, &end)| (start, end));
            let (start, mut end) = match before {
                Some((start, end)) if end == s => (start, s + 1),
                Some((_, end)) if end > s => return, // held already
                _ => (s, s + 1),
            };
            // A run that starts right after joins (completions out of order).
            if let Some(next_end) = self.runs.remove(&end) {
                end = next_end;
            }
            self.runs.insert(start, end);
        }
        self.trim();
    }

    /// Claim the completion of `seqno`, if it is held.
    pub(super) fn take(&mut self, seqno: u64) -> Option<Completion> {
        if let Some(c) = self.whole.remove(&seqno) {
            return Some(c);
        }
        let (start, end) = self
            .runs
            .range(..=seqno)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| seqno < e)?;
        self.runs.remove(&start);
        if start < seqno {
            self.runs.insert(start, seqno);
        }
        if seqno + 1 < end {
            self.runs.insert(seqno + 1, end);
        }
        // A split adds an entry.
        self.trim();
        Some(Completion::ok(seqno, 0))
    }

    /// Drop the oldest entries until at most `cap` are held.
    fn trim(&mut self) {
        while self.entries() > self.cap {
            let w = self.whole.keys().next().copied();
            let r = self.runs.keys().next().copied();
            match (w, r) {
                (Some(w), Some(r)) if r < w => {
                    self.runs.remove(&r);
                }
                (Some(w), _) => {
                    self.whole.remove(&w);
                }
                (None, Some(r)) => {
                    self.runs.remove(&r);
                }
                (None, None) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userptr_ring::{AccessKind, FaultRecord};

    #[test]
    fn a_batch_of_plain_completions_is_one_entry_and_each_is_claimed_once() {
        let mut s = Store::new(4);
        for seq in 1..=1000 {
            s.insert(Completion::ok(seq, 0));
        }
        assert_eq!(s.entries(), 1);
        assert_eq!(s.take(1000), Some(Completion::ok(1000, 0)));
        for seq in 1..1000 {
            assert_eq!(s.take(seq), Some(Completion::ok(seq, 0)), "seqno {seq}");
        }
        assert_eq!(s.take(1000), None, "claimed once");
        assert_eq!(s.take(5), None);
        assert_eq!(s.entries(), 0);
    }

    #[test]
    fn completions_that_carry_something_come_back_whole() {
        let mut s = Store::new(8);
        let crc = Completion::ok(2, 0xdead_beef);
        let fault = Completion::fault(
            3,
            FaultRecord {
                iova: 0x1000,
                access: AccessKind::Write,
            },
        );
        let aborted = Completion::error(4, Status::Aborted, 0);
        for c in [
            Completion::ok(1, 0),
            crc,
            fault,
            aborted,
            Completion::ok(5, 0),
        ] {
            s.insert(c);
        }
        assert_eq!(s.take(3), Some(fault));
        assert_eq!(s.take(2), Some(crc));
        assert_eq!(s.take(4), Some(aborted));
        assert_eq!(s.take(1), Some(Completion::ok(1, 0)));
        assert_eq!(s.take(5), Some(Completion::ok(5, 0)));
    }

    #[test]
    fn memory_is_bounded_by_the_cap_whatever_is_left_unclaimed() {
        // Batches of three, only the last of each claimed: one run per batch, and
        // results that nobody claims: the worst cases for the store.
        let mut s = Store::new(16);
        let mut seq = 0;
        for i in 0..10_000u64 {
            for _ in 0..3 {
                seq += 1;
                s.insert(Completion::ok(seq, i % 2));
            }
            assert!(s.take(seq).is_some());
            assert!(s.entries() <= MIN_CAP, "{} entries", s.entries());
        }
        // The newest unclaimed ones are still there, the oldest were dropped.
        assert!(s.take(seq - 1).is_some());
        assert!(s.take(1).is_none());
    }

    #[test]
    fn the_cap_is_the_ring_size_above_the_minimum() {
        let mut s = Store::new(256);
        for seq in 0..1000u64 {
            s.insert(Completion::ok(seq, seq + 1));
        }
        assert_eq!(s.entries(), 256);
        assert!(s.take(999).is_some() && s.take(744).is_some() && s.take(743).is_none());
    }

    #[test]
    fn out_of_order_plain_completions_join_into_one_run() {
        let mut s = Store::new(4);
        for seq in [3, 1, 2, 5, 4] {
            s.insert(Completion::ok(seq, 0));
        }
        assert_eq!(s.entries(), 1);
        s.insert(Completion::ok(3, 0));
        assert_eq!(s.entries(), 1, "inserted twice, held once");
    }
}
