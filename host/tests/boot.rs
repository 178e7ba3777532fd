//! Booting a kernel of our own: the boot protocol of ABI section 3, the
//! command line and initrd, SHUTDOWN's three outcomes and what the Launcher
//! prints for them.
//!
//! The kernels here are a few dozen x86-64 instructions, assembled by hand
//! below, loaded from an ELF file like any other KERNEL. They check what the
//! ABI promises them and report through the early console (NOTIFY of a
//! string) and SHUTDOWN, so the test sees the result on stdout and in the exit
//! status. A check that fails crashes the Guest with a reason naming it.

#[macro_use]
mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// RAM for every Guest here, in MiB, and in bytes.
const MEM_MB: u64 = 16;
const MEM: u64 = MEM_MB << 20;

/// Where the kernel's one segment goes: code on the first page, lguest_data
/// on the second, strings from the third.
const BASE: u64 = 0x10_0000;
const LGUEST_DATA: u64 = BASE + 0x1000;
const STRINGS: u64 = BASE + 0x2000;

/// Offsets in boot_params, and the command line page (ABI section 3).
const CMDLINE: u64 = 0x1000;
const E820_ENTRIES: u64 = 0x1E8;
const BOOT_FLAG: u64 = 0x1FE;
const HEADER: u64 = 0x202;
const VERSION: u64 = 0x206;
const TYPE_OF_LOADER: u64 = 0x210;
const RAMDISK_IMAGE: u64 = 0x218;
const RAMDISK_SIZE: u64 = 0x21C;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_SIZE: u64 = 0x238;
const HARDWARE_SUBARCH: u64 = 0x23C;
const HARDWARE_SUBARCH_DATA: u64 = 0x240;
const E820_TABLE: u64 = 0x2D0;

/// Offsets in lguest_data (ABI section 5).
const HCALL_STATUS: u64 = 36;
const RESERVE_MEM: u64 = 2664;
const PGDIR: u64 = 2672;
const GUESTID: u64 = 2684;
const PFN_LIMIT: u64 = 2704;
const HOST_PML4E: u64 = 2712;
const TIME_SEC: u64 = 16;

/// Hypercall numbers (ABI section 4).
const LGUEST_INIT: u32 = 1;
const SHUTDOWN: u32 = 2;
const GET_WALLCLOCK: u32 = 11;
const NOTIFY: u32 = 17;
const POWER_OFF: u32 = 1;
const RESTART: u32 = 2;
const CRASH: u32 = 3;

/// 2020-01-01 or so: the wall clock must be later than this.
const SOME_TIME_AGO: u64 = 1_577_836_800;

/// Registers, by their number in instruction encodings.
const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;
const RBP: u8 = 5;
const RSI: u8 = 6;
const RDI: u8 = 7;
const R15: u8 = 15;

/// The code and stack selectors, by their number in `mov r, Sreg`, and the
/// values the ABI gives them.
///
/// DS, ES, FS and GS are left out: the Host loads 0x2B into them too, but on
/// PVM (a software KVM our machines use) ring-3 code reads them back as 0. In
/// 64-bit mode nothing depends on them (FS and GS bases are set by LOAD_TLS).
const SREGS: [(&str, u8, u64); 2] = [("CS", 1, 0x33), ("SS", 2, 0x2B)];

/// What a check wants of RAX compared with the expected value (unsigned).
#[derive(Clone, Copy)]
enum Want {
    Equal,
    NotEqual,
    AtLeast,
}

/// A tiny kernel under construction: x86-64 machine code that runs at CPL 3
/// from `BASE`, plus the strings it prints.
struct Kernel {
    code: Vec<u8>,
    strings: Vec<u8>,
    /// Whether the code emitted so far has made LGUEST_INIT.
    initialized: bool,
    /// Positions of rel32 fields of jumps to the failure exit, for checks
    /// made before LGUEST_INIT and after it.
    early_fail_jumps: Vec<usize>,
    fail_jumps: Vec<usize>,
}

