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
    fn pct(&self, p: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    pub fn median(&self) -> f64 {
        self.pct(0.5)
    }
}

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
            "ms" => v * 1000.0,
            _ => v,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "suite": self.suite, "name": self.name, "unit": self.unit,
            "median": self.ours.median(), "p10": self.ours.pct(0.1), "p90": self.ours.pct(0.9),
            "samples": self.ours.values.len(),
        });
        if let Some((name, b)) = &self.baseline {
            let (o, bm) = (self.ours.median(), b.median());
            v["baseline"] = serde_json::json!({ "name": name, "median": bm });
            v["ratio"] = serde_json::json!(if bm != 0.0 { o / bm } else { 0.0 });
            if !self.higher_is_better {
                v["added_us"] = serde_json::json!(self.to_us(o) - self.to_us(bm));
            }
        }
        v
    }

    pub fn row(&self) -> String {
        let mut s = format!(
            "{:<11} {:<30} {:>11.3} {:<6} [p10 {:.3}, p90 {:.3}]",
            self.suite,
            self.name,
            self.ours.median(),
            self.unit,
            self.ours.pct(0.1),
            self.ours.pct(0.9)
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

/// Time `f` once, in microseconds.
pub fn time_us(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}

/// `samples` interleaved pairs: ours, then the baseline, after `warmup` pairs.
pub fn interleaved(
    samples: usize,
    warmup: usize,
    mut ours: impl FnMut() -> f64,
    mut base: impl FnMut() -> f64,
) -> (Sample, Sample) {
    for _ in 0..warmup {
        ours();
        base();
    }
    let (mut a, mut b) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for _ in 0..samples {
        a.push(ours());
        b.push(base());
    }
    (Sample { values: a }, Sample { values: b })
}

/// `samples` samples of `f` after `warmup` runs.
pub fn repeat(samples: usize, warmup: usize, mut f: impl FnMut() -> f64) -> Sample {
    for _ in 0..warmup {
        f();
    }
    Sample {
        values: (0..samples).map(|_| f()).collect(),
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
