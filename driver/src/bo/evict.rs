//! VRAM for a BO, under pressure: allocate from the device-memory heap; when it is
//! full, move the least recently used BO in VRAM out to system memory and try again.
//! A BO with device work in flight (or mid-move) is skipped; when every candidate is
//! busy, the least recently used one's work is waited for (bounded), never moved
//! under the device. Runs under the manager's migration lock.

use super::object::{BoInner, Place};
use super::{add, Manager, Placement};
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// VRAM for `len` bytes for BO `for_id` (which is never evicted for itself).
pub(super) fn alloc_vram(m: &Manager, len: u64, for_id: u64) -> Result<u64> {
    let align = if len >= 2 << 20 { 2 << 20 } else { 4096 };
    loop {
        if let Ok(off) = m.gpu.alloc_device_memory(len, align) {
            return Ok(off);
        }
        // The BOs in VRAM, least recently used first.
        let mut in_vram: Vec<(u64, Arc<BoInner>)> = crate::driver_section::lock(&m.objects)
            .values()
            .filter_map(|w| w.upgrade())
            .filter(|b| b.id != for_id)
            .filter(|b| matches!(b.lock().place, Place::Vram(_)))
            // Relaxed: an LRU clock.
            .map(|b| (b.last_use.load(Ordering::Relaxed), b))
            .collect();
        in_vram.sort_by_key(|(t, _)| *t);
        if in_vram.is_empty() {
            return Err(Error::VramExhausted {
                what: "device-memory heap (nothing left to evict)",
                len,
            });
        }
        let idle = in_vram.iter().find(|(_, b)| {
            let st = b.lock();
            let busy = st.moving || st.busy();
            if busy {
                add(&m.stats.evict_skipped_busy, 1);
            }
            !busy
        });
        let victim = match idle {
            Some((_, b)) => b.clone(),
            None => {
                // Every candidate is busy: wait for the oldest one's work.
                let b = in_vram[0].1.clone();
                let fences = b.lock().fences.clone();
                BoInner::wait_fences(&fences)?;
                b
            }
        };
        drop(in_vram);
        super::migrate::run(m, &victim, Placement::System)?;
        add(&m.stats.evictions, 1);
    }
}
