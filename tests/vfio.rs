//! End-to-end on a real kernel VFIO stack: QEMU's NVMe controller behind an emulated
//! Intel IOMMU, in the guest that `tools/vfio-guest/run.sh` boots (it binds the
//! devices to vfio-pci and exports `USERPTR_VFIO_NVME` / `USERPTR_VFIO_EDU`).
//!
//! Outside such a guest every test here prints why it skips and passes: this
//! machine's kernel has no VFIO. `test.sh` runs this binary inside the guest.
//!
//! What is proven, for real:
//! 1. the stale-pin hazard: a buffer pinned by VFIO, discarded with
//!    `MADV_DONTNEED` behind the driver's back, then an NVMe READ into its IOVA: the
//!    data lands in the old pages and the process sees zeros;
//! 2. the same with a monitor on (seccomp, userfaultfd, explicit calls): the
//!    invalidation unpins, the next submission re-pins, the process sees the data;
//! 3. an `mprotect` downgrade makes the IOMMU mapping read-only: an NVMe READ into
//!    it fails with a data-transfer error (the IOMMU refused the DMA write) and the
//!    memory is untouched;
//! 4. a READ into an unmapped IOVA completes with an error on that command, and the
//!    controller goes on working;
//! 5. pins (`VmPin`, `VmLck`) are back where they started at the end of every test;
//! 6. a prefetchable BAR is a CPU aperture onto device memory (`VfioPci::aperture`,
//!    what buffer objects map): QEMU's NVMe controller memory buffer, mapped by the
//!    CPU, shows the controller's writes, and the controller reads the CPU's.

mod common;
use common::{MapTest as _, RegisterTest as _};

use common::{is_child, run_child, Anon};
use std::time::Duration;
use userptr::driver::proc_status::{locked_bytes, pinned_bytes};
use userptr::driver::vfio::nvme::{IoQueue, Nvme, NvmeCommand, NvmeCompletion};
use userptr::driver::vfio::VfioDomain;
use userptr::{Driver, Perm, Registry, RegistryConfig, WaitMode};

const LEN: usize = 64 << 10;
const T: Duration = Duration::from_secs(20);

/// Say once, past the test harness's output capture (it only captures the print
/// macros), why the VFIO tests pass without running here.
fn skip_notice() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "tests/vfio.rs: SKIP: no VFIO device here (USERPTR_VFIO_NVME / USERPTR_VFIO_EDU \
             unset; this kernel has no VFIO). tools/vfio-guest/test-in-guest.sh runs them \
             in a QEMU guest that has (./test.sh does)."
        );
    });
}

/// The NVMe function to use, or `None` with the reason printed.
fn nvme_bdf() -> Option<String> {
    match std::env::var("USERPTR_VFIO_NVME") {
        Ok(b) if !b.is_empty() => Some(b),
        // In the guest the harness binds the devices: a missing one is a failure, not
        // a reason to skip (the suite would otherwise pass without testing anything).
        _ if std::env::var_os("USERPTR_IN_GUEST").is_some() => {
            panic!("in the VFIO guest, but USERPTR_VFIO_NVME is not set: the harness did not bind the NVMe controller")
        }
        _ => {
            skip_notice();
            None
        }
    }
}

struct Rig {
    q: IoQueue,
    nvme: std::sync::Arc<Nvme>,
    drv: Driver,
}

fn rig(bdf: &str) -> Rig {
    let domain = VfioDomain::new().expect("VFIO container");
    let pci = domain.open(bdf).expect("open the NVMe function");
    let drv = Driver::for_domain(domain, "vfio");
    let nvme = Nvme::new(pci, &drv).expect("NVMe bring-up");
    let q = nvme.io_queue(1, 32).expect("I/O queue 1");
    Rig { q, nvme, drv }
}

/// Both pin counters, to compare at the end.
fn pins() -> (u64, u64) {
    (pinned_bytes().unwrap(), locked_bytes().unwrap())
}

/// Write `b` to blocks `[0, LEN)` of the namespace from a registered buffer.
fn write_pattern(reg: &Registry, r: &Rig, b: u8) {
    let src = Anon::new(LEN);
    src.fill(b);
    let u = reg.register_test(src.addr, LEN, Perm::READ).unwrap();
    let ns = *r.nvme.namespace();
    let batch = reg
        .submit(&r.q, &[&u], |i| {
            vec![NvmeCommand::write(&ns, 0, i[0], LEN as u32)]
        })
        .unwrap();
    let c = r.q.wait(batch, WaitMode::Block, T).unwrap();
    c[0].into_result().expect("WRITE");
}

