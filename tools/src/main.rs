//! `userptr`: the tool for people bringing up hardware and people measuring.
//!
//! * `status`: whether this host is ready (IOMMU groups, vfio-pci, locked memory,
//!   io_uring, userfaultfd, seccomp, /dev/kvm), each line with what to do;
//! * `demo`: the main job: SAXPY and CRC32C on ordinary `Vec`s through a command ring
//!   on the reference device, verified against the CPU;
//! * `bench`: the benchmark harness (suites pin, ring, e2e, cache, invalidate,
//!   intercept; a table on stdout, `--json`/`--csv` in the schema of
//!   `docs/json-schema.md`, `--plot` charts);
//! * `torture`: submitters against address-space mutators, every result checked;
//! * `info`: what the device and its IOMMU domain report;
//! * `list`: the PCI devices, their drivers and IOMMU groups, and what each lacks for
//!   VFIO (or what the host lacks: no IOMMU, vfio-pci not loaded);
//! * `bind BDF` / `unbind BDF`: move a PCI device to vfio-pci and give it back (`bind`
//!   refuses a device the system is using unless `--force`);
//! * `info BDF`, `dma-test BDF`, `ring-test BDF`: open a device through VFIO and show
//!   what it and the IOMMU report, check DMA both ways and IOMMU faults (QEMU edu or
//!   NVMe), drive an NVMe queue and measure it;
//! * `completions SHELL`, `man`: generated from these definitions.
//!
//! Exit status: 0 on success, 1 when the work failed, 2 for a bad command line
//! (nothing was done), 3 when torture's watchdog saw a deadlock.

mod args;
mod bench;
mod budget;
mod demo;
mod info;
mod manual;
mod output;
mod pci_cmd;
mod pci_use;
mod progress;
mod raw_pin;
mod status;
mod torture;
mod vfio_cmd;

use clap::{ArgAction, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;

#[derive(Parser)]
#[command(
    name = "userptr",
    version = output::LONG_VERSION,
    about = "userptr: ordinary memory for devices behind an IOMMU",
    long_about = "userptr: ordinary memory for devices behind an IOMMU.\n\n\
        Without root: status, demo, bench, torture, info and list work within the \
        locked-memory limit (`ulimit -l`, 8 MiB by default; demo sizes itself to it, bench \
        says what it skips). bind and unbind need root; info BDF, dma-test, ring-test and \
        bench --device need access to /dev/vfio/N and enough locked memory (root, or \
        CAP_IPC_LOCK).",
    after_help = "Logging: -v (info), -vv (debug), -vvv (trace), or RUST_LOG (e.g. RUST_LOG=userptr_driver=debug), on stderr."
)]
struct Cli {
    /// More log output on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Read sysfs, /proc/sys, mounts and /dev under DIR instead of / (a host tree
    /// mounted in a container; tests use a fake one).
    #[arg(long, value_name = "DIR", global = true, value_parser = args::existing_dir)]
    sysroot: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Is this host ready? IOMMU, vfio-pci, locked memory, io_uring, userfaultfd,
    /// seccomp, /dev/kvm: one line each, with what to do.
    Status(status::Args),
    /// Run SAXPY and CRC32C on ordinary memory through the reference device, verified.
    Demo(demo::Args),
    /// Measure: map/unmap, rings, end to end, the pin cache, invalidation, interception.
    Bench(bench::Args),
    /// Show the device's registers and its IOMMU domain.
    Info(info::Args),
    /// Run submitters against address-space mutators for a while and check every result.
    Torture(torture::Args),
    /// List the PCI devices: driver, IOMMU group, and whether VFIO can use each.
    List(pci_cmd::ListArgs),
    /// Bind a PCI device to vfio-pci (driver_override, unbind, probe). Needs root.
    /// Refuses a device the system is using (mounted disk, interface up, boot VGA)
    /// unless --force.
    Bind(pci_cmd::BindArgs),
    /// Unbind a PCI device from vfio-pci and let its default driver take it back.
    Unbind(pci_cmd::UnbindArgs),
    /// Check DMA both ways through the IOMMU and that IOMMU faults are reported (edu, NVMe).
    DmaTest(vfio_cmd::DeviceArgs),
    /// Drive an NVMe I/O queue with userptr buffers: latency and throughput.
    RingTest(vfio_cmd::RingTestArgs),
    /// Print a shell completion script (e.g. `userptr completions bash >
    /// /etc/bash_completion.d/userptr`).
    Completions(manual::CompletionArgs),
    /// Print the man page (roff), or write one page per subcommand with --dir.
    Man(manual::ManArgs),
    /// (internal) the intercept suite's measurements, run in a child process because
    /// a seccomp filter cannot be removed once installed.
    #[command(hide = true)]
    InterceptChild {
        #[arg(value_parser = clap::value_parser!(u64).range(1..=100_000))]
        samples: u64,
    },
    /// (internal) `status`'s probes that change the process for good, run in a child.
    #[command(hide = true)]
    Probe {
        #[arg(value_parser = ["seccomp", "uffd"])]
        what: String,
    },
}

