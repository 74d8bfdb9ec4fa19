//! The sysfs model, the verdicts and bind/unbind, against a fake tree.

use super::readiness::access_verdict;
use super::*;
use crate::error::Error;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fake `/` with `sys/` and `dev/`, removed on drop.
struct FakeSys {
    root: SysRoot,
}

impl FakeSys {
    fn new(tag: &str) -> FakeSys {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "userptr-pci-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sys/bus/pci/devices")).unwrap();
        fs::create_dir_all(dir.join("sys/bus/pci/drivers")).unwrap();
        fs::create_dir_all(dir.join("sys/kernel/iommu_groups")).unwrap();
        fs::write(dir.join("sys/bus/pci/drivers_probe"), "").unwrap();
        FakeSys {
            root: SysRoot::at(dir),
        }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.root.root().join(rel)
    }
    fn driver(&self, name: &str) -> &Self {
        let d = self.root.driver_dir(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("unbind"), "").unwrap();
        fs::write(d.join("bind"), "").unwrap();
        self
    }
    /// A device with ids, class, optionally a driver and a group (the group's
    /// `devices/` entry links back to the device, as in sysfs).
    fn device(
        &self,
        bdf: &str,
        ids: (u16, u16),
        class: u32,
        driver: Option<&str>,
        group: Option<u32>,
    ) -> &Self {
        let d = self.root.pci_devices().join(bdf);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("{:#06x}\n", ids.0)).unwrap();
        fs::write(d.join("device"), format!("{:#06x}\n", ids.1)).unwrap();
        fs::write(d.join("class"), format!("{class:#08x}\n")).unwrap();
        fs::write(d.join("subsystem_vendor"), "0x1af4\n").unwrap();
        fs::write(d.join("subsystem_device"), "0x1100\n").unwrap();
        fs::write(d.join("driver_override"), "(null)\n").unwrap();
        if let Some(drv) = driver {
            self.driver(drv);
            symlink(format!("../../drivers/{drv}"), d.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gd = self.root.group_devices(g);
            fs::create_dir_all(&gd).unwrap();
            symlink(&d, gd.join(bdf)).unwrap();
            symlink(
                format!("../../../../kernel/iommu_groups/{g}"),
                d.join("iommu_group"),
            )
            .unwrap();
        }
        self
    }
    fn dev_node(&self, group: u32) -> &Self {
        let p = self.root.vfio_group_node(group);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, "").unwrap();
        self
    }
}

impl Drop for FakeSys {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.root.root());
    }
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn pci_bdf_parses_long_and_short_forms() {
    let b = bdf("0000:00:04.0");
    assert_eq!((b.domain(), b.bus(), b.dev(), b.func()), (0, 0, 4, 0));
    assert_eq!(b.to_string(), "0000:00:04.0");
    assert_eq!(bdf("00:04.0"), b);
    assert_eq!(bdf(" 0000:00:04.0\n"), b);
    let b = bdf("0001:FF:1f.7");
    assert_eq!((b.domain(), b.bus(), b.dev(), b.func()), (1, 0xff, 0x1f, 7));
    assert_eq!(b.to_string(), "0001:ff:1f.7");
    let vmd = bdf("10000:e0:00.0");
    assert_eq!(vmd.domain(), 0x10000);
    assert_eq!(vmd.to_string(), "10000:e0:00.0");
    assert!(bdf("0000:00:04.0") < bdf("0000:00:04.1"));
    assert!(bdf("0000:00:1f.0") < bdf("0000:01:00.0"));
    assert!(bdf("0000:ff:00.0") < bdf("0001:00:00.0"));
    assert_eq!(Bdf::new(0, 1, 2, 3).unwrap().to_string(), "0000:01:02.3");
    assert!(Bdf::new(0, 0, 0x20, 0).is_none());
    assert!(Bdf::new(0, 0, 0, 8).is_none());
}

