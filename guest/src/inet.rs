//! Just enough Ethernet, ARP and IPv4 to be seen on a network, whatever card
//! carries it: we answer ARP requests for our address and ICMP echo requests
//! to it (so the Host can `ping` us), and we can ask who has an address, and
//! ping it, ourselves.
//!
//! A card is anything that moves whole Ethernet frames (`Nic`): the virtio
//! one on the lguest bus, or the 2007 model's, which hands frames straight
//! to the other Guests' buffers. Network byte order is big-endian.

use core::fmt::{self, Write};

use crate::console::Error;
use crate::err;
use crate::time::{self, idle, Deadline};

/// The biggest Ethernet frame, without its FCS.
pub const FRAME_MAX: usize = 1514;
/// The smallest, padded.
pub const FRAME_MIN: usize = 60;
pub const BROADCAST: Mac = [0xFF; 6];

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// An ARP packet's fixed start: Ethernet (1) and IPv4 (0x0800), with
/// addresses of 6 and 4 bytes.
const ARP_IPV4: [u8; 6] = [0, 1, 8, 0, 6, 4];
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// The echo requests' identifier: "LG".
const PING_ID: u16 = 0x4c47;
/// Bytes of data after the ICMP header, as `ping` sends.
const PING_DATA: usize = 56;

/// A network card, as the prompt and the tests use it.
pub trait Nic {
    fn mac(&self) -> Mac;
    /// Send one frame (at most FRAME_MAX bytes), padded to FRAME_MIN.
    fn send(&mut self, frame: &[u8]);
    /// The next frame received, copied into `out`: its length, or None.
    fn recv(&mut self, out: &mut [u8; FRAME_MAX]) -> Option<usize>;
    /// Whether frames are waiting (then don't sleep), having asked for an
    /// interrupt when more come. For `idle`.
    fn arm_rx(&mut self) -> bool;
}

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
/// of the 16-bit words. Over data that carries its checksum, it is 0.
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

/// An ARP packet for IPv4 over Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ip,
    pub tha: Mac,
    pub tpa: Ip,
}

impl Arp {
    /// "Who has `tpa`? Tell `spa` at `sha`" (a gratuitous ARP when `tpa`
    /// is our own address).
    pub fn request(sha: Mac, spa: Ip, tpa: Ip) -> Arp {
        let (op, tha) = (ARP_REQUEST, [0; 6]);
        Arp {
            op,
            sha,
            spa,
            tha,
            tpa,
        }
    }

    /// Write the frame carrying this packet (to `dst`, from `sha`) into
    /// `out`; returns its length (FRAME_MIN: ARP frames are padded).
    pub fn write(&self, dst: Mac, out: &mut [u8]) -> usize {
        let frame = &mut out[..FRAME_MIN];
        frame.fill(0);
        eth_header(frame, dst, self.sha, ETHERTYPE_ARP);
        frame[14..20].copy_from_slice(&ARP_IPV4);
        put16(frame, 20, self.op);
        frame[22..28].copy_from_slice(&self.sha);
        frame[28..32].copy_from_slice(&self.spa);
        frame[32..38].copy_from_slice(&self.tha);
        frame[38..42].copy_from_slice(&self.tpa);
        FRAME_MIN
    }

    /// The ARP packet in an Ethernet frame, if that's what it is.
    pub fn parse(frame: &[u8]) -> Option<Arp> {
        if frame.len() < 42 || be16(frame, 12) != ETHERTYPE_ARP || frame[14..20] != ARP_IPV4 {
            return None;
        }
        Some(Arp {
            op: be16(frame, 20),
            sha: frame[22..28].try_into().ok()?,
            spa: frame[28..32].try_into().ok()?,
            tha: frame[32..38].try_into().ok()?,
            tpa: frame[38..42].try_into().ok()?,
        })
    }
}

/// If `frame` is an ARP request for `ip` or an ICMP echo request to it,
/// send the reply. Returns whether it did.
pub fn answer(nic: &mut dyn Nic, frame: &[u8], ip: Ip) -> bool {
    let mut reply = [0u8; FRAME_MAX];
    if let Some(arp) = Arp::parse(frame) {
        if arp.op != ARP_REQUEST || arp.tpa != ip {
            return false;
        }
        let (op, sha, tha, tpa) = (ARP_REPLY, nic.mac(), arp.sha, arp.spa);
        let len = Arp {
            op,
            sha,
            spa: ip,
            tha,
            tpa,
        }
        .write(arp.sha, &mut reply);
        nic.send(&reply[..len]);
        return true;
    }
    let Some(icmp) = icmp_to(frame, ip, ICMP_ECHO_REQUEST) else {
        return false;
    };
    // The same packet back, addresses swapped, type 0.
    let len = 14 + be16(frame, 16) as usize;
    reply[..len].copy_from_slice(&frame[..len]);
    let (src, peer) = (frame[6..12].try_into(), frame[26..30].try_into());
    let (Ok(src), Ok(peer)) = (src, peer) else {
        return false;
    };
    ip_header(&mut reply, nic.mac(), src, ip, peer, len - 14, icmp - 14);
    reply[icmp] = ICMP_ECHO_REPLY;
    put16(&mut reply, icmp + 2, 0);
    let sum = checksum(&reply[icmp..len]);
    put16(&mut reply, icmp + 2, sum);
    nic.send(&reply[..len]);
    true
}

