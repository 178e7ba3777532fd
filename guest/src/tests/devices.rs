//! The device self-tests: each brings up its virtio device (the first of its
//! type) and uses it the way a driver would. `test=all` runs one only when
//! its device is on the bus; named on its own, a missing device fails it.

use lguest_abi::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG};

use super::{Failed, TestResult, FAILURE};
use crate::boot::Options;
use crate::console::Msg;
use crate::println;
use crate::virtio::blk::{self, Blk};
use crate::virtio::console::Input;
use crate::virtio::net::{Arp, ShowIp, ShowMac, ARP_REPLY, FRAME_MAX};
use crate::virtio::{idle, Deadline, Devices, Error};

pub type DeviceTest = fn(&mut Devices, &Options) -> TestResult;

/// The device tests, in the order `all` runs them, with the device each
/// needs. `reset` needs only the console (it resets the rng if there is
/// one, else the console).
pub const DEVICE_TESTS: [(&str, DeviceTest, u8); 5] = [
    ("console", test_console, VIRTIO_ID_CONSOLE),
    ("blk", test_blk, VIRTIO_ID_BLOCK),
    ("net", test_net, VIRTIO_ID_NET),
    ("rng", test_rng, VIRTIO_ID_RNG),
    ("reset", test_reset, VIRTIO_ID_CONSOLE),
];

/// A driver's error fails the test with its text (and `what` before it).
fn need<T>(what: &str, result: Result<T, Error>) -> Result<T, Failed> {
    result.map_err(|e| {
        FAILURE.write(Msg::from_fmt(format_args!("{what}: {}", e.as_str())));
        Failed
    })
}

/*
 * console: output through the transmit queue; with console-input=1, input
 * through the receive queue too.
 */

const CONSOLE_LINE: &[u8] = b"lguest-guest: console: this line came through the tx queue\n";
const CONSOLE_INPUT: &[u8] = b"lguest-console-test";

fn test_console(devs: &mut Devices, options: &Options) -> TestResult {
    let console = need("bringing up the console", devs.console())?;
    let used = need(
        "sending a line",
        console.write_and_wait(CONSOLE_LINE, &Deadline::after_ms(5000)),
    )?;
    check!(
        used.len as usize <= CONSOLE_LINE.len(),
        "the Host says it wrote {} bytes into a buffer it should only read",
        used.len
    );
    if !options.console_input {
        return Ok(());
    }

    // Lines until ours; stdin may hold others first.
    let deadline = Deadline::after_ms(60_000);
    let mut line = [0u8; 128];
    let mut len = 0;
    loop {
        let mut buf = [0u8; 64];
        let n = match console.read(&mut buf, Some(&deadline)) {
            Input::Bytes(n) => n,
            Input::Eof => fail!(
                "end of input before the line {:?} (console-input=1 needs stdin to send it)",
                core::str::from_utf8(CONSOLE_INPUT).unwrap_or("")
            ),
            Input::Nothing => fail!("no line lguest-console-test on stdin within 60 s"),
        };
        for &byte in &buf[..n] {
            if byte == b'\n' || byte == b'\r' {
                if &line[..len] == CONSOLE_INPUT {
                    println!("lguest-guest: console got: lguest-console-test");
                    return Ok(());
                }
                len = 0;
            } else if len < line.len() {
                line[len] = byte;
                len += 1;
            }
        }
    }
}

/*
 * blk: the first disk. Write a pattern over the first 256 KiB with requests
 * of many sizes, several in flight, flush, read it back with other sizes and
 * compare. Then leave a pattern the Host's own test checks in the file.
 */

/// The bytes the test region gets: changes with the byte and the sector,
/// so a request that lands in the wrong place shows.
fn test_pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(3) ^ ((i >> 9) as u8).wrapping_mul(0x3D)
}

/// The bytes the first 64 KiB are left holding, for the Host's test.
fn disk_pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xFF) as u8
}

const REGION: usize = blk::BULK_BYTES;
const LEFT_BEHIND: usize = 64 * 1024;
/// Requests in flight at once.
const DEPTH: usize = 8;
const WRITE_SIZES: [usize; 10] = [
    4096, 512, 65536, 1024, 16384, 3584, 32768, 8192, 1536, 49152,
];
const READ_SIZES: [usize; 7] = [65536, 512, 12288, 2048, 32768, 4096, 7680];

/// The bulk buffer as bytes. Only between transfers: while a request is in
/// flight the Host may be writing it.
fn bulk() -> &'static mut [u8; blk::BULK_BYTES] {
    // SAFETY: callers hold it only while no request is in flight, and drop
    // it before the next; nothing else uses the bulk buffer meanwhile.
    unsafe { &mut *(blk::bulk() as *mut [u8; blk::BULK_BYTES]) }
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
    let what = if kind == blk::VIRTIO_BLK_T_OUT {
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
            let data = Some((blk::bulk() + offset as u64, size));
            if blk.start(kind, sector, data).is_none() {
                break;
            }
            offset += size;
            requests += 1;
        }
        depth = depth.max(blk.in_flight());
        blk.kick();
        let done = need(what, blk.wait(&deadline))?;
        check!(
            done.status == blk::VIRTIO_BLK_S_OK,
            "a {what} request failed with status {}",
            done.status
        );
    }
    Ok((requests, depth))
}

