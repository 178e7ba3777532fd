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
//!
//! The prompt doesn't care which device model its console and network card
//! sit on: virtio on the lguest bus, or the 2007 DMA model (`dma`). Each
//! driver gives it a `Terminal` and a `Nic`.

use core::fmt::{self, Write};

use lguest_abi::{DEVICE_MODEL_DMA, SHUTDOWN_POWEROFF};

use crate::inet::{self, Ip, Nic, ShowIp, ShowMac, FRAME_MAX};
use crate::time::{idle, Deadline};
use crate::{boot, dma, err, hcall, lguest_data, println, virtio};

const PROMPT: &str = "lguest> ";
const ESC: u8 = 0x1B;
const LINE_MAX: usize = 256;
const HELP: &str = "commands: help, echo WORDS, devices, ping A.B.C.D, poweroff\n";
/// Echo requests `ping` sends.
const PING_COUNT: u16 = 4;

/// What the console gave us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// This many bytes.
    Bytes(usize),
    /// Nothing yet.
    Nothing,
    /// End of input: stdin is closed.
    Eof,
}

/// What the prompt needs of a console.
pub trait Terminal {
    /// Copy what input has arrived into `out`, without waiting.
    fn poll(&mut self, out: &mut [u8]) -> Input;
    /// Whether input is waiting (then don't sleep), having asked for an
    /// interrupt when more comes. For `idle`.
    fn arm_rx(&mut self) -> bool;
    /// Send `bytes` (any bytes: a character may come in pieces) at once.
    fn send(&mut self, bytes: &[u8]);
    /// Wait until the Host has written out everything we sent: before a
    /// power off, which would otherwise race its device thread.
    fn drain(&mut self, deadline: Option<&Deadline>) -> bool;
}

/// What the prompt says, collected and sent a line at a time (or when the
/// buffer fills): one buffer for a line, not one per key echoed.
struct Out<'a> {
    console: &'a mut dyn Terminal,
    line: [u8; LINE_MAX],
    len: usize,
}

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.line[self.len] = byte;
            self.len += 1;
            if byte == b'\n' || self.len == LINE_MAX {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        let len = core::mem::take(&mut self.len);
        if len > 0 {
            self.console.send(&self.line[..len]);
        }
    }
}

impl Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

/// What the reference Guest does once it is up: say hello, bring up its
/// devices, and run the prompt on the console until poweroff.
pub fn serve() -> ! {
    let (mib, khz) = (boot::mem() >> 20, lguest_data::tsc_khz());
    println!("lguest-guest: Hello from the reference Guest: {mib} MiB of RAM, tsc {khz} kHz");
    if boot::device_model() == DEVICE_MODEL_DMA {
        let mut devs = dma::Devices::scan();
        devs.probe_all();
        let table = devs.table;
        let list = |out: &mut dyn Write| dma::list(out, &table);
        run(devs.console.as_mut(), devs.net.as_mut(), &list);
    } else {
        let mut devs = virtio::Devices::scan();
        devs.probe_all();
        let bus = devs.bus;
        let list = |out: &mut dyn Write| virtio::list(out, &bus);
        run(devs.console.as_mut(), devs.net.as_mut(), &list);
    }
    hcall::shutdown(c"reference Guest finished", SHUTDOWN_POWEROFF);
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
    /// Where we are in an escape sequence, by the byte that started the
    /// part we are in: ESC; then for CSI `[`, parameter bytes and a final
    /// byte in 0x40-0x7E (the arrows are ESC [ A to D); for SS3 `O` and one
    /// byte (ESC O A on some terminals). 0 outside one.
    escape: u8,
    /// A "\r\n" from a terminal that isn't raw is one Enter, not two.
    after_cr: bool,
}

