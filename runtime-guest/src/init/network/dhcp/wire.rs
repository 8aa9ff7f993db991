//! DHCPv4 messages on the wire (RFC 2131 section 2, options from RFC 2132):
//! the fixed BOOTP header, the magic cookie, then options as code, length,
//! value. Only what the client needs: options are kept as raw bytes with
//! typed getters for the few it reads. Decoding never panics on bad input.

use std::net::Ipv4Addr;

/// BOOTREQUEST (client to server).
pub const BOOT_REQUEST: u8 = 1;
/// BOOTREPLY (server to client).
pub const BOOT_REPLY: u8 = 2;
/// The fixed header's length, up to the options' magic cookie.
const HEADER_LEN: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Some servers drop BOOTP packets shorter than the classic 300 bytes.
const MIN_PACKET: usize = 300;
const BROADCAST_FLAG: u16 = 0x8000;

/// Option codes (RFC 2132).
pub mod code {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DOMAIN_NAME_SERVER: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const REQUESTED_IP_ADDRESS: u8 = 50;
    pub const ADDRESS_LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_IDENTIFIER: u8 = 54;
    pub const PARAMETER_REQUEST_LIST: u8 = 55;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_IDENTIFIER: u8 = 61;
    pub const END: u8 = 255;
}

/// The DHCP message type (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        use MessageType::*;
        [Discover, Offer, Request, Decline, Ack, Nak, Release, Inform]
            .into_iter()
            .find(|t| *t as u8 == v)
    }
}

/// Why bytes are not a DHCP message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("shorter than a BOOTP header and magic cookie ({0} bytes)")]
    Short(usize),
    #[error("no DHCP magic cookie")]
    NoCookie,
    #[error("option {0} runs past the end of the packet")]
    TruncatedOption(u8),
}

/// A DHCPv4 message: the header fields the client uses and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub broadcast: bool,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    /// The client's hardware address (Ethernet: the first 6 bytes).
    pub chaddr: [u8; 16],
    /// Options in order, each code once (a repeated code's values are
    /// joined, RFC 3396).
    options: Vec<(u8, Vec<u8>)>,
}

impl Message {
    /// An empty message of kind `op` from the Ethernet address `mac`.
    pub fn new(op: u8, xid: u32, mac: &[u8; 6]) -> Self {
        let mut chaddr = [0; 16];
        chaddr[..6].copy_from_slice(mac);
        Message {
            op,
            xid,
            secs: 0,
            broadcast: false,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options: Vec::new(),
        }
    }

    /// Sets option `code` to `value`, replacing an earlier value.
    pub fn set(&mut self, code: u8, value: impl Into<Vec<u8>>) {
        let value = value.into();
        match self.options.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => *v = value,
            None => self.options.push((code, value)),
        }
    }

    /// Option `code`'s raw value.
    pub fn get(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// The message type, if option 53 holds a known one.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.get(code::MESSAGE_TYPE)? {
            [t] => MessageType::from_u8(*t),
            _ => None,
        }
    }

    /// An option holding one IPv4 address (exactly 4 bytes).
    pub fn ipv4(&self, code: u8) -> Option<Ipv4Addr> {
        let b: [u8; 4] = self.get(code)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    }

    /// An option holding a list of IPv4 addresses (empty if absent or malformed).
    pub fn ipv4_list(&self, code: u8) -> Vec<Ipv4Addr> {
        match self.get(code) {
            Some(b) if !b.is_empty() && b.len() % 4 == 0 => b
                .chunks_exact(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// An option holding a 32-bit number (exactly 4 bytes).
    pub fn u32(&self, code: u8) -> Option<u32> {
        Some(u32::from_be_bytes(self.get(code)?.try_into().ok()?))
    }

    /// The packet: header, cookie, options (long ones split, RFC 3396), END,
    /// padded to 300 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(576);
        b.extend_from_slice(&[self.op, 1, 6, 0]); // htype Ethernet, hlen 6, hops
        b.extend_from_slice(&self.xid.to_be_bytes());
        b.extend_from_slice(&self.secs.to_be_bytes());
        let flags = if self.broadcast { BROADCAST_FLAG } else { 0 };
        b.extend_from_slice(&flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            b.extend_from_slice(&a.octets());
        }
        b.extend_from_slice(&self.chaddr);
        b.resize(HEADER_LEN, 0); // sname and file: unused
        b.extend_from_slice(&MAGIC_COOKIE);
        for (c, value) in &self.options {
            if value.is_empty() {
                b.extend_from_slice(&[*c, 0]);
            }
            for part in value.chunks(255) {
                b.extend_from_slice(&[*c, part.len() as u8]);
                b.extend_from_slice(part);
            }
        }
        b.push(code::END);
        if b.len() < MIN_PACKET {
            b.resize(MIN_PACKET, 0);
        }
        b
    }

    /// Parses a packet. Options after END, and the sname and file fields,
    /// are ignored (no option overload).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let Some((header, rest)) = bytes.split_at_checked(HEADER_LEN) else {
            return Err(DecodeError::Short(bytes.len()));
        };
        let Some((cookie, mut opts)) = rest.split_at_checked(4) else {
            return Err(DecodeError::Short(bytes.len()));
        };
        if cookie != MAGIC_COOKIE {
            return Err(DecodeError::NoCookie);
        }
        let be32 = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let mut chaddr = [0; 16];
        chaddr.copy_from_slice(&header[28..44]);
        let mut m = Message {
            op: header[0],
            xid: be32(4),
            secs: u16::from_be_bytes([header[8], header[9]]),
            broadcast: u16::from_be_bytes([header[10], header[11]]) & BROADCAST_FLAG != 0,
            ciaddr: Ipv4Addr::from(be32(12)),
            yiaddr: Ipv4Addr::from(be32(16)),
            siaddr: Ipv4Addr::from(be32(20)),
            giaddr: Ipv4Addr::from(be32(24)),
            chaddr,
            options: Vec::new(),
        };
        while let Some((&c, rest)) = opts.split_first() {
            match c {
                code::PAD => opts = rest,
                code::END => break,
                _ => {
                    let Some((&len, rest)) = rest.split_first() else {
                        return Err(DecodeError::TruncatedOption(c));
                    };
                    let Some((value, rest)) = rest.split_at_checked(usize::from(len)) else {
                        return Err(DecodeError::TruncatedOption(c));
                    };
                    match m.options.iter_mut().find(|(k, _)| *k == c) {
                        Some((_, v)) => v.extend_from_slice(value),
                        None => m.options.push((c, value.to_vec())),
                    }
                    opts = rest;
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
