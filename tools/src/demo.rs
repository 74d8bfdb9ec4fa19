//! `userptr demo`: ordinary memory (`Vec<f32>`, `Vec<u8>`) registered with the
//! registry, SAXPY and CRC32C through a command ring on the reference device, and one
//! SAXPY through a shared-virtual-memory GPU VM on plain pointers (no registration),
//! every result checked against the CPU. The last line is
//! `demo: verified N commands, M MiB`.

use std::time::Instant;
use userptr::{Descriptor, Driver, Registry, RegistryConfig, Status, WaitMode};

#[derive(clap::Args)]
pub struct Args {
    /// f32 elements per vector (1024 to 134217728). Default: 4 Mi, or what the
    /// locked-memory budget allows (the demo says when it sized itself down).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1024..=MAX_ELEMENTS), allow_negative_numbers = true)]
    elements: Option<u64>,
    /// SAXPY commands, each over a slice of the vectors (1 to 4096, at most one per
    /// 256 elements).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096), allow_negative_numbers = true)]
    saxpy: u64,
    /// Print every registry counter at the end.
    #[arg(long)]
    stats: bool,
}

/// The default size: 4 Mi elements, 16 MiB per vector.
const DEFAULT_ELEMENTS: u64 = 4 << 20;
/// The largest: 512 MiB per vector (the reference IOMMU maps at most 1 GiB at once).
const MAX_ELEMENTS: u64 = 1 << 27;
/// The CRC32C buffer at most.
const DATA: u64 = 8 << 20;

/// What the demo will pin and allocate, decided before any work.
struct Plan {
    elements: usize,
    data: usize,
    /// Why it is smaller than the default, when it is.
    sized_down: Option<String>,
}

fn plan(a: &Args) -> Result<Plan, String> {
    let budget = crate::budget::Budget::now();
    let need = |n: u64, d: u64| 8 * n + d;
    let plan = match (a.elements, budget.usable()) {
        (Some(n), _) => {
            // Asked for explicitly: it fits, or the demo says why not.
            let data = DATA.min(4 * n);
            if !budget.fits(need(n, data)) {
                return Err(format!(
                    "--elements {n} {}\nhint: a smaller --elements, or omit it and the demo sizes itself to the budget",
                    budget.refusal(need(n, data))
                ));
            }
            Plan {
                elements: n as usize,
                data: data as usize,
                sized_down: None,
            }
        }
        (None, None) => Plan {
            elements: DEFAULT_ELEMENTS as usize,
            data: DATA as usize,
            sized_down: None,
        },
        (None, Some(usable)) => {
            let data = DATA.min(usable / 4) & !4095;
            let n = DEFAULT_ELEMENTS.min(usable.saturating_sub(data) / 8) & !1023;
            if n < 1024 || data < 4096 {
                return Err(format!("the demo {}", budget.refusal(need(1024, 4096))));
            }
            let sized_down = (n < DEFAULT_ELEMENTS || data < DATA).then(|| {
                format!(
                    "sized to the locked-memory budget: {n} elements per vector and a {} CRC32C buffer ({} pinned at most; {})",
                    crate::budget::human_bytes(data),
                    crate::budget::human_bytes(need(n, data)),
                    match budget {
                        crate::budget::Budget::Limited { limit, .. } => format!(
                            "RLIMIT_MEMLOCK {}, no CAP_IPC_LOCK; raise `ulimit -l` for the full size",
                            crate::budget::human_bytes(limit)
                        ),
                        crate::budget::Budget::Unlimited => String::new(),
                    }
                )
            });
            Plan {
                elements: n as usize,
                data: data as usize,
                sized_down,
            }
        }
    };
    if a.saxpy as usize > plan.elements / 256 {
        return Err(format!(
            "--saxpy {} splits {} elements into slices under 256 elements\nhint: at most {} commands for this size",
            a.saxpy,
            plan.elements,
            plan.elements / 256
        ));
    }
    // The vectors (x, y and the CPU's copy) and the byte buffer must fit in memory.
    let ram = rustix::system::sysinfo().totalram as u64;
    let bytes = 12 * plan.elements as u64 + plan.data as u64;
    if bytes > ram / 2 {
        return Err(format!(
            "the demo would allocate {} of this machine's {}\nhint: a smaller --elements",
            crate::budget::human_bytes(bytes),
            crate::budget::human_bytes(ram)
        ));
    }
    Ok(plan)
}

