//! The reference device's staging FIFOs: the buffers a COPY of IOVAs goes through
//! (datasheet section 4.1). Each is a pipe, sized with `F_SETPIPE_SZ` to hold one
//! copy chunk: the device reads a chunk of the source through the IOMMU into the FIFO
//! (`WRITE_FIXED` from the source's pinned pages into the pipe), then writes it from
//! the FIFO to the destination through the IOMMU (`READ_FIXED` from the pipe into the
//! destination's pinned pages), the two linked. A FIFO is device-internal memory the
//! engine never computes on, which is why COPY can use one where SAXPY and CRC32C
//! need staging in VRAM.
//!
//! Why pipes: io_uring runs a buffered write to a regular file (a memfd) on a kernel
//! worker *hashed* by the file, so writes to one file run one at a time and io-wq
//! starts a second worker for them only when none runs; a pipe is not a regular file,
//! so transfers through different FIFOs run on as many workers as there are cores.
//!
//! A FIFO holds bytes only between the two halves of one chunk: a chunk whose pair
//! failed may leave some behind, so the engine [`Fifos::clear`]s that FIFO before it
//! carries anything else. The pipes are blocking (io-wq's workers
//! wait in them); a chunk never exceeds [`Fifos::chunk`], what every pipe holds, so
//! the write half never waits for a reader that is linked behind it.
//!
//! This module owns the pipe interface (`pipe2`, `F_SETPIPE_SZ`); its `unsafe` is
//! those two calls.

use crate::error::{Error, Result};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One FIFO: the two ends of a pipe.
struct Fifo {
    read: OwnedFd,
    write: OwnedFd,
}

/// The staging FIFOs of a device's COPY pipeline, made on first use
/// ([`Fifos::ready`]).
pub struct Fifos {
    fifos: Vec<Fifo>,
    broken: Vec<bool>,
    chunk: u64,
    /// FIFOs to make on first use (0: made, or none wanted).
    want: usize,
}

/// A fresh blocking pipe holding at least `want` bytes if the kernel lets it (else
/// what it gives: `F_SETPIPE_SZ` is capped by `fs.pipe-max-size` and the user's pipe
/// page quota), and the bytes it holds.
fn pipe(want: u64) -> io::Result<(Fifo, u64)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are fresh and owned by nobody else.
    let fifo = unsafe {
        Fifo {
            read: OwnedFd::from_raw_fd(fds[0]),
            write: OwnedFd::from_raw_fd(fds[1]),
        }
    };
    let fd = fifo.write.as_raw_fd();
    let want = want.min(i32::MAX as u64) as libc::c_int;
    // SAFETY: fcntl on a pipe descriptor we own; F_SETPIPE_SZ / F_GETPIPE_SZ take an
    // int (or nothing) and touch no memory of ours.
    let mut got = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, want) };
    if got < 0 {
        // Refused (over the quota or the maximum): keep the default capacity.
        // SAFETY: as above.
        got = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    }
    if got <= 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fifo, got as u64))
}

impl Fifos {
    /// `count` FIFOs of up to `chunk` bytes each (a power of two), made when the
    /// first COPY asks for them ([`Fifos::ready`]): a pipe's capacity counts against
    /// its user's pipe-page quota (`fs.pipe-user-pages-soft`) from the moment it is
    /// sized, so a device that never copies takes none of it.
    pub fn lazy(count: usize, chunk: u64) -> Fifos {
        Fifos {
            fifos: Vec::new(),
            broken: Vec::new(),
            chunk,
            want: count,
        }
    }

    /// Make the FIFOs if that is still to do. If the kernel refuses a pipe, there
    /// are none (COPY stages in device memory) and the error is returned, once.
    pub fn ready(&mut self) -> Result<()> {
        if self.want == 0 {
            return Ok(());
        }
        let want = std::mem::take(&mut self.want);
        *self = Fifos::new(want, self.chunk)?;
        Ok(())
    }

    /// `count` FIFOs of up to `chunk` bytes each (a power of two), made now. The
    /// chunk the pipeline uses is the least any of them holds, rounded down to a
    /// power of two.
    pub fn new(count: usize, chunk: u64) -> Result<Fifos> {
        let mut fifos = Vec::with_capacity(count);
        let mut least = chunk;
        for _ in 0..count {
            let (f, cap) = pipe(chunk).map_err(|e| Error::sys("pipe2(staging fifo)", e))?;
            least = least.min(cap);
            fifos.push(f);
        }
        // A pipe's capacity is a power of two number of pages; keep the chunk one too,
        // so that chunks stay page-aligned in the operands.
        let chunk = if least.is_power_of_two() {
            least
        } else {
            1 << least.ilog2()
        };
        Ok(Fifos {
            broken: vec![false; fifos.len()],
            fifos,
            chunk,
            want: 0,
        })
    }

