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
//! Output: a table on stdout (on stderr when `--json -` or `--csv -` takes stdout);
//! `--json FILE` (or `-`) one document in the versioned schema of
//! `docs/json-schema.md` (the envelope, then `device`, `results`, `skipped`, and
//! `error` when the run failed); `--csv FILE` one line per figure; `--plot DIR` one SVG
//! chart per suite. Every path is checked before the first suite starts.
//!
//! Without CAP_IPC_LOCK the pins are charged against `RLIMIT_MEMLOCK`: a figure whose
//! buffers do not fit is skipped, said on stderr and listed under `skipped` with why.

mod e2e;
mod gpuvm;
pub mod intercept;
mod kvm_notifier;
mod limits;
pub mod measure;
mod migrate;
mod pin;
mod plot;
mod registry;
mod ring;
mod target;
mod vfio;

pub use measure::Measurement;

use crate::budget::Budget;
use crate::output::OutPath;
use std::path::PathBuf;
use std::sync::Mutex;
use userptr::driver::vfio::pci::Bdf;

/// The suites, in run order.
pub const SUITES: [&str; 10] = [
    "pin",
    "ring",
    "e2e",
    "cache",
    "invalidate",
    "intercept",
    "all",
    "vfio",
    "gpuvm",
    "migrate",
];

