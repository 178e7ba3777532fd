//! Just enough Ethernet and ARP for both Guests' networking: ask who has the
//! Host's address, read the answer, and answer whoever asks for ours; and the
//! address parsing and printing around it.

use core::fmt;

pub const ETH_HEADER: usize = 14;
pub const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_BYTES: usize = 28;
/// The shortest Ethernet frame without its FCS; shorter ones get padded.
pub const ETH_MIN: usize = 60;
pub const BROADCAST: [u8; 6] = [0xFF; 6];

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// An ARP packet for IPv4 over Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

impl Arp {
    /// "Who has `tpa`? Tell `spa` at `sha`" (a gratuitous ARP when `tpa`
    /// is our own address).
    pub fn request(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Arp {
        Arp {
            op: ARP_REQUEST,
            sha,
            spa,
            tha: [0; 6],
            tpa,
        }
    }

    /// Write the frame carrying this packet (to `dst`, from `sha`) into
    /// `out`; returns its length (ETH_MIN: ARP frames are padded).
    pub fn write(&self, dst: [u8; 6], out: &mut [u8]) -> usize {
        let frame = &mut out[..ETH_MIN];
        frame.fill(0);
        frame[0..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&self.sha);
        frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        let arp = &mut frame[ETH_HEADER..ETH_HEADER + ARP_BYTES];
        arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        arp[4] = 6;
        arp[5] = 4;
        arp[6..8].copy_from_slice(&self.op.to_be_bytes());
        arp[8..14].copy_from_slice(&self.sha);
        arp[14..18].copy_from_slice(&self.spa);
        arp[18..24].copy_from_slice(&self.tha);
        arp[24..28].copy_from_slice(&self.tpa);
        ETH_MIN
    }

    /// The ARP packet in an Ethernet frame, if that's what it is.
    pub fn parse(frame: &[u8]) -> Option<Arp> {
        if frame.len() < ETH_HEADER + ARP_BYTES || be16(&frame[12..]) != ETHERTYPE_ARP {
            return None;
        }
        let arp = &frame[ETH_HEADER..];
        if be16(&arp[0..]) != 1 || be16(&arp[2..]) != 0x0800 || arp[4] != 6 || arp[5] != 4 {
            return None;
        }
        let mut packet = Arp {
            op: be16(&arp[6..]),
            sha: [0; 6],
            spa: [0; 4],
            tha: [0; 6],
            tpa: [0; 4],
        };
        packet.sha.copy_from_slice(&arp[8..14]);
        packet.spa.copy_from_slice(&arp[14..18]);
        packet.tha.copy_from_slice(&arp[18..24]);
        packet.tpa.copy_from_slice(&arp[24..28]);
        Some(packet)
    }
}

/// `A.B.C.D`.
pub fn parse_ip(text: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut ip {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// Our address and the Host's for a net test, from the command line's `ip=`
/// and `hostip=` (by default `ip=`'s network with last byte 1).
pub fn test_addresses<'a>(
    ip: Option<&str>,
    hostip: Option<&'a str>,
) -> Result<([u8; 4], [u8; 4]), AddressError<'a>> {
    let ip = ip.and_then(parse_ip).ok_or(AddressError::NoIp)?;
    let host_ip = match hostip {
        Some(text) => parse_ip(text).ok_or(AddressError::BadHostIp(text))?,
        None => [ip[0], ip[1], ip[2], 1],
    };
    if host_ip == ip {
        return Err(AddressError::Same(ip));
    }
    Ok((ip, host_ip))
}

/// What is wrong with the addresses a net test was given.
pub enum AddressError<'a> {
    NoIp,
    BadHostIp(&'a str),
    Same([u8; 4]),
}

impl fmt::Display for AddressError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            AddressError::NoIp => write!(f, "needs our address: ip=A.B.C.D on the command line"),
            AddressError::BadHostIp(text) => write!(f, "hostip={text} is not an IPv4 address"),
            AddressError::Same(ip) => {
                write!(f, "our address and the Host's are both {}", ShowIp(*ip))
            }
        }
    }
}

pub struct ShowIp(pub [u8; 4]);

impl fmt::Display for ShowIp {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

pub struct ShowMac(pub [u8; 6]);

impl fmt::Display for ShowMac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
