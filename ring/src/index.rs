//! The producer/consumer index protocol shared by the submission and completion queues.
//!
//! Each queue has a power-of-two number of slots and two free-running `u32` counters in
//! shared memory ([`RingIndices`]): `tail`, written only by the producer, and `head`,
//! written only by the consumer. Slot `i` of the counter space is array element
//! `i & (size - 1)`; `tail - head` (wrapping) is the number of filled slots, which is
//! always in `0..=size`. Counters wrap at 2^32 without ambiguity because `size <= 2^15`.
//!
//! Ordering contract (the whole of it):
//! * the producer writes slot contents, then stores `tail` with **Release**;
//! * the consumer loads `tail` with **Acquire**, so every slot below it is fully written
//!   before it reads one;
//! * the consumer reads slot contents, then stores `head` with **Release**;
//! * the producer loads `head` with **Acquire**, so the consumer has finished reading a
//!   slot before the producer overwrites it.
//!
//! Each side also keeps a private copy of its own counter (never re-read from shared
//! memory: it is the only writer) and a cached copy of the other side's, refreshed only
//! when the cache says the queue is full (producer) or empty (consumer). The model test
//! `tests/loom.rs` checks this contract under every interleaving loom explores; weaken
//! either pair to `Relaxed` and it reports the data race on the slot.
//!
//! Where the counters live is abstracted by [`SharedIndices`]: plain shared atomics
//! ([`RingIndices`], used by the reference device's register block and by the model
//! tests) or device registers, where storing the tail is the doorbell write.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// Smallest supported queue size (slots).
pub const MIN_SLOTS: u32 = 2;
/// Largest supported queue size (slots).
pub const MAX_SLOTS: u32 = 1 << 15;

/// A queue's size, checked to be a power of two in `MIN_SLOTS..=MAX_SLOTS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    size: u32,
}

/// A queue size that the protocol cannot use.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum GeometryError {
    /// Not a power of two in `MIN_SLOTS..=MAX_SLOTS`.
    #[error("ring size {0} is not a power of two between {MIN_SLOTS} and {MAX_SLOTS}")]
    Size(u32),
}

impl Geometry {
    /// Check `size`.
    pub fn new(size: u32) -> Result<Geometry, GeometryError> {
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&size) || !size.is_power_of_two() {
            return Err(GeometryError::Size(size));
        }
        Ok(Geometry { size })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Array element of counter value `index`.
    pub fn slot(&self, index: u32) -> usize {
        (index & (self.size - 1)) as usize
    }
}

/// The two shared counters of one queue.
#[derive(Debug, Default)]
#[repr(C)]
pub struct RingIndices {
    head: AtomicU32,
    tail: AtomicU32,
}

/// The shared counters say more slots are filled than the queue has: the other side is
/// broken or hostile. The consumer refuses to read past its own bounds.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("ring indices are corrupt: head {head}, tail {tail}, size {size}")]
pub struct IndexError {
    /// The head index read.
    pub head: u32,
    /// The tail index read.
    pub tail: u32,
    /// The queue's size.
    pub size: u32,
}

impl RingIndices {
    /// Both counters at zero.
    pub fn new() -> RingIndices {
        RingIndices::default()
    }

    /// The two counters as an [`IndexRefs`].
    pub fn refs(&self) -> IndexRefs<'_> {
        IndexRefs::new(&self.head, &self.tail)
    }

    /// The consumer's counter, for diagnostics and register reads.
    pub fn head(&self) -> u32 {
        self.refs().head()
    }

    /// The producer's counter, for diagnostics and register reads.
    pub fn tail(&self) -> u32 {
        self.refs().tail()
    }

    /// Set both counters to zero. Only while neither side is running (device reset).
    pub fn reset(&self) {
        self.refs().reset()
    }
}

/// The atomic type the counters are (loom's under `--cfg loom`), for a device that
/// keeps its counters in fields of its own and hands them out as [`IndexRefs`].
pub type Counter = AtomicU32;

/// A queue's two counters wherever they are: a head and a tail that need not be
/// adjacent. A device may keep each on the cache line of the side that writes it
/// (the reference device does); [`RingIndices`] is the adjacent pair. The orderings
/// of the protocol are implemented here, once.
#[derive(Clone, Copy, Debug)]
pub struct IndexRefs<'a> {
    head: &'a AtomicU32,
    tail: &'a AtomicU32,
}

