//! The hazard this project exists for, shown with real kernel pins.
//!
//! A mapping pins the pages that back a range *at map time*. If the process then
//! changes its address space without telling the driver, the device keeps reaching the
//! old pages: device writes vanish from the process's point of view. Re-mapping (a
//! fresh pin of the current pages) makes them visible again. The registry and the
//! monitors exist to do that re-mapping at the right moment; these tests pin down the
//! underlying behaviour they must manage.

mod common;
use common::MapTest as _;

use common::{Anon, PinCheck};
use userptr::{Descriptor, Driver, Perm};

const LEN: usize = 2 << 20;

#[test]
fn device_write_is_visible_while_the_pin_is_current() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(LEN);
    let m = drv.map_user_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xab)).unwrap();
    assert!(buf.read().iter().all(|&b| b == 0xab));
    drop((m, q, drv));
    pins.check();
}

#[test]
fn madvise_dontneed_leaves_a_stale_pin_and_remapping_fixes_it() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let buf = Anon::new(LEN);
    let m = drv.map_user_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();

    // The process throws its pages away without telling the driver...
    buf.madvise(libc::MADV_DONTNEED);
    // ...and the device writes through the old pin.
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xab)).unwrap();
    let seen = buf.read();
    assert!(
        seen.iter().all(|&b| b == 0),
        "the process must NOT see the device's write (it went to the stale pinned pages)"
    );

    // Re-mapping pins the pages the process maps now: the write is visible.
    drop(m);
    let m = drv.map_user_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xcd)).unwrap();
    assert!(buf.read().iter().all(|&b| b == 0xcd));
    drop((m, q, drv));
    pins.check();
}

#[test]
fn munmap_and_reuse_of_the_address_leaves_a_stale_pin() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let mut buf = Anon::new(LEN);
    let m = drv.map_user_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();

    // free() + malloc() returning the same address, in miniature.
    buf.unmap();
    buf.remap_fixed(0x22);
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xab)).unwrap();
    assert!(
        buf.read().iter().all(|&b| b == 0x22),
        "the new memory at the old address must not see writes through the old pin"
    );
    drop(m);
    let m = drv.map_user_test(buf.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(m.iova(), LEN as u64, 0xcd)).unwrap();
    assert!(buf.read().iter().all(|&b| b == 0xcd));
    drop((m, q, drv));
    pins.check();
}

#[test]
fn device_reads_stale_data_after_discard() {
    // The other direction: after MADV_DONTNEED the process sees zeros, but the device
    // still reads the old contents from the pinned pages.
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let src = Anon::new(LEN);
    src.fill(0x5a);
    let dst = Anon::new(LEN);
    let ms = drv.map_user_test(src.addr, LEN, Perm::READ).unwrap();
    let md = drv.map_user_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
    src.madvise(libc::MADV_DONTNEED);
    assert!(src.read().iter().all(|&b| b == 0));
    q.run(Descriptor::copy(ms.iova(), md.iova(), LEN as u64))
        .unwrap();
    assert!(
        dst.read().iter().all(|&b| b == 0x5a),
        "device read the stale pages"
    );
    drop((ms, md, q, drv));
    pins.check();
}

/// A raw kernel pin (an io_uring fixed buffer, the pin the reference IOMMU and VFIO
/// type1 take), with no driver in between, and a way to look at the pinned pages
/// themselves: io_uring reaches them through the pin, never through the process's
/// page tables.
struct RawPin {
    ring: io_uring::IoUring,
    addr: usize,
    len: usize,
    scratch: std::fs::File,
}

impl RawPin {
    fn new(addr: usize, len: usize) -> RawPin {
        let ring = io_uring::IoUring::new(8).unwrap();
        let iov = libc::iovec {
            iov_base: addr as *mut _,
            iov_len: len,
        };
        // SAFETY: the kernel pins the pages backing [addr, addr + len) and from then on
        // reaches them only through the pin; the only accesses through it are this
        // struct's fixed-buffer requests, each waited for before returning.
        unsafe { ring.submitter().register_buffers(&[iov]) }.expect("register_buffers");
        let scratch: std::fs::File = memfd::MemfdOptions::default()
            .create("hazard-scratch")
            .unwrap()
            .into_file();
        scratch.set_len(len as u64).unwrap();
        RawPin {
            ring,
            addr,
            len,
            scratch,
        }
    }

