//! The driver's own syscall instructions: the call sites a seccomp monitor lets through.
//!
//! Each is a bare `syscall` (or `int 0x80`) in a section of its own. The seccomp
//! monitor's filter compares the instruction pointer of every monitored call with the
//! address right after these instructions ([`after_syscall_ip`], [`after_int80_ip`],
//! [`after_sigreturn_ip`]): a call made here is the driver's, every other one is the
//! application's. The SIGSYS handler performs the application's calls from here,
//! after the registry has been told, and the driver makes its own calls that must not
//! be trapped (blocking signals in a driver section) here too.
//!
//! Written by hand because no crate offers a syscall instruction at a known address:
//! `libc::syscall` and `rustix` issue theirs from inside libc or inline in the caller.

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.userptr_trampoline,\"ax\",@progbits",
    // long userptr_syscall_trampoline(nr, a1, a2, a3, a4, a5, a6): the x86_64 ABI.
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
    // long userptr_int80_trampoline(nr, a1, a2, a3, a4, a5, a6): the i386 ABI (eax,
    // ebx, ecx, edx, esi, edi, ebp), entered with `int 0x80` from 64-bit code.
    ".globl userptr_int80_trampoline",
    ".type userptr_int80_trampoline,@function",
    "userptr_int80_trampoline:",
    "    push rbx",
    "    push rbp",
    "    mov rax, rdi",
    "    mov rbx, rsi",
    "    mov r11, rcx",
    "    mov rcx, rdx",
    "    mov rdx, r11",
    "    mov rsi, r8",
    "    mov rdi, r9",
    "    mov rbp, [rsp + 24]",
    "    int 0x80",
    ".globl userptr_trampoline_after_int80",
    "userptr_trampoline_after_int80:",
    "    movsxd rax, eax",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".size userptr_int80_trampoline, . - userptr_int80_trampoline",
    // The sigreturn gate: `rt_sigreturn` on whatever frame the stack pointer is at.
    // It is the restorer of the monitor's own SIGSYS handler, and where the monitor
    // sends an application's `rt_sigreturn` once it has checked the frame.
    ".globl userptr_sigreturn_gate",
    ".type userptr_sigreturn_gate,@function",
    "userptr_sigreturn_gate:",
    "    mov rax, 15",
    "    syscall",
    ".globl userptr_trampoline_after_sigreturn",
    "userptr_trampoline_after_sigreturn:",
    "    ud2",
    ".size userptr_sigreturn_gate, . - userptr_sigreturn_gate",
    // The same for the i386 frames of handlers installed through the i386 ABI:
    // rt_sigreturn (173) and sigreturn (119) with `int 0x80`.
    ".globl userptr_i386_rt_sigreturn_gate",
    ".type userptr_i386_rt_sigreturn_gate,@function",
    "userptr_i386_rt_sigreturn_gate:",
    "    mov eax, 173",
    "    int 0x80",
    ".globl userptr_trampoline_after_i386_rt_sigreturn",
    "userptr_trampoline_after_i386_rt_sigreturn:",
    "    ud2",
    ".size userptr_i386_rt_sigreturn_gate, . - userptr_i386_rt_sigreturn_gate",
    ".globl userptr_i386_sigreturn_gate",
    ".type userptr_i386_sigreturn_gate,@function",
    "userptr_i386_sigreturn_gate:",
    "    mov eax, 119",
    "    int 0x80",
    ".globl userptr_trampoline_after_i386_sigreturn",
    "userptr_trampoline_after_i386_sigreturn:",
    "    ud2",
    ".size userptr_i386_sigreturn_gate, . - userptr_i386_sigreturn_gate",
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
    fn userptr_int80_trampoline(
        nr: i64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
        a6: u64,
    ) -> i64;
    fn userptr_sigreturn_gate();
    fn userptr_i386_rt_sigreturn_gate();
    fn userptr_i386_sigreturn_gate();
    static userptr_trampoline_after_syscall: u8;
    static userptr_trampoline_after_int80: u8;
    static userptr_trampoline_after_sigreturn: u8;
    static userptr_trampoline_after_i386_rt_sigreturn: u8;
    static userptr_trampoline_after_i386_sigreturn: u8;
}

/// Make an x86_64 syscall through the trampoline. Returns the raw kernel result
/// (`-errno` on failure).
///
/// # Safety
/// The call has whatever effect the kernel gives it: the caller guarantees it is one
/// the program may make (the application's own trapped call, with its own
/// arguments; or a driver call on driver-owned memory or on no memory at all).
pub unsafe fn syscall(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: the trampoline is a plain `syscall` with the System V argument registers
    // moved into the kernel's; the call's effects are the caller's contract.
    unsafe { userptr_syscall_trampoline(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// Make an i386 syscall (`int 0x80`) through the trampoline; the result is sign-extended
/// from `eax` as the kernel returns it.
///
/// # Safety
/// As [`syscall`].
pub unsafe fn syscall_i386(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: the trampoline moves the arguments into the i386 registers, saves the
    // callee-saved rbx and rbp it uses, and issues `int 0x80`; the call's effects are
    // the caller's contract.
    unsafe { userptr_int80_trampoline(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// The address right after the trampoline's `syscall`: the instruction pointer the
/// kernel reports for calls made through [`syscall`].
pub fn after_syscall_ip() -> u64 {
    // Taking the address of a label defined in global_asm above (no access).
    std::ptr::addr_of!(userptr_trampoline_after_syscall) as u64
}

/// The address right after the trampoline's `int 0x80`.
pub fn after_int80_ip() -> u64 {
    // As above.
    std::ptr::addr_of!(userptr_trampoline_after_int80) as u64
}

/// The address right after the sigreturn gate's `syscall`.
pub fn after_sigreturn_ip() -> u64 {
    // As above.
    std::ptr::addr_of!(userptr_trampoline_after_sigreturn) as u64
}

/// The sigreturn gate's entry: a signal handler's restorer, or where a signal context's
/// instruction pointer is sent to perform `rt_sigreturn` on the frame at its stack
/// pointer.
pub fn sigreturn_gate() -> u64 {
    userptr_sigreturn_gate as *const () as u64
}

/// The i386 gates: entries of (`rt_sigreturn`, `sigreturn`) by `int 0x80`, and the
/// addresses right after their `int 0x80`.
pub fn i386_sigreturn_gates() -> [(u64, u64); 2] {
    [
        (
            userptr_i386_rt_sigreturn_gate as *const () as u64,
            // As above: the address of a label, no access.
            std::ptr::addr_of!(userptr_trampoline_after_i386_rt_sigreturn) as u64,
        ),
        (
            userptr_i386_sigreturn_gate as *const () as u64,
            std::ptr::addr_of!(userptr_trampoline_after_i386_sigreturn) as u64,
        ),
    ]
}

/// Perform `madvise` through the trampoline (unmonitored): the raw baseline for
/// benchmarks.
///
/// # Safety
/// `[addr, addr + len)` is memory the caller owns and no reference points into for a
/// destructive `advice` (the pages may be discarded).
pub unsafe fn madvise(addr: usize, len: usize, advice: i32) -> i64 {
    // SAFETY: the caller's contract.
    unsafe {
        syscall(
            libc::SYS_madvise,
            [addr as u64, len as u64, advice as u64, 0, 0, 0],
        )
    }
}
