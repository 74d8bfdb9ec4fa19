//! The BPF filter program: which calls trap, and from which code.

use std::ops::Range;

pub(super) const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// The calls trapped (besides `mmap` with `MAP_FIXED` or `PROT_EXEC`).
pub(super) const TRAPPED: [i64; 9] = [
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_shmdt,
    libc::SYS_process_madvise,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
];

/// The filter program. Layout:
/// ```text
///   arch != x86_64            → ALLOW
///   nr == mmap && !MAP_FIXED && !PROT_EXEC → ALLOW
///   nr not in TRAPPED         → ALLOW
///   ip == trampoline          → ALLOW
///   ip in a text range        → TRAP
///   otherwise                 → ALLOW
/// ```
pub(super) fn bpf_filter(trampoline: u64, text: &[Range<u64>]) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W,
    };
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const TRAP: u32 = libc::SECCOMP_RET_TRAP;
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ld = |k: u32| ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, k);
    let ret = |k: u32| ins(BPF_RET | BPF_K, 0, 0, k);
    let jeq = |k: u32, jt: u8, jf: u8| ins(BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k);
    let trapped = TRAPPED;
    // seccomp_data: nr @0, arch @4, instruction_pointer @8 (lo) / @12 (hi), args[i] @16+8i.
    let mut p = vec![
        ld(4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(ALLOW),
        ld(0),
        jeq(libc::SYS_mmap as u32, 0, 6),
        ld(16 + 3 * 8),
        ins(BPF_JMP | BPF_JSET | BPF_K, 3, 0, libc::MAP_FIXED as u32),
        ld(16 + 2 * 8),
        ins(BPF_JMP | BPF_JSET | BPF_K, 1, 0, libc::PROT_EXEC as u32),
        ret(ALLOW),
        // MAP_FIXED or PROT_EXEC: to the IP checks.
        ins(BPF_JMP | BPF_JA, 0, 0, trapped.len() as u32 + 1),
    ];
    for (i, nr) in trapped.iter().enumerate() {
        let to_ip = (trapped.len() - i) as u8; // skip the rest and the ALLOW
        p.push(jeq(*nr as u32, to_ip, 0));
    }
    p.push(ret(ALLOW));
    // IP checks. The trampoline first.
    p.push(ld(12));
    p.push(jeq((trampoline >> 32) as u32, 0, 3));
    p.push(ld(8));
    p.push(jeq(trampoline as u32, 0, 1));
    p.push(ret(ALLOW));
    // Then each text range [a, b): trap if a <= ip < b. Compares the high word, then
    // the low word (ranges never straddle a 4 GiB boundary in practice; one that does
    // is split).
    let mut pieces = Vec::new();
    for r in text {
        let mut a = r.start;
        while a < r.end {
            let b = r.end.min((a | 0xffff_ffff) + 1);
            pieces.push((a, b));
            a = b;
        }
    }
    for (a, b) in pieces {
        // ld hi; jeq hi(a) ? next : skip 5; ld lo; jge lo(a) ? next : skip 3;
        // jge lo(b) ? skip 1 : next; ret TRAP
        let lo_b = b as u32;
        let ends_at_boundary = lo_b == 0;
        p.push(ld(12));
        p.push(jeq((a >> 32) as u32, 0, 4));
        p.push(ld(8));
        p.push(ins(BPF_JMP | BPF_JGE | BPF_K, 0, 2, a as u32));
        if ends_at_boundary {
            p.push(ins(BPF_JMP | BPF_JA, 0, 0, 0));
        } else {
            p.push(ins(BPF_JMP | BPF_JGE | BPF_K, 1, 0, lo_b));
        }
        p.push(ret(TRAP));
    }
    p.push(ret(ALLOW));
    p
}
