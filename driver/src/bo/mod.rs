//! Buffer objects (BOs): memory the driver allocates for the device, placed in device
//! memory (VRAM) or in system memory, mapped into the process at one fixed CPU range
//! for its whole life, and moved between the two by the device's own COPY while the
//! program keeps using it (seed 003, the other direction of the userptr problem).
//!
//! * [`BoManager`]: one per device: a GPU VM of its own (every BO is bound at a fixed
//!   GPU VA there), a ring for the copies and the commands on BOs, the LRU of the BOs
//!   in VRAM (`evict`), the aperture (the device memory the CPU can map: the
//!   reference device's BAR2, [`crate::device::Aperture`]);
//! * [`Bo`]: one object: its CPU range (`cpu_map`), its gate (`fault`), its placement
//!   (a VRAM range, or a system memfd pinned and IOMMU-mapped in the same domain as
//!   userptrs, `sysmem`); the safe slice API borrows it; [`BoHandle`] names it for
//!   migrations without touching its memory;
//! * `migrate`: the move; `commands`: device commands on BOs (waiting for a move).
//!
//! # The move, and who waits on what
//!
//! A migration (one at a time per manager, under its migration lock) runs:
//!
//! 1. it marks the BO *moving* (under the BO's state lock): from now on a device
//!    command on the BO waits (on the BO's condition variable, bounded) until the
//!    move is over, so no command ever sees a half-moved BO;
//! 2. it closes the BO's gate, then takes CPU access away: `mprotect(PROT_NONE)` over
//!    the CPU range. A CPU access from now on faults; the `SIGSEGV` handler finds the
//!    gate by address and sleeps on its futex word;
//! 3. it waits (bounded) for the fences of the device work already submitted on the
//!    BO;
//! 4. it binds the destination at a shadow GPU VA and copies the BO there with the
//!    device's COPY, waiting for its fence;
//! 5. it switches the device's view: the BO's PTEs are rewritten to the destination
//!    and the TLB invalidated and waited for (Xe's order), and only then is the old
//!    place given up (a system backing's IOVA unmapped and unpinned; a VRAM range
//!    freed) — after step 6, so that the CPU range no longer maps it either;
//! 6. it switches the CPU's view: `mmap(MAP_FIXED | MAP_SHARED)` of the destination
//!    (the aperture's file at the VRAM offset, or the new memfd) over the range, in
//!    one step;
//! 7. it opens the gate (`FUTEX_WAKE`): the faulting accesses return from the handler
//!    and execute again, against the new backing; and it clears *moving*, waking the
//!    device commands that waited.
//!
//! Who waits on whom: the faulting CPU thread waits on the gate word only (holding no
//! lock of the driver: the CPU access path takes none, and the handler takes none);
//! a device command waits on the BO's condition variable, holding nothing; the
//! migrating thread waits only on the device (fences, the TLB invalidation), on the
//! short critical sections of the BO's state lock and the VM's lock (never held
//! across a wait for a CPU access or for a move), and on its own system calls, which the kernel completes without any faulting thread (the
//! fault path dropped the `mmap_lock` before the signal was delivered, unlike the
//! `mmap_sem` deadlock of the seed's first design). The device engine never touches a
//! CPU range: it reaches the backing through its own mapping and the pins. So there
//! is no cycle, and every wait is bounded (a fault waits at most
//! [`fault::WAIT_LIMIT`]). The one cycle an application can build — the migrating
//! thread itself touching the BO mid-move (its signal handler, say) — is detected by
//! the handler (the gate records the migrating thread) and reported: the process
//! stops with a message instead of hanging.
//!
//! `driver/tests/loom_bo.rs` checks this order under loom, running the handler's own
//! decision ([`fault::decide`]) against a model of the kernel's side: no CPU or device
//! write is lost across one move or two, and no wait is left hanging; and each of
//! these, taken out, is found: the gate closed after the `mprotect` or opened before
//! the remap (a fault the handler cannot explain), no `mprotect`, no device wait (a
//! lost write), a `FUTEX_WAKE` before the word changes (a wait that never ends).
//!
//! Only device *use* counts for the LRU (the CPU mapping takes no faults in the
//! steady state, so CPU accesses are free and invisible); a BO with device work in
//! flight is skipped by eviction (or waited for, when every candidate is busy).
//!
//! # One process
//!
//! A BO is mapped by one process: the driver hands out no file descriptor of it, the
//! CPU range is `MADV_DONTFORK` (a fork child has no mapping of it), and a system
//! backing is sealed against new writable mappings (`F_SEAL_FUTURE_WRITE`) once the
//! CPU range maps it, so that a copy of its fd reaching another process (over a Unix
//! socket, through `/proc`) cannot map it writable: the second mapping is refused
//! ([`Bo::export_fd`] says so with [`Error::BoNotShareable`]). Keeping a second
//! process coherent would need its CPU range zapped by the migration, which a
//! userspace driver cannot do in another process without its cooperation.
//!
//! `SIGSEGV` is process-wide state: [`install_fault_handler`] installs it once, and a
//! manager refuses to start without it ([`Error::BoFaultHandlerMissing`]).

