//! `test=NAME[,NAME...]` or `test=all`: the device tests, through
//! virtio-drivers.
//!
//! Each test takes the first virtio-mmio device of its kind, brings it up
//! with virtio-drivers' driver, uses it, and prints
//! `lguest-guest: test NAME ... ok`; the run ends with
//! `lguest-guest: all N tests passed` and a power off. The first failure
//! prints `lguest-guest: FAIL NAME: detail` and crashes. Those are the
//! reference Guest's words (ABI section 10), so the Host's tests read both
//! Guests alike. `all` runs console, and each other test whose device is
//! there.

use alloc::boxed::Box;
use alloc::vec;
use core::fmt::Write;

use lguest_abi::SHUTDOWN_POWEROFF;

use lguest_guest::console::Msg;
use lguest_guest::{fail, hcall, println, time};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::Error;

use crate::hal::LguestHal;
use crate::mmio::{irq_count, kind_name, Devices, Window};
use crate::wait::{self, Deadline};
use lguest_guest::inet::{Arp, ShowIp, ShowMac, ARP_REPLY, ARP_REQUEST, BROADCAST};

/// A failed check, with what went wrong (boxed: results stay small).
type Failure = Box<Msg<200>>;
type TestResult = Result<(), Failure>;
type Test = fn(&mut Devices) -> TestResult;

/// Fail the current test with a formatted detail.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(Box::new(Msg::from_fmt(format_args!($($arg)*))))
    };
}

/// Fail the current test unless `cond` holds.
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            bail!($($arg)*);
        }
    };
}

/// A driver's error fails the test with its text, `what` before it.
trait Context<T> {
    fn context(self, what: &str) -> Result<T, Failure>;
}

impl<T> Context<T> for Result<T, Error> {
    fn context(self, what: &str) -> Result<T, Failure> {
        self.map_err(|e| Box::new(Msg::from_fmt(format_args!("{what}: {e}"))))
    }
}

/// The tests, in the order `all` runs them, with the device each needs.
const TESTS: [(&str, Test, DeviceType); 4] = [
    ("console", test_console, DeviceType::Console),
    ("blk", test_blk, DeviceType::Block),
    ("net", test_net, DeviceType::Network),
    ("rng", test_rng, DeviceType::EntropySource),
];

/// No test may take longer than this: the watchdog fails it then.
const WATCHDOG_SECONDS: u64 = 60;

/// Run the comma-separated tests in `names` and power off, or crash at the
/// first failure.
pub fn run(names: &'static str, devices: &mut Devices) -> ! {
    // If the Host gave no TSC frequency, measure ours before any deadline.
    time::tsc_khz();
    let mut passed = 0;
    for name in names.split(',').filter(|name| !name.is_empty()) {
        if name == "all" {
            for (name, test, kind) in TESTS {
                if kind == DeviceType::Console || devices.has(kind) {
                    run_one(name, test, devices);
                    passed += 1;
                }
            }
            continue;
        }
        match TESTS.iter().find(|(known, _, _)| *known == name) {
            Some(&(name, test, _)) => run_one(name, test, devices),
            None => fail(name, format_args!("unknown test")),
        }
        passed += 1;
    }
    if passed == 0 {
        fail("test", format_args!("no test named in test={names}"));
    }
    println!("lguest-guest: all {passed} tests passed");
    hcall::shutdown(c"self-tests passed", SHUTDOWN_POWEROFF);
}

fn run_one(name: &'static str, test: Test, devices: &mut Devices) {
    wait::watch(name, WATCHDOG_SECONDS);
    let result = test(devices);
    wait::unwatch();
    match result {
        Ok(()) => println!("lguest-guest: test {name} ... ok"),
        Err(why) => fail(name, format_args!("{}", why.as_str())),
    }
}

/// The transport of the first device of `kind`, which must be a modern
/// (version 2) virtio-mmio device.
fn take(devices: &mut Devices, kind: DeviceType) -> Result<(MmioTransport<'_>, Window), Failure> {
    if !devices.has(kind) {
        let hint = match kind {
            DeviceType::Block => " --block=FILE",
            DeviceType::Network => " --tunnet=...",
            DeviceType::EntropySource => " --rng",
            _ => "",
        };
        bail!(
            "no virtio-mmio {} device (start the Launcher with --transport=mmio{hint})",
            kind_name(kind)
        );
    }
    let Some((transport, window)) = devices.take(kind) else {
        bail!("the {} device's window went bad", kind_name(kind));
    };
    check!(
        transport.version() == MmioVersion::Modern,
        "the window at {:#x} is a legacy (version 1) device, not virtio-mmio version 2",
        window.base
    );
    Ok((transport, window))
}

