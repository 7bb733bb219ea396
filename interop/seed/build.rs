//! Copies the Rust seed into OUT_DIR at build time, so this repository never
//! holds a copy of it. The seed is read from `<repo>/../shared/reference/
//! disk_persister.rs` (the shared folder beside the clone), or from the file
//! named by `MARSHAL_SEED_RS`. One change is applied, the one that Debian's
//! notify-debouncer-mini 0.2.1 needs: `new_debouncer(timeout, handler)`
//! becomes `new_debouncer(timeout, None, handler)`. Anything else that
//! differs from the expected seed fails the build rather than being patched.

use std::env;
use std::fs;
use std::path::PathBuf;

const ENV: &str = "MARSHAL_SEED_RS";
const CALL: &str = "new_debouncer(\n            Duration::from_millis(150),\n";
const PATCHED: &str = "new_debouncer(\n            Duration::from_millis(150),\n            None,\n";

fn main() {
    println!("cargo:rerun-if-env-changed={ENV}");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let seed = match env::var_os(ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        // interop/seed -> interop -> the repo root -> beside it, shared/
        _ => manifest.join("../../../shared/reference/disk_persister.rs"),
    };
    println!("cargo:rerun-if-changed={}", seed.display());

    let source = fs::read_to_string(&seed).unwrap_or_else(|e| {
        panic!(
            "cannot read the Rust seed {}: {e}\n(expected shared/ beside the repository; \
             set {ENV} to the seed's path otherwise)",
            seed.display()
        )
    });
    let found = source.matches(CALL).count();
    if found != 1 {
        panic!(
            "expected the seed {} to call new_debouncer(Duration::from_millis(150), handler) \
             exactly once, found {found}: has the seed changed?",
            seed.display()
        );
    }
    let patched = source.replacen(CALL, PATCHED, 1);

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let seed_out = out.join("disk_persister.rs");
    fs::write(&seed_out, patched).expect("write the patched seed to OUT_DIR");
    // A module declaration for src/main.rs to include!: the seed has inner
    // doc comments (`//!`), which a module file accepts and include! does not.
    let module = format!(
        "#[allow(dead_code)]\n#[path = {:?}]\npub mod disk_persister;\n",
        seed_out.to_str().expect("OUT_DIR is valid UTF-8")
    );
    fs::write(out.join("seed_module.rs"), module).expect("write seed_module.rs");
}
