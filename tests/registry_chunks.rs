//! Chunked regions (`registry/chunks.rs`): a large registration is mapped as 2 MiB
//! chunks inside one IOVA range, a partial invalidation unmaps only the chunks it
//! touches, and the next use re-pins those at the same IOVA. Each test checks the
//! device's view of the memory after the change, so that a chunk left mapped to the
//! old pages (a stale pin), re-pinned with more permission than the region has, or
//! re-pinned somewhere else would fail it.

mod common;
use common::RegisterTest as _;

use common::{Anon, PinCheck};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use userptr::{
    Cause, CommandQueue, Descriptor, Driver, Perm, Registry, RegistryConfig, Status, Userptr,
    WaitMode,
};

const MIB: usize = 1 << 20;
const CHUNK: usize = 2 * MIB;
const PAGE: usize = 4096;
const T: Duration = Duration::from_secs(30);

fn setup() -> (Driver, CommandQueue, Registry) {
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    (drv, q, reg)
}

/// An anonymous buffer of `len` bytes starting on a chunk boundary (inside a larger
/// mapping), so that the chunk geometry is known.
struct Aligned {
    _map: Anon,
    addr: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let map = Anon::new(len + CHUNK);
        let addr = map.addr.next_multiple_of(CHUNK);
        Aligned {
            _map: map,
            addr,
            len,
        }
    }

    fn range(&self, off: usize, len: usize) -> std::ops::Range<u64> {
        (self.addr + off) as u64..(self.addr + off + len) as u64
    }

    fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: mapped and readable (inside `_map`); copied out while no command
        // that may write it runs.
        unsafe { std::ptr::copy_nonoverlapping(self.addr as *const u8, v.as_mut_ptr(), self.len) };
        v
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: inside the mapping; no command that may access it runs.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.addr + off) as *mut u8, bytes.len())
        };
    }

    /// `madvise(MADV_DONTNEED)` of `[off, off + len)`, told to `reg` first (as a
    /// monitor would): the pages read back as zero, new ones on the next touch.
    fn discard(&self, reg: &Registry, off: usize, len: usize) {
        let inv = reg
            .invalidate_start(self.range(off, len), Cause::Discard)
            .unwrap();
        // SAFETY: our own mapping; the registry no longer lets the device reach it.
        let r = unsafe { libc::madvise((self.addr + off) as *mut _, len, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        reg.invalidate_end(inv);
    }
}

fn fill(reg: &Registry, q: &CommandQueue, u: &Userptr, b: u8) -> Status {
    let len = u.len();
    let f = reg
        .submit(q, &[u], |iova| vec![Descriptor::fill(iova[0], len, b)])
        .unwrap();
    q.wait_completion(f.end, WaitMode::Block, T).unwrap().status
}

#[test]
fn a_4k_discard_in_a_16m_registration_repins_one_chunk_at_the_same_iova() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup();
    let buf = Aligned::new(16 * MIB);
    let u = reg
        .register_test(buf.addr, 16 * MIB, Perm::READ_WRITE)
        .unwrap();
    assert_eq!((reg.regions().len(), reg.mappings()), (1, 8));
    assert_eq!(fill(&reg, &q, &u, 0x11), Status::Ok);
    let iova = reg.iova(&u).unwrap();
    let s0 = reg.stats();

    buf.discard(&reg, 5 * MIB, PAGE);
    let s = reg.stats();
    assert_eq!(s.chunk_unmaps - s0.chunk_unmaps, 1, "{s}");
    assert_eq!(
        (s.unpins, s.splits, s.pins),
        (s0.unpins, s0.splits, s0.pins),
        "{s}"
    );
    assert_eq!(reg.pinned_bytes(), 14 * MIB as u64);
    assert_eq!(reg.mappings(), 7);
    assert_eq!(reg.regions()[0].missing, vec![buf.range(4 * MIB, CHUNK)]);
    assert!(buf.read()[5 * MIB..5 * MIB + PAGE].iter().all(|&b| b == 0));

    // The next use re-pins that chunk only, at the same device address, onto the page
    // the process maps now: the device's write is what the process reads there.
    assert_eq!(fill(&reg, &q, &u, 0x22), Status::Ok);
    let s = reg.stats();
    assert_eq!(s.chunk_repins - s0.chunk_repins, 1, "{s}");
    assert_eq!(s.pins, s0.pins, "no region pinned afresh: {s}");
    assert_eq!(s.pinned_bytes - s0.pinned_bytes, CHUNK as u64, "{s}");
    assert_eq!((reg.pinned_bytes(), reg.mappings()), (16 * MIB as u64, 8));
    assert_eq!(reg.iova(&u).unwrap(), iova);
    assert!(reg.regions()[0].missing.is_empty());
    assert!(buf.read().iter().all(|&b| b == 0x22), "a stale chunk");
    drop((q, reg));
    pins.check();
}

