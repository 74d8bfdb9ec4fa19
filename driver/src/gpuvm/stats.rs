//! GPU VM counters: lock-free atomics bumped where they count, read as a
//! [`GpuVmStats`]. Every counter is Relaxed: they order nothing.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// A VM's live counters.
        #[derive(Debug, Default)]
        pub(super) struct Counters {
            $(pub(super) $name: AtomicU64,)*
        }

        /// A reading of a VM's counters.
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct GpuVmStats {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Counters {
            pub(super) fn snapshot(&self) -> GpuVmStats {
                GpuVmStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl GpuVmStats {
            /// `(name, value)` pairs, for printing and JSON.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    binds: "Userptr and device-memory bindings made.",
    unbinds: "Bindings removed by `unbind`.",
    rebinds: "Invalidated bindings mapped again (at a submission, or on a fault).",
    pt_pages_allocated: "Page-table pages allocated.",
    pt_pages_freed: "Page-table pages freed (munmap, unbind, teardown).",
    ptes_written: "Leaf entries written (4 KiB and 2 MiB).",
    ptes_zapped: "Leaf entries made non-present by invalidations and unbinds.",
    write_bits_cleared: "Leaf entries made read-only by protection downgrades.",
    tlb_invalidations: "TLB invalidation requests posted and waited for.",
    invalidations: "Registry unmap notices that hit a binding of this VM.",
    downgrades: "Registry downgrade notices that hit a binding of this VM.",
    fence_waits: "Invalidations that waited for the VM's work first.",
    faults: "Replayable faults received for this VM.",
    faults_replayed: "Faults resolved (mapped) and replayed.",
    faults_failed: "Faults answered FAIL (the process could not make the access, or the pin failed).",
    svm_chunks_4k: "SVM chunks of 4 KiB bound by the fault handler.",
    svm_chunks_64k: "SVM chunks of 64 KiB bound by the fault handler.",
    svm_chunks_2m: "SVM chunks of 2 MiB bound by the fault handler.",
    svm_region_binds: "SVM bindings of other sizes: the unbound parts of a registry region (merged pins) bound at once.",
    submissions: "Batches submitted through the VM.",
}

pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
