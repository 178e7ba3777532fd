//! Helpers shared by the integration tests: running the `lguest` binary with a
//! time limit, skipping (or failing) when KVM is missing, temporary files, and
//! building small ELF images by hand.
//!
//! Every test file includes this with `#[macro_use] mod common;` and uses only
//! part of it, hence the `allow`s.
#![allow(dead_code, unused_macros)]

use std::fs::File;
use std::io::Read;
use std::ops::{Deref, DerefMut};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long one run of the Launcher may take before the test kills it and
/// fails. The bundled Guest's whole self-test takes well under a second; this
/// leaves room for a loaded CI machine running several tests at once.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The reference Guest's self-tests that need no device; `test=all` always
/// runs these (and the device tests for the devices it has).
pub const CORE_TESTS: [&str; 12] = [
    "hypercall",
    "async",
    "timer",
    "mask",
    "ud",
    "pf",
    "de",
    "pgtable",
    "wallclock",
    "stack",
    "gdt",
    "ts",
];

/// The KVM device every test that boots a Guest needs: `/dev/kvm`, or
/// `$LGUEST_KVM_DEVICE` when set (point it at a path that does not exist to
/// see the tests skip).
pub fn kvm_device() -> String {
    std::env::var("LGUEST_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// A `Command` for the `lguest` binary built by this package, using the
/// tests' KVM device.
///
/// Variables from the caller's environment that would change what the
/// Launcher prints are removed, so every test starts from the same place; a
/// test that wants one sets it again.
pub fn lguest() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lguest"));
    cmd.env("LGUEST_KVM_DEVICE", kvm_device())
        .env_remove("RUST_LOG");
    cmd
}

/// Tests of this binary that skipped for want of KVM.
static SKIPPED: AtomicUsize = AtomicUsize::new(0);

/// Says how many tests skipped, after the test harness's own summary: the
/// harness hides what a passing test prints, so a `SKIPPED` line alone would
/// go unseen, and a run that tested nothing would look like a green one.
extern "C" fn report_skipped() {
    let n = SKIPPED.load(Ordering::SeqCst);
    if n == 0 {
        return;
    }
    let binary = std::env::args().next().unwrap_or_default();
    let name = Path::new(&binary)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.rsplit_once('-').map_or(n, |(name, _hash)| name))
        .unwrap_or("tests")
        .to_string();
    let line = format!(
        "{n} {} SKIPPED: {} unavailable (tests/{name}.rs; LGUEST_REQUIRE_KVM=1 makes this a failure)\n",
        if n == 1 { "test" } else { "tests" },
        kvm_device()
    );
    // SAFETY: write(2) from a live buffer; after main, the harness no longer
    // captures anything, and fd 2 is the terminal or cargo's stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// Whether the KVM device can be opened read-write (checked once per test
/// binary).
///
/// When it cannot: with `LGUEST_REQUIRE_KVM=1` (as in CI) this panics, so a
/// machine without KVM fails the run instead of passing it untested;
/// otherwise it prints `SKIPPED: /dev/kvm unavailable`, counts the test as
/// skipped (the count is printed when the test binary ends) and returns false.
pub fn kvm_available() -> bool {
    static OPENED: OnceLock<Result<(), String>> = OnceLock::new();
    let opened = OPENED.get_or_init(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(kvm_device())
            .map(drop)
            .map_err(|e| e.to_string())
    });
    match opened {
        Ok(()) => true,
        Err(e) if std::env::var("LGUEST_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!(
                "LGUEST_REQUIRE_KVM=1 but {} cannot be opened read-write: {e}",
                kvm_device()
            )
        }
        Err(e) => {
            static REPORT: Once = Once::new();
            REPORT.call_once(|| {
                // SAFETY: registers a plain function that only formats and
                // writes a line; it runs once, as the process exits.
                unsafe { libc::atexit(report_skipped) };
            });
            SKIPPED.fetch_add(1, Ordering::SeqCst);
            println!("SKIPPED: {} unavailable ({e})", kvm_device());
            false
        }
    }
}

/// Returns from the calling test when KVM is unavailable (see `kvm_available`).
macro_rules! require_kvm {
    () => {
        if !$crate::common::kvm_available() {
            return;
        }
    };
}

