//! The virtio entropy device: one queue, where we offer an empty buffer and
//! the Host hands it back full of random bytes. The reference Guest has no
//! use for them; the self-tests read it (lguest-guest-tests' io.rs).

use super::pool::Queue;
use super::Device;
use crate::cell::GuestCell;
use crate::console::Error;
use lguest_abi::vring::{F_ANY_LAYOUT, RING_F_EVENT_IDX};

/// Where the Host writes.
static BUFFER: GuestCell<[[u8; 64]; 1]> = GuestCell::new([[0; 64]; 1]);

pub struct Rng {
    pub dev: Device,
    pub queue: Queue,
}

impl Rng {
    pub fn probe(dev: Device) -> Result<Rng, Error> {
        dev.bring_up(1 << F_ANY_LAYOUT | 1 << RING_F_EVENT_IDX, 1, |accepted| {
            let queue = Queue::new(dev.vq(0), accepted, &BUFFER)?;
            Ok(Rng { dev, queue })
        })
    }
}
