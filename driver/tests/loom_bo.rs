//! loom models of a buffer object's migration against CPU accesses that fault on it
//! and a device command on it (`bo` module docs, "The move, and who waits on what"),
//! running the real fault handler's decision (`bo::fault::decide`).
//!
//! The gate table is a `static` of std atomics and the kernel's side (page
//! protection, the remap, the futex) cannot run under loom, so the steps around the
//! decision are copies here, one line each, in the order the code runs them:
//!
//! | model                                   | driver / kernel                                          |
//! |-----------------------------------------|----------------------------------------------------------|
//! | `Kernel` and its mutex                  | the process's page tables under `mmap_lock`: an access   |
//! |                                         | either goes to the current backing or faults             |
//! | `Kernel::blocked`                       | `mprotect(PROT_NONE)` of the CPU range (`CpuRange::block`)|
//! | `Kernel::backing` (and `blocked` off)   | `mmap(MAP_FIXED)` of the new backing (`CpuRange::map`)    |
//! | `word`, `migrator`                      | the gate's slot (`Gate::close` / `Gate::open`)           |
//! | `futex_wait` / `futex_wake`             | `FUTEX_WAIT` (compares the word under the bucket lock)   |
//! |                                         | and `FUTEX_WAKE`                                         |
//! | `cpu_access` (fault → `decide` → wait)  | an access, the `SIGSEGV` handler (`wait_gate`), return   |
//! | `BoSt` (`moving`, `busy`, `place`)      | the BO's state lock: moving, the fences, the PTEs' place |
//! | `device`                                | `commands`: wait for the move, submit (a fence), DMA     |
//! | `migrate`                               | `migrate::run`, steps 1 to 7                             |
//!
//! The violations: a CPU or device write missing from the BO afterwards (it went to a
//! place the copy had already read), a fault the handler cannot explain (it would
//! kill the process), and a wait that never ends (loom reports the deadlock; the real
//! futex waits in 20 ms slices, so it would be a stall of up to `WAIT_LIMIT` instead).
//!
//! Each protection has a `should_panic` model with that protection taken out (a
//! `Mutation`): loom must find the failure, or the test fails.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-driver --test loom_bo --release`
//! (three preemptions by default, see `model`; `LOOM_MAX_PREEMPTIONS` overrides).
#![cfg(loom)]

use loom::sync::atomic::{AtomicI32, AtomicU32, Ordering::SeqCst};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use userptr_driver::bo::fault::{decide, GateDecision};

/// Thread ids, as `gettid` would give them.
const CPU: i32 = 1;
const MIGRATOR: i32 = 2;
/// Words of the BO: the CPU writes 0 and 1, the device writes 2.
const WORDS: usize = 3;
const EXPECTED: [u32; WORDS] = [1, 2, 9];

/// One protection taken out.
#[derive(Clone, Copy, Debug, Default)]
struct Mutation {
    /// Close the gate after the `mprotect` instead of before.
    gate_after_block: bool,
    /// Open the gate before the remap instead of after.
    open_before_remap: bool,
    /// No `mprotect`: the CPU keeps writing into the old place (`skip_cpu_block`).
    no_cpu_block: bool,
    /// Device commands do not wait for a move (`skip_device_wait`).
    no_device_wait: bool,
    /// `FUTEX_WAKE` before the word changes.
    wake_before_increment: bool,
}

struct Kernel {
    blocked: bool,
    backing: usize,
    mem: [[u32; WORDS]; 2],
}

struct BoSt {
    moving: bool,
    busy: bool,
    place: usize,
}

struct World {
    m: Mutation,
    kernel: Mutex<Kernel>,
    word: AtomicU32,
    migrator: AtomicI32,
    futex: Mutex<()>,
    futex_cv: Condvar,
    st: Mutex<BoSt>,
    moved: Condvar,
}

impl World {
    fn new(m: Mutation) -> Arc<World> {
        Arc::new(World {
            m,
            kernel: Mutex::new(Kernel {
                blocked: false,
                backing: 0,
                mem: [[0; WORDS]; 2],
            }),
            word: AtomicU32::new(0),
            migrator: AtomicI32::new(0),
            futex: Mutex::new(()),
            futex_cv: Condvar::new(),
            st: Mutex::new(BoSt {
                moving: false,
                busy: false,
                place: 0,
            }),
            moved: Condvar::new(),
        })
    }

    /// `FUTEX_WAIT`: sleeps only if the word still holds `val`, checked under the
    /// bucket lock that `FUTEX_WAKE` takes too.
    fn futex_wait(&self, val: u32) {
        let g = self.futex.lock().unwrap();
        if self.word.load(SeqCst) == val {
            drop(self.futex_cv.wait(g).unwrap());
        }
    }

    fn futex_wake(&self) {
        let _g = self.futex.lock().unwrap();
        self.futex_cv.notify_all();
    }

    /// `Gate::close`.
    fn close(&self) {
        self.migrator.store(MIGRATOR, SeqCst);
        self.word.fetch_add(1, SeqCst);
    }

    /// `Gate::open`.
    fn open(&self) {
        if self.m.wake_before_increment {
            self.futex_wake();
            self.word.fetch_add(1, SeqCst);
        } else {
            self.word.fetch_add(1, SeqCst);
            self.futex_wake();
        }
    }