/// What one run of the Launcher did.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code; None if a signal ended the process.
    pub code: Option<i32>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Everything about the run, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.status, self.stdout, self.stderr
        )
    }

    /// Panics unless the process exited with `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit status {code}\n{}",
            self.describe()
        );
        self
    }

    /// Panics if the Launcher panicked or printed a backtrace: every failure
    /// must be reported as an `lguest: ` line, never as a Rust panic.
    pub fn assert_no_panic(&self) -> &Self {
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            assert!(
                !self.stderr.contains(bad) && !self.stdout.contains(bad),
                "the Launcher panicked (output contains {bad:?})\n{}",
                self.describe()
            );
        }
        self
    }

    /// Panics unless stderr is exactly one line and it starts with `prefix`;
    /// returns that line. Without `--verbose` the Launcher prints nothing else
    /// on stderr (ABI section 10).
    pub fn single_stderr_line(&self, prefix: &str) -> &str {
        let lines = self.stderr_lines();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one line on stderr\n{}",
            self.describe()
        );
        assert!(
            lines[0].starts_with(prefix),
            "expected the stderr line to start with {prefix:?}\n{}",
            self.describe()
        );
        lines[0]
    }

    /// Panics unless stdout has a line equal to `line`.
    pub fn assert_stdout_line(&self, line: &str) -> &Self {
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == line),
            "expected the line {line:?} on stdout\n{}",
            self.describe()
        );
        self
    }

    /// The reference Guest's greeting came out on stdout.
    pub fn assert_greeting(&self) -> &Self {
        assert!(
            self.stdout
                .lines()
                .any(|l| l.starts_with("lguest-guest: Hello")),
            "expected the greeting on stdout\n{}",
            self.describe()
        );
        self
    }

    /// Panics unless stdout contains `text`.
    pub fn assert_stdout_contains(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "expected {text:?} on stdout\n{}",
            self.describe()
        );
        self
    }
}

/// A running child that is killed and reaped when dropped, so a test that
/// fails (panics) anywhere never leaves an `lguest` behind.
pub struct Spawned(Child);

