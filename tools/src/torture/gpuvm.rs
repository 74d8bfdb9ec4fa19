//! `userptr torture --gpuvm`: the same proof through GPU VMs (datasheet section 10).
//! One submitter drives a shared-virtual-memory VM (its descriptors carry the arena's
//! own CPU pointers: nothing is registered, the device faults and the driver binds),
//! the other a VM of bound userptrs (every slot of the arena, and the source, bound at
//! a GPU VA; an invalidated binding is bound again by the next submission). The
//! mutators, the monitor and the checker are the ones of the plain torture: a
//! completed command's effect must be visible on every page no mutation touched
//! since it was prepared; a DMA fault is accepted only where one did. For the bound
//! VM, whose invalidation waits for its work, a command in flight when a mutation
//! begins must also be finished when the call returns, unless it then fails with a
//! DMA fault (its entries for the range were not present: a binding whose re-pin
//! failed, which no invalidation needs to wait for); the SVM VM does not wait (its
//! work faults again after the TLB invalidation, and is checked by its results). A
//! batch counts as completed only if every command of it did.

use super::{mutate, peek, told, Args, Leave, Rng, MUTATIONS, PAGES_PER_SLOT, SLOT, SLOTS};
use crate::bench::measure::Mem;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use userptr::driver::gpuvm::{Gpu, GpuVm, VmConfig};
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{
    Cause, CommandQueue, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, WaitMode,
    CAUSE_NAMES,
};

/// Where the bound VM maps the arena and the source.
const GVA_ARENA: u64 = 0x40_0000_0000;
const GVA_SRC: u64 = 0x50_0000_0000;

#[derive(Default)]
struct Counts {
    commands: [AtomicU64; 2],
    violations: AtomicU64,
    lost_writes: AtomicU64,
    bad_status: AtomicU64,
    inflight_after_invalidation: AtomicU64,
    late_but_faulted: AtomicU64,
    faults_accepted: AtomicU64,
    dma_faults: AtomicU64,
    submit_errors: AtomicU64,
    malloc_reuse: AtomicU64,
    mutations: [AtomicU64; 7],
    progress: AtomicU64,
}

