//! Exec-range tracking: which code the filters cover, and a small filter of its own for
//! every range made executable after install.
//!
//! The main filter covers the executable mappings of the process at install
//! ([`text_ranges`]). After install, code becomes executable only through trapped calls,
//! and each path is followed:
//! * `mmap` (x86_64), `mmap2` and the old `mmap` (i386) with `PROT_EXEC`;
//! * `mprotect` / `pkey_mprotect` adding `PROT_EXEC`;
//! * `mremap` of a range that overlaps covered code: the destination is covered;
//! * `shmat` with `SHM_EXEC` (also through i386 `ipc`);
//! * `READ_IMPLIES_EXEC` (every readable mapping executable) cannot be followed: install
//!   refuses a process running with it, and `personality` may not set it afterwards.
//!
//! A new range is rounded out to 2 MiB (a JIT's code pages then share one filter) and
//! gets a filter of its own, stacked on every thread (filters stack; TRAP wins over
//! ALLOW). At most [`MAX_EXEC_RANGES`]; when the table is full, a call that would make
//! new code executable outside the covered ranges is refused (`ENOMEM`) before it runs:
//! fail safe, never unmonitored code. Not followed: a `clone(CLONE_VM)` child process
//! (not a thread) making code executable gets the filter on its own threads only.

use super::abi::{Abi, Op, SHM_EXEC};
use super::decode::{old_mmap_args, page_range, shm_size};
use super::user_memory;
use super::Counters;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Executable ranges mapped after installation that get a filter of their own.
pub const MAX_EXEC_RANGES: usize = 256;
const GRAIN: u64 = 2 << 20;

/// The executable ranges of the process at the first install (the main filter's).
static TEXT: OnceLock<Vec<(u64, u64)>> = OnceLock::new();
/// The ranges added after installation: (start, end), written once each.
static EXEC_RANGES: [(AtomicU64, AtomicU64); MAX_EXEC_RANGES] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_EXEC_RANGES];
static EXEC_COUNT: AtomicU32 = AtomicU32::new(0);

/// The executable mappings of the process now, adjacent ones merged.
pub(super) fn text_ranges() -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut v: Vec<(u64, u64)> = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.contains('x') || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        match v.last_mut() {
            Some(l) if l.1 == a => l.1 = b,
            _ => v.push((a, b)),
        }
    }
    v
}

/// Record the main filter's ranges (first install only; later installs reuse it).
pub(super) fn set_text(text: Vec<(u64, u64)>) -> &'static [(u64, u64)] {
    TEXT.get_or_init(|| text)
}

fn added() -> impl Iterator<Item = (u64, u64)> {
    // Acquire: pairs with the Release stores in `cover`.
    let n = (EXEC_COUNT.load(Ordering::Acquire) as usize).min(MAX_EXEC_RANGES);
    EXEC_RANGES[..n]
        .iter()
        .map(|(a, b)| (a.load(Ordering::Acquire), b.load(Ordering::Acquire)))
}

/// Whether `r` lies inside code the filters already cover.
fn covered(r: &Range<u64>) -> bool {
    let inside = |(a, b): (u64, u64)| a <= r.start && r.end <= b;
    TEXT.get().is_some_and(|t| t.iter().copied().any(inside)) || added().any(inside)
}

/// Whether `r` overlaps covered code.
fn overlaps_code(r: &Range<u64>) -> bool {
    let meets = |(a, b): (u64, u64)| a < r.end && r.start < b;
    TEXT.get().is_some_and(|t| t.iter().copied().any(meets)) || added().any(meets)
}

fn is_err(abi: Abi, r: i64) -> bool {
    match abi {
        Abi::X86_64 => (-4095..0).contains(&r),
        Abi::I386 => (r as u32) > 0xffff_f000,
    }
}

fn addr(abi: Abi, r: i64) -> u64 {
    match abi {
        Abi::X86_64 => r as u64,
        Abi::I386 => r as u32 as u64,
    }
}

