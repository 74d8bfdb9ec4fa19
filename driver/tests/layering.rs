//! The layering of `driver/src`, checked: arrows run from higher layers to lower ones
//! only (the layout is written down in the crate doc, `src/lib.rs`).
//!
//! ```text
//!   bo                           (3)
//!   monitor  gpuvm               (2)
//!   registry  reference  vfio    (1: the wings, each on the core alone)
//!   the core: the files at the root of src/  (0)
//! ```
//!
//! Every `crate::<module>` path in a file, in code or in a doc link, names the module
//! it reaches; a path through a root re-export (`crate::Registry`) is resolved to the
//! module that defines the item, from the `pub use` lines of `lib.rs`. A file may reach
//! its own wing, the core, and the wings of a lower layer; never a wing beside or
//! above its own. `Driver::reference` (defined by the reference wing on the core's
//! type) counts as reaching the reference wing. The file size rule of the layout is
//! checked too: no file over 600 lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CORE: &[&str] = &[
    "backing",
    "device",
    "dma_memory",
    "driver",
    "driver_section",
    "error",
    "fork",
    "iommu",
    "iova",
    "mapping",
    "proc_status",
    "queue",
    "submitter",
    "trampoline",
];

/// The wings and their layer; the core is layer 0.
const WINGS: &[(&str, u32)] = &[
    ("registry", 1),
    ("reference", 1),
    ("vfio", 1),
    ("monitor", 2),
    ("gpuvm", 2),
    ("bo", 3),
];

fn layer(module: &str) -> Option<u32> {
    if CORE.contains(&module) {
        return Some(0);
    }
    WINGS.iter().find(|(w, _)| *w == module).map(|(_, l)| *l)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`registry/pin.rs` → `registry`).
fn home(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Root re-exports: item name → the top-level module that defines it.
fn reexports(lib: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let flat = lib.replace('\n', " ");
    for stmt in flat.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = rest.split("::").next().unwrap().trim().to_string();
        let names = match rest.find('{') {
            Some(i) => rest[i + 1..].trim_end_matches('}').to_string(),
            None => rest.rsplit("::").next().unwrap().to_string(),
        };
        for n in names.split(',') {
            let n = n.trim();
            if !n.is_empty() {
                map.insert(n.to_string(), module.clone());
            }
        }
    }
    map
}

/// Every module a file reaches through a `crate::` path.
fn reached(text: &str, reexports: &HashMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        // `userptr_crate::...` or `super::crate` do not occur; skip identifiers that
        // merely end in "crate".
        if i > 0 {
            let prev = text.as_bytes()[i - 1];
            if prev.is_ascii_alphanumeric() || prev == b'_' {
                continue;
            }
        }
        let seg: String = text[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if seg.is_empty() {
            continue;
        }
        if seg.chars().next().unwrap().is_ascii_uppercase() {
            if let Some(m) = reexports.get(&seg) {
                out.push(m.clone());
            }
        } else {
            out.push(seg);
        }
    }
    if text.contains("Driver::reference(") || text.contains("Driver::with_reference(") {
        out.push("reference".to_string());
    }
    out
}

#[test]
fn arrows_run_down_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = reexports(&lib);
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let home = home(&src, f);
        if home == "lib" {
            continue; // the crate root re-exports from every layer
        }
        let mine = layer(&home)
            .unwrap_or_else(|| panic!("{}: module `{home}` is in no layer", f.display()));
        let text = std::fs::read_to_string(f).unwrap();
        for m in reached(&text, &reexports) {
            if m == home {
                continue;
            }
            let Some(theirs) = layer(&m) else {
                bad.push(format!(
                    "{}: reaches `crate::{m}`, in no layer",
                    f.display()
                ));
                continue;
            };
            // The core may use the core; a wing the core and lower wings.
            let ok = theirs == 0 || theirs < mine;
            if !ok {
                bad.push(format!(
                    "{}: `{home}` (layer {mine}) reaches `{m}` (layer {theirs})",
                    f.display()
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that run up or across:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_arrow() {
    // Positive control: the same resolution flags what it must.
    let reexports = reexports("pub use registry::{Cause, Registry};\npub use driver::Driver;");
    assert_eq!(
        reached("use crate::registry::Cause;", &reexports),
        ["registry"]
    );
    assert_eq!(
        reached("[`x`](crate::Registry::submit)", &reexports),
        ["registry"]
    );
    assert_eq!(
        reached("let d = Driver::reference()?;", &reexports),
        ["reference"]
    );
    assert!(reached("userptr_crate::x", &reexports).is_empty());
}

#[test]
fn no_file_is_over_600_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 620).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files to split by concept:\n{}",
        long.join("\n")
    );
}
