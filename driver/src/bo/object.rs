//! One buffer object: its fixed CPU range and gate, its placement, its binding in the
//! manager's VM, the fences of the device work on it; creation and freeing; the CPU
//! access API (a safe slice that borrows the object, raw pointers behind `unsafe`).

use super::cpu_map::CpuRange;
use super::fault::Gate;
use super::sysmem::SysMem;
use super::{Manager, Placement, DEVICE_TIMEOUT};
use crate::error::{Error, Result};
use crate::gpuvm::{Binding, Target};
use crate::submitter::FenceTracker;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, MutexGuard, Weak};
use std::time::Instant;

/// Where a BO's bytes are.
#[derive(Debug)]
pub(super) enum Place {
    /// A range of the device-memory heap at this VRAM offset.
    Vram(u64),
    /// A system memfd.
    System(SysMem),
    /// Freed.
    Gone,
}

impl Place {
    pub(super) fn placement(&self) -> Option<Placement> {
        match self {
            Place::Vram(_) => Some(Placement::Vram),
            Place::System(_) => Some(Placement::System),
            Place::Gone => None,
        }
    }

    pub(super) fn target(&self) -> Option<Target> {
        match self {
            Place::Vram(o) => Some(Target::DeviceMemory(*o)),
            Place::System(s) => Some(Target::Iova(s.iova())),
            Place::Gone => None,
        }
    }
}

pub(super) struct BoState {
    pub(super) place: Place,
    /// The BO's binding in the manager's VM (at `BoInner::va`), while alive.
    pub(super) binding: Option<Binding>,
    /// A move is in progress: device commands wait.
    pub(super) moving: bool,
    /// Freed (its memory given back).
    pub(super) released: bool,
    /// The latest seqno of the device work submitted on the BO, per queue.
    pub(super) fences: Vec<(Weak<dyn FenceTracker>, u64)>,
}

impl BoState {
    /// Whether device work on the BO may still run.
    pub(super) fn busy(&self) -> bool {
        self.fences
            .iter()
            .any(|(q, s)| q.upgrade().is_some_and(|q| !q.is_done(*s)))
    }
}

/// What a [`Bo`] and its handles share.
pub(crate) struct BoInner {
    pub(super) id: u64,
    pub(super) len: u64,
    /// Its GPU VA in the manager's VM.
    pub(super) va: u64,
    pub(super) cpu: CpuRange,
    pub(super) gate: Gate,
    pub(super) state: std::sync::Mutex<BoState>,
    /// Signalled when a move ends.
    pub(super) moved: Condvar,
    pub(super) last_use: AtomicU64,
    pub(super) mgr: Weak<Manager>,
}

impl BoInner {
    pub(super) fn lock(&self) -> MutexGuard<'_, BoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait (bounded) for the device work on the BO.
    pub(super) fn wait_fences(fences: &[(Weak<dyn FenceTracker>, u64)]) -> Result<()> {
        let deadline = Instant::now() + DEVICE_TIMEOUT;
        for (q, s) in fences {
            let Some(q) = q.upgrade() else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            q.wait_done(*s, left)?;
        }
        Ok(())
    }
}

/// A buffer object (see the module docs of [`crate::bo`]). Freed on drop (errors are
/// logged; [`super::BoManager::free`] returns them).
pub struct Bo {
    inner: Arc<BoInner>,
    mgr: Arc<Manager>,
}

/// Names a BO for moves and queries, without access to its memory (a move keeps
/// every byte, so it may run while the BO's owner holds a slice of it). Outlives the
/// BO: using it afterwards is [`Error::BoFreed`].
#[derive(Clone)]
pub struct BoHandle {
    inner: Arc<BoInner>,
}

impl std::fmt::Debug for Bo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bo")
            .field("id", &self.inner.id)
            .field("len", &self.inner.len)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoHandle")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

