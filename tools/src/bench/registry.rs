//! cache and invalidate: the registry's costs, on the reference device or (with
//! `--device`) an NVMe function through VFIO, where a command that moves no data is
//! an NVMe Flush instead of a NOP and the busy invalidation waits for a READ.

use super::measure::{interleaved, repeat, time_us, Mem, Sample};
use super::target::{nvme_flush, nvme_wait, Target};
use super::{Ctx, Measurement};
use std::time::{Duration, Instant};
use userptr::driver::registry::interval::IntervalMap;
use userptr::driver::vfio::nvme::NvmeCommand;
use userptr::{Cause, Descriptor, Perm, Registry, RegistryConfig, Userptr, WaitMode};

const T: Duration = Duration::from_secs(30);

pub fn cache(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    // 64 registered buffers of 64 KiB.
    let need = 64 * (64 << 10);
    if ctx.fits("cache", "hit_per_ref", need) {
        return cache_pinned(ctx, target);
    }
    for n in [
        "submit_1_refs",
        "submit_64_refs",
        "submit_8_refs",
        "hit_lookup",
        "lookup_100k",
    ] {
        ctx.skip("cache", n, ctx.budget.refusal(need));
    }
    Ok(vec![index_lookup(ctx)])
}

fn cache_pinned(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    let drv = target.driver()?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let nvq = target.nvme_queue()?;
    let q = match nvq {
        Some(_) => None,
        None => Some(drv.queue(0, 256).map_err(|e| crate::explain(&e))?),
    };
    let mem = Mem::new(128 * (64 << 10))?;
    let us = (0..64)
        .map(|i| {
            // SAFETY: the bench's own mapping (`Mem`), which outlives the registry; it
            // is changed only through the registry's invalidation or the monitor.
            unsafe { reg.register(mem.addr + 2 * i * (64 << 10), 64 << 10, Perm::READ_WRITE) }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::explain(&e))?;
    let mut out = Vec::new();
    // Submissions of one command that moves no data (a NOP; an NVMe Flush) referencing
    // n cached buffers: 32 per wait (8 on NVMe, whose queue holds 16).
    let (reg_r, q_r, nvq_r, us_r) = (&reg, &q, &nvq, &us);
    let per_submit = |n: usize| {
        let refs: Vec<&Userptr> = us_r.iter().take(n).collect();
        let reg = reg_r;
        move || match (q_r, nvq_r) {
            (Some(q), _) => {
                let t = Instant::now();
                let mut last = None;
                for _ in 0..32 {
                    last = Some(
                        reg.submit(q, &refs, |_| vec![Descriptor::nop()])
                            .expect("submit"),
                    );
                }
                let el = t.elapsed();
                q.wait(last.expect("one submitted").end, WaitMode::Poll, T)
                    .expect("wait");
                el.as_secs_f64() * 1e6 / 32.0
            }
            (None, Some(q)) => {
                let t = Instant::now();
                let batches: Vec<_> = (0..8)
                    .map(|_| {
                        reg.submit(q, &refs, |_| vec![nvme_flush(q)])
                            .expect("submit")
                    })
                    .collect();
                let el = t.elapsed();
                for b in batches {
                    nvme_wait(q, b).expect("wait");
                }
                el.as_secs_f64() * 1e6 / 8.0
            }
            (None, None) => unreachable!("one queue or the other"),
        }
    };
    let (s64, s1) = interleaved(ctx.samples, 3, per_submit(64), per_submit(1));
    let per_ref = Sample {
        values: s64
            .values
            .iter()
            .zip(&s1.values)
            .map(|(a, b)| (a - b).max(0.0) * 1000.0 / 63.0)
            .collect(),
    };
    out.push(Measurement::new("cache", "hit_per_ref", "ns", per_ref));
    for (n, s) in [(1, s1), (64, s64)] {
        out.push(Measurement::new(
            "cache",
            format!("submit_{n}_refs"),
            "us",
            s,
        ));
    }
    let s8 = repeat(ctx.samples, 3, per_submit(8));
    out.push(Measurement::new("cache", "submit_8_refs", "us", s8));
    let lookups = repeat(ctx.samples, 3, || {
        let t = Instant::now();
        for u in us.iter().cycle().take(10_000) {
            std::hint::black_box(reg.iova(u).expect("hit"));
        }
        t.elapsed().as_secs_f64() * 1e9 / 10_000.0
    });
    out.push(Measurement::new("cache", "hit_lookup", "ns", lookups));

    drop(us);
    // 14 286 one-page regions (see lookup_100k), next to the 64 buffers above, which
    // stay cached.
    if ctx.fits(
        "cache",
        "lookup_100k",
        100_000u64.div_ceil(7) * 4096 + (4 << 20),
    ) {
        out.push(lookup_100k(ctx, &reg)?);
    }
    out.push(index_lookup(ctx));
    Ok(out)
}

fn index_lookup(ctx: &Ctx) -> Measurement {
    // The index alone with 100 000 regions (more than either IOMMU maps at once: the
    // reference one holds 16384 mappings, VFIO 65535 by default).
    let mut index = IntervalMap::new();
    for i in 0..100_000u64 {
        let _ = index.insert(i * 8192..i * 8192 + 4096, i);
    }
    let mut k = 0u64;
    let l100k = repeat(ctx.samples, 3, || {
        let t = Instant::now();
        for _ in 0..10_000 {
            k = (k + 7919) % 100_000;
            std::hint::black_box(index.covering(k * 8192 + 100..k * 8192 + 200));
        }
        t.elapsed().as_secs_f64() * 1e9 / 10_000.0
    });
    Measurement::new("cache", "index_lookup_100k", "ns", l100k)
}

/// `lookup_100k`: resolving one of 100 000 registered objects (512 bytes each) to its
/// device address through the registry, objects picked at random. Seven objects share
/// a page and a gap page separates two such pages, so they make 14 286 one-page
/// regions: as many as fit the reference IOMMU's 16384 mappings with the registry's
/// reserve, and only 56 MiB pinned (small enough for any pin budget). Each page is
/// registered whole first (one pin), then its seven objects (cache hits).
fn lookup_100k(ctx: &Ctx, reg: &Registry) -> Result<Measurement, String> {
    const OBJECTS: usize = 100_000;
    const RUN: usize = 7;
    const OBJ: usize = 512;
    let runs = OBJECTS.div_ceil(RUN);
    let mem = Mem::new(runs * 2 * 4096)?;
    let mut objects = Vec::with_capacity(OBJECTS);
    for r in 0..runs {
        let base = mem.addr + r * 2 * 4096;
        // The run's region; the handle itself is not needed afterwards.
        // SAFETY: the bench's own mapping (`Mem`), which outlives the registry and is
        // never accessed by a command.
        unsafe { reg.register(base, 4096, Perm::READ_WRITE) }.map_err(|e| crate::explain(&e))?;
        for p in 0..RUN {
            if objects.len() < OBJECTS {
                objects.push(
                    // SAFETY: as above.
                    unsafe { reg.register(base + p * OBJ, OBJ, Perm::READ_WRITE) }
                        .map_err(|e| crate::explain(&e))?,
                );
            }
        }
    }
    if reg.mappings() < runs {
        return Err(format!(
            "lookup_100k: {} regions for {runs} runs: the registry evicted some",
            reg.mappings()
        ));
    }
    let mut k = 0usize;
    let mut err = None;
    let s = repeat(ctx.samples, 3, || {
        let t = Instant::now();
        for _ in 0..10_000 {
            k = (k + 7919) % OBJECTS;
            match reg.iova(&objects[k]) {
                Ok(iova) => {
                    std::hint::black_box(iova);
                }
                Err(e) => err = Some(crate::explain(&e)),
            }
        }
        t.elapsed().as_secs_f64() * 1e9 / 10_000.0
    });
    if let Some(e) = err {
        return Err(e);
    }
    drop(objects);
    reg.clear().map_err(|e| crate::explain(&e))?;
    Ok(Measurement::new("cache", "lookup_100k", "ns", s))
}

pub fn invalidate(ctx: &Ctx, target: &Target) -> Result<Vec<Measurement>, String> {
    // The registry's 2 MiB and the raw baseline's 2 MiB.
    if !ctx.fits("invalidate", "idle_2MiB_discard", 4 << 20) {
        for n in [
            "busy_2MiB_discard",
            "idle_2MiB_unmap",
            "idle_2MiB_protect_downgrade",
        ] {
            ctx.skip("invalidate", n, ctx.budget.refusal(4 << 20));
        }
        return Ok(Vec::new());
    }
    let drv = target.driver()?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let nvq = target.nvme_queue()?;
    let q = match nvq {
        Some(_) => None,
        None => Some(drv.queue(0, 64).map_err(|e| crate::explain(&e))?),
    };
    let raw = target.raw()?;
    let len = 2usize << 20;
    let mem = Mem::new(len)?;
    let range = mem.addr as u64..(mem.addr + len) as u64;
    let madvise = |m: &Mem| {
        // SAFETY: discarding our own buffer's pages.
        unsafe { libc::madvise(m.addr as *mut _, m.len, libc::MADV_DONTNEED) };
    };
    let mut out = Vec::new();
    let mut err = None;
    let (ours, base) = interleaved(
        ctx.samples,
        2,
        || {
            // SAFETY: the bench's own mapping (`Mem`), which outlives the registry; it
            // is changed only through the registry's invalidation or the monitor.
            if let Err(e) = unsafe { reg.register(mem.addr, len, Perm::READ_WRITE) } {
                err = Some(crate::explain(&e));
            }
            time_us(|| {
                let inv = reg
                    .invalidate_start(range.clone(), Cause::Discard)
                    .expect("invalidate");
                madvise(&mem);
                reg.invalidate_end(inv);
            })
        },
        || {
            let _ = raw.pin(mem.addr, len);
            time_us(|| {
                madvise(&mem);
                let _ = raw.unpin();
            })
        },
    );
    if let Some(e) = err {
        return Err(e);
    }
    out.push(
        Measurement::new("invalidate", "idle_2MiB_discard", "us", ours).with_baseline(
            match target {
                Target::Reference => "raw_madvise_unpin_2MiB",
                Target::Vfio { .. } => "raw_madvise_vfio_unmap_dma_2MiB",
            },
            base,
        ),
    );
    let busy = repeat(ctx.samples, 1, || {
        // SAFETY: the bench's own mapping (`Mem`), which outlives the registry; it is
        // changed only through the registry's invalidation, which waits for the
        // device work on it.
        let u = unsafe { reg.register(mem.addr, len, Perm::READ_WRITE) }.expect("register");
        // Device work on the range in flight: a FILL of all of it, or an NVMe READ
        // into it (as large as the controller takes).
        let inflight = match (&q, &nvq) {
            (Some(q), _) => InFlight::Ring(
                reg.submit(q, &[&u], |i| vec![Descriptor::fill(i[0], len as u64, 7)])
                    .expect("submit"),
            ),
            (None, Some(q)) => {
                let n = (len as u32).min(q.nvme().info().max_transfer.unwrap_or(128 << 10));
                let ns = *q.nvme().namespace();
                InFlight::Nvme(
                    reg.submit(q, &[&u], |i| vec![NvmeCommand::read(&ns, 0, i[0], n)])
                        .expect("submit"),
                )
            }
            (None, None) => unreachable!("one queue or the other"),
        };
        let t = time_us(|| {
            let inv = reg
                .invalidate_start(range.clone(), Cause::Discard)
                .expect("invalidate");
            madvise(&mem);
            reg.invalidate_end(inv);
        });
        match (inflight, &q, &nvq) {
            (InFlight::Ring(f), Some(q), _) => {
                let _ = q.wait(f.end, WaitMode::Block, T);
            }
            (InFlight::Nvme(b), _, Some(q)) => {
                let _ = nvme_wait(q, b);
            }
            _ => {}
        }
        t
    });
    out.push(Measurement::new(
        "invalidate",
        "busy_2MiB_discard",
        "us",
        busy,
    ));
    // munmap of an idle, mapped 2 MiB userptr inside its invalidation window, next to
    // munmap + the raw unpin; the memory is mapped back between samples.
    let (mut err, mut raw_err) = (None, None);
    let (ours, base) = interleaved(
        ctx.samples,
        2,
        || {
            // SAFETY: the bench's own mapping (`Mem`), which outlives the registry; it
            // is changed only through the registry's invalidation or the monitor.
            if let Err(e) = unsafe { reg.register(mem.addr, len, Perm::READ_WRITE) } {
                err = Some(crate::explain(&e));
            }
            let inv = std::cell::Cell::new(None);
            mem.unmap_timed(
                || {
                    inv.set(Some(
                        reg.invalidate_start(range.clone(), Cause::Unmap)
                            .expect("invalidate"),
                    ))
                },
                || reg.invalidate_end(inv.take().expect("started")),
            )
            .unwrap_or_else(|e| {
                err = Some(e);
                0.0
            })
        },
        || {
            let _ = raw.pin(mem.addr, len);
            mem.unmap_timed(
                || {},
                || {
                    let _ = raw.unpin();
                },
            )
            .unwrap_or_else(|e| {
                raw_err = Some(e);
                0.0
            })
        },
    );
    if let Some(e) = err.or(raw_err) {
        return Err(e);
    }
    out.push(
        Measurement::new("invalidate", "idle_2MiB_unmap", "us", ours).with_baseline(
            match target {
                Target::Reference => "raw_munmap_unpin_2MiB",
                Target::Vfio { .. } => "raw_munmap_vfio_unmap_dma_2MiB",
            },
            base,
        ),
    );
    // A write-permission downgrade (mprotect PROT_READ): the device mapping stays,
    // made read-only.
    let cause = Cause::Protect {
        new_prot: libc::PROT_READ,
    };
    let s = repeat(ctx.samples, 2, || {
        reg.invalidate(range.clone(), Cause::Discard)
            .expect("reset");
        // SAFETY: the bench's own mapping (`Mem`), which outlives the registry; no
        // command runs on it.
        unsafe { reg.register(mem.addr, len, Perm::READ_WRITE) }.expect("register");
        time_us(|| reg.invalidate(range.clone(), cause).expect("invalidate"))
    });
    out.push(Measurement::new(
        "invalidate",
        "idle_2MiB_protect_downgrade",
        "us",
        s,
    ));
    reg.clear().map_err(|e| crate::explain(&e))?;
    // The kernel's own notifier on the same 2 MiB discard, for comparison.
    out.extend(super::kvm_notifier::kernel_notifier(ctx)?);
    Ok(out)
}

/// The device work a busy invalidation waits for.
enum InFlight {
    Ring(userptr::BatchFences),
    Nvme(userptr::driver::vfio::nvme::NvmeBatch),
}
