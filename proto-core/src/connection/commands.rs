//! Commands the application gives a connection. Each queues output; drain
//! `poll_transmit` and `poll_event` afterwards.

use bytes::{BufMut, Bytes};

use super::{Connection, GlobalWaiter};
use crate::channel::{Channel, ChannelState};
use crate::error::{DisconnectReason, Error, Result};
use crate::event::ChannelId;
use crate::request::ChannelRequest;
use crate::wire::{PutSsh, msg};

/// A send of at least this much data is a bulk stream's (see `channel_send`).
const BULK_SEND: usize = 64 * 1024;

impl Connection {
    fn usable(&self) -> Result<()> {
        if self.closed.is_some() {
            return Err(Error::InvalidCommand("the connection is closed"));
        }
        if !self.authenticated {
            return Err(Error::InvalidCommand("not authenticated yet"));
        }
        Ok(())
    }

    fn open_channel_mut(&mut self, channel: ChannelId) -> Result<&mut Channel> {
        self.usable()?;
        match self.channels.get_mut(channel) {
            Some(c) if c.state == ChannelState::Open && !c.close_sent => Ok(c),
            Some(_) => Err(Error::InvalidCommand("the channel is not open")),
            None => Err(Error::InvalidCommand("no such channel")),
        }
    }

    /// Opens a channel of `channel_type` with type-specific `data`. The answer
    /// comes as `ChannelOpened` or `ChannelOpenFailed`.
    pub fn open_channel(&mut self, channel_type: &str, data: &[u8]) -> Result<ChannelId> {
        self.usable()?;
        let c = Channel::new(ChannelState::Opening, self.config.window);
        let channel = self
            .channels
            .insert(c)
            .ok_or(Error::InvalidCommand("too many channels open"))?;
        let (window, max_packet) = (self.config.window, self.config.max_packet);
        self.transport.send(|b| {
            b.put_u8(msg::CHANNEL_OPEN);
            b.put_string(channel_type.as_bytes());
            b.put_u32(channel.0);
            b.put_u32(window);
            b.put_u32(max_packet);
            b.put_slice(data);
        });
        Ok(channel)
    }

    /// Opens a `session` channel.
    pub fn open_session(&mut self) -> Result<ChannelId> {
        self.open_channel("session", &[])
    }

    /// The channel the peer asked to open under `channel`, still unanswered.
    fn offered(&mut self, channel: ChannelId) -> Result<&mut Channel> {
        match self.channels.get_mut(channel) {
            Some(c) if c.state == ChannelState::Offered => Ok(c),
            _ => Err(Error::InvalidCommand(
                "no channel open request is waiting on that id",
            )),
        }
    }

    /// Accepts a channel the peer asked to open (`Event::ChannelOpen`). The
    /// channel keeps its id: other channels may have come and gone meanwhile.
    pub fn accept_channel(&mut self, channel: ChannelId) -> Result<()> {
        let max_packet = self.config.max_packet;
        let c = self.offered(channel)?;
        c.state = ChannelState::Open;
        let (remote, window) = (c.remote_id, c.recv_window);
        self.transport.send(|b| {
            b.put_u8(msg::CHANNEL_OPEN_CONFIRMATION);
            b.put_u32(remote);
            b.put_u32(channel.0);
            b.put_u32(window);
            b.put_u32(max_packet);
        });
        Ok(())
    }

    /// Refuses a channel the peer asked to open, with an RFC 4254 reason code.
    pub fn reject_channel(
        &mut self,
        channel: ChannelId,
        reason: u32,
        description: &str,
    ) -> Result<()> {
        let remote = self.offered(channel)?.remote_id;
        self.channels.remove(channel);
        self.transport.send(|b| {
            b.put_u8(msg::CHANNEL_OPEN_FAILURE);
            b.put_u32(remote);
            b.put_u32(reason);
            b.put_string(description.as_bytes());
            b.put_string(b"");
        });
        Ok(())
    }

    /// Sends data (`ext` = `None`) or extended data (`Some(1)` for stderr).
    /// Returns how many bytes were taken: at most the peer's window and what our
    /// send buffer has room for. When it is less than offered, a
    /// `ChannelWritable` event says when to try again.
    pub fn channel_send(
        &mut self,
        channel: ChannelId,
        ext: Option<u32>,
        data: &[u8],
    ) -> Result<usize> {
        let budget = self
            .config
            .send_buffer
            .saturating_sub(self.transport.buffered());
        let c = self.open_channel_mut(channel)?;
        if c.eof_sent {
            return Err(Error::InvalidCommand(
                "EOF was already sent on this channel",
            ));
        }
        let n = data.len().min(c.send_window as usize).min(budget);
        let (remote, max_packet) = (c.remote_id, c.send_max_packet as usize);
        c.send_window -= n as u32;
        if n < data.len() {
            c.blocked = true;
            self.any_blocked = true;
        }
        if n >= BULK_SEND {
            // Room for the rest of the send buffer in one allocation: a bulk
            // stream's next packets are sealed into it, not copied into a
            // bigger buffer each time it fills.
            // Packet framing adds under 64 bytes per 16 KiB.
            let room = budget.max(n);
            self.transport.reserve_out(room + room / 256 + 256);
        }
        for chunk in data[..n].chunks(max_packet) {
            self.transport.send(|b| {
                b.reserve(chunk.len() + 16);
                match ext {
                    None => b.put_u8(msg::CHANNEL_DATA),
                    Some(_) => b.put_u8(msg::CHANNEL_EXTENDED_DATA),
                }
                b.put_u32(remote);
                if let Some(code) = ext {
                    b.put_u32(code);
                }
                b.put_string(chunk);
            });
        }
        Ok(n)
    }

