//! Samples, statistics, and interleaved measurement against a baseline.

use std::time::Instant;

/// Timed samples of one quantity, in its unit.
#[derive(Clone, Debug)]
pub struct Sample {
    pub values: Vec<f64>,
}

impl Sample {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    /// The `p` quantile (0..=1), nearest rank; 0 for no samples.
    pub fn pct(&self, p: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    pub fn median(&self) -> f64 {
        self.pct(0.5)
    }
    pub fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
            .max(0.0)
    }
    pub fn min(&self) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }
    pub fn mean(&self) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        self.values.iter().sum::<f64>() / self.values.len() as f64
    }
    /// The statistics every figure reports (docs/json-schema.md).
    fn stats(&self, into: &mut serde_json::Value) {
        into["median"] = self.median().into();
        into["p10"] = self.pct(0.1).into();
        into["p50"] = self.median().into();
        into["p90"] = self.pct(0.9).into();
        into["p99"] = self.pct(0.99).into();
        into["min"] = self.min().into();
        into["max"] = self.max().into();
        into["mean"] = self.mean().into();
    }
}

/// The units a figure may have: times (`ns`, `us`), throughputs (decimal SI: `GB/s`
/// is 10^9 bytes/s, `Mops/s` 10^6 commands/s, `IO/s`). ASCII only.
pub const UNITS: [&str; 5] = ["ns", "us", "GB/s", "Mops/s", "IO/s"];

/// One reported figure.
pub struct Measurement {
    pub suite: &'static str,
    pub name: String,
    pub unit: &'static str,
    pub ours: Sample,
    pub baseline: Option<(String, Sample)>,
    /// For time units the ratio is ours/baseline; for throughput units too (so a
    /// ratio below 1 means slower than the baseline there).
    pub higher_is_better: bool,
}

impl Measurement {
    pub fn new(
        suite: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        ours: Sample,
    ) -> Measurement {
        debug_assert!(UNITS.contains(&unit), "unit {unit} outside the convention");
        Measurement {
            suite,
            name: name.into(),
            unit,
            ours,
            baseline: None,
            higher_is_better: unit.ends_with("/s"),
        }
    }

    pub fn with_baseline(mut self, name: impl Into<String>, s: Sample) -> Measurement {
        self.baseline = Some((name.into(), s));
        self
    }

    fn to_us(&self, v: f64) -> f64 {
        match self.unit {
            "ns" => v / 1000.0,
            _ => v,
        }
    }

    /// ours / baseline, by medians.
    pub fn ratio(&self) -> Option<f64> {
        let (_, b) = self.baseline.as_ref()?;
        let bm = b.median();
        Some(if bm != 0.0 {
            self.ours.median() / bm
        } else {
            0.0
        })
    }

    /// ours − baseline in µs, for time units.
    pub fn added_us(&self) -> Option<f64> {
        let (_, b) = self.baseline.as_ref()?;
        (!self.higher_is_better).then(|| self.to_us(self.ours.median()) - self.to_us(b.median()))
    }

    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "suite": self.suite, "name": self.name, "unit": self.unit,
            "samples": self.ours.values.len(),
            "higher_is_better": self.higher_is_better,
        });
        self.ours.stats(&mut v);
        if let Some((name, b)) = &self.baseline {
            let mut base = serde_json::json!({ "name": name, "samples": b.values.len() });
            b.stats(&mut base);
            v["baseline"] = base;
            v["ratio"] = self.ratio().unwrap_or(0.0).into();
            if let Some(a) = self.added_us() {
                v["added_us"] = a.into();
            }
        }
        v
    }

    /// The CSV columns (see [`CSV_HEADER`]).
    pub fn csv(&self) -> String {
        let f = |x: f64| format!("{x}");
        let (bn, bm) = match &self.baseline {
            Some((n, b)) => (n.clone(), f(b.median())),
            None => (String::new(), String::new()),
        };
        let o = &self.ours;
        [
            self.suite.to_string(),
            self.name.clone(),
            self.unit.to_string(),
            f(o.median()),
            f(o.pct(0.1)),
            f(o.median()),
            f(o.pct(0.9)),
            f(o.pct(0.99)),
            f(o.max()),
            o.values.len().to_string(),
            bn,
            bm,
            self.ratio().map(f).unwrap_or_default(),
            self.added_us().map(f).unwrap_or_default(),
        ]
        .iter()
        .map(|c| csv_field(c))
        .collect::<Vec<_>>()
        .join(",")
    }

    pub fn row(&self) -> String {
        let mut s = format!(
            "{:<11} {:<30} {:>11.3} {:<6} [p10 {:.3}, p90 {:.3}, p99 {:.3}, max {:.3}]",
            self.suite,
            self.name,
            self.ours.median(),
            self.unit,
            self.ours.pct(0.1),
            self.ours.pct(0.9),
            self.ours.pct(0.99),
            self.ours.max()
        );
        if let Some((name, b)) = &self.baseline {
            let bm = b.median();
            let ratio = if bm != 0.0 {
                self.ours.median() / bm
            } else {
                f64::NAN
            };
            s += &format!("  vs {name} {bm:.3} (ratio {ratio:.2})");
        }
        s
    }
}

