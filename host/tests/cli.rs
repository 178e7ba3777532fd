//! The Launcher's command line and set-up errors.
//!
//! Every error here happens before a Guest runs: exit status 2 and exactly one
//! line on stderr, starting `lguest: `, never a panic. The Launcher checks its
//! arguments and files before it opens /dev/kvm, so these tests need no KVM:
//! they point `LGUEST_KVM_DEVICE` at a path that does not exist, and an error
//! that mentions that path means the Launcher got further than it should have.

#[macro_use]
mod common;

use common::*;

/// A KVM device that is never there.
const FAKE_KVM: &str = "/nonexistent/lguest-test-kvm";

/// Runs `lguest ARGS` with the fake KVM device; it must fail with a set-up
/// error (exit 2, one `lguest: ` line, nothing on stdout). Returns the line.
fn setup_error(args: &[&str]) -> String {
    let out = run(lguest().args(args).env("LGUEST_KVM_DEVICE", FAKE_KVM));
    out.assert_no_panic().assert_code(2);
    let line = out.single_stderr_line("lguest: ").to_string();
    assert!(
        out.stdout.trim().is_empty(),
        "a set-up error prints nothing on stdout\n{}",
        out.describe()
    );
    line
}

/// As `setup_error`, for errors that must be found before KVM is opened.
fn early_error(args: &[&str]) -> String {
    let line = setup_error(args);
    assert!(
        !line.contains(FAKE_KVM),
        "lguest {args:?} should fail before opening the KVM device, but said: {line}"
    );
    line
}

/// Panics unless `line` contains `what`, ignoring case.
fn assert_mentions(line: &str, what: &str) {
    assert!(
        line.to_lowercase().contains(&what.to_lowercase()),
        "expected the error to mention {what:?}: {line}"
    );
}

/// An x86-64 ET_EXEC kernel whose one segment starts at `addr` and takes
/// `memsz` bytes: just a `jmp .`, as these tests never run it.
fn kernel_image(addr: u64, memsz: u64) -> Vec<u8> {
    elf64(
        ET_EXEC,
        EM_X86_64,
        addr,
        &[Segment {
            addr,
            data: vec![0xEB, 0xFE],
            memsz,
        }],
    )
}

#[test]
fn help_prints_usage_on_stdout() {
    let out = run(lguest().arg("--help"));
    out.assert_no_panic().assert_code(0);
    for word in [
        "MEM_MB",
        "KERNEL",
        "--append",
        "--initrd",
        "--verbose",
        "--bench",
        "--version",
    ] {
        out.assert_stdout_contains(word);
    }
    assert!(out.stderr.is_empty(), "{}", out.describe());
}

#[test]
fn version_prints_the_package_version() {
    let out = run(lguest().arg("--version"));
    out.assert_no_panic()
        .assert_code(0)
        .assert_stdout_contains(env!("CARGO_PKG_VERSION"));
    assert!(out.stderr.is_empty(), "{}", out.describe());
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let line = early_error(&["--bogus"]);
    assert_mentions(&line, "--bogus");
}

#[test]
fn mem_mb_zero_is_refused() {
    early_error(&["0"]);
}

#[test]
fn mem_mb_one_is_refused() {
    // 2 MiB is the least a Guest can have.
    early_error(&["1"]);
}

#[test]
fn mem_mb_above_64_gib_is_refused() {
    let line = early_error(&["100000"]);
    assert_mentions(&line, "100000");
}

#[test]
fn mem_mb_not_a_number_is_refused() {
    let line = early_error(&["abc"]);
    assert_mentions(&line, "abc");
}

#[test]
fn mem_mb_range_ends_are_accepted() {
    // 2 and 65536 pass the argument checks, so the Launcher goes on to open
    // the KVM device, and it is that which fails. (The bundled Guest is linked
    // at 2 MiB, so the 2 MiB case takes a small kernel of its own.)
    let kernel = TempFile::new("small-kernel", &kernel_image(0x10_0000, 0x1000));
    for args in [&["2", kernel.arg()][..], &["65536"][..]] {
        let line = setup_error(args);
        assert!(
            line.contains(FAKE_KVM),
            "lguest {args:?} should be accepted and fail only at the KVM device: {line}"
        );
    }
}

