//! Device commands on BOs: each waits (bounded) while a BO it names is moving, then is
//! submitted under the BOs' state locks (so no move can start between the check and
//! the submission) and its fence recorded on every BO it touches (what a move and an
//! eviction wait for). Commands address BOs by their fixed GPU VAs, so a command
//! submitted after a move reaches the new place; one submitted before it is waited
//! for by the move.

use super::object::{Bo, BoInner};
use super::{add, BoManager, Manager, DEVICE_TIMEOUT};
use crate::error::{Error, Result};
use crate::queue::{BatchFences, WaitMode};
use crate::submitter::Submitter;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Instant;
use userptr_ring::{Completion, Descriptor};

/// Submit `d` (GPU VAs of `bos`), fenced on each of them; returns its fences.
pub(super) fn submit(m: &Manager, bos: &[&BoInner], d: Descriptor) -> Result<BatchFences> {
    let _section = crate::driver_section::enter();
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    let wait = !m.knobs().skip_device_wait;
    let mut order: Vec<&BoInner> = bos.to_vec();
    order.sort_by_key(|b| b.id);
    order.dedup_by_key(|b| b.id);
    'retry: loop {
        // Lock in id order (no two submitters wait on each other); a BO mid-move:
        // let go of everything and wait for it.
        let mut guards = Vec::with_capacity(order.len());
        for b in &order {
            let g = b.lock();
            if g.released {
                return Err(Error::BoFreed { id: b.id });
            }
            if g.moving && wait {
                drop(guards);
                add(&m.stats.command_waits, 1);
                let mut g = g;
                while g.moving {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::DeviceTimeout {
                            what: "a buffer object's migration",
                            waited_ms: DEVICE_TIMEOUT.as_millis() as u64,
                        });
                    }
                    g = b
                        .moved
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                continue 'retry;
            }
            guards.push(g);
        }
        // SAFETY: a VM of bound driver memory only (no SVM): the descriptors reach
        // only BO bindings, whose CPU-side borrows the callers hold as the command
        // needs (`&mut Bo` for what it writes).
        let f = unsafe { m.vm.submit(&m.q, std::slice::from_ref(&d)) }?;
        let t: Weak<dyn crate::submitter::FenceTracker> = m.q.tracker();
        let tick = m.touch();
        for (b, g) in order.iter().zip(guards.iter_mut()) {
            match g.fences.iter_mut().find(|(w, _)| Weak::ptr_eq(w, &t)) {
                Some(x) => x.1 = x.1.max(f.end.seqno),
                None => g.fences.push((t.clone(), f.end.seqno)),
            }
            // Relaxed: an LRU clock.
            b.last_use.store(tick, Ordering::Relaxed);
        }
        return Ok(f);
    }
}

/// [`submit`] and wait for the completion.
pub(super) fn run(m: &Manager, bos: &[&BoInner], d: Descriptor) -> Result<Completion> {
    let f = submit(m, bos, d)?;
    m.q.wait_batch(f, WaitMode::Block, DEVICE_TIMEOUT)
}

fn check(m: &BoManager, bo: &Bo, off: u64, len: u64) -> Result<()> {
    bo.handle().check(&m.inner)?;
    if len == 0 || off.checked_add(len).is_none_or(|e| e > bo.len()) {
        return Err(Error::BoRange {
            off,
            len,
            size: bo.len(),
        });
    }
    Ok(())
}

impl BoManager {
    /// Fill `len` bytes of `bo` from `off` with `byte`, by the device; returns when done.
    pub fn fill(&self, bo: &mut Bo, off: u64, len: u64, byte: u8) -> Result<()> {
        check(self, bo, off, len)?;
        let d = Descriptor::fill(bo.gpu_va() + off, len, byte);
        run(&self.inner, &[bo.inner()], d).map(drop)
    }

    /// The CRC32C of `len` bytes of `bo` from `off`, computed by the device.
    pub fn crc32c(&self, bo: &Bo, off: u64, len: u64) -> Result<u32> {
        check(self, bo, off, len)?;
        let d = Descriptor::crc32c(bo.gpu_va() + off, len, 0);
        run(&self.inner, &[bo.inner()], d).map(|c| c.result as u32)
    }

    /// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off`, by the device.
    pub fn copy(&self, src: &Bo, src_off: u64, dst: &mut Bo, dst_off: u64, len: u64) -> Result<()> {
        check(self, src, src_off, len)?;
        check(self, dst, dst_off, len)?;
        let d = Descriptor::copy(src.gpu_va() + src_off, dst.gpu_va() + dst_off, len);
        run(&self.inner, &[src.inner(), dst.inner()], d).map(drop)
    }

    /// Submit a fill of `len` bytes of `bo` from `off` without waiting; returns the
    /// fences (wait with [`BoManager::wait`]).
    ///
    /// # Safety
    ///
    /// The device writes those bytes until the fence is reached: the caller makes no
    /// CPU access to them meanwhile (through [`Bo::as_slice`] or otherwise).
    pub unsafe fn fill_async(&self, bo: &Bo, off: u64, len: u64, byte: u8) -> Result<BatchFences> {
        check(self, bo, off, len)?;
        let d = Descriptor::fill(bo.gpu_va() + off, len, byte);
        submit(&self.inner, &[bo.inner()], d)
    }

    /// Wait for fences from [`BoManager::fill_async`].
    pub fn wait(&self, f: BatchFences) -> Result<()> {
        self.inner
            .q
            .wait_batch(f, WaitMode::Block, DEVICE_TIMEOUT)
            .map(drop)
    }
}
