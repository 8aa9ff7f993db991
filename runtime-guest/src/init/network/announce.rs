//! Telling the link that an address is (now) ours: a gratuitous ARP for IPv4
//! and an unsolicited neighbour advertisement for IPv6, sent as raw frames on
//! an `AF_PACKET` socket so they go out whatever the address's state (no route
//! or DAD needed). Switches and peers update their caches at once; after a VM
//! fork or a lease for an address that moved this is what makes traffic find
//! the new owner.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

use super::spec::MacAddr;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: MacAddr = MacAddr([0xff; 6]);

/// A broadcast ARP request for our own `ip` from `mac` (RFC 5227's
/// announcement: sender and target protocol address are both `ip`).
pub fn arp_announcement(mac: MacAddr, ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac.0);
    p[14..18].copy_from_slice(&ip.octets());
    // target hardware address stays zero: it is what a request asks for
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// The all-nodes multicast group and its Ethernet address.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: MacAddr = MacAddr([0x33, 0x33, 0, 0, 0, 1]);

/// An IPv6 packet (header included) carrying an unsolicited neighbour
/// advertisement for `ip` at `mac` to all nodes, with the override flag.
pub fn neighbour_advertisement(mac: MacAddr, ip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![0u8; 32];
    icmp[0] = 136; // neighbour advertisement
    icmp[4] = 0x20; // override (not router, not solicited)
    icmp[8..24].copy_from_slice(&ip.octets());
    icmp[24] = 2; // option: target link-layer address
    icmp[25] = 1; // length in units of 8 bytes
    icmp[26..32].copy_from_slice(&mac.0);
    let sum = icmpv6_checksum(&ip, &ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut pkt = Vec::with_capacity(40 + icmp.len());
    pkt.extend_from_slice(&[0x60, 0, 0, 0]);
    pkt.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    pkt.push(58); // next header: ICMPv6
    pkt.push(255); // hop limit: RFC 4861 requires 255
    pkt.extend_from_slice(&ip.octets());
    pkt.extend_from_slice(&ALL_NODES.octets());
    pkt.extend_from_slice(&icmp);
    pkt
}

fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).copied().map(u32::from).unwrap_or(0);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `payload` as one Ethernet frame of type `ethertype` to `dst` out of
/// interface `ifindex` (the kernel adds the Ethernet header).
pub fn send_frame(ifindex: u32, ethertype: u16, dst: MacAddr, payload: &[u8]) -> io::Result<()> {
    let proto = ethertype.to_be();
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0, // send only: receive nothing
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex =
        i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst.0);
    // SAFETY: the buffer and address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Broadcasts a gratuitous ARP for `ip` (ours, at `mac`) on interface `ifindex`.
pub fn gratuitous_arp(ifindex: u32, mac: MacAddr, ip: Ipv4Addr) -> io::Result<()> {
    send_frame(ifindex, ETH_P_ARP, BROADCAST, &arp_announcement(mac, ip))
}

/// Sends an unsolicited neighbour advertisement for `ip` (ours, at `mac`) to
/// all nodes on interface `ifindex`.
pub fn unsolicited_neighbour_advertisement(
    ifindex: u32,
    mac: MacAddr,
    ip: Ipv6Addr,
) -> io::Result<()> {
    send_frame(
        ifindex,
        ETH_P_IPV6,
        ALL_NODES_MAC,
        &neighbour_advertisement(mac, ip),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    #[test]
    fn the_arp_announcement_names_our_address_as_sender_and_target() {
        let p = arp_announcement(MAC, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &MAC.0);
        assert_eq!(&p[14..18], &[10, 0, 2, 15]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[10, 0, 2, 15]);
    }

    #[test]
    fn the_neighbour_advertisement_checksums_to_zero() {
        let ip: Ipv6Addr = "fd00::15".parse().unwrap();
        let pkt = neighbour_advertisement(MAC, ip);
        assert_eq!(pkt.len(), 72);
        assert_eq!(pkt[6], 58);
        assert_eq!(pkt[7], 255);
        let body = &pkt[40..];
        assert_eq!(body[0], 136);
        // Summing a packet that includes its checksum gives all ones (zero after negation).
        assert_eq!(icmpv6_checksum(&ip, &ALL_NODES, body), 0);
        assert_eq!(&body[26..32], &MAC.0);
    }
}
