//! The device self-tests: each brings up its virtio device (the first of its
//! type, but for blk, which tests every disk: blk.rs) and uses it the way a
//! driver would. `test=all` runs one only when its device is on the bus
//! (and `ping` only with `peer=`); named on its own, a missing device fails
//! it. Under the 2007 model the same names test its devices (dma.rs), with
//! what doesn't depend on the model shared from here.

use lguest_abi::VIRTIO_STATUS_DRIVER_OK;
use lguest_abi::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG};
use lguest_guest::boot;
use lguest_guest::console::Error;
use lguest_guest::console::{ConsoleWriter, Msg};
use lguest_guest::inet::{self, Nic, ShowIp, ShowMac};
use lguest_guest::println;
use lguest_guest::shell::{Input, Terminal};
use lguest_guest::time::Deadline;
use lguest_guest::virtio::console::Console;
use lguest_guest::virtio::ring::Used;
use lguest_guest::virtio::rng::Rng;
use lguest_guest::virtio::{Device, Devices};

use super::blk::test_blk;
use super::{DeviceTests, Failed, TestResult, FAILURE};
use crate::io::read_random;

/// The device tests, in the order `all` runs them, with the device each
/// needs. `reset` needs only the console (it resets the rng if there is
/// one, else the console).
pub const DEVICE_TESTS: DeviceTests<Devices, 6> = [
    ("console", test_console, VIRTIO_ID_CONSOLE as u16),
    ("blk", test_blk, VIRTIO_ID_BLOCK as u16),
    ("net", test_net, VIRTIO_ID_NET as u16),
    ("ping", test_ping, VIRTIO_ID_NET as u16),
    ("rng", test_rng, VIRTIO_ID_RNG as u16),
    ("reset", test_reset, VIRTIO_ID_CONSOLE as u16),
];

/// A driver's error fails the test with its text (and `what` before it).
pub fn need<T>(what: &str, result: Result<T, Error>) -> Result<T, Failed> {
    result.map_err(|e| {
        FAILURE.write(Msg::from_fmt(format_args!("{what}: {}", e.as_str())));
        Failed
    })
}

/// Send `bytes` (one buffer's worth) and wait for the Host to hand that
/// very buffer back, by `deadline`.
fn write_and_wait(console: &mut Console, bytes: &[u8], deadline: &Deadline) -> Result<Used, Error> {
    if !console.drain(Some(deadline)) {
        return Err(lguest_guest::err!(
            "earlier output never came back from the Host"
        ));
    }
    let head = console.send_one(bytes);
    loop {
        if let Some(used) = console.tx.reclaim() {
            if used.head != head {
                return Err(lguest_guest::err!(
                    "sent head {head}, the used ring gave back head {}",
                    used.head
                ));
            }
            return Ok(used);
        }
        if deadline.passed() {
            return Err(lguest_guest::err!(
                "the Host never handed back the buffer (head {head})"
            ));
        }
        console.tx.vq.sleep(Some(deadline));
    }
}

/*
 * console: output through the transmit queue; with console-input=1, input
 * through the receive queue too.
 */

const CONSOLE_LINE: &[u8] = b"lguest-guest: console: this line came through the tx queue\n";
const CONSOLE_INPUT: &[u8] = b"lguest-console-test";

pub fn test_console(devs: &mut Devices) -> TestResult {
    let console = need("bringing up the console", devs.console())?;
    let used = need(
        "sending a line",
        write_and_wait(console, CONSOLE_LINE, &Deadline::after_ms(5000)),
    )?;
    check!(
        used.len as usize <= CONSOLE_LINE.len(),
        "the Host says it wrote {} bytes into a buffer it should only read",
        used.len
    );
    expect_input_line(console)
}

