//! # userptr-capi: the C ABI of userptr
//!
//! `include/userptr.h` (generated from this crate by cbindgen, checked in, and checked
//! for drift by `tests/header.rs`) declares what this crate exports; the library comes
//! as `libuserptr_capi.so` and `libuserptr_capi.a`, found through the pkg-config
//! files `userptr` and `userptr-static` (`capi/install.sh`).
//!
//! The shape:
//! * opaque handles, each made by one function and ended by one: driver (the
//!   reference device), queue (a command ring), registry, registration, monitor,
//!   invalidation (the explicit monitor);
//! * every function returns a [`code::UserptrCode`] (0 is success), one stable code per
//!   driver error; the message is `userptr_last_error_message()` (thread-local);
//! * no Rust panic crosses the boundary: every exported function runs its body in
//!   [`failure`]'s guard, which turns one into `USERPTR_CODE_PANIC`;
//! * pointers are checked (NULL, alignment) and enum arguments are plain integers,
//!   decoded with an error for unknown values, never transmuted;
//! * submission is data-driven ([`command`]): commands whose operands name a
//!   registration by index plus an offset, checked against it before anything is
//!   submitted, resolved to IOVAs by the registry.
//!
//! Modules: [`code`] (the error codes), [`failure`] (failures, the last error, the
//! guard), `boundary` (pointer arguments and handles), [`driver`] (driver, queue),
//! [`registry`] (registry, registrations, explicit invalidation), [`command`] (the
//! command format and its checks), [`submit`] (submit, wait), [`monitor`].
//!
//! The Python module (`userptr-python`) uses the Rust side of these modules: the same
//! codes, command checks and batch wait.

#![deny(missing_docs)]

mod boundary;
pub mod code;
pub mod command;
pub mod driver;
pub mod failure;
pub mod monitor;
pub mod registry;
pub mod submit;

use code::UserptrCode;
use std::ffi::c_char;

/// The library's version, e.g. "0.1.0" (static, never NULL).
#[no_mangle]
pub extern "C" fn userptr_version() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// The name of a code as the header spells it ("USERPTR_CODE_BAD_ADDRESS"), or
/// "USERPTR_CODE_UNKNOWN" for a number that is no code (static, never NULL).
#[no_mangle]
pub extern "C" fn userptr_code_name(code: i32) -> *const c_char {
    UserptrCode::from_i32(code)
        .map_or(c"USERPTR_CODE_UNKNOWN", UserptrCode::name)
        .as_ptr()
}

/// Bytes this process has pinned now, as the kernel counts them (`VmPin` in
/// `/proc/self/status`); `*out` receives the count.
///
/// # Safety
/// `out` is NULL or valid for writing one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn userptr_process_pinned_bytes(out: *mut u64) -> UserptrCode {
    failure::guard(|| {
        // SAFETY: the caller's promise on `out`.
        let out = unsafe { boundary::Out::new(out, "out") }?;
        let n = userptr::proc_status::pinned_bytes().map_err(|e| userptr::Error::Sys {
            op: "read VmPin from /proc/self/status",
            source: e,
        })?;
        out.put(n);
        Ok(())
    })
}
