//! The 2007 device model through the real binary: `--transport=dma` and
//! `--sharenet=FILE` (ABI section 9, docs/dma.md).
//!
//! Three kinds of test:
//! - the command line, which needs no KVM: what the model refuses, and a
//!   FILE that is not a network left untouched;
//! - tiny kernels of our own (a few instructions, as in boot.rs), which
//!   make BIND_DMA and SEND_DMA themselves: the wiring from the hypercall
//!   to the devices, the device table, the shared page, restarts and the
//!   end of input;
//! - the reference Guest's drivers for the model: `test=all` with a disk
//!   checked byte by byte, two Guests pinging each other over one FILE, a
//!   Guest killed with `kill -9` whose slot a third one takes, and a shared
//!   network bridged to a tap, pinged from the host (root, in a network
//!   namespace of its own, with common/netns.rs).

#[macro_use]
mod common;
#[macro_use]
#[path = "common/netns.rs"]
mod netns;

use common::*;
use lguest::dma::sharenet::{Offer, SharedNet};
use netns::Netns;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/*
 * The command line.
 */

/// Runs `lguest ARGS` for a set-up error: exit 2 and the one line.
fn refused(args: &[&str]) -> String {
    let out = run(lguest().args(args));
    out.assert_no_panic().assert_code(2);
    out.single_stderr_line("lguest: ").to_string()
}

#[test]
fn sharenet_implies_the_dma_model_and_refuses_another() {
    assert_eq!(
        refused(&["--sharenet=/nonexistent/dir/net", "--transport=mmio"]),
        "lguest: --sharenet needs the 2007 device model (--transport=dma), not --transport=mmio"
    );
    assert_eq!(
        refused(&["--sharenet=/nonexistent/dir/net", "--transport=lguest-bus"]),
        "lguest: --sharenet needs the 2007 device model (--transport=dma), not --transport=lguest-bus"
    );
    // Without --transport it is the DMA model: the FILE is what fails here.
    let line = refused(&["--sharenet=/nonexistent/dir/net"]);
    assert!(
        line.starts_with("lguest: --sharenet=/nonexistent/dir/net: "),
        "{line}"
    );
}

#[test]
fn what_the_dma_model_has_no_room_for_is_refused() {
    assert_eq!(
        refused(&["--transport=dma", "--rng"]),
        "lguest: --rng: the 2007 device model (--transport=dma) has no random-number device"
    );
    assert_eq!(
        refused(&["--transport=dma", "--tunnet=10.9.9.1:02:00:00:00:00:07"]),
        "lguest: --tunnet=10.9.9.1:02:00:00:00:00:07: under the 2007 device model \
         (--transport=dma) the Guest picks its own MAC; give the tap's address or bridge only"
    );
    let net = TempFile::new("dma-cli-two-taps", b"");
    let sharenet = format!("--sharenet={}", net.arg());
    assert_eq!(
        refused(&[&sharenet, "--tunnet=10.9.9.1", "--tunnet=10.9.8.1"]),
        "lguest: --sharenet bridges one tap at most (it becomes slot 0 of the shared network); \
         2 --tunnet were given"
    );
    assert_eq!(
        refused(&["--transport=dma", "--guest=drivers"]),
        "lguest: --guest=drivers drives virtio-mmio devices; the 2007 device model \
         (--transport=dma) has none"
    );
    // Fifteen devices and the console fill the table.
    let disk = TempFile::new("dma-cli-disks", &[0u8; 4096]);
    let ro = format!("--block={},ro", disk.arg());
    let mut args = vec!["--transport=dma"];
    args.extend(std::iter::repeat_n(ro.as_str(), 16));
    assert_eq!(
        refused(&args),
        "lguest: the 2007 device model has room for 16 devices, the console included; 17 were asked for"
    );
}

#[test]
fn a_file_that_is_no_network_is_left_alone() {
    let words = b"somebody's notes, not a network\n".repeat(10);
    let notes = TempFile::new("dma-cli-notes", &words);
    let line = refused(&[&format!("--sharenet={}", notes.arg())]);
    assert!(
        line.contains("not an lguest network file"),
        "the message should say what the file is not: {line}"
    );
    assert_eq!(
        std::fs::read(notes.path()).unwrap(),
        words,
        "not a byte changed"
    );
}

/*
 * Tiny kernels: a few instructions of our own, loaded from an ELF file.
 * Code on the first page at BASE, lguest_data on the second, then data
 * pages and a stack. They report through SEND_DMA to key 0 or the early
 * console, and a failed check crashes them with a reason.
 */

const MEM_MB: u64 = 16;
const MEM: u64 = MEM_MB << 20;
const BASE: u64 = 0x10_0000;
const LGUEST_DATA: u64 = BASE + 0x1000;
/// Data pages: the lguest_dma structures on the first, bytes after.
const DATA: u64 = BASE + 0x2000;
const STACK_TOP: u64 = BASE + 0x8000;