impl Line {
    const fn new(after_cr: bool) -> Line {
        Line {
            bytes: [0; LINE_MAX],
            len: 0,
            over: 0,
            pending: (0, false),
            escape: 0,
            after_cr,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0 && self.over == 0
    }

    /// Take one byte of input, echoing what should be seen.
    fn key(&mut self, out: &mut Out, byte: u8) -> Key {
        let was_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match (self.escape, byte) {
            (ESC, b'[' | b'O') => self.escape = byte,
            (ESC, ESC) | (b'[', 0x20..=0x3F) => {}
            (ESC | b'[' | b'O', 0x20..=0x7E) => self.escape = 0,
            // Anything else ends the sequence (if any) and is a key of its own.
            _ => {
                self.escape = 0;
                return self.plain_key(out, byte, was_cr);
            }
        }
        Key::Nothing
    }

    fn plain_key(&mut self, out: &mut Out, byte: u8, was_cr: bool) -> Key {
        // A character's continuation bytes go where its first byte went.
        if self.pending.0 > 0 && byte & 0xC0 == 0x80 {
            self.pending.0 -= 1;
            if self.pending.1 {
                self.push(byte);
            }
            out.put(&[byte]);
            return Key::Nothing;
        }
        self.pending = (0, false);
        match byte {
            b'\n' if was_cr => {}
            b'\r' | b'\n' => return Key::Enter,
            0x03 => return Key::Cancel,
            0x04 if self.is_empty() => return Key::Eof,
            ESC => self.escape = ESC,
            0x7F | 0x08 if self.over > 0 => {
                self.over -= 1;
                out.put(b"\x08 \x08");
            }
            0x7F | 0x08 if self.len > 0 => {
                // A whole character: its continuation bytes, then its first.
                while self.len > 1 && self.bytes[self.len - 1] & 0xC0 == 0x80 {
                    self.len -= 1;
                }
                self.len -= 1;
                out.put(b"\x08 \x08");
            }
            // Printable ASCII, or the first byte of a longer UTF-8
            // character, which has as many bytes as leading ones.
            0x20..=0x7E | 0xC2..=0xF4 => {
                let size = (byte.leading_ones() as usize).max(1);
                let fits = self.over == 0 && self.len + size <= LINE_MAX;
                if fits {
                    self.push(byte);
                } else {
                    self.over += 1;
                }
                self.pending = (size - 1, fits);
                out.put(&[byte]);
            }
            // Other control characters, and bytes that can't start a
            // character, are not text.
            _ => {}
        }
        Key::Nothing
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// The line, if it may run: refused (with a word to the user) if it was
    /// too long or isn't UTF-8.
    fn text(&self, out: &mut Out) -> Option<&str> {
        if self.over > 0 {
            let _ = writeln!(out, "line too long (the most is {LINE_MAX} bytes): not run");
            return None;
        }
        let text = core::str::from_utf8(&self.bytes[..self.len]);
        if text.is_err() {
            let _ = out.write_str("line is not UTF-8: not run\n");
        }
        text.ok()
    }
}

/// The prompt's devices and what it knows.
struct Shell<'a> {
    out: Out<'a>,
    net: Option<&'a mut dyn Nic>,
    /// Our address, from `ip=`.
    ip: Option<Ip>,
    /// Lists the devices, for the `devices` command.
    list: &'a dyn Fn(&mut dyn Write) -> fmt::Result,
}

/// Run the prompt on `console` until the user (or end of input) powers off.
fn run<'a>(
    console: Option<&'a mut impl Terminal>,
    net: Option<&'a mut impl Nic>,
    list: &'a dyn Fn(&mut dyn Write) -> fmt::Result,
) {
    let (Some(console), net) = (console, net.map(|net| net as &mut dyn Nic)) else {
        return;
    };
    let text = boot::option("ip");
    let ip = text.and_then(inet::parse_ip);
    if let (Some(text), None) = (text, ip) {
        println!("lguest-guest: ignoring ip={text}: not an IPv4 address");
    }
    if let (Some(net), Some(ip)) = (net.as_ref(), ip) {
        let (ip, mac) = (ShowIp(ip), ShowMac(net.mac()));
        println!("lguest-guest: answering ARP and ping for {ip} ({mac})");
    }
    let out = Out {
        console,
        line: [0; LINE_MAX],
        len: 0,
    };
    let mut shell = Shell { out, net, ip, list };
    let _ = write!(shell.out, "lguest-guest: type help for commands\n{PROMPT}");
    shell.out.flush();

    let mut line = Line::new(false);
    let mut frame = [0u8; FRAME_MAX];
    loop {
        let mut input = [0u8; 64];
        let n = match shell.out.console.poll(&mut input) {
            Input::Eof => shell.end_of_input(&line),
            Input::Nothing => 0,
            Input::Bytes(n) => n,
        };
        for &byte in &input[..n] {
            match line.key(&mut shell.out, byte) {
                Key::Nothing => continue,
                Key::Enter => {
                    shell.out.put(b"\n");
                    if let Some(text) = line.text(&mut shell.out) {
                        let _ = shell.command(text);
                    }
                }
                Key::Cancel => shell.out.put(b"^C\n"),
                Key::Eof => shell.end_of_input(&line),
            }
            line = Line::new(line.after_cr);
            let _ = shell.out.write_str(PROMPT);
        }
        // One buffer of echo per batch of input, not one per key.
        shell.out.flush();

        if let Some(net) = shell.net.as_mut() {
            while let Some(len) = net.recv(&mut frame) {
                if let Some(ip) = ip {
                    inet::answer(*net, &frame[..len], ip);
                }
            }
        }

        // Not `||`: both must ask for their interrupt before we sleep.
        let Shell { out, net, .. } = &mut shell;
        idle(None, || {
            out.console.arm_rx() | net.as_mut().is_some_and(|net| net.arm_rx())
        });
    }
}

impl Shell<'_> {
    fn command(&mut self, text: &str) -> fmt::Result {
        let text = text.trim();
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let out = &mut self.out;
        match word {
            "" => Ok(()),
            "help" => out.write_str(HELP),
            "echo" => writeln!(out, "{}", rest.trim_start()),
            "devices" => (self.list)(out),
            "ping" => {
                let peer = rest.trim();
                let result = match (self.net.as_mut(), self.ip, inet::parse_ip(peer)) {
                    (None, _, _) => Err(err!("no network card")),
                    (_, None, _) => Err(err!("we have no address: boot with ip=A.B.C.D")),
                    (_, _, None) => Err(err!("usage: ping A.B.C.D")),
                    (Some(net), Some(ip), Some(peer)) => {
                        inet::ping(*net, ip, peer, PING_COUNT, out)
                    }
                };
                match result {
                    Err(e) => writeln!(out, "ping: {}", e.as_str()),
                    Ok(_) => Ok(()),
                }
            }
            "poweroff" => self.power_off(c"poweroff command"),
            _ => writeln!(out, "unknown command: {word} (try help)"),
        }
    }

    /// End of input: finish the prompt's line, run what was typed on it (a
    /// last line needs no newline), and power off.
    fn end_of_input(&mut self, line: &Line) -> ! {
        self.out.put(b"\n");
        if !line.is_empty() {
            if let Some(text) = line.text(&mut self.out) {
                let _ = self.command(text);
            }
        }
        self.power_off(c"end of input")
    }

    /// Power off once the Host has written out all we sent.
    fn power_off(&mut self, reason: &core::ffi::CStr) -> ! {
        self.out.flush();
        self.out.console.drain(Some(&Deadline::after_ms(2000)));
        hcall::shutdown(reason, SHUTDOWN_POWEROFF);
    }
}
