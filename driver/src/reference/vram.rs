//! Device-local memory of the reference device ("VRAM"): a memfd, mapped into the
//! engine for compute and used as the file side of every io_uring DMA transfer.
//!
//! Only the engine thread touches it through the mapping, and only bytes no transfer
//! in flight touches: [`crate::reference::dma_port::DmaPort::run`] returns after reaping
//! every request it submitted, and a pipelined command (COPY, SAXPY) computes only on
//! the staging slots whose stage it has reaped, while the kernel moves other slots.
//!
//! The device-memory heap is shared with the CPU too: it is the device's BAR2
//! aperture (`docs/reference-device.md` section 11, [`crate::device::Aperture`]), which
//! the CPU maps `MAP_SHARED` from a duplicate of this memfd; the engine reaches the heap
//! only for device-memory pieces of commands, which the driver keeps apart from CPU
//! accesses to the same bytes.
//!
//! The staging area (where commands bring host data in and out) is *striped*: its
//! [`STRIPE`]-sized pieces are backed, round-robin, by [`Vram::stripe`]'s own memfds
//! (the lanes), mapped with `MAP_FIXED` over the same place of the engine's mapping, so
//! the engine still sees one contiguous device memory. The kernel's io_uring workers
//! serialise buffered writes to one file (io-wq hashes them by inode), so a transfer
//! into device memory that is split across lanes runs on several workers at once,
//! where it would queue behind one with a single file. [`Vram::file_at`] says which
//! file and offset hold a device-memory byte, for the DMA port.
//!
//! The page-table region (GPU virtual memory, `docs/reference-device.md` section 10) is
//! the exception: the driver writes it through the register window while the engine
//! walks it, so it has a mapping of its own, [`PtMemory`], accessed only with 64-bit
//! atomics, and no DMA transfer ever targets it.

use crate::error::{Error, Result};
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

/// The unit of the staging area's striping across lanes (the DMA port's largest
/// transfer, `uring_iommu::CHUNK`).
pub const STRIPE: u64 = super::uring_iommu::CHUNK;

/// The device's local memory.
pub struct Vram {
    fd: memfd::Memfd,
    ptr: NonNull<u8>,
    len: usize,
    /// The striped staging area (`[start, start + len)`, STRIPE-aligned) and its
    /// lanes; empty lanes: not striped.
    striped: std::ops::Range<u64>,
    lanes: Vec<memfd::Memfd>,
}

// SAFETY: the mapping is owned by this value and accessed through `&self`/`&mut self`
// methods only, so moving it to the engine thread is sound.
unsafe impl Send for Vram {}

