//! The console (virtio ID 3, always the first device): queue 0 takes stdin
//! to the Guest, queue 1 brings its output to stdout.
//!
//! Input waits in a small buffer until the Guest offers receive buffers; while
//! that buffer is full we stop reading stdin, so a Guest that never reads
//! can't make us spin or grow. At end of input one receive buffer comes back
//! empty, and no more (ABI section 8). On a raw terminal Ctrl-C is a byte like
//! any other, passed on to the Guest; three of them within a second end it.
//!
//! Output never makes a thread wait in write() ([`stdout`]): what stdout
//! won't take now waits in a backlog of 64 KiB, and when that is full the
//! Guest's transmit buffers wait in the ring, unfinished, until stdout has
//! room. A Guest printing into a pipe nobody reads is held back (it sleeps
//! until its buffers come back), not the vCPU thread, which stays free to
//! hear Ctrl-C. The device's thread watches stdout meanwhile and finishes the
//! buffers when it drains. Not a byte is dropped or reordered, and at the end
//! the Launcher writes out what is left before it exits, unless the user
//! ended the Guest with Ctrl-C.

mod stdout;

use crate::kick::{self, Irqs};
use crate::memory::GuestMemory;
use crate::virtio::queue::{readable_len, write_to_chain, Chain};
use crate::virtio::{Device, DeviceError, Queues};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};
pub use stdout::BACKLOG_MAX;

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
    /// The user ended the Guest from the terminal: output still waiting for
    /// stdout is given up, not waited for.
    user_stop: bool,
    /// A transmit chain taken from the ring whose bytes did not all fit in
    /// the backlog, and how many of them have gone in.
    held: Option<(Chain, u64)>,
}

impl Console {
    pub fn new(raw_terminal: bool) -> Console {
        Console {
            raw_terminal,
            pending: VecDeque::new(),
            eof: false,
            eof_sent: false,
            ctrl_c: VecDeque::new(),
            user_stop: false,
            held: None,
        }
    }

    /// Moves the Guest's output from the transmit ring to stdout, as far as
    /// stdout and the backlog take it without waiting. A chain is finished
    /// (handed back) once all its bytes are written or in the backlog.
    fn send_output(&mut self, queues: &mut Queues) -> Result<(), DeviceError> {
        let mut out = stdout::stdout();
        loop {
            if out.room() == 0 {
                out.flush();
                if out.room() == 0 {
                    return Ok(());
                }
            }
            let (chain, taken) = match self.held.take() {
                Some(held) => held,
                None => match queues.pop(TX)? {
                    Some(chain) => (chain, 0),
                    None => return Ok(()),
                },
            };
            let len = readable_len(&chain).min(OUTPUT_MAX);
            let n = (len - taken).min(out.room() as u64);
            read_chain(queues.mem, &chain, taken, n, |bytes| out.write(bytes));
            if taken + n == len {
                queues.push(TX, &chain, 0)?;
            } else {
                self.held = Some((chain, taken + n));
            }
        }
    }

