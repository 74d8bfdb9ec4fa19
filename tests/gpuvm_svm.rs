//! Shared virtual memory (datasheet section 10.9, `driver/src/gpuvm/svm.rs`): the
//! device uses the process's own pointers, with no registration; its faults are
//! resolved through the registry, so the seccomp monitor keeps it coherent. Every
//! test runs in a child process (a seccomp filter cannot be removed).

mod common;

use common::{is_child, run_child, Anon, VmSubmitTest};
use std::time::Duration;
use userptr::driver::gpuvm::{Gpu, GpuVm, VmConfig};
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{
    CommandQueue, Completion, Descriptor, Driver, Registry, RegistryConfig, Status, WaitMode,
};

const T: Duration = Duration::from_secs(30);

fn run(vm: &GpuVm, q: &CommandQueue, d: Descriptor) -> Completion {
    let f = vm.submit_test(q, &[d]).unwrap();
    q.wait_completion(f.end, WaitMode::Block, T).unwrap()
}

fn crc_of(p: u64, len: usize) -> u32 {
    // SAFETY: the caller's live buffer of `len` bytes; no device writes it meanwhile.
    crc32c::crc32c(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
}

/// Pinned bytes of the registry inside `range`.
fn pinned_in(reg: &Registry, range: std::ops::Range<u64>) -> u64 {
    reg.regions()
        .iter()
        .filter(|r| r.range.start < range.end && range.start < r.range.end)
        .map(|r| r.range.end.min(range.end) - r.range.start.max(range.start))
        .sum()
}

fn saxpy_cpu(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

#[test]
fn svm_saxpy_on_plain_vecs_then_munmap_madvise_mprotect_free_malloc_under_seccomp() {
    let out = run_child("svm_child");
    assert!(out.contains("svm ok"), "{out}");
}

#[test]
#[ignore = "child process body of svm_saxpy_on_plain_vecs_then_munmap_madvise_mprotect_free_malloc_under_seccomp"]
fn svm_child() {
    assert!(is_child());
    // A fixed mmap threshold: a freed block goes back to the kernel, and the next
    // malloc of its size maps fresh pages (often at the same address).
    // SAFETY: a malloc tuning call.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    let vm = gpu.create_vm(VmConfig::svm()).unwrap();
    let q = drv.queue(0, 64).unwrap();
    vm.attach(&q).unwrap();
    let _m = SeccompMonitor::install(&reg).unwrap();

    // 1. SAXPY on two plain Vec<f32>: plain pointers, nothing registered.
    let n = 300_000usize;
    let x: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 0.25 - 7.0).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 1.5).collect();
    let mut expect = y.clone();
    saxpy_cpu(2.5, &x, &mut expect);
    assert_eq!(reg.pinned_bytes(), 0);
    let c = run(
        &vm,
        &q,
        Descriptor::saxpy(2.5, x.as_ptr() as u64, y.as_mut_ptr() as u64, n as u64),
    );
    assert_eq!(c.status, Status::Ok, "{c:?}");
    assert!(
        y.iter()
            .zip(&expect)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "SAXPY differs from the CPU"
    );
    let s = vm.stats();
    assert!(s.faults > 0 && s.faults_failed == 0, "{s:?}");
    println!("saxpy: {} faults, {} replayed", s.faults, s.faults_replayed);

    // 2. munmap, then fresh memory at the same address: the device sees the new pages.
    let len = 256 << 10;
    let mut buf = Anon::new(len);
    let a = buf.addr as u64;
    assert_eq!(
        run(&vm, &q, Descriptor::fill(a, len as u64, 0x11)).status,
        Status::Ok
    );
    assert!(buf.read().iter().all(|&b| b == 0x11));
    buf.unmap();
    assert_eq!(pinned_in(&reg, a..a + len as u64), 0, "munmap unpinned");
    buf.remap_fixed(0x22);
    let c = run(&vm, &q, Descriptor::crc32c(a, len as u64, 0));
    assert_eq!(
        c.result as u32,
        crc_of(a, len),
        "the device read the old pages"
    );
    assert_eq!(
        run(&vm, &q, Descriptor::fill(a, len as u64, 0x33)).status,
        Status::Ok
    );
    assert!(buf.read().iter().all(|&b| b == 0x33));

    // 3. madvise(MADV_DONTNEED): the device sees the zero pages, then writes land.
    buf.madvise(libc::MADV_DONTNEED);
    let c = run(&vm, &q, Descriptor::crc32c(a, len as u64, 0));
    assert_eq!(c.result as u32, crc32c::crc32c(&vec![0u8; len]));
    assert_eq!(
        run(&vm, &q, Descriptor::fill(a, len as u64, 0x44)).status,
        Status::Ok
    );
    assert!(buf.read().iter().all(|&b| b == 0x44));

    // 4. mprotect(PROT_READ): reads work, a write fails and pins nothing new; after
    // PROT_READ | PROT_WRITE the write faults once more and succeeds.
    buf.mprotect(libc::PROT_READ);
    let pinned = reg.pinned_bytes();
    let c = run(&vm, &q, Descriptor::crc32c(a, len as u64, 0));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.result as u32, crc_of(a, len));
    let c = run(&vm, &q, Descriptor::fill(a, len as u64, 0x55));
    assert_eq!(c.status, Status::DmaFault, "a write to read-only memory");
    assert_eq!(c.fault.unwrap().iova, a);
    assert_eq!(reg.pinned_bytes(), pinned, "a failed access pins nothing");
    assert!(buf.read().iter().all(|&b| b == 0x44));
    buf.mprotect(libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(
        run(&vm, &q, Descriptor::fill(a, len as u64, 0x66)).status,
        Status::Ok
    );
    assert!(buf.read().iter().all(|&b| b == 0x66));

    // 5. PROT_NONE: even a read fails, and the range is not pinned.
    buf.mprotect(libc::PROT_NONE);
    let c = run(&vm, &q, Descriptor::crc32c(a, len as u64, 0));
    assert_eq!(c.status, Status::DmaFault);
    assert_eq!(pinned_in(&reg, a..a + len as u64), 0);
    buf.mprotect(libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(
        run(&vm, &q, Descriptor::fill(a, 4096, 0x77)).status,
        Status::Ok
    );
    assert_eq!(buf.read()[0], 0x77);

    // 6. An unmapped address: a DMA fault, nothing pinned.
    let mut hole = Anon::new(64 << 10);
    hole.unmap();
    let pinned = reg.pinned_bytes();
    let c = run(&vm, &q, Descriptor::fill(hole.addr as u64, 4096, 1));
    assert_eq!(c.status, Status::DmaFault);
    assert_eq!(reg.pinned_bytes(), pinned);

    // 7. free + malloc: the vectors go, new ones come (glibc maps them again, often at
    // the same address); the device computes on the new contents.
    let (xa, ya) = (x.as_ptr() as u64, y.as_ptr() as u64);
    drop((x, y));
    let x: Vec<f32> = (0..n).map(|i| (i % 31) as f32 - 15.0).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 17) as f32 * 0.5).collect();
    let reused = x.as_ptr() as u64 == xa || y.as_ptr() as u64 == ya;
    let mut expect = y.clone();
    saxpy_cpu(-1.25, &x, &mut expect);
    let c = run(
        &vm,
        &q,
        Descriptor::saxpy(-1.25, x.as_ptr() as u64, y.as_mut_ptr() as u64, n as u64),
    );
    assert_eq!(c.status, Status::Ok);
    assert!(y
        .iter()
        .zip(&expect)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let s = vm.stats();
    println!(
        "svm ok: addresses reused {reused}, faults {}, failed {}, chunks 4k/64k/2m/region {}/{}/{}/{}, ptes zapped {}, tables freed {}",
        s.faults, s.faults_failed, s.svm_chunks_4k, s.svm_chunks_64k, s.svm_chunks_2m,
        s.svm_region_binds, s.ptes_zapped, s.pt_pages_freed
    );
}

