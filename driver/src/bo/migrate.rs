//! The move of a BO between VRAM and system memory, in the order of the module docs
//! of `bo` (mark moving → close the gate and block the CPU range → wait for the BO's
//! fences → COPY to a shadow binding of the destination → retarget the BO's PTEs,
//! TLB invalidated → remap the CPU range → open the gate, clear moving → give up the
//! old place). Runs under the manager's migration lock; holds no other lock while it
//! waits for the device.

use super::object::{BoInner, Place};
use super::sysmem::SysMem;
use super::{add, Manager, Placement, DEVICE_TIMEOUT, SHADOW};
use crate::error::{Error, Result};
use crate::queue::WaitMode;
use std::os::fd::AsFd;
use userptr_ring::Descriptor;

/// Map the CPU range over the BO's current place (at creation, and after a move).
pub(super) fn map_cpu(m: &Manager, bo: &BoInner) -> Result<()> {
    let st = bo.lock();
    map_place(m, bo, &st.place)
}

fn map_place(m: &Manager, bo: &BoInner, place: &Place) -> Result<()> {
    match place {
        Place::Vram(off) => {
            let a = &m.aperture;
            bo.cpu
                .map(a.fd.as_fd(), a.file_offset + (off - a.vram_base))
        }
        Place::System(s) => {
            bo.cpu.map(s.fd(), 0)?;
            s.seal_mappings()
        }
        Place::Gone => Err(Error::BoFreed { id: bo.id }),
    }
}

/// Give a place up (after nothing maps it any more: neither the PTEs nor the CPU).
fn give_up(m: &Manager, len: u64, p: Place) {
    match p {
        Place::Vram(off) => m.gpu.free_device_memory(off, len),
        Place::System(s) => drop(s),
        Place::Gone => {}
    }
}

/// Copy `len` bytes from GPU VA `src` to `dst` with the device, and wait.
fn device_copy(m: &Manager, src: u64, dst: u64, len: u64) -> Result<()> {
    // SAFETY: a VM of bound driver memory only (no SVM): both VAs are the manager's
    // own bindings of BO memory, which no Rust reference covers at the byte level
    // (the destination is fresh; the source is only read).
    let f = unsafe { m.vm.submit(&m.q, &[Descriptor::copy(src, dst, len)]) }?;
    m.q.wait_batch(f, WaitMode::Block, DEVICE_TIMEOUT).map(drop)
}

/// Move `bo` to `to`; the caller holds `m.moving`. Returns whether it moved.
pub(super) fn run(m: &Manager, bo: &BoInner, to: Placement) -> Result<bool> {
    let _section = crate::driver_section::enter();
    let knobs = m.knobs();
    // 1. Moving: device commands on the BO wait from now on.
    let fences = {
        let mut st = bo.lock();
        if st.released {
            return Err(Error::BoFreed { id: bo.id });
        }
        if st.place.placement() == Some(to) {
            return Ok(false);
        }
        st.moving = true;
        std::mem::take(&mut st.fences)
    };
    let end_moving = || {
        bo.lock().moving = false;
        bo.moved.notify_all();
    };
    let dest = match to {
        Placement::Vram => super::evict::alloc_vram(m, bo.len, bo.id).map(Place::Vram),
        Placement::System => SysMem::new(&m.driver, bo.len as usize).map(Place::System),
    };
    let dest = match dest {
        Ok(d) => d,
        Err(e) => {
            bo.lock().fences = fences;
            end_moving();
            return Err(e);
        }
    };
    // 2. Stop new CPU access: the gate first, so every fault after the mprotect finds
    //    it closed.
    bo.gate.close();
    let undo = |e: Error, dest: Place| {
        if let Err(u) = bo.cpu.unblock() {
            tracing::error!("buffer object {}: giving CPU access back: {u}", bo.id);
        }
        bo.gate.open();
        give_up(m, bo.len, dest);
        end_moving();
        Err(e)
    };
    if !knobs.skip_cpu_block {
        if let Err(e) = bo.cpu.block() {
            return undo(e, dest);
        }
    }
    // 3. The device work on the BO.
    if let Err(e) = BoInner::wait_fences(&fences) {
        bo.lock().fences = fences;
        return undo(e, dest);
    }
    let hook = *crate::driver_section::lock(&m.hook);
    if let Some(h) = hook {
        crate::driver_section::outside(|| h(bo.cpu.addr() as *const u8));
    }
    // 4. Copy, into a shadow binding of the destination.
    let target = dest.target().expect("a destination");
    let copied =
        m.vm.bind_target(bo.va + SHADOW, bo.len, target)
            .and_then(|shadow| {
                let r = device_copy(m, bo.va, bo.va + SHADOW, bo.len);
                m.vm.unbind_target(shadow).and(r)
            });
    if let Err(e) = copied {
        return undo(e, dest);
    }
    // 5. The device's view (Xe's order: rewrite, TLB invalidation waited for; the old
    //    place goes only after that), and 6. the CPU's view.
    let old = {
        let mut st = bo.lock();
        let b = st.binding.as_ref().expect("a live BO is bound");
        if let Err(e) = m.vm.retarget(b, target) {
            drop(st);
            return undo(e, dest);
        }
        if let Err(e) = map_place(m, bo, &dest) {
            // Back to the old place, which still holds every byte.
            let back = st.place.target().expect("placed");
            let b = st.binding.as_ref().expect("bound");
            if let Err(r) = m.vm.retarget(b, back) {
                tracing::error!("buffer object {}: retargeting back: {r}", bo.id);
            }
            drop(st);
            return undo(e, dest);
        }
        let old = std::mem::replace(&mut st.place, dest);
        st.moving = false;
        old
    };
    // 7. Wake the CPU accesses and the device commands.
    bo.gate.open();
    bo.moved.notify_all();
    give_up(m, bo.len, old);
    add(
        match to {
            Placement::Vram => &m.stats.to_vram,
            Placement::System => &m.stats.to_system,
        },
        1,
    );
    add(&m.stats.bytes_moved, bo.len);
    // Relaxed: an LRU clock.
    if to == Placement::Vram {
        bo.last_use
            .store(m.touch(), std::sync::atomic::Ordering::Relaxed);
    }
    Ok(true)
}
