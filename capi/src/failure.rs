//! Failures and the boundary guard: what a call that went wrong hands back (a code, a
//! message, the DMA fault if there was one), the thread-local last error C reads it
//! from, and `guard`, which every `extern "C"` function runs its body in so that no
//! Rust panic crosses into C.

use crate::code::UserptrCode;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use userptr::{AccessKind, Error, FaultRecord};

/// A failed call: its code, its message and, for a faulted command, where it faulted.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The code.
    pub code: UserptrCode,
    /// The message, in words (the driver error's `Display`).
    pub message: String,
    /// The DMA fault, for [`UserptrCode::DmaFault`].
    pub fault: Option<Fault>,
}

/// Where and how a command faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The ring the command ran on.
    pub ring: u32,
    /// The command's seqno.
    pub seqno: u64,
    /// The fault record: the IOVA the device tried to reach, and how.
    pub record: FaultRecord,
}

impl Failure {
    /// A failure the bindings themselves produce.
    pub fn new(code: UserptrCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            fault: None,
        }
    }

    /// A NULL pointer where one is required.
    pub fn null(arg: &str) -> Failure {
        Failure::new(
            UserptrCode::NullPointer,
            format!("argument `{arg}` is NULL"),
        )
    }

    /// An argument outside its domain.
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(UserptrCode::InvalidArgument, message)
    }

    fn panic(payload: &(dyn std::any::Any + Send)) -> Failure {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with no message".into());
        Failure::new(
            UserptrCode::Panic,
            format!("internal error (a Rust panic, caught at the C boundary): {what}"),
        )
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let fault = match &e {
            Error::Command {
                ring,
                seqno,
                fault: Some(record),
                ..
            } => Some(Fault {
                ring: *ring,
                seqno: *seqno,
                record: *record,
            }),
            _ => None,
        };
        Failure {
            code: UserptrCode::of(&e),
            message: e.to_string(),
            fault,
        }
    }
}

struct LastError {
    code: UserptrCode,
    message: CString,
    fault: Option<Fault>,
}

thread_local! {
    static LAST: RefCell<LastError> = RefCell::new(LastError {
        code: UserptrCode::Ok,
        message: CString::default(),
        fault: None,
    });
}

fn set_last(f: Option<Failure>) {
    let (code, message, fault) = match f {
        Some(f) => {
            // A message with an interior NUL would be cut short; C sees it whole.
            let text = f.message.replace('\0', "\u{fffd}");
            (f.code, CString::new(text).unwrap_or_default(), f.fault)
        }
        None => (UserptrCode::Ok, CString::default(), None),
    };
    // `try_with`/`try_borrow_mut`: never panic here, even during thread teardown.
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            *l = LastError {
                code,
                message,
                fault,
            };
        }
    });
}

/// Run `body` as an `extern "C"` function's body: clear the last error, catch any
/// panic, and turn the outcome into a code (recording the failure as the last error).
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> UserptrCode {
    set_last(None);
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return UserptrCode::Ok,
        Ok(Err(f)) => f,
        Err(payload) => Failure::panic(&*payload),
    };
    let code = failure.code;
    set_last(Some(failure));
    code
}

/// The code of the last failed call on this thread, or `USERPTR_CODE_OK` when the
/// last call succeeded. Every call except the `userptr_last_error_*` functions resets
/// the last error when it starts.
#[no_mangle]
pub extern "C" fn userptr_last_error_code() -> UserptrCode {
    catch_unwind(|| {
        LAST.try_with(|l| l.try_borrow().map(|l| l.code).unwrap_or(UserptrCode::Panic))
            .unwrap_or(UserptrCode::Panic)
    })
    .unwrap_or(UserptrCode::Panic)
}

/// The message of the last failed call on this thread ("" when the last call
/// succeeded). Never NULL. The string belongs to the library and stays valid until the
/// next call into the library on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn userptr_last_error_message() -> *const c_char {
    catch_unwind(|| {
        LAST.try_with(|l| {
            l.try_borrow()
                .map(|l| l.message.as_ptr())
                .unwrap_or(c"(the last error is being written)".as_ptr())
        })
        .unwrap_or(c"(the thread is exiting)".as_ptr())
    })
    .unwrap_or(c"(internal error reading the last error)".as_ptr())
}