    /// How many FIFOs there are.
    pub fn len(&self) -> usize {
        self.fifos.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.fifos.is_empty()
    }

    /// The most bytes one chunk may carry through a FIFO (every FIFO holds that much).
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// FIFO `k`'s ends: (the end the device writes into, the end it reads from).
    pub fn ends(&self, k: usize) -> (RawFd, RawFd) {
        let f = &self.fifos[k];
        (f.write.as_raw_fd(), f.read.as_raw_fd())
    }

    /// Whether FIFO `k` may carry chunks (a FIFO that could not be emptied after a
    /// failed chunk may not: its slot stages in device memory instead).
    pub fn usable(&self, k: usize) -> bool {
        k < self.fifos.len() && !self.broken[k]
    }

    /// Make FIFO `k` empty again after a failed chunk, which may have left bytes in
    /// it: replace it by a fresh pipe or, if the kernel gives none that holds a
    /// chunk, read the old one dry. Nothing may be in flight on FIFO `k` (a request
    /// still queued would look its descriptor up only when it issues). If neither
    /// works, FIFO `k` is not [`Fifos::usable`] any more.
    pub fn clear(&mut self, k: usize) {
        match pipe(self.chunk) {
            Ok((f, cap)) if cap >= self.chunk => {
                self.fifos[k] = f;
                return;
            }
            _ => {}
        }
        if drain(self.fifos[k].read.as_raw_fd()).is_err() {
            self.broken[k] = true;
        }
    }
}

/// Read everything there is in the pipe `fd` (blocking reads of no more than the
/// bytes it holds, so none waits).
fn drain(fd: RawFd) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe we own writes one int into `avail`.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if avail <= 0 {
            return Ok(());
        }
        let n = (avail as usize).min(buf.len());
        // SAFETY: a read of at most `buf.len()` bytes into our own buffer.
        if unsafe { libc::read(fd, buf.as_mut_ptr().cast(), n) } <= 0 {
            return Err(io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lazy FIFOs are made on the first `ready` only.
    #[test]
    fn lazy_fifos_are_made_when_first_ready() {
        let mut f = Fifos::lazy(3, 1 << 20);
        assert!(f.is_empty() && !f.usable(0));
        f.ready().unwrap();
        assert_eq!(f.len(), 3);
        assert!(f.usable(2) && !f.usable(3));
        let ends = f.ends(0);
        f.ready().unwrap();
        assert_eq!(f.ends(0), ends, "made once");
    }

    /// A FIFO holds a whole chunk without a reader (the write half of a pair must
    /// never wait for the read half linked behind it), and a cleared one is empty.
    #[test]
    fn a_fifo_holds_a_chunk_and_a_cleared_one_is_empty() {
        let mut f = Fifos::new(2, 1 << 20).unwrap();
        assert!(f.chunk().is_power_of_two() && f.chunk() >= 4096 && f.chunk() <= 1 << 20);
        let (w, r) = f.ends(1);
        let data = vec![0x5au8; f.chunk() as usize];
        // SAFETY: plain write of our own buffer to a pipe descriptor we own; the pipe
        // holds `chunk` bytes, so a blocking write returns without a reader.
        let n = unsafe { libc::write(w, data.as_ptr().cast(), data.len()) };
        assert_eq!(n as u64, f.chunk());
        f.clear(1);
        assert!(f.usable(1));
        let (_, r2) = f.ends(1);
        assert_ne!(r, r2, "a fresh pipe");
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `avail`.
        assert_eq!(unsafe { libc::ioctl(r2, libc::FIONREAD, &mut avail) }, 0);
        assert_eq!(avail, 0, "nothing of the old chunk in the cleared FIFO");
    }

    /// Reading a FIFO dry (the fallback of `clear`) leaves it empty and usable.
    #[test]
    fn a_drained_fifo_is_empty() {
        let f = Fifos::new(1, 1 << 20).unwrap();
        let (w, r) = f.ends(0);
        let data = vec![7u8; 100_000.min(f.chunk() as usize)];
        // SAFETY: as above: a write that fits in the pipe.
        let n = unsafe { libc::write(w, data.as_ptr().cast(), data.len()) };
        assert_eq!(n as usize, data.len());
        drain(r).unwrap();
        let mut avail: libc::c_int = -1;
        // SAFETY: FIONREAD writes one int into `avail`.
        assert_eq!(unsafe { libc::ioctl(r, libc::FIONREAD, &mut avail) }, 0);
        assert_eq!(avail, 0);
    }
}
