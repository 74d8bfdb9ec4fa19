//! Names for the vendor, device and class ids a user meets.

/// The devices this project is brought up on, and the usual company in a QEMU guest.
pub fn device_name(vendor: u16, device: u16) -> Option<&'static str> {
    Some(match (vendor, device) {
        (0x1234, 0x11e8) => "QEMU edu",
        (0x1234, 0x1111) => "QEMU VGA",
        (0x1b36, 0x0010) => "QEMU NVMe",
        (0x1b36, 0x0001) => "QEMU PCI bridge",
        (0x1b36, 0x0008) => "QEMU PCIe host bridge",
        (0x1b36, 0x000c) => "QEMU PCIe root port",
        (0x8086, 0x29c0) => "Intel Q35 host bridge",
        (0x8086, 0x1237) => "Intel 440FX host bridge",
        (0x8086, 0x2918) => "Intel ICH9 LPC",
        (0x8086, 0x2922) => "Intel ICH9 SATA",
        (0x8086, 0x2930) => "Intel ICH9 SMBus",
        (0x8086, 0x7000) => "Intel PIIX3 ISA",
        (0x8086, 0x7010) => "Intel PIIX3 IDE",
        (0x8086, 0x7113) => "Intel PIIX4 ACPI",
        (0x8086, 0x100e) => "Intel 82540EM (e1000)",
        (0x8086, 0x10d3) => "Intel 82574L (e1000e)",
        (0x1af4, d) => virtio_name(d)?,
        _ => return None,
    })
}

/// virtio devices: transitional ids 0x1000.., modern ids 0x1040 + the virtio device id.
pub(super) fn virtio_name(device: u16) -> Option<&'static str> {
    let id = match device {
        0x1000 => 1,
        0x1001 => 2,
        0x1002 => 5,
        0x1003 => 3,
        0x1004 => 8,
        0x1005 => 4,
        0x1009 => 9,
        0x1040..=0x107f => device - 0x1040,
        _ => return None,
    };
    Some(match id {
        1 => "virtio net",
        2 => "virtio block",
        3 => "virtio console",
        4 => "virtio rng",
        5 => "virtio balloon",
        8 => "virtio SCSI",
        9 => "virtio 9p",
        16 => "virtio GPU",
        18 => "virtio input",
        19 => "virtio vsock",
        20 => "virtio crypto",
        23 => "virtio IOMMU",
        24 => "virtio mem",
        26 => "virtio fs",
        27 => "virtio pmem",
        _ => "virtio",
    })
}

/// A few vendors by name.
pub fn vendor_name(vendor: u16) -> Option<&'static str> {
    Some(match vendor {
        0x8086 => "Intel",
        0x1af4 => "virtio",
        0x1b36 | 0x1234 => "QEMU",
        0x1022 => "AMD",
        0x1002 => "AMD/ATI",
        0x10de => "NVIDIA",
        0x144d => "Samsung",
        0x15b3 => "Mellanox",
        0x1d0f => "Amazon",
        _ => return None,
    })
}

/// The PCI class code's meaning, coarsely.
pub fn class_name(class: u32) -> &'static str {
    match class >> 8 {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0106 => "SATA controller",
        0x0108 => "NVMe controller",
        0x0200 => "Ethernet controller",
        0x0300 => "VGA controller",
        0x0302 => "3D controller",
        0x0403 => "audio device",
        0x0600 => "host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0c03 => "USB controller",
        0x0c05 => "SMBus controller",
        _ => match class >> 16 {
            0x01 => "storage controller",
            0x02 => "network controller",
            0x03 => "display controller",
            0x04 => "multimedia device",
            0x05 => "memory controller",
            0x06 => "bridge",
            0x07 => "communication controller",
            0x08 => "system peripheral",
            0x0c => "serial bus controller",
            0x12 => "processing accelerator",
            0xff => "device (unassigned class)",
            _ => "device",
        },
    }
}
