//! `userptr status`: is this host ready? One line per thing the library needs, in the
//! spirit of `dpdk-devbind.py --status` and SPDK's `setup.sh status`, each with what to
//! do when it is not ready:
//!
//! * io_uring (the reference device): `kernel.io_uring_disabled`, and a real ring with
//!   a 64 KiB buffer registration (a pin);
//! * locked memory: `RLIMIT_MEMLOCK` against CAP_IPC_LOCK, and what is pinned now;
//! * seccomp: whether a filter can be installed (tried in a child process: a filter
//!   cannot be removed);
//! * userfaultfd: `vm.unprivileged_userfaultfd`, `/dev/userfaultfd`, and the monitor
//!   started for real in a child (full, or user-mode only);
//! * IOMMU groups and units, vfio-pci and `/dev/vfio/vfio`, the devices VFIO can use;
//! * privileges for `bind`; `/dev/kvm`.
//!
//! Kernel settings, sysfs and `/dev` are read under `--sysroot`. Exit status 1 when a
//! check failed that the reference device needs (io_uring); warnings do not fail.

use crate::budget::{cap_ipc_lock, human_bytes};
use std::time::{Duration, Instant};
use userptr::driver::vfio::pci::{self, HostSupport};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON (schema: docs/json-schema.md) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Ok,
    Warn,
    Fail,
    Info,
}

impl State {
    fn word(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Warn => "warn",
            State::Fail => "FAIL",
            State::Info => "info",
        }
    }
}

struct Check {
    name: &'static str,
    state: State,
    detail: String,
    fix: Option<String>,
}

fn check(name: &'static str, state: State, detail: String, fix: Option<&str>) -> Check {
    Check {
        name,
        state,
        detail,
        fix: fix.map(String::from),
    }
}

/// A `/proc/sys` value under the root, trimmed.
fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(crate::sys_root().root().join("proc/sys").join(path))
        .ok()
        .map(|s| s.trim().to_string())
}

fn io_uring() -> Check {
    let disabled = sysctl("kernel/io_uring_disabled");
    let setting = match &disabled {
        Some(v) => format!("kernel.io_uring_disabled = {v}"),
        None => "no kernel.io_uring_disabled (a kernel before 6.6)".to_string(),
    };
    let probe = crate::raw_pin::RawPin::new().and_then(|r| {
        let buf = vec![0u8; 64 << 10];
        r.pin(buf.as_ptr() as usize, buf.len())?;
        r.unpin()
    });
    match probe {
        Ok(()) => check(
            "io_uring",
            State::Ok,
            format!("a ring and a 64 KiB buffer registration work ({setting}): the reference device can run"),
            None,
        ),
        Err(e) => {
            let fix = match disabled.as_deref() {
                Some("2") => "`sysctl -w kernel.io_uring_disabled=0` (as root)".to_string(),
                Some("1") => format!(
                    "run as root, or join the group kernel.io_uring_group ({}) allows, or `sysctl -w kernel.io_uring_disabled=0`",
                    sysctl("kernel/io_uring_group").unwrap_or_else(|| "?".into())
                ),
                _ if e.raw_os_error() == Some(libc::ENOMEM) => {
                    "raise the locked-memory limit (`ulimit -l`)".to_string()
                }
                _ => "in a container, allow io_uring_setup and io_uring_register (Docker: a seccomp profile that permits them)".to_string(),
            };
            check(
                "io_uring",
                State::Fail,
                format!("{e} ({setting}): the reference device cannot run"),
                Some(&fix),
            )
        }
    }
}