#[test]
fn a_copy_spans_chunks_some_of_them_re_pinned_across_a_chunk_boundary() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup();
    let len = 8 * MIB;
    let (src, dst) = (Aligned::new(len), Aligned::new(len));
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    src.write(0, &pattern);
    let us = reg.register_test(src.addr, len, Perm::READ).unwrap();
    let ud = reg.register_test(dst.addr, len, Perm::READ_WRITE).unwrap();
    let s0 = reg.stats();
    // Two pages either side of a chunk boundary on each buffer: two chunks each. The
    // source's pages get new contents after the discard (new pages).
    dst.discard(&reg, CHUNK - PAGE, 2 * PAGE);
    src.discard(&reg, 3 * CHUNK - PAGE, 2 * PAGE);
    let fresh = vec![0xc3u8; 2 * PAGE];
    src.write(3 * CHUNK - PAGE, &fresh);
    let mut want = pattern.clone();
    want[3 * CHUNK - PAGE..3 * CHUNK + PAGE].copy_from_slice(&fresh);
    assert_eq!(reg.stats().chunk_unmaps - s0.chunk_unmaps, 4);
    let f = reg
        .submit(&q, &[&us, &ud], |i| {
            vec![Descriptor::copy(i[0], i[1], len as u64)]
        })
        .unwrap();
    assert_eq!(
        q.wait_completion(f.end, WaitMode::Block, T).unwrap().status,
        Status::Ok
    );
    assert_eq!(reg.stats().chunk_repins - s0.chunk_repins, 4);
    assert!(dst.read() == want, "the copy read or wrote a stale chunk");
    drop((q, reg));
    pins.check();
}

#[test]
fn a_chunk_re_pinned_in_a_device_read_only_region_stays_read_only() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup();
    let buf = Aligned::new(8 * MIB);
    let whole = reg
        .register_test(buf.addr, 8 * MIB, Perm::READ_WRITE)
        .unwrap();
    buf.discard(&reg, 3 * MIB, PAGE);
    buf.write(0, &vec![0x5au8; 8 * MIB]);
    // The whole region write-protected: device-read-only in place, chunk 1 missing.
    reg.invalidate(
        buf.range(0, 8 * MIB),
        Cause::Protect {
            new_prot: libc::PROT_READ,
        },
    )
    .unwrap();
    let r = &reg.regions()[0];
    assert!(r.device_read_only && r.missing == vec![buf.range(CHUNK, CHUNK)]);
    // A read-write registration inside the missing chunk: its re-pin maps read-only.
    let part = reg
        .register_test(buf.addr + CHUNK, CHUNK, Perm::READ_WRITE)
        .unwrap();
    assert!(reg.regions()[0].missing.is_empty());
    assert_eq!(fill(&reg, &q, &part, 0x77), Status::DmaFault);
    assert_eq!(fill(&reg, &q, &whole, 0x77), Status::DmaFault);
    assert!(
        buf.read().iter().all(|&b| b == 0x5a),
        "the device wrote read-only memory"
    );
    // Write given back: the whole region, the re-pinned chunk included.
    reg.invalidate(
        buf.range(0, 8 * MIB),
        Cause::Protect {
            new_prot: libc::PROT_READ | libc::PROT_WRITE,
        },
    )
    .unwrap();
    assert_eq!(fill(&reg, &q, &whole, 0x78), Status::Ok);
    assert!(buf.read().iter().all(|&b| b == 0x78));
    drop((q, reg));
    pins.check();
}

#[test]
fn regions_with_missing_chunks_merge_release_and_tear_down_without_leaking_pins() {
    let pins = PinCheck::start();
    {
        let (drv, q, reg) = setup();
        let buf = Aligned::new(12 * MIB);
        let a = reg
            .register_test(buf.addr, 8 * MIB, Perm::READ_WRITE)
            .unwrap();
        buf.discard(&reg, MIB, PAGE);
        buf.discard(&reg, 7 * MIB, PAGE);
        assert_eq!(reg.pinned_bytes(), 4 * MIB as u64);
        // A neighbour merges: one region over both, all of it pinned afresh.
        let b = reg
            .register_test(buf.addr + 8 * MIB, 4 * MIB, Perm::READ_WRITE)
            .unwrap();
        assert_eq!(fill(&reg, &q, &b, 1), Status::Ok);
        let r = reg.regions();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].range.clone(), r[0].missing.len()),
            (buf.range(0, 12 * MIB), 0)
        );
        assert_eq!(reg.pinned_bytes(), 12 * MIB as u64);
        assert_eq!(reg.mappings(), 6);
        let dom = drv.domain().mappings();
        buf.discard(&reg, 5 * MIB, PAGE);
        assert_eq!((reg.pinned_bytes(), reg.mappings()), (10 * MIB as u64, 5));
        assert_eq!(drv.domain().mappings(), dom - 1);
        // Released whole with a chunk missing: exactly what is mapped goes.
        reg.invalidate(buf.range(0, 12 * MIB), Cause::Release)
            .unwrap();
        assert_eq!((reg.pinned_bytes(), reg.mappings()), (0, 0));
        assert_eq!(drv.domain().mappings(), dom - 6);
        // And a registry dropped with a chunk missing unpins the rest.
        assert_eq!(fill(&reg, &q, &a, 2), Status::Ok);
        buf.discard(&reg, 3 * MIB, PAGE);
        assert_eq!(reg.pinned_bytes(), 6 * MIB as u64);
        drop((q, reg));
    }
    pins.check();
}

