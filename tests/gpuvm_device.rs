//! The reference device's GPU virtual memory at register level, against the datasheet
//! (`docs/reference-device.md` section 10), with no driver-side VM code: page tables
//! written through the VRAM window, a VM context, the fault queue, hold / REPLAY /
//! FAIL with another ring running meanwhile, and a stale TLB entry making a real wrong
//! access until a TLB invalidation request completes.

mod common;

use common::{Anon, MapTest};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userptr::ring::regs::{self, fault_kind, fault_record, pte, ring, vm};
use userptr::{AccessKind, Descriptor, Device, Driver, Perm, Status, WaitMode};

const T: Duration = Duration::from_secs(10);
const VA: u64 = 0x7f00_0040_0000;

struct Raw {
    dev: Arc<dyn Device>,
    pt_base: u64,
}

impl Raw {
    fn write(&self, off: u64, v: u64) {
        self.dev.write32(regs::VRAM_INDEX, off as u32);
        self.dev.write32(regs::VRAM_DATA_LO, v as u32);
        self.dev.write32(regs::VRAM_DATA_HI, (v >> 32) as u32);
    }
    fn read(&self, off: u64) -> u64 {
        self.dev.write32(regs::VRAM_INDEX, off as u32);
        self.dev.read32(regs::VRAM_DATA_LO) as u64
            | (self.dev.read32(regs::VRAM_DATA_HI) as u64) << 32
    }
    /// Table k of the page-table region.
    fn table(&self, k: u64) -> u64 {
        self.pt_base + k * 4096
    }
    /// Root (table 0) → table 1 → table 2 → table 3 (level 0) for VA.
    fn tables(&self) {
        for k in 0..4 {
            for i in 0..512 {
                self.write(self.table(k) + i * 8, 0);
            }
        }
        self.write(
            self.table(0) + pte::index(VA, 3) * 8,
            pte::table(self.table(1)),
        );
        self.write(
            self.table(1) + pte::index(VA, 2) * 8,
            pte::table(self.table(2)),
        );
        self.write(
            self.table(2) + pte::index(VA, 1) * 8,
            pte::table(self.table(3)),
        );
    }
    fn leaf(&self, va: u64, e: u64) {
        self.write(self.table(3) + pte::index(va, 0) * 8, e);
    }
    fn tlb_invalidate(&self, vm: u32, va: u64, pages: u32) {
        self.dev.write32(regs::TLB_INV_VM, vm);
        self.dev.write32(regs::TLB_INV_VA_LO, va as u32);
        self.dev.write32(regs::TLB_INV_VA_HI, (va >> 32) as u32);
        self.dev.write32(regs::TLB_INV_PAGES, pages);
        self.dev.write32(regs::TLB_INV_REQ, 1);
        let k = self.dev.read32(regs::TLB_INV_POSTED);
        let t0 = Instant::now();
        while (self.dev.read32(regs::TLB_INV_DONE).wrapping_sub(k) as i32) < 0 {
            assert!(t0.elapsed() < T, "TLB invalidation never completed");
            std::thread::yield_now();
        }
    }
}

