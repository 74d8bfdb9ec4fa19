//! [`VfioDomain`]: a VFIO container with the type1v2 IOMMU, as an [`IommuDomain`].
//!
//! `VFIO_IOMMU_MAP_DMA` pins the pages backing the virtual range *at that moment*
//! (FOLL_LONGTERM) and programs the IOMMU; `VFIO_IOMMU_UNMAP_DMA` removes the
//! translation and unpins. type1v2 never splits a mapping: unmaps name exactly one
//! earlier map, the same contract [`IommuDomain::unmap`] has.
//!
//! Permissions: a mapping is read-only (`VFIO_DMA_MAP_FLAG_READ`: the device may read
//! host memory, its writes fault in the IOMMU) or read-write. type1 cannot change the
//! permissions of a live mapping, so [`IommuDomain::set_perm`] unmaps and maps again:
//! for the instant in between, device accesses to the range fault, which is what a
//! downgrade wants anyway and a brief stall for an upgrade.
//!
//! The usable IOVA ranges, the page sizes and the remaining mapping count come from
//! `VFIO_IOMMU_GET_INFO` and its capability chain, which exist once the first group
//! is attached (the IOMMU type is set then). The first 64 KiB of IOVA space are never
//! handed out, so that a zero or small bogus device address always faults.

use super::{device::VfioPci, faults::FaultLog, sys_err, vfio_err};
use crate::error::{Error, Result};
use crate::iommu::{IommuDomain, Perm, PAGE_4K};
use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_info, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
};
use vfio_ioctls::VfioContainer;

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: VFIO ioctls carry no size in their number.
const fn vfio_io(nr: u32) -> u32 {
    ((b';' as u32) << 8) | (100 + nr)
}
const VFIO_IOMMU_GET_INFO: u32 = vfio_io(12);
const VFIO_IOMMU_MAP_DMA: u32 = vfio_io(13);

/// IOVAs below this are never handed out (a null device address always faults).
const IOVA_FLOOR: u64 = 0x1_0000;

/// The default of the `vfio_iommu_type1` module parameter `dma_entry_limit`.
const DEFAULT_DMA_ENTRY_LIMIT: usize = 65535;

/// What `VFIO_IOMMU_GET_INFO` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type1Info {
    /// Supported IOMMU page sizes (bitmap, bit n: 2^n bytes).
    pub page_sizes: u64,
    /// Usable IOVA ranges (end exclusive), as the kernel reports them.
    pub iova_ranges: Vec<Range<u64>>,
    /// Mappings the container may still create (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`).
    pub dma_avail: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    host: u64,
    len: u64,
    perm: Perm,
}

/// One VFIO container = one IOMMU domain shared by the devices opened through it.
pub struct VfioDomain {
    container: Arc<VfioContainer>,
    /// Read once, after the first group is attached.
    info: OnceLock<Type1Info>,
    /// The live mappings, by IOVA.
    maps: Mutex<BTreeMap<u64, Entry>>,
    entry_limit: usize,
    faults: Arc<FaultLog>,
}

impl std::fmt::Debug for VfioDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDomain")
            .field("info", &self.info.get())
            .field("mappings", &self.mappings())
            .finish_non_exhaustive()
    }
}

impl VfioDomain {
    /// Open `/dev/vfio/vfio` and check for the type1v2 IOMMU.
    pub fn new() -> Result<Arc<VfioDomain>> {
        crate::fork::install();
        let container = VfioContainer::new(None).map_err(|e| {
            let op = match e {
                vfio_ioctls::VfioError::OpenContainer(_) => "open container",
                _ => "set IOMMU type",
            };
            vfio_err(op, "container", e)
        })?;
        Ok(Arc::new(VfioDomain {
            container: Arc::new(container),
            info: OnceLock::new(),
            maps: Mutex::new(BTreeMap::new()),
            entry_limit: read_entry_limit(),
            faults: Arc::new(FaultLog::open()),
        }))
    }

