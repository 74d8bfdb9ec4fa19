//! `userptr torture`: the reliability proof. For a bounded time, submitter threads run
//! FILL, COPY, SAXPY and CRC32C through the registry on one arena of ordinary memory while
//! mutator threads change it under them: `madvise(DONTNEED/FREE)`, `munmap` + re-map,
//! `mmap(MAP_FIXED)` over it, `mremap` away and back, `mprotect` down and up, and
//! `fork` with the child writing its copy; and each submitter now and then frees a
//! registered `malloc` block and mallocs another at the same address. Nothing tells the registry but the seccomp
//! monitor (unless `--no-protect`, which turns it off to show the checker works).
//!
//! The checker: every page counts the mutations started on it (bumped before the
//! change) and finished (bumped after). A completed command's effect must be visible
//! on every page it covered, unless a mutation of that page was in flight when the
//! command was prepared or started since (then the change may legitimately have hidden
//! it). A command that failed with a DMA fault
//! is accepted only if a protection change hit its range. Anything else is a
//! violation: a device write lost to a stale pin. And a command in flight on a range
//! when a mutation of it begins must be finished (completed, or aborted by a reset)
//! when the mutating call returns: the invalidation waits for the device first.
//!
//! `--inject` adds faults the run must survive: every 7th pin attempt fails in the
//! reference IOMMU (`PinFaults`: ENOMEM and EAGAIN in turn, which the registry retries
//! or answers by evicting), and the device stalls (CONTROL.ENABLE off) for longer than
//! the fence timeout, so that invalidations meeting in-flight work reset it and that
//! work completes `Aborted`. The report counts what was injected (`injected_faults`) and
//! how it was handled (`errors_handled`); pins and domain mappings must be back where
//! they started, and violations stay 0.
//!
//! `--gpuvm` runs it through GPU VMs instead: an SVM VM and a VM of bound userptrs
//! (`torture/gpuvm.rs`). `--migrate` tortures buffer objects instead: BOs moving
//! between VRAM and system memory under CPU writers and device commands
//! (`torture/migrate.rs`).

mod gpuvm;
mod migrate;

use crate::bench::measure::Mem;
use crate::output::OutPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::{Cause, Invalidation};
use userptr::{
    Descriptor, Driver, Perm, PinFaults, ReferenceConfig, Registry, RegistryConfig, Status,
    UringIommuConfig, WaitMode, CAUSE_NAMES,
};

const SLOTS: usize = 32;
const SLOT: usize = 64 << 10;
const PAGES_PER_SLOT: usize = SLOT / 4096;
/// How long an injected device stall lasts (and the pause between two).
const STALL: Duration = Duration::from_millis(300);

#[derive(clap::Args)]
pub struct Args {
    /// How long to run, in seconds (above 0, at most a week).
    #[arg(long, default_value_t = 5.0, value_parser = crate::args::seconds, allow_negative_numbers = true)]
    seconds: f64,
    /// Turn the monitors off (the checker must then report violations).
    #[arg(long, conflicts_with = "explicit")]
    no_protect: bool,
    /// Write the report as JSON to FILE (`-`: stdout, and the human lines go to
    /// stderr). Schema: docs/json-schema.md.
    #[arg(long, value_name = "FILE", value_parser = crate::output::OutPath::parse)]
    json: Option<OutPath>,
    /// Use only this mutation, to isolate a failure.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(MUTATIONS))]
    only: Option<String>,
    /// Tell the registry explicitly around each address-space change (the arena's
    /// mutations and the free() of the malloc lane) instead of relying on the seccomp
    /// monitor (isolates the monitor from the registry).
    #[arg(long)]
    explicit: bool,
    /// Inject faults: every 7th pin attempt fails (ENOMEM and EAGAIN in turn), the
    /// device stalls past the fence timeout now and then (invalidations then reset it),
    /// and DMA-fault probes run as always. They must be handled: no violation, no leak.
    #[arg(long)]
    inject: bool,
    /// Submit through GPU VMs: one submitter on a shared-virtual-memory VM (plain
    /// pointers), one on a VM of bound userptrs.
    #[arg(long)]
    gpuvm: bool,
    /// Torture buffer objects instead: BOs migrating between VRAM and system memory
    /// under CPU writers and device commands, with VRAM pressure.
    #[arg(long, conflicts_with = "gpuvm")]
    migrate: bool,
}

