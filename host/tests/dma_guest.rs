//! The reference Guest under the 2007 device model (`--transport=dma`, ABI
//! section 9): its prompt, its self-tests (console, blk, net, ping) and the
//! `bad=dma-*` cases, each of which the Host must answer with Sudden Death.
//!
//! Until the Launcher offers `--transport=dma` (its `--help` names `dma`),
//! every test here that needs it prints `SKIPPED: --transport=dma not
//! available` and passes. The tests that reach a tap run in a network
//! namespace of their own, as network.rs does, and need root.
//!
//! In this model the Launcher powers the Guest off at the end of its input,
//! so every Guest here runs with its stdin an open pipe.

#[macro_use]
mod common;
#[macro_use]
#[path = "common/netns.rs"]
mod netns;

use common::*;
use netns::{received, Netns, STEP};
use std::process::Command;
use std::sync::OnceLock;

/// Whether the Launcher offers the 2007 model: `--help` lists `dma` among
/// the transports.
fn dma_available() -> bool {
    static OFFERED: OnceLock<bool> = OnceLock::new();
    *OFFERED.get_or_init(|| {
        let out = run(lguest().arg("--help"));
        out.assert_code(0);
        out.stdout.contains("dma")
    })
}

/// Returns from the calling test unless KVM and `--transport=dma` are there.
macro_rules! require_dma {
    () => {
        require_kvm!();
        if !dma_available() {
            println!("SKIPPED: --transport=dma not available");
            return;
        }
    };
}

/// Runs `cmd` (an `lguest` command) under the 2007 model, stdin an open
/// pipe, writing `input` to it, until the Guest stops.
fn run_dma(mut cmd: Command, args: &[&str], input: &str) -> Outcome {
    let mut guest = Session::start(cmd.arg("--transport=dma").args(args));
    if !input.is_empty() {
        guest.send(input);
    }
    guest.finish(TIMEOUT)
}

/// The Guest's self-tests passed, `count` of them, and it powered off.
fn assert_passed(out: &Outcome, count: usize) {
    out.assert_no_panic()
        .assert_stdout_line(&format!("lguest-guest: all {count} tests passed"))
        .assert_code(0);
    out.single_stderr_line("lguest: guest powered off: self-tests passed");
}

/// What the blk test leaves in the first 64 KiB of a writable disk.
fn disk_pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xFF) as u8
}

#[test]
fn the_prompt_over_dma() {
    require_dma!();
    let mut guest = Session::start(lguest().arg("--transport=dma"));
    guest.expect_stdout("lguest> ", TIMEOUT);
    guest.send("echo hello over DMA\n");
    guest.expect_stdout("hello over DMA\n", TIMEOUT);
    guest.send("devices\n");
    guest.expect_stdout("console (entry 0): irq 1", TIMEOUT);
    guest.send("ping 10.0.0.1\n");
    guest.expect_stdout("ping: no network card\n", TIMEOUT);
    guest.send("poweroff\n");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_greeting().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: poweroff command");
    assert!(
        out.stdout
            .contains("lguest-guest: dma: console (entry 0): irq 1"),
        "the Guest should find the console in the device table\n{}",
        out.describe()
    );
}

#[test]
fn console_self_test_over_dma() {
    require_dma!();
    let out = run_dma(
        lguest(),
        &["--append", "test=console console-input=1"],
        "lguest-console-test\n",
    );
    out.assert_stdout_line("lguest-guest: console: this line came through SEND_DMA to key 0")
        .assert_stdout_line("lguest-guest: console got: lguest-console-test")
        .assert_stdout_line("lguest-guest: test console ... ok");
    assert_passed(&out, 1);
}

#[test]
fn blk_self_test_over_dma_on_a_writable_and_a_read_only_disk() {
    require_dma!();
    let disk = TempFile::new("dma-blk-rw", &vec![0u8; 4 << 20]);
    let mut before = vec![0u8; 1 << 20];
    for (i, byte) in before.iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    let ro = TempFile::new("dma-blk-ro", &before);
    let (rw_arg, ro_arg) = (
        format!("--block={}", disk.arg()),
        format!("--block={},ro", ro.arg()),
    );
    let out = run_dma(lguest(), &[&rw_arg, &ro_arg, "--append", "test=blk"], "");
    out.assert_stdout_line(
        "lguest-guest: blk: disk 0, 8192 sectors: 256 KiB in 15 writes and 15 reads",
    )
    .assert_stdout_line(
        "lguest-guest: blk: disk 1, 2048 sectors, read-only: a write gave result 2",
    );
    assert_passed(&out, 1);
    let written = std::fs::read(disk.path()).expect("read the disk back");
    let mut first = written[..64 << 10].iter().enumerate();
    if let Some((i, &b)) = first.find(|&(i, &b)| b != disk_pattern(i)) {
        panic!(
            "disk byte {i} is {b:#04x}, expected {:#04x}",
            disk_pattern(i)
        );
    }
    assert!(
        written[256 << 10..].iter().all(|&b| b == 0),
        "the Guest wrote past its 256 KiB"
    );
    assert_eq!(
        std::fs::read(ro.path()).expect("read the read-only disk back"),
        before,
        "the read-only disk changed"
    );
}

