//! How much memory this process may pin: pins (io_uring buffer registration, VFIO
//! type1 mappings) are charged against `RLIMIT_MEMLOCK` unless the process has
//! CAP_IPC_LOCK. `demo` sizes itself to it and `bench` skips what does not fit.

/// Kept free for what a run pins besides its buffers: ring memory, a raw baseline's
/// page rounding.
pub const RESERVE: u64 = 512 << 10;

/// CAP_IPC_LOCK in this process's effective set (`CapEff` in /proc/self/status).
pub fn cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

/// What may still be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// No limit applies (CAP_IPC_LOCK, or `RLIMIT_MEMLOCK` unlimited).
    Unlimited,
    /// Bytes left under `RLIMIT_MEMLOCK` (`limit`), after what is pinned already.
    Limited {
        /// The soft limit.
        limit: u64,
        /// The limit less `VmPin` now.
        left: u64,
    },
}

impl Budget {
    /// The budget now.
    pub fn now() -> Budget {
        let limit = userptr::proc_status::memlock_limit();
        if limit == u64::MAX || cap_ipc_lock() {
            return Budget::Unlimited;
        }
        let pinned = userptr::proc_status::pinned_bytes().unwrap_or(0);
        Budget::Limited {
            limit,
            left: limit.saturating_sub(pinned),
        }
    }

    /// Bytes a run may pin for its buffers (after [`RESERVE`]); `None`: no limit.
    pub fn usable(&self) -> Option<u64> {
        match self {
            Budget::Unlimited => None,
            Budget::Limited { left, .. } => Some(left.saturating_sub(RESERVE)),
        }
    }

    /// Whether `bytes` of buffers fit.
    pub fn fits(&self, bytes: u64) -> bool {
        self.usable().is_none_or(|u| bytes <= u)
    }

    /// Why `bytes` do not fit, with what to do.
    pub fn refusal(&self, bytes: u64) -> String {
        match self {
            Budget::Unlimited => String::new(),
            Budget::Limited { limit, .. } => format!(
                "needs {} pinned, RLIMIT_MEMLOCK is {} ({} usable) and this process has no \
                 CAP_IPC_LOCK (raise `ulimit -l`, or run as root)",
                human_bytes(bytes),
                human_bytes(*limit),
                human_bytes(self.usable().unwrap_or(0))
            ),
        }
    }
}

/// Bytes for people: `8 MiB`, `1.5 GiB`, `4 KiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || (v - v.round()).abs() < 0.05 {
        format!("{:.0} {}", v, UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}