/// READ blocks `[0, LEN)` into the registration; its completion.
fn read_into(reg: &Registry, r: &Rig, u: &userptr::Userptr) -> NvmeCompletion {
    read_len(reg, r, u, LEN)
}

/// READ the first `len` bytes of the namespace into the registration.
fn read_len(reg: &Registry, r: &Rig, u: &userptr::Userptr, len: usize) -> NvmeCompletion {
    let ns = *r.nvme.namespace();
    let batch = reg
        .submit(&r.q, &[u], |i| {
            vec![NvmeCommand::read(&ns, 0, i[0], len as u32)]
        })
        .unwrap();
    r.q.wait_completions(batch, WaitMode::Block, T).unwrap()[0]
}

/// What the scenario of tests 1 and 2 ends with: the bytes the process sees after
/// "pin, discard behind the driver's back, READ again".
fn discard_then_read(monitor: &str) -> Vec<u8> {
    let bdf = std::env::var("USERPTR_VFIO_NVME").unwrap();
    let r = rig(&bdf);
    let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
    let _seccomp = (monitor == "seccomp")
        .then(|| userptr::driver::monitor::seccomp::SeccompMonitor::install(&reg).unwrap());
    let uffd = (monitor == "uffd")
        .then(|| userptr::driver::monitor::uffd::UffdMonitor::start(&reg).unwrap());
    write_pattern(&reg, &r, 0x5a);
    let dst = Anon::new(LEN);
    let u = reg.register_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
    // First READ pins the buffer (and caches the pin).
    read_into(&reg, &r, &u).into_result().unwrap();
    assert!(dst.read().iter().all(|&b| b == 0x5a), "first READ landed");
    let range = dst.addr as u64..(dst.addr + LEN) as u64;
    let inv = (monitor == "explicit").then(|| {
        reg.invalidate_start(range, userptr::Cause::Discard)
            .unwrap()
    });
    dst.madvise(libc::MADV_DONTNEED);
    if let Some(inv) = inv {
        reg.invalidate_end(inv);
    }
    if let Some(m) = &uffd {
        m.sync(Duration::from_secs(5));
    }
    read_into(&reg, &r, &u).into_result().unwrap();
    dst.read()
}

/// Tests 2: with `monitor` on, a READ after the discard lands where the process looks,
/// and the pins are back where they started.
fn sees_the_data_after_a_discard(monitor: &str) {
    let start = pins();
    let seen = discard_then_read(monitor);
    assert!(
        seen.iter().all(|&b| b == 0x5a),
        "{monitor}: saw {:#x}",
        seen[0]
    );
    assert_eq!(pins(), start);
}

#[test]
fn stale_pin_hazard_is_real_without_a_monitor() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    let start = pins();
    let seen = discard_then_read("none");
    assert!(
        seen.iter().all(|&b| b == 0),
        "without a monitor the READ must land in the old, discarded pages \
         (the process sees zeros); saw {:#x}",
        seen[0]
    );
    assert_eq!(pins(), start, "pins back to where they started");
}

#[test]
fn explicit_invalidation_repins_and_the_process_sees_the_data() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    sees_the_data_after_a_discard("explicit");
}

#[test]
#[ignore = "child process body of seccomp_monitor_repins"]
fn seccomp_child() {
    assert!(is_child());
    sees_the_data_after_a_discard("seccomp");
}

#[test]
fn seccomp_monitor_repins_and_the_process_sees_the_data() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    run_child("seccomp_child");
}

#[test]
#[ignore = "child process body of uffd_monitor_repins"]
fn uffd_child() {
    assert!(is_child());
    sees_the_data_after_a_discard("uffd");
}

#[test]
fn uffd_monitor_repins_and_the_process_sees_the_data() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    run_child("uffd_child");
}

