//! A Linux tap device for `--tunnet`: a new `lguestN` interface that either
//! gets an IPv4 address (a point-to-point /24 with the Guest) or joins an
//! existing bridge. Frames carry the 10-byte virtio-net header (IFF_VNET_HDR),
//! so the Guest's headers pass straight through.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::{TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ};
const SIOCBRADDIF: libc::c_ulong = 0x89A2;

/// What `--tunnet=` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSpec {
    /// The host's side of a /24 shared with the Guest.
    Address(Ipv4Addr),
    Bridge(String),
}

impl std::fmt::Display for TapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapSpec::Address(ip) => write!(f, "{ip}/24"),
            TapSpec::Bridge(name) => write!(f, "bridge {name}"),
        }
    }
}

/// A MAC address as `02:00:00:00:00:01`.
pub struct MacDisplay(pub [u8; 6]);

impl std::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TunnetError {
    #[error("--tunnet={0}: expected IPADDR[:MAC] or bridge:NAME[:MAC]")]
    Syntax(String),
    #[error("--tunnet={spec}: {ip} cannot be the host's address: {why}")]
    BadAddress {
        spec: String,
        ip: Ipv4Addr,
        why: &'static str,
    },
    #[error("--tunnet={spec}: {mac} cannot be the Guest's MAC: {why}")]
    BadMac {
        spec: String,
        mac: String,
        why: &'static str,
    },
    #[error("--tunnet: cannot add a tap to bridge {0}: it does not exist")]
    NoBridge(String),
    #[error("--tunnet: cannot add a tap to {0}: it is not a bridge")]
    NotABridge(String),
    #[error("{0}")]
    Tap(String),
}

/// Parses `IPADDR[:MAC]` or `bridge:NAME[:MAC]`, refusing addresses and MACs
/// that cannot work.
pub fn parse_tunnet(spec: &str) -> Result<(TapSpec, Option<[u8; 6]>), TunnetError> {
    let bad = || TunnetError::Syntax(spec.to_string());
    let (target, mac) = if let Some(rest) = spec.strip_prefix("bridge:") {
        let (name, mac) = rest
            .split_once(':')
            .map_or((rest, None), |(n, m)| (n, Some(m)));
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(bad());
        }
        (TapSpec::Bridge(name.to_string()), mac)
    } else {
        let (ip, mac) = spec
            .split_once(':')
            .map_or((spec, None), |(i, m)| (i, Some(m)));
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        if let Some(why) = unusable_host_address(ip) {
            return Err(TunnetError::BadAddress {
                spec: spec.to_string(),
                ip,
                why,
            });
        }
        (TapSpec::Address(ip), mac)
    };
    let mac = match mac {
        Some(text) => {
            let mac = parse_mac(text).ok_or_else(bad)?;
            let why = if mac[0] & 1 != 0 {
                Some("it is a multicast address (bit 0 of the first byte is set)")
            } else if mac == [0; 6] {
                Some("it is all zeroes")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(TunnetError::BadMac {
                    spec: spec.to_string(),
                    mac: text.to_string(),
                    why,
                });
            }
            Some(mac)
        }
        None => None,
    };
    Ok((target, mac))
}

/// Why `ip` cannot be the tap's address in a /24 with the Guest, if it
/// cannot.
fn unusable_host_address(ip: Ipv4Addr) -> Option<&'static str> {
    let host = ip.octets()[3];
    if ip.is_unspecified() {
        Some("it is the unspecified address")
    } else if ip.is_broadcast() {
        Some("it is the broadcast address")
    } else if ip.is_loopback() {
        Some("it is a loopback address")
    } else if ip.is_multicast() {
        Some("it is a multicast address")
    } else if ip.octets()[0] >= 240 {
        Some("it is a reserved (class E) address")
    } else if ip.octets()[0] == 0 {
        Some("it is in 0.0.0.0/8, which means this network")
    } else if host == 0 {
        Some("it is the /24's network address (its last byte is 0)")
    } else if host == 255 {
        Some("it is the /24's broadcast address (its last byte is 255)")
    } else {
        None
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Checks that `name` is an existing network interface (before any tap is
/// made for it to join).
pub fn check_bridge(name: &str) -> Result<(), TunnetError> {
    let c_name =
        std::ffi::CString::new(name).map_err(|_| TunnetError::NoBridge(name.to_string()))?;
    // SAFETY: if_nametoindex reads the NUL-terminated string we own.
    if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        return Err(TunnetError::NoBridge(name.to_string()));
    }
    Ok(())
}

/// A random, locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into `mac`.
    unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    mac[0] = (mac[0] & 0xFE) | 0x02;
    mac
}

/// Which step of setting a tap up failed: joining the bridge, or another.
enum Step {
    Bridge(String, std::io::Error),
    Other(std::io::Error),
}

impl From<std::io::Error> for Step {
    fn from(e: std::io::Error) -> Step {
        Step::Other(e)
    }
}

