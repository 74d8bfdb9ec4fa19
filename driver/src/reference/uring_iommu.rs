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
//! Written over the `io-uring` crate's typed builders; the `unsafe` here is the
//! crate's buffer-registration and submission contract, justified at each block.

use crate::error::{Error, Result};
use crate::iommu::{IommuDomain, Perm, PAGE_1G, PAGE_2M, PAGE_4K};
use crate::reference::fault_injection::PinFaults;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use userptr_ring::{AccessKind, FaultRecord};

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
}

impl Default for UringIommuConfig {
    fn default() -> Self {
        UringIommuConfig {
            slots: MAX_SLOTS,
            iova_ranges: vec![0x1_0000..(1 << 39)],
            sq_entries: 256,
            pin_faults: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    len: u64,
    host: u64,
    perm: Perm,
    slot: u16,
    /// False while the pin is being taken: visible to overlap checks, not to the device.
    ready: bool,
}

#[derive(Debug, Default)]
struct Table {
    entries: BTreeMap<u64, Entry>,
    free_slots: Vec<u16>,
}

impl Table {
    fn overlapping(&self, iova: u64, len: u64) -> bool {
        let end = iova + len;
        if let Some((&s, e)) = self.entries.range(..end).next_back() {
            return s + e.len > iova;
        }
        false
    }

    /// The ready entry containing `iova`.
    fn lookup(&self, iova: u64) -> Option<(u64, Entry)> {
        let (&s, e) = self.entries.range(..=iova).next_back()?;
        (e.ready && iova < s + e.len).then_some((s, *e))
    }
}

/// An IOMMU domain whose mappings are io_uring fixed-buffer registrations.
pub struct UringIommu {
    uring: IoUring,
    table: RwLock<Table>,
    port_taken: AtomicBool,
    cfg: UringIommuConfig,
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

impl UringIommu {
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
        Ok(Arc::new(UringIommu {
            uring,
            table: RwLock::new(table),
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
        })
    }

    fn check_range(&self, iova: u64, host: u64, len: u64) -> Result<()> {
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

    fn register(&self, slot: u16, host: u64, len: u64) -> io::Result<()> {
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

    fn pin_error(e: io::Error, host: u64, len: u64) -> Error {
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

impl IommuDomain for UringIommu {
    fn map(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        self.check_range(iova, host, len)?;
        let slot = {
            let mut t = self.table.write().expect("iommu table lock poisoned");
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
        let mut t = self.table.write().expect("iommu table lock poisoned");
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

    fn unmap(&self, iova: u64, len: u64) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let slot = {
            let mut t = self.table.write().expect("iommu table lock poisoned");
            match t.entries.get(&iova) {
                Some(e) if e.len == len && e.ready => {
                    let slot = e.slot;
                    t.entries.remove(&iova);
                    slot
                }
                _ => return Err(Error::NotMapped { iova, len }),
            }
        };
        // The translation is gone, so no new access can start; requests already
        // accepted hold their own reference to the buffer and finish first.
        let r = self.register(slot, 0, 0);
        let mut t = self.table.write().expect("iommu table lock poisoned");
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
        let mut t = self.table.write().expect("iommu table lock poisoned");
        match t.entries.get_mut(&iova) {
            Some(e) if e.len == len && e.ready => {
                e.perm = perm;
                Ok(())
            }
            _ => Err(Error::NotMapped { iova, len }),
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
        self.table
            .read()
            .expect("iommu table lock poisoned")
            .entries
            .len()
    }

    fn max_mapping_len(&self) -> u64 {
        MAX_MAPPING_LEN
    }
}

/// Which way a transfer moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Host memory → device memory: the device *reads* the IOVA.
    ToDevice,
    /// Device memory → host memory: the device *writes* the IOVA.
    FromDevice,
}

/// One DMA transfer between an IOVA range and device memory.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// To or from device memory.
    pub dir: Direction,
    /// The host side, as an IOVA (translated and permission-checked).
    pub iova: u64,
    /// Bytes to move.
    pub len: u64,
    /// The device-memory side, as an offset into VRAM.
    pub vram_off: u64,
    /// The next transfer in the batch starts only after this one finished.
    pub then: bool,
}

/// Why a batch of transfers failed.
#[derive(Debug)]
pub enum DmaError {
    /// Translation failed: nothing of the batch was started.
    Fault(FaultRecord),
    /// The kernel failed a transfer.
    Io(io::Error),
}

struct Sqe {
    slot: u16,
    host: u64,
    len: u32,
    vram_off: u64,
    dir: Direction,
    link: bool,
}

/// The device side of a [`UringIommu`]: translates IOVAs and moves data.
pub struct DmaPort {
    iommu: Arc<UringIommu>,
    scratch: Vec<Sqe>,
}

impl DmaPort {
    /// The IOMMU this port belongs to.
    pub fn iommu(&self) -> &Arc<UringIommu> {
        &self.iommu
    }

    /// Check that all of `[iova, iova + len)` is mapped with the permission `access`
    /// needs; the first IOVA that is not is the fault.
    pub fn check(&self, iova: u64, len: u64, access: AccessKind) -> Result<(), FaultRecord> {
        let need = match access {
            AccessKind::Read => Perm::READ,
            AccessKind::Write => Perm::WRITE,
        };
        let fault = |iova| FaultRecord { iova, access };
        let end = iova.checked_add(len).ok_or(fault(iova))?;
        let table = self.iommu.table.read().expect("iommu table lock poisoned");
        let mut at = iova;
        while at < end {
            let (start, e) = table.lookup(at).ok_or(fault(at))?;
            if !e.perm.allows(need) {
                return Err(fault(at));
            }
            at = start + e.len;
        }
        Ok(())
    }

    /// Run `batch` against device memory `vram` and return when every transfer has
    /// finished. Transfers run concurrently except where `then` orders them. All
    /// translations are checked first: on a fault nothing is started.
    pub fn run(&mut self, vram: BorrowedFd<'_>, batch: &[Transfer]) -> Result<(), DmaError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.scratch.clear();
        let iommu = self.iommu.clone();
        let table = iommu.table.read().expect("iommu table lock poisoned");
        let mut prev_then = false;
        for tr in batch {
            let (need, access) = match tr.dir {
                Direction::ToDevice => (Perm::READ, AccessKind::Read),
                Direction::FromDevice => (Perm::WRITE, AccessKind::Write),
            };
            let fault = |iova| DmaError::Fault(FaultRecord { iova, access });
            let first = self.scratch.len();
            let mut iova = tr.iova;
            let end = tr.iova.checked_add(tr.len).ok_or(fault(tr.iova))?;
            let mut vram_off = tr.vram_off;
            while iova < end {
                let (start, e) = table.lookup(iova).ok_or(fault(iova))?;
                if !e.perm.allows(need) {
                    return Err(fault(iova));
                }
                let seg_end = end.min(start + e.len);
                while iova < seg_end {
                    let n = (seg_end - iova).min(CHUNK);
                    self.scratch.push(Sqe {
                        slot: e.slot,
                        host: e.host + (iova - start),
                        len: n as u32,
                        vram_off,
                        dir: tr.dir,
                        link: tr.then,
                    });
                    iova += n;
                    vram_off += n;
                }
            }
            // A transfer that follows an ordered one must wait for it as a whole, so
            // its pieces join the chain.
            if prev_then {
                let last = self.scratch.len() - 1;
                for s in &mut self.scratch[first..last] {
                    s.link = true;
                }
            }
            prev_then = tr.then;
        }
        if let Some(last) = self.scratch.last_mut() {
            last.link = false;
        }
        // Submit under the shared lock: io_uring takes its reference on each buffer at
        // submission, after which an unmap can no longer pull the slot from under it.
        let submitted = self.submit_all(vram);
        drop(table);
        let (pushed, mut first_err) = match submitted {
            Ok(n) => (n, None),
            Err((n, e)) => (n, Some(e)),
        };
        // Reap everything that was accepted, even after an error: no transfer may be
        // left running into device memory the engine is about to reuse.
        let mut done = 0;
        while done < pushed {
            if let Err(e) = self.iommu.uring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                first_err.get_or_insert(e);
                break;
            }
            // SAFETY: only this port (one per IOMMU, owned by the engine thread) touches
            // the completion queue.
            let cq = unsafe { self.iommu.uring.completion_shared() };
            for cqe in cq {
                done += 1;
                let want = self.scratch[cqe.user_data() as usize].len as i32;
                if cqe.result() != want && first_err.is_none() {
                    first_err = Some(if cqe.result() < 0 {
                        io::Error::from_raw_os_error(-cqe.result())
                    } else {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "short device transfer")
                    });
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(DmaError::Io(e)),
        }
    }

    /// Push every scratch entry, submitting whenever the queue fills (never in the
    /// middle of a linked chain). Returns how many were submitted.
    fn submit_all(
        &mut self,
        vram: BorrowedFd<'_>,
    ) -> std::result::Result<usize, (usize, io::Error)> {
        let fd = types::Fd(vram.as_raw_fd());
        let cap = self.iommu.cfg.sq_entries.max(8) as usize;
        let mut i = 0;
        while i < self.scratch.len() {
            // The chain starting at i: up to and including the first unlinked entry.
            let mut j = i;
            while self.scratch[j].link {
                j += 1;
            }
            let chain = j + 1 - i;
            // SAFETY: only this port touches the submission queue (see `run`).
            let mut sq = unsafe { self.iommu.uring.submission_shared() };
            if cap - sq.len() < chain.min(cap) {
                drop(sq);
                self.iommu.uring.submit().map_err(|e| (i, e))?;
                // SAFETY: as above: only this port touches the submission queue.
                sq = unsafe { self.iommu.uring.submission_shared() };
            }
            for (k, s) in self.scratch[i..=j].iter().enumerate() {
                let entry = match s.dir {
                    Direction::ToDevice => {
                        opcode::WriteFixed::new(fd, s.host as *const u8, s.len, s.slot)
                            .offset(s.vram_off)
                            .build()
                    }
                    Direction::FromDevice => {
                        opcode::ReadFixed::new(fd, s.host as *mut u8, s.len, s.slot)
                            .offset(s.vram_off)
                            .build()
                    }
                };
                let flags = if s.link {
                    squeue::Flags::IO_LINK
                } else {
                    squeue::Flags::empty()
                };
                let entry = entry.flags(flags).user_data((i + k) as u64);
                // SAFETY: the buffer is a registered slot (checked by translation under
                // the table lock, which is held until submission), the host address lies
                // inside that registration, and the memfd outlives the request because
                // `run` reaps every request before returning.
                while unsafe { sq.push(&entry) }.is_err() {
                    drop(sq);
                    self.iommu.uring.submit().map_err(|e| (i + k, e))?;
                    // SAFETY: as above: only this port touches the submission queue.
                    sq = unsafe { self.iommu.uring.submission_shared() };
                }
            }
            drop(sq);
            i = j + 1;
        }
        self.iommu.uring.submit().map_err(|e| (i, e))?;
        Ok(self.scratch.len())
    }
}
