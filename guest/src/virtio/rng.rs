//! The virtio entropy device: one queue, where we offer empty buffers and
//! the Host hands them back full of random bytes.

use lguest_abi::VIRTIO_STATUS_DRIVER_OK;

use super::ring::{Buf, Vring};
use super::{bit, idle, Deadline, Device, Error};
use super::{VIRTIO_F_ANY_LAYOUT, VIRTIO_RING_F_EVENT_IDX};
use crate::cell::GuestCell;
use crate::err;

const BUF_SIZE: usize = 64;

/// Where the Host writes. Reached through raw pointers only, as it is the
/// Host's to write while it is in the ring.
static BUFFER: GuestCell<[u8; BUF_SIZE]> = GuestCell::new([0; BUF_SIZE]);

pub struct Rng {
    pub dev: Device,
    pub vq: Vring,
}

impl Rng {
    pub fn probe(dev: Device) -> Result<Rng, Error> {
        let accepted = dev.negotiate(bit(VIRTIO_F_ANY_LAYOUT) | bit(VIRTIO_RING_F_EVENT_IDX));
        let setup = || -> Result<Rng, Error> {
            if dev.num_vq() < 1 {
                return Err(err!("rng device with no queue"));
            }
            let vq = Vring::new(dev.vq(0), accepted & bit(VIRTIO_RING_F_EVENT_IDX) != 0)?;
            dev.driver_ok();
            Ok(Rng { dev, vq })
        };
        setup().inspect_err(|_| dev.fail())
    }

    /// Reset the device and bring it up again, as new.
    pub fn reset(&mut self) -> Result<(), Error> {
        *self = Rng::probe(self.dev)?;
        if self.dev.status() & VIRTIO_STATUS_DRIVER_OK == 0 {
            return Err(err!("status {:#x} after setup", self.dev.status()));
        }
        Ok(())
    }

    /// Fill `out` (up to 64 bytes of it) with what the Host gives, within
    /// 5 seconds: how many bytes it gave.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        let want = out.len().min(BUF_SIZE);
        let addr = BUFFER.as_ptr() as u64;
        self.vq
            .add(&[Buf::writable(addr, want)])
            .map_err(|_| err!("the ring is full"))?;
        self.vq.kick();
        let deadline = Deadline::after_ms(5000);
        let used = loop {
            if let Some(used) = self.vq.get_used() {
                break used;
            }
            if deadline.passed() {
                return Err(err!("no random bytes within 5 s"));
            }
            idle(Some(&deadline), || self.vq.enable_cb());
            self.vq.disable_cb();
        };
        if used.addr != addr {
            return Err(err!(
                "the Host handed back {:#x}, not our buffer",
                used.addr
            ));
        }
        let len = (used.len as usize).min(want);
        for (k, byte) in out[..len].iter_mut().enumerate() {
            // SAFETY: the buffer is back from the Host; in bounds.
            *byte = unsafe { BUFFER.as_ptr().cast::<u8>().add(k).read_volatile() };
        }
        Ok(len)
    }
}
