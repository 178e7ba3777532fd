//! The virtio network device: queue 0 receives, queue 1 transmits.
//!
//! Every frame, both ways, is prefixed by the 10-byte legacy virtio_net_hdr.
//! We offer no checksum or segmentation offloads, so ours is all zeros and
//! we ignore the Host's. With ANY_LAYOUT the header and frame share one
//! buffer.
//!
//! On top sits just enough of a network stack to be seen: we answer ARP
//! requests for our address and ICMP echo requests to it, so the Host can
//! `ping` us, and we can ask the Host's tap, by ARP, who it is.

use core::fmt::{self, Write};

use super::pool::Queue;
use super::{bit, Device, Error};
use super::{VIRTIO_F_ANY_LAYOUT, VIRTIO_RING_F_EVENT_IDX};
pub use crate::arp::{parse_ip, Arp, ShowIp, ShowMac, ARP_REPLY, ARP_REQUEST};
use crate::cell::GuestCell;
use crate::err;

/// The net feature we take: the config holds our MAC address.
pub const VIRTIO_NET_F_MAC: u32 = 5;

/// struct virtio_net_hdr, legacy, no mergeable buffers.
pub const NET_HDR: usize = 10;
/// The biggest Ethernet frame, without its FCS.
pub const FRAME_MAX: usize = 1514;
/// The smallest, padded.
pub const FRAME_MIN: usize = 60;

const BUF_SIZE: usize = 1536;
const _: () = assert!(BUF_SIZE >= NET_HDR + FRAME_MAX);

/// The frames the Host writes into and reads from.
static RX_MEM: GuestCell<[[u8; BUF_SIZE]; 16]> = GuestCell::new([[0; BUF_SIZE]; 16]);
static TX_MEM: GuestCell<[[u8; BUF_SIZE]; 16]> = GuestCell::new([[0; BUF_SIZE]; 16]);

/// Our MAC when the Host offers none: locally administered, "lg".
const DEFAULT_MAC: Mac = [0x02, 0x6c, 0x67, 0, 0, 1];

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

pub struct Net {
    pub rx: Queue,
    pub tx: Queue,
    pub mac: Mac,
}

impl Net {
    pub fn probe(dev: Device) -> Result<Net, Error> {
        let accepted = dev.negotiate(
            bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_F_ANY_LAYOUT) | bit(VIRTIO_RING_F_EVENT_IDX),
        );
        let setup = || -> Result<Net, Error> {
            if dev.num_vq() < 2 {
                return Err(err!("net device with {} queues, not 2", dev.num_vq()));
            }
            if accepted & bit(VIRTIO_F_ANY_LAYOUT) == 0 {
                // Then the header would need a descriptor of its own.
                return Err(err!("the Host doesn't offer ANY_LAYOUT"));
            }
            let mut mac = DEFAULT_MAC;
            if accepted & bit(VIRTIO_NET_F_MAC) != 0 {
                for (i, byte) in mac.iter_mut().enumerate() {
                    *byte = dev
                        .config(i, 1)
                        .ok_or_else(|| err!("no MAC in the config"))?
                        as u8;
                }
            }
            let event_idx = accepted & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
            let mut net = Net {
                rx: Queue::new(dev.vq(0), event_idx, &RX_MEM)?,
                tx: Queue::new(dev.vq(1), event_idx, &TX_MEM)?,
                mac,
            };
            net.rx.offer_all();
            dev.driver_ok();
            net.rx.vq.kick();
            Ok(net)
        };
        setup().inspect_err(|_| dev.fail())
    }

    /// The next frame received, copied into `out` (header stripped): its
    /// length, or None if nothing is waiting.
    pub fn recv(&mut self, out: &mut [u8; FRAME_MAX]) -> Option<usize> {
        let (i, len) = self.rx.received()?;
        let len = len.clamp(NET_HDR, NET_HDR + FRAME_MAX) - NET_HDR;
        self.rx.read(i, NET_HDR, &mut out[..len]);
        self.rx.offer(i);
        self.rx.vq.kick();
        Some(len)
    }

    /// Whether frames are waiting (then don't sleep), having asked for an
    /// interrupt when more come. For `idle`.
    pub fn arm_rx(&mut self) -> bool {
        self.rx.vq.enable_cb()
    }

    /// Send one frame (at most FRAME_MAX bytes), waiting for a free buffer
    /// if the Host still holds them all.
    pub fn send(&mut self, frame: &[u8]) {
        assert!(frame.len() <= FRAME_MAX);
        let i = self.tx.take();
        self.tx.write(i, 0, &[0; NET_HDR]);
        self.tx.write(i, NET_HDR, frame);
        // Ethernet pads short frames; the tap would take them as they are,
        // but the Host's kernel expects at least the minimum.
        let len = frame.len().max(FRAME_MIN);
        self.tx.write(
            i,
            NET_HDR + frame.len(),
            &[0; FRAME_MIN][..len - frame.len()],
        );
        self.tx.send(i, NET_HDR + len);
    }

    /// If `frame` is an ARP request for `ip` or an ICMP echo request to it,
    /// send the reply. Returns whether it did.
    pub fn answer(&mut self, frame: &[u8], ip: Ip) -> bool {
        let mut reply = [0u8; FRAME_MAX];
        if let Some(arp) = Arp::parse(frame) {
            if arp.op == ARP_REQUEST && arp.tpa == ip {
                let answer = Arp {
                    op: ARP_REPLY,
                    sha: self.mac,
                    spa: ip,
                    tha: arp.sha,
                    tpa: arp.spa,
                };
                let len = answer.write(arp.sha, &mut reply);
                self.send(&reply[..len]);
                return true;
            }
            return false;
        }
        match echo_reply(frame, ip, self.mac, &mut reply) {
            Some(len) => {
                self.send(&reply[..len]);
                true
            }
            None => false,
        }
    }
}