impl Kernel {
    fn new() -> Kernel {
        Kernel {
            code: Vec::new(),
            strings: Vec::new(),
            initialized: false,
            early_fail_jumps: Vec::new(),
            fail_jumps: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    /// Adds a NUL-terminated string; returns its physical address.
    fn string(&mut self, text: &[u8]) -> u32 {
        let addr = STRINGS + self.strings.len() as u64;
        self.strings.extend_from_slice(text);
        self.strings.push(0);
        addr as u32
    }

    /// `mov r32, imm32` (which clears the upper half of the register).
    fn mov32(&mut self, reg: u8, imm: u32) {
        if reg >= 8 {
            self.emit(&[0x41]);
        }
        self.emit(&[0xB8 + (reg & 7)]);
        self.emit(&imm.to_le_bytes());
    }

    /// `mov rcx, imm64`.
    fn mov_rcx_imm64(&mut self, imm: u64) {
        self.emit(&[0x48, 0xB9]);
        self.emit(&imm.to_le_bytes());
    }

    /// Loads `width` bytes at physical `addr` into RAX, zero-extended.
    fn load_rax(&mut self, addr: u64, width: u8) {
        match width {
            1 => self.emit(&[0x0F, 0xB6, 0x04, 0x25]), // movzx eax, byte [addr]
            2 => self.emit(&[0x0F, 0xB7, 0x04, 0x25]), // movzx eax, word [addr]
            4 => self.emit(&[0x8B, 0x04, 0x25]),       // mov eax, [addr]
            8 => self.emit(&[0x48, 0x8B, 0x04, 0x25]), // mov rax, [addr]
            _ => unreachable!("width {width}"),
        }
        self.emit(&(addr as u32).to_le_bytes());
    }

    /// The hypercall instruction `out %al, $0x1f`.
    fn out_1f(&mut self) {
        self.emit(&[0xE6, 0x1F]);
    }

    /// The hypercall instruction `int $0x1f`.
    fn int_1f(&mut self) {
        self.emit(&[0xCD, 0x1F]);
    }

    /// A hypercall with up to two arguments, made with `out`.
    fn hcall(&mut self, nr: u32, arg1: u32, arg2: u32) {
        self.mov32(RAX, nr);
        self.mov32(RDX, arg1);
        self.mov32(RBX, arg2);
        self.out_1f();
    }

    /// Marks the async ring empty and registers lguest_data, with the
    /// `int $0x1f` form of the hypercall.
    fn init(&mut self) {
        self.initialized = true;
        self.mov32(RDI, (LGUEST_DATA + HCALL_STATUS) as u32);
        self.mov32(RCX, 64);
        self.mov32(RAX, 0xFF);
        self.emit(&[0xF3, 0xAA]); // rep stosb
        self.mov32(RAX, LGUEST_INIT);
        self.mov32(RDX, LGUEST_DATA as u32);
        self.int_1f();
    }

    /// Prints `text` on the early console.
    fn print(&mut self, text: &str) {
        let addr = self.string(text.as_bytes());
        self.hcall(NOTIFY, addr, 0);
    }

    /// Prints the NUL-terminated string at `addr`.
    fn print_at(&mut self, addr: u64) {
        self.hcall(NOTIFY, addr as u32, 0);
    }

    /// Prints the string whose address is the u32 at `ptr`.
    fn print_indirect(&mut self, ptr: u64) {
        self.emit(&[0x8B, 0x14, 0x25]); // mov edx, [ptr]
        self.emit(&(ptr as u32).to_le_bytes());
        self.mov32(RAX, NOTIFY);
        self.out_1f();
    }

    /// Crashes the Guest with reason `what` unless the flags (set by a
    /// comparison of RAX with RCX, or a test) say `want`.
    fn fail_unless(&mut self, want: Want, what: &str) {
        let reason = self.string(what.as_bytes());
        self.mov32(RDX, reason); // mov leaves the flags alone
        let jcc = match want {
            Want::Equal => 0x85,    // jne
            Want::NotEqual => 0x84, // je
            Want::AtLeast => 0x82,  // jb
        };
        self.emit(&[0x0F, jcc]);
        let at = self.code.len();
        if self.initialized {
            self.fail_jumps.push(at);
        } else {
            self.early_fail_jumps.push(at);
        }
        self.emit(&[0; 4]);
    }

    /// Crashes the Guest unless the `width`-byte value at `addr` compares
    /// with `value` as `want` says.
    fn check(&mut self, addr: u64, width: u8, want: Want, value: u64, what: &str) {
        self.load_rax(addr, width);
        self.mov_rcx_imm64(value);
        self.emit(&[0x48, 0x39, 0xC8]); // cmp rax, rcx
        self.fail_unless(want, what);
    }

    /// Crashes the Guest unless 64-bit register `reg` holds `value`
    /// (which must be below 2^31).
    fn check_reg(&mut self, reg: u8, value: u32, what: &str) {
        assert!(value < 0x8000_0000);
        // cmp r64, imm32
        self.emit(&[0x48 | (reg >> 3), 0x81, 0xF8 | (reg & 7)]);
        self.emit(&value.to_le_bytes());
        self.fail_unless(Want::Equal, what);
    }

    /// Powers off (or restarts, or crashes: `how`) with `reason`.
    fn shutdown(&mut self, how: u32, reason: &[u8]) {
        let addr = self.string(reason);
        self.hcall(SHUTDOWN, addr, how);
        self.emit(&[0xEB, 0xFE]); // jmp . (never reached)
    }

    /// The kernel as an ELF file. The failure exits go after the code: RDX
    /// already holds the reason, so they crash with it. A check made before
    /// LGUEST_INIT makes it first (SHUTDOWN before INIT would be Sudden
    /// Death), keeping the reason in R15 meanwhile.
    fn elf(mut self) -> Vec<u8> {
        let early_fail = self.code.len();
        self.emit(&[0x41, 0x89, 0xD7]); // mov r15d, edx
        self.init();
        self.emit(&[0x44, 0x89, 0xFA]); // mov edx, r15d
        let fail = self.code.len();
        self.mov32(RAX, SHUTDOWN);
        self.mov32(RBX, CRASH);
        self.out_1f();
        self.emit(&[0xEB, 0xFE]);
        for (jumps, target) in [
            (&self.early_fail_jumps, early_fail),
            (&self.fail_jumps, fail),
        ] {
            for &at in jumps {
                let rel = target as i32 - (at as i32 + 4);
                self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
            }
        }
        assert!(self.code.len() <= 0x1000, "test kernel code too long");
        let mut data = self.code;
        data.resize((STRINGS - BASE) as usize, 0);
        data.extend_from_slice(&self.strings);
        let memsz = data.len() as u64;
        elf64(
            ET_EXEC,
            EM_X86_64,
            BASE,
            &[Segment {
                addr: BASE,
                data,
                memsz,
            }],
        )
    }
}

/// Writes `kernel` to a temporary file and runs
/// `lguest OPTIONS MEM_MB KERNEL KERNEL_ARGS`.
fn boot(name: &str, kernel: Kernel, options: &[&str], kernel_args: &[&str]) -> Outcome {
    let file = TempFile::new(name, &kernel.elf());
    let out = run(lguest()
        .args(options)
        .arg(MEM_MB.to_string())
        .arg(file.arg())
        .args(kernel_args));
    out.assert_no_panic();
    out
}

/// A kernel that does only what every Guest must: INIT, then power off.
#[test]
fn a_minimal_kernel_boots_and_powers_off() {
    require_kvm!();
    let mut k = Kernel::new();
    k.init();
    k.print("tiny: hello\n");
    k.shutdown(POWER_OFF, b"tiny done");
    let out = boot("minimal", k, &[], &[]);
    out.assert_code(0).assert_stdout_line("tiny: hello");
    let line = out.single_stderr_line("lguest: guest powered off: ");
    assert_eq!(line.trim_end(), "lguest: guest powered off: tiny done");
}

#[test]
fn entry_registers_and_selectors_match_the_abi() {
    require_kvm!();
    let mut k = Kernel::new();
    // Every general register is 0 at entry, RSP and RSI included: OR them
    // all into RAX (`or rax, reg`) and check the result.
    for reg in 1..16u8 {
        k.emit(&[0x48 | ((reg >> 3) << 2), 0x09, 0xC0 | ((reg & 7) << 3)]);
    }
    k.fail_unless(Want::Equal, "a register is not 0 at entry");
    // CS 0x33 and SS 0x2B, which the Host's interrupt frames carry too.
    for (name, sreg, value) in SREGS {
        k.emit(&[0x8C, 0xC0 | (sreg << 3)]); // mov eax, sreg
        k.emit(&[0x0F, 0xB7, 0xC0]); // movzx eax, ax
        k.mov_rcx_imm64(value);
        k.emit(&[0x48, 0x39, 0xC8]); // cmp rax, rcx
        k.fail_unless(Want::Equal, &format!("{name} is not {value:#x}"));
    }
    k.init();
    k.print("tiny: entry ok\n");
    k.shutdown(POWER_OFF, b"done");
    let out = boot("entry-state", k, &[], &[]);
    out.assert_code(0).assert_stdout_line("tiny: entry ok");
}

#[test]
fn boot_params_match_the_abi() {
    require_kvm!();
    use Want::*;
    let mut k = Kernel::new();
    k.init();
    k.check(BOOT_FLAG, 2, Equal, 0xAA55, "boot_flag");
    k.check(
        HEADER,
        4,
        Equal,
        u32::from_le_bytes(*b"HdrS").into(),
        "header",
    );
    k.check(VERSION, 2, Equal, 0x020F, "version");
    k.check(TYPE_OF_LOADER, 1, Equal, 0xFF, "type_of_loader");
    k.check(RAMDISK_IMAGE, 4, Equal, 0, "ramdisk_image without initrd");
    k.check(RAMDISK_SIZE, 4, Equal, 0, "ramdisk_size without initrd");
    k.check(CMD_LINE_PTR, 4, Equal, CMDLINE, "cmd_line_ptr");
    k.check(CMDLINE_SIZE, 4, Equal, 4095, "cmdline_size");
    k.check(HARDWARE_SUBARCH, 4, Equal, 1, "hardware_subarch");
    k.check(HARDWARE_SUBARCH_DATA, 8, Equal, 2, "device model");
    k.check(E820_ENTRIES, 1, Equal, 1, "e820_entries");
    k.check(E820_TABLE, 8, Equal, 0, "e820 addr");
    k.check(E820_TABLE + 8, 8, Equal, MEM, "e820 size");
    k.check(E820_TABLE + 16, 4, Equal, 1, "e820 type");
    k.print("tiny: boot_params ok\n");
    k.shutdown(POWER_OFF, b"done");
    let out = boot("boot-params", k, &[], &[]);
    out.assert_code(0)
        .assert_stdout_line("tiny: boot_params ok");
}

#[test]
fn init_fills_the_host_fields_of_lguest_data() {
    require_kvm!();
    use Want::*;
    let mut k = Kernel::new();
    k.init();
    let field = |off: u64| LGUEST_DATA + off;
    k.check(field(RESERVE_MEM), 8, Equal, 1 << 47, "reserve_mem");
    k.check(
        field(PFN_LIMIT),
        8,
        AtLeast,
        MEM >> 12,
        "pfn_limit below RAM",
    );
    k.check(field(HOST_PML4E), 8, NotEqual, 0, "host_pml4e");
    k.check(field(GUESTID), 2, Equal, 0, "guestid");
    k.check(field(TIME_SEC), 8, AtLeast, SOME_TIME_AGO, "time_sec");
    // The initial PML4 is in the Host's pages, which start at pfn_limit.
    k.load_rax(field(PGDIR), 8);
    k.emit(&[0x48, 0x8B, 0x0C, 0x25]); // mov rcx, [pfn_limit]
    k.emit(&(field(PFN_LIMIT) as u32).to_le_bytes());
    k.emit(&[0x48, 0xC1, 0xE1, 0x0C]); // shl rcx, 12
    k.emit(&[0x48, 0x39, 0xC8]); // cmp rax, rcx
    k.fail_unless(AtLeast, "pgdir below pfn_limit");
    k.print("tiny: lguest_data ok\n");
    k.shutdown(POWER_OFF, b"done");
    let out = boot("lguest-data", k, &[], &[]);
    out.assert_code(0)
        .assert_stdout_line("tiny: lguest_data ok");
}

#[test]
fn hypercalls_preserve_registers() {
    require_kvm!();
    // Both hypercall instructions, each site run twice: the Host may rewrite
    // an `int $0x1f` it has run, and the second pass goes through whatever it
    // left there.
    let preserved = [
        ("RBX", RBX),
        ("RCX", RCX),
        ("RSI", RSI),
        ("RDI", RDI),
        ("RBP", RBP),
        ("R8", 8),
        ("R9", 9),
        ("R10", 10),
        ("R11", 11),
        ("R12", 12),
        ("R13", 13),
        ("R14", 14),
    ];
    let mut k = Kernel::new();
    k.init();
    for (site, use_int) in [("out", false), ("int", true)] {
        k.mov32(R15, 2); // loop counter
        let top = k.code.len();
        for (i, &(_, reg)) in preserved.iter().enumerate() {
            k.mov32(reg, 0x1111_0000 + i as u32);
        }
        k.mov32(RDX, 0x2222_0000);
        k.mov32(RAX, GET_WALLCLOCK);
        if use_int {
            k.int_1f();
        } else {
            k.out_1f();
        }
        // RDX first: the checks themselves put their reason in RDX.
        k.check_reg(RDX, 0x2222_0000, &format!("{site}: RDX changed"));
        for (i, &(name, reg)) in preserved.iter().enumerate() {
            k.check_reg(
                reg,
                0x1111_0000 + i as u32,
                &format!("{site}: {name} changed"),
            );
        }
        k.mov_rcx_imm64(SOME_TIME_AGO);
        k.emit(&[0x48, 0x39, 0xC8]); // cmp rax, rcx
        k.fail_unless(Want::AtLeast, &format!("{site}: GET_WALLCLOCK result"));
        k.emit(&[0x41, 0xFF, 0xCF]); // dec r15d
        k.emit(&[0x0F, 0x85]); // jnz top
        let rel = top as i32 - (k.code.len() as i32 + 4);
        k.emit(&rel.to_le_bytes());
    }
    k.print("tiny: registers ok\n");
    k.shutdown(POWER_OFF, b"done");
    let out = boot("preserve", k, &[], &[]);
    out.assert_code(0).assert_stdout_line("tiny: registers ok");
}

#[test]
fn kernel_args_and_append_reach_the_command_line() {
    require_kvm!();
    let mut k = Kernel::new();
    k.init();
    k.print("cmdline: [");
    k.print_at(CMDLINE);
    k.print("]\n");
    k.shutdown(POWER_OFF, b"done");
    let out = boot(
        "cmdline",
        k,
        &["--append", "quiet x=1"],
        &["root=/dev/vda", "console=hvc0"],
    );
    out.assert_code(0);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: ["))
        .unwrap_or_else(|| panic!("no command line printed\n{}", out.describe()));
    // The words in order within each group, one space apart.
    for words in ["root=/dev/vda console=hvc0", "quiet x=1"] {
        assert!(line.contains(words), "{words:?} missing from {line:?}");
    }
}

#[test]
fn initrd_is_loaded_at_the_top_of_ram() {
    require_kvm!();
    use Want::*;
    let contents = b"initrd: hello from the initrd\n\0";
    let len = contents.len() as u64;
    let mut k = Kernel::new();
    k.init();
    k.check(RAMDISK_SIZE, 4, Equal, len, "ramdisk_size");
    // The highest page-aligned start that fits below the end of RAM.
    k.check(
        RAMDISK_IMAGE,
        4,
        Equal,
        (MEM - len) & !0xFFF,
        "ramdisk_image",
    );
    k.print_indirect(RAMDISK_IMAGE);
    k.shutdown(POWER_OFF, b"done");
    let initrd = TempFile::new("initrd-contents", contents);
    let out = boot(
        "initrd-kernel",
        k,
        &[format!("--initrd={}", initrd.arg()).as_str()],
        &[],
    );
    out.assert_code(0)
        .assert_stdout_line("initrd: hello from the initrd");
}

#[test]
fn crash_exits_1_with_the_reason() {
    require_kvm!();
    let mut k = Kernel::new();
    k.init();
    k.shutdown(CRASH, b"tiny crashed on purpose");
    let out = boot("crash", k, &[], &[]);
    out.assert_code(1);
    let line = out.single_stderr_line("lguest: guest crashed: ");
    assert_eq!(
        line.trim_end(),
        "lguest: guest crashed: tiny crashed on purpose"
    );
}

#[test]
fn an_unknown_shutdown_code_kills_the_guest() {
    require_kvm!();
    let mut k = Kernel::new();
    k.init();
    k.shutdown(7, b"what is 7?");
    let out = boot("shutdown-7", k, &[], &[]);
    out.assert_code(1);
    out.single_stderr_line("lguest: guest killed: ");
}

#[test]
fn a_trap_before_lguest_init_gets_a_hint() {
    require_kvm!();
    let mut k = Kernel::new();
    k.emit(&[0x0F, 0x0B]); // ud2, before anything else
    let out = boot("trap-before-init", k, &[], &[]);
    out.assert_code(1);
    let line = out.single_stderr_line("lguest: guest killed: unhandled trap 6");
    assert!(line.contains("before LGUEST_INIT"), "{line}");
}

#[test]
fn a_trap_with_no_stack_gets_a_hint() {
    require_kvm!();
    let mut k = Kernel::new();
    k.init();
    k.emit(&[0x0F, 0x0B]); // ud2 with RSP still 0 and no gates
    let out = boot("trap-no-stack", k, &[], &[]);
    out.assert_code(1);
    let line = out.single_stderr_line("lguest: guest killed: unhandled trap 6");
    assert!(line.contains("RSP is 0"), "{line}");
}

#[test]
fn control_characters_in_the_reason_are_escaped() {
    require_kvm!();
    // An escape sequence, a newline and a bell: the Guest must not be able to
    // drive the user's terminal or forge a second line.
    let mut k = Kernel::new();
    k.init();
    k.shutdown(POWER_OFF, b"evil\x1b[2J\nlguest: forged\x07");
    let out = boot("escapes", k, &[], &[]);
    out.assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: evil");
    assert!(
        !line.contains(['\x1b', '\x07']),
        "control characters printed as they are: {line:?}"
    );
    assert!(
        line.contains("forged"),
        "text after the newline kept: {line:?}"
    );
}

#[test]
fn a_long_reason_is_cut_at_127_bytes() {
    require_kvm!();
    let mut k = Kernel::new();
    k.init();
    k.shutdown(POWER_OFF, &[b'x'; 200]);
    let out = boot("long-reason", k, &[], &[]);
    out.assert_code(0);
    let line = out.single_stderr_line("lguest: guest powered off: ");
    let reason = line["lguest: guest powered off: ".len()..].trim_end();
    assert_eq!(reason, "x".repeat(127));
}

#[test]
fn restart_boots_the_same_kernel_again() {
    require_kvm!();
    // This kernel restarts every time, so the Launcher never exits: watch
    // stderr for a few restarts, then kill it.
    const RESTARTS: usize = 3;
    let mut k = Kernel::new();
    k.init();
    k.print("tiny: boot\n");
    k.shutdown(RESTART, b"again");
    let file = TempFile::new("restart", &k.elf());
    let mut child = spawn(lguest().arg(MEM_MB.to_string()).arg(file.arg()));

    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stdout = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });

    let restarting = |l: &String| l.starts_with("lguest: guest restarting: ");
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    while seen.iter().filter(|l| restarting(l)).count() < RESTARTS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let exited = child.try_wait().expect("waiting for lguest");
    let _ = child.kill();
    let _ = child.wait();
    let stdout = stdout.join().expect("stdout reader");

    let restarts: Vec<&String> = seen.iter().filter(|l| restarting(l)).collect();
    assert!(
        restarts.len() >= RESTARTS,
        "expected {RESTARTS} restarts (exited: {exited:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        seen.join("\n")
    );
    for line in &restarts {
        assert_eq!(line.trim_end(), "lguest: guest restarting: again");
    }
    assert!(
        exited.is_none(),
        "the Launcher exited instead of restarting: {exited:?}"
    );
    assert!(
        stdout.matches("tiny: boot").count() >= RESTARTS,
        "each boot prints once\n{stdout}"
    );
}

/// A kernel that INITs, says `tiny: halting`, then HALTs forever: no timer
/// is armed, so only the user can end it.
fn halting_forever() -> Kernel {
    let mut k = Kernel::new();
    k.init();
    k.print("tiny: halting\n");
    let again = k.code.len();
    k.hcall(10, 0, 0); // HALT
    let back = again as i32 - (k.code.len() as i32 + 2);
    k.emit(&[0xEB, back as u8]); // jmp back to the HALT
    k
}

#[test]
fn three_ctrl_c_end_a_halted_guest_but_one_does_not() {
    require_kvm!();
    let file = TempFile::new("ctrl-c", &halting_forever().elf());
    let mut guest = Session::start(lguest().arg(MEM_MB.to_string()).arg(file.arg()));
    // The greeting comes after the Ctrl-C handler is in place.
    guest.expect_stdout("tiny: halting", TIMEOUT);

    // One Ctrl-C, taken by the Launcher: the Guest lives on.
    ctrl_c(guest.id());
    thread::sleep(Duration::from_millis(300));
    assert!(
        !guest.has_ended(),
        "one Ctrl-C ended the Guest\n{}",
        guest.describe_so_far()
    );
    // Let the first one age out of the one-second window.
    thread::sleep(Duration::from_millis(1000));

    // Three within a second, each taken before the next is sent (signals
    // sent together merge), end it, with status 1 and a reason.
    let sent = Instant::now();
    for _ in 0..3 {
        ctrl_c(guest.id());
    }
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "the machine took {:?} to deliver three SIGINTs: not within the one-second window",
        sent.elapsed()
    );
    let out = guest.finish(Duration::from_secs(10));
    out.assert_no_panic().assert_code(1);
    assert_eq!(
        out.single_stderr_line("lguest: guest killed: "),
        "lguest: guest killed: ended by the user (three Ctrl-C)"
    );
}

