//! Calls made from code that became executable after the monitor was installed: a
//! JIT's page made executable in place (`jit_mmap_exec`, a control), and the same
//! code moved elsewhere with `mremap` (`mremap_exec_code`).

use super::{errno, map_hole, Ctx, LEN};
use crate::common::Anon;
use userptr::{Cause, Perm};

/// `mov eax, 11 (munmap); syscall; ret`: `munmap(rdi, rsi)` as a C function.
const JIT_MUNMAP: [u8; 8] = [0xb8, 0x0b, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xc3];

fn map_page(prot: i32) -> usize {
    // SAFETY: a fresh anonymous page at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", errno());
    p as usize
}

pub(crate) fn run(ctx: &Ctx<'_>, path: &str) -> &'static str {
    let moved = path == "mremap_exec_code";
    // The JIT: write the code, then make it executable.
    let code = map_page(libc::PROT_READ | libc::PROT_WRITE);
    // SAFETY: our own writable page; 8 bytes of machine code.
    unsafe { std::ptr::copy_nonoverlapping(JIT_MUNMAP.as_ptr(), code as *mut u8, 8) };
    // SAFETY: our own page.
    let r = unsafe { libc::mprotect(code as *mut _, 4096, libc::PROT_READ | libc::PROT_EXEC) };
    assert_eq!(r, 0, "mprotect: {}", errno());
    let at = if moved {
        // Move the code to a page of its own choosing (MREMAP_FIXED over a page it
        // reserved): executable where no exec tracking looked.
        let dest = map_page(libc::PROT_NONE);
        // SAFETY: moves our code page onto our reserved page.
        let p = unsafe {
            libc::mremap(
                code as *mut _,
                4096,
                4096,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dest as *mut libc::c_void,
            )
        };
        assert_eq!(p as usize, dest, "mremap: {}", errno());
        dest
    } else {
        code
    };
    // SAFETY: the page holds a complete function with the C ABI (rdi, rsi are the
    // syscall's arguments as they arrive); it returns the syscall's result.
    let jit_munmap: extern "C" fn(usize, usize) -> i64 = unsafe { std::mem::transmute(at) };
    let buf = Anon::new(LEN);
    let r = ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
        c.change(a..a + LEN, Cause::Unmap, || {
            assert_eq!(jit_munmap(a, LEN), 0, "munmap from JIT code");
        });
        map_hole(a, LEN, true);
        a
    });
    // SAFETY: the code page this path made.
    unsafe { libc::munmap(at as *mut _, 4096) };
    r
}
