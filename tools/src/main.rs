//! `userptr`: the tool for people bringing up hardware and people measuring.
//!
//! * `demo`: the main job: SAXPY and CRC32C on ordinary `Vec`s through a command ring
//!   on the reference device, verified against the CPU;
//! * `bench`: the benchmark harness (suites pin, ring, e2e, cache, invalidate,
//!   intercept; a table on stdout, `--json FILE` in the documented schema);
//! * `torture`: submitters against address-space mutators, every result checked;
//! * `info`: what the device and its IOMMU domain report.

mod bench;
mod demo;
mod info;
mod raw_pin;
mod torture;

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
