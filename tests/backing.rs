//! The file-side policy (`driver/src/backing.rs`) on real memory and real pins: which
//! memory the driver lets a device pin, and that what it accepts cannot lose its pages.
//!
//! Each refusal has its hazard demonstrated in `tests/hazard.rs` with raw pins (what
//! would happen if the driver accepted it). Every test here holds the pin-check lock,
//! which also keeps the process-wide `backing::stats()` counters to one test at a time.

mod common;
use common::{MapTest as _, RegisterTest as _};

use common::{is_child, run_child, Anon, PinCheck};
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use userptr::driver::backing::{
    self, Backing, Refusal, Seals, SharedKind, F_SEAL_FUTURE_WRITE, F_SEAL_SEAL, F_SEAL_SHRINK,
    F_SEAL_WRITE,
};
use userptr::{Descriptor, Driver, Error, Perm, Registry, RegistryConfig, Status, WaitMode};

const LEN: usize = 64 << 10;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const T: std::time::Duration = std::time::Duration::from_secs(20);

/// A memfd of LEN bytes, sealable or not.
fn memfd(sealing: bool) -> OwnedFd {
    let flags = if sealing {
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING
    } else {
        MemfdFlags::CLOEXEC
    };
    let fd = rustix::fs::memfd_create("userptr-backing", flags).unwrap();
    rustix::fs::ftruncate(&fd, LEN as u64).unwrap();
    fd
}

fn seal(fd: impl AsFd, seals: SealFlags) {
    rustix::fs::fcntl_add_seals(fd, seals).unwrap();
}

/// A mapping of LEN bytes, every page touched if writable, unmapped on drop.
struct Map {
    addr: usize,
}

impl Map {
    fn new(fd: Option<&OwnedFd>, prot: i32, flags: i32) -> Map {
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at a kernel-chosen address aliases nothing of ours.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), LEN, prot, flags, raw, 0) };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let m = Map { addr: p as usize };
        if prot & libc::PROT_WRITE != 0 {
            m.fill(0x11);
        }
        m
    }

    fn shared(fd: &OwnedFd) -> Map {
        Map::new(Some(fd), RW, libc::MAP_SHARED)
    }

    fn fill(&self, b: u8) {
        // SAFETY: mapped read-write for LEN bytes.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, b, LEN) }
    }

    fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; LEN];
        // SAFETY: mapped and readable for LEN bytes; copied out while no DMA runs.
        unsafe { std::ptr::copy_nonoverlapping(self.addr as *const u8, v.as_mut_ptr(), LEN) };
        v
    }

    fn madvise(&self, advice: i32) -> std::io::Result<()> {
        // SAFETY: advising our own mapping.
        match unsafe { libc::madvise(self.addr as *mut _, LEN, advice) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our mapping; nothing references it any more.
        unsafe { libc::munmap(self.addr as *mut _, LEN) };
    }
}

/// Map `addr` for the device and expect the refusal `want`, covering the whole range.
fn refused(drv: &Driver, addr: usize, perm: Perm, want: Refusal) -> String {
    match drv.map_user_test(addr, LEN, perm) {
        Err(e @ Error::ReplaceablePages { .. }) => {
            let Error::ReplaceablePages {
                addr: a,
                len,
                reason,
            } = &e
            else {
                unreachable!()
            };
            assert_eq!((*a, *len, *reason), (addr as u64, LEN as u64, want), "{e}");
            e.to_string()
        }
        Err(e) => panic!("expected {want:?}, got {e}"),
        Ok(_) => panic!("expected {want:?}, but the range was accepted"),
    }
}

/// FILL through the device and look at it from the process.
fn device_fill_is_visible(drv: &Driver, m: &Map, b: u8) {
    let q = drv.queue(0, 8).unwrap();
    let u = drv.map_user_test(m.addr, LEN, Perm::READ_WRITE).unwrap();
    q.run(Descriptor::fill(u.iova(), LEN as u64, b)).unwrap();
    drop(u);
    assert!(
        m.read().iter().all(|&x| x == b),
        "the device write is not visible"
    );
}

fn errno(r: rustix::io::Result<()>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error())
}