pub(super) fn create(m: &Arc<Manager>, len: u64, place: Placement) -> Result<Bo> {
    let _section = crate::driver_section::enter();
    if len == 0 {
        return Err(Error::BoSize {
            len,
            reason: "a buffer object cannot be empty",
        });
    }
    let Some(len) = len.checked_next_multiple_of(4096).filter(|l| *l <= 1 << 40) else {
        return Err(Error::BoSize {
            len,
            reason: "larger than 1 TiB",
        });
    };
    let (_, heap) = m.gpu.device_memory();
    if len > heap {
        return Err(Error::BoSize {
            len,
            reason: "larger than the device's whole VRAM heap: it could never be placed there",
        });
    }
    let align = if len >= 2 << 20 { 2 << 20 } else { 4096 };
    let va = crate::driver_section::lock(&m.va)
        .alloc(len, align)
        .map_err(|_| Error::GpuVaBusy {
            va: super::VA_BASE,
            len,
            reason: "the buffer objects' GPU VA space is full",
        })?;
    let free_va = || crate::driver_section::lock(&m.va).free(va, len);
    let cpu = match CpuRange::reserve(len as usize) {
        Ok(c) => c,
        Err(e) => {
            free_va();
            return Err(e);
        }
    };
    let gate = match Gate::claim(cpu.addr(), len as usize) {
        Ok(g) => g,
        Err(e) => {
            free_va();
            return Err(e);
        }
    };
    // Relaxed: ids only need to be distinct.
    let id = m.next_id.fetch_add(1, Ordering::Relaxed);
    let inner = Arc::new(BoInner {
        id,
        len,
        va,
        cpu,
        gate,
        state: std::sync::Mutex::new(BoState {
            place: Place::Gone,
            binding: None,
            moving: false,
            released: false,
            fences: Vec::new(),
        }),
        moved: Condvar::new(),
        last_use: AtomicU64::new(m.touch()),
        mgr: Arc::downgrade(m),
    });
    let bo = Bo {
        inner,
        mgr: m.clone(),
    };
    // From here on, dropping `bo` undoes whatever was done.
    let backing = {
        let _mv = crate::driver_section::lock(&m.moving);
        let p = match place {
            Placement::Vram => Place::Vram(super::evict::alloc_vram(m, len, id)?),
            Placement::System => Place::System(SysMem::new(&m.driver, len as usize)?),
        };
        let mut st = bo.inner.lock();
        st.place = p;
        let b =
            m.vm.bind_target(va, len, st.place.target().expect("placed"))?;
        st.binding = Some(b);
        let fresh_vram = matches!(st.place, Place::Vram(_));
        drop(st);
        crate::driver_section::lock(&m.objects).insert(id, Arc::downgrade(&bo.inner));
        fresh_vram
    };
    super::migrate::map_cpu(m, &bo.inner)?;
    if backing {
        // Device memory holds whatever its last user left: zero it, through the
        // aperture (no device work is on a fresh range).
        bo.inner.cpu.zero();
    }
    Ok(bo)
}

impl Bo {
    /// Size in bytes (a 4 KiB multiple).
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Always false: a BO is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The BO's id (unique within its manager).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Where it is now (it may move right after).
    pub fn placement(&self) -> Placement {
        self.handle().placement().unwrap_or(Placement::System)
    }

    /// A handle for moves and queries.
    pub fn handle(&self) -> BoHandle {
        BoHandle {
            inner: self.inner.clone(),
        }
    }

    /// Its GPU VA in the manager's VM (what device commands on it use).
    pub fn gpu_va(&self) -> u64 {
        self.inner.va
    }

