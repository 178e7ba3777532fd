//! The virtio devices on the lguest bus (ABI section 8), driven by the
//! bundled reference Guest under KVM.
//!
//! The Guest's device self-tests (`test=console`, `blk`, `rng`, `reset`) run
//! against the real Host devices; after them the test looks at what the
//! Guest left behind in the disk file. The console is also driven from
//! outside: commands typed at the Guest's prompt through a pipe, a file and a
//! pseudo-terminal (raw mode, escape sequences, Ctrl-C, UTF-8, over-long and
//! unterminated lines, line ends, three Ctrl-C, the terminal restored on
//! every way out), and with a stdout that is slow, or never read at all (the
//! Launcher must hold the Guest back without losing a byte, and still hear
//! Ctrl-C). The `bad=virtio-*` cases break the ring rules on the console's
//! transmit queue and must end in Sudden Death with the Host's reason.
//!
//! The network device needs a tap, so it is tested in `network.rs`; the
//! command-line errors for devices (a bad disk file, a bad `--tunnet`) need no
//! KVM and are in `cli.rs`.

#[macro_use]
mod common;

use common::*;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

/// How long to wait for something the Guest prints while it runs.
const WAIT: Duration = Duration::from_secs(20);

/// Bytes of the disk the Guest's blk test leaves holding `blk_pattern`.
const PATTERN_LEN: usize = 64 << 10;

/// What the blk self-test leaves at offset `i` of the disk.
fn blk_pattern(i: usize) -> u8 {
    ((i * 7 + 3) & 0xFF) as u8
}

