//! The application's io_uring instances cannot change a registered range behind the
//! monitor's back.
//!
//! An io_uring request runs in the kernel, from the ring or an io-wq worker: no syscall
//! the filter sees. Of the opcodes the kernel knows, `IORING_OP_MADVISE` changes
//! mappings (`MADV_DONTNEED` through a ring discards pages like the syscall does). The
//! kernel's own answer is used: **restrictions** (`IORING_REGISTER_RESTRICTIONS`, an
//! allow-list of opcodes enforced by the kernel for the life of the ring):
//! * an application's `io_uring_setup` is made with `IORING_SETUP_R_DISABLED` added;
//!   the handler then registers an allow-list of every opcode known to leave mappings
//!   alone ([`allowed`]: all but `MADVISE`, and none the kernel added after this table)
//!   and enables the ring, and hands the application its parameters with its own flags;
//!   a `MADVISE` request on that ring completes with `-EACCES`;
//! * an application that asked for `R_DISABLED` itself registers its own restrictions:
//!   its `SQE_OP` entries lose `MADVISE` (and unknown opcodes); if it enables the ring
//!   without registering any, ours are registered first;
//! * i386 `io_uring_*` calls from monitored code are refused (`ENOSYS`, as a kernel
//!   without io_uring answers);
//! * rings that existed before install cannot be restricted after the fact: install
//!   refuses while the application holds one ([`foreign_rings`]); the driver's own rings
//!   (the reference device's) never submit `MADVISE` and are exempt.
//!
//! `FALLOCATE` and `FTRUNCATE` stay allowed: the registry refuses shared file memory
//! whose file could lose pages (only sealed memfds are accepted, where both fail), so
//! neither can reach a pinned page. Not covered: a ring another process created and
//! passed over a Unix socket (its requests run in that process's context only if it is
//! the submitter; one used from here is documented in the README's known gaps).

use crate::trampoline;

const IORING_SETUP_R_DISABLED: u32 = 1 << 6;
const IORING_RESTRICTION_REGISTER_OP: u16 = 0;
const IORING_RESTRICTION_SQE_OP: u16 = 1;
const IORING_RESTRICTION_SQE_FLAGS_ALLOWED: u16 = 2;
/// `IORING_REGISTER_USE_REGISTERED_RING`: or-ed into the opcode, the fd argument is then
/// an index into the caller's registered rings.
const USE_REGISTERED_RING: u64 = 0x8000_0000;
/// The register opcodes this table knows (`IORING_REGISTER_LAST` of Linux 6.18).
const REGISTER_KNOWN_LAST: u8 = 35;
const IORING_REGISTER_RESTRICTIONS: u64 = 11;
const IORING_REGISTER_ENABLE_RINGS: u64 = 12;
const IORING_REGISTER_PROBE: u64 = 8;
/// `IORING_OP_MADVISE`.
pub(super) const OP_MADVISE: u8 = 25;
/// The last opcode this table knows (`IORING_OP_PIPE`, Linux 6.16); newer ones are not
/// allowed on application rings.
pub(super) const OP_KNOWN_LAST: u8 = 62;
/// Most restriction entries handled in one registration.
const MAX_RESTRICTIONS: usize = 128;

/// The kernel's opcode count (`IORING_OP_LAST`), probed at install; 0 until then.
static KERNEL_OPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// The kernel's register-opcode count (`IORING_REGISTER_LAST`), probed at install.
static KERNEL_REGISTER_OPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Whether an opcode is allowed on application rings.
pub(super) fn allowed(op: u8) -> bool {
    // Relaxed: written once at install, before the filter traps anything.
    let kernel = KERNEL_OPS.load(std::sync::atomic::Ordering::Relaxed);
    op != OP_MADVISE && op <= OP_KNOWN_LAST && (op as u32) < kernel
}

