//! `userptr info`: the reference device's identity registers, rings and IOMMU domain,
//! and the process's pinned-memory budget; `userptr info BDF`: a device opened through
//! VFIO (see `vfio_cmd`).

use userptr::ring::regs;
use userptr::Driver;

#[derive(clap::Args)]
pub struct Args {
    /// A PCI function bound to vfio-pci (DDDD:BB:DD.F); without it, the embedded
    /// reference device.
    #[arg(value_parser = crate::args::bdf)]
    bdf: Option<userptr::driver::vfio::pci::Bdf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<(), String> {
    if let Some(bdf) = a.bdf {
        return crate::vfio_cmd::info(&crate::vfio_cmd::DeviceArgs { bdf, json: a.json });
    }
    let drv = Driver::reference().map_err(|e| crate::explain(&e))?;
    let dev = drv
        .device()
        .ok_or("the reference driver has no ring device")?;
    let d = drv.domain();
    let id = dev.read32(regs::ID);
    let version = dev.read32(regs::VERSION);
    let caps = dev.read32(regs::CAPS);
    let ranges: Vec<String> = d
        .iova_ranges()
        .iter()
        .map(|r| format!("{:#x}..{:#x}", r.start, r.end))
        .collect();
    let sizes: Vec<String> = (0..64)
        .filter(|b| d.page_sizes() & (1 << b) != 0)
        .map(|b| format!("{}K", (1u64 << b) / 1024))
        .collect();
    let memlock = userptr::proc_status::memlock_limit();
    let vmpin = userptr::proc_status::pinned_bytes().unwrap_or(0);
    if a.json {
        let v = serde_json::json!({
            "device": dev.name(), "id": id, "version": version, "rings": caps & 0xff,
            "max_ring": 1u32 << ((caps >> 8) & 0xff), "opcodes": caps >> 16,
            "iova_ranges": ranges, "page_sizes": sizes, "max_mappings": d.max_mappings(),
            "max_mapping_len": d.max_mapping_len(), "memlock_limit": memlock, "vmpin": vmpin,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("device        {}", dev.name());
    println!(
        "id            {id:#010x} (\"UPTR\")  version {}.{}",
        version >> 16,
        version & 0xffff
    );
    println!(
        "rings         {} of up to {} slots",
        caps & 0xff,
        1u32 << ((caps >> 8) & 0xff)
    );
    println!("opcodes       {:#06x} (bit n = opcode n)", caps >> 16);
    println!("IOVA ranges   {}", ranges.join(", "));
    println!("page sizes    {}", sizes.join(" "));
    println!(
        "mappings      at most {}, each at most {} MiB",
        d.max_mappings(),
        d.max_mapping_len() >> 20
    );
    println!(
        "RLIMIT_MEMLOCK {}",
        if memlock == u64::MAX {
            "unlimited".into()
        } else {
            format!("{} kB", memlock / 1024)
        }
    );
    println!("VmPin         {} kB", vmpin / 1024);
    Ok(())
}