#[test]
fn pci_bdf_rejects_garbage_with_a_reason() {
    for bad in [
        "",
        "garbage",
        "0000:00:04",
        "0000:00:04.8",
        "0000:00:20.0",
        "0000:00:04.00",
        "0000:000:04.0",
        "000000000:00:04.0",
        "0000:00:+4.0",
        "0000:00:04.g",
        "0000::04.0",
        "a:b:c:d.0",
        "04.0",
    ] {
        match bad.parse::<Bdf>() {
            Err(Error::BadBdf { input, reason }) => {
                assert_eq!(input, bad);
                assert!(!reason.is_empty());
                let msg = bad.parse::<Bdf>().unwrap_err().to_string();
                assert!(msg.contains("DDDD:BB:DD.F"), "{msg}");
            }
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
}

#[test]
fn pci_list_reads_and_sorts_devices() {
    let fake = FakeSys::new("list");
    fake.device(
        "0000:00:05.0",
        (0x1b36, 0x0010),
        0x010802,
        Some("nvme"),
        None,
    )
    .device("0000:00:00.0", (0x8086, 0x29c0), 0x060000, None, None)
    .device(
        "0000:00:04.0",
        (0x1234, 0x11e8),
        0x00ff00,
        Some("vfio-pci"),
        Some(3),
    );
    fs::create_dir_all(fake.path("sys/bus/pci/devices/not-a-bdf")).unwrap();
    fs::write(
        fake.path("sys/bus/pci/devices/0000:00:05.0/driver_override"),
        "vfio-pci\n",
    )
    .unwrap();
    let devs = list(&fake.root).unwrap();
    let bdfs: Vec<String> = devs.iter().map(|d| d.bdf.to_string()).collect();
    assert_eq!(bdfs, ["0000:00:00.0", "0000:00:04.0", "0000:00:05.0"]);
    let host = &devs[0];
    assert_eq!(
        (host.vendor, host.device, host.class),
        (0x8086, 0x29c0, 0x060000)
    );
    assert_eq!(host.driver, None);
    assert_eq!(host.iommu_group, None);
    assert_eq!(host.driver_override, None);
    assert_eq!(host.name(), "Intel Q35 host bridge");
    let edu = &devs[1];
    assert_eq!(edu.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(edu.iommu_group, Some(3));
    assert_eq!(edu.subsystem_vendor, Some(0x1af4));
    assert_eq!(edu.subsystem_device, Some(0x1100));
    assert_eq!(edu.name(), "QEMU edu");
    let nvme = &devs[2];
    assert_eq!(nvme.driver.as_deref(), Some("nvme"));
    assert_eq!(nvme.driver_override.as_deref(), Some("vfio-pci"));
    assert_eq!(nvme.name(), "QEMU NVMe");
    // No PCI bus at all: an empty list, not an error.
    let empty = SysRoot::at(fake.path("nonexistent"));
    assert!(list(&empty).unwrap().is_empty());
    assert!(!HostSupport::read(&empty).pci_bus);
}

#[test]
fn pci_names_come_from_the_table_or_vendor_and_class() {
    assert_eq!(device_name(0x1af4, 0x1041), Some("virtio net"));
    assert_eq!(device_name(0x1af4, 0x1001), Some("virtio block"));
    assert_eq!(device_name(0x1af4, 0x1053), Some("virtio vsock"));
    let d = |vendor, device, class| PciDevice {
        bdf: bdf("00:01.0"),
        vendor,
        device,
        class,
        subsystem_vendor: None,
        subsystem_device: None,
        driver: None,
        iommu_group: None,
        driver_override: None,
    };
    assert_eq!(d(0x8086, 0x0d57, 0x060000).name(), "Intel host bridge");
    assert_eq!(d(0xabcd, 0x0001, 0x010802).name(), "NVMe controller");
    assert_eq!(d(0xabcd, 0x0001, 0x020000).name(), "Ethernet controller");
}

#[test]
fn pci_read_of_a_missing_device_says_so() {
    let fake = FakeSys::new("missing");
    match PciDevice::read(&fake.root, bdf("0000:ff:1f.7")) {
        Err(Error::NoSuchPciDevice { bdf: b, path }) => {
            assert_eq!(b, "0000:ff:1f.7");
            assert!(path.ends_with("sys/bus/pci/devices/0000:ff:1f.7"));
        }
        other => panic!("{other:?}"),
    }
}

fn verdict(fake: &FakeSys, b: &str) -> Result<(), VfioUnusable> {
    PciDevice::read(&fake.root, bdf(b))
        .unwrap()
        .vfio_usable(&fake.root)
}

#[test]
fn pci_verdict_usable() {
    let fake = FakeSys::new("usable");
    fake.device(
        "0000:00:04.0",
        (0x1234, 0x11e8),
        0x00ff00,
        Some("vfio-pci"),
        Some(3),
    )
    .dev_node(3);
    assert_eq!(verdict(&fake, "0000:00:04.0"), Ok(()));
    assert_eq!(vfio_group(&fake.root, bdf("0000:00:04.0")).unwrap(), 3);
}

#[test]
fn pci_verdict_no_iommu_group() {
    let fake = FakeSys::new("nogroup");
    fake.driver("vfio-pci").device(
        "0000:00:04.0",
        (0x1af4, 0x1041),
        0x020000,
        Some("virtio-pci"),
        None,
    );
    let v = verdict(&fake, "0000:00:04.0");
    assert_eq!(v, Err(VfioUnusable::NoIommuGroup));
    assert!(v.unwrap_err().hint().contains("intel_iommu=on"));
    let host = HostSupport::read(&fake.root);
    assert_eq!(host.iommu_groups, 0);
    let p = host.problems().join("\n");
    assert!(
        p.contains("no IOMMU groups") && p.contains("intel_iommu=on"),
        "{p}"
    );
    assert!(!p.contains("vfio-pci is not loaded"), "{p}");
}

#[test]
fn pci_verdict_vfio_pci_not_loaded() {
    let fake = FakeSys::new("noload");
    fake.device(
        "0000:00:04.0",
        (0x1b36, 0x0010),
        0x010802,
        Some("nvme"),
        Some(3),
    );
    let v = verdict(&fake, "0000:00:04.0");
    assert_eq!(v, Err(VfioUnusable::VfioPciNotLoaded));
    assert!(v.unwrap_err().hint().contains("modprobe vfio-pci"));
    let p = HostSupport::read(&fake.root).problems().join("\n");
    assert!(
        p.contains("modprobe vfio-pci") && !p.contains("no IOMMU groups"),
        "{p}"
    );
}

#[test]
fn pci_verdict_bound_to_another_driver_or_none() {
    let fake = FakeSys::new("other");
    fake.driver("vfio-pci")
        .device(
            "0000:00:04.0",
            (0x1b36, 0x0010),
            0x010802,
            Some("nvme"),
            Some(3),
        )
        .device("0000:00:05.0", (0x1234, 0x11e8), 0x00ff00, None, Some(4));
    let v = verdict(&fake, "0000:00:04.0");
    assert_eq!(v, Err(VfioUnusable::BoundToOther("nvme".into())));
    let v = v.unwrap_err();
    assert!(v.to_string().contains("nvme") && v.hint().contains("userptr bind"));
    let v = verdict(&fake, "0000:00:05.0");
    assert_eq!(v, Err(VfioUnusable::NotBound));
    assert!(v.unwrap_err().hint().contains("userptr bind"));
}

#[test]
fn pci_verdict_dev_node_missing_or_inaccessible() {
    let fake = FakeSys::new("node");
    fake.device(
        "0000:00:04.0",
        (0x1234, 0x11e8),
        0x00ff00,
        Some("vfio-pci"),
        Some(7),
    );
    assert_eq!(
        verdict(&fake, "0000:00:04.0"),
        Err(VfioUnusable::DevNodeMissing { group: 7 })
    );
    // Permission bits do not stop root, so check the errno mapping directly.
    let denied = access_verdict(7, Err(io::Error::from_raw_os_error(libc::EACCES)));
    let v = denied.unwrap_err();
    assert_eq!(
        v,
        VfioUnusable::DevNodeNoAccess {
            group: 7,
            errno: libc::EACCES
        }
    );
    assert!(
        v.to_string().contains("/dev/vfio/7 is not accessible"),
        "{v}"
    );
    assert!(v.hint().contains("root"));
    let missing = access_verdict(7, Err(io::Error::from_raw_os_error(libc::ENOENT)));
    assert_eq!(missing, Err(VfioUnusable::DevNodeMissing { group: 7 }));
}

#[test]
fn pci_verdict_bridge() {
    let fake = FakeSys::new("bridge");
    fake.device(
        "0000:00:1c.0",
        (0x1b36, 0x000c),
        0x060400,
        Some("pcieport"),
        Some(1),
    );
    assert_eq!(verdict(&fake, "0000:00:1c.0"), Err(VfioUnusable::Bridge));
}

#[test]
fn pci_group_viability() {
    let fake = FakeSys::new("viable");
    fake.device(
        "0000:01:00.0",
        (0x10de, 0x1eb8),
        0x030000,
        Some("vfio-pci"),
        Some(9),
    )
    .device(
        "0000:01:00.1",
        (0x10de, 0x10f8),
        0x040300,
        Some("snd_hda_intel"),
        Some(9),
    )
    .device(
        "0000:00:01.0",
        (0x8086, 0x1901),
        0x060400,
        Some("pcieport"),
        Some(9),
    )
    .device("0000:01:00.2", (0x10de, 0x1ad8), 0x0c0330, None, Some(9))
    .device(
        "0000:01:00.3",
        (0x10de, 0x1ad9),
        0x0c8000,
        Some("pci-stub"),
        Some(9),
    )
    .dev_node(9);
    let v = verdict(&fake, "0000:01:00.0");
    assert_eq!(
        v,
        Err(VfioUnusable::GroupNotViable {
            group: 9,
            blockers: vec![("0000:01:00.1".into(), "snd_hda_intel".into())],
        })
    );
    let v = v.unwrap_err();
    assert!(
        v.to_string()
            .contains("IOMMU group 9 is not viable: 0000:01:00.1 is bound to snd_hda_intel"),
        "{v}"
    );
    assert!(v.hint().contains("every device of the group"));
    match vfio_group(&fake.root, bdf("0000:01:00.0")) {
        Err(e @ Error::PciVfioUnusable { .. }) => {
            assert!(e.to_string().contains("snd_hda_intel"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // Move the audio function to vfio-pci as well: the group becomes viable.
    let audio = fake.root.device_dir(bdf("0000:01:00.1")).join("driver");
    fs::remove_file(&audio).unwrap();
    symlink("../../drivers/vfio-pci", &audio).unwrap();
    assert_eq!(verdict(&fake, "0000:01:00.0"), Ok(()));
    assert!(group_blockers(&fake.root, 9, None).is_empty());
}

#[test]
fn pci_bind_checks_before_writing_anything() {
    let fake = FakeSys::new("bindpre");
    fake.device(
        "0000:00:04.0",
        (0x1b36, 0x0010),
        0x010802,
        Some("nvme"),
        None,
    )
    .device(
        "0000:00:05.0",
        (0x1b36, 0x0010),
        0x010802,
        Some("nvme"),
        Some(3),
    );
    let override_of =
        |b: &str| fs::read_to_string(fake.root.device_dir(bdf(b)).join("driver_override")).unwrap();
    match bind_vfio(&fake.root, bdf("0000:ff:1f.7")) {
        Err(e @ Error::NoSuchPciDevice { .. }) => {
            assert!(e.to_string().contains("userptr list"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    match bind_vfio(&fake.root, bdf("0000:00:04.0")) {
        Err(Error::PciVfioUnusable { reason, .. })
            if reason == VfioUnusable::NoIommuGroup.to_string() => {}
        other => panic!("{other:?}"),
    }
    match bind_vfio(&fake.root, bdf("0000:00:05.0")) {
        Err(e @ Error::PciVfioUnusable { .. })
            if e.to_string()
                .contains(&VfioUnusable::VfioPciNotLoaded.to_string()) =>
        {
            assert!(e.to_string().contains("modprobe vfio-pci"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(override_of("0000:00:04.0"), "(null)\n");
    assert_eq!(override_of("0000:00:05.0"), "(null)\n");
    let unbind = fake.root.driver_dir("nvme").join("unbind");
    assert_eq!(fs::read_to_string(unbind).unwrap(), "");
}

#[test]
fn pci_bind_rolls_back_when_vfio_pci_does_not_take_the_device() {
    // A fake tree cannot move the `driver` link, so the probe "fails": the bind must
    // write the override, unbind, probe, see nvme still there, and roll back.
    let fake = FakeSys::new("rollback");
    fake.driver("vfio-pci").device(
        "0000:00:05.0",
        (0x1b36, 0x0010),
        0x010802,
        Some("nvme"),
        Some(3),
    );
    let b = bdf("0000:00:05.0");
    match bind_vfio(&fake.root, b) {
        Err(e @ Error::PciBindFailed { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("vfio-pci did not take 0000:00:05.0"), "{msg}");
            assert!(msg.contains("nvme"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    let read = |p: PathBuf| fs::read_to_string(p).unwrap();
    assert_eq!(
        read(fake.root.driver_dir("nvme").join("unbind")),
        "0000:00:05.0"
    );
    assert_eq!(read(fake.root.drivers_probe()), "0000:00:05.0");
    assert_eq!(read(fake.root.device_dir(b).join("driver_override")), "\n");
}

#[test]
fn pci_unbind_writes_unbind_clears_the_override_and_leaves_others_alone() {
    let fake = FakeSys::new("unbind");
    fake.device(
        "0000:00:04.0",
        (0x1234, 0x11e8),
        0x00ff00,
        Some("vfio-pci"),
        Some(3),
    )
    .device(
        "0000:00:05.0",
        (0x1b36, 0x0010),
        0x010802,
        Some("nvme"),
        Some(4),
    );
    let dir = fake.root.device_dir(bdf("0000:00:04.0"));
    fs::write(dir.join("driver_override"), "vfio-pci\n").unwrap();
    // The fake `driver` link cannot go away, so the device "stays" on vfio-pci.
    let now = unbind_vfio(&fake.root, bdf("0000:00:04.0")).unwrap();
    assert_eq!(now.as_deref(), Some("vfio-pci"));
    let read = |p: PathBuf| fs::read_to_string(p).unwrap();
    assert_eq!(
        read(fake.root.driver_dir("vfio-pci").join("unbind")),
        "0000:00:04.0"
    );
    assert_eq!(read(dir.join("driver_override")), "\n");
    // Bound to a host driver without our override: nothing is written.
    let now = unbind_vfio(&fake.root, bdf("0000:00:05.0")).unwrap();
    assert_eq!(now.as_deref(), Some("nvme"));
    assert_eq!(read(fake.root.driver_dir("nvme").join("unbind")), "");
    assert!(matches!(
        unbind_vfio(&fake.root, bdf("0000:ff:1f.7")),
        Err(Error::NoSuchPciDevice { .. })
    ));
}

#[test]
fn pci_sysfs_errors_name_the_cause() {
    let e = Error::pci_sysfs(
        "set driver_override",
        bdf("0000:00:04.0"),
        PathBuf::from("/sys/bus/pci/devices/0000:00:04.0/driver_override"),
        io::Error::from_raw_os_error(libc::EACCES),
    );
    let msg = e.to_string();
    assert!(
        msg.contains("0000:00:04.0") && msg.contains("driver_override"),
        "{msg}"
    );
    assert!(msg.contains("root"), "{msg}");
}