#[test]
fn missing_kernel_file_is_refused() {
    let path = "/nonexistent/lguest-test-kernel.elf";
    let line = early_error(&["64", path]);
    assert_mentions(&line, path);
}

#[test]
fn a_text_file_is_not_a_kernel() {
    early_error(&["64", "/etc/passwd"]);
}

#[test]
fn a_truncated_elf_header_is_refused() {
    let file = TempFile::new("truncated-elf", b"\x7fELF\x02\x01\x01\x00\x00\x00");
    early_error(&["64", file.arg()]);
}

#[test]
fn an_aarch64_elf_is_refused() {
    let file = TempFile::new("aarch64-elf", &elf64(ET_EXEC, EM_AARCH64, 0x10_0000, &[]));
    let line = early_error(&["64", file.arg()]);
    assert_mentions(&line, "ELF");
}

#[test]
fn a_position_independent_elf_is_refused() {
    // ET_DYN: a shared object or PIE. The ABI wants ET_EXEC, loaded where its
    // program headers say.
    let mut image = kernel_image(0x10_0000, 0x1000);
    image[16..18].copy_from_slice(&ET_DYN.to_le_bytes());
    let file = TempFile::new("et-dyn-elf", &image);
    let line = early_error(&["64", file.arg()]);
    assert_mentions(&line, "ELF");
}

#[test]
fn a_32_bit_elf_is_refused() {
    let file = TempFile::new("elf32", &elf32_i386());
    let line = early_error(&["64", file.arg()]);
    assert_mentions(&line, "ELF");
}

#[test]
fn a_kernel_larger_than_memory_is_refused() {
    // 4 MiB of kernel (mostly bss) in a 2 MiB Guest.
    let file = TempFile::new("huge-kernel", &kernel_image(0x10_0000, 4 << 20));
    early_error(&["2", file.arg()]);
}

#[test]
fn a_kernel_over_the_boot_pages_is_refused() {
    // Pages 0 and 1 hold boot_params and the command line (ABI section 2).
    let file = TempFile::new("low-kernel", &kernel_image(0x1000, 0x1000));
    early_error(&["64", file.arg()]);
}

#[test]
fn missing_initrd_is_refused() {
    let path = "/nonexistent/lguest-test-initrd";
    let line = early_error(&[format!("--initrd={path}").as_str()]);
    assert_mentions(&line, path);
}

#[test]
fn an_initrd_larger_than_memory_is_refused() {
    // 3 MiB of initrd in a 2 MiB Guest, with a kernel that fits on its own.
    let kernel = TempFile::new("small-kernel-big-initrd", &kernel_image(0x10_0000, 0x1000));
    let initrd = TempFile::new("big-initrd", &vec![0x5A; 3 << 20]);
    let line = early_error(&[
        format!("--initrd={}", initrd.arg()).as_str(),
        "2",
        kernel.arg(),
    ]);
    assert_mentions(&line, &format!("initrd {}", initrd.arg()));
}

#[test]
fn an_initrd_above_4_gib_is_refused() {
    // With 8 GiB of RAM the top is above what boot_params' 32-bit
    // ramdisk_image can name.
    let kernel = TempFile::new("kernel-4g-initrd", &kernel_image(0x10_0000, 0x1000));
    let initrd = TempFile::new("initrd-4g", &[0x5A; 4096]);
    let line = early_error(&[
        format!("--initrd={}", initrd.arg()).as_str(),
        "8192",
        kernel.arg(),
    ]);
    assert_mentions(&line, initrd.arg());
    assert_mentions(&line, "4 GiB");
}