mod commands;
mod cpu_map;
mod evict;
pub mod fault;
mod migrate;
mod object;
mod sysmem;

pub use fault::{cpu_waits, fault_handler_installed, install_fault_handler};
pub use object::{Bo, BoHandle};

use crate::device::Aperture;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::gpuvm::{Gpu, GpuVm, VmConfig};
use crate::iova::IovaAllocator;
use crate::queue::CommandQueue;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Where a BO is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Device memory (the device-memory heap, mapped through the aperture).
    Vram,
    /// System memory (a memfd, pinned and IOMMU-mapped).
    System,
}

/// Test and demonstration knobs that switch one protection off, so a test can show
/// the hazard it prevents (`userptr torture --migrate --no-protect`). Never set them
/// otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoKnobs {
    /// Do not take CPU access away during a move: CPU writes made during the copy
    /// land in the old place and are lost.
    pub skip_cpu_block: bool,
    /// Device commands do not wait for a move in progress: they reach the old place
    /// after it was copied (their writes are lost) or a half-switched BO.
    pub skip_device_wait: bool,
}

/// How a manager is made.
#[derive(Clone, Copy, Debug)]
pub struct BoConfig {
    /// The ring for copies and commands on BOs (default: the device's last ring).
    pub ring: Option<u32>,
    /// Its slot count.
    pub ring_size: u32,
}

impl Default for BoConfig {
    fn default() -> Self {
        BoConfig {
            ring: None,
            ring_size: 64,
        }
    }
}

/// The manager's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoStats {
    /// BOs alive.
    pub live: u64,
    /// Moves to VRAM.
    pub to_vram: u64,
    /// Moves to system memory (evictions included).
    pub to_system: u64,
    /// Moves made to make room in VRAM.
    pub evictions: u64,
    /// BOs eviction skipped because device work on them was in flight.
    pub evict_skipped_busy: u64,
    /// Device commands that waited for a move.
    pub command_waits: u64,
    /// Bytes copied by moves.
    pub bytes_moved: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    to_vram: AtomicU64,
    to_system: AtomicU64,
    evictions: AtomicU64,
    evict_skipped_busy: AtomicU64,
    command_waits: AtomicU64,
    bytes_moved: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    // Relaxed: counters.
    c.fetch_add(n, Ordering::Relaxed);
}

/// The GPU VA space of the BOs (and, above `SHADOW`, the move destinations).
const VA_BASE: u64 = 1 << 40;
const VA_SIZE: u64 = 1 << 44;
const SHADOW: u64 = 1 << 45;
/// How long a manager waits for the device (a command, a fence, a move).
pub(crate) const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the manager, its BOs and their handles share.
pub(crate) struct Manager {
    driver: Driver,
    gpu: Gpu,
    vm: GpuVm,
    q: CommandQueue,
    aperture: Aperture,
    va: Mutex<IovaAllocator>,
    /// The BOs, by id (for eviction; the LRU order is their `last_use`).
    objects: Mutex<BTreeMap<u64, Weak<object::BoInner>>>,
    /// One move at a time (allocation, eviction, the shadow VA).
    moving: Mutex<()>,
    tick: AtomicU64,
    next_id: AtomicU64,
    stats: Counters,
    knobs: Mutex<BoKnobs>,
    /// Test hook: run on the migrating thread in the middle of every move.
    hook: Mutex<Option<fn(*const u8)>>,
}

impl Manager {
    fn knobs(&self) -> BoKnobs {
        *crate::driver_section::lock(&self.knobs)
    }

