//! The network device through a real tap: `--tunnet`.
//!
//! Each test makes a network namespace of its own and runs the Launcher in
//! it, so the tap it creates, and every frame, stay inside; the namespace is
//! removed at the end, pass or fail. The tests need root, /dev/net/tun, and
//! the `ip` and `ping` commands (iproute2, iputils-ping), besides KVM. When
//! one is missing they print `SKIPPED: <why>` and pass, unless
//! `LGUEST_REQUIRE_KVM=1` (as in CI), when they fail.

#[macro_use]
mod common;

use common::*;

#[macro_use]
#[path = "common/netns.rs"]
mod netns;

use netns::{Netns, STEP};

/// How many replies a ping run says it received (0 if it doesn't say).
fn received(ping_output: &str) -> usize {
    netns::received(ping_output).unwrap_or(0)
}

#[test]
fn the_guest_answers_ping_through_the_tap() {
    require_network!(ping);
    let ns = Netns::new("net");
    // The Session is declared after the namespace, so a failing test kills
    // the Launcher before the namespace goes.
    let mut guest = Session::start(ns.lguest().args([
        "--tunnet=10.77.0.1:02:00:00:4c:47:01",
        "--append",
        "ip=10.77.0.2",
    ]));
    // stdin stays open, so the prompt (and the Guest's network) keeps running.
    guest.expect_stdout("lguest> ", STEP);
    let link = ns.ip(&["-brief", "link", "show", "lguest0"]);
    assert!(
        link.stdout.contains("UP"),
        "the tap should be up\n{}",
        link.describe()
    );
    let addr = ns.ip(&["-4", "-brief", "addr", "show", "lguest0"]);
    assert!(
        addr.stdout.contains("10.77.0.1/24"),
        "the tap should have 10.77.0.1/24\n{}",
        addr.describe()
    );

    let ping = run_with_timeout(
        ns.command("ping").args(["-c", "3", "-W", "2", "10.77.0.2"]),
        STEP,
    );
    assert!(
        ping.code == Some(0) && received(&ping.stdout) >= 1,
        "no ping replies from the Guest\n{}\n{}",
        ping.describe(),
        guest.describe_so_far()
    );
    // The Guest answered ARP with the MAC it was given.
    let neigh = ns.ip(&["neigh", "show", "10.77.0.2"]);
    assert!(
        neigh.stdout.contains("02:00:00:4c:47:01"),
        "the Guest should use the MAC from --tunnet\n{}",
        neigh.describe()
    );

    guest.close_stdin();
    let out = guest.finish(STEP);
    out.assert_no_panic().assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line, "lguest: guest powered off: end of input");
}

#[test]
fn net_self_test_through_the_tap() {
    require_network!();
    let ns = Netns::new("net");
    // The Guest asks for the Host's MAC address (ARP) and expects the reply.
    let out = run_with_timeout(
        ns.lguest()
            .args(["--tunnet=10.77.1.1", "--append", "test=net ip=10.77.1.2"]),
        STEP,
    );
    assert_net_test_passed(&out);
}

/// The Guest's `test=net` passed and it powered off.
fn assert_net_test_passed(out: &Outcome) {
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: test net ... ok")
        .assert_stdout_line("lguest-guest: all 1 tests passed")
        .assert_code(0);
    out.single_stderr_line("lguest: guest powered off: ");
}

#[test]
fn net_self_test_over_virtio_mmio_with_virtio_drivers() {
    require_network!();
    let ns = Netns::new("net");
    let out = run_with_timeout(
        ns.lguest().args([
            "--transport=mmio",
            "--guest=drivers",
            "--tunnet=10.77.3.1",
            "--append",
            "test=net ip=10.77.3.2",
        ]),
        STEP,
    );
    assert_net_test_passed(&out);
}

#[test]
fn net_self_test_through_a_bridge() {
    require_network!();
    let ns = Netns::new("net");
    // The host's address is on the bridge; the tap joins it as a port.
    ns.ip(&["link", "add", "lgbr0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.77.2.1/24", "dev", "lgbr0"]);
    ns.ip(&["link", "set", "lgbr0", "up"]);
    let out = run_with_timeout(
        ns.lguest().args([
            "--tunnet=bridge:lgbr0",
            "--append",
            "test=net ip=10.77.2.2 hostip=10.77.2.1",
        ]),
        STEP,
    );
    assert_net_test_passed(&out);
}

#[test]
fn tunnet_to_a_missing_bridge_is_a_setup_error() {
    require_network!();
    let ns = Netns::new("net");
    let out = run_with_timeout(ns.lguest().arg("--tunnet=bridge:nosuchbr0"), STEP);
    out.assert_no_panic().assert_code(2);
    let line = out.single_stderr_line("lguest: ");
    assert!(line.contains("tap"), "{}", out.describe());
}