/// Hypercalls (ABI section 4).
const LGUEST_INIT: u32 = 1;
const SHUTDOWN: u32 = 2;
const LOAD_IDT_ENTRY: u32 = 6;
const SET_CLOCKEVENT: u32 = 9;
const HALT: u32 = 10;
const BIND_DMA: u32 = 12;
const SEND_DMA: u32 = 13;
const NOTIFY: u32 = 17;
const POWER_OFF: u64 = 1;
const RESTART: u64 = 2;
const CRASH: u64 = 3;

/// Registers by their number in instruction encodings.
const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;
const RSP: u8 = 4;
const RDI: u8 = 7;

/// Offsets in `struct lguest_dma` (168 bytes).
const DMA_ADDR: u64 = 8;
const DMA_LEN: u64 = 136;

struct Tiny {
    code: Vec<u8>,
    /// The data pages' bytes, from DATA.
    data: Vec<u8>,
}

impl Tiny {
    /// A kernel that has made LGUEST_INIT and has a stack.
    fn new() -> Tiny {
        let mut k = Tiny {
            code: Vec::new(),
            data: vec![0; 0x4000],
        };
        k.mov(RDI, LGUEST_DATA + 36); // hcall_status[64]
        k.mov(RCX, 64);
        k.mov(RAX, 0xFF);
        k.code.extend_from_slice(&[0xF3, 0xAA]); // rep stosb: all free
        k.hcall(LGUEST_INIT, LGUEST_DATA, 0, 0);
        k.mov(RSP, STACK_TOP);
        k
    }

