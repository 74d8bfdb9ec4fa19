//! The reference device's IOMMU, built on io_uring fixed buffers.
//!
//! This module owns the one io_uring instance of a reference device and is the only
//! code that talks to it. A DMA map is a real kernel FOLL_LONGTERM pin: the host range
//! is registered into a slot of a sparse fixed-buffer table
//! (`IORING_REGISTER_BUFFERS_UPDATE`), exactly the pin VFIO type1 takes on
//! `VFIO_IOMMU_MAP_DMA`, counted in `VmPin` and against `RLIMIT_MEMLOCK`. Every device
//! access to host memory is an `IORING_OP_READ_FIXED` / `WRITE_FIXED` between that
//! registered buffer and device-local memory (a memfd): the kernel moves the data with
//! the pinned pages, never through the process's current page tables. So if the
//! process `madvise(MADV_DONTNEED)`s or unmaps the range, the device keeps reaching the
//! old pages, the hazard this project exists to manage, reproduced with real pins.
//!
//! The translation table (IOVA → slot, host address, permissions) lives here too. The
//! device side ([`DmaPort`]) translates and submits under the shared side of the
//! table's lock, so a concurrent `unmap` (exclusive side) can neither free a slot
//! between translation and submission nor let a slot be reused under a request: once
//! io_uring has accepted a request it holds its own reference to the buffer node, so
//! an in-flight access completes against the old pages and the pin is released after.
//!
//! Ring structures are the one exception to "every access is an io_uring transfer":
//! driver-owned coherent memory mapped with [`IommuDomain::map_coherent`] (a queue's
//! descriptors, completions and fence) is pinned and entered in the table like any
//! mapping, and its entry also holds the device's own view of it (an
//! `Arc<DmaMemory>`, the way `dma_alloc_coherent` gives both sides a view). The
//! engine translates and permission-checks a ring access exactly as a transfer, then
//! moves the bytes with plain loads and stores through that view, all under the
//! table's shared lock, so an `unmap` (exclusive lock) never races it. User memory
//! and buffer objects never have a view: they are reached only through their pins.
//!
//! Written over the `io-uring` crate's typed builders; the `unsafe` here is the
//! crate's buffer-registration and submission contract, justified at each block.

use super::dma_port::DmaPort;
use crate::dma_memory::DmaMemory;
use crate::error::{Error, Result};
use crate::iommu::{IommuDomain, Perm, PAGE_1G, PAGE_2M, PAGE_4K};
use crate::reference::fault_injection::{PinFaults, TransferFaults};
use io_uring::IoUring;
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// io_uring's limit on one registered buffer.
pub const MAX_MAPPING_LEN: u64 = 1 << 30;
/// io_uring's limit on the size of the buffer table (`IORING_MAX_REG_BUFFERS`).
pub const MAX_SLOTS: u32 = 1 << 14;
/// The largest single io_uring read or write the device issues; larger transfers are
/// split so that several kernel workers move them in parallel.
pub const CHUNK: u64 = 1 << 20;

/// Configuration of a reference IOMMU.
#[derive(Clone, Debug)]
pub struct UringIommuConfig {
    /// Buffer-table slots: the mapping-count limit (at most [`MAX_SLOTS`]).
    pub slots: u32,
    /// Usable IOVA ranges. The default mimics a 39-bit IOMMU and keeps page 0 out.
    pub iova_ranges: Vec<Range<u64>>,
    /// io_uring submission queue entries (requests in flight at once).
    pub sq_entries: u32,
    /// Fault injection for pin attempts (off by default; see [`PinFaults`]).
    pub pin_faults: Option<PinFaults>,
    /// Fault injection for the device's transfers out of device memory in pipelined
    /// commands (off by default; see [`TransferFaults`]).
    pub transfer_faults: Option<TransferFaults>,
}

impl Default for UringIommuConfig {
    fn default() -> Self {
        UringIommuConfig {
            slots: MAX_SLOTS,
            iova_ranges: vec![0x1_0000..(1 << 39)],
            sq_entries: 256,
            pin_faults: None,
            transfer_faults: None,
        }
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) len: u64,
    pub(super) host: u64,
    pub(super) perm: Perm,
    pub(super) slot: u16,
    /// False while the pin is being taken: visible to overlap checks, not to the device.
    pub(super) ready: bool,
    /// Driver-owned coherent memory ([`IommuDomain::map_coherent`]: ring structures):
    /// the device's own view of the pinned pages, kept alive by this entry. The
    /// device reaches it with plain loads and stores, after the same translation and
    /// permission check, under the table's shared lock. `None`: every other mapping
    /// (user memory, buffer objects), reached only through the pin (io_uring).
    pub(super) coherent: Option<Arc<DmaMemory>>,
}

