//! `userptr torture --migrate`: buffer objects (`driver::bo`) moving between VRAM and
//! system memory under CPU writers and device commands, with VRAM too small for all
//! of them (eviction runs all the time).
//!
//! * two CPU writer threads each own a BO they write through its fixed CPU pointer,
//!   one generation per pass over every word; each pass first checks that every word
//!   still holds the previous generation: a word that does not is a CPU write lost to
//!   a move (`lost_cpu_writes`);
//! * a device thread owns two BOs: FILL the first with a new byte, COPY it into the
//!   second, check on the CPU that the second holds that byte everywhere and that the
//!   device's CRC32C of it is right: anything else is a command that met a half-moved
//!   BO (`device_mismatches`; a command failing with a DMA fault counts too);
//! * a migrator thread moves random BOs to random places and makes VRAM pressure
//!   (BOs created in VRAM and freed, evicting the least recently used);
//! * a watchdog: no progress of some thread for 10 s is a deadlock (exit 3).
//!
//! `--no-protect` switches the BO protections off (`BoKnobs`: CPU access stays open
//! during a move, device commands do not wait for one): the checker must then find
//! violations. Pins (`VmPin`) and VRAM must be back where they started.

use super::Args;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use userptr::driver::bo::{self, BoConfig, BoKnobs, BoManager, Placement};
use userptr::driver::gpuvm::Gpu;
use userptr::{Driver, ReferenceConfig, Registry, RegistryConfig};

const LEN: u64 = 1 << 20;

#[derive(Default)]
struct Counts {
    cpu_passes: AtomicU64,
    commands: AtomicU64,
    lost_cpu_writes: AtomicU64,
    device_mismatches: AtomicU64,
    migrations: AtomicU64,
    pressure_bos: AtomicU64,
    migrate_errors: AtomicU64,
    progress: [AtomicU64; 4],
}

fn ld(a: &AtomicU64) -> u64 {
    // Relaxed: counters read after the threads are joined (or for the watchdog).
    a.load(Ordering::Relaxed)
}

fn bump(a: &AtomicU64, n: u64) {
    // Relaxed: counters.
    a.fetch_add(n, Ordering::Relaxed);
}