/*
 * console: lines out through the transmit queue, whole and a byte at a time.
 */

const CONSOLE_LINE: &str = "lguest-guest-drivers: console: this line came through virtio-drivers\n";
const CONSOLE_BYTES: &[u8] = b"lguest-guest-drivers: console: and this one a byte at a time\n";

fn test_console(devices: &mut Devices) -> TestResult {
    let (transport, _) = take(devices, DeviceType::Console)?;
    let mut console =
        VirtIOConsole::<LguestHal, _>::new(transport).context("bringing up the console")?;
    console
        .send_bytes(CONSOLE_LINE.as_bytes())
        .context("sending a line")?;
    for &byte in CONSOLE_BYTES {
        console.send(byte).context("sending a byte")?;
    }
    // The Write impl, as a kernel's printk would use it.
    if writeln!(
        console,
        "lguest-guest-drivers: console: {} + {} = {}",
        2, 2, 4
    )
    .is_err()
    {
        bail!("writing a formatted line failed");
    }
    // Dropping the driver resets the device (status 0): the Host must take
    // that too, and we go on.
    drop(console);
    Ok(())
}

/*
 * blk: write a pattern over the first MiB with requests of many sizes,
 * several in flight, flush, read it back with other sizes and compare; then
 * leave the first 64 KiB holding (i * 7 + 3) & 0xFF, flushed, for the Host's
 * test to find in the file.
 */

/// The bytes the test region gets: they change with the byte and the
/// sector, so a request that lands in the wrong place shows.
fn test_pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(3) ^ ((i >> 9) as u8).wrapping_mul(0x3D)
}

/// The bytes the first 64 KiB are left holding, for the Host's test.
fn disk_pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xFF) as u8
}

const REGION: usize = 1 << 20;
const LEFT_BEHIND: usize = 64 * 1024;
/// Requests in flight at once (virtio-drivers' block queue has 16 entries).
const DEPTH: usize = 8;
const WRITE_SIZES: [usize; 10] = [
    4096, 512, 65536, 1024, 16384, 3584, 32768, 8192, 1536, 49152,
];
const READ_SIZES: [usize; 7] = [65536, 512, 12288, 2048, 32768, 4096, 7680];

/// One request in flight: the request and response headers must stay put
/// until it completes, so they live in a boxed array.
struct Slot {
    busy: bool,
    token: u16,
    offset: usize,
    len: usize,
    req: BlkReq,
    resp: BlkResp,
}

type Blk<'a> = VirtIOBlk<LguestHal, MmioTransport<'a>>;