    /// One fixed-buffer request between the pinned pages and the scratch file.
    fn transfer(&mut self, to_scratch: bool) {
        use io_uring::{opcode, types};
        use std::os::fd::AsRawFd;
        let fd = types::Fd(self.scratch.as_raw_fd());
        let (p, n) = (self.addr as *mut u8, self.len as u32);
        let sqe = if to_scratch {
            opcode::WriteFixed::new(fd, p, n, 0).offset(0).build()
        } else {
            opcode::ReadFixed::new(fd, p, n, 0).offset(0).build()
        };
        // SAFETY: the buffer is the whole registered buffer 0; the kernel moves the data
        // with the pinned pages, not through this process's mapping (which the tests
        // have changed behind the pin). We wait for the completion before returning,
        // so nothing outlives the call.
        unsafe { self.ring.submission().push(&sqe) }.expect("sq full");
        self.ring.submit_and_wait(1).unwrap();
        let cqe = self.ring.completion().next().expect("a completion");
        assert_eq!(cqe.result(), self.len as i32, "fixed-buffer transfer");
    }

    /// What the pinned pages hold (what a device reading the mapping gets).
    fn pinned(&mut self) -> Vec<u8> {
        self.transfer(true);
        let mut v = vec![0u8; self.len];
        std::os::unix::fs::FileExt::read_exact_at(&self.scratch, &mut v, 0).unwrap();
        v
    }

    /// Write `b` into the pinned pages (what a device writing the mapping does).
    fn write(&mut self, b: u8) {
        std::os::unix::fs::FileExt::write_all_at(&self.scratch, &vec![b; self.len], 0).unwrap();
        self.transfer(false);
    }
}

impl Drop for RawPin {
    fn drop(&mut self) {
        // Synchronously: the ring's own teardown releases its buffers later, from a
        // kernel worker, after the pin check has looked.
        self.ring.submitter().unregister_buffers().unwrap();
    }
}

/// A memfd of `len` bytes mapped with `flags` (read-write), every byte set to `b`.
fn memfd_mapping(len: usize, flags: i32, sealing: bool, b: u8) -> (std::fs::File, usize) {
    use std::os::fd::AsRawFd;
    let f = memfd::MemfdOptions::default()
        .allow_sealing(sealing)
        .create("hazard")
        .unwrap()
        .into_file();
    f.set_len(len as u64).unwrap();
    // SAFETY: a fresh mapping of our own memfd at a kernel-chosen address.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(a, libc::MAP_FAILED);
    // SAFETY: the mapping just made, writable for `len` bytes.
    unsafe { std::ptr::write_bytes(a as *mut u8, b, len) };
    (f, a as usize)
}

fn seen(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the tests' own mappings, readable for `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: the tests' own mappings; nothing references them any more.
    unsafe { libc::munmap(addr as *mut _, len) };
}

const FLEN: usize = 64 << 10;

