//! Registry settings and their defaults.

use std::time::Duration;

/// Registry settings.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Most bytes pinned at once (soft: concurrent pins may overshoot by one region).
    /// Default: RLIMIT_MEMLOCK, or a quarter of RAM with CAP_IPC_LOCK / no limit.
    pub pin_budget: Option<u64>,
    /// Most regions mapped at once. Default, and upper bound: the domain's limit less
    /// 64 (kept for ring memory and direct mappings), counting every mapping the
    /// domain holds, not only this registry's.
    pub max_mappings: Option<usize>,
    /// How long an invalidation (or the registry's teardown) waits for in-flight work
    /// before resetting the device, and then again for the reset work to complete.
    /// `Duration::MAX`: no practical limit.
    pub fence_timeout: Duration,
    /// How long a pin (a registration, a submission's cache miss) waits for an
    /// invalidation window over its range to close, or for a permission downgrade to
    /// finish, before [`Error::WindowTimeout`](crate::Error::WindowTimeout).
    pub window_timeout: Duration,
    /// How many times a submission (or a pin) starts over because an invalidation hit
    /// its buffers in the meantime, or the ring filled up, before
    /// [`Error::TooManyRetries`](crate::Error::TooManyRetries).
    pub submit_retries: u32,
    /// Split partially invalidated regions (re-map the surviving parts) instead of
    /// dropping them whole.
    pub split: bool,
    /// Map regions larger than this as chunks of this size, each its own IOMMU
    /// mapping inside one IOVA range, so that a partial invalidation unmaps (and the
    /// next use re-pins) only the chunks it touches instead of the whole region. A
    /// power of two, at least a page; 0 maps every region whole. Default 2 MiB. A
    /// region never takes more than a 32nd of the mapping limit: on a domain with few
    /// slots the chunks grow (and with fewer than 64, a region is one mapping).
    pub chunk_size: u64,
    /// Validation mode: on every cache hit, check via `/proc/self/pagemap` that the
    /// pinned pages are still the ones the process maps (root only; a debugging aid).
    pub validate: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            pin_budget: None,
            max_mappings: None,
            fence_timeout: Duration::from_secs(5),
            window_timeout: Duration::from_secs(30),
            submit_retries: 64,
            split: true,
            chunk_size: 2 << 20,
            validate: false,
        }
    }
}

pub(super) fn default_budget() -> u64 {
    let limit = crate::proc_status::memlock_limit();
    let cap_ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 14/* CAP_IPC_LOCK */) != 0);
    if limit == u64::MAX || cap_ipc_lock {
        let ram = rustix::system::sysinfo().totalram as u64;
        (ram / 4).max(limit.min(ram))
    } else {
        limit
    }
}
