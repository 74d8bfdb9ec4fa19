//! Could the process itself make this access? `madvise(MADV_POPULATE_READ /
//! MADV_POPULATE_WRITE)` faults the pages in exactly as a read or a write by the
//! process would, and fails where that access would fault: unmapped memory,
//! `PROT_NONE`, a write to read-only memory (Linux 5.14+). The SVM fault handler asks
//! before it pins anything, so that the device never reaches memory the application
//! could not touch. The only `unsafe` of the wing: the call, through the driver's own
//! syscall site (a monitor's trap must not see the driver's check as the
//! application's advice).

/// Whether the process could read (`write` false) or write every page of
/// `[addr, addr + len)` (page-aligned): the pages are faulted in if so.
pub(super) fn accessible(addr: u64, len: u64, write: bool) -> bool {
    let advice = if write {
        libc::MADV_POPULATE_WRITE
    } else {
        libc::MADV_POPULATE_READ
    };
    // SAFETY (below): POPULATE_READ/WRITE are not destructive: they only fault in pages the
    // way the process's own access would (allocating zero pages, breaking
    // copy-on-write for a write); no memory is freed or replaced, and no reference
    // of ours points into the range.
    loop {
        // SAFETY: as above.
        let r = unsafe { crate::trampoline::madvise(addr as usize, len as usize, advice) };
        if r != -(libc::EINTR as i64) {
            return r == 0;
        }
    }
}