#[test]
#[ignore = "child process body of mprotect_downgrade_makes_the_mapping_read_only"]
fn mprotect_child() {
    assert!(is_child());
    let bdf = std::env::var("USERPTR_VFIO_NVME").unwrap();
    let start = pins();
    {
        let r = rig(&bdf);
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        let _m = userptr::driver::monitor::seccomp::SeccompMonitor::install(&reg).unwrap();
        write_pattern(&reg, &r, 0x77);
        let dst = Anon::new(LEN);
        dst.fill(0x33);
        let u = reg.register_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
        // Pinned read-write; then the process makes it read-only.
        let regions = reg.regions();
        assert!(regions.iter().all(|x| !x.device_read_only));
        dst.fill(0x33);
        dst.mprotect(libc::PROT_READ);
        // The blocked write is reported by the IOMMU's fault record, logged by the
        // fault interrupt: give it time to arrive.
        // One page: the kernel prints IOMMU faults rate-limited (10 lines per 5 s), and
        // a 64 KiB READ would fault on every page.
        r.q.set_fault_check(Some(Duration::from_secs(2)));
        let c = read_len(&reg, &r, &u, 4096);
        let regions = reg.regions();
        assert!(
            regions
                .iter()
                .any(|x| x.range.start <= dst.addr as u64 && x.device_read_only),
            "the registry made the device mapping read-only: {regions:?}"
        );
        let e = c
            .into_result()
            .expect_err("the device write into a read-only IOMMU mapping must fail");
        eprintln!("READ into the downgraded mapping: {e}");
        assert!(
            dst.read().iter().all(|&b| b == 0x33),
            "no silent write into read-only memory"
        );
        dst.mprotect(libc::PROT_READ | libc::PROT_WRITE);
    }
    assert_eq!(pins(), start);
}

#[test]
fn mprotect_downgrade_makes_the_mapping_read_only() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    run_child("mprotect_child");
}

#[test]
fn read_into_an_unmapped_iova_fails_that_command_only() {
    let Some(bdf) = nvme_bdf() else { return };
    let _g = common::serial();
    let start = pins();
    {
        let r = rig(&bdf);
        let ns = *r.nvme.namespace();
        // Far above anything the IOVA allocator handed out.
        let bogus = 0x40_0000_0000u64;
        r.q.set_fault_check(Some(Duration::from_secs(2)));
        let b =
            r.q.submit_batch(&[NvmeCommand::read(&ns, 0, bogus, 4096)])
                .unwrap();
        let c = r.q.wait_completions(b, WaitMode::Block, T).unwrap();
        assert!(!c[0].ok(), "a DMA to an unmapped IOVA must not succeed");
        let e = c[0].into_result().unwrap_err();
        eprintln!("READ into unmapped IOVA {bogus:#x}: {e}");
        assert!(
            matches!(e, userptr::Error::NvmeIommuFault { iova, .. } if iova & !0xfff == bogus),
            "{e}"
        );
        // The default wait is that error, not `Ok` with a failed completion inside.
        let b =
            r.q.submit_batch(&[NvmeCommand::read(&ns, 0, bogus, 4096)])
                .unwrap();
        let e = r.q.wait(b, WaitMode::Block, T).unwrap_err();
        assert!(
            matches!(
                e,
                userptr::Error::NvmeIommuFault { .. } | userptr::Error::NvmeStatus { .. }
            ),
            "{e}"
        );
        r.q.set_fault_check(Some(Duration::ZERO));
        // The controller still works.
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        write_pattern(&reg, &r, 0x42);
        let dst = Anon::new(LEN);
        let u = reg.register_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
        read_into(&reg, &r, &u).into_result().unwrap();
        assert!(dst.read().iter().all(|&b| b == 0x42));
    }
    assert_eq!(pins(), start);
}