fn locked_memory() -> Check {
    use rustix::process::{getrlimit, Resource};
    let l = getrlimit(Resource::Memlock);
    let fmt = |v: Option<u64>| v.map_or("unlimited".to_string(), human_bytes);
    let pinned = userptr::proc_status::pinned_bytes().unwrap_or(0);
    let limits = format!(
        "RLIMIT_MEMLOCK {} (hard {}), {} pinned now",
        fmt(l.current),
        fmt(l.maximum),
        human_bytes(pinned)
    );
    if cap_ipc_lock() {
        check(
            "locked memory",
            State::Ok,
            format!("{limits}; CAP_IPC_LOCK: pins are not limited"),
            None,
        )
    } else if l.current.is_none() {
        check(
            "locked memory",
            State::Ok,
            format!("{limits}: pins are not limited"),
            None,
        )
    } else {
        check(
            "locked memory",
            State::Warn,
            format!(
                "{limits}, no CAP_IPC_LOCK: at most that much can be pinned; demo sizes itself to it, bench skips what does not fit, VFIO maps count against it"
            ),
            Some("`ulimit -l unlimited` (root), a `memlock` line in /etc/security/limits.conf, LimitMEMLOCK= in a systemd unit, or `setcap cap_ipc_lock+ep` on the binary"),
        )
    }
}

/// Run `userptr probe WHAT` with a deadline: (exit success, stdout, stderr).
fn probe_child(what: &str) -> Result<(bool, String, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let mut child = std::process::Command::new(exe)
        .args(["probe", what])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the probe: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the probe did not finish in 10 s".into());
            }
            Err(e) => return Err(format!("waiting for the probe: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading the probe: {e}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr)
            .trim()
            .trim_start_matches("error: ")
            .to_string(),
    ))
}

fn proc_status_field(key: &str) -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        })
}

fn seccomp() -> Check {
    let mode = proc_status_field("Seccomp:");
    let already = match mode.as_deref() {
        Some("2") => {
            " (this process already runs under a filter, e.g. a container's: ours stacks on it)"
        }
        Some("1") => " (strict mode: nothing else can be installed)",
        _ => "",
    };
    match probe_child("seccomp") {
        Ok((true, _, _)) => check(
            "seccomp",
            State::Ok,
            format!("a filter can be installed{already}: the seccomp monitor can run"),
            None,
        ),
        Ok((false, _, err)) | Err(err) if !err.is_empty() => check(
            "seccomp",
            State::Warn,
            format!("a filter cannot be installed: {}{already}", err.lines().next().unwrap_or("")),
            Some("a kernel with CONFIG_SECCOMP_FILTER; in a container, allow seccomp() and prctl(PR_SET_NO_NEW_PRIVS); meanwhile use the userfaultfd, preload or explicit monitor"),
        ),
        _ => check(
            "seccomp",
            State::Warn,
            "the probe failed without a message".into(),
            Some("run `userptr -vv status`"),
        ),
    }
}

fn userfaultfd() -> Check {
    let setting = sysctl("vm/unprivileged_userfaultfd")
        .map_or("no vm.unprivileged_userfaultfd".into(), |v| {
            format!("vm.unprivileged_userfaultfd = {v}")
        });
    let dev = crate::sys_root().root().join("dev/userfaultfd");
    let dev = if dev.exists() {
        ", /dev/userfaultfd present"
    } else {
        ""
    };
    match probe_child("uffd") {
        Ok((true, out, _)) => {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let umo = v["user_mode_only"].as_bool().unwrap_or(false);
            let fork = v["fork_events"].as_bool().unwrap_or(false);
            let what = match (umo, fork) {
                (false, true) => "the monitor runs with every event, fork included".to_string(),
                (false, false) => "the monitor runs; no fork events (they need CAP_SYS_PTRACE: the kernel unregisters a fork child's ranges itself)".to_string(),
                (true, _) => "the monitor runs in user-mode-only mode (unprivileged): the events it needs are the same".to_string(),
            };
            check("userfaultfd", State::Ok, format!("{what} ({setting}{dev})"), None)
        }
        Ok((_, _, err)) | Err(err) => check(
            "userfaultfd",
            State::Warn,
            format!("the monitor cannot start: {} ({setting}{dev})", err.lines().next().unwrap_or("")),
            Some("`sysctl -w vm.unprivileged_userfaultfd=1`, or run as root; in a container, allow userfaultfd(); meanwhile use the seccomp, preload or explicit monitor"),
        ),
    }
}

