//! The Launcher's set-up and its output streams, the hard way: huge sparse
//! files, a stderr that is full or closed, a stdout whose reader leaves,
//! two Launchers on one disk image, a loop device, and two network cards.
//!
//! Tests that need KVM skip as the others do (`require_kvm!`); the loop
//! device and network tests also need root and a tool or two, and print
//! `SKIPPED: <why>` when those are missing.

#[macro_use]
mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A KVM device that is never there (see cli.rs).
const FAKE_KVM: &str = "/nonexistent/lguest-test-kvm";

/// The Guest RAM of these tests, and how much the Launcher may hold beyond
/// it at its peak. A debug build of the Launcher, threads and all, peaks
/// far below this; reading a 1 GiB file whole would not.
const MEM_MB: u64 = 64;
const SLACK_MB: u64 = 200;

/*
 * A Launcher run with the streams a test chooses, reaped with wait4 so that
 * its own peak memory (ru_maxrss) comes back with its status.
 */

/// How a run ended.
struct Ended {
    /// The exit code; None if a signal ended it.
    code: Option<i32>,
    signal: Option<i32>,
    /// Peak resident memory, KiB.
    max_rss_kib: u64,
    stdout: String,
    stderr: String,
}

impl Ended {
    fn describe(&self) -> String {
        format!(
            "code {:?}, signal {:?}, peak RSS {} KiB\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.code, self.signal, self.max_rss_kib, self.stdout, self.stderr
        )
    }

    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit status {code}\n{}",
            self.describe()
        );
        self
    }

    fn assert_no_panic(&self) -> &Self {
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            assert!(
                !self.stderr.contains(bad) && !self.stdout.contains(bad),
                "the Launcher panicked\n{}",
                self.describe()
            );
        }
        self
    }
}

/// A started Launcher, killed and reaped if the test lets go of it early.
/// It is reaped with wait4 (never `Child::wait`), for its rusage.
struct Running {
    child: std::process::Child,
    reaped: bool,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Running {
    /// Starts `cmd`, whose stdio the caller has set (a piped stdout or
    /// stderr is collected).
    fn start(cmd: &mut Command) -> Running {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let collect = |pipe: Option<Box<dyn Read + Send>>| {
            pipe.map(|mut p| {
                thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = p.read_to_end(&mut bytes);
                    String::from_utf8_lossy(&bytes).into_owned()
                })
            })
        };
        let stdout = collect(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = collect(child.stderr.take().map(|p| Box::new(p) as _));
        Running {
            child,
            reaped: false,
            stdout,
            stderr,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Waits for it to end; kills it and panics after `timeout`.
    fn finish(mut self, timeout: Duration) -> Ended {
        let deadline = Instant::now() + timeout;
        let mut status = 0;
        // SAFETY: rusage is plain data; all zeroes is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4 on our own child, writing into locals we own.
            let rc = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut usage) };
            assert!(rc >= 0, "wait4: {}", std::io::Error::last_os_error());
            if rc == self.pid() {
                break;
            }
            if Instant::now() >= deadline {
                drop(self);
                panic!("the Launcher did not finish within {timeout:?}; killed");
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.reaped = true;
        let join = |h: Option<thread::JoinHandle<String>>| {
            h.map(|h| h.join().expect("pipe reader"))
                .unwrap_or_default()
        };
        Ended {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            max_rss_kib: usage.ru_maxrss as u64,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(self.pid(), libc::SIGKILL);
                libc::waitpid(self.pid(), std::ptr::null_mut(), 0);
            }
        }
    }
}

/// `lguest ARGS` with stdin from /dev/null and both outputs piped.
fn launcher(args: &[&str]) -> Command {
    let mut cmd = lguest();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A pipe whose read end is already closed: writing to it fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors we own; the read end goes at once.
    unsafe {
        libc::close(fds[0]);
        std::os::fd::FromRawFd::from_raw_fd(fds[1])
    }
}

fn dev_full() -> Stdio {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full")
        .into()
}