#[test]
fn the_registry_drives_nvme_with_cached_pins_and_multi_page_prps() {
    let Some(bdf) = nvme_bdf() else { return };
    let _g = common::serial();
    let start = pins();
    {
        let r = rig(&bdf);
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        // The kernel's dma_entry_limit is the registry's mapping limit.
        let limit: usize =
            std::fs::read_to_string("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        assert_eq!(userptr::IommuDomain::max_mappings(&**r.drv.domain()), limit);
        assert_eq!(reg.max_mappings(), limit - 64);
        let ns = *r.nvme.namespace();
        // A buffer at an odd page offset: PRP1 + a PRP list.
        let src = Anon::new(LEN + 4096);
        let pat: Vec<u8> = (0..LEN + 4096).map(|i| (i * 7 % 251) as u8).collect();
        // SAFETY: our own mapping, LEN + 4096 bytes.
        unsafe { std::ptr::copy_nonoverlapping(pat.as_ptr(), src.addr as *mut u8, pat.len()) };
        let off = 512;
        let u = reg.register_test(src.addr + off, LEN, Perm::READ).unwrap();
        let b = reg
            .submit(&r.q, &[&u], |i| {
                vec![NvmeCommand::write(&ns, 8, i[0], LEN as u32)]
            })
            .unwrap();
        r.q.wait(b, WaitMode::Block, T).unwrap()[0]
            .into_result()
            .unwrap();
        let dst = Anon::new(LEN);
        let d = reg.register_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
        for round in 0..20 {
            dst.fill(0);
            let b = reg
                .submit(&r.q, &[&d], |i| {
                    vec![NvmeCommand::read(&ns, 8, i[0], LEN as u32)]
                })
                .unwrap();
            let mode = if round % 2 == 0 {
                WaitMode::Block
            } else {
                WaitMode::Poll
            };
            r.q.wait(b, mode, T).unwrap()[0].into_result().unwrap();
            assert_eq!(dst.read(), pat[off..off + LEN], "round {round}");
        }
        let s = reg.stats();
        assert!(s.hits >= 19, "cached pins reused: {s:?}");
        // An LBA beyond the namespace is refused before it reaches the device.
        let far = reg.submit(&r.q, &[&d], |i| {
            vec![NvmeCommand::read(&ns, ns.blocks, i[0], LEN as u32)]
        });
        assert!(far.is_err());
    }
    assert_eq!(pins(), start);
}

/// The edu function, or `None` with the reason printed (as for NVMe).
fn edu_bdf() -> Option<String> {
    match std::env::var("USERPTR_VFIO_EDU") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var_os("USERPTR_IN_GUEST").is_some() => {
            panic!("in the VFIO guest, but USERPTR_VFIO_EDU is not set")
        }
        _ => {
            skip_notice();
            None
        }
    }
}

#[test]
fn two_devices_in_one_container_share_one_iommu_domain() {
    let (Some(nb), Some(eb)) = (nvme_bdf(), edu_bdf()) else {
        return;
    };
    let _g = common::serial();
    let start = pins();
    {
        let domain = VfioDomain::new().unwrap();
        let edu_pci = domain.open(&eb).unwrap();
        let nvme_pci = domain.open(&nb).unwrap();
        let drv = Driver::for_domain(domain.clone(), "vfio");
        let edu = userptr::driver::vfio::edu::Edu::new(edu_pci).unwrap();
        let nvme = Nvme::new(nvme_pci, &drv).unwrap();
        let q = nvme.io_queue(1, 8).unwrap();
        let ns = *nvme.namespace();
        // One mapping, one IOVA, reached by both devices.
        let buf = Anon::new(4096);
        let pat: Vec<u8> = (0..4096).map(|i| (i * 5 + 1) as u8).collect();
        // SAFETY: our own 4 KiB mapping.
        unsafe { std::ptr::copy_nonoverlapping(pat.as_ptr(), buf.addr as *mut u8, 4096) };
        let before = userptr::IommuDomain::mappings(&*domain);
        let m = drv.map_user_test(buf.addr, 4096, Perm::READ_WRITE).unwrap();
        assert_eq!(
            userptr::IommuDomain::mappings(&*domain),
            before + 1,
            "one mapping serves both devices"
        );
        // NVMe reads the buffer (WRITE to disk) ...
        q.run(NvmeCommand::write(&ns, 16, m.iova(), 4096), T)
            .unwrap();
        // ... edu reads the same IOVA into its buffer and writes it back 1 KiB later.
        edu.dma(m.iova(), 0, 1024, false).unwrap();
        edu.dma(m.iova() + 1024, 0, 1024, true).unwrap();
        let now = buf.read();
        assert_eq!(
            now[1024..2048],
            pat[..1024],
            "edu reached the shared mapping"
        );
        // NVMe reads the disk back over the buffer: the original pattern again.
        q.run(NvmeCommand::read(&ns, 16, m.iova(), 4096), T)
            .unwrap();
        assert_eq!(buf.read(), pat, "NVMe reached the shared mapping");
        drop(m);
    }
    assert_eq!(pins(), start);
}

