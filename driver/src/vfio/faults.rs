//! IOMMU faults, as the kernel reports them: the only place a userspace driver can
//! learn that the IOMMU blocked one of its device's DMAs.
//!
//! A DMA *write* the IOMMU refuses (to an unmapped IOVA, or to a read-only mapping) is
//! a posted write: the device is never told, on real hardware as in QEMU, so the
//! command that caused it completes "successfully" while its data went nowhere. The
//! IOMMU does record the fault and the kernel's fault handler prints it:
//!
//! * Intel VT-d: `DMAR: [DMA Write NO_PASID] Request device [00:02.0] fault addr
//!   0x34000 [fault reason 0x05] PTE Write access is not set`;
//! * AMD-Vi: `AMD-Vi: Event logged [IO_PAGE_FAULT device=00:02.0 domain=0x000b
//!   address=0x34000 flags=0x0020]`.
//!
//! VFIO type1 has no fault channel to userspace, so [`FaultLog`] reads these records
//! from `/dev/kmsg` (which needs `CAP_SYSLOG` or `kernel.dmesg_restrict = 0`; without
//! it the log is unavailable and says so). The NVMe engine checks it when a command
//! with data completes and turns a fault inside the command's IOVA range into an
//! error on that command.
//!
//! Limits, written down: the kernel rate-limits these messages (a storm of faults is
//! reported only in part); the fault address is page-granular; the record is printed
//! by the fault interrupt, which may land shortly *after* the device's completion, so
//! a check can wait a short, configurable settle time for it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One IOMMU fault record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuFault {
    /// Requester as the IOMMU saw it: (bus, device, function).
    pub source: (u8, u8, u8),
    /// Faulting IOVA (page-granular on VT-d).
    pub iova: u64,
    /// Whether the access was a write (device → memory); `None` if not reported.
    pub write: Option<bool>,
    /// The kernel's words for the reason.
    pub reason: String,
}

impl IommuFault {
    /// Whether this fault is `bdf`'s (`DDDD:BB:DD.F`; the segment is not in the record)
    /// and inside `[iova, iova + len)`, counting the page the range starts in.
    pub fn hits(&self, bdf: &str, iova: u64, len: u64) -> bool {
        let Some(src) = parse_bdf(bdf) else {
            return false;
        };
        let start = iova & !0xfff;
        src == self.source && self.iova >= start && self.iova < iova.saturating_add(len)
    }
}

/// Parse `[DDDD:]BB:DD.F`.
fn parse_bdf(s: &str) -> Option<(u8, u8, u8)> {
    let (head, f) = s.rsplit_once('.')?;
    let mut parts = head.rsplit(':');
    let d = parts.next()?;
    let b = parts.next()?;
    Some((
        u8::from_str_radix(b, 16).ok()?,
        u8::from_str_radix(d, 16).ok()?,
        u8::from_str_radix(f, 16).ok()?,
    ))
}

fn hex_after(s: &str, key: &str) -> Option<u64> {
    let at = s.find(key)? + key.len();
    let t = s[at..].trim_start_matches("0x");
    let end = t.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(t.len());
    u64::from_str_radix(&t[..end], 16).ok()
}

/// Parse one kernel message (the text after the kmsg header), if it is a fault.
pub fn parse_fault(msg: &str) -> Option<IommuFault> {
    if let Some(rest) = msg.strip_prefix("DMAR: [DMA ") {
        // Intel: "[DMA Write NO_PASID] Request device [00:02.0] fault addr 0x... [fault reason 0x05] text"
        let write = rest.starts_with("Write");
        let dev = msg.split("Request device [").nth(1)?.split(']').next()?;
        let iova = hex_after(msg, "fault addr ")?;
        let reason = msg
            .rsplit_once(']')
            .map(|(_, r)| r.trim().to_string())
            .unwrap_or_default();
        return Some(IommuFault {
            source: parse_bdf(dev)?,
            iova,
            write: Some(write),
            reason,
        });
    }
    if msg.contains("IO_PAGE_FAULT") {
        // AMD: "AMD-Vi: Event logged [IO_PAGE_FAULT device=00:02.0 domain=0x000b address=0x... flags=0x0020]"
        let dev = msg.split("device=").nth(1)?.split_whitespace().next()?;
        let dev = dev.split(':').rev().take(2).collect::<Vec<_>>();
        let dev = format!("{}:{}", dev.get(1)?, dev.first()?);
        let iova = hex_after(msg, "address=")?;
        let flags = hex_after(msg, "flags=").unwrap_or(0);
        return Some(IommuFault {
            source: parse_bdf(&dev)?,
            iova,
            // AMD-Vi event flags: bit 5 is RW (1 = write).
            write: Some(flags & 0x20 != 0),
            reason: "IO_PAGE_FAULT".into(),
        });
    }
    None
}

