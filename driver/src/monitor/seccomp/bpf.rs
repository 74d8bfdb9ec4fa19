//! The BPF filter programs: which calls trap, and from which code.
//!
//! The main filter (installed once, on every thread):
//! ```text
//!   arch == x86_64:
//!     x32 bit set, or clone3           → REFUSE-from-text
//!     nr > KNOWN_MAX                   → IP64 (the handler refuses it)
//!     nr in X86_64_OPS (with the argument conditions below) → IP64
//!     otherwise                        → ALLOW (constant: the kernel's cache skips us)
//!   arch == i386:
//!     clone3                           → REFUSE-from-text
//!     fork, vfork, clone               → ALLOW
//!     otherwise                        → IP32 (every i386 call from monitored code)
//!   any other arch                     → ERRNO(ENOSYS)
//!   IP64: ip after the driver's syscall or sigreturn gate → ALLOW; ip in text → TRAP
//!   IP32: ip after the driver's int 0x80 or its i386 sigreturn gates → ALLOW; in text → TRAP
//!   REFUSE-from-text: ip in text → ERRNO(ENOSYS), else ALLOW
//! ```
//! Argument conditions (x86_64): `mmap` with `MAP_FIXED` or `PROT_EXEC`; `shmat` with
//! `SHM_REMAP` or `SHM_EXEC`; `ioctl` `UFFDIO_MOVE` / `UFFDIO_POISON`;
//! `io_uring_register` `RESTRICTIONS` / `ENABLE_RINGS`; `ppoll`, `pselect6`,
//! `epoll_pwait(2)`, `io_uring_enter` only with a signal mask (their pointer argument
//! non-null). `clone3` is refused (`ENOSYS`) because its flags live in memory the
//! filter cannot read and the call cannot be performed from a signal handler; glibc
//! falls back to `clone`, which the filter does see.
//!
//! An exec-range filter (stacked for code made executable after install) is small:
//! from inside its ranges every call traps (the handler knows them all), except the
//! process-creating ones, and `clone3` and x32 calls are refused.
//!
//! Programs are written into a caller's buffer, so the handler can build an exec-range
//! filter without allocating. Conditional jumps reach their label through a `ja`
//! (32-bit offset), so no program outgrows the 8-bit jump offsets.

use super::abi::{
    Op, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, I386_NEVER_TRAPPED, IORING_REGISTER_ENABLE_RINGS,
    IORING_REGISTER_RESTRICTIONS, KNOWN_MAX, NR_CLONE3, SHM_EXEC, SHM_REMAP, UFFDIO_MOVE,
    UFFDIO_POISON, X32_BIT, X86_64_NEVER_TRAPPED, X86_64_OPS,
};
use libc::sock_filter;

/// The data in our TRAP actions (the handler's `si_errno`): a SIGSYS with other data
/// came from someone else's filter.
pub(super) const TRAP_DATA: u32 = 0x5550;
const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const TRAP: u32 = libc::SECCOMP_RET_TRAP | TRAP_DATA;
const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

// seccomp_data: nr @0, arch @4, instruction_pointer @8, args[i] @16 + 8i.
const NR: u32 = 0;
const ARCH: u32 = 4;
const IP_LO: u32 = 8;
const IP_HI: u32 = 12;
const fn arg_lo(i: u32) -> u32 {
    16 + 8 * i
}
const fn arg_hi(i: u32) -> u32 {
    20 + 8 * i
}

/// The instruction pointers the filter lets through (the driver's own call sites).
#[derive(Clone, Copy, Debug)]
pub(super) struct Gates {
    /// After the x86_64 trampoline's `syscall` and after the sigreturn gate's.
    pub(super) x86_64: [u64; 2],
    /// After the `int 0x80` trampoline and after the two i386 sigreturn gates.
    pub(super) i386: [u64; 3],
}

/// Labels of the main program.
#[derive(Clone, Copy, PartialEq, Eq)]
enum L {
    X86,
    I386,
    Ip64,
    Ip32,
    Refuse,
    Allow,
    /// An argument-condition block for the op at this index of `X86_64_OPS`.
    Cond(usize),
}

const MAX_FIXUPS: usize = 128;
const MAX_LABELS: usize = 64;

/// A program being written into a fixed buffer: no allocation.
pub(super) struct Prog<'a> {
    buf: &'a mut [sock_filter],
    len: usize,
    overflow: bool,
    labels: [(Option<L>, usize); MAX_LABELS],
    nlabels: usize,
    fixups: [(usize, Option<L>); MAX_FIXUPS],
    nfixups: usize,
}