fn eventfd() -> Arc<std::os::fd::OwnedFd> {
    Arc::new(rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK).expect("eventfd"))
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[test]
fn registers_page_tables_hold_replay_fail_and_a_stale_tlb_entry() {
    let drv = Driver::reference().unwrap();
    let dev = drv.device().unwrap().clone();
    assert_eq!(dev.read32(regs::VERSION), 0x0001_0002);
    assert_eq!(dev.read32(regs::VM_CAPS), 0x0100_030F);
    let raw = Raw {
        pt_base: dev.read32(regs::PT_BASE) as u64,
        dev: dev.clone(),
    };
    // The window reaches the page-table region only.
    raw.write(raw.pt_base - 8, 0x1234);
    assert_eq!(raw.read(raw.pt_base - 8), 0);
    raw.tables();
    raw.write(raw.table(3), 0xdead_b000);
    assert_eq!(raw.read(raw.table(3)), 0xdead_b000);
    raw.write(raw.table(3), 0);

    // Two target buffers, mapped in the IOMMU (stage 2).
    let (b1, b2) = (Anon::new(8192), Anon::new(8192));
    b1.fill(0);
    b2.fill(0);
    let m1 = drv.map_user_test(b1.addr, 8192, Perm::READ_WRITE).unwrap();
    let m2 = drv.map_user_test(b2.addr, 8192, Perm::READ_WRITE).unwrap();
    // The fault queue, and its interrupt.
    let fq = Anon::new(4096);
    fq.fill(0);
    let mfq = drv.map_user_test(fq.addr, 4096, Perm::READ_WRITE).unwrap();
    dev.write32(regs::FAULTQ_BASE_LO, mfq.iova() as u32);
    dev.write32(regs::FAULTQ_BASE_HI, (mfq.iova() >> 32) as u32);
    dev.write32(regs::FAULTQ_SIZE_LOG2, 4);
    dev.write32(regs::FAULTQ_CONTROL, 1);
    assert_eq!(dev.read32(regs::FAULTQ_CONTROL), 1);
    let efd = eventfd();
    dev.set_irq_eventfd(regs::FAULT_VECTOR, Some(efd.clone()))
        .unwrap();
    // VM 3: the tables above, replayable faults. Ring 0 in it, ring 1 on IOVAs.
    dev.write32(regs::vm_reg(3, vm::ROOT_LO), raw.table(0) as u32);
    dev.write32(regs::vm_reg(3, vm::ROOT_HI), 0);
    dev.write32(
        regs::vm_reg(3, vm::CONTROL),
        vm::CONTROL_ENABLE | vm::CONTROL_REPLAYABLE,
    );
    let q0 = drv.queue(0, 16).unwrap();
    let q1 = drv.queue(1, 16).unwrap();
    dev.write32(regs::ring_reg(0, ring::VM), 3);

    // 1. A leaf to b1: the write lands there.
    raw.leaf(VA, pte::leaf(m1.iova(), true, false));
    q0.run(Descriptor::fill(VA, 4096, 0x11)).unwrap();
    assert_eq!(b1.read()[0], 0x11);

    // 2. The leaf now points at b2, with no invalidation: the TLB still sends the
    // write to b1 (a real wrong access), until the request completes.
    raw.leaf(VA, pte::leaf(m2.iova(), true, false));
    q0.run(Descriptor::fill(VA, 4096, 0x22)).unwrap();
    assert_eq!(b1.read()[0], 0x22, "the stale entry was used");
    assert_eq!(b2.read()[0], 0, "b2 not reached yet");
    raw.tlb_invalidate(3, VA, 1);
    q0.run(Descriptor::fill(VA, 4096, 0x33)).unwrap();
    assert_eq!(
        b2.read()[0],
        0x33,
        "after the invalidation the new entry is walked"
    );
    assert_eq!(b1.read()[0], 0x22);

    // 3. A non-present page: the command is held, a record is queued, the vector
    // raised; ring 1 keeps running meanwhile.
    let faults_before = dev.read32(regs::VM_FAULTS);
    let f = q0
        .submit(
            Descriptor::fill(VA + 4096, 4096, 0x44),
            userptr::Backpressure::Wait,
        )
        .unwrap();
    wait_for("the fault record", || dev.read32(regs::FAULTQ_TAIL) == 1);
    let mut raw_rec = [0u8; fault_record::SIZE];
    raw_rec.copy_from_slice(&fq.read()[..fault_record::SIZE]);
    let rec = fault_record::FaultQueueRecord::decode(&raw_rec).unwrap();
    assert_eq!(
        (rec.va, rec.vm, rec.ring, rec.access, rec.kind, rec.id),
        (
            VA + 4096,
            3,
            0,
            AccessKind::Write,
            fault_kind::NOT_PRESENT,
            0
        )
    );
    assert_eq!(rec.seqno, f.seqno);
    assert_eq!(rec.len, 4096);
    let mut buf = [0u8; 8];
    assert_eq!(
        rustix::io::read(&*efd, &mut buf).unwrap(),
        8,
        "fault vector"
    );
    assert_ne!(dev.read32(regs::IRQ_STATUS) & 1 << regs::FAULT_VECTOR, 0);
    assert_eq!(
        dev.read32(regs::ring_reg(0, ring::HOLD)) & ring::HOLD_HELD,
        1
    );
    assert_eq!(dev.read32(regs::VM_FAULTS), faults_before + 1);
    assert_eq!(dev.read32(regs::vm_reg(3, vm::FAULTS)), faults_before + 1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!q0.is_done(f.seqno), "held until the driver answers");
    let m3 = drv.map_user_test(b1.addr, 8192, Perm::READ).unwrap();
    let c = q1.run(Descriptor::crc32c(m3.iova(), 4096, 0)).unwrap();
    assert_eq!(c.result as u32, crc32c::crc32c(&b1.read()[..4096]));
    // Map the page and replay: the command completes OK and wrote b2's second page.
    raw.leaf(VA + 4096, pte::leaf(m2.iova() + 4096, true, false));
    dev.write32(regs::FAULTQ_HEAD, 1);
    dev.write32(regs::ring_reg(0, ring::REPLAY), ring::REPLAY_RETRY);
    let c = q0.wait_completion(f, WaitMode::Block, T).unwrap();
    assert_eq!(c.status, Status::Ok);
    assert_eq!(b2.read()[4096], 0x44);
    assert_eq!(dev.read32(regs::ring_reg(0, ring::HOLD)), 0);

    // 4. A write through a read-only leaf, answered FAIL: DmaFault with the GPU VA.
    raw.leaf(VA + 4096, pte::leaf(m2.iova() + 4096, false, false));
    raw.tlb_invalidate(3, VA + 4096, 1);
    let f = q0
        .submit(
            Descriptor::fill(VA + 4096, 16, 0x55),
            userptr::Backpressure::Wait,
        )
        .unwrap();
    wait_for("the second record", || dev.read32(regs::FAULTQ_TAIL) == 2);
    raw_rec.copy_from_slice(&fq.read()[32..64]);
    let rec = fault_record::FaultQueueRecord::decode(&raw_rec).unwrap();
    assert_eq!((rec.kind, rec.id), (fault_kind::WRITE_PROTECTED, 1));
    dev.write32(regs::FAULTQ_HEAD, 2);
    dev.write32(regs::ring_reg(0, ring::REPLAY), ring::REPLAY_FAIL);
    let c = q0.wait_completion(f, WaitMode::Block, T).unwrap();
    assert_eq!(c.status, Status::DmaFault);
    assert_eq!(c.fault.unwrap().iova, VA + 4096);
    assert_eq!(c.detail, fault_kind::WRITE_PROTECTED as u32 | 3 << 8);
    assert_eq!(b2.read()[4096], 0x44, "nothing written");
    let info = dev.read32(regs::FAULT_INFO);
    assert_eq!((info >> 16) & 0xff, fault_kind::WRITE_PROTECTED as u32);
    assert_eq!((info >> 24) & 0xf, 3);

    // 5. Without REPLAYABLE, the same fault fails at once; a malformed entry always.
    dev.write32(regs::vm_reg(3, vm::CONTROL), vm::CONTROL_ENABLE);
    let c = q0.run(Descriptor::fill(VA + 8192, 16, 1)).unwrap_err();
    assert!(matches!(
        c,
        userptr::Error::Command {
            status: Status::DmaFault,
            ..
        }
    ));
    raw.leaf(VA + 8192, pte::leaf(m2.iova(), true, false) | 0x40);
    let f = q0
        .submit(
            Descriptor::fill(VA + 8192, 16, 1),
            userptr::Backpressure::Wait,
        )
        .unwrap();
    let c = q0.wait_completion(f, WaitMode::Block, T).unwrap();
    assert_eq!(c.detail & 0xff, fault_kind::BAD_PTE as u32);
    assert_eq!(
        dev.read32(regs::FAULTQ_TAIL),
        2,
        "no record without REPLAYABLE"
    );

    // 6. A stage-2 fault: the leaf is fine, the IOMMU no longer maps the IOVA.
    let gone = m1.iova();
    drop(m1);
    raw.leaf(VA + 8192, pte::leaf(gone, true, false));
    raw.tlb_invalidate(3, 0, 0);
    let f = q0
        .submit(
            Descriptor::fill(VA + 8192, 16, 1),
            userptr::Backpressure::Wait,
        )
        .unwrap();
    let c = q0.wait_completion(f, WaitMode::Block, T).unwrap();
    assert_eq!(c.status, Status::DmaFault);
    assert_eq!(c.detail, fault_kind::IOMMU as u32 | 3 << 8);
    assert_eq!(c.fault.unwrap().iova, VA + 8192, "reported as the GPU VA");

    // 7. A disabled VM faults everything; VM 0 means IOVAs again.
    dev.write32(regs::vm_reg(3, vm::CONTROL), 0);
    let f = q0
        .submit(Descriptor::fill(VA, 16, 1), userptr::Backpressure::Wait)
        .unwrap();
    let c = q0.wait_completion(f, WaitMode::Block, T).unwrap();
    assert_eq!(c.detail & 0xff, fault_kind::VM_DISABLED as u32);
    dev.write32(regs::ring_reg(0, ring::VM), 0);
    q0.run(Descriptor::fill(m2.iova(), 16, 0x66)).unwrap();
    assert_eq!(b2.read()[0], 0x66);
    dev.set_irq_eventfd(regs::FAULT_VECTOR, None).unwrap();
    dev.write32(regs::FAULTQ_CONTROL, 0);
}

