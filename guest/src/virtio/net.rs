//! The virtio network device: queue 0 receives, queue 1 transmits.
//!
//! Every frame, both ways, is prefixed by the 10-byte legacy virtio_net_hdr.
//! We offer no checksum or segmentation offloads, so ours is all zeros and
//! we ignore the Host's. With ANY_LAYOUT the header and frame share one
//! buffer.
//!
//! What goes over it, ARP and ping, is `inet`'s.

use core::fmt::{self, Write};

use super::pool::Queue;
use super::Device;
use crate::cell::GuestCell;
use crate::console::Error;
use crate::err;
use crate::inet::{Mac, Nic, ShowMac, FRAME_MAX, FRAME_MIN};
use lguest_abi::vring::{F_ANY_LAYOUT, RING_F_EVENT_IDX};

/// The net feature we take: the config holds our MAC address.
pub const VIRTIO_NET_F_MAC: u32 = 5;

/// struct virtio_net_hdr, legacy, no mergeable buffers.
pub const NET_HDR: usize = 10;

const BUF_SIZE: usize = 1536;
const _: () = assert!(BUF_SIZE >= NET_HDR + FRAME_MAX);

/// The frames the Host writes into and reads from.
static RX_MEM: GuestCell<[[u8; BUF_SIZE]; 16]> = GuestCell::new([[0; BUF_SIZE]; 16]);
static TX_MEM: GuestCell<[[u8; BUF_SIZE]; 16]> = GuestCell::new([[0; BUF_SIZE]; 16]);

/// Our MAC when the Host offers none: locally administered, "lg".
const DEFAULT_MAC: Mac = [0x02, 0x6c, 0x67, 0, 0, 1];

pub struct Net {
    pub rx: Queue,
    pub tx: Queue,
    pub mac: Mac,
}

impl Net {
    pub fn probe(dev: Device) -> Result<Net, Error> {
        let support = 1 << VIRTIO_NET_F_MAC | 1 << F_ANY_LAYOUT | 1 << RING_F_EVENT_IDX;
        let mut net = dev.bring_up(support, 2, |accepted| {
            if accepted & 1 << F_ANY_LAYOUT == 0 {
                // Then the header would need a descriptor of its own.
                return Err(err!("the Host doesn't offer ANY_LAYOUT"));
            }
            let mac = match accepted & 1 << VIRTIO_NET_F_MAC {
                0 => DEFAULT_MAC,
                _ => config_mac(&dev).ok_or_else(|| err!("no MAC in the config"))?,
            };
            let mut net = Net {
                rx: Queue::new(dev.vq(0), accepted, &RX_MEM)?,
                tx: Queue::new(dev.vq(1), accepted, &TX_MEM)?,
                mac,
            };
            net.rx.offer_all();
            Ok(net)
        })?;
        net.rx.vq.kick();
        Ok(net)
    }
}

/// The MAC in the config, if it is that long.
fn config_mac(dev: &Device) -> Option<Mac> {
    dev.config(0, 6)?.to_le_bytes()[..6].try_into().ok()
}

impl Nic for Net {
    fn mac(&self) -> Mac {
        self.mac
    }

    /// Copies the frame without its header; gives the buffer straight back.
    fn recv(&mut self, out: &mut [u8; FRAME_MAX]) -> Option<usize> {
        let (i, len) = self.rx.received()?;
        let len = len.clamp(NET_HDR, NET_HDR + FRAME_MAX) - NET_HDR;
        self.rx.read(i, NET_HDR, &mut out[..len]);
        self.rx.offer(i);
        self.rx.vq.kick();
        Some(len)
    }

    fn arm_rx(&mut self) -> bool {
        self.rx.vq.enable_cb()
    }

    /// Waits for a free buffer if the Host still holds them all. Ethernet
    /// pads short frames; the tap would take them as they are, but the
    /// Host's kernel expects at least the minimum.
    fn send(&mut self, frame: &[u8]) {
        assert!(frame.len() <= FRAME_MAX);
        let mut buf = [0; NET_HDR + FRAME_MAX];
        buf[NET_HDR..][..frame.len()].copy_from_slice(frame);
        self.tx.send(&buf[..NET_HDR + frame.len().max(FRAME_MIN)]);
    }
}

/// The config, for listings.
pub fn describe_config(out: &mut dyn Write, dev: &Device) -> fmt::Result {
    match dev.host_features() & 1 << VIRTIO_NET_F_MAC {
        0 => Ok(()),
        _ => write!(out, "; mac {}", ShowMac(config_mac(dev).unwrap_or([0; 6]))),
    }
}
