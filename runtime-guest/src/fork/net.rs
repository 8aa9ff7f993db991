//! The network steps of a child's recovery (docs/PROTOCOL.md 4.5, step 3)
//! over rtnetlink: the clone's MAC, forgetting the parent's neighbours, the
//! clone's addresses, and telling the link (gratuitous ARP, unsolicited NA).
//!
//! The identity's `nics` are in configuration order; here NIC `i` is the
//! `i`-th Ethernet interface by interface index (the order the kernel found
//! them), which is the configuration order for the VMs tetherd starts.

use std::net::IpAddr;

use ipnet::IpNet;
use neli::consts::nl::NlmF;
use neli::consts::rtnl::{Ifa, Nda, Nud, RtAddrFamily, RtScope, Rtm, Rtn};
use neli::rtnl::{Ifaddrmsg, IfaddrmsgBuilder, Ndmsg, NdmsgBuilder};
use neli::types::RtBuffer;

use crate::init::network::addr::{self, Lifetime};
use crate::init::network::announce;
use crate::init::network::link::{self, LinkInfo};
use crate::init::network::rtnl::{Rtnl, RtnlError, attr};
use crate::init::network::spec::MacAddr;

fn build_err(e: impl std::fmt::Display) -> RtnlError {
    RtnlError::Socket(e.to_string())
}

/// The Ethernet interfaces (not loopback), by interface index.
pub fn nics(rtnl: &mut Rtnl) -> Result<Vec<LinkInfo>, RtnlError> {
    let mut links: Vec<LinkInfo> = link::list(rtnl)?
        .into_iter()
        .filter(|l| !l.loopback && l.mac.is_some())
        .collect();
    links.sort_by_key(|l| l.index);
    Ok(links)
}

/// NIC `i` of the identity.
pub fn nic(rtnl: &mut Rtnl, i: usize) -> Result<LinkInfo, String> {
    let mut all = nics(rtnl).map_err(|e| format!("cannot list interfaces: {e}"))?;
    if i >= all.len() {
        return Err(format!("no interface for it ({} found)", all.len()));
    }
    Ok(all.swap_remove(i))
}

/// Gives `link` the MAC `mac`. A driver that cannot change it while up
/// (EBUSY) gets it while down.
pub fn set_mac(rtnl: &mut Rtnl, link: &LinkInfo, mac: MacAddr) -> Result<(), RtnlError> {
    match link::set_mac(rtnl, link.index, mac) {
        Err(e) if e.errno() == Some(nix::errno::Errno::EBUSY) && link.up => {
            link::set_up(rtnl, link.index, false)?;
            let set = link::set_mac(rtnl, link.index, mac);
            link::set_up(rtnl, link.index, true)?;
            set
        }
        other => other,
    }
}

/// Deletes the neighbour entries the kernel learnt on `ifindex` (permanent
/// ones, set by configuration, stay). Returns how many went. (A MAC change
/// already makes the kernel forget IPv4 neighbours; this catches the rest,
/// and entries learnt since.)
pub fn flush_neighbours(rtnl: &mut Rtnl, ifindex: u32) -> Result<usize, RtnlError> {
    let req = NdmsgBuilder::default()
        .ndm_family(RtAddrFamily::Unspecified)
        .ndm_index(0)
        .ndm_state(Nud::empty())
        .ndm_type(Rtn::Unspec)
        .build()
        .map_err(build_err)?;
    let all: Vec<Ndmsg> = rtnl.dump(Rtm::Getneigh, req)?;
    let mut n = 0;
    for entry in all {
        if u32::try_from(*entry.ndm_index()).ok() != Some(ifindex)
            || entry.ndm_state().contains(Nud::PERMANENT)
            || entry.ndm_state().contains(Nud::NOARP)
        {
            continue;
        }
        let handle = entry.rtattrs().get_attr_handle();
        let Some(dst) = handle.get_attribute(Nda::Dst) else {
            continue;
        };
        let dst: Vec<u8> = dst.rta_payload().as_ref().to_vec();
        let mut attrs = RtBuffer::new();
        attrs.push(attr(Nda::Dst, dst)?);
        let del = NdmsgBuilder::default()
            .ndm_family(*entry.ndm_family())
            .ndm_index(*entry.ndm_index())
            .ndm_state(Nud::empty())
            .ndm_type(Rtn::Unspec)
            .rtattrs(attrs)
            .build()
            .map_err(build_err)?;
        match rtnl.request(Rtm::Delneigh, NlmF::empty(), del) {
            // Gone meanwhile (garbage collection): as good as deleted.
            Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT) => {}
            other => other?,
        }
        n += 1;
    }
    Ok(n)
}

