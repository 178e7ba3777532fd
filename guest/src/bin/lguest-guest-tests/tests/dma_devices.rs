//! The device self-tests under the 2007 model (device model 1): the names
//! of the bus's, over DMA. `console` sends a line to key 0 (and with
//! `console-input=1` reads one from the buffer bound there), `blk` tests
//! every disk through its page, `net` and `ping` are the bus's tests on
//! the shared-page network.

use lguest_abi::LGUEST_DEVICE_T_NET as T_NET;
use lguest_abi::{LGUEST_BLOCK_DONE as DONE, LGUEST_BLOCK_ERROR as ERROR, PAGE_SIZE};
use lguest_abi::{LGUEST_DEVICE_T_BLOCK as T_BLOCK, LGUEST_DEVICE_T_CONSOLE as T_CONSOLE};
use lguest_guest::dma::blk::{Blk, MAX_DISKS};
use lguest_guest::dma::{self, Devices, Dma};
use lguest_guest::println;
use lguest_guest::time::Deadline;

use super::blk::{bulk, bulk_addr, compare, disk_pattern, test_pattern};
use super::blk::{LEFT_BEHIND, READ_SIZES, REGION, WRITE_SIZES};
use super::devices::{arp_host, expect_input_line, need, ping_peer};
use super::{DeviceTests, Failed, TestResult};
use crate::io::dma_request;

pub const DMA_TESTS: DeviceTests<Devices, 4> = [
    ("console", test_console, T_CONSOLE),
    ("blk", test_blk, T_BLOCK),
    ("net", test_net, T_NET),
    ("ping", test_ping, T_NET),
];

const CONSOLE_LINE: &[u8] = b"lguest-guest: console: this line came through SEND_DMA to key 0\n";

fn test_console(devs: &mut Devices) -> TestResult {
    let console = need("bringing up the console", devs.console())?;
    let taken = dma::console::send(CONSOLE_LINE);
    check!(
        taken == CONSOLE_LINE.len(),
        "SEND_DMA to key 0: the Launcher took {taken} of {} bytes",
        CONSOLE_LINE.len()
    );
    // An empty DMA moves nothing, and says so.
    let mut empty = Dma::EMPTY;
    let taken = empty.send(0);
    check!(taken == 0, "an empty DMA to key 0 moved {taken} bytes");
    expect_input_line(console)
}

fn test_net(devs: &mut Devices) -> TestResult {
    arp_host(need("bringing up the network", devs.net())?)
}

fn test_ping(devs: &mut Devices) -> TestResult {
    ping_peer(need("bringing up the network", devs.net())?)
}

/*
 * blk: every disk in the table. Requests past the end fail with result 2;
 * a write over sector 0 tells a read-only disk (result 2, and it still holds
 * what it held) from a writable one, which then gets the bus's pattern test,
 * one request at a time, and is left holding the pattern the Host's test
 * checks in the file.
 */

fn test_blk(devs: &mut Devices) -> TestResult {
    let disks = devs.table.iter().filter(|e| e.type_ == T_BLOCK).count();
    check!(disks > 0, "no block device in the device table");
    for n in 0..disks.min(MAX_DISKS) {
        test_disk(need("bringing up a disk", devs.disk(n))?, n)?;
    }
    Ok(())
}

/// One request on the bulk buffer's first `len` bytes: its result.
fn request(blk: &mut Blk, what: &str, write: bool, sector: u64, len: usize) -> Result<u32, Failed> {
    let deadline = Deadline::after_ms(10_000);
    need(
        what,
        dma_request(blk, write, sector, bulk_addr(), len, &deadline),
    )
}

fn test_disk(blk: &mut Blk, n: usize) -> TestResult {
    let capacity = blk.capacity;
    check!(capacity > 0, "disk {n} has 0 sectors");
    for (what, write, sector, len) in [
        ("reading past the end", false, capacity, 512),
        ("reading across the end", false, capacity - 1, 1024),
        ("writing past the end", true, capacity, 512),
    ] {
        let result = request(blk, what, write, sector, len)?;
        check!(
            result == ERROR,
            "disk {n}: {what} ({len} bytes at sector {sector} of {capacity}): result {result}, expected 2"
        );
    }

    const FIRST: usize = 512;
    let result = request(blk, "reading sector 0", false, 0, FIRST)?;
    check!(
        result == DONE,
        "disk {n}: reading sector 0: result {result}"
    );
    let mut before = [0u8; FIRST];
    before.copy_from_slice(&bulk()[..FIRST]);
    for (i, byte) in bulk()[..FIRST].iter_mut().enumerate() {
        *byte = !before[i];
    }
    let written = request(blk, "writing sector 0", true, 0, FIRST)?;
    bulk()[..FIRST].fill(0);
    let result = request(blk, "reading sector 0 again", false, 0, FIRST)?;
    check!(
        result == DONE,
        "disk {n}: reading sector 0 again: result {result}"
    );
    if written == ERROR {
        compare("reading back after the refused write", FIRST, |i| before[i])?;
        println!(
            "lguest-guest: blk: disk {n}, {capacity} sectors, read-only: a write gave result 2"
        );
        return Ok(());
    }
    check!(
        written == DONE,
        "disk {n}: writing sector 0: result {written}"
    );
    compare("reading back sector 0", FIRST, |i| !before[i])?;

    check!(
        capacity * 512 >= 1 << 20,
        "disk {n} has {capacity} sectors: the test needs at least 1 MiB"
    );
    for (i, byte) in bulk().iter_mut().enumerate() {
        *byte = test_pattern(i);
    }
    let writes = transfer(blk, true, &WRITE_SIZES)?;
    bulk().fill(0);
    let reads = transfer(blk, false, &READ_SIZES)?;
    compare("reading back", REGION, test_pattern)?;

    // What the Host's test will find in the file: one request of 16 pages.
    for (i, byte) in bulk()[..LEFT_BEHIND].iter_mut().enumerate() {
        *byte = disk_pattern(i);
    }
    let result = request(blk, "writing 64 KiB", true, 0, LEFT_BEHIND)?;
    check!(result == DONE, "disk {n}: writing 64 KiB: result {result}");
    bulk()[..LEFT_BEHIND].fill(0);
    let result = request(blk, "reading 64 KiB", false, 0, LEFT_BEHIND)?;
    check!(result == DONE, "disk {n}: reading 64 KiB: result {result}");
    compare("reading back the first 64 KiB", LEFT_BEHIND, disk_pattern)?;
    println!(
        "lguest-guest: blk: disk {n}, {capacity} sectors: {} KiB in {writes} writes and {reads} reads",
        REGION / 1024
    );
    Ok(())
}

/// Move the whole bulk buffer to (or from) the disk's start, in requests of
/// `sizes` in turn, each cut to what 16 sections hold: how many it took.
fn transfer(blk: &mut Blk, write: bool, sizes: &[usize]) -> Result<usize, Failed> {
    let what = if write { "write" } else { "read" };
    let page = PAGE_SIZE as usize;
    let (mut offset, mut requests) = (0, 0);
    while offset < REGION {
        let room = 16 * page - offset % page;
        let size = sizes[requests % sizes.len()].min(REGION - offset).min(room);
        let deadline = Deadline::after_ms(10_000);
        let addr = bulk_addr() + offset as u64;
        let sector = (offset / 512) as u64;
        let result = need(what, dma_request(blk, write, sector, addr, size, &deadline))?;
        check!(
            result == DONE,
            "a {what} of {size} bytes at sector {sector}: result {result}"
        );
        offset += size;
        requests += 1;
    }
    Ok(requests)
}
