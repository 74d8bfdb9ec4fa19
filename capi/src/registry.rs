//! Registry, registration and invalidation handles: register raw memory, unregister
//! it (its pins are dropped then), and the explicit monitor (tell the registry about
//! an address-space change around making it).

use crate::boundary::{arg, close_handle, into_handle, Out};
use crate::code::UserptrCode;
use crate::driver::Identity;
use crate::failure::{guard, Failure};
use userptr::{Cause, Invalidation, Perm, Registry, RegistryConfig, Userptr};

/// The userptr registry of one driver (opaque): pinned regions, reused across
/// submissions until an invalidation or an eviction. Made by `userptr_registry_new`,
/// freed by `userptr_registry_free`. May be used from several threads at once.
pub struct UserptrRegistry {
    pub(crate) registry: Registry,
    pub(crate) id: Identity,
    pub(crate) driver_id: Identity,
}

/// A registration (opaque): a range of process memory the device may access. Made
/// by `userptr_register`, ended by `userptr_unregister`.
pub struct UserptrRegistration {
    pub(crate) registry: Registry,
    pub(crate) registry_id: Identity,
    pub(crate) userptr: Userptr<'static>,
}

/// An open explicit invalidation (opaque), between `userptr_invalidate_begin` and
/// `userptr_invalidate_end`.
pub struct UserptrInvalidation {
    registry: Registry,
    inv: Option<Invalidation>,
}

impl Drop for UserptrInvalidation {
    fn drop(&mut self) {
        if let Some(inv) = self.inv.take() {
            self.registry.invalidate_end(inv);
        }
    }
}

/// Device access permissions of a registration.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserptrPerm {
    /// The device reads the memory (a command's source).
    Read = 1,
    /// The device writes the memory (a command's destination).
    Write = 2,
    /// Both.
    ReadWrite = 3,
}

/// A `userptr_perm` value as a driver permission.
pub fn perm_from(v: u32) -> Result<Perm, Failure> {
    match v {
        1 => Ok(Perm::READ),
        2 => Ok(Perm::WRITE),
        3 => Ok(Perm::READ_WRITE),
        _ => Err(Failure::invalid(format!(
            "{v} is not a userptr_perm (USERPTR_PERM_READ = 1, WRITE = 2, READ_WRITE = 3)"
        ))),
    }
}

/// Why memory is being invalidated (the explicit monitor's cause).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserptrCause {
    /// `munmap`, `mmap(MAP_FIXED)` over it, a `brk` shrink: the pages go away.
    Unmap = 1,
    /// A destructive `madvise` (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`).
    Discard = 2,
    /// `mremap` moves the range; `cause_arg` is the destination (0: the kernel chooses).
    Remap = 3,
    /// `mprotect`; `cause_arg` is the new protection (`PROT_*` bits).
    Protect = 4,
    /// The application releases the range.
    Release = 5,
}

/// A `userptr_cause` value and its argument as a driver cause.
pub fn cause_from(v: u32, arg: u64) -> Result<Cause, Failure> {
    Ok(match v {
        1 => Cause::Unmap,
        2 => Cause::Discard,
        3 => Cause::Remap { to: arg },
        4 => Cause::Protect {
            new_prot: i32::try_from(arg)
                .map_err(|_| Failure::invalid(format!("{arg:#x} is not a PROT_* value")))?,
        },
        5 => Cause::Release,
        _ => Err(Failure::invalid(format!(
            "{v} is not a userptr_cause (UNMAP = 1, DISCARD = 2, REMAP = 3, PROTECT = 4, \
             RELEASE = 5)"
        )))?,
    })
}

/// The one place the bindings hand a raw address range to the registry.
///
/// # Safety
/// [`Registry::register`]'s contract, which is the one `userptr_register` documents
/// for C callers: `[addr, addr + len)` stays mapped, with the same pages, while the
/// registration lives (until [`release`]) and every submission naming it has been
/// waited for, unless a monitor (or the explicit invalidation) tells the registry
/// about every change; and the program does not access it in a way that races the
/// device's access `perm` allows while such a submission runs.
pub unsafe fn register_raw(
    registry: &Registry,
    addr: usize,
    len: usize,
    perm: Perm,
) -> Result<Userptr<'static>, Failure> {
    // SAFETY: the caller's promise (the function's contract), which is the one
    // `Registry::register` asks for.
    Ok(unsafe { registry.register(addr, len, perm) }?)
}