/// The global (universe-scope) and link-local addresses on `ifindex`.
pub fn addresses(rtnl: &mut Rtnl, ifindex: u32) -> Result<Vec<(IpNet, RtScope)>, RtnlError> {
    let req = IfaddrmsgBuilder::default()
        .ifa_family(RtAddrFamily::Unspecified)
        .ifa_prefixlen(0)
        .ifa_scope(RtScope::Universe)
        .ifa_index(0)
        .build()
        .map_err(build_err)?;
    let all: Vec<Ifaddrmsg> = rtnl.dump(Rtm::Getaddr, req)?;
    Ok(all
        .iter()
        .filter(|a| *a.ifa_index() == ifindex)
        .filter_map(|a| {
            let handle = a.rtattrs().get_attr_handle();
            let raw = handle
                .get_attribute(Ifa::Local)
                .or_else(|| handle.get_attribute(Ifa::Address))?;
            let bytes: &[u8] = raw.rta_payload().as_ref();
            let ip = match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
                _ => return None,
            };
            let net = IpNet::new(ip, *a.ifa_prefixlen()).ok()?;
            Some((net, *a.ifa_scope()))
        })
        .collect())
}

/// Removes the global addresses of one family (the parent's) from `ifindex`,
/// except `keep`.
pub fn clear_addresses(
    rtnl: &mut Rtnl,
    ifindex: u32,
    ipv4: bool,
    keep: Option<&IpNet>,
) -> Result<(), RtnlError> {
    for (net, scope) in addresses(rtnl, ifindex)? {
        if scope == RtScope::Universe && net.addr().is_ipv4() == ipv4 && Some(&net) != keep {
            addr::delete_address(rtnl, ifindex, &net)?;
        }
    }
    Ok(())
}

/// The clone's static address on `ifindex` (the parent's of that family go),
/// and its default route through `gateway`.
pub fn set_static(
    rtnl: &mut Rtnl,
    link: &LinkInfo,
    net: &IpNet,
    gateway: Option<&IpAddr>,
) -> Result<(), RtnlError> {
    let ifindex = link.index;
    // New first: an interface left with no IPv4 address at all forgets its
    // neighbours, configured ones included. The new address is a secondary
    // of the parent's when in the same subnet, and deleting a primary takes
    // its secondaries along unless they are promoted.
    if net.addr().is_ipv4() {
        let knob = format!("/proc/sys/net/ipv4/conf/{}/promote_secondaries", link.name);
        if let Err(e) = std::fs::write(&knob, "1") {
            tracing::warn!("fork: {knob}: {e}");
        }
    }
    addr::replace_address(rtnl, ifindex, net, Lifetime::Forever)?;
    clear_addresses(rtnl, ifindex, net.addr().is_ipv4(), Some(net))?;
    if let Some(gw) = gateway {
        let any = match gw {
            IpAddr::V4(_) => IpNet::V4(Default::default()),
            IpAddr::V6(_) => IpNet::V6(Default::default()),
        };
        addr::replace_route(rtnl, ifindex, &any, Some(gw))?;
    }
    Ok(())
}

/// A gratuitous ARP for each IPv4 address on `ifindex` and an unsolicited
/// neighbour advertisement for each IPv6 one, from `mac`. Returns how many
/// went out.
pub fn announce(rtnl: &mut Rtnl, ifindex: u32, mac: MacAddr) -> Result<usize, String> {
    let addrs = addresses(rtnl, ifindex).map_err(|e| format!("cannot list addresses: {e}"))?;
    for (net, _) in &addrs {
        match net.addr() {
            IpAddr::V4(ip) => announce::gratuitous_arp(ifindex, mac, ip),
            IpAddr::V6(ip) => announce::unsolicited_neighbour_advertisement(ifindex, mac, ip),
        }
        .map_err(|e| format!("announcing {}: {e}", net.addr()))?;
    }
    Ok(addrs.len())
}
