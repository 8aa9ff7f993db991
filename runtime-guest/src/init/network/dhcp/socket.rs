//! The DHCP client's two sockets on one interface. Sending: a UDP socket on
//! port 68 bound to the device, which broadcasts from 0.0.0.0 before the
//! interface has an address and unicasts to the server once it has one; it
//! also holds port 68 so the kernel never answers a server with ICMP port
//! unreachable. Receiving: an `AF_PACKET` socket with a BPF filter for UDP to
//! port 68, because the kernel does not deliver to the UDP socket before the
//! interface has an address when reverse-path filtering is on (measured: with
//! `rp_filter=1` an OFFER never reaches the UDP socket; with a packet socket it
//! always does, and unicast replies after binding arrive the same way).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use async_io::Async;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};

use super::client::Transmit;

const ETH_P_IP: u16 = 0x0800;
const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;

/// Classic BPF over an IPv4 packet (no link header: `SOCK_DGRAM`): accept
/// unfragmented UDP to port 68, drop everything else in the kernel.
const FILTER: [libc::sock_filter; 9] = [
    bpf(0x30, 0, 0, 9),                  // A = ip protocol
    bpf(0x15, 0, 6, 17),                 // UDP? else drop
    bpf(0x28, 0, 0, 6),                  // A = flags and fragment offset
    bpf(0x45, 4, 0, 0x1fff),             // a fragment? drop
    bpf(0xb1, 0, 0, 0),                  // X = ip header length
    bpf(0x48, 0, 0, 2),                  // A = udp destination port
    bpf(0x15, 0, 1, CLIENT_PORT as u32), // port 68? accept, else drop
    bpf(0x06, 0, 0, 0x0004_0000),        // accept (up to 256 KiB)
    bpf(0x06, 0, 0, 0),                  // drop
];

const fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The UDP payload of an IPv4 packet if it is UDP to port 68.
pub fn dhcp_payload(ip: &[u8]) -> Option<&[u8]> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let ip = ip.get(..total)?;
    let udp = ip.get(ihl..)?;
    let port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if port != CLIENT_PORT || len < 8 {
        return None;
    }
    udp.get(8..len)
}

/// Both sockets, registered with the async reactor.
pub struct DhcpSockets {
    udp: Async<UdpSocket>,
    packet: Async<OwnedFd>,
}

impl DhcpSockets {
    /// Opens both sockets on interface `ifname` (index `ifindex`).
    pub fn open(ifindex: u32, ifname: &str) -> io::Result<Self> {
        let udp = socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::setsockopt(&udp, sockopt::ReuseAddr, &true)?;
        socket::setsockopt(&udp, sockopt::Broadcast, &true)?;
        socket::setsockopt(&udp, sockopt::BindToDevice, &ifname.into())?;
        socket::bind(
            udp.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT)),
        )?;
        let udp = Async::new(UdpSocket::from(udp))?;
        Ok(DhcpSockets {
            udp,
            packet: Async::new(packet_socket(ifindex)?)?,
        })
    }

    /// Sends one packet.
    pub async fn send(&self, t: &Transmit) -> io::Result<()> {
        let (to, bytes) = match t {
            Transmit::Broadcast(b) => (Ipv4Addr::BROADCAST, b),
            Transmit::Unicast(ip, b) => (*ip, b),
        };
        self.udp
            .send_to(bytes, SocketAddr::from(SocketAddrV4::new(to, SERVER_PORT)))
            .await?;
        Ok(())
    }

    /// Waits for the next UDP packet to port 68 and returns its payload.
    pub async fn recv(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = self
                .packet
                .read_with(|fd| {
                    // SAFETY: the buffer is valid for its length.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    usize::try_from(n).map_err(|_| io::Error::last_os_error())
                })
                .await?;
            if let Some(p) = dhcp_payload(&buf[..n]) {
                return Ok(p.to_vec());
            }
        }
    }
}

fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let proto = ETH_P_IP.to_be();
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let prog = libc::sock_fprog {
        len: FILTER.len() as u16,
        filter: FILTER.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program; `prog` outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex =
        i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the address is valid for the length given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_packet(dport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 2, 255, 255, 255, 255,
        ];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&67u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn the_payload_of_udp_to_port_68_is_extracted() {
        assert_eq!(dhcp_payload(&udp_packet(68, b"offer")), Some(&b"offer"[..]));
        let mut padded = udp_packet(68, b"offer");
        padded.extend_from_slice(&[0; 10]); // Ethernet padding past the IP length
        assert_eq!(dhcp_payload(&padded), Some(&b"offer"[..]));
    }

    #[test]
    fn other_packets_are_not_dhcp_replies() {
        assert_eq!(dhcp_payload(&udp_packet(67, b"request")), None);
        let mut tcp = udp_packet(68, b"x");
        tcp[9] = 6;
        assert_eq!(dhcp_payload(&tcp), None);
        assert_eq!(
            dhcp_payload(&udp_packet(68, b"offer")[..25]),
            None,
            "truncated"
        );
        assert_eq!(dhcp_payload(&[]), None);
    }
}