#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) entries: BTreeMap<u64, Entry>,
    pub(super) free_slots: Vec<u16>,
}

impl Table {
    pub(super) fn overlapping(&self, iova: u64, len: u64) -> bool {
        let end = iova + len;
        if let Some((&s, e)) = self.entries.range(..end).next_back() {
            return s + e.len > iova;
        }
        false
    }

    /// The ready entry containing `iova`.
    pub(super) fn lookup(&self, iova: u64) -> Option<(u64, &Entry)> {
        let (&s, e) = self.entries.range(..=iova).next_back()?;
        (e.ready && iova < s + e.len).then_some((s, e))
    }
}

/// An IOMMU domain whose mappings are io_uring fixed-buffer registrations.
pub struct UringIommu {
    pub(super) uring: IoUring,
    pub(super) table: RwLock<Table>,
    /// Transfers submitted and not yet completed, per slot. Raised by the port under
    /// the table's shared lock, lowered (Release) as their completions are reaped;
    /// `unmap` and a permission change wait for zero (Acquire) after taking the
    /// translation away, so that when they return no transfer still reaches the pages
    /// through the old mapping: the guarantee a real IOMMU gives by blocking the DMA.
    pub(super) inflight: Box<[std::sync::atomic::AtomicU32]>,
    pub(super) port_taken: AtomicBool,
    pub(super) cfg: UringIommuConfig,
}

impl std::fmt::Debug for UringIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIommu")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn unavailable(source: io::Error) -> Error {
    let hint = match source.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel was built without io_uring (CONFIG_IO_URING)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring is disabled by sysctl kernel.io_uring_disabled or blocked by a \
             seccomp profile (container runtimes block it by default: run with a profile \
             that allows io_uring_setup, io_uring_enter and io_uring_register)"
        }
        Some(libc::EINVAL) => "the kernel is too old for sparse buffer tables (needs 5.19+)",
        Some(libc::ENOMEM) => "the kernel could not allocate the ring (memory or RLIMIT_MEMLOCK)",
        _ => "io_uring_setup or io_uring_register failed",
    };
    Error::IoUringUnavailable { source, hint }
}

impl Drop for UringIommu {
    fn drop(&mut self) {
        // The ring closes with us; its number may be reused by anyone.
        crate::driver_section::forget_own_ring(self.uring.as_raw_fd());
    }
}

/// How long `unmap` or a permission change waits for the transfers in flight on a slot.
const QUIESCE: std::time::Duration = std::time::Duration::from_secs(10);

impl UringIommu {
    /// Wait (bounded by [`QUIESCE`]) until no transfer submitted through `slot` is in
    /// flight. The caller took the slot's translation away (or changed it) under the
    /// exclusive table lock first, so no new transfer can start through the old one.
    fn quiesce(&self, slot: u16) -> bool {
        let c = &self.inflight[slot as usize];
        let deadline = std::time::Instant::now() + QUIESCE;
        let mut spins = 0u32;
        // Acquire: pairs with the port's Release decrement: the transfers' effects on
        // the pages happen before we unregister or report the permission changed.
        while c.load(Ordering::Acquire) != 0 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        true
    }

    /// Create the io_uring instance and its empty (sparse) buffer table.
    pub fn new(cfg: UringIommuConfig) -> Result<Arc<UringIommu>> {
        crate::fork::install();
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let slots = cfg.slots.clamp(1, MAX_SLOTS);
        let uring = IoUring::builder()
            .build(cfg.sq_entries.max(8))
            .map_err(unavailable)?;
        uring
            .submitter()
            .register_buffers_sparse(slots)
            .map_err(unavailable)?;
        let table = Table {
            entries: BTreeMap::new(),
            // Pop from the end: slot 0 is handed out first.
            free_slots: (0..slots as u16).rev().collect(),
        };
        // The driver's own ring: a seccomp monitor installed later leaves it alone.
        crate::driver_section::note_own_ring(uring.as_raw_fd());
        Ok(Arc::new(UringIommu {
            uring,
            table: RwLock::new(table),
            inflight: (0..slots)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            port_taken: AtomicBool::new(false),
            cfg: UringIommuConfig { slots, ..cfg },
        }))
    }