#[test]
fn a_kernel_and_initrd_that_overlap_are_refused() {
    // The kernel's segment takes [1 MiB, 1.5 MiB); a 1 MiB initrd at the top
    // of 2 MiB of RAM would start at 1 MiB.
    let kernel = TempFile::new("overlap-kernel", &kernel_image(0x10_0000, 0x8_0000));
    let initrd = TempFile::new("overlap-initrd", &vec![0x5A; 1 << 20]);
    let line = early_error(&[
        format!("--initrd={}", initrd.arg()).as_str(),
        "2",
        kernel.arg(),
    ]);
    // The kernel fits on its own: it is the initrd that does not.
    assert!(
        line.starts_with(&format!("lguest: initrd {} ", initrd.arg())),
        "the error should blame the initrd: {line}"
    );
}

#[test]
fn a_kernel_and_initrd_that_fit_are_accepted() {
    // The counterpart of the test above: [1 MiB, 1 MiB + 4 KiB) and a 512 KiB
    // initrd fit in 2 MiB, so only the KVM device is left to fail.
    let kernel = TempFile::new("fit-kernel", &kernel_image(0x10_0000, 0x1000));
    let initrd = TempFile::new("fit-initrd", &vec![0x5A; 512 << 10]);
    let line = setup_error(&[
        format!("--initrd={}", initrd.arg()).as_str(),
        "2",
        kernel.arg(),
    ]);
    assert!(
        line.contains(FAKE_KVM),
        "the kernel and initrd fit; only the KVM device should fail: {line}"
    );
}

#[test]
fn missing_kvm_device_is_a_setup_error() {
    let line = setup_error(&[]);
    assert_mentions(&line, FAKE_KVM);
}

#[test]
fn a_device_that_is_not_kvm_is_a_setup_error() {
    // /dev/null opens fine, but every KVM ioctl on it fails.
    let out = run(lguest().env("LGUEST_KVM_DEVICE", "/dev/null"));
    out.assert_no_panic().assert_code(2);
    out.single_stderr_line("lguest: ");
}

/*
 * Device options. Disk files and --tunnet are checked before the KVM device
 * is opened (and before any tap is made), so these need no KVM either.
 */

#[test]
fn help_lists_the_device_options() {
    let out = run(lguest().arg("--help"));
    out.assert_no_panic().assert_code(0);
    for word in ["--block", "--tunnet", "--rng"] {
        out.assert_stdout_contains(word);
    }
    // IPADDR goes on the tap: it is the host's end of the link, and the
    // Guest takes its own address with ip=.
    out.assert_stdout_contains("the host's side of a /24");
    assert!(
        !out.stdout.contains("Guest's side"),
        "--help still calls IPADDR the Guest's\n{}",
        out.describe()
    );
}

#[test]
fn a_disk_not_a_whole_number_of_sectors_is_refused() {
    let disk = TempFile::new("odd-disk", &[0; 1000]);
    let line = early_error(&[format!("--block={}", disk.arg()).as_str()]);
    // About the disk file, not the KVM device: it names the file and the
    // sector size.
    assert_mentions(&line, disk.arg());
    assert_mentions(&line, "512");
}

#[test]
fn a_read_only_disk_not_a_whole_number_of_sectors_is_refused() {
    let disk = TempFile::new("odd-disk-ro", &[0; 513]);
    let line = early_error(&[format!("--block={},ro", disk.arg()).as_str()]);
    assert_mentions(&line, disk.arg());
    assert_mentions(&line, "512");
}

#[test]
fn a_missing_disk_file_is_refused() {
    let path = "/nonexistent/lguest-test-disk.img";
    let line = early_error(&[format!("--block={path}").as_str()]);
    assert_mentions(&line, path);
}

#[test]
fn a_missing_second_disk_is_refused() {
    let disk = TempFile::new("first-of-two", &[0; 4096]);
    let path = "/nonexistent/lguest-test-disk2.img";
    let line = early_error(&[
        format!("--block={}", disk.arg()).as_str(),
        format!("--block={path}").as_str(),
    ]);
    assert_mentions(&line, path);
}

