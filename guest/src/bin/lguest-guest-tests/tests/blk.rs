//! blk: every disk on the bus, one after the other.
//!
//! On a writable disk: write a pattern over the first 256 KiB with requests
//! of many sizes, several in flight, flush, read it back with other sizes and
//! compare; then leave a pattern the Host's own test checks in the file. On
//! a read-only one (VIRTIO_BLK_F_RO): reads work, a write fails with IOERR,
//! and the disk still holds what it held. Both kinds: GET_ID, and reads past
//! the end fail.

use lguest_abi::VIRTIO_ID_BLOCK;
use lguest_guest::cell::GuestCell;
use lguest_guest::console::Msg;
use lguest_guest::println;
use lguest_guest::time::Deadline;
use lguest_guest::virtio::blk::{self, Blk};

use crate::io::{Requests, ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use crate::io::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use lguest_guest::virtio::Devices;

use super::devices::need;
use super::{Failed, TestResult};

/// The bytes the test region gets: changes with the byte and the sector,
/// so a request that lands in the wrong place shows.
pub fn test_pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(3) ^ ((i >> 9) as u8).wrapping_mul(0x3D)
}

/// The bytes the first 64 KiB are left holding, for the Host's test.
pub(super) fn disk_pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xFF) as u8
}

/// The bulk buffer the requests read into and write from: the Host reads
/// and writes it behind our back, so we hold it only between transfers.
pub(super) const REGION: usize = 256 * 1024;
pub(super) const LEFT_BEHIND: usize = 64 * 1024;
/// Requests in flight at once.
const DEPTH: usize = 8;
pub(super) const WRITE_SIZES: [usize; 10] = [
    4096, 512, 65536, 1024, 16384, 3584, 32768, 8192, 1536, 49152,
];
pub(super) const READ_SIZES: [usize; 7] = [65536, 512, 12288, 2048, 32768, 4096, 7680];

#[repr(C, align(4096))]
struct Bulk([u8; REGION]);

static BULK: GuestCell<Bulk> = GuestCell::new(Bulk([0; REGION]));

pub(super) fn bulk_addr() -> u64 {
    BULK.as_ptr() as u64
}

/// The bulk buffer as bytes. Only between transfers: while a request is in
/// flight the Host may be writing it.
pub(super) fn bulk() -> &'static mut [u8; REGION] {
    // SAFETY: callers hold it only while no request is in flight, and drop
    // it before the next; nothing else uses the bulk buffer meanwhile.
    unsafe { &mut (*BULK.as_ptr()).0 }
}

/// Move `len` bytes between the disk (from sector 0) and the bulk buffer,
/// requests of `sizes` in turn, up to DEPTH in flight. Returns (requests,
/// most in flight at once).
fn transfer(
    blk: &mut Blk,
    kind: u32,
    len: usize,
    sizes: &[usize],
) -> Result<(usize, usize), Failed> {
    let what = if kind == VIRTIO_BLK_T_OUT {
        "write"
    } else {
        "read"
    };
    let deadline = Deadline::after_ms(30_000);
    let (mut offset, mut requests, mut depth) = (0, 0, 0);
    while offset < len || blk.in_flight() > 0 {
        while offset < len && blk.in_flight() < DEPTH {
            let size = sizes[requests % sizes.len()].min(len - offset);
            let sector = (offset as u64) / blk::SECTOR;
            let data = Some((bulk_addr() + offset as u64, size));
            if blk.start(kind, sector, data).is_none() {
                break;
            }
            offset += size;
            requests += 1;
        }
        depth = depth.max(blk.in_flight());
        blk.vq.kick();
        let done = need(what, blk.wait(&deadline))?;
        check!(
            done.status == VIRTIO_BLK_S_OK,
            "a {what} request failed with status {}",
            done.status
        );
    }
    Ok((requests, depth))
}

/// One request on its own, on the first `len` bytes of the bulk buffer:
/// its status.
fn request(blk: &mut Blk, what: &str, kind: u32, sector: u64, len: usize) -> Result<u8, Failed> {
    assert!(blk.in_flight() == 0, "a lone request with others in flight");
    let data = (len > 0).then_some((bulk_addr(), len));
    check!(
        blk.start(kind, sector, data).is_some(),
        "{what}: no room for a request in an idle queue"
    );
    blk.vq.kick();
    Ok(need(what, blk.wait(&Deadline::after_ms(10_000)))?.status)
}

/// Check the first `len` bytes of the bulk buffer follow `pattern`.
pub(super) fn compare(what: &str, len: usize, pattern: impl Fn(usize) -> u8) -> TestResult {
    let data = bulk();
    if let Some(i) = (0..len).find(|&i| data[i] != pattern(i)) {
        fail!(
            "{what}: byte {i} (sector {}) reads {:#04x}, expected {:#04x}",
            i / 512,
            data[i],
            pattern(i)
        );
    }
    Ok(())
}