    /// The device side: translation and transfers. There is one port per IOMMU, taken
    /// by the device's engine thread; `None` if it was already taken.
    pub fn take_port(self: &Arc<Self>) -> Option<DmaPort> {
        // AcqRel: a plain once-flag; no data is published through it.
        if self.port_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(DmaPort {
            iommu: self.clone(),
            scratch: Vec::new(),
            sent: Vec::new(),
            free_ids: Vec::new(),
            left: vec![0; super::dma_port::TAGS as usize + 1],
            errs: (0..=super::dma_port::TAGS).map(|_| None).collect(),
            finished: std::collections::VecDeque::new(),
        })
    }

    pub(super) fn check_range(&self, iova: u64, host: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroLength { addr: host });
        }
        if (iova | host | len) % PAGE_4K != 0 {
            return Err(Error::Unaligned {
                addr: host,
                len,
                align: PAGE_4K,
            });
        }
        if host.checked_add(len).is_none() || iova.checked_add(len).is_none() {
            return Err(Error::Overflow { addr: host, len });
        }
        if len > MAX_MAPPING_LEN {
            return Err(Error::MappingTooLarge {
                len,
                max: MAX_MAPPING_LEN,
            });
        }
        if !self
            .cfg
            .iova_ranges
            .iter()
            .any(|r| r.start <= iova && iova + len <= r.end)
        {
            return Err(Error::IovaOutOfRange { iova, len });
        }
        Ok(())
    }

    pub(super) fn register(&self, slot: u16, host: u64, len: u64) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: host as *mut libc::c_void,
            iov_len: len as usize,
        };
        // SAFETY: the kernel pins the pages backing [host, host + len) (FOLL_LONGTERM)
        // and from then on reaches them only through that pin, never through this
        // process's page tables; so whatever the process later does to the range
        // (unmap, madvise, mprotect) cannot make the kernel touch memory the pin does
        // not own. The only accesses through the slot are the DmaPort's transfers,
        // which the caller's users synchronise with fences like any DMA. A null iovec
        // unregisters the slot.
        unsafe {
            self.uring
                .submitter()
                .register_buffers_update(slot as u32, &[iov], None)
        }
    }

    pub(super) fn pin_error(e: io::Error, host: u64, len: u64) -> Error {
        match e.raw_os_error() {
            Some(libc::EFAULT) if is_file_mapping(host, len) => {
                Error::UnsupportedMemory { addr: host, len }
            }
            Some(libc::EFAULT) => Error::BadAddress { addr: host, len },
            Some(libc::EOPNOTSUPP) => Error::UnsupportedMemory { addr: host, len },
            Some(libc::ENOMEM) => Error::PinLimit {
                len,
                limit: crate::proc_status::memlock_limit(),
                pinned: crate::proc_status::pinned_bytes().unwrap_or(0),
            },
            Some(libc::EAGAIN) => Error::PinAgain { addr: host, len },
            _ => Error::sys("io_uring_register(IORING_REGISTER_BUFFERS_UPDATE)", e),
        }
    }
}

/// Whether any of `[host, host + len)` is a regular-file mapping (io_uring refuses
/// those with EFAULT on current kernels, which would otherwise read as "unmapped").
/// Error path only: reads /proc/self/maps.
fn is_file_mapping(host: u64, len: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    maps.lines().any(|line| {
        let mut f = line.split_whitespace();
        let Some((a, b)) = f.next().and_then(|r| r.split_once('-')) else {
            return false;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            return false;
        };
        let path = f.nth(4).unwrap_or("");
        a < host + len
            && host < b
            && path.starts_with('/')
            && !path.starts_with("/memfd:")
            && !path.starts_with("/dev/shm/")
            && !path.starts_with("/SYSV")
    })
}

