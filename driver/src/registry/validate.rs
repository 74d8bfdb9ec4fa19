//! Validation mode: check that pinned pages are still the pages the process maps, by
//! reading page frame numbers from `/proc/self/pagemap` (needs CAP_SYS_ADMIN: without
//! it the kernel reports PFN 0 and validation is unavailable). A bring-up aid, off by
//! default: it costs a read of 8 bytes per page on every cache hit.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PFN_MASK: u64 = (1 << 55) - 1;
const PRESENT: u64 = 1 << 63;

/// The PFN of every page in `[start, end)` (page-aligned); 0 for a page not present.
pub fn pfns(start: u64, end: u64) -> io::Result<Vec<u64>> {
    let f = File::open("/proc/self/pagemap")?;
    let pages = ((end - start) / 4096) as usize;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, start / 4096 * 8)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
            if e & PRESENT != 0 {
                e & PFN_MASK
            } else {
                0
            }
        })
        .collect())
}

/// Whether this process can read real PFNs.
pub fn available() -> bool {
    let probe = [0u8; 1];
    let a = probe.as_ptr() as u64 & !4095;
    matches!(pfns(a, a + 4096), Ok(v) if v.first().is_some_and(|&p| p != 0))
}