impl Args {
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "seconds": self.seconds, "no_protect": self.no_protect, "only": self.only,
            "explicit": self.explicit, "inject": self.inject, "gpuvm": self.gpuvm,
            "migrate": self.migrate,
            "monitor": if self.no_protect { "none" } else if self.explicit { "explicit" } else { "seccomp" },
        })
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self) -> (usize, usize) {
        let a = self.next() as usize % SLOTS;
        (a, (a + 1 + self.next() as usize % 3).min(SLOTS))
    }
}

#[derive(Default)]
struct Counts {
    commands: AtomicU64,
    violations: AtomicU64,
    faults_accepted: AtomicU64,
    dma_fault_probes: AtomicU64,
    mutations: [AtomicU64; 7],
    malloc_reuse: AtomicU64,
    aborted: AtomicU64,
    dma_faults: AtomicU64,
    register_errors: AtomicU64,
    inflight_after_invalidation: AtomicU64,
    submit_errors: AtomicU64,
    stalls: AtomicU64,
    lost_writes: AtomicU64,
    malloc_lost_writes: AtomicU64,
    bad_status: AtomicU64,
    progress: AtomicU64,
}

const MUTATIONS: [&str; 7] = [
    "madv_dontneed",
    "madv_free",
    "munmap_remap",
    "mmap_fixed",
    "mremap",
    "mprotect",
    "fork",
];

