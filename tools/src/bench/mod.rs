//! `userptr bench`: the measurement harness.
//!
//! Every measurement takes a warm-up, then `samples` timed repetitions, and reports the
//! median, p10 and p90. Where a raw kernel operation is the physical limit (an io_uring
//! pin, a `memcpy`, a raw `madvise`), it is measured in the same run, *interleaved*
//! sample by sample with ours, and the result carries `baseline`, `ratio` (ours /
//! baseline) and `added_us` (ours − baseline). These machines are noisy: compare
//! ratios, not absolute times.
//!
//! `--device BDF` runs the suites that have a VFIO form (pin, ring, cache, invalidate,
//! plus the vfio suite's NVMe figures) on that NVMe function instead of the reference
//! device, under the same names (`device` in the JSON says which); see [`target`].
//!
//! `--json FILE` writes (stable names, see the project's bench contract):
//! ```text
//! { "machine": { "kernel", "cpus", "cpu_model" }, "device",
//!   "results": [ { "suite", "name", "unit", "median", "p10", "p90", "samples",
//!                  "baseline": { "name", "median" }?, "ratio"?, "added_us"? } ] }
//! ```

mod e2e;
mod gpuvm;
pub mod intercept;
pub mod measure;
mod pin;
mod plot;
mod registry;
mod ring;
mod target;
mod vfio;

pub use measure::Measurement;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// The suites, in run order.
pub const SUITES: [&str; 9] = [
    "pin",
    "ring",
    "e2e",
    "cache",
    "invalidate",
    "intercept",
    "all",
    "vfio",
    "gpuvm",
];

#[derive(clap::Args)]
pub struct Args {
    /// Suites to run (repeat or comma-separate): pin, ring, e2e, cache, invalidate,
    /// intercept, all (the six before it), vfio (needs --device), gpuvm (GPU VMs on
    /// the reference device).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    suite: Vec<String>,
    /// A short run (under a minute on 2 cores): fewer samples, smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Write every figure as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// Write SVG charts (cost vs size, throughput vs batch) into DIR.
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
    /// Run on this NVMe function (bound to vfio-pci) instead of the reference device:
    /// pin, ring, cache and invalidate in their VFIO form, plus vfio (the default suites
    /// then). e2e needs the reference device's compute commands.
    #[arg(long, value_name = "BDF")]
    device: Option<String>,
    /// Samples per measurement (default 30, 10 with --quick).
    #[arg(long)]
    samples: Option<usize>,
}

/// What a suite needs.
pub struct Ctx {
    pub quick: bool,
    pub samples: usize,
    pub progress: ProgressBar,
}

pub fn run(a: Args) -> Result<(), String> {
    let mut suites: Vec<String> = a.suite.iter().map(|s| s.trim().to_lowercase()).collect();
    for s in &suites {
        if !SUITES.contains(&s.as_str()) {
            return Err(format!(
                "unknown suite `{s}`\nhint: choose from {}",
                SUITES.join(", ")
            ));
        }
    }
    if suites.iter().any(|s| s == "all") {
        suites = SUITES[..6].iter().map(|s| s.to_string()).collect();
    }
    let explicit_all = a.suite.iter().any(|s| s.trim().eq_ignore_ascii_case("all"));
    match (&a.device, suites.iter().any(|s| s == "vfio")) {
        (Some(_), _) if explicit_all => {
            suites = ["pin", "ring", "cache", "invalidate", "vfio"]
                .map(String::from)
                .to_vec();
        }
        (Some(_), _) if suites.iter().any(|s| s == "e2e") => {
            return Err("the e2e suite needs the reference device: its COPY and SAXPY commands are compute an NVMe controller does not do\nhint: drop e2e, or drop --device; the vfio suite measures NVMe READs".to_string());
        }
        (None, true) => {
            return Err("the vfio suite needs a device: --device BDF (an NVMe function bound to vfio-pci)\nhint: `userptr list` shows the devices; `tools/vfio-guest/run.sh` boots a guest that has one".to_string())
        }
        _ => {}
    }
    let samples = a.samples.unwrap_or(if a.quick { 10 } else { 30 }).max(3);
    let progress = ProgressBar::new(suites.len() as u64);
    if !std::io::stderr().is_terminal() {
        progress.set_draw_target(ProgressDrawTarget::hidden());
    }
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let target = target::Target::open(a.device.as_deref())?;
    let ctx = Ctx {
        quick: a.quick,
        samples,
        progress,
    };
    let mut results = Vec::new();
    for s in &suites {
        ctx.progress.set_message(s.clone());
        // A failed operation deep inside a measurement loop becomes this suite's
        // error message, not a panic trace.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match s.as_str() {
            "pin" => pin::run(&ctx, &target),
            "ring" => ring::run(&ctx, &target),
            "e2e" => e2e::run(&ctx),
            "cache" => registry::cache(&ctx, &target),
            "invalidate" => registry::invalidate(&ctx, &target),
            "intercept" => intercept::run(&ctx),
            "vfio" => vfio::run(&ctx, &target),
            "gpuvm" => gpuvm::run(&ctx, &target),
            _ => Err(format!("unknown suite {s}")),
        }));
        std::panic::set_hook(prev);
        let r = match r {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("the {s} suite failed: {msg}"))
            }
        }?;
        for m in &r {
            println!("{}", m.row());
        }
        results.extend(r);
        ctx.progress.inc(1);
    }
    ctx.progress.finish_and_clear();
    if let Some(dir) = &a.plot {
        for f in plot::write(dir, &results)? {
            println!("wrote {f}");
        }
    }
    if let Some(path) = a.json {
        let doc = serde_json::json!({
            "machine": machine(),
            "device": target.describe(),
            "results": results.iter().map(Measurement::json).collect::<Vec<_>>(),
        });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
        )
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {} results to {}", results.len(), path.display());
    }
    Ok(())
}

fn machine() -> serde_json::Value {
    let u = rustix::system::uname();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    serde_json::json!({
        "kernel": format!("{} {}", u.sysname().to_string_lossy(), u.release().to_string_lossy()),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu_model,
    })
}
