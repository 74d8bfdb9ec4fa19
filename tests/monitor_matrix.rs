//! The coverage matrix: for every monitor source and every way a process changes its
//! address space, does the device's next write reach the memory the process sees?
//!
//! Each (source, path) pair runs in its own child process (a monitor is process-wide
//! state, and a path that kills its process must not take the other cells with it),
//! two at a time: register a buffer, change it by that path (telling the registry only
//! if the source is `explicit`), have the reference device FILL it through the
//! registry, and look. The cells:
//! * `caught`: the device write is what the process sees (for a downgrade: the device
//!   write faults instead of landing);
//! * `stale`: it went to pages the process no longer maps;
//! * `refused`: the change, or the registration, was refused with an error, so no
//!   stale pin could arise;
//! * `n/a`: the path cannot run on this machine (the child says why on stderr);
//! * `error`: anything else went wrong (the child failed, hung, or the path could not
//!   be set up): always a test failure;
//! * `crashed`: the child (or a process it made) died of a signal: always a failure.
//!
//! The `none` column is the hazard itself. The test prints the matrix as markdown;
//! `tools/update-matrix.sh` pastes it into the README. It asserts what must hold:
//! `explicit` and `seccomp` catch (or refuse) every path, `none` shows the hazard on
//! the paths that are hazards, and no cell of any column is `error` or `crashed`.
//!
//! The paths, by concept: `classic` (the libc and raw-syscall calls of the first
//! matrix), `entry` (kernel entry points besides the 64-bit calls: SysV `shmat`,
//! `pkey_mprotect`, io_uring, `int 0x80`, x32), `discard` (advice and
//! `process_madvise`), `context` (who makes the call: an mm-sharing child, the
//! submit closure, signal handlers), `code` (calls made from code that became
//! executable later), `files` (file-side changes of shared memory).

mod common;
use common::RegisterTest as _;

#[path = "monitor_matrix/classic.rs"]
mod classic;
#[path = "monitor_matrix/code.rs"]
mod code;
#[path = "monitor_matrix/context.rs"]
mod context;
#[path = "monitor_matrix/discard.rs"]
mod discard;
#[path = "monitor_matrix/entry.rs"]
mod entry;
#[path = "monitor_matrix/files.rs"]
mod files;

use common::{is_child, Anon};
use std::time::Duration;
use userptr::driver::monitor::uffd::UffdMonitor;
use userptr::{
    Cause, CommandQueue, Descriptor, Driver, Error, Invalidation, Perm, Registry, RegistryConfig,
    Status, Userptr, WaitMode,
};

/// What the `none` column (no monitor, nobody told) must show for a path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// A real hazard: `stale`.
    Hazard,
    /// A hazard where the machine supports the path: `stale`, or `n/a` where it
    /// cannot run (x32 disabled, an older kernel).
    HazardWhereSupported,
    /// The registration is refused by the memory policy (unsealed shared memory, SysV
    /// shm): `refused` in every column; tests/hazard.rs shows the hazard with raw pins.
    Policy,
    /// Not a hazard (the kernel keeps the pinned pages): `caught`.
    Control,
}

/// One row: its name, what `none` must show, the function that runs it (given its
/// name, for functions that run several), and a probe, run before any monitor is
/// installed, that says why the path cannot run on this machine (`n/a`), if it cannot.
struct Row {
    name: &'static str,
    none: Expect,
    run: fn(&Ctx<'_>, &str) -> &'static str,
    probe: fn() -> Option<String>,
}

const fn row(name: &'static str, none: Expect, run: fn(&Ctx<'_>, &str) -> &'static str) -> Row {
    Row {
        name,
        none,
        run,
        probe: || None,
    }
}