#[test]
fn an_unsealed_shared_memfd_is_refused_and_nothing_stays_pinned() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let fd = memfd(true);
    let m = Map::shared(&fd);
    let text = refused(
        &drv,
        m.addr,
        Perm::READ_WRITE,
        Refusal::Unsealed {
            shared: true,
            seals: 0,
        },
    );
    assert!(
        text.contains("F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE") && text.contains("udmabuf"),
        "the message names the fix: {text}"
    );
    // Only one of the two seals is not enough: either missing lets someone punch holes
    // or truncate.
    seal(&fd, SealFlags::SHRINK);
    refused(
        &drv,
        m.addr,
        Perm::READ_WRITE,
        Refusal::Unsealed {
            shared: true,
            seals: F_SEAL_SHRINK,
        },
    );
    let fd2 = memfd(true);
    let m2 = Map::shared(&fd2);
    seal(&fd2, SealFlags::FUTURE_WRITE);
    refused(
        &drv,
        m2.addr,
        Perm::READ,
        Refusal::Unsealed {
            shared: true,
            seals: F_SEAL_FUTURE_WRITE,
        },
    );
    // A memfd made without MFD_ALLOW_SEALING can never be sealed: the message says so.
    let fd3 = memfd(false);
    let m3 = Map::shared(&fd3);
    let text = refused(
        &drv,
        m3.addr,
        Perm::READ_WRITE,
        Refusal::Unsealed {
            shared: true,
            seals: F_SEAL_SEAL,
        },
    );
    assert!(text.contains("MFD_ALLOW_SEALING"), "{text}");
    // The registry's pin path applies the same policy, and keeps nothing.
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let e = reg
        .register_test(m.addr, LEN, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::ReplaceablePages { .. }), "{e}");
    assert_eq!((reg.mappings(), reg.pinned_bytes()), (0, 0));
    drop((reg, drv));
    pins.check();
}

#[test]
fn a_sealed_memfd_is_accepted_and_nobody_can_take_its_pages() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let fd = memfd(true);
    let m = Map::shared(&fd);
    seal(&fd, SealFlags::SHRINK | SealFlags::FUTURE_WRITE);
    let q = drv.queue(0, 8).unwrap();
    let u = drv.map_user_test(m.addr, LEN, Perm::READ_WRITE).unwrap();
    // Every way of replacing the pages through the file is refused by the kernel.
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    assert_eq!(
        errno(rustix::fs::fallocate(&fd, punch, 0, LEN as u64)),
        Some(libc::EPERM)
    );
    assert_eq!(errno(rustix::fs::ftruncate(&fd, 0)), Some(libc::EPERM));
    assert_eq!(
        m.madvise(libc::MADV_REMOVE).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    // Growing is allowed (new pages past the end, none of them pinned).
    rustix::fs::ftruncate(&fd, 2 * LEN as u64).unwrap();
    // Reclaim at most unmaps pinned pages: the next fault finds the same ones.
    m.madvise(libc::MADV_PAGEOUT).unwrap();
    q.run(Descriptor::fill(u.iova(), LEN as u64, 0xab)).unwrap();
    assert!(
        m.read().iter().all(|&x| x == 0xab),
        "the pin is still current"
    );
    drop(u);
    // Through the registry too.
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let r = reg.register_test(m.addr, LEN, Perm::READ_WRITE).unwrap();
    let f = reg
        .submit(&q, &[&r], |iova| {
            vec![Descriptor::fill(iova[0], LEN as u64, 0xcd)]
        })
        .unwrap();
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert!(m.read().iter().all(|&x| x == 0xcd));
    drop((r, reg, q, drv));
    pins.check();
}

#[test]
fn sysv_shared_memory_is_refused() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    // SAFETY: a private segment, attached at a kernel-chosen address, detached and
    // removed below.
    let a = unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600);
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        let a = libc::shmat(id, std::ptr::null(), 0);
        assert_ne!(a as isize, -1, "shmat: {}", std::io::Error::last_os_error());
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        std::ptr::write_bytes(a as *mut u8, 1, LEN);
        a as usize
    };
    let text = refused(&drv, a, Perm::READ_WRITE, Refusal::SysV);
    assert!(
        text.contains("SysV") && text.contains("MADV_REMOVE") && text.contains("memfd"),
        "{text}"
    );
    // SAFETY: detaching the segment attached above.
    assert_eq!(unsafe { libc::shmdt(a as *const _) }, 0);
    drop(drv);
    pins.check();
}

#[test]
fn shared_anonymous_memory_is_refused() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let m = Map::new(None, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS);
    let text = refused(&drv, m.addr, Perm::READ_WRITE, Refusal::SharedAnonymous);
    assert!(
        text.contains("fork child") && text.contains("MADV_REMOVE"),
        "{text}"
    );
    drop(drv);
    pins.check();
}

/// A file in `dir`, LEN bytes, removed at once (the descriptor keeps it).
fn temp_file(dir: &str) -> OwnedFd {
    let path = format!("{dir}/userptr-backing-{}", std::process::id());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.set_len(LEN as u64).unwrap();
    f.into()
}