static SYSROOT: OnceLock<PathBuf> = OnceLock::new();

/// Where sysfs, /proc/sys and /dev are (`--sysroot`, else /).
pub fn sys_root() -> userptr::driver::vfio::pci::SysRoot {
    userptr::driver::vfio::pci::SysRoot::at(SYSROOT.get().cloned().unwrap_or_else(|| "/".into()))
}

/// The clap definition (for completions and the man page).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// A readable error with a hint.
pub fn explain(e: &userptr::Error) -> String {
    use userptr::Error as E;
    let hint = match e {
        E::IoUringUnavailable { .. } => {
            "the reference device needs io_uring; run on a kernel and in a container that allow it (`userptr status` checks)"
        }
        E::PinLimit { .. } | E::PinBudget { .. } => {
            "raise the locked-memory limit (`ulimit -l`) or run with CAP_IPC_LOCK"
        }
        E::BadAddress { .. } => "map memory that is mapped and writable",
        E::BatchTooLarge { .. } => {
            "submit fewer or smaller buffers per batch, or raise the pin budget (`ulimit -l`, CAP_IPC_LOCK)"
        }
        E::TooManyRetries { .. } | E::WindowTimeout { .. } => {
            "another thread keeps changing the buffers' address space; change it less often, or raise the registry's limits"
        }
        E::ForeignQueue { .. } => "submit on a queue of the registry's own driver",
        E::ReplaceablePages { .. } => {
            "register private anonymous memory, or a memfd sealed with F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE"
        }
        E::MonitorConflict { .. } | E::MonitorUnavailable { .. } => {
            "the seccomp monitor needs seccomp filters and no other SIGSYS user (`userptr status` checks)"
        }
        E::BadBdf { .. } | E::NoSuchPciDevice { .. } => {
            "`userptr list` (or `lspci -D`) shows the addresses of the PCI devices present"
        }
        E::PciSysfs { .. } | E::PciVfioUnusable { .. } | E::PciBindFailed { .. } => {
            "`userptr list` shows each device's driver, IOMMU group and what VFIO still lacks"
        }
        E::Vfio { .. } | E::Nvme { .. } | E::NvmeStatus { .. } => {
            "`userptr list` shows whether the device is bound to vfio-pci and its group viable; `userptr info BDF` what it reports"
        }
        _ => "see the error above",
    };
    format!("{e}\nhint: {hint}")
}

/// The tracing subscriber: `-v` sets the level of every crate, `RUST_LOG` (when set)
/// replaces it. Events go to stderr around the progress bar.
fn init_logging(verbose: u8) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => EnvFilter::try_new(&s)
            .map_err(|e| format!("RUST_LOG=`{s}` is not a valid filter: {e}\nhint: e.g. RUST_LOG=info or RUST_LOG=userptr_driver=debug"))?,
        _ => EnvFilter::new(level),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::LogWriter)
        .with_ansi(progress::drawn())
        .with_target(true)
        .try_init()
        .map_err(|e| format!("logging: {e}"))
}

fn main() -> ExitCode {
    output::default_sigpipe();
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.verbose) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(r) = cli.sysroot {
        let _ = SYSROOT.set(r);
    }
    tracing::debug!(version = output::LONG_VERSION, "userptr starting");
    let r = match cli.cmd {
        Cmd::Status(a) => status::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Torture(a) => torture::run(a),
        Cmd::List(a) => pci_cmd::list(a),
        Cmd::Bind(a) => pci_cmd::bind(a),
        Cmd::Unbind(a) => pci_cmd::unbind(a),
        Cmd::DmaTest(a) => vfio_cmd::dma_test(&a),
        Cmd::RingTest(a) => vfio_cmd::ring_test(&a),
        Cmd::Completions(a) => manual::completions(a),
        Cmd::Man(a) => manual::man(a),
        Cmd::InterceptChild { samples } => bench::intercept::child(samples as usize),
        Cmd::Probe { what } => status::probe(&what),
    };
    progress::finish();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