fn iommu(host: &HostSupport) -> Check {
    if host.iommu_groups > 0 {
        check(
            "IOMMU",
            State::Ok,
            format!(
                "{} IOMMU groups{}",
                host.iommu_groups,
                if host.iommu_units.is_empty() {
                    String::new()
                } else {
                    format!(", units {}", host.iommu_units.join(", "))
                }
            ),
            None,
        )
    } else {
        let detail = if host.iommu_units.is_empty() {
            "no IOMMU groups and no IOMMU units (/sys/kernel/iommu_groups, /sys/class/iommu are empty): the kernel runs without an IOMMU, so no device can be used through VFIO (the reference device does not need one)".to_string()
        } else {
            format!(
                "no IOMMU groups although units {} are registered: no device was attached to them (dmesg says why)",
                host.iommu_units.join(", ")
            )
        };
        check(
            "IOMMU",
            State::Warn,
            detail,
            Some("enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (AMD: amd_iommu=on) iommu=pt; in QEMU: -device intel-iommu"),
        )
    }
}

fn vfio(host: &HostSupport) -> Vec<Check> {
    let mut out = Vec::new();
    if !host.pci_bus {
        out.push(check(
            "vfio-pci",
            State::Warn,
            "no PCI bus (/sys/bus/pci/devices does not exist)".into(),
            Some("a machine or container with sysfs; `--sysroot DIR` reads a host tree mounted elsewhere"),
        ));
        return out;
    }
    match (host.vfio_pci_loaded, host.vfio_container) {
        (true, true) => out.push(check(
            "vfio-pci",
            State::Ok,
            "loaded, /dev/vfio/vfio present".into(),
            None,
        )),
        (true, false) => out.push(check(
            "vfio-pci",
            State::Warn,
            "loaded, but /dev/vfio/vfio does not exist".into(),
            Some("devtmpfs in this mount namespace, or `mknod /dev/vfio/vfio c 10 196`"),
        )),
        (false, _) => out.push(check(
            "vfio-pci",
            State::Warn,
            "not loaded (/sys/bus/pci/drivers/vfio-pci does not exist)".into(),
            Some("`modprobe vfio-pci`"),
        )),
    }
    let root = crate::sys_root();
    let devs = pci::list(&root).unwrap_or_default();
    let usable: Vec<String> = devs
        .iter()
        .filter(|d| d.vfio_usable(&root).is_ok())
        .map(|d| format!("{} ({})", d.bdf, d.name()))
        .collect();
    let bound = devs.iter().filter(|d| d.is_vfio_bound()).count();
    out.push(if usable.is_empty() {
        check(
            "VFIO devices",
            State::Info,
            format!("{} PCI functions, {bound} bound to vfio-pci, none usable through VFIO now", devs.len()),
            Some("`userptr list` says what each device lacks; `userptr bind BDF` moves one to vfio-pci"),
        )
    } else {
        check(
            "VFIO devices",
            State::Ok,
            format!("usable: {}", usable.join(", ")),
            None,
        )
    });
    out
}

fn privileges() -> Check {
    let root = rustix::process::geteuid().is_root();
    if root {
        check(
            "privileges",
            State::Ok,
            "root: bind and unbind can write sysfs".into(),
            None,
        )
    } else {
        check(
            "privileges",
            State::Info,
            "not root: bind and unbind need root; the rest works as this user".into(),
            Some("run bind/unbind with sudo; give the user /dev/vfio/N (`chown`) to open a bound device"),
        )
    }
}