    /// Open the PCI function `bdf` (bound to vfio-pci) into this domain: its group
    /// joins the container (the first one sets the IOMMU type).
    pub fn open(self: &Arc<Self>, bdf: &str) -> Result<Arc<VfioPci>> {
        let dev = VfioPci::open(self, bdf)?;
        if self.info.get().is_none() {
            let info = query_info(self.container.as_raw_fd())
                .map_err(|e| sys_err("VFIO_IOMMU_GET_INFO", bdf, e))?;
            let _ = self.info.set(info);
        }
        Ok(dev)
    }

    /// What the kernel reported, once a device is open.
    pub fn info(&self) -> Option<&Type1Info> {
        self.info.get()
    }

    /// The container, for `vfio-ioctls` device setup.
    pub(crate) fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// The IOMMU faults logged since the domain was created.
    pub fn faults(&self) -> &Arc<FaultLog> {
        &self.faults
    }

    /// `dma_entry_limit` as this kernel has it set.
    pub fn entry_limit(&self) -> usize {
        self.entry_limit
    }

    fn map_flags(perm: Perm) -> u32 {
        let mut f = 0;
        if perm.read() {
            f |= VFIO_DMA_MAP_FLAG_READ;
        }
        if perm.write() {
            f |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        f
    }

    /// The kernel map, no bookkeeping.
    fn kernel_map(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<()> {
        let r = if perm == Perm::READ_WRITE {
            // SAFETY: the mapping makes the range reachable by the device; the
            // library never forms Rust references to memory it hands to a device
            // while a command may write it (callers wait for the command's fence,
            // as with any DMA), and the range was checked to lie in this process.
            unsafe {
                self.container
                    .vfio_dma_map(iova, len as usize, host as *mut u8)
                    .map_err(|e| match e {
                        vfio_ioctls::VfioError::IommuDmaMap(s) => {
                            std::io::Error::from_raw_os_error(s.errno())
                        }
                        other => std::io::Error::other(other.to_string()),
                    })
            }
        } else {
            let arg = vfio_iommu_type1_dma_map {
                argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
                flags: Self::map_flags(perm),
                vaddr: host,
                iova,
                size: len,
            };
            // SAFETY: VFIO_IOMMU_MAP_DMA reads `arg` (a complete, correctly sized
            // struct that outlives the call) and writes nothing back; the container
            // fd is open for the lifetime of `self`.
            let rc = unsafe {
                libc::ioctl(
                    self.container.as_raw_fd(),
                    VFIO_IOMMU_MAP_DMA as _,
                    &arg as *const vfio_iommu_type1_dma_map,
                )
            };
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        r.map_err(|e| self.map_error(iova, host, len, e))
    }

    /// The kernel's refusal as the typed errors every domain returns.
    fn map_error(&self, iova: u64, host: u64, len: u64, e: std::io::Error) -> Error {
        match e.raw_os_error() {
            Some(libc::EFAULT) => Error::BadAddress { addr: host, len },
            Some(libc::EEXIST) => Error::IovaBusy { iova, len },
            Some(libc::ENOSPC) => Error::TooManyMappings {
                limit: self.entry_limit,
            },
            Some(libc::ENOMEM) => {
                let limit = crate::proc_status::memlock_limit();
                let pinned = crate::proc_status::pinned_bytes().unwrap_or(0);
                Error::PinLimit { len, limit, pinned }
            }
            _ => sys_err("VFIO_IOMMU_MAP_DMA", "container", e),
        }
    }

    fn kernel_unmap(&self, iova: u64, len: u64) -> Result<()> {
        self.container
            .vfio_dma_unmap(iova, len as usize)
            .map_err(|e| vfio_err("VFIO_IOMMU_UNMAP_DMA", "container", e))
    }

    fn check(&self, iova: u64, host: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroLength { addr: host });
        }
        let min = self.page_sizes() & self.page_sizes().wrapping_neg();
        let min = min.max(PAGE_4K);
        if iova % min != 0 || host % min != 0 || len % min != 0 {
            return Err(Error::Unaligned {
                addr: host,
                len,
                align: min,
            });
        }
        let end = iova
            .checked_add(len)
            .ok_or(Error::Overflow { addr: iova, len })?;
        host.checked_add(len)
            .ok_or(Error::Overflow { addr: host, len })?;
        if !self
            .iova_ranges()
            .iter()
            .any(|r| r.start <= iova && end <= r.end)
        {
            return Err(Error::IovaOutOfRange { iova, len });
        }
        Ok(())
    }
}

impl IommuDomain for VfioDomain {
    fn map(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        self.check(iova, host, len)?;
        {
            let maps = crate::driver_section::lock(&self.maps);
            let overlaps = maps
                .range(..iova + len)
                .next_back()
                .is_some_and(|(&a, e)| a + e.len > iova);
            if overlaps {
                return Err(Error::IovaBusy { iova, len });
            }
            if maps.len() >= self.entry_limit {
                return Err(Error::TooManyMappings {
                    limit: self.entry_limit,
                });
            }
        }
        // Pin outside the lock: it faults pages in and can take milliseconds. The
        // IOVA range is the caller's (allocated to it), so no one else maps it
        // meanwhile; the kernel refuses an overlap with EEXIST anyway.
        self.kernel_map(iova, host, len, perm)?;
        crate::driver_section::lock(&self.maps).insert(iova, Entry { host, len, perm });
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let mut maps = crate::driver_section::lock(&self.maps);
        match maps.get(&iova) {
            Some(e) if e.len == len => {}
            _ => return Err(Error::NotMapped { iova, len }),
        }
        // Under the lock: a set_perm of the same mapping must not interleave.
        self.kernel_unmap(iova, len)?;
        maps.remove(&iova);
        Ok(())
    }

