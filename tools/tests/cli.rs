//! The `userptr` tool as a user runs it.

use std::process::Command;

fn userptr(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_userptr"))
        .args(args)
        .output()
        .expect("run userptr");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_verifies_and_says_so_on_its_last_line() {
    let (ok, out, err) = userptr(&["demo", "--elements", "262144"]);
    assert!(ok, "demo failed:\n{out}\n{err}");
    let last = out.lines().last().unwrap_or("");
    let rest = last.strip_prefix("demo: verified ").expect(last);
    let (n, mib) = rest.split_once(" commands, ").expect(last);
    assert!(n.parse::<u64>().unwrap() >= 12, "{last}");
    assert!(
        mib.trim_end_matches(" MiB").parse::<f64>().unwrap() > 0.0,
        "{last}"
    );
    assert!(out.contains("VmPin back to"), "{out}");
}

#[test]
fn demo_stats_prints_every_registry_counter() {
    let (ok, out, err) = userptr(&["demo", "--elements", "65536", "--stats"]);
    assert!(ok, "demo --stats failed:\n{out}\n{err}");
    let value = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no counter {name} in:\n{out}"))
    };
    for name in [
        "registrations",
        "hits",
        "misses",
        "pins",
        "pinned_bytes",
        "unpins",
        "unpinned_bytes",
        "merges",
        "splits",
        "retries",
        "window_waits",
        "fence_waits",
        "wait_ns",
        "window_wait_ns",
        "device_resets",
        "evictions",
        "pin_retries",
        "pin_failures",
        "validation_failures",
        "invalidations_unmap",
        "invalidations_discard",
        "invalidations_remap",
        "invalidations_protect",
        "invalidations_fork",
        "invalidations_release",
    ] {
        value(name);
    }
    // The demo's own work, counted: its buffers registered and pinned once, then hit.
    assert!(value("registrations") >= 3 && value("pins") >= 3, "{out}");
    assert!(value("hits") > value("misses"), "{out}");
    assert!(value("pinned_bytes") >= 3 * 65536 * 4, "{out}");
}

