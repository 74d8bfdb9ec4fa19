//! Records the commit the tool is built from, for `--version` and the JSON documents'
//! `tool.commit`: `USERPTR_BUILD_COMMIT` when a packager sets it, else `git rev-parse
//! HEAD` in this checkout, else "unknown" (a tarball without git).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=USERPTR_BUILD_COMMIT");
    let commit = match std::env::var("USERPTR_BUILD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => match git(&["rev-parse", "HEAD"]) {
            Some(c) => {
                // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it
                // names (a commit) and packed-refs (a gc).
                let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
                if let Some(r) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
                    watch.push(git(&["rev-parse", "--git-path", &r]));
                }
                watch.push(git(&["rev-parse", "--git-path", "packed-refs"]));
                for p in watch.into_iter().flatten() {
                    if Path::new(&p).exists() {
                        println!("cargo:rerun-if-changed={p}");
                    }
                }
                c
            }
            None => "unknown".to_string(),
        },
    };
    println!("cargo:rustc-env=USERPTR_COMMIT={commit}");
}