#[test]
fn files_that_cannot_be_sealed_are_refused() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    // A tmpfs file (not a memfd): io_uring pins it (shmem), the policy refuses it.
    if std::path::Path::new("/dev/shm").is_dir() {
        let fd = temp_file("/dev/shm");
        let m = Map::shared(&fd);
        refused(
            &drv,
            m.addr,
            Perm::READ_WRITE,
            Refusal::Unsealed {
                shared: true,
                seals: F_SEAL_SEAL,
            },
        );
    }
    // A private mapping of a regular file: pinned (copy-on-write broken), refused: the
    // file cannot be sealed against shrinking.
    let fd = temp_file(&std::env::temp_dir().to_string_lossy());
    let m = Map::new(Some(&fd), RW, libc::MAP_PRIVATE);
    let seals = rustix::fs::fcntl_get_seals(&fd).map(|s| s.bits());
    match seals {
        // A filesystem without seals (ext4, xfs, ...).
        Err(rustix::io::Errno::INVAL) => {
            let text = refused(
                &drv,
                m.addr,
                Perm::READ_WRITE,
                Refusal::NotSealable { shared: false },
            );
            assert!(text.contains("only memfds"), "{text}");
        }
        // TMPDIR on tmpfs: a file there carries F_SEAL_SEAL.
        Ok(s) => {
            refused(
                &drv,
                m.addr,
                Perm::READ_WRITE,
                Refusal::Unsealed {
                    shared: false,
                    seals: s,
                },
            );
        }
        Err(e) => panic!("F_GET_SEALS: {e}"),
    }
    drop(drv);
    pins.check();
}

#[test]
fn private_file_mappings_need_a_writable_pin_and_a_shrink_seal() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    // Read-only memory: the reference IOMMU itself refuses it (io_uring pins with
    // FOLL_WRITE), with its own error.
    let file = temp_file(&std::env::temp_dir().to_string_lossy());
    let ro = Map::new(Some(&file), libc::PROT_READ, libc::MAP_PRIVATE);
    let e = drv.map_user_test(ro.addr, LEN, Perm::READ).unwrap_err();
    assert!(matches!(e, Error::UnsupportedMemory { .. }), "{e}");
    // Writable memory registered device-read-only: io_uring pins it, the policy
    // refuses it (a pin without FOLL_WRITE, VFIO's, could hold the page-cache page).
    let fd = memfd(true);
    seal(&fd, SealFlags::SHRINK);
    let m = Map::new(Some(&fd), RW, libc::MAP_PRIVATE);
    let text = refused(&drv, m.addr, Perm::READ, Refusal::ReadOnlyPrivateFile);
    assert!(text.contains("device-writable"), "{text}");
    // Writable, sealed against shrinking: accepted, and the copies cannot be taken.
    let u = drv.map_user_test(m.addr, LEN, Perm::READ_WRITE).unwrap();
    assert_eq!(errno(rustix::fs::ftruncate(&fd, 0)), Some(libc::EPERM));
    drop(u);
    device_fill_is_visible(&drv, &m, 0x5e);
    // Writable but unsealed: an ftruncate by anyone would take the copies away.
    let fd = memfd(true);
    let m = Map::new(Some(&fd), RW, libc::MAP_PRIVATE);
    let text = refused(
        &drv,
        m.addr,
        Perm::READ_WRITE,
        Refusal::Unsealed {
            shared: false,
            seals: 0,
        },
    );
    assert!(text.contains("F_SEAL_SHRINK"), "{text}");
    drop(drv);
    pins.check();
}

#[test]
fn private_anonymous_memory_costs_one_vma_lookup_and_no_descriptor() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let buf = Anon::new(2 << 20);
    let before = backing::stats();
    let m = drv
        .map_user_test(buf.addr, 2 << 20, Perm::READ_WRITE)
        .unwrap();
    let after = backing::stats();
    assert_eq!(after.checks - before.checks, 1);
    assert_eq!(after.vmas - before.vmas, 1, "one VMA, one lookup");
    assert_eq!(
        after.seal_lookups, before.seal_lookups,
        "no descriptor opened"
    );
    assert_eq!(after.refusals, before.refusals);
    drop((m, drv));
    pins.check();
}

