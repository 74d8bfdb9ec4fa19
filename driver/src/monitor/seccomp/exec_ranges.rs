//! Exec-range tracking: which code the filters cover, and small filters of their own
//! for code made executable after installation (`dlopen`, JITs).

use super::bpf::{AUDIT_ARCH_X86_64, TRAPPED};
use super::decode::page_range;
use super::Shared;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The executable mappings of the process now (the code whose calls are monitored).
pub(super) fn text_ranges() -> Vec<Range<u64>> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut v: Vec<Range<u64>> = Vec::new();
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
            Some(l) if l.end == a => l.end = b,
            _ => v.push(a..b),
        }
    }
    v
}

/// Executable ranges mapped after installation that got a filter of their own.
pub const MAX_EXEC_RANGES: usize = 256;

/// The executable ranges added after installation: (start, end), written once each.
/// A fixed table of atomics: the handler reads and appends without allocating.
pub(super) static EXEC_RANGES: [(AtomicU64, AtomicU64); MAX_EXEC_RANGES] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_EXEC_RANGES];
pub(super) static EXEC_COUNT: AtomicU32 = AtomicU32::new(0);

/// The range a successful call made executable, if any.
pub(super) fn new_exec_range(nr: i64, a: [u64; 6], r: i64) -> Option<Range<u64>> {
    let prot = a[2];
    if prot & libc::PROT_EXEC as u64 == 0 || r < 0 {
        return None;
    }
    match nr {
        libc::SYS_mmap => page_range(r as u64, a[1]),
        libc::SYS_mprotect if r == 0 => page_range(a[0], a[1]),
        _ => None,
    }
}

/// Whether `r` lies inside code the filters already cover.
pub(super) fn exec_covered(s: &Shared, r: &Range<u64>) -> bool {
    let inside = |a: u64, b: u64| a <= r.start && r.end <= b;
    if s.text.iter().any(|t| inside(t.start, t.end)) {
        return true;
    }
    // Acquire: pairs with the Release stores in `add_exec_range`.
    let n = (EXEC_COUNT.load(Ordering::Acquire) as usize).min(MAX_EXEC_RANGES);
    EXEC_RANGES[..n]
        .iter()
        .any(|(a, b)| inside(a.load(Ordering::Acquire), b.load(Ordering::Acquire)))
}

/// After a call made `r` executable: stack a filter that traps the monitored calls
/// made from it. Async-signal-safe: a fixed program on the stack and one syscall.
pub(super) fn add_exec_range(s: &Shared, r: Range<u64>) {
    if exec_covered(s, &r) {
        return;
    }
    let straddles = r.start >> 32 != (r.end - 1) >> 32;
    // Relaxed: a slot index; the slot's contents are published below.
    let i = EXEC_COUNT.fetch_add(1, Ordering::Relaxed) as usize;
    if straddles || i >= MAX_EXEC_RANGES {
        s.counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    use libc::{BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    const N: usize = TRAPPED.len() + 1;
    let mut p = [ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW); 4 + N + 1 + 6 + 1];
    p[0] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 4);
    p[1] = ins(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, AUDIT_ARCH_X86_64);
    // p[2]: ALLOW (another architecture)
    p[3] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0);
    for (k, nr) in TRAPPED.iter().chain([&libc::SYS_mmap]).enumerate() {
        // Match: skip the remaining compares and the ALLOW, to the IP check.
        p[4 + k] = ins(BPF_JMP | BPF_JEQ | BPF_K, (N - k) as u8, 0, *nr as u32);
    }
    // p[4 + N]: ALLOW (not a monitored call)
    let at = 4 + N + 1;
    let lo_end = r.end as u32;
    p[at] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 12);
    p[at + 1] = ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 4, (r.start >> 32) as u32);
    p[at + 2] = ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 8);
    p[at + 3] = ins(BPF_JMP | BPF_JGE | BPF_K, 0, 2, r.start as u32);
    p[at + 4] = if lo_end == 0 {
        ins(BPF_JMP | BPF_JA, 0, 0, 0) // ends at a 4 GiB boundary: any low word is below
    } else {
        ins(BPF_JMP | BPF_JGE | BPF_K, 1, 0, lo_end)
    };
    p[at + 5] = ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_TRAP);
    // p[at + 6]: ALLOW
    let prog = libc::sock_fprog {
        len: p.len() as u16,
        filter: p.as_ptr() as *mut _,
    };
    // SAFETY: a complete program that outlives the call; NO_NEW_PRIVS was set at
    // install; TSYNC puts it on every thread, as the first filter is.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        s.counters
            .exec_ranges_unmonitored
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Release: a reader that sees the end sees the start (written first).
    EXEC_RANGES[i].0.store(r.start, Ordering::Release);
    EXEC_RANGES[i].1.store(r.end, Ordering::Release);
    s.counters.exec_ranges_added.fetch_add(1, Ordering::Relaxed);
}
