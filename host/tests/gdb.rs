//! `lguest --gdb`: the real binary under the real gdb, in batch mode.
//!
//! Each test writes the bundled Guest's ELF with `lguest --write-guest`,
//! starts `lguest --gdb=127.0.0.1:0` (the Launcher picks a free port and says
//! which on stderr), and runs `gdb -batch -nx ELF -ex 'target remote ...'`
//! with the commands of the test. Both processes are killed however the test
//! ends. Without gdb the tests print `SKIPPED: gdb not installed` and pass,
//! except under `LGUEST_REQUIRE_KVM=1`, where they fail.

#[macro_use]
mod common;

use common::*;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Whether `gdb` can be run (checked once per test binary).
fn gdb_available() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        Command::new("gdb")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        if std::env::var("LGUEST_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("LGUEST_REQUIRE_KVM=1 but gdb cannot be run (apt-get install gdb)");
        }
        println!("SKIPPED: gdb not installed");
    }
    found
}

macro_rules! require_gdb {
    () => {
        require_kvm!();
        if !gdb_available() {
            return;
        }
    };
}

/// A process with its stdout and stderr going to files (so what it printed
/// can be read at any time), killed when dropped if still running.
struct Proc {
    child: Child,
    what: String,
    stdout: TempFile,
    stderr: TempFile,
}

