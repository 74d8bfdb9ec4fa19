//! Submission and completion: a batch of data-driven commands through the registry
//! (which resolves the references to IOVAs, never with a stale pin), its fence, and
//! waiting for the whole batch, a faulted command being an error.

use crate::boundary::{arg, slice, Out};
use crate::code::UserptrCode;
use crate::command::{Plan, UserptrCommand};
use crate::driver::UserptrQueue;
use crate::failure::{access_code, guard, Failure};
use crate::registry::{UserptrRegistration, UserptrRegistry};
use std::time::{Duration, Instant};
use userptr::{
    BatchFences, CommandQueue, Completion, CompletionExt, Fence, Registry, Userptr, WaitMode,
};

/// A submitted batch: its ring and the seqnos of its first and last commands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserptrFence {
    /// The ring the batch was submitted on.
    pub ring: u32,
    /// The first command's seqno.
    pub first: u64,
    /// The last command's seqno (reaching it means the whole batch completed).
    pub last: u64,
}

impl From<BatchFences> for UserptrFence {
    fn from(f: BatchFences) -> UserptrFence {
        UserptrFence {
            ring: f.end.ring,
            first: f.start.seqno,
            last: f.end.seqno,
        }
    }
}

/// How one command ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserptrCompletion {
    /// The command's seqno.
    pub seqno: u64,
    /// A `userptr_status` value.
    pub status: u32,
    /// For `USERPTR_STATUS_DMA_FAULT`: a `userptr_access` value, else
    /// `USERPTR_ACCESS_NONE`.
    pub fault_access: u32,
    /// For `USERPTR_STATUS_DMA_FAULT`: the IOVA the device tried to reach, else 0.
    pub fault_iova: u64,
    /// The opcode's result (CRC32C: the checksum), else 0.
    pub result: u64,
    /// For a rejected descriptor, the reason code; for a device error, the errno.
    pub detail: u32,
}

impl From<&Completion> for UserptrCompletion {
    fn from(c: &Completion) -> UserptrCompletion {
        UserptrCompletion {
            seqno: c.seqno,
            status: c.status as u32,
            fault_access: access_code(c.fault.map(|f| f.access)),
            fault_iova: c.fault.map_or(0, |f| f.iova),
            result: c.result,
            detail: c.detail,
        }
    }
}

