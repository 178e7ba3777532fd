//! The virtio console: queue 0 brings the Launcher's stdin to us, queue 1
//! takes our output to its stdout.
//!
//! Input arrives in buffers we offer on the receive queue: the Host fills
//! one with whatever bytes stdin gave it and hands it back. At end of file it
//! hands back one buffer with nothing in it, and no more. Output goes out in
//! buffers of ours that the Host reads and hands back; we take them back
//! lazily, when we need one.

use core::fmt;

use lguest_abi::VIRTIO_STATUS_DRIVER_OK;

use super::ring::{Buf, Used, Vring};
use super::{bit, idle, Deadline, Device, Error};
use super::{VIRTIO_F_ANY_LAYOUT, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::cell::GuestCell;
use crate::err;

const RX_BUFS: usize = 16;
const RX_SIZE: usize = 128;
const TX_BUFS: usize = 16;
const TX_SIZE: usize = 256;

/// The buffers the Host writes our input into and reads our output from. We
/// only ever reach them through raw pointers: while a buffer is in a ring,
/// the Host may write it at any moment.
#[repr(C, align(64))]
struct Buffers {
    rx: [[u8; RX_SIZE]; RX_BUFS],
    tx: [[u8; TX_SIZE]; TX_BUFS],
}

static BUFFERS: GuestCell<Buffers> = GuestCell::new(Buffers {
    rx: [[0; RX_SIZE]; RX_BUFS],
    tx: [[0; TX_SIZE]; TX_BUFS],
});

fn rx_ptr(i: usize) -> *mut u8 {
    assert!(i < RX_BUFS);
    // SAFETY: in bounds of BUFFERS.
    unsafe { BUFFERS.as_ptr().cast::<u8>().add(i * RX_SIZE) }
}

fn tx_ptr(i: usize) -> *mut u8 {
    assert!(i < TX_BUFS);
    // SAFETY: in bounds of BUFFERS.
    unsafe {
        BUFFERS
            .as_ptr()
            .cast::<u8>()
            .add(RX_BUFS * RX_SIZE + i * TX_SIZE)
    }
}

fn rx_addr(i: usize) -> u64 {
    rx_ptr(i) as u64
}

fn tx_addr(i: usize) -> u64 {
    tx_ptr(i) as u64
}

/// Which buffer of a pool of `count` at `base`, `size` apart, starts at
/// `addr`; a Host that hands back something else is broken.
fn buffer_index(addr: u64, base: u64, size: usize, count: usize) -> usize {
    let offset = addr.wrapping_sub(base);
    let i = (offset / size as u64) as usize;
    if !offset.is_multiple_of(size as u64) || i >= count {
        panic!("virtio console: the Host handed back a buffer at {addr:#x} that isn't ours");
    }
    i
}

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

pub struct Console {
    pub dev: Device,
    pub rx: Vring,
    pub tx: Vring,
    /// Bit i set: tx buffer i is ours to fill.
    tx_free: u32,
    /// tx_free when the Host holds none.
    all_tx_free: u32,
    /// The receive buffer we are reading: (buffer, bytes in it, bytes read).
    reading: Option<(usize, usize, usize)>,
    eof: bool,
    /// Output collected by fmt::Write, sent a line at a time.
    line: [u8; TX_SIZE],
    line_len: usize,
}

const ALL_TX_FREE: u32 = (1 << TX_BUFS) - 1;

impl Console {
    /// Bring the console up: negotiate, take both rings, offer every
    /// receive buffer, DRIVER_OK, and kick the receive queue to start it.
    pub fn probe(dev: Device) -> Result<Console, Error> {
        // INDIRECT_DESC we never use but in bad=virtio-long, which needs the
        // Host to accept indirect tables on this device.
        let accepted = dev.negotiate(
            bit(VIRTIO_F_ANY_LAYOUT)
                | bit(VIRTIO_RING_F_INDIRECT_DESC)
                | bit(VIRTIO_RING_F_EVENT_IDX),
        );
        Self::setup(dev, accepted).inspect_err(|_| dev.fail())
    }

    fn setup(dev: Device, accepted: u32) -> Result<Console, Error> {
        if dev.num_vq() < 2 {
            return Err(err!("console with {} queues, not 2", dev.num_vq()));
        }
        let event_idx = accepted & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut console = Console {
            dev,
            rx: Vring::new(dev.vq(0), event_idx)?,
            tx: Vring::new(dev.vq(1), event_idx)?,
            tx_free: 0,
            all_tx_free: 0,
            reading: None,
            eof: false,
            line: [0; TX_SIZE],
            line_len: 0,
        };
        for i in 0..RX_BUFS.min(console.rx.num() as usize) {
            console.offer_rx(i);
        }
        // No more buffers out at once than the ring has descriptors.
        console.tx_free = ALL_TX_FREE >> TX_BUFS.saturating_sub(console.tx.num() as usize);
        console.all_tx_free = console.tx_free;
        dev.driver_ok();
        console.rx.kick();
        Ok(console)
    }

    /// Reset the device and bring it up again, as new.
    pub fn reset(&mut self) -> Result<(), Error> {
        *self = Console::probe(self.dev)?;
        if self.dev.status() & VIRTIO_STATUS_DRIVER_OK == 0 {
            return Err(err!("status {:#x} after setup", self.dev.status()));
        }
        Ok(())
    }

    fn offer_rx(&mut self, i: usize) {
        self.rx
            .add(&[Buf::writable(rx_addr(i), RX_SIZE)])
            .expect("a ring has room for all our receive buffers");
    }

    /*
     * Input.
     */

    /// Copy what input has arrived into `out`, without waiting.
    pub fn poll(&mut self, out: &mut [u8]) -> Input {
        let mut n = 0;
        while n < out.len() {
            if let Some((i, len, read)) = self.reading {
                if read < len {
                    let take = (len - read).min(out.len() - n);
                    for (k, byte) in out[n..n + take].iter_mut().enumerate() {
                        // SAFETY: buffer i is back from the Host (it is in
                        // `reading`), so nobody writes it; in bounds (len is
                        // clamped to RX_SIZE below).
                        *byte = unsafe { rx_ptr(i).add(read + k).read_volatile() };
                    }
                    n += take;
                    self.reading = Some((i, len, read + take));
                    continue;
                }
                // Read it all: it can go back to the Host.
                self.reading = None;
                self.offer_rx(i);
                self.rx.kick();
            }
            if self.eof {
                break;
            }
            match self.rx.get_used() {
                None => break,
                Some(Used { len: 0, addr, .. }) => {
                    buffer_index(addr, rx_addr(0), RX_SIZE, RX_BUFS);
                    self.eof = true;
                }
                Some(used) => {
                    let i = buffer_index(used.addr, rx_addr(0), RX_SIZE, RX_BUFS);
                    self.reading = Some((i, (used.len as usize).min(RX_SIZE), 0));
                }
            }
        }
        match (n, self.eof) {
            (0, true) => Input::Eof,
            (0, false) => Input::Nothing,
            (n, _) => Input::Bytes(n),
        }
    }

    /// Whether input is waiting (then don't sleep), having asked for an
    /// interrupt when more comes. For `idle`.
    pub fn arm_rx(&mut self) -> bool {
        let waiting = matches!(self.reading, Some((_, len, read)) if read < len);
        self.rx.enable_cb() || waiting || self.eof
    }

    /// Wait for input (until `deadline`, if any): Nothing only if it passed.
    pub fn read(&mut self, out: &mut [u8], deadline: Option<&Deadline>) -> Input {
        loop {
            match self.poll(out) {
                Input::Nothing if deadline.is_some_and(|d| d.passed()) => return Input::Nothing,
                Input::Nothing => idle(deadline, || self.arm_rx()),
                input => return input,
            }
        }
    }

    /*
     * Output.
     */

    /// Take back the transmit buffers the Host has finished with.
    fn reclaim(&mut self) -> Option<Used> {
        let mut last = None;
        while let Some(used) = self.tx.get_used() {
            let i = buffer_index(used.addr, tx_addr(0), TX_SIZE, TX_BUFS);
            self.tx_free |= 1 << i;
            last = Some(used);
        }
        last
    }

    /// A free transmit buffer, waiting for the Host to return one if need be.
    fn tx_buffer(&mut self) -> usize {
        loop {
            self.reclaim();
            if self.tx_free != 0 {
                let i = self.tx_free.trailing_zeros() as usize;
                self.tx_free &= !(1 << i);
                return i;
            }
            idle(None, || self.tx.enable_cb());
            self.tx.disable_cb();
        }
    }

    /// Send `bytes` in one buffer (at most TX_SIZE of them); returns the
    /// chain's head.
    fn send_one(&mut self, bytes: &[u8]) -> u16 {
        assert!(bytes.len() <= TX_SIZE);
        let i = self.tx_buffer();
        for (k, &byte) in bytes.iter().enumerate() {
            // SAFETY: buffer i is free (not in the ring), in bounds.
            unsafe { tx_ptr(i).add(k).write_volatile(byte) };
        }
        let head = self
            .tx
            .add(&[Buf::readable(tx_addr(i), bytes.len())])
            .expect("a free buffer means a free descriptor");
        self.tx.kick();
        head
    }

    /// Send `bytes` now (after any collected output).
    pub fn write(&mut self, bytes: &[u8]) {
        self.flush_line();
        for chunk in bytes.chunks(TX_SIZE) {
            self.send_one(chunk);
        }
    }

    /// Send what fmt::Write has collected.
    pub fn flush_line(&mut self) {
        if self.line_len > 0 {
            let line = self.line;
            let len = self.line_len;
            self.line_len = 0;
            self.send_one(&line[..len]);
        }
    }

    /// Wait until the Host has written out everything we sent: before a
    /// power off, which would otherwise race its device thread.
    pub fn drain(&mut self, deadline: Option<&Deadline>) -> bool {
        self.flush_line();
        loop {
            self.reclaim();
            if self.tx_free == self.all_tx_free {
                return true;
            }
            if deadline.is_some_and(|d| d.passed()) {
                return false;
            }
            idle(deadline, || self.tx.enable_cb());
            self.tx.disable_cb();
        }
    }

    /// Send `bytes` (one buffer's worth) and wait for the Host to hand that
    /// very buffer back, by `deadline`: the console test.
    pub fn write_and_wait(&mut self, bytes: &[u8], deadline: &Deadline) -> Result<Used, Error> {
        if !self.drain(Some(deadline)) {
            return Err(err!("earlier output never came back from the Host"));
        }
        let head = self.send_one(bytes);
        loop {
            if let Some(used) = self.reclaim() {
                if used.head != head {
                    return Err(err!(
                        "sent head {head}, the used ring gave back head {}",
                        used.head
                    ));
                }
                return Ok(used);
            }
            if deadline.passed() {
                return Err(err!("the Host never handed back the buffer (head {head})"));
            }
            idle(Some(deadline), || self.tx.enable_cb());
            self.tx.disable_cb();
        }
    }
}

/// `write!` to the console collects a line and sends it at its newline.
impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &byte in s.as_bytes() {
            self.line[self.line_len] = byte;
            self.line_len += 1;
            if byte == b'\n' || self.line_len == TX_SIZE {
                self.flush_line();
            }
        }
        Ok(())
    }
}
