//! Requests the peer starts: global requests, channel opens and channel
//! requests, with their replies kept in arrival order; and waking channels that
//! can send again.

use bytes::{BufMut, Bytes};

use super::{Connection, KEEPALIVE, MAX_OWED_REPLIES, lookup};
use crate::channel::{Channel, ChannelState};
use crate::error::{Error, Result};
use crate::event::{ChannelId, Event, open_failure};
use crate::request::ChannelRequest;
use crate::transport::Transport;
use crate::wire::{PutSsh, Reader, msg};

impl Connection {
    pub(super) fn on_global_request(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let name = r.utf8()?;
        let want_reply = r.bool()?;
        if want_reply && self.global_replies.len() >= MAX_OWED_REPLIES {
            return Err(Error::Limit("too many unanswered global requests"));
        }
        let deliver = self.config.global_requests.iter().any(|n| n == name);
        match name {
            KEEPALIVE if want_reply => self.global_replies.push_ready((true, Bytes::new())),
            "no-more-sessions@openssh.com" => {
                self.no_more_sessions = true;
                if want_reply {
                    self.global_replies.push_ready((true, Bytes::new()));
                }
            }
            _ if deliver => {
                if want_reply {
                    self.global_replies.push_pending();
                }
                let data = r.rest_bytes();
                self.events.push_back(Event::GlobalRequest {
                    name: name.to_owned(),
                    data,
                    want_reply,
                });
            }
            // Unknown names, and OpenSSH's hostkeys-00@openssh.com, are refused.
            _ if want_reply => self.global_replies.push_ready((false, Bytes::new())),
            _ => {}
        }
        self.flush_global_replies();
        Ok(())
    }

    pub(crate) fn flush_global_replies(&mut self) {
        while let Some((success, data)) = self.global_replies.pop_ready() {
            self.transport.send(|b| {
                b.put_u8(if success {
                    msg::REQUEST_SUCCESS
                } else {
                    msg::REQUEST_FAILURE
                });
                b.put_slice(&data);
            });
        }
    }

    pub(super) fn on_channel_open(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let channel_type = r.utf8()?;
        let (remote, window, max_packet) = (r.u32()?, r.u32()?, r.u32()?);
        let refuse = |t: &mut Transport, reason: u32, text: &str| {
            t.send(|b| {
                b.put_u8(msg::CHANNEL_OPEN_FAILURE);
                b.put_u32(remote);
                b.put_u32(reason);
                b.put_string(text.as_bytes());
                b.put_string(b"");
            });
            Ok(())
        };
        if !self.config.channel_types.iter().any(|t| t == channel_type) {
            return refuse(
                &mut self.transport,
                open_failure::UNKNOWN_CHANNEL_TYPE,
                "unknown channel type",
            );
        }
        if channel_type == "session" && self.no_more_sessions {
            return refuse(
                &mut self.transport,
                open_failure::ADMINISTRATIVELY_PROHIBITED,
                "no more sessions",
            );
        }
        let mut c = Channel::new(ChannelState::Offered, self.config.window);
        c.set_remote(remote, window, max_packet);
        let Some(channel) = self.channels.insert(c) else {
            return refuse(
                &mut self.transport,
                open_failure::RESOURCE_SHORTAGE,
                "too many channels",
            );
        };
        let data = r.rest_bytes();
        self.events.push_back(Event::ChannelOpen {
            channel,
            channel_type: channel_type.to_owned(),
            data,
        });
        Ok(())
    }

    pub(super) fn on_channel_request(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let (channel, c) = lookup(&mut self.channels, r)?;
        let name = r.utf8()?;
        let want_reply = r.bool()?;
        if c.state != ChannelState::Open {
            return Err(Error::Unexpected {
                msg: msg::CHANNEL_REQUEST,
                state: "on a channel that is not open",
            });
        }
        if want_reply && c.replies.len() >= MAX_OWED_REPLIES {
            return Err(Error::Limit("too many unanswered channel requests"));
        }
        let request = ChannelRequest::decode(name, r)?;
        let deliver =
            request.is_standard() || self.config.channel_requests.iter().any(|n| n == name);
        match name {
            KEEPALIVE if want_reply => c.replies.push_ready(true),
            _ if deliver => {
                if want_reply {
                    c.replies.push_pending();
                }
                self.events.push_back(Event::ChannelRequest {
                    channel,
                    request,
                    want_reply,
                });
            }
            // Unknown requests (and OpenSSH's eow@openssh.com) are refused or dropped.
            _ if want_reply => c.replies.push_ready(false),
            _ => {}
        }
        self.flush_channel_replies(channel);
        Ok(())
    }

    pub(crate) fn flush_channel_replies(&mut self, channel: ChannelId) {
        let Some(c) = self.channels.get_mut(channel) else {
            return;
        };
        let remote = c.remote_id;
        if c.close_sent {
            // RFC 4254 5.3: nothing may follow our CLOSE on this channel.
            while c.replies.pop_ready().is_some() {}
            return;
        }
        while let Some(success) = c.replies.pop_ready() {
            self.transport.send(|b| {
                b.put_u8(if success {
                    msg::CHANNEL_SUCCESS
                } else {
                    msg::CHANNEL_FAILURE
                });
                b.put_u32(remote);
            });
        }
    }

    /// Tells blocked channels they may send again, once there is room.
    pub(super) fn wake_blocked(&mut self) {
        if self.transport.buffered() >= self.config.send_buffer {
            return;
        }
        self.any_blocked = false;
        for (channel, c) in self.channels.iter_mut() {
            if c.blocked && c.send_window > 0 {
                c.blocked = false;
                self.events.push_back(Event::ChannelWritable { channel });
            } else if c.blocked {
                self.any_blocked = true;
            }
        }
    }
}
