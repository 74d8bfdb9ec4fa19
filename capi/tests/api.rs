//! The C ABI from Rust, the way a C caller sees it: NULL pointers, unknown enum
//! values, operands outside their registration, handles of another registry or
//! driver, a busy ring, waits that time out and waits repeated, and pins gone after
//! unregistering. Every refused call returns its code, says why, and leaves nothing
//! behind (no handle written, nothing submitted, nothing pinned).

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::{Mutex, MutexGuard};
use userptr_capi::code::UserptrCode as C;
use userptr_capi::command::{UserptrCommand, UserptrOpcode, UserptrOperand};
use userptr_capi::driver::*;
use userptr_capi::failure::*;
use userptr_capi::monitor::*;
use userptr_capi::registry::*;
use userptr_capi::submit::*;
use userptr_capi::*;

/// `VmPin` is per process and tests run on threads of one process.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn message() -> String {
    // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
    unsafe { CStr::from_ptr(userptr_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn vm_pin() -> u64 {
    let mut n = 0;
    // SAFETY: a local out-parameter.
    assert_eq!(unsafe { userptr_process_pinned_bytes(&mut n) }, C::Ok);
    n
}

/// A driver, ring 0 (64 slots) and a registry, closed on drop.
struct Setup {
    drv: *mut UserptrDriver,
    q: *mut UserptrQueue,
    reg: *mut UserptrRegistry,
}

impl Setup {
    fn new() -> Setup {
        let (mut drv, mut q, mut reg) = (null_mut(), null_mut(), null_mut());
        // SAFETY: local out-parameters; each handle is live once made.
        unsafe {
            assert_eq!(
                userptr_driver_open_reference(&mut drv),
                C::Ok,
                "{}",
                message()
            );
            assert_eq!(
                userptr_queue_open(drv, 0, 64, &mut q),
                C::Ok,
                "{}",
                message()
            );
            assert_eq!(
                userptr_registry_new(drv, 0, &mut reg),
                C::Ok,
                "{}",
                message()
            );
        }
        Setup { drv, q, reg }
    }

    fn register(&self, buf: &mut [u8], perm: u32) -> *mut UserptrRegistration {
        let mut r = null_mut();
        // SAFETY: `buf` outlives the registration in every test (unregistered first).
        let rc =
            unsafe { userptr_register(self.reg, buf.as_mut_ptr().cast(), buf.len(), perm, &mut r) };
        assert_eq!(rc, C::Ok, "{}", message());
        r
    }

    fn submit(
        &self,
        refs: &[*mut UserptrRegistration],
        cmds: &[UserptrCommand],
    ) -> (C, UserptrFence) {
        let refs: Vec<*const UserptrRegistration> = refs.iter().map(|r| r.cast_const()).collect();
        let mut f = UserptrFence::default();
        // SAFETY: live handles, local arrays and out-parameter.
        let rc = unsafe {
            userptr_submit(
                self.reg,
                self.q,
                refs.as_ptr(),
                refs.len(),
                cmds.as_ptr(),
                cmds.len(),
                &mut f,
            )
        };
        (rc, f)
    }

    fn wait(&self, f: &UserptrFence, timeout_ms: u32) -> (C, Vec<UserptrCompletion>) {
        let mut out = vec![UserptrCompletion::default(); (f.last + 1 - f.first) as usize];
        // SAFETY: a live queue; `out` has room for the whole batch.
        let rc = unsafe { userptr_wait(self.q, f, timeout_ms, out.as_mut_ptr(), out.len()) };
        (rc, out)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // SAFETY: handles made in `new`, closed once.
        unsafe {
            userptr_registry_free(self.reg);
            userptr_queue_close(self.q);
            userptr_driver_close(self.drv);
        }
    }
}

fn fill(dst: u32, offset: u64, len: u64, byte: u8) -> UserptrCommand {
    UserptrCommand {
        opcode: UserptrOpcode::Fill as u32,
        dst: UserptrOperand { index: dst, offset },
        len,
        arg: byte as u64,
        ..Default::default()
    }
}

fn unregister(r: *mut UserptrRegistration) {
    // SAFETY: a live registration, ended once.
    assert_eq!(unsafe { userptr_unregister(r) }, C::Ok, "{}", message());
}

/// Every pointer argument, NULL in turn: `USERPTR_CODE_NULL_POINTER`, naming the
/// argument, and no out-parameter written.
#[test]
fn null_pointers_are_refused_by_name() {
    let _s = serial();
    let s = Setup::new();
    let mut buf = vec![0u8; 4096];
    let r = s.register(&mut buf, 3);
    let mut out_ptr: *mut c_void = null_mut();
    let mut u = 0u64;
    let mut f = UserptrFence::default();
    let cmd = fill(0, 0, 16, 1);
    let refs = [r.cast_const()];
    let cases: Vec<(&str, C)> = unsafe {
        // SAFETY: NULL where the case says, live handles and locals elsewhere.
        vec![
            ("out", userptr_driver_open_reference(null_mut())),
            (
                "driver",
                userptr_queue_open(null(), 1, 64, (&mut out_ptr as *mut *mut c_void).cast()),
            ),
            ("out", userptr_queue_open(s.drv, 1, 64, null_mut())),
            ("queue", userptr_queue_ring(null(), &mut 0)),
            ("out", userptr_queue_ring(s.q, null_mut())),
            ("driver", userptr_driver_set_enabled(null(), true)),
            (
                "driver",
                userptr_registry_new(null(), 0, (&mut out_ptr as *mut *mut c_void).cast()),
            ),
            ("out", userptr_registry_new(s.drv, 0, null_mut())),
            ("registry", userptr_registry_pinned_bytes(null(), &mut u)),
            ("out", userptr_registry_pinned_bytes(s.reg, null_mut())),
            (
                "registry",
                userptr_register(
                    null(),
                    buf.as_mut_ptr().cast(),
                    64,
                    3,
                    (&mut out_ptr as *mut *mut c_void).cast(),
                ),
            ),
            (
                "out",
                userptr_register(s.reg, buf.as_mut_ptr().cast(), 64, 3, null_mut()),
            ),
            ("registration", userptr_registration_iova(null(), &mut u)),
            ("out", userptr_registration_iova(r, null_mut())),
            (
                "registry",
                userptr_invalidate_begin(
                    null(),
                    buf.as_mut_ptr().cast(),
                    64,
                    2,
                    0,
                    (&mut out_ptr as *mut *mut c_void).cast(),
                ),
            ),
            (
                "out",
                userptr_invalidate_begin(s.reg, buf.as_mut_ptr().cast(), 64, 2, 0, null_mut()),
            ),
            (
                "registry",
                userptr_submit(null(), s.q, refs.as_ptr(), 1, &cmd, 1, &mut f),
            ),
            (
                "queue",
                userptr_submit(s.reg, null(), refs.as_ptr(), 1, &cmd, 1, &mut f),
            ),
            (
                "refs",
                userptr_submit(s.reg, s.q, null(), 1, &cmd, 1, &mut f),
            ),
            (
                "refs[0]",
                userptr_submit(s.reg, s.q, [null()].as_ptr(), 1, &cmd, 1, &mut f),
            ),
            (
                "cmds",
                userptr_submit(s.reg, s.q, refs.as_ptr(), 1, null(), 1, &mut f),
            ),
            (
                "fence",
                userptr_submit(s.reg, s.q, refs.as_ptr(), 1, &cmd, 1, null_mut()),
            ),
            ("queue", userptr_wait(null(), &f, 0, null_mut(), 0)),
            ("fence", userptr_wait(s.q, null(), 0, null_mut(), 0)),
            (
                "registry",
                userptr_monitor_install(null(), 2, (&mut out_ptr as *mut *mut c_void).cast()),
            ),
            ("out", userptr_monitor_install(s.reg, 2, null_mut())),
            ("monitor", userptr_monitor_sync(null(), 0)),
            ("out", userptr_process_pinned_bytes(null_mut())),
        ]
    };
    // Messages are per call: re-run each refused call to read its message.
    for (i, (name, rc)) in cases.iter().enumerate() {
        assert_eq!(*rc, C::NullPointer, "case {i} ({name})");
    }
    assert!(out_ptr.is_null(), "a refused call wrote a handle");
    assert_eq!(f, UserptrFence::default(), "a refused submit wrote a fence");
    // SAFETY: NULL registry.
    unsafe { userptr_registry_pinned_bytes(null(), &mut u) };
    assert_eq!(message(), "argument `registry` is NULL");
    // The close functions take NULL and do nothing.
    // SAFETY: NULL handles.
    unsafe {
        userptr_driver_close(null_mut());
        userptr_queue_close(null_mut());
        userptr_registry_free(null_mut());
        userptr_invalidate_end(null_mut());
        userptr_monitor_stop(null_mut());
        assert_eq!(userptr_unregister(null_mut()), C::Ok);
    }
    unregister(r);
}

/// Enum arguments are plain integers: unknown values are refused, never transmuted.
#[test]
fn unknown_enum_values_and_flags_are_refused() {
    let _s = serial();
    let s = Setup::new();
    let mut buf = vec![0u8; 8192];
    let before = vm_pin();
    for perm in [0, 4, 7, u32::MAX] {
        let mut r = null_mut();
        // SAFETY: live registry, local buffer and out-parameter.
        let rc =
            unsafe { userptr_register(s.reg, buf.as_mut_ptr().cast(), buf.len(), perm, &mut r) };
        assert_eq!((rc, r.is_null()), (C::InvalidArgument, true), "perm {perm}");
        assert!(message().contains("userptr_perm"), "{}", message());
    }
    assert_eq!(vm_pin(), before, "a refused registration pinned memory");
    for kind in [0, 4, u32::MAX] {
        let mut m = null_mut();
        // SAFETY: live registry, local out-parameter.
        let rc = unsafe { userptr_monitor_install(s.reg, kind, &mut m) };
        assert_eq!((rc, m.is_null()), (C::InvalidArgument, true), "kind {kind}");
    }
    for cause in [0, 6, u32::MAX] {
        let mut inv = null_mut();
        // SAFETY: live registry, local buffer and out-parameter.
        let rc = unsafe {
            userptr_invalidate_begin(s.reg, buf.as_mut_ptr().cast(), 64, cause, 0, &mut inv)
        };
        assert_eq!(
            (rc, inv.is_null()),
            (C::InvalidArgument, true),
            "cause {cause}"
        );
    }
    let r = s.register(&mut buf, 3);
    let bad = [
        UserptrCommand {
            opcode: 6,
            ..fill(0, 0, 1, 0)
        },
        UserptrCommand {
            opcode: u32::MAX,
            ..fill(0, 0, 1, 0)
        },
        UserptrCommand {
            flags: 2,
            ..fill(0, 0, 1, 0)
        },
        UserptrCommand {
            arg: 256,
            ..fill(0, 0, 1, 0)
        },
        UserptrCommand {
            opcode: UserptrOpcode::Crc32c as u32,
            arg: 1 << 32,
            len: 1,
            ..Default::default()
        },
    ];
    for (i, c) in bad.iter().enumerate() {
        let (rc, f) = s.submit(&[r], std::slice::from_ref(c));
        assert_eq!(
            (rc, f),
            (C::InvalidArgument, UserptrFence::default()),
            "command {i}: {}",
            message()
        );
    }
    // No commands at all.
    assert_eq!(s.submit(&[r], &[]).0, C::InvalidArgument);
    // Nothing was submitted: the next batch is the ring's first.
    let (rc, f) = s.submit(&[r], &[fill(0, 0, 16, 7)]);
    assert_eq!((rc, f.first), (C::Ok, 1), "{}", message());
    assert_eq!(s.wait(&f, 5000).0, C::Ok);
    unregister(r);
    assert_eq!(
        &buf[..17],
        &[7; 16].iter().chain(&[0]).copied().collect::<Vec<_>>()[..]
    );
}

/// An operand must lie inside its registration: the device never gets an IOVA
/// outside what the caller registered, even where the pinned pages go on.
#[test]
fn operands_outside_their_registration_are_refused() {
    let _s = serial();
    let s = Setup::new();
    let mut a = vec![0u8; 3 * 4096 + 100];
    let mut b = vec![0u8; 4096];
    let (ra, rb) = (s.register(&mut a, 3), s.register(&mut b, 3));
    let alen = a.len() as u64;
    let copy = |src: UserptrOperand, dst: UserptrOperand, len| UserptrCommand {
        opcode: UserptrOpcode::Copy as u32,
        src,
        dst,
        len,
        ..Default::default()
    };
    let op = |index, offset| UserptrOperand { index, offset };
    let saxpy = |n| UserptrCommand {
        opcode: UserptrOpcode::Saxpy as u32,
        src: op(1, 0),
        dst: op(0, 0),
        len: n,
        a: 1.0,
        ..Default::default()
    };
    let out_of_range = [
        fill(0, alen - 10, 11, 1),
        fill(0, alen, 1, 1),
        fill(0, u64::MAX, 2, 1),
        fill(0, 0, u64::MAX, 1),
        copy(op(1, 0), op(0, 0), 4097),
        copy(op(0, 4096), op(1, 1), 4096),
        saxpy(1025),
        saxpy(u64::MAX / 2),
        UserptrCommand {
            opcode: UserptrOpcode::WriteFence as u32,
            dst: op(1, 4090),
            ..Default::default()
        },
    ];
    for (i, c) in out_of_range.iter().enumerate() {
        let (rc, _) = s.submit(&[ra, rb], std::slice::from_ref(c));
        assert_eq!(rc, C::OperandRange, "case {i}: {}", message());
        assert!(message().contains("outside reference"), "{}", message());
    }
    // An index past the references.
    let (rc, _) = s.submit(&[ra, rb], &[fill(2, 0, 1, 1)]);
    assert_eq!(rc, C::InvalidArgument);
    assert!(message().contains("has 2 references"), "{}", message());
    // One bad command refuses the whole batch.
    let (rc, _) = s.submit(&[ra, rb], &[fill(0, 0, 1, 9), fill(1, 4096, 1, 9)]);
    assert_eq!(rc, C::OperandRange);
    // Operands the opcode does not use are not looked at.
    let nop = UserptrCommand {
        opcode: UserptrOpcode::Nop as u32,
        src: op(77, u64::MAX),
        dst: op(78, u64::MAX),
        ..Default::default()
    };
    // Exactly up to the end is inside.
    let (rc, f) = s.submit(
        &[ra, rb],
        &[
            nop,
            fill(0, alen - 10, 10, 5),
            copy(op(0, alen - 4096), op(1, 0), 4096),
        ],
    );
    assert_eq!((rc, f.first), (C::Ok, 1), "{}", message());
    assert_eq!(s.wait(&f, 5000).0, C::Ok, "{}", message());
    assert!(a[..a.len() - 10].iter().all(|&x| x == 0) && a[a.len() - 10..].iter().all(|&x| x == 5));
    assert_eq!(&b[4086..], &[5; 10]);
    unregister(ra);
    unregister(rb);
}

/// A registration is only submitted through its own registry, and a queue only with
/// a registry of its own driver (another device's IOVAs would reach other memory).
#[test]
fn handles_of_another_registry_or_driver_are_refused() {
    let _s = serial();
    let (s, t) = (Setup::new(), Setup::new());
    let mut buf = vec![0u8; 4096];
    let r = s.register(&mut buf, 3);
    let mut other = null_mut();
    // SAFETY: live driver handle, local out-parameter.
    assert_eq!(unsafe { userptr_registry_new(s.drv, 0, &mut other) }, C::Ok);
    let refs = [r.cast_const()];
    let cmd = fill(0, 0, 16, 1);
    let mut f = UserptrFence::default();
    // SAFETY: live handles, local arrays.
    unsafe {
        assert_eq!(
            userptr_submit(other, s.q, refs.as_ptr(), 1, &cmd, 1, &mut f),
            C::InvalidArgument
        );
        assert!(message().contains("another registry"), "{}", message());
        assert_eq!(
            userptr_submit(s.reg, t.q, refs.as_ptr(), 1, &cmd, 1, &mut f),
            C::InvalidArgument
        );
        assert!(message().contains("another driver"), "{}", message());
        userptr_registry_free(other);
    }
    unregister(r);
}

/// A second open of an open ring is refused and leaves the first queue working (the
/// driver's own refusal would disable the ring under it).
#[test]
fn a_busy_ring_is_refused_and_keeps_working() {
    let _s = serial();
    let s = Setup::new();
    let mut q2 = null_mut();
    // SAFETY: live driver handle, local out-parameter.
    let rc = unsafe { userptr_queue_open(s.drv, 0, 64, &mut q2) };
    assert_eq!(rc, C::RingBusy);
    assert!(q2.is_null());
    let mut buf = vec![0u8; 4096];
    let r = s.register(&mut buf, 3);
    let (rc, f) = s.submit(&[r], &[fill(0, 0, 4096, 3)]);
    assert_eq!(rc, C::Ok);
    assert_eq!(s.wait(&f, 5000).0, C::Ok, "{}", message());
    unregister(r);
    assert!(buf.iter().all(|&b| b == 3));
    // Closed, the ring can be opened again.
    let mut ring = 9;
    // SAFETY: live handles; `s.q` is replaced by the new queue before Setup's drop.
    unsafe {
        assert_eq!(userptr_queue_ring(s.q, &mut ring), C::Ok);
        assert_eq!(ring, 0);
        userptr_queue_close(s.q);
        let mut q = null_mut();
        assert_eq!(
            userptr_queue_open(s.drv, 0, 64, &mut q),
            C::Ok,
            "{}",
            message()
        );
        let s = std::mem::ManuallyDrop::new(s);
        userptr_queue_close(q);
        userptr_registry_free(s.reg);
        userptr_driver_close(s.drv);
    }
}

/// A wait that times out claims nothing and can be repeated; a batch is claimed once;
/// a fence that is not one of this queue's batches is refused.
#[test]
fn waits_time_out_repeat_and_claim_once() {
    let _s = serial();
    let s = Setup::new();
    let mut buf = vec![0u8; 8192];
    let r = s.register(&mut buf, 3);
    // SAFETY: a live driver handle.
    assert_eq!(unsafe { userptr_driver_set_enabled(s.drv, false) }, C::Ok);
    let (rc, f) = s.submit(&[r], &[fill(0, 0, 4096, 1), fill(0, 4096, 4096, 2)]);
    assert_eq!((rc, f.ring, f.first, f.last), (C::Ok, 0, 1, 2));
    assert_eq!(s.wait(&f, 10).0, C::Timeout, "the device is paused");
    assert!(message().contains("timed out"), "{}", message());
    // SAFETY: a live driver handle.
    assert_eq!(unsafe { userptr_driver_set_enabled(s.drv, true) }, C::Ok);
    let (rc, done) = s.wait(&f, 5000);
    assert_eq!(rc, C::Ok, "{}", message());
    assert_eq!((done[0].seqno, done[1].seqno), (1, 2));
    assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 2));
    assert_eq!(s.wait(&f, 10).0, C::NoCompletion);
    for bad in [
        UserptrFence { ring: 1, ..f },
        UserptrFence { first: 0, ..f },
        UserptrFence {
            first: 3,
            last: 2,
            ..f
        },
        UserptrFence {
            first: 1,
            last: 65,
            ..f
        },
    ] {
        assert_eq!(s.wait(&bad, 10).0, C::InvalidArgument, "{bad:?}");
    }
    // A smaller completions array gets the first ones.
    let (rc, f) = s.submit(&[r], &[fill(0, 0, 1, 5), fill(0, 1, 1, 6)]);
    assert_eq!(rc, C::Ok);
    let mut one = [UserptrCompletion::default(); 1];
    // SAFETY: a live queue, room for one completion.
    let rc = unsafe { userptr_wait(s.q, &f, 5000, one.as_mut_ptr(), 1) };
    assert_eq!(rc, C::Ok);
    assert_eq!(one[0].seqno, f.first);
    unregister(r);
}