    /// `mov reg, imm64`.
    fn mov(&mut self, reg: u8, imm: u64) {
        self.code.extend_from_slice(&[0x48, 0xB8 + reg]);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// A hypercall with `out %al, $0x1f`.
    fn hcall(&mut self, nr: u32, a1: u64, a2: u64, a3: u64) {
        self.mov(RAX, nr as u64);
        self.mov(RDX, a1);
        self.mov(RBX, a2);
        self.mov(RCX, a3);
        self.code.extend_from_slice(&[0xE6, 0x1F]);
    }

    /// Puts `bytes` at `addr` (in the data pages).
    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = (addr - DATA) as usize;
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// An lguest_dma at `at` with one section, `len` bytes at `addr`.
    fn dma(&mut self, at: u64, addr: u64, len: u16) {
        self.put(at + DMA_ADDR, &addr.to_le_bytes());
        self.put(at + DMA_LEN, &len.to_le_bytes());
    }

    /// Shuts down (`how`) with `reason`, kept at `at`.
    fn shutdown(&mut self, how: u64, reason: &str, at: u64) {
        let mut text = reason.as_bytes().to_vec();
        text.push(0);
        self.put(at, &text);
        self.hcall(SHUTDOWN, at, how, 0);
        self.code.extend_from_slice(&[0xEB, 0xFE]); // jmp .
    }

    /// Crashes with `reason` (kept at `at`) unless EAX holds `value`.
    fn crash_unless_eax(&mut self, value: u32, reason: &str, at: u64) {
        self.code.push(0x3D); // cmp eax, imm32
        self.code.extend_from_slice(&value.to_le_bytes());
        let mut crash = Tiny {
            code: Vec::new(),
            data: std::mem::take(&mut self.data),
        };
        crash.shutdown(CRASH, reason, at);
        self.data = crash.data;
        self.code.extend_from_slice(&[0x74, crash.code.len() as u8]); // je past it
        self.code.extend_from_slice(&crash.code);
    }

    /// `mov eax, [addr]`.
    fn load_eax(&mut self, addr: u64) {
        self.code.extend_from_slice(&[0x8B, 0x04, 0x25]);
        self.code.extend_from_slice(&(addr as u32).to_le_bytes());
    }

    /// An interrupt gate for `vector` that does nothing but `iretq`.
    fn ignore_vector(&mut self, vector: u64, handler: u64) {
        // {offset 0-15, selector, ist, type 0x8E, offset 16-31}, offset
        // 32-63 in the high half (zero here).
        let low = (handler & 0xFFFF) | 0x33 << 16 | 0x8E << 40 | (handler >> 16 & 0xFFFF) << 48;
        self.hcall(LOAD_IDT_ENTRY, vector, low, 0);
    }

    /// HALT for ever: each wake-up halts again.
    fn halt_loop(&mut self) {
        let again = self.code.len();
        self.hcall(HALT, 0, 0, 0);
        let back = again as i32 - (self.code.len() as i32 + 2);
        self.code.extend_from_slice(&[0xEB, back as u8]);
    }

    /// The kernel as an ELF file; `iretq` sits at the end of the code page.
    fn elf(self) -> Vec<u8> {
        assert!(self.code.len() < 0xFF0, "tiny kernel too long");
        let mut image = self.code;
        image.resize(0xFF0, 0x90);
        image.extend_from_slice(&[0x48, 0xCF]); // IRETQ at IRET
        image.resize(0x2000, 0);
        image.extend_from_slice(&self.data);
        elf64(
            ET_EXEC,
            EM_X86_64,
            BASE,
            &[Segment {
                addr: BASE,
                memsz: STACK_TOP - BASE,
                data: image,
            }],
        )
    }
}

/// Where every tiny kernel's `iretq` is.
const IRET: u64 = BASE + 0xFF0;

/// `lguest ARGS 16 KERNEL`, the kernel in a temporary file.
fn tiny(name: &str, k: Tiny, args: &[&str]) -> (TempFile, Command) {
    let file = TempFile::new(name, &k.elf());
    let mut cmd = lguest();
    cmd.args(args).arg(MEM_MB.to_string()).arg(file.arg());
    (file, cmd)
}

#[test]
fn send_dma_to_key_0_is_console_output() {
    require_kvm!();
    let text = b"tiny: hello through SEND_DMA to key 0\n";
    let mut k = Tiny::new();
    k.put(DATA + 0x1000, text);
    k.dma(DATA, DATA + 0x1000, text.len() as u16);
    k.hcall(SEND_DMA, 0, DATA, 0);
    // The Launcher took it all, and said so in used_len.
    k.load_eax(DATA);
    k.crash_unless_eax(
        text.len() as u32,
        "used_len is not the length",
        DATA + 0x3000,
    );
    k.shutdown(POWER_OFF, "printed", DATA + 0x3100);
    let (_file, mut cmd) = tiny("dma-tiny-hello", k, &["--transport=dma"]);
    let out = run(&mut cmd);
    out.assert_no_panic().assert_code(0);
    assert_eq!(out.stdout, String::from_utf8_lossy(text));
    out.single_stderr_line("lguest: guest powered off: printed");
}

#[test]
fn the_device_table_and_boot_params_say_model_1() {
    require_kvm!();
    let disk = TempFile::new("dma-tiny-table-disk", &vec![0u8; 3 << 20]);
    let mut k = Tiny::new();
    let checks: [(u64, u32, &str); 5] = [
        (0x240, 1, "hardware_subarch_data is not 1"),
        (MEM, 1, "entry 0 is not the console (type 1, no features)"),
        (MEM + 12, 3, "entry 1 is not a block device"),
        (
            MEM + 20,
            (MEM >> 12) as u32 + 1,
            "the disk's page is not the one after the table",
        ),
        (
            MEM + 0x1000 + 16,
            6144,
            "the block page does not hold 6144 sectors",
        ),
    ];
    for (i, (addr, value, why)) in checks.into_iter().enumerate() {
        k.load_eax(addr);
        k.crash_unless_eax(value, why, DATA + 0x3000 + 0x80 * i as u64);
    }
    k.shutdown(POWER_OFF, "table ok", DATA + 0x3800);
    let block = format!("--block={}", disk.arg());
    let (_file, mut cmd) = tiny("dma-tiny-table", k, &["--transport=dma", &block]);
    let out = run(&mut cmd);
    out.assert_no_panic().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: table ok");
}

#[test]
fn a_broken_rule_is_sudden_death() {
    require_kvm!();
    let mut k = Tiny::new();
    k.dma(DATA, DATA + 0x1000, 8);
    // Our own RAM is no device page.
    k.hcall(SEND_DMA, DATA + 0x1000, DATA, 0);
    k.shutdown(POWER_OFF, "still alive", DATA + 0x3000);
    let (_file, mut cmd) = tiny("dma-tiny-key", k, &["--transport=dma"]);
    let out = run(&mut cmd);
    out.assert_no_panic().assert_code(1);
    assert_eq!(
        out.single_stderr_line("lguest: guest killed: "),
        format!(
            "lguest: guest killed: SEND_DMA: key {:#x} is neither 0 (the console) nor inside \
             a block or net device page",
            DATA + 0x1000
        )
    );
}

#[test]
fn dma_calls_under_virtio_end_the_guest() {
    require_kvm!();
    let mut k = Tiny::new();
    k.dma(DATA, DATA + 0x1000, 8);
    k.hcall(BIND_DMA, 0, DATA, 1 << 8 | 1);
    k.shutdown(POWER_OFF, "still alive", DATA + 0x3000);
    let (_file, mut cmd) = tiny("dma-tiny-virtio", k, &[]);
    let out = run(&mut cmd);
    out.assert_no_panic().assert_code(1);
    assert_eq!(
        out.single_stderr_line("lguest: guest killed: "),
        "lguest: guest killed: BIND_DMA: this Guest has virtio devices; the 2007 DMA device \
         model needs --transport=dma"
    );
}

/// A kernel that binds an input buffer at key 0 for IRQ 1 (whose gate only
/// returns), sets a clock event of `clock_ns` (0: none) and halts for ever.
fn reading_and_halting(clock_ns: u64) -> Tiny {
    let mut k = Tiny::new();
    k.ignore_vector(32, IRET);
    k.ignore_vector(33, IRET);
    k.dma(DATA, DATA + 0x1000, 64);
    k.hcall(BIND_DMA, 0, DATA, 1 << 8 | 1);
    k.crash_unless_eax(1, "BIND_DMA refused", DATA + 0x3000);
    if clock_ns != 0 {
        k.hcall(SET_CLOCKEVENT, clock_ns, 0, 0);
    }
    k.put(DATA + 0x2000, b"tiny: reading\n\0");
    k.hcall(NOTIFY, DATA + 0x2000, 0, 0);
    k.halt_loop();
    k
}

#[test]
fn end_of_input_powers_off_a_guest_halted_waiting_for_it() {
    require_kvm!();
    // Input still open: the Guest halts on, waiting.
    let (_file, mut cmd) = tiny("dma-tiny-eof", reading_and_halting(0), &["--transport=dma"]);
    let mut guest = Session::start(&mut cmd);
    guest.expect_stdout("tiny: reading", TIMEOUT);
    guest.send("some input\n");
    thread::sleep(Duration::from_millis(300));
    assert!(!guest.has_ended(), "{}", guest.describe_so_far());
    // It never reads what it was given: that is not the end for it.
    guest.close_stdin();
    thread::sleep(Duration::from_millis(300));
    assert!(
        !guest.has_ended(),
        "the Guest has not read its input yet\n{}",
        guest.describe_so_far()
    );
    drop(guest);

    // Nothing to read: asleep, it is woken, halts again and is powered off.
    let out = run(&mut cmd);
    out.assert_no_panic().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: end of input");
}

#[test]
fn a_guest_waiting_for_its_clock_is_not_cut_off_at_end_of_input() {
    require_kvm!();
    // Halted with a clock event set (a command with a timeout, say): the
    // end of input waits until it halts with none.
    let (_file, mut cmd) = tiny(
        "dma-tiny-clock",
        reading_and_halting(1_500_000_000),
        &["--transport=dma"],
    );
    let start = Instant::now();
    let mut guest = Session::start_with_stdin(&mut cmd, Stdio::null());
    guest.expect_stdout("tiny: reading", TIMEOUT);
    thread::sleep(Duration::from_millis(500));
    assert!(
        !guest.has_ended(),
        "powered off while its clock was set\n{}",
        guest.describe_so_far()
    );
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: end of input");
    assert!(start.elapsed() >= Duration::from_millis(1500));
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // SAFETY: plain libc calls on a descriptor we own at once; ptsname_r
    // writes at most `name.len()` bytes into `name`.
    let (master, path) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = std::fs::File::from_raw_fd(fd);
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
        .open(path)
        .expect("the pty's slave");
    (master, slave)
}

#[test]
fn three_ctrl_c_typed_on_a_terminal_end_the_guest() {
    require_kvm!();
    use std::io::Write;
    let (mut master, slave) = pty();
    let (_file, mut cmd) = tiny(
        "dma-tiny-ctrl-c",
        reading_and_halting(0),
        &["--transport=dma"],
    );
    let mut guest = Session::start_with_stdin(&mut cmd, Stdio::from(slave));
    guest.expect_stdout("tiny: reading", TIMEOUT);
    // Raw mode: Ctrl-C is a byte, which the console's thread counts.
    master.write_all(b"\x03\x03\x03").unwrap();
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(1);
    assert_eq!(
        out.single_stderr_line("lguest: guest killed: "),
        "lguest: guest killed: ended by the user (three Ctrl-C)"
    );
}

#[test]
fn three_sigints_end_the_guest_whatever_its_devices_do() {
    require_kvm!();
    // Not a terminal: Ctrl-C is SIGINT, which the device threads never
    // take, so it reaches the vCPU asleep in HALT.
    let (_file, mut cmd) = tiny(
        "dma-tiny-sigint",
        reading_and_halting(0),
        &["--transport=dma"],
    );
    let mut guest = Session::start(&mut cmd);
    guest.expect_stdout("tiny: reading", TIMEOUT);
    for _ in 0..3 {
        ctrl_c(guest.id());
    }
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(1);
    assert_eq!(
        out.single_stderr_line("lguest: guest killed: "),
        "lguest: guest killed: ended by the user (three Ctrl-C)"
    );
}

/// The shared net page's entry (entry 1, the only device): the Guest's slot
/// from its features, into EAX; the page, into EDX; the slot's key into
/// RDX.
fn slot_and_key(k: &mut Tiny) {
    k.code.extend_from_slice(&[0x0F, 0xB7, 0x04, 0x25]); // movzx eax, word [features]
    k.code.extend_from_slice(&(MEM as u32 + 14).to_le_bytes());
    k.code.extend_from_slice(&[0x25, 0xFF, 0x0F, 0, 0]); // and eax, 0xfff
    k.code.extend_from_slice(&[0x8B, 0x14, 0x25]); // mov edx, [pfn]
    k.code.extend_from_slice(&(MEM as u32 + 20).to_le_bytes());
    k.code.extend_from_slice(&[0x48, 0xC1, 0xE2, 0x0C]); // shl rdx, 12
    k.code.extend_from_slice(&[0x48, 0x8D, 0x14, 0x82]); // lea rdx, [rdx + rax*4]
}

#[test]
fn the_guests_net_page_is_the_files_first_page() {
    require_kvm!();
    let net = TempFile::new("dma-tiny-map", b"");
    let mut k = Tiny::new();
    slot_and_key(&mut k);
    k.crash_unless_eax(
        1,
        "the first Guest on a network is not slot 1",
        DATA + 0x3000,
    );
    // Our MAC at page + 6 (slot 1's), that is key + 2.
    k.code.extend_from_slice(&[0xC7, 0x42, 0x02]); // mov dword [rdx + 2], imm32
    k.code.extend_from_slice(&0x0000_6702u32.to_le_bytes());
    k.code.extend_from_slice(&[0x66, 0xC7, 0x42, 0x06]); // mov word [rdx + 6], imm16
    k.code.extend_from_slice(&0x0900u16.to_le_bytes());
    k.put(DATA + 0x2000, b"tiny: mac written\n\0");
    k.hcall(NOTIFY, DATA + 0x2000, 0, 0);
    k.halt_loop();
    let sharenet = format!("--sharenet={}", net.arg());
    let (_file, mut cmd) = tiny("dma-tiny-map-k", k, &[&sharenet]);
    let mut guest = Session::start(&mut cmd);
    guest.expect_stdout("tiny: mac written", TIMEOUT);
    let page = std::fs::read(net.path()).expect("the FILE");
    assert_eq!(
        &page[6..12],
        &[0x02, 0x67, 0, 0, 0, 0x09],
        "the Guest's write is in the FILE\n{}",
        guest.describe_so_far()
    );
}

#[test]
fn a_restart_binds_the_shared_network_again() {
    require_kvm!();
    const RESTARTS: usize = 3;
    let net = TempFile::new("dma-tiny-restart", b"");
    let mut k = Tiny::new();
    slot_and_key(&mut k);
    // Bind a receive buffer at our slot's key: the new boot's hub must be
    // the only one listening there.
    k.mov(RBX, DATA);
    k.mov(RCX, 1 << 8 | 2);
    k.mov(RAX, BIND_DMA as u64);
    k.code.extend_from_slice(&[0xE6, 0x1F]);
    k.dma(DATA, DATA + 0x1000, 1514);
    k.crash_unless_eax(1, "BIND_DMA refused", DATA + 0x3000);
    k.put(DATA + 0x2000, b"tiny: bound\n\0");
    k.hcall(NOTIFY, DATA + 0x2000, 0, 0);
    k.shutdown(RESTART, "again", DATA + 0x3100);
    let sharenet = format!("--sharenet={}", net.arg());
    let (_file, mut cmd) = tiny("dma-tiny-restart-k", k, &[&sharenet]);
    let guest = Session::start(&mut cmd);
    let deadline = Instant::now() + TIMEOUT;
    while guest.stdout_so_far().matches("tiny: bound").count() <= RESTARTS {
        assert!(
            Instant::now() < deadline,
            "expected {RESTARTS} restarts\n{}",
            guest.describe_so_far()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let stderr = guest.stderr_so_far();
    assert!(
        stderr
            .lines()
            .all(|l| l == "lguest: guest restarting: again"),
        "every boot bound its key and restarted\n{}",
        guest.describe_so_far()
    );
}

/*
 * The reference Guest.
 */

/// What the blk self-test leaves in the first 64 KiB of a writable disk.
fn disk_pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xFF) as u8
}

#[test]
fn every_self_test_over_dma_with_the_pattern_on_disk() {
    require_kvm!();
    let disk = TempFile::new("dma-all-disk", &vec![0u8; 2 << 20]);
    // stdin is /dev/null: the end of input comes at once, and must not cut
    // the tests short (they wait with a clock event set).
    let out = run(lguest().args([
        "--transport=dma",
        &format!("--block={}", disk.arg()),
        "--append",
        "test=all",
    ]));
    out.assert_no_panic().assert_code(0);
    for name in CORE_TESTS.iter().chain(&["console", "blk"]) {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    out.assert_stdout_line(&format!(
        "lguest-guest: all {} tests passed",
        CORE_TESTS.len() + 2
    ));
    out.single_stderr_line("lguest: guest powered off: self-tests passed");
    let written = std::fs::read(disk.path()).expect("read the disk back");
    for (i, &byte) in written[..64 << 10].iter().enumerate() {
        assert_eq!(byte, disk_pattern(i), "disk byte {i}\n{}", out.describe());
    }
    assert!(
        written[256 << 10..].iter().all(|&b| b == 0),
        "the Guest wrote past its 256 KiB"
    );
}

#[test]
fn the_prompt_runs_its_input_then_powers_off_at_its_end() {
    require_kvm!();
    let mut guest = Session::start(lguest().arg("--transport=dma"));
    guest.send("echo one\necho two\n");
    guest.close_stdin();
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    out.assert_stdout_line("one").assert_stdout_line("two");
    out.single_stderr_line("lguest: guest powered off: end of input");
}

/// A Guest at its prompt on `--sharenet=FILE` with `ip=ADDR`, stdin open.
fn on_network(file: &TempFile, ip: &str, extra: &[&str]) -> Session {
    let mut cmd = lguest();
    cmd.arg(format!("--sharenet={}", file.arg()))
        .args(extra)
        .args(["--append", &format!("ip={ip}")]);
    let mut guest = Session::start(&mut cmd);
    guest.expect_stdout("lguest> ", TIMEOUT);
    guest
}

/// The Guest's slot, from its `dma: net (entry 1): ...; slot N` line.
fn slot_of(guest: &Session) -> Option<usize> {
    let out = guest.stdout_so_far();
    let line = out
        .lines()
        .find(|l| l.starts_with("lguest-guest: dma: net"))?;
    line.rsplit_once("slot ")?.1.trim().parse().ok()
}

/// Whether a `ping` at `guest`'s prompt got replies (each of its four
/// requests waits a second: a loaded machine may lose one, not all).
fn pings(guest: &mut Session, peer: &str) -> bool {
    let n = ping(guest, peer);
    (1..=4).contains(&n)
}

/// How many echo replies the last `ping` at `guest`'s prompt got, once its
/// statistics line is out.
fn ping(guest: &mut Session, peer: &str) -> usize {
    let before = guest.stdout_so_far().len();
    guest.send(&format!("ping {peer}\n"));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = guest.stdout_so_far();
        let fresh = &out[before..];
        if let Some(i) = fresh.find("ping statistics: 4 packets transmitted, ") {
            let rest = &fresh[i + "ping statistics: 4 packets transmitted, ".len()..];
            if let Some((n, _)) = rest.split_once(" received") {
                return n.parse().expect("a count");
            }
        }
        if fresh.contains("ping: no ARP reply") {
            return 0;
        }
        assert!(
            Instant::now() < deadline && !guest.has_ended(),
            "no ping statistics\n{}",
            guest.describe_so_far()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn power_off(mut guest: Session) {
    guest.send("poweroff\n");
    let out = guest.finish(TIMEOUT);
    out.assert_no_panic().assert_code(0);
    out.single_stderr_line("lguest: guest powered off: poweroff command");
}

#[test]
fn two_guests_on_one_file_ping_each_other() {
    require_kvm!();
    let net = TempFile::new("dma-two-guests", b"");
    let mut first = on_network(&net, "10.0.0.1", &[]);
    let mut second = on_network(&net, "10.0.0.2", &[]);
    assert_eq!((slot_of(&first), slot_of(&second)), (Some(1), Some(2)));
    assert!(
        pings(&mut second, "10.0.0.1"),
        "{}",
        second.describe_so_far()
    );
    assert!(pings(&mut first, "10.0.0.2"), "{}", first.describe_so_far());
    power_off(first);
    power_off(second);
    // The FILE is as good as new: two more Guests find slots 1 and 2.
    let a = on_network(&net, "10.0.0.3", &[]);
    let mut b = on_network(&net, "10.0.0.4", &[]);
    assert_eq!((slot_of(&a), slot_of(&b)), (Some(1), Some(2)));
    assert!(pings(&mut b, "10.0.0.3"), "{}", b.describe_so_far());
    power_off(a);
    power_off(b);
}

#[test]
fn the_test_guest_pings_a_peer_on_the_file() {
    require_kvm!();
    let net = TempFile::new("dma-ping-test", b"");
    let peer = on_network(&net, "10.0.1.1", &[]);
    let out = run(lguest().args([
        &format!("--sharenet={}", net.arg()),
        "--append",
        "test=ping ip=10.0.1.2 peer=10.0.1.1",
    ]));
    out.assert_no_panic().assert_code(0);
    out.assert_stdout_line("lguest-guest: test ping ... ok")
        .assert_stdout_contains(" of 4 echo requests to 10.0.1.1 answered");
    power_off(peer);
}

#[test]
fn a_guest_killed_with_kill_9_frees_its_slot_for_the_next() {
    require_kvm!();
    let net = TempFile::new("dma-kill-9", b"");
    let victim = on_network(&net, "10.0.2.1", &[]);
    let mut guest = on_network(&net, "10.0.2.2", &[]);
    assert_eq!((slot_of(&victim), slot_of(&guest)), (Some(1), Some(2)));
    assert!(pings(&mut guest, "10.0.2.1"), "{}", guest.describe_so_far());

    // Another member of the network (this test, in slot 3) sends full-size
    // frames to the victim all along.
    let member = SharedNet::join(net.path()).expect("join the network");
    assert_eq!(member.slot(), 3);
    let victim_mac = member.mac(1);
    let stop = AtomicBool::new(false);
    let slowest = thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut frame = vec![0u8; 1514];
            frame[..6].copy_from_slice(&victim_mac);
            frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 3]);
            frame[12..14].copy_from_slice(&[0x88, 0xB5]); // local experimental
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                member.send(4, &frame); // slot 1's key
                slowest = slowest.max(start.elapsed());
                thread::sleep(Duration::from_micros(200));
            }
            slowest
        });
        thread::sleep(Duration::from_millis(200));
        // SAFETY: kill(2) of our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) }, 0);
        let out = victim.finish(TIMEOUT);
        assert_eq!(out.code, None, "killed by a signal\n{}", out.describe());
        // Its ring fills; the sender finds nobody holds the slot, and
        // tidies it.
        let deadline = Instant::now() + TIMEOUT;
        while member.stats.reclaimed.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the dead slot was never tidied");
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(member.mac(1), [0; 6], "the dead Guest's MAC is gone");
        thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        sender.join().expect("the sender thread")
    });
    // Never wedged: a send takes a spin at most (the bound leaves room for
    // a loaded machine to preempt the thread).
    assert!(
        slowest < Duration::from_secs(2),
        "a send to the dead Guest took {slowest:?}"
    );
    drop(member);

    // The other Guest is not wedged, and a third Launcher takes the freed
    // slot, where it is reachable.
    guest.send("echo still here\n");
    guest.expect_stdout("\nstill here\n", TIMEOUT);
    let third = on_network(&net, "10.0.2.3", &[]);
    assert_eq!(slot_of(&third), Some(1), "{}", third.describe_so_far());
    assert!(pings(&mut guest, "10.0.2.3"), "{}", guest.describe_so_far());
    power_off(third);
    power_off(guest);
}