impl Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` with stdin from /dev/null and a time limit of `TIMEOUT`.
pub fn run(cmd: &mut Command) -> Outcome {
    run_with_timeout(cmd, TIMEOUT)
}

/// Runs `cmd` with stdin from /dev/null; kills it and fails the test if it
/// has not finished after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Outcome {
    let mut child = spawn(cmd);
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for lguest") {
            break status;
        }
        if Instant::now() >= deadline {
            // Kill it, then show whatever it printed before it hung.
            let _ = child.kill();
            let status = child.wait().expect("waiting for killed lguest");
            drop(child);
            panic!(
                "{cmd:?} did not finish within {timeout:?}; killed\n{}",
                Outcome {
                    code: status.code(),
                    status,
                    stdout: join(stdout),
                    stderr: join(stderr),
                }
                .describe()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status.code(),
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

/// Starts `cmd` with stdin from /dev/null and stdout and stderr piped; it is
/// killed when the result is dropped.
pub fn spawn(cmd: &mut Command) -> Spawned {
    Spawned(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    )
}

/// A pipe: (read end, write end), both close-on-exec (a child gets the end
/// it is given as its stdin or stdout, and no other).
pub fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, which the Files then own.
    unsafe {
        assert_eq!(
            libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC),
            0,
            "pipe2: {}",
            std::io::Error::last_os_error()
        );
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    }
}

/// Whether SIGINT is pending for process `pid`: sent, but not yet taken by
/// one of its threads. False once the process has exited (or been reaped).
fn sigint_pending(pid: u32) -> bool {
    let bit = 1u64 << (libc::SIGINT - 1);
    let pending = |status: &str, field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & bit != 0)
    };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    if status
        .lines()
        .any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead")))
    {
        return false;
    }
    if pending(&status, "ShdPnd:") {
        return true;
    }
    // A signal sent to the process may also wait on one thread.
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("status"))
            .is_ok_and(|status| pending(&status, "SigPnd:"))
    })
}

/// Sends SIGINT to process `pid` (a child not yet reaped), as Ctrl-C on a
/// terminal that is not raw would, and waits until the process has taken it.
///
/// Signals are not queued: one sent while the last is still pending merges
/// with it, so three SIGINTs sent back to back may arrive as one or two. A
/// test that means three sends them with this, one after another.
pub fn ctrl_c(pid: u32) {
    // SAFETY: kill() on the pid of a child the caller has not reaped, so the
    // pid is still its.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
    assert_eq!(
        sent,
        0,
        "kill -INT {pid}: {}",
        std::io::Error::last_os_error()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while sigint_pending(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} has not taken its SIGINT within 10 s"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never
/// blocks on a full pipe while we wait for it.
fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn join(reader: thread::JoinHandle<String>) -> String {
    reader.join().expect("pipe reader thread")
}

/// A Launcher left running while the test talks to it: its stdin is piped
/// (or whatever `start_with_stdin` was given), and what it prints so far can
/// be looked at before it ends. Dropping it kills the process if it is still
/// running (see `Spawned`), so a failing test never leaves a Guest behind.
pub struct Session {
    child: Spawned,
    what: String,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Session {
    /// Starts `cmd` with stdin, stdout and stderr piped.
    pub fn start(cmd: &mut Command) -> Session {
        Session::start_with_stdin(cmd, Stdio::piped())
    }

    /// Starts `cmd` with `stdin` as its standard input (a file, a terminal,
    /// or `Stdio::piped()` to write to it with `send`).
    pub fn start_with_stdin(cmd: &mut Command, stdin: Stdio) -> Session {
        Session::start_with_stdio(cmd, stdin, Stdio::piped())
    }

    /// Starts `cmd` with `stdin` and `stdout` as given. A piped stdout is
    /// collected (`stdout_so_far`); any other (the write end of a `pipe()`,
    /// say) is the test's to read, at its own pace, or not at all.
    pub fn start_with_stdio(cmd: &mut Command, stdin: Stdio, stdout: Stdio) -> Session {
        let mut child = Spawned(
            cmd.stdin(stdin)
                .stdout(stdout)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        );
        // The Command keeps what it was given: let go of our copies of the
        // child's descriptors, so a reader of its stdout sees it end.
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut readers = vec![collect(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
        )];
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, stdout.clone()));
        }
        Session {
            stdin: child.stdin.take(),
            child,
            what: format!("{cmd:?}"),
            stdout,
            stderr,
            readers,
        }
    }

    /// The process id (to signal it).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What it has printed on stdout so far.
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// What it has printed on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Everything printed so far, for assertion messages.
    pub fn describe_so_far(&self) -> String {
        format!(
            "{}\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}\n---",
            self.what,
            self.stdout_so_far(),
            self.stderr_so_far()
        )
    }

    /// Writes `text` to its stdin; panics if it cannot (the process is gone,
    /// or stdin is not a pipe or was closed).
    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        let result = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(text.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin is not an open pipe")),
        };
        if let Err(e) = result {
            panic!(
                "cannot write {text:?} to the Launcher's stdin: {e}\n{}",
                self.describe_so_far()
            );
        }
    }

    /// Closes its stdin: the Guest sees end of input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until stdout contains `text`; false if the process ended first
    /// or `timeout` passed.
    pub fn wait_for_stdout(&mut self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout_so_far().contains(text) {
                return true;
            }
            if self.has_ended() {
                // Its last words may still be on their way through the pipe.
                thread::sleep(Duration::from_millis(50));
                return self.stdout_so_far().contains(text);
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process has ended.
    pub fn has_ended(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the pipe the process writes its stdout to is full (it
    /// was started with the write end of a `pipe()` nobody reads; `probe` is
    /// a copy of that write end, which this closes), then a little longer
    /// for what the Launcher keeps back to fill too. Panics if the process
    /// ends first or the pipe never fills.
    pub fn wait_until_stdout_full(&mut self, probe: File) {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut p = libc::pollfd {
                fd: probe.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one pollfd we own, zero timeout. A pipe polls writable
            // while it has a free page.
            if unsafe { libc::poll(&mut p, 1, 0) } == 0 {
                break;
            }
            assert!(
                !self.has_ended(),
                "ended before filling its stdout\n{}",
                self.describe_so_far()
            );
            assert!(
                Instant::now() < deadline,
                "stdout never filled\n{}",
                self.describe_so_far()
            );
            thread::sleep(Duration::from_millis(5));
        }
        drop(probe);
        thread::sleep(Duration::from_millis(200));
    }

    /// Like `wait_for_stdout`, but panics (showing the output so far) when
    /// `text` does not come.
    pub fn expect_stdout(&mut self, text: &str, timeout: Duration) {
        if !self.wait_for_stdout(text, timeout) {
            panic!(
                "expected {text:?} on stdout within {timeout:?}\n{}",
                self.describe_so_far()
            );
        }
    }

    /// Waits for the process to end (stdin is left as it is) and returns
    /// what it did; kills it and panics if it has not ended after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for lguest") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "did not finish within {timeout:?}; killed\n{}",
                    self.describe_so_far()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.stdin = None;
        for reader in self.readers.drain(..) {
            reader.join().expect("pipe reader thread");
        }
        Outcome {
            code: status.code(),
            status,
            stdout: self.stdout_so_far(),
            stderr: self.stderr_so_far(),
        }
    }
}

/// Appends everything from a pipe to `into`, on a thread of its own.
fn collect(
    mut pipe: impl Read + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// A file under the system temporary directory, removed when dropped. Its
/// name holds the process id and the test's name, so tests running side by
/// side (in this binary or in others) never share one.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn new(test_name: &str, contents: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("lguest-test-{}-{}", std::process::id(), test_name));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a string, for command lines and message checks.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/*
 * ELF images built by hand, for the loader's error paths and for tiny test
 * kernels (see tests/boot.rs).
 */

pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;
pub const EM_386: u16 = 3;
pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;
const PT_LOAD: u32 = 1;

/// One PT_LOAD segment: `data` at physical (and virtual) address `addr`,
/// followed by zeroes up to `memsz`.
pub struct Segment {
    pub addr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

/// An ELF64 little-endian image with one program header per segment. Each
/// segment's bytes start on a page of their own in the file, so offsets and
/// addresses agree modulo the page size as the ELF rules want.
pub fn elf64(e_type: u16, e_machine: u16, entry: u64, segments: &[Segment]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut offsets = Vec::new();
    let mut next = 0x1000usize;
    for s in segments {
        assert_eq!(s.addr % 0x1000, 0, "test segments are page aligned");
        offsets.push(next);
        next += s.data.len().div_ceil(0x1000).max(1) * 0x1000;
    }

    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little-endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&e_type.to_le_bytes());
    f.extend_from_slice(&e_machine.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&(segments.len() as u16).to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len(), EHDR);

    for (s, &off) in segments.iter().zip(&offsets) {
        f.extend_from_slice(&PT_LOAD.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes()); // p_flags: RWX
        f.extend_from_slice(&(off as u64).to_le_bytes());
        f.extend_from_slice(&s.addr.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&s.addr.to_le_bytes()); // p_paddr
        f.extend_from_slice(&(s.data.len() as u64).to_le_bytes());
        f.extend_from_slice(&s.memsz.max(s.data.len() as u64).to_le_bytes());
        f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    }

    for (s, &off) in segments.iter().zip(&offsets) {
        f.resize(off, 0);
        f.extend_from_slice(&s.data);
    }
    f.resize(next, 0);
    f
}

/// A well-formed 32-bit x86 ELF executable (ELFCLASS32, EM_386) with one
/// segment: the kind of file lguest refuses because it is not x86-64.
pub fn elf32_i386() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[1, 1, 1, 0]); // ELFCLASS32, little-endian, version 1
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&ET_EXEC.to_le_bytes());
    f.extend_from_slice(&EM_386.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&0x10_0054u32.to_le_bytes()); // e_entry: the `jmp .` below
    f.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&52u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&32u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&40u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // One PT_LOAD covering the headers and a `jmp .` at the entry point.
    f.extend_from_slice(&PT_LOAD.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes()); // p_offset
    f.extend_from_slice(&0x10_0000u32.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&0x10_0000u32.to_le_bytes()); // p_paddr
    f.extend_from_slice(&86u32.to_le_bytes()); // p_filesz
    f.extend_from_slice(&86u32.to_le_bytes()); // p_memsz
    f.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R X
    f.extend_from_slice(&0x1000u32.to_le_bytes()); // p_align
    f.extend_from_slice(&[0xEB, 0xFE]);
    assert_eq!(f.len(), 86);
    f
}