/// Unregistering drops the registration's pins (the registry would otherwise keep
/// them cached), so VmPin returns to where it was.
#[test]
fn pins_are_gone_after_unregistering() {
    let _s = serial();
    let s = Setup::new();
    let start = vm_pin();
    let mut bufs: Vec<Vec<u8>> = (0..4).map(|i| vec![0u8; (i + 1) * 65536]).collect();
    let regs: Vec<_> = bufs.iter_mut().map(|b| s.register(b, 3)).collect();
    let mut pinned = 0;
    // SAFETY: live registry, local out-parameter.
    let rc = unsafe { userptr_registry_pinned_bytes(s.reg, &mut pinned) };
    assert_eq!(rc, C::Ok);
    assert!(pinned >= 10 * 65536, "{pinned}");
    assert!(vm_pin() >= start + 10 * 65536);
    let cmds: Vec<_> = (0..4).map(|i| fill(i, 0, 65536, i as u8 + 1)).collect();
    let (rc, f) = s.submit(&regs, &cmds);
    assert_eq!(rc, C::Ok);
    assert_eq!(s.wait(&f, 5000).0, C::Ok);
    for r in regs {
        unregister(r);
    }
    // SAFETY: live registry, local out-parameter.
    let rc = unsafe { userptr_registry_pinned_bytes(s.reg, &mut pinned) };
    assert_eq!(rc, C::Ok);
    assert_eq!(pinned, 0);
    assert_eq!(vm_pin(), start, "VmPin did not return after unregistering");
    for (i, b) in bufs.iter().enumerate() {
        assert!(b[..65536].iter().all(|&x| x == i as u8 + 1));
    }
}

