//! The committed C header must be exactly what the pinned cbindgen generates from the sources, and its version
//! macros must match Cargo.toml. `LOWVRAM_BLESS=1 cargo test --test header` rewrites a stale header.

use std::path::Path;

fn generated() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(root).join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn committed_header_matches_the_sources() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/lowvram.h");
    let fresh = generated();
    if std::env::var_os("LOWVRAM_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed.lines().zip(fresh.lines()).position(|(a, b)| a != b).unwrap_or(0) + 1;
        panic!(
            "include/lowvram.h is stale (first difference at line {line}); regenerate it with \
             `LOWVRAM_BLESS=1 cargo test --test header` and commit it"
        );
    }
}

#[test]
fn header_version_macros_match_cargo_toml() {
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/lowvram.h")).unwrap();
    for (name, value) in [
        ("LOWVRAM_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("LOWVRAM_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("LOWVRAM_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        let line = header.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_else(|| {
            panic!("{name} missing from the header")
        });
        let got = line.split_whitespace().nth(2).unwrap();
        assert_eq!(got, value, "{name} in the header is {got}, Cargo.toml says {value}");
    }
    let runtime = unsafe { std::ffi::CStr::from_ptr(lowvram::ffi::system::lowvram_version()) };
    assert_eq!(runtime.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