/// The bench's floor Guest (host/src/bench.rs), at 0x200000: fill the async
/// ring's status bytes with 0xFF, LGUEST_INIT, then power off, saying
/// "floor". Both hypercalls are `out %al,$0x1f`.
fn floor_kernel() -> Vec<u8> {
    let mut code = vec![
        0xbf, 0x24, 0x10, 0x20, 0x00, // mov $0x201024, %edi
        0xb0, 0xff, // mov $0xff, %al
        0xb9, 0x40, 0x00, 0x00, 0x00, // mov $64, %ecx
        0xf3, 0xaa, // rep stosb
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov $LGUEST_INIT, %eax
        0xba, 0x00, 0x10, 0x20, 0x00, // mov $0x201000, %edx
        0xe6, 0x1f, // out %al, $0x1f
        0xb8, 0x02, 0x00, 0x00, 0x00, // mov $SHUTDOWN, %eax
        0xba, 0x00, 0x01, 0x20, 0x00, // mov $0x200100, %edx
        0xbb, 0x01, 0x00, 0x00, 0x00, // mov $1, %ebx
        0xe6, 0x1f, // out %al, $0x1f
        0x0f, 0x0b, // ud2
    ];
    code.resize(0x100, 0x90);
    code.extend_from_slice(b"floor\0");
    lguest::boot::tiny_elf(0x20_0000, &code, 0x2000)
}

/// A file of `len` bytes that starts with `head` and is a hole after it.
fn sparse_file(name: &str, head: &[u8], len: u64) -> TempFile {
    let file = TempFile::new(name, head);
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .and_then(|f| f.set_len(len))
        .expect("make the file sparse");
    file
}

/*
 * Output streams: whatever becomes of stdout and stderr, the exit status is
 * the one ABI section 10 gives, and nothing panics.
 */

#[test]
fn a_setup_error_with_stderr_full_still_exits_2() {
    let out = Running::start(
        launcher(&["--bogus"])
            .stderr(dev_full())
            .env("LGUEST_KVM_DEVICE", FAKE_KVM),
    )
    .finish(TIMEOUT);
    out.assert_code(2);
    let out = Running::start(
        launcher(&["64", "/nonexistent/lguest-test-kernel"])
            .stderr(closed_pipe())
            .env("LGUEST_KVM_DEVICE", FAKE_KVM),
    )
    .finish(TIMEOUT);
    out.assert_code(2);
}

#[test]
fn every_ending_keeps_its_status_with_stderr_full_or_closed() {
    require_kvm!();
    for (args, code) in [
        (&[][..], 0),
        (&["--verbose"][..], 0),
        (&["--append", "bad=hypercall"][..], 1),
    ] {
        for (what, stderr) in [("/dev/full", dev_full()), ("a closed pipe", closed_pipe())] {
            let out = Running::start(launcher(args).stderr(stderr)).finish(TIMEOUT);
            assert_eq!(
                out.code,
                Some(code),
                "lguest {args:?} with stderr to {what}\n{}",
                out.describe()
            );
            out.assert_no_panic();
        }
    }
}

#[test]
fn the_guest_keeps_running_when_stdout_is_closed() {
    require_kvm!();
    // The self-tests print a line each; nobody reads them.
    let out =
        Running::start(launcher(&["--append", "test=all"]).stdout(closed_pipe())).finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    assert!(
        out.stderr.starts_with("lguest: guest powered off: "),
        "{}",
        out.describe()
    );
}

#[test]
fn bench_stops_quietly_when_its_reader_leaves() {
    require_kvm!();
    // `lguest --bench | head -1`, with the reader gone before the first
    // line (so the test waits for one measure, not two): the first write
    // fails with EPIPE, and the benchmarks stop there, successfully.
    let start = Instant::now();
    let out = Running::start(launcher(&["--bench"]).stdout(closed_pipe())).finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    assert!(out.stderr.is_empty(), "{}", out.describe());
    println!("lguest --bench stopped after {:?}", start.elapsed());
}

/*
 * Huge files: only what loads is read, so a 1 GiB file that is mostly hole
 * costs next to nothing, and one that cannot fit is refused before a byte
 * of it is read.
 */

