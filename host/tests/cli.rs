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
    early_error(&[
        format!("--initrd={}", initrd.arg()).as_str(),
        "2",
        kernel.arg(),
    ]);
}

#[test]
fn a_kernel_and_initrd_that_overlap_are_refused() {
    // The kernel's segment takes [1 MiB, 1.5 MiB); a 1 MiB initrd at the top
    // of 2 MiB of RAM would start at 1 MiB.
    let kernel = TempFile::new("overlap-kernel", &kernel_image(0x10_0000, 0x8_0000));
    let initrd = TempFile::new("overlap-initrd", &vec![0x5A; 1 << 20]);
    early_error(&[
        format!("--initrd={}", initrd.arg()).as_str(),
        "2",
        kernel.arg(),
    ]);
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