impl Vram {
    /// Create `len` bytes of device memory (sparse until touched).
    pub fn new(len: usize) -> Result<Vram> {
        let len = len.next_multiple_of(4096);
        let fd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .create("userptr-vram")
            .map_err(|e| Error::sys("memfd_create(vram)", std::io::Error::other(e)))?;
        fd.as_file()
            .set_len(len as u64)
            .map_err(|e| Error::sys("ftruncate(vram)", e))?;
        // SAFETY: a fresh shared mapping of our own memfd, at a kernel-chosen address.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd.as_file(),
                0,
            )
        }
        .map_err(|e| Error::sys("mmap(vram)", e.into()))?;
        Ok(Vram {
            fd,
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
            striped: 0..0,
            lanes: Vec::new(),
        })
    }

    /// Back `[start, start + len)` (STRIPE-aligned, inside device memory, called once)
    /// with `lanes` memfds of its own, piece `k` by lane `k % lanes` (module doc).
    pub fn stripe(&mut self, start: u64, len: u64, lanes: usize) -> Result<()> {
        assert!(
            start % STRIPE == 0 && len % STRIPE == 0 && lanes > 0 && self.lanes.is_empty(),
            "a STRIPE-aligned staging area, striped once"
        );
        self.check(start, len);
        let pieces = len / STRIPE;
        let per_lane = pieces.div_ceil(lanes as u64) * STRIPE;
        let mut files = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let f = memfd::MemfdOptions::default()
                .close_on_exec(true)
                .create("userptr-staging")
                .map_err(|e| Error::sys("memfd_create(staging)", std::io::Error::other(e)))?;
            f.as_file()
                .set_len(per_lane)
                .map_err(|e| Error::sys("ftruncate(staging)", e))?;
            files.push(f);
        }
        for k in 0..pieces {
            let lane = &files[(k % lanes as u64) as usize];
            // SAFETY: MAP_FIXED over a STRIPE-sized piece of our own mapping (checked in
            // bounds above), which nothing references now (called before the engine
            // runs); the lane file is at least (k / lanes + 1) * STRIPE long.
            unsafe {
                rustix::mm::mmap(
                    self.ptr.as_ptr().add((start + k * STRIPE) as usize).cast(),
                    STRIPE as usize,
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::FIXED,
                    lane.as_file(),
                    (k / lanes as u64) * STRIPE,
                )
            }
            .map_err(|e| Error::sys("mmap(staging lane)", e.into()))?;
        }
        self.striped = start..start + len;
        self.lanes = files;
        Ok(())
    }

    /// The file and file offset that hold device-memory byte `off`, and how many bytes
    /// from there on lie contiguously in that file (up to the next lane change).
    pub fn file_at(&self, off: u64) -> (BorrowedFd<'_>, u64, u64) {
        if self.striped.contains(&off) {
            let rel = off - self.striped.start;
            let (k, within) = (rel / STRIPE, rel % STRIPE);
            let n = self.lanes.len() as u64;
            let lane = self.lanes[(k % n) as usize].as_file().as_fd();
            return (lane, (k / n) * STRIPE + within, STRIPE - within);
        }
        let run = if off < self.striped.start {
            self.striped.start - off
        } else {
            u64::MAX
        };
        (self.fd(), off, run)
    }

    /// The memfd of device memory (the aperture's file; outside the striped staging
    /// area, also the file DMA transfers use: [`Vram::file_at`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_file().as_fd()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, off: u64, n: u64) -> usize {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len as u64),
            "vram access {off}+{n} out of bounds ({})",
            self.len
        );
        off as usize
    }

    /// Bytes at `off`.
    pub fn bytes(&self, off: u64, n: u64) -> &[u8] {
        let o = self.check(off, n);
        // SAFETY: in bounds; no transfer is in flight outside DmaPort::run (module doc),
        // and `&self` excludes the engine's own `&mut` accessors.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(o), n as usize) }
    }

    /// Mutable bytes at `off`.
    pub fn bytes_mut(&mut self, off: u64, n: u64) -> &mut [u8] {
        let o = self.check(off, n);
        // SAFETY: as in `bytes`, and `&mut self` makes this the only live view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(o), n as usize) }
    }

    /// Copy `n` bytes from `src` to `dst` inside device memory (the engine's
    /// device-memory accesses; the ranges must not overlap).
    pub fn copy_within(&mut self, src: u64, dst: u64, n: u64) {
        let s = self.check(src, n);
        let d = self.check(dst, n);
        assert!(src + n <= dst || dst + n <= src, "vram copy ranges overlap");
        // SAFETY: both in bounds (checked) and disjoint; `&mut self` makes this the only
        // access; no transfer in flight (module doc).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(s),
                self.ptr.as_ptr().add(d),
                n as usize,
            )
        }
    }

    /// A second mapping of `[off, off + len)` (page-aligned) for the page tables,
    /// shared between the register file (the window) and the engine (the walker).
    pub fn page_table_view(&self, off: u64, len: u64) -> Result<PtMemory> {
        assert!(
            off % 4096 == 0 && len % 4096 == 0 && len > 0,
            "page-aligned view"
        );
        self.check(off, len);
        // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen address;
        // the range lies inside the file (checked above).
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                self.fd.as_file(),
                off,
            )
        }
        .map_err(|e| Error::sys("mmap(vram page tables)", e.into()))?;
        Ok(PtMemory {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len: len as usize,
        })
    }

    /// Two disjoint f32 arrays of `n` elements: `x` (read) and `y` (read-write).
    pub fn f32_pair_mut(&mut self, x_off: u64, y_off: u64, n: u64) -> (&[f32], &mut [f32]) {
        let bytes = n.checked_mul(4).expect("f32 count overflows");
        let xo = self.check(x_off, bytes);
        let yo = self.check(y_off, bytes);
        assert!(
            x_off % 4 == 0 && y_off % 4 == 0,
            "f32 arrays must be 4-aligned"
        );
        assert!(
            x_off + bytes <= y_off || y_off + bytes <= x_off,
            "f32 arrays overlap"
        );
        // SAFETY: both in bounds, 4-aligned (page-aligned base), disjoint (checked);
        // `&mut self` makes these the only views; no transfer in flight (module doc).
        unsafe {
            (
                std::slice::from_raw_parts(self.ptr.as_ptr().add(xo).cast(), n as usize),
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(yo).cast(), n as usize),
            )
        }
    }
}