#[test]
fn nvme_completions_arrive_by_msix_and_edu_interrupts_by_msi_and_intx() {
    let (Some(nb), Some(eb)) = (nvme_bdf(), edu_bdf()) else {
        return;
    };
    let _g = common::serial();
    use userptr::driver::vfio::{wait_irq, IrqKind};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    // NVMe: Block waits sleep on the queue's MSI-X vector; count the wakeups.
    {
        let r = rig(&nb);
        assert!(r.nvme.has_interrupts(), "QEMU's NVMe has MSI-X");
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        let dst = Anon::new(LEN);
        let u = reg.register_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
        let before = r.q.interrupts();
        // A wait that finds its completion already posted (a slow guest vCPU) returns
        // without sleeping, so it sees no interrupt: keep going until one does.
        for _ in 0..200 {
            read_into(&reg, &r, &u).into_result().unwrap();
            if r.q.interrupts() > before {
                break;
            }
        }
        assert!(
            r.q.interrupts() > before,
            "no MSI-X interrupt was seen in 200 blocking waits"
        );
    }
    // edu: MSI, then INTx, each delivered to an eventfd.
    let domain = VfioDomain::new().unwrap();
    let pci = domain.open(&eb).unwrap();
    let edu = userptr::driver::vfio::edu::Edu::new(pci.clone()).unwrap();
    for kind in [IrqKind::Msi, IrqKind::Intx] {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        pci.enable_irqs(kind, &[&fd]).unwrap();
        assert!(
            !wait_irq(&fd, Duration::from_millis(50)),
            "{kind:?}: nothing raised yet"
        );
        edu.raise_irq(0x1);
        assert!(
            wait_irq(&fd, Duration::from_secs(5)),
            "{kind:?} did not fire"
        );
        assert_eq!(edu.irq_status() & 1, 1);
        edu.ack_irq(0x1);
        if kind == IrqKind::Intx {
            pci.unmask_intx().unwrap();
        }
        pci.disable_irqs(kind).unwrap();
    }
}

#[test]
fn function_reset_disables_the_nvme_controller() {
    let Some(nb) = nvme_bdf() else { return };
    let _g = common::serial();
    let r = rig(&nb);
    let bar = r.nvme.pci().map_bar(0).unwrap();
    assert_eq!(bar.read32(0x1c) & 1, 1, "CSTS.RDY after bring-up");
    r.nvme.pci().reset().unwrap();
    assert_eq!(
        bar.read32(0x14) & 1,
        0,
        "CC.EN cleared by the function reset"
    );
    assert_eq!(
        bar.read32(0x1c) & 1,
        0,
        "CSTS.RDY cleared by the function reset"
    );
}

#[test]
fn errors_name_the_operation_the_device_and_the_cause() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    // A device that is not on vfio-pci (the guest's 9p transport, on virtio-pci).
    let domain = VfioDomain::new().unwrap();
    let other = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path().join("driver"))
                .map(|l| l.ends_with("virtio-pci"))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned());
    if let Some(bdf) = other {
        let e = domain.open(&bdf).unwrap_err().to_string();
        assert!(e.contains(&bdf) && e.contains("likely cause"), "{e}");
        eprintln!("open of a virtio-pci device: {e}");
    }
    let e = domain.open("0000:00:1e.7").unwrap_err().to_string();
    assert!(
        e.contains("0000:00:1e.7") && e.contains("likely cause"),
        "{e}"
    );
}

#[test]
#[ignore = "child process body of memlock_limit_is_a_pin_limit_error"]
fn memlock_child() {
    assert!(is_child());
    let bdf = std::env::var("USERPTR_VFIO_NVME").unwrap();
    // Open as root, then become nobody (no CAP_IPC_LOCK) with a 1 MiB locked-memory
    // limit: the open fds keep working, and type1 charges new pins to the limit.
    let domain = VfioDomain::new().unwrap();
    let _pci = domain.open(&bdf).unwrap();
    let drv = Driver::for_domain(domain, "vfio");
    // SAFETY: plain process-attribute calls in a child that exits after this test.
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim), 0);
        assert_eq!(libc::setgid(65534), 0);
        assert_eq!(libc::setuid(65534), 0);
    }
    let buf = Anon::new(4 << 20);
    let e = drv
        .map_user_test(buf.addr, 4 << 20, Perm::READ_WRITE)
        .expect_err("4 MiB over a 1 MiB RLIMIT_MEMLOCK must fail");
    eprintln!("map over RLIMIT_MEMLOCK: {e}");
    assert!(matches!(e, userptr::Error::PinLimit { .. }), "{e}");
    // A small one still fits.
    let small = Anon::new(64 << 10);
    let m = drv
        .map_user_test(small.addr, 64 << 10, Perm::READ_WRITE)
        .unwrap();
    drop(m);
    // Without root, /dev/vfio/N (0600 root) cannot be opened: the error says so.
    let e = VfioDomain::new()
        .and_then(|d| d.open(&bdf))
        .expect_err("nobody cannot open a root-owned group");
    eprintln!("open as nobody: {e}");
    assert!(
        e.to_string().contains("no permission on /dev/vfio/N"),
        "{e}"
    );
}