/// End a registration: its pages are invalidated (`Cause::Release`), so no pin of
/// them is left. Waits for device work in flight on them (bounded by the registry's
/// fence timeout, after which the device is reset). Other registrations sharing those
/// pages stay valid: they are pinned again at their next use.
pub fn release(registry: &Registry, u: &Userptr<'_>) -> Result<(), Failure> {
    let end = u.addr().saturating_add(u.len());
    Ok(registry.invalidate(u.addr()..end, Cause::Release)?)
}

/// Make a registry over `driver`'s device; `*out` receives it. `pin_budget` is the
/// most bytes it keeps pinned at once (0: the default, RLIMIT_MEMLOCK); idle regions
/// are evicted to stay under it.
///
/// # Safety
/// `driver` is NULL or a live driver handle; `out` is NULL or valid for writing one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn userptr_registry_new(
    driver: *const crate::driver::UserptrDriver,
    pin_budget: u64,
    out: *mut *mut UserptrRegistry,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `driver` and `out`.
        let (d, out) = unsafe { (arg(driver, "driver")?, Out::new(out, "out")?) };
        let cfg = RegistryConfig {
            pin_budget: (pin_budget != 0).then_some(pin_budget),
            ..RegistryConfig::default()
        };
        let registry = Registry::new(d.driver.clone(), cfg);
        out.put(into_handle(UserptrRegistry {
            registry,
            id: Identity::default(),
            driver_id: d.id.clone(),
        }));
        Ok(())
    })
}

/// Bytes the registry has pinned now; `*out` receives the count.
///
/// # Safety
/// `registry` is NULL or a live registry handle; `out` is NULL or valid for writing
/// one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn userptr_registry_pinned_bytes(
    registry: *const UserptrRegistry,
    out: *mut u64,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `registry` and `out`.
        let (r, out) = unsafe { (arg(registry, "registry")?, Out::new(out, "out")?) };
        out.put(r.registry.pinned_bytes());
        Ok(())
    })
}

/// Free a registry handle (NULL: nothing). Its pins are released once the last
/// registration and monitor made from it are gone too.
///
/// # Safety
/// `registry` is NULL or a handle from `userptr_registry_new`, not freed before, and
/// no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn userptr_registry_free(registry: *mut UserptrRegistry) {
    guard(|| {
        // SAFETY: the caller's promise.
        unsafe { close_handle(registry) };
        Ok(())
    });
}

/// Register `len` bytes at `addr` for device access with `perm` (a `userptr_perm`
/// value); they are pinned now, so memory the device cannot use is refused here.
/// `*out` receives the registration.
///
/// The contract: from here until `userptr_unregister` (and, for every submission that
/// names the registration, until that submission's `userptr_wait` returned):
/// * `[addr, addr + len)` stays mapped with the same pages (do not free, munmap,
///   madvise(MADV_DONTNEED), mremap or mprotect it), **unless** a monitor is installed
///   on the registry (`userptr_monitor_install`) or the application reports each
///   change itself (`userptr_invalidate_begin` / `_end`): then the registry
///   invalidates the range first, waiting for the device work that may reach it.
///   Otherwise the device may read and write pages the process no longer sees;
/// * the program does not race the device: while a submitted command that may write
///   the memory runs, nothing reads or writes it; while one that may read it runs,
///   nothing writes it. `userptr_wait` on the command's fence ends its access.
///
/// The rest of the first and last page is mapped too (the IOMMU maps whole pages).
///
/// Accepted: private anonymous memory (malloc, the stack, mmap), and memfds sealed
/// against shrinking and writing. Errors: `USERPTR_CODE_ZERO_LENGTH`,
/// `USERPTR_CODE_OVERFLOW`, `USERPTR_CODE_BAD_ADDRESS` (unmapped, PROT_NONE or
/// read-only memory), `USERPTR_CODE_UNSUPPORTED_MEMORY`,
/// `USERPTR_CODE_REPLACEABLE_PAGES`, `USERPTR_CODE_PIN_LIMIT`,
/// `USERPTR_CODE_PIN_BUDGET`, `USERPTR_CODE_INVALID_ARGUMENT` (a bad `perm`).
///
/// # Safety
/// `registry` is NULL or a live registry handle; `out` is NULL or valid for writing
/// one pointer; the memory contract above.
#[no_mangle]
pub unsafe extern "C" fn userptr_register(
    registry: *const UserptrRegistry,
    addr: *mut std::ffi::c_void,
    len: usize,
    perm: u32,
    out: *mut *mut UserptrRegistration,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `registry` and `out`.
        let (r, out) = unsafe { (arg(registry, "registry")?, Out::new(out, "out")?) };
        let perm = perm_from(perm)?;
        // SAFETY: the memory contract of this function, which its caller accepted.
        let userptr = unsafe { register_raw(&r.registry, addr as usize, len, perm) }?;
        out.put(into_handle(UserptrRegistration {
            registry: r.registry.clone(),
            registry_id: r.id.clone(),
            userptr,
        }));
        Ok(())
    })
}