fn sys(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: io_uring calls on the application's own ring, with pointers to our own
    // locals; their effects are the ones the application asked for, restricted.
    unsafe { trampoline::syscall(nr, a) }
}

/// Learn the kernel's opcode count (a probe on a throw-away ring). Called at install.
pub(super) fn probe_kernel() {
    let mut params = [0u8; 120];
    let fd = sys(
        libc::SYS_io_uring_setup,
        [1, params.as_mut_ptr() as u64, 0, 0, 0, 0],
    );
    if fd < 0 {
        return; // no io_uring: nothing to restrict, application rings fail anyway
    }
    // struct io_uring_probe { u8 last_op; u8 ops_len; u16 resv; u32 resv2[3];
    // struct io_uring_probe_op ops[256] (8 bytes each) }.
    let mut probe = [0u8; 16 + 256 * 8];
    let r = sys(
        libc::SYS_io_uring_register,
        [
            fd as u64,
            IORING_REGISTER_PROBE,
            probe.as_mut_ptr() as u64,
            256,
            0,
            0,
        ],
    );
    if r == 0 {
        // Relaxed: see `allowed`.
        KERNEL_OPS.store(probe[0] as u32 + 1, std::sync::atomic::Ordering::Relaxed);
    }
    sys(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
    // The register opcodes: a restriction naming one the kernel does not know is
    // refused (EINVAL), and an enabled restricted ring refuses every register opcode it
    // was not allowed. The largest count the kernel accepts, on a disabled ring (a
    // refused registration leaves it unrestricted, so it can be tried again).
    let mut params = [0u8; 120];
    params[8..12].copy_from_slice(&IORING_SETUP_R_DISABLED.to_le_bytes());
    let fd = sys(
        libc::SYS_io_uring_setup,
        [1, params.as_mut_ptr() as u64, 0, 0, 0, 0],
    );
    if fd < 0 {
        return;
    }
    for last in (1..=REGISTER_KNOWN_LAST).rev() {
        let mut list = [[0u8; 16]; REGISTER_KNOWN_LAST as usize];
        for (op, r) in list.iter_mut().enumerate().take(last as usize) {
            r[0..2].copy_from_slice(&IORING_RESTRICTION_REGISTER_OP.to_le_bytes());
            r[2] = op as u8;
        }
        let r = sys(
            libc::SYS_io_uring_register,
            [
                fd as u64,
                IORING_REGISTER_RESTRICTIONS,
                list.as_ptr() as u64,
                last as u64,
                0,
                0,
            ],
        );
        if r == 0 {
            // Relaxed: see `allowed`.
            KERNEL_REGISTER_OPS.store(last as u32, std::sync::atomic::Ordering::Relaxed);
            break;
        }
    }
    sys(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
}

/// One `struct io_uring_restriction` (16 bytes): a kind and its one-byte operand.
fn restriction(kind: u16, operand: u8) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[2] = operand;
    r
}

/// Register our allow-list on `fd` (a ring still disabled; `flag` is the caller's
/// `USE_REGISTERED_RING`, if it named the ring by index). Once a ring has restrictions,
/// the kernel allows only what they list, so the list names every opcode known to leave
/// mappings alone, every register opcode, and every SQE flag. Returns 0 or -errno.
fn restrict(fd: u64, flag: u64) -> i64 {
    let mut list = [[0u8; 16]; 128];
    let mut n = 0;
    for op in 0..=OP_KNOWN_LAST {
        if allowed(op) {
            list[n] = restriction(IORING_RESTRICTION_SQE_OP, op);
            n += 1;
        }
    }
    // Relaxed: see `allowed`.
    let reg = KERNEL_REGISTER_OPS.load(std::sync::atomic::Ordering::Relaxed) as u8;
    for op in 0..reg.min(REGISTER_KNOWN_LAST) {
        list[n] = restriction(IORING_RESTRICTION_REGISTER_OP, op);
        n += 1;
    }
    list[n] = restriction(IORING_RESTRICTION_SQE_FLAGS_ALLOWED, 0xff);
    n += 1;
    sys(
        libc::SYS_io_uring_register,
        [
            fd,
            IORING_REGISTER_RESTRICTIONS | flag,
            list.as_ptr() as u64,
            n as u64,
            0,
            0,
        ],
    )
}

/// The application's `io_uring_setup(entries, params)`.
pub(super) fn setup(a: [u64; 6]) -> i64 {
    let mut params = [0u8; 120];
    if !super::user_memory::read(a[1], &mut params) {
        return -(libc::EFAULT as i64);
    }
    let flags = u32::from_le_bytes(params[8..12].try_into().unwrap());
    if flags & IORING_SETUP_R_DISABLED != 0 {
        // The application restricts and enables it itself (see `register`).
        return sys(libc::SYS_io_uring_setup, a);
    }
    params[8..12].copy_from_slice(&(flags | IORING_SETUP_R_DISABLED).to_le_bytes());
    let fd = sys(
        libc::SYS_io_uring_setup,
        [a[0], params.as_mut_ptr() as u64, 0, 0, 0, 0],
    );
    if fd < 0 {
        return fd;
    }
    let r = restrict(fd as u64, 0);
    let r = if r == 0 {
        sys(
            libc::SYS_io_uring_register,
            [fd as u64, IORING_REGISTER_ENABLE_RINGS, 0, 0, 0, 0],
        )
    } else {
        r
    };
    if r != 0 {
        sys(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
        return r;
    }
    // The parameters as the kernel filled them, with the application's own flags.
    params[8..12].copy_from_slice(&flags.to_le_bytes());
    if !super::user_memory::write(a[1], &params) {
        sys(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
        return -(libc::EFAULT as i64);
    }
    fd
}

/// The application's `io_uring_register(fd, RESTRICTIONS | ENABLE_RINGS, arg, n)`.
pub(super) fn register(a: [u64; 6]) -> i64 {
    let flag = a[1] & USE_REGISTERED_RING;
    match a[1] & 0xffff_ffff & !USE_REGISTERED_RING {
        IORING_REGISTER_RESTRICTIONS => {
            let n = a[3] as usize;
            if n == 0 || n > MAX_RESTRICTIONS {
                return sys(libc::SYS_io_uring_register, a);
            }
            let mut list = [[0u8; 16]; MAX_RESTRICTIONS];
            let mut raw = [0u8; 16];
            let mut kept = 0;
            for i in 0..n {
                if !super::user_memory::read(a[2] + 16 * i as u64, &mut raw) {
                    return -(libc::EFAULT as i64);
                }
                let kind = u16::from_le_bytes([raw[0], raw[1]]);
                if kind == IORING_RESTRICTION_SQE_OP && !allowed(raw[2]) {
                    continue; // the opcode stays forbidden on this ring
                }
                list[kept] = raw;
                kept += 1;
            }
            sys(
                libc::SYS_io_uring_register,
                [
                    a[0],
                    IORING_REGISTER_RESTRICTIONS | flag,
                    list.as_ptr() as u64,
                    kept as u64,
                    0,
                    0,
                ],
            )
        }
        IORING_REGISTER_ENABLE_RINGS => {
            // No restrictions registered yet: ours first. If the application registered
            // its own (sanitised above), this one fails and changes nothing.
            let _ = restrict(a[0], flag);
            sys(libc::SYS_io_uring_register, a)
        }
        _ => sys(libc::SYS_io_uring_register, a),
    }
}

/// The io_uring instances this process holds that the driver does not own (install
/// refuses while there are any: they cannot be restricted any more).
pub(super) fn foreign_rings() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut v: Vec<i32> = dir
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            (target.to_str()? == "anon_inode:[io_uring]" && !crate::driver_section::is_own_ring(fd))
                .then_some(fd)
        })
        .collect();
    v.sort_unstable();
    v
}