/// A kernel that INITs, then prints `line` through the early console
/// forever.
fn printing_forever(line: &str) -> Kernel {
    let mut k = Kernel::new();
    k.init();
    let again = k.code.len();
    k.print(line);
    let back = again as i32 - (k.code.len() as i32 + 5);
    k.emit(&[0xE9]); // jmp rel32 back to the print
    k.emit(&back.to_le_bytes());
    k
}

#[test]
fn three_ctrl_c_end_a_guest_flooding_the_early_console_into_a_full_pipe() {
    require_kvm!();
    // Nobody reads its stdout: once the pipe is full the Guest waits in its
    // NOTIFY, but the Launcher must still hear Ctrl-C.
    let file = TempFile::new("early-flood", &printing_forever("tiny: flood\n").elf());
    let (stdout, stdout_w) = pipe();
    let probe = stdout_w.try_clone().unwrap();
    let mut guest = Session::start_with_stdio(
        lguest().arg(MEM_MB.to_string()).arg(file.arg()),
        Stdio::null(),
        Stdio::from(stdout_w),
    );
    guest.wait_until_stdout_full(probe);
    let sent = Instant::now();
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
    // What did get out is whole lines, in order.
    drop(out);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &stdout, &mut text).unwrap();
    assert!(text.len() > 60_000, "only {} bytes came out", text.len());
    let whole = &text[..text.rfind('\n').unwrap() + 1];
    assert!(whole.lines().all(|l| l == "tiny: flood"), "garbled output");
}
