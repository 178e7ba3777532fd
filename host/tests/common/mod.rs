//! Helpers shared by the integration tests: running the `lguest` binary with a
//! time limit, skipping (or failing) when KVM is missing, temporary files, and
//! building small ELF images by hand.
//!
//! Every test file includes this with `#[macro_use] mod common;` and uses only
//! part of it, hence the `allow`s.
#![allow(dead_code, unused_macros)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
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

/// The KVM device every test that boots a Guest needs.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// A `Command` for the `lguest` binary built by this package.
///
/// Variables from the caller's environment that would change what the
/// Launcher does or prints are removed, so every test starts from the same
/// place; a test that wants one sets it again.
pub fn lguest() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lguest"));
    cmd.env_remove("LGUEST_KVM_DEVICE").env_remove("RUST_LOG");
    cmd
}

/// Whether /dev/kvm can be opened read-write (checked once per test binary).
///
/// When it cannot: with `LGUEST_REQUIRE_KVM=1` (as in CI) this panics, so a
/// machine without KVM fails the run instead of passing it untested; otherwise
/// it prints `SKIPPED: /dev/kvm unavailable` and returns false.
pub fn kvm_available() -> bool {
    static OPENED: OnceLock<Result<(), String>> = OnceLock::new();
    let opened = OPENED.get_or_init(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(KVM_DEVICE)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    match opened {
        Ok(()) => true,
        Err(e) if std::env::var("LGUEST_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("LGUEST_REQUIRE_KVM=1 but {KVM_DEVICE} cannot be opened read-write: {e}")
        }
        Err(e) => {
            println!("SKIPPED: /dev/kvm unavailable ({e})");
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

/// Starts `cmd` with stdin from /dev/null and stdout and stderr piped.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
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
/// running, so a failing test never leaves a Guest behind.
pub struct Session {
    child: Child,
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
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
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

    fn stderr_so_far(&self) -> String {
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
            let ended = !matches!(self.child.try_wait(), Ok(None));
            if ended {
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

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
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