fn ins(code: u32, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

impl<'a> Prog<'a> {
    pub(super) fn new(buf: &'a mut [sock_filter]) -> Prog<'a> {
        Prog {
            buf,
            len: 0,
            overflow: false,
            labels: [(None, 0); MAX_LABELS],
            nlabels: 0,
            fixups: [(0, None); MAX_FIXUPS],
            nfixups: 0,
        }
    }

    fn push(&mut self, i: sock_filter) {
        if self.len < self.buf.len() {
            self.buf[self.len] = i;
            self.len += 1;
        } else {
            self.overflow = true;
        }
    }

    fn ld(&mut self, off: u32) {
        use libc::{BPF_ABS, BPF_LD, BPF_W};
        self.push(ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, off));
    }

    fn ret(&mut self, k: u32) {
        use libc::{BPF_K, BPF_RET};
        self.push(ins(BPF_RET | BPF_K, 0, 0, k));
    }

    fn label(&mut self, l: L) {
        if self.nlabels < MAX_LABELS {
            self.labels[self.nlabels] = (Some(l), self.len);
            self.nlabels += 1;
        } else {
            self.overflow = true;
        }
    }

    fn ja(&mut self, l: L) {
        use libc::{BPF_JA, BPF_JMP};
        if self.nfixups < MAX_FIXUPS {
            self.fixups[self.nfixups] = (self.len, Some(l));
            self.nfixups += 1;
        } else {
            self.overflow = true;
        }
        self.push(ins(BPF_JMP | BPF_JA, 0, 0, 0));
    }

    /// If `A <op> k`, go to `l` (through a `ja`), else fall through.
    fn jump_if(&mut self, op: u32, k: u32, l: L) {
        use libc::{BPF_JMP, BPF_K};
        self.push(ins(BPF_JMP | op | BPF_K, 0, 1, k));
        self.ja(l);
    }

    /// `ret action` if `A == k`.
    fn ret_if_eq(&mut self, k: u32, action: u32) {
        use libc::{BPF_JEQ, BPF_JMP, BPF_K};
        self.push(ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, k));
        self.ret(action);
    }

    fn jeq(&mut self, k: u32, l: L) {
        self.jump_if(libc::BPF_JEQ, k, l);
    }

    fn jset(&mut self, k: u32, l: L) {
        self.jump_if(libc::BPF_JSET, k, l);
    }

    fn jgt(&mut self, k: u32, l: L) {
        self.jump_if(libc::BPF_JGT, k, l);
    }

    /// `ret action` when the instruction pointer is one of `ips`.
    fn ret_if_ip(&mut self, ips: &[u64], action: u32) {
        use libc::{BPF_JEQ, BPF_JMP, BPF_K};
        for &ip in ips {
            // ld lo; jeq lo(ip) ? next : skip 3; ld hi; jeq hi(ip) ? next : skip 1; ret
            self.ld(IP_LO);
            self.push(ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, ip as u32));
            self.ld(IP_HI);
            self.push(ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, (ip >> 32) as u32));
            self.ret(action);
        }
    }

    /// `ret action` when the instruction pointer lies in one of `ranges` (each split at
    /// 4 GiB boundaries: the comparisons are 32 bits wide).
    fn ret_if_in(&mut self, ranges: &[(u64, u64)], action: u32) {
        use libc::{BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K};
        for &(start, end) in ranges {
            let mut a = start;
            while a < end {
                let b = end.min((a | 0xffff_ffff) + 1);
                // ld hi; jeq hi(a) ? next : skip 4; ld lo; jge lo(a) ? next : skip 2;
                // jge lo(b) ? skip 1 : next (lo(b) = 0: the piece ends at the boundary,
                // every low word is below it); ret
                self.ld(IP_HI);
                self.push(ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 4, (a >> 32) as u32));
                self.ld(IP_LO);
                self.push(ins(BPF_JMP | BPF_JGE | BPF_K, 0, 2, a as u32));
                if b as u32 == 0 {
                    self.push(ins(BPF_JMP | BPF_JA, 0, 0, 0));
                } else {
                    self.push(ins(BPF_JMP | BPF_JGE | BPF_K, 1, 0, b as u32));
                }
                self.ret(action);
                a = b;
            }
        }
    }

    /// Resolve the jumps; the program, or `None` if the buffer was too small or a label
    /// is missing.
    fn finish(self) -> Option<&'a [sock_filter]> {
        let Prog {
            buf,
            len,
            overflow,
            labels,
            nlabels,
            fixups,
            nfixups,
        } = self;
        if overflow {
            return None;
        }
        for &(at, l) in &fixups[..nfixups] {
            let target = labels[..nlabels].iter().find(|(x, _)| *x == l)?.1;
            // Classic BPF jumps forward only.
            if target <= at {
                return None;
            }
            buf[at].k = (target - at - 1) as u32;
        }
        Some(&buf[..len])
    }
}

