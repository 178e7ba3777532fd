//! The virtio-mmio transport, driven by a driver stack we didn't write: the
//! bundled `--guest=drivers` Guest runs the `virtio-drivers` crate's console,
//! block and rng drivers against our devices in their mmio windows. (Its net
//! test is in network.rs, which has the namespaces.) The transport's hostile
//! cases are unit tests in host/src/virtio/mmio.rs.

#[macro_use]
mod common;

use common::*;

const DISK: usize = 4 << 20;

fn drivers(args: &[&str]) -> Outcome {
    let out = run(lguest()
        .args(["--transport=mmio", "--guest=drivers"])
        .args(args));
    out.assert_no_panic();
    out
}

/// The first 64 KiB the block self-test leaves, flushed.
fn assert_pattern(disk: &TempFile) {
    let bytes = std::fs::read(disk.path()).expect("read the disk back");
    assert_eq!(bytes.len(), DISK, "the disk changed size");
    for (i, b) in bytes[..64 << 10].iter().enumerate() {
        assert_eq!(*b, (i * 7 + 3) as u8, "byte {i} of the disk");
    }
}

#[test]
fn every_device_passes_its_self_test_through_virtio_drivers() {
    require_kvm!();
    let disk = TempFile::new("mmio-all", &vec![0u8; DISK]);
    let block = format!("--block={}", disk.arg());
    let out = drivers(&[&block, "--rng", "--append", "test=all"]);
    for name in ["console", "blk", "rng"] {
        out.assert_stdout_line(&format!("lguest-guest: test {name} ... ok"));
    }
    out.assert_stdout_line("lguest-guest: all 3 tests passed")
        .assert_code(0);
    out.single_stderr_line("lguest: guest powered off: ");
    assert_pattern(&disk);
}

#[test]
fn each_device_test_alone() {
    require_kvm!();
    let disk = TempFile::new("mmio-each", &vec![0u8; DISK]);
    let block = format!("--block={}", disk.arg());
    for name in ["console", "blk", "rng"] {
        let append = format!("test={name}");
        let out = drivers(&[&block, "--rng", "--append", &append]);
        out.assert_stdout_line("lguest-guest: all 1 tests passed")
            .assert_code(0);
    }
}

#[test]
fn a_read_only_disk_refuses_writes_over_mmio() {
    require_kvm!();
    let contents: Vec<u8> = (0..DISK).map(|i| (i / 512) as u8).collect();
    let disk = TempFile::new("mmio-ro", &contents);
    let block = format!("--block={},ro", disk.arg());
    let out = drivers(&[&block, "--append", "test=blk"]);
    out.assert_stdout_line("lguest-guest: all 1 tests passed")
        .assert_code(0);
    assert_eq!(
        std::fs::read(disk.path()).unwrap(),
        contents,
        "the disk changed"
    );
}

#[test]
fn windows_are_announced_on_the_command_line() {
    require_kvm!();
    // Console, disk, rng: three windows of 0x200 from the page after the
    // (empty) descriptor page at 64 MiB, IRQs 1, 2, 3.
    let disk = TempFile::new("mmio-cmdline", &vec![0u8; 1 << 20]);
    let block = format!("--block={}", disk.arg());
    let out = run(lguest().args([
        "--verbose",
        "--transport=mmio",
        "--guest=drivers",
        &block,
        "--rng",
    ]));
    out.assert_code(0);
    for word in [
        "virtio_mmio.device=0x200@0x4001000:1",
        "virtio_mmio.device=0x200@0x4001200:2",
        "virtio_mmio.device=0x200@0x4001400:3",
    ] {
        assert!(
            out.stderr.contains(word),
            "{word} not announced\n{}",
            out.describe()
        );
    }
}

#[test]
fn the_reference_guest_finds_no_bus_devices_under_mmio() {
    require_kvm!();
    // The descriptor page is empty: the core tests run, no device tests.
    let out = run(lguest().args(["--transport=mmio", "--append", "test=all"]));
    out.assert_stdout_line("lguest-guest: all 12 tests passed")
        .assert_code(0);
}

/// Breaking the transport's rules ends the Guest, with a reason that names
/// the window or queue (the reference Guest's `bad=mmio-*`).
#[test]
fn hostile_register_use_ends_the_guest() {
    require_kvm!();
    for (case, want) in [
        ("mmio-width", "bad 2-byte read at offset 0x4"),
        ("mmio-early-ready", "enabled before FEATURES_OK"),
        ("mmio-queue-addr", "outside guest memory"),
    ] {
        let append = format!("bad={case}");
        let out = run(lguest().args(["--transport=mmio", "--append", &append]));
        out.assert_no_panic().assert_code(1);
        let line = out.single_stderr_line("lguest: guest killed: virtio-mmio console ");
        assert!(line.contains(want), "bad={case}: {line:?} lacks {want:?}");
    }
}