/// Where a faulted command faulted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserptrFault {
    /// The ring the command ran on.
    pub ring: u32,
    /// How the device accessed memory: a `userptr_access` value (`USERPTR_ACCESS_READ`
    /// or `USERPTR_ACCESS_WRITE`).
    pub access: u32,
    /// The command's seqno.
    pub seqno: u64,
    /// The IOVA the device tried to reach.
    pub iova: u64,
}

impl From<Fault> for UserptrFault {
    fn from(f: Fault) -> UserptrFault {
        UserptrFault {
            ring: f.ring,
            access: access_code(Some(f.record.access)),
            seqno: f.seqno,
            iova: f.record.iova,
        }
    }
}

/// A `userptr_access` value.
pub(crate) fn access_code(a: Option<AccessKind>) -> u32 {
    match a {
        None => crate::command::UserptrAccess::None as u32,
        Some(AccessKind::Read) => crate::command::UserptrAccess::Read as u32,
        Some(AccessKind::Write) => crate::command::UserptrAccess::Write as u32,
    }
}

/// Whether the last failed call on this thread was a command's DMA fault
/// (`USERPTR_CODE_DMA_FAULT`); if so, and `out` is not NULL, `*out` is where it
/// faulted. `out` must be NULL or point to writable memory for one `userptr_fault`.
///
/// # Safety
/// `out` is NULL or valid for a write of one `userptr_fault`.
#[no_mangle]
pub unsafe extern "C" fn userptr_last_error_fault(out: *mut UserptrFault) -> bool {
    let fault = catch_unwind(|| {
        LAST.try_with(|l| l.try_borrow().ok().and_then(|l| l.fault))
            .ok()
            .flatten()
    })
    .ok()
    .flatten();
    match fault {
        Some(f) => {
            if !out.is_null() && out.is_aligned() {
                // SAFETY: non-null and aligned; the caller promises it is writable
                // for one userptr_fault (the header's contract).
                unsafe { out.write(f.into()) };
            }
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn message() -> String {
        // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
        unsafe { CStr::from_ptr(userptr_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }

    /// An `extern "C"` function the way the library writes them, whose body panics:
    /// the guard must turn it into a code. Without the guard the panic would reach the
    /// `extern "C"` frame and abort the whole test binary.
    extern "C" fn panics() -> UserptrCode {
        guard(|| panic!("boom {}", 42))
    }

    #[test]
    fn a_panic_becomes_a_code_and_a_message() {
        assert_eq!(panics(), UserptrCode::Panic);
        assert_eq!(userptr_last_error_code(), UserptrCode::Panic);
        assert!(message().contains("boom 42"), "{}", message());
        // The next call clears it.
        assert_eq!(guard(|| Ok(())), UserptrCode::Ok);
        assert_eq!(userptr_last_error_code(), UserptrCode::Ok);
        assert_eq!(message(), "");
    }

    #[test]
    fn failures_are_recorded_per_thread() {
        let code = guard(|| Err(Failure::invalid("bad\0thing")));
        assert_eq!(code, UserptrCode::InvalidArgument);
        assert_eq!(message(), "bad\u{fffd}thing");
        std::thread::spawn(|| assert_eq!(userptr_last_error_code(), UserptrCode::Ok))
            .join()
            .unwrap();
        assert_eq!(userptr_last_error_code(), UserptrCode::InvalidArgument);
    }

    #[test]
    fn a_fault_is_kept_with_the_failure() {
        let e = Error::Command {
            ring: 1,
            seqno: 7,
            status: userptr::Status::DmaFault,
            fault: Some(FaultRecord {
                iova: 0x5000,
                access: AccessKind::Write,
            }),
        };
        assert_eq!(guard(|| Err(e.into())), UserptrCode::DmaFault);
        let mut f = UserptrFault::default();
        // SAFETY: a local out-parameter.
        assert!(unsafe { userptr_last_error_fault(&mut f) });
        assert_eq!(
            f,
            UserptrFault {
                ring: 1,
                access: 2,
                seqno: 7,
                iova: 0x5000
            }
        );
        assert!(message().contains("0x5000"), "{}", message());
        guard(|| Ok(()));
        // SAFETY: NULL is allowed.
        assert!(!unsafe { userptr_last_error_fault(std::ptr::null_mut()) });
    }
}
