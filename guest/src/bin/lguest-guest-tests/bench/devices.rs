//! `bench=blk`, `bench=net`, `bench=echo`: the devices' benchmarks. Each
//! prints one line, `lguest-bench: NAME bytes=B cycles=C tsc_khz=K`, on the
//! early console, and powers off.

use lguest_abi::SHUTDOWN_POWEROFF;

use lguest_guest::cell::GuestCell;
use lguest_guest::console::Error;
use lguest_guest::inet::{self as net, Ip, Mac, FRAME_MAX};
use lguest_guest::shell::{Input, Terminal};
use lguest_guest::time::{idle, Deadline};
use lguest_guest::virtio::blk::{self, Blk};
use lguest_guest::virtio::console::Console;
use lguest_guest::virtio::net::{Net, NET_HDR};
use lguest_guest::virtio::ring::Buf;
use lguest_guest::virtio::Devices;
use lguest_guest::{err, hcall, lguest_data, println, time};

use crate::io::{Done, Requests, SLOTS, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};

const DEFAULT_NET_FRAMES: u64 = 20_000;
/// bench=blk reads with requests this big, this many at once.
/// Big requests, several in flight, so the Host's copy (not our exits)
/// sets the pace. Their buffers are RAM above our image: [4 MiB, 12 MiB).
const BLK_REQUEST: usize = 1 << 20;
const BLK_DEPTH: usize = 8;
const BLK_BUFFERS: u64 = 4 << 20;
/// How long bench=blk may take before it gives up.
const BLK_DEADLINE_MS: u64 = 600_000;

pub fn run(name: &str, iters: Option<&str>) -> ! {
    let label = lguest_guest::console::Msg::<32>::from_fmt(format_args!("bench={name}"));
    let fail = |what: &str| -> ! { lguest_guest::fail(label.as_str(), format_args!("{what}")) };
    let mut devices = Devices::scan();
    // Measure the TSC now (if the Host gave no figure), not inside the run.
    time::tsc_khz();
    let (bytes, cycles) = match name {
        "blk" => match devices.disk(0) {
            Ok(blk) => match read_disk(blk) {
                Ok(result) => result,
                Err(e) => fail(e.as_str()),
            },
            Err(e) => fail(e.as_str()),
        },
        "net" => {
            let frames = match iters {
                None => DEFAULT_NET_FRAMES,
                Some(text) => match text.parse::<u64>() {
                    Ok(n) if n > 0 => n,
                    _ => fail("bad iters="),
                },
            };
            match devices.net() {
                Ok(net) => {
                    let (addr, len) = bench_frame(net.mac, [0; 4]);
                    let start = time::rdtsc();
                    blast(net, addr, len, frames);
                    (frames * FRAME_MAX as u64, time::rdtsc() - start)
                }
                Err(e) => fail(e.as_str()),
            }
        }
        "echo" => match devices.console() {
            Ok(console) => echo(console),
            Err(e) => fail(e.as_str()),
        },
        _ => fail("unknown benchmark"),
    };
    println!(
        "lguest-bench: {name} bytes={bytes} cycles={cycles} tsc_khz={}",
        lguest_data::tsc_khz()
    );
    hcall::shutdown(c"benchmark finished", SHUTDOWN_POWEROFF);
}

/// Read the whole disk in order, BLK_DEPTH requests of BLK_REQUEST bytes in
/// flight, each into its own part of the buffer area (which needs 16 MiB of
/// RAM; the data is thrown away). Returns (bytes, cycles).
fn read_disk(blk: &mut Blk) -> Result<(u64, u64), Error> {
    if lguest_guest::boot::mem() < BLK_BUFFERS + (BLK_DEPTH * BLK_REQUEST) as u64 {
        return Err(err!("bench=blk needs at least 16 MiB of RAM"));
    }
    let total = blk.capacity * blk::SECTOR;
    // Which part of the bulk buffer each slot's request reads into.
    let mut part_of_slot = [usize::MAX; SLOTS];
    let mut free_parts: u32 = (1 << BLK_DEPTH) - 1;
    let mut offset = 0;
    // Touch the buffers first, as the host's floor has its buffer: memory
    // nobody has used yet costs the Host a fault per page at its first
    // pread, a cost of starting, not of reading.
    for page in (0..BLK_DEPTH * BLK_REQUEST).step_by(4096) {
        // SAFETY: [BLK_BUFFERS, +16 MiB) is RAM we own (checked above) and
        // nothing else uses; no request is in flight yet.
        unsafe {
            core::ptr::with_exposed_provenance_mut::<u8>(BLK_BUFFERS as usize + page)
                .write_volatile(0)
        };
    }
    // One timer for the whole read, armed once: a deadline per wait would
    // cost an exit per request to re-arm it.
    let deadline = Deadline::after_ms(BLK_DEADLINE_MS);
    hcall::set_clockevent(BLK_DEADLINE_MS * 1_000_000);
    let start = time::rdtsc();
    while offset < total || blk.in_flight() > 0 {
        while offset < total && free_parts != 0 {
            let part = free_parts.trailing_zeros() as usize;
            let len = (total - offset).min(BLK_REQUEST as u64) as usize;
            let addr = BLK_BUFFERS + (part * BLK_REQUEST) as u64;
            let Some(slot) = blk.start(VIRTIO_BLK_T_IN, offset / blk::SECTOR, Some((addr, len)))
            else {
                break;
            };
            free_parts &= !(1 << part);
            part_of_slot[slot] = part;
            offset += len as u64;
        }
        blk.vq.kick();
        // Take every finished request before refilling: one kick for all.
        let mut done = Some(wait(blk, &deadline)?);
        while let Some(d) = done {
            if d.status != VIRTIO_BLK_S_OK {
                return Err(err!("a read failed with status {}", d.status));
            }
            free_parts |= 1 << part_of_slot[d.slot];
            done = blk.poll();
        }
    }
    let cycles = time::rdtsc() - start;
    hcall::set_clockevent(0);
    Ok((total, cycles))
}