/// A Guest that sends faster than its peer takes finds the peer's ring
/// full: its Launcher then asks (on the vCPU thread, under its seccomp
/// filter) whether the peer's Launcher still holds its slot, and sends the
/// frame again later, until every one is taken.
#[test]
fn a_guest_sending_into_a_full_ring_keeps_going_until_all_are_taken() {
    require_kvm!();
    let net = TempFile::new("dma-full-ring", b"");
    // The peer is this test, in slot 1: it takes a frame every 100 us,
    // far slower than the Guest sends them.
    let member = std::sync::Arc::new(SharedNet::join(net.path()).expect("join the network"));
    assert_eq!(member.slot(), 1);
    let mac = [0x02, 0x6c, 0x67, 0, 0, 0x01];
    let got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = got.clone();
    let receiver = member
        .receive(move |offset, frame| {
            if offset == 4 && frame.len() == 1514 && frame[..6] == mac {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            thread::sleep(Duration::from_micros(100));
            Offer::Done
        })
        .expect("a receiver");
    member.publish_keys(&[4]);
    member.set_mac(1, mac);
    let out = run_with_timeout(
        lguest().args([
            &format!("--sharenet={}", net.arg()),
            "--append",
            "bench=sharenet peer=02:6c:67:00:00:01 iters=1500",
        ]),
        Duration::from_secs(60),
    );
    out.assert_no_panic().assert_code(0);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("lguest-bench: sharenet frames="))
        .unwrap_or_else(|| panic!("no result\n{}", out.describe()));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    assert_eq!(field("frames="), 1500, "{line}");
    assert!(field("refused=") > 0, "the ring never filled: {line}");
    let deadline = Instant::now() + TIMEOUT;
    while got.load(Ordering::SeqCst) < 1500 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(got.load(Ordering::SeqCst), 1500, "{line}");
    drop(receiver);
}