/// With `console-input=1`, read the line `lguest-console-test` from stdin.
pub fn expect_input_line(console: &mut dyn Terminal) -> TestResult {
    if boot::option("console-input") != Some("1") {
        return Ok(());
    }
    // Lines until ours; stdin may hold others first.
    let deadline = Deadline::after_ms(60_000);
    let mut line = [0u8; 128];
    let mut len = 0;
    loop {
        let mut buf = [0u8; 64];
        let n = match crate::extras::read(console, &mut buf, Some(&deadline)) {
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
 * net: ask the Host's tap, by ARP, who has its address, answering whatever
 * the Host asks us meanwhile.
 */

pub fn test_net(devs: &mut Devices) -> TestResult {
    arp_host(need("bringing up the network", devs.net())?)
}

pub fn arp_host(net: &mut dyn Nic) -> TestResult {
    let addresses = crate::addresses::test_addresses();
    let (ip, host_ip) = match addresses {
        Ok(addresses) => addresses,
        Err(e) => fail!("{}", e.as_str()),
    };
    // Ask once a second: the first may go out before the tap is up.
    let Some(mac) = inet::resolve(net, ip, host_ip, 5) else {
        fail!(
            "no ARP reply from {} to {} within 5 s (is the tap up, with that address?)",
            ShowIp(host_ip),
            ShowIp(ip)
        );
    };
    println!(
        "lguest-guest: net: we are {} ({}), the Host's {} is at {}",
        ShowIp(ip),
        ShowMac(net.mac()),
        ShowIp(host_ip),
        ShowMac(mac)
    );
    Ok(())
}

/*
 * ping: ICMP echo requests to `peer=`, from our `ip=`, after ARP; passes
 * when replies come back.
 */

/// Echo requests the test sends.
const PINGS: u16 = 4;

pub fn test_ping(devs: &mut Devices) -> TestResult {
    ping_peer(need("bringing up the network", devs.net())?)
}

pub fn ping_peer(net: &mut dyn Nic) -> TestResult {
    let Some(ip) = boot::option("ip").and_then(inet::parse_ip) else {
        fail!("needs our address: ip=A.B.C.D on the command line");
    };
    let Some(peer) = boot::option("peer").and_then(inet::parse_ip) else {
        fail!("needs the address to ping: peer=A.B.C.D on the command line");
    };
    let received = need(
        "pinging",
        inet::ping(net, ip, peer, PINGS, &mut ConsoleWriter),
    )?;
    check!(
        received > 0,
        "none of {PINGS} echo requests to {} was answered",
        ShowIp(peer)
    );
    println!(
        "lguest-guest: ping: {received} of {PINGS} echo requests to {} answered",
        ShowIp(peer)
    );
    Ok(())
}

/*
 * rng: bytes arrive, and they aren't all the same.
 */

/// Gather at least 32 random bytes, in as many requests as it takes (up to
/// 16).
fn random_bytes(rng: &mut Rng, out: &mut [u8; 64]) -> Result<usize, Failed> {
    let mut got = 0;
    for _ in 0..16 {
        got += need("reading random bytes", read_random(rng, &mut out[got..]))?;
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

pub fn test_rng(devs: &mut Devices) -> TestResult {
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

pub fn test_reset(devs: &mut Devices) -> TestResult {
    if devs.bus.find(VIRTIO_ID_RNG).is_some() {
        let rng = need("bringing up the rng", devs.rng())?;
        let mut bytes = [0u8; 64];
        random_bytes(rng, &mut bytes)?;
        rng.dev.reset();
        check_forgotten(&rng.dev)?;
        *rng = need("setting the rng up again", Rng::probe(rng.dev))?;
        check_up(&rng.dev)?;
        let got = random_bytes(rng, &mut bytes)?;
        check_random(&bytes[..got])?;
    } else {
        let console = need("bringing up the console", devs.console())?;
        let deadline = Deadline::after_ms(5000);
        need(
            "sending a line",
            write_and_wait(console, CONSOLE_LINE, &deadline),
        )?;
        console.dev.reset();
        check_forgotten(&console.dev)?;
        *console = need("setting the console up again", Console::probe(console.dev))?;
        check_up(&console.dev)?;
        need(
            "sending a line after the reset",
            write_and_wait(console, CONSOLE_LINE, &deadline),
        )?;
    }
    Ok(())
}

/// Set up again, the device is live.
fn check_up(dev: &Device) -> TestResult {
    check!(
        dev.status() & VIRTIO_STATUS_DRIVER_OK != 0,
        "{} status {:#x} after setting it up again",
        dev.name(),
        dev.status()
    );
    Ok(())
}

/// After a reset the status is 0 (we wrote it) and our features are gone
/// (the Host cleared them before its NOTIFY returned).
fn check_forgotten(dev: &Device) -> TestResult {
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
