//! `userptr list`, `userptr bind BDF`, `userptr unbind BDF`: VFIO bring-up. Which PCI
//! devices there are and what each lacks for VFIO; moving one to vfio-pci and back.

use userptr::driver::vfio::pci::{self, Bdf, HostSupport, PciDevice};

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct BindArgs {
    /// The PCI address, `DDDD:BB:DD.F` or `BB:DD.F` (as `userptr list` shows it).
    #[arg(value_name = "BDF", value_parser = crate::args::bdf)]
    bdf: Bdf,
    /// Bind even a device the system is using (a mounted disk, an interface that is
    /// up, the boot VGA device): the system loses it.
    #[arg(long)]
    force: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct UnbindArgs {
    /// The PCI address, `DDDD:BB:DD.F` or `BB:DD.F` (as `userptr list` shows it).
    #[arg(value_name = "BDF", value_parser = crate::args::bdf)]
    bdf: Bdf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn or_dash(s: Option<&str>) -> &str {
    s.unwrap_or("-")
}

pub fn list(a: ListArgs) -> Result<(), String> {
    let root = crate::sys_root();
    let devs = pci::list(&root).map_err(|e| crate::explain(&e))?;
    let host = HostSupport::read(&root);
    let problems = host.problems();
    let verdicts: Vec<Result<(), pci::VfioUnusable>> =
        devs.iter().map(|d| d.vfio_usable(&root)).collect();
    if a.json {
        let devices: Vec<serde_json::Value> = devs
            .iter()
            .zip(&verdicts)
            .map(|(d, v)| device_json(d, v))
            .collect();
        let v = serde_json::json!({
            "devices": devices,
            "host": {
                "pci_bus": host.pci_bus,
                "iommu_groups": host.iommu_groups,
                "iommu_units": host.iommu_units,
                "vfio_pci_loaded": host.vfio_pci_loaded,
                "vfio_container": host.vfio_container,
            },
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let header = ["BDF", "ID", "NAME", "CLASS", "DRIVER", "GROUP", "VFIO"];
    let rows: Vec<[String; 7]> = devs
        .iter()
        .zip(&verdicts)
        .map(|(d, v)| {
            [
                d.bdf.to_string(),
                format!("{:04x}:{:04x}", d.vendor, d.device),
                d.name(),
                format!("{:06x}", d.class),
                or_dash(d.driver.as_deref()).to_string(),
                d.iommu_group
                    .map_or_else(|| "-".to_string(), |g| g.to_string()),
                match v {
                    Ok(()) => "usable".to_string(),
                    Err(r) => format!("no: {r}"),
                },
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    if devs.is_empty() {
        println!("no PCI devices");
    } else {
        line(&header);
        for r in &rows {
            line(&r.each_ref().map(String::as_str));
        }
    }
    if !problems.is_empty() {
        println!();
        for p in &problems {
            println!("note: {p}");
        }
    }
    // One hint per kind of device-level problem not already explained host-wide.
    let mut hints: Vec<String> = Vec::new();
    for r in verdicts.iter().filter_map(|v| v.as_ref().err()) {
        use pci::VfioUnusable as U;
        let host_wide = matches!(r, U::NoIommuGroup | U::VfioPciNotLoaded | U::Bridge);
        let h = format!("hint: {}: {}", kind(r), r.hint());
        if !host_wide && !hints.contains(&h) {
            hints.push(h);
        }
    }
    for h in hints {
        println!("{h}");
    }
    Ok(())
}

/// A short name for a verdict's kind, for grouping hints.
fn kind(r: &pci::VfioUnusable) -> &'static str {
    use pci::VfioUnusable as U;
    match r {
        U::Bridge => "bridges",
        U::NoIommuGroup => "no IOMMU group",
        U::VfioPciNotLoaded => "vfio-pci not loaded",
        U::NotBound | U::BoundToOther(_) => "not on vfio-pci",
        U::DevNodeMissing { .. } => "no /dev/vfio node",
        U::DevNodeNoAccess { .. } => "/dev/vfio node not accessible",
        U::GroupNotViable { .. } => "group not viable",
    }
}

fn device_json(d: &PciDevice, v: &Result<(), pci::VfioUnusable>) -> serde_json::Value {
    let hex4 = |x: u16| format!("{x:04x}");
    serde_json::json!({
        "bdf": d.bdf.to_string(),
        "vendor": hex4(d.vendor),
        "device": hex4(d.device),
        "class": format!("{:06x}", d.class),
        "subsystem_vendor": d.subsystem_vendor.map(hex4),
        "subsystem_device": d.subsystem_device.map(hex4),
        "name": d.name(),
        "driver": d.driver,
        "driver_override": d.driver_override,
        "iommu_group": d.iommu_group,
        "vfio": match v {
            Ok(()) => serde_json::json!({ "usable": true }),
            Err(r) => serde_json::json!({
                "usable": false, "reason": r.to_string(), "hint": r.hint(),
            }),
        },
    })
}

pub fn bind(a: BindArgs) -> Result<(), String> {
    let bdf = a.bdf;
    let root = crate::sys_root();
    // The device exists (a readable error otherwise), and the system is not using it.
    let dev = PciDevice::read(&root, bdf).map_err(|e| crate::explain(&e))?;
    let uses = if dev.is_vfio_bound() {
        Vec::new()
    } else {
        crate::pci_use::in_use(&root, bdf)
    };
    if !uses.is_empty() {
        let why: Vec<String> = uses.iter().map(|u| u.to_string()).collect();
        if !a.force {
            return Err(format!(
                "refusing to bind {bdf} ({}, on {}): the system is using it: {}\nhint: stop using it first (unmount, swapoff, `ip link set DEV down`), or pass --force to take it anyway",
                dev.name(),
                dev.driver.as_deref().unwrap_or("no driver"),
                why.join("; ")
            ));
        }
        tracing::warn!(%bdf, "binding a device the system is using (--force): {}", why.join("; "));
    }
    tracing::info!(%bdf, driver = ?dev.driver, "binding to vfio-pci");
    let r = pci::bind_vfio(&root, bdf).map_err(|e| crate::explain(&e))?;
    if a.json {
        let v = serde_json::json!({
            "bdf": bdf.to_string(), "previous": r.previous, "driver": pci::VFIO_PCI,
            "already_bound": r.already_bound, "iommu_group": r.group,
            "dev_node": r.dev_node.display().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if r.already_bound {
        println!(
            "{bdf}: already bound to {}, {}",
            or_dash(r.previous.as_deref()),
            r.dev_node.display()
        );
    } else {
        println!(
            "{bdf}: {} -> {}, {}",
            r.previous.as_deref().unwrap_or("(no driver)"),
            pci::VFIO_PCI,
            r.dev_node.display()
        );
    }
    Ok(())
}

pub fn unbind(a: UnbindArgs) -> Result<(), String> {
    let bdf = a.bdf;
    let root = crate::sys_root();
    let before = PciDevice::read(&root, bdf).map_err(|e| crate::explain(&e))?;
    let now = pci::unbind_vfio(&root, bdf).map_err(|e| crate::explain(&e))?;
    let touched =
        before.is_vfio_bound() || before.driver_override.as_deref() == Some(pci::VFIO_PCI);
    if a.json {
        let v = serde_json::json!({
            "bdf": bdf.to_string(), "previous": before.driver, "driver": now,
            "changed": touched,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if !touched {
        let on = match now.as_deref() {
            Some(d) => format!("bound to {d}"),
            None => "not bound to any driver".to_string(),
        };
        println!("{bdf}: {on}, not vfio-pci: left alone");
    } else {
        println!(
            "{bdf}: {} -> {}",
            before.driver.as_deref().unwrap_or("(no driver)"),
            now.as_deref().unwrap_or("(no driver took it)")
        );
    }
    Ok(())
}