/// A finished request, sleeping until one comes: Requests::wait, but
/// without re-arming the timer (read_disk armed it once for the whole read),
/// and when it sleeps, until most of the requests in flight are done: each
/// wake-up costs an interrupt and a HALT, and the Host has the rest of them
/// to work on meanwhile.
fn wait(blk: &mut Blk, deadline: &Deadline) -> Result<Done, Error> {
    loop {
        if let Some(done) = blk.poll() {
            return Ok(done);
        }
        if deadline.passed() {
            return Err(err!("{} requests still in flight", blk.in_flight()));
        }
        idle(None, || blk.vq.enable_cb_delayed());
        blk.vq.disable_cb();
    }
}

/// Write every byte that comes in straight back out, until end of input.
/// Returns (bytes echoed, cycles).
fn echo(console: &mut Console) -> (u64, u64) {
    let mut bytes = 0;
    let start = time::rdtsc();
    // Interrupts for input stay on: each byte is a round trip, and waiting
    // for it is all we do.
    loop {
        let mut buf = [0u8; 128];
        match console.poll(&mut buf) {
            Input::Bytes(n) => {
                console.send(&buf[..n]);
                bytes += n as u64;
            }
            Input::Eof => break,
            Input::Nothing => idle(None, || console.arm_rx()),
        }
    }
    let cycles = time::rdtsc() - start;
    console.drain(Some(&Deadline::after_ms(2000)));
    (bytes, cycles)
}

const FRAME_BUF: usize = NET_HDR + FRAME_MAX;

/// The benchmark's frame: the Host only ever reads it, so every descriptor
/// of a burst can point at this one.
static BENCH_FRAME: GuestCell<[u8; FRAME_BUF]> = GuestCell::new([0; FRAME_BUF]);

/// Build a full-sized broadcast UDP datagram to the discard port, from `ip`,
/// behind NET_HDR zero bytes: its address and length, for `blast`.
fn bench_frame(mac: Mac, ip: Ip) -> (u64, usize) {
    // SAFETY: no ring holds the frame now (blast waits until the Host has
    // handed every copy back), so this is the only reference to it.
    let out = unsafe { &mut *BENCH_FRAME.as_ptr() };
    let len = NET_HDR + FRAME_MAX;
    out.fill(0);
    let f = &mut out[NET_HDR..len];
    net::eth_header(f, net::BROADCAST, mac, net::ETHERTYPE_IPV4);
    let ip_len = FRAME_MAX - 14;
    {
        let h = &mut f[14..34];
        h[0] = 0x45;
        net::put16(h, 2, ip_len as u16);
        h[8] = 64;
        h[9] = 17; // UDP
        h[12..16].copy_from_slice(&ip);
        h[16..20].copy_from_slice(&[255; 4]);
        let sum = net::checksum(h);
        net::put16(h, 10, sum);
    }
    // UDP from and to port 9 (discard); checksum 0 means none.
    net::put16(f, 34, 9);
    net::put16(f, 36, 9);
    net::put16(f, 38, (ip_len - 20) as u16);
    for (i, byte) in f[42..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    (BENCH_FRAME.as_ptr() as u64, len)
}

/// The benchmark: send the frame at `addr` (header included, `len`
/// bytes, which the Host only reads) `count` times, as fast as the ring
/// takes them, and wait until the Host has sent them all. Interrupts
/// only when the ring is full, and then only after most of it is back.
fn blast(net: &mut Net, addr: u64, len: usize, count: u64) {
    let mut sent = 0;
    while sent < count {
        net.tx.reclaim();
        while sent < count && net.tx.vq.add(&[Buf::readable(addr, len)]).is_ok() {
            sent += 1;
        }
        net.tx.vq.kick();
        if sent < count && net.tx.vq.num_free() == 0 {
            idle(None, || net.tx.vq.enable_cb_delayed());
            net.tx.vq.disable_cb();
        }
    }
    while net.tx.vq.in_flight() > 0 {
        net.tx.reclaim();
        if net.tx.vq.in_flight() > 0 {
            idle(None, || net.tx.vq.enable_cb_delayed());
            net.tx.vq.disable_cb();
        }
    }
}
