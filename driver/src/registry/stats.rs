//! Registry counters: lock-free atomics bumped on the paths they count, read as a
//! [`StatsSnapshot`]. Every counter is Relaxed: they order nothing, and a snapshot is a
//! set of independent readings.

use std::sync::atomic::{AtomicU64, Ordering};

/// Invalidation cause names, in `Cause::index` order.
pub const CAUSE_NAMES: [&str; 6] = ["unmap", "discard", "remap", "protect", "fork", "release"];

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// The registry's live counters.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// Invalidations by cause (see [`CAUSE_NAMES`]).
            pub invalidations: [AtomicU64; 6],
        }

        /// A reading of every counter.
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $(#[doc = $doc] pub $name: u64,)*
            /// Invalidations by cause (see [`CAUSE_NAMES`]).
            pub invalidations: [u64; 6],
        }

        impl Stats {
            /// Read every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    invalidations: std::array::from_fn(|i| self.invalidations[i].load(Ordering::Relaxed)),
                }
            }
        }

        impl StatsSnapshot {
            /// `(name, value)` pairs, for printing and JSON.
            pub fn fields(&self) -> Vec<(String, u64)> {
                let mut v = vec![$((stringify!($name).to_string(), self.$name),)*];
                for (i, n) in CAUSE_NAMES.iter().enumerate() {
                    v.push((format!("invalidations_{n}"), self.invalidations[i]));
                }
                v
            }
        }
    };
}

counters! {
    registrations: "Userptr registrations.",
    hits: "Buffer references resolved from the pin cache.",
    misses: "Buffer references that needed a pin.",
    pins: "Regions pinned and mapped.",
    pinned_bytes: "Bytes pinned, cumulative.",
    unpins: "Regions unmapped and unpinned.",
    unpinned_bytes: "Bytes unpinned, cumulative.",
    merges: "Regions merged into a larger new one.",
    splits: "Regions split by a partial invalidation (surviving parts re-mapped).",
    chunk_unmaps: "Chunks of a region unmapped by a partial invalidation (the rest stays mapped).",
    chunk_repins: "Chunks of a region re-pinned at their IOVA after a partial invalidation unmapped them.",
    downgrades: "Regions made device-read-only by a protection downgrade.",
    restores: "Downgraded regions given their write permission back by an upgrade.",
    retries: "Submissions or pins retried because an invalidation hit them.",
    window_waits: "Waits for an invalidation window to close.",
    fence_waits: "Invalidations that had to wait for in-flight device work.",
    wait_ns: "Time invalidations spent waiting for the device, in ns.",
    device_resets: "Device resets after a fence wait timed out.",
    evictions: "Idle regions evicted for the budget or the mapping limit.",
    pin_retries: "Pin attempts retried after the kernel refused (EAGAIN, or ENOMEM after an eviction).",
    pin_failures: "Pin attempts that failed for good (the error went to the caller).",
    validation_failures: "Cache hits whose pages no longer matched (validation mode).",
    window_wait_ns: "Time pins spent waiting for invalidation windows to close, in ns.",
    quarantined: "Regions unmapped while device work may still reach them: their IOVA range is held back until it is proven finished.",
    trims: "Batches that fit only once every idle region was evicted (their references hit regions larger than they need).",
}

impl Stats {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, v) in self.fields() {
            writeln!(f, "{n:>24} {v}")?;
        }
        Ok(())
    }
}
