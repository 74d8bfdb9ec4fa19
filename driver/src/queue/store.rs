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
//!   ring size but at least [`MIN_CAP`]: beyond that an entry is dropped, the oldest
//!   that is not a failure first. A failure (a status other than OK) goes only when
//!   nothing else is left to drop, and the store remembers the highest seqno of a
//!   failure it dropped, so that a batch wait over it can say so instead of `Ok`.
//!
//! The rule for waiters: each completion can be claimed once, in any order. Waiting
//! for an earlier fence of a batch after its last one was claimed still answers with
//! that command's own completion (a plain one comes back equal to what the device
//! wrote), unless `cap` newer entries have been kept since; then the wait answers
//! [`Error::NoCompletion`](crate::Error::NoCompletion) ("dropped unclaimed"). Waiting
//! for a whole batch ([`QueueCore::wait_batch`](super::QueueCore::wait_batch)) claims
//! every completion of its range at once: the first failure among them is the batch's
//! error; a range that may have held a dropped failure is `NoCompletion`.

use std::collections::BTreeMap;
use std::ops::Range;
use userptr_ring::{Completion, Status};

/// The least number of entries a store keeps, whatever the ring size.
pub const MIN_CAP: usize = 64;

/// Unclaimed completions of one queue (see the module docs).
#[derive(Debug)]
pub(super) struct Store {
    /// Completions with a status other than OK, by seqno: dropped last.
    failed: BTreeMap<u64, Completion>,
    /// OK completions that carry something (a result, a detail), by seqno.
    results: BTreeMap<u64, Completion>,
    /// Runs of unclaimed plain completions: start → end (exclusive).
    runs: BTreeMap<u64, u64>,
    /// The highest seqno of a failure dropped unclaimed (0: none).
    lost_failure: u64,
    cap: usize,
}

/// What claiming a range of completions found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TakenRange {
    /// The failure with the lowest seqno in the range, if any.
    pub(super) failed: Option<Completion>,
    /// A seqno of the range whose completion may have been a failure dropped
    /// unclaimed.
    pub(super) maybe_lost: Option<u64>,
}

/// Whether `c` is plain (status OK, nothing else): kept as part of a run.
pub(super) fn plain(c: &Completion) -> bool {
    c.status == Status::Ok && c.result == 0 && c.detail == 0 && c.fault.is_none()
}

/// Remove the keys of `m` in `r`, returning the removed values in order.
fn drain_range(m: &mut BTreeMap<u64, Completion>, r: &Range<u64>) -> Vec<Completion> {
    let keys: Vec<u64> = m.range(r.clone()).map(|(&k, _)| k).collect();
    keys.into_iter().filter_map(|k| m.remove(&k)).collect()
}

impl Store {
    /// A store for a ring of `size` slots.
    pub(super) fn new(size: u32) -> Store {
        Store {
            failed: BTreeMap::new(),
            results: BTreeMap::new(),
            runs: BTreeMap::new(),
            lost_failure: 0,
            cap: (size as usize).max(MIN_CAP),
        }
    }

    /// Entries held (runs and whole completions): never more than the cap.
    pub(super) fn entries(&self) -> usize {
        self.failed.len() + self.results.len() + self.runs.len()
    }

    /// Keep `c` until it is claimed (or dropped).
    pub(super) fn insert(&mut self, c: Completion) {
        if c.status != Status::Ok {
            self.failed.insert(c.seqno, c);
        } else if !plain(&c) {
            self.results.insert(c.seqno, c);
        } else {
            self.insert_plain_run(c.seqno..c.seqno + 1);
            return;
        }
        self.trim();
    }

    /// Keep the plain completions of every seqno in `r` (the reap path hands over a
    /// batch's plain completions as one run: one map update instead of one per
    /// completion).
    pub(super) fn insert_plain_run(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let before = self
            .runs
            .range(..=r.start)
            .next_back()
            .map(|(&start, &end)| (start, end));
        let (start, mut end) = match before {
            // Joins (or lies within, if held already) the run before it.
            Some((start, end)) if end >= r.start => (start, end.max(r.end)),
            _ => (r.start, r.end),
        };
        // Runs that start inside or right after join (completions out of order).
        while let Some((&s, &e)) = self.runs.range(start + 1..=end).next() {
            self.runs.remove(&s);
            end = end.max(e);
        }
        self.runs.insert(start, end);
        self.trim();
    }

