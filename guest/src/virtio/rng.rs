//! The virtio entropy device: one queue, where we offer an empty buffer and
//! the Host hands it back full of random bytes.

use super::pool::Queue;
use super::Device;
use crate::cell::GuestCell;
use crate::console::Error;
use crate::err;
use crate::time::Deadline;
use lguest_abi::vring::{F_ANY_LAYOUT, RING_F_EVENT_IDX};

/// Where the Host writes.
static BUFFER: GuestCell<[[u8; 64]; 1]> = GuestCell::new([[0; 64]; 1]);

pub struct Rng {
    pub dev: Device,
    pub queue: Queue,
    /// Whether our buffer is in the Host's hands (a read gave up on it).
    offered: bool,
}

impl Rng {
    pub fn probe(dev: Device) -> Result<Rng, Error> {
        dev.bring_up(1 << F_ANY_LAYOUT | 1 << RING_F_EVENT_IDX, 1, |accepted| {
            let event_idx = accepted & 1 << RING_F_EVENT_IDX != 0;
            let queue = Queue::new(dev.vq(0), event_idx, &BUFFER)?;
            let offered = false;
            Ok(Rng {
                dev,
                queue,
                offered,
            })
        })
    }

    /// Fill `out` (up to 64 bytes of it) with what the Host gives, within
    /// 5 seconds: how many bytes it gave.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        if !self.offered {
            self.queue.offer(0);
            self.queue.vq.kick();
            self.offered = true;
        }
        let deadline = Deadline::after_ms(5000);
        let (i, len) = loop {
            if let Some(got) = self.queue.received() {
                break got;
            }
            if deadline.passed() {
                return Err(err!("no random bytes within 5 s"));
            }
            self.queue.vq.sleep(Some(&deadline));
        };
        self.offered = false;
        let len = len.min(out.len());
        self.queue.read(i, 0, &mut out[..len]);
        Ok(len)
    }
}
