//! The driver's syscall trampoline: the one call site the filter lets through.
//!
//! A plain `syscall` instruction in a section of its own; the filter compares the
//! instruction pointer of every monitored call with the address right after it
//! ([`trampoline_ip`]). The SIGSYS handler performs the application's calls from here,
//! after the registry has been told.

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.userptr_trampoline,\"ax\",@progbits",
    ".globl userptr_syscall_trampoline",
    ".type userptr_syscall_trampoline,@function",
    "userptr_syscall_trampoline:",
    "    mov rax, rdi",
    "    mov rdi, rsi",
    "    mov rsi, rdx",
    "    mov rdx, rcx",
    "    mov r10, r8",
    "    mov r8, r9",
    "    mov r9, [rsp + 8]",
    "    syscall",
    ".globl userptr_trampoline_after_syscall",
    "userptr_trampoline_after_syscall:",
    "    ret",
    ".size userptr_syscall_trampoline, . - userptr_syscall_trampoline",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn userptr_syscall_trampoline(
        nr: i64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
        a6: u64,
    ) -> i64;
    static userptr_trampoline_after_syscall: u8;
}

/// Make a syscall through the trampoline (the only call site the filter lets through).
/// Returns the raw kernel result (`-errno` on failure).
pub(super) fn raw_syscall(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: the trampoline is a plain `syscall` with the System V argument registers
    // moved into the kernel's; the caller passes the arguments of a call the
    // application itself made (or a harmless query), so it has that call's effects.
    unsafe { userptr_syscall_trampoline(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

pub(super) fn trampoline_ip() -> u64 {
    // Taking the address of a label defined in global_asm above (no access).
    std::ptr::addr_of!(userptr_trampoline_after_syscall) as u64
}

/// Perform `madvise` through the trampoline (unmonitored): the raw baseline for
/// benchmarks, and the way driver code can bypass the trap.
pub fn raw_madvise(addr: usize, len: usize, advice: i32) -> i64 {
    raw_syscall(
        libc::SYS_madvise,
        [addr as u64, len as u64, advice as u64, 0, 0, 0],
    )
}