pub fn run(a: Args) -> Result<(), String> {
    // Every argument is checked, and the size decided, before anything is opened.
    let p = plan(&a)?;
    if let Some(why) = &p.sized_down {
        println!("demo: {why}");
    }
    let (n, bytes) = demo(&a, &p)?;
    println!(
        "demo: verified {n} commands, {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn demo(a: &Args, p: &Plan) -> Result<(u64, u64), String> {
    let n = p.elements;
    let pins_before = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let t0 = Instant::now();
    let drv = Driver::reference().map_err(|e| crate::explain(&e))?;
    let q = drv.queue(0, 64).map_err(|e| crate::explain(&e))?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    println!("device: {} (opened in {:.2?})", drv.name(), t0.elapsed());

    let x: Vec<f32> = (0..n).map(|i| (i % 1013) as f32 * 0.5).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut expect = y.clone();
    let t = Instant::now();
    let ux = reg.register_slice_ref(&x).map_err(|e| crate::explain(&e))?;
    let uy = reg.register_slice(&mut y).map_err(|e| crate::explain(&e))?;
    println!(
        "registered 2 x {:.1} MiB of Vec<f32> in {:.2?}",
        (n * 4) as f64 / (1 << 20) as f64,
        t.elapsed()
    );

    let mut commands = 0u64;
    let mut bytes = 0u64;
    let chunk = n.div_ceil(a.saxpy as usize);
    let t = Instant::now();
    let mut fences = Vec::new();
    for (k, start) in (0..n).step_by(chunk).enumerate() {
        let len = chunk.min(n - start) as u64;
        let alpha = 1.0 + k as f32 * 0.25;
        let off = start as u64 * 4;
        let f = reg
            .submit(&q, &[&ux, &uy], |i| {
                vec![Descriptor::saxpy(alpha, i[0] + off, i[1] + off, len)]
            })
            .map_err(|e| crate::explain(&e))?;
        fences.push(f.end);
        for j in start..start + len as usize {
            expect[j] += alpha * x[j];
        }
        bytes += len * 12;
    }
    for f in fences {
        let c = q
            .wait(f, WaitMode::Block, std::time::Duration::from_secs(60))
            .map_err(|e| crate::explain(&e))?;
        if c.status != Status::Ok {
            return Err(format!("SAXPY command {} failed: {:?}", c.seqno, c.status));
        }
        commands += 1;
    }
    // Every command on `y` waited for: hand it back (it is borrowed until then).
    reg.unregister(uy).map_err(|e| crate::explain(&e))?;
    let dt = t.elapsed();
    if y != expect {
        let bad = y.iter().zip(&expect).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "SAXPY mismatch at element {bad}: device {} vs CPU {}",
            y[bad], expect[bad]
        ));
    }
    println!(
        "saxpy: {commands} commands over {n} elements in {dt:.2?} ({:.0} MiB/s), matches the CPU bit for bit",
        bytes as f64 / (1 << 20) as f64 / dt.as_secs_f64()
    );

    let data: Vec<u8> = (0..p.data)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let ud = reg
        .register_slice_ref(&data)
        .map_err(|e| crate::explain(&e))?;
    let t = Instant::now();
    let dl = data.len() as u64;
    for (k, len) in [4096u64, dl / 8, dl * 3 / 8, dl - 5]
        .into_iter()
        .enumerate()
    {
        let off = k as u64 * 3;
        let len = len.clamp(1, dl - off);
        let f = reg
            .submit(&q, &[&ud], |i| vec![Descriptor::crc32c(i[0] + off, len, 0)])
            .map_err(|e| crate::explain(&e))?;
        let c = q
            .wait(f.end, WaitMode::Block, std::time::Duration::from_secs(60))
            .map_err(|e| crate::explain(&e))?;
        let cpu = crc32c::crc32c(&data[off as usize..(off + len) as usize]);
        if c.status != Status::Ok || c.result as u32 != cpu {
            return Err(format!(
                "CRC32C over {len} bytes: device {:#010x} ({:?}) vs CPU {cpu:#010x}",
                c.result, c.status
            ));
        }
        commands += 1;
        bytes += len;
    }
    println!("crc32c: 4 commands in {:.2?}, match the CPU", t.elapsed());

    let (svm_cmds, svm_bytes) = svm_saxpy(&drv, &reg, n.min(1 << 18))?;
    commands += svm_cmds;
    bytes += svm_bytes;

    let s = reg.stats();
    println!(
        "registry: {} registrations, {} hits, {} misses, {} pins, {} invalidations",
        s.registrations,
        s.hits,
        s.misses,
        s.pins,
        s.invalidations.iter().sum::<u64>()
    );
    if a.stats {
        print!("{s}");
    }
    // Release the pins before the next buffer when the budget is tight: the registry
    // keeps idle regions cached.
    reg.clear().map_err(|e| crate::explain(&e))?;
    drop((reg, q, drv));
    let pins_after = userptr::proc_status::pinned_bytes().unwrap_or(0);
    if pins_after != pins_before {
        return Err(format!(
            "pinned memory not released: VmPin {pins_before} -> {pins_after} bytes"
        ));
    }
    println!("pins released: VmPin back to {} kB", pins_after / 1024);
    Ok((commands, bytes))
}

