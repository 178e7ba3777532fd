//! The prompt on the virtio console, for a Guest booted with nothing to do.
//!
//! The Launcher puts its terminal in raw mode, so we see every key as it is
//! typed and must echo it ourselves and handle backspace, Ctrl-C (which
//! cancels the line, as a shell does) and the escape sequences of keys such
//! as the arrows (which we don't use, and must not take as text). Raw mode
//! leaves the terminal's output processing on, so we end lines with a bare
//! "\n", as the early console does, and the terminal shows "\r\n". Lines are
//! UTF-8; one too long for us is refused, not cut. End of input (stdin
//! closed, or Ctrl-D on an empty line) runs what was typed and powers off.
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
const LINE_MAX: usize = 256;
const HELP: &str = "commands: help, echo WORDS, devices, poweroff\n";

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

/// Where we are in an escape sequence: ESC, then for CSI `[`, parameter
/// bytes and a final byte in 0x40-0x7E (the arrows are ESC [ A to D); for
/// SS3 `O` and one byte (ESC O A on some terminals).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Esc,
    Csi,
    Ss3,
}

/// What a key asks of the prompt.
enum Key {
    Nothing,
    Enter,
    Cancel,
    Eof,
}

/// The line being typed.
struct Line {
    bytes: [u8; LINE_MAX],
    len: usize,
    /// Characters typed that didn't fit: the line will be refused.
    over: usize,
    /// Bytes still to come of the character being typed, and whether it
    /// is going into the line.
    pending: (usize, bool),
    escape: Escape,
    /// A "\r\n" from a terminal that isn't raw is one Enter, not two.
    after_cr: bool,
}

impl Line {
    const fn new() -> Line {
        Line {
            bytes: [0; LINE_MAX],
            len: 0,
            over: 0,
            pending: (0, false),
            escape: Escape::None,
            after_cr: false,
        }
    }

    /// Start again with an empty line (after Enter or Ctrl-C).
    fn clear(&mut self) {
        let after_cr = self.after_cr;
        *self = Line::new();
        self.after_cr = after_cr;
    }

    fn is_empty(&self) -> bool {
        self.len == 0 && self.over == 0
    }

    /// Take one byte of input, echoing what should be seen.
    fn key(&mut self, console: &mut Console, byte: u8) -> Key {
        let was_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match (self.escape, byte) {
            (Escape::Esc, b'[') => self.escape = Escape::Csi,
            (Escape::Esc, b'O') => self.escape = Escape::Ss3,
            (Escape::Esc, 0x1B) => {}
            (Escape::Csi, 0x20..=0x3F) => {}
            (Escape::Esc | Escape::Csi | Escape::Ss3, 0x20..=0x7E) => self.escape = Escape::None,
            // Anything else ends the sequence (if any) and is a key of its own.
            _ => {
                self.escape = Escape::None;
                return self.plain_key(console, byte, was_cr);
            }
        }
        Key::Nothing
    }

    fn plain_key(&mut self, console: &mut Console, byte: u8, was_cr: bool) -> Key {
        // A character's continuation bytes go where its first byte went.
        if self.pending.0 > 0 && byte & 0xC0 == 0x80 {
            self.pending.0 -= 1;
            if self.pending.1 {
                self.push(byte);
            }
            console.put(&[byte]);
            return Key::Nothing;
        }
        self.pending = (0, false);
        match byte {
            b'\n' if was_cr => Key::Nothing,
            b'\r' | b'\n' => Key::Enter,
            0x03 => Key::Cancel,
            0x04 if self.is_empty() => Key::Eof,
            0x1B => {
                self.escape = Escape::Esc;
                Key::Nothing
            }
            0x7F | 0x08 => {
                if self.over > 0 {
                    self.over -= 1;
                } else if self.len > 0 {
                    // A whole character: its continuation bytes, then its first.
                    while self.len > 1 && self.bytes[self.len - 1] & 0xC0 == 0x80 {
                        self.len -= 1;
                    }
                    self.len -= 1;
                } else {
                    return Key::Nothing;
                }
                console.put(b"\x08 \x08");
                Key::Nothing
            }
            // Printable ASCII, or the first byte of a longer UTF-8 character.
            0x20..=0x7E | 0xC2..=0xF4 => {
                let size = match byte {
                    0xF0.. => 4,
                    0xE0.. => 3,
                    0xC2.. => 2,
                    _ => 1,
                };
                let fits = self.over == 0 && self.len + size <= LINE_MAX;
                if fits {
                    self.push(byte);
                } else {
                    self.over += 1;
                }
                self.pending = (size - 1, fits);
                console.put(&[byte]);
                Key::Nothing
            }
            // Other control characters, and bytes that can't start a
            // character, are not text.
            _ => Key::Nothing,
        }
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// The line, if it may run: refused (with a word to the user) if it was
    /// too long or isn't UTF-8.
    fn text(&self, console: &mut Console) -> Option<&str> {
        if self.over > 0 {
            let _ = writeln!(
                console,
                "line too long (the most is {LINE_MAX} bytes): not run"
            );
            return None;
        }
        let text = core::str::from_utf8(&self.bytes[..self.len]);
        if text.is_err() {
            let _ = console.write_str("line is not UTF-8: not run\n");
        }
        text.ok()
    }
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
    let _ = write!(console, "lguest-guest: type help for commands\n{PROMPT}");
    console.flush_line();

    let mut line = Line::new();
    let mut frame = [0u8; FRAME_MAX];
    loop {
        let mut input = [0u8; 64];
        let n = match console.poll(&mut input) {
            Input::Eof => end_of_input(console, bus, &line),
            Input::Nothing => 0,
            Input::Bytes(n) => n,
        };
        for &byte in &input[..n] {
            match line.key(console, byte) {
                Key::Nothing => continue,
                Key::Enter => {
                    console.put(b"\n");
                    if let Some(text) = line.text(console) {
                        command(console, bus, text);
                    }
                }
                Key::Cancel => console.put(b"^C\n"),
                Key::Eof => end_of_input(console, bus, &line),
            }
            line.clear();
            let _ = console.write_str(PROMPT);
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
            let _ = writeln!(console, "{}", rest.trim_start());
        }
        "devices" => {
            if bus.is_empty() {
                let _ = console.write_str("no devices\n");
            }
            for dev in bus.devices() {
                let _ = describe(console, &dev);
                let _ = console.write_str("\n");
            }
        }
        "poweroff" => power_off(console, c"poweroff command"),
        _ => {
            let _ = writeln!(console, "unknown command: {word} (try help)");
        }
    }
}

/// End of input: finish the prompt's line, run what was typed on it (a
/// last line needs no newline), and power off.
fn end_of_input(console: &mut Console, bus: &crate::virtio::Bus, line: &Line) -> ! {
    console.put(b"\n");
    if !line.is_empty() {
        if let Some(text) = line.text(console) {
            command(console, bus, text);
        }
    }
    power_off(console, c"end of input")
}

/// Power off once the Host has written out all we sent.
fn power_off(console: &mut Console, reason: &core::ffi::CStr) -> ! {
    console.drain(Some(&Deadline::after_ms(2000)));
    hcall::shutdown(reason, SHUTDOWN_POWEROFF);
}
