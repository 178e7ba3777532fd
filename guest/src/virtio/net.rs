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

use super::ring::{Buf, Vring};
use super::{bit, idle, Device, Error};
use super::{VIRTIO_F_ANY_LAYOUT, VIRTIO_RING_F_EVENT_IDX};
use crate::cell::GuestCell;
use crate::err;
pub use lguest_guest::arp::{parse_ip, Arp, ShowIp, ShowMac, ARP_REPLY, ARP_REQUEST};

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
const RX_BUFS: usize = 16;
const TX_BUFS: usize = 16;

/// Our MAC when the Host offers none: locally administered, "lg".
const DEFAULT_MAC: Mac = [0x02, 0x6c, 0x67, 0, 0, 1];

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

#[repr(C, align(64))]
struct Buffers {
    rx: [[u8; BUF_SIZE]; RX_BUFS],
    tx: [[u8; BUF_SIZE]; TX_BUFS],
}

static BUFFERS: GuestCell<Buffers> = GuestCell::new(Buffers {
    rx: [[0; BUF_SIZE]; RX_BUFS],
    tx: [[0; BUF_SIZE]; TX_BUFS],
});

fn rx_ptr(i: usize) -> *mut u8 {
    assert!(i < RX_BUFS);
    // SAFETY: in bounds of BUFFERS.
    unsafe { BUFFERS.as_ptr().cast::<u8>().add(i * BUF_SIZE) }
}

fn tx_ptr(i: usize) -> *mut u8 {
    assert!(i < TX_BUFS);
    // SAFETY: in bounds of BUFFERS.
    unsafe { BUFFERS.as_ptr().cast::<u8>().add((RX_BUFS + i) * BUF_SIZE) }
}

fn rx_addr(i: usize) -> u64 {
    rx_ptr(i) as u64
}

fn tx_addr(i: usize) -> u64 {
    tx_ptr(i) as u64
}

/// Which of `count` buffers at `base` starts at `addr`, if any.
fn buffer_index(addr: u64, base: u64, count: usize) -> Option<usize> {
    let offset = addr.wrapping_sub(base);
    let i = (offset / BUF_SIZE as u64) as usize;
    (offset.is_multiple_of(BUF_SIZE as u64) && i < count).then_some(i)
}

/// Copy `bytes` into transmit buffer `i` at `offset`.
fn fill(i: usize, offset: usize, bytes: &[u8]) {
    assert!(offset + bytes.len() <= BUF_SIZE);
    for (k, &byte) in bytes.iter().enumerate() {
        // SAFETY: in bounds (checked); callers only fill a buffer that isn't
        // in the ring.
        unsafe { tx_ptr(i).add(offset + k).write_volatile(byte) };
    }
}

pub struct Net {
    pub rx: Vring,
    pub tx: Vring,
    pub mac: Mac,
    /// Bit i set: tx buffer i is ours to fill.
    tx_free: u32,
}