/// Submit `cmds` on `queue` as one batch, their operands naming `refs`. The caller
/// has checked that `queue` and `registry` belong to the same driver, and `refs` to
/// `registry`.
pub fn submit(
    registry: &Registry,
    queue: &CommandQueue,
    refs: &[&Userptr<'_>],
    cmds: &[UserptrCommand],
) -> Result<BatchFences, Failure> {
    let plan = Plan::new(cmds, refs)?;
    Ok(registry.submit(queue, refs, |iovas| plan.build(iovas))?)
}

/// Check that `f` can be a batch of `queue`.
pub fn check_fence(queue: &CommandQueue, f: UserptrFence) -> Result<BatchFences, Failure> {
    if f.ring != queue.ring() {
        return Err(Failure::invalid(format!(
            "the fence is of ring {}, the queue is ring {}",
            f.ring,
            queue.ring()
        )));
    }
    if f.first == 0 || f.first > f.last || f.last - f.first >= u64::from(queue.size()) {
        return Err(Failure::invalid(format!(
            "seqnos {}..={} are not a batch of a {}-slot ring",
            f.first,
            f.last,
            queue.size()
        )));
    }
    let fence = |seqno| Fence {
        ring: f.ring,
        seqno,
    };
    Ok(BatchFences {
        start: fence(f.first),
        end: fence(f.last),
    })
}

/// Wait (sleeping on the ring's interrupt) up to `timeout` for every command of the
/// batch, and claim their completions. On a timeout nothing is claimed, so the wait
/// can be repeated. The result is the completions, in order, and `Err` for the first
/// command that did not complete OK (a DMA fault carries its IOVA and access).
pub fn wait(
    queue: &CommandQueue,
    f: BatchFences,
    timeout: Duration,
) -> Result<(Vec<Completion>, Result<(), Failure>), Failure> {
    let deadline = Instant::now() + timeout;
    // The ring completes in order: once the last command completed, every earlier one
    // has too, so those waits find their completion at once.
    // The raw completions, whatever their status: the failure is reported below.
    let last = queue.wait_completion(f.end, WaitMode::Block, timeout)?;
    let mut all = Vec::with_capacity((f.end.seqno - f.start.seqno + 1) as usize);
    for seqno in f.start.seqno..f.end.seqno {
        let left = deadline.saturating_duration_since(Instant::now());
        all.push(queue.wait_completion(
            Fence {
                ring: f.end.ring,
                seqno,
            },
            WaitMode::Block,
            left,
        )?);
    }
    all.push(last);
    let status = all
        .iter()
        .try_for_each(|c| c.into_result(f.end.ring).map(|_| ()))
        .map_err(Failure::from);
    Ok((all, status))
}

/// Submit `ncmds` commands (`cmds`) on `queue` as one batch, through `registry`:
/// operand `index` `i` names `refs[i]` (all `nrefs` registrations of `registry`).
/// The registry resolves every reference to its current pin (pinning again what an
/// invalidation dropped) and never submits with a stale one. `*fence` receives the
/// batch's fence, for `userptr_wait`.
///
/// Nothing is submitted when a command is refused: `USERPTR_CODE_INVALID_ARGUMENT`
/// (an unknown opcode or flag, a FILL value over 255, an index past `nrefs`, no
/// commands, a registration of another registry, a queue of another driver),
/// `USERPTR_CODE_OPERAND_RANGE` (an operand outside its registration),
/// `USERPTR_CODE_DESCRIPTOR` (a zero length, a misaligned SAXPY or WRITE_FENCE
/// operand), `USERPTR_CODE_RING_FULL` (more commands than the ring has slots; a ring
/// that is merely busy is waited for), pin errors.
///
/// # Safety
/// Every handle is NULL or live; `refs` points to `nrefs` registration handles (or
/// `nrefs` is 0); `cmds` to `ncmds` commands; `fence` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn userptr_submit(
    registry: *const UserptrRegistry,
    queue: *const UserptrQueue,
    refs: *const *const UserptrRegistration,
    nrefs: usize,
    cmds: *const UserptrCommand,
    ncmds: usize,
    fence: *mut UserptrFence,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on each pointer.
        let (reg, q, refs, cmds, out) = unsafe {
            (
                arg(registry, "registry")?,
                arg(queue, "queue")?,
                slice(refs, nrefs, "refs")?,
                slice(cmds, ncmds, "cmds")?,
                Out::new(fence, "fence")?,
            )
        };
        if !std::sync::Arc::ptr_eq(&reg.driver_id, &q.driver_id) {
            return Err(Failure::invalid(
                "the queue belongs to another driver than the registry",
            ));
        }
        let users = refs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // SAFETY: the caller's promise: each entry is a live registration.
                let r = unsafe { arg(*p, &format!("refs[{i}]")) }?;
                if !std::sync::Arc::ptr_eq(&r.registry_id, &reg.id) {
                    return Err(Failure::invalid(format!(
                        "refs[{i}] is a registration of another registry"
                    )));
                }
                Ok(&r.userptr)
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let f = submit(&reg.registry, &q.queue, &users, cmds)?;
        out.put(f.into());
        Ok(())
    })
}

/// Wait up to `timeout_ms` for every command of the batch `fence` names to complete,
/// and claim their completions (each can be claimed once). If `completions` is not
/// NULL, the first `capacity` of them are written there, in order.
///
/// Returns `USERPTR_CODE_OK` when every command completed OK; otherwise the code of
/// the first that did not: `USERPTR_CODE_DMA_FAULT` (the fault's IOVA and access are
/// in its completion and in `userptr_last_error_fault`), `USERPTR_CODE_BAD_DESCRIPTOR`,
/// `USERPTR_CODE_ABORTED`, `USERPTR_CODE_DEVICE_ERROR`. `USERPTR_CODE_TIMEOUT`: the
/// batch did not complete in time, nothing was claimed, and the wait can be repeated.
/// `USERPTR_CODE_NO_COMPLETION`: already waited for.
///
/// # Safety
/// `queue` and `fence` are NULL or live; `completions` is NULL or writable for
/// `capacity` elements.
#[no_mangle]
pub unsafe extern "C" fn userptr_wait(
    queue: *const UserptrQueue,
    fence: *const UserptrFence,
    timeout_ms: u32,
    completions: *mut UserptrCompletion,
    capacity: usize,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `queue` and `fence`.
        let (q, f) = unsafe { (arg(queue, "queue")?, arg(fence, "fence")?) };
        if !completions.is_null() && !completions.is_aligned() {
            return Err(Failure::invalid("`completions` is not aligned"));
        }
        let f = check_fence(&q.queue, *f)?;
        let (all, status) = wait(&q.queue, f, Duration::from_millis(timeout_ms.into()))?;
        if !completions.is_null() {
            for (i, c) in all.iter().take(capacity).enumerate() {
                // SAFETY: non-null and aligned; the caller promises room for
                // `capacity` elements, and i < capacity.
                unsafe { completions.add(i).write(c.into()) };
            }
        }
        status
    })
}
