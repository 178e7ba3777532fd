//! The virtio console: queue 0 brings the Launcher's stdin to us, queue 1
//! takes our output to its stdout.
//!
//! Input arrives in buffers we offer on the receive queue: the Host fills
//! one with whatever bytes stdin gave it and hands it back. At end of file it
//! hands back one buffer with nothing in it, and no more. Output goes out in
//! buffers of ours that the Host reads and hands back; we take them back
//! lazily, when we need one.

use super::pool::Queue;
use super::Device;
use crate::cell::GuestCell;
use crate::console::Error;
use crate::shell::{Input, Terminal};
use crate::time::Deadline;
use lguest_abi::vring::{F_ANY_LAYOUT, RING_F_EVENT_IDX, RING_F_INDIRECT_DESC};

const RX_SIZE: usize = 128;
const TX_SIZE: usize = 256;

/// The buffers the Host writes our input into and reads our output from.
static RX_MEM: GuestCell<[[u8; RX_SIZE]; 16]> = GuestCell::new([[0; RX_SIZE]; 16]);
static TX_MEM: GuestCell<[[u8; TX_SIZE]; 16]> = GuestCell::new([[0; TX_SIZE]; 16]);

pub struct Console {
    pub dev: Device,
    pub rx: Queue,
    pub tx: Queue,
    /// The receive buffer we are reading: (buffer, bytes in it, bytes read).
    reading: Option<(usize, usize, usize)>,
    eof: bool,
}

impl Console {
    /// Bring the console up: negotiate, take both rings, offer every
    /// receive buffer, DRIVER_OK, and kick the receive queue to start it.
    pub fn probe(dev: Device) -> Result<Console, Error> {
        // INDIRECT_DESC we never use but in bad=virtio-long, which needs the
        // Host to accept indirect tables on this device.
        let support = 1 << F_ANY_LAYOUT | 1 << RING_F_INDIRECT_DESC | 1 << RING_F_EVENT_IDX;
        let mut console = dev.bring_up(support, 2, |accepted| {
            let mut console = Console {
                dev,
                rx: Queue::new(dev.vq(0), accepted, &RX_MEM)?,
                tx: Queue::new(dev.vq(1), accepted, &TX_MEM)?,
                reading: None,
                eof: false,
            };
            console.rx.offer_all();
            Ok(console)
        })?;
        console.rx.vq.kick();
        Ok(console)
    }

    /// Send `bytes` in one buffer (at most 256 of them); returns the chain's
    /// head.
    pub fn send_one(&mut self, bytes: &[u8]) -> u16 {
        self.tx.send(bytes)
    }
}

impl Terminal for Console {
    /// Input comes a buffer at a time; at end of input, one empty buffer.
    fn poll(&mut self, out: &mut [u8]) -> Input {
        let mut n = 0;
        while n < out.len() {
            if let Some((i, len, read)) = self.reading {
                if read < len {
                    let take = (len - read).min(out.len() - n);
                    self.rx.read(i, read, &mut out[n..n + take]);
                    n += take;
                    self.reading = Some((i, len, read + take));
                    continue;
                }
                // Read it all: it can go back to the Host.
                self.reading = None;
                self.rx.offer(i);
                self.rx.vq.kick();
            }
            if self.eof {
                break;
            }
            match self.rx.received() {
                None => break,
                Some((_, 0)) => self.eof = true,
                Some((i, len)) => self.reading = Some((i, len, 0)),
            }
        }
        match (n, self.eof) {
            (0, true) => Input::Eof,
            (0, false) => Input::Nothing,
            (n, _) => Input::Bytes(n),
        }
    }

    fn arm_rx(&mut self) -> bool {
        let waiting = matches!(self.reading, Some((_, len, read)) if read < len);
        self.rx.vq.enable_cb() || waiting || self.eof
    }

    fn send(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(TX_SIZE) {
            self.send_one(chunk);
        }
    }

    /// The Host writes our output on its device thread: wait for it to
    /// hand back every buffer.
    fn drain(&mut self, deadline: Option<&Deadline>) -> bool {
        self.tx.drain(deadline)
    }
}
