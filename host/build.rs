//! Builds the bundled Guests for x86_64-unknown-none (the reference Guest,
//! the same with its self-tests, `bad=` cases and benchmarks, and the one
//! that drives virtio-mmio devices with the virtio-drivers crate) and
//! bundles them into the `lguest` binary, so that a bare `lguest` (or
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

    ensure_guest_target(&guest);

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
    // The three kernels: the reference Guest, with and without its tests,
    // and the one built on virtio-drivers.
    for name in ["lguest-guest", "lguest-guest-tests", "lguest-guest-drivers"] {
        let elf = out
            .join("guest-target/x86_64-unknown-none/release")
            .join(name);
        std::fs::copy(&elf, out.join(name)).expect("copy a bundled Guest");
    }
}

/// The Guest's target, `x86_64-unknown-none`, is in rust-toolchain.toml, but
/// rustup installs a toolchain's listed targets only when it installs the
/// toolchain itself: one installed earlier without it would fail below with
/// "can't find crate for `core`". Add it if rustup is there and it's missing;
/// without rustup, say in one line what to do.
fn ensure_guest_target(guest: &std::path::Path) {
    const TARGET: &str = "x86_64-unknown-none";
    let installed = Command::new("rustup")
        .current_dir(guest)
        .args(["target", "list", "--installed"])
        .output();
    let Ok(out) = installed else {
        println!(
            "cargo:warning=rustup not found: if the build fails, install the {TARGET} target for your toolchain (rustup target add {TARGET})"
        );
        return;
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return;
    }
    let added = Command::new("rustup")
        .current_dir(guest)
        .args(["target", "add", TARGET])
        .status();
    if !matches!(added, Ok(s) if s.success()) {
        panic!("the Guest needs the {TARGET} target and rustup could not add it: run `rustup target add {TARGET}` in {}", guest.display());
    }
}