pub struct Tap {
    file: File,
    pub name: String,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn name_of(req: &libc::ifreq) -> String {
    req.ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect()
}

/// An ioctl on `fd` with an ifreq, as an io::Result.
fn ioctl(fd: RawFd, request: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: every request used here takes a pointer to one ifreq, which
    // we own for the duration of the call.
    if unsafe { libc::ioctl(fd, request as _, req as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Creates the tap and configures it as `spec` says.
    pub fn create(spec: &TapSpec) -> Result<Tap, TunnetError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| TunnetError::Tap(format!("cannot open /dev/net/tun: {e}")))?;
        let mut req = ifreq("lguest%d");
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ioctl(file.as_raw_fd(), TUNSETIFF, &mut req)
            .map_err(|e| TunnetError::Tap(format!("cannot create a tap device: {e}")))?;
        let name = name_of(&req);
        // No offloads: the Guest negotiates none, so frames are whole.
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0) };
        let tap = Tap { file, name };
        tap.configure(spec).map_err(|e| match e {
            Step::Bridge(name, e) if e.raw_os_error() == Some(libc::ENODEV) => {
                TunnetError::NoBridge(name)
            }
            Step::Bridge(name, e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                TunnetError::NotABridge(name)
            }
            Step::Bridge(_, e) | Step::Other(e) => {
                TunnetError::Tap(format!("cannot set up tap {}: {e}", tap.name))
            }
        })?;
        Ok(tap)
    }

    fn configure(&self, spec: &TapSpec) -> Result<(), Step> {
        // SAFETY: a plain socket call; the result is checked and owned.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `sock` is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let fd = sock.as_raw_fd();
        match spec {
            TapSpec::Address(ip) => {
                for (request, addr) in [
                    (libc::SIOCSIFADDR, *ip),
                    (libc::SIOCSIFNETMASK, Ipv4Addr::new(255, 255, 255, 0)),
                ] {
                    let mut req = ifreq(&self.name);
                    let sin = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(addr).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    // SAFETY: sockaddr_in fits in the ifreq's sockaddr slot.
                    unsafe {
                        std::ptr::write(std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast(), sin)
                    };
                    ioctl(fd, request, &mut req)?;
                }
            }
            TapSpec::Bridge(bridge) => {
                let mut req = ifreq(&self.name);
                ioctl(fd, libc::SIOCGIFINDEX, &mut req)?;
                // SAFETY: SIOCGIFINDEX filled the ifindex member.
                let index = unsafe { req.ifr_ifru.ifru_ifindex };
                let mut req = ifreq(bridge);
                req.ifr_ifru.ifru_ifindex = index;
                ioctl(fd, SIOCBRADDIF, &mut req).map_err(|e| Step::Bridge(bridge.clone(), e))?;
            }
        }
        let mut req = ifreq(&self.name);
        ioctl(fd, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        Ok(ioctl(fd, libc::SIOCSIFFLAGS, &mut req)?)
    }

    /// The virtio-net header size frames carry: 10 (legacy) or 12 (virtio
    /// 1.x, with num_buffers).
    pub fn set_header_size(&self, size: i32) -> std::io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        if unsafe { libc::ioctl(self.fd(), TUNSETVNETHDRSZ as _, &size as *const i32) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// One frame (with its virtio-net header) in, if one is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// One frame (with its virtio-net header) out.
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnet_specs() {
        assert_eq!(
            parse_tunnet("192.168.19.1").unwrap(),
            (TapSpec::Address(Ipv4Addr::new(192, 168, 19, 1)), None)
        );
        assert_eq!(
            parse_tunnet("10.0.0.1:02:00:00:00:00:01").unwrap().1,
            Some([2, 0, 0, 0, 0, 1])
        );
        assert_eq!(
            parse_tunnet("bridge:br0").unwrap().0,
            TapSpec::Bridge("br0".into())
        );
        assert!(parse_tunnet("bridge:br0:zz").is_err());
        assert!(parse_tunnet("300.1.1.1").is_err());
        assert!(parse_tunnet("bridge:").is_err());
        assert!(random_mac()[0] & 3 == 2);
    }

    #[test]
    fn unusable_addresses_and_macs_are_refused() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "224.0.0.1",
            "240.1.2.3",
            "0.1.2.3",
            "10.0.0.0",
            "10.0.0.255",
        ] {
            assert!(
                matches!(parse_tunnet(ip), Err(TunnetError::BadAddress { .. })),
                "{ip}"
            );
        }
        for ok in ["10.0.0.1", "192.168.19.254", "169.254.77.1"] {
            assert!(parse_tunnet(ok).is_ok(), "{ok}");
        }
        let e = parse_tunnet("10.0.0.1:01:00:5e:00:00:01").unwrap_err();
        assert!(matches!(e, TunnetError::BadMac { .. }));
        assert!(e.to_string().contains("multicast"), "{e}");
        assert!(parse_tunnet("10.0.0.1:00:00:00:00:00:00").is_err());
        assert!(parse_tunnet("bridge:br0:ff:ff:ff:ff:ff:ff").is_err());
        assert!(parse_tunnet("10.0.0.1:002:00:00:00:00:01").is_err());
        assert!(parse_tunnet("bridge:br0:02:00:00:00:00:01").is_ok());
    }

    #[test]
    fn a_missing_bridge_is_named() {
        assert_eq!(
            check_bridge("lgnosuchbr9"),
            Err(TunnetError::NoBridge("lgnosuchbr9".into()))
        );
        assert!(check_bridge("lo").is_ok());
    }
}