/// Write the argument condition under which an x86_64 op traps; false if it has none.
fn condition(p: &mut Prog<'_>, op: Op) -> bool {
    match op {
        Op::Mmap => {
            p.ld(arg_lo(3));
            p.jset(libc::MAP_FIXED as u32, L::Ip64);
            p.ld(arg_lo(2));
            p.jset(libc::PROT_EXEC as u32, L::Ip64);
            p.ret(ALLOW);
            true
        }
        Op::Shmat => {
            p.ld(arg_lo(2));
            p.jset(SHM_REMAP | SHM_EXEC, L::Ip64);
            p.ret(ALLOW);
            true
        }
        Op::Ioctl => {
            p.ld(arg_lo(1));
            p.jeq(UFFDIO_MOVE, L::Ip64);
            p.jeq(UFFDIO_POISON, L::Ip64);
            p.ret(ALLOW);
            true
        }
        Op::IoUringRegister => {
            // With or without IORING_REGISTER_USE_REGISTERED_RING (bit 31).
            p.ld(arg_lo(1));
            p.jeq(IORING_REGISTER_RESTRICTIONS, L::Ip64);
            p.jeq(IORING_REGISTER_ENABLE_RINGS, L::Ip64);
            p.jeq(IORING_REGISTER_RESTRICTIONS | 1 << 31, L::Ip64);
            p.jeq(IORING_REGISTER_ENABLE_RINGS | 1 << 31, L::Ip64);
            p.ret(ALLOW);
            true
        }
        _ => false,
    }
}

/// Whether an op traps only under an argument condition.
fn is_conditional(op: Op) -> bool {
    matches!(
        op,
        Op::Mmap
            | Op::Shmat
            | Op::Ioctl
            | Op::IoUringRegister
            | Op::Ppoll
            | Op::Pselect6
            | Op::EpollPwait
            | Op::EpollPwait2
            | Op::IoUringEnter
    )
}

/// The main filter for code in `text` (page ranges), letting `gates` through.
pub(super) fn main_filter<'a>(
    buf: &'a mut [sock_filter],
    text: &[(u64, u64)],
    gates: Gates,
) -> Option<&'a [sock_filter]> {
    let mut p = Prog::new(buf);
    p.ld(ARCH);
    p.jeq(AUDIT_ARCH_X86_64, L::X86);
    p.jeq(AUDIT_ARCH_I386, L::I386);
    p.ret(ENOSYS);

    p.label(L::X86);
    p.ld(NR);
    p.jset(X32_BIT, L::Refuse);
    p.jeq(NR_CLONE3, L::Refuse);
    p.jgt(KNOWN_MAX, L::Ip64);
    for (i, (nr, op)) in X86_64_OPS.iter().enumerate() {
        p.jeq(
            *nr,
            if is_conditional(*op) {
                L::Cond(i)
            } else {
                L::Ip64
            },
        );
    }
    p.label(L::Allow);
    p.ret(ALLOW);
    for (i, (_, op)) in X86_64_OPS.iter().enumerate() {
        if !is_conditional(*op) {
            continue;
        }
        if matches!(op, Op::Mmap | Op::Shmat | Op::Ioctl | Op::IoUringRegister) {
            p.label(L::Cond(i));
            condition(&mut p, *op);
        } else {
            pointer_condition(&mut p, i, *op);
        }
    }

    p.label(L::I386);
    p.ld(NR);
    p.jeq(NR_CLONE3, L::Refuse);
    for nr in I386_NEVER_TRAPPED {
        p.ret_if_eq(nr, ALLOW);
    }
    p.ja(L::Ip32);

    p.label(L::Ip64);
    p.ret_if_ip(&gates.x86_64, ALLOW);
    p.ret_if_in(text, TRAP);
    p.ret(ALLOW);

    p.label(L::Ip32);
    p.ret_if_ip(&gates.i386, ALLOW);
    p.ret_if_in(text, TRAP);
    p.ret(ALLOW);

    p.label(L::Refuse);
    p.ret_if_in(text, ENOSYS);
    p.ret(ALLOW);
    p.finish()
}

