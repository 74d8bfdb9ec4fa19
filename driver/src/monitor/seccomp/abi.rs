//! The syscall ABIs a 64-bit x86 process can enter the kernel with, and what each
//! trapped call is, whatever the ABI.
//!
//! A 64-bit process reaches the kernel three ways, and the filter sees all three:
//! * **x86_64** (`syscall`): `AUDIT_ARCH_X86_64`, the native numbers, arguments in
//!   `rdi rsi rdx r10 r8 r9`;
//! * **i386** (`int 0x80`, or `sysenter`/`syscall` from a 32-bit code segment):
//!   `AUDIT_ARCH_I386`, the i386 numbers, 32-bit arguments in `ebx ecx edx esi edi ebp`.
//!   The kernel runs these as compat calls on this process's address space, so they
//!   can unmap and discard exactly like the native ones;
//! * **x32** (`syscall` with bit 30 of the number set): `AUDIT_ARCH_X86_64` with
//!   [`X32_BIT`]. Usually disabled by the kernel; where it is enabled, a 64-bit process
//!   has no business making x32 calls, and calls from monitored code are refused
//!   (`ENOSYS`, what a kernel without x32 answers).
//!
//! Every x86_64 call this monitor knows to change mappings or the signal mask is in
//! [`X86_64_OPS`]; numbers above [`KNOWN_MAX`] (syscalls newer than this table) are
//! refused from monitored code, since nobody here can say what they do. i386 calls from
//! monitored code are all trapped (see `bpf`) and classified with [`I386_OPS`]; the
//! rest are performed as they are.

/// `AUDIT_ARCH_X86_64`.
pub(super) const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `AUDIT_ARCH_I386`.
pub(super) const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `__X32_SYSCALL_BIT`.
pub(super) const X32_BIT: u32 = 0x4000_0000;
/// The highest syscall number classified here (Linux 6.17's `file_setattr`); calls
/// above it from monitored code are refused with `ENOSYS` and counted.
pub(super) const KNOWN_MAX: u32 = 469;

/// `clone3`: refused with `ENOSYS` from monitored code, in both ABIs (see `bpf`).
pub(super) const NR_CLONE3: u32 = 435;
/// The process-creating calls that may never be performed from inside the handler (the
/// child would return into it on the wrong stack): never trapped.
pub(super) const X86_64_NEVER_TRAPPED: [u32; 3] =
    [56 /* clone */, 57 /* fork */, 58 /* vfork */];
/// As [`X86_64_NEVER_TRAPPED`], for i386.
pub(super) const I386_NEVER_TRAPPED: [u32; 3] = [
    2,   /* fork */
    120, /* clone */
    190, /* vfork */
];

/// The ABI of a trapped call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Abi {
    /// The native 64-bit ABI.
    X86_64,
    /// `int 0x80` (and the other compat entries).
    I386,
}

/// What a trapped call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Munmap,
    Mprotect,
    PkeyMprotect,
    Madvise,
    ProcessMadvise,
    Mremap,
    Brk,
    /// x86_64 `mmap`, i386 `mmap2` (offset in pages).
    Mmap,
    /// i386 `mmap` (90): the arguments are a struct in memory.
    OldMmap,
    Shmat,
    Shmdt,
    /// i386 `ipc` (117): `SHMAT` and `SHMDT` are multiplexed through it.
    Ipc,
    RemapFilePages,
    RtSigprocmask,
    /// i386 `sigprocmask` (126): a 32-bit mask.
    Sigprocmask,
    /// i386 `ssetmask` (69): sets the first 32 signals' mask.
    Ssetmask,
    RtSigaction,
    /// i386 `sigaction` (67): the old struct with a 32-bit mask.
    Sigaction,
    /// i386 `signal` (48).
    Signal,
    RtSigreturn,
    /// i386 `sigreturn` (119).
    Sigreturn,
    RtSigsuspend,
    /// i386 `sigsuspend` (72): the mask is the third argument, by value.
    Sigsuspend,
    Ppoll,
    Pselect6,
    EpollPwait,
    EpollPwait2,
    IoUringEnter,
    IoUringSetup,
    IoUringRegister,
    Personality,
    Ioctl,
    /// A number above [`KNOWN_MAX`].
    Unknown,
    /// Anything else: performed as it is.
    Other,
}

/// The x86_64 calls the filter traps from monitored code, and what they are.
pub(super) const X86_64_OPS: &[(u32, Op)] = &[
    (11, Op::Munmap),
    (10, Op::Mprotect),
    (329, Op::PkeyMprotect),
    (28, Op::Madvise),
    (440, Op::ProcessMadvise),
    (25, Op::Mremap),
    (12, Op::Brk),
    (9, Op::Mmap),
    (30, Op::Shmat),
    (67, Op::Shmdt),
    (216, Op::RemapFilePages),
    (14, Op::RtSigprocmask),
    (13, Op::RtSigaction),
    (15, Op::RtSigreturn),
    (130, Op::RtSigsuspend),
    (271, Op::Ppoll),
    (270, Op::Pselect6),
    (281, Op::EpollPwait),
    (441, Op::EpollPwait2),
    (426, Op::IoUringEnter),
    (425, Op::IoUringSetup),
    (427, Op::IoUringRegister),
    (135, Op::Personality),
    (16, Op::Ioctl),
];

