//! Argument parsers shared by the subcommands: each turns a bad value into one clear
//! message while clap parses, so that nothing runs before every argument is known good.
//! (Numbers with a range use clap's own ranged parsers where they are declared.)

use userptr::driver::vfio::pci::Bdf;

/// The longest `torture --seconds` accepts: a week.
pub const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// A duration in seconds: a finite decimal number, above 0 and at most a week.
pub fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds (like 5 or 0.5)"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number of seconds"));
    }
    if v <= 0.0 {
        return Err(format!("{s} s: the run must last longer than 0 s"));
    }
    if v > MAX_SECONDS {
        return Err(format!(
            "{s} s is longer than a week ({MAX_SECONDS} s), the most a run may take"
        ));
    }
    Ok(v)
}

/// A PCI address, `DDDD:BB:DD.F` or `BB:DD.F`, with the library's reasons.
pub fn bdf(s: &str) -> Result<Bdf, String> {
    s.parse::<Bdf>().map_err(|e| {
        format!("{e}\nhint: a PCI address looks like 0000:00:04.0; `userptr list` (or `lspci -D`) shows the devices present")
    })
}

/// A directory that exists (for `--sysroot`).
pub fn existing_dir(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    if p.is_dir() {
        Ok(p)
    } else {
        Err(format!("{s} is not a directory"))
    }
}