/*
 * A shared network bridged to a tap: root, a network namespace of our own.
 */

#[test]
fn a_shared_network_bridged_to_a_tap_is_pinged_from_the_host() {
    require_network!(ping);
    let ns = Netns::new("d");
    let net = TempFile::new("dma-bridge", b"");
    // The bridging Launcher runs in the namespace, where its tap goes; the
    // other Guest needs nothing but the FILE.
    let mut bridged = Session::start(ns.lguest().env("LGUEST_KVM_DEVICE", kvm_device()).args([
        &format!("--sharenet={}", net.arg()),
        "--tunnet=10.77.31.1",
        "--append",
        "ip=10.77.31.2",
    ]));
    bridged.expect_stdout("lguest> ", TIMEOUT);
    let mut other = on_network(&net, "10.77.31.3", &[]);
    assert_eq!(slot_of(&other), Some(2), "{}", other.describe_so_far());
    for guest in ["10.77.31.2", "10.77.31.3"] {
        let out = run_with_timeout(
            ns.command("ping").args(["-c", "3", "-W", "2", guest]),
            netns::STEP,
        );
        assert!(
            out.code == Some(0),
            "the host cannot ping {guest}\n{}\n{}\n{}",
            out.describe(),
            bridged.describe_so_far(),
            other.describe_so_far()
        );
    }
    // And the Guest without a tap reaches the host through the bridge.
    assert!(
        pings(&mut other, "10.77.31.1"),
        "{}",
        other.describe_so_far()
    );
    power_off(other);
    power_off(bridged);
}

