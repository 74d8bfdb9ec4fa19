//! The driver side of a command ring: submission with back-pressure, completion by
//! polling the fence word or by blocking on the ring's interrupt eventfd.
//!
//! Memory: one page-aligned [`DmaMemory`] block holds the submission queue (64-byte
//! descriptors), the completion queue (32-byte entries) and the fence word. It is
//! mapped into the device's IOMMU like any user buffer, and the device is given only
//! IOVAs.
//!
//! Completion: the fence word is the cheap "is it done" signal, but the driver never
//! trusts it alone: the device writes it by DMA, which the CPU may observe torn, and it
//! lands before the device publishes CQ_TAIL. A waiter that sees the fence reach its
//! seqno therefore drains the completion queue (Acquire on CQ_TAIL) and returns only
//! once it holds its command's completion entry.
//!
//! In flight: at most `size` commands are submitted and not yet reaped, so the
//! completion queue can never overflow.

use crate::device::Device;
use crate::dma_memory::DmaMemory;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::iommu::Perm;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use userptr_ring::regs::{self, ring, ring_reg};
use userptr_ring::{
    Completion, Consumer, Descriptor, Fence, Geometry, Producer, SharedIndices, Status,
    COMPLETION_SIZE, DESCRIPTOR_SIZE,
};

/// What `submit` does when the ring is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backpressure {
    /// Wait for the device to make room (up to the queue's timeout).
    Wait,
    /// Return [`Error::RingFull`] at once.
    WouldBlock,
}

/// How `wait` waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin on the fence word (lowest latency, burns a CPU).
    Poll,
    /// Sleep on the ring's interrupt eventfd.
    Block,
}

/// Completions kept for commands nobody has waited for yet.
const RETAIN: usize = 1 << 16;

/// The SQ counters as the driver sees them: registers; storing the tail is the doorbell.
struct SqRegs<'a>(&'a dyn Device, u32);
impl SharedIndices for SqRegs<'_> {
    fn load_head(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::SQ_HEAD))
    }
    fn load_tail(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::SQ_TAIL))
    }
    fn store_head(&self, _head: u32) {
        // SQ_HEAD is read-only for the driver; the producer never calls this.
    }
    fn store_tail(&self, tail: u32) {
        self.0.write32(ring_reg(self.1, ring::SQ_TAIL), tail)
    }
}

/// The CQ counters as the driver sees them.
struct CqRegs<'a>(&'a dyn Device, u32);
impl SharedIndices for CqRegs<'_> {
    fn load_head(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::CQ_HEAD))
    }
    fn load_tail(&self) -> u32 {
        self.0.read32(ring_reg(self.1, ring::CQ_TAIL))
    }
    fn store_head(&self, head: u32) {
        self.0.write32(ring_reg(self.1, ring::CQ_HEAD), head)
    }
    fn store_tail(&self, _tail: u32) {
        // CQ_TAIL is read-only for the driver; the consumer never calls this.
    }
}

struct State {
    prod: Producer,
    cons: Consumer,
    next_seqno: u64,
    in_flight: u32,
    done: BTreeMap<u64, Completion>,
    /// Completions with seqno below this were dropped unclaimed.
    dropped_below: u64,
    /// Highest seqno reaped; the ring completes in order, so every lower one was too.
    max_reaped: u64,
}

/// One command ring of a device, owned by the driver. Closed (ring disabled, its
/// memory unmapped) on drop. Derefs to [`QueueCore`], where the methods are.
pub struct CommandQueue {
    core: Arc<QueueCore>,
}

impl std::ops::Deref for CommandQueue {
    type Target = QueueCore;
    fn deref(&self) -> &QueueCore {
        &self.core
    }
}

/// The part of a queue that waiters share: the registry keeps a weak reference to it
/// for every in-flight submission, to wait for the device during invalidation.
pub struct QueueCore {
    driver: Driver,
    dev: Arc<dyn Device>,
    ring: u32,
    geo: Geometry,
    mem: DmaMemory,
    iova: u64,
    cq_off: usize,
    fence_off: usize,
    state: Mutex<State>,
    eventfd: Arc<OwnedFd>,
    /// Back-pressure / `run` timeout in milliseconds.
    timeout_ms: AtomicU64,
    /// Set when the owning CommandQueue is dropped (the ring is disabled).
    closed: AtomicBool,
    /// Blocking-wait wake-ups that found the eventfd signalled (see `irq_wakeups`).
    irq_wakeups: AtomicU64,
}

impl std::fmt::Debug for CommandQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandQueue")
            .field("ring", &self.core.ring)
            .field("size", &self.core.geo.size())
            .field("iova", &format_args!("{:#x}", self.core.iova))
            .finish_non_exhaustive()
    }
}

