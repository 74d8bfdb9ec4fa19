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
        "pin,ring,cache,invalidate,intercept,migrate",
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
        ("ring", "fence_roundtrip_blocking", false),
        ("ring", "fence_roundtrip_limit", false),
        ("ring", "eventfd_wakeup_limit", false),
        ("ring", "submit_overhead_per_descriptor", true),
        ("ring", "reap_overhead_per_descriptor", true),
        ("cache", "hit_per_ref", false),
        ("cache", "lookup_100k", false),
        ("invalidate", "idle_2MiB_discard", true),
        ("invalidate", "busy_2MiB_discard", false),
        ("intercept", "seccomp_unregistered_madvise", true),
        ("intercept", "seccomp_getpid", true),
        ("intercept", "uffd_registered_madvise", true),
        ("migrate", "migrate_to_vram_2MiB", true),
        ("migrate", "migrate_to_system_2MiB", true),
        ("migrate", "migrate_to_vram_64MiB", true),
        ("migrate", "migrate_to_system_64MiB", true),
        ("migrate", "cpu_access_mid_migration_2MiB", true),
        ("migrate", "cpu_access_vram_bo_2MiB", true),
        ("migrate", "cpu_access_system_bo_2MiB", true),
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
    // The kernel's own notifier: a row with its baseline where KVM runs, else a skip
    // that says why.
    let kvm = results
        .iter()
        .find(|r| r["suite"] == "invalidate" && r["name"] == "kernel_notifier_2MiB");
    match kvm {
        Some(r) => assert!(r["added_us"].as_f64().is_some(), "{r}"),
        None => assert!(
            v["skipped"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "kernel_notifier_2MiB"
                    && s["reason"].as_str().is_some_and(|r| !r.is_empty())),
            "kernel_notifier_2MiB neither measured nor skipped: {v}"
        ),
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
fn torture_migrate_finds_no_violation_protected_and_some_without() {
    let (ok, out, err) = userptr(&["torture", "--migrate", "--seconds", "2", "--json", "-"]);
    assert!(ok, "torture --migrate failed:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "migrate", "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    assert!(v["migrations"].as_u64().unwrap() > 10, "{v}");
    assert!(v["evictions"].as_u64().unwrap() > 0, "{v}");
    assert!(v["commands"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["pins_start"], v["pins_end"], "{v}");
    assert_eq!(v["vram_free_start"], v["vram_free_end"], "{v}");
    // Without the protections the checker must find violations (and the tool fail).
    let (ok, out, _err) = userptr(&[
        "torture",
        "--migrate",
        "--seconds",
        "2",
        "--no-protect",
        "--json",
        "-",
    ]);
    assert!(!ok, "--migrate --no-protect must fail:\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["violations"].as_u64().unwrap() > 0, "{v}");
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
    // Human units on the axes, the ratio panel, the machine and the date.
    let pin = std::fs::read_to_string(dir.join("pin.svg")).unwrap();
    for want in [
        "4 KiB",
        "64 KiB",
        "2 MiB",
        "ours / baseline",
        "CPUs",
        "device: reference",
    ] {
        assert!(pin.contains(want), "pin.svg lacks {want}");
    }
    assert!(
        !pin.contains("976562K") && !pin.contains(">4K<"),
        "raw units in pin.svg"
    );
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

/// Run the tool with `env` set, in `dir`: (exit code, stdout, stderr).
fn userptr_in(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_userptr"));
    c.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run userptr");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch directory, removed on drop.
struct Scratch(std::path::PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "userptr-cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.0.join(rel)
    }
    fn s(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_string()
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_bad_argument_is_refused_with_one_message_before_any_work() {
    let tmp = Scratch::new("args");
    let dir = tmp.s("");
    let file = tmp.s("file");
    std::fs::write(&file, "x").unwrap();
    let under_file = format!("{file}/sub");
    let mut cases: Vec<Vec<String>> = Vec::new();
    let mut add = |prefix: &[&str], opt: &str, values: &[&str]| {
        for v in values {
            let mut c: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
            c.push(opt.to_string());
            c.push(v.to_string());
            cases.push(c);
        }
    };
    let nums = [
        "",
        "abc",
        "-1",
        "1e30",
        "18446744073709551616",
        "0x10",
        "nan",
        "inf",
        "٣",
    ];
    add(
        &["torture"],
        "--seconds",
        &[
            "inf", "-inf", "NaN", "-1", "0", "-0", "1e30", "", "5s", "abc",
        ],
    );
    add(&["torture"], "--only", &["nonsense", ""]);
    add(
        &["torture"],
        "--json",
        &["/nonexistent-dir/x.json", &dir, "", &under_file],
    );
    add(&["demo"], "--elements", &nums);
    add(
        &["demo"],
        "--elements",
        &["18446744073709551615", "0", "1023", "268435457"],
    );
    add(&["demo"], "--saxpy", &nums);
    add(&["demo"], "--saxpy", &["0", "4097"]);
    add(&["bench"], "--samples", &nums);
    add(&["bench"], "--samples", &["0", "2", "100001"]);
    add(
        &["bench"],
        "--suite",
        &["nonsense", "", "pin,,ring", "pin,bogus"],
    );
    add(
        &["bench"],
        "--json",
        &["/nonexistent-dir/x.json", &dir, "", &under_file],
    );
    add(&["bench"], "--csv", &["/nonexistent-dir/x.csv", &dir]);
    add(&["bench"], "--plot", &[&file, &under_file, ""]);
    add(
        &["bench"],
        "--device",
        &["garbage", "0000:00:20.0", "0000:00:04.8", "1:2:3:4.0", ""],
    );
    add(&["ring-test", "0000:00:04.0"], "--commands", &nums);
    add(
        &["ring-test", "0000:00:04.0"],
        "--commands",
        &["0", "9", "10000001"],
    );
    add(&["ring-test", "0000:00:04.0"], "--depth", &nums);
    add(
        &["ring-test", "0000:00:04.0"],
        "--depth",
        &["0", "256", "65536"],
    );
    add(&["man"], "--dir", &[&file, &under_file]);
    add(&[], "--sysroot", &["/nonexistent-dir", &file]);
    for cmd in ["info", "dma-test", "ring-test", "bind", "unbind"] {
        for bad in [
            "garbage",
            "",
            "0000:00:20.0",
            "0000:00:1f.8",
            "00000000000:00:04.0",
            "0000:100:04.0",
        ] {
            cases.push(vec![cmd.into(), bad.into()]);
        }
    }
    cases.push(vec!["completions".into(), "tcsh".into()]);
    cases.push(vec![
        "torture".into(),
        "--explicit".into(),
        "--no-protect".into(),
    ]);
    cases.push(vec!["nonsense".into()]);
    cases.push(
        ["bench", "--json", "-", "--csv", "-"]
            .map(String::from)
            .to_vec(),
    );
    for c in &cases {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        let (code, out, err) = userptr_in(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: exit {code:?}\n{out}\n{err}");
        assert!(out.is_empty(), "{args:?} did work before refusing:\n{out}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(
            err.matches("error:").count(),
            1,
            "{args:?}: not one message:\n{err}"
        );
    }
    // Checked after parsing, still before any work: one message, exit 1, nothing run.
    for args in [
        vec!["demo", "--elements", "1024", "--saxpy", "8"],
        vec!["demo", "--elements", "2048", "--saxpy", "9"],
    ] {
        let (code, out, err) = userptr_in(&args, &[]);
        assert_eq!(code, Some(1), "{args:?}: {out}\n{err}");
        assert_eq!(err.matches("error:").count(), 1, "{args:?}: {err}");
        assert!(
            !out.contains("device:") && !out.contains("error"),
            "{args:?}: {out}"
        );
    }
}

#[test]
fn torture_explicit_reports_only_real_violations() {
    let (code, out, err) = userptr_in(
        &["torture", "--explicit", "--seconds", "3", "--json", "-"],
        &[],
    );
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["settings"]["monitor"], "explicit", "{v}");
    // The malloc lane ran, and every kind of change was told.
    assert!(v["malloc_reuse"].as_u64().unwrap() > 50, "{v}");
    assert!(v["commands"].as_u64().unwrap() > 100, "{v}");
    for cause in ["unmap", "discard", "protect", "fork"] {
        assert!(
            v["invalidations"][cause].as_u64().unwrap() > 0,
            "{cause}: {v}"
        );
    }
    assert!(v.get("error").is_none(), "{v}");
    assert!(err.contains("torture: ok"), "{err}");
}

#[test]
fn torture_writes_a_versioned_document_and_says_ok_only_when_it_checked_something() {
    let (code, out, err) = userptr_in(
        &[
            "torture",
            "--seconds",
            "1",
            "--only",
            "mprotect",
            "--json",
            "-",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema"], "userptr.torture");
    assert_eq!(v["schema_version"], 2);
    assert_eq!(v["settings"]["only"], "mprotect");
    assert_eq!(v["arguments"][0], "torture");
    assert!(v["mutations"]["mprotect"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["mutations"]["fork"], 0, "{v}");
    // With the monitor off the document carries the error too.
    let (code, out, _err) = userptr_in(
        &["torture", "--seconds", "1", "--no-protect", "--json", "-"],
        &[],
    );
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("coherence violations"),
        "{v}"
    );
}

fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 14
}

#[test]
fn bench_json_to_stdout_is_a_versioned_document_with_the_csv_beside_it() {
    let tmp = Scratch::new("csv");
    let csv = tmp.s("r.csv");
    let args = [
        "bench",
        "--suite",
        "ring,invalidate",
        "--quick",
        "--samples",
        "3",
        "--json",
        "-",
        "--csv",
        &csv,
    ];
    let (code, out, err) = userptr_in(&args, &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    // stdout is the document alone; the table went to stderr.
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        err.contains("nop_batched") && err.contains("idle_2MiB_discard"),
        "{err}"
    );
    assert_eq!(v["schema"], "userptr.bench");
    assert_eq!(v["schema_version"], 2);
    assert_eq!(v["tool"]["name"], "userptr");
    assert_eq!(v["tool"]["version"], env!("CARGO_PKG_VERSION"));
    let commit = v["tool"]["commit"].as_str().unwrap();
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    assert!(
        is_rfc3339(v["timestamp"].as_str().unwrap()),
        "{}",
        v["timestamp"]
    );
    let argv: Vec<&str> = v["arguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(argv, args);
    assert_eq!(v["settings"]["samples"], 3);
    for k in [
        "kernel",
        "cpus",
        "cpu_model",
        "hostname",
        "memory_bytes",
        "cap_ipc_lock",
    ] {
        assert!(!v["machine"][k].is_null(), "machine.{k}: {v}");
    }
    assert!(v["skipped"].is_array(), "{v}");
    let results = v["results"].as_array().unwrap();
    for r in results {
        let unit = r["unit"].as_str().unwrap();
        assert!(
            ["ns", "us", "GB/s", "Mops/s", "IO/s"].contains(&unit),
            "{r}"
        );
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert_eq!(f("p50"), f("median"), "{r}");
        assert!(
            f("p10") <= f("p50")
                && f("p50") <= f("p90")
                && f("p90") <= f("p99")
                && f("p99") <= f("max"),
            "{r}"
        );
        if !r["baseline"].is_null() {
            for k in ["median", "p10", "p90", "p99", "max"] {
                assert!(r["baseline"][k].as_f64().is_some(), "{k} in {r}");
            }
        }
    }
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("suite,name,unit,median,p10,p50,p90,p99,max,samples,baseline,baseline_median,ratio,added_us")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), results.len(), "{text}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("invalidate,idle_2MiB_discard,us,")
                && r.contains(",raw_madvise_unpin_2MiB,")),
        "{text}"
    );
}

#[test]
fn a_failed_run_is_reported_in_its_json_document() {
    if std::path::Path::new("/dev/vfio/vfio").exists() {
        return;
    }
    let (code, out, err) = userptr_in(&["bench", "--device", "0000:00:04.0", "--json", "-"], &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["schema"], "userptr.bench");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VFIO is not usable"),
        "{v}"
    );
    assert!(err.contains("VFIO is not usable"), "{err}");
}

#[test]
fn progress_is_drawn_on_a_terminal_without_tearing_the_rows_and_not_otherwise() {
    // Not a terminal: no bar, no escape sequences, rows intact.
    let (code, out, err) = userptr_in(
        &["bench", "--suite", "ring", "--quick", "--samples", "3"],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}') && !out.contains('\u{1b}'),
        "{err}"
    );
    assert!(!err.contains("eta"), "{err}");
    // A terminal (script(1) gives the tool a pty): a bar with an ETA, and each row on a
    // line of its own, not appended to a bar.
    let Ok(o) = Command::new("script")
        .args([
            "-qec",
            &format!(
                "{} bench --suite ring --quick --samples 3",
                env!("CARGO_BIN_EXE_userptr")
            ),
            "/dev/null",
        ])
        .env("TERM", "xterm")
        .env_remove("RUST_LOG")
        .output()
    else {
        eprintln!("skipped the terminal half: no script(1)");
        return;
    };
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{tty}");
    assert!(
        tty.contains("eta") && tty.contains('\r'),
        "no bar drawn:\n{tty:?}"
    );
    let mut rows = 0;
    for seg in tty.split(['\r', '\n']) {
        let seg = seg.replace("\u{1b}[2K", "");
        if let Some(at) = seg.find("nop_batch") {
            rows += 1;
            assert!(seg.starts_with("ring "), "a row torn by the bar: {seg:?}");
            assert!(seg[at..].contains("Mops/s [p10"), "{seg:?}");
        }
    }
    assert!(rows >= 2, "{tty:?}");
}

#[test]
fn status_says_what_is_ready_and_what_to_do() {
    let (code, out, err) = userptr_in(&["status"], &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for name in [
        "io_uring",
        "locked memory",
        "seccomp",
        "userfaultfd",
        "IOMMU",
        "vfio-pci",
        "/dev/kvm",
    ] {
        assert!(
            out.lines().any(|l| l
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
                .starts_with(name)),
            "no {name} line:\n{out}"
        );
    }
    // Every line that is not ok says what to do on the line after it.
    let lines: Vec<&str> = out.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("warn") || l.starts_with("FAIL") {
            assert!(
                lines
                    .get(i + 1)
                    .is_some_and(|n| n.trim_start().starts_with("->")),
                "no fix for {l}"
            );
        }
    }
    let groups = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|d| d.count())
        .unwrap_or(0);
    if groups == 0 {
        assert!(
            out.contains("no IOMMU groups") && out.contains("intel_iommu=on"),
            "{out}"
        );
    }
    let (code, out, _) = userptr_in(&["status", "--json"], &[]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema"], "userptr.status");
    assert_eq!(v["ready"], true);
    let checks = v["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .all(|c| c["state"].is_string() && c["detail"].is_string()),
        "{v}"
    );
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "seccomp" && c["state"] == "ok"),
        "{v}"
    );
}

#[test]
fn status_reads_the_host_tree_it_is_given() {
    let t = Scratch::new("status");
    for d in [
        "sys/kernel/iommu_groups/3",
        "sys/kernel/iommu_groups/7",
        "sys/bus/pci/devices",
        "sys/bus/pci/drivers/vfio-pci",
        "dev/vfio",
        "proc/sys/kernel",
        "proc/sys/vm",
    ] {
        std::fs::create_dir_all(t.path(d)).unwrap();
    }
    std::fs::write(t.path("dev/vfio/vfio"), "").unwrap();
    std::fs::write(t.path("proc/sys/kernel/io_uring_disabled"), "0\n").unwrap();
    std::fs::write(t.path("proc/sys/vm/unprivileged_userfaultfd"), "1\n").unwrap();
    let (code, out, err) = userptr_in(&["--sysroot", &t.s(""), "status"], &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("2 IOMMU groups"), "{out}");
    assert!(out.contains("loaded, /dev/vfio/vfio present"), "{out}");
    assert!(out.contains("vm.unprivileged_userfaultfd = 1"), "{out}");
    assert!(out.contains("/dev/kvm") && out.contains("absent"), "{out}");
}

/// A fake `/` with four PCI functions: an NVMe disk whose partition is mounted, a NIC
/// whose interface is up, the boot VGA device, and an idle NVMe disk.
fn fake_host(t: &Scratch) {
    use std::os::unix::fs::symlink;
    let mk = |rel: &str| std::fs::create_dir_all(t.path(rel)).unwrap();
    let w = |rel: &str, s: &str| std::fs::write(t.path(rel), s).unwrap();
    for d in [
        "sys/bus/pci/drivers/vfio-pci",
        "sys/class/block",
        "sys/class/net",
        "proc/self",
    ] {
        mk(d);
    }
    w("sys/bus/pci/drivers_probe", "");
    let dev = |bdf: &str, class: &str, driver: &str, group: u32| {
        let d = format!("sys/bus/pci/devices/{bdf}");
        mk(&d);
        w(&format!("{d}/vendor"), "0x144d\n");
        w(&format!("{d}/device"), "0xa808\n");
        w(&format!("{d}/class"), &format!("{class}\n"));
        w(&format!("{d}/driver_override"), "(null)\n");
        mk(&format!("sys/bus/pci/drivers/{driver}"));
        w(&format!("sys/bus/pci/drivers/{driver}/unbind"), "");
        symlink(
            format!("../../drivers/{driver}"),
            t.path(&format!("{d}/driver")),
        )
        .unwrap();
        mk(&format!("sys/kernel/iommu_groups/{group}/devices"));
        symlink(
            format!("../../../kernel/iommu_groups/{group}"),
            t.path(&format!("{d}/iommu_group")),
        )
        .unwrap();
        d
    };
    let disk = |bdf: &str, n: u32| {
        let d = dev(bdf, "0x010802", "nvme", 10 + n);
        let ns = format!("{d}/nvme/nvme{n}/nvme{n}n1");
        mk(&format!("{ns}/nvme{n}n1p1"));
        w(&format!("{ns}/dev"), &format!("259:{}\n", 10 * n));
        w(
            &format!("{ns}/nvme{n}n1p1/dev"),
            &format!("259:{}\n", 10 * n + 1),
        );
        w(&format!("{ns}/nvme{n}n1p1/partition"), "1\n");
        symlink(t.path(&ns), t.path(&format!("sys/class/block/nvme{n}n1"))).unwrap();
        symlink(
            t.path(&format!("{ns}/nvme{n}n1p1")),
            t.path(&format!("sys/class/block/nvme{n}n1p1")),
        )
        .unwrap();
    };
    disk("0000:01:00.0", 0);
    disk("0000:04:00.0", 1);
    w("proc/self/mountinfo", "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n23 22 0:21 / /proc rw - proc proc rw\n");
    w("proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n");
    let nic = dev("0000:02:00.0", "0x020000", "ixgbe", 20);
    mk(&format!("{nic}/net/eth0"));
    w(&format!("{nic}/net/eth0/flags"), "0x1003\n");
    w(&format!("{nic}/net/eth0/operstate"), "up\n");
    symlink(
        t.path(&format!("{nic}/net/eth0")),
        t.path("sys/class/net/eth0"),
    )
    .unwrap();
    let vga = dev("0000:03:00.0", "0x030000", "i915", 30);
    w(&format!("{vga}/boot_vga"), "1\n");
}

#[test]
fn bind_refuses_a_device_the_system_is_using_unless_forced() {
    let t = Scratch::new("bind");
    fake_host(&t);
    let root = t.s("");
    let over = |bdf: &str| {
        std::fs::read_to_string(t.path(&format!("sys/bus/pci/devices/{bdf}/driver_override")))
            .unwrap()
    };
    for (bdf, why) in [
        ("0000:01:00.0", "/dev/nvme0n1p1 is mounted on /"),
        ("0000:02:00.0", "network interface eth0 is up"),
        ("0000:03:00.0", "boot VGA device"),
    ] {
        let (code, out, err) = userptr_in(&["--sysroot", &root, "bind", bdf], &[]);
        assert_eq!(code, Some(1), "{bdf}: {out}\n{err}");
        assert!(
            err.contains(&format!("refusing to bind {bdf}"))
                && err.contains(why)
                && err.contains("--force"),
            "{bdf}: {err}"
        );
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert_eq!(over(bdf), "(null)\n", "{bdf}: written although refused");
    }
    // The idle disk and a forced bind go on to the bind itself (which this fake tree,
    // with no kernel behind it, cannot complete: vfio-pci never takes the device).
    for args in [
        vec!["bind", "0000:04:00.0"],
        vec!["bind", "0000:01:00.0", "--force"],
    ] {
        let mut a = vec!["--sysroot", root.as_str()];
        a.extend(&args);
        let (code, _out, err) = userptr_in(&a, &[]);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(!err.contains("refusing"), "{args:?}: {err}");
        assert!(err.contains("vfio-pci"), "{args:?}: {err}");
    }
    assert_eq!(
        over("0000:01:00.0"),
        "\n",
        "the forced bind wrote and rolled back driver_override"
    );
}

#[test]
fn completions_and_man_pages_come_from_the_definitions() {
    let (code, out, _) = userptr_in(&["completions", "bash"], &[]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("_userptr") && out.contains("torture") && out.contains("--seconds"),
        "{out}"
    );
    let (code, out, _) = userptr_in(&["completions", "zsh"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("#compdef userptr"), "{out}");
    let (code, out, _) = userptr_in(&["man"], &[]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with(".ie") || out.contains(".TH userptr"),
        "{out}"
    );
    assert!(out.contains("torture") && out.contains("status"), "{out}");
    let t = Scratch::new("man");
    let (code, _, err) = userptr_in(&["man", "--dir", &t.s("pages")], &[]);
    assert_eq!(code, Some(0), "{err}");
    for page in [
        "userptr.1",
        "userptr-bench.1",
        "userptr-status.1",
        "userptr-bind.1",
    ] {
        let p = std::fs::read_to_string(t.path(&format!("pages/{page}")))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(p.contains(".TH"), "{page}");
    }
    let (_, out, _) = userptr_in(&["--version"], &[]);
    assert!(
        out.starts_with(&format!("userptr {} (", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

#[test]
fn logging_follows_v_and_rust_log() {
    let (_, _, err) = userptr_in(&["completions", "bash"], &[]);
    assert!(err.is_empty(), "{err}");
    let (_, _, err) = userptr_in(&["-vv", "completions", "bash"], &[]);
    assert!(
        err.contains("DEBUG") && err.contains("userptr starting"),
        "{err}"
    );
    let (_, _, err) = userptr_in(&["completions", "bash"], &[("RUST_LOG", "userptr=debug")]);
    assert!(err.contains("userptr starting"), "{err}");
    let (code, out, err) = userptr_in(&["completions", "bash"], &[("RUST_LOG", "userptr=loud")]);
    assert_eq!(code, Some(2));
    assert!(
        out.is_empty() && err.contains("RUST_LOG") && err.matches("error:").count() == 1,
        "{err}"
    );
}

/// Run the tool as `nobody` with `ulimit -l 8192` (the default budget), from a copy
/// of the binary nobody can execute. None when not root (the test is skipped).
fn as_nobody(args: &[&str]) -> Option<(Option<i32>, String, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to become nobody");
        return None;
    }
    let t = Scratch::new("nobody");
    let bin = t.path("userptr");
    std::fs::copy(env!("CARGO_BIN_EXE_userptr"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = "ulimit -S -l 8192 && ulimit -H -l 8192 && exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all -- \"$@\"";
    let out = Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(&bin)
        .args(args)
        .current_dir("/")
        .env_remove("RUST_LOG")
        .output()
        .expect("sh");
    Some((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn an_unprivileged_user_runs_demo_and_bench_within_8_mib_of_locked_memory() {
    let Some((code, out, err)) = as_nobody(&["status", "--json"]) else {
        return;
    };
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["machine"]["cap_ipc_lock"], false, "not unprivileged: {v}");
    assert_eq!(v["machine"]["memlock_limit_bytes"], 8 << 20, "{v}");
    // demo sizes itself to the budget and says so.
    let (code, out, err) = as_nobody(&["demo"]).unwrap();
    assert_eq!(code, Some(0), "demo as nobody:\n{out}\n{err}");
    assert!(
        out.starts_with("demo: sized to the locked-memory budget"),
        "{out}"
    );
    assert!(
        out.lines().last().unwrap().starts_with("demo: verified "),
        "{out}"
    );
    // Asked for more than fits: one clear message before any work.
    let (code, out, err) = as_nobody(&["demo", "--elements", "4194304"]).unwrap();
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("RLIMIT_MEMLOCK")
            && err.contains("hint:")
            && err.matches("error").count() == 1,
        "{err}"
    );
    // bench runs what fits and lists what it skipped, with why.
    let (code, out, err) = as_nobody(&[
        "bench",
        "--suite",
        "pin,e2e",
        "--quick",
        "--samples",
        "3",
        "--json",
        "-",
    ])
    .unwrap();
    assert_eq!(code, Some(0), "bench as nobody:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"map_unmap_4KiB") && names.contains(&"map_unmap_2MiB"),
        "{v}"
    );
    let skipped = v["skipped"].as_array().unwrap();
    for name in ["map_unmap_64MiB", "copy_64MiB", "saxpy_16M"] {
        let s = skipped
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} not skipped: {v}"));
        assert!(
            s["reason"].as_str().unwrap().contains("RLIMIT_MEMLOCK"),
            "{s}"
        );
        assert!(
            err.contains(&format!("skipping {}/{name}", s["suite"].as_str().unwrap())),
            "{err}"
        );
    }
}

#[test]
fn bench_draws_a_chart_per_suite_with_the_date_and_machine() {
    let t = Scratch::new("charts");
    let (code, out, err) = userptr_in(
        &[
            "bench",
            "--suite",
            "ring,invalidate",
            "--quick",
            "--samples",
            "3",
            "--plot",
            &t.s("charts/new"),
            "--json",
            "-",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let date = &v["timestamp"].as_str().unwrap()[..10];
    for f in ["ring.svg", "invalidate.svg"] {
        let svg = std::fs::read_to_string(t.path(&format!("charts/new/{f}")))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            svg.contains(date) && svg.contains("CPUs") && svg.contains("p10–p90"),
            "{f}"
        );
    }
    let inv = std::fs::read_to_string(t.path("charts/new/invalidate.svg")).unwrap();
    // The ratio beside each figure with a baseline, times in human units.
    assert!(
        inv.contains("idle_2MiB_discard")
            && inv.contains("vs raw_madvise_unpin_2MiB")
            && inv.contains("×"),
        "{inv}"
    );
    assert!(inv.contains(" µs"), "no human time unit");
}
