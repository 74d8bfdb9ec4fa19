//! Bring-up subcommands that open a device through VFIO: `info BDF`, `dma-test BDF`,
//! `ring-test BDF`. Each explains what is missing on a machine without VFIO instead of
//! failing on the first ioctl.

use crate::bench::measure::{Mem, Sample};
use clap::Args as ClapArgs;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userptr::driver::vfio::edu::{Edu, EDU_DMA_LIMIT};
use userptr::driver::vfio::nvme::{IoQueue, Nvme, NvmeCommand};
use userptr::driver::vfio::pci::{Bdf, HostSupport};
use userptr::driver::vfio::{IrqKind, VfioDomain, VfioPci};
use userptr::{Driver, Perm, Registry, RegistryConfig, WaitMode};

/// QEMU's edu and NVMe ids.
const EDU: (u16, u16) = (0x1234, 0x11e8);
const QEMU_NVME: (u16, u16) = (0x1b36, 0x0010);
/// NVMe class code (mass storage, NVM, NVMe).
const NVME_CLASS: u32 = 0x010802;

#[derive(ClapArgs)]
pub struct DeviceArgs {
    /// The PCI function (DDDD:BB:DD.F or BB:DD.F), bound to vfio-pci.
    #[arg(value_parser = crate::args::bdf)]
    pub bdf: Bdf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs)]
pub struct RingTestArgs {
    /// The NVMe function (DDDD:BB:DD.F or BB:DD.F), bound to vfio-pci.
    #[arg(value_parser = crate::args::bdf)]
    pub bdf: Bdf,
    /// Commands per measurement (10 to 10000000).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=10_000_000), allow_negative_numbers = true)]
    pub commands: u64,
    /// Commands in flight for the throughput run (queue depth, 1 to 255).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=255), allow_negative_numbers = true)]
    pub depth: u16,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Check the host, parse the address, open the function into a fresh domain.
pub fn open(bdf: &str) -> Result<(Arc<VfioPci>, Driver), String> {
    let b = crate::args::bdf(bdf)?;
    let host = HostSupport::read(&crate::sys_root());
    let problems = host.problems();
    if !problems.is_empty() {
        return Err(format!(
            "VFIO is not usable on this machine:\n  - {}\nhint: `tools/vfio-guest/run.sh -- userptr ...` runs the tool in a QEMU guest that has VFIO",
            problems.join("\n  - ")
        ));
    }
    let domain = VfioDomain::new().map_err(|e| crate::explain(&e))?;
    let pci = domain
        .open(&b.to_string())
        .map_err(|e| crate::explain(&e))?;
    let drv = Driver::for_domain(domain, &format!("vfio {b}"));
    Ok((pci, drv))
}

fn kind(pci: &VfioPci) -> Result<&'static str, String> {
    let ids = pci.ids().map_err(|e| crate::explain(&e))?;
    let class = pci
        .config_read32(8)
        .map(|c| c >> 8)
        .map_err(|e| crate::explain(&e))?;
    Ok(if ids == EDU {
        "edu"
    } else if ids == QEMU_NVME || class == NVME_CLASS {
        "nvme"
    } else {
        "other"
    })
}

fn cap_name(id: u8) -> &'static str {
    match id {
        0x01 => "power management",
        0x05 => "MSI",
        0x09 => "vendor specific",
        0x10 => "PCI Express",
        0x11 => "MSI-X",
        0x12 => "SATA",
        0x13 => "advanced features",
        _ => "other",
    }
}