impl UringIommu {
    /// `map`, with the device's coherent view of the range where there is one.
    fn map_entry(
        &self,
        iova: u64,
        host: u64,
        len: u64,
        perm: Perm,
        coherent: Option<Arc<DmaMemory>>,
    ) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        self.check_range(iova, host, len)?;
        let slot = {
            let mut t = crate::driver_section::write(&self.table);
            if t.overlapping(iova, len) {
                return Err(Error::IovaBusy { iova, len });
            }
            let slot = t.free_slots.pop().ok_or(Error::TooManyMappings {
                limit: self.cfg.slots as usize,
            })?;
            t.entries.insert(
                iova,
                Entry {
                    len,
                    host,
                    perm,
                    slot,
                    ready: false,
                    coherent,
                },
            );
            slot
        };
        // Pin outside the lock: it faults pages in and can take milliseconds. An
        // injected failure stands in for the kernel's answer (nothing is pinned).
        let r = match self.cfg.pin_faults.as_ref().and_then(PinFaults::next) {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => self.register(slot, host, len),
        };
        let mut t = crate::driver_section::write(&self.table);
        match r {
            Ok(()) => {
                if let Some(e) = t.entries.get_mut(&iova) {
                    e.ready = true;
                }
                Ok(())
            }
            Err(e) => {
                t.entries.remove(&iova);
                t.free_slots.push(slot);
                Err(Self::pin_error(e, host, len))
            }
        }
    }
}

impl IommuDomain for UringIommu {
    fn map(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<()> {
        self.map_entry(iova, host, len, perm, None)
    }

    /// Pinned and entered in the table exactly as [`IommuDomain::map`] does, and the
    /// entry keeps `mem` (the device's view of it) alive until it is unmapped: the
    /// engine reaches ring structures there with plain loads and stores instead of an
    /// io_uring transfer (datasheet section 5.1).
    fn map_coherent(&self, iova: u64, mem: &Arc<DmaMemory>, perm: Perm) -> Result<()> {
        self.map_entry(iova, mem.addr(), mem.len() as u64, perm, Some(mem.clone()))
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let (slot, view) = {
            let mut t = crate::driver_section::write(&self.table);
            match t.entries.get(&iova) {
                Some(e) if e.len == len && e.ready => {
                    let slot = e.slot;
                    let e = t.entries.remove(&iova).expect("entry just looked up");
                    (slot, e.coherent)
                }
                _ => return Err(Error::NotMapped { iova, len }),
            }
        };
        // The device's coherent view (if any) is out of the table: no access through
        // it can start now, and none is running (they run under the shared lock). Our
        // reference goes here, outside the lock; the owner's keeps the memory.
        drop(view);
        // The translation is gone, so no new access can start; wait for those already
        // submitted (io_uring holds its own reference to the buffer and would finish
        // them into the old pages after the unregistration).
        if !self.quiesce(slot) {
            // Still busy after the bound: keep the slot registered (pinned) and out of
            // circulation rather than let a late transfer reach pages given back.
            return Err(Error::DeviceTimeout {
                what: "the transfers on an unmapped IOVA range",
                waited_ms: QUIESCE.as_millis() as u64,
            });
        }
        let r = self.register(slot, 0, 0);
        let mut t = crate::driver_section::write(&self.table);
        match r {
            Ok(()) => {
                t.free_slots.push(slot);
                Ok(())
            }
            // The slot stays out of circulation: better one slot lost than a pin
            // reused while its old buffer is still registered.
            Err(e) => Err(Error::sys(
                "io_uring_register(IORING_REGISTER_BUFFERS_UPDATE, unregister)",
                e,
            )),
        }
    }

    fn set_perm(&self, iova: u64, len: u64, perm: Perm) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let slot = {
            let mut t = crate::driver_section::write(&self.table);
            match t.entries.get_mut(&iova) {
                Some(e) if e.len == len && e.ready => {
                    e.perm = perm;
                    e.slot
                }
                _ => return Err(Error::NotMapped { iova, len }),
            }
        };
        // A transfer translated under the old permission may still be running.
        if self.quiesce(slot) {
            Ok(())
        } else {
            Err(Error::DeviceTimeout {
                what: "the transfers on an IOVA range whose permission changed",
                waited_ms: QUIESCE.as_millis() as u64,
            })
        }
    }

    fn page_sizes(&self) -> u64 {
        PAGE_4K | PAGE_2M | PAGE_1G
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.cfg.iova_ranges.clone()
    }

    fn max_mappings(&self) -> usize {
        self.cfg.slots as usize
    }

    fn mappings(&self) -> usize {
        crate::driver_section::read(&self.table).entries.len()
    }

    fn max_mapping_len(&self) -> u64 {
        MAX_MAPPING_LEN
    }
}
