//! The sandbox: `--username` and `--chroot` (the Launcher drops to a user
//! and a root directory once set-up is done, and the Guest, its devices and
//! its restarts still work), and the seccomp filters on every thread
//! (`--no-seccomp` turns them off; a call off a thread's list kills the
//! Launcher, and in trap mode says which).
//!
//! The drop needs root: without it those tests print `SKIPPED: not root`
//! and pass, unless `LGUEST_REQUIRE_KVM=1` (as in CI), when they fail. The
//! network card in the all-devices test needs what tests/network.rs needs;
//! without it the test runs with the other devices (again, unless
//! `LGUEST_REQUIRE_KVM=1`).

#[macro_use]
mod common;

use common::*;
use lguest::sandbox::{self, Enforcement, Filters, ThreadKind};
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a Guest may take to reach its prompt, or to end.
const STEP: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn required() -> bool {
    std::env::var("LGUEST_REQUIRE_KVM").as_deref() == Ok("1")
}

/// Returns from the calling test unless KVM is there and we are root.
macro_rules! require_root {
    () => {
        require_kvm!();
        if !is_root() {
            assert!(
                !required(),
                "LGUEST_REQUIRE_KVM=1 but the tests are not run as root"
            );
            println!("SKIPPED: not root");
            return;
        }
    };
}

/// A directory under the system temporary directory, removed (with what is
/// in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("lguest-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("make a temporary directory");
        TempDir(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A zeroed disk image of `mib` MiB.
fn disk(name: &str, mib: u64) -> TempFile {
    let file = TempFile::new(name, b"");
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .and_then(|f| f.set_len(mib << 20))
        .expect("size the disk image");
    file
}

/// One thread of a running process, from /proc/PID/task/TID.
#[derive(Debug)]
struct Task {
    tid: u32,
    comm: String,
    /// The status file's `Name:\tvalue` lines.
    status: Vec<(String, String)>,
}

impl Task {
    fn field(&self, name: &str) -> &str {
        self.status
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name}: line for thread {self:?}"))
    }
}

/// Every thread of process `pid`, as it is now.
fn tasks(pid: u32) -> Vec<Task> {
    let mut tasks = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task") {
        let dir = entry.expect("a task").path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // a thread that ended meanwhile
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        tasks.push(Task {
            tid: dir.file_name().unwrap().to_str().unwrap().parse().unwrap(),
            comm: comm.trim_end().to_string(),
            status: status
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.to_string(), v.trim().to_string()))
                .collect(),
        });
    }
    tasks
}