    /// The CPU bytes, shared: device writes need `&mut Bo`, so none runs while this
    /// lives (device reads may).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is mapped (read-write, or blocked by a move the fault
        // handler waits out) for the BO's life, which the borrow bounds; writers need
        // `&mut self` (CPU) or `&mut Bo` (device commands); a move keeps every byte.
        unsafe {
            std::slice::from_raw_parts(self.inner.cpu.addr() as *const u8, self.len() as usize)
        }
    }

    /// The CPU bytes, exclusive.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` excludes every other access through
        // this API.
        unsafe {
            std::slice::from_raw_parts_mut(self.inner.cpu.addr() as *mut u8, self.len() as usize)
        }
    }

    /// The first byte of the CPU range, fixed for the BO's life.
    ///
    /// # Safety
    ///
    /// The pointer is valid for `len()` bytes while the BO lives, whatever moves
    /// happen (an access during a move waits in the fault handler, so the handler
    /// must be installed, which a manager checks). The caller keeps Rust's aliasing
    /// rules for the bytes it accesses: no access through it may overlap a live slice
    /// from [`Bo::as_mut_slice`] (or a write one from [`Bo::as_slice`]), nor device
    /// commands writing the same bytes (their fences not yet reached), nor race with
    /// another thread's access to the same bytes except through atomics.
    pub unsafe fn as_ptr(&self) -> *mut u8 {
        self.inner.cpu.addr() as *mut u8
    }

    /// Hand the BO's memory to another process: refused, always (a BO is mapped by one
    /// process; see the module docs).
    pub fn export_fd(&self) -> Result<std::os::fd::OwnedFd> {
        Err(Error::BoNotShareable {
            reason: "a migration can zap only this process's CPU mapping; a second \
                     process's would keep the old place (the system backing is sealed \
                     against new writable mappings, the CPU range is MADV_DONTFORK)",
        })
    }

    /// The seals of its system backing (`F_SEAL_*` bits), `None` while in VRAM.
    pub fn system_seals(&self) -> Option<u32> {
        match &self.inner.lock().place {
            Place::System(s) => Some(s.seals()),
            _ => None,
        }
    }

    pub(super) fn inner(&self) -> &Arc<BoInner> {
        &self.inner
    }

    pub(super) fn free(self) -> Result<()> {
        let r = release(&self.mgr, &self.inner);
        // The Drop below finds it released.
        drop(self);
        r
    }
}

/// Give a BO's memory back: wait for its device work, unbind, free the place, empty
/// the CPU range. Idempotent.
fn release(m: &Manager, bo: &BoInner) -> Result<()> {
    let _section = crate::driver_section::enter();
    let _mv = crate::driver_section::lock(&m.moving);
    crate::driver_section::lock(&m.objects).remove(&bo.id);
    let (fences, binding, place) = {
        let mut st = bo.lock();
        if st.released {
            return Ok(());
        }
        st.released = true;
        (
            std::mem::take(&mut st.fences),
            st.binding.take(),
            std::mem::replace(&mut st.place, Place::Gone),
        )
    };
    let waited = BoInner::wait_fences(&fences);
    let unbound = match binding {
        Some(b) => m.vm.unbind_target(b),
        None => Ok(()),
    };
    // The CPU range stops mapping the backing before the backing goes (a VRAM range
    // may be handed to another BO next).
    let cleared = bo.cpu.clear();
    match place {
        Place::Vram(off) => m.gpu.free_device_memory(off, bo.len),
        Place::System(s) => drop(s),
        Place::Gone => {}
    }
    crate::driver_section::lock(&m.va).free(bo.va, bo.len);
    waited.and(unbound).and(cleared)
}

impl Drop for Bo {
    fn drop(&mut self) {
        if let Err(e) = release(&self.mgr, &self.inner) {
            tracing::error!("freeing buffer object {}: {e}", self.inner.id);
        }
    }
}

impl BoHandle {
    pub(super) fn inner(&self) -> &Arc<BoInner> {
        &self.inner
    }

    /// The BO's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Where the BO is now; `None` once freed.
    pub fn placement(&self) -> Option<Placement> {
        let st = self.inner.lock();
        if st.released {
            return None;
        }
        st.place.placement()
    }

    /// [`Error::BoForeign`] unless the BO belongs to `m`, [`Error::BoFreed`] once it is
    /// freed.
    pub(super) fn check(&self, m: &Arc<Manager>) -> Result<()> {
        if !std::ptr::eq(self.inner.mgr.as_ptr(), Arc::as_ptr(m)) {
            return Err(Error::BoForeign { id: self.inner.id });
        }
        if self.placement().is_none() {
            return Err(Error::BoFreed { id: self.inner.id });
        }
        Ok(())
    }
}

impl From<&Bo> for BoHandle {
    fn from(b: &Bo) -> BoHandle {
        b.handle()
    }
}