const fn probed(
    name: &'static str,
    none: Expect,
    run: fn(&Ctx<'_>, &str) -> &'static str,
    probe: fn() -> Option<String>,
) -> Row {
    Row {
        name,
        none,
        run,
        probe,
    }
}

use Expect::{Control, Hazard, HazardWhereSupported, Policy};

const ROWS: &[Row] = &[
    row("munmap", Hazard, classic::run),
    row("free_malloc", Hazard, classic::run),
    row("realloc_move", Hazard, classic::run),
    row("raw_syscall_munmap", Hazard, classic::run),
    row("raw_syscall_madvise", Hazard, classic::run),
    row("madv_dontneed", Hazard, classic::run),
    row("madv_free", Control, classic::run),
    row("madv_remove", Policy, classic::run),
    row("mprotect_downgrade", Hazard, classic::run),
    row("mmap_fixed", Hazard, classic::run),
    row("mremap_move", Hazard, classic::run),
    row("mremap_dontunmap", Hazard, classic::run),
    row("mremap_shrink", Hazard, classic::run),
    row("brk_shrink", Hazard, classic::run),
    row("shmdt", Policy, classic::run),
    row("fork", Control, classic::run),
    row("shmat_remap", Hazard, entry::run),
    row("pkey_mprotect_downgrade", Hazard, entry::run),
    row("io_uring_madvise", Hazard, entry::run),
    probed(
        "int80_munmap",
        HazardWhereSupported,
        entry::run,
        entry::int80_probe,
    ),
    probed(
        "int80_madvise",
        HazardWhereSupported,
        entry::run,
        entry::int80_probe,
    ),
    probed(
        "int80_mprotect_downgrade",
        HazardWhereSupported,
        entry::run,
        entry::int80_probe,
    ),
    probed(
        "int80_mremap_move",
        HazardWhereSupported,
        entry::run,
        entry::int80_probe,
    ),
    probed(
        "int80_mmap2_fixed",
        HazardWhereSupported,
        entry::run,
        entry::int80_probe,
    ),
    probed(
        "x32_munmap",
        HazardWhereSupported,
        entry::run,
        entry::x32_probe,
    ),
    probed(
        "madv_guard_install",
        HazardWhereSupported,
        discard::run,
        discard::probe,
    ),
    row("madv_dontneed_locked", Hazard, discard::run),
    probed(
        "process_madvise_self",
        HazardWhereSupported,
        discard::run,
        discard::probe,
    ),
    probed(
        "process_madvise_guard",
        HazardWhereSupported,
        discard::run,
        discard::probe,
    ),
    row("clone_vm_munmap", Hazard, context::run),
    row("vfork_munmap", Hazard, context::run),
    row("submit_closure_munmap", Hazard, context::run),
    row("signal_in_registry", Hazard, context::run),
    row("signal_to_driver_thread", Hazard, context::run),
    row("mremap_exec_code", Hazard, code::run),
    row("jit_mmap_exec", Hazard, code::run),
    row("memfd_punch_hole", Policy, files::run),
    row("memfd_ftruncate", Policy, files::run),
    row("memfd_sealed_punch_hole", Control, files::run),
    row("remap_file_pages", Control, files::run),
    row("remap_file_pages_unsealed", Policy, files::run),
];

const SOURCES: &[&str] = &["none", "explicit", "seccomp", "uffd", "preload"];
/// The sources that must catch (or refuse) every path.
const COMPLETE: &[&str] = &["explicit", "seccomp"];

pub(crate) const LEN: usize = 1 << 20;
/// A path's result when another thread's allocation landed in the hole it made (a
/// test-environment event, retried).
pub(crate) const HOLE_TAKEN: &str = "hole-taken";
/// How long one child may take (a normal one takes well under a second).
const CHILD_LIMIT: Duration = Duration::from_secs(20);

/// Errors that mean "the registry would not pin this memory": a registration (or the
/// re-pin after a caught change) refused, so no stale pin can arise.
pub(crate) fn is_refusal(e: &Error) -> bool {
    // The memory policy (driver/src/backing/) refuses pages a file operation could
    // take away; the reference IOMMU refuses read-only and file memory itself.
    matches!(
        e,
        Error::BadAddress { .. } | Error::UnsupportedMemory { .. } | Error::ReplaceablePages { .. }
    )
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub(crate) fn read(addr: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the caller's mapping is live and readable for `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

/// Map fresh memory into a hole this test just made. MAP_FIXED_NOREPLACE: an
/// allocation another thread placed in the hole meanwhile is never clobbered.
pub(crate) fn map_hole(addr: usize, len: usize, raw: bool) {
    assert!(
        try_map_hole(addr, len, raw),
        "another mapping took the hole at {addr:#x}"
    );
}

/// As `map_hole`, but says whether the hole was still free. Test buffers from `Anon`
/// sit far below the mmap frontier where nothing else lands; a hole malloc left is at
/// the frontier, and another thread may take it.
pub(crate) fn try_map_hole(addr: usize, len: usize, raw: bool) -> bool {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: maps at the test's own former address, refusing to replace anything.
    let p = unsafe {
        if raw {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, -1, 0) as *mut libc::c_void
        } else {
            libc::mmap(addr as *mut _, len, prot, flags, -1, 0)
        }
    };
    if p as usize == addr {
        return true;
    }
    if p != libc::MAP_FAILED {
        // SAFETY: an older kernel treated NOREPLACE as a hint and mapped elsewhere;
        // that mapping is ours alone.
        unsafe { libc::munmap(p, len) };
    }
    false
}

/// What one path runs with: the registry, a queue, and the source under test.
pub(crate) struct Ctx<'a> {
    pub reg: &'a Registry,
    pub q: &'a CommandQueue,
    /// `explicit`: the path tells the registry around its own change.
    pub explicit: bool,
    /// A monitor (seccomp, uffd, preload) is installed.
    pub monitored: bool,
    pub uffd: Option<&'a UffdMonitor>,
}

impl Ctx<'_> {
    /// Run `change` on `range`, wrapped in invalidate_start/end if explicit.
    pub fn change(&self, range: std::ops::Range<usize>, cause: Cause, change: impl FnOnce()) {
        let inv = self.tell_start(range, cause);
        change();
        self.tell_end(inv);
        self.sync();
    }

    /// `invalidate_start` if explicit (for paths that wrap a change themselves).
    pub fn tell_start(&self, range: std::ops::Range<usize>, cause: Cause) -> Option<Invalidation> {
        self.explicit.then(|| {
            self.reg
                .invalidate_start(range.start as u64..range.end as u64, cause)
                .unwrap()
        })
    }

    pub fn tell_end(&self, inv: Option<Invalidation>) {
        if let Some(inv) = inv {
            self.reg.invalidate_end(inv);
        }
    }

    /// userfaultfd events are asynchronous: wait until every event delivered so far
    /// has been handled (bounded).
    pub fn sync(&self) {
        if let Some(m) = self.uffd {
            m.sync(Duration::from_secs(2));
        }
    }

    /// Register, or say which cell a refusal makes.
    pub fn register(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
    ) -> Result<Userptr<'static>, &'static str> {
        self.reg.register_test(addr, len, perm).map_err(|e| {
            if is_refusal(&e) {
                eprintln!("registration refused: {e}");
                "refused"
            } else {
                eprintln!("registration failed: {e}");
                "error"
            }
        })
    }

    /// FILL the first `len` bytes of `u` with `b` through the registry.
    pub fn fill(&self, u: &Userptr, len: usize, b: u8) -> Result<Status, Error> {
        let f = self.reg.submit(self.q, &[u], |i| {
            vec![Descriptor::fill(i[0], len as u64, b)]
        })?;
        Ok(self
            .q
            .wait_completion(f.end, WaitMode::Block, Duration::from_secs(30))?
            .status)
    }

    /// FILL the first `len` bytes of `u` and look at what the process sees at `seen`.
    pub fn look(&self, u: &Userptr, seen: usize, len: usize) -> &'static str {
        match self.fill(u, len, 0xab) {
            Ok(Status::Ok) if read(seen, len).iter().all(|&b| b == 0xab) => "caught",
            Ok(Status::Ok) => "stale",
            Ok(s) => {
                eprintln!("the device answered {s:?}");
                "error"
            }
            Err(e) => submit_error(&e),
        }
    }

    /// After a protection downgrade: the device write must fault.
    pub fn downgraded(&self, u: &Userptr) -> &'static str {
        match self.fill(u, u.len() as usize, 0xab) {
            Ok(Status::DmaFault) => "caught",
            Ok(Status::Ok) => "stale",
            Ok(s) => {
                eprintln!("the device answered {s:?}");
                "error"
            }
            Err(e) => submit_error(&e),
        }
    }

    /// Register `len` bytes at `addr`, let `mutate` change them (it returns where the
    /// process now sees the range), FILL, and look.
    pub fn visible(
        &self,
        addr: usize,
        len: usize,
        perm: Perm,
        mutate: impl FnOnce(&Self, usize) -> usize,
    ) -> &'static str {
        let u = match self.register(addr, len, perm) {
            Ok(u) => u,
            Err(cell) => return cell,
        };
        let now = mutate(self, addr);
        self.look(&u, now, len)
    }
}

