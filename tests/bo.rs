//! Buffer objects (`driver/src/bo/`): VRAM or system memory, mapped at one fixed CPU
//! range, migrating by the device's COPY while CPU threads and device commands use
//! them. The fault handler is process-wide, so every scenario runs in a child process
//! (bounded: a hang is a failure that reports, never a hung test).
//!
//! The hazard tests run their scenario with the protection and then with it switched
//! off (a `BoKnobs` switch): 0 violations with it, some without — proof that each
//! protection is what prevents its hazard.

mod common;

use common::{child_command, is_child, run_bounded, PinCheck};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use userptr::driver::bo::{self, BoConfig, BoKnobs, BoManager, Placement};
use userptr::driver::gpuvm::Gpu;
use userptr::{Driver, Error, ReferenceConfig, Registry, RegistryConfig};

const LIMIT: Duration = Duration::from_secs(240);

fn child(name: &str) -> common::ChildRun {
    let r = run_bounded(child_command(name), LIMIT);
    assert!(
        r.success() && r.text().contains("1 passed"),
        "child {name}: {}\n{}",
        r.describe(),
        r.text()
    );
    r
}

struct Setup {
    mgr: BoManager,
    _gpu: Gpu,
    _reg: Registry,
}

fn setup(vram: usize) -> Setup {
    setup_with(vram, BoConfig::default())
}