/// The i386 calls the handler treats specially (every i386 call from monitored code
/// traps; the others are performed as they are).
pub(super) const I386_OPS: &[(u32, Op)] = &[
    (91, Op::Munmap),
    (125, Op::Mprotect),
    (380, Op::PkeyMprotect),
    (219, Op::Madvise),
    (440, Op::ProcessMadvise),
    (163, Op::Mremap),
    (45, Op::Brk),
    (192, Op::Mmap),
    (90, Op::OldMmap),
    (397, Op::Shmat),
    (398, Op::Shmdt),
    (117, Op::Ipc),
    (257, Op::RemapFilePages),
    (175, Op::RtSigprocmask),
    (126, Op::Sigprocmask),
    (69, Op::Ssetmask),
    (174, Op::RtSigaction),
    (67, Op::Sigaction),
    (48, Op::Signal),
    (173, Op::RtSigreturn),
    (119, Op::Sigreturn),
    (179, Op::RtSigsuspend),
    (72, Op::Sigsuspend),
    (309, Op::Ppoll),
    (414, Op::Ppoll), // ppoll_time64
    (308, Op::Pselect6),
    (413, Op::Pselect6), // pselect6_time64
    (319, Op::EpollPwait),
    (441, Op::EpollPwait2),
    (426, Op::IoUringEnter),
    (425, Op::IoUringSetup),
    (427, Op::IoUringRegister),
    (136, Op::Personality),
    (54, Op::Ioctl),
];

/// What call `nr` of `abi` is (`nr` without the x32 bit).
pub(super) fn op(abi: Abi, nr: u32) -> Op {
    if nr > KNOWN_MAX {
        return Op::Unknown;
    }
    let table = match abi {
        Abi::X86_64 => X86_64_OPS,
        Abi::I386 => I386_OPS,
    };
    table
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or(Op::Other, |(_, o)| *o)
}

/// The native number of an op where the handler makes a call of its own (queries).
pub(super) const NR_SHMCTL: i64 = libc::SYS_shmctl;
/// `brk`, to query the current break.
pub(super) const NR_BRK: i64 = libc::SYS_brk;

/// `ioctl` commands that move or poison pages: `UFFDIO_MOVE` (`_IOWR(0xAA, 5,
/// struct uffdio_move)`) and `UFFDIO_POISON` (`_IOWR(0xAA, 8, struct uffdio_poison)`).
pub(super) const UFFDIO_MOVE: u32 = 0xc028_aa05;
/// See [`UFFDIO_MOVE`].
pub(super) const UFFDIO_POISON: u32 = 0xc020_aa08;
/// `io_uring_register` opcodes the monitor takes part in.
pub(super) const IORING_REGISTER_RESTRICTIONS: u32 = 11;
/// See [`IORING_REGISTER_RESTRICTIONS`].
pub(super) const IORING_REGISTER_ENABLE_RINGS: u32 = 12;
/// `shmat` flags that replace pages (`SHM_REMAP`) or make them executable (`SHM_EXEC`).
pub(super) const SHM_REMAP: u32 = 0o40000;
/// See [`SHM_REMAP`].
pub(super) const SHM_EXEC: u32 = 0o100000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_agree_with_libc_where_libc_knows() {
        let native = [
            (libc::SYS_munmap, Op::Munmap),
            (libc::SYS_mprotect, Op::Mprotect),
            (libc::SYS_pkey_mprotect, Op::PkeyMprotect),
            (libc::SYS_madvise, Op::Madvise),
            (libc::SYS_process_madvise, Op::ProcessMadvise),
            (libc::SYS_mremap, Op::Mremap),
            (libc::SYS_brk, Op::Brk),
            (libc::SYS_mmap, Op::Mmap),
            (libc::SYS_shmat, Op::Shmat),
            (libc::SYS_shmdt, Op::Shmdt),
            (libc::SYS_remap_file_pages, Op::RemapFilePages),
            (libc::SYS_rt_sigprocmask, Op::RtSigprocmask),
            (libc::SYS_rt_sigaction, Op::RtSigaction),
            (libc::SYS_rt_sigreturn, Op::RtSigreturn),
            (libc::SYS_rt_sigsuspend, Op::RtSigsuspend),
            (libc::SYS_ppoll, Op::Ppoll),
            (libc::SYS_pselect6, Op::Pselect6),
            (libc::SYS_epoll_pwait, Op::EpollPwait),
            (libc::SYS_io_uring_enter, Op::IoUringEnter),
            (libc::SYS_io_uring_setup, Op::IoUringSetup),
            (libc::SYS_io_uring_register, Op::IoUringRegister),
            (libc::SYS_personality, Op::Personality),
            (libc::SYS_ioctl, Op::Ioctl),
        ];
        for (nr, o) in native {
            assert_eq!(op(Abi::X86_64, nr as u32), o, "{nr}");
        }
        assert_eq!(op(Abi::X86_64, libc::SYS_getpid as u32), Op::Other);
        assert_eq!(op(Abi::X86_64, KNOWN_MAX + 1), Op::Unknown);
        assert_eq!(NR_CLONE3 as i64, libc::SYS_clone3);
        for nr in X86_64_NEVER_TRAPPED {
            assert!([libc::SYS_clone, libc::SYS_fork, libc::SYS_vfork].contains(&(nr as i64)));
        }
    }
}
