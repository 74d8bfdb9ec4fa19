//! PRP lists: a contiguous IOVA range described as PRP1/PRP2 or a list page.

use super::io_queue::IoQueue;
use super::PAGE;

impl IoQueue {
    /// PRP1 and PRP2 for a command in slot `cid` (writing its PRP list if needed).
    pub(super) fn prps(&self, cid: u16, data: Option<(u64, u32)>) -> (u64, u64) {
        let Some((iova, len)) = data else {
            return (0, 0);
        };
        let first_page = iova & !(PAGE - 1);
        let end = iova + len as u64;
        let pages = (end - first_page).div_ceil(PAGE);
        match pages {
            1 => (iova, 0),
            2 => (iova, first_page + PAGE),
            _ => {
                let list_off = cid as usize * PAGE as usize;
                let mut list = Vec::with_capacity((pages as usize - 1) * 8);
                for i in 1..pages {
                    list.extend_from_slice(&(first_page + i * PAGE).to_le_bytes());
                }
                self.core.prp.write(list_off, &list);
                (iova, self.core.prp_iova + list_off as u64)
            }
        }
    }
}