fn setup_with(vram: usize, bo_cfg: BoConfig) -> Setup {
    bo::install_fault_handler().unwrap();
    let mut cfg = ReferenceConfig::default();
    cfg.gpu.device_memory_bytes = vram;
    let drv = Driver::with_reference(cfg).unwrap();
    let reg = Registry::new(drv, RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    let mgr = BoManager::new(&gpu, bo_cfg).unwrap();
    Setup {
        mgr,
        _gpu: gpu,
        _reg: reg,
    }
}

fn flip(p: Placement) -> Placement {
    match p {
        Placement::Vram => Placement::System,
        Placement::System => Placement::Vram,
    }
}

/// CPU writer threads write generations into their own words of a BO while it
/// migrates back and forth; each finishes its pass after the stop. Returns the
/// number of words that do not hold their writer's last generation (lost writes),
/// after checking that the device sees what the CPU sees.
fn writers_across_migrations(s: &Setup, migrations: u32) -> u64 {
    const LEN: u64 = 1 << 20;
    const WRITERS: usize = 2;
    let b = s.mgr.create(LEN, Placement::Vram).unwrap();
    let h = b.handle();
    let words = (LEN / 8) as usize;
    let per = words / WRITERS;
    let stop = AtomicBool::new(false);
    // SAFETY: each writer thread writes only its own words, through the pointer, while
    // `b` lives (the scope ends before it is dropped); nothing else reads them until
    // the writers are joined.
    let base = unsafe { b.as_ptr() } as usize;
    let gens: Vec<u64> = std::thread::scope(|sc| {
        let ws: Vec<_> = (0..WRITERS)
            .map(|t| {
                let stop = &stop;
                sc.spawn(move || {
                    let p = base as *mut u64;
                    let mut gen = 0u64;
                    loop {
                        gen += 1;
                        for i in t * per..(t + 1) * per {
                            // SAFETY: word i is this thread's alone, inside the BO.
                            unsafe { p.add(i).write_volatile(gen) };
                        }
                        // Relaxed: a stop flag; the pass above completes either way.
                        if stop.load(Ordering::Relaxed) {
                            return gen;
                        }
                    }
                })
            })
            .collect();
        let mut to = Placement::System;
        for _ in 0..migrations {
            assert!(s.mgr.migrate(&h, to).unwrap());
            to = flip(to);
        }
        // Relaxed: see the writers.
        stop.store(true, Ordering::Relaxed);
        ws.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut want = vec![0u8; LEN as usize];
    for (t, g) in gens.iter().enumerate() {
        for i in t * per..(t + 1) * per {
            want[i * 8..i * 8 + 8].copy_from_slice(&g.to_le_bytes());
        }
    }
    let got = b.as_slice();
    let lost = (0..WRITERS * per)
        .filter(|&i| got[i * 8..i * 8 + 8] != want[i * 8..i * 8 + 8])
        .count() as u64;
    if lost == 0 {
        // The device sees the same bytes, in whichever placement the BO is now.
        let crc = s.mgr.crc32c(&b, 0, LEN).unwrap();
        assert_eq!(
            crc,
            crc32c::crc32c(&want),
            "device view differs from the CPU's"
        );
    }
    s.mgr.free(b).unwrap();
    lost
}

#[test]
fn no_cpu_write_lost_across_migrations() {
    child("child_no_cpu_write_lost_across_migrations");
}

#[test]
#[ignore = "run in a child process by no_cpu_write_lost_across_migrations"]
fn child_no_cpu_write_lost_across_migrations() {
    if !is_child() {
        return;
    }
    let s = setup(16 << 20);
    let waits = bo::cpu_waits();
    assert_eq!(writers_across_migrations(&s, 60), 0, "CPU writes lost");
    let st = s.mgr.stats();
    assert!(st.to_vram >= 30 && st.to_system >= 30, "{st:?}");
    println!(
        "CPU accesses that waited for a move: {}",
        bo::cpu_waits() - waits
    );
    // Without the CPU block, writes made during the copy land in the old place.
    s.mgr.set_knobs(BoKnobs {
        skip_cpu_block: true,
        ..BoKnobs::default()
    });
    let mut lost = 0;
    for _ in 0..10 {
        lost = writers_across_migrations(&s, 60);
        if lost > 0 {
            break;
        }
    }
    assert!(
        lost > 0,
        "no write lost without the CPU block: the test shows nothing"
    );
    println!("without the CPU block: {lost} words lost");
}

/// A device thread fills a BO with generation k and checks the device's CRC of all
/// of it, while it migrates back and forth; returns the commands that saw a mix or a
/// lost fill.
fn device_during_migrations(s: &Setup, rounds: u32) -> u64 {
    const LEN: u64 = 4 << 20;
    let mut b = s.mgr.create(LEN, Placement::Vram).unwrap();
    let h = b.handle();
    let stop = AtomicBool::new(false);
    let bad = AtomicU64::new(0);
    std::thread::scope(|sc| {
        let (mgr, stop2) = (&s.mgr, &stop);
        let m = sc.spawn(move || {
            let mut to = Placement::System;
            // Relaxed: a stop flag.
            while !stop2.load(Ordering::Relaxed) {
                mgr.migrate(&h, to).unwrap();
                to = flip(to);
            }
        });
        let crcs: Vec<u32> = (0..=255u8)
            .map(|k| crc32c::crc32c(&vec![k; LEN as usize]))
            .collect();
        for r in 0..rounds {
            let k = (r % 255) as u8 + 1;
            // A command that meets a half-switched page table faults: a mix too.
            let c = s
                .mgr
                .fill(&mut b, 0, LEN, k)
                .and_then(|()| s.mgr.crc32c(&b, 0, LEN));
            if c.ok() != Some(crcs[k as usize]) {
                // Relaxed: a counter read after the join.
                bad.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Relaxed: a stop flag.
        stop.store(true, Ordering::Relaxed);
        m.join().unwrap();
    });
    s.mgr.free(b).unwrap();
    bad.into_inner()
}

#[test]
fn device_commands_see_all_old_or_all_new() {
    child("child_device_commands_see_all_old_or_all_new");
}

#[test]
#[ignore = "run in a child process by device_commands_see_all_old_or_all_new"]
fn child_device_commands_see_all_old_or_all_new() {
    if !is_child() {
        return;
    }
    let s = setup(16 << 20);
    assert_eq!(device_during_migrations(&s, 200), 0);
    assert!(s.mgr.stats().command_waits > 0, "no command met a move");
    s.mgr.set_knobs(BoKnobs {
        skip_device_wait: true,
        ..BoKnobs::default()
    });
    let mut bad = 0;
    for _ in 0..10 {
        bad = device_during_migrations(&s, 200);
        if bad > 0 {
            break;
        }
    }
    assert!(bad > 0, "no command saw a half-moved BO without the wait");
    println!("without the device wait: {bad} commands saw a mix or lost their fill");
}

#[test]
fn no_deadlock_under_migration_eviction_and_device_work() {
    child("child_no_deadlock_under_migration_eviction_and_device_work");
}

#[test]
#[ignore = "run in a child process by no_deadlock_under_migration_eviction_and_device_work"]
fn child_no_deadlock_under_migration_eviction_and_device_work() {
    if !is_child() {
        return;
    }
    // 4 MiB of VRAM: A, B and the pressure BOs (1 MiB each) do not all fit.
    let s = setup(4 << 20);
    const LEN: u64 = 1 << 20;
    let a = s.mgr.create(LEN, Placement::Vram).unwrap();
    let mut b = s.mgr.create(LEN, Placement::Vram).unwrap();
    let (ha, hb) = (a.handle(), b.handle());
    let stop = AtomicBool::new(false);
    // Progress of each thread, for the watchdog.
    let progress: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
    // SAFETY: the CPU threads write their own words of A through the pointer while `a`
    // lives (the scope ends first); the device only reads A (CRC32C).
    let base = unsafe { a.as_ptr() } as usize;
    std::thread::scope(|sc| {
        for (t, p) in progress[..2].iter().enumerate() {
            let stop = &stop;
            sc.spawn(move || {
                let w = base as *mut u64;
                let mut n = 0u64;
                // Relaxed: a stop flag.
                while !stop.load(Ordering::Relaxed) {
                    for i in (t..(LEN / 8) as usize).step_by(2 * 512) {
                        // SAFETY: words of parity t are this thread's alone, inside A.
                        unsafe { w.add(i).write_volatile(n) };
                    }
                    n += 1;
                    // Relaxed: progress counters.
                    p.store(n, Ordering::Relaxed);
                }
            });
        }
        let (mgr, stop2, p2) = (&s.mgr, &stop, &progress[2]);
        let (ha2, hb2) = (ha.clone(), hb.clone());
        sc.spawn(move || {
            let mut n = 0u64;
            let mut to = Placement::System;
            // Relaxed: a stop flag.
            while !stop2.load(Ordering::Relaxed) {
                mgr.migrate(&ha2, to).unwrap();
                mgr.migrate(&hb2, to).unwrap();
                // Pressure: three more in VRAM evict the least recently used.
                let extra: Vec<_> = (0..3)
                    .map(|_| mgr.create(LEN, Placement::Vram).unwrap())
                    .collect();
                drop(extra);
                to = flip(to);
                n += 1;
                // Relaxed: progress counters.
                p2.store(n, Ordering::Relaxed);
            }
        });
        let (mgr, stop3, p3, a, b) = (&s.mgr, &stop, &progress[3], &a, &mut b);
        sc.spawn(move || {
            let mut n = 0u64;
            // Relaxed: a stop flag.
            while !stop3.load(Ordering::Relaxed) {
                mgr.crc32c(a, 0, LEN).unwrap();
                mgr.fill(b, 0, LEN, n as u8).unwrap();
                n += 1;
                // Relaxed: progress counters.
                p3.store(n, Ordering::Relaxed);
            }
        });
        // The watchdog: every thread must keep moving; 40 rounds of the migrator.
        let names = [
            "CPU writer 0",
            "CPU writer 1",
            "migrator",
            "device commands",
        ];
        let mut last = [0u64; 4];
        let mut still = [0u32; 4];
        loop {
            std::thread::sleep(Duration::from_millis(100));
            for (i, p) in progress.iter().enumerate() {
                // Relaxed: progress counters.
                let now = p.load(Ordering::Relaxed);
                still[i] = if now == last[i] { still[i] + 1 } else { 0 };
                last[i] = now;
                assert!(still[i] < 300, "{} stalled for 30 s: deadlock", names[i]);
            }
            if last[2] >= 40 {
                break;
            }
        }
        // Relaxed: a stop flag.
        stop.store(true, Ordering::Relaxed);
    });
    let st = s.mgr.stats();
    println!("{st:?}, CPU waits {}", bo::cpu_waits());
    assert!(st.evictions > 0, "no eviction happened: {st:?}");
    assert!(bo::cpu_waits() > 0, "no CPU access met a move");
}

#[test]
fn migrating_thread_touching_its_bo_is_reported_not_hung() {
    let r = run_bounded(
        child_command("child_migrating_thread_touching_its_bo"),
        LIMIT,
    );
    assert_eq!(
        r.signal(),
        Some(libc::SIGSEGV),
        "{}: {}",
        r.describe(),
        r.text()
    );
    assert!(
        r.stderr.contains("by the thread that is migrating it"),
        "no report: {}",
        r.text()
    );
}

fn touch(p: *const u8) {
    // SAFETY: the BO's first byte (the hook's argument), read once.
    let _ = unsafe { p.read_volatile() };
}

#[test]
#[ignore = "run in a child process by migrating_thread_touching_its_bo_is_reported_not_hung"]
fn child_migrating_thread_touching_its_bo() {
    if !is_child() {
        return;
    }
    let s = setup(16 << 20);
    let b = s.mgr.create(1 << 20, Placement::Vram).unwrap();
    // Application code on the migrating thread (a signal handler, say) touching the BO
    // in the middle of the move: it would wait for its own thread.
    s.mgr.set_move_hook(Some(touch));
    let _ = s.mgr.migrate(&b.handle(), Placement::System);
    panic!("the access by the migrating thread was not stopped");
}

#[test]
fn pins_and_mappings_return_to_start_when_freed() {
    child("child_pins_and_mappings_return_to_start_when_freed");
}

/// The address ranges of the process's mappings now (`/proc/self/maps`).
fn mappings() -> Vec<std::ops::Range<u64>> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(a, 16).ok()?..u64::from_str_radix(b, 16).ok()?)
        })
        .collect()
}

#[test]
#[ignore = "run in a child process by pins_and_mappings_return_to_start_when_freed"]
fn child_pins_and_mappings_return_to_start_when_freed() {
    if !is_child() {
        return;
    }
    let s = setup(8 << 20);
    let free0 = s.mgr.vram_free();
    let pins = PinCheck::start();
    for _ in 0..3 {
        let bos: Vec<_> = (0..6)
            .map(|i| {
                // Six of 2 MiB in 8 MiB of VRAM: the last ones evict.
                let p = if i < 5 {
                    Placement::Vram
                } else {
                    Placement::System
                };
                s.mgr.create(2 << 20, p).unwrap()
            })
            .collect();
        for b in &bos {
            s.mgr.migrate(&b.handle(), flip(b.placement())).unwrap();
        }
        assert!(s.mgr.stats().evictions > 0);
        // The BOs' CPU ranges: none may stay mapped once they are freed. (Checked by
        // address: a count of the process's mappings also moves with malloc arenas
        // that threads of the run create.)
        let ranges: Vec<std::ops::Range<u64>> = bos
            .iter()
            .map(|b| {
                let a = b.as_slice().as_ptr() as u64;
                a..a + b.len()
            })
            .collect();
        for b in bos {
            s.mgr.free(b).unwrap();
        }
        assert_eq!(s.mgr.stats().live, 0);
        assert_eq!(s.mgr.vram_free(), free0, "VRAM leaked");
        let maps = mappings();
        for r in &ranges {
            assert!(
                !maps.iter().any(|m| m.start < r.end && r.start < m.end),
                "the CPU range {r:x?} of a freed BO is still mapped"
            );
        }
    }
    pins.check();
}

#[test]
fn second_mapping_of_a_bo_is_refused() {
    child("child_second_mapping_of_a_bo_is_refused");
}

#[test]
#[ignore = "run in a child process by second_mapping_of_a_bo_is_refused"]
fn child_second_mapping_of_a_bo_is_refused() {
    if !is_child() {
        return;
    }
    let s = setup(8 << 20);
    let mut b = s.mgr.create(64 << 10, Placement::System).unwrap();
    b.as_mut_slice()[..4].copy_from_slice(b"abcd");
    assert!(matches!(b.export_fd(), Err(Error::BoNotShareable { .. })));
    let seals = b.system_seals().unwrap();
    assert_ne!(seals & libc::F_SEAL_FUTURE_WRITE as u32, 0, "{seals:#x}");
    // Reach the memfd anyway (as another process could through /proc): a new writable
    // mapping is refused by the seal.
    let mut refused = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let p = e.unwrap().path();
        let Ok(t) = std::fs::read_link(&p) else {
            continue;
        };
        if !t.to_string_lossy().contains("memfd:userptr-bo") {
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping at a kernel-chosen address (expected to fail);
        // unmapped again if it does not.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_eq!(m, libc::MAP_FAILED, "a second writable mapping was allowed");
        refused += 1;
    }
    assert!(refused > 0, "found no BO memfd");
    // A fork child has no mapping of it (MADV_DONTFORK): its access dies of SIGSEGV.
    let addr = b.as_slice().as_ptr() as usize;
    // SAFETY: the child only reads one byte and exits (async-signal-safe calls only).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the BO's address; in the child nothing is mapped there.
        let v = unsafe { (addr as *const u8).read_volatile() };
        // SAFETY: leave at once.
        unsafe { libc::_exit(v as i32) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
        "the fork child read the BO: status {status:#x}"
    );
    // The BO itself keeps working across moves.
    s.mgr.migrate(&b.handle(), Placement::Vram).unwrap();
    s.mgr.migrate(&b.handle(), Placement::System).unwrap();
    assert_eq!(&b.as_slice()[..4], b"abcd");
}

#[test]
fn bad_input_gets_typed_errors() {
    // No handler in this (parent) process: refused.
    let drv = Driver::reference().unwrap();
    let reg = Registry::new(drv, RegistryConfig::default());
    let gpu = Gpu::open(&reg).unwrap();
    if !bo::fault_handler_installed() {
        assert!(matches!(
            BoManager::new(&gpu, BoConfig::default()),
            Err(Error::BoFaultHandlerMissing)
        ));
    }
    drop(gpu);
    child("child_bad_input_gets_typed_errors");
}

#[test]
#[ignore = "run in a child process by bad_input_gets_typed_errors"]
fn child_bad_input_gets_typed_errors() {
    if !is_child() {
        return;
    }
    let s = setup(4 << 20);
    let e = |r: userptr::Result<bo::Bo>| r.expect_err("refused");
    assert!(matches!(
        e(s.mgr.create(0, Placement::Vram)),
        Error::BoSize { .. }
    ));
    assert!(matches!(
        e(s.mgr.create(8 << 20, Placement::System)),
        Error::BoSize { .. }
    ));
    assert!(matches!(
        e(s.mgr.create(u64::MAX, Placement::Vram)),
        Error::BoSize { .. }
    ));
    let mut b = s.mgr.create(8192, Placement::Vram).unwrap();
    assert!(matches!(
        s.mgr.fill(&mut b, 4096, 8192, 1),
        Err(Error::BoRange { .. })
    ));
    assert!(matches!(s.mgr.crc32c(&b, 0, 0), Err(Error::BoRange { .. })));
    assert!(matches!(
        s.mgr.crc32c(&b, u64::MAX, 2),
        Err(Error::BoRange { .. })
    ));
    // Use after free, through a handle.
    let h = b.handle();
    s.mgr.free(b).unwrap();
    assert_eq!(h.placement(), None);
    assert!(matches!(
        s.mgr.migrate(&h, Placement::System),
        Err(Error::BoFreed { .. })
    ));
    // A BO of another manager (another device).
    let other = setup(4 << 20);
    let ob = other.mgr.create(4096, Placement::System).unwrap();
    assert!(matches!(
        s.mgr.migrate(&ob.handle(), Placement::Vram),
        Err(Error::BoForeign { .. })
    ));
    assert!(matches!(
        s.mgr.crc32c(&ob, 0, 4096),
        Err(Error::BoForeign { .. })
    ));
    // VRAM full of BOs with nothing else to evict: the big one cannot be placed while
    // the others stay (they are evicted), and a fresh 4 MiB one fits after eviction.
    let keep: Vec<_> = (0..4)
        .map(|_| s.mgr.create(1 << 20, Placement::Vram).unwrap())
        .collect();
    let big = s.mgr.create(4 << 20, Placement::Vram).unwrap();
    assert!(keep.iter().all(|b| b.placement() == Placement::System));
    assert_eq!(big.placement(), Placement::Vram);
}

#[test]
fn eviction_skips_a_bo_with_device_work_in_flight() {
    child("child_eviction_skips_a_bo_with_device_work_in_flight");
}

#[test]
#[ignore = "run in a child process by eviction_skips_a_bo_with_device_work_in_flight"]
fn child_eviction_skips_a_bo_with_device_work_in_flight() {
    if !is_child() {
        return;
    }
    // 4 MiB of VRAM: room for two 2 MiB BOs. A ring of 256 for the queue below.
    let s = setup_with(
        4 << 20,
        BoConfig {
            ring_size: 256,
            ..BoConfig::default()
        },
    );
    let busy = s.mgr.create(2 << 20, Placement::Vram).unwrap();
    // Device work on `busy` queued for a while (about 50 ms here: 240 fills of 2 MiB on
    // one ring); the eviction below chooses microseconds later. With 48 fills (10 ms)
    // a test thread descheduled that long by the tests running beside it found the
    // work done, one run in six.
    let mut last = None;
    for _ in 0..240 {
        // SAFETY: nothing reads `busy` on the CPU until the fills are waited for.
        last = Some(unsafe { s.mgr.fill_async(&busy, 0, 2 << 20, 0x77) }.unwrap());
    }
    // Created after the fills (no device work: zeroed through the aperture): `busy` is
    // the least recently used.
    let idle = s.mgr.create(2 << 20, Placement::Vram).unwrap();
    let f = last.unwrap();
    let third = s.mgr.create(2 << 20, Placement::Vram).unwrap();
    let st = s.mgr.stats();
    assert!(
        st.evict_skipped_busy > 0,
        "the eviction met no busy BO: {st:?}"
    );
    assert_eq!(busy.placement(), Placement::Vram, "a busy BO was moved");
    assert_eq!(idle.placement(), Placement::System);
    assert_eq!(third.placement(), Placement::Vram);
    assert_eq!(st.evictions, 1, "{st:?}");
    s.mgr.wait(f).unwrap();
    assert!(
        busy.as_slice().iter().all(|&x| x == 0x77),
        "the fill was lost"
    );
    // Every candidate busy: the eviction waits for the least recently used one's work
    // (it never moves a BO under the device), then moves it.
    let mut last = None;
    for _ in 0..16 {
        // SAFETY: as above.
        last = Some(unsafe { s.mgr.fill_async(&busy, 0, 2 << 20, 0x55) }.unwrap());
    }
    // SAFETY: as above, for `third`.
    let g = unsafe { s.mgr.fill_async(&third, 0, 2 << 20, 0x66) }.unwrap();
    let fourth = s.mgr.create(2 << 20, Placement::Vram).unwrap();
    assert_eq!(fourth.placement(), Placement::Vram);
    assert_eq!(busy.placement(), Placement::System);
    s.mgr.wait(last.unwrap()).unwrap();
    s.mgr.wait(g).unwrap();
    assert!(
        busy.as_slice().iter().all(|&x| x == 0x55),
        "fills lost to the move"
    );
    assert!(third.as_slice().iter().all(|&x| x == 0x66));
}