/// Waits for the bundled Guest's prompt, then for the Launcher's threads:
/// each of `want` there, and (when `own_filter` is given) each `lguest-*`
/// thread with that many filters, its own installed. A thread is started
/// before the prompt, but it may not have run yet: its name and its filter
/// come as it starts. Returns the threads as they are then (the caller
/// checks them, and so reports what never came).
fn threads_at_prompt(session: &mut Session, want: &[&str], own_filters: Option<&str>) -> Vec<Task> {
    session.expect_stdout("lguest> ", STEP);
    let deadline = Instant::now() + STEP;
    loop {
        let tasks = tasks(session.id());
        let named = |name: &str| tasks.iter().any(|t| t.comm == name);
        let settled = want.iter().all(|w| named(w))
            && own_filters.is_none_or(|n| {
                tasks
                    .iter()
                    .filter(|t| t.comm.starts_with("lguest-"))
                    .all(|t| t.field("Seccomp_filters") == n)
            });
        if settled || Instant::now() > deadline {
            return tasks;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Powers the Guest off from its prompt; it must end with status 0.
fn power_off(mut session: Session) -> Outcome {
    session.send("poweroff\n");
    let out = session.finish(STEP);
    out.assert_code(0).assert_no_panic();
    out
}

/*
 * seccomp.
 */

/// A network namespace of our own, deleted when dropped (as in
/// tests/network.rs), for a card whose tap stays inside it.
struct Netns(String);

impl Netns {
    /// None when this machine cannot make one (not root, no tun, no `ip`).
    fn new() -> Option<Netns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ip_works = Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !is_root() || !Path::new("/dev/net/tun").exists() || !ip_works {
            return None;
        }
        let name = format!(
            "lgs{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let out = run_with_timeout(Command::new("ip").args(["netns", "add", &name]), STEP);
        assert_eq!(out.code, Some(0), "ip netns add {name}\n{}", out.describe());
        Some(Netns(name))
    }

    /// The Launcher, run inside (`ip netns exec` execs it: same pid).
    fn lguest(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_lguest")])
            .env("LGUEST_KVM_DEVICE", kvm_device())
            .env_remove("RUST_LOG");
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn every_thread_runs_under_its_kinds_filter_with_every_device() {
    require_kvm!();
    let disk = disk("seccomp-disk", 1);
    let netns = Netns::new();
    assert!(
        netns.is_some() || !required(),
        "LGUEST_REQUIRE_KVM=1 but no network namespace for a tap (root, /dev/net/tun, ip)"
    );
    let mut cmd = match &netns {
        Some(ns) => {
            let mut cmd = ns.lguest();
            cmd.arg("--tunnet=10.0.0.1");
            cmd
        }
        None => {
            println!("no network card: no network namespace for its tap here");
            lguest()
        }
    };
    cmd.arg(format!("--block={}", disk.arg())).arg("--rng");
    let mut want = vec![
        "lguest-block",
        "lguest-console",
        "lguest-rng",
        "lguest-timer",
    ];
    if netns.is_some() {
        want.push("lguest-net");
    }
    want.sort();
    let mut session = Session::start(&mut cmd);
    let tasks = threads_at_prompt(&mut session, &want, Some("3"));
    let pid = session.id();

    // Every thread is filtered, and can never gain privileges.
    for t in &tasks {
        assert_eq!(t.field("Seccomp"), "2", "thread {} unfiltered", t.comm);
        assert_eq!(t.field("NoNewPrivs"), "1", "thread {}", t.comm);
    }
    // The vCPU thread has its list (and the clone3 one); every thread it
    // started has added its own kind's list on top.
    let main = tasks
        .iter()
        .find(|t| t.tid == pid)
        .expect("the main thread");
    assert_eq!(main.field("Seccomp_filters"), "2");
    let mut named: Vec<&str> = Vec::new();
    for t in tasks.iter().filter(|t| t.comm.starts_with("lguest-")) {
        assert_eq!(
            t.field("Seccomp_filters"),
            "3",
            "thread {} did not install its own filter",
            t.comm
        );
        named.push(&t.comm);
    }
    named.sort();
    let mut want = vec![
        "lguest-block",
        "lguest-console",
        "lguest-rng",
        "lguest-timer",
    ];
    if netns.is_some() {
        want.push("lguest-net");
    }
    want.sort();
    assert_eq!(named, want, "the Host's threads");

    // The devices work under the filters: the prompt lists them all.
    session.send("devices\n");
    for device in ["block at ", "rng at "] {
        session.expect_stdout(device, STEP);
    }
    if netns.is_some() {
        session.expect_stdout("net at ", STEP);
    }
    power_off(session);
}

#[test]
fn the_devices_self_tests_pass_under_the_filters() {
    require_kvm!();
    let disk = disk("seccomp-selftest", 1);
    let out = run(lguest()
        .arg(format!("--block={}", disk.arg()))
        .arg("--rng")
        .args(["--append", "test=all"]));
    out.assert_code(0).assert_no_panic();
    for test in ["blk", "rng", "console"] {
        out.assert_stdout_line(&format!("lguest-guest: test {test} ... ok"));
    }
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    require_kvm!();
    let mut session = Session::start(lguest().args(["--no-seccomp", "--rng"]));
    let want = ["lguest-console", "lguest-rng", "lguest-timer"];
    for t in threads_at_prompt(&mut session, &want, None) {
        assert_eq!(t.field("Seccomp"), "0", "thread {} filtered", t.comm);
    }
    power_off(session);
}

/// Whether the main thread of `pid` catches SIGSYS (the trap's handler).
fn catches_sigsys(task: &Task) -> bool {
    let caught = u64::from_str_radix(task.field("SigCgt"), 16).expect("SigCgt is hex");
    caught & 1 << (libc::SIGSYS - 1) != 0
}

#[test]
fn verbose_and_lguest_seccomp_choose_how_a_forbidden_call_ends() {
    require_kvm!();
    for (args, env, traps) in [
        (&[][..], None, false),
        (&["--verbose"][..], None, true),
        (&[][..], Some("trap"), true),
        (&["--verbose"][..], Some("kill"), false),
        (&[][..], Some("log"), false),
    ] {
        let mut cmd = lguest();
        cmd.args(args);
        if let Some(mode) = env {
            cmd.env("LGUEST_SECCOMP", mode);
        }
        let mut session = Session::start(&mut cmd);
        let tasks = threads_at_prompt(&mut session, &[], None);
        let main = tasks.iter().find(|t| t.tid == session.id()).unwrap();
        assert_eq!(main.field("Seccomp"), "2", "{args:?} {env:?}");
        assert_eq!(
            catches_sigsys(main),
            traps,
            "{args:?} LGUEST_SECCOMP={env:?}: SIGSYS handler"
        );
        power_off(session);
    }
}

#[test]
fn a_bad_lguest_seccomp_is_a_setup_error() {
    let out = run(lguest().env("LGUEST_SECCOMP", "allow"));
    out.assert_code(2).assert_no_panic();
    let line = out.single_stderr_line("lguest: ");
    assert_eq!(
        line.trim_end(),
        "lguest: LGUEST_SECCOMP=allow: expected kill, trap or log"
    );
}

/*
 * A forbidden call, made on purpose: this test binary runs itself again,
 * and the child locks itself down with the Launcher's own filters, then
 * breaks its list.
 */

/// Set in the child: `MODE:KIND`, how the filters end a forbidden call and
/// which kind of thread makes one.
const CHILD: &str = "LGUEST_SANDBOX_TEST_CHILD";

/// In the child: lock down as the vCPU thread does, then make a call off
/// a list. Never returns normally.
fn break_the_rules(role: &str) {
    let (mode, kind) = role.split_once(':').expect("MODE:KIND");
    let filters = Filters::compile(Enforcement::parse(mode).unwrap(), false).unwrap();
    sandbox::lock_down(filters).unwrap();
    match kind {
        // openat is on no list.
        "vcpu" => drop(std::fs::File::open("/dev/null")),
        // pwrite64 is on the device list, not the timer's.
        "timer" => {
            let thread = std::thread::Builder::new()
                .name("lguest-timer".into())
                .spawn(|| {
                    sandbox::enter_thread(ThreadKind::Timer);
                    // SAFETY: a zero-byte write from a live buffer to an
                    // invalid descriptor: harmless, if it were allowed.
                    unsafe { libc::pwrite64(-1, [0u8].as_ptr().cast(), 0, 0) };
                })
                .unwrap();
            let _ = thread.join();
        }
        // A process, not a thread: clone without CLONE_THREAD.
        "fork" => {
            // SAFETY: if fork were allowed, the child would only _exit.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: _exit in the child ends it at once.
                unsafe { libc::_exit(0) };
            }
        }
        other => panic!("no such kind {other}"),
    }
    println!("still alive after the forbidden call");
    std::process::exit(0);
}

/// Runs `test` of this binary again as a child, as `role`.
fn child(test: &str, role: &str) -> Outcome {
    run(
        Command::new(std::env::current_exe().expect("this test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, role),
    )
}

#[test]
fn a_call_off_a_threads_list_kills_the_launcher() {
    if let Ok(role) = std::env::var(CHILD) {
        return break_the_rules(&role);
    }
    for kind in ["vcpu", "timer", "fork"] {
        let out = child(
            "a_call_off_a_threads_list_kills_the_launcher",
            &format!("kill:{kind}"),
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: the process must die of SIGSYS\n{}",
            out.describe()
        );
        assert!(!out.stdout.contains("still alive"), "{}", out.describe());
        assert!(
            !out.stderr.contains("lguest: seccomp"),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn the_trap_names_the_thread_and_the_call() {
    if let Ok(role) = std::env::var(CHILD) {
        return break_the_rules(&role);
    }
    for (kind, said) in [
        (
            "timer",
            "lguest: seccomp: the timer thread (lguest-timer) made system call 18 (pwrite64), \
             which its list does not allow",
        ),
        (
            "vcpu",
            "made system call 257 (not on any list), which its list does not allow",
        ),
    ] {
        let out = child(
            "the_trap_names_the_thread_and_the_call",
            &format!("trap:{kind}"),
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: the process must die of SIGSYS\n{}",
            out.describe()
        );
        let line = out
            .stderr
            .lines()
            .find(|l| l.starts_with("lguest: seccomp: "))
            .unwrap_or_else(|| panic!("{kind}: no seccomp line\n{}", out.describe()));
        assert!(line.contains(said), "{kind}: {line}");
        if kind == "vcpu" {
            assert!(
                line.starts_with("lguest: seccomp: the vCPU thread ("),
                "{line}"
            );
        }
        assert!(!out.stdout.contains("still alive"), "{}", out.describe());
    }
}

#[test]
fn in_log_mode_a_forbidden_call_goes_ahead() {
    if let Ok(role) = std::env::var(CHILD) {
        return break_the_rules(&role);
    }
    let out = child("in_log_mode_a_forbidden_call_goes_ahead", "log:timer");
    out.assert_code(0);
    assert!(out.stdout.contains("still alive"), "{}", out.describe());
}

/*
 * --username and --chroot.
 */

/// `name`'s uid, gid and groups, from the user database.
fn user(name: &str) -> (u32, u32, Vec<u32>) {
    let u = sandbox::User::lookup(name).expect("the user exists");
    (u.uid, u.gid, u.groups)
}

#[test]
fn a_dropped_launcher_runs_the_self_tests() {
    require_root!();
    let root = TempDir::new("chroot-selftest");
    let disk = disk("chroot-selftest-disk", 1);
    let out = run(lguest()
        .args(["--username=nobody", &format!("--chroot={}", root.arg())])
        .arg(format!("--block={}", disk.arg()))
        .arg("--rng")
        .args(["--append", "test=all"]));
    out.assert_code(0).assert_no_panic();
    out.assert_stdout_line("lguest-guest: test blk ... ok");
    out.assert_stdout_line("lguest-guest: test rng ... ok");
    assert!(
        out.stdout.contains("tests passed"),
        "the self-tests passed\n{}",
        out.describe()
    );
    // The Guest's writes reached the disk through the descriptor opened
    // before the drop.
    let bytes = std::fs::read(disk.path()).expect("read the disk back");
    assert!(
        bytes[..64 * 1024].iter().any(|&b| b != 0),
        "the blk test wrote nothing to the disk"
    );
    // An empty root stays empty: nothing was created in it.
    assert_eq!(std::fs::read_dir(&root.0).unwrap().count(), 0);
}

#[test]
fn a_dropped_launcher_is_the_user_in_its_new_root() {
    require_root!();
    let root = TempDir::new("chroot-status");
    let disk = disk("chroot-status-disk", 1);
    let (uid, gid, groups) = user("nobody");
    assert_ne!(uid, 0);
    let mut session = Session::start(
        lguest()
            .args(["--username=nobody", &format!("--chroot={}", root.arg())])
            .arg(format!("--block={}", disk.arg()))
            .arg("--rng"),
    );
    let want = [
        "lguest-block",
        "lguest-console",
        "lguest-rng",
        "lguest-timer",
    ];
    let tasks = threads_at_prompt(&mut session, &want, Some("3"));
    let ids = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    let mut want_groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    want_groups.sort();
    for t in &tasks {
        assert_eq!(t.field("Uid"), ids(uid), "thread {}", t.comm);
        assert_eq!(t.field("Gid"), ids(gid), "thread {}", t.comm);
        let mut have: Vec<&str> = t.field("Groups").split_whitespace().collect();
        have.sort();
        assert_eq!(have, want_groups, "thread {}: supplementary groups", t.comm);
        assert_eq!(t.field("CapEff"), "0000000000000000", "thread {}", t.comm);
        assert_eq!(t.field("CapPrm"), "0000000000000000", "thread {}", t.comm);
        assert_eq!(t.field("Seccomp"), "2", "thread {}", t.comm);
    }
    let new_root = std::fs::read_link(format!("/proc/{}/root", session.id())).unwrap();
    assert_eq!(new_root, std::fs::canonicalize(&root.0).unwrap());
    // The devices still answer.
    session.send("devices\n");
    session.expect_stdout("block at ", STEP);
    power_off(session);
}

/// A kernel that INITs, prints `tiny: boot`, and asks to restart, every
/// time (ABI sections 3 and 4; tests/boot.rs has the full assembler).
fn restarting_kernel() -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    const LGUEST_DATA: u32 = BASE + 0x1000;
    const HCALL_STATUS: u32 = 36;
    const STRINGS: u32 = BASE + 0x2000;
    let boot_text = STRINGS;
    let reason = STRINGS + 16;
    let mut code = Vec::new();
    let mov = |code: &mut Vec<u8>, op: u8, imm: u32| {
        code.push(op);
        code.extend_from_slice(&imm.to_le_bytes());
    };
    // The async ring empty (0xFF status bytes), then LGUEST_INIT.
    mov(&mut code, 0xBF, LGUEST_DATA + HCALL_STATUS); // mov edi
    mov(&mut code, 0xB9, 64); // mov ecx
    mov(&mut code, 0xB8, 0xFF); // mov eax
    code.extend_from_slice(&[0xF3, 0xAA]); // rep stosb
    mov(&mut code, 0xB8, 1); // mov eax, LGUEST_INIT
    mov(&mut code, 0xBA, LGUEST_DATA); // mov edx
    code.extend_from_slice(&[0xCD, 0x1F]); // int $0x1f
                                           // NOTIFY with a string: the early console.
    mov(&mut code, 0xB8, 17);
    mov(&mut code, 0xBA, boot_text);
    mov(&mut code, 0xBB, 0);
    code.extend_from_slice(&[0xE6, 0x1F]); // out %al, $0x1f
                                           // SHUTDOWN, restart.
    mov(&mut code, 0xB8, 2);
    mov(&mut code, 0xBA, reason);
    mov(&mut code, 0xBB, 2);
    code.extend_from_slice(&[0xE6, 0x1F, 0xEB, 0xFE]);
    let mut data = code;
    data.resize((STRINGS - BASE) as usize, 0);
    let mut strings = b"tiny: boot\n".to_vec();
    strings.resize(16, 0);
    strings.extend_from_slice(b"again\0");
    data.extend_from_slice(&strings);
    let memsz = data.len() as u64;
    elf64(
        ET_EXEC,
        EM_X86_64,
        BASE as u64,
        &[Segment {
            addr: BASE as u64,
            data,
            memsz,
        }],
    )
}

#[test]
fn a_dropped_launcher_restarts_its_guest() {
    require_root!();
    const RESTARTS: usize = 3;
    let root = TempDir::new("chroot-restart");
    let kernel = TempFile::new("chroot-restart-kernel", &restarting_kernel());
    let (uid, _, _) = user("nobody");
    let mut child = spawn(
        lguest()
            .args(["--username=nobody", &format!("--chroot={}", root.arg())])
            .arg("16")
            .arg(kernel.arg()),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    // Each restart makes a new VM, memory and threads, as nobody, in the
    // empty root, under the filters.
    let deadline = Instant::now() + STEP;
    let mut seen = Vec::new();
    let restarting = |l: &String| l == "lguest: guest restarting: again";
    while seen.iter().filter(|l| restarting(l)).count() < RESTARTS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let exited = child.try_wait().expect("waiting for lguest");
    let tasks = tasks(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let stdout = stdout.join().expect("stdout reader");
    assert!(
        seen.iter().filter(|l| restarting(l)).count() >= RESTARTS && exited.is_none(),
        "expected {RESTARTS} restarts (exited: {exited:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        seen.join("\n")
    );
    assert!(stdout.matches("tiny: boot").count() >= RESTARTS, "{stdout}");
    let main = tasks.iter().find(|t| t.tid == child.id()).expect("main");
    assert!(main.field("Uid").starts_with(&format!("{uid}\t")));
    assert_eq!(main.field("Seccomp"), "2");
}

#[test]
fn dropping_to_root_is_refused() {
    require_root!();
    let out = run(lguest().args(["--username=root", "--append", "test=hypercall"]));
    out.assert_code(2).assert_no_panic();
    let line = out.single_stderr_line("lguest: ");
    assert!(
        line.contains("--username=root: setuid(0) still succeeds after the drop"),
        "{line}"
    );
    assert!(!out.stdout.contains("lguest-guest"), "the Guest never ran");
}

/// Runs the Launcher with `args` and checks it stops at set-up with exit 2
/// and the one line `want` (its start, when `want` ends with `...`).
fn setup_error(cmd: &mut Command, want: &str) {
    let out = run(cmd);
    out.assert_code(2).assert_no_panic();
    let line = out.single_stderr_line("lguest: ").trim_end();
    match want.strip_suffix("...") {
        Some(start) => assert!(line.starts_with(start), "{line}\nwanted {want}"),
        None => assert_eq!(line, want),
    }
}

#[test]
fn bad_usernames_and_chroots_are_setup_errors() {
    if !is_root() {
        // Without root, the options say they need it, whatever they name.
        setup_error(
            lguest().arg("--username=nobody"),
            "lguest: --username needs root...",
        );
        return;
    }
    setup_error(
        lguest().arg("--username=lguest-no-such-user"),
        "lguest: --username=lguest-no-such-user: no such user",
    );
    let missing = std::env::temp_dir().join(format!("lguest-test-{}-none", std::process::id()));
    setup_error(
        lguest().arg(format!("--chroot={}", missing.display())),
        &format!(
            "lguest: --chroot={}: No such file or directory (os error 2)",
            missing.display()
        ),
    );
    let file = TempFile::new("chroot-file", b"");
    setup_error(
        lguest().arg(format!("--chroot={}", file.arg())),
        &format!(
            "lguest: --chroot={}: a regular file, not a directory",
            file.arg()
        ),
    );
    // As a user other than root (when that user may run our binary).
    let exe_runs = Command::new(env!("CARGO_BIN_EXE_lguest"))
        .arg("--version")
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exe_runs {
        setup_error(
            lguest()
                .args(["--username=nobody", "--chroot=/"])
                .uid(65534)
                .gid(65534),
            "lguest: --username and --chroot need root (the Launcher runs as uid 65534)",
        );
    } else {
        println!(
            "not checked as uid 65534: it cannot run {}",
            env!("CARGO_BIN_EXE_lguest")
        );
    }
}

#[test]
fn the_documented_lists_are_the_real_ones() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reliability.md");
    let doc = std::fs::read_to_string(path).expect("read docs/reliability.md");
    let start = doc
        .find("## The sandbox")
        .expect("a section \"The sandbox\"");
    let section = &doc[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |n| n + 3)];
    for (kind, groups) in sandbox::documented_lists() {
        for group in groups {
            // The group's row in its kind's table, and each call (and each
            // ioctl request, fcntl command, ...) in it, `quoted`.
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| {} |", group.name)))
                .unwrap_or_else(|| {
                    panic!(
                        "docs/reliability.md has no row for the {} group {:?}",
                        kind.name(),
                        group.name
                    )
                });
            for call in &group.calls {
                let (name, values) = call.split_once('(').unwrap_or((call, ""));
                let values = values.trim_end_matches(')').split(", ");
                for token in std::iter::once(name).chain(values) {
                    if token.is_empty() || token.contains(' ') {
                        continue; // no value, or one described in words
                    }
                    assert!(
                        row.contains(&format!("`{token}`")),
                        "docs/reliability.md: the {} group {:?} lacks `{token}`\n{row}",
                        kind.name(),
                        group.name
                    );
                }
            }
        }
    }
}