/// The run through GPU VMs; its report (the envelope and the counts, with `error`
/// when it failed), or why it could not run.
pub(super) fn run(
    a: &Args,
    only: Option<usize>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if a.inject {
        return Err("--inject is not supported with --gpuvm yet\nhint: run them apart".into());
    }
    let e = |e: userptr::Error| crate::explain(&e);
    // SAFETY: a malloc tuning call (see the plain torture).
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    let pins_start = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let t0 = Instant::now();
    let drv = Driver::reference().map_err(e)?;
    let queues = (0..2)
        .map(|r| drv.queue(r, 16))
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    // Domain mappings with only the rings in place: everything else must go again.
    let mappings_start = drv.domain().mappings();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let gpu = Gpu::open(&reg).map_err(e)?;
    let vms: [GpuVm; 2] = [
        gpu.create_vm(VmConfig::svm()).map_err(e)?,
        gpu.create_vm(VmConfig::bound()).map_err(e)?,
    ];
    for (vm, q) in vms.iter().zip(&queues) {
        vm.attach(q).map_err(e)?;
    }
    let arena = Mem::new(SLOTS * SLOT)?;
    let source = Mem::new(4 * SLOT)?;
    // SAFETY: our own buffer.
    unsafe { std::ptr::write_bytes(source.addr as *mut u8, 0x5c, source.len) };
    let scratches = [Mem::new(4 * SLOT)?, Mem::new(4 * SLOT)?];
    // The DMA-fault probes' target: PROT_NONE in the process (so the SVM VM must
    // refuse it), bound nowhere (so the bound VM has no entry for it).
    // SAFETY: a fresh PROT_NONE mapping at a kernel-chosen address.
    let probe = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOT,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if probe == libc::MAP_FAILED {
        return Err("mmap of the probe page failed".into());
    }
    let probe = probe as u64;
    // SAFETY: torture's own buffers, alive for the run; the checker only reads them
    // between commands, as the other torture modes do.
    let usrc = unsafe { reg.register(source.addr, source.len, Perm::READ) }.map_err(e)?;
    let bsrc = vms[1].bind(&usrc, GVA_SRC).map_err(e)?;
    let mut slots = Vec::new();
    for i in 0..SLOTS {
        // SAFETY: as above.
        let u =
            unsafe { reg.register(arena.addr + i * SLOT, SLOT, Perm::READ_WRITE) }.map_err(e)?;
        let b = vms[1].bind(&u, GVA_ARENA + (i * SLOT) as u64).map_err(e)?;
        slots.push((u, b));
    }
    let monitor = if a.no_protect || a.explicit {
        None
    } else {
        Some(SeccompMonitor::install(&reg).map_err(e)?)
    };
    let pages = SLOTS * PAGES_PER_SLOT;
    let ends: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    let gens: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    let locks: Vec<Mutex<()>> = (0..SLOTS).map(|_| Mutex::new(())).collect();
    let mlocks: Vec<Mutex<()>> = (0..SLOTS).map(|_| Mutex::new(())).collect();
    let lost: Vec<AtomicBool> = (0..SLOTS).map(|_| AtomicBool::new(false)).collect();
    let inflight: Vec<AtomicU64> = (0..SLOTS).map(|_| AtomicU64::new(0)).collect();
    // Per slot: the bound VM's command a mutation of the slot found still running when
    // its call returned (0: none).
    let late: Vec<AtomicU64> = (0..SLOTS).map(|_| AtomicU64::new(0)).collect();
    let c = Counts::default();
    let deadline = t0 + Duration::from_secs_f64(a.seconds);
    let finished = AtomicU64::new(0);
    let base = arena.addr;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = (0, Instant::now());
            while finished.load(Ordering::Acquire) < 4 {
                std::thread::sleep(Duration::from_millis(100));
                let p = c.progress.load(Ordering::Relaxed);
                if p != last.0 {
                    last = (p, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(10) {
                    let msg = "torture --gpuvm: no progress for 10 s: deadlock";
                    crate::progress::finish();
                    if let Some(out) = &a.json {
                        let _ =
                            out.write(&crate::output::error_document("torture", a.settings(), msg));
                    }
                    eprintln!("error: {msg}");
                    std::process::exit(3);
                }
            }
        });
        for t in 0..2usize {
            let (q, vm) = (&queues[t], &vms[t]);
            let (gens, ends, locks, c, lost, inflight) =
                (&gens, &ends, &locks, &c, &lost, &inflight);
            let (late, mlocks) = (&late, &mlocks);
            let (finished, source) = (&finished, &source);
            let explicit_reg = a.explicit.then_some(&reg);
            s.spawn(move || {
                let _leave = Leave(finished);
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ t as u64);
                let mut byte = 0u8;
                // Slot i's address in this VM, and the source's.
                let at = |i: usize| match t {
                    0 => (base + i * SLOT) as u64,
                    _ => GVA_ARENA + (i * SLOT) as u64,
                };
                let src = if t == 0 { source.addr as u64 } else { GVA_SRC };
                while Instant::now() < deadline {
                    let (a, b) = rng.range();
                    if (a..b).any(|i| lost[i].load(Ordering::SeqCst)) {
                        continue;
                    }
                    let _held: Vec<_> = (a..b)
                        .map(|i| locks[i].lock().unwrap_or_else(|p| p.into_inner()))
                        .collect();
                    let range = a * PAGES_PER_SLOT..b * PAGES_PER_SLOT;
                    let before: Vec<u64> = range
                        .clone()
                        .map(|p| {
                            let e = ends[p].load(Ordering::SeqCst);
                            let g = gens[p].load(Ordering::SeqCst);
                            if g == e {
                                g
                            } else {
                                u64::MAX
                            }
                        })
                        .collect();
                    if t == 0 && rng.next() % 8 == 0 {
                        if !malloc_reuse_svm(vm, q, &mut byte, explicit_reg) {
                            c.violations.fetch_add(1, Ordering::Relaxed);
                            c.lost_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        c.malloc_reuse.fetch_add(1, Ordering::Relaxed);
                        c.progress.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let len = ((b - a) * SLOT) as u64;
                    let dst = at(a);
                    let op = rng.next() % 5;
                    byte = byte.wrapping_add(1).max(1);
                    let n4 = len.min(4 * SLOT as u64);
                    let twice = (2.0f32 * f32::from_le_bytes([0x5c; 4])).to_le_bytes()[0];
                    let (expect, descs) = match op {
                        0 => (Some(0x5c), vec![Descriptor::copy(src, dst, n4)]),
                        1 => (None, vec![Descriptor::crc32c(dst, len, 0)]),
                        2 => (None, vec![Descriptor::fill(probe, 4096, 1)]),
                        4 => (
                            Some(twice),
                            vec![
                                Descriptor::fill(dst, n4, 0),
                                Descriptor::saxpy(2.0, src, dst, n4 / 4),
                            ],
                        ),
                        _ => (Some(byte), vec![Descriptor::fill(dst, len, byte)]),
                    };
                    // SAFETY: the descriptors reach torture's own arena and source
                    // (bound, or SVM pointers into them), read only between commands.
                    let Ok(f) = (unsafe { vm.submit(q, &descs) }) else {
                        c.submit_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if t == 1 {
                        for w in &inflight[a..b] {
                            w.store(f.end.seqno, Ordering::SeqCst);
                        }
                    }
                    let waited = q.wait_completion(f.end, WaitMode::Block, Duration::from_secs(30));
                    // A batch's result stands only if every command of it completed:
                    // op 4's FILL may fault (its pages read-only for a moment: an SVM
                    // fault fails it) while its SAXPY, replayed later, succeeds.
                    let first = (descs.len() > 1)
                        .then(|| q.wait_completion(f.start, WaitMode::Block, Duration::from_secs(30)))
                        .and_then(|r| r.ok())
                        .map(|c| c.status)
                        .filter(|&s| s != Status::Ok);
                    for w in &inflight[a..b] {
                        w.store(0, Ordering::SeqCst);
                    }
                    let Ok(mut done) = waited else { continue };
                    if let Some(st) = first {
                        done.status = st;
                    }
                    if t == 1 {
                        // A mutation that found this command still running when its
                        // call returned flagged it, under the slot's mutation lock
                        // (taken here so that no flag is still on its way). Harmless
                        // if the command faulted (its entries for the slot were not
                        // present: nothing of the old pages was reachable); a
                        // violation if it completed.
                        let _m: Vec<_> = (a..b)
                            .map(|i| mlocks[i].lock().unwrap_or_else(|p| p.into_inner()))
                            .collect();
                        let flagged = late[a..b]
                            .iter()
                            .filter(|l| {
                                l.compare_exchange(f.end.seqno, 0, Ordering::SeqCst, Ordering::SeqCst)
                                    .is_ok()
                            })
                            .count() as u64;
                        if flagged > 0 && done.status == Status::Ok {
                            eprintln!(
                                "torture --gpuvm: bound VM, op {op} on slots {a}..{b}: completed after an invalidation of its range returned"
                            );
                            c.inflight_after_invalidation.fetch_add(flagged, Ordering::Relaxed);
                            c.violations.fetch_add(flagged, Ordering::Relaxed);
                        } else if flagged > 0 {
                            c.late_but_faulted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    c.commands[t].fetch_add(1, Ordering::Relaxed);
                    c.progress.fetch_add(1, Ordering::Relaxed);
                    let moved = |k: usize, p: usize| gens[p].load(Ordering::SeqCst) != before[k];
                    match (op, done.status) {
                        (2, Status::DmaFault) => {
                            c.dma_faults.fetch_add(1, Ordering::Relaxed);
                        }
                        (2, st) => {
                            eprintln!("torture --gpuvm: the DMA-fault probe completed {st:?}");
                            c.violations.fetch_add(1, Ordering::Relaxed);
                            c.bad_status.fetch_add(1, Ordering::Relaxed);
                        }
                        (1, Status::Ok) => {}
                        (_, Status::DmaFault)
                            if range.clone().enumerate().any(|(k, p)| moved(k, p)) =>
                        {
                            c.faults_accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        (_, Status::Ok) => {
                            let covered = if op == 0 || op == 4 {
                                n4 as usize / 4096
                            } else {
                                range.len()
                            };
                            let mut lost_pages = 0;
                            for (k, p) in range.clone().enumerate().take(covered) {
                                if peek(base + p * 4096) != expect && !moved(k, p) {
                                    lost_pages += 1;
                                    c.violations.fetch_add(1, Ordering::Relaxed);
                                    c.lost_writes.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            if lost_pages > 0 {
                                eprintln!(
                                    "torture --gpuvm: {} VM, op {op} on slots {a}..{b}: {lost_pages} pages without the write",
                                    ["SVM", "bound"][t]
                                );
                            }
                        }
                        (_, st) => {
                            eprintln!(
                                "torture --gpuvm: {} VM, op {op} on slots {a}..{b}: unexpected {st:?} {:?} detail {:#x}",
                                ["SVM", "bound"][t],
                                done.fault,
                                done.detail
                            );
                            c.violations.fetch_add(1, Ordering::Relaxed);
                            c.bad_status.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        for t in 0..2u64 {
            let (gens, ends, c, scratch) = (&gens, &ends, &c, &scratches[t as usize]);
            let (inflight, lost, mlocks, finished) = (&inflight, &lost, &mlocks, &finished);
            let late = &late;
            let bound_q = &queues[1];
            let explicit = a.explicit.then_some(&reg);
            s.spawn(move || {
                let _leave = Leave(finished);
                let mut rng = Rng(0x1234_5678_9abc_def0 ^ t);
                while Instant::now() < deadline {
                    let (a, b) = rng.range();
                    let (start, len) = (base + a * SLOT, (b - a) * SLOT);
                    let kind = only.unwrap_or((rng.next() % 7) as usize);
                    // As in the plain torture: mutators of overlapping ranges take
                    // turns, and a lost range is left alone before anything is counted.
                    let _held: Vec<_> = (a..b)
                        .map(|i| mlocks[i].lock().unwrap_or_else(|p| p.into_inner()))
                        .collect();
                    if (a..b).any(|i| lost[i].load(Ordering::SeqCst)) {
                        continue;
                    }
                    for g in &gens[a * PAGES_PER_SLOT..b * PAGES_PER_SLOT] {
                        g.fetch_add(1, Ordering::SeqCst);
                    }
                    let before: Vec<(usize, u64)> = (a..b)
                        .map(|i| (i, inflight[i].load(Ordering::SeqCst)))
                        .filter(|&(_, e)| e != 0)
                        .collect();
                    if !mutate(kind, start, len, scratch, explicit) {
                        for l in &lost[a..b] {
                            l.store(true, Ordering::SeqCst);
                        }
                    }
                    if MUTATIONS[kind] != "fork" {
                        for (i, s) in before {
                            if !bound_q.is_done(s) {
                                late[i].store(s, Ordering::SeqCst);
                            }
                        }
                    }
                    for e in &ends[a * PAGES_PER_SLOT..b * PAGES_PER_SLOT] {
                        e.fetch_add(1, Ordering::SeqCst);
                    }
                    c.mutations[kind].fetch_add(1, Ordering::Relaxed);
                    c.progress.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(300));
                }
            });
        }
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let stats = reg.stats();
    let vstats = [vms[0].stats(), vms[1].stats()];
    drop(monitor);
    drop((slots, bsrc, usrc, vms, gpu));
    drop(reg);
    let mappings_end = drv.domain().mappings();
    drop((queues, drv, arena, source, scratches));
    // SAFETY: the probe mapping is ours and nothing uses it any more.
    unsafe { libc::munmap(probe as *mut _, SLOT) };
    let pins_end = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let violations = c.violations.load(Ordering::Relaxed);
    let vm_json = |s: &userptr::driver::GpuVmStats| {
        s.fields()
            .into_iter()
            .map(|(n, v)| (n.to_string(), serde_json::json!(v)))
            .collect::<serde_json::Map<_, _>>()
    };
    let ld = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let commands = ld(&c.commands[0]) + ld(&c.commands[1]);
    let report = serde_json::json!({
        "mode": "gpuvm",
        "seconds": t0.elapsed().as_secs_f64(),
        "protected": !a.no_protect,
        "commands": ld(&c.commands[0]) + ld(&c.commands[1]),
        "commands_svm": ld(&c.commands[0]),
        "commands_bound": ld(&c.commands[1]),
        "violations": violations,
        "violations_by_kind": {
            "lost_writes": ld(&c.lost_writes),
            "unexpected_status": ld(&c.bad_status),
            "in_flight_after_invalidation": ld(&c.inflight_after_invalidation),
        },
        "pins_start": pins_start,
        "pins_end": pins_end,
        "mappings_start": mappings_start,
        "mappings_end": mappings_end,
        "malloc_reuse": ld(&c.malloc_reuse),
        "slots_lost_to_other_mappings": lost.iter().filter(|l| l.load(Ordering::SeqCst)).count(),
        "invalidations": CAUSE_NAMES.iter().zip(stats.invalidations).map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "mutations": MUTATIONS.iter().zip(&c.mutations).map(|(n, v)| (n.to_string(), serde_json::json!(ld(v)))).collect::<serde_json::Map<_, _>>(),
        "errors_handled": {
            "dma_faults": ld(&c.dma_faults),
            "protection_faults_accepted": ld(&c.faults_accepted),
            "submissions_refused": ld(&c.submit_errors),
            "running_past_invalidation_but_faulted": ld(&c.late_but_faulted),
        },
        "vm_svm": vm_json(&vstats[0]),
        "vm_bound": vm_json(&vstats[1]),
        "peak_rss": userptr::proc_status::peak_rss_bytes().unwrap_or(0),
    });
    let mut doc = crate::output::envelope("torture", a.settings());
    if let serde_json::Value::Object(m) = report {
        doc.extend(m);
    }
    let failure = if violations > 0 || pins_end != pins_start || mappings_end != mappings_start {
        Some(format!(
            "torture --gpuvm: {violations} coherence violations, pins {pins_start} -> {pins_end} \
             bytes, domain mappings {mappings_start} -> {mappings_end}{}",
            if a.no_protect {
                " (expected with --no-protect: the checker works)"
            } else {
                ""
            }
        ))
    } else if commands == 0 {
        Some(format!(
            "torture --gpuvm: no command completed in {:.3} s, so nothing was checked\nhint: a longer --seconds",
            t0.elapsed().as_secs_f64()
        ))
    } else {
        None
    };
    if let Some(msg) = failure {
        doc.insert("error".into(), serde_json::json!({ "message": msg }));
    }
    Ok(doc)
}

/// The free/malloc-reuse lane through the SVM VM: FILL a fresh `malloc` block by its
/// pointer, free it, malloc one of the same size (glibc maps it again, often at the
/// same address), FILL that: the new block must get the write. Returns false on a
/// lost write.
fn malloc_reuse_svm(
    vm: &GpuVm,
    q: &CommandQueue,
    byte: &mut u8,
    explicit: Option<&Registry>,
) -> bool {
    const N: usize = 256 << 10;
    let fill = |p: usize, b: u8| -> Option<Status> {
        // SAFETY: `p` points into torture's own probe buffer, read only after the wait.
        let f = unsafe { vm.submit(q, &[Descriptor::fill(p as u64, N as u64, b)]) }.ok()?;
        Some(
            q.wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))
                .ok()?
                .status,
        )
    };
    // SAFETY: a plain malloc; the block is ours until freed below.
    let p = unsafe { libc::malloc(N) } as usize;
    if p == 0 {
        return true;
    }
    *byte = byte.wrapping_add(1).max(1);
    let first = fill(p, *byte);
    // Above the mmap threshold, free() is a munmap: with --explicit the registry is
    // told around it (the SVM VM's chunks of the block go with it).
    let free = |p: usize| {
        told(explicit, (p, N), Cause::Unmap, || {
            // SAFETY: freeing our block.
            unsafe { libc::free(p as *mut libc::c_void) }
        })
    };
    free(p);
    // SAFETY: a new block of the same size, often at the same address.
    let p2 = unsafe { libc::malloc(N) } as usize;
    if p2 == 0 {
        return true;
    }
    // SAFETY: our new block.
    unsafe { std::ptr::write_bytes(p2 as *mut u8, 0, N) };
    *byte = byte.wrapping_add(1).max(1);
    let second = fill(p2, *byte);
    // SAFETY: our block, `N` bytes.
    let seen = unsafe { std::slice::from_raw_parts(p2 as *const u8, N) }
        .iter()
        .all(|&x| x == *byte);
    free(p2);
    second != Some(Status::Ok) || seen || first.is_none()
}
