//! The first matrix's paths: libc wrappers, glibc-internal calls (`free`, `realloc`)
//! and raw `syscall()`s of the x86_64 ABI.

use super::{map_hole, try_map_hole, Ctx, HOLE_TAKEN, LEN};
use crate::common::Anon;
use userptr::{Cause, Perm};

/// linux/mman.h: keep the old range mapped (empty) after a move.
const MREMAP_DONTUNMAP: i32 = 4;

fn mmap_fixed(addr: usize, len: usize) {
    // SAFETY: maps fresh anonymous memory over the test's own range.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, addr);
}

pub(crate) fn run(ctx: &Ctx<'_>, path: &str) -> &'static str {
    match path {
        "munmap" | "raw_syscall_munmap" => {
            let buf = Anon::new(LEN);
            let raw = path.starts_with("raw");
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Unmap, || {
                    // SAFETY: unmapping the test's own buffer, then mapping it again.
                    unsafe {
                        if raw {
                            libc::syscall(libc::SYS_munmap, a, LEN);
                        } else {
                            libc::munmap(a as *mut _, LEN);
                        }
                    }
                    map_hole(a, LEN, raw);
                });
                a
            })
        }
        "free_malloc" => {
            let n = 4 << 20;
            // SAFETY: plain malloc/free of a large (mmapped) block, then malloc again.
            let p = unsafe { libc::malloc(n) } as usize;
            // SAFETY: the block just allocated, n bytes.
            unsafe { std::ptr::write_bytes(p as *mut u8, 1, n) };
            let u = match ctx.register(p, n, Perm::READ_WRITE) {
                Ok(u) => u,
                Err(cell) => return cell,
            };
            let mut again = 0;
            // SAFETY: frees the block, then allocates one of the same size.
            ctx.change(p & !4095..(p + n + 4095) & !4095, Cause::Unmap, || unsafe {
                libc::free(p as *mut _);
                again = libc::malloc(n) as usize;
            });
            if again != p {
                eprintln!("n/a: malloc placed the second block elsewhere");
                return "n/a";
            }
            // SAFETY: our new block.
            unsafe { std::ptr::write_bytes(again as *mut u8, 2, n) };
            let r = ctx.look(&u, again, n);
            // SAFETY: frees the block this case allocated.
            unsafe { libc::free(again as *mut _) };
            r
        }
        "realloc_move" => {
            let n = 4 << 20;
            // SAFETY: malloc/realloc of large blocks; a hole after p is blocked so the
            // realloc must move.
            let p = unsafe { libc::malloc(n) } as usize;
            // SAFETY: the block just allocated, n bytes.
            unsafe { std::ptr::write_bytes(p as *mut u8, 1, n) };
            let u = match ctx.register(p, n, Perm::READ_WRITE) {
                Ok(u) => u,
                Err(cell) => return cell,
            };
            let mut moved = 0;
            // SAFETY: grows the block this case allocated (it moves).
            ctx.change(p & !4095..(p + n + 4095) & !4095, Cause::Unmap, || unsafe {
                moved = libc::realloc(p as *mut _, 64 << 20) as usize;
            });
            if moved == p {
                // SAFETY: frees the block this case allocated.
                unsafe { libc::free(moved as *mut _) };
                eprintln!("n/a: realloc grew the block in place");
                return "n/a";
            }
            // The old address gets new memory (what a later malloc would do).
            let base = p & !4095;
            let len = ((p + n + 4095) & !4095) - base;
            if !try_map_hole(base, len, true) {
                // SAFETY: frees the block this case allocated.
                unsafe { libc::free(moved as *mut _) };
                return HOLE_TAKEN;
            }
            let r = ctx.look(&u, p, n);
            // SAFETY: unmap the page range we mapped; free the moved block.
            unsafe {
                libc::munmap(base as *mut _, len);
                libc::free(moved as *mut _);
            }
            r
        }
        "raw_syscall_madvise" | "madv_dontneed" | "madv_free" => {
            let buf = Anon::new(LEN);
            let advice = if path == "madv_free" {
                libc::MADV_FREE
            } else {
                libc::MADV_DONTNEED
            };
            let raw = path.starts_with("raw");
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Discard, || unsafe {
                    // SAFETY: advising the test's own buffer.
                    if raw {
                        libc::syscall(libc::SYS_madvise, a, LEN, advice);
                    } else {
                        libc::madvise(a as *mut _, LEN, advice);
                    }
                });
                a
            })
        }
        "madv_remove" => {
            let fd = memfd::MemfdOptions::default().create("matrix").unwrap();
            fd.as_file().set_len(LEN as u64).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: a shared mapping of our memfd.
            let a = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            } as usize;
            // SAFETY: the mapping just made, LEN bytes.
            unsafe { std::ptr::write_bytes(a as *mut u8, 1, LEN) };
            let r = ctx.visible(a, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Discard, || unsafe {
                    // SAFETY: punching a hole in our own shared mapping.
                    libc::madvise(a as *mut _, LEN, libc::MADV_REMOVE);
                });
                a
            });
            // SAFETY: unmaps the mapping this case made.
            unsafe { libc::munmap(a as *mut _, LEN) };
            r
        }
        "mprotect_downgrade" => {
            let buf = Anon::new(LEN);
            let u = match ctx.register(buf.addr, LEN, Perm::READ_WRITE) {
                Ok(u) => u,
                Err(cell) => return cell,
            };
            let a = buf.addr;
            ctx.change(
                a..a + LEN,
                Cause::Protect {
                    new_prot: libc::PROT_READ,
                },
                || buf.mprotect(libc::PROT_READ),
            );
            ctx.downgraded(&u)
        }
        "mmap_fixed" => {
            let buf = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(a..a + LEN, Cause::Unmap, || mmap_fixed(a, LEN));
                a
            })
        }
        "mremap_move" => {
            let buf = Anon::new(LEN);
            let dest = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                c.change(
                    a..a + LEN,
                    Cause::Remap {
                        to: dest.addr as u64,
                    },
                    || unsafe {
                        // SAFETY: moves our buffer onto our other buffer's range.
                        let p = libc::mremap(
                            a as *mut _,
                            LEN,
                            LEN,
                            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                            dest.addr as *mut libc::c_void,
                        );
                        assert_eq!(p as usize, dest.addr);
                    },
                );
                map_hole(a, LEN, false);
                a
            })
        }
        "mremap_dontunmap" => {
            // The pages move to `dest`; the old range stays mapped, empty.
            let buf = Anon::new(LEN);
            let dest = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                let cause = Cause::Remap {
                    to: dest.addr as u64,
                };
                c.change(a..a + LEN, cause, || {
                    // SAFETY: moves our buffer's pages onto our other buffer's range.
                    let p = unsafe {
                        libc::mremap(
                            a as *mut _,
                            LEN,
                            LEN,
                            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | MREMAP_DONTUNMAP,
                            dest.addr as *mut libc::c_void,
                        )
                    };
                    assert_eq!(p as usize, dest.addr, "mremap: {}", super::errno());
                });
                a
            })
        }
        "mremap_shrink" => {
            // The tail goes away; fresh memory is mapped there.
            let buf = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |c, a| {
                let half = LEN / 2;
                c.change(a + half..a + LEN, Cause::Unmap, || {
                    // SAFETY: shrinks our own buffer in place.
                    let p = unsafe { libc::mremap(a as *mut _, LEN, half, 0) };
                    assert_eq!(p as usize, a, "mremap: {}", super::errno());
                });
                map_hole(a + half, half, false);
                a
            })
        }
        "brk_shrink" => {
            // SAFETY: grows the heap by a page-aligned block, registers it, shrinks the
            // heap back and grows it again (new, zeroed pages at the same address).
            unsafe {
                let cur = libc::sbrk(0) as usize;
                let start = (cur + 4095) & !4095;
                if libc::brk((start + LEN) as *mut _) != 0 {
                    eprintln!("n/a: brk cannot grow the heap");
                    return "n/a";
                }
                std::ptr::write_bytes(start as *mut u8, 1, LEN);
                let r = ctx.visible(start, LEN, Perm::READ_WRITE, |c, a| {
                    c.change(a..a + LEN, Cause::Unmap, || {
                        libc::brk(a as *mut _);
                    });
                    libc::brk((a + LEN) as *mut _);
                    a
                });
                libc::brk(start as *mut _);
                r
            }
        }
        "shmdt" => {
            // SAFETY: a private SysV segment attached, detached and attached again at
            // the same address.
            unsafe {
                let id = libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600);
                if id < 0 {
                    eprintln!("n/a: shmget: {}", std::io::Error::last_os_error());
                    return "n/a";
                }
                let a = libc::shmat(id, std::ptr::null(), 0) as usize;
                std::ptr::write_bytes(a as *mut u8, 1, LEN);
                let id2 = libc::shmget(libc::IPC_PRIVATE, LEN, libc::IPC_CREAT | 0o600);
                let r = ctx.visible(a, LEN, Perm::READ_WRITE, |c, a| {
                    c.change(a..a + LEN, Cause::Unmap, || {
                        libc::shmdt(a as *const _);
                    });
                    let b = libc::shmat(id2, a as *const _, 0) as usize;
                    assert_eq!(b, a);
                    a
                });
                libc::shmdt(a as *const _);
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                libc::shmctl(id2, libc::IPC_RMID, std::ptr::null_mut());
                r
            }
        }
        "fork" => {
            let buf = Anon::new(LEN);
            ctx.visible(buf.addr, LEN, Perm::READ_WRITE, |_c, a| {
                // SAFETY: the child writes its own copy of the buffer and exits.
                unsafe {
                    let pid = libc::fork();
                    if pid == 0 {
                        std::ptr::write_bytes(a as *mut u8, 7, LEN);
                        libc::_exit(0);
                    }
                    let mut st = 0;
                    libc::waitpid(pid, &mut st, 0);
                }
                // The parent writes too (its pages stay the pinned ones).
                buf.fill(3);
                a
            })
        }
        _ => unreachable!("{path}"),
    }
}
