//! `lguest --bench` is a program of its own, `lguest-bench`, which the
//! Launcher execs: the harness stays out of the Launcher's pages (P5 counts
//! them). These tests need no KVM: they check how the two find each other,
//! what each says when the other is missing, and that the harness's code
//! really is in one binary and not the other.

#[macro_use]
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of its own under cargo's scratch space, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test_name: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("bench-{}-{test_name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// The binary `from`, alone in this directory: a hard link (or a
    /// copy), not a symlink, for each program looks for the other where it
    /// really is.
    fn holding(&self, from: &str) -> PathBuf {
        let to = self.0.join(Path::new(from).file_name().unwrap());
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).unwrap();
        }
        to
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn bench_runs_lguest_bench_with_the_same_environment() {
    // The KVM device is checked by the harness first thing: its error,
    // naming the device from the environment, proves that lguest became
    // lguest-bench and handed LGUEST_KVM_DEVICE on.
    let out = run(lguest()
        .arg("--bench")
        .env("LGUEST_KVM_DEVICE", "/nonexistent/kvm-for-bench"));
    out.assert_no_panic().assert_code(2);
    assert_eq!(
        out.single_stderr_line("lguest: "),
        "lguest: cannot open /nonexistent/kvm-for-bench: No such file or directory (os error 2)"
    );
    assert!(out.stdout.is_empty(), "{}", out.describe());
}

#[test]
fn bench_without_lguest_bench_next_to_it_says_so() {
    let dir = Scratch::new("no-bench");
    let alone = dir.holding(env!("CARGO_BIN_EXE_lguest"));
    let out = run(Command::new(&alone).arg("--bench"));
    out.assert_no_panic().assert_code(2);
    assert_eq!(
        out.single_stderr_line("lguest: "),
        format!(
            "lguest: --bench runs lguest-bench, which is not next to lguest: {} is missing \
             (cargo build --release builds both)",
            dir.0.join("lguest-bench").display()
        )
    );
}

#[test]
fn lguest_bench_without_lguest_next_to_it_says_so() {
    let dir = Scratch::new("no-launcher");
    let alone = dir.holding(env!("CARGO_BIN_EXE_lguest-bench"));
    let out = run(&mut Command::new(&alone));
    out.assert_no_panic().assert_code(2);
    assert_eq!(
        out.single_stderr_line("lguest: "),
        format!(
            "lguest: the benchmarks run the lguest next to lguest-bench, and {} is missing",
            dir.0.join("lguest").display()
        )
    );
}

#[test]
fn lguest_bench_takes_no_arguments() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_lguest-bench")).arg("--help"));
    out.assert_no_panic().assert_code(2);
    assert_eq!(
        out.single_stderr_line("lguest: "),
        "lguest: lguest-bench takes no arguments: it is what `lguest --bench` runs"
    );
}

#[test]
fn the_harness_is_in_lguest_bench_only() {
    // The names of the lines the harness prints (bench.rs, and P7's in
    // dma/bench.rs) are in its binary; none is left in the Launcher's.
    let names = ["P1-hcall-out", "P5-rss", "floor_name=socketpair"];
    let has = |binary: &str, name: &str| {
        let bytes = std::fs::read(binary).unwrap();
        // SAFETY: both pointers and lengths describe live slices; memmem
        // only reads them.
        let found = unsafe {
            libc::memmem(
                bytes.as_ptr().cast(),
                bytes.len(),
                name.as_ptr().cast(),
                name.len(),
            )
        };
        !found.is_null()
    };
    for name in names {
        assert!(has(env!("CARGO_BIN_EXE_lguest-bench"), name), "{name}");
        assert!(
            !has(env!("CARGO_BIN_EXE_lguest"), name),
            "{name} is in the lguest binary: the benchmark harness is back in the Launcher"
        );
    }
}
