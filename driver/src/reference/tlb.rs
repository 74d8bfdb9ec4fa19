//! The engine's TLB and its invalidation handshake (`docs/reference-device.md`
//! sections 10.4 and 10.5).
//!
//! * [`Tlb`]: a direct-mapped cache of leaf translations, tagged `(VM id, page, page
//!   size)`, owned by the engine thread alone. Nothing but [`Tlb::invalidate`] removes
//!   an entry: a PTE changed without an invalidation keeps translating to its old
//!   target, which is what a stale-TLB test relies on.
//! * [`TlbRequests`]: the posted requests. The register file's `TLB_INV_REQ` write
//!   appends one ([`TlbRequests::post`]) and the engine applies them **only at a safe
//!   point** ([`TlbRequests::take`]): between two DMA rounds, when no access translated
//!   earlier is in flight. `done` then counts the request complete, so "complete" means
//!   "no access uses a translation made before the request was posted". The loom model
//!   (`driver/tests/loom_gpuvm.rs`) drives this type.

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicU32, Ordering},
    Mutex,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicU32, Ordering},
    Mutex,
};

use std::collections::VecDeque;

/// A leaf translation: the page containing an address and where it leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// GPU VA of the page's first byte.
    pub page: u64,
    /// log2 of the page size (12 or 21).
    pub size_log2: u32,
    /// The page's target: an IOVA, or with `devmem` a VRAM offset.
    pub target: u64,
    /// Writes allowed (the leaf's `W`).
    pub writable: bool,
    /// The target is device memory.
    pub devmem: bool,
}

impl Translation {
    /// The target address of `va` (inside the page).
    pub fn addr(&self, va: u64) -> u64 {
        self.target + (va - self.page)
    }

    /// The first VA past the page.
    pub fn end(&self) -> u64 {
        self.page + (1 << self.size_log2)
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// 0: the entry is empty.
    vm: u8,
    t: Translation,
}

const EMPTY: Entry = Entry {
    vm: 0,
    t: Translation {
        page: 0,
        size_log2: 12,
        target: 0,
        writable: false,
        devmem: false,
    },
};

/// The engine's TLB: `n` direct-mapped entries.
#[derive(Debug)]
pub struct Tlb {
    entries: Vec<Entry>,
    /// 64 - log2(entries): the slot is the top bits of the hash.
    shift: u32,
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
}

impl Tlb {
    /// A TLB of `n` entries (rounded to a power of two, 16..=4096).
    pub fn new(n: usize) -> Tlb {
        let n = n.clamp(16, 4096).next_power_of_two();
        Tlb {
            entries: vec![EMPTY; n],
            shift: 64 - n.trailing_zeros(),
            hits: 0,
            misses: 0,
        }
    }

    /// Entries.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    fn slot(&self, vm: u8, va: u64, size_log2: u32) -> usize {
        let vpn = va >> size_log2;
        // A multiplicative (Fibonacci) hash of (vm, page, size), whose top bits depend
        // on every input bit: neighbouring pages and VMs spread out.
        let h = (vpn ^ (vm as u64) << 40 ^ (size_log2 as u64) << 56)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> self.shift) as usize
    }

    fn probe(&self, vm: u8, va: u64, size_log2: u32) -> Option<Translation> {
        let e = &self.entries[self.slot(vm, va, size_log2)];
        (e.vm == vm && e.t.size_log2 == size_log2 && e.t.page == va & !((1 << size_log2) - 1))
            .then_some(e.t)
    }

    /// The cached translation of `va` in VM `vm` (1..=15), if any.
    pub fn lookup(&mut self, vm: u8, va: u64) -> Option<Translation> {
        let t = self.probe(vm, va, 21).or_else(|| self.probe(vm, va, 12));
        if t.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        t
    }

    /// Cache `t` for VM `vm` (replacing whatever shared its slot).
    pub fn insert(&mut self, vm: u8, t: Translation) {
        let s = self.slot(vm, t.page, t.size_log2);
        self.entries[s] = Entry { vm, t };
    }

    /// Drop every entry of VM `vm` (0: of every VM) overlapping `pages` 4 KiB pages
    /// from `va` (0 pages: the whole VM). Returns how many were dropped.
    pub fn invalidate(&mut self, vm: u8, va: u64, pages: u32) -> usize {
        let start = va & !0xfff;
        let end = if pages == 0 {
            u64::MAX
        } else {
            start.saturating_add((pages as u64) << 12)
        };
        let mut dropped = 0;
        for e in &mut self.entries {
            if e.vm == 0 || (vm != 0 && e.vm != vm) {
                continue;
            }
            if pages == 0 || (e.t.page < end && start < e.t.end()) {
                *e = EMPTY;
                dropped += 1;
            }
        }
        dropped
    }

    /// Valid entries now.
    pub fn valid(&self) -> usize {
        self.entries.iter().filter(|e| e.vm != 0).count()
    }
}

/// One TLB invalidation request (`TLB_INV_VM`, `TLB_INV_VA`, `TLB_INV_PAGES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvRequest {
    /// VM id; 0: every VM.
    pub vm: u8,
    /// First GPU VA.
    pub va: u64,
    /// 4 KiB pages; 0: the whole VM.
    pub pages: u32,
}