#[test]
fn a_sparse_1_gib_kernel_is_checked_without_reading_it() {
    // No KVM needed: everything up to opening it is done.
    let kernel = sparse_file("sparse-kernel-fake", &floor_kernel(), 1 << 30);
    let out = Running::start(
        launcher(&[&MEM_MB.to_string(), kernel.arg()]).env("LGUEST_KVM_DEVICE", FAKE_KVM),
    )
    .finish(TIMEOUT);
    out.assert_no_panic().assert_code(2);
    assert!(out.stderr.contains(FAKE_KVM), "{}", out.describe());
    assert!(
        out.max_rss_kib < SLACK_MB << 10,
        "peak RSS {} KiB for a kernel of 382 bytes\n{}",
        out.max_rss_kib,
        out.describe()
    );
}

#[test]
fn a_sparse_1_gib_kernel_boots_in_little_memory() {
    require_kvm!();
    let kernel = sparse_file("sparse-kernel", &floor_kernel(), 1 << 30);
    let start = Instant::now();
    let out = Running::start(&mut launcher(&[&MEM_MB.to_string(), kernel.arg()])).finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    assert_eq!(
        out.stderr.trim_end(),
        "lguest: guest powered off: floor",
        "{}",
        out.describe()
    );
    assert!(
        out.max_rss_kib < (MEM_MB + SLACK_MB) << 10,
        "peak RSS {} KiB\n{}",
        out.max_rss_kib,
        out.describe()
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn an_initrd_larger_than_ram_is_refused_unread() {
    let initrd = sparse_file("sparse-initrd", b"not read", 1 << 30);
    let out = Running::start(
        launcher(&[&format!("--initrd={}", initrd.arg()), &MEM_MB.to_string()])
            .env("LGUEST_KVM_DEVICE", FAKE_KVM),
    )
    .finish(TIMEOUT);
    out.assert_no_panic().assert_code(2);
    assert!(
        out.stderr
            .starts_with(&format!("lguest: initrd {} ", initrd.arg()))
            && out.stderr.contains("does not fit"),
        "{}",
        out.describe()
    );
    assert!(
        out.max_rss_kib < SLACK_MB << 10,
        "peak RSS {} KiB\n{}",
        out.max_rss_kib,
        out.describe()
    );
}

/*
 * Disk locks: one writer, or any number of readers.
 */

/// A Launcher whose Guest sits at its prompt with `block` as a disk, stdin
/// held open; killed when dropped.
fn guest_at_prompt(block: &str) -> Session {
    let mut session = Session::start(lguest().arg(block));
    session.expect_stdout("lguest> ", TIMEOUT);
    session
}

#[test]
fn a_second_writer_is_refused_while_the_first_runs() {
    require_kvm!();
    let disk = TempFile::new("locked-disk", &vec![0; 1 << 20]);
    let rw = format!("--block={}", disk.arg());
    let first = guest_at_prompt(&rw);
    for spec in [rw.clone(), format!("{rw},ro")] {
        let out = run(lguest().arg(&spec));
        out.assert_no_panic().assert_code(2);
        let line = out.single_stderr_line("lguest: disk ");
        assert!(
            line.contains(disk.arg()) && line.contains("in use"),
            "{spec}: {line}"
        );
    }
    drop(first);
    // The lock went with the first Launcher.
    let out = run(lguest().args([&rw, "--append", "test=blk"]));
    out.assert_no_panic().assert_code(0);
}

#[test]
fn read_only_users_share_a_disk() {
    require_kvm!();
    let contents: Vec<u8> = (0..1 << 20).map(|i| (i / 512) as u8).collect();
    let disk = TempFile::new("shared-disk", &contents);
    let ro = format!("--block={},ro", disk.arg());
    let first = guest_at_prompt(&ro);
    let out = run(lguest().args([&ro, "--append", "test=blk"]));
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: all 1 tests passed")
        .assert_code(0);
    // ...but no writer joins them.
    let out = run(lguest().arg(format!("--block={}", disk.arg())));
    out.assert_no_panic().assert_code(2);
    let line = out.single_stderr_line("lguest: disk ");
    assert!(line.contains("in use"), "{line}");
    drop(first);
    assert_eq!(std::fs::read(disk.path()).unwrap(), contents);
}

/*
 * A block device as a disk: a loop device over a file, attached for the test
 * and detached however it ends.
 */

/// A loop device over a file, detached when dropped.
struct Loop {
    device: String,
}

impl Loop {
    /// Attaches one over `file`; None (having said SKIPPED) when losetup
    /// is missing.
    fn attach(file: &TempFile) -> Option<Loop> {
        let found = Command::new("losetup")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            println!("SKIPPED: losetup (util-linux) missing");
            return None;
        }
        let out = Command::new("losetup")
            .args(["--find", "--show", file.arg()])
            .stdin(Stdio::null())
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup --find --show failed (root is needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(device.starts_with("/dev/loop"), "losetup said {device:?}");
        Some(Loop { device })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .args(["-d", &self.device])
            .stdin(Stdio::null())
            .status();
    }
}

#[test]
fn a_loop_device_is_a_disk() {
    let backing = TempFile::new("loop-backing", &vec![0; 4 << 20]);
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let block = format!("--block={}", dev.device);
    // Accepted: only the KVM device is left to fail.
    let out = run(lguest()
        .args([&block, "--verbose"])
        .env("LGUEST_KVM_DEVICE", FAKE_KVM));
    out.assert_no_panic().assert_code(2);
    assert!(
        out.stderr
            .contains(&format!("disk {}: block device, 8192 sectors", dev.device)),
        "{}",
        out.describe()
    );
    assert!(out.stderr.contains(FAKE_KVM), "{}", out.describe());
    if !kvm_available() {
        return;
    }
    // The Guest's block test writes its pattern through the device.
    let out = run(lguest().args([&block, "--append", "test=blk"]));
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: all 1 tests passed")
        .assert_code(0);
    drop(dev);
    let bytes = std::fs::read(backing.path()).expect("read the backing file");
    for (i, b) in bytes[..64 << 10].iter().enumerate() {
        assert_eq!(*b, (i * 7 + 3) as u8, "byte {i} of the backing file");
    }
}

/*
 * Two network cards, each on its own tap, in a network namespace of the
 * test's own (see network.rs).
 */

/// Whether root, /dev/net/tun and `ip` are all here; SKIPPED if not.
fn taps_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root (taps and network namespaces need it)")
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun missing")
    } else if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        Some("the `ip` command (iproute2) missing")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("LGUEST_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("LGUEST_REQUIRE_KVM=1 but the tap test cannot run: {why}")
        }
        Some(why) => {
            println!("SKIPPED: {why}");
            false
        }
    }
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lgs{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot create network namespace {name}");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn two_tunnets_make_two_cards_on_two_taps() {
    require_kvm!();
    if !taps_available() {
        return;
    }
    let ns = Netns::new("2nets");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_lguest")])
        .args([
            "--verbose",
            "--tunnet=10.77.31.1",
            "--tunnet=10.77.32.1:02:00:00:00:32:01",
        ])
        .env_remove("LGUEST_KVM_DEVICE")
        .env_remove("RUST_LOG");
    let mut guest = Session::start(&mut cmd);
    guest.expect_stdout("lguest> ", TIMEOUT);
    guest.send("devices\n");
    guest.close_stdin();
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    let cards: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.trim_start_matches("lguest> ").starts_with("net at "))
        .collect();
    assert_eq!(
        cards.len(),
        2,
        "two net cards on the bus\n{}",
        out.describe()
    );
    assert!(
        cards[1].contains("mac 02:00:00:00:32:01"),
        "the second card has the second MAC\n{}",
        out.describe()
    );
    let taps: Vec<&str> = ["10.77.31.1/24", "10.77.32.1/24"]
        .iter()
        .map(|on| {
            let line = out
                .stderr
                .lines()
                .find(|l| l.starts_with("lguest: network card") && l.contains(on))
                .unwrap_or_else(|| panic!("no card on {on}\n{}", out.describe()));
            line.split_whitespace()
                .skip_while(|w| *w != "tap")
                .nth(1)
                .expect("a tap name")
        })
        .collect();
    assert_ne!(taps[0], taps[1], "each card has its own tap");
}
