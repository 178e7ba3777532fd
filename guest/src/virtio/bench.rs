//! `bench=blk`, `bench=net`, `bench=echo`: the devices' benchmarks. Each
//! prints one line, `lguest-bench: NAME bytes=B cycles=C tsc_khz=K`, on the
//! early console, and powers off.

use lguest_abi::SHUTDOWN_POWEROFF;

use super::blk::{self, Blk, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use super::console::Input;
use super::net::{self, FRAME_MAX};
use super::{idle, Deadline, Devices};
use crate::{hcall, lguest_data, println, time};

const DEFAULT_NET_FRAMES: u64 = 20_000;
/// bench=blk reads with requests this big, this many at once.
/// Big requests, several in flight, so the Host's copy (not our exits)
/// sets the pace. Their buffers are RAM above our image: [4 MiB, 12 MiB).
const BLK_REQUEST: usize = 1 << 20;
const BLK_DEPTH: usize = 8;
const BLK_BUFFERS: u64 = 4 << 20;

pub fn run(name: &str, iters: Option<&str>) -> ! {
    let label = crate::console::Msg::<32>::from_fmt(format_args!("bench={name}"));
    let fail = |what: &str| -> ! { crate::fail(label.as_str(), format_args!("{what}")) };
    let mut devices = Devices::scan();
    // Measure the TSC now (if the Host gave no figure), not inside the run.
    time::tsc_khz();
    let (bytes, cycles) = match name {
        "blk" => match devices.blk() {
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
                    let (addr, len) = net::bench_frame(net.mac, [0; 4]);
                    let start = time::rdtsc();
                    net.blast(addr, len, frames);
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
fn read_disk(blk: &mut Blk) -> Result<(u64, u64), super::Error> {
    if crate::boot::mem() < BLK_BUFFERS + (BLK_DEPTH * BLK_REQUEST) as u64 {
        return Err(crate::err!("bench=blk needs at least 16 MiB of RAM"));
    }
    let total = blk.capacity * blk::SECTOR;
    // Which part of the bulk buffer each slot's request reads into.
    let mut part_of_slot = [usize::MAX; blk::SLOTS];
    let mut free_parts: u32 = (1 << BLK_DEPTH) - 1;
    let mut offset = 0;
    let deadline = Deadline::after_ms(600_000);
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
        blk.kick();
        // Take every finished request before refilling: one kick for all.
        let mut done = Some(blk.wait(&deadline)?);
        while let Some(d) = done {
            if d.status != VIRTIO_BLK_S_OK {
                return Err(crate::err!("a read failed with status {}", d.status));
            }
            free_parts |= 1 << part_of_slot[d.slot];
            done = blk.poll();
        }
    }
    Ok((total, time::rdtsc() - start))
}

/// Write every byte that comes in straight back out, until end of input.
/// Returns (bytes echoed, cycles).
fn echo(console: &mut super::console::Console) -> (u64, u64) {
    let mut bytes = 0;
    let start = time::rdtsc();
    // Interrupts for input stay on: each byte is a round trip, and waiting
    // for it is all we do.
    loop {
        let mut buf = [0u8; 128];
        match console.poll(&mut buf) {
            Input::Bytes(n) => {
                console.write(&buf[..n]);
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
