//! The interval index: disjoint `[start, end)` ranges keyed by start, in a `BTreeMap`.
//!
//! Because the ranges never overlap, both starts and ends are sorted, so "which ranges
//! overlap `[a, b)`" is one `O(log n)` descent to the last range starting before `b`
//! plus a backward walk over the `k` results, and "is `[a, b)` covered by one range" is
//! one descent. Concurrent readers come from the notifier lock around it. Written here
//! because interval-tree crates index *overlapping* intervals (a heavier structure
//! than this cache needs: regions of one permission never overlap, the registry
//! merges them).

use std::collections::BTreeMap;
use std::ops::Range;

/// A range and a reference to its value.
pub type Entry<'a, V> = (Range<u64>, &'a V);

/// Disjoint ranges, each with a value.
#[derive(Debug, Clone)]
pub struct IntervalMap<V> {
    map: BTreeMap<u64, (u64, V)>,
}

impl<V> Default for IntervalMap<V> {
    fn default() -> Self {
        IntervalMap {
            map: BTreeMap::new(),
        }
    }
}

impl<V> IntervalMap<V> {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Insert `range` (non-empty). Returns the value back if it overlaps a range
    /// already present (the map is unchanged).
    pub fn insert(&mut self, range: Range<u64>, v: V) -> Result<(), V> {
        if range.start >= range.end || self.overlapping(range.clone()).next().is_some() {
            return Err(v);
        }
        self.map.insert(range.start, (range.end, v));
        Ok(())
    }

    /// Remove the range starting exactly at `start`.
    pub fn remove(&mut self, start: u64) -> Option<(Range<u64>, V)> {
        self.map.remove(&start).map(|(end, v)| (start..end, v))
    }

    /// The ranges overlapping `[a, b)`, in descending order of start.
    pub fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = (Range<u64>, &V)> {
        let a = r.start;
        // An empty query overlaps nothing.
        let end = if r.start < r.end { r.end } else { 0 };
        self.map
            .range(..end)
            .rev()
            .take_while(move |(_, (end, _))| *end > a)
            .map(|(&s, (e, v))| (s..*e, v))
    }

    /// The range containing all of `[a, b)`, if one does.
    pub fn covering(&self, r: Range<u64>) -> Option<(Range<u64>, &V)> {
        let (&s, (e, v)) = self.map.range(..=r.start).next_back()?;
        (r.end <= *e && r.start < *e).then_some((s..*e, v))
    }

    /// The range ending exactly at `a` and the one starting exactly at `b`.
    pub fn neighbours(&self, r: Range<u64>) -> (Option<Entry<'_, V>>, Option<Entry<'_, V>>) {
        let before = self
            .map
            .range(..r.start)
            .next_back()
            .filter(|(_, (e, _))| *e == r.start)
            .map(|(&s, (e, v))| (s..*e, v));
        let after = self.map.get(&r.end).map(|(e, v)| (r.end..*e, v));
        (before, after)
    }

    /// Every range, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (Range<u64>, &V)> {
        self.map.iter().map(|(&s, (e, v))| (s..*e, v))
    }

    /// The first range starting at or after `a` (for clock-hand sweeps).
    pub fn first_from(&self, a: u64) -> Option<(Range<u64>, &V)> {
        self.map.range(a..).next().map(|(&s, (e, v))| (s..*e, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        Query(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..200, 1u64..30).prop_map(|(s, l)| Op::Insert(s, s + l)),
            (0u64..200).prop_map(Op::Remove),
            (0u64..230, 0u64..40).prop_map(|(s, l)| Op::Query(s, s + l)),
        ]
    }

    proptest! {
        /// Against a naive model: a Vec of ranges searched linearly.
        #[test]
        fn matches_a_naive_model(ops in proptest::collection::vec(op(), 1..300)) {
            let mut m = IntervalMap::new();
            let mut model: Vec<(u64, u64, u32)> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                let i = i as u32;
                match op {
                    Op::Insert(s, e) => {
                        let clash = model.iter().any(|&(ms, me, _)| ms < e && s < me);
                        prop_assert_eq!(m.insert(s..e, i).is_ok(), !clash);
                        if !clash { model.push((s, e, i)); }
                    }
                    Op::Remove(s) => {
                        let pos = model.iter().position(|&(ms, _, _)| ms == s);
                        let got = m.remove(s);
                        prop_assert_eq!(got.is_some(), pos.is_some());
                        if let Some(p) = pos {
                            let (ms, me, mv) = model.swap_remove(p);
                            prop_assert_eq!(got, Some((ms..me, mv)));
                        }
                    }
                    Op::Query(a, b) => {
                        let mut got: Vec<_> = m.overlapping(a..b).map(|(r, v)| (r.start, r.end, *v)).collect();
                        got.sort();
                        let mut want: Vec<_> = model.iter().copied().filter(|&(s, e, _)| s < b && a < e && a < b).collect();
                        want.sort();
                        prop_assert_eq!(got, want);
                        let cov = m.covering(a..b.max(a + 1)).map(|(r, v)| (r.start, r.end, *v));
                        let want_cov = model.iter().copied().find(|&(s, e, _)| s <= a && b.max(a + 1) <= e);
                        prop_assert_eq!(cov, want_cov);
                        let (before, after) = m.neighbours(a..b.max(a + 1));
                        prop_assert_eq!(before.map(|(r, _)| r.end), model.iter().find(|&&(_, e, _)| e == a).map(|&(_, e, _)| e));
                        prop_assert_eq!(after.map(|(r, _)| r.start), model.iter().find(|&&(s, _, _)| s == b.max(a + 1)).map(|&(s, _, _)| s));
                    }
                }
            }
            prop_assert_eq!(m.len(), model.len());
        }
    }
}