/// One request on its own: its status.
fn request(blk: &mut Blk, what: &str, kind: u32, sector: u64, len: usize) -> Result<u8, Failed> {
    let data = (len > 0).then_some((blk::bulk(), len));
    Ok(need(what, blk.request(kind, sector, data))?.status)
}

/// Check the first `len` bytes of the bulk buffer follow `pattern`.
fn compare(what: &str, len: usize, pattern: fn(usize) -> u8) -> TestResult {
    let data = bulk();
    if let Some(i) = (0..len).find(|&i| data[i] != pattern(i)) {
        fail!(
            "{what}: byte {i} (sector {}) reads {:#04x}, wrote {:#04x}",
            i / 512,
            data[i],
            pattern(i)
        );
    }
    Ok(())
}

fn test_blk(devs: &mut Devices, _options: &Options) -> TestResult {
    use blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
    use blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    let blk = need("bringing up the disk", devs.blk())?;
    let capacity = blk.capacity;
    check!(capacity > 0, "the disk has 0 sectors");

    // GET_ID: the Host's name for the disk.
    bulk()[..blk::ID_BYTES].fill(0);
    let status = request(blk, "GET_ID", VIRTIO_BLK_T_GET_ID, 0, blk::ID_BYTES)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "GET_ID failed with status {status}"
    );
    let id = &bulk()[..blk::ID_BYTES];
    let id_len = id.iter().position(|&b| b == 0).unwrap_or(blk::ID_BYTES);
    check!(id_len > 0, "GET_ID returned an empty id");
    let id_text = Msg::<32>::from_fmt(format_args!(
        "{}",
        core::str::from_utf8(&id[..id_len]).unwrap_or("(not UTF-8)")
    ));

    // Past the end, and across it.
    let status = request(blk, "reading past the end", VIRTIO_BLK_T_IN, capacity, 512)?;
    check!(
        status == VIRTIO_BLK_S_IOERR,
        "reading sector {capacity} of {capacity}: status {status}, expected IOERR"
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
        "reading 2 sectors from {} of {capacity}: status {status}, expected IOERR",
        capacity - 1
    );

    if blk.read_only {
        let status = request(blk, "reading", VIRTIO_BLK_T_IN, 0, 512)?;
        check!(
            status == VIRTIO_BLK_S_OK,
            "reading sector 0: status {status}"
        );
        let status = request(blk, "writing", VIRTIO_BLK_T_OUT, 0, 512)?;
        check!(
            status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP,
            "writing a read-only disk: status {status}, expected IOERR or UNSUPP"
        );
        println!(
            "lguest-guest: blk: \"{}\", {capacity} sectors, read-only: a write failed as it should",
            id_text.as_str()
        );
        return Ok(());
    }

    check!(
        capacity * blk::SECTOR >= 1 << 20,
        "the disk has {capacity} sectors: the test needs at least 1 MiB"
    );
    check!(blk.can_flush, "the Host doesn't offer FLUSH");
    for (i, byte) in bulk().iter_mut().enumerate() {
        *byte = test_pattern(i);
    }
    let (writes, write_depth) = transfer(blk, VIRTIO_BLK_T_OUT, REGION, &WRITE_SIZES)?;
    let status = request(blk, "FLUSH", VIRTIO_BLK_T_FLUSH, 0, 0)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "FLUSH failed with status {status}"
    );
    bulk().fill(0);
    let (reads, read_depth) = transfer(blk, VIRTIO_BLK_T_IN, REGION, &READ_SIZES)?;
    compare("reading back", REGION, test_pattern)?;
    check!(
        write_depth > 1 && read_depth > 1,
        "never more than one request in flight"
    );

    // What the Host's test will find in the file.
    for (i, byte) in bulk()[..LEFT_BEHIND].iter_mut().enumerate() {
        *byte = disk_pattern(i);
    }
    let status = request(blk, "writing", VIRTIO_BLK_T_OUT, 0, LEFT_BEHIND)?;
    check!(status == VIRTIO_BLK_S_OK, "writing 64 KiB: status {status}");
    let status = request(blk, "FLUSH", VIRTIO_BLK_T_FLUSH, 0, 0)?;
    check!(
        status == VIRTIO_BLK_S_OK,
        "FLUSH failed with status {status}"
    );
    bulk()[..LEFT_BEHIND].fill(0);
    let status = request(blk, "reading", VIRTIO_BLK_T_IN, 0, LEFT_BEHIND)?;
    check!(status == VIRTIO_BLK_S_OK, "reading 64 KiB: status {status}");
    compare("reading back the first 64 KiB", LEFT_BEHIND, disk_pattern)?;

    println!(
        "lguest-guest: blk: \"{}\", {capacity} sectors: {} KiB in {writes} writes and {reads} reads, up to {} in flight",
        id_text.as_str(),
        REGION / 1024,
        write_depth.max(read_depth)
    );
    Ok(())
}