/// The run; its report (the envelope and the counts, with `error` when it failed),
/// or why it could not run.
pub(super) fn run(a: &Args) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if a.inject || a.gpuvm || a.explicit || a.only.is_some() {
        return Err(
            "--migrate runs alone: --inject, --gpuvm, --explicit and --only do not apply\nhint: drop them".into(),
        );
    }
    let e = |e: userptr::Error| crate::explain(&e);
    bo::install_fault_handler().map_err(e)?;
    let t0 = Instant::now();
    let mut cfg = ReferenceConfig::default();
    // Room for four of the six 1 MiB BOs: the rest, and the pressure, evict.
    cfg.gpu.device_memory_bytes = 4 << 20;
    let drv = Driver::with_reference(cfg).map_err(e)?;
    let reg = Registry::new(drv, RegistryConfig::default());
    let gpu = Gpu::open(&reg).map_err(e)?;
    let mgr = BoManager::new(&gpu, BoConfig::default()).map_err(e)?;
    let pins_start = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let vram_start = mgr.vram_free();
    let waits_start = bo::cpu_waits();
    if a.no_protect {
        mgr.set_knobs(BoKnobs {
            skip_cpu_block: true,
            skip_device_wait: true,
        });
    }
    let mut bos = (0..6)
        .map(|i| {
            let p = if i % 2 == 0 {
                Placement::Vram
            } else {
                Placement::System
            };
            mgr.create(LEN, p)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    let handles: Vec<_> = bos.iter().map(|b| b.handle()).collect();
    let c = Counts::default();
    let stop = AtomicBool::new(false);
    let deadline = t0 + Duration::from_secs_f64(a.seconds);
    let crcs: Vec<u32> = (0..=255u8)
        .map(|k| crc32c::crc32c(&vec![k; LEN as usize]))
        .collect();
    {
        let (cpu, dev) = bos.split_at_mut(2);
        let (d0, d1) = dev.split_at_mut(1);
        let (d0, d1) = (&mut d0[0], &mut d1[0]);
        // SAFETY: each writer thread accesses only its own BO (0 or 1) through the
        // pointer, while the BOs live (they are freed after the scope).
        let ptrs: Vec<usize> = cpu.iter().map(|b| unsafe { b.as_ptr() } as usize).collect();
        std::thread::scope(|s| {
            for (t, &p) in ptrs.iter().enumerate() {
                let (c, stop) = (&c, &stop);
                s.spawn(move || {
                    let w = p as *mut u64;
                    let n = (LEN / 8) as usize;
                    let mut gen = 0u64;
                    // Relaxed: a stop flag.
                    while !stop.load(Ordering::Relaxed) {
                        let mut lost = 0;
                        for i in 0..n {
                            // SAFETY: this thread's BO, `n` words, nobody else's.
                            if unsafe { w.add(i).read_volatile() } != gen {
                                lost += 1;
                            }
                            // SAFETY: as above.
                            unsafe { w.add(i).write_volatile(gen + 1) };
                        }
                        gen += 1;
                        bump(&c.lost_cpu_writes, lost);
                        bump(&c.cpu_passes, 1);
                        bump(&c.progress[t], 1);
                    }
                });
            }
            let (c, stop, mgr, crcs) = (&c, &stop, &mgr, &crcs);
            s.spawn(move || {
                let mut k = 0u8;
                // Relaxed: a stop flag.
                while !stop.load(Ordering::Relaxed) {
                    k = k.wrapping_add(1).max(1);
                    let r = mgr
                        .fill(d0, 0, LEN, k)
                        .and_then(|()| mgr.copy(d0, 0, d1, 0, LEN))
                        .and_then(|()| mgr.crc32c(d1, 0, LEN));
                    let ok =
                        r.ok() == Some(crcs[k as usize]) && d1.as_slice().iter().all(|&x| x == k);
                    if !ok {
                        bump(&c.device_mismatches, 1);
                    }
                    bump(&c.commands, 3);
                    bump(&c.progress[2], 1);
                }
            });
            let hs = &handles;
            s.spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut i = 0u64;
                // Relaxed: a stop flag.
                while !stop.load(Ordering::Relaxed) {
                    let h = &hs[next() as usize % hs.len()];
                    let to = if next() % 2 == 0 {
                        Placement::Vram
                    } else {
                        Placement::System
                    };
                    match mgr.migrate(h, to) {
                        Ok(true) => bump(&c.migrations, 1),
                        Ok(false) => {}
                        Err(_) => bump(&c.migrate_errors, 1),
                    }
                    i += 1;
                    if i % 8 == 0 {
                        if let Ok(p) = mgr.create(LEN, Placement::Vram) {
                            bump(&c.pressure_bos, 1);
                            drop(p);
                        }
                    }
                    bump(&c.progress[3], 1);
                }
            });
            // The watchdog, and the clock.
            let mut last = [(0u64, Instant::now()); 4];
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                for (i, l) in last.iter_mut().enumerate() {
                    let p = ld(&c.progress[i]);
                    if p != l.0 {
                        *l = (p, Instant::now());
                    } else if l.1.elapsed() > Duration::from_secs(10) {
                        let msg = "torture --migrate: no progress for 10 s: deadlock";
                        crate::progress::finish();
                        if let Some(out) = &a.json {
                            let _ = out.write(&crate::output::error_document(
                                "torture",
                                a.settings(),
                                msg,
                            ));
                        }
                        eprintln!("error: {msg}");
                        std::process::exit(3);
                    }
                }
            }
            // Relaxed: a stop flag.
            stop.store(true, Ordering::Relaxed);
        });
    }
    let st = mgr.stats();
    for b in bos {
        mgr.free(b).map_err(e)?;
    }
    let pins_end = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let vram_end = mgr.vram_free();
    let violations = ld(&c.lost_cpu_writes) + ld(&c.device_mismatches);
    let report = serde_json::json!({
        "mode": "migrate",
        "seconds": t0.elapsed().as_secs_f64(),
        "protected": !a.no_protect,
        "commands": ld(&c.commands),
        "cpu_passes": ld(&c.cpu_passes),
        "violations": violations,
        "violations_by_kind": {
            "lost_cpu_writes": ld(&c.lost_cpu_writes),
            "device_mismatches": ld(&c.device_mismatches),
        },
        "deadlocks": 0,
        "migrations": ld(&c.migrations),
        "migrate_errors": ld(&c.migrate_errors),
        "pressure_bos": ld(&c.pressure_bos),
        "evictions": st.evictions,
        "evict_skipped_busy": st.evict_skipped_busy,
        "cpu_waits": bo::cpu_waits() - waits_start,
        "command_waits": st.command_waits,
        "bytes_moved": st.bytes_moved,
        "pins_start": pins_start,
        "pins_end": pins_end,
        "vram_free_start": vram_start,
        "vram_free_end": vram_end,
    });
    let mut doc = crate::output::envelope("torture", a.settings());
    if let serde_json::Value::Object(m) = report {
        doc.extend(m);
    }
    let failure = if violations > 0
        || pins_end != pins_start
        || vram_end != vram_start
        || (!a.no_protect && ld(&c.migrate_errors) > 0)
    {
        Some(format!(
            "torture --migrate: {violations} violations, {} failed moves, pins {pins_start} -> \
             {pins_end} bytes, free VRAM {vram_start} -> {vram_end}{}",
            ld(&c.migrate_errors),
            if a.no_protect {
                " (expected with --no-protect: the checker works)"
            } else {
                ""
            }
        ))
    } else if ld(&c.migrations) == 0 || ld(&c.commands) == 0 {
        Some("torture --migrate: nothing moved or no command ran, so nothing was checked\nhint: a longer --seconds".into())
    } else {
        None
    };
    if let Some(msg) = failure {
        doc.insert("error".into(), serde_json::json!({ "message": msg }));
    }
    Ok(doc)
}
