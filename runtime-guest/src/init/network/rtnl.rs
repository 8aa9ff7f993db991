//! The rtnetlink socket: one synchronous request at a time, answered by an
//! ACK, an errno, or a dump. Requests are quick (the kernel answers at once),
//! so they block; no background thread. Message building lives with each
//! object (`link`, `addr`, `route`); this file only moves messages.

use std::io::Cursor;

use neli::consts::nl::NlmF;
use neli::consts::rtnl::{RtaType, Rtm};
use neli::consts::socket::NlFamily;
use neli::nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder};
use neli::rtnl::{Rtattr, RtattrBuilder};
use neli::socket::synchronous::NlSocketHandle;
use neli::types::Buffer;
use neli::utils::Groups;
use neli::{FromBytesWithInput, Size, ToBytes};
use nix::errno::Errno;

/// Why a netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// The kernel refused the request.
    #[error("{0}")]
    Kernel(Errno),
    /// The socket failed, or a message could not be encoded or decoded.
    #[error("netlink: {0}")]
    Socket(String),
}

impl RtnlError {
    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RtnlError::Kernel(e) => Some(*e),
            RtnlError::Socket(_) => None,
        }
    }

    fn socket(e: impl std::fmt::Display) -> Self {
        RtnlError::Socket(e.to_string())
    }
}

/// A `NETLINK_ROUTE` socket in the calling thread's network namespace.
pub struct Rtnl {
    sock: NlSocketHandle,
    seq: u32,
}

impl Rtnl {
    /// Opens the socket.
    pub fn open() -> Result<Self, RtnlError> {
        let sock = NlSocketHandle::connect(NlFamily::Route, None, Groups::empty())
            .map_err(RtnlError::socket)?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends a request that changes something and waits for its ACK.
    pub fn request<P>(&mut self, ty: Rtm, flags: NlmF, payload: P) -> Result<(), RtnlError>
    where
        P: Size + ToBytes + std::fmt::Debug,
    {
        let seq = self.send(ty, flags | NlmF::ACK, payload)?;
        loop {
            for msg in self.recv_batch()? {
                if *msg.nl_seq() != seq {
                    continue;
                }
                match msg.nl_payload() {
                    NlPayload::Ack(_) => return Ok(()),
                    NlPayload::Err(e) => {
                        return Err(RtnlError::Kernel(Errno::from_raw(-e.error())));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends a dump request and decodes every answer as `R`.
    pub fn dump<P, R>(&mut self, ty: Rtm, payload: P) -> Result<Vec<R>, RtnlError>
    where
        P: Size + ToBytes + std::fmt::Debug,
        R: FromBytesWithInput<Input = usize>,
    {
        let seq = self.send(ty, NlmF::DUMP, payload)?;
        let mut out = Vec::new();
        loop {
            for msg in self.recv_batch()? {
                if *msg.nl_seq() != seq {
                    continue;
                }
                let done: u16 = neli::consts::nl::Nlmsg::Done.into();
                if u16::from(*msg.nl_type()) == done {
                    return Ok(out);
                }
                match msg.nl_payload() {
                    NlPayload::Payload(buf) => {
                        let bytes: &[u8] = buf.as_ref();
                        let item = R::from_bytes_with_input(&mut Cursor::new(bytes), bytes.len())
                            .map_err(RtnlError::socket)?;
                        out.push(item);
                    }
                    NlPayload::Err(e) => {
                        return Err(RtnlError::Kernel(Errno::from_raw(-e.error())));
                    }
                    NlPayload::Ack(_) | NlPayload::DumpExtAck(_) | NlPayload::Empty => {
                        return Ok(out);
                    }
                }
            }
        }
    }

    fn send<P>(&mut self, ty: Rtm, flags: NlmF, payload: P) -> Result<u32, RtnlError>
    where
        P: Size + ToBytes + std::fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let msg = NlmsghdrBuilder::default()
            .nl_type(ty)
            .nl_flags(flags | NlmF::REQUEST)
            .nl_seq(self.seq)
            .nl_payload(NlPayload::Payload(payload))
            .build()
            .map_err(RtnlError::socket)?;
        self.sock.send(&msg).map_err(RtnlError::socket)?;
        Ok(self.seq)
    }

    fn recv_batch(&mut self) -> Result<Vec<Nlmsghdr<Rtm, Buffer>>, RtnlError> {
        let (iter, _) = self.sock.recv::<Rtm, Buffer>().map_err(RtnlError::socket)?;
        iter.collect::<Result<Vec<_>, _>>()
            .map_err(RtnlError::socket)
    }
}

/// One attribute for a request.
pub fn attr<T, P>(ty: T, payload: P) -> Result<Rtattr<T, Buffer>, RtnlError>
where
    T: RtaType,
    P: Size + ToBytes,
{
    RtattrBuilder::default()
        .rta_type(ty)
        .rta_payload(payload)
        .build()
        .map_err(RtnlError::socket)
}