/// The explicit monitor: a discard reported around the change is seen by the next
/// command. Without the report, the device writes the pages the process dropped.
#[test]
fn the_explicit_monitor_keeps_a_discarded_buffer_coherent() {
    let _s = serial();
    let s = Setup::new();
    let len = 1 << 20;
    for report in [true, false] {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping is ours for `len` bytes until the munmap below.
        let buf = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
        buf.fill(0x11);
        let r = s.register(buf, 3);
        let (rc, f) = s.submit(&[r], &[fill(0, 0, len as u64, 0xab)]);
        assert_eq!((rc, s.wait(&f, 5000).0), (C::Ok, C::Ok));
        let mut inv = null_mut();
        if report {
            // SAFETY: live registry, local out-parameter.
            let rc = unsafe {
                userptr_invalidate_begin(s.reg, p, len, UserptrCause::Discard as u32, 0, &mut inv)
            };
            assert_eq!(rc, C::Ok, "{}", message());
        }
        // SAFETY: discarding our own mapping; no reference into it is live.
        assert_eq!(unsafe { libc::madvise(p, len, libc::MADV_DONTNEED) }, 0);
        // SAFETY: the handle from invalidate_begin (or NULL).
        unsafe { userptr_invalidate_end(inv) };
        let (rc, f) = s.submit(&[r], &[fill(0, 0, len as u64, 0xcd)]);
        assert_eq!((rc, s.wait(&f, 5000).0), (C::Ok, C::Ok));
        // SAFETY: still mapped; the device is done with it (waited).
        let seen = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
        let stale = seen.iter().filter(|&&b| b != 0xcd).count();
        if report {
            assert_eq!(stale, 0, "reported, the FILL must land in the new pages");
        } else {
            assert_eq!(
                stale, len,
                "unreported, the FILL goes to the dropped pages (the hazard)"
            );
        }
        unregister(r);
        // SAFETY: unregistered; our mapping.
        unsafe { libc::munmap(p, len) };
    }
}

