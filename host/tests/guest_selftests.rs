//! The bundled reference Guest, booted for real under KVM.
//!
//! With no KERNEL the Launcher boots the Guest built into it. Its command line
//! (set with `--append`) picks what it does: nothing prints a greeting and
//! powers off; `test=NAME,...` runs self-tests, each of which exercises one
//! mechanism of the ABI, so a failing test here names the broken mechanism.
//! The self-tests live in a second build of the Guest, which the Launcher
//! boots when the command line asks for a test, a `bad=` case or a
//! benchmark.

#[macro_use]
mod common;

use common::*;

/// Boots the bundled Guest with `--append CMDLINE`.
fn boot(cmdline: &str) -> Outcome {
    let out = run(lguest().args(["--append", cmdline]));
    out.assert_no_panic();
    out
}

/// Panics unless the Guest powered off (exit 0, one `powered off` line).
fn assert_powered_off(out: &Outcome) {
    out.assert_code(0);
    out.single_stderr_line("lguest: guest powered off: ");
}

/// Runs the named self-tests and checks that each passed and the Guest
/// powered off.
fn self_test(names: &[&str]) {
    let out = boot(&format!("test={}", names.join(",")));
    for name in names {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    out.assert_stdout_line(&format!("lguest-guest: all {} tests passed", names.len()));
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    assert_powered_off(&out);
}

#[test]
fn bare_guest_greets_and_powers_off() {
    require_kvm!();
    // No arguments at all: MEM_MB 64 and the bundled Guest.
    let out = run(&mut lguest());
    out.assert_no_panic();
    out.assert_greeting();
    assert_powered_off(&out);
}

#[test]
fn guest_boots_with_explicit_memory_size() {
    require_kvm!();
    for mem in ["16", "256"] {
        let out = run(lguest().arg(mem));
        out.assert_no_panic();
        out.assert_stdout_contains("lguest-guest: Hello");
        assert_powered_off(&out);
    }
}

#[test]
fn verbose_says_more_and_still_boots_the_guest() {
    require_kvm!();
    // --verbose adds the Launcher's account of its work to stderr; the
    // Guest's output and the final status stay the same.
    let out = run(lguest().args(["--verbose", "--append", "test=hypercall"]));
    out.assert_no_panic()
        .assert_code(0)
        .assert_stdout_line("lguest-guest: all 1 tests passed");
    assert!(
        out.stderr.contains("lguest: guest powered off: "),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr_lines().len() > 1,
        "--verbose printed nothing more than without it\n{}",
        out.describe()
    );
}

#[test]
fn the_test_carrying_guest_boots_only_when_asked() {
    require_kvm!();
    // --verbose names the kernel it boots.
    let kernel = |out: &Outcome| -> String {
        let line = out
            .stderr_lines()
            .into_iter()
            .find(|l| l.contains(" booting kernel="))
            .unwrap_or_else(|| panic!("no `booting` line\n{}", out.describe()))
            .to_string();
        let rest = &line[line.find("kernel=").unwrap() + "kernel=".len()..];
        rest[..rest.find(" mem=").unwrap_or(rest.len())].to_string()
    };
    let plain = run(lguest().arg("--verbose"));
    plain.assert_no_panic().assert_code(0);
    assert_eq!(kernel(&plain), "bundled reference Guest");
    for append in [
        "test=hypercall",
        "bench=out iters=10",
        "ip=10.0.0.2 test=timer",
    ] {
        let out = run(lguest().args(["--verbose", "--append", append]));
        out.assert_no_panic().assert_code(0);
        assert_eq!(
            kernel(&out),
            "bundled reference Guest (with its tests)",
            "--append {append:?}"
        );
    }
    let out = run(lguest().args(["--verbose", "--append", "bad=hypercall"]));
    out.assert_no_panic().assert_code(1);
    assert_eq!(kernel(&out), "bundled reference Guest (with its tests)");
}

#[test]
fn all_self_tests_pass() {
    require_kvm!();
    // Without --block, --tunnet or --rng, "all" is the twelve core tests
    // and the two on the console, which is always there.
    let out = boot("test=all");
    for name in CORE_TESTS.iter().chain(&["console", "reset"]) {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    out.assert_stdout_line("lguest-guest: all 14 tests passed");
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    assert_powered_off(&out);
}

#[test]
fn two_tests_from_one_append() {
    require_kvm!();
    self_test(&["hypercall", "ud"]);
}

/// One test per self-test, so a failure names the mechanism that broke.
macro_rules! each_self_test {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                require_kvm!();
                self_test(&[$name]);
            }
        )*
    };
}

mod each {
    use super::*;

    each_self_test!(
        hypercall => "hypercall",
        async_ring => "async",
        timer => "timer",
        mask => "mask",
        ud => "ud",
        pf => "pf",
        de => "de",
        pgtable => "pgtable",
        wallclock => "wallclock",
        stack => "stack",
        gdt => "gdt",
        ts => "ts",
    );
}

#[test]
fn an_unknown_self_test_fails_and_crashes() {
    require_kvm!();
    let out = boot("test=nosuch");
    out.assert_code(1);
    out.assert_stdout_contains("lguest-guest: FAIL nosuch: ");
    out.single_stderr_line("lguest: guest crashed: ");
    assert!(!out.stdout.contains("tests passed"), "{}", out.describe());
}

#[test]
fn benchmark_modes_report_cycles() {
    require_kvm!();
    // `lguest --bench` reads these lines; check their form with a few
    // iterations (the real benchmark takes far longer).
    for name in ["out", "hcall", "ud"] {
        let out = boot(&format!("bench={name} iters=100"));
        out.assert_code(0);
        let prefix = format!("lguest-bench: {name} iters=100 cycles=");
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", out.describe()));
        let rest = &line[prefix.len()..];
        let (cycles, khz) = rest
            .split_once(" tsc_khz=")
            .unwrap_or_else(|| panic!("no tsc_khz in {line:?}"));
        assert!(cycles.trim().parse::<u64>().is_ok(), "cycles in {line:?}");
        assert!(khz.trim().parse::<u64>().is_ok(), "tsc_khz in {line:?}");
    }
}