/// One SAXPY through a shared-virtual-memory GPU VM: the descriptor carries the two
/// `Vec`s' own pointers; the device faults on them and the driver pins and binds the
/// faulting chunks through the registry.
fn svm_saxpy(drv: &Driver, reg: &Registry, n: usize) -> Result<(u64, u64), String> {
    use userptr::driver::gpuvm::{Gpu, VmConfig};
    let e = |e: userptr::Error| crate::explain(&e);
    let gpu = Gpu::open(reg).map_err(e)?;
    let vm = gpu.create_vm(VmConfig::svm()).map_err(e)?;
    let q = drv.queue(1, 16).map_err(e)?;
    vm.attach(&q).map_err(e)?;
    let x: Vec<f32> = (0..n).map(|i| (i % 389) as f32 * 0.75).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 11) as f32 - 5.0).collect();
    let mut expect = y.clone();
    for (y, x) in expect.iter_mut().zip(&x) {
        *y += 3.0 * *x;
    }
    let t = Instant::now();
    let d = Descriptor::saxpy(3.0, x.as_ptr() as u64, y.as_mut_ptr() as u64, n as u64);
    // SAFETY: `x` and `y` are this function's own vectors; neither is touched until the
    // command is waited for below.
    let f = unsafe { vm.submit(&q, &[d]) }.map_err(e)?;
    let c = q
        .wait(f.end, WaitMode::Block, std::time::Duration::from_secs(60))
        .map_err(e)?;
    if c.status != Status::Ok {
        return Err(format!("SVM SAXPY failed: {:?} {:?}", c.status, c.fault));
    }
    if y.iter()
        .zip(&expect)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err("SVM SAXPY differs from the CPU".into());
    }
    let s = vm.stats();
    println!(
        "svm: 1 SAXPY on plain Vec<f32> pointers (no registration) through GPU VM {} in {:.2?}: {} faults replayed, matches the CPU bit for bit",
        vm.id(),
        t.elapsed(),
        s.faults_replayed
    );
    Ok((1, n as u64 * 12))
}