/// The cell for a change the kernel (or a monitor) failed with `e`: with a monitor
/// installed, `refused` if the pages are still the pinned ones (the device write is
/// visible); without one, the path could not run (`error`).
pub(crate) fn failed_change(
    ctx: &Ctx<'_>,
    what: &str,
    e: i32,
    u: &Userptr,
    seen: usize,
    len: usize,
) -> &'static str {
    eprintln!("{what}: {}", std::io::Error::from_raw_os_error(e));
    if !ctx.monitored {
        return "error";
    }
    match ctx.look(u, seen, len) {
        "caught" => "refused",
        c => c,
    }
}

/// The cell for a submission that failed.
pub(crate) fn submit_error(e: &Error) -> &'static str {
    if is_refusal(e) {
        eprintln!("submission refused: {e}");
        "refused"
    } else {
        eprintln!("submission failed: {e}");
        "error"
    }
}

/// Child body: run the path `USERPTR_MATRIX_PATH` with the source
/// `USERPTR_MATRIX_SOURCE`.
#[test]
#[ignore = "child process body of coverage_matrix"]
fn matrix_child() {
    assert!(is_child(), "run through coverage_matrix");
    let source = std::env::var("USERPTR_MATRIX_SOURCE").unwrap();
    let path = std::env::var("USERPTR_MATRIX_PATH").unwrap();
    let row = ROWS.iter().find(|r| r.name == path).expect("a known path");
    if let Some(why) = (row.probe)() {
        eprintln!("n/a: {why}");
        println!("\nMATRIX {source} {path} n/a");
        return;
    }
    // A fixed mmap threshold: glibc otherwise raises it when an mmapped block is
    // freed, and the next large malloc would come from the heap instead.
    // SAFETY: a malloc tuning call before any large allocation of this child.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
    let pins_start = userptr::proc_status::pinned_bytes().unwrap();
    let drv = Driver::reference().unwrap();
    let q = drv.queue(0, 16).unwrap();
    let reg = Registry::new(drv.clone(), RegistryConfig::default());
    let seccomp = (source == "seccomp")
        .then(|| userptr::driver::monitor::seccomp::SeccompMonitor::install(&reg).unwrap());
    let uffd = (source == "uffd").then(|| UffdMonitor::start(&reg).unwrap());
    let preload = (source == "preload")
        .then(|| userptr::driver::monitor::preload::PreloadMonitor::install(&reg).unwrap());
    let ctx = Ctx {
        reg: &reg,
        q: &q,
        explicit: source == "explicit",
        monitored: !matches!(source.as_str(), "none" | "explicit"),
        uffd: uffd.as_ref(),
    };
    let mut r = (row.run)(&ctx, &path);
    for _ in 0..4 {
        if r != HOLE_TAKEN {
            break;
        }
        // Not the monitor's doing: try again from a clean cache.
        eprintln!("RETRY {path}: {r}");
        ctx.sync();
        reg.clear().unwrap();
        r = (row.run)(&ctx, &path);
    }
    println!("\nMATRIX {source} {path} {r}");
    // With userfaultfd, the events of this path's teardown are handled before the
    // cache is cleared.
    ctx.sync();
    reg.clear().unwrap();
    // Stopping the monitor releases its hold on the registry: with everything
    // dropped, every pin is gone (a monitor that kept a registry handle would keep
    // the registry's pins, and the queue's ring memory, pinned for good). One region
    // is still pinned when everything is dropped.
    let last = Anon::new(LEN);
    let u = reg.register_test(last.addr, LEN, Perm::READ_WRITE).unwrap();
    assert_eq!(ctx.fill(&u, LEN, 0x5a).unwrap(), Status::Ok);
    let pinned = reg.regions().len();
    drop(seccomp);
    drop(uffd);
    drop(preload);
    drop(q);
    drop(reg);
    drop(drv);
    let now = userptr::proc_status::pinned_bytes().unwrap();
    assert_eq!(
        now, pins_start,
        "{source} {path}: pins left after the monitor and the registry were dropped \
         ({pinned} regions before)"
    );
}