    fn set_perm(&self, iova: u64, len: u64, perm: Perm) -> Result<()> {
        if crate::fork::in_forked_child() {
            return Err(Error::ForkedChild);
        }
        let mut maps = crate::driver_section::lock(&self.maps);
        let e = match maps.get(&iova) {
            Some(e) if e.len == len => *e,
            _ => return Err(Error::NotMapped { iova, len }),
        };
        if e.perm == perm {
            return Ok(());
        }
        self.kernel_unmap(iova, len)?;
        match self.kernel_map(iova, e.host, len, perm) {
            Ok(()) => {
                maps.insert(iova, Entry { perm, ..e });
                Ok(())
            }
            Err(err) => {
                // The old mapping is gone and the new one failed (the pages may no
                // longer be pinnable with the new permission): the range is unmapped.
                maps.remove(&iova);
                Err(err)
            }
        }
    }

    fn page_sizes(&self) -> u64 {
        self.info.get().map_or(PAGE_4K, |i| i.page_sizes)
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        let Some(info) = self.info.get() else {
            return Vec::new();
        };
        info.iova_ranges
            .iter()
            .filter(|r| r.end > IOVA_FLOOR)
            .map(|r| r.start.max(IOVA_FLOOR)..r.end)
            .collect()
    }

    fn max_mappings(&self) -> usize {
        self.entry_limit
    }

    fn mappings(&self) -> usize {
        crate::driver_section::lock(&self.maps).len()
    }

