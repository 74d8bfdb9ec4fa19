//! Fences: a monotonic per-ring seqno.
//!
//! The driver gives every descriptor the next seqno of its ring; the device completes a
//! ring's descriptors in order and, after each one, writes its seqno into the ring's
//! fence word by DMA. A fence is therefore "signalled" once the fence word is at least
//! its seqno. Seqnos are 64-bit and start at 1 (0 means "nothing completed yet"), so
//! they never wrap in practice (2^64 commands at 10^9/s is 584 years).

/// A point in one ring's command stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence {
    /// The ring the command was submitted on.
    pub ring: u32,
    /// The command's seqno in that ring.
    pub seqno: u64,
}

impl Fence {
    /// Whether a fence word reading `completed` means this fence is signalled.
    pub fn is_signalled_by(&self, completed: u64) -> bool {
        completed >= self.seqno
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signalled_is_monotonic() {
        let f = Fence { ring: 0, seqno: 5 };
        assert!(!f.is_signalled_by(0));
        assert!(!f.is_signalled_by(4));
        assert!(f.is_signalled_by(5));
        assert!(f.is_signalled_by(6));
    }
}