#[test]
fn an_empty_block_option_is_refused() {
    early_error(&["--block="]);
}

#[test]
fn a_directory_is_not_a_disk() {
    // Read-only, so that opening it succeeds and the check is on what it is.
    let dir = std::env::temp_dir();
    let dir = dir.to_str().expect("temp dir is UTF-8");
    let line = early_error(&[format!("--block={dir},ro").as_str()]);
    assert_mentions(&line, dir);
}

#[test]
fn good_disks_are_accepted() {
    // Whole sectors, read-write and read-only: only the KVM device is left
    // to fail.
    let a = TempFile::new("good-disk-a", &[0; 4096]);
    let b = TempFile::new("good-disk-b", &[0; 512]);
    let line = setup_error(&[
        format!("--block={}", a.arg()).as_str(),
        format!("--block={},ro", b.arg()).as_str(),
        "--rng",
    ]);
    assert!(
        line.contains(FAKE_KVM),
        "the disks are good; only the KVM device should fail: {line}"
    );
}

#[test]
fn too_many_disks_are_refused() {
    // A Guest has IRQs 1-31 for queues: the console takes two, each disk
    // one, so 29 disks fit and 30 do not. (One file, read-only: a file may be
    // shared by readers, never by writers.)
    let disk = TempFile::new("many-disks", &[0; 512]);
    let arg = format!("--block={},ro", disk.arg());
    let line = setup_error(&vec![arg.as_str(); 29]);
    assert!(
        line.contains(FAKE_KVM),
        "29 disks fit; only the KVM device should fail: {line}"
    );
    let line = early_error(&vec![arg.as_str(); 30]);
    assert_mentions(&line, "too many");
}

#[test]
fn tunnet_not_an_address_is_refused() {
    let line = early_error(&["--tunnet=notanaddress"]);
    assert_mentions(&line, "notanaddress");
}

#[test]
fn tunnet_with_a_bad_mac_is_refused() {
    let line = early_error(&["--tunnet=10.77.9.1:02:00:zz:00:00:01"]);
    assert_mentions(&line, "tunnet");
}

#[test]
fn tunnet_bridge_without_a_name_is_refused() {
    let line = early_error(&["--tunnet=bridge:"]);
    assert_mentions(&line, "tunnet");
}

/*
 * Files that are not what they seem. Each is refused at once: a FIFO is
 * never opened in a way that waits for a writer, a device is never read
 * without end. A Launcher that hangs instead is killed after SOON, and the
 * test fails.
 */

/// Far more than any set-up error takes, far less than a hang.
const SOON: std::time::Duration = std::time::Duration::from_secs(10);

/// A FIFO under the temporary directory (nobody ever writes it), removed
/// when dropped.
struct Fifo(std::path::PathBuf);