#[test]
fn a_reset_aborts_a_held_command_and_a_full_queue_fails_it() {
    let drv = Driver::reference().unwrap();
    let dev = drv.device().unwrap().clone();
    let raw = Raw {
        pt_base: dev.read32(regs::PT_BASE) as u64,
        dev: dev.clone(),
    };
    raw.tables();
    let fq = Anon::new(4096);
    let mfq = drv.map_user_test(fq.addr, 4096, Perm::READ_WRITE).unwrap();
    dev.write32(regs::FAULTQ_BASE_LO, mfq.iova() as u32);
    dev.write32(regs::FAULTQ_BASE_HI, (mfq.iova() >> 32) as u32);
    dev.write32(regs::FAULTQ_SIZE_LOG2, 1);
    dev.write32(regs::FAULTQ_CONTROL, 1);
    dev.write32(regs::vm_reg(1, vm::ROOT_LO), raw.table(0) as u32);
    dev.write32(
        regs::vm_reg(1, vm::CONTROL),
        vm::CONTROL_ENABLE | vm::CONTROL_REPLAYABLE,
    );
    let qs: Vec<_> = (0..3).map(|r| drv.queue(r, 16).unwrap()).collect();
    for r in 0..3 {
        dev.write32(regs::ring_reg(r, ring::VM), 1);
    }
    let f0 = qs[0]
        .submit(Descriptor::fill(VA, 16, 1), userptr::Backpressure::Wait)
        .unwrap();
    let f1 = qs[1]
        .submit(Descriptor::fill(VA, 16, 1), userptr::Backpressure::Wait)
        .unwrap();
    wait_for("two records", || dev.read32(regs::FAULTQ_TAIL) == 2);
    // The queue (2 records) is full: the third ring's fault cannot be queued.
    let c = qs[2].run(Descriptor::fill(VA, 16, 1)).unwrap_err();
    assert!(matches!(
        c,
        userptr::Error::Command {
            status: Status::DmaFault,
            ..
        }
    ));
    assert_eq!(dev.read32(regs::FAULTQ_LOST), 1);
    // A device reset completes the held commands Aborted.
    drv.reset(T).unwrap();
    for (q, f) in [(&qs[0], f0), (&qs[1], f1)] {
        let c = q.wait_completion(f, WaitMode::Block, T).unwrap();
        assert_eq!(c.status, Status::Aborted);
    }
    dev.write32(regs::FAULTQ_CONTROL, 0);
}