/// Whether a call may make memory executable that is not covered yet (decided before
/// it runs, from its arguments).
fn may_make_code(op: Op, a: [u64; 6]) -> bool {
    let exec = libc::PROT_EXEC as u64;
    match op {
        Op::Mmap => a[2] & exec != 0,
        Op::OldMmap => old_mmap_args(a[0]).is_some_and(|m| m[2] & exec != 0),
        Op::Mprotect | Op::PkeyMprotect => {
            a[2] & exec != 0 && page_range(a[0], a[1]).is_some_and(|r| !covered(&r))
        }
        Op::Mremap => page_range(a[0], a[1]).is_some_and(|r| overlaps_code(&r)),
        Op::Shmat => a[2] as u32 & SHM_EXEC != 0,
        Op::Ipc => a[0] & 0xffff == 21 && a[2] as u32 & SHM_EXEC != 0,
        _ => false,
    }
}

/// Before a call runs: false if it may make new code executable and no filter is left
/// for it (the call is then refused with `ENOMEM`).
pub(super) fn room_for(op: Op, a: [u64; 6]) -> bool {
    // Relaxed: a conservative pre-check; `cover` re-checks the slot it takes.
    !may_make_code(op, a) || (EXEC_COUNT.load(Ordering::Relaxed) as usize) < MAX_EXEC_RANGES
}

/// After a call succeeded with result `r`: the range it made executable, if any.
pub(super) fn made_executable(abi: Abi, op: Op, a: [u64; 6], r: i64) -> Option<Range<u64>> {
    if is_err(abi, r) {
        return None;
    }
    let exec = libc::PROT_EXEC as u64;
    match op {
        Op::Mmap if a[2] & exec != 0 => page_range(addr(abi, r), a[1]),
        Op::OldMmap => old_mmap_args(a[0])
            .filter(|m| m[2] & exec != 0)
            .and_then(|m| page_range(addr(abi, r), m[1])),
        Op::Mprotect | Op::PkeyMprotect if a[2] & exec != 0 => page_range(a[0], a[1]),
        Op::Mremap if page_range(a[0], a[1]).is_some_and(|o| overlaps_code(&o)) => {
            page_range(addr(abi, r), a[2])
        }
        Op::Shmat if a[2] as u32 & SHM_EXEC != 0 => page_range(addr(abi, r), shm_size(a[0])?),
        Op::Ipc if a[0] & 0xffff == 21 && a[2] as u32 & SHM_EXEC != 0 => {
            // ipc(SHMAT, id, flags, &raddr, addr): the address is stored at raddr.
            let at = user_memory::read_u32(a[3])? as u64;
            page_range(at, shm_size(a[1])?)
        }
        _ => None,
    }
}

/// Cover `r` (rounded out to 2 MiB) with a filter of its own, unless it is covered.
/// Async-signal-safe: the program is built on the stack and loaded with one syscall.
pub(super) fn cover(r: Range<u64>, counters: &Counters) {
    let r = (r.start & !(GRAIN - 1))..r.end.checked_next_multiple_of(GRAIN).unwrap_or(u64::MAX);
    if covered(&r) {
        return;
    }
    // Relaxed: a slot index; the slot's contents are published below.
    let i = EXEC_COUNT.fetch_add(1, Ordering::Relaxed) as usize;
    if i >= MAX_EXEC_RANGES {
        // A race past `room_for`: counted; `room_for` refuses from now on.
        counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = [libc::sock_filter {
        code: 0,
        jt: 0,
        jf: 0,
        k: 0,
    }; 96];
    let Some(prog) = super::bpf::exec_range_filter(&mut buf, &[(r.start, r.end)]) else {
        counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    if super::bpf::load(prog) != 0 {
        counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Release: a reader that sees the end sees the start (written first).
    EXEC_RANGES[i].0.store(r.start, Ordering::Release);
    EXEC_RANGES[i].1.store(r.end, Ordering::Release);
    counters.exec_ranges_added.fetch_add(1, Ordering::Relaxed);
}