/// A storm of small discards (some across chunk boundaries) on a registered buffer
/// while the device fills all of it over and over. After fill `g` has completed, and
/// with the storm held off, every page reads `g`'s byte unless a discard of it ended
/// after fill `g` was submitted (then it may read zero): a page that reads zero
/// although its last discard ended before the fill was submitted was written through
/// a stale chunk.
#[test]
fn a_storm_of_small_discards_never_lets_the_device_write_a_stale_chunk() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup();
    let len = 8 * MIB;
    let buf = Arc::new(Aligned::new(len));
    let u = reg.register_test(buf.addr, len, Perm::READ_WRITE).unwrap();
    let pages = len / PAGE;
    // Per page: the fill generation submitted when its last discard ended (+1; 0: never).
    let discarded: Arc<Vec<AtomicU64>> = Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
    let submitted = Arc::new(AtomicU64::new(0));
    let quiet = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let storm = {
        let (reg, buf, discarded, submitted, quiet, stop) = (
            reg.clone(),
            buf.clone(),
            discarded.clone(),
            submitted.clone(),
            quiet.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut n = 0u64;
            // SeqCst throughout: the test's own bookkeeping, not under test.
            while !stop.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // One to three pages, a quarter of them across a chunk boundary.
                let count = 1 + (x % 3) as usize;
                let first = if x % 4 == 0 {
                    (1 + (x >> 8) as usize % (len / CHUNK - 1)) * CHUNK / PAGE - 1
                } else {
                    (x >> 8) as usize % (pages - count)
                };
                {
                    let _q = quiet.lock().unwrap();
                    buf.discard(&reg, first * PAGE, count * PAGE);
                    let g = submitted.load(Ordering::SeqCst);
                    for p in first..first + count {
                        discarded[p].store(g + 1, Ordering::SeqCst);
                    }
                }
                n += 1;
                std::thread::sleep(Duration::from_micros(200 + x % 300));
            }
            n
        })
    };
    for g in 1..=150u64 {
        let b = (g % 250 + 1) as u8;
        submitted.store(g, Ordering::SeqCst);
        assert_eq!(fill(&reg, &q, &u, b), Status::Ok);
        let _q = quiet.lock().unwrap();
        let seen = buf.read();
        for (p, page) in seen.chunks(PAGE).enumerate() {
            if page.iter().all(|&x| x == b) {
                continue;
            }
            let d = discarded[p].load(Ordering::SeqCst);
            assert!(
                page.iter().all(|&x| x == 0) && d > g,
                "fill {g}: page {p} reads {:#x} (last discard ended with fill {} submitted)",
                page[0],
                d.saturating_sub(1)
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    let n = storm.join().unwrap();
    let s = reg.stats();
    assert!(n > 0 && s.chunk_unmaps > 0 && s.chunk_repins > 0, "{s}");
    drop((q, reg));
    pins.check();
}

/// Registrations merged into one chunked region, each unregistered: the region goes
/// once its last chunk does (an empty region left in the index would be merged into
/// the next registration beside it, pinning released pages again, and keep them).
#[test]
fn a_region_whose_chunks_all_went_leaves_the_index() {
    let pins = PinCheck::start();
    let (_drv, q, reg) = setup();
    let buf = Aligned::new(8 * MIB);
    let parts: Vec<_> = (0..3)
        .map(|i| {
            reg.register_test(buf.addr + i * 2 * MIB, 2 * MIB, Perm::READ_WRITE)
                .unwrap()
        })
        .collect();
    assert_eq!(reg.regions().len(), 1, "merged");
    for u in parts {
        reg.unregister(u).unwrap();
    }
    assert!(reg.regions().is_empty(), "{:x?}", reg.regions());
    assert_eq!(reg.pinned_bytes(), 0);
    let next = reg
        .register_test(buf.addr + 6 * MIB, MIB, Perm::READ_WRITE)
        .unwrap();
    assert_eq!(
        reg.pinned_bytes(),
        MIB as u64,
        "only the new registration is pinned"
    );
    reg.unregister(next).unwrap();
    assert_eq!(reg.pinned_bytes(), 0);
    drop((q, reg));
    pins.check();
}