#[test]
fn the_policy_decides_on_backing_and_permission() {
    let _pins = PinCheck::start();
    use Backing::*;
    use SharedKind::*;
    let sealed = Seals::Read(F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE);
    let write_sealed = Seals::Read(F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_WRITE);
    let shrink = Seals::Read(F_SEAL_SHRINK);
    for perm in [Perm::READ, Perm::WRITE, Perm::READ_WRITE] {
        assert_eq!(backing::decide(PrivateAnonymous, perm), Ok(()));
        for kind in [File, SysV, Anonymous] {
            assert_eq!(backing::decide(Shared(kind, sealed), perm), Ok(()));
            assert_eq!(backing::decide(Shared(kind, write_sealed), perm), Ok(()));
        }
        assert_eq!(
            backing::decide(Shared(File, shrink), perm),
            Err(Refusal::Unsealed {
                shared: true,
                seals: F_SEAL_SHRINK
            })
        );
        assert_eq!(
            backing::decide(Shared(SysV, Seals::Read(F_SEAL_SEAL)), perm),
            Err(Refusal::SysV)
        );
        assert_eq!(
            backing::decide(Shared(Anonymous, Seals::NoDescriptor), perm),
            Err(Refusal::SharedAnonymous)
        );
        assert_eq!(
            backing::decide(Shared(File, Seals::NotSealable), perm),
            Err(Refusal::NotSealable { shared: true })
        );
        assert_eq!(
            backing::decide(Shared(File, Seals::NoDescriptor), perm),
            Err(Refusal::NoDescriptor)
        );
    }
    // Private file mappings: a device-writable pin, and no shrinking.
    for seals in [shrink, sealed, Seals::Read(0), Seals::NotSealable] {
        assert_eq!(
            backing::decide(PrivateFile(seals), Perm::READ),
            Err(Refusal::ReadOnlyPrivateFile)
        );
    }
    for perm in [Perm::WRITE, Perm::READ_WRITE] {
        assert_eq!(backing::decide(PrivateFile(shrink), perm), Ok(()));
        assert_eq!(
            backing::decide(PrivateFile(Seals::Read(F_SEAL_FUTURE_WRITE)), perm),
            Err(Refusal::Unsealed {
                shared: false,
                seals: F_SEAL_FUTURE_WRITE
            })
        );
        assert_eq!(
            backing::decide(PrivateFile(Seals::NotSealable), perm),
            Err(Refusal::NotSealable { shared: false })
        );
        assert_eq!(
            backing::decide(PrivateFile(Seals::NoDescriptor), perm),
            Err(Refusal::NoDescriptor)
        );
    }
}

#[test]
fn the_ioctl_and_the_text_of_proc_maps_agree() {
    let _pins = PinCheck::start();
    let anon = Anon::new(LEN);
    let fd = memfd(true);
    let shared = Map::shared(&fd);
    let private = Map::new(Some(&fd), RW, libc::MAP_PRIVATE);
    let sa = Map::new(None, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS);
    for (what, a) in [
        ("private anonymous", anon.addr),
        ("shared memfd", shared.addr),
        ("private memfd", private.addr),
        ("shared anonymous", sa.addr),
    ] {
        let r = a as u64..(a + LEN) as u64;
        let q = backing::vmas(r.clone()).unwrap();
        let p = backing::vmas_parsed(r).unwrap();
        assert_eq!(q, p, "{what}");
        assert_eq!(q.len(), 1, "{what}: {q:?}");
        let v = &q[0];
        assert!(v.range.start <= a as u64 && (a + LEN) as u64 <= v.range.end);
        match what {
            "private anonymous" => assert_eq!(backing::backing_of(v), Backing::PrivateAnonymous),
            "shared memfd" => {
                assert!(
                    v.shared && v.name.starts_with("/memfd:userptr-backing"),
                    "{v:?}"
                );
                assert_eq!(
                    backing::backing_of(v),
                    Backing::Shared(SharedKind::File, Seals::Read(0))
                );
            }
            "private memfd" => {
                assert!(!v.shared && v.file.is_some(), "{v:?}");
                assert_eq!(backing::backing_of(v), Backing::PrivateFile(Seals::Read(0)));
            }
            _ => assert!(
                matches!(
                    backing::backing_of(v),
                    Backing::Shared(SharedKind::Anonymous, _)
                ),
                "{v:?}"
            ),
        }
    }
    // A range over a hole: the VMAs on both sides, nothing in between.
    let two = Anon::new(3 * 4096);
    // SAFETY: unmapping the middle page of our own mapping.
    unsafe { libc::munmap((two.addr + 4096) as *mut _, 4096) };
    let r = two.addr as u64..(two.addr + 3 * 4096) as u64;
    let q = backing::vmas(r.clone()).unwrap();
    assert_eq!(q, backing::vmas_parsed(r).unwrap());
    assert_eq!(q.len(), 2, "{q:?}");
}

