//! The early console: `print!` and `println!`.
//!
//! The Host prints any NUL-terminated string we NOTIFY it of (one below
//! `mem`, at most 4096 bytes) on its stdout, exactly as it is. That is one
//! exit per NOTIFY, so we collect text in a buffer and send it a line at a
//! time, or when the buffer fills.

use core::ffi::CStr;
use core::fmt::{self, Write};

use lguest_abi::EARLY_CONSOLE_MAX;

use crate::cell::GuestCell;
use crate::hcall;
use crate::lguest_data;

/// The line being collected, with room for its NUL.
struct Console {
    buf: [u8; EARLY_CONSOLE_MAX],
    len: usize,
    /// Set while someone is filling `buf`, so the panic handler knows
    /// whether it may flush it.
    busy: bool,
}

static CONSOLE: GuestCell<Console> = GuestCell::new(Console {
    buf: [0; EARLY_CONSOLE_MAX],
    len: 0,
    busy: false,
});

impl Console {
    fn push(&mut self, byte: u8) {
        // A NUL would end the string early; nobody prints one on purpose.
        if byte == 0 {
            return;
        }
        self.buf[self.len] = byte;
        self.len += 1;
        if byte == b'\n' || self.len == EARLY_CONSOLE_MAX - 1 {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        self.buf[self.len] = 0;
        let line = CStr::from_bytes_until_nul(&self.buf).expect("the NUL was just written");
        hcall::notify_str(line);
        self.len = 0;
    }
}

/// The early console as a `fmt::Write`: append to the line, sending each
/// completed one to the Host.
pub struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep interrupt handlers out while we own the buffer.
        let flags = lguest_data::irq_save();
        // SAFETY: virtual interrupts are off, and no trap handler prints
        // through this buffer (the panic handler checks `busy` and uses its
        // own), so this is the only reference to CONSOLE while it lives.
        let console = unsafe { &mut *CONSOLE.as_ptr() };
        console.busy = true;
        s.bytes().for_each(|byte| console.push(byte));
        console.busy = false;
        lguest_data::irq_restore(flags);
        Ok(())
    }
}

/// Send a partial line, unless the console is in the middle of a write (we
/// are a panic inside it).
pub fn flush_if_idle() {
    let flags = lguest_data::irq_save();
    // SAFETY: as in ConsoleWriter::write_str; if `busy` is set, we leave
    // the buffer alone.
    let console = unsafe { &mut *CONSOLE.as_ptr() };
    if !console.busy && console.len != 0 {
        console.flush();
        hcall::notify_str(c"\n");
    }
    lguest_data::irq_restore(flags);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        // ConsoleWriter never fails.
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::ConsoleWriter, format_args!($($arg)*));
    }};
}

#[macro_export]
macro_rules! println {
    () => {
        $crate::print!("\n")
    };
    ($($arg:tt)*) => {
        $crate::print!("{}\n", format_args!($($arg)*))
    };
}

/// A short formatted message in a fixed buffer, always NUL-terminated: for
/// failure details and SHUTDOWN reasons, which must sit in our memory while
/// the Host reads them. Text that doesn't fit is cut at a character boundary.
#[derive(Clone, Copy)]
pub struct Msg<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Something didn't fit: take nothing more, so the cut stays at the end.
    full: bool,
}

impl<const N: usize> Msg<N> {
    pub const fn new() -> Self {
        Msg {
            buf: [0; N],
            len: 0,
            full: false,
        }
    }

    /// Format `args` into a new message.
    pub fn from_fmt(args: fmt::Arguments) -> Self {
        let mut msg = Self::new();
        // Msg's write_str never fails; it truncates.
        let _ = msg.write_fmt(args);
        msg
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever copied in.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    pub fn as_cstr(&self) -> &CStr {
        // buf[len] is always 0 (see write_str), and nothing before it is.
        CStr::from_bytes_until_nul(&self.buf[..=self.len]).unwrap_or(c"")
    }
}

impl<const N: usize> Default for Msg<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for Msg<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Drop NULs, and keep the last byte for the terminating one.
        for c in s.chars().filter(|&c| c != '\0') {
            self.full |= self.len + c.len_utf8() > N - 1;
            if self.full {
                break;
            }
            self.len += c.encode_utf8(&mut self.buf[self.len..]).len();
        }
        self.buf[self.len] = 0;
        Ok(())
    }
}

/// A failure, with its detail: short text in a fixed buffer (small enough
/// to pass around in a Result).
pub type Error = Msg<104>;

/// Format an Error.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::console::Error::from_fmt(format_args!($($arg)*))
    };
}