/// The device address of the registration's first byte now (pinning it if needed).
/// Only meaningful until the next invalidation of its pages: for diagnostics (a
/// fault's IOVA); commands name registrations, not IOVAs.
///
/// # Safety
/// `registration` is NULL or a live registration handle; `out` is NULL or valid for
/// writing one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn userptr_registration_iova(
    registration: *const UserptrRegistration,
    out: *mut u64,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `registration` and `out`.
        let (r, out) = unsafe { (arg(registration, "registration")?, Out::new(out, "out")?) };
        out.put(r.registry.iova(&r.userptr)?);
        Ok(())
    })
}

/// End a registration (NULL: nothing, `USERPTR_CODE_OK`) and free its handle: its
/// pages are unpinned, after device work in flight on them finished (bounded by the
/// registry's fence timeout, 5 s, after which the device is reset and that work
/// completes `USERPTR_STATUS_ABORTED`). The memory may be freed once this returns.
/// The handle is freed even when an error is returned
/// (`USERPTR_CODE_INVALIDATION_FAILED`: the device could not be stopped).
///
/// # Safety
/// `registration` is NULL or a handle from `userptr_register`, not unregistered
/// before, and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn userptr_unregister(registration: *mut UserptrRegistration) -> UserptrCode {
    guard(|| {
        if registration.is_null() {
            return Ok(());
        }
        // SAFETY: a live handle (the caller's promise); it is freed just below.
        let r = unsafe { &*registration };
        let done = release(&r.registry, &r.userptr);
        // SAFETY: the caller's promise; `r` is not used past this point.
        unsafe { close_handle(registration) };
        done
    })
}

/// The explicit monitor, first half: tell the registry that `[addr, addr + len)` is
/// about to change for `cause` (a `userptr_cause` value; `cause_arg`: the destination for
/// `USERPTR_CAUSE_REMAP`, the new `PROT_*` for `USERPTR_CAUSE_PROTECT`, else 0). When
/// this returns, the device no longer uses the range and no new pin of it can be
/// taken until `userptr_invalidate_end`. Make the change, then end it.
///
/// # Safety
/// `registry` is NULL or a live registry handle; `out` is NULL or valid for writing
/// one pointer.
#[no_mangle]
pub unsafe extern "C" fn userptr_invalidate_begin(
    registry: *const UserptrRegistry,
    addr: *mut std::ffi::c_void,
    len: usize,
    cause: u32,
    cause_arg: u64,
    out: *mut *mut UserptrInvalidation,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `registry` and `out`.
        let (r, out) = unsafe { (arg(registry, "registry")?, Out::new(out, "out")?) };
        let cause = cause_from(cause, cause_arg)?;
        let start = addr as u64;
        if len == 0 {
            return Err(userptr::Error::ZeroLength { addr: start }.into());
        }
        let end = start
            .checked_add(len as u64)
            .ok_or(userptr::Error::Overflow {
                addr: start,
                len: len as u64,
            })?;
        let inv = r.registry.invalidate_start(start..end, cause)?;
        out.put(into_handle(UserptrInvalidation {
            registry: r.registry.clone(),
            inv: Some(inv),
        }));
        Ok(())
    })
}

/// The explicit monitor, second half: the change is made; the range may be pinned
/// again (at its next use). Frees the handle (NULL: nothing).
///
/// # Safety
/// `inv` is NULL or a handle from `userptr_invalidate_begin`, not ended before, and
/// no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn userptr_invalidate_end(inv: *mut UserptrInvalidation) {
    guard(|| {
        // SAFETY: the caller's promise; dropping the handle ends the invalidation.
        unsafe { close_handle(inv) };
        Ok(())
    });
}