/// The posted TLB invalidation requests and their completion count.
#[derive(Debug)]
pub struct TlbRequests {
    queue: Mutex<VecDeque<InvRequest>>,
    posted: AtomicU32,
    done: AtomicU32,
}

impl Default for TlbRequests {
    fn default() -> Self {
        TlbRequests::new()
    }
}

impl TlbRequests {
    /// No request posted.
    pub fn new() -> TlbRequests {
        TlbRequests {
            queue: Mutex::new(VecDeque::new()),
            posted: AtomicU32::new(0),
            done: AtomicU32::new(0),
        }
    }

    /// Post `r` (the `TLB_INV_REQ` write). Returns its number: complete once
    /// [`TlbRequests::is_complete`] says so.
    pub fn post(&self, r: InvRequest) -> u32 {
        let mut q = self.queue.lock().expect("tlb request lock poisoned");
        q.push_back(r);
        // Under the queue lock, so numbers follow queue order. Release: an engine that
        // sees the count (Acquire in `pending`) finds the request queued, and sees the
        // PTE stores the driver made before posting.
        let k = self.posted.load(Ordering::Relaxed).wrapping_add(1);
        self.posted.store(k, Ordering::Release);
        k
    }

    /// Requests posted so far (`TLB_INV_POSTED`).
    pub fn posted(&self) -> u32 {
        self.posted.load(Ordering::Acquire)
    }

    /// Requests completed so far (`TLB_INV_DONE`). Acquire: pairs with the Release in
    /// `take`, after the engine's last access through the dropped entries.
    pub fn done(&self) -> u32 {
        self.done.load(Ordering::Acquire)
    }

    /// Whether request `k` is complete (wrapping comparison).
    pub fn is_complete(&self, k: u32) -> bool {
        self.done().wrapping_sub(k) as i32 >= 0
    }

    /// Whether a request is waiting for the engine (cheap; the engine's check before
    /// every DMA round).
    pub fn pending(&self) -> bool {
        // Acquire: see `post`. Relaxed on done: only the engine writes it.
        self.posted.load(Ordering::Acquire) != self.done.load(Ordering::Relaxed)
    }

    /// The engine, at a safe point: apply every posted request to `tlb`, in order,
    /// counting each complete after it is applied. Returns how many were taken.
    pub fn take(&self, tlb: &mut Tlb) -> u32 {
        if !self.pending() {
            return 0;
        }
        let mut q = self.queue.lock().expect("tlb request lock poisoned");
        let mut n = 0;
        while let Some(r) = q.pop_front() {
            tlb.invalidate(r.vm, r.va, r.pages);
            n += 1;
            // Release: the dropped entries are gone, and every access through them
            // (all earlier, before this safe point) finished, before a driver that sees
            // the count unmaps the pages.
            let d = self.done.load(Ordering::Relaxed).wrapping_add(1);
            self.done.store(d, Ordering::Release);
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn t(page: u64, size_log2: u32, target: u64) -> Translation {
        Translation {
            page,
            size_log2,
            target,
            writable: true,
            devmem: false,
        }
    }

    #[test]
    fn lookup_insert_and_ranged_invalidation() {
        let mut tlb = Tlb::new(64);
        assert_eq!(tlb.lookup(1, 0x1000), None);
        tlb.insert(1, t(0x1000, 12, 0x9000));
        tlb.insert(1, t(0x20_0000, 21, 0x40_0000));
        tlb.insert(2, t(0x1000, 12, 0x7000));
        assert_eq!(tlb.lookup(1, 0x1234).map(|x| x.addr(0x1234)), Some(0x9234));
        assert_eq!(
            tlb.lookup(1, 0x2f_f000).map(|x| x.addr(0x2f_f000)),
            Some(0x4f_f000)
        );
        assert_eq!(tlb.lookup(2, 0x1000).map(|x| x.target), Some(0x7000));
        // A range in VM 1 that touches the 2 MiB page only.
        assert_eq!(tlb.invalidate(1, 0x30_0000, 1), 1);
        assert_eq!(tlb.lookup(1, 0x20_0000), None);
        assert!(tlb.lookup(1, 0x1000).is_some(), "outside the range");
        assert!(tlb.lookup(2, 0x1000).is_some(), "another VM");
        assert_eq!(tlb.invalidate(0, 0, 0), 2, "every VM, whole space");
        assert_eq!(tlb.valid(), 0);
    }

    #[test]
    fn requests_complete_in_order_only_when_taken() {
        let rq = TlbRequests::new();
        let mut tlb = Tlb::new(16);
        tlb.insert(3, t(0x5000, 12, 0x1000));
        let k = rq.post(InvRequest {
            vm: 3,
            va: 0x5000,
            pages: 1,
        });
        assert!(!rq.is_complete(k), "posted, not yet taken");
        assert!(rq.pending());
        assert_eq!(rq.take(&mut tlb), 1);
        assert!(rq.is_complete(k));
        assert_eq!(tlb.lookup(3, 0x5000), None);
        assert_eq!(rq.take(&mut tlb), 0);
    }
}
