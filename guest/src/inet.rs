//! Just enough IPv4 to be seen on a network, whatever card carries it: we
//! answer ARP requests for our address and ICMP echo requests to it (so the
//! Host can `ping` us), and we can ping someone ourselves.
//!
//! A card is anything that moves whole Ethernet frames (`Nic`): the virtio
//! one on the lguest bus, or the 2007 model's, which hands frames straight
//! to the other Guests' buffers. Network byte order is big-endian.

use core::fmt::Write;

pub use crate::arp::{parse_ip, Arp, ShowIp, ShowMac, ARP_REPLY, ARP_REQUEST, BROADCAST};
use crate::console::Error;
use crate::err;
use crate::time::{self, idle, Deadline};

/// The biggest Ethernet frame, without its FCS.
pub const FRAME_MAX: usize = 1514;
/// The smallest, padded.
pub const FRAME_MIN: usize = 60;

pub type Mac = [u8; 6];
pub type Ip = [u8; 4];

pub const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

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

/// If `frame` is an ARP request for `ip` or an ICMP echo request to it,
/// send the reply. Returns whether it did.
pub fn answer(nic: &mut dyn Nic, frame: &[u8], ip: Ip) -> bool {
    let mut reply = [0u8; FRAME_MAX];
    if let Some(arp) = Arp::parse(frame) {
        if arp.op == ARP_REQUEST && arp.tpa == ip {
            let answer = Arp {
                op: ARP_REPLY,
                sha: nic.mac(),
                spa: ip,
                tha: arp.sha,
                tpa: arp.spa,
            };
            let len = answer.write(arp.sha, &mut reply);
            nic.send(&reply[..len]);
            return true;
        }
        return false;
    }
    let Some(icmp) = icmp_to(frame, ip, ICMP_ECHO_REQUEST) else {
        return false;
    };
    // The same packet back, addresses swapped, type 0.
    let len = 14 + be16(frame, 16) as usize;
    reply[..len].copy_from_slice(&frame[..len]);
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    let mut peer = [0u8; 4];
    peer.copy_from_slice(&frame[26..30]);
    let ihl = icmp - 14;
    ip_header(&mut reply, nic.mac(), src, ip, peer, len - 14, ihl);
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

/// Ask who has `peer`, once a second, `tries` times, answering whatever
/// is asked of us meanwhile: its MAC.
pub fn resolve(nic: &mut dyn Nic, ip: Ip, peer: Ip, tries: u32) -> Option<Mac> {
    let mut request = [0u8; FRAME_MAX];
    let len = Arp::request(nic.mac(), ip, peer).write(BROADCAST, &mut request);
    let mut frame = [0u8; FRAME_MAX];
    for _ in 0..tries {
        nic.send(&request[..len]);
        let deadline = Deadline::after_ms(1000);
        while !deadline.passed() {
            while let Some(got) = nic.recv(&mut frame) {
                match Arp::parse(&frame[..got]) {
                    Some(arp) if arp.op == ARP_REPLY && arp.spa == peer && arp.tpa == ip => {
                        return Some(arp.sha);
                    }
                    _ => answer(nic, &frame[..got], ip),
                };
            }
            idle(Some(&deadline), || nic.arm_rx());
        }
    }
    None
}

/// The echo requests' identifier: "LG".
const PING_ID: u16 = 0x4c47;
/// Bytes of data after the ICMP header, as `ping` sends.
const PING_DATA: usize = 56;

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
    let _ = writeln!(
        out,
        "PING {} ({}) from {}: {PING_DATA} data bytes",
        ShowIp(peer),
        ShowMac(mac),
        ShowIp(ip)
    );
    let (mut received, mut frame) = (0, [0u8; FRAME_MAX]);
    for seq in 1..=count {
        let len = echo_request(&mut frame, nic.mac(), mac, ip, peer, seq);
        let start = time::rdtsc();
        nic.send(&frame[..len]);
        let deadline = Deadline::after_ms(1000);
        'wait: while !deadline.passed() {
            while let Some(got) = nic.recv(&mut frame) {
                let reply = &frame[..got];
                let ours = icmp_to(reply, ip, ICMP_ECHO_REPLY).filter(|&icmp| {
                    reply[26..30] == peer
                        && be16(reply, icmp + 4) == PING_ID
                        && be16(reply, icmp + 6) == seq
                });
                if ours.is_none() {
                    answer(nic, reply, ip);
                    continue;
                }
                let us = (time::rdtsc() - start) * 1000 / time::tsc_khz();
                let _ = writeln!(
                    out,
                    "{} bytes from {}: icmp_seq={seq} ttl={} time={}.{:03} ms",
                    be16(reply, 16) - 20,
                    ShowIp(peer),
                    reply[22],
                    us / 1000,
                    us % 1000
                );
                received += 1;
                break 'wait;
            }
            idle(Some(&deadline), || nic.arm_rx());
        }
    }
    let _ = writeln!(
        out,
        "--- {} ping statistics: {count} packets transmitted, {received} received",
        ShowIp(peer)
    );
    Ok(received)
}

/// An echo request with sequence number `seq` into `out`: its length.
fn echo_request(out: &mut [u8], src: Mac, dst: Mac, from: Ip, to: Ip, seq: u16) -> usize {
    let len = 14 + 20 + 8 + PING_DATA;
    out[..len].fill(0);
    ip_header(out, src, dst, from, to, len - 14, 20);
    let icmp = 14 + 20;
    out[icmp] = ICMP_ECHO_REQUEST;
    put16(out, icmp + 4, PING_ID);
    put16(out, icmp + 6, seq);
    for (i, byte) in out[icmp + 8..len].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let sum = checksum(&out[icmp..len]);
    put16(out, icmp + 2, sum);
    len
}