/// The shim, built next to this test's binary (`cargo build -p userptr-preload`;
/// `test.sh` does it first).
fn preload_so() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let so = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("libuserptr_preload.so");
    assert!(
        so.exists(),
        "{} is missing: run `cargo build -p userptr-preload` first",
        so.display()
    );
    so
}

/// The cell a finished child reports.
fn cell_of(source: &str, path: &str, run: &common::ChildRun) -> String {
    let reported = run.stdout.lines().find_map(|l| {
        let f: Vec<&str> = l.strip_prefix("MATRIX ")?.split_whitespace().collect();
        (f.len() == 3 && f[0] == source && f[1] == path).then(|| f[2].to_string())
    });
    if run.signal().is_some() {
        "crashed".into()
    } else if !run.success() {
        "error".into()
    } else {
        reported.unwrap_or_else(|| "error".into())
    }
}

#[test]
fn coverage_matrix() {
    let mut jobs = Vec::new();
    for row in ROWS {
        for source in SOURCES {
            let mut cmd = common::child_command("matrix_child");
            cmd.env("USERPTR_MATRIX_SOURCE", source)
                .env("USERPTR_MATRIX_PATH", row.name);
            if *source == "preload" {
                cmd.env("LD_PRELOAD", preload_so());
            }
            jobs.push(((row.name, *source), cmd));
        }
    }
    let runs = common::run_all(jobs, 2, CHILD_LIMIT);
    let cells: Vec<(&str, &str, String, &common::ChildRun)> = runs
        .iter()
        .map(|((p, s), run)| (*p, *s, cell_of(s, p, run), run))
        .collect();
    let get = |s: &str, p: &str| {
        cells
            .iter()
            .find(|c| c.0 == p && c.1 == s)
            .map_or("missing", |c| c.2.as_str())
    };
    let mut md = String::from("| path |");
    for s in SOURCES {
        md += &format!(" {s} |");
    }
    md += "\n|---|";
    md += &"---|".repeat(SOURCES.len());
    md += "\n";
    for row in ROWS {
        md += &format!("| `{}` |", row.name);
        for s in SOURCES {
            md += &format!(" {} |", get(s, row.name));
        }
        md += "\n";
    }
    println!("{md}");
    let slowest = runs.iter().max_by_key(|r| r.1.elapsed).unwrap();
    println!(
        "{} children, {:.1} s of child time in all (2 at a time); the slowest: {} {} ({:.1} s)",
        runs.len(),
        runs.iter().map(|r| r.1.elapsed.as_secs_f64()).sum::<f64>(),
        slowest.0 .1,
        slowest.0 .0,
        slowest.1.elapsed.as_secs_f64()
    );
    if let Some(path) = std::env::var_os("USERPTR_MATRIX_OUT") {
        std::fs::write(path, &md).unwrap();
    }
    // Every violation, each with what its child said.
    let mut failures = Vec::new();
    for (p, s, cell, run) in &cells {
        let row = ROWS.iter().find(|r| r.name == *p).unwrap();
        let why = if cell == "error" || cell == "crashed" {
            Some(format!("{s} {p}: {cell}"))
        } else if COMPLETE.contains(s) && !matches!(cell.as_str(), "caught" | "refused" | "n/a") {
            Some(format!("{s} must catch {p}, got {cell}"))
        } else if *s == "none" {
            let ok = match row.none {
                Hazard => cell == "stale",
                HazardWhereSupported => cell == "stale" || cell == "n/a",
                Policy => cell == "refused",
                Control => cell == "caught",
            };
            (!ok).then(|| format!("none {p}: expected {:?}, got {cell}", row.none))
        } else {
            None
        };
        if let Some(why) = why {
            let text = run.text();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            failures.push(format!(
                "{why} (child: {})\n    {}",
                run.describe(),
                tail.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cells fail:\n{}\n{md}",
        failures.len(),
        failures.join("\n")
    );
}