/// The faults the kernel has logged since this log was opened.
pub struct FaultLog {
    state: Mutex<State>,
}

struct State {
    kmsg: Option<File>,
    unavailable: Option<String>,
    /// Recent faults, oldest first (bounded).
    recent: VecDeque<IommuFault>,
    total: u64,
}

const KEEP: usize = 4096;

impl std::fmt::Debug for FaultLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultLog")
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

impl FaultLog {
    /// Open `/dev/kmsg` at its end: only faults from now on count.
    pub fn open() -> FaultLog {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f));
        let (kmsg, unavailable) = match opened {
            Ok(f) => (Some(f), None),
            Err(e) => (
                None,
                Some(format!(
                    "/dev/kmsg cannot be read ({e}): IOMMU faults are not reported \
                     (needs CAP_SYSLOG or kernel.dmesg_restrict=0)"
                )),
            ),
        };
        FaultLog {
            state: Mutex::new(State {
                kmsg,
                unavailable,
                recent: VecDeque::new(),
                total: 0,
            }),
        }
    }

    /// Whether faults can be seen; `Err` says why not.
    pub fn available(&self) -> Result<(), String> {
        match &self.lock().unavailable {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read every record logged so far.
    fn drain(st: &mut State) {
        let Some(f) = st.kmsg.as_mut() else { return };
        // One record per read(2); a record is at most about 8 KiB.
        let mut buf = vec![0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let msg = rec.split_once(';').map_or("", |x| x.1);
                    let first = msg.lines().next().unwrap_or("");
                    if let Some(fault) = parse_fault(first) {
                        st.total += 1;
                        if st.recent.len() == KEEP {
                            st.recent.pop_front();
                        }
                        st.recent.push_back(fault);
                    }
                }
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break, // EAGAIN: nothing more now
            }
        }
    }

    /// Faults logged so far (oldest first, the last few thousand).
    pub fn faults(&self) -> Vec<IommuFault> {
        let mut st = self.lock();
        Self::drain(&mut st);
        st.recent.iter().cloned().collect()
    }

    /// Faults counted since the log was opened.
    pub fn total(&self) -> u64 {
        let mut st = self.lock();
        Self::drain(&mut st);
        st.total
    }

    /// Take (remove and return) the first fault by `bdf` inside any of `ranges`,
    /// waiting up to `settle` for one to be logged.
    pub fn take_hit(
        &self,
        bdf: &str,
        ranges: &[(u64, u64)],
        settle: Duration,
    ) -> Option<IommuFault> {
        let deadline = crate::submitter::deadline_after(settle);
        loop {
            {
                let mut st = self.lock();
                st.kmsg.as_ref()?;
                Self::drain(&mut st);
                if let Some(i) = st
                    .recent
                    .iter()
                    .position(|f| ranges.iter().any(|&(a, l)| f.hits(bdf, a, l)))
                {
                    return st.recent.remove(i);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_intel_vtd_fault_records() {
        let f = parse_fault(
            "DMAR: [DMA Write NO_PASID] Request device [00:02.0] fault addr 0x34000 \
             [fault reason 0x05] PTE Write access is not set",
        )
        .unwrap();
        assert_eq!(f.source, (0, 2, 0));
        assert_eq!(f.iova, 0x34000);
        assert_eq!(f.write, Some(true));
        assert_eq!(f.reason, "PTE Write access is not set");
        assert!(f.hits("0000:00:02.0", 0x34010, 4096));
        assert!(!f.hits("0000:00:01.0", 0x34000, 4096));
        assert!(!f.hits("0000:00:02.0", 0x35000, 4096));
        let r = parse_fault(
            "DMAR: [DMA Read NO_PASID] Request device [3a:00.1] fault addr 0x4000000000 \
             [fault reason 0x06] PTE Read access is not set",
        )
        .unwrap();
        assert_eq!(r.source, (0x3a, 0, 1));
        assert_eq!(r.write, Some(false));
        assert_eq!(r.iova, 0x40_0000_0000);
    }

    #[test]
    fn parses_amd_vi_page_faults() {
        let f = parse_fault(
            "AMD-Vi: Event logged [IO_PAGE_FAULT device=0000:03:00.0 domain=0x000b \
             address=0xfffd0000 flags=0x0020]",
        )
        .unwrap();
        assert_eq!(f.source, (3, 0, 0));
        assert_eq!(f.iova, 0xfffd0000);
        assert_eq!(f.write, Some(true));
    }

    #[test]
    fn other_messages_are_not_faults() {
        assert_eq!(parse_fault("DMAR: IOMMU enabled"), None);
        assert_eq!(parse_fault("nvme nvme0: pci function 0000:00:02.0"), None);
        assert_eq!(
            parse_fault("DMAR: [DMA Write NO_PASID] Request device [zz"),
            None
        );
    }
}