    /// Claim the completion of `seqno`, if it is held.
    pub(super) fn take(&mut self, seqno: u64) -> Option<Completion> {
        if let Some(c) = self.failed.remove(&seqno) {
            return Some(c);
        }
        if let Some(c) = self.results.remove(&seqno) {
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

    /// Claim every completion held for the seqnos in `r` (see [`TakenRange`]).
    pub(super) fn take_range(&mut self, r: Range<u64>) -> TakenRange {
        if r.is_empty() {
            return TakenRange::default();
        }
        let failed = drain_range(&mut self.failed, &r).into_iter().next();
        drain_range(&mut self.results, &r);
        // Runs overlapping `r`: cut out the part inside it.
        let first = self
            .runs
            .range(..r.start)
            .next_back()
            .filter(|&(_, &e)| e > r.start)
            .map(|(&s, _)| s)
            .unwrap_or(r.start);
        let hit: Vec<(u64, u64)> = self
            .runs
            .range(first..r.end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.runs.remove(&s);
            if s < r.start {
                self.runs.insert(s, r.start);
            }
            if r.end < e {
                self.runs.insert(r.end, e);
            }
        }
        self.trim();
        let maybe_lost = (self.lost_failure >= r.start).then_some(r.start);
        TakenRange { failed, maybe_lost }
    }

    /// Drop entries until at most `cap` are held: the oldest run or result first, a
    /// failure only when nothing else is left.
    fn trim(&mut self) {
        while self.entries() > self.cap {
            let w = self.results.keys().next().copied();
            let r = self.runs.keys().next().copied();
            match (w, r) {
                (Some(w), Some(r)) if r < w => {
                    self.runs.remove(&r);
                }
                (Some(w), _) => {
                    self.results.remove(&w);
                }
                (None, Some(r)) => {
                    self.runs.remove(&r);
                }
                (None, None) => match self.failed.pop_first() {
                    Some((s, _)) => self.lost_failure = self.lost_failure.max(s),
                    None => break,
                },
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

    #[test]
    fn runs_inserted_whole_join_their_neighbours_and_are_claimed_one_by_one() {
        let mut s = Store::new(4);
        s.insert_plain_run(10..20);
        s.insert_plain_run(30..40);
        s.insert(Completion::ok(20, 0));
        assert_eq!(s.entries(), 2);
        // Fills the gap, overlapping what is held: one run 10..40.
        s.insert_plain_run(15..35);
        assert_eq!(s.entries(), 1);
        s.insert_plain_run(5..5);
        assert_eq!(s.entries(), 1);
        for seq in (10..40).rev() {
            assert_eq!(s.take(seq), Some(Completion::ok(seq, 0)), "seqno {seq}");
        }
        assert_eq!(s.take(40), None);
        assert_eq!(s.take(9), None);
        assert_eq!(s.entries(), 0);
    }

    fn dma_fault(seq: u64) -> Completion {
        Completion::fault(
            seq,
            FaultRecord {
                iova: 0x1000 * seq,
                access: AccessKind::Write,
            },
        )
    }

    #[test]
    fn a_range_claim_finds_the_first_failure_of_a_batch_and_claims_the_rest() {
        let mut s = Store::new(8);
        for seq in 1..=20 {
            s.insert(match seq {
                7 | 12 => dma_fault(seq),
                9 => Completion::ok(seq, 0xc0ffee),
                _ => Completion::ok(seq, 0),
            });
        }
        // 1..=4 stay, as a run of their own, outside the claimed range.
        let t = s.take_range(5..20);
        assert_eq!(t.failed, Some(dma_fault(7)));
        assert_eq!(t.maybe_lost, None);
        for seq in 5..20 {
            assert_eq!(s.take(seq), None, "seqno {seq} was claimed with the range");
        }
        assert_eq!(s.take(20), Some(Completion::ok(20, 0)));
        for seq in 1..5 {
            assert_eq!(s.take(seq), Some(Completion::ok(seq, 0)), "seqno {seq}");
        }
        assert_eq!(s.entries(), 0);
        assert_eq!(s.take_range(30..30), TakenRange::default());
    }

    #[test]
    fn failures_outlive_any_number_of_results_and_plain_runs() {
        // One failure, then far more unclaimed results and broken-up runs than the
        // store holds: the failure is what is kept.
        let mut s = Store::new(4);
        s.insert(dma_fault(1));
        let mut seq = 1;
        for i in 0..10_000u64 {
            seq += 1;
            s.insert(Completion::ok(seq, i + 1));
            seq += 2; // a gap: every plain completion is a run of its own
            s.insert(Completion::ok(seq, 0));
            assert!(s.entries() <= MIN_CAP);
        }
        let t = s.take_range(1..seq);
        assert_eq!(t.failed, Some(dma_fault(1)));
        assert_eq!(t.maybe_lost, None);
    }

    #[test]
    fn a_range_that_may_have_held_a_dropped_failure_never_claims_clean() {
        let mut s = Store::new(4);
        // More failures than the store holds: the oldest go.
        for seq in 1..=(MIN_CAP as u64 + 10) {
            s.insert(dma_fault(seq));
        }
        assert_eq!(s.entries(), MIN_CAP);
        assert_eq!(s.take(3), None, "dropped");
        let t = s.take_range(2..4);
        assert_eq!((t.failed, t.maybe_lost), (None, Some(2)));
        // A later range, past every dropped failure, claims clean.
        let base = MIN_CAP as u64 + 100;
        s.insert(Completion::ok(base, 0));
        s.insert(Completion::ok(base + 1, 0));
        assert_eq!(s.take_range(base..base + 2), TakenRange::default());
    }
}