#[test]
fn only_one_launcher_bridges_a_network() {
    require_network!();
    let ns = Netns::new("d");
    let net = TempFile::new("dma-two-bridges", b"");
    let sharenet = format!("--sharenet={}", net.arg());
    let mut k = Tiny::new();
    k.put(DATA + 0x2000, b"tiny: bridged\n\0");
    k.hcall(NOTIFY, DATA + 0x2000, 0, 0);
    k.halt_loop();
    let kernel = TempFile::new("dma-two-bridges-k", &k.elf());
    let bridge = |tap: &str| {
        let mut cmd = ns.lguest();
        cmd.env("LGUEST_KVM_DEVICE", kvm_device()).args([
            sharenet.as_str(),
            tap,
            &MEM_MB.to_string(),
            kernel.arg(),
        ]);
        cmd
    };
    let mut first = Session::start(&mut bridge("--tunnet=10.77.32.1"));
    // The Launcher has joined once its Guest runs.
    first.expect_stdout("tiny: bridged", TIMEOUT);
    let out = run(&mut bridge("--tunnet=10.77.33.1"));
    out.assert_no_panic().assert_code(2);
    assert_eq!(
        out.single_stderr_line("lguest: "),
        format!(
            "lguest: --sharenet={}: slot 0, the bridge to a tap, is taken: another Launcher \
             with --tunnet bridges this network already",
            net.arg()
        )
    );
    assert!(!first.has_ended(), "{}", first.describe_so_far());
}