#[test]
fn a_hole_punched_in_an_unsealed_shared_memfd_leaves_a_stale_pin() {
    // Why the driver refuses unsealed shared memory (`backing`): the file side takes
    // the pages away and no address-space call happens, so no monitor could see it.
    let pins = PinCheck::start();
    let (f, a) = memfd_mapping(FLEN, libc::MAP_SHARED, false, 0x5a);
    let mut pin = RawPin::new(a, FLEN);
    // Any process holding the memfd can do this; here it is this one.
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        FLEN as u64,
    )
    .unwrap();
    assert!(
        seen(a, FLEN).iter().all(|&b| b == 0),
        "the process sees fresh zero pages"
    );
    assert!(
        pin.pinned().iter().all(|&b| b == 0x5a),
        "the pinned pages keep the old data: a device reads stale memory"
    );
    pin.write(0xab);
    assert!(
        seen(a, FLEN).iter().all(|&b| b == 0),
        "a device write goes to pages the process no longer has"
    );
    // A shrinking ftruncate does the same.
    let (f2, a2) = memfd_mapping(FLEN, libc::MAP_SHARED, false, 0x5a);
    let mut pin2 = RawPin::new(a2, FLEN);
    f2.set_len(0).unwrap();
    f2.set_len(FLEN as u64).unwrap();
    assert!(seen(a2, FLEN).iter().all(|&b| b == 0));
    assert!(pin2.pinned().iter().all(|&b| b == 0x5a));
    drop((pin, pin2, f, f2));
    unmap(a, FLEN);
    unmap(a2, FLEN);
    pins.check();
}

#[test]
fn truncating_a_privately_mapped_file_takes_the_pinned_copies_away() {
    // Why a private file mapping needs F_SEAL_SHRINK (`backing`): the writable pin breaks
    // copy-on-write, and a hole punch leaves the copies alone, but a shrinking
    // ftruncate zaps them from every mapping of the file ("even COWs").
    let pins = PinCheck::start();
    let (f, a) = memfd_mapping(FLEN, libc::MAP_PRIVATE, false, 0x5a);
    let mut pin = RawPin::new(a, FLEN);
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        FLEN as u64,
    )
    .unwrap();
    assert!(
        seen(a, FLEN).iter().all(|&b| b == 0x5a),
        "a hole punch does not touch private copies"
    );
    f.set_len(0).unwrap();
    f.set_len(FLEN as u64).unwrap();
    assert!(
        seen(a, FLEN).iter().all(|&b| b == 0),
        "after the truncation the process maps the file's new pages"
    );
    assert!(
        pin.pinned().iter().all(|&b| b == 0x5a),
        "the device keeps the old private copies"
    );
    drop((pin, f));
    unmap(a, FLEN);
    pins.check();
}

#[test]
fn remap_file_pages_on_a_read_only_sealed_mapping_replaces_pages_unseen() {
    // What the seals do not stop (`backing`, "What this module does not cover"):
    // remap_file_pages on a shared mapping of this process. Refused on a writable
    // mapping of a F_SEAL_FUTURE_WRITE memfd, allowed once it is read-only; the
    // monitors see the mprotect (a device-read-only downgrade, the pin stays) but not
    // the remap, which is why they must treat remap_file_pages as an unmap.
    let pins = PinCheck::start();
    let (f, a) = memfd_mapping(2 * 4096, libc::MAP_SHARED, true, 0xa0);
    // SAFETY: the second page of our own writable mapping.
    unsafe { std::ptr::write_bytes((a + 4096) as *mut u8, 0xb1, 4096) };
    let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::FUTURE_WRITE;
    rustix::fs::fcntl_add_seals(&f, seals).unwrap();
    let mut pin = RawPin::new(a, 4096);
    let remap = || {
        // SAFETY: rearranges which pages of our own memfd our own mapping shows; no
        // Rust reference into the mapping is live.
        unsafe { libc::syscall(libc::SYS_remap_file_pages, a, 4096, 0, 1, 0) }
    };
    assert_eq!(remap(), -1, "refused on a writable mapping");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    // SAFETY: taking write permission from our own mapping.
    let r = unsafe { libc::mprotect(a as *mut _, 2 * 4096, libc::PROT_READ) };
    assert_eq!(r, 0);
    assert_eq!(remap(), 0, "allowed on a read-only one");
    assert!(
        seen(a, 4096).iter().all(|&b| b == 0xb1),
        "the process now sees the file's second page at the address"
    );
    assert!(
        pin.pinned().iter().all(|&b| b == 0xa0),
        "the device still reaches the first"
    );
    drop((pin, f));
    unmap(a, 2 * 4096);
    pins.check();
}