#[test]
fn memlock_limit_is_a_pin_limit_error() {
    let Some(_) = nvme_bdf() else { return };
    let _g = common::serial();
    run_child("memlock_child");
}

#[test]
fn invalidation_waits_for_nvme_commands_in_flight() {
    let Some(bdf) = nvme_bdf() else { return };
    let _g = common::serial();
    use userptr::driver::Submitter;
    let start = pins();
    {
        let r = rig(&bdf);
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        let ns = *r.nvme.namespace();
        const N: usize = 16;
        let dst = Anon::new(N * LEN);
        let u = reg
            .register_test(dst.addr, N * LEN, Perm::READ_WRITE)
            .unwrap();
        let mut waited = 0;
        for round in 0..5 {
            let b = reg
                .submit(&r.q, &[&u], |i| {
                    (0..N as u64)
                        .map(|k| NvmeCommand::read(&ns, k * 128, i[0] + k * LEN as u64, LEN as u32))
                        .collect()
                })
                .unwrap();
            // The device may be writing the buffer now: invalidation must not return
            // (and let the pages go) before every command of the batch is done.
            let range = dst.addr as u64..(dst.addr + N * LEN) as u64;
            let inv = reg
                .invalidate_start(range, userptr::Cause::Discard)
                .unwrap();
            let tracker = r.q.tracker().upgrade().unwrap();
            assert!(
                tracker.is_done(b.seqno),
                "round {round}: invalidate_start returned with NVMe commands in flight"
            );
            reg.invalidate_end(inv);
            for c in r.q.wait(b, WaitMode::Block, T).unwrap() {
                c.into_result().unwrap();
            }
            waited = reg.stats().fence_waits;
        }
        eprintln!("invalidations that had to wait for the device: {waited} of 5");
    }
    assert_eq!(pins(), start);
}

#[test]
fn without_msix_the_engine_falls_back_to_intx() {
    let Some(bdf) = nvme_bdf() else { return };
    let _g = common::serial();
    use userptr::driver::vfio::IrqKind;
    let start = pins();
    {
        let domain = VfioDomain::new().unwrap();
        let pci = domain.open(&bdf).unwrap();
        let drv = Driver::for_domain(domain, "vfio");
        let nvme = Nvme::with_interrupts(pci, &drv, Some(IrqKind::Intx)).unwrap();
        assert_eq!(nvme.interrupt_kind(), Some(IrqKind::Intx));
        let q = nvme.io_queue(1, 8).unwrap();
        let r = Rig { q, nvme, drv };
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        write_pattern(&reg, &r, 0x3c);
        let dst = Anon::new(LEN);
        let u = reg.register_test(dst.addr, LEN, Perm::READ_WRITE).unwrap();
        // As above: a wait may find its completion posted and never sleep.
        for _ in 0..200 {
            dst.fill(0);
            read_into(&reg, &r, &u).into_result().unwrap();
            assert!(dst.read().iter().all(|&b| b == 0x3c));
            if r.q.interrupts() > 0 {
                break;
            }
        }
        assert!(
            r.q.interrupts() > 0,
            "no INTx interrupt woke a blocking wait in 200"
        );
    }
    assert_eq!(pins(), start);
}

/// The controller address the test gives the NVMe controller memory buffer
/// (`CMBMSC.CBA`): above every IOVA of the guest's 39-bit IOMMU, so no DMA address of
/// a registration can fall into it.
const CBA: u64 = 1 << 48;