#[test]
fn bench_writes_the_contract_names_as_json() {
    let path = std::env::temp_dir().join(format!("userptr-bench-{}.json", std::process::id()));
    let p = path.to_str().unwrap();
    let (ok, out, err) = userptr(&[
        "bench",
        "--suite",
        "pin,ring,cache,invalidate,intercept",
        "--quick",
        "--samples",
        "3",
        "--json",
        p,
    ]);
    assert!(ok, "bench failed:\n{out}\n{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(v["machine"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert!(v["machine"]["cpus"].as_u64().is_some_and(|n| n >= 1));
    let results = v["results"].as_array().unwrap();
    let find = |suite: &str, name: &str| {
        results
            .iter()
            .find(|r| r["suite"] == suite && r["name"] == name)
            .unwrap_or_else(|| panic!("{suite}/{name} missing from {v}"))
    };
    for (suite, name, baseline) in [
        ("pin", "map_unmap_4KiB", true),
        ("pin", "map_unmap_2MiB", true),
        ("pin", "map_unmap_64MiB", true),
        ("ring", "nop_batched", false),
        ("ring", "fence_roundtrip", false),
        ("cache", "hit_per_ref", false),
        ("cache", "lookup_100k", false),
        ("invalidate", "idle_2MiB_discard", true),
        ("invalidate", "busy_2MiB_discard", false),
        ("intercept", "seccomp_unregistered_madvise", true),
        ("intercept", "seccomp_getpid", true),
        ("intercept", "uffd_registered_madvise", true),
    ] {
        let r = find(suite, name);
        assert!(r["median"].as_f64().is_some_and(|m| m >= 0.0), "{r}");
        assert!(r["samples"].as_u64().is_some_and(|n| n >= 3), "{r}");
        for k in ["unit", "p10", "p90"] {
            assert!(!r[k].is_null(), "{k} missing in {r}");
        }
        if baseline {
            assert!(r["baseline"]["median"].as_f64().is_some(), "{r}");
            assert!(r["ratio"].as_f64().is_some(), "{r}");
        }
    }
}

#[test]
fn bad_input_gets_a_readable_error() {
    let (ok, _out, err) = userptr(&["bench", "--suite", "nonsense"]);
    assert!(!ok);
    assert!(
        err.contains("unknown suite") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn info_reports_the_device() {
    let (ok, out, err) = userptr(&["info", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], 0x5550_5452);
    assert!(v["max_mappings"].as_u64().unwrap() > 0);
}

#[test]
fn torture_finds_no_violation_with_the_monitor_and_some_without() {
    let path = std::env::temp_dir().join(format!("userptr-torture-{}.json", std::process::id()));
    let p = path.to_str().unwrap();
    let (ok, out, err) = userptr(&["torture", "--seconds", "2", "--json", p]);
    assert!(ok, "torture failed:\n{out}\n{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(v["commands"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(
        v["violations_by_kind"]["in_flight_after_invalidation"], 0,
        "{v}"
    );
    assert_eq!(v["deadlocks"], 0, "{v}");
    assert_eq!(v["pins_start"], v["pins_end"], "{v}");
    assert!(
        v["invalidations"]
            .as_object()
            .unwrap()
            .values()
            .any(|n| n.as_u64().unwrap() > 0),
        "{v}"
    );
    for k in ["injected_faults", "seconds", "mutations"] {
        assert!(!v[k].is_null(), "{k} missing: {v}");
    }
    // Without the monitor the checker must catch stale pins (and the tool fail).
    let (ok, out, _err) = userptr(&["torture", "--seconds", "1", "--no-protect"]);
    assert!(!ok, "--no-protect must fail:\n{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim_end().trim_end_matches("torture: ok")).unwrap_or_default();
    assert!(v["violations"].as_u64().unwrap_or(0) > 0, "{out}");
}

#[test]
fn torture_handles_injected_pin_failures_stalls_and_dma_faults() {
    let path = std::env::temp_dir().join(format!("userptr-inject-{}.json", std::process::id()));
    let p = path.to_str().unwrap();
    let (ok, out, err) = userptr(&["torture", "--seconds", "3", "--inject", "--json", p]);
    assert!(ok, "torture --inject failed:\n{out}\n{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let n = |k: &str, f: &str| v[k][f].as_u64().unwrap_or_else(|| panic!("{k}.{f}: {v}"));
    // Every kind of fault was injected ...
    for f in [
        "pin_enomem",
        "pin_eagain",
        "device_stalls",
        "dma_fault_probes",
    ] {
        assert!(n("injected_faults", f) > 0, "no {f} injected: {v}");
    }
    // ... and handled: retried or evicted for, reset for, reported per command.
    assert!(n("errors_handled", "pin_retries") > 0, "{v}");
    assert!(n("errors_handled", "dma_faults") > 0, "{v}");
    assert!(
        v["device_resets"].as_u64().unwrap() > 0,
        "no stall met an invalidation: {v}"
    );
    // With nothing leaked and nothing wrong.
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["deadlocks"], 0, "{v}");
    assert_eq!(v["pins_start"], v["pins_end"], "{v}");
    assert_eq!(v["mappings_start"], v["mappings_end"], "{v}");
    assert!(v["commands"].as_u64().unwrap() > 100, "{v}");
}

#[test]
fn bench_plots_svg_charts() {
    let dir = std::env::temp_dir().join(format!("userptr-plot-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let (ok, out, err) = userptr(&[
        "bench",
        "--suite",
        "pin,ring",
        "--quick",
        "--samples",
        "3",
        "--plot",
        d,
    ]);
    assert!(ok, "{out}\n{err}");
    for (f, label) in [
        ("pin.svg", "raw io_uring register"),
        ("ring.svg", "commands per doorbell"),
    ] {
        let svg = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains(label),
            "{f} lacks {label}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    // On a machine without VFIO the vfio suite explains what is missing.
    if !std::path::Path::new("/dev/vfio/vfio").exists() {
        let (ok, _out, err) = userptr(&["bench", "--device", "0000:00:04.0"]);
        assert!(
            !ok && err.contains("VFIO is not usable") && err.contains("hint:"),
            "{err}"
        );
    }
    let (ok, _out, err) = userptr(&["bench", "--suite", "vfio"]);
    assert!(!ok && err.contains("needs a device"), "{err}");
}

#[test]
fn vfio_subcommands_explain_a_machine_without_vfio_or_a_bad_address() {
    for cmd in ["info", "dma-test", "ring-test"] {
        let (ok, _out, err) = userptr(&[cmd, "nonsense"]);
        assert!(
            !ok && err.contains("invalid PCI address") && err.contains("hint:"),
            "{cmd}: {err}"
        );
        if !std::path::Path::new("/dev/vfio/vfio").exists() {
            let (ok, _out, err) = userptr(&[cmd, "0000:00:04.0"]);
            assert!(
                !ok && err.contains("VFIO is not usable") && err.contains("hint:"),
                "{cmd}: {err}"
            );
            assert!(!err.contains("panicked"), "{cmd}: {err}");
        }
    }
}

#[test]
fn list_shows_a_table_or_explains_what_is_missing() {
    let (ok, out, err) = userptr(&["list"]);
    assert!(ok, "list failed:\n{out}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let table = out.starts_with("BDF ") && out.contains("VFIO");
    let explained = out.contains("no PCI devices") || out.contains("note: ");
    assert!(
        table || explained,
        "neither a table nor an explanation:\n{out}"
    );
    // Every device row ends in a verdict.
    for row in out.lines().skip(1).take_while(|l| !l.is_empty()) {
        assert!(row.contains("usable") || row.contains(" no: "), "{row}");
    }
    // Without IOMMU groups (as on a host with no IOMMU), the notes must say so and how
    // to fix it.
    let groups = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|d| d.count())
        .unwrap_or(0);
    if groups == 0 {
        assert!(
            out.contains("no IOMMU groups") && out.contains("intel_iommu=on"),
            "{out}"
        );
    }
    let (ok, out, err) = userptr(&["list", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for d in v["devices"].as_array().unwrap() {
        assert!(d["bdf"].as_str().is_some_and(|b| b.len() >= 12), "{d}");
        assert!(d["vfio"]["usable"].is_boolean(), "{d}");
    }
    assert!(v["problems"].is_array() && v["host"].is_object(), "{v}");
}

#[test]
fn bind_of_a_missing_device_fails_readably() {
    let (ok, out, err) = userptr(&["bind", "0000:ff:1f.7"]);
    assert!(!ok, "bind of a missing device succeeded:\n{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("0000:ff:1f.7") && err.contains("hint:"),
        "{err}"
    );
    let (ok, _out, err) = userptr(&["unbind", "0000:ff:1f.7"]);
    assert!(
        !ok && err.contains("no PCI device 0000:ff:1f.7") && err.contains("hint:"),
        "{err}"
    );
}

#[test]
fn bind_of_garbage_is_a_parse_error() {
    let (ok, _out, err) = userptr(&["bind", "garbage"]);
    assert!(!ok);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("invalid PCI address `garbage`") && err.contains("DDDD:BB:DD.F"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}
