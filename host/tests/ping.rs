//! Pings from the Guest: the prompt's `ping A.B.C.D` and the `ping`
//! self-test (`test=ping peer=A.B.C.D`, with the Guest's own `ip=`), on
//! the lguest bus. The tests that reach a tap run in a network namespace of
//! their own, as network.rs does, and need root; the rest need only KVM.
//!
//! Virtio-mmio has no such test: the reference Guest drives the lguest bus
//! (and the 2007 model, in dma_guest.rs), not mmio windows.

#[macro_use]
mod common;
#[macro_use]
#[path = "common/netns.rs"]
mod netns;

use common::*;
use netns::{received, Netns, STEP};

/// The Guest's `lguest-guest: ping: N of 4 echo requests to PEER answered`:
/// N.
fn answered(stdout: &str, peer: &str) -> Option<usize> {
    let tail = format!(" of 4 echo requests to {peer} answered");
    stdout.lines().find_map(|l| {
        let n = l
            .strip_prefix("lguest-guest: ping: ")?
            .strip_suffix(&tail)?;
        n.parse().ok()
    })
}

#[test]
fn the_ping_self_test_pings_the_host_through_the_tap() {
    require_network!();
    let ns = Netns::new("p");
    let out = run_with_timeout(
        ns.lguest().args([
            "--tunnet=10.77.4.1",
            "--append",
            "test=ping ip=10.77.4.2 peer=10.77.4.1",
        ]),
        STEP,
    );
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: test ping ... ok")
        .assert_stdout_line("lguest-guest: all 1 tests passed")
        .assert_code(0);
    let n = answered(&out.stdout, "10.77.4.1");
    assert!(
        n.is_some_and(|n| (1..=4).contains(&n)),
        "expected 1 to 4 replies\n{}",
        out.describe()
    );
    assert!(
        out.stdout
            .contains("bytes from 10.77.4.1: icmp_seq=1 ttl=64 time="),
        "expected a line per reply, as ping prints\n{}",
        out.describe()
    );
    out.single_stderr_line("lguest: guest powered off: self-tests passed");
}

#[test]
fn test_all_runs_ping_when_given_a_peer() {
    require_network!();
    let ns = Netns::new("p");
    let out = run_with_timeout(
        ns.lguest().args([
            "--tunnet=10.77.5.1",
            "--append",
            "test=all ip=10.77.5.2 peer=10.77.5.1",
        ]),
        STEP,
    );
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: test net ... ok")
        .assert_stdout_line("lguest-guest: test ping ... ok")
        .assert_code(0);
    // The core tests, console, net, ping and reset.
    let all = CORE_TESTS.len() + 4;
    out.assert_stdout_line(&format!("lguest-guest: all {all} tests passed"));

    // Without peer=, `all` leaves ping out.
    let out = run_with_timeout(
        ns.lguest()
            .args(["--tunnet=10.77.5.1", "--append", "test=all ip=10.77.5.2"]),
        STEP,
    );
    out.assert_no_panic().assert_code(0);
    assert!(
        !out.stdout.contains("test ping"),
        "ping ran without peer=\n{}",
        out.describe()
    );
}

#[test]
fn pinging_an_address_nobody_has_fails_the_test() {
    require_network!();
    let ns = Netns::new("p");
    let out = run_with_timeout(
        ns.lguest().args([
            "--tunnet=10.77.6.1",
            "--append",
            "test=ping ip=10.77.6.2 peer=10.77.6.9",
        ]),
        STEP,
    );
    out.assert_no_panic().assert_code(1);
    out.single_stderr_line(
        "lguest: guest crashed: FAIL ping: pinging: no ARP reply from 10.77.6.9 within 3 s",
    );
}

#[test]
fn ping_at_the_prompt() {
    require_network!();
    let ns = Netns::new("p");
    let mut guest =
        Session::start(
            ns.lguest()
                .args(["--tunnet=10.77.7.1", "--append", "ip=10.77.7.2"]),
        );
    guest.expect_stdout("lguest> ", STEP);
    guest.send("ping 10.77.7.1\n");
    guest.expect_stdout("ping statistics: 4 packets transmitted", STEP);
    guest.send("ping 10.77.7\n");
    guest.expect_stdout("ping: usage: ping A.B.C.D\n", STEP);
    guest.send("poweroff\n");
    let out = guest.finish(STEP);
    out.assert_no_panic().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: poweroff command");
    assert!(
        out.stdout.contains("PING 10.77.7.1 (")
            && out.stdout.contains(") from 10.77.7.2: 56 data bytes"),
        "{}",
        out.describe()
    );
    let n = received(&out.stdout);
    assert!(
        n.is_some_and(|n| (1..=4).contains(&n)),
        "expected 1 to 4 replies\n{}",
        out.describe()
    );
}

/// The prompt's `ping` says what it lacks, and the prompt goes on.
#[test]
fn ping_at_the_prompt_without_what_it_needs() {
    require_kvm!();
    let mut guest = Session::start(lguest().args(["--append", "ip=10.77.8.2"]));
    guest.expect_stdout("lguest> ", STEP);
    guest.send("ping 10.77.8.1\nping\n");
    guest.expect_stdout("ping: no network card\n", STEP);
    guest.send("poweroff\n");
    let out = guest.finish(STEP);
    out.assert_no_panic().assert_code(0);
    assert_eq!(
        out.stdout.matches("ping: no network card").count(),
        2,
        "{}",
        out.describe()
    );
}

#[test]
fn the_ping_self_test_needs_a_network_card() {
    require_kvm!();
    let out = run(lguest().args(["--append", "test=ping ip=10.77.8.2 peer=10.77.8.1"]));
    out.assert_no_panic().assert_code(1);
    out.single_stderr_line(
        "lguest: guest crashed: FAIL ping: bringing up the network: no virtio net device",
    );
}

#[test]
fn the_ping_self_test_needs_both_addresses() {
    require_network!();
    let ns = Netns::new("p");
    for (append, detail) in [
        (
            "test=ping peer=10.77.9.1",
            "needs our address: ip=A.B.C.D on the command line",
        ),
        (
            "test=ping ip=10.77.9.2",
            "needs the address to ping: peer=A.B.C.D on the command line",
        ),
        (
            "test=ping ip=10.77.9.2 peer=10.77.9",
            "needs the address to ping: peer=A.B.C.D on the command line",
        ),
    ] {
        let out = run_with_timeout(
            ns.lguest().args(["--tunnet=10.77.9.1", "--append", append]),
            STEP,
        );
        out.assert_no_panic().assert_code(1);
        out.single_stderr_line(&format!("lguest: guest crashed: FAIL ping: {detail}"));
    }
}

#[test]
fn prompt_ping_without_an_address() {
    require_network!();
    let ns = Netns::new("p");
    let mut guest = Session::start(ns.lguest().arg("--tunnet=10.77.10.1"));
    guest.expect_stdout("lguest> ", STEP);
    guest.send("ping 10.77.10.1\nping nowhere\n");
    guest.expect_stdout("ping: we have no address: boot with ip=A.B.C.D\n", STEP);
    guest.send("poweroff\n");
    let out = guest.finish(STEP);
    out.assert_no_panic().assert_code(0);
    assert_eq!(
        out.stdout.matches("ping: we have no address").count(),
        2,
        "without ip= the address isn't even looked at\n{}",
        out.describe()
    );
}
