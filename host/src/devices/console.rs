//! The console (virtio ID 3, always the first device): queue 0 takes stdin
//! to the Guest, queue 1 brings its output to stdout.
//!
//! Input waits in a small buffer until the Guest offers receive buffers; while
//! that buffer is full we stop reading stdin, so a Guest that never reads
//! can't make us spin or grow. At end of input one receive buffer comes back
//! empty, and no more (ABI section 8). On a raw terminal Ctrl-C is a byte like
//! any other, passed on to the Guest; three of them within a second end it.

use crate::virtio::queue::{stream_from_chain, write_to_chain};
use crate::virtio::{Device, Queues};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

const RX: usize = 0;
const TX: usize = 1;
/// Input held for the Guest before we stop reading stdin.
const PENDING_MAX: usize = 4096;
const CTRL_C: u8 = 3;
/// Output one transmit chain may carry; the rest is dropped (a console
/// line is short, and the Guest's lengths are its own choice).
const OUTPUT_MAX: u64 = 1 << 20;

pub struct Console {
    /// Whether stdin is a terminal we put in raw mode (Ctrl-C arrives here).
    raw_terminal: bool,
    pending: VecDeque<u8>,
    eof: bool,
    eof_sent: bool,
    ctrl_c: VecDeque<Instant>,
}

impl Console {
    pub fn new(raw_terminal: bool) -> Console {
        Console {
            raw_terminal,
            pending: VecDeque::new(),
            eof: false,
            eof_sent: false,
            ctrl_c: VecDeque::new(),
        }
    }

    /// Moves pending input into the Guest's receive buffers. We need to
    /// hear of new receive buffers only while input waits for one: the rest
    /// of the time we look at the ring when input comes, and the Guest is
    /// spared a kick per buffer.
    fn deliver(&mut self, queues: &mut Queues) -> Result<(), String> {
        let waiting = !self.pending.is_empty() || (self.eof && !self.eof_sent);
        queues.want_kicks(RX, waiting)?;
        while !self.pending.is_empty() {
            let Some(chain) = queues.pop(RX)? else {
                return Ok(());
            };
            let n = write_to_chain(queues.mem, &chain, self.pending.make_contiguous());
            self.pending.drain(..n as usize);
            queues.push(RX, &chain, n)?;
        }
        if self.eof && !self.eof_sent {
            if let Some(chain) = queues.pop(RX)? {
                queues.push(RX, &chain, 0)?;
                self.eof_sent = true;
            }
        }
        if self.pending.is_empty() && (!self.eof || self.eof_sent) {
            queues.want_kicks(RX, false)?;
        }
        Ok(())
    }

    /// Counts Ctrl-C bytes; true when three came within a second.
    fn three_ctrl_c(&mut self, input: &[u8]) -> bool {
        for _ in input.iter().filter(|&&b| b == CTRL_C) {
            let now = Instant::now();
            self.ctrl_c.push_back(now);
            while self
                .ctrl_c
                .front()
                .is_some_and(|t| now - *t > Duration::from_secs(1))
            {
                self.ctrl_c.pop_front();
            }
            if self.ctrl_c.len() >= 3 {
                return true;
            }
        }
        false
    }
}

impl Device for Console {
    fn name(&self) -> &'static str {
        "console"
    }
    fn virtio_id(&self) -> u8 {
        lguest_abi::VIRTIO_ID_CONSOLE
    }
    fn queue_names(&self) -> &'static [&'static str] {
        &["rx", "tx"]
    }
    fn features(&self) -> u32 {
        0
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), String> {
        if q == RX {
            return self.deliver(queues);
        }
        let mut out = std::io::stdout().lock();
        let mut chunk = [0u8; 4096];
        while let Some(chain) = queues.pop(TX)? {
            stream_from_chain(queues.mem, &chain, &mut chunk, OUTPUT_MAX, |bytes| {
                let _ = out.write_all(bytes);
            });
            queues.push(TX, &chain, 0)?;
        }
        let _ = out.flush();
        Ok(())
    }

    /// Output is written as the Guest kicks, on its own vCPU thread: a
    /// write to stdout is short, and an echo needs no thread hand-off.
    fn serve_inline(&self, q: usize) -> bool {
        q == TX
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(libc::STDIN_FILENO)
    }

    fn wants_backend(&self) -> bool {
        !self.eof && self.pending.len() < PENDING_MAX
    }

    fn backend_inline(&self) -> bool {
        true
    }

    fn backend_ready(&mut self, queues: &mut Queues) -> Result<(), String> {
        // Two threads may have seen stdin readable (ours and the vCPU's);
        // under the device lock, only read what is there now, so the other
        // never blocks in read().
        let mut fd = libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, zero timeout.
        if unsafe { libc::poll(&mut fd, 1, 0) } == 0 {
            return Ok(());
        }
        let mut buf = [0u8; PENDING_MAX];
        let room = PENDING_MAX - self.pending.len();
        // SAFETY: reads at most `room` bytes into our own buffer.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), room) };
        match n {
            0 => self.eof = true,
            n if n > 0 => {
                let input = &buf[..n as usize];
                if self.raw_terminal && self.three_ctrl_c(input) {
                    queues.stop_guest("ended by the user (three Ctrl-C)");
                }
                self.pending.extend(input);
            }
            _ => {
                let err = std::io::Error::last_os_error();
                if !matches!(
                    err.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) {
                    // An unreadable stdin is the end of input.
                    self.eof = true;
                }
            }
        }
        self.deliver(queues)
    }

    fn reset(&mut self) {
        // Input already read stays for the Guest's next driver, and end of
        // input, once signalled, is not signalled again (ABI section 8: one
        // empty buffer, "and no more").
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_ctrl_c_within_a_second() {
        let mut c = Console::new(true);
        assert!(!c.three_ctrl_c(b"a\x03b\x03"));
        assert!(c.three_ctrl_c(b"\x03"));
        let mut c = Console::new(true);
        assert!(!c.three_ctrl_c(b"\x03\x03"));
        c.ctrl_c[0] -= Duration::from_secs(2);
        assert!(!c.three_ctrl_c(b"\x03"));
    }
}