#[test]
fn every_self_test_over_dma() {
    require_dma!();
    let disk = TempFile::new("dma-all", &vec![0u8; 2 << 20]);
    let block = format!("--block={}", disk.arg());
    let out = run_dma(lguest(), &[&block, "--append", "test=all"], "");
    for name in CORE_TESTS.iter().chain(&["console", "blk"]) {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    assert_passed(&out, CORE_TESTS.len() + 2);
}

/// Each `bad=dma-*` case, with the devices it needs and a word its reason
/// must hold (besides the hypercall's name).
const BAD_CASES: [(&str, bool, &str); 6] = [
    ("dma-key", false, "key"),
    ("dma-align", true, "align"),
    ("dma-bindings", false, "binding"),
    ("dma-cross", false, "cross"),
    ("dma-ram", false, "RAM"),
    ("dma-hostpage", false, "Host"),
];

#[test]
fn each_bad_dma_case_is_sudden_death() {
    require_dma!();
    let disk = TempFile::new("dma-bad", &vec![0u8; 1 << 20]);
    for (case, needs_disk, word) in BAD_CASES {
        let block = format!("--block={}", disk.arg());
        let append = format!("bad={case}");
        let mut args = vec!["--append", append.as_str()];
        if needs_disk {
            args.insert(0, block.as_str());
        }
        let out = run_dma(lguest(), &args, "");
        out.assert_no_panic().assert_code(1);
        let line = out.single_stderr_line("lguest: guest killed: ");
        assert!(
            line.contains("DMA") && line.contains(word),
            "bad={case}: the reason should name the call and hold {word:?}\n{}",
            out.describe()
        );
    }
}

/// Outside the 2007 model the cases refuse to run, rather than pass for
/// the wrong reason.
#[test]
fn bad_dma_cases_need_the_dma_model() {
    require_kvm!();
    for (case, _, _) in BAD_CASES {
        let out = run(lguest().args(["--append", &format!("bad={case}")]));
        out.assert_no_panic().assert_code(1);
        out.single_stderr_line(&format!(
            "lguest: guest crashed: FAIL bad={case}: needs the 2007 device model (boot with --transport=dma)"
        ));
    }
}

#[test]
fn bad_dma_align_needs_a_device_page() {
    require_dma!();
    let out = run_dma(lguest(), &["--append", "bad=dma-align"], "");
    out.assert_no_panic().assert_code(1);
    out.single_stderr_line(
        "lguest: guest crashed: FAIL bad=dma-align: needs a disk or network (--block=FILE) for its page",
    );
}

#[test]
fn net_and_ping_self_tests_over_dma() {
    require_dma!();
    require_network!();
    let ns = Netns::new("d");
    let out = run_dma(
        ns.lguest(),
        &[
            "--tunnet=10.77.11.1",
            "--append",
            "test=net,ping ip=10.77.11.2 peer=10.77.11.1",
        ],
        "",
    );
    out.assert_stdout_line("lguest-guest: test net ... ok")
        .assert_stdout_line("lguest-guest: test ping ... ok");
    let n = received(&out.stdout);
    assert!(
        n.is_some_and(|n| (1..=4).contains(&n)),
        "expected 1 to 4 replies\n{}",
        out.describe()
    );
    assert_passed(&out, 2);
}

#[test]
fn pings_both_ways_over_dma() {
    require_dma!();
    require_network!(ping);
    let ns = Netns::new("d");
    let mut guest = Session::start(ns.lguest().args([
        "--transport=dma",
        "--tunnet=10.77.12.1",
        "--append",
        "ip=10.77.12.2",
    ]));
    guest.expect_stdout("lguest> ", STEP);
    let ping = run_with_timeout(
        ns.command("ping")
            .args(["-c", "3", "-W", "2", "10.77.12.2"]),
        STEP,
    );
    assert!(
        ping.code == Some(0) && received(&ping.stdout).is_some_and(|n| n >= 1),
        "no ping replies from the Guest\n{}\n{}",
        ping.describe(),
        guest.describe_so_far()
    );
    guest.send("ping 10.77.12.1\n");
    guest.expect_stdout("ping statistics: 4 packets transmitted", STEP);
    guest.send("poweroff\n");
    let out = guest.finish(STEP);
    out.assert_no_panic().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: poweroff command");
    let guest_ping = &out.stdout[out.stdout.find("lguest> ping").expect("the command")..];
    assert!(
        received(guest_ping).is_some_and(|n| n >= 1),
        "the Guest's pings got no replies\n{}",
        out.describe()
    );
}