/*
 * P7 in `lguest --bench`: the second process is lguest itself.
 */

#[test]
fn lguest_is_its_own_p7_peer() {
    // A short run, with the lguest binary as the peer: main hands the
    // process over to P7 before it looks at its command line.
    let peer = || Command::new(env!("CARGO_BIN_EXE_lguest"));
    let figures = lguest::dma::bench::p7(&peer, 1, 2000).expect("P7 with lguest as the peer");
    assert!(figures.line().starts_with("P7-sharenet-standin value="));
    assert!(figures.value() > 0.0 && figures.floor() > 0.0);
    // A peer told nonsense says so, as a set-up error.
    let out = run(lguest().env("LGUEST_DMA_BENCH_PEER", "nonsense"));
    out.assert_no_panic().assert_code(2);
    assert_eq!(
        out.single_stderr_line("lguest: "),
        "lguest: LGUEST_DMA_BENCH_PEER=nonsense: not a P7 peer"
    );
}

/// P7 itself, short: two Launchers on a fresh FILE, the test Guest sending
/// in one (`bench=sharenet`) and receiving in the other
/// (`bench=sharenet-rx`), against the socketpair. For real figures, more
/// runs of more frames (the same line `lguest --bench` prints):
///
/// ```text
/// LGUEST_P7_RUNS=5 LGUEST_P7_FRAMES=100000 cargo test --release --test dma_launcher p7_ -- --nocapture
/// ```
#[test]
fn p7_moves_frames_between_two_guests_and_its_line_parses() {
    require_kvm!();
    let env_or = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (runs, frames) = (
        env_or("LGUEST_P7_RUNS", 1),
        env_or("LGUEST_P7_FRAMES", 3000),
    );
    let peer = || Command::new(env!("CARGO_BIN_EXE_lguest"));
    let p7 = lguest::dma::bench::p7_guests(&peer, &lguest, runs as usize, frames)
        .expect("P7 between two Guests");
    for run in &p7.runs {
        // The receiver got every frame the sender's used_len said was
        // taken, all of them ours and whole.
        assert_eq!(
            (run.sent, run.received, run.bad),
            (frames, frames, 0),
            "{:?}",
            run.lines
        );
        assert!(run.mib_s > 0.0 && run.mib_s.is_finite(), "{:?}", run.lines);
        println!("{}\n{}", run.lines[0], run.lines[1]);
    }
    let line = p7.line();
    println!("{line}");
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    assert!(line.starts_with("P7-sharenet value="), "{line}");
    assert!(
        line.contains(" unit=MiB/s ") && line.contains(" higher=better"),
        "{line}"
    );
    let (v, f, r) = (field("value="), field("floor="), field("ratio="));
    assert!(v > 0.0 && f > 0.0, "{line}");
    assert!((r - v / f).abs() < 0.01 + r * 0.001, "{line}");
    assert_eq!(
        (field("runs="), field("lost=")),
        (runs as f64, 0.0),
        "{line}"
    );
}