impl Fifo {
    fn new(name: &str) -> Fifo {
        let path = std::env::temp_dir().join(format!("lguest-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c_path = std::ffi::CString::new(path.to_str().expect("UTF-8")).expect("no NUL");
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
        Fifo(path)
    }
    fn arg(&self) -> &str {
        self.0.to_str().expect("UTF-8")
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `early_error`, but the Launcher must give its answer within SOON, and
/// with at most 512 MiB of address space: one that reads a device without
/// end dies of it instead of eating the machine.
fn prompt_error(args: &[&str]) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = lguest();
    cmd.args(args).env("LGUEST_KVM_DEVICE", FAKE_KVM);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512 << 20,
                rlim_max: 512 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = run_with_timeout(&mut cmd, SOON);
    out.assert_no_panic().assert_code(2);
    let line = out.single_stderr_line("lguest: ").to_string();
    assert!(
        !line.contains(FAKE_KVM),
        "lguest {args:?} should fail before opening the KVM device, but said: {line}"
    );
    line
}

#[test]
fn a_fifo_is_not_a_kernel() {
    let fifo = Fifo::new("fifo-kernel");
    let line = prompt_error(&["64", fifo.arg()]);
    assert_mentions(&line, fifo.arg());
    assert_mentions(&line, "FIFO");
}

#[test]
fn a_fifo_is_not_an_initrd() {
    let fifo = Fifo::new("fifo-initrd");
    let line = prompt_error(&[format!("--initrd={}", fifo.arg()).as_str()]);
    assert_mentions(&line, fifo.arg());
    assert_mentions(&line, "FIFO");
}

#[test]
fn a_fifo_is_not_a_disk() {
    let fifo = Fifo::new("fifo-disk");
    for spec in [format!("{},ro", fifo.arg()), fifo.arg().to_string()] {
        let line = prompt_error(&[format!("--block={spec}").as_str()]);
        assert_mentions(&line, fifo.arg());
        assert_mentions(&line, "FIFO");
    }
}

#[test]
fn dev_zero_is_neither_kernel_nor_initrd() {
    let line = prompt_error(&["64", "/dev/zero"]);
    assert_mentions(&line, "kernel /dev/zero");
    assert_mentions(&line, "not a regular file");
    let line = prompt_error(&["--initrd=/dev/zero"]);
    assert_mentions(&line, "initrd /dev/zero");
    assert_mentions(&line, "not a regular file");
}

#[test]
fn a_character_device_is_not_a_disk() {
    let line = prompt_error(&["--block=/dev/zero,ro"]);
    assert_mentions(&line, "/dev/zero");
    assert_mentions(&line, "character device");
}

/// A vmlinux as Linux builds one for x86-64: ET_EXEC, loaded at 16 MiB
/// physical, entered in the upper half.
#[test]
fn a_linux_vmlinux_is_named_as_such() {
    let mut image = kernel_image(0x100_0000, 0x10_0000);
    image[24..32].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
    let file = TempFile::new("vmlinux", &image);
    let line = early_error(&["64", file.arg()]);
    assert_mentions(&line, file.arg());
    assert_mentions(&line, "looks like a Linux vmlinux");
    assert_mentions(&line, "lguest ABI");
}

#[test]
fn a_linux_bzimage_is_named_as_such() {
    // The EFI stub's "MZ", and the real-mode setup header's "HdrS".
    let mut image = vec![0u8; 0x2000];
    image[0..2].copy_from_slice(b"MZ");
    image[0x202..0x206].copy_from_slice(b"HdrS");
    let file = TempFile::new("bzImage", &image);
    let line = early_error(&["64", file.arg()]);
    assert_mentions(&line, "looks like a Linux bzImage");
    assert_mentions(&line, "ELF64 ET_EXEC x86-64");
}

#[test]
fn an_entry_point_outside_the_kernel_is_refused() {
    let mut image = kernel_image(0x10_0000, 0x1000);
    image[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    let file = TempFile::new("entry-outside", &image);
    let line = early_error(&["64", file.arg()]);
    assert_mentions(&line, "entry point 0x200000");
}

#[test]
fn block_options_other_than_ro_are_refused() {
    // Even when a file has that name: the text after the comma is an
    // option, and `ro` the only one.
    let disk = TempFile::new("suffix-disk.img", &[0; 4096]);
    let with_comma = TempFile::new("suffix-disk.img,rw", &[0; 4096]);
    assert!(with_comma.path().exists());
    for option in ["rw", "foo", "ro,ro"] {
        let line = early_error(&[format!("--block={},{option}", disk.arg()).as_str()]);
        assert_mentions(&line, &format!("unknown option '{option}'"));
        assert_mentions(&line, ",ro");
    }
}

#[test]
fn one_file_twice_read_write_is_refused() {
    // Two disks writing one file would corrupt it.
    let disk = TempFile::new("twice-disk", &[0; 4096]);
    let arg = format!("--block={}", disk.arg());
    let line = early_error(&[&arg, &arg]);
    assert_mentions(&line, disk.arg());
    assert_mentions(&line, "twice");
    // Read-only twice is fine: only the KVM device is left to fail.
    let ro = format!("--block={},ro", disk.arg());
    let line = setup_error(&[&ro, &ro]);
    assert_mentions(&line, FAKE_KVM);
}

#[test]
fn tunnet_refuses_addresses_a_tap_cannot_have() {
    for (spec, why) in [
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("10.77.9.0", "network address"),
        ("10.77.9.255", "broadcast address"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
    ] {
        let line = early_error(&[format!("--tunnet={spec}").as_str()]);
        assert_mentions(&line, spec);
        assert_mentions(&line, why);
    }
}

#[test]
fn tunnet_refuses_a_multicast_mac() {
    // Bit 0 of the first byte: a group address, no card's own.
    let line = early_error(&["--tunnet=10.77.9.1:01:00:5e:00:00:01"]);
    assert_mentions(&line, "01:00:5e:00:00:01");
    assert_mentions(&line, "multicast");
    let line = early_error(&["--tunnet=bridge:br0:03:00:00:00:00:01"]);
    assert_mentions(&line, "multicast");
}

#[test]
fn tunnet_is_repeatable_and_each_is_checked() {
    // The first is good, the second is not: both are read, in order.
    let line = early_error(&["--tunnet=10.77.9.1", "--tunnet=10.77.10.255"]);
    assert_mentions(&line, "10.77.10.255");
}

#[test]
fn tunnet_to_a_missing_bridge_names_it() {
    // Found before any tap is made, so this needs no root.
    let line = early_error(&["--tunnet=bridge:lgnosuchbr7"]);
    assert_mentions(&line, "bridge lgnosuchbr7");
    assert_mentions(&line, "does not exist");
}

#[test]
fn mmio_with_the_reference_guest_is_refused_with_a_hint() {
    // It finds devices on the lguest bus only, so it would have no console
    // for its prompt.
    let line = early_error(&["--transport=mmio"]);
    assert_mentions(&line, "--guest=drivers");
    // Its self-tests and bad= cases still run there; the drivers Guest too.
    for args in [
        &["--transport=mmio", "--append", "test=all"][..],
        &["--transport=mmio", "--guest=drivers"][..],
    ] {
        let line = setup_error(args);
        assert_mentions(&line, FAKE_KVM);
    }
}

#[test]
fn verbose_names_what_was_set_up_on_lguest_lines() {
    let kernel = TempFile::new("verbose-kernel", &kernel_image(0x10_0000, 0x1000));
    let initrd = TempFile::new("verbose-initrd", &[0x5A; 4096]);
    let a = TempFile::new("verbose-disk-a", &[0; 4096]);
    let b = TempFile::new("verbose-disk-b", &[0; 512]);
    let out = run(lguest()
        .args([
            "--verbose",
            &format!("--initrd={}", initrd.arg()),
            &format!("--block={}", a.arg()),
            &format!("--block={},ro", b.arg()),
            "--rng",
            "64",
            kernel.arg(),
        ])
        .env("LGUEST_KVM_DEVICE", FAKE_KVM));
    out.assert_no_panic().assert_code(2);
    let lines = out.stderr_lines();
    for line in &lines {
        assert!(
            line.starts_with("lguest: "),
            "every line starts with `lguest: `\n{}",
            out.describe()
        );
    }
    let has = |words: &[&str]| lines.iter().any(|l| words.iter().all(|w| l.contains(w)));
    for words in [
        &[kernel.arg()][..],
        &["initrd", initrd.arg(), "4096 bytes"],
        &["disk", a.arg(), "read-write", "8 sectors"],
        &["disk", b.arg(), "read-only", "1 sectors"],
        &["rng"],
        &[FAKE_KVM],
    ] {
        assert!(has(words), "no line with {words:?}\n{}", out.describe());
    }
}
