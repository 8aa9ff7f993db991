//! What a connection tells its application.

use bytes::Bytes;

use crate::auth::{Authenticated, Rejected};
use crate::crypto::{CipherAlg, KexAlg};
use crate::request::ChannelRequest;

/// A channel, named by our local channel number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u32);

/// SSH_MSG_CHANNEL_OPEN_FAILURE reason codes (RFC 4254 section 5.1).
pub mod open_failure {
    pub const ADMINISTRATIVELY_PROHIBITED: u32 = 1;
    pub const CONNECT_FAILED: u32 = 2;
    pub const UNKNOWN_CHANNEL_TYPE: u32 = 3;
    pub const RESOURCE_SHORTAGE: u32 = 4;
}

/// The extended data type of stderr (RFC 4254 section 5.2).
pub const EXTENDED_STDERR: u32 = 1;

/// An event for the application. Drain them after every call that feeds input or
/// time (`handle_input`, `handle_timeout`) and after commands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A key exchange completed: the first, or a rekey.
    KexComplete {
        /// Whether this was a re-exchange.
        rekey: bool,
        /// The method used.
        kex: KexAlg,
        /// The cipher we send with.
        cipher_out: CipherAlg,
        /// The cipher we receive with.
        cipher_in: CipherAlg,
    },
    /// Authentication succeeded. On a server: who proved what; on a client: the
    /// user name and key we used.
    Authenticated(Authenticated),
    /// A server refused an authentication attempt (for the log).
    AuthRejected(Rejected),
    /// The peer asks to open a channel of a type this side accepts. Answer with
    /// `accept_channel` or `reject_channel`.
    ChannelOpen {
        channel: ChannelId,
        channel_type: String,
        data: Bytes,
    },
    /// A channel we opened was confirmed.
    ChannelOpened { channel: ChannelId },
    /// A channel we opened was refused.
    ChannelOpenFailed {
        channel: ChannelId,
        reason: u32,
        description: String,
    },
    /// Data arrived: `ext` is `None` for plain data, `Some(1)` for stderr. Call
    /// `channel_consume` once it has been used, so the window reopens.
    ChannelData {
        channel: ChannelId,
        ext: Option<u32>,
        data: Bytes,
    },
    /// The peer will send no more data on this channel.
    ChannelEof { channel: ChannelId },
    /// A channel request. If `want_reply`, answer with `channel_reply` (replies go
    /// out in the order requests came in).
    ChannelRequest {
        channel: ChannelId,
        request: ChannelRequest,
        want_reply: bool,
    },
    /// The reply to our want-reply channel request (in request order).
    ChannelReply { channel: ChannelId, success: bool },
    /// A channel whose `channel_send` accepted less than offered can take more.
    ChannelWritable { channel: ChannelId },
    /// Both sides closed the channel; its id may be reused.
    ChannelClosed { channel: ChannelId },
    /// A global request of a name listed in `Config::global_requests`. If
    /// `want_reply`, answer with `global_reply`.
    GlobalRequest {
        name: String,
        data: Bytes,
        want_reply: bool,
    },
    /// The reply to our want-reply global request (in request order).
    GlobalReply { success: bool, data: Bytes },
}
