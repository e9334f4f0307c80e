//! What a fresh machine needs to build tandem: the Rust toolchain and build-essential,
//! nothing else. bindgen (and with it clang-sys) needs libclang, which such a machine does
//! not have, so neither may be among the build's dependencies (the ublk bindings are
//! committed: vendor/libublk-rs-sys).

use std::process::Command;

#[test]
fn the_daemon_and_tools_build_without_bindgen_or_libclang() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--locked", "-e", "normal,build"])
        .args([
            "-p",
            "tandem",
            "-p",
            "tandem-tools",
            "-p",
            "tandem-dlm",
            "-p",
            "tandem-fence",
        ])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("libublk-rs-sys ")),
        "the dependency tree no longer has the ublk bindings; is this test still looking at the right tree?\n{tree}"
    );
    let offenders: Vec<&str> = tree
        .lines()
        .filter(|l| l.starts_with("bindgen ") || l.starts_with("clang-sys "))
        .collect();
    assert!(
        offenders.is_empty(),
        "the build needs libclang again through {offenders:?}; commit generated bindings instead"
    );
}