    /// Moves pending input into the Guest's receive buffers. We need to
    /// hear of new receive buffers only while input waits for one: the rest
    /// of the time we look at the ring when input comes, and the Guest is
    /// spared a kick per buffer.
    fn deliver(&mut self, queues: &mut Queues) -> Result<(), DeviceError> {
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

    /*D:570 The console's two directions. Input waits in a small buffer of
     * ours until the Guest offers somewhere to put it (and while that is
     * full we stop reading stdin). Output is written on the vCPU thread as
     * the Guest kicks, and never blocks: what stdout won't take waits in a
     * backlog, and when that is full the Guest's buffers wait in the ring,
     * so a Guest printing into a pipe nobody reads holds up only itself. */
    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError> {
        if q == RX {
            return self.deliver(queues);
        }
        self.send_output(queues)
    }

    /// Output is written as the Guest kicks, on its own vCPU thread: a
    /// write to stdout never waits, and an echo needs no thread hand-off.
    fn serve_inline(&self, q: usize) -> bool {
        q == TX
    }

    fn output_fd(&self) -> Option<RawFd> {
        let out = stdout::stdout();
        (!out.is_empty() || self.held.is_some()).then(|| out.fd())
    }

    fn output_ready(&mut self, queues: &mut Queues) -> Result<(), DeviceError> {
        self.send_output(queues)
    }

    /// The Guest has stopped: write out what it left (in the backlog and in
    /// the ring), waiting for stdout as long as it takes, unless the user
    /// ended the Guest with Ctrl-C (who then wants out, not the rest).
    fn finish(&mut self, queues: &mut Queues) {
        let mut ring_ok = true;
        loop {
            if self.user_stop || kick::user_stopped() {
                return;
            }
            if ring_ok && self.send_output(queues).is_err() {
                // A broken ring (the Guest's Sudden Death, most likely)
                // gives nothing more; what is in the backlog still goes out.
                ring_ok = false;
                self.held = None;
            }
            let fd = {
                let mut out = stdout::stdout();
                if out.flush() && self.held.is_none() {
                    return;
                }
                out.fd()
            };
            stdout::wait_for_room(fd, &queues.irqs().wake);
        }
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

    fn backend_ready(&mut self, queues: &mut Queues) -> Result<(), DeviceError> {
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
        let room = PENDING_MAX - self.pending.len();
        if room == 0 {
            // The other thread filled the buffer first. A read of nothing
            // would return 0, which is not the end of input.
            return self.deliver(queues);
        }
        let mut buf = [0u8; PENDING_MAX];
        // SAFETY: reads at most `room` bytes into our own buffer.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), room) };
        match n {
            0 => self.eof = true,
            n if n > 0 => {
                let input = &buf[..n as usize];
                if self.raw_terminal && self.three_ctrl_c(input) {
                    self.user_stop = true;
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
        // empty buffer, "and no more"). Output in the backlog goes out; a
        // chain we held goes with the ring.
        self.held = None;
    }

    fn queue_stopped(&mut self, q: usize) {
        if q == TX {
            self.held = None;
        }
    }
}

/// Calls `f` with the `n` readable bytes of `chain` that follow the first
/// `skip`, a piece at a time.
fn read_chain(
    mem: &GuestMemory,
    chain: &Chain,
    mut skip: u64,
    mut n: u64,
    mut f: impl FnMut(&[u8]),
) {
    let mut chunk = [0u8; 4096];
    for b in chain.readable() {
        let len = b.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let mut at = skip;
        skip = 0;
        while at < len && n > 0 {
            let take = (len - at).min(n).min(chunk.len() as u64) as usize;
            mem.read(b.addr + at, &mut chunk[..take])
                .expect("checked by the walk");
            f(&chunk[..take]);
            at += take as u64;
            n -= take as u64;
        }
        if n == 0 {
            return;
        }
    }
}

/// Opens the console's own way to stdout now (see [`stdout`]), while the
/// Launcher may still open files: before it locks itself down.
pub fn open_stdout() {
    drop(stdout::stdout());
}

/// The early console's text (a NOTIFY with a string), written after any
/// console output still waiting, so the two keep their order. There is no
/// ring to leave it in, so the Guest waits in its hypercall until stdout has
/// taken it all, but in poll(), not write(): the user's three Ctrl-C or a
/// Sudden Death end the wait (and the Guest).
pub fn write_early(text: &[u8], irqs: &Irqs) {
    let mut rest = text;
    loop {
        let fd = {
            let mut out = stdout::stdout();
            let n = rest.len().min(out.room());
            out.write(&rest[..n]);
            rest = &rest[n..];
            if out.flush() && rest.is_empty() {
                return;
            }
            if kick::user_stopped() || irqs.death().is_some() {
                // The Guest is ending: keep the rest with what waits.
                out.write(rest);
                return;
            }
            out.fd()
        };
        stdout::wait_for_room(fd, &irqs.wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Layout;
    use crate::virtio::queue::Buffer;

    #[test]
    fn a_chain_is_read_on_from_where_it_stopped() {
        let mem = GuestMemory::new(Layout {
            mem: 1 << 20,
            pfn_limit: 256,
            mmio_hole_pages: 0,
            host_ro_pages: 1,
            host_rw_pages: 1,
        })
        .unwrap();
        // Three readable buffers around a writable one, which output skips.
        let text = b"0123456789abcdefghij";
        let buffers = [
            (0x1000, 0..3, false),
            (0x3000, 0..4, true),
            (0x2000, 3..12, false),
            (0x5000, 12..20, false),
        ]
        .map(
            |(addr, range, writable): (u64, std::ops::Range<usize>, bool)| {
                mem.write(addr, &text[range.clone()]).unwrap();
                Buffer {
                    addr,
                    len: range.len() as u32,
                    writable,
                }
            },
        );
        let chain = Chain {
            head: 0,
            buffers: buffers.to_vec(),
        };
        let read = |skip, n| {
            let mut got = Vec::new();
            read_chain(&mem, &chain, skip, n, |b| got.extend_from_slice(b));
            got
        };
        assert_eq!(read(0, 20), text);
        assert_eq!(read(2, 5), b"23456");
        assert_eq!(read(3, 9), b"3456789ab");
        assert_eq!(read(15, 100), b"fghij");
        assert_eq!(read(20, 1), b"");
        // Pieces taken one after another make the whole.
        let mut whole = Vec::new();
        for at in (0..20).step_by(7) {
            whole.extend(read(at, 7));
        }
        assert_eq!(whole, text);
    }

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