#[test]
fn svm_uses_2mib_chunks_and_leaves_where_the_vma_allows() {
    let out = run_child("svm_2m_child");
    assert!(out.contains("2m ok"), "{out}");
}

#[test]
#[ignore = "child process body of svm_uses_2mib_chunks_and_leaves_where_the_vma_allows"]
fn svm_2m_child() {
    assert!(is_child());
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    let vm = gpu.create_vm(VmConfig::svm()).unwrap();
    let q = drv.queue(0, 16).unwrap();
    vm.attach(&q).unwrap();
    let _m = SeccompMonitor::install(&reg).unwrap();
    // 4 MiB, 2 MiB-aligned (the isolated allocator aligns to 2 MiB).
    let buf = Anon::new(4 << 20);
    assert_eq!(buf.addr % (2 << 20), 0);
    let a = buf.addr as u64;
    assert_eq!(
        run(&vm, &q, Descriptor::fill(a + 8192, 4096, 9)).status,
        Status::Ok
    );
    let s = vm.stats();
    assert_eq!(s.svm_chunks_2m, 1, "{s:?}");
    assert_eq!(pinned_in(&reg, a..a + (4 << 20)), 2 << 20);
    assert_eq!(s.ptes_written, 1, "one 2 MiB leaf");
    assert_eq!(buf.read()[8192], 9);
    // A discard of part of it: the registry splits the region; the device sees it.
    // SAFETY: discarding our own buffer's first 64 KiB.
    unsafe { libc::madvise(buf.addr as *mut _, 64 << 10, libc::MADV_DONTNEED) };
    let c = run(&vm, &q, Descriptor::crc32c(a, 2 << 20, 0));
    assert_eq!(c.result as u32, crc_of(a, 2 << 20));
    println!("2m ok: {:?}", vm.stats());
}