/// Monitors need process-wide state: here only that a bad kind and a missing shim are
/// refused with their codes (the seccomp and userfaultfd monitors run in the C
/// example's own processes, from capi/test-c.sh).
#[test]
fn the_preload_monitor_needs_its_shim() {
    let _s = serial();
    let s = Setup::new();
    let mut m = null_mut();
    // SAFETY: live registry, local out-parameter.
    let rc = unsafe { userptr_monitor_install(s.reg, UserptrMonitorKind::Preload as u32, &mut m) };
    assert_eq!((rc, m.is_null()), (C::MonitorUnavailable, true));
    assert!(message().contains("LD_PRELOAD"), "{}", message());
}

/// Every exported function runs its body in the panic guard (see
/// `failure::tests::a_panic_becomes_a_code_and_a_message` for the guard itself).
#[test]
fn every_exported_function_is_guarded() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = 0;
    for e in std::fs::read_dir(&src).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("extern \"C\" fn ") {
            let after = &rest[at..];
            let name: String = after["extern \"C\" fn ".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let body = &after[after.find('{').unwrap() + 1..];
            let first = body.trim_start();
            let guarded = first.starts_with("guard(")
                || first.starts_with("failure::guard(")
                || first.starts_with("catch_unwind(")
                || first.starts_with("let fault = catch_unwind(")
                || first.starts_with("const VERSION")
                || first.starts_with("UserptrCode::from_i32(code)");
            assert!(
                guarded,
                "{}: `{name}` does not start with the guard",
                path.display()
            );
            seen += 1;
            rest = &after[1..];
        }
    }
    assert!(seen >= 25, "found only {seen} exported functions");
}