impl Proc {
    fn start(cmd: &mut Command, name: &str, stdin: Stdio) -> Proc {
        let stdout = TempFile::new(&format!("{name}.out"), b"");
        let stderr = TempFile::new(&format!("{name}.err"), b"");
        let open = |f: &TempFile| File::create(f.path()).expect("output file");
        let child = cmd
            .stdin(stdin)
            .stdout(open(&stdout))
            .stderr(open(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child,
            what: format!("{cmd:?}"),
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.stdout.path()).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.what,
            self.stdout(),
            self.stderr()
        )
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `test` holds for what it printed; panics (showing
    /// `others` too) if it ends first or TIMEOUT passes.
    fn wait_for(&mut self, what: &str, test: impl Fn(&Proc) -> bool, others: &[&Proc]) {
        let deadline = Instant::now() + TIMEOUT;
        while !test(self) {
            if !self.running() {
                thread::sleep(Duration::from_millis(50));
                if test(self) {
                    return;
                }
            }
            if !self.running() || Instant::now() >= deadline {
                panic!(
                    "never saw {what}\n{}\n{}",
                    self.describe(),
                    others
                        .iter()
                        .map(|p| p.describe())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for it to end; panics (showing `others` too) after TIMEOUT.
    fn finish(&mut self, others: &[&Proc]) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a child") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "did not finish within {TIMEOUT:?}\n{}\n{}",
                    self.describe(),
                    others
                        .iter()
                        .map(|p| p.describe())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The bundled reference Guest's ELF, as `lguest --write-guest` writes it.
fn guest_elf(name: &str) -> TempFile {
    guest_elf_of(name, "reference")
}

/// A bundled Guest's ELF (`--guest=WHICH`).
fn guest_elf_of(name: &str, which: &str) -> TempFile {
    let elf = TempFile::new(&format!("{name}.elf"), b"");
    let out = run(lguest()
        .arg(format!("--write-guest={}", elf.arg()))
        .arg(format!("--guest={which}")));
    out.assert_no_panic().assert_code(0);
    assert!(out.stderr.is_empty(), "{}", out.describe());
    let bytes = std::fs::read(elf.path()).expect("the written ELF");
    assert!(bytes.starts_with(b"\x7fELF"), "not an ELF");
    elf
}

/// `lguest --gdb=127.0.0.1:0 ARGS`, and the port it listens on.
fn start_lguest(name: &str, args: &[&str], stdin: Stdio) -> (Proc, u16) {
    let mut proc = Proc::start(
        lguest().arg("--gdb=127.0.0.1:0").args(args),
        &format!("{name}.lguest"),
        stdin,
    );
    const WAITING: &str = "lguest: waiting for gdb on ";
    proc.wait_for(
        "the Launcher listening",
        |p| p.stderr().contains(WAITING),
        &[],
    );
    let stderr = proc.stderr();
    let line = stderr
        .lines()
        .find(|l| l.starts_with(WAITING))
        .expect("seen");
    let addr: std::net::SocketAddr = line[WAITING.len()..]
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    assert!(addr.ip().is_loopback(), "{line}");
    (proc, addr.port())
}

/// `gdb -batch` on `elf`, attached to `port` (if any), running `commands`.
fn gdb(name: &str, elf: &Path, port: Option<u16>, commands: &[&str]) -> Proc {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-q"]).arg(elf);
    if let Some(port) = port {
        cmd.args(["-ex", &format!("target remote 127.0.0.1:{port}")]);
    }
    for c in commands {
        cmd.args(["-ex", c]);
    }
    Proc::start(&mut cmd, &format!("{name}.gdb"), Stdio::null())
}

/// What gdb printed, all of it, once it has finished by itself.
fn gdb_output(gdb: &mut Proc, others: &[&Proc]) -> String {
    let status = gdb.finish(others);
    assert!(
        status.success(),
        "gdb failed\n{}\n{}",
        gdb.describe(),
        others
            .iter()
            .map(|p| p.describe())
            .collect::<Vec<_>>()
            .join("\n")
    );
    gdb.stdout() + &gdb.stderr()
}

/// The value after `label` in a `printf "label %lx\n"` line of gdb's.
fn hex_after(output: &str, label: &str) -> u64 {
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line in gdb's output:\n{output}"));
    u64::from_str_radix(line.trim(), 16).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// The last line the Launcher wrote on stderr: how the Guest ended, as
/// without gdb. The only other line is the one saying where it listened.
fn ending(lguest: &Proc) -> String {
    let stderr = lguest.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "{}", lguest.describe());
    assert!(lines[0].starts_with("lguest: waiting for gdb on "));
    lines[1].to_string()
}

#[test]
fn break_read_step_write_and_detach() {
    require_gdb!();
    let elf = guest_elf("basics");
    // Where kmain is, and its first bytes, from the file alone.
    let mut offline = gdb(
        "basics-offline",
        elf.path(),
        None,
        &["printf \"kmain %lx\\n\", &kmain", "x/8xb kmain"],
    );
    let file = gdb_output(&mut offline, &[]);
    let kmain = hex_after(&file, "kmain ");
    let file_bytes = file
        .lines()
        .find(|l| l.contains("<kmain>:"))
        .expect("x/8xb from the file")
        .to_string();

    let (mut lguest, port) = start_lguest("basics", &[], Stdio::null());
    let mut session = gdb(
        "basics",
        elf.path(),
        Some(port),
        &[
            "printf \"start %lx\\n\", $pc",
            "break kmain",
            "continue",
            "printf \"at %lx\\n\", $pc",
            "info registers",
            // In a Rust frame gdb looks kmain up in its module; C finds the
            // plain symbol.
            "set language c",
            "x/8xb kmain",
            "stepi",
            "printf \"step1 %lx\\n\", $pc",
            "stepi",
            "printf \"step2 %lx\\n\", $pc",
            "info registers eflags",
            // The greeting, found in the Guest's memory, changed there.
            "set language c",
            "find /b 0x100000, +0x100000, 'H','e','l','l','o',' ','f','r','o','m'",
            "set {char}$_ = 'J'",
            "detach",
        ],
    );
    let out = gdb_output(&mut session, &[&lguest]);
    let status = lguest.finish(&[&session]);

    // Attached before the first instruction: the ELF's entry point, _start.
    let entry = u64::from_le_bytes(
        std::fs::read(elf.path()).unwrap()[24..32]
            .try_into()
            .unwrap(),
    );
    assert_eq!(hex_after(&out, "start "), entry, "{out}");
    assert!(out.contains("Breakpoint 1, kmain ()"), "{out}");
    // gdb put the breakpoint past kmain's prologue, and we stopped on it.
    let at = hex_after(&out, "at ");
    assert!(at > kmain && at < kmain + 64, "stopped at {at:#x}\n{out}");
    assert!(out.contains(&format!("Breakpoint 1 at {at:#x}")), "{out}");
    for reg in [
        "rax", "rsp", "r15", "rip", "eflags", "cs", "ss", "fs_base", "gs_base",
    ] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(reg)),
            "no {reg} in info registers\n{out}"
        );
    }
    assert!(out.contains("cs             0x33"), "{out}");
    // The Guest's memory holds what the file does (and no int3 of ours).
    let live_bytes = out
        .lines()
        .find(|l| l.contains("<kmain>:"))
        .expect("x/8xb live");
    assert_eq!(live_bytes, file_bytes, "{out}");
    // Two single steps: two instructions further, each somewhere new.
    let (s1, s2) = (hex_after(&out, "step1 "), hex_after(&out, "step2 "));
    assert!(s1 != at && s2 != s1, "{at:#x} -> {s1:#x} -> {s2:#x}\n{out}");
    let eflags = out
        .lines()
        .find(|l| l.starts_with("eflags"))
        .expect("eflags");
    assert!(!eflags.contains("TF"), "the step's TF is left: {eflags}");
    assert!(out.contains("1 pattern found."), "{out}");
    assert!(out.contains("[Inferior 1 (process 1) detached]"), "{out}");

    // Detached, the Guest runs on, with the changed greeting.
    assert_eq!(status.code(), Some(0), "{}", lguest.describe());
    assert!(
        lguest
            .stdout()
            .contains("lguest-guest: Jello from the reference Guest"),
        "{}",
        lguest.describe()
    );
    assert_eq!(ending(&lguest), "lguest: guest powered off: end of input");
}

#[test]
fn breakpoint_in_a_loop_on_a_rewritten_hypercall_site() {
    require_gdb!();
    // The benchmark loops are in the Guest that carries the tests.
    let elf = guest_elf_of("loop", "tests");
    let mut offline = gdb(
        "loop-offline",
        elf.path(),
        None,
        &["info address lguest_bench_hcall_site"],
    );
    let info = gdb_output(&mut offline, &[]);
    let site = info
        .split("is at 0x")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("no address in {info:?}"));

    // bench=hcall makes five hypercalls through one site: the first an
    // `int $0x1f`, which the Host then rewrites into `out %al,$0x1f`. The
    // benchmark writes `int $0x1f` there first, so the breakpoint goes in
    // once it has (at lguest_bench_hcall, a temporary breakpoint).
    let (mut lguest, port) =
        start_lguest("loop", &["--append", "bench=hcall iters=5"], Stdio::null());
    let peek = format!("maint packet m{site:x},2");
    let mut session = gdb(
        "loop",
        elf.path(),
        Some(port),
        &[
            "tbreak lguest_bench_hcall",
            "continue",
            "break lguest_bench_hcall_site",
            "continue",
            "x/2xb $pc",
            "continue",
            "x/2xb $pc",
            "continue",
            "x/2xb $pc",
            "info breakpoints",
            // With the int3 left in, the stub still reads the Guest's byte.
            "set breakpoint always-inserted on",
            &peek,
            "set breakpoint always-inserted off",
            "delete",
            "continue",
        ],
    );
    let out = gdb_output(&mut session, &[&lguest]);
    let status = lguest.finish(&[&session]);

    assert!(out.contains("Temporary breakpoint 1, "), "{out}");
    assert_eq!(
        out.matches("Breakpoint 2, 0x").count(),
        3,
        "three hits of the loop's breakpoint\n{out}"
    );
    let bytes: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("<lguest_bench_hcall_site>:"))
        .collect();
    assert_eq!(bytes.len(), 3, "{out}");
    assert!(bytes[0].ends_with("0xcd\t0x1f"), "first: int $0x1f\n{out}");
    assert!(
        bytes[1].ends_with("0xe6\t0x1f"),
        "then: out %al,$0x1f\n{out}"
    );
    assert!(bytes[2].ends_with("0xe6\t0x1f"), "{out}");
    assert!(out.contains("breakpoint already hit 3 times"), "{out}");
    assert!(out.contains("received: \"e61f\""), "{out}");
    // Powered off under gdb: gdb is told the exit status.
    assert!(
        out.contains("[Inferior 1 (process 1) exited normally]"),
        "{out}"
    );
    assert_eq!(status.code(), Some(0), "{}", lguest.describe());
    assert!(
        lguest.stdout().contains("lguest-bench: hcall iters=5 "),
        "{}",
        lguest.describe()
    );
    assert_eq!(
        ending(&lguest),
        "lguest: guest powered off: benchmark finished"
    );
}

#[test]
fn ctrl_c_stops_a_running_guest_and_detach_lets_it_run_on() {
    require_gdb!();
    let elf = guest_elf("ctrlc");
    let (mut lguest, port) = start_lguest("ctrlc", &[], Stdio::piped());
    let mut stdin = lguest.child.stdin.take().expect("piped stdin");
    let mut session = gdb(
        "ctrlc",
        elf.path(),
        Some(port),
        &[
            "continue",
            "printf \"stopped %lx\\n\", $pc",
            "info registers eflags",
            "detach",
        ],
    );
    // At its prompt, the Guest is running (and waiting for input).
    lguest.wait_for(
        "the prompt",
        |p| p.stdout().contains("lguest> "),
        &[&session],
    );
    let gdb_pid = session.child.id() as i32;
    // SAFETY: a signal to the gdb we started, still running (it is waiting
    // for the Guest to stop).
    assert_eq!(unsafe { libc::kill(gdb_pid, libc::SIGINT) }, 0);
    let out = gdb_output(&mut session, &[&lguest]);
    assert!(out.contains("Program received signal SIGINT"), "{out}");
    let pc = hex_after(&out, "stopped ");
    assert!(
        (0x10_0000..0x20_0000).contains(&pc),
        "stopped at {pc:#x}\n{out}"
    );
    assert!(out.contains("[Inferior 1 (process 1) detached]"), "{out}");

    // Detached, the Guest still answers, and powers off on request.
    use std::io::Write;
    stdin
        .write_all(b"echo still here\npoweroff\n")
        .expect("write to the Guest");
    let status = lguest.finish(&[&session]);
    assert!(
        lguest.stdout().contains("still here\n"),
        "{}",
        lguest.describe()
    );
    assert_eq!(status.code(), Some(0), "{}", lguest.describe());
    assert_eq!(
        ending(&lguest),
        "lguest: guest powered off: poweroff command"
    );
}

#[test]
fn sudden_death_under_gdb() {
    require_gdb!();
    let elf = guest_elf("death");
    let (mut lguest, port) = start_lguest("death", &["--append", "bad=hypercall"], Stdio::null());
    let mut session = gdb("death", elf.path(), Some(port), &["continue"]);
    let out = gdb_output(&mut session, &[&lguest]);
    let status = lguest.finish(&[&session]);
    assert!(
        out.contains("Program terminated with signal SIGKILL"),
        "{out}"
    );
    assert_eq!(status.code(), Some(1), "{}", lguest.describe());
    assert_eq!(ending(&lguest), "lguest: guest killed: Bad hypercall 99");
}

#[test]
fn bad_addresses_are_errors_and_kill_ends_the_guest() {
    require_gdb!();
    let elf = guest_elf("badaddr");
    let (mut lguest, port) = start_lguest("badaddr", &[], Stdio::null());
    let mut session = gdb(
        "badaddr",
        elf.path(),
        Some(port),
        &[
            "set language c",
            // The Host's pages, through the upper half.
            "x/4xb 0xffffff8000000000",
            "set {int}0xffffff8000000000 = 1",
            // Far past the Guest's memory (64 MiB here).
            "x/4xb 0x40000000",
            // Registers the Guest could not run with.
            "set $rip = 0xffffff8000000000",
            "set $cs = 0x10",
            // The session is still good.
            "x/2xb 0x100000",
            "kill",
        ],
    );
    let out = gdb_output(&mut session, &[&lguest]);
    let status = lguest.finish(&[&session]);
    assert_eq!(
        out.matches("Cannot access memory at address 0xffffff8000000000")
            .count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("Cannot access memory at address 0x40000000"),
        "{out}"
    );
    assert_eq!(
        out.matches("remote failure reply 'E16'").count(),
        2,
        "{out}"
    );
    assert!(out.contains("0x100000 <_start>:\t0x"), "{out}");
    assert!(out.contains("[Inferior 1 (process 1) killed]"), "{out}");
    assert_eq!(status.code(), Some(1), "{}", lguest.describe());
    assert_eq!(ending(&lguest), "lguest: guest killed: killed by gdb");
}

#[test]
fn bad_gdb_addresses_and_files_are_set_up_errors() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().unwrap().port();
    for (arg, why) in [
        ("--gdb=nonsense".to_string(), "expected PORT or ADDR:PORT"),
        (
            "--gdb=127.0.0.1:99999".to_string(),
            "expected PORT or ADDR:PORT",
        ),
        (format!("--gdb={port}"), "cannot listen on 127.0.0.1:"),
        (
            "--write-guest=/nonexistent-dir/guest.elf".to_string(),
            "cannot write the Guest to /nonexistent-dir/guest.elf",
        ),
    ] {
        let out = run(lguest().arg(&arg));
        out.assert_no_panic().assert_code(2);
        let line = out.single_stderr_line("lguest: ");
        assert!(line.contains(why), "{arg}: {line}");
    }
    // The two bundled Guests are two different ELFs.
    let reference = guest_elf("reference");
    let drivers = TempFile::new("drivers.elf", b"");
    run(lguest().args([
        "--guest=drivers",
        &format!("--write-guest={}", drivers.arg()),
    ]))
    .assert_code(0);
    let (a, b) = (
        std::fs::read(reference.path()).unwrap(),
        std::fs::read(drivers.path()).unwrap(),
    );
    assert!(b.starts_with(b"\x7fELF") && a != b);
}

/// A kernel of a few instructions with an `int3` of its own and a #BP gate
/// that checks the frame the Host built: it powers off with "own int3
/// handled", or crashes saying what it saw. Before the `int3`, a `pushf`
/// whose flags it checks for TF. Returns the ELF and the addresses of the
/// `pushf`, the `int3` and the handler.
fn int3_kernel() -> (Vec<u8>, u64, u64, u64) {
    use lguest_abi::{hcall, lguest_data_off, HCALL_RING_SIZE};
    const BASE: u64 = 0x10_0000;
    const DATA: u64 = BASE + 0x1000;
    const TEXT: u64 = BASE + 0x2000;
    const STACK_TOP: u64 = BASE + 0x4000;
    let messages: [&[u8]; 4] = [
        b"own int3 handled\0",
        b"the int3 came back\0",
        b"TF in the frame\0",
        b"pushf saw TF\0",
    ];
    let msg = |i: usize| TEXT + 0x40 * i as u64;
    let mut c: Vec<u8> = Vec::new();
    let hypercall = |c: &mut Vec<u8>, nr: u64, arg1: u64, arg2: u64| {
        c.push(0xB8); // mov eax, nr
        c.extend_from_slice(&(nr as u32).to_le_bytes());
        c.push(0xBA); // mov edx, arg1
        c.extend_from_slice(&(arg1 as u32).to_le_bytes());
        c.extend_from_slice(&[0x48, 0xBB]); // mov rbx, arg2
        c.extend_from_slice(&arg2.to_le_bytes());
        c.extend_from_slice(&[0xCD, 0x1F]); // int $0x1f
    };
    // mov rsp, STACK_TOP
    c.extend_from_slice(&[0x48, 0xC7, 0xC4]);
    c.extend_from_slice(&(STACK_TOP as u32).to_le_bytes());
    hypercall(&mut c, hcall::LGUEST_INIT, DATA, 0);
    // LOAD_IDT_ENTRY(3, gate): the gate's offset is patched in below.
    c.extend_from_slice(&[0x48, 0xB9]); // mov rcx, high half (offset >> 32 = 0)
    c.extend_from_slice(&0u64.to_le_bytes());
    // mov rbx's imm64, after `mov eax` and `mov edx` (5 bytes each) and 48 BB.
    let gate_at = c.len() + 12;
    hypercall(&mut c, hcall::LOAD_IDT_ENTRY, 3, 0);
    let pushf = BASE + c.len() as u64;
    c.extend_from_slice(&[0x9C, 0x58]); // pushf; pop rax
    c.extend_from_slice(&[0xA9, 0x00, 0x01, 0x00, 0x00]); // test eax, 0x100
    c.extend_from_slice(&[0x74, 22]); // jz over the crash (a hypercall: 22 bytes)
    hypercall(&mut c, hcall::SHUTDOWN, msg(3), 3);
    let int3 = BASE + c.len() as u64;
    c.push(0xCC);
    hypercall(&mut c, hcall::SHUTDOWN, msg(1), 3);
    c.extend_from_slice(&[0xEB, 0xFE]); // jmp .
    let handler = BASE + c.len() as u64;
    // test qword [rsp + 16], 0x100: TF in the frame's RFLAGS
    c.extend_from_slice(&[0x48, 0xF7, 0x44, 0x24, 0x10, 0x00, 0x01, 0x00, 0x00]);
    c.extend_from_slice(&[0x74, 22]); // jz over the crash
    hypercall(&mut c, hcall::SHUTDOWN, msg(2), 3);
    hypercall(&mut c, hcall::SHUTDOWN, msg(0), 1);
    c.extend_from_slice(&[0xEB, 0xFE]);
    // A present trap gate (type 0xF) to the handler.
    let gate = (handler & 0xFFFF) | (0x33 << 16) | (0x8F << 40) | ((handler >> 16) & 0xFFFF) << 48;
    c[gate_at..gate_at + 8].copy_from_slice(&gate.to_le_bytes());
    assert!(c.len() < 0x1000);

    let mut image = vec![0u8; 0x3000];
    image[..c.len()].copy_from_slice(&c);
    // Every async slot free, as the ABI wants before LGUEST_INIT.
    let status = 0x1000 + lguest_data_off::HCALL_STATUS;
    image[status..status + HCALL_RING_SIZE].fill(0xFF);
    for (i, m) in messages.iter().enumerate() {
        let at = (msg(i) - BASE) as usize;
        image[at..at + m.len()].copy_from_slice(m);
    }
    let elf = elf64(
        ET_EXEC,
        EM_X86_64,
        BASE,
        &[Segment {
            addr: BASE,
            data: image,
            memsz: STACK_TOP - BASE,
        }],
    );
    (elf, pushf, int3, handler)
}

#[test]
fn the_guests_own_int3_and_pushf_stepped_under_gdb() {
    require_gdb!();
    let (image, pushf, int3, handler) = int3_kernel();
    let kernel = TempFile::new("own-int3.elf", &image);
    // Without gdb: the kernel's checks pass on their own.
    let plain = run(lguest().args(["16", kernel.arg()]));
    plain.assert_code(0);
    assert_eq!(
        plain.single_stderr_line("lguest: "),
        "lguest: guest powered off: own int3 handled"
    );

    // Stepped by gdb: the pushf and what tests its result, then the int3,
    // which goes to the Guest's own handler. (No breakpoint of ours goes on
    // the int3 itself: gdb would take it for a breakpoint compiled into the
    // program and step over it without running it.)
    let args = ["16", kernel.arg()];
    let (mut lguest, port) = start_lguest("own-int3", &args, Stdio::null());
    let break_pushf = format!("break *{pushf:#x}");
    let peek = format!("x/1xb {int3:#x}");
    let mut session = gdb(
        "own-int3",
        kernel.path(),
        Some(port),
        &[
            &break_pushf,
            "continue",
            "stepi 4",
            "printf \"before %lx\\n\", $pc",
            &peek,
            "stepi",
            "printf \"handler %lx\\n\", $pc",
            "printf \"frame %lx %lx\\n\", *(long *)$sp, *(long *)($sp + 16)",
            "continue",
        ],
    );
    let out = gdb_output(&mut session, &[&lguest]);
    let status = lguest.finish(&[&session]);
    assert_eq!(hex_after(&out, "before "), int3, "{out}");
    assert!(out.contains(&format!("{int3:#x}:\t0xcc")), "{out}");
    assert_eq!(hex_after(&out, "handler "), handler, "{out}");
    let frame = out
        .lines()
        .find_map(|l| l.strip_prefix("frame "))
        .unwrap_or_else(|| panic!("{out}"));
    let words: Vec<u64> = frame
        .split_whitespace()
        .map(|w| u64::from_str_radix(w, 16).unwrap())
        .collect();
    assert_eq!(words[0], int3 + 1, "#BP's RIP is after the int3\n{out}");
    assert_eq!(
        words[1] & 0x100,
        0,
        "TF in the frame: {:#x}\n{out}",
        words[1]
    );
    assert!(
        out.contains("[Inferior 1 (process 1) exited normally]"),
        "{out}"
    );
    assert_eq!(status.code(), Some(0), "{}", lguest.describe());
    assert_eq!(
        ending(&lguest),
        "lguest: guest powered off: own int3 handled"
    );

    // Running under gdb, not stepped: the int3 reaches the handler, where a
    // breakpoint of ours waits.
    let (mut lguest, port) = start_lguest("own-int3-run", &args, Stdio::null());
    let break_handler = format!("break *{handler:#x}");
    let mut session = gdb(
        "own-int3-run",
        kernel.path(),
        Some(port),
        &[&break_handler, "continue", "continue"],
    );
    let out = gdb_output(&mut session, &[&lguest]);
    let status = lguest.finish(&[&session]);
    assert!(
        out.contains(&format!("Breakpoint 1, {handler:#018x}")),
        "{out}"
    );
    assert!(
        out.contains("[Inferior 1 (process 1) exited normally]"),
        "{out}"
    );
    assert_eq!(status.code(), Some(0), "{}", lguest.describe());
    assert_eq!(
        ending(&lguest),
        "lguest: guest powered off: own int3 handled"
    );
}
