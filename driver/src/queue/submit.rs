//! Submission: descriptors written into the submission queue, the doorbell, and
//! back-pressure when the ring is full.

use super::{QueueCore, SqRegs};
use crate::error::{Error, Result};
use crate::queue::CommandQueue;
use crate::submitter::{deadline_after, millis};
use std::sync::Arc;
use std::time::Instant;
use userptr_ring::{Descriptor, Fence, DESCRIPTOR_SIZE};

/// What `submit` does when the ring is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backpressure {
    /// Wait for the device to make room (up to the queue's timeout).
    Wait,
    /// Return [`Error::RingFull`] at once.
    WouldBlock,
}

impl QueueCore {
    /// Submit one command. Its seqno is assigned here.
    pub fn submit(&self, desc: Descriptor, bp: Backpressure) -> Result<Fence> {
        let fences = self.submit_batch(std::slice::from_ref(&desc), bp)?;
        Ok(fences.end)
    }

    /// Submit raw descriptor bytes as they are, apart from the seqno field (bytes
    /// 8..16), which the queue assigns. For bring-up and tests of the device's own
    /// validation: a malformed descriptor completes with `BadDescriptor`.
    pub fn submit_raw(&self, raw: [u8; DESCRIPTOR_SIZE], bp: Backpressure) -> Result<Fence> {
        let mut words: [u64; DESCRIPTOR_SIZE / 8] = std::array::from_fn(|i| {
            u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        });
        self.submit_encoded(1, bp, |seq| {
            words[1] = seq;
            words
        })
        .map(|f| f.end)
    }

    /// Submit several commands with one doorbell. Returns the fences of the first and
    /// the last (seqnos are consecutive). With `WouldBlock`, either all are submitted or
    /// none (`RingFull`) when they do not fit now.
    pub fn submit_batch(&self, descs: &[Descriptor], bp: Backpressure) -> Result<BatchFences> {
        for d in descs {
            d.validate()?;
        }
        let mut i = 0;
        self.submit_encoded(descs.len(), bp, |seq| {
            let w = descs[i].with_seqno(seq).encode_words();
            i += 1;
            w
        })
    }

    /// Submit `count` descriptors, `encode(seqno)` giving each one's words
    /// (`Descriptor::encode_words`) for the seqno it is assigned.
    pub(super) fn submit_encoded(
        &self,
        count: usize,
        bp: Backpressure,
        mut encode: impl FnMut(u64) -> [u64; DESCRIPTOR_SIZE / 8],
    ) -> Result<BatchFences> {
        if count == 0 {
            return Err(Error::ZeroLength { addr: 0 });
        }
        if bp == Backpressure::WouldBlock && count > self.geo.size() as usize {
            return Err(Error::RingFull {
                ring: self.ring,
                size: self.geo.size(),
            });
        }
        // Taken only once the ring is found full (the clock is not free).
        let mut deadline = None;
        let mut first = None;
        let mut last = 0;
        let mut rest = count;
        let mut spins = 0u32;
        while rest > 0 {
            let mut st = self.lock();
            self.reap(&mut st)?;
            let room = (self.geo.size() - st.in_flight) as usize;
            let fits = match bp {
                Backpressure::WouldBlock => room >= rest,
                Backpressure::Wait => room > 0,
            };
            if fits {
                let n = room.min(rest);
                let sq = SqRegs(self.dev(), self.ring);
                for _ in 0..n {
                    let slot = st
                        .prod
                        .next_slot(&sq)
                        .expect("in-flight bound implies room");
                    let seq = st.next_seqno;
                    st.next_seqno += 1;
                    self.mem.write_words(slot * DESCRIPTOR_SIZE, &encode(seq));
                    first.get_or_insert(seq);
                    last = seq;
                }
                st.in_flight += n as u32;
                // The doorbell: Release store of SQ_TAIL after the descriptors above.
                st.prod.publish(&sq);
                rest -= n;
                continue;
            }
            drop(st);
            if bp == Backpressure::WouldBlock {
                return Err(Error::RingFull {
                    ring: self.ring,
                    size: self.geo.size(),
                });
            }
            self.check_ring()?;
            let deadline = *deadline.get_or_insert_with(|| deadline_after(self.timeout()));
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno: last,
                    waited_ms: millis(self.timeout()),
                });
            }
            spins += 1;
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let fence = |seqno| Fence {
            ring: self.ring,
            seqno,
        };
        Ok(BatchFences {
            start: fence(first.expect("at least one submitted")),
            end: fence(last),
        })
    }
}

/// The reference ring as the registry drives it: completions come in order, so the
/// batch's last seqno stands for the whole prefix.
impl crate::submitter::Submitter for CommandQueue {
    type Command = Descriptor;
    type Fence = BatchFences;

    fn capacity(&self) -> usize {
        self.size() as usize
    }

    fn queue_id(&self) -> u32 {
        self.ring()
    }

    fn domain(&self) -> &Arc<dyn crate::iommu::IommuDomain> {
        QueueCore::domain(self)
    }

    fn try_submit(&self, cmds: &[Descriptor]) -> Result<(BatchFences, u64)> {
        let f = self.submit_batch(cmds, Backpressure::WouldBlock)?;
        Ok((f, f.end.seqno))
    }

    fn wait_for_room(&self, n: usize) -> Result<()> {
        QueueCore::wait_for_room(self, n.min(u32::MAX as usize) as u32)
    }

    fn tracker(&self) -> std::sync::Weak<dyn crate::submitter::FenceTracker> {
        let w: std::sync::Weak<QueueCore> = Arc::downgrade(&self.core);
        w
    }
}

/// The fences of a submitted batch (inclusive range of consecutive seqnos).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFences {
    /// The first command's fence.
    pub start: Fence,
    /// The last command's fence: reaching it means the whole batch completed.
    pub end: Fence,
}