impl<'a> IndexRefs<'a> {
    /// The counters `head` and `tail`.
    pub fn new(head: &'a AtomicU32, tail: &'a AtomicU32) -> IndexRefs<'a> {
        IndexRefs { head, tail }
    }

    /// The consumer's counter, for diagnostics and register reads.
    pub fn head(&self) -> u32 {
        // Relaxed: a snapshot for display or a register read; the protocol itself uses
        // the Acquire loads in Producer/Consumer.
        self.head.load(Ordering::Relaxed)
    }

    /// The producer's counter, for diagnostics and register reads.
    pub fn tail(&self) -> u32 {
        // Relaxed: see `head`.
        self.tail.load(Ordering::Relaxed)
    }

    /// Set both counters to zero. Only while neither side is running (device reset).
    pub fn reset(&self) {
        // Relaxed: both ends are quiescent; the reset itself is published by whatever
        // restarts them (a thread handoff or a register write with Release).
        self.head.store(0, Ordering::Relaxed);
        self.tail.store(0, Ordering::Relaxed);
    }
}

/// Where a queue's two counters live, and how each end reads and writes them.
///
/// [`RingIndices`] is the in-memory form (both ends share the atomics). A device whose
/// counters are registers implements it over MMIO: `store_tail` is then the **doorbell**
/// write that tells the device new work is there, and `store_head` is the completion
/// doorbell. Implementations must give the orderings documented on each method.
pub trait SharedIndices {
    /// The consumer's counter, with **Acquire** ordering.
    fn load_head(&self) -> u32;
    /// The producer's counter, with **Acquire** ordering.
    fn load_tail(&self) -> u32;
    /// Publish the consumer's counter with **Release** ordering.
    fn store_head(&self, head: u32);
    /// Publish the producer's counter with **Release** ordering (the doorbell).
    fn store_tail(&self, tail: u32);
}

impl SharedIndices for RingIndices {
    fn load_head(&self) -> u32 {
        self.refs().load_head()
    }
    fn load_tail(&self) -> u32 {
        self.refs().load_tail()
    }
    fn store_head(&self, head: u32) {
        self.refs().store_head(head)
    }
    fn store_tail(&self, tail: u32) {
        self.refs().store_tail(tail)
    }
}

impl SharedIndices for IndexRefs<'_> {
    fn load_head(&self) -> u32 {
        // Acquire: pairs with the consumer's Release in store_head.
        self.head.load(Ordering::Acquire)
    }
    fn load_tail(&self) -> u32 {
        // Acquire: pairs with the producer's Release in store_tail.
        self.tail.load(Ordering::Acquire)
    }
    fn store_head(&self, head: u32) {
        // Release: the consumer finished reading every slot below `head`.
        self.head.store(head, Ordering::Release);
    }
    fn store_tail(&self, tail: u32) {
        // Release: the producer finished writing every slot below `tail`.
        self.tail.store(tail, Ordering::Release);
    }
}

/// The producer's private state. It is the only writer of `tail`.
#[derive(Debug)]
pub struct Producer {
    geo: Geometry,
    /// Published tail.
    tail: u32,
    /// Slots written but not yet published.
    pending: u32,
    /// Last `head` seen.
    head_cache: u32,
}

