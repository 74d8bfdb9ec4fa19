//! intercept: the added cost of each monitor source per intercepted call, next to the
//! raw call in the same run. The seccomp filter cannot be removed once installed, so
//! the measurements run in a child process (`userptr intercept-child`), which prints
//! them as JSON lines; the parent measures the unmonitored baselines it needs.

use super::measure::{interleaved, repeat, time_us, Mem, Sample};
use super::{Ctx, Measurement};
use userptr::driver::monitor::seccomp::{raw_madvise, SeccompMonitor};
use userptr::{Driver, Perm, Registry, RegistryConfig};

fn getpid_us(n: usize) -> f64 {
    time_us(|| {
        for _ in 0..n {
            // SAFETY: a plain syscall without arguments.
            std::hint::black_box(unsafe { libc::getpid() });
        }
    }) / n as f64
}

pub fn run(ctx: &Ctx) -> Result<Vec<Measurement>, String> {
    let getpid_off = repeat(ctx.samples, 3, || getpid_us(1000));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(["intercept-child", &ctx.samples.to_string()])
        .output()
        .map_err(|e| format!("running the intercept child: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the intercept child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut res = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let vals = |k: &str| Sample {
            values: v[k]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default(),
        };
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let mut m = Measurement::new("intercept", name.clone(), "us", vals("ours"));
        if name == "seccomp_getpid" {
            m = m.with_baseline("getpid_unmonitored", getpid_off.clone());
        } else if let Some(b) = v["baseline"].as_str() {
            m = m.with_baseline(b, vals("base"));
        }
        res.push(m);
    }
    Ok(res)
}

/// The child: installs the seccomp monitor and measures.
pub fn child(samples: usize) -> Result<(), String> {
    let drv = Driver::reference().map_err(|e| crate::explain(&e))?;
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let page = Mem::new(4096)?;
    let far = Mem::new(4096)?;
    let print = |name: &str, ours: &Sample, base: Option<(&str, &Sample)>| {
        let mut v = serde_json::json!({ "name": name, "ours": ours.values });
        if let Some((b, s)) = base {
            v["baseline"] = serde_json::json!(b);
            v["base"] = serde_json::json!(s.values);
        }
        println!("{v}");
    };
    // userfaultfd first: once the seccomp filter is in, madvise would pay its trap too.
    let (mut uffd_on, mut uffd_raw) = (Vec::new(), Vec::new());
    for _ in 0..samples.min(10) {
        let (on, raw) =
            userptr::driver::monitor::uffd::measure_madvise(50).map_err(|e| crate::explain(&e))?;
        uffd_on.push(on);
        uffd_raw.push(raw);
    }
    print(
        "uffd_registered_madvise",
        &Sample { values: uffd_on },
        Some(("raw_madvise", &Sample { values: uffd_raw })),
    );
    let monitor = SeccompMonitor::install(&reg).map_err(|e| crate::explain(&e))?;
    // A registered page somewhere, so the fast pre-check has bounds to test against.
    let reg_page = Mem::new(4096)?;
    let _anchor = reg
        .register(reg_page.addr, 4096, Perm::READ_WRITE)
        .map_err(|e| crate::explain(&e))?;
    let madv = |m: &Mem| {
        // SAFETY: discarding our own page.
        unsafe { libc::madvise(m.addr as *mut _, 4096, libc::MADV_DONTNEED) };
    };
    // Unregistered memory: the trap and the pre-check only.
    let (ours, base) = interleaved(
        samples,
        3,
        || time_us(|| (0..100).for_each(|_| madv(&far))) / 100.0,
        || {
            time_us(|| {
                (0..100).for_each(|_| {
                    raw_madvise(far.addr, 4096, libc::MADV_DONTNEED);
                })
            }) / 100.0
        },
    );
    print(
        "seccomp_unregistered_madvise",
        &ours,
        Some(("raw_madvise", &base)),
    );
    // A registered, idle page: trap + invalidation (unpin) + call.
    let (ours, base) = interleaved(
        samples,
        3,
        || {
            let _ = reg.register(page.addr, 4096, Perm::READ_WRITE);
            time_us(|| madv(&page))
        },
        || {
            time_us(|| {
                raw_madvise(page.addr, 4096, libc::MADV_DONTNEED);
            })
        },
    );
    print(
        "seccomp_registered_madvise",
        &ours,
        Some(("raw_madvise", &base)),
    );
    let on = repeat(samples, 3, || getpid_us(1000));
    print("seccomp_getpid", &on, None);
    drop(monitor);
    Ok(())
}