const ALL_TX_FREE: u32 = (1 << TX_BUFS) - 1;

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
                rx: Vring::new(dev.vq(0), event_idx)?,
                tx: Vring::new(dev.vq(1), event_idx)?,
                mac,
                tx_free: 0,
            };
            // No more buffers out at once than the ring has descriptors.
            net.tx_free = ALL_TX_FREE >> TX_BUFS.saturating_sub(net.tx.num() as usize);
            for i in 0..RX_BUFS.min(net.rx.num() as usize) {
                net.offer_rx(i);
            }
            dev.driver_ok();
            net.rx.kick();
            Ok(net)
        };
        setup().inspect_err(|_| dev.fail())
    }

    fn offer_rx(&mut self, i: usize) {
        self.rx
            .add(&[Buf::writable(rx_addr(i), BUF_SIZE)])
            .expect("a ring has room for all our receive buffers");
    }

    /// The next frame received, copied into `out` (header stripped): its
    /// length, or None if nothing is waiting.
    pub fn recv(&mut self, out: &mut [u8; FRAME_MAX]) -> Option<usize> {
        let used = self.rx.get_used()?;
        let Some(i) = buffer_index(used.addr, rx_addr(0), RX_BUFS) else {
            panic!(
                "virtio net: the Host handed back a receive buffer at {:#x} that isn't ours",
                used.addr
            );
        };
        let len = (used.len as usize).clamp(NET_HDR, NET_HDR + FRAME_MAX) - NET_HDR;
        for (k, byte) in out[..len].iter_mut().enumerate() {
            // SAFETY: the buffer is back from the Host; in bounds (clamped).
            *byte = unsafe { rx_ptr(i).add(NET_HDR + k).read_volatile() };
        }
        self.offer_rx(i);
        self.rx.kick();
        Some(len)
    }

    /// Whether frames are waiting (then don't sleep), having asked for an
    /// interrupt when more come. For `idle`.
    pub fn arm_rx(&mut self) -> bool {
        self.rx.enable_cb()
    }

    fn reclaim(&mut self) {
        while let Some(used) = self.tx.get_used() {
            // Frames sent by `blast` aren't from the pool: nothing to free.
            if let Some(i) = buffer_index(used.addr, tx_addr(0), TX_BUFS) {
                self.tx_free |= 1 << i;
            }
        }
    }

    /// Send one frame (at most FRAME_MAX bytes), waiting for a free buffer
    /// if the Host still holds them all.
    pub fn send(&mut self, frame: &[u8]) {
        assert!(frame.len() <= FRAME_MAX);
        let i = loop {
            self.reclaim();
            if self.tx_free != 0 {
                break self.tx_free.trailing_zeros() as usize;
            }
            idle(None, || self.tx.enable_cb());
            self.tx.disable_cb();
        };
        self.tx_free &= !(1 << i);
        fill(i, 0, &[0; NET_HDR]);
        fill(i, NET_HDR, frame);
        // Ethernet pads short frames; the tap would take them as they are,
        // but the Host's kernel expects at least the minimum.
        let len = frame.len().max(FRAME_MIN);
        if len > frame.len() {
            fill(
                i,
                NET_HDR + frame.len(),
                &[0; FRAME_MIN][..len - frame.len()],
            );
        }
        self.tx
            .add(&[Buf::readable(tx_addr(i), NET_HDR + len)])
            .expect("a free buffer means a free descriptor");
        self.tx.kick();
    }

    /// The benchmark: send the frame at `addr` (header included, `len`
    /// bytes, which the Host only reads) `count` times, as fast as the ring
    /// takes them, and wait until the Host has sent them all. Interrupts
    /// only when the ring is full, and then only after most of it is back.
    pub fn blast(&mut self, addr: u64, len: usize, count: u64) {
        let mut sent = 0;
        while sent < count {
            self.reclaim();
            while sent < count && self.tx.add(&[Buf::readable(addr, len)]).is_ok() {
                sent += 1;
            }
            self.tx.kick();
            if sent < count && self.tx.num_free() == 0 {
                idle(None, || self.tx.enable_cb_delayed());
                self.tx.disable_cb();
            }
        }
        while self.tx.in_flight() > 0 {
            self.reclaim();
            if self.tx.in_flight() > 0 {
                idle(None, || self.tx.enable_cb_delayed());
                self.tx.disable_cb();
            }
        }
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
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, value: u16) {
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn eth_header(out: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    put16(out, 12, ethertype);
}

/// The Internet checksum: the ones' complement of the ones' complement sum
/// of the 16-bit words.
fn checksum(data: &[u8]) -> u16 {
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

/// The benchmark's frame: the Host only ever reads it, so every descriptor
/// of a burst can point at this one.
static BENCH_FRAME: GuestCell<[u8; BUF_SIZE]> = GuestCell::new([0; BUF_SIZE]);

/// Build a full-sized broadcast UDP datagram to the discard port, from `ip`,
/// behind NET_HDR zero bytes: its address and length, for `blast`.
pub fn bench_frame(mac: Mac, ip: Ip) -> (u64, usize) {
    // SAFETY: no ring holds the frame now (blast waits until the Host has
    // handed every copy back), so this is the only reference to it.
    let out = unsafe { &mut *BENCH_FRAME.as_ptr() };
    let len = NET_HDR + FRAME_MAX;
    out.fill(0);
    let f = &mut out[NET_HDR..len];
    eth_header(f, ETH_BROADCAST, mac, ETHERTYPE_IPV4);
    let ip_len = FRAME_MAX - 14;
    {
        let h = &mut f[14..34];
        h[0] = 0x45;
        put16(h, 2, ip_len as u16);
        h[8] = 64;
        h[9] = IPPROTO_UDP;
        h[12..16].copy_from_slice(&ip);
        h[16..20].copy_from_slice(&[255; 4]);
        let sum = checksum(h);
        put16(h, 10, sum);
    }
    // UDP from and to port 9 (discard); checksum 0 means none.
    put16(f, 34, 9);
    put16(f, 36, 9);
    put16(f, 38, (ip_len - 20) as u16);
    for (i, byte) in f[42..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    (BENCH_FRAME.as_ptr() as u64, len)
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