/// Move `data` to (write) or from (read) the disk from sector 0, requests of
/// `sizes` in turn, up to DEPTH in flight, with virtio-drivers' non-blocking
/// calls, sleeping until the device's interrupt between them. Returns
/// (requests, most in flight at once).
fn transfer(
    blk: &mut Blk<'_>,
    write: bool,
    data: &mut [u8],
    sizes: &[usize],
) -> Result<(usize, usize), Failure> {
    let what = if write { "write" } else { "read" };
    let mut slots: Box<[Slot]> = (0..DEPTH)
        .map(|_| Slot {
            busy: false,
            token: 0,
            offset: 0,
            len: 0,
            req: BlkReq::default(),
            resp: BlkResp::default(),
        })
        .collect();
    let base = data.as_mut_ptr();
    let len = data.len();
    let deadline = Deadline::after_ms(30_000);
    let (mut offset, mut requests, mut depth, mut in_flight) = (0, 0, 0, 0);
    while offset < len || in_flight > 0 {
        while offset < len && in_flight < DEPTH {
            let size = sizes[requests % sizes.len()].min(len - offset);
            let slot = slots
                .iter_mut()
                .find(|slot| !slot.busy)
                .expect("fewer than DEPTH in flight");
            // SAFETY: [offset, offset + size) lies in `data` and no other
            // request in flight covers it; nothing touches `data` until the
            // last request completes.
            let buf = unsafe { core::slice::from_raw_parts_mut(base.add(offset), size) };
            let sector = offset / SECTOR_SIZE;
            // SAFETY: the slot's req and resp and the buffer stay untouched
            // until complete_*_blocks below, with the same three.
            let token = unsafe {
                if write {
                    blk.write_blocks_nb(sector, &mut slot.req, buf, &mut slot.resp)
                } else {
                    blk.read_blocks_nb(sector, &mut slot.req, buf, &mut slot.resp)
                }
            };
            let token = match token {
                Ok(token) => token,
                Err(Error::QueueFull) if in_flight > 0 => break,
                Err(e) => bail!("starting a {what} of {size} bytes at sector {sector}: {e}"),
            };
            slot.busy = true;
            slot.token = token;
            slot.offset = offset;
            slot.len = size;
            offset += size;
            requests += 1;
            in_flight += 1;
        }
        depth = depth.max(in_flight);
        if !wait::until(&deadline, || blk.peek_used().is_some()) {
            bail!("{in_flight} {what} requests still in flight after 30 s");
        }
        while let Some(token) = blk.peek_used() {
            let Some(slot) = slots
                .iter_mut()
                .find(|slot| slot.busy && slot.token == token)
            else {
                bail!("the disk returned descriptor {token}, which heads no request of ours");
            };
            // SAFETY: the same buffer the request was started with.
            let buf = unsafe { core::slice::from_raw_parts_mut(base.add(slot.offset), slot.len) };
            // SAFETY: the same req, buffer and resp as at the start.
            let done = unsafe {
                if write {
                    blk.complete_write_blocks(token, &slot.req, buf, &mut slot.resp)
                } else {
                    blk.complete_read_blocks(token, &slot.req, buf, &mut slot.resp)
                }
            };
            slot.busy = false;
            in_flight -= 1;
            done.context(what)?;
        }
    }
    Ok((requests, depth))
}

/// Check `data` follows `pattern`.
fn compare(what: &str, data: &[u8], pattern: fn(usize) -> u8) -> TestResult {
    if let Some(i) = (0..data.len()).find(|&i| data[i] != pattern(i)) {
        bail!(
            "{what}: byte {i} (sector {}) reads {:#04x}, wrote {:#04x}",
            i / SECTOR_SIZE,
            data[i],
            pattern(i)
        );
    }
    Ok(())
}