    fn max_mapping_len(&self) -> u64 {
        // type1 has no per-mapping limit below the address width; the pin limit
        // (RLIMIT_MEMLOCK) is what bounds a mapping in practice.
        1 << 40
    }
}

impl Drop for VfioDomain {
    fn drop(&mut self) {
        // Closing the container unmaps and unpins everything anyway; unmapping here
        // keeps the accounting exact while devices are still open elsewhere.
        let maps = std::mem::take(&mut *crate::driver_section::lock(&self.maps));
        for (iova, e) in maps {
            if let Err(err) = self.kernel_unmap(iova, e.len) {
                tracing::error!("unmapping IOVA {iova:#x}: {err}");
            }
        }
    }
}

fn read_entry_limit() -> usize {
    std::fs::read_to_string("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_DMA_ENTRY_LIMIT)
}

/// `VFIO_IOMMU_GET_INFO` with its capability chain.
fn query_info(fd: i32) -> std::io::Result<Type1Info> {
    let base = std::mem::size_of::<vfio_iommu_type1_info>();
    let mut words: Vec<u64> = vec![0; base.div_ceil(8)];
    let mut argsz = base as u32;
    for _ in 0..2 {
        words = vec![0; (argsz as usize).div_ceil(8)];
        words[0] = argsz as u64; // argsz (low half), flags 0
                                 // SAFETY: `words` is at least `argsz` bytes, 8-aligned (as the struct needs),
                                 // and lives across the call; the kernel writes at most `argsz` bytes.
        let rc = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO as _, words.as_mut_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let want = words[0] as u32;
        if want <= argsz {
            break;
        }
        argsz = want; // the capability chain did not fit: ask again with room
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(parse_info(&bytes))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Parse a `vfio_iommu_type1_info` and its capability chain from raw bytes.
fn parse_info(b: &[u8]) -> Type1Info {
    let flags = u32_at(b, 4).unwrap_or(0);
    let page_sizes = if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        u64_at(b, 8).unwrap_or(PAGE_4K)
    } else {
        PAGE_4K
    };
    let mut info = Type1Info {
        page_sizes,
        // Without the capability the whole 64-bit space is usable (older kernels).
        iova_ranges: vec![0..u64::MAX],
        dma_avail: None,
    };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return info;
    }
    let mut off = u32_at(b, 16).unwrap_or(0) as usize;
    let mut hops = 0;
    while off != 0 && hops < 64 {
        hops += 1;
        let Some(hdr) = u32_at(b, off) else { break };
        let id = hdr & 0xffff;
        let next = u32_at(b, off + 4).unwrap_or(0) as usize;
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(b, off + 8).unwrap_or(0) as usize;
            let mut ranges = Vec::new();
            for i in 0..n.min(1024) {
                let at = off + 16 + i * 16;
                let (Some(s), Some(e)) = (u64_at(b, at), u64_at(b, at + 8)) else {
                    break;
                };
                // The kernel's `end` is inclusive.
                ranges.push(s..e.saturating_add(1));
            }
            if !ranges.is_empty() {
                info.iova_ranges = ranges;
            }
        } else if id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL {
            info.dma_avail = u32_at(b, off + 8);
        }
        if next <= off {
            break; // a chain only moves forward
        }
        off = next;
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }

    #[test]
    fn parses_page_sizes_iova_ranges_and_dma_avail() {
        let mut b = vec![0u8; 24 + 16 + 32 + 12];
        let n = b.len() as u32;
        put32(&mut b, 0, n);
        put32(&mut b, 4, VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS);
        put64(&mut b, 8, (1 << 12) | (1 << 21) | (1 << 30));
        put32(&mut b, 16, 24);
        // IOVA range capability at 24, next at 72.
        put32(&mut b, 24, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE | (1 << 16));
        put32(&mut b, 28, 72);
        put32(&mut b, 32, 2);
        put64(&mut b, 40, 0);
        put64(&mut b, 48, 0xfedf_ffff);
        put64(&mut b, 56, 0xfef0_0000);
        put64(&mut b, 64, (1 << 39) - 1);
        // DMA avail at 72, end of chain.
        put32(&mut b, 72, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL | (1 << 16));
        put32(&mut b, 76, 0);
        put32(&mut b, 80, 65530);
        let i = parse_info(&b);
        assert_eq!(i.page_sizes, (1 << 12) | (1 << 21) | (1 << 30));
        assert_eq!(i.iova_ranges, vec![0..0xfee0_0000, 0xfef0_0000..(1 << 39)]);
        assert_eq!(i.dma_avail, Some(65530));
    }

    #[test]
    fn a_truncated_or_looping_chain_is_not_followed_past_the_buffer() {
        let mut b = vec![0u8; 32];
        put32(&mut b, 4, VFIO_IOMMU_INFO_CAPS);
        put32(&mut b, 16, 24);
        put32(&mut b, 24, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE);
        put32(&mut b, 28, 24); // points at itself
        let i = parse_info(&b);
        assert_eq!(i.page_sizes, PAGE_4K);
        assert_eq!(i.iova_ranges, vec![0..u64::MAX]);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // include/uapi/linux/vfio.h: VFIO_TYPE ';', VFIO_BASE 100.
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
    }
}