/// A wait covers the whole batch: a fault in its first command is the wait's error
/// even though the last command completed fine, and each completion says how its
/// command ended.
#[test]
fn a_fault_anywhere_in_the_batch_fails_the_wait() {
    let _s = serial();
    let s = Setup::new();
    let mut buf = vec![0u8; 8192];
    let ro = s.register(&mut buf[..4096], UserptrPerm::Read as u32);
    let rw = s.register(&mut buf[4096..], UserptrPerm::ReadWrite as u32);
    let mut ro_iova = 0;
    // SAFETY: a live registration, local out-parameter.
    let rc = unsafe { userptr_registration_iova(ro, &mut ro_iova) };
    assert_eq!(rc, C::Ok);
    let (rc, f) = s.submit(&[ro, rw], &[fill(0, 0, 4096, 1), fill(1, 0, 4096, 2)]);
    assert_eq!(rc, C::Ok, "{}", message());
    let (rc, done) = s.wait(&f, 5000);
    assert_eq!(rc, C::DmaFault, "{}", message());
    assert!(message().contains("fault at IOVA"), "{}", message());
    let mut fault = UserptrFault::default();
    // SAFETY: a local out-parameter.
    assert!(unsafe { userptr_last_error_fault(&mut fault) });
    assert_eq!(
        (fault.seqno, fault.iova, fault.access),
        (f.first, ro_iova, 2)
    );
    assert_eq!(
        (done[0].status, done[0].fault_iova, done[0].fault_access),
        (1, ro_iova, 2)
    );
    assert_eq!((done[1].status, done[1].fault_access), (0, 0));
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 2));
    unregister(ro);
    unregister(rw);
}
