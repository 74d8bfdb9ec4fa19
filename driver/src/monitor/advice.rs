//! Which `madvise` advice can change the pages behind a pinned range: the one
//! classification every monitor uses (the seccomp decoder, the LD_PRELOAD hooks, and
//! `process_madvise` / `IORING_OP_MADVISE` alike).
//!
//! **Fail safe.** The list below is the advice *known* to leave pinned pages in place;
//! every other value, including any a future kernel adds, is treated as destructive
//! (the range is invalidated before the call, which costs at most a re-pin on next
//! use). Each harmless entry is proven by `tests/advice.rs`: a pinned page keeps its
//! PFN across the call, and a device write after it is what the process reads.
//!
//! Why each is harmless for a long-term pinned page:
//! * `NORMAL`, `RANDOM`, `SEQUENTIAL`, `WILLNEED`: read-ahead hints;
//! * `DONTFORK`, `DOFORK`, `WIPEONFORK`, `KEEPONFORK`: what a fork child gets; the
//!   parent's pages stay;
//! * `MERGEABLE`, `UNMERGEABLE`: KSM never merges a pinned page;
//! * `HUGEPAGE`, `NOHUGEPAGE`, `COLLAPSE`: khugepaged and `MADV_COLLAPSE` do not
//!   collapse pinned pages (`COLLAPSE` fails with `EAGAIN`);
//! * `DONTDUMP`, `DODUMP`: core dumps;
//! * `COLD`, `PAGEOUT`: reclaim does not take pinned pages;
//! * `POPULATE_READ`, `POPULATE_WRITE`: fault in what is missing; a pinned page is
//!   present and, pinned writable, exclusive (no copy-on-write left to break).
//!
//! Destructive, among others: `DONTNEED`, `DONTNEED_LOCKED`, `FREE` (pinned pages keep
//! their data, but the process declared it may lose them: treated as a discard),
//! `REMOVE`, `HWPOISON`, `SOFT_OFFLINE`, `GUARD_INSTALL` (zaps the range),
//! `GUARD_REMOVE` (treated so: not proven harmless).

/// Advice known to leave pinned pages where they are: (value, name).
pub const HARMLESS: &[(i32, &str)] = &[
    (libc::MADV_NORMAL, "MADV_NORMAL"),
    (libc::MADV_RANDOM, "MADV_RANDOM"),
    (libc::MADV_SEQUENTIAL, "MADV_SEQUENTIAL"),
    (libc::MADV_WILLNEED, "MADV_WILLNEED"),
    (libc::MADV_DONTFORK, "MADV_DONTFORK"),
    (libc::MADV_DOFORK, "MADV_DOFORK"),
    (libc::MADV_MERGEABLE, "MADV_MERGEABLE"),
    (libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE"),
    (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
    (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
    (libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
    (libc::MADV_DODUMP, "MADV_DODUMP"),
    (18, "MADV_WIPEONFORK"),
    (19, "MADV_KEEPONFORK"),
    (20, "MADV_COLD"),
    (21, "MADV_PAGEOUT"),
    (22, "MADV_POPULATE_READ"),
    (23, "MADV_POPULATE_WRITE"),
    (25, "MADV_COLLAPSE"),
];

/// Whether `advice` may change (discard, replace, poison, guard) the pages of the range:
/// everything not in [`HARMLESS`].
pub fn is_destructive(advice: i32) -> bool {
    !HARMLESS.iter().any(|(v, _)| *v == advice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_destructive_advice_invalidates() {
        for a in [
            libc::MADV_DONTNEED,
            libc::MADV_FREE,
            libc::MADV_REMOVE,
            24,  // MADV_DONTNEED_LOCKED
            100, // MADV_HWPOISON
            101, // MADV_SOFT_OFFLINE
            102, // MADV_GUARD_INSTALL
            103, // MADV_GUARD_REMOVE
            26,  // not assigned yet: a future kernel's
            -1,
            i32::MAX,
        ] {
            assert!(is_destructive(a), "{a}");
        }
        for (a, name) in HARMLESS {
            assert!(!is_destructive(*a), "{name}");
        }
    }
}