/*
 * net: ask the Host's tap, by ARP, who has its address, answering whatever
 * the Host asks us meanwhile.
 */

fn test_net(devs: &mut Devices, options: &Options) -> TestResult {
    let net = need("bringing up the network", devs.net())?;
    let (ip, host_ip) = match lguest_guest::arp::test_addresses(options.ip, options.hostip) {
        Ok(addresses) => addresses,
        Err(e) => fail!("{e}"),
    };
    let mut request = [0u8; FRAME_MAX];
    let ask = Arp::request(net.mac, ip, host_ip);
    let len = ask.write(lguest_guest::arp::BROADCAST, &mut request);
    let mut frame = [0u8; FRAME_MAX];
    // Ask once a second: the first may go out before the tap is up.
    for _ in 0..5 {
        net.send(&request[..len]);
        let deadline = Deadline::after_ms(1000);
        loop {
            while let Some(got) = net.recv(&mut frame) {
                let frame = &frame[..got];
                if let Some(arp) = Arp::parse(frame) {
                    if arp.op == ARP_REPLY && arp.spa == host_ip && arp.tpa == ip {
                        println!(
                            "lguest-guest: net: we are {} ({}), the Host's {} is at {}",
                            ShowIp(ip),
                            ShowMac(net.mac),
                            ShowIp(host_ip),
                            ShowMac(arp.sha)
                        );
                        return Ok(());
                    }
                }
                net.answer(frame, ip);
            }
            if deadline.passed() {
                break;
            }
            idle(Some(&deadline), || net.arm_rx());
        }
    }
    fail!(
        "no ARP reply from {} to {} within 5 s (is the tap up, with that address?)",
        ShowIp(host_ip),
        ShowIp(ip)
    );
}

/*
 * rng: bytes arrive, and they aren't all the same.
 */

/// Gather at least 32 random bytes, in as many requests as it takes (up to
/// 16).
fn random_bytes(rng: &mut crate::virtio::rng::Rng, out: &mut [u8; 64]) -> Result<usize, Failed> {
    let mut got = 0;
    for _ in 0..16 {
        got += need("reading random bytes", rng.read(&mut out[got..]))?;
        if got >= 32 {
            break;
        }
    }
    Ok(got)
}

fn check_random(bytes: &[u8]) -> TestResult {
    check!(
        bytes.len() >= 32,
        "only {} random bytes in 16 requests",
        bytes.len()
    );
    check!(
        bytes.iter().any(|&b| b != bytes[0]),
        "{} random bytes, all {:#04x}",
        bytes.len(),
        bytes[0]
    );
    Ok(())
}

fn test_rng(devs: &mut Devices, _options: &Options) -> TestResult {
    let rng = need("bringing up the rng", devs.rng())?;
    let mut bytes = [0u8; 64];
    let got = random_bytes(rng, &mut bytes)?;
    check_random(&bytes[..got])
}

/*
 * reset: reset a device (the rng if there is one: resetting the console
 * throws away input), check the Host forgot what we told it, set the device
 * up again, and use it.
 */

fn test_reset(devs: &mut Devices, _options: &Options) -> TestResult {
    if devs.has(VIRTIO_ID_RNG) {
        let rng = need("bringing up the rng", devs.rng())?;
        let mut bytes = [0u8; 64];
        random_bytes(rng, &mut bytes)?;
        rng.dev.reset();
        check_forgotten(&rng.dev)?;
        need("setting the rng up again", rng.reset())?;
        let got = random_bytes(rng, &mut bytes)?;
        check_random(&bytes[..got])?;
    } else {
        let console = need("bringing up the console", devs.console())?;
        let deadline = Deadline::after_ms(5000);
        need(
            "sending a line",
            console.write_and_wait(CONSOLE_LINE, &deadline),
        )?;
        console.dev.reset();
        check_forgotten(&console.dev)?;
        need("setting the console up again", console.reset())?;
        need(
            "sending a line after the reset",
            console.write_and_wait(CONSOLE_LINE, &deadline),
        )?;
    }
    Ok(())
}

/// After a reset the status is 0 (we wrote it) and our features are gone
/// (the Host cleared them before its NOTIFY returned).
fn check_forgotten(dev: &crate::virtio::Device) -> TestResult {
    check!(
        dev.status() == 0,
        "{} status {:#x} after a reset",
        dev.name(),
        dev.status()
    );
    check!(
        dev.guest_features() == 0,
        "{} still has our features {:#x} after a reset",
        dev.name(),
        dev.guest_features()
    );
    Ok(())
}