pub fn run(a: Args) -> Result<(), String> {
    let doc = match torture(&a) {
        Ok(doc) => doc,
        Err(e) => {
            if let Some(out) = &a.json {
                out.write(&crate::output::error_document("torture", a.settings(), &e))?;
            }
            return Err(e);
        }
    };
    let failed = doc
        .get("error")
        .and_then(|e| e["message"].as_str())
        .map(String::from);
    let text = crate::output::pretty(&serde_json::Value::Object(doc));
    match &a.json {
        Some(OutPath::Stdout) => crate::progress::out(&text),
        Some(f @ OutPath::File(_)) => {
            crate::progress::out(&text);
            f.write(&text)?;
        }
        None => crate::progress::out(&text),
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if a.json.as_ref().is_some_and(OutPath::is_stdout) {
        crate::progress::err("torture: ok");
    } else {
        crate::progress::out("torture: ok");
    }
    Ok(())
}

/// The run; its report (the envelope and the counts, with `error` when it failed),
/// or why it could not run.
fn torture(a: &Args) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let only = a
        .only
        .as_ref()
        .and_then(|m| MUTATIONS.iter().position(|x| x == m));
    if a.migrate {
        return migrate::run(a);
    }
    if a.gpuvm {
        return gpuvm::run(a, only);
    }
    // A fixed mmap threshold, so a freed large block goes back to the kernel and the
    // next malloc of that size gets the same address (the reuse the lane exercises).
    // SAFETY: a malloc tuning call.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    let pins_start = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let t0 = Instant::now();
    let pin_faults = a.inject.then(|| PinFaults::every(7));
    let drv = Driver::with_reference(ReferenceConfig {
        iommu: UringIommuConfig {
            pin_faults: pin_faults.clone(),
            ..Default::default()
        },
        ..Default::default()
    })
    .map_err(|e| crate::explain(&e))?;
    let queues = (0..2)
        .map(|r| drv.queue(r, 16))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::explain(&e))?;
    // Domain mappings with only the rings in place: the registry must leave it so.
    let mappings_start = drv.domain().mappings();
    let cfg = RegistryConfig {
        // Injected stalls last STALL; an invalidation that meets one must give up on
        // the device well before, and reset it.
        fence_timeout: if a.inject {
            STALL / 3
        } else {
            RegistryConfig::default().fence_timeout
        },
        ..Default::default()
    };
    let reg = Registry::new(drv.clone(), cfg);
    let arena = Mem::new(SLOTS * SLOT)?;
    let source = Mem::new(4 * SLOT)?;
    // SAFETY: our own buffer.
    unsafe { std::ptr::write_bytes(source.addr as *mut u8, 0x5c, source.len) };
    // One scratch area per mutator: mremap leaves a hole in it for a moment.
    let scratches = [Mem::new(4 * SLOT)?, Mem::new(4 * SLOT)?];
    // SAFETY: our own mapping, which outlives the registry and which nothing writes
    // after the fill above.
    let usrc = unsafe { reg.register(source.addr, source.len, Perm::READ) }
        .map_err(|e| crate::explain(&e))?;
    // The monitor goes in before the worker threads exist (see its docs).
    let monitor = if a.no_protect || a.explicit {
        None
    } else {
        Some(SeccompMonitor::install(&reg).map_err(|e| crate::explain(&e))?)
    };
    // Per page: mutations started (`gens`) and finished (`ends`). A page's result may
    // legitimately be hidden if a mutation was in flight when the command was prepared
    // (started != finished then) or started since.
    let ends: Vec<AtomicU64> = (0..SLOTS * PAGES_PER_SLOT)
        .map(|_| AtomicU64::new(0))
        .collect();
    let gens: Vec<AtomicU64> = (0..SLOTS * PAGES_PER_SLOT)
        .map(|_| AtomicU64::new(0))
        .collect();
    let locks: Vec<Mutex<()>> = (0..SLOTS).map(|_| Mutex::new(())).collect();
    let mlocks: Vec<Mutex<()>> = (0..SLOTS).map(|_| Mutex::new(())).collect();
    // Slots whose range another mapping took over (see `mutate`): left alone.
    let lost: Vec<std::sync::atomic::AtomicBool> = (0..SLOTS)
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    // Per slot: the command in flight on it (`seqno << 1 | queue`, 0: none). One
    // submitter at a time holds a slot (its lock), so one word per slot suffices.
    let inflight: Vec<AtomicU64> = (0..SLOTS).map(|_| AtomicU64::new(0)).collect();
    let c = Counts::default();
    let deadline = t0 + Duration::from_secs_f64(a.seconds);
    let finished = AtomicU64::new(0);
    let deadlocks = AtomicU64::new(0);
    let base = arena.addr;
    if let Some(f) = &pin_faults {
        f.set_enabled(true);
    }

    std::thread::scope(|s| {
        // Watchdog: no progress for 10 s is a deadlock.
        s.spawn(|| {
            let mut last = (0, Instant::now());
            // Until the four workers are done (each bumps `finished` as it leaves).
            while finished.load(Ordering::Acquire) < 4 {
                std::thread::sleep(Duration::from_millis(100));
                let p = c.progress.load(Ordering::Relaxed);
                if p != last.0 {
                    last = (p, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(10) {
                    deadlocks.fetch_add(1, Ordering::Relaxed);
                    let msg = "torture: no progress for 10 s: deadlock";
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
        for (t, q) in queues.iter().enumerate() {
            let (reg, gens, ends, locks, c, usrc) = (&reg, &gens, &ends, &locks, &c, &usrc);
            let inflight = &inflight;
            let lost = &lost;
            let finished = &finished;
            let explicit = a.explicit;
            s.spawn(move || {
                let _leave = Leave(finished);
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ t as u64);
                let mut byte = 0u8;
                while Instant::now() < deadline {
                    let (a, b) = rng.range();
                    if (a..b).any(|i| lost[i].load(Ordering::SeqCst)) {
                        continue;
                    }
                    let _held: Vec<_> = (a..b)
                        .map(|i| locks[i].lock().unwrap_or_else(|p| p.into_inner()))
                        .collect();
                    let pages = a * PAGES_PER_SLOT..b * PAGES_PER_SLOT;
                    // u64::MAX marks "a mutation was in flight": always counts as moved.
                    let before: Vec<u64> = pages
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
                    // SAFETY: slots of our own arena, which outlives the registry; the
                    // mutators change them only under the monitor or an explicit
                    // invalidation (or, with --no-protect, on purpose to show the
                    // hazard on pages no Rust value owns), and their bytes are read
                    // only after the commands are waited for.
                    let registered =
                        unsafe { reg.register(base + a * SLOT, (b - a) * SLOT, Perm::READ_WRITE) };
                    let Ok(u) = registered else {
                        // A typed error (an injected pin failure the registry could not
                        // retry away, or a range a mutator has unmapped): handled.
                        c.register_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let len = u.len();
                    if rng.next() % 8 == 0 {
                        // The free/malloc-reuse lane: this thread's own block.
                        if !malloc_reuse(reg, q, &mut byte, explicit) {
                            c.violations.fetch_add(1, Ordering::Relaxed);
                            c.lost_writes.fetch_add(1, Ordering::Relaxed);
                            c.malloc_lost_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        c.malloc_reuse.fetch_add(1, Ordering::Relaxed);
                        c.commands.fetch_add(2, Ordering::Relaxed);
                        c.progress.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let op = rng.next() % 5;
                    byte = byte.wrapping_add(1).max(1);
                    let (expect, r) = match op {
                        0 => (
                            Some(0x5c),
                            reg.submit(q, &[&u, usrc], |i| {
                                vec![Descriptor::copy(i[1], i[0], len.min(4 * SLOT as u64))]
                            }),
                        ),
                        1 => (
                            None,
                            reg.submit(q, &[&u], |i| vec![Descriptor::crc32c(i[0], len, 0)]),
                        ),
                        2 => {
                            c.dma_fault_probes.fetch_add(1, Ordering::Relaxed);
                            (
                                None,
                                reg.submit(q, &[&u], |_| {
                                    vec![Descriptor::fill(0x7f00_0000_0000, 4096, 1)]
                                }),
                            )
                        }
                        4 => {
                            // y = 2x + 0 over the range: zero it, then SAXPY with x
                            // from the source buffer (bytes 0x5c).
                            let n = len.min(4 * SLOT as u64) / 4;
                            let want = (2.0f32 * f32::from_le_bytes([0x5c; 4])).to_le_bytes()[0];
                            (
                                Some(want),
                                reg.submit(q, &[&u, usrc], |i| {
                                    vec![
                                        Descriptor::fill(i[0], n * 4, 0),
                                        Descriptor::saxpy(2.0, i[1], i[0], n),
                                    ]
                                }),
                            )
                        }
                        _ => (
                            Some(byte),
                            reg.submit(q, &[&u], |i| vec![Descriptor::fill(i[0], len, byte)]),
                        ),
                    };
                    let Ok(f) = r else {
                        c.submit_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    // SeqCst: a mutator that snapshots this after the store knows the
                    // command was submitted before its invalidation began.
                    for w in &inflight[a..b] {
                        w.store(f.end.seqno << 1 | t as u64, Ordering::SeqCst);
                    }
                    let waited = q.wait_completion(f.end, WaitMode::Block, Duration::from_secs(30));
                    for w in &inflight[a..b] {
                        w.store(0, Ordering::SeqCst);
                    }
                    let Ok(done_c) = waited else {
                        continue;
                    };
                    c.commands.fetch_add(1, Ordering::Relaxed);
                    c.progress.fetch_add(1, Ordering::Relaxed);
                    let moved = |k: usize, p: usize| gens[p].load(Ordering::SeqCst) != before[k];
                    match (op, done_c.status) {
                        // Failed with a clear status after a device reset (an
                        // invalidation's fence wait timed out): allowed, and counted.
                        (_, Status::Aborted) => {
                            c.aborted.fetch_add(1, Ordering::Relaxed);
                        }
                        (2, Status::DmaFault) => {
                            c.dma_faults.fetch_add(1, Ordering::Relaxed);
                        }
                        (2, _) => {
                            c.violations.fetch_add(1, Ordering::Relaxed);
                            c.bad_status.fetch_add(1, Ordering::Relaxed);
                        }
                        (1, Status::Ok) => {}
                        (_, Status::DmaFault)
                            if pages.clone().enumerate().any(|(k, p)| moved(k, p)) =>
                        {
                            c.faults_accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        (_, Status::Ok) => {
                            let want = expect.unwrap_or(0);
                            let covered = if op == 0 || op == 4 {
                                (len as usize).min(4 * SLOT) / 4096
                            } else {
                                pages.len()
                            };
                            for (k, p) in pages.clone().enumerate().take(covered) {
                                let first = peek(base + p * 4096);
                                if first != Some(want) && !moved(k, p) {
                                    c.violations.fetch_add(1, Ordering::Relaxed);
                                    c.lost_writes.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        _ => {
                            c.violations.fetch_add(1, Ordering::Relaxed);
                            c.bad_status.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        for t in 0..2u64 {
            let (gens, ends, c, scratch) = (&gens, &ends, &c, &scratches[t as usize]);
            let (inflight, queues) = (&inflight, &queues);
            let (lost, mlocks) = (&lost, &mlocks);
            let explicit = a.explicit.then_some(&reg);
            let finished = &finished;
            s.spawn(move || {
                let _leave = Leave(finished);
                let mut rng = Rng(0x1234_5678_9abc_def0 ^ t);
                while Instant::now() < deadline {
                    let (a, b) = rng.range();
                    let (start, len) = (base + a * SLOT, (b - a) * SLOT);
                    let kind = only.unwrap_or((rng.next() % 7) as usize);
                    // Mutators of overlapping ranges take turns (submitters do not wait
                    // for them: that is the point).
                    let _held: Vec<_> = (a..b)
                        .map(|i| mlocks[i].lock().unwrap_or_else(|p| p.into_inner()))
                        .collect();
                    // A range another mapping took over is left alone, before anything
                    // is counted or told: a mutation begun here is always finished.
                    if (a..b).any(|i| lost[i].load(Ordering::SeqCst)) {
                        continue;
                    }
                    for g in &gens[a * PAGES_PER_SLOT..b * PAGES_PER_SLOT] {
                        g.fetch_add(1, Ordering::SeqCst);
                    }
                    // Commands in flight on the range now were submitted before the
                    // invalidation begins (inside the mutating call, or at the explicit
                    // invalidate_start in `mutate`): it must wait for them (or reset
                    // the device), so each is done by the time the call returns.
                    let before: Vec<u64> = inflight[a..b]
                        .iter()
                        .map(|w| w.load(Ordering::SeqCst))
                        .filter(|&e| e != 0)
                        .collect();
                    if !mutate(kind, start, len, scratch, explicit) {
                        for l in &lost[a..b] {
                            l.store(true, Ordering::SeqCst);
                        }
                    }
                    // (fork invalidates nothing: the parent keeps its pages.)
                    if MUTATIONS[kind] != "fork" {
                        for e in before {
                            if !queues[(e & 1) as usize].is_done(e >> 1) {
                                c.inflight_after_invalidation
                                    .fetch_add(1, Ordering::Relaxed);
                                c.violations.fetch_add(1, Ordering::Relaxed);
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
        if a.inject {
            // The stall injector: the device stops making progress (CONTROL.ENABLE
            // off) for longer than the fence timeout, now and then.
            let (drv, c) = (&drv, &c);
            s.spawn(move || {
                while Instant::now() + STALL < deadline {
                    std::thread::sleep(STALL);
                    drv.set_enabled(false);
                    c.stalls.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(STALL);
                    drv.set_enabled(true);
                }
            });
        }
        let bar = crate::progress::start(
            (a.seconds * 1000.0) as u64,
            "torture {bar:30} {elapsed}/{duration} (eta {eta}) {msg}",
        );
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            bar.set_position(t0.elapsed().as_millis() as u64);
            bar.set_message(format!(
                "{} commands checked, {} violations",
                c.commands.load(Ordering::Relaxed),
                c.violations.load(Ordering::Relaxed)
            ));
        }
        bar.set_message("finishing");
    });
    crate::progress::finish();
    if let Some(f) = &pin_faults {
        f.set_enabled(false);
    }
    let stats = reg.stats();
    drop(monitor);
    let _ = usrc;
    drop(reg);
    let mappings_end = drv.domain().mappings();
    drop((queues, drv, arena, source, scratches));
    let pins_end = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let violations = c.violations.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "seconds": t0.elapsed().as_secs_f64(),
        "protected": !a.no_protect,
        "commands": c.commands.load(Ordering::Relaxed),
        "violations": violations,
        "deadlocks": deadlocks.load(Ordering::Relaxed),
        "pins_start": pins_start,
        "pins_end": pins_end,
        "invalidations": CAUSE_NAMES.iter().zip(stats.invalidations).map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "malloc_reuse": c.malloc_reuse.load(Ordering::Relaxed),
        "slots_lost_to_other_mappings": lost.iter().filter(|l| l.load(Ordering::SeqCst)).count(),
        "violations_by_kind": {
            "lost_writes": c.lost_writes.load(Ordering::Relaxed),
            "lost_writes_malloc_reuse": c.malloc_lost_writes.load(Ordering::Relaxed),
            "unexpected_status": c.bad_status.load(Ordering::Relaxed),
            "in_flight_after_invalidation": c.inflight_after_invalidation.load(Ordering::Relaxed),
        },
        "aborted_by_reset": c.aborted.load(Ordering::Relaxed),
        "device_resets": stats.device_resets,
        "mutations": MUTATIONS.iter().zip(&c.mutations).map(|(n, v)| (n.to_string(), serde_json::json!(v.load(Ordering::Relaxed)))).collect::<serde_json::Map<_, _>>(),
        "injected_faults": {
            "dma_fault_probes": c.dma_fault_probes.load(Ordering::Relaxed),
            "pin_enomem": pin_faults.as_ref().map_or(0, |f| f.injected_enomem()),
            "pin_eagain": pin_faults.as_ref().map_or(0, |f| f.injected_eagain()),
            "device_stalls": c.stalls.load(Ordering::Relaxed),
        },
        "errors_handled": {
            "dma_faults": c.dma_faults.load(Ordering::Relaxed),
            "protection_faults_accepted": c.faults_accepted.load(Ordering::Relaxed),
            "pin_retries": stats.pin_retries,
            "pin_failures": stats.pin_failures,
            "registrations_refused": c.register_errors.load(Ordering::Relaxed),
            "submissions_refused": c.submit_errors.load(Ordering::Relaxed),
        },
        "mappings_start": mappings_start,
        "mappings_end": mappings_end,
        "peak_rss": userptr::proc_status::peak_rss_bytes().unwrap_or(0),
    });
    let commands = c.commands.load(Ordering::Relaxed);
    let mut doc = crate::output::envelope("torture", a.settings());
    if let serde_json::Value::Object(m) = report {
        doc.extend(m);
    }
    let failure = if violations > 0 || pins_end != pins_start || mappings_end != mappings_start {
        Some(format!(
            "torture: {violations} coherence violations, pins {pins_start} -> {pins_end} bytes, \
             domain mappings {mappings_start} -> {mappings_end}{}",
            if a.no_protect {
                " (expected with --no-protect: the checker works)"
            } else {
                ""
            }
        ))
    } else if commands == 0 {
        Some(format!(
            "torture: no command completed in {:.3} s, so nothing was checked\nhint: a longer --seconds",
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

/// `free()` a registered `malloc` block and `malloc` one of the same size, which glibc
/// maps at the same address: the device must write the new block, not the old pages.
/// Returns false on a lost write.
fn malloc_reuse(reg: &Registry, q: &userptr::CommandQueue, byte: &mut u8, explicit: bool) -> bool {
    const N: usize = 256 << 10;
    let fill = |p: usize, b: u8| -> Option<Status> {
        // SAFETY: our own malloc block, freed only under the monitor or the explicit
        // invalidation that waits for the command, and read after its fence.
        let u = unsafe { reg.register(p, N, Perm::READ_WRITE) }.ok()?;
        let f = reg
            .submit(q, &[&u], |i| vec![Descriptor::fill(i[0], N as u64, b)])
            .ok()?;
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
    // told around each, as an application without a monitor would have to.
    let free = |p: usize| {
        let told = explicit.then(|| reg.invalidate_start(p as u64..(p + N) as u64, Cause::Unmap));
        // SAFETY: freeing our block.
        unsafe { libc::free(p as *mut libc::c_void) };
        if let Some(Ok(inv)) = told {
            reg.invalidate_end(inv);
        }
    };
    free(p);
    // SAFETY: a plain malloc: a block of the same size, often at the same address.
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
    // Only a write that completed OK yet is not visible is a violation; a command that
    // failed with a status (a reset's Aborted) is not.
    second != Some(Status::Ok) || seen || first.is_none()
}

/// Counts a worker out when it leaves, however it leaves.
struct Leave<'a>(&'a AtomicU64);
impl Drop for Leave<'_> {
    fn drop(&mut self) {
        // Release: the watchdog's Acquire load sees the worker's work done.
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Run `f`, an address-space change of `range` for `cause`, inside an explicit
/// invalidation window when `reg` is given (`--explicit`).
fn told<R>(
    reg: Option<&Registry>,
    range: (usize, usize),
    cause: Cause,
    f: impl FnOnce() -> R,
) -> R {
    let inv: Option<Result<Invalidation, _>> =
        reg.map(|r| r.invalidate_start(range.0 as u64..(range.0 + range.1) as u64, cause));
    let out = f();
    if let (Some(r), Some(Ok(inv))) = (reg, inv) {
        r.invalidate_end(inv);
    }
    out
}

/// One mutation of `[start, start + len)` (page-aligned, inside the arena), with each
/// of its calls told to `explicit` (when given) as its cause.
/// Returns false when the range was lost: `munmap` leaves a hole for a moment, and
/// another thread's allocation may land in it; the range is then someone else's.
fn mutate(
    kind: usize,
    start: usize,
    len: usize,
    scratch: &Mem,
    explicit: Option<&Registry>,
) -> bool {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    let r = (start, len);
    // SAFETY: every change is to the torture's own arena (or scratch area) and leaves
    // the arena mapped read-write at the same addresses when it returns.
    unsafe {
        match kind {
            0 => {
                told(explicit, r, Cause::Discard, || {
                    libc::madvise(start as *mut _, len, libc::MADV_DONTNEED)
                });
            }
            1 => {
                told(explicit, r, Cause::Discard, || {
                    libc::madvise(start as *mut _, len, libc::MADV_FREE)
                });
            }
            2 => {
                told(explicit, r, Cause::Unmap, || {
                    libc::munmap(start as *mut _, len)
                });
                // Never MAP_FIXED over a hole: something else may live there now.
                let fixed_noreplace = 0x100000; // MAP_FIXED_NOREPLACE
                let p = libc::mmap(
                    start as *mut _,
                    len,
                    rw,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed_noreplace,
                    -1,
                    0,
                );
                if p as usize != start {
                    if p != libc::MAP_FAILED {
                        libc::munmap(p, len);
                    }
                    return false;
                }
            }
            3 => {
                told(explicit, r, Cause::Unmap, || {
                    libc::mmap(start as *mut _, len, rw, anon, -1, 0)
                });
            }
            4 => {
                // Move fresh pages from the scratch area over the range (the range is
                // never left unmapped), then give the scratch area new pages. The
                // range's old pages go away: an unmap of the destination.
                let n = len.min(scratch.len);
                std::ptr::write_bytes(scratch.addr as *mut u8, 0, n);
                told(explicit, (start, n), Cause::Unmap, || {
                    libc::mremap(
                        scratch.addr as *mut _,
                        n,
                        n,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        start as *mut libc::c_void,
                    )
                });
                libc::mmap(scratch.addr as *mut _, n, rw, anon, -1, 0);
            }
            5 => {
                let down = Cause::Protect {
                    new_prot: libc::PROT_READ,
                };
                told(explicit, r, down, || {
                    libc::mprotect(start as *mut _, len, libc::PROT_READ)
                });
                std::thread::sleep(Duration::from_micros(200));
                told(explicit, r, Cause::Protect { new_prot: rw }, || {
                    libc::mprotect(start as *mut _, len, rw)
                });
            }
            _ => {
                // Not through `told`: the child must not return into the registry
                // (other threads held its locks at the fork).
                let inv = explicit.map(|reg| {
                    reg.invalidate_start(start as u64..(start + len) as u64, Cause::Fork)
                });
                let pid = libc::fork();
                if pid == 0 {
                    std::ptr::write_bytes(start as *mut u8, 0xee, len);
                    libc::_exit(0);
                }
                if let (Some(reg), Some(Ok(inv))) = (explicit, inv) {
                    reg.invalidate_end(inv);
                }
                if pid > 0 {
                    let mut st = 0;
                    libc::waitpid(pid, &mut st, 0);
                }
            }
        }
    }
    true
}

/// Read one byte of this process's memory without faulting: a mutator may have a
/// range unmapped for a moment (munmap then re-map). `None` when it is.
fn peek(addr: usize) -> Option<u8> {
    let mut b = 0u8;
    let local = libc::iovec {
        iov_base: (&mut b as *mut u8).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: reads one byte of our own address space into a local; the kernel checks
    // the remote address and fails with EFAULT instead of faulting us.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == 1).then_some(b)
}