    /// A CPU store of `v` into word `i` of the BO's CPU range; `last` is the thread's
    /// `LAST`.
    fn cpu_access(&self, i: usize, v: u32, last: &mut (usize, u32)) {
        loop {
            {
                let mut k = self.kernel.lock().unwrap();
                if !k.blocked {
                    let b = k.backing;
                    k.mem[b][i] = v;
                    return;
                }
            }
            // The fault: the kernel dropped mmap_lock and delivers SIGSEGV.
            let w = self.word.load(SeqCst);
            match decide(w, self.migrator.load(SeqCst), CPU, *last, i) {
                GateDecision::Retry { last: l } => *last = l,
                GateDecision::NotMigration => {
                    panic!("the access to word {i} faulted twice on an open gate: the process dies")
                }
                GateDecision::SelfDeadlock => panic!("the CPU thread is not the migrator"),
                GateDecision::Wait => loop {
                    self.futex_wait(w);
                    if self.word.load(SeqCst) != w {
                        break;
                    }
                },
            }
        }
    }

    /// One device command writing 9 into word 2 (`commands`: wait for a move, record
    /// the fence, DMA through the PTEs' place, complete).
    fn device(&self) {
        let p = {
            let mut st = self.st.lock().unwrap();
            if !self.m.no_device_wait {
                while st.moving {
                    st = self.moved.wait(st).unwrap();
                }
            }
            st.busy = true;
            st.place
        };
        self.kernel.lock().unwrap().mem[p][2] = 9;
        self.st.lock().unwrap().busy = false;
        self.moved.notify_all();
    }

    /// `migrate::run` from the current place to the other one.
    fn migrate(&self) {
        // 1. Moving: device commands wait from now on.
        let from = {
            let mut st = self.st.lock().unwrap();
            st.moving = true;
            st.place
        };
        let to = 1 - from;
        // 2. The gate, then the mprotect.
        if !self.m.gate_after_block {
            self.close();
        }
        if !self.m.no_cpu_block {
            self.kernel.lock().unwrap().blocked = true;
        }
        if self.m.gate_after_block {
            self.close();
        }
        // 3. The fences of the device work already submitted.
        {
            let mut st = self.st.lock().unwrap();
            while st.busy {
                st = self.moved.wait(st).unwrap();
            }
        }
        // 4. The device's COPY, place to place (never through the CPU range).
        for i in 0..WORDS {
            let v = self.kernel.lock().unwrap().mem[from][i];
            self.kernel.lock().unwrap().mem[to][i] = v;
        }
        // 5. and 6., under the BO's state lock: the PTEs, then the CPU range.
        {
            let mut st = self.st.lock().unwrap();
            st.place = to;
            if self.m.open_before_remap {
                self.open();
            }
            let mut k = self.kernel.lock().unwrap();
            k.backing = to;
            k.blocked = false;
            drop(k);
            st.moving = false;
        }
        // 7. The gate, then the device commands.
        if !self.m.open_before_remap {
            self.open();
        }
        self.moved.notify_all();
    }
}

/// `loom::model`, bounded to three preemptions unless `LOOM_MAX_PREEMPTIONS` says
/// otherwise (every failure below shows up within two).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// A CPU thread writing two words, a device command, and `moves` migrations; every
/// write must be in the BO's final place.
fn run(m: Mutation, moves: usize) {
    model(move || {
        let w = World::new(m);
        let cpu = {
            let w = w.clone();
            thread::spawn(move || {
                let mut last = (usize::MAX, u32::MAX);
                w.cpu_access(0, 1, &mut last);
                w.cpu_access(1, 2, &mut last);
            })
        };
        let dev = {
            let w = w.clone();
            thread::spawn(move || w.device())
        };
        for _ in 0..moves {
            w.migrate();
        }
        cpu.join().unwrap();
        dev.join().unwrap();
        let k = w.kernel.lock().unwrap();
        assert_eq!(k.backing, moves % 2, "the CPU range maps the last place");
        assert_eq!(
            k.mem[k.backing], EXPECTED,
            "a write was lost across the move"
        );
    });
}

#[test]
fn no_write_is_lost_and_no_wait_is_left_hanging() {
    run(Mutation::default(), 1);
}

#[test]
fn two_moves_back_and_forth() {
    run(Mutation::default(), 2);
}

#[test]
#[should_panic(expected = "faulted twice on an open gate")]
fn a_gate_closed_after_the_mprotect_lets_a_fault_through() {
    run(
        Mutation {
            gate_after_block: true,
            ..Mutation::default()
        },
        1,
    );
}

#[test]
#[should_panic(expected = "faulted twice on an open gate")]
fn a_gate_opened_before_the_remap_lets_a_fault_through() {
    run(
        Mutation {
            open_before_remap: true,
            ..Mutation::default()
        },
        1,
    );
}

#[test]
#[should_panic(expected = "a write was lost")]
fn without_the_mprotect_a_cpu_write_is_lost() {
    run(
        Mutation {
            no_cpu_block: true,
            ..Mutation::default()
        },
        1,
    );
}

#[test]
#[should_panic(expected = "a write was lost")]
fn without_the_device_wait_a_device_write_is_lost() {
    run(
        Mutation {
            no_device_wait: true,
            ..Mutation::default()
        },
        1,
    );
}

#[test]
#[should_panic(expected = "deadlock")]
fn a_wake_before_the_word_changes_is_lost() {
    run(
        Mutation {
            wake_before_increment: true,
            ..Mutation::default()
        },
        1,
    );
}