#[test]
fn the_nvme_cmb_is_an_aperture_the_cpu_and_the_controller_share() {
    let Some(bdf) = nvme_bdf() else { return };
    let _g = common::serial();
    let start = pins();
    {
        let r = rig(&bdf);
        let pci = r.nvme.pci();
        let reg32 = |off: u64| {
            let mut b = [0u8; 4];
            pci.region_read(0, off, &mut b).unwrap();
            u32::from_le_bytes(b)
        };
        let cap_hi = reg32(0x4);
        assert!(
            cap_hi & (1 << (57 - 32)) != 0,
            "CAP.CMBS: the guest's controller has a CMB (run.sh gives it one)"
        );
        // CMBMSC: the high dword first (QEMU acts on the low one): CBA, then CRE | CMSE.
        pci.region_write(0, 0x54, &((CBA >> 32) as u32).to_le_bytes())
            .unwrap();
        pci.region_write(0, 0x50, &((CBA as u32 & !0xfff) | 0b11).to_le_bytes())
            .unwrap();
        let (cmbloc, cmbsz) = (reg32(0x38), reg32(0x3c));
        let bir = cmbloc & 0x7;
        let unit = 4096u64 << (4 * ((cmbsz >> 8) & 0xf));
        let (ofst, size) = ((cmbloc >> 12) as u64 * unit, (cmbsz >> 12) as u64 * unit);
        assert!(
            cmbsz & (1 << 4) != 0 && cmbsz & (1 << 3) != 0,
            "CMBSZ.WDS and RDS"
        );
        assert!(size >= 8192, "a CMB of {size} bytes");

        // Registers are not an aperture; the CMB's BAR is.
        let e = pci.aperture(0).unwrap_err().to_string();
        assert!(e.contains("not prefetchable"), "{e}");
        let ap = pci.aperture(bir).unwrap();
        assert!(ap.len >= ofst + size, "{ap:?}");
        // The CPU's view, mapped the way a BO's CPU range maps its VRAM place.
        // SAFETY: a fresh shared mapping of the aperture's file, placed by the kernel;
        // unmapped below.
        let cpu = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                8192,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &*ap.fd,
                ap.file_offset + ofst,
            )
        }
        .expect("mmap of the aperture") as *mut u8;
        let cpu_read = |off: usize| -> Vec<u8> {
            // SAFETY: inside the 8192-byte mapping; volatile, it is device memory.
            (0..4096)
                .map(|i| unsafe { std::ptr::read_volatile(cpu.add(off + i)) })
                .collect()
        };
        let a: Vec<u8> = (0..4096).map(|i| (i * 13 % 251) as u8).collect();
        for (i, &b) in a.iter().enumerate() {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(cpu.add(i), b) };
        }
        // The kernel's own path to the BAR (pread on the device fd) sees the CPU's bytes.
        let mut k = vec![0u8; 4096];
        pci.region_read(bir, ofst, &mut k).unwrap();
        assert_eq!(k, a, "region_read of the BAR shows what the CPU wrote");

        // The controller reads the CPU's bytes out of its memory buffer ...
        let ns = *r.nvme.namespace();
        r.q.run(NvmeCommand::write(&ns, 16, CBA, 4096), T)
            .expect("WRITE from the CMB");
        let reg = Registry::new(r.drv.clone(), RegistryConfig::default());
        let host = Anon::new(4096);
        let u = reg
            .register_test(host.addr, 4096, Perm::READ_WRITE)
            .unwrap();
        let b = reg
            .submit(&r.q, &[&u], |i| {
                vec![NvmeCommand::read(&ns, 16, i[0], 4096)]
            })
            .unwrap();
        r.q.wait(b, WaitMode::Block, T).unwrap()[0]
            .into_result()
            .unwrap();
        assert_eq!(
            host.read(),
            a,
            "the controller read what the CPU wrote through the aperture"
        );
        // ... and writes into it where the CPU sees it (the second page).
        r.q.run(NvmeCommand::read(&ns, 16, CBA + 4096, 4096), T)
            .expect("READ into the CMB");
        assert_eq!(
            cpu_read(4096),
            a,
            "the CPU sees the controller's write through the aperture"
        );
        // SAFETY: the mapping made above, no longer used.
        unsafe { rustix::mm::munmap(cpu.cast(), 8192) }.unwrap();
        drop(u);
    }
    assert_eq!(pins(), start);
}