/// If `frame` is an unfragmented IPv4 packet to `ip` holding an ICMP
/// message of type `kind` whose checksum holds, where the message starts.
fn icmp_to(frame: &[u8], ip: Ip, kind: u8) -> Option<usize> {
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
    let icmp = 14 + ihl;
    (frame[icmp] == kind && checksum(&frame[icmp..14 + total]) == 0).then_some(icmp)
}

/// The Ethernet and IPv4 headers of an ICMP packet of `ip_len` bytes (its
/// header `ihl` of them, options kept as they are), with a fresh TTL and
/// checksum.
fn ip_header(out: &mut [u8], src: Mac, dst: Mac, from: Ip, to: Ip, ip_len: usize, ihl: usize) {
    eth_header(out, dst, src, ETHERTYPE_IPV4);
    out[14] = 0x40 | (ihl / 4) as u8;
    put16(out, 16, ip_len as u16);
    out[22] = 64;
    out[23] = IPPROTO_ICMP;
    out[26..30].copy_from_slice(&from);
    out[30..34].copy_from_slice(&to);
    put16(out, 24, 0);
    let sum = checksum(&out[14..14 + ihl]);
    put16(out, 24, sum);
}

/// Send `frame`, then for a second take what comes, answering whatever is
/// asked of us meanwhile, until `reply` finds the frame we wait for: what
/// it made of it, or None when the second is up.
fn exchange<T>(
    nic: &mut dyn Nic,
    ip: Ip,
    frame: &[u8],
    mut reply: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    nic.send(frame);
    let deadline = Deadline::after_ms(1000);
    let mut got = [0u8; FRAME_MAX];
    while !deadline.passed() {
        while let Some(len) = nic.recv(&mut got) {
            match reply(&got[..len]) {
                Some(found) => return Some(found),
                None => answer(nic, &got[..len], ip),
            };
        }
        idle(Some(&deadline), || nic.arm_rx());
    }
    None
}

/// Ask who has `peer`, once a second, `tries` times: its MAC.
pub fn resolve(nic: &mut dyn Nic, ip: Ip, peer: Ip, tries: u32) -> Option<Mac> {
    let mut request = [0u8; FRAME_MIN];
    Arp::request(nic.mac(), ip, peer).write(BROADCAST, &mut request);
    (0..tries).find_map(|_| {
        exchange(nic, ip, &request, |frame| match Arp::parse(frame) {
            Some(arp) if arp.op == ARP_REPLY && arp.spa == peer && arp.tpa == ip => Some(arp.sha),
            _ => None,
        })
    })
}

/// Ping `peer` from `ip`: ARP first, then `count` echo requests, each sent
/// when the last was answered or a second passed. Says how each went on
/// `out`, as `ping` does; returns how many replies came back.
pub fn ping(
    nic: &mut dyn Nic,
    ip: Ip,
    peer: Ip,
    count: u16,
    out: &mut dyn Write,
) -> Result<u16, Error> {
    let mac = resolve(nic, ip, peer, 3)
        .ok_or_else(|| err!("no ARP reply from {} within 3 s", ShowIp(peer)))?;
    let (peer_ip, mac_addr) = (ShowIp(peer), ShowMac(mac));
    let _ = writeln!(
        out,
        "PING {peer_ip} ({mac_addr}) from {}: {PING_DATA} data bytes",
        ShowIp(ip)
    );
    let (mut received, mut request) = (0, [0u8; 14 + 20 + 8 + PING_DATA]);
    for seq in 1..=count {
        echo_request(&mut request, nic.mac(), mac, ip, peer, seq);
        let start = time::rdtsc();
        let replied = exchange(nic, ip, &request, |reply| {
            let icmp = icmp_to(reply, ip, ICMP_ECHO_REPLY)?;
            let ours = reply[26..30] == peer
                && be16(reply, icmp + 4) == PING_ID
                && be16(reply, icmp + 6) == seq;
            ours.then(|| (be16(reply, 16) - 20, reply[22]))
        });
        if let Some((bytes, ttl)) = replied {
            let us = (time::rdtsc() - start) * 1000 / time::tsc_khz();
            let (ms, frac) = (us / 1000, us % 1000);
            let _ = writeln!(
                out,
                "{bytes} bytes from {peer_ip}: icmp_seq={seq} ttl={ttl} time={ms}.{frac:03} ms"
            );
            received += 1;
        }
    }
    let _ = writeln!(
        out,
        "--- {peer_ip} ping statistics: {count} packets transmitted, {received} received"
    );
    Ok(received)
}

/// An echo request with sequence number `seq`, filling `out`.
fn echo_request(out: &mut [u8], src: Mac, dst: Mac, from: Ip, to: Ip, seq: u16) {
    let (len, icmp) = (out.len(), 14 + 20);
    ip_header(out, src, dst, from, to, len - 14, 20);
    out[icmp] = ICMP_ECHO_REQUEST;
    put16(out, icmp + 2, 0);
    put16(out, icmp + 4, PING_ID);
    put16(out, icmp + 6, seq);
    for (i, byte) in out[icmp + 8..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let sum = checksum(&out[icmp..]);
    put16(out, icmp + 2, sum);
}

/// `A.B.C.D`.
pub fn parse_ip(text: &str) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut ip {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

pub struct ShowIp(pub Ip);

impl fmt::Display for ShowIp {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

pub struct ShowMac(pub Mac);

impl fmt::Display for ShowMac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}