/// The condition block of a call whose mask pointer is argument `arg`: trap when the
/// pointer is non-null.
fn pointer_condition(p: &mut Prog<'_>, i: usize, op: Op) {
    let arg = match op {
        Op::Ppoll => 3,
        Op::Pselect6 => 5,
        _ => 4,
    };
    use libc::{BPF_JEQ, BPF_JMP, BPF_K};
    p.label(L::Cond(i));
    // ld lo; jeq 0 ? skip the ja : (ja Ip64); ld hi; jeq 0 ? ALLOW : (ja Ip64)
    p.ld(arg_lo(arg));
    p.push(ins(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 0));
    p.ja(L::Ip64);
    p.ld(arg_hi(arg));
    p.push(ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0));
    p.ret(ALLOW);
    p.ja(L::Ip64);
}

/// The filter for code made executable after install: `ranges` (the pieces of one
/// newly covered range).
pub(super) fn exec_range_filter<'a>(
    buf: &'a mut [sock_filter],
    ranges: &[(u64, u64)],
) -> Option<&'a [sock_filter]> {
    let mut p = Prog::new(buf);
    p.ld(ARCH);
    p.jeq(AUDIT_ARCH_X86_64, L::X86);
    p.jeq(AUDIT_ARCH_I386, L::I386);
    p.ret(ALLOW);

    p.label(L::X86);
    p.ld(NR);
    p.jset(X32_BIT, L::Refuse);
    p.jeq(NR_CLONE3, L::Refuse);
    for nr in X86_64_NEVER_TRAPPED {
        p.jeq(nr, L::Allow);
    }
    p.ja(L::Ip64);

    p.label(L::I386);
    p.ld(NR);
    p.jeq(NR_CLONE3, L::Refuse);
    for nr in I386_NEVER_TRAPPED {
        p.jeq(nr, L::Allow);
    }
    p.ja(L::Ip64);

    p.label(L::Ip64);
    p.ret_if_in(ranges, TRAP);
    p.label(L::Allow);
    p.ret(ALLOW);

    p.label(L::Refuse);
    p.ret_if_in(ranges, ENOSYS);
    p.ret(ALLOW);
    p.finish()
}