/// A pattern unlike `blk_pattern`, for disks that must be left alone.
fn other_pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8) ^ (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// `--block=PATH` (with `,ro` if asked).
fn block_arg(disk: &TempFile, read_only: bool) -> String {
    let ro = if read_only { ",ro" } else { "" };
    format!("--block={}{ro}", disk.arg())
}

/// Boots the bundled Guest with the device options `devices` and
/// `--append CMDLINE`, stdin from /dev/null.
fn boot(devices: &[&str], cmdline: &str) -> Outcome {
    let out = run(lguest().args(devices).args(["--append", cmdline]));
    out.assert_no_panic();
    out
}

/// Panics unless the Guest powered off (exit 0, one `powered off` line).
fn assert_powered_off(out: &Outcome) {
    out.assert_code(0);
    out.single_stderr_line("lguest: guest powered off: ");
}

/// Panics unless the self-tests `names` each passed, `all N tests passed`
/// was printed for exactly them, and the Guest powered off.
fn assert_tests_passed(out: &Outcome, names: &[&str]) {
    for name in names {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    out.assert_stdout_line(&format!("lguest-guest: all {} tests passed", names.len()));
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    assert_powered_off(out);
}

/// The N of `lguest-guest: all N tests passed`.
fn tests_passed(out: &Outcome) -> usize {
    out.stdout
        .lines()
        .find_map(|l| {
            l.trim_end()
                .strip_prefix("lguest-guest: all ")?
                .strip_suffix(" tests passed")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `all N tests passed` line\n{}", out.describe()))
}

/// Panics unless the Guest ran no self-test called `name`.
fn assert_not_run(out: &Outcome, name: &str) {
    assert!(
        !out.stdout.contains(&format!("lguest-guest: test {name} ")),
        "the {name} self-test ran, but its device was not given\n{}",
        out.describe()
    );
}

/// Panics unless the file's first 64 KiB hold what the blk self-test
/// writes, and the file still has its size.
fn assert_disk_has_pattern(disk: &TempFile, size: usize) {
    let bytes = std::fs::read(disk.path()).expect("reading the disk back");
    assert_eq!(bytes.len(), size, "the disk file changed size");
    if let Some(i) = (0..PATTERN_LEN).find(|&i| bytes[i] != blk_pattern(i)) {
        panic!(
            "disk byte {i:#x} is {:#04x}, expected {:#04x} (the blk self-test's \
             pattern (i * 7 + 3) & 0xFF over the first 64 KiB)",
            bytes[i],
            blk_pattern(i)
        );
    }
}

/// Panics unless the blk self-test's line for the disk `id` is there:
/// the read-only one, or the one for a disk it wrote and read back.
fn assert_blk_checked(out: &Outcome, id: &str, read_only: bool) {
    let prefix = format!("lguest-guest: blk: \"{id}\", ");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("the blk self-test did not check {id}\n{}", out.describe()));
    let what = if read_only {
        "read-only: a write failed as it should"
    } else {
        "KiB in "
    };
    assert!(
        line.contains(what),
        "{id}: expected {what:?} in {line:?}\n{}",
        out.describe()
    );
}

/// Panics unless the file holds exactly `expected`.
fn assert_disk_unchanged(disk: &TempFile, expected: &[u8]) {
    let bytes = std::fs::read(disk.path()).expect("reading the disk back");
    assert_eq!(bytes.len(), expected.len(), "the disk file changed size");
    if let Some(i) = (0..bytes.len()).find(|&i| bytes[i] != expected[i]) {
        panic!(
            "disk byte {i:#x} changed from {:#04x} to {:#04x}, but the Guest \
             should not have written to this disk",
            expected[i], bytes[i]
        );
    }
}

/*
 * The device self-tests.
 */

#[test]
fn all_self_tests_with_a_disk_and_rng() {
    require_kvm!();
    let size = 4 << 20;
    let disk = TempFile::new("all-disk", &vec![0; size]);
    let out = boot(&[&block_arg(&disk, false), "--rng"], "test=all");
    for name in CORE_TESTS.iter().chain(&["console", "reset", "blk", "rng"]) {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    // No network device, so no net test.
    assert_not_run(&out, "net");
    // The twelve core tests and four device tests: console, reset, blk, rng.
    let n = tests_passed(&out);
    assert_eq!(n, 16, "expected 16 tests, ran {n}\n{}", out.describe());
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    assert_powered_off(&out);
    assert_disk_has_pattern(&disk, size);
}

#[test]
fn all_self_tests_without_devices_test_console_and_reset() {
    require_kvm!();
    // The console is always there, and so is something to reset; blk, rng
    // and net run only for devices the Launcher was given.
    let out = boot(&[], "test=all");
    for name in CORE_TESTS.iter().chain(&["console", "reset"]) {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    for absent in ["blk", "rng", "net"] {
        assert_not_run(&out, absent);
    }
    out.assert_stdout_line("lguest-guest: all 14 tests passed");
    assert!(!out.stdout.contains("FAIL"), "{}", out.describe());
    assert_powered_off(&out);
}

#[test]
fn blk_self_test() {
    require_kvm!();
    let size = 4 << 20;
    let disk = TempFile::new("blk-disk", &vec![0; size]);
    let out = boot(&[&block_arg(&disk, false)], "test=blk");
    assert_tests_passed(&out, &["blk"]);
    assert_disk_has_pattern(&disk, size);
}

#[test]
fn rng_self_test() {
    require_kvm!();
    assert_tests_passed(&boot(&["--rng"], "test=rng"), &["rng"]);
}

#[test]
fn console_self_test() {
    require_kvm!();
    assert_tests_passed(&boot(&[], "test=console"), &["console"]);
}

#[test]
fn reset_self_test() {
    require_kvm!();
    assert_tests_passed(&boot(&[], "test=reset"), &["reset"]);
}

#[test]
fn reset_self_test_with_every_device_but_net() {
    require_kvm!();
    // Reset with more devices on the bus, then the devices still work.
    let disk = TempFile::new("reset-disk", &vec![0; 1 << 20]);
    let out = boot(
        &[&block_arg(&disk, false), "--rng"],
        "test=reset,blk,rng,console",
    );
    assert_tests_passed(&out, &["reset", "blk", "rng", "console"]);
}

#[test]
fn read_only_disk_passes_blk_and_is_left_alone() {
    require_kvm!();
    // The blk test finds the disk read-only (VIRTIO_BLK_F_RO), checks that a
    // write fails, and must not change a byte.
    let contents = other_pattern(1 << 20, 0x5A);
    let disk = TempFile::new("ro-disk", &contents);
    let out = boot(&[&block_arg(&disk, true)], "test=blk");
    assert_tests_passed(&out, &["blk"]);
    assert_disk_unchanged(&disk, &contents);
}

#[test]
fn two_disks_both_are_tested() {
    require_kvm!();
    // The Guest drives every disk it finds, and `test=blk` checks each.
    let size = 1 << 20;
    let first = TempFile::new("two-disks-a", &vec![0; size]);
    let second = TempFile::new("two-disks-b", &other_pattern(2 << 20, 0xA5));
    let out = boot(
        &[&block_arg(&first, false), &block_arg(&second, false)],
        "test=blk",
    );
    assert_tests_passed(&out, &["blk"]);
    assert_blk_checked(&out, "lguest-disk0", false);
    assert_blk_checked(&out, "lguest-disk1", false);
    assert_disk_has_pattern(&first, size);
    assert_disk_has_pattern(&second, 2 << 20);
}

#[test]
fn two_disks_one_read_only_both_checked() {
    require_kvm!();
    // A writable disk gets the full test; the read-only one the read-only
    // checks (a write must fail with IOERR), and keeps every byte.
    let size = 1 << 20;
    let writable = TempFile::new("rw-and-ro-a", &vec![0; size]);
    let contents = other_pattern(1 << 20, 0x3C);
    let read_only = TempFile::new("rw-and-ro-b", &contents);
    let out = boot(
        &[&block_arg(&writable, false), &block_arg(&read_only, true)],
        "test=blk",
    );
    assert_tests_passed(&out, &["blk"]);
    assert_blk_checked(&out, "lguest-disk0", false);
    assert_blk_checked(&out, "lguest-disk1", true);
    assert_disk_has_pattern(&writable, size);
    assert_disk_unchanged(&read_only, &contents);
}

#[test]
fn every_disk_is_driven_at_the_prompt() {
    require_kvm!();
    // Without tests, the Guest still brings up every disk: each says
    // DRIVER_OK (status 0x7) in the list it prints at boot.
    let first = TempFile::new("driven-a", &vec![0; 1 << 20]);
    let second = TempFile::new("driven-b", &vec![0; 1 << 20]);
    let out = run(lguest().args([block_arg(&first, false), block_arg(&second, true)]));
    out.assert_no_panic().assert_code(0);
    let disks: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("lguest-guest: virtio: block at "))
        .collect();
    assert_eq!(
        disks.len(),
        2,
        "expected two disks listed\n{}",
        out.describe()
    );
    for line in disks {
        assert!(
            line.contains("; status 0x7;"),
            "a disk was not brought up: {line:?}\n{}",
            out.describe()
        );
    }
}

/*
 * The console, driven from outside.
 */

/// The bundled Guest with `--append CMDLINE` (if any), stdin piped.
fn start(devices: &[&str], cmdline: Option<&str>) -> Session {
    let mut cmd = lguest();
    cmd.args(devices);
    if let Some(cmdline) = cmdline {
        cmd.args(["--append", cmdline]);
    }
    Session::start(&mut cmd)
}

/// Waits until the prompt has been printed `n` times in all.
fn wait_for_prompts(session: &mut Session, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while session.stdout_so_far().matches("lguest> ").count() < n {
        if std::time::Instant::now() >= deadline {
            panic!(
                "expected the prompt `lguest> ` {n} times\n{}",
                session.describe_so_far()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until stdout has a line equal to `line` (ignoring trailing
/// whitespace): the output of a command, not the echo of the command typed.
fn wait_for_line(session: &mut Session, line: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while !session
        .stdout_so_far()
        .lines()
        .any(|l| l.trim_end() == line)
    {
        if std::time::Instant::now() >= deadline {
            panic!(
                "expected the line {line:?} on stdout\n{}",
                session.describe_so_far()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn console_input_through_a_pipe() {
    require_kvm!();
    let mut guest = start(&[], Some("test=console console-input=1"));
    guest.send("lguest-console-test\n");
    guest.expect_stdout("lguest-guest: console got: lguest-console-test", WAIT);
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: console got: lguest-console-test");
    assert_tests_passed(&out, &["console"]);
}

#[test]
fn console_input_split_across_writes() {
    require_kvm!();
    // The line arrives in pieces, with pauses: the Guest must put it together
    // from several receive buffers.
    let mut guest = start(&[], Some("test=console console-input=1"));
    for piece in ["lguest-", "console", "-test", "\n"] {
        guest.send(piece);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic()
        .assert_stdout_line("lguest-guest: console got: lguest-console-test");
    assert_tests_passed(&out, &["console"]);
}

#[test]
fn prompt_runs_echo_and_poweroff() {
    require_kvm!();
    let mut guest = start(&[], None);
    wait_for_prompts(&mut guest, 1);
    guest.send("echo hello-prompt\n");
    wait_for_prompts(&mut guest, 2);
    // stdin stays open: the power off must come from the command, not from
    // end of input.
    guest.send("poweroff\n");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic();
    out.assert_greeting();
    // The typed line comes back (the Guest echoes), then echo's output on a
    // line of its own.
    out.assert_stdout_contains("echo hello-prompt");
    out.assert_stdout_line("hello-prompt");
    assert_powered_off(&out);
}

#[test]
fn prompt_help_and_devices() {
    require_kvm!();
    let disk = TempFile::new("prompt-disk", &vec![0; 1 << 20]);
    let mut guest = start(&[&block_arg(&disk, false), "--rng"], None);
    wait_for_prompts(&mut guest, 1);
    guest.send("help\n");
    wait_for_prompts(&mut guest, 2);
    // Nothing typed so far names these commands: help must.
    let help = guest.stdout_so_far();
    for command in ["echo", "devices", "poweroff"] {
        assert!(
            help.contains(command),
            "`help` does not mention {command:?}\n{}",
            guest.describe_so_far()
        );
    }
    guest.send("devices\n");
    wait_for_prompts(&mut guest, 3);
    // What `devices` printed: the text between the second prompt and the
    // third. It names each device on the bus.
    let listing = guest
        .stdout_so_far()
        .split("lguest> ")
        .nth(2)
        .unwrap_or_default()
        .to_string();
    for (what, names) in [
        ("the console", &["console"][..]),
        ("the disk", &["block", "blk"][..]),
        ("the rng", &["rng"][..]),
    ] {
        assert!(
            names.iter().any(|n| listing.contains(n)),
            "`devices` does not list {what}: {listing:?}\n{}",
            guest.describe_so_far()
        );
    }
    // The prompt still works after both.
    guest.send("echo after-devices\n");
    wait_for_prompts(&mut guest, 4);
    guest.send("poweroff\n");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_stdout_line("after-devices");
    assert_powered_off(&out);
}

#[test]
fn end_of_input_powers_off() {
    require_kvm!();
    // `run` gives the Launcher /dev/null as stdin: end of input at once, and
    // the Guest powers off because of it.
    let out = run(&mut lguest());
    out.assert_no_panic().assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line, "lguest: guest powered off: end of input");
    out.assert_stdout_contains("lguest-guest: Hello");
}

#[test]
fn end_of_input_with_every_device_but_net() {
    require_kvm!();
    let disk = TempFile::new("eof-disk", &vec![0; 1 << 20]);
    let out = run(lguest().args([block_arg(&disk, true).as_str(), "--rng"]));
    out.assert_no_panic().assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line, "lguest: guest powered off: end of input");
}

#[test]
fn closing_a_pipe_is_end_of_input() {
    require_kvm!();
    let mut guest = start(&[], None);
    wait_for_prompts(&mut guest, 1);
    guest.send("echo before-eof\n");
    wait_for_prompts(&mut guest, 2);
    guest.close_stdin();
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_stdout_line("before-eof");
    out.assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line, "lguest: guest powered off: end of input");
}

#[test]
fn commands_from_a_file() {
    require_kvm!();
    // A regular file can't be watched with epoll; it is read all the same,
    // then its end is the end of input.
    let input = TempFile::new("console-input", b"echo from-a-file\necho second-line\n");
    let file = File::open(input.path()).expect("opening the input file");
    let out = Session::start_with_stdin(&mut lguest(), Stdio::from(file)).finish(TIMEOUT);
    out.assert_no_panic()
        .assert_stdout_line("from-a-file")
        .assert_stdout_line("second-line");
    out.assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line, "lguest: guest powered off: end of input");
}

/// Boots the bundled Guest with `input` on a pipe that then closes, and
/// returns what happened: the prompt ran every line and powered off at
/// the end of input.
fn prompt_with_input(input: &str) -> Outcome {
    let mut guest = start(&[], None);
    wait_for_prompts(&mut guest, 1);
    guest.send(input);
    guest.close_stdin();
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line, "lguest: guest powered off: end of input");
    out
}

/// Panics if a line of stdout is exactly `line`.
fn assert_no_stdout_line(out: &Outcome, line: &str) {
    assert!(
        !out.stdout.lines().any(|l| l.trim_end() == line),
        "the line {line:?} should not be on stdout\n{}",
        out.describe()
    );
}

#[test]
fn prompt_ignores_escape_sequences() {
    require_kvm!();
    // The arrows (CSI A to D), a function key in SS3 form (ESC O P) and an
    // Alt-x (ESC x) are keys, not text: none of their bytes go into the
    // line or come back as echo.
    let out = prompt_with_input("echo \x1b[Aup\x1b[B\x1b[C\x1b[D\x1bOP\x1bxdown\n");
    out.assert_stdout_line("updown");
    for junk in ["[A", "[B", "[C", "[D", "OP", "\x1b"] {
        assert!(
            !out.stdout.contains(junk),
            "{junk:?} came back on stdout\n{}",
            out.describe()
        );
    }
}

#[test]
fn prompt_ctrl_c_cancels_the_line() {
    require_kvm!();
    // One Ctrl-C throws the line away, shows ^C and gives a new prompt.
    let out = prompt_with_input("echo cancelled\x03echo kept\n");
    out.assert_stdout_contains("echo cancelled^C\nlguest> echo kept\n")
        .assert_stdout_line("kept");
    assert_no_stdout_line(&out, "cancelled");
}

#[test]
fn prompt_takes_utf8() {
    require_kvm!();
    let out = prompt_with_input("echo h\u{e9}llo \u{1f980} \u{65e5}\u{672c}\n");
    out.assert_stdout_line("h\u{e9}llo \u{1f980} \u{65e5}\u{672c}");
}

#[test]
fn prompt_backspace_takes_a_whole_character() {
    require_kvm!();
    // Backspace after a two-byte character removes both bytes.
    let out = prompt_with_input("echo ab\u{e9}\x7fc\n");
    out.assert_stdout_line("abc");
}

#[test]
fn prompt_refuses_an_over_long_line() {
    require_kvm!();
    // Longer than the Guest's line: refused with a message, not cut and run.
    let long = "x".repeat(300);
    let out = prompt_with_input(&format!("echo {long}\necho after\n"));
    out.assert_stdout_contains("line too long")
        .assert_stdout_line("after");
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.trim_end().starts_with("xxxxxxxx")),
        "part of the over-long line ran\n{}",
        out.describe()
    );
}

#[test]
fn prompt_runs_a_last_line_without_a_newline() {
    require_kvm!();
    let out = prompt_with_input("echo first\necho last-line");
    out.assert_stdout_line("first")
        .assert_stdout_line("last-line");
}

#[test]
fn prompt_lines_end_in_crlf_on_a_terminal() {
    require_kvm!();
    // The terminal is stdin and stdout, as for a user: what its master reads
    // is what the user would see. The Guest ends lines with \n and the
    // terminal's output processing (left on in raw mode) makes it \r\n, once.
    use std::io::{Read, Write};
    let Pty { mut master, slave } = Pty::open();
    let child = lguest()
        .stdin(slave.try_clone().expect("dup of the pty slave"))
        .stdout(slave.try_clone().expect("dup of the pty slave"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lguest");
    let mut child = KillOnDrop(child);
    // From now on only the Launcher holds the slave: when it ends, reading
    // the master ends too, once everything it wrote has been read.
    drop(slave);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let mut master = master.try_clone().expect("dup of the pty master");
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = master.read(&mut buf) {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let wait_for = |what: &str, n: usize| {
        let deadline = std::time::Instant::now() + WAIT;
        while text().matches(what).count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "expected {what:?} {n} times on the terminal: {:?}",
                text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("lguest> ", 1);
    master.write_all(b"echo on-a-terminal\n").unwrap();
    wait_for("lguest> ", 2);
    master.write_all(b"poweroff\n").unwrap();
    let status = child.wait_within(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{:?}", text());
    let deadline = std::time::Instant::now() + WAIT;
    while !reader.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the terminal never closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = text();
    assert!(out.contains("\r\non-a-terminal\r\nlguest> "), "{out:?}");
    assert!(!out.contains("\r\r\n"), "a line ends in \\r\\r\\n: {out:?}");
    let bare = out
        .match_indices('\n')
        .filter(|&(i, _)| !out[..i].ends_with('\r'));
    assert_eq!(bare.count(), 0, "a line ends in a bare \\n: {out:?}");
}

/// A child that is killed if the test ends (or fails) while it runs.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// Waits for it to end, killing it and failing after `timeout`.
    fn wait_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("waiting for lguest") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "lguest did not end within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/*
 * A Guest that prints more than its stdout takes.
 */

/// `count` prompt commands `echo flood-NNNNN-xxx...`, about 100 bytes each:
/// the Guest echoes each as it is typed, then prints its words.
fn echo_lines(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("flood-{i:05}-{}", "x".repeat(90)))
        .collect()
}

/// Feeds `lines` as `echo` commands into `stdin` on a thread of its own,
/// then closes it (end of input). Writing waits while the Guest is held
/// back, and fails once the Launcher has gone; either way the thread ends
/// with the Launcher.
fn feed_echoes(mut stdin: File, lines: &[String]) -> std::thread::JoinHandle<()> {
    let text: String = lines.iter().map(|l| format!("echo {l}\n")).collect();
    std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(text.as_bytes());
    })
}

#[test]
fn three_ctrl_c_end_a_guest_whose_stdout_nobody_reads() {
    require_kvm!();
    // The Guest prints far more than a pipe and the Launcher's backlog hold,
    // into a pipe nobody reads: it is held back, and the vCPU thread must
    // not be stuck in write(), or Ctrl-C would never be looked at.
    let (stdout, stdout_w) = pipe();
    let probe = stdout_w.try_clone().unwrap();
    let (stdin_r, stdin_w) = pipe();
    let mut guest =
        Session::start_with_stdio(&mut lguest(), Stdio::from(stdin_r), Stdio::from(stdout_w));
    let feeder = feed_echoes(stdin_w, &echo_lines(20_000));
    guest.wait_until_stdout_full(probe);
    let sent = std::time::Instant::now();
    for _ in 0..3 {
        ctrl_c(guest.id());
    }
    assert!(sent.elapsed() < Duration::from_secs(1));
    let out = guest.finish(Duration::from_secs(10));
    out.assert_no_panic().assert_code(1);
    assert_eq!(
        out.single_stderr_line("lguest: guest killed: "),
        "lguest: guest killed: ended by the user (three Ctrl-C)"
    );
    feeder.join().unwrap();
    drop(stdout);
}

#[test]
fn a_slow_reader_gets_every_byte_in_order() {
    require_kvm!();
    // Output comes far faster than it is read, so the Launcher's backlog
    // fills and the Guest is held back again and again; at end of input it
    // powers off with output still waiting, which the Launcher writes out
    // before it exits.
    let (mut stdout, stdout_w) = pipe();
    let (stdin_r, stdin_w) = pipe();
    let guest =
        Session::start_with_stdio(&mut lguest(), Stdio::from(stdin_r), Stdio::from(stdout_w));
    let lines = echo_lines(3000);
    let feeder = feed_echoes(stdin_w, &lines);
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("reading the Launcher's stdout");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = guest.finish(TIMEOUT);
    feeder.join().unwrap();
    out.assert_no_panic();
    assert_powered_off(&out);
    let got = String::from_utf8(got).expect("the Guest prints ASCII");
    let (_, after_prompt) = got
        .split_once("lguest> ")
        .unwrap_or_else(|| panic!("no prompt in {} bytes of output", got.len()));
    // Each command is echoed as typed, then runs; end of input ends the line.
    let mut want: String = lines
        .iter()
        .map(|l| format!("echo {l}\n{l}\nlguest> "))
        .collect();
    want.push('\n');
    if after_prompt != want {
        let at = after_prompt
            .bytes()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(after_prompt.len().min(want.len()));
        let from = at.saturating_sub(100);
        panic!(
            "output differs at byte {at} after the first prompt ({} bytes, want {}):\n\
             got:  {:?}\nwant: {:?}",
            after_prompt.len(),
            want.len(),
            &after_prompt[from..(at + 100).min(after_prompt.len())],
            &want[from..(at + 100).min(want.len())]
        );
    }
}

/*
 * A terminal on stdin: a pseudo-terminal whose master the test holds.
 */

/// A pseudo-terminal pair.
struct Pty {
    master: File,
    slave: File,
}

impl Pty {
    fn open() -> Pty {
        // SAFETY: plain libc calls on a descriptor we own; ptsname_r writes at
        // most `name.len()` bytes into `name`.
        let (master, path) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            let master = <File as std::os::fd::FromRawFd>::from_raw_fd(fd);
            assert_eq!(libc::grantpt(fd), 0, "grantpt");
            assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
            let path = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned();
            (master, path)
        };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
        Pty { master, slave }
    }

    /// The slave's terminal mode: (iflag, oflag, cflag, lflag, cc).
    fn mode(&self) -> (u32, u32, u32, u32, Vec<u8>) {
        use std::os::fd::AsRawFd;
        // SAFETY: tcgetattr fills a termios we own.
        let t = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0);
            t
        };
        (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
    }

    fn lflag(&self) -> u32 {
        self.mode().3
    }

    /// Types `bytes` at the terminal.
    fn type_in(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.master.write_all(bytes).expect("writing to the pty");
    }

    /// The Launcher with the slave as its stdin.
    fn start(&self, cmd: &mut std::process::Command) -> Session {
        let stdin = self.slave.try_clone().expect("dup of the pty slave");
        Session::start_with_stdin(cmd, Stdio::from(stdin))
    }
}

const COOKED: u32 = libc::ICANON | libc::ECHO | libc::ISIG;

#[test]
fn three_ctrl_c_end_the_guest_and_restore_the_terminal() {
    require_kvm!();
    let mut pty = Pty::open();
    let before = pty.mode();
    assert_eq!(before.3 & COOKED, COOKED, "a new pty starts cooked");
    let mut guest = pty.start(&mut lguest());
    wait_for_prompts(&mut guest, 1);
    // The Guest is at its prompt, so the Launcher has made the terminal raw.
    assert_eq!(
        pty.lflag() & COOKED,
        0,
        "stdin is a terminal: the Launcher should have turned off ICANON, ECHO and ISIG"
    );
    pty.type_in(b"\x03\x03\x03");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(1);
    let line = out.single_stderr_line("lguest: guest killed: ");
    assert_eq!(
        line,
        "lguest: guest killed: ended by the user (three Ctrl-C)"
    );
    assert_eq!(pty.mode(), before, "the terminal mode was not restored");
}

#[test]
fn ctrl_c_slower_than_three_a_second_reach_the_guest() {
    require_kvm!();
    // Ctrl-C is a byte for the Guest; only three within a second end it.
    let mut pty = Pty::open();
    let before = pty.mode();
    let mut guest = pty.start(&mut lguest());
    wait_for_prompts(&mut guest, 1);
    pty.type_in(b"\x03");
    std::thread::sleep(Duration::from_millis(1200));
    pty.type_in(b"\x03");
    std::thread::sleep(Duration::from_millis(1200));
    pty.type_in(b"\x03");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !guest.describe_so_far().contains("guest killed"),
        "three Ctrl-C spread over more than a second ended the Guest\n{}",
        guest.describe_so_far()
    );
    pty.type_in(b"\necho still-alive\n");
    wait_for_line(&mut guest, "still-alive");
    pty.type_in(b"poweroff\n");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic();
    assert_powered_off(&out);
    assert_eq!(pty.mode(), before, "the terminal mode was not restored");
}

#[test]
fn terminal_restored_after_poweroff() {
    require_kvm!();
    let mut pty = Pty::open();
    let before = pty.mode();
    let mut guest = pty.start(&mut lguest());
    wait_for_prompts(&mut guest, 1);
    // On a raw terminal the Launcher does not echo: what comes back is the
    // Guest's own echo.
    pty.type_in(b"echo on-a-terminal\n");
    wait_for_prompts(&mut guest, 2);
    pty.type_in(b"poweroff\n");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_stdout_line("on-a-terminal");
    assert_powered_off(&out);
    assert_eq!(pty.mode(), before, "the terminal mode was not restored");
}

#[test]
fn terminal_restored_after_sudden_death() {
    require_kvm!();
    let pty = Pty::open();
    let before = pty.mode();
    let out = pty
        .start(lguest().args(["--append", "bad=virtio-addr"]))
        .finish(TIMEOUT);
    out.assert_no_panic().assert_code(1);
    out.single_stderr_line("lguest: guest killed: ");
    assert_eq!(pty.mode(), before, "the terminal mode was not restored");
}

#[test]
fn terminal_restored_after_sigterm() {
    require_kvm!();
    let pty = Pty::open();
    let before = pty.mode();
    let mut guest = pty.start(&mut lguest());
    wait_for_prompts(&mut guest, 1);
    assert_eq!(pty.lflag() & COOKED, 0, "the terminal should be raw by now");
    // SAFETY: a signal to the child we started, which has not been reaped.
    assert_eq!(unsafe { libc::kill(guest.id() as i32, libc::SIGTERM) }, 0);
    let out = guest.finish(TIMEOUT);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTERM),
        "the Launcher should die of the SIGTERM\n{}",
        out.describe()
    );
    assert_eq!(pty.mode(), before, "the terminal mode was not restored");
}

/*
 * Sudden Death for Guests that break the ring rules.
 */

/// Boots the Guest with `bad=CASE` (a broken chain on the console's transmit
/// queue) and checks the Host killed it with a reason naming that queue and
/// containing `why`.
fn killed_on_console_tx(case: &str, why: &str) {
    let out = run(lguest().args(["--append", &format!("bad={case}")]));
    out.assert_no_panic().assert_code(1);
    let prefix = "lguest: guest killed: console queue 1 (tx): ";
    let line = out.single_stderr_line(prefix);
    assert!(
        line[prefix.len()..].contains(why),
        "bad={case}: expected the reason to contain {why:?}, got {line:?}\n{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("tests passed"),
        "bad={case}: the Guest went on after Sudden Death\n{}",
        out.describe()
    );
}

macro_rules! virtio_sudden_death {
    ($($test:ident: $case:literal => $why:literal,)*) => {
        $(
            #[test]
            fn $test() {
                require_kvm!();
                killed_on_console_tx($case, $why);
            }
        )*
    };
}

virtio_sudden_death! {
    // A buffer whose address is past the end of the Guest's memory.
    virtio_buffer_outside_memory: "virtio-addr" => "outside guest memory",
    // A chain whose next pointers go round in a circle.
    virtio_chain_loops: "virtio-loop" => "loops",
    // A chain (through an indirect table) longer than the ring.
    virtio_chain_longer_than_ring: "virtio-long" => "longer than the ring",
    // The avail index moved on by more than the ring holds.
    virtio_avail_index_jumps: "virtio-avail" => "avail index jumped",
    // A descriptor index past the end of the ring.
    virtio_descriptor_index_out_of_range: "virtio-index" => "out of range",
}