    fn touch(&self) -> u64 {
        // Relaxed: an LRU clock; exactness does not matter.
        self.tick.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Buffer objects on one device (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct BoManager {
    inner: Arc<Manager>,
}

impl std::fmt::Debug for BoManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoManager").finish_non_exhaustive()
    }
}

impl BoManager {
    /// A manager on `gpu`'s device: a VM of its own and a ring attached to it. Fails
    /// with [`Error::BoFaultHandlerMissing`] before [`install_fault_handler`], with
    /// [`Error::NoAperture`] on a device whose memory the CPU cannot map.
    pub fn new(gpu: &Gpu, cfg: BoConfig) -> Result<BoManager> {
        let _section = crate::driver_section::enter();
        if !fault_handler_installed() {
            return Err(Error::BoFaultHandlerMissing);
        }
        let driver = gpu.registry().driver().clone();
        let aperture = gpu.device().aperture().ok_or_else(|| Error::NoAperture {
            device: driver.name().to_string(),
        })?;
        let (heap, heap_len) = gpu.device_memory();
        if aperture.vram_base > heap || aperture.vram_base + aperture.len < heap + heap_len {
            return Err(Error::NoAperture {
                device: format!("{} (its aperture does not cover the heap)", driver.name()),
            });
        }
        let ring = cfg.ring.unwrap_or(driver.rings().saturating_sub(1));
        let q = driver.queue(ring, cfg.ring_size)?;
        let vm = gpu.create_vm(VmConfig::bound())?;
        vm.attach(&q)?;
        Ok(BoManager {
            inner: Arc::new(Manager {
                driver,
                gpu: gpu.clone(),
                vm,
                q,
                aperture,
                va: Mutex::new(IovaAllocator::new(&[VA_BASE..VA_BASE + VA_SIZE])),
                objects: Mutex::new(BTreeMap::new()),
                moving: Mutex::new(()),
                tick: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                stats: Counters::default(),
                knobs: Mutex::new(BoKnobs::default()),
                hook: Mutex::new(None),
            }),
        })
    }

    /// A new BO of `len` bytes (rounded up to 4 KiB), zeroed, placed at `place`. In
    /// VRAM, least recently used BOs are moved out to make room.
    pub fn create(&self, len: u64, place: Placement) -> Result<Bo> {
        object::create(&self.inner, len, place)
    }

    /// Move `bo` to `to` (nothing if it is there). Returns whether it moved.
    pub fn migrate(&self, bo: &BoHandle, to: Placement) -> Result<bool> {
        bo.check(&self.inner)?;
        let _m = crate::driver_section::lock(&self.inner.moving);
        migrate::run(&self.inner, bo.inner(), to)
    }

    /// Free `bo` now, reporting what went wrong (dropping it logs instead): waits for
    /// the device work on it, unbinds it, gives its memory back.
    pub fn free(&self, bo: Bo) -> Result<()> {
        bo.free()
    }

    /// The counters.
    pub fn stats(&self) -> BoStats {
        let s = &self.inner.stats;
        // Relaxed: counters.
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BoStats {
            live: crate::driver_section::lock(&self.inner.objects).len() as u64,
            to_vram: l(&s.to_vram),
            to_system: l(&s.to_system),
            evictions: l(&s.evictions),
            evict_skipped_busy: l(&s.evict_skipped_busy),
            command_waits: l(&s.command_waits),
            bytes_moved: l(&s.bytes_moved),
        }
    }

    /// Free bytes of VRAM (the device-memory heap).
    pub fn vram_free(&self) -> u64 {
        self.inner.gpu.device_memory_free()
    }

    /// Switch protections off for a test (see [`BoKnobs`]).
    pub fn set_knobs(&self, k: BoKnobs) {
        *crate::driver_section::lock(&self.inner.knobs) = k;
    }

    /// Run `hook` on the migrating thread in the middle of every move (CPU access
    /// blocked, before the copy), with the moving BO's CPU address: for the test that
    /// the fault path detects an access by the migrating thread itself. Test only.
    #[doc(hidden)]
    pub fn set_move_hook(&self, hook: Option<fn(*const u8)>) {
        *crate::driver_section::lock(&self.inner.hook) = hook;
    }

    /// The driver.
    pub fn driver(&self) -> &Driver {
        &self.inner.driver
    }
}
