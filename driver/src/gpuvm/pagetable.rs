//! A VM's page table, driver side: the four-level tree of `docs/reference-device.md`
//! section 10.3 in page-table pages the driver allocates from the device's region, a
//! shadow copy of every table (the driver never reads VRAM back), and the entry
//! writes through the VRAM window.
//!
//! Write order: a new table is zeroed before the entry pointing at it is stored (the
//! window's stores are Release and the walker's loads Acquire, so a walk that finds the
//! pointer finds the zeroed table). Freeing a table clears its parent's entry; the page
//! goes back to the allocator only after the caller's TLB invalidation completed (a
//! walk in flight may still read it until then).

use super::hw::Hw;
use super::stats::{add, Counters};
use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use userptr_ring::regs::pte;

const T2M: u64 = 2 << 20;

/// What the page-table code needs from the device and the VM.
pub(super) struct Ctx<'a> {
    pub(super) hw: &'a Hw,
    pub(super) alloc: &'a Mutex<IovaAllocator>,
    pub(super) stats: &'a Counters,
}

impl Ctx<'_> {
    fn alloc_page(&self) -> Result<u64> {
        let off = self
            .alloc
            .lock()
            .expect("page-table allocator poisoned")
            .alloc(4096, 4096)
            .map_err(|_| Error::VramExhausted {
                what: "page-table memory",
                len: 4096,
            })?;
        add(&self.stats.pt_pages_allocated, 1);
        Ok(off)
    }

    /// Give table pages back (after the TLB invalidation that covers them).
    pub(super) fn free_pages(&self, pages: &[u64]) {
        let mut a = self.alloc.lock().expect("page-table allocator poisoned");
        for &p in pages {
            a.free(p, 4096);
        }
        add(&self.stats.pt_pages_freed, pages.len() as u64);
    }
}

struct Table {
    level: u32,
    entries: Box<[u64]>,
    valid: u32,
}

/// A VM's page table (see the module docs).
pub(super) struct PageTable {
    root: u64,
    tables: HashMap<u64, Table>,
}

fn idx(va: u64, level: u32) -> usize {
    pte::index(va, level) as usize
}

impl PageTable {
    /// A page table with an empty root.
    pub(super) fn new(cx: &Ctx) -> Result<PageTable> {
        let mut pt = PageTable {
            root: 0,
            tables: HashMap::new(),
        };
        pt.root = pt.new_table(cx, 3)?;
        Ok(pt)
    }

    /// VRAM offset of the root table.
    pub(super) fn root(&self) -> u64 {
        self.root
    }

    /// Tables in use (the root included).
    pub(super) fn tables(&self) -> usize {
        self.tables.len()
    }

    fn new_table(&mut self, cx: &Ctx, level: u32) -> Result<u64> {
        let off = cx.alloc_page()?;
        cx.hw.zero_table(off);
        self.tables.insert(
            off,
            Table {
                level,
                entries: vec![0u64; 512].into_boxed_slice(),
                valid: 0,
            },
        );
        Ok(off)
    }

    /// Store `words` at entries `i..` of `table` (shadow and device).
    fn set(&mut self, cx: &Ctx, table: u64, i: usize, words: &[u64]) {
        let t = self.tables.get_mut(&table).expect("table present");
        for (k, &w) in words.iter().enumerate() {
            let old = t.entries[i + k];
            if old & pte::V != 0 {
                t.valid -= 1;
            }
            if w & pte::V != 0 {
                t.valid += 1;
            }
            t.entries[i + k] = w;
        }
        cx.hw.write_words(table + i as u64 * 8, words);
    }

    /// The table `entries[i]` of `table` points to, made if missing.
    fn child(&mut self, cx: &Ctx, table: u64, i: usize) -> Result<u64> {
        let t = &self.tables[&table];
        let (e, level) = (t.entries[i], t.level);
        if e & pte::V != 0 {
            if e & pte::L != 0 {
                return Err(Error::GpuVaBusy {
                    va: 0,
                    len: 0,
                    reason: "a 2 MiB page is mapped there",
                });
            }
            return Ok(e & pte::ADDR);
        }
        let c = self.new_table(cx, level - 1)?;
        self.set(cx, table, i, &[pte::table(c)]);
        Ok(c)
    }

    /// The table at `level` on the walk of `va`, made if missing.
    fn table_for(&mut self, cx: &Ctx, va: u64, level: u32) -> Result<u64> {
        let mut t = self.root;
        for l in (level + 1..=3).rev() {
            t = self.child(cx, t, idx(va, l))?;
        }
        Ok(t)
    }

    /// The existing table at `level` on the walk of `va`.
    fn find(&self, va: u64, level: u32) -> Option<u64> {
        let mut t = self.root;
        for l in (level + 1..=3).rev() {
            let e = self.tables[&t].entries[idx(va, l)];
            if e & pte::V == 0 || e & pte::L != 0 {
                return None;
            }
            t = e & pte::ADDR;
        }
        Some(t)
    }