pub fn test_blk(devs: &mut Devices) -> TestResult {
    let disks = devs
        .bus
        .devices()
        .filter(|d| d.id() == VIRTIO_ID_BLOCK)
        .count();
    check!(disks > 0, "no virtio block device");
    for n in 0..disks.min(blk::MAX_DISKS) {
        let what = Msg::<32>::from_fmt(format_args!("bringing up disk {n}"));
        test_disk(need(what.as_str(), devs.disk(n))?)?;
    }
    Ok(())
}

pub fn test_disk(blk: &mut Blk) -> TestResult {
    let capacity = blk.capacity;
    check!(capacity > 0, "the disk has 0 sectors");

    // GET_ID: the Host's name for the disk, which names it in what follows.
    bulk()[..ID_BYTES].fill(0);
    let status = request(blk, "GET_ID", VIRTIO_BLK_T_GET_ID, 0, ID_BYTES)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "GET_ID failed with status {status}"
    );
    let id = &bulk()[..ID_BYTES];
    let id_len = id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
    check!(id_len > 0, "GET_ID returned an empty id");
    let id = Msg::<32>::from_fmt(format_args!(
        "{}",
        core::str::from_utf8(&id[..id_len]).unwrap_or("(not UTF-8)")
    ));
    let id = id.as_str();

    // Past the end, and across it.
    let status = request(blk, "reading past the end", VIRTIO_BLK_T_IN, capacity, 512)?;
    check!(
        status == VIRTIO_BLK_S_IOERR,
        "{id}: reading sector {capacity} of {capacity}: status {status}, expected IOERR"
    );
    let status = request(
        blk,
        "reading across the end",
        VIRTIO_BLK_T_IN,
        capacity - 1,
        1024,
    )?;
    check!(
        status == VIRTIO_BLK_S_IOERR,
        "{id}: reading 2 sectors from {} of {capacity}: status {status}, expected IOERR",
        capacity - 1
    );

    if blk.read_only {
        return test_read_only(blk, id);
    }

    check!(
        capacity * blk::SECTOR >= 1 << 20,
        "{id} has {capacity} sectors: the test needs at least 1 MiB"
    );
    check!(blk.can_flush, "the Host doesn't offer FLUSH for {id}");
    for (i, byte) in bulk().iter_mut().enumerate() {
        *byte = test_pattern(i);
    }
    let (writes, write_depth) = transfer(blk, VIRTIO_BLK_T_OUT, REGION, &WRITE_SIZES)?;
    let status = request(blk, "FLUSH", VIRTIO_BLK_T_FLUSH, 0, 0)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "{id}: FLUSH failed with status {status}"
    );
    bulk().fill(0);
    let (reads, read_depth) = transfer(blk, VIRTIO_BLK_T_IN, REGION, &READ_SIZES)?;
    compare("reading back", REGION, test_pattern)?;
    check!(
        write_depth > 1 && read_depth > 1,
        "{id}: never more than one request in flight"
    );

    // What the Host's test will find in the file.
    for (i, byte) in bulk()[..LEFT_BEHIND].iter_mut().enumerate() {
        *byte = disk_pattern(i);
    }
    let status = request(blk, "writing", VIRTIO_BLK_T_OUT, 0, LEFT_BEHIND)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "{id}: writing 64 KiB: status {status}"
    );
    let status = request(blk, "FLUSH", VIRTIO_BLK_T_FLUSH, 0, 0)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "{id}: FLUSH failed with status {status}"
    );
    bulk()[..LEFT_BEHIND].fill(0);
    let status = request(blk, "reading", VIRTIO_BLK_T_IN, 0, LEFT_BEHIND)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "{id}: reading 64 KiB: status {status}"
    );
    compare("reading back the first 64 KiB", LEFT_BEHIND, disk_pattern)?;

    println!(
        "lguest-guest: blk: \"{id}\", {capacity} sectors: {} KiB in {writes} writes and {reads} reads, up to {} in flight",
        REGION / 1024,
        write_depth.max(read_depth)
    );
    Ok(())
}

/// A read-only disk: its first sector reads, a write over it fails with
/// IOERR, and it reads the same afterwards.
pub fn test_read_only(blk: &mut Blk, id: &str) -> TestResult {
    const FIRST: usize = 512;
    let status = request(blk, "reading", VIRTIO_BLK_T_IN, 0, FIRST)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "{id}: reading sector 0: status {status}"
    );
    let mut before = [0u8; FIRST];
    before.copy_from_slice(&bulk()[..FIRST]);
    // Something unlike what is there, so a write that went through shows.
    for (i, byte) in bulk()[..FIRST].iter_mut().enumerate() {
        *byte = !before[i];
    }
    let status = request(blk, "writing", VIRTIO_BLK_T_OUT, 0, FIRST)?;
    check!(
        status == VIRTIO_BLK_S_IOERR,
        "{id}: writing a read-only disk: status {status}, expected IOERR"
    );
    bulk()[..FIRST].fill(0);
    let status = request(blk, "reading again", VIRTIO_BLK_T_IN, 0, FIRST)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "{id}: reading sector 0 again: status {status}"
    );
    compare("reading back after the refused write", FIRST, |i| before[i])?;
    println!(
        "lguest-guest: blk: \"{id}\", {} sectors, read-only: a write failed as it should",
        blk.capacity
    );
    Ok(())
}