impl CommandQueue {
    /// Set how long `Backpressure::Wait` and `run` wait before [`Error::Timeout`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.core
            .timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn new(driver: Driver, ring_idx: u32, size: u32) -> Result<CommandQueue> {
        let dev = driver.ring_device()?.clone();
        let caps = dev.read32(regs::CAPS);
        let count = caps & 0xff;
        if ring_idx >= count {
            return Err(Error::NoSuchRing {
                ring: ring_idx,
                count,
            });
        }
        let geo = Geometry::new(size)?;
        if size > 1 << ((caps >> 8) & 0xff) {
            return Err(Error::RingSize(userptr_ring::GeometryError::Size(size)));
        }
        let cq_off = size as usize * DESCRIPTOR_SIZE;
        let fence_off = cq_off + size as usize * COMPLETION_SIZE;
        let mem = DmaMemory::new(fence_off + 8)?;
        let iova = driver.map_raw(mem.addr(), mem.len() as u64, Perm::READ_WRITE)?;
        let q = QueueCore {
            driver,
            dev: dev.clone(),
            ring: ring_idx,
            geo,
            mem,
            iova,
            cq_off,
            fence_off,
            state: Mutex::new(State {
                prod: Producer::new(geo, &SqRegs(&*dev, ring_idx)),
                cons: Consumer::new(geo, &CqRegs(&*dev, ring_idx)),
                next_seqno: 1,
                in_flight: 0,
                done: BTreeMap::new(),
                dropped_below: 0,
                max_reaped: 0,
            }),
            eventfd: Arc::new(
                rustix::event::eventfd(
                    0,
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
                )
                .map_err(|e| Error::sys("eventfd", e.into()))?,
            ),
            timeout_ms: AtomicU64::new(30_000),
            closed: AtomicBool::new(false),
            irq_wakeups: AtomicU64::new(0),
        };
        // From here on, Drop undoes whatever was done.
        let q = CommandQueue { core: Arc::new(q) };
        q.program()?;
        Ok(q)
    }
}

