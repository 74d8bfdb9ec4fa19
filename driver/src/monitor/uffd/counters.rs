//! The monitor's counters.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! uffd_counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Live counters, all Relaxed: they order nothing, a snapshot is a set of
        /// independent readings.
        #[derive(Debug, Default)]
        pub(super) struct Counters {
            $(pub(super) $name: AtomicU64,)*
        }

        /// A reading of the monitor's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct UffdCounters {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Counters {
            pub(super) fn snapshot(&self) -> UffdCounters {
                UffdCounters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl UffdCounters {
            /// `(name, value)` pairs, for printing and JSON.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

uffd_counters! {
    remove: "UFFD_EVENT_REMOVE events read (destructive madvise).",
    unmap: "UFFD_EVENT_UNMAP events read (munmap, mmap over, brk shrink).",
    remap: "UFFD_EVENT_REMAP events read (moving mremap).",
    fork: "UFFD_EVENT_FORK events read (each child's userfaultfd closed).",
    pagefault: "UFFD_EVENT_PAGEFAULT events read: never expected (logged, page un-protected).",
    unknown: "Events of a kind this monitor does not know.",
    handled: "Invalidations the handler thread completed.",
    invalidation_errors: "Invalidations that returned an error (logged).",
    registered: "Ranges registered with UFFDIO_REGISTER.",
    register_busy: "Ranges already registered with another userfaultfd (EBUSY): not monitored.",
    register_unsupported: "Ranges the kernel cannot register (EINVAL: file-backed, or shmem/hugetlb without WP support): not monitored.",
    register_failed: "Other registration failures (the range is gone, ...): not monitored.",
}

impl UffdCounters {
    /// Events read, every kind.
    pub fn events(&self) -> u64 {
        self.remove + self.unmap + self.remap + self.fork + self.pagefault + self.unknown
    }

    /// Registrations that failed, every reason.
    pub fn registration_failures(&self) -> u64 {
        self.register_busy + self.register_unsupported + self.register_failed
    }
}

impl std::fmt::Display for UffdCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, v) in self.fields() {
            writeln!(f, "{n:>24} {v}")?;
        }
        Ok(())
    }
}

pub(super) fn bump(c: &AtomicU64) {
    // Relaxed: see Counters.
    c.fetch_add(1, Ordering::Relaxed);
}
