//! Where the machine-readable documents go and what every one of them carries.
//!
//! `bench --json` and `torture --json` write one JSON document each, in the schema of
//! `docs/json-schema.md`: the [`envelope`] (schema name and version, the tool's version
//! and commit, a UTC timestamp, the command line and the effective settings, the
//! machine) followed by the command's own keys. `--json -` writes it to stdout (and the
//! human lines go to stderr); a run that fails after its arguments were accepted still
//! writes a document, with an `error` object ([`error_document`]).
//!
//! Output paths are checked when the arguments are parsed ([`OutPath::parse`],
//! [`plot_dir`]), so a run never ends with "cannot write" after the work is done.

use std::path::{Path, PathBuf};

/// The version of the schema in `docs/json-schema.md`. 1 was the unversioned layout
/// before it (the same names, without the envelope); 2 added the envelope, p50, p99,
/// max, `skipped` and `error`.
pub const SCHEMA_VERSION: u32 = 2;

/// The tool's version, from Cargo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the tool was built from (see `build.rs`), or "unknown".
pub const COMMIT: &str = env!("USERPTR_COMMIT");

/// `--version`'s text: the version and the commit.
pub const LONG_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("USERPTR_COMMIT"), ")");

/// Die quietly of SIGPIPE when a reader of stdout goes away (`userptr bench | head`),
/// as command-line tools do, instead of panicking on the failed write (Rust ignores
/// SIGPIPE by default).
pub fn default_sigpipe() {
    // SAFETY: restores the default disposition of one signal before any thread is
    // started; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// A place for a document: stdout (`-`) or a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutPath {
    /// `-`: standard output.
    Stdout,
    /// A file (created or replaced).
    File(PathBuf),
}

impl OutPath {
    /// Parse and check `--json` / `--csv`: `-`, or a file that can be written (an
    /// existing regular file we may write, or a new one in a writable directory).
    pub fn parse(s: &str) -> Result<OutPath, String> {
        if s == "-" {
            return Ok(OutPath::Stdout);
        }
        if s.is_empty() {
            return Err("an empty path (use - for stdout)".into());
        }
        let p = PathBuf::from(s);
        writable_file(&p)?;
        Ok(OutPath::File(p))
    }

    /// Whether this is stdout.
    pub fn is_stdout(&self) -> bool {
        *self == OutPath::Stdout
    }

    /// Write `text` (a newline is added).
    pub fn write(&self, text: &str) -> Result<(), String> {
        match self {
            OutPath::Stdout => {
                crate::progress::out(text);
                Ok(())
            }
            OutPath::File(p) => std::fs::write(p, format!("{text}\n"))
                .map_err(|e| format!("writing {}: {e}", p.display())),
        }
    }

    /// For messages: the path, or "stdout".
    pub fn describe(&self) -> String {
        match self {
            OutPath::Stdout => "stdout".into(),
            OutPath::File(p) => p.display().to_string(),
        }
    }
}

fn access_w(p: &Path, what: &str) -> Result<(), String> {
    use rustix::fs::{access, Access};
    access(p, Access::WRITE_OK | Access::EXEC_OK)
        .or_else(|e| {
            // EXEC_OK matters for directories only.
            if p.is_dir() {
                Err(e)
            } else {
                access(p, Access::WRITE_OK)
            }
        })
        .map_err(|e| format!("{what} {} is not writable: {e}", p.display()))
}

/// `p` can be written: it is a writable regular file (or a character device such as
/// /dev/null), or it does not exist and its directory does and is writable.
pub fn writable_file(p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Err(format!("{} is a directory", p.display())),
        Ok(_) => access_w(p, "the file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => access_w(&dir, "the directory"),
                Ok(_) => Err(format!("{} is not a directory", dir.display())),
                Err(e) => Err(format!("the directory {}: {e}", dir.display())),
            }
        }
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// Parse and check `--plot DIR`: an existing writable directory, or one that can be
/// created (its nearest existing ancestor is a writable directory). Nothing is created
/// here.
pub fn plot_dir(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("an empty path".into());
    }
    let p = PathBuf::from(s);
    let mut at = p.as_path();
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => {
                access_w(at, "the directory")?;
                return Ok(p);
            }
            Ok(_) => return Err(format!("{} exists and is not a directory", at.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                at = match at.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
}

/// The keys every document starts with (see `docs/json-schema.md`): `schema`
/// (`userptr.<kind>`), `schema_version`, `tool`, `timestamp`, `arguments` (the command
/// line as given), `settings` (what the run used) and `machine`.
pub fn envelope(
    kind: &str,
    settings: serde_json::Value,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("schema".into(), format!("userptr.{kind}").into());
    m.insert("schema_version".into(), SCHEMA_VERSION.into());
    m.insert(
        "tool".into(),
        serde_json::json!({ "name": "userptr", "version": VERSION, "commit": COMMIT }),
    );
    m.insert(
        "timestamp".into(),
        rfc3339(std::time::SystemTime::now()).into(),
    );
    m.insert(
        "arguments".into(),
        std::env::args().skip(1).collect::<Vec<_>>().into(),
    );
    m.insert("settings".into(), settings);
    m.insert("machine".into(), machine());
    m
}

/// A document for a run that failed: the envelope and `error: { message }`.
pub fn error_document(kind: &str, settings: serde_json::Value, message: &str) -> String {
    let mut m = envelope(kind, settings);
    m.insert("error".into(), serde_json::json!({ "message": message }));
    pretty(&serde_json::Value::Object(m))
}

/// Pretty JSON (serde_json cannot fail on a `Value`).
pub fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// What the machine is: kernel, CPUs, CPU model, memory, host name, the locked-memory
/// limit and whether this process may exceed it.
pub fn machine() -> serde_json::Value {
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
    let memlock = userptr::proc_status::memlock_limit();
    serde_json::json!({
        "kernel": format!("{} {}", u.sysname().to_string_lossy(), u.release().to_string_lossy()),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu_model,
        "hostname": u.nodename().to_string_lossy(),
        "memory_bytes": rustix::system::sysinfo().totalram as u64,
        "memlock_limit_bytes": if memlock == u64::MAX { serde_json::Value::Null } else { memlock.into() },
        "cap_ipc_lock": crate::budget::cap_ipc_lock(),
    })
}

/// A one-line description of the machine for charts: CPU model, CPUs, kernel.
pub fn machine_line() -> String {
    let m = machine();
    format!(
        "{} · {} CPUs · {}",
        m["cpu_model"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown CPU"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("")
    )
}

/// `t` as RFC 3339 in UTC, to the second: `2026-05-02T13:04:05Z`.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    rfc3339(std::time::SystemTime::now())[..10].to_string()
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