/// The page-table region of device memory (or, for measurements, anonymous memory of
/// the same shape): 64-bit words, read and written only with atomics, so the driver's
/// window writes and the engine's page walks may run at the same time.
pub struct PtMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: every access is a 64-bit atomic on memory owned by this value.
unsafe impl Send for PtMemory {}
// SAFETY: as for Send: `&self` methods only do atomic loads and stores.
unsafe impl Sync for PtMemory {}

impl PtMemory {
    /// Anonymous memory laid out like the page-table region, zeroed: for the
    /// translation measurements (`userptr bench --suite gpuvm`) and unit tests.
    pub fn anonymous(len: usize) -> Result<PtMemory> {
        let len = len.max(4096).next_multiple_of(4096);
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::sys("mmap(page-table memory)", e.into()))?;
        Ok(PtMemory {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn word(&self, off: u64) -> Option<&std::sync::atomic::AtomicU64> {
        if off % 8 != 0 || off.checked_add(8).is_none_or(|e| e > self.len as u64) {
            return None;
        }
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the memory
        // lives as long as `self`, and is only ever accessed through atomics.
        Some(unsafe {
            std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(off as usize).cast())
        })
    }

    /// The word at byte offset `off` (8-aligned, in bounds; else 0). Acquire: a walk
    /// that reads an entry sees the table it points to as the driver wrote it.
    pub fn load(&self, off: u64) -> u64 {
        self.word(off)
            .map_or(0, |w| w.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Store `v` at byte offset `off` (8-aligned, in bounds; else ignored; returns
    /// whether it was stored). Release: pairs with `load`.
    pub fn store(&self, off: u64, v: u64) -> bool {
        match self.word(off) {
            Some(w) => {
                w.store(v, std::sync::atomic::Ordering::Release);
                true
            }
            None => false,
        }
    }
}

impl Drop for PtMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no reference into it outlives `&self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Drop for Vram {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; no slice into it outlives `&self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    /// What the engine writes through its mapping of the striped area is what the DMA
    /// port's file and offset hold (and the reverse), piece by piece and across a
    /// lane change; bytes outside the area stay in the VRAM file.
    #[test]
    fn a_striped_area_is_one_device_memory_to_the_engine_and_lanes_to_the_port() {
        let mut v = Vram::new((8 * STRIPE) as usize).unwrap();
        v.stripe(2 * STRIPE, 5 * STRIPE, 3).unwrap();
        for k in 0..8u64 {
            v.bytes_mut(k * STRIPE, STRIPE).fill(k as u8 + 1);
        }
        let mut files = std::collections::HashSet::new();
        for k in 0..8u64 {
            let off = k * STRIPE + 100;
            let (fd, foff, run) = v.file_at(off);
            files.insert(fd.as_raw_fd());
            let f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, foff).unwrap();
            assert_eq!(b[0], k as u8 + 1, "piece {k}");
            if (2..7).contains(&k) {
                assert_eq!(run, STRIPE - 100, "a lane's run ends at its piece");
                f.write_all_at(&[0xee], foff + 1).unwrap();
                assert_eq!(
                    v.bytes(off + 1, 1)[0],
                    0xee,
                    "the port's write shows in the mapping"
                );
            } else {
                assert_eq!(fd.as_raw_fd(), v.fd().as_raw_fd(), "outside: the VRAM file");
            }
        }
        assert_eq!(files.len(), 4, "three lanes and the VRAM file");
        assert_eq!(
            v.file_at(STRIPE).2,
            STRIPE,
            "before the area: runs up to it"
        );
    }
}
