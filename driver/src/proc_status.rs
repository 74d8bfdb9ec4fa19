//! Pinned-memory accounting as the kernel reports it: `VmPin` in `/proc/self/status`
//! (pages pinned with FOLL_LONGTERM, which io_uring buffer registration and VFIO type1
//! both count) and `RLIMIT_MEMLOCK`, the budget they are charged against.

use std::io;

/// Bytes this process has pinned (`VmPin`).
pub fn pinned_bytes() -> io::Result<u64> {
    status_kib("VmPin:").map(|k| k * 1024)
}

/// Bytes this process has locked (`VmLck`, mlock and friends).
pub fn locked_bytes() -> io::Result<u64> {
    status_kib("VmLck:").map(|k| k * 1024)
}

/// Resident set size peak (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> io::Result<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{key} not in status")))
}

/// The soft `RLIMIT_MEMLOCK`, in bytes (`u64::MAX` when unlimited).
pub fn memlock_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX)
}
