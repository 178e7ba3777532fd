//! Builds the bundled Guests for x86_64-unknown-none (the reference Guest,
//! and the one that drives virtio-mmio devices with the virtio-drivers crate)
//! and bundles them into the `lguest` binary, so that a bare `lguest` (or
//! `cargo run`) has a kernel to boot. The Guest is a workspace of its own, built with a target dir of its
//! own under OUT_DIR so it never waits on the outer build's lock.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let guest = root.join("guest");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for path in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/linker.ld",
        "guest/build.rs",
        "guest/.cargo",
        "abi/src",
        "abi/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(out.join("guest-target"));
    // The outer build's settings (clippy's wrapper, host rustflags, jobserver)
    // are not the Guest's.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PKG_NAME",
        "CARGO_CRATE_NAME",
        "__CARGO_FIX_PLZ",
        "CLIPPY_ARGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("run cargo to build the reference Guest");
    assert!(
        status.success(),
        "building the reference Guest (guest/) failed"
    );
    // Both kernels: the reference Guest and the one built on virtio-drivers.
    for name in ["lguest-guest", "lguest-guest-drivers"] {
        let elf = out
            .join("guest-target/x86_64-unknown-none/release")
            .join(name);
        std::fs::copy(&elf, out.join(name)).expect("copy a bundled Guest");
    }
}
