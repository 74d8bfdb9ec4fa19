//! The IOMMU-domain abstraction: what the registry and the queues need from an IOMMU.
//!
//! A domain translates device addresses (IOVAs) to host memory. `map` pins the host
//! pages that back a virtual range *at that moment* (VFIO type1 semantics) and makes
//! them reachable at an IOVA with the given permissions; `unmap` removes the
//! translation and releases the pin. Two implementations, each in its wing: the
//! reference device's io_uring-backed domain (`reference::uring_iommu::UringIommu`) and
//! VFIO type1v2 (`vfio::VfioDomain`).

use crate::dma_memory::DmaMemory;
use crate::error::Result;
use std::ops::Range;
use std::sync::Arc;

/// Device access permissions of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// The device may read host memory.
    pub const READ: Perm = Perm(1);
    /// The device may write host memory.
    pub const WRITE: Perm = Perm(2);
    /// Both.
    pub const READ_WRITE: Perm = Perm(3);

    /// Whether every permission of `other` is in `self`.
    pub fn allows(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the device may read.
    pub fn read(self) -> bool {
        self.allows(Perm::READ)
    }

    /// Whether the device may write.
    pub fn write(self) -> bool {
        self.allows(Perm::WRITE)
    }
}

/// The page sizes a domain can map, as a bitmap (bit n set: 2^n bytes).
pub const PAGE_4K: u64 = 1 << 12;
/// 2 MiB pages.
pub const PAGE_2M: u64 = 1 << 21;
/// 1 GiB pages.
pub const PAGE_1G: u64 = 1 << 30;

/// An IOMMU domain a device reaches host memory through.
///
/// Implementations are shared between threads: the registry maps from submitting
/// threads while the device translates from its own.
pub trait IommuDomain: Send + Sync {
    /// Pin `len` bytes of host memory at virtual address `host` and make them reachable
    /// at `iova` with `perm`. `host`, `iova` and `len` must be aligned to the smallest
    /// page size; the IOVA range must be free and inside [`IommuDomain::iova_ranges`].
    fn map(&self, iova: u64, host: u64, len: u64, perm: Perm) -> Result<()>;

    /// Map driver-owned coherent memory (ring structures: descriptors, completions,
    /// fences) at `iova`: pinned and permission-checked exactly as [`IommuDomain::map`]
    /// maps `[mem.addr(), mem.addr() + mem.len())`. A domain whose device can reach
    /// such memory through a view of its own (the reference device) keeps `mem` alive
    /// while it is mapped; the default is a plain `map` (a real device reaches it by
    /// DMA like any memory). Never used for application memory.
    fn map_coherent(&self, iova: u64, mem: &Arc<DmaMemory>, perm: Perm) -> Result<()> {
        self.map(iova, mem.addr(), mem.len() as u64, perm)
    }

    /// Remove the mapping that starts at `iova` with length `len` and release its pin.
    /// Device accesses already in flight finish against the old pages.
    fn unmap(&self, iova: u64, len: u64) -> Result<()>;

    /// Change the device permissions of the mapping at `iova` (e.g. a write-permission
    /// downgrade after `mprotect`). Takes effect for every access issued after return.
    fn set_perm(&self, iova: u64, len: u64, perm: Perm) -> Result<()>;

    /// Supported page sizes (bitmap, see [`PAGE_4K`]).
    fn page_sizes(&self) -> u64;

    /// The usable IOVA ranges.
    fn iova_ranges(&self) -> Vec<Range<u64>>;

    /// The most mappings the domain holds at once (VFIO: `dma_entry_limit`).
    fn max_mappings(&self) -> usize;

    /// Mappings currently held.
    fn mappings(&self) -> usize;

    /// The largest single mapping, in bytes.
    fn max_mapping_len(&self) -> u64;
}
