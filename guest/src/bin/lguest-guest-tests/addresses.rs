//! The addresses a network self-test works with. Both test kernels use it:
//! lguest-guest-drivers includes this file too.

use lguest_guest::boot;
use lguest_guest::console::Error;
use lguest_guest::err;
use lguest_guest::inet::{parse_ip, Ip, ShowIp};

/// Our address and the Host's for a net test, from the command line's `ip=`
/// and `hostip=` (by default `ip=`'s network with last byte 1).
pub fn test_addresses() -> Result<(Ip, Ip), Error> {
    let ip = boot::option("ip").and_then(parse_ip);
    let ip = ip.ok_or_else(|| err!("needs our address: ip=A.B.C.D on the command line"))?;
    let host_ip = match boot::option("hostip") {
        Some(text) => parse_ip(text).ok_or_else(|| err!("hostip={text} is not an IPv4 address"))?,
        None => [ip[0], ip[1], ip[2], 1],
    };
    if host_ip == ip {
        return Err(err!("our address and the Host's are both {}", ShowIp(ip)));
    }
    Ok((ip, host_ip))
}