fn kvm() -> Check {
    let p = crate::sys_root().root().join("dev/kvm");
    if !p.exists() {
        return check(
            "/dev/kvm",
            State::Info,
            "absent: virtual machines run without KVM (tools/vfio-guest then runs its guest under TCG)".into(),
            Some("load kvm_intel or kvm_amd, or enable nested virtualisation, to run VMs with KVM"),
        );
    }
    use rustix::fs::{access, Access};
    match access(&p, Access::READ_OK | Access::WRITE_OK) {
        Ok(())
            if crate::sys_root().root().join("sys/module/kvm_pvm").exists()
                && !["kvm_intel", "kvm_amd"]
                    .iter()
                    .any(|m| crate::sys_root().root().join("sys/module").join(m).exists()) =>
        {
            check(
                "/dev/kvm",
                State::Info,
                "present, but kvm-pvm (software nested KVM): it runs only PVM guest kernels, \
                 so tools/vfio-guest runs its guest under TCG"
                    .into(),
                Some("enable nested VMX/SVM on the host to run ordinary guests under KVM"),
            )
        }
        Ok(()) => check(
            "/dev/kvm",
            State::Ok,
            "present and accessible (tools/vfio-guest runs its guest under KVM)".into(),
            None,
        ),
        Err(e) => check(
            "/dev/kvm",
            State::Info,
            format!("present but not accessible ({e})"),
            Some("add the user to the kvm group"),
        ),
    }
}

pub fn run(a: Args) -> Result<(), String> {
    let host = HostSupport::read(&crate::sys_root());
    // Locked memory first: the io_uring probe's pin is released asynchronously.
    let memory = locked_memory();
    let mut checks = vec![io_uring(), memory, seccomp(), userfaultfd(), iommu(&host)];
    checks.extend(vfio(&host));
    checks.push(privileges());
    checks.push(kvm());
    let failed = checks.iter().filter(|c| c.state == State::Fail).count();
    let u = rustix::system::uname();
    let kernel = format!(
        "{} {} {}",
        u.sysname().to_string_lossy(),
        u.release().to_string_lossy(),
        u.machine().to_string_lossy()
    );
    if a.json {
        let mut doc = crate::output::envelope(
            "status",
            serde_json::json!({ "sysroot": crate::sys_root().root().display().to_string() }),
        );
        doc.insert("ready".into(), (failed == 0).into());
        doc.insert(
            "checks".into(),
            checks
                .iter()
                .map(|c| serde_json::json!({ "name": c.name, "state": c.state.word(), "detail": c.detail, "fix": c.fix }))
                .collect::<Vec<_>>()
                .into(),
        );
        println!("{}", crate::output::pretty(&serde_json::Value::Object(doc)));
    } else {
        println!("userptr {} on {kernel}", crate::output::LONG_VERSION);
        for c in &checks {
            println!("{:<5} {:<14} {}", c.state.word(), c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("{:<5} {:<14} -> {f}", "", "");
            }
        }
    }
    if failed > 0 {
        return Err(format!(
            "{failed} check(s) failed: the reference device cannot run on this host (see above)"
        ));
    }
    Ok(())
}

/// `userptr probe WHAT` (internal, in a child of `status`): install what cannot be
/// removed, and report.
pub fn probe(what: &str) -> Result<(), String> {
    match what {
        "seccomp" => {
            userptr::driver::monitor::seccomp::install_trap_floor().map_err(|e| e.to_string())?;
            println!("{{\"installed\": true}}");
            Ok(())
        }
        "uffd" => {
            let drv = userptr::Driver::reference().map_err(|e| e.to_string())?;
            let reg = userptr::Registry::new(drv, userptr::RegistryConfig::default());
            let m = userptr::driver::monitor::uffd::UffdMonitor::start(&reg)
                .map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::json!({ "user_mode_only": m.user_mode_only(), "fork_events": m.fork_events() })
            );
            m.stop();
            Ok(())
        }
        _ => Err(format!("unknown probe `{what}`")),
    }
}