/// The first line of `--csv`.
pub const CSV_HEADER: &str =
    "suite,name,unit,median,p10,p50,p90,p99,max,samples,baseline,baseline_median,ratio,added_us";

/// RFC 4180: quote a field with a comma, quote or newline.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Time `f` once, in microseconds.
pub fn time_us(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}

/// `samples` interleaved pairs: ours, then the baseline, after `warmup` pairs (one
/// progress step per pair).
pub fn interleaved(
    samples: usize,
    warmup: usize,
    mut ours: impl FnMut() -> f64,
    mut base: impl FnMut() -> f64,
) -> (Sample, Sample) {
    for _ in 0..warmup {
        ours();
        base();
        crate::progress::tick(1);
    }
    let (mut a, mut b) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for _ in 0..samples {
        a.push(ours());
        b.push(base());
        crate::progress::tick(1);
    }
    (Sample { values: a }, Sample { values: b })
}

/// `samples` samples of `f` after `warmup` runs (one progress step per run).
pub fn repeat(samples: usize, warmup: usize, mut f: impl FnMut() -> f64) -> Sample {
    for _ in 0..warmup {
        f();
        crate::progress::tick(1);
    }
    Sample {
        values: (0..samples)
            .map(|_| {
                let v = f();
                crate::progress::tick(1);
                v
            })
            .collect(),
    }
}

/// Anonymous memory with every page touched, unmapped on drop.
pub struct Mem {
    pub addr: usize,
    pub len: usize,
}

impl Mem {
    pub fn new(len: usize) -> Result<Mem, String> {
        Mem::with_flags(len, 0)
    }

    /// Memory below 4 GiB (`MAP_32BIT`), which i386 calls can reach.
    pub fn new_32bit(len: usize) -> Result<Mem, String> {
        Mem::with_flags(len, libc::MAP_32BIT)
    }

    fn with_flags(len: usize, extra: i32) -> Result<Mem, String> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len} bytes failed: {}\nhint: the benchmark needs that much free memory",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the mapping above is ours and `len` bytes long.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, len) };
        Ok(Mem {
            addr: p as usize,
            len,
        })
    }
}

impl Mem {
    /// Set byte `i` to `f(i)`.
    pub fn fill_with(&self, f: impl Fn(usize) -> u8) {
        // SAFETY: our own mapping of `len` bytes; no device writes it meanwhile (the
        // callers wait for their commands).
        let s = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = f(i);
        }
    }

    /// `munmap` the whole buffer between `before` and `after` (an invalidation window,
    /// or the unpin a raw baseline owes), timing the three, then map fresh touched
    /// pages back at the same address (not timed). Returns the µs.
    pub fn unmap_timed(&self, before: impl FnOnce(), then: impl FnOnce()) -> Result<f64, String> {
        let t = std::time::Instant::now();
        before();
        // SAFETY: our own mapping; it is mapped again right below, before anyone reads
        // it (the bench is single-threaded around this call).
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
        then();
        let us = t.elapsed().as_secs_f64() * 1e6;
        // SAFETY: NOREPLACE: only the hole we just made; fails instead of clobbering.
        let p = unsafe {
            libc::mmap(
                self.addr as *mut _,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize != self.addr {
            return Err(format!(
                "re-mapping {:#x} after munmap failed: {}",
                self.addr,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the fresh mapping above, `len` bytes.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, self.len) };
        Ok(us)
    }

    /// A copy of the bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: as above; copied out, no reference kept.
        unsafe { std::ptr::copy_nonoverlapping(self.addr as *const u8, v.as_mut_ptr(), self.len) };
        v
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our mapping; every pin of it is released before the drop.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}