impl Producer {
    /// Start producing on `idx`, continuing from its current counters.
    pub fn new<I: SharedIndices + ?Sized>(geo: Geometry, idx: &I) -> Producer {
        let head = idx.load_head();
        let tail = idx.load_tail();
        Producer {
            geo,
            tail,
            pending: 0,
            head_cache: head,
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    fn used(&self) -> u32 {
        self.tail
            .wrapping_add(self.pending)
            .wrapping_sub(self.head_cache)
    }

    fn refresh<I: SharedIndices + ?Sized>(&mut self, idx: &I) {
        // load_head is Acquire and pairs with the consumer's Release store of head:
        // every slot below the new head has been read completely, so it may be
        // overwritten.
        self.head_cache = idx.load_head();
    }

    /// Free slots, refreshing the consumer's counter only when the cache says full.
    pub fn free<I: SharedIndices + ?Sized>(&mut self, idx: &I) -> u32 {
        if self.used() >= self.geo.size {
            self.refresh(idx);
        }
        self.geo.size - self.used().min(self.geo.size)
    }

    /// Claim the next slot: returns its array element, to be written before
    /// [`Producer::publish`]; `None` when the queue is full.
    pub fn next_slot<I: SharedIndices + ?Sized>(&mut self, idx: &I) -> Option<usize> {
        if self.free(idx) == 0 {
            return None;
        }
        let slot = self.geo.slot(self.tail.wrapping_add(self.pending));
        self.pending += 1;
        Some(slot)
    }

    /// Slots claimed and not yet published.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Publish every claimed slot (for an MMIO device: ring the doorbell). Returns the
    /// new tail.
    pub fn publish<I: SharedIndices + ?Sized>(&mut self, idx: &I) -> u32 {
        if self.pending == 0 {
            return self.tail;
        }
        self.tail = self.tail.wrapping_add(self.pending);
        self.pending = 0;
        // store_tail is Release: the slot contents written before it are visible to a
        // consumer that loads this tail with Acquire.
        idx.store_tail(self.tail);
        self.tail
    }

    /// The published tail.
    pub fn tail(&self) -> u32 {
        self.tail
    }
}

/// The consumer's private state. It is the only writer of `head`.
#[derive(Debug)]
pub struct Consumer {
    geo: Geometry,
    head: u32,
    tail_cache: u32,
}

impl Consumer {
    /// Start consuming on `idx`, continuing from its current counters.
    pub fn new<I: SharedIndices + ?Sized>(geo: Geometry, idx: &I) -> Consumer {
        // The tail is re-read with Acquire before any slot is.
        let head = idx.load_head();
        Consumer {
            geo,
            head,
            tail_cache: head,
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Filled slots ready to read. Refreshes the producer's counter only when the cache
    /// says empty. An impossible count is an error, not a wild read.
    pub fn available<I: SharedIndices + ?Sized>(&mut self, idx: &I) -> Result<u32, IndexError> {
        if self.tail_cache == self.head {
            // load_tail is Acquire and pairs with the producer's Release store of tail:
            // the slots below it are fully written.
            self.tail_cache = idx.load_tail();
        }
        let n = self.tail_cache.wrapping_sub(self.head);
        if n > self.geo.size {
            return Err(IndexError {
                head: self.head,
                tail: self.tail_cache,
                size: self.geo.size,
            });
        }
        Ok(n)
    }

    /// Array element of the `i`-th available slot (`i < available()`).
    pub fn slot(&self, i: u32) -> usize {
        self.geo.slot(self.head.wrapping_add(i))
    }

    /// Hand `n` read slots back to the producer.
    pub fn release<I: SharedIndices + ?Sized>(&mut self, idx: &I, n: u32) {
        self.head = self.head.wrapping_add(n);
        // store_head is Release: our reads of those slots happen before the producer,
        // loading head with Acquire, overwrites them.
        idx.store_head(self.head);
    }

    /// The consumer's counter.
    pub fn head(&self) -> u32 {
        self.head
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn geometry_checks_size() {
        assert!(Geometry::new(0).is_err());
        assert!(Geometry::new(1).is_err());
        assert!(Geometry::new(3).is_err());
        assert!(Geometry::new(1 << 16).is_err());
        assert_eq!(Geometry::new(8).unwrap().slot(9), 1);
    }

    #[test]
    fn fills_drains_and_wraps_counters() {
        let geo = Geometry::new(4).unwrap();
        let idx = RingIndices::new();
        idx.store_head(u32::MAX - 1);
        idx.store_tail(u32::MAX - 1);
        let mut p = Producer::new(geo, &idx);
        let mut c = Consumer::new(geo, &idx);
        for round in 0..5 {
            for _ in 0..4 {
                assert!(p.next_slot(&idx).is_some(), "round {round}");
            }
            assert_eq!(p.next_slot(&idx), None);
            p.publish(&idx);
            assert_eq!(c.available(&idx), Ok(4));
            c.release(&idx, 4);
            assert_eq!(c.available(&idx), Ok(0));
        }
    }

    #[test]
    fn corrupt_tail_is_an_error() {
        let geo = Geometry::new(4).unwrap();
        let idx = RingIndices::new();
        let mut c = Consumer::new(geo, &idx);
        idx.store_tail(100);
        assert!(c.available(&idx).is_err());
    }
}
