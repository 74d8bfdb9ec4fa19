//! `include/userptr.h` is what cbindgen makes of this crate, byte for byte: the
//! header C programs compile against cannot drift from the library they link.
//! `USERPTR_BLESS=1` writes the generated header instead of comparing. cbindgen reads
//! the crate's own sources only (from `src/lib.rs`, following its modules).

use std::path::Path;

#[test]
fn the_checked_in_header_is_the_generated_one() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let bindings = cbindgen::Builder::new()
        .with_src(crate_dir.join("src/lib.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("../include/userptr.h");
    if std::env::var_os("USERPTR_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "include/userptr.h differs from what cbindgen generates from capi/src, first at \
             line {}:\n  checked in: {:?}\n  generated:  {:?}\nregenerate it with \
             `USERPTR_BLESS=1 cargo test -p userptr-capi --test header` and commit it",
            line + 1,
            checked_in.lines().nth(line).unwrap_or("<end of file>"),
            generated.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
}

/// Every code's name, as `userptr_code_name` returns it, is the enumerator the header
/// declares with that number.
#[test]
fn code_names_match_the_header() {
    let header = include_str!("../../include/userptr.h");
    for c in userptr_capi::code::UserptrCode::ALL {
        let name = c.name().to_str().unwrap();
        let decl = format!("{name} = {},", c as i32);
        assert!(header.contains(&decl), "the header has no `{decl}`");
    }
}
