//! Errors: what went wrong, and which DISCONNECT reason the peer is told.

use thiserror::Error;

/// SSH_MSG_DISCONNECT reason codes (RFC 4253 section 11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    HostNotAllowedToConnect,
    ProtocolError,
    KeyExchangeFailed,
    MacError,
    ServiceNotAvailable,
    ProtocolVersionNotSupported,
    HostKeyNotVerifiable,
    ConnectionLost,
    ByApplication,
    TooManyConnections,
    AuthCancelledByUser,
    NoMoreAuthMethodsAvailable,
    /// A code this crate has no name for.
    Other(u32),
}

impl DisconnectReason {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::HostNotAllowedToConnect => 1,
            Self::ProtocolError => 2,
            Self::KeyExchangeFailed => 3,
            Self::MacError => 5,
            Self::ServiceNotAvailable => 7,
            Self::ProtocolVersionNotSupported => 8,
            Self::HostKeyNotVerifiable => 9,
            Self::ConnectionLost => 10,
            Self::ByApplication => 11,
            Self::TooManyConnections => 12,
            Self::AuthCancelledByUser => 13,
            Self::NoMoreAuthMethodsAvailable => 14,
            Self::Other(code) => code,
        }
    }

    /// The reason for a wire code.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::HostNotAllowedToConnect,
            2 => Self::ProtocolError,
            3 => Self::KeyExchangeFailed,
            5 => Self::MacError,
            7 => Self::ServiceNotAvailable,
            8 => Self::ProtocolVersionNotSupported,
            9 => Self::HostKeyNotVerifiable,
            10 => Self::ConnectionLost,
            11 => Self::ByApplication,
            12 => Self::TooManyConnections,
            13 => Self::AuthCancelledByUser,
            14 => Self::NoMoreAuthMethodsAvailable,
            other => Self::Other(other),
        }
    }
}

/// Everything that can end a connection, or make a command fail.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer's version line is missing, too long, or not SSH 2.0.
    #[error("version exchange: {0}")]
    Version(&'static str),
    /// A packet length field outside the bounds this side accepts.
    #[error("packet length {0} is out of bounds")]
    PacketLength(u32),
    /// A padding length that is too short or longer than the packet.
    #[error("bad padding length {0}")]
    Padding(u8),
    /// The AEAD tag did not verify: the packet was corrupted or forged.
    #[error("message authentication failed (corrupt or forged packet)")]
    Mac,
    /// A message whose fields could not be decoded.
    #[error("malformed {msg} message: {what}")]
    Malformed {
        /// The message being decoded.
        msg: &'static str,
        /// What was wrong with it.
        what: &'static str,
    },
    /// A message that is not allowed in the connection's current state.
    #[error("unexpected message {msg} while {state}")]
    Unexpected {
        /// The message number.
        msg: u8,
        /// What the connection was doing.
        state: &'static str,
    },
    /// Key exchange negotiation found no algorithm both sides support.
    #[error("no common {0} algorithm")]
    NoCommonAlgorithm(&'static str),
    /// Key exchange failed (a bad public value, a bad signature, ...).
    #[error("key exchange failed: {0}")]
    KeyExchange(&'static str),
    /// The server's host key is not one this client trusts.
    #[error("host key {0} is not trusted")]
    HostKeyRejected(String),
    /// A strict key exchange (kex-strict-*-v00@openssh.com) rule was broken.
    #[error("strict key exchange violation: {0}")]
    StrictKex(&'static str),
    /// The peer asked for a service this side does not offer.
    #[error("service {0:?} is not available")]
    Service(String),
    /// The client could not authenticate, or the server gave up on a client.
    #[error("authentication failed: {0}")]
    Auth(&'static str),
    /// The peer sent more channel data than the window allowed.
    #[error("peer overran the window of channel {0}")]
    WindowOverrun(u32),
    /// The peer named a channel that does not exist.
    #[error("peer's {msg} referred to unknown channel {channel}")]
    UnknownChannel {
        /// The message that named it.
        msg: &'static str,
        /// The channel number.
        channel: u32,
    },
    /// The peer sent a channel message the channel's state does not allow
    /// (EOF on a channel not open yet, data after EOF, ...).
    #[error("peer's {msg} on channel {channel}: {problem}")]
    ChannelState {
        /// The message.
        msg: &'static str,
        /// Our channel number.
        channel: u32,
        /// What was wrong.
        problem: &'static str,
    },
    /// The peer sent a data packet larger than the maximum we announced.
    #[error(
        "peer sent {len} bytes of data on channel {channel}, above our maximum packet of {max}"
    )]
    PacketTooLarge {
        /// Our channel number.
        channel: u32,
        /// The data length.
        len: usize,
        /// The `max_packet` we announced.
        max: u32,
    },
    /// The peer exceeded a resource bound.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// A deadline passed (handshake, keepalive).
    #[error("timeout: {0}")]
    Timeout(&'static str),
    /// The peer sent SSH_MSG_DISCONNECT.
    #[error("peer disconnected ({reason:?}): {description}")]
    PeerDisconnected {
        /// The reason code the peer gave.
        reason: DisconnectReason,
        /// The peer's description.
        description: String,
    },
    /// The application closed the connection.
    #[error("connection closed locally")]
    Closed,
    /// A command the connection cannot carry out in its current state
    /// (not fatal: the connection continues).
    #[error("invalid command: {0}")]
    InvalidCommand(&'static str),
}

impl Error {
    /// The reason code sent to the peer when this error ends the connection.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Version(_) => DisconnectReason::ProtocolVersionNotSupported,
            Self::Mac => DisconnectReason::MacError,
            Self::NoCommonAlgorithm(_) | Self::KeyExchange(_) => {
                DisconnectReason::KeyExchangeFailed
            }
            Self::HostKeyRejected(_) => DisconnectReason::HostKeyNotVerifiable,
            Self::Auth(_) => DisconnectReason::NoMoreAuthMethodsAvailable,
            Self::Service(_) => DisconnectReason::ServiceNotAvailable,
            Self::Timeout(_) => DisconnectReason::ConnectionLost,
            Self::Closed => DisconnectReason::ByApplication,
            Self::PeerDisconnected { reason, .. } => *reason,
            _ => DisconnectReason::ProtocolError,
        }
    }

    /// Whether this error ends the connection (all but command errors do).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::InvalidCommand(_))
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;