    /// Map `[va, va + len)` (4 KiB-aligned) to `target + (x - va)` for every `x`: 2 MiB
    /// leaves where the VA and the target are both 2 MiB-aligned over a whole block,
    /// 4 KiB leaves elsewhere. The range must be unmapped.
    pub(super) fn map(
        &mut self,
        cx: &Ctx,
        va: u64,
        len: u64,
        target: u64,
        writable: bool,
        devmem: bool,
    ) -> Result<()> {
        let end = va + len;
        let mut at = va;
        while at < end {
            let t = target + (at - va);
            let l1 = self.table_for(cx, at, 1)?;
            let i1 = idx(at, 1);
            let e1 = self.tables[&l1].entries[i1];
            if at % T2M == 0 && at + T2M <= end && t % T2M == 0 && e1 & pte::V == 0 {
                self.set(cx, l1, i1, &[pte::leaf(t, writable, devmem)]);
                add(&cx.stats.ptes_written, 1);
                at += T2M;
                continue;
            }
            let l0 = self.child(cx, l1, i1)?;
            let i0 = idx(at, 0);
            let n = (512 - i0).min(((end - at) / 4096) as usize);
            if self.tables[&l0].entries[i0..i0 + n]
                .iter()
                .any(|e| e & pte::V != 0)
            {
                return Err(Error::GpuVaBusy {
                    va: at,
                    len: n as u64 * 4096,
                    reason: "already mapped in the page table",
                });
            }
            let words: Vec<u64> = (0..n as u64)
                .map(|k| pte::leaf(t + k * 4096, writable, devmem))
                .collect();
            self.set(cx, l0, i0, &words);
            add(&cx.stats.ptes_written, n as u64);
            at += n as u64 * 4096;
        }
        Ok(())
    }

    /// Apply `f` to every present leaf in `range`; `f` returns the new entry (or the
    /// same). Returns how many leaves `f` changed.
    fn leaves(&mut self, cx: &Ctx, range: Range<u64>, f: impl Fn(u64) -> u64) -> u64 {
        let mut changed = 0;
        let mut at = range.start & !0xfff;
        while at < range.end {
            let next = (at | (T2M - 1)) + 1;
            let Some(l1) = self.find(at, 1) else {
                at = next;
                continue;
            };
            let i1 = idx(at, 1);
            let e1 = self.tables[&l1].entries[i1];
            if e1 & pte::V != 0 && e1 & pte::L != 0 {
                let n = f(e1);
                if n != e1 {
                    self.set(cx, l1, i1, &[n]);
                    changed += 1;
                }
            } else if e1 & pte::V != 0 {
                let l0 = e1 & pte::ADDR;
                let stop = range.end.min(next);
                let (i0, j0) = (idx(at, 0), idx(stop - 1, 0) + 1);
                let old = self.tables[&l0].entries[i0..j0].to_vec();
                let new: Vec<u64> = old
                    .iter()
                    .map(|&e| if e & pte::V != 0 { f(e) } else { e })
                    .collect();
                let n = old.iter().zip(&new).filter(|(a, b)| a != b).count() as u64;
                if n > 0 {
                    self.set(cx, l0, i0, &new);
                    changed += n;
                }
            }
            at = next;
        }
        changed
    }

    /// Make every leaf in `range` non-present. Returns how many were.
    pub(super) fn zap(&mut self, cx: &Ctx, range: Range<u64>) -> u64 {
        let n = self.leaves(cx, range, |_| 0);
        add(&cx.stats.ptes_zapped, n);
        n
    }

    /// Make every leaf in `range` that points into the IOVA range `window` (a region
    /// the registry is taking away) non-present; entries pointing elsewhere (mapped
    /// again meanwhile, to the region that replaced it) stay. Returns how many.
    pub(super) fn zap_into(&mut self, cx: &Ctx, range: Range<u64>, window: &Range<u64>) -> u64 {
        let n = self.leaves(cx, range, |e| {
            let a = e & pte::ADDR;
            if e & pte::D == 0 && window.contains(&a) {
                0
            } else {
                e
            }
        });
        add(&cx.stats.ptes_zapped, n);
        n
    }

    /// Clear `W` on every leaf in `range` that points into the IOVA range `window`.
    pub(super) fn clear_write_into(
        &mut self,
        cx: &Ctx,
        range: Range<u64>,
        window: &Range<u64>,
    ) -> u64 {
        let n = self.leaves(cx, range, |e| {
            if e & pte::D == 0 && window.contains(&(e & pte::ADDR)) {
                e & !pte::W
            } else {
                e
            }
        });
        add(&cx.stats.write_bits_cleared, n);
        n
    }

    /// Unlink every table on the walks of `range` left without a present entry
    /// (bottom up; never the root). Returns their pages, to be freed by the caller
    /// once its TLB invalidation completed.
    pub(super) fn free_empty(&mut self, cx: &Ctx, range: Range<u64>) -> Vec<u64> {
        let mut freed = Vec::new();
        for level in 0..3u32 {
            // The tables of `level` under the range: walk their parents' spans.
            let span = 1u64 << pte::shift(level + 1);
            let mut at = range.start & !(span - 1);
            while at < range.end {
                if let Some(parent) = self.find(at, level + 1) {
                    let i = idx(at, level + 1);
                    let e = self.tables[&parent].entries[i];
                    if e & pte::V != 0 && e & pte::L == 0 {
                        let child = e & pte::ADDR;
                        if self.tables.get(&child).is_some_and(|t| t.valid == 0) {
                            self.set(cx, parent, i, &[0]);
                            self.tables.remove(&child);
                            freed.push(child);
                        }
                    }
                }
                at = match at.checked_add(span) {
                    Some(a) => a,
                    None => break,
                };
            }
        }
        freed
    }

    /// Every page of the tree (teardown).
    pub(super) fn pages(&self) -> Vec<u64> {
        self.tables.keys().copied().collect()
    }

    /// The shadow leaf mapping `va`, if present (for checks).
    pub(super) fn leaf(&self, va: u64) -> Option<u64> {
        let l1 = self.find(va, 1)?;
        let e1 = self.tables[&l1].entries[idx(va, 1)];
        if e1 & pte::V == 0 {
            return None;
        }
        if e1 & pte::L != 0 {
            return Some(e1);
        }
        let e0 = self.tables[&(e1 & pte::ADDR)].entries[idx(va, 0)];
        (e0 & pte::V != 0).then_some(e0)
    }
}