/// Load `prog` as a filter on every thread (TSYNC). The caller set NO_NEW_PRIVS.
/// Returns the raw result (0, or -errno; TSYNC failing gives the thread id).
pub(super) fn load(prog: &[sock_filter]) -> i64 {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    // SAFETY: a complete program and its descriptor, both outliving the call; seccomp
    // copies the program.
    unsafe {
        crate::trampoline::syscall(
            libc::SYS_seccomp,
            [
                libc::SECCOMP_SET_MODE_FILTER as u64,
                libc::SECCOMP_FILTER_FLAG_TSYNC,
                &fprog as *const libc::sock_fprog as u64,
                0,
                0,
                0,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter of the classic-BPF subset the programs use, to check them
    /// without installing anything.
    fn run(prog: &[sock_filter], nr: u32, arch: u32, ip: u64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[8..16].copy_from_slice(&ip.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            let code = i.code as u32;
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let k = i.k as usize;
                    a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c => {
                    let t = match c & !(libc::BPF_JMP | libc::BPF_K) {
                        x if x == libc::BPF_JEQ => a == i.k,
                        x if x == libc::BPF_JGE => a >= i.k,
                        x if x == libc::BPF_JGT => a > i.k,
                        x if x == libc::BPF_JSET => a & i.k != 0,
                        x => panic!("unexpected op {x:#x}"),
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
            }
        }
    }

    const GATES: Gates = Gates {
        x86_64: [0x7000_1010, 0x7000_2010],
        i386: [0x7000_3010, 0x7000_4010, 0x7000_5010],
    };
    const TEXT: &[(u64, u64)] = &[
        (0x5555_0000_0000, 0x5555_0010_0000),
        (0xfff0_0000, 0x1_0010_0000),
    ];

    #[test]
    fn the_main_filter_traps_what_it_must_and_nothing_else() {
        let mut buf = [ins(0, 0, 0, 0); 4096];
        let prog = main_filter(&mut buf, TEXT, GATES).unwrap();
        let x = AUDIT_ARCH_X86_64;
        let i = AUDIT_ARCH_I386;
        let text = 0x5555_0000_1000;
        let jit = 0x6666_0000_0000;
        let z = [0; 6];
        // Monitored calls from monitored code trap; from elsewhere they do not.
        assert_eq!(run(prog, 11, x, text, z), TRAP);
        assert_eq!(run(prog, 11, x, jit, z), ALLOW);
        // The driver's own call sites pass.
        assert_eq!(run(prog, 11, x, GATES.x86_64[0], z), ALLOW);
        assert_eq!(run(prog, 15, x, GATES.x86_64[1], z), ALLOW);
        // A range straddling 4 GiB is covered on both sides.
        assert_eq!(run(prog, 28, x, 0xffff_f000, z), TRAP);
        assert_eq!(run(prog, 28, x, 0x1_0000_1000, z), TRAP);
        // Unrelated calls pass; unknown ones trap (the handler refuses them).
        assert_eq!(run(prog, libc::SYS_getpid as u32, x, text, z), ALLOW);
        assert_eq!(run(prog, KNOWN_MAX + 1, x, text, z), TRAP);
        // Conditions: mmap only with MAP_FIXED or PROT_EXEC.
        assert_eq!(run(prog, 9, x, text, [0, 4096, 3, 0x22, 0, 0]), ALLOW);
        assert_eq!(run(prog, 9, x, text, [0, 4096, 3, 0x32, 0, 0]), TRAP);
        assert_eq!(run(prog, 9, x, text, [0, 4096, 5, 0x22, 0, 0]), TRAP);
        // ppoll only with a mask, whichever half of the pointer is non-zero.
        assert_eq!(run(prog, 271, x, text, [1, 1, 0, 0, 8, 0]), ALLOW);
        assert_eq!(run(prog, 271, x, text, [1, 1, 0, 0x1000, 8, 0]), TRAP);
        assert_eq!(
            run(prog, 271, x, text, [1, 1, 0, 0x7f00_0000_0000, 8, 0]),
            TRAP
        );
        // ioctl only for the page-moving userfaultfd commands.
        assert_eq!(run(prog, 16, x, text, [3, 0x5401, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            run(prog, 16, x, text, [3, UFFDIO_MOVE as u64, 0, 0, 0, 0]),
            TRAP
        );
        // x32 and clone3 are refused from monitored code.
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        assert_eq!(run(prog, X32_BIT | 11, x, text, z), enosys);
        assert_eq!(run(prog, NR_CLONE3, x, text, z), enosys);
        assert_eq!(run(prog, NR_CLONE3, x, jit, z), ALLOW);
        // i386: everything from monitored code traps except process creation.
        assert_eq!(run(prog, 91, i, text, z), TRAP);
        assert_eq!(run(prog, 20, i, text, z), TRAP);
        assert_eq!(run(prog, 2, i, text, z), ALLOW);
        assert_eq!(run(prog, 91, i, GATES.i386[0], z), ALLOW);
        assert_eq!(run(prog, 91, i, jit, z), ALLOW);
        // Another architecture cannot be classified.
        assert_eq!(run(prog, 11, 0xc000_00b7, text, z), enosys);
    }

    #[test]
    fn an_exec_range_filter_traps_every_call_from_its_range() {
        let mut buf = [ins(0, 0, 0, 0); 256];
        let prog = exec_range_filter(&mut buf, &[(0x6666_0000_0000, 0x6666_0020_0000)]).unwrap();
        let x = AUDIT_ARCH_X86_64;
        let z = [0; 6];
        assert_eq!(run(prog, 11, x, 0x6666_0000_1000, z), TRAP);
        assert_eq!(run(prog, 39, x, 0x6666_0000_1000, z), TRAP);
        assert_eq!(run(prog, 57, x, 0x6666_0000_1000, z), ALLOW);
        assert_eq!(run(prog, 11, x, 0x5555_0000_1000, z), ALLOW);
        assert_eq!(run(prog, 91, AUDIT_ARCH_I386, 0x6666_0000_1000, z), TRAP);
        assert!(prog.len() < 64, "{} instructions", prog.len());
    }

    #[test]
    fn a_buffer_too_small_is_refused_not_overrun() {
        let mut buf = [ins(0, 0, 0, 0); 16];
        assert!(main_filter(&mut buf, TEXT, GATES).is_none());
    }
}
