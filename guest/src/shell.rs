//! The prompt on the virtio console, for a Guest booted with nothing to do.
//!
//! The Launcher puts its terminal in raw mode, so we see every key as it is
//! typed and must echo it ourselves, handle backspace, and end lines with
//! "\r\n" (a raw terminal doesn't turn "\n" into that for us; Linux's tty
//! layer would do it for a Linux Guest). End of input (stdin closed, or
//! Ctrl-D on an empty line) powers off.
//!
//! We never spin: with nothing to do we HALT, and any interrupt wakes us,
//! console input or a frame from the network, which we answer while we're
//! here (ARP and ping, with `ip=`).

use core::fmt::Write;

use lguest_abi::SHUTDOWN_POWEROFF;

use crate::virtio::console::{Console, Input};
use crate::virtio::net::{self, FRAME_MAX};
use crate::virtio::{describe, idle, Deadline, Devices};
use crate::{boot, hcall, lguest_data, println};

const PROMPT: &str = "lguest> ";
const LINE_MAX: usize = 128;
const HELP: &str = "commands: help, echo WORDS, devices, poweroff\r\n";

/// What the reference Guest does once it is up: say hello, bring up its
/// devices, and run the prompt on the console until poweroff.
pub fn serve() -> ! {
    println!(
        "lguest-guest: Hello from the reference Guest: {} MiB of RAM, tsc {} kHz",
        boot::mem() >> 20,
        lguest_data::tsc_khz()
    );
    let mut devices = Devices::scan();
    devices.probe_all();
    if devices.console.is_some() {
        run(&mut devices);
    }
    hcall::shutdown(c"reference Guest finished", SHUTDOWN_POWEROFF);
}

/// Run the prompt until the user (or end of input) powers off.
fn run(devices: &mut Devices) -> ! {
    let ip = boot::option("ip").and_then(|text| {
        let ip = net::parse_ip(text);
        if ip.is_none() {
            println!("lguest-guest: ignoring ip={text}: not an IPv4 address");
        }
        ip
    });
    let Devices {
        bus, console, net, ..
    } = devices;
    let console = console.as_mut().expect("the shell needs the console");
    if let (Some(net), Some(ip)) = (net.as_ref(), ip) {
        println!(
            "lguest-guest: answering ARP and ping for {} ({})",
            net::ShowIp(ip),
            net::ShowMac(net.mac)
        );
    }
    let _ = write!(console, "lguest-guest: type help for commands\r\n{PROMPT}");
    console.flush_line();

    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    // A "\r\n" from a terminal that isn't raw is one Enter, not two.
    let mut after_cr = false;
    let mut frame = [0u8; FRAME_MAX];
    loop {
        let mut input = [0u8; 64];
        let n = match console.poll(&mut input) {
            Input::Eof => end_of_input(console),
            Input::Nothing => 0,
            Input::Bytes(n) => n,
        };
        for &byte in &input[..n] {
            let was_cr = core::mem::replace(&mut after_cr, byte == b'\r');
            match byte {
                b'\n' if was_cr => {}
                b'\r' | b'\n' => {
                    let _ = console.write_str("\r\n");
                    // Only printable ASCII ever goes into the line.
                    let text = core::str::from_utf8(&line[..len]).unwrap_or("");
                    command(console, bus, text);
                    len = 0;
                    let _ = console.write_str(PROMPT);
                }
                0x7F | 0x08 if len > 0 => {
                    len -= 1;
                    let _ = console.write_str("\x08 \x08");
                }
                0x04 if len == 0 => end_of_input(console),
                0x20..=0x7E if len < LINE_MAX => {
                    line[len] = byte;
                    len += 1;
                    let _ = console.write_char(byte as char);
                }
                _ => {}
            }
        }
        // One buffer of echo per batch of input, not one per key.
        console.flush_line();

        if let Some(net) = net.as_mut() {
            while let Some(len) = net.recv(&mut frame) {
                if let Some(ip) = ip {
                    net.answer(&frame[..len], ip);
                }
            }
        }

        // Not `||`: both must ask for their interrupt before we sleep.
        idle(None, || {
            console.arm_rx() | net.as_mut().is_some_and(|net| net.arm_rx())
        });
    }
}

fn command(console: &mut Console, bus: &crate::virtio::Bus, text: &str) {
    let text = text.trim();
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    match word {
        "" => {}
        "help" => {
            let _ = console.write_str(HELP);
        }
        "echo" => {
            let _ = write!(console, "{}\r\n", rest.trim_start());
        }
        "devices" => {
            if bus.is_empty() {
                let _ = console.write_str("no devices\r\n");
            }
            for dev in bus.devices() {
                let _ = describe(console, &dev);
                let _ = console.write_str("\r\n");
            }
        }
        "poweroff" => power_off(console, c"poweroff command"),
        _ => {
            let _ = write!(console, "unknown command: {word} (try help)\r\n");
        }
    }
}

/// Finish the prompt's line and power off.
fn end_of_input(console: &mut Console) -> ! {
    let _ = console.write_str("\r\n");
    power_off(console, c"end of input")
}

/// Power off once the Host has written out all we sent.
fn power_off(console: &mut Console, reason: &core::ffi::CStr) -> ! {
    console.drain(Some(&Deadline::after_ms(2000)));
    hcall::shutdown(reason, SHUTDOWN_POWEROFF);
}