    /// Returns `n` consumed bytes of received data to the peer's window.
    pub fn channel_consume(&mut self, channel: ChannelId, n: usize) -> Result<()> {
        let Some(c) = self.channels.get_mut(channel) else {
            return Ok(()); // closed meanwhile: nothing to return
        };
        if c.close_sent {
            return Ok(());
        }
        if let Some(adjust) = c.consume(n.min(u32::MAX as usize) as u32) {
            let remote = c.remote_id;
            self.transport.send(|b| {
                b.put_u8(msg::CHANNEL_WINDOW_ADJUST);
                b.put_u32(remote);
                b.put_u32(adjust);
            });
        }
        Ok(())
    }

    /// Sends EOF: no more data from this side.
    pub fn channel_eof(&mut self, channel: ChannelId) -> Result<()> {
        let c = self.open_channel_mut(channel)?;
        if c.eof_sent {
            return Ok(());
        }
        c.eof_sent = true;
        let remote = c.remote_id;
        self.transport.send(|b| {
            b.put_u8(msg::CHANNEL_EOF);
            b.put_u32(remote);
        });
        Ok(())
    }

    /// Closes the channel. `ChannelClosed` follows when the peer's CLOSE arrives.
    pub fn channel_close(&mut self, channel: ChannelId) -> Result<()> {
        self.usable()?;
        let c = match self.channels.get_mut(channel) {
            Some(c) if c.state == ChannelState::Open => c,
            Some(_) => return Err(Error::InvalidCommand("the channel is not open")),
            None => return Err(Error::InvalidCommand("no such channel")),
        };
        if c.close_sent {
            return Ok(());
        }
        c.close_sent = true;
        let remote = c.remote_id;
        self.transport.send(|b| {
            b.put_u8(msg::CHANNEL_CLOSE);
            b.put_u32(remote);
        });
        Ok(())
    }

    /// Sends a channel request. With `want_reply`, a `ChannelReply` follows.
    pub fn channel_request(
        &mut self,
        channel: ChannelId,
        request: &ChannelRequest,
        want_reply: bool,
    ) -> Result<()> {
        let c = self.open_channel_mut(channel)?;
        if want_reply {
            c.awaiting_replies += 1;
        }
        let remote = c.remote_id;
        self.transport.send(|b| {
            b.put_u8(msg::CHANNEL_REQUEST);
            b.put_u32(remote);
            b.put_string(request.name().as_bytes());
            b.put_bool(want_reply);
            request.encode_data(b);
        });
        Ok(())
    }

    /// Answers the oldest unanswered want-reply request on `channel`.
    pub fn channel_reply(&mut self, channel: ChannelId, success: bool) -> Result<()> {
        let c = self.open_channel_mut(channel)?;
        if !c.replies.answer(success) {
            return Err(Error::InvalidCommand(
                "no channel request is waiting for a reply",
            ));
        }
        self.flush_channel_replies(channel);
        Ok(())
    }

    /// Sends a global request. With `want_reply`, a `GlobalReply` follows.
    pub fn global_request(&mut self, name: &str, data: &[u8], want_reply: bool) -> Result<()> {
        self.usable()?;
        if want_reply {
            self.global_waiters.push_back(GlobalWaiter::Application);
        }
        self.transport.send(|b| {
            b.put_u8(msg::GLOBAL_REQUEST);
            b.put_string(name.as_bytes());
            b.put_bool(want_reply);
            b.put_slice(data);
        });
        Ok(())
    }

    /// Answers the oldest unanswered global request; `data` follows the
    /// REQUEST_SUCCESS message number (ignored on failure).
    pub fn global_reply(&mut self, success: bool, data: Bytes) -> Result<()> {
        self.usable()?;
        let data = if success { data } else { Bytes::new() };
        if !self.global_replies.answer((success, data)) {
            return Err(Error::InvalidCommand(
                "no global request is waiting for a reply",
            ));
        }
        self.flush_global_replies();
        Ok(())
    }

    /// Starts a key re-exchange now (no-op while one is in flight).
    pub fn rekey(&mut self) {
        if self.closed.is_none() {
            self.transport.start_rekey();
        }
    }

    /// Ends the connection: queues a DISCONNECT with `reason` and `description`.
    pub fn disconnect(&mut self, reason: DisconnectReason, description: &str) {
        if self.closed.is_none() {
            self.transport.send_disconnect(reason, description);
            self.closed = Some(Error::Closed);
        }
    }
}
