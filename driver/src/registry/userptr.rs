//! A registration ([`Userptr`]): the handle a [`Registry`] hands out for a range of
//! process memory, with the borrow of the registered buffer in its lifetime, and what
//! dropping it does (unregister, or leave the pin cached).

use super::{Inner, Registry};
use crate::iommu::Perm;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Weak};

/// A registration: a range of process memory the device may access with `perm`.
/// Resolved to a pinned mapping at each submission.
///
/// `'a` is the borrow of the registered buffer:
/// * from [`Registry::register_slice`] / [`Registry::register_slice_ref`], the slice
///   stays borrowed while the registration lives, and dropping it **unregisters** the
///   range ([`Registry::unregister`]: an invalidation with [`Cause::Release`](super::Cause::Release), which
///   waits for the device work that may reach it), so no device access outlives the
///   borrow;
/// * from the `unsafe` [`Registry::register`], `'static`: it borrows nothing, and
///   dropping it leaves the pin cached (the lazy-unpin cache: registering the same
///   range again is a hit). Only these can be cloned.
///
/// A registration belongs to the registry that made it; another one refuses it
/// ([`Error::ForeignUserptr`](crate::error::Error::ForeignUserptr)).
pub struct Userptr<'a> {
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) perm: Perm,
    pub(super) pages: Range<u64>,
    /// The registry that made it (weakly: a registration does not keep it alive; once
    /// it is gone, its teardown has unmapped everything).
    pub(super) owner: Weak<Inner>,
    /// Unregister on drop: a registration that borrows its buffer.
    pub(super) unregister_on_drop: bool,
    /// The buffer's borrow.
    pub(super) _buffer: PhantomData<&'a mut [u8]>,
}

impl Userptr<'_> {
    /// Host address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: zero-length registrations are refused.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Device permissions.
    pub fn perm(&self) -> Perm {
        self.perm
    }
    /// Whether dropping it unregisters its range (a registration that borrows its
    /// buffer), rather than leaving the pin cached.
    pub fn unregisters_on_drop(&self) -> bool {
        self.unregister_on_drop
    }
    /// Whether `inner` made it.
    pub(super) fn made_by(&self, inner: &Arc<Inner>) -> bool {
        std::ptr::eq(self.owner.as_ptr(), Arc::as_ptr(inner))
    }
}

/// Only a registration that borrows nothing (`'static`: the `unsafe`
/// [`Registry::register`], or a slice borrowed for good) can be duplicated: a clone of
/// one that borrows a buffer would outlive nothing, but two handles unregistering one
/// borrow would be a trap.
impl Clone for Userptr<'static> {
    fn clone(&self) -> Self {
        Userptr {
            addr: self.addr,
            len: self.len,
            perm: self.perm,
            pages: self.pages.clone(),
            owner: self.owner.clone(),
            unregister_on_drop: self.unregister_on_drop,
            _buffer: PhantomData,
        }
    }
}

/// Two registrations are equal when they name the same range, permission and registry.
impl PartialEq for Userptr<'_> {
    fn eq(&self, other: &Self) -> bool {
        (self.addr, self.len, self.perm) == (other.addr, other.len, other.perm)
            && Weak::ptr_eq(&self.owner, &other.owner)
    }
}

impl Eq for Userptr<'_> {}

impl std::fmt::Debug for Userptr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userptr")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("perm", &self.perm)
            .field("unregister_on_drop", &self.unregister_on_drop)
            .finish_non_exhaustive()
    }
}

impl Drop for Userptr<'_> {
    fn drop(&mut self) {
        if !self.unregister_on_drop {
            return;
        }
        // A registry already gone unmapped everything in its teardown (waiting for the
        // device the same way).
        let Some(inner) = self.owner.upgrade() else {
            return;
        };
        let reg = Registry { inner };
        if let Err(e) = reg.release(self) {
            tracing::error!(
                "unregistering {:#x} + {:#x} on drop: {e}",
                self.addr,
                self.len
            );
        }
    }
}
