//! Network namespaces for the tests that make a tap (`--tunnet`): each test
//! runs the Launcher in a namespace of its own, so its tap, and every
//! frame, stay inside, and the namespace goes at the end, pass or fail.
//!
//! A test file that wants them includes this after `common`:
//!
//! ```ignore
//! #[macro_use]
//! mod common;
//! #[macro_use]
//! #[path = "common/netns.rs"]
//! mod netns;
//! ```
//!
//! The tests need root, /dev/net/tun and the `ip` command (iproute2), and
//! for some the `ping` command (iputils-ping). When one is missing they
//! print `SKIPPED: <why>` and pass, unless `LGUEST_REQUIRE_KVM=1` (as in
//! CI), when they fail.
#![allow(dead_code, unused_macros)]

use crate::common::{run_with_timeout, Outcome};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Limit for each step that runs a Guest or a command in the namespace.
pub const STEP: Duration = Duration::from_secs(20);

/// Whether `program ARGS` runs and succeeds.
pub fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this machine can run a tap test (one that runs `ping` if
/// `ping`); like `kvm_available`, it panics instead of skipping under
/// `LGUEST_REQUIRE_KVM=1`.
pub fn network_available(ping: bool) -> bool {
    // SAFETY: geteuid has no preconditions.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("not root (tap devices and network namespaces need it)")
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun missing")
    } else if !runs("ip", &["-V"]) {
        Some("the `ip` command (iproute2) missing")
    } else if ping && !runs("ping", &["-V"]) {
        Some("the `ping` command (iputils-ping) missing")
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("LGUEST_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("LGUEST_REQUIRE_KVM=1 but the network tests cannot run: {why}")
        }
        Some(why) => {
            println!("SKIPPED: {why}");
            false
        }
    }
}

/// Returns from the calling test unless KVM and the network tools are there
/// (`ping` too, when called as `require_network!(ping)`).
macro_rules! require_network {
    () => {
        require_kvm!();
        if !$crate::netns::network_available(false) {
            return;
        }
    };
    (ping) => {
        require_kvm!();
        if !$crate::netns::network_available(true) {
            return;
        }
    };
}

/// A network namespace of our own, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `lg<tag><pid>-<n>`, with its loopback up.
    pub fn new(tag: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "lg{tag}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        // A namespace left by an earlier run with our pid would be in the way.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let out = run_with_timeout(Command::new("ip").args(["netns", "add", &name]), STEP);
        assert_eq!(
            out.code,
            Some(0),
            "cannot create network namespace {name}\n{}",
            out.describe()
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// The `lguest` binary run inside the namespace (`ip netns exec` execs
    /// it, so the child's pid is the Launcher's).
    pub fn lguest(&self) -> Command {
        let mut cmd = self.command(env!("CARGO_BIN_EXE_lguest"));
        cmd.env_remove("LGUEST_KVM_DEVICE").env_remove("RUST_LOG");
        cmd
    }

    /// Runs `ip ARGS` in the namespace; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> Outcome {
        let out = run_with_timeout(self.command("ip").args(args), STEP);
        assert_eq!(
            out.code,
            Some(0),
            "ip {args:?} in {} failed\n{}",
            self.name,
            out.describe()
        );
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .status();
    }
}

/// The number of replies in the Guest's ping summary, `--- A.B.C.D ping
/// statistics: N packets transmitted, M received`, or in `ping`'s own,
/// `N packets transmitted, M received, ...`.
pub fn received(ping_output: &str) -> Option<usize> {
    ping_output.lines().find_map(|l| {
        let before = l.split(" received").next()?;
        if before.len() == l.len() {
            return None;
        }
        before.rsplit(' ').next()?.trim().parse().ok()
    })
}
