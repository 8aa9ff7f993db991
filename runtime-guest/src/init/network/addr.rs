//! Addresses, routes and neighbour entries on one interface, each set with
//! replace semantics (`NLM_F_REPLACE`): applying the same config twice is not
//! an error, and a DHCP renewal refreshes an address's lifetime in place.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use neli::consts::nl::NlmF;
use neli::consts::rtnl::{
    Ifa, IfaF, Nda, Nud, RtAddrFamily, RtScope, RtTable, Rta, Rtm, Rtn, Rtprot,
};
use neli::rtnl::{IfaddrmsgBuilder, NdmsgBuilder, RtmsgBuilder};
use neli::types::RtBuffer;

use super::rtnl::{Rtnl, RtnlError, attr};
use super::spec::MacAddr;

fn build_err(e: impl std::fmt::Display) -> RtnlError {
    RtnlError::Socket(e.to_string())
}

fn family(ip: &IpAddr) -> RtAddrFamily {
    match ip {
        IpAddr::V4(_) => RtAddrFamily::Inet,
        IpAddr::V6(_) => RtAddrFamily::Inet6,
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn index(ifindex: u32) -> Result<i32, RtnlError> {
    i32::try_from(ifindex).map_err(build_err)
}

/// How long an address stays: forever (static), or a DHCP lease's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    Forever,
    For(Duration),
}

impl Lifetime {
    fn seconds(self) -> u32 {
        match self {
            Lifetime::Forever => u32::MAX,
            Lifetime::For(d) => u32::try_from(d.as_secs()).unwrap_or(u32::MAX - 1),
        }
    }
}

/// Adds `net` (address and prefix length) to interface `ifindex`, or updates it
/// if present. IPv6 addresses skip duplicate address detection: they are ours
/// by config, and a tentative address could not be used or announced at once.
pub fn replace_address(
    rtnl: &mut Rtnl,
    ifindex: u32,
    net: &IpNet,
    lifetime: Lifetime,
) -> Result<(), RtnlError> {
    let ip = net.addr();
    let mut attrs = RtBuffer::new();
    attrs.push(attr(Ifa::Local, octets(&ip))?);
    attrs.push(attr(Ifa::Address, octets(&ip))?);
    if let IpNet::V4(v4) = net
        && v4.prefix_len() < 31
    {
        attrs.push(attr(Ifa::Broadcast, v4.broadcast().octets().to_vec())?);
    }
    if lifetime != Lifetime::Forever {
        // struct ifa_cacheinfo { preferred, valid, cstamp, tstamp }
        let s = lifetime.seconds();
        let mut info = Vec::with_capacity(16);
        for v in [s, s, 0, 0] {
            info.extend_from_slice(&v.to_ne_bytes());
        }
        attrs.push(attr(Ifa::Cacheinfo, info)?);
    }
    let msg = IfaddrmsgBuilder::default()
        .ifa_family(family(&ip))
        .ifa_prefixlen(net.prefix_len())
        .ifa_flags(if ip.is_ipv6() {
            IfaF::NODAD
        } else {
            IfaF::empty()
        })
        .ifa_scope(RtScope::Universe)
        .ifa_index(ifindex)
        .rtattrs(attrs)
        .build()
        .map_err(build_err)?;
    rtnl.request(Rtm::Newaddr, NlmF::CREATE | NlmF::REPLACE, msg)
}

/// Removes `net` from interface `ifindex`.
pub fn delete_address(rtnl: &mut Rtnl, ifindex: u32, net: &IpNet) -> Result<(), RtnlError> {
    let ip = net.addr();
    let mut attrs = RtBuffer::new();
    attrs.push(attr(Ifa::Local, octets(&ip))?);
    attrs.push(attr(Ifa::Address, octets(&ip))?);
    let msg = IfaddrmsgBuilder::default()
        .ifa_family(family(&ip))
        .ifa_prefixlen(net.prefix_len())
        .ifa_scope(RtScope::Universe)
        .ifa_index(ifindex)
        .rtattrs(attrs)
        .build()
        .map_err(build_err)?;
    rtnl.request(Rtm::Deladdr, NlmF::empty(), msg)
}

fn route_msg(
    ifindex: u32,
    to: &IpNet,
    via: Option<&IpAddr>,
) -> Result<neli::rtnl::Rtmsg, RtnlError> {
    let dst = to.trunc();
    let mut attrs = RtBuffer::new();
    if dst.prefix_len() > 0 {
        attrs.push(attr(Rta::Dst, octets(&dst.addr()))?);
    }
    if let Some(gw) = via {
        attrs.push(attr(Rta::Gateway, octets(gw))?);
    }
    attrs.push(attr(Rta::Oif, ifindex)?);
    RtmsgBuilder::default()
        .rtm_family(family(&dst.addr()))
        .rtm_dst_len(dst.prefix_len())
        .rtm_src_len(0)
        .rtm_tos(0)
        .rtm_table(RtTable::Main)
        .rtm_protocol(Rtprot::Boot)
        .rtm_scope(if via.is_some() {
            RtScope::Universe
        } else {
            RtScope::Link
        })
        .rtm_type(Rtn::Unicast)
        .rtattrs(attrs)
        .build()
        .map_err(build_err)
}

/// Routes `to` through interface `ifindex`, via a router or on-link; replaces
/// the main table's route to the same destination if there is one.
pub fn replace_route(
    rtnl: &mut Rtnl,
    ifindex: u32,
    to: &IpNet,
    via: Option<&IpAddr>,
) -> Result<(), RtnlError> {
    let msg = route_msg(ifindex, to, via)?;
    match rtnl.request(Rtm::Newroute, NlmF::CREATE | NlmF::REPLACE, msg) {
        Err(e) if e.errno() == Some(nix::errno::Errno::EEXIST) => Ok(()),
        other => other,
    }
}

/// Removes the route to `to` via `via` on interface `ifindex`.
pub fn delete_route(
    rtnl: &mut Rtnl,
    ifindex: u32,
    to: &IpNet,
    via: Option<&IpAddr>,
) -> Result<(), RtnlError> {
    let msg = route_msg(ifindex, to, via)?;
    rtnl.request(Rtm::Delroute, NlmF::empty(), msg)
}

/// Sets a permanent neighbour entry (`ip` is at `mac`) on interface `ifindex`.
pub fn replace_neighbour(
    rtnl: &mut Rtnl,
    ifindex: u32,
    ip: &IpAddr,
    mac: &MacAddr,
) -> Result<(), RtnlError> {
    let mut attrs = RtBuffer::new();
    attrs.push(attr(Nda::Dst, octets(ip))?);
    attrs.push(attr(Nda::Lladdr, mac.0.to_vec())?);
    let msg = NdmsgBuilder::default()
        .ndm_family(family(ip))
        .ndm_index(index(ifindex)?)
        .ndm_state(Nud::PERMANENT)
        .ndm_type(Rtn::Unspec)
        .rtattrs(attrs)
        .build()
        .map_err(build_err)?;
    rtnl.request(Rtm::Newneigh, NlmF::CREATE | NlmF::REPLACE, msg)
}