impl QueueCore {
    fn timeout(&self) -> Duration {
        // Relaxed: a setting, not a synchronisation point.
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn dev(&self) -> &dyn Device {
        &*self.dev
    }

    fn reg(&self, r: u32) -> u32 {
        ring_reg(self.ring, r)
    }

    fn program(&self) -> Result<()> {
        let dev = self.dev();
        if dev.read32(self.reg(ring::CONTROL)) & ring::CONTROL_ENABLE != 0 {
            return Err(Error::RingBusy { ring: self.ring });
        }
        let split = |v: u64| (v as u32, (v >> 32) as u32);
        for (lo, hi, v) in [
            (ring::SQ_BASE_LO, ring::SQ_BASE_HI, self.iova),
            (
                ring::CQ_BASE_LO,
                ring::CQ_BASE_HI,
                self.iova + self.cq_off as u64,
            ),
            (
                ring::FENCE_LO,
                ring::FENCE_HI,
                self.iova + self.fence_off as u64,
            ),
        ] {
            let (l, h) = split(v);
            dev.write32(self.reg(lo), l);
            dev.write32(self.reg(hi), h);
        }
        dev.write32(self.reg(ring::SIZE_LOG2), self.geo.size().trailing_zeros());
        dev.set_irq_eventfd(self.ring, Some(self.eventfd.clone()))?;
        self.driver.irq_enable(self.ring, true);
        dev.write32(self.reg(ring::CONTROL), ring::CONTROL_ENABLE);
        let code = dev.read32(self.reg(ring::ERROR));
        if code != 0 {
            return Err(Error::RingConfig {
                ring: self.ring,
                code,
            });
        }
        // The ring starts with zeroed indices: restart our view of them.
        let mut st = self.lock();
        st.prod = Producer::new(self.geo, &SqRegs(dev, self.ring));
        st.cons = Consumer::new(self.geo, &CqRegs(dev, self.ring));
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("queue state lock poisoned")
    }

    /// The ring index on the device.
    pub fn ring(&self) -> u32 {
        self.ring
    }

    /// Slots (the most commands in flight).
    pub fn size(&self) -> u32 {
        self.geo.size()
    }

    /// Commands submitted and not yet reaped.
    pub fn in_flight(&self) -> u32 {
        let mut st = self.lock();
        let _ = self.reap(&mut st);
        st.in_flight
    }

    /// How many times a blocking wait ([`WaitMode::Block`]) on this queue found the
    /// ring's eventfd signalled by the device: the wake-ups that came from the
    /// interrupt, not from the waiter's safety time slice (which reads the eventfd
    /// empty). For tests and diagnostics: a device that never signals leaves it at 0.
    pub fn irq_wakeups(&self) -> u64 {
        // Relaxed: a statistic.
        self.irq_wakeups.load(Ordering::Relaxed)
    }

    /// The last seqno the device wrote into the fence word (a hint: see module doc).
    pub fn completed_seqno(&self) -> u64 {
        self.mem.load_u64(self.fence_off)
    }

    /// Submit one command. Its seqno is assigned here.
    pub fn submit(&self, desc: Descriptor, bp: Backpressure) -> Result<Fence> {
        let fences = self.submit_batch(std::slice::from_ref(&desc), bp)?;
        Ok(fences.end)
    }

    /// Submit raw descriptor bytes as they are, apart from the seqno field (bytes
    /// 8..16), which the queue assigns. For bring-up and tests of the device's own
    /// validation: a malformed descriptor completes with `BadDescriptor`.
    pub fn submit_raw(&self, mut raw: [u8; DESCRIPTOR_SIZE], bp: Backpressure) -> Result<Fence> {
        self.submit_encoded(1, bp, |seq, out| {
            raw[8..16].copy_from_slice(&seq.to_le_bytes());
            out.copy_from_slice(&raw);
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
        self.submit_encoded(descs.len(), bp, |seq, out| {
            out.copy_from_slice(&descs[i].with_seqno(seq).encode());
            i += 1;
        })
    }

    fn submit_encoded(
        &self,
        count: usize,
        bp: Backpressure,
        mut encode: impl FnMut(u64, &mut [u8; DESCRIPTOR_SIZE]),
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
        let deadline = Instant::now() + self.timeout();
        let mut first = None;
        let mut last = 0;
        let mut rest = count;
        let mut spins = 0u32;
        let mut bytes = [0u8; DESCRIPTOR_SIZE];
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
                    encode(seq, &mut bytes);
                    self.mem.write(slot * DESCRIPTOR_SIZE, &bytes);
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
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno: last,
                    waited_ms: self.timeout().as_millis() as u64,
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

    /// Drain the completion queue into the completion store.
    fn reap(&self, st: &mut State) -> Result<()> {
        let cq = CqRegs(self.dev(), self.ring);
        let n = st.cons.available(&cq).map_err(|e| Error::RingStopped {
            ring: self.ring,
            reason: e.to_string(),
        })?;
        if n == 0 {
            return Ok(());
        }
        let mut raw = [0u8; COMPLETION_SIZE];
        for i in 0..n {
            self.mem
                .read(self.cq_off + st.cons.slot(i) * COMPLETION_SIZE, &mut raw);
            let c = Completion::decode(&raw);
            st.max_reaped = st.max_reaped.max(c.seqno);
            st.done.insert(c.seqno, c);
        }
        st.cons.release(&cq, n);
        st.in_flight -= n.min(st.in_flight);
        while st.done.len() > RETAIN {
            if let Some((s, _)) = st.done.pop_first() {
                st.dropped_below = st.dropped_below.max(s + 1);
            }
        }
        Ok(())
    }

    fn check_ring(&self) -> Result<()> {
        let code = self.dev().read32(self.reg(ring::ERROR));
        if code != 0 {
            return Err(Error::RingStopped {
                ring: self.ring,
                reason: regs::ring_error_name(code).to_string(),
            });
        }
        Ok(())
    }

    fn take(&self, seqno: u64) -> Result<Option<Completion>> {
        let mut st = self.lock();
        self.reap(&mut st)?;
        if let Some(c) = st.done.remove(&seqno) {
            return Ok(Some(c));
        }
        if seqno <= st.max_reaped || seqno >= st.next_seqno || seqno < st.dropped_below {
            return Err(Error::NoCompletion {
                ring: self.ring,
                seqno,
            });
        }
        Ok(None)
    }

    /// Wait until `fence`'s command completed and return its completion entry (whatever
    /// its status). Each completion can be claimed once.
    pub fn wait(&self, fence: Fence, mode: WaitMode, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if mode == WaitMode::Block || fence.is_signalled_by(self.completed_seqno()) {
                if let Some(c) = self.take(fence.seqno)? {
                    return Ok(c);
                }
            }
            self.check_ring()?;
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno: fence.seqno,
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            match mode {
                WaitMode::Poll => {
                    spins += 1;
                    if spins % 128 == 0 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                WaitMode::Block => {
                    // Sleep until the device signals (or a slice passes, so that several
                    // waiters sharing the eventfd all re-check).
                    let slice = (deadline - now).min(Duration::from_millis(5));
                    let mut fds = [rustix::event::PollFd::new(
                        &*self.eventfd,
                        rustix::event::PollFlags::IN,
                    )];
                    let ts = rustix::event::Timespec {
                        tv_sec: slice.as_secs() as i64,
                        tv_nsec: slice.subsec_nanos() as i64,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&ts));
                    let mut buf = [0u8; 8];
                    // The read succeeds only if the device signalled since the last
                    // read (a nonzero counter); a slice that merely ran out, or a
                    // waiter beaten to the signal by another, reads EAGAIN.
                    if let Ok(8) = rustix::io::read(&*self.eventfd, &mut buf) {
                        // Relaxed: a statistic.
                        self.irq_wakeups.fetch_add(1, Ordering::Relaxed);
                    }
                    self.dev().write32(regs::IRQ_STATUS, 1 << self.ring);
                }
            }
        }
    }

    /// Wait until the command with `seqno` has completed (its entry was reaped), without
    /// claiming its completion; or until the queue was closed (its ring disabled, so
    /// the device no longer works on it). For invalidation, which must know the device
    /// stopped using memory but must not steal the submitter's completion.
    pub fn wait_done(&self, seqno: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            // Acquire: pairs with the Release in CommandQueue::drop.
            if self.closed.load(Ordering::Acquire) {
                return Ok(());
            }
            {
                let mut st = self.lock();
                self.reap(&mut st)?;
                if st.max_reaped >= seqno {
                    return Ok(());
                }
            }
            self.check_ring()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno,
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Wait until `n` more commands fit (the device reaped enough), up to the queue's
    /// timeout.
    pub fn wait_for_room(&self, n: u32) -> Result<()> {
        let deadline = Instant::now() + self.timeout();
        let mut spins = 0u32;
        loop {
            {
                let mut st = self.lock();
                self.reap(&mut st)?;
                if st.in_flight + n <= self.geo.size() {
                    return Ok(());
                }
            }
            self.check_ring()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    ring: self.ring,
                    seqno: 0,
                    waited_ms: self.timeout().as_millis() as u64,
                });
            }
            spins += 1;
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Whether `seqno` is known complete without waiting (cheap: the fence word, then
    /// the reaped entries).
    pub fn is_done(&self, seqno: u64) -> bool {
        // Acquire: see wait_done.
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        if self.completed_seqno() < seqno {
            return false;
        }
        let mut st = self.lock();
        let _ = self.reap(&mut st);
        st.max_reaped >= seqno
    }

    /// Submit `desc`, wait for it (blocking), and turn a non-OK status into an error.
    pub fn run(&self, desc: Descriptor) -> Result<Completion> {
        let fence = self.submit(desc, Backpressure::Wait)?;
        let c = self.wait(fence, WaitMode::Block, self.timeout())?;
        c.into_result(self.ring)
    }
}

impl crate::submitter::FenceTracker for QueueCore {
    fn is_done(&self, seqno: u64) -> bool {
        QueueCore::is_done(self, seqno)
    }

    fn wait_done(&self, seqno: u64, timeout: Duration) -> Result<()> {
        QueueCore::wait_done(self, seqno, timeout)
    }

    /// A device reset: every queued command of every ring completes `Aborted`.
    fn abort(&self, timeout: Duration) -> Result<()> {
        self.driver.reset(timeout)
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
    pub start: Fence,
    pub end: Fence,
}

/// Turning a completion into a `Result`.
pub trait CompletionExt {
    /// `Ok(self)` when the status is OK, else [`Error::Command`].
    fn into_result(self, ring: u32) -> Result<Completion>;
}

impl CompletionExt for Completion {
    fn into_result(self, ring: u32) -> Result<Completion> {
        if self.status == Status::Ok {
            Ok(self)
        } else {
            Err(Error::Command {
                ring,
                seqno: self.seqno,
                status: self.status,
                fault: self.fault,
            })
        }
    }
}

impl Drop for CommandQueue {
    fn drop(&mut self) {
        let q = &*self.core;
        let dev = q.dev.clone();
        // The disable returns once the device finished any batch of this ring.
        dev.write32(q.reg(ring::CONTROL), 0);
        // Release: a waiter that sees `closed` also sees the ring disabled.
        q.closed.store(true, Ordering::Release);
        q.driver.irq_enable(q.ring, false);
        let _ = dev.set_irq_eventfd(q.ring, None);
        // Commands still queued are abandoned with the ring; the device may be in the
        // middle of one, and unmapping waits for nothing: its pin is released when the
        // in-flight transfer completes (io_uring holds its own reference).
        if let Err(e) = q.driver.unmap_raw(q.iova, q.mem.len() as u64) {
            tracing::error!("unmapping ring {} memory: {e}", q.ring);
        }
    }
}