fn test_blk(devices: &mut Devices) -> TestResult {
    let (transport, window) = take(devices, DeviceType::Block)?;
    let irqs_before = irq_count(window.irq);
    let mut blk: Blk<'_> = VirtIOBlk::new(transport).context("bringing up the disk")?;
    let capacity = blk.capacity();
    check!(capacity > 0, "the disk has 0 sectors");

    // GET_ID: the Host's name for the disk.
    let mut id = [0u8; 20];
    let id_len = blk.device_id(&mut id).context("GET_ID")?;
    check!(id_len > 0, "GET_ID returned an empty id");
    let id_text = Msg::<32>::from_fmt(format_args!(
        "{}",
        core::str::from_utf8(&id[..id_len]).unwrap_or("(not UTF-8)")
    ));

    // Past the end, and across it.
    let mut sector = vec![0u8; 2 * SECTOR_SIZE];
    let past = blk.read_blocks(capacity as usize, &mut sector[..SECTOR_SIZE]);
    check!(
        past == Err(Error::IoError),
        "reading sector {capacity} of {capacity}: {past:?}, expected an I/O error"
    );
    let across = blk.read_blocks(capacity as usize - 1, &mut sector);
    check!(
        across == Err(Error::IoError),
        "reading 2 sectors from {} of {capacity}: {across:?}, expected an I/O error",
        capacity - 1
    );

    if blk.readonly() {
        blk.read_blocks(0, &mut sector[..SECTOR_SIZE])
            .context("reading sector 0")?;
        let write = blk.write_blocks(0, &sector[..SECTOR_SIZE]);
        check!(
            matches!(write, Err(Error::IoError | Error::Unsupported)),
            "writing a read-only disk: {write:?}, expected an error"
        );
        println!(
            "lguest-guest-drivers: blk: \"{}\", {capacity} sectors, read-only: a write failed as it should",
            id_text.as_str()
        );
        return Ok(());
    }

    check!(
        capacity * SECTOR_SIZE as u64 >= REGION as u64,
        "the disk has {capacity} sectors: the test needs at least 1 MiB"
    );
    let mut bulk = vec![0u8; REGION];
    for (i, byte) in bulk.iter_mut().enumerate() {
        *byte = test_pattern(i);
    }
    let (writes, write_depth) = transfer(&mut blk, true, &mut bulk, &WRITE_SIZES)?;
    blk.flush().context("FLUSH")?;
    bulk.fill(0);
    let (reads, read_depth) = transfer(&mut blk, false, &mut bulk, &READ_SIZES)?;
    compare("reading back", &bulk, test_pattern)?;
    check!(
        write_depth > 1 && read_depth > 1,
        "never more than one request in flight"
    );
    let irqs = irq_count(window.irq) - irqs_before;
    check!(
        irqs > 0,
        "{} requests completed but IRQ {} never came",
        writes + reads,
        window.irq
    );

    // What the Host's test will find in the file: written and read back
    // with the blocking calls this time.
    let left = &mut bulk[..LEFT_BEHIND];
    for (i, byte) in left.iter_mut().enumerate() {
        *byte = disk_pattern(i);
    }
    blk.write_blocks(0, left).context("writing 64 KiB")?;
    blk.flush().context("FLUSH")?;
    left.fill(0);
    let (first, second) = left.split_at_mut(LEFT_BEHIND / 2);
    blk.read_blocks(0, first).context("reading 32 KiB")?;
    blk.read_blocks(LEFT_BEHIND / 2 / SECTOR_SIZE, second)
        .context("reading 32 KiB")?;
    compare("reading back the first 64 KiB", left, disk_pattern)?;

    println!(
        "lguest-guest-drivers: blk: \"{}\", {capacity} sectors: {} KiB in {writes} writes and {reads} reads, up to {} in flight, {irqs} interrupts",
        id_text.as_str(),
        REGION / 1024,
        write_depth.max(read_depth)
    );
    Ok(())
}

/*
 * net: ask the Host's tap, by ARP, who has its address, answering whoever
 * asks for ours meanwhile.
 */

/// virtio-drivers' net queues, and our receive buffers.
const NET_QUEUE: usize = 16;
const RX_BUFFERS: usize = 8;
const RX_LEN: usize = 2048;
/// The modern virtio_net_hdr (v1): 12 bytes, num_buffers included.
const NET_HDR_V1: usize = 12;

type Net<'a> = VirtIONetRaw<LguestHal, MmioTransport<'a>, NET_QUEUE>;

/// Send one frame, its header already in place, and wait until the device
/// gives the buffer back.
fn transmit(net: &mut Net<'_>, frame: &[u8]) -> TestResult {
    // SAFETY: `frame` stays borrowed, untouched, until transmit_complete.
    let token = unsafe { net.transmit_begin(frame) }.context("sending a frame")?;
    let deadline = Deadline::after_ms(5000);
    if !wait::until(&deadline, || net.poll_transmit().is_some()) {
        bail!("the device kept a sent frame for 5 s");
    }
    let used = net.poll_transmit();
    check!(
        used == Some(token),
        "sent descriptor {token}, the device returned {used:?}"
    );
    // SAFETY: the same buffer as transmit_begin's.
    unsafe { net.transmit_complete(token, frame) }.context("completing a send")?;
    Ok(())
}