/*
 * Packets. Network byte order is big-endian.
 */

pub const ETH_BROADCAST: Mac = [0xFF; 6];
pub const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn put16(b: &mut [u8], at: usize, value: u16) {
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

pub fn eth_header(out: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    put16(out, 12, ethertype);
}

/// The Internet checksum: the ones' complement of the ones' complement sum
/// of the 16-bit words.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// If `frame` is an ICMP echo request to `ip`, build the echo reply in `out`
/// and return its length: the same packet, addresses swapped, type 0.
fn echo_reply(frame: &[u8], ip: Ip, mac: Mac, out: &mut [u8; FRAME_MAX]) -> Option<usize> {
    if frame.len() < 14 + 20 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ihl = (frame[14] & 0xF) as usize * 4;
    let total = be16(frame, 16) as usize;
    let fragment = be16(frame, 20) & 0x3FFF;
    if frame[14] >> 4 != 4 || ihl < 20 || total < ihl + 8 || 14 + total > frame.len() {
        return None;
    }
    if frame[23] != IPPROTO_ICMP || frame[30..34] != ip || fragment != 0 {
        return None;
    }
    if frame[14 + ihl] != ICMP_ECHO_REQUEST {
        return None;
    }
    let len = 14 + total;
    out[..len].copy_from_slice(&frame[..len]);
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    eth_header(out, src, mac, ETHERTYPE_IPV4);
    // IP: back to whoever asked, from us, with a fresh TTL and checksum.
    out[26..30].copy_from_slice(&frame[30..34]);
    out[30..34].copy_from_slice(&frame[26..30]);
    out[22] = 64;
    put16(out, 24, 0);
    let sum = checksum(&out[14..14 + ihl]);
    put16(out, 24, sum);
    // ICMP: type 0, same id, sequence and data.
    let icmp = 14 + ihl;
    out[icmp] = ICMP_ECHO_REPLY;
    put16(out, icmp + 2, 0);
    let sum = checksum(&out[icmp..len]);
    put16(out, icmp + 2, sum);
    Some(len)
}

/// The config, for listings.
pub fn describe_config(out: &mut impl Write, dev: &Device) -> fmt::Result {
    if dev.host_features() & bit(VIRTIO_NET_F_MAC) != 0 {
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = dev.config(i, 1).unwrap_or(0) as u8;
        }
        write!(out, "; mac {}", ShowMac(mac))?;
    }
    Ok(())
}
