//! The C side of the boundary: pointer arguments and handles. Every pointer a C caller
//! passes goes through one of these checks (NULL, alignment, size) before Rust looks
//! at it; what cannot be checked (that a non-NULL pointer is live, that a handle was
//! not closed already) is the caller's promise, written in the header.

use crate::failure::Failure;

/// `p` as a shared reference to a handle or struct argument.
///
/// # Safety
/// `p` is NULL or points to a live, initialised `T` that outlives `'a` and that no one
/// mutates meanwhile.
pub(crate) unsafe fn arg<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    if p.is_null() {
        return Err(Failure::null(name));
    }
    if !p.is_aligned() {
        return Err(Failure::invalid(format!(
            "argument `{name}` ({p:p}) is not aligned for its type"
        )));
    }
    // SAFETY: non-null and aligned; live and initialised by the caller's promise.
    Ok(unsafe { &*p })
}

/// `n` elements at `p` (`p` may be NULL when `n` is 0).
///
/// # Safety
/// When `n > 0`, `p` is NULL or points to `n` live, initialised `T`s that outlive `'a`
/// and that no one mutates meanwhile.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(name));
    }
    if !p.is_aligned() {
        return Err(Failure::invalid(format!(
            "array `{name}` ({p:p}) is not aligned for its element type"
        )));
    }
    if n.checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Failure::invalid(format!(
            "array `{name}` of {n} elements is larger than the address space"
        )));
    }
    // SAFETY: non-null, aligned, within isize::MAX bytes; live and initialised for `n`
    // elements by the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// An out-parameter, checked before any work is done so that a NULL one never leaks
/// what the call made.
pub(crate) struct Out<T>(std::ptr::NonNull<T>);

impl<T> Out<T> {
    /// Check `p`.
    ///
    /// # Safety
    /// `p` is NULL or valid for a write of one `T` until [`Out::put`] is called.
    pub(crate) unsafe fn new(p: *mut T, name: &str) -> Result<Out<T>, Failure> {
        let Some(nn) = std::ptr::NonNull::new(p) else {
            return Err(Failure::null(name));
        };
        if !p.is_aligned() {
            return Err(Failure::invalid(format!(
                "out-parameter `{name}` ({p:p}) is not aligned for its type"
            )));
        }
        Ok(Out(nn))
    }

    /// Write the result (without reading or dropping what was there).
    pub(crate) fn put(self, v: T) {
        // SAFETY: checked non-null and aligned in `new`, whose caller promised the
        // pointer is writable until now.
        unsafe { self.0.as_ptr().write(v) }
    }
}

/// A new handle for C: the boxed value, owned by the caller until its close function.
pub(crate) fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Close a handle made by [`into_handle`]; NULL is a no-op.
///
/// # Safety
/// `p` is NULL or a handle from [`into_handle`] of the same type, not closed before
/// and not in use by another thread.
pub(crate) unsafe fn close_handle<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: made by Box::into_raw in `into_handle` and not freed yet (the
        // caller's promise).
        drop(unsafe { Box::from_raw(p) });
    }
}