/// With its descriptor closed, a sealed memfd can still be checked through
/// `/proc/self/map_files` when the process may open it (CAP_SYS_ADMIN); otherwise it is
/// refused, with the reason.
#[test]
fn a_closed_memfd_is_checked_through_map_files_or_refused() {
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let fd = memfd(true);
    let m = Map::shared(&fd);
    seal(&fd, SealFlags::SHRINK | SealFlags::FUTURE_WRITE);
    drop(fd);
    let entry = format!("/proc/self/map_files/{:x}-{:x}", m.addr, m.addr + LEN);
    if std::fs::File::open(&entry).is_ok() {
        drop(drv.map_user_test(m.addr, LEN, Perm::READ_WRITE).unwrap());
    } else {
        refused(&drv, m.addr, Perm::READ_WRITE, Refusal::NoDescriptor);
    }
    drop(drv);
    pins.check();
}

#[test]
fn without_map_files_a_held_descriptor_is_found() {
    let _serial = common::serial();
    let out = run_child("without_map_files_child");
    assert!(out.contains("fd scan ok"), "{out}");
}

/// Child body of `without_map_files_a_held_descriptor_is_found`: without CAP_SYS_ADMIN
/// (root drops to nobody), `/proc/self/map_files` cannot be opened; the seals are read
/// through the memfd descriptor the process holds, and once it is closed the range is
/// refused.
#[test]
#[ignore = "child process body of without_map_files_a_held_descriptor_is_found"]
fn without_map_files_child() {
    assert!(
        is_child(),
        "run through without_map_files_a_held_descriptor_is_found"
    );
    // SAFETY: plain syscalls changing this child process's own credentials.
    unsafe {
        if libc::geteuid() == 0 {
            assert_eq!(libc::setgid(65534), 0);
            assert_eq!(libc::setuid(65534), 0);
        }
    }
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let fd = memfd(true);
    let m = Map::shared(&fd);
    seal(&fd, SealFlags::SHRINK | SealFlags::FUTURE_WRITE);
    let entry = format!("/proc/self/map_files/{:x}-{:x}", m.addr, m.addr + LEN);
    assert!(
        std::fs::File::open(&entry).is_err(),
        "map_files opened without CAP_SYS_ADMIN: the fallback would not be exercised"
    );
    let before = backing::stats();
    let u = drv.map_user_test(m.addr, LEN, Perm::READ_WRITE).unwrap();
    assert_eq!(backing::stats().seal_lookups - before.seal_lookups, 1);
    drop(u);
    device_fill_is_visible(&drv, &m, 0x77);
    drop(fd);
    let text = refused(&drv, m.addr, Perm::READ_WRITE, Refusal::NoDescriptor);
    assert!(text.contains("keep the memfd open"), "{text}");
    drop(drv);
    pins.check();
    println!("fd scan ok");
}

#[test]
fn memory_that_cannot_be_classified_is_refused() {
    let _serial = common::serial();
    let out = run_child("unclassifiable_child");
    assert!(
        out.contains("unclassifiable ok") || out.contains("SKIP"),
        "{out}"
    );
    for l in out
        .lines()
        .filter(|l| l.contains("unclassifiable ok") || l.contains("SKIP"))
    {
        println!("{l}");
    }
}

/// Child body of `memory_that_cannot_be_classified_is_refused`: with /proc hidden (a
/// private mount namespace, an empty tmpfs over /proc: needs root), the driver cannot
/// tell what backs even private anonymous memory, and refuses it (fail safe).
#[test]
#[ignore = "child process body of memory_that_cannot_be_classified_is_refused"]
fn unclassifiable_child() {
    assert!(
        is_child(),
        "run through memory_that_cannot_be_classified_is_refused"
    );
    let pins = PinCheck::start();
    let drv = Driver::reference().unwrap();
    let buf = Anon::new(LEN);
    // SAFETY: plain syscalls changing this child process's own mount namespace.
    let hidden = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/proc".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ) == 0
    };
    if !hidden {
        println!(
            "SKIP: cannot hide /proc here ({}): needs root",
            std::io::Error::last_os_error()
        );
        return;
    }
    let e = drv
        .map_user_test(buf.addr, LEN, Perm::READ_WRITE)
        .unwrap_err();
    assert!(matches!(e, Error::BackingUnknown { .. }), "{e}");
    // SAFETY: unmounting the tmpfs this child mounted, in its own namespace.
    assert_eq!(unsafe { libc::umount(c"/proc".as_ptr()) }, 0);
    // Nothing stays pinned.
    drop(drv);
    pins.check();
    println!("unclassifiable ok: {e}");
}
