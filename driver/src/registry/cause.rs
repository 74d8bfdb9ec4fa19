//! Why a range is invalidated, and what the registry does about it: the policy per
//! cause (seeds 001 and 002: innocent invalidations exist, and knowing why lets the
//! driver do less).

/// Why a range is being invalidated. The policy depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `munmap` (or `mmap(MAP_FIXED)`, `brk` shrink, `shmdt`): the pages go away.
    Unmap,
    /// A destructive `madvise`: `MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`.
    Discard,
    /// `mremap` moved the range to `to` (0: the kernel chose). The old range is
    /// dropped like an unmap: the pages now live at `to`, and registrations there pin
    /// them on their next use (eagerly re-pinning a destination nobody may use would
    /// only spend pins). With `MREMAP_FIXED`, whatever was mapped at the destination
    /// goes away too: the monitors report that range separately, as [`Cause::Unmap`].
    Remap {
        /// The destination (0: the kernel chose).
        to: u64,
    },
    /// `mprotect` to `new_prot` (`PROT_*` bits). Write removed: the device mapping
    /// becomes read-only before the call returns. `PROT_NONE`: invalidated. Write
    /// added: downgraded regions get write back, nothing is unpinned.
    Protect {
        /// The new protection (`PROT_*` bits).
        new_prot: i32,
    },
    /// The process forked. The parent keeps its pages (see [`crate::fork`]): nothing
    /// to do.
    Fork,
    /// Teardown: the application or the registry releases the range.
    Release,
}

impl Cause {
    /// Index into [`CAUSE_NAMES`](super::CAUSE_NAMES) and the per-cause counters.
    pub fn index(&self) -> usize {
        match self {
            Cause::Unmap => 0,
            Cause::Discard => 1,
            Cause::Remap { .. } => 2,
            Cause::Protect { .. } => 3,
            Cause::Fork => 4,
            Cause::Release => 5,
        }
    }
}

/// What an invalidation does to the regions it overlaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    /// Nothing (fork in the parent).
    Nothing,
    /// Give downgraded regions their write permission back (protection upgrade).
    Restore,
    /// Make writable regions device-read-only (protection downgrade).
    Downgrade,
    /// Unmap and unpin; the parts outside the range are re-mapped (split).
    Drop,
}

pub(super) fn policy(cause: Cause) -> Action {
    match cause {
        Cause::Fork => Action::Nothing,
        Cause::Protect { new_prot } if new_prot & (libc::PROT_READ | libc::PROT_WRITE) == 0 => {
            Action::Drop
        }
        Cause::Protect { new_prot } if new_prot & libc::PROT_WRITE == 0 => Action::Downgrade,
        Cause::Protect { .. } => Action::Restore,
        Cause::Unmap | Cause::Discard | Cause::Remap { .. } | Cause::Release => Action::Drop,
    }
}