/// `--suite`'s parser: one of [`SUITES`], any case.
fn suite(s: &str) -> Result<String, String> {
    let t = s.trim().to_lowercase();
    if SUITES.contains(&t.as_str()) {
        Ok(t)
    } else {
        Err(format!(
            "unknown suite `{s}`\nhint: choose from {}",
            SUITES.join(", ")
        ))
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Suites to run (repeat or comma-separate): pin, ring, e2e, cache, invalidate,
    /// intercept, all (the six before it), vfio (needs --device), gpuvm (GPU VMs on
    /// the reference device), migrate (buffer objects moving between VRAM and system
    /// memory, on the reference device).
    #[arg(long, value_delimiter = ',', default_value = "all", value_parser = suite)]
    suite: Vec<String>,
    /// A short run (under a minute on 2 cores): fewer samples, smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Write every figure as JSON to FILE (`-`: stdout). Schema: docs/json-schema.md.
    #[arg(long, value_name = "FILE", value_parser = OutPath::parse)]
    json: Option<OutPath>,
    /// Write every figure as CSV to FILE (`-`: stdout), one line per figure.
    #[arg(long, value_name = "FILE", value_parser = OutPath::parse)]
    csv: Option<OutPath>,
    /// Write one SVG chart per suite into DIR (created if need be).
    #[arg(long, value_name = "DIR", value_parser = crate::output::plot_dir)]
    plot: Option<PathBuf>,
    /// Run on this NVMe function (bound to vfio-pci) instead of the reference device:
    /// pin, ring, cache and invalidate in their VFIO form, plus vfio (the default suites
    /// then). e2e needs the reference device's compute commands.
    #[arg(long, value_name = "BDF", value_parser = crate::args::bdf)]
    device: Option<Bdf>,
    /// Samples per measurement, 3 to 100000 (default 30, 10 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..=100_000), allow_negative_numbers = true)]
    samples: Option<u64>,
}

/// A figure left out, and why.
#[derive(Clone, Debug)]
pub struct Skip {
    pub suite: &'static str,
    pub name: String,
    pub reason: String,
}

/// What a suite needs.
pub struct Ctx {
    pub quick: bool,
    pub samples: usize,
    /// What may be pinned (checked before each figure's buffers are made).
    pub budget: Budget,
    skipped: Mutex<Vec<Skip>>,
}

impl Ctx {
    /// Whether `bytes` pinned at once fit the budget; if not, `suite`/`name` is
    /// recorded as skipped (and said on stderr) and false returned.
    pub fn fits(&self, suite: &'static str, name: &str, bytes: u64) -> bool {
        if self.budget.fits(bytes) {
            return true;
        }
        self.skip(suite, name, self.budget.refusal(bytes));
        false
    }

    /// Record `suite`/`name` as skipped for `reason`.
    pub fn skip(&self, suite: &'static str, name: &str, reason: String) {
        crate::progress::err(&format!("bench: skipping {suite}/{name}: {reason}"));
        tracing::info!(suite, name, %reason, "figure skipped");
        self.skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Skip {
                suite,
                name: name.to_string(),
                reason,
            });
    }

    fn skipped(&self) -> Vec<Skip> {
        self.skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The progress steps a suite takes (samples and warm-ups, see `measure`): the bar's
/// length, so that its ETA means something. An estimate; the bar stops at its end.
fn steps(suite: &str, ctx: &Ctx, vfio: bool) -> u64 {
    let s = ctx.samples as u64;
    match suite {
        "pin" => {
            let big = if ctx.quick || vfio {
                0
            } else {
                3.max(s / 5) + 2
            };
            4 * (s + 2) + big
        }
        "ring" if vfio => 3 * (s + 2) + 5 * s + 5,
        "ring" => 3 * (s + 2) + 5 * s + 2 * (5 * s + 5) + (s + 2) + 3 * s.min(10) + 2 * s,
        "e2e" => 4 * (s.min(if ctx.quick { 5 } else { 15 }) + 1),
        "cache" => 5 * (s + 3),
        "invalidate" => 5 * (s + 2) + s + 1,
        "intercept" => 13,
        "vfio" => 4 * (s + 3) + 2 + s.min(5),
        "migrate" => 4 * (s + 1) + (s + 1) + 2 * (s + 2),
        _ => 1,
    }
}

pub fn run(a: Args) -> Result<(), String> {
    if a.json.as_ref().is_some_and(OutPath::is_stdout)
        && a.csv.as_ref().is_some_and(OutPath::is_stdout)
    {
        // A bad command line like any other: clap's message, exit 2, nothing written.
        crate::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--json - and --csv - both want stdout\nhint: send one of them to a file",
            )
            .exit();
    }
    let settings = settings(&a);
    let json = a.json.clone();
    match bench(a) {
        Ok(()) => Ok(()),
        Err((e, partial)) => {
            if let Some(out) = &json {
                let doc = match partial {
                    Some(mut doc) => {
                        doc.insert("error".into(), serde_json::json!({ "message": e }));
                        crate::output::pretty(&serde_json::Value::Object(doc))
                    }
                    None => crate::output::error_document("bench", settings, &e),
                };
                out.write(&doc)?;
            }
            Err(e)
        }
    }
}

fn settings(a: &Args) -> serde_json::Value {
    serde_json::json!({
        "suites": a.suite, "quick": a.quick,
        "samples": a.samples.unwrap_or(if a.quick { 10 } else { 30 }),
        "device": a.device.map(|b| b.to_string()),
        "json": a.json.as_ref().map(OutPath::describe),
        "csv": a.csv.as_ref().map(OutPath::describe),
        "plot": a.plot.as_ref().map(|p| p.display().to_string()),
    })
}

type Doc = serde_json::Map<String, serde_json::Value>;

/// The run. An error comes with the document so far (when the suites had started).
fn bench(a: Args) -> Result<(), (String, Option<Doc>)> {
    let plain = |e: String| (e, None);
    let mut suites = a.suite.clone();
    let explicit_all = suites.iter().any(|s| s == "all");
    if explicit_all {
        suites = SUITES[..6].iter().map(|s| s.to_string()).collect();
    }
    let mut seen = std::collections::HashSet::new();
    suites.retain(|s| seen.insert(s.clone()));
    match (&a.device, suites.iter().any(|s| s == "vfio")) {
        (Some(_), _) if explicit_all => {
            suites = ["pin", "ring", "cache", "invalidate", "vfio"]
                .map(String::from)
                .to_vec();
        }
        (Some(_), _) if suites.iter().any(|s| s == "e2e") => {
            return Err(plain("the e2e suite needs the reference device: its COPY and SAXPY commands are compute an NVMe controller does not do\nhint: drop e2e, or drop --device; the vfio suite measures NVMe READs".to_string()));
        }
        (None, true) => {
            return Err(plain("the vfio suite needs a device: --device BDF (an NVMe function bound to vfio-pci)\nhint: `userptr list` shows the devices; `tools/vfio-guest/run.sh` boots a guest that has one".to_string()))
        }
        _ => {}
    }
    let samples = a.samples.unwrap_or(if a.quick { 10 } else { 30 }) as usize;
    let settings = settings(&a);
    // The table goes where the documents do not.
    let to_stderr = a.json.as_ref().is_some_and(OutPath::is_stdout)
        || a.csv.as_ref().is_some_and(OutPath::is_stdout);
    let say = |line: &str| {
        if to_stderr {
            crate::progress::err(line)
        } else {
            crate::progress::out(line)
        }
    };
    let device = a.device.map(|b| b.to_string());
    let target = target::Target::open(device.as_deref()).map_err(plain)?;
    let ctx = Ctx {
        quick: a.quick,
        samples,
        budget: Budget::now(),
        skipped: Mutex::new(Vec::new()),
    };
    tracing::info!(?suites, samples, budget = ?ctx.budget, device = %target.describe(), "bench starting");
    let vfio = matches!(target, target::Target::Vfio { .. });
    if vfio {
        say(&format!("device: {}", target.describe()));
    }
    let total: u64 = suites.iter().map(|s| steps(s, &ctx, vfio)).sum();
    let bar = crate::progress::start(total, "bench {bar:30} {percent:>3}% eta {eta} {msg}");
    let mut results = Vec::new();
    let doc = |results: &[Measurement], ctx: &Ctx| -> Doc {
        let mut d = crate::output::envelope("bench", settings.clone());
        d.insert("device".into(), target.describe().into());
        if let Some(accel) = target::guest_accel() {
            d.insert("guest_accel".into(), accel.into());
        }
        d.insert(
            "results".into(),
            results
                .iter()
                .map(Measurement::json)
                .collect::<Vec<_>>()
                .into(),
        );
        d.insert(
            "skipped".into(),
            ctx.skipped()
                .iter()
                .map(
                    |k| serde_json::json!({ "suite": k.suite, "name": k.name, "reason": k.reason }),
                )
                .collect::<Vec<_>>()
                .into(),
        );
        d
    };
    for s in &suites {
        bar.set_message(s.clone());
        let t = std::time::Instant::now();
        tracing::info!(suite = %s, "suite starting");
        // A failed operation deep inside a measurement loop becomes this suite's
        // error message, not a panic trace.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match s.as_str() {
            "pin" => pin::run(&ctx, &target),
            "ring" => ring::run(&ctx, &target),
            "e2e" => e2e::run(&ctx),
            "cache" => registry::cache(&ctx, &target),
            "invalidate" => registry::invalidate(&ctx, &target),
            "intercept" => intercept::run(&ctx),
            "vfio" => vfio::run(&ctx, &target),
            "gpuvm" => gpuvm::run(&ctx, &target),
            "migrate" if !matches!(target, target::Target::Reference) => Err(
                "the migrate suite needs the reference device (its VRAM aperture)\nhint: drop --device"
                    .to_string(),
            ),
            "migrate" => migrate::run(&ctx),
            _ => Err(format!("unknown suite {s}")),
        }
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
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                crate::progress::finish();
                return Err((e, Some(doc(&results, &ctx))));
            }
        };
        tracing::info!(suite = %s, figures = r.len(), seconds = t.elapsed().as_secs_f64(), "suite done");
        for m in &r {
            say(&m.row());
        }
        results.extend(r);
    }
    crate::progress::finish();
    if let Some(dir) = &a.plot {
        let meta = plot::Meta {
            device: target.describe(),
            machine: crate::output::machine_line(),
            date: crate::output::today(),
            tool: crate::output::LONG_VERSION.to_string(),
        };
        let written =
            plot::write(dir, &results, &meta).map_err(|e| (e, Some(doc(&results, &ctx))))?;
        for f in written {
            say(&format!("wrote {f}"));
        }
    }
    if let Some(out) = &a.csv {
        let mut text = measure::CSV_HEADER.to_string();
        for m in &results {
            text.push('\n');
            text += &m.csv();
        }
        out.write(&text).map_err(plain)?;
        if !out.is_stdout() {
            say(&format!(
                "wrote {} results to {}",
                results.len(),
                out.describe()
            ));
        }
    }
    if let Some(out) = &a.json {
        let d = doc(&results, &ctx);
        out.write(&crate::output::pretty(&serde_json::Value::Object(d)))
            .map_err(plain)?;
        if !out.is_stdout() {
            say(&format!(
                "wrote {} results to {}",
                results.len(),
                out.describe()
            ));
        }
    }
    Ok(())
}
