//! `userptr`: the tool for people bringing up hardware and people measuring.
//!
//! * `demo`: the main job: SAXPY and CRC32C on ordinary `Vec`s through a command ring
//!   on the reference device, verified against the CPU;
//! * `bench`: the benchmark harness (suites pin, ring, e2e, cache, invalidate,
//!   intercept; a table on stdout, `--json FILE` in the documented schema);
//! * `torture`: submitters against address-space mutators, every result checked;
//! * `info`: what the device and its IOMMU domain report;
//! * `list`: the PCI devices, their drivers and IOMMU groups, and what each lacks for
//!   VFIO (or what the host lacks: no IOMMU, vfio-pci not loaded);
//! * `bind BDF` / `unbind BDF`: move a PCI device to vfio-pci and give it back;
//! * `info BDF`, `dma-test BDF`, `ring-test BDF`: open a device through VFIO and show
//!   what it and the IOMMU report, check DMA both ways and IOMMU faults (QEMU edu or
//!   NVMe), drive an NVMe queue and measure it.

mod bench;
mod demo;
mod info;
mod pci_cmd;
mod raw_pin;
mod torture;
mod vfio_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "userptr",
    version,
    about = "userptr: ordinary memory for devices behind an IOMMU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    Bind(pci_cmd::BindArgs),
    /// Unbind a PCI device from vfio-pci and let its default driver take it back.
    Unbind(pci_cmd::BindArgs),
    /// Check DMA both ways through the IOMMU and that IOMMU faults are reported (edu, NVMe).
    DmaTest(vfio_cmd::DeviceArgs),
    /// Drive an NVMe I/O queue with userptr buffers: latency and throughput.
    RingTest(vfio_cmd::RingTestArgs),
    /// (internal) the intercept suite's measurements, run in a child process because
    /// a seccomp filter cannot be removed once installed.
    #[command(hide = true)]
    InterceptChild { samples: usize },
}

/// A readable error with a hint.
pub fn explain(e: &userptr::Error) -> String {
    use userptr::Error as E;
    let hint = match e {
        E::IoUringUnavailable { .. } => {
            "the reference device needs io_uring; run on a kernel and in a container that allow it"
        }
        E::PinLimit { .. } | E::PinBudget { .. } => {
            "raise the locked-memory limit (`ulimit -l`) or run with CAP_IPC_LOCK"
        }
        E::BadAddress { .. } => "map memory that is mapped and writable",
        E::MonitorConflict { .. } | E::MonitorUnavailable { .. } => {
            "the seccomp monitor needs seccomp filters and no other SIGSYS user"
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Torture(a) => torture::run(a),
        Cmd::List(a) => pci_cmd::list(a),
        Cmd::Bind(a) => pci_cmd::bind(a),
        Cmd::Unbind(a) => pci_cmd::unbind(a),
        Cmd::DmaTest(a) => vfio_cmd::dma_test(&a),
        Cmd::RingTest(a) => vfio_cmd::ring_test(&a),
        Cmd::InterceptChild { samples } => bench::intercept::child(samples),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