fn test_net(devices: &mut Devices) -> TestResult {
    let (ip, host_ip) = match crate::addresses::test_addresses() {
        Ok(addresses) => addresses,
        Err(e) => bail!("{}", e.as_str()),
    };
    let (transport, _) = take(devices, DeviceType::Network)?;
    // The buffers outlive the driver (declared first, dropped last): it
    // resets the device as it goes, with our receive buffers still posted.
    let mut rx = vec![[0u8; RX_LEN]; RX_BUFFERS];
    let mut tx = vec![0u8; RX_LEN];
    let mut answer = vec![0u8; RX_LEN];
    let mut net = Net::new(transport).context("bringing up the network")?;
    let mac = net.mac_address();

    let mut tokens = [None; RX_BUFFERS];
    for (buf, token) in rx.iter_mut().zip(tokens.iter_mut()) {
        // SAFETY: the buffer stays untouched until receive_complete (or the
        // device is reset, when `net` is dropped).
        *token = Some(unsafe { net.receive_begin(buf) }.context("posting a receive buffer")?);
    }

    let hdr = net
        .fill_buffer_header(&mut tx)
        .context("writing a virtio_net_hdr")?;
    check!(
        hdr == NET_HDR_V1,
        "virtio-drivers chose a {hdr}-byte virtio_net_hdr: VIRTIO_F_VERSION_1 was not negotiated"
    );
    let request = Arp::request(mac, ip, host_ip);
    let len = hdr + request.write(BROADCAST, &mut tx[hdr..]);

    // Announce ourselves first (a gratuitous ARP) through virtio-drivers'
    // blocking send, which puts the header in a descriptor of its own: the
    // request below goes out as one buffer, header and frame together.
    let announce = Arp::request(mac, ip, ip);
    let n = announce.write(BROADCAST, &mut answer);
    net.send(&answer[..n]).context("announcing our address")?;

    // Ask once a second: the first may go out before the tap is up.
    let (mut received, mut answered) = (0, 0);
    for _ in 0..5 {
        transmit(&mut net, &tx[..len])?;
        let deadline = Deadline::after_ms(1000);
        loop {
            while let Some(token) = net.poll_receive() {
                let Some(i) = tokens.iter().position(|t| *t == Some(token)) else {
                    bail!("the device returned descriptor {token}, which heads no receive buffer of ours");
                };
                // SAFETY: the buffer receive_begin gave the device.
                let (hdr_len, frame_len) =
                    unsafe { net.receive_complete(token, &mut rx[i]) }.context("receiving")?;
                tokens[i] = None;
                received += 1;
                check!(
                    hdr_len == NET_HDR_V1,
                    "a {hdr_len}-byte virtio_net_hdr on a received frame"
                );
                let frame = &rx[i][hdr_len..hdr_len + frame_len];
                match Arp::parse(frame) {
                    Some(arp) if arp.op == ARP_REPLY && arp.spa == host_ip && arp.tpa == ip => {
                        println!(
                            "lguest-guest-drivers: net: we are {} ({}), the Host's {} is at {} ({received} frames in, {answered} ARP requests answered)",
                            ShowIp(ip),
                            ShowMac(mac),
                            ShowIp(host_ip),
                            ShowMac(arp.sha)
                        );
                        return Ok(());
                    }
                    Some(arp) if arp.op == ARP_REQUEST && arp.tpa == ip => {
                        // Who has our address: us.
                        let reply = Arp {
                            op: ARP_REPLY,
                            sha: mac,
                            spa: ip,
                            tha: arp.sha,
                            tpa: arp.spa,
                        };
                        let n = reply.write(arp.sha, &mut answer);
                        net.send(&answer[..n]).context("answering an ARP request")?;
                        answered += 1;
                    }
                    _ => {}
                }
                // SAFETY: as when it was first posted.
                tokens[i] =
                    Some(unsafe { net.receive_begin(&mut rx[i]) }.context("reposting a buffer")?);
            }
            if deadline.passed() {
                break;
            }
            wait::until(&deadline, || net.poll_receive().is_some());
        }
    }
    bail!(
        "no ARP reply from {} to {} within 5 s ({received} frames in; is the tap up, with that address?)",
        ShowIp(host_ip),
        ShowIp(ip)
    );
}

/*
 * rng: bytes arrive, and they aren't all the same.
 */

fn test_rng(devices: &mut Devices) -> TestResult {
    let (transport, _) = take(devices, DeviceType::EntropySource)?;
    let mut rng = VirtIORng::<LguestHal, _>::new(transport).context("bringing up the rng")?;
    let mut bytes = [0u8; 64];
    let mut got = 0;
    let mut requests = 0;
    while got < 32 && requests < 16 {
        got += rng
            .request_entropy(&mut bytes[got..])
            .context("reading random bytes")?;
        requests += 1;
    }
    check!(got >= 32, "only {got} random bytes in {requests} requests");
    let bytes = &bytes[..got];
    check!(
        bytes.iter().any(|&b| b != bytes[0]),
        "{got} random bytes, all {:#04x}",
        bytes[0]
    );
    Ok(())
}