/// `userptr info BDF`.
pub fn info(a: &DeviceArgs) -> Result<(), String> {
    let (pci, drv) = open(&a.bdf.to_string())?;
    let e = |e: userptr::Error| crate::explain(&e);
    let (vendor, device) = pci.ids().map_err(e)?;
    let bars = pci.bars();
    let caps = pci.capabilities().map_err(e)?;
    let irqs: Vec<(&str, u32)> = [IrqKind::Intx, IrqKind::Msi, IrqKind::Msix]
        .iter()
        .map(|k| (k.name(), pci.irq_count(*k)))
        .collect();
    let dom = drv.domain();
    let info = pci.domain().info().cloned();
    let sizes: Vec<String> = (12..40)
        .filter(|b| dom.page_sizes() & (1u64 << b) != 0)
        .map(|b| human(1u64 << b))
        .collect();
    let ranges = info
        .as_ref()
        .map(|i| i.iova_ranges.clone())
        .unwrap_or_default();
    let what = kind(&pci)?;
    if a.json {
        let v = json!({
            "bdf": pci.bdf(), "vendor": vendor, "device": device, "kind": what,
            "bars": bars.iter().map(|b| json!({"index": b.index, "size": b.size, "mmap": b.mmap})).collect::<Vec<_>>(),
            "capabilities": caps.iter().map(|(id, off)| json!({"id": id, "offset": off, "name": cap_name(*id)})).collect::<Vec<_>>(),
            "irqs": irqs.iter().map(|(k, n)| json!({"type": k, "count": n})).collect::<Vec<_>>(),
            "iommu": {
                "page_sizes": dom.page_sizes(),
                "iova_ranges": ranges.iter().map(|r| json!([r.start, r.end])).collect::<Vec<_>>(),
                "dma_entry_limit": dom.max_mappings(),
                "dma_avail": info.as_ref().and_then(|i| i.dma_avail),
            },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("{}  {vendor:04x}:{device:04x}  ({what})", pci.bdf());
    println!("BARs:");
    for b in &bars {
        println!(
            "  BAR{}  {:>10}  {}",
            b.index,
            human(b.size),
            if b.mmap { "mmap" } else { "read/write only" }
        );
    }
    println!("capabilities:");
    for (id, off) in &caps {
        println!("  {off:#04x}  {id:#04x}  {}", cap_name(*id));
    }
    println!("interrupts:");
    for (k, n) in &irqs {
        println!("  {k:<6} {n}");
    }
    println!("IOMMU (type1v2):");
    println!("  page sizes       {}", sizes.join(", "));
    for r in &ranges {
        println!("  IOVA range       {:#x}..{:#x}", r.start, r.end);
    }
    println!("  dma_entry_limit  {}", dom.max_mappings());
    if let Some(av) = info.and_then(|i| i.dma_avail) {
        println!("  dma_avail        {av}");
    }
    Ok(())
}

fn human(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b % (1 << 10) == 0 {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// `userptr dma-test BDF`: edu or NVMe.
pub fn dma_test(a: &DeviceArgs) -> Result<(), String> {
    let (pci, drv) = open(&a.bdf.to_string())?;
    let what = kind(&pci)?;
    let checks = match what {
        "edu" => edu_checks(pci, &drv)?,
        "nvme" => nvme_checks(pci, &drv)?,
        _ => {
            let (v, d) = pci.ids().map_err(|e| crate::explain(&e))?;
            return Err(format!(
                "{}: {v:04x}:{d:04x} is neither QEMU's edu nor an NVMe controller\nhint: dma-test knows edu (1234:11e8) and NVMe",
                pci.bdf()
            ));
        }
    };
    report(&a.bdf.to_string(), what, &checks, a.json)
}

fn report(bdf: &str, what: &str, checks: &[Check], as_json: bool) -> Result<(), String> {
    let failed = checks.iter().filter(|c| !c.ok).count();
    if as_json {
        let v = json!({
            "bdf": bdf, "kind": what, "passed": failed == 0,
            "checks": checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        for c in checks {
            println!(
                "{:<4} {:<28} {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} checks failed", checks.len()));
    }
    Ok(())
}

fn edu_checks(pci: Arc<VfioPci>, drv: &Driver) -> Result<Vec<Check>, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let edu = Edu::new(pci).map_err(e)?;
    let (maj, min) = edu.version();
    let mut out = vec![Check {
        name: "identify + liveness",
        ok: true,
        detail: format!("edu {maj}.{min}"),
    }];
    const N: usize = 1024;
    let src = Mem::new(4096)?;
    src.fill_with(|i| (i * 13 + 7) as u8);
    let dst = Mem::new(4096)?;
    dst.fill_with(|_| 0);
    // SAFETY: our own mappings (`Mem`), which outlive the mappings; `dst` is read only
    // after the DMA that writes it returned.
    let (ms, md) = unsafe {
        (
            drv.map_user(src.addr, 4096, Perm::READ).map_err(e)?,
            drv.map_user(dst.addr, 4096, Perm::READ_WRITE).map_err(e)?,
        )
    };
    for m in [&ms, &md] {
        if m.iova() + 4096 > EDU_DMA_LIMIT {
            return Err(format!(
                "IOVA {:#x} is above edu's 28-bit DMA limit\nhint: map less before testing edu",
                m.iova()
            ));
        }
    }
    let t1 = edu.dma(ms.iova(), 0, N as u32, false).map_err(e)?;
    let t2 = edu.dma(md.iova(), 0, N as u32, true).map_err(e)?;
    let same = dst.bytes()[..N] == src.bytes()[..N];
    out.push(Check {
        name: "DMA RAM -> edu -> RAM",
        ok: same,
        detail: format!(
            "{N} bytes each way via IOVA {:#x} / {:#x} ({:.0} + {:.0} ms)",
            ms.iova(),
            md.iova(),
            t1.as_secs_f64() * 1e3,
            t2.as_secs_f64() * 1e3
        ),
    });
    // IOMMU protection: a device write into a read-only mapping is blocked.
    let ro = Mem::new(4096)?;
    ro.fill_with(|_| 0xee);
    // SAFETY: our own mapping, which outlives the mapping; the device may only read it.
    let mr = unsafe { drv.map_user(ro.addr, 4096, Perm::READ) }.map_err(e)?;
    edu.dma(mr.iova(), 0, N as u32, true).map_err(e)?;
    let untouched = ro.bytes().iter().all(|&b| b == 0xee);
    out.push(Check {
        name: "IOMMU blocks write to RO map",
        ok: untouched,
        detail: format!(
            "device -> IOVA {:#x} (read-only): memory {}",
            mr.iova(),
            if untouched {
                "untouched (the guest logs a DMAR fault)"
            } else {
                "WRITTEN"
            }
        ),
    });
    drop((ms, md, mr));
    Ok(out)
}

fn nvme_checks(pci: Arc<VfioPci>, drv: &Driver) -> Result<Vec<Check>, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let nvme = Nvme::new(pci, drv).map_err(e)?;
    let i = nvme.info().clone();
    let ns = *nvme.namespace();
    let mut out = vec![Check {
        name: "identify",
        ok: true,
        detail: format!(
            "{} (serial {}, fw {}, NVMe {}.{}), ns {}: {} blocks of {} B, {} I/O queues",
            i.model,
            i.serial,
            i.firmware,
            i.version.0,
            i.version.1,
            ns.nsid,
            ns.blocks,
            ns.block_size(),
            i.io_queues
        ),
    }];
    let q = nvme.io_queue(1, 16).map_err(e)?;
    const LEN: usize = 16 << 10;
    let src = Mem::new(LEN)?;
    src.fill_with(|i| (i * 31 + 3) as u8);
    let dst = Mem::new(LEN)?;
    dst.fill_with(|_| 0);
    // SAFETY: our own mappings (`Mem`), which outlive the mappings; `dst` is read only
    // after the command that writes it completed.
    let (ms, md) = unsafe {
        (
            drv.map_user(src.addr, LEN, Perm::READ).map_err(e)?,
            drv.map_user(dst.addr, LEN, Perm::READ_WRITE).map_err(e)?,
        )
    };
    let t = Duration::from_secs(10);
    q.run(NvmeCommand::write(&ns, 0, ms.iova(), LEN as u32), t)
        .map_err(e)?;
    q.run(NvmeCommand::read(&ns, 0, md.iova(), LEN as u32), t)
        .map_err(e)?;
    out.push(Check {
        name: "DMA RAM -> disk -> RAM",
        ok: dst.bytes() == src.bytes(),
        detail: format!(
            "{LEN} bytes WRITE then READ through IOVAs {:#x} / {:#x}",
            ms.iova(),
            md.iova()
        ),
    });
    // The blocked DMA is known from the IOMMU's fault record, which the kernel logs
    // from the fault interrupt: wait a little for it on the commands that should fault.
    q.set_fault_check(Some(Duration::from_millis(500)));
    let bogus = 0x40_0000_0000u64;
    let b = q
        .submit_batch(&[NvmeCommand::read(&ns, 0, bogus, 4096)])
        .map_err(e)?;
    let c = q.wait_completions(b, WaitMode::Block, t).map_err(e)?;
    out.push(Check {
        name: "IOMMU fault on unmapped IOVA",
        ok: !c[0].ok(),
        detail: format!("READ into {bogus:#x}: {}", outcome(c[0])),
    });
    // The IOMMU records one pending fault per requester: a second fault before the
    // kernel has cleared the first is dropped ("compressed"). Let the first clear.
    std::thread::sleep(Duration::from_millis(200));
    let ro = Mem::new(4096)?;
    ro.fill_with(|_| 0xee);
    // SAFETY: our own mapping, which outlives the mapping; the device may only read it.
    let mr = unsafe { drv.map_user(ro.addr, 4096, Perm::READ) }.map_err(e)?;
    let b = q
        .submit_batch(&[NvmeCommand::read(&ns, 0, mr.iova(), 4096)])
        .map_err(e)?;
    let c = q.wait_completions(b, WaitMode::Block, t).map_err(e)?;
    let untouched = ro.bytes().iter().all(|&b| b == 0xee);
    out.push(Check {
        name: "IOMMU blocks write to RO map",
        // The memory is the proof; the fault record is reported when the IOMMU and
        // the kernel's rate limit let it through.
        ok: untouched,
        detail: format!(
            "READ into read-only IOVA {:#x}: {}; memory {}",
            mr.iova(),
            outcome(c[0]),
            if untouched { "untouched" } else { "WRITTEN" }
        ),
    });
    drop((ms, md, mr, q));
    Ok(out)
}

fn outcome(c: userptr::driver::vfio::nvme::NvmeCompletion) -> String {
    match c.into_result() {
        Ok(_) => "completed without error and no IOMMU fault record was seen (the kernel \
                  prints at most 10 fault lines per 5 s; /dev/kmsg must be readable)"
            .into(),
        Err(e) => e.to_string(),
    }
}

/// 4 KiB READ latencies (µs) at queue depth 1, through the registry's pin cache
/// (`cached`) or with a fresh VFIO map + unmap around every command (`repinned`).
pub fn qd1_latency(q: &IoQueue, drv: &Driver, n: usize, cached: bool) -> Result<Sample, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let ns = *q.nvme().namespace();
    let buf = Mem::new(4096)?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    // SAFETY: our own mapping (`Mem`), which outlives the registry; its bytes are not
    // read at all.
    let u = unsafe { reg.register(buf.addr, 4096, Perm::READ_WRITE) }.map_err(e)?;
    let t = Duration::from_secs(10);
    let blocks = ns.blocks.max(8);
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let lba = (i as u64 * 8) % (blocks - 7);
        let t0 = Instant::now();
        if cached {
            let b = reg
                .submit(q, &[&u], |io| {
                    vec![NvmeCommand::read(&ns, lba, io[0], 4096)]
                })
                .map_err(e)?;
            q.wait(b, WaitMode::Poll, t).map_err(e)?[0]
                .into_result()
                .map_err(e)?;
        } else {
            // SAFETY: our own mapping (`Mem`), unmapped after the command completed.
            let m = unsafe { drv.map_user(buf.addr, 4096, Perm::READ_WRITE) }.map_err(e)?;
            q.run(NvmeCommand::read(&ns, lba, m.iova(), 4096), t)
                .map_err(e)?;
            m.unmap().map_err(e)?;
        }
        v.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Sample { values: v })
}

/// 4 KiB READ throughput (IO/s) with `depth` commands in flight, through the
/// registry's pin cache (`cached`) or with a fresh VFIO map before and unmap after
/// every command.
pub fn iops(q: &IoQueue, drv: &Driver, n: usize, depth: u16, cached: bool) -> Result<f64, String> {
    let e = |e: userptr::Error| crate::explain(&e);
    let ns = *q.nvme().namespace();
    let depth = depth.max(1) as usize;
    let bufs: Vec<Mem> = (0..depth)
        .map(|_| Mem::new(4096))
        .collect::<Result<_, _>>()?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let us: Vec<userptr::Userptr> = bufs
        .iter()
        // SAFETY: our own mappings (`Mem`), which outlive the registry; their bytes
        // are not read at all.
        .map(|b| unsafe { reg.register(b.addr, 4096, Perm::READ_WRITE) })
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let t = Duration::from_secs(10);
    let blocks = ns.blocks.max(8);
    // (batch, the mapping made for it when not cached)
    let mut inflight = std::collections::VecDeque::new();
    let finish = |(b, m): (_, Option<userptr::UserMapping>)| -> Result<(), String> {
        for c in q.wait(b, WaitMode::Poll, t).map_err(e)? {
            c.into_result().map_err(e)?;
        }
        if let Some(m) = m {
            m.unmap().map_err(e)?;
        }
        Ok(())
    };
    let t0 = Instant::now();
    for i in 0..n {
        if inflight.len() == depth {
            finish(inflight.pop_front().expect("non-empty"))?;
        }
        let lba = (i as u64 * 8) % (blocks - 7);
        if cached {
            let u = &us[i % depth];
            let b = reg
                .submit(q, &[u], |io| vec![NvmeCommand::read(&ns, lba, io[0], 4096)])
                .map_err(e)?;
            inflight.push_back((b, None));
        } else {
            // SAFETY: our own mapping (`Mem`), unmapped after its command completed.
            let m =
                unsafe { drv.map_user(bufs[i % depth].addr, 4096, Perm::READ_WRITE) }.map_err(e)?;
            let b = loop {
                match q.submit_batch(&[NvmeCommand::read(&ns, lba, m.iova(), 4096)]) {
                    Err(userptr::Error::RingFull { .. }) => {
                        userptr::driver::Submitter::wait_for_room(q, 1).map_err(e)?
                    }
                    r => break r.map_err(e)?,
                }
            };
            inflight.push_back((b, Some(m)));
        }
    }
    for x in inflight {
        finish(x)?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// `userptr ring-test BDF`.
pub fn ring_test(a: &RingTestArgs) -> Result<(), String> {
    let (pci, drv) = open(&a.bdf.to_string())?;
    if kind(&pci)? != "nvme" {
        return Err(format!(
            "{}: ring-test drives NVMe controllers only\nhint: `userptr dma-test {}` checks other devices",
            a.bdf, a.bdf
        ));
    }
    let e = |e: userptr::Error| crate::explain(&e);
    let nvme = Nvme::new(pci, &drv).map_err(e)?;
    let depth = a.depth;
    let q = nvme.io_queue(1, depth + 1).map_err(e)?;
    let n = a.commands as usize;
    let cached = qd1_latency(&q, &drv, n, true)?;
    let repinned = qd1_latency(&q, &drv, n, false)?;
    let rate = iops(&q, &drv, n, depth, true)?;
    let rate_repinned = iops(&q, &drv, n, depth, false)?;
    let stats = |s: &Sample| {
        let mut v = s.values.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (v.iter().sum::<f64>() / v.len() as f64, p(0.5), p(0.99))
    };
    let (cm, c50, c99) = stats(&cached);
    let (rm, r50, r99) = stats(&repinned);
    if a.json {
        let v = json!({
            "bdf": a.bdf.to_string(), "model": nvme.info().model, "commands": n, "depth": depth,
            "interrupts": nvme.has_interrupts(),
            "read4k_qd1_cached_us": {"mean": cm, "p50": c50, "p99": c99},
            "read4k_qd1_repinned_us": {"mean": rm, "p50": r50, "p99": r99},
            "read4k_iops_cached": rate,
            "read4k_iops_repinned": rate_repinned,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "{} {}: queue 1, {n} commands per run",
            a.bdf,
            nvme.info().model
        );
        println!(
            "4 KiB READ, QD1, cached pins:        mean {cm:8.1} µs  p50 {c50:8.1}  p99 {c99:8.1}"
        );
        println!(
            "4 KiB READ, QD1, re-pinned each time: mean {rm:8.1} µs  p50 {r50:8.1}  p99 {r99:8.1}"
        );
        println!("4 KiB READ, QD{depth}, cached pins:       {rate:10.0} IO/s");
        println!("4 KiB READ, QD{depth}, re-pinned each time: {rate_repinned:8.0} IO/s");
    }
    Ok(())
}
