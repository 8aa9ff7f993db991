//! `Connection`: one SSH connection, client or server, as a sans-IO state machine.
//!
//! The caller owns the socket and the clock. Feed received bytes with
//! [`Connection::handle_input`] (any split of the stream gives the same result),
//! write what [`Connection::poll_transmit`] returns, drain
//! [`Connection::poll_event`], and call [`Connection::handle_timeout`] when
//! [`Connection::poll_timeout`] falls due. After every call that changes state,
//! drain transmits and events before the next one (str0m's rule).
//!
//! The impl is split by direction: commands the application gives
//! (`open_channel`, `channel_send`, ...) in `connection/commands.rs`, requests
//! the peer starts in `connection/inbound.rs`, the rest here.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use crate::auth::{Authenticated, ClientAuth, ServerAuth};
use crate::channel::{Channel, ChannelState, Channels, ReplyQueue};
use crate::config::{Config, Role};
use crate::error::{Error, Result};
use crate::event::{ChannelId, Event};
use crate::packet::Packet;
use crate::transport::{Incoming, Transport};
use crate::wire::{PutSsh, Reader, msg};

mod commands;
mod inbound;

/// The name OpenSSH uses for keepalives, globally and per channel.
pub(crate) const KEEPALIVE: &str = "keepalive@openssh.com";

pub(crate) enum Auth {
    Client(ClientAuth),
    Server(ServerAuth),
}

/// Who is waiting for the reply to one of our global requests.
pub(crate) enum GlobalWaiter {
    Keepalive,
    Application,
}

/// One SSH connection.
pub struct Connection {
    pub(crate) config: Config,
    pub(crate) transport: Transport,
    pub(crate) auth: Auth,
    pub(crate) authenticated: bool,
    pub(crate) channels: Channels,
    pub(crate) events: VecDeque<Event>,
    pub(crate) global_replies: ReplyQueue<(bool, Bytes)>,
    pub(crate) global_waiters: VecDeque<GlobalWaiter>,
    pub(crate) keepalive_at: Option<Instant>,
    pub(crate) keepalives_unanswered: u32,
    pub(crate) handshake_deadline: Instant,
    pub(crate) closed: Option<Error>,
    pub(crate) no_more_sessions: bool,
    pub(crate) any_blocked: bool,
}

/// Owed replies a peer may pile up before it is cut off.
const MAX_OWED_REPLIES: usize = 1024;

impl Connection {
    /// A connection that has queued its version line and first KEXINIT.
    pub fn new(config: Config, now: Instant, rng: Box<dyn RngCore + Send>) -> Self {
        let transport = Transport::new(&config, now, rng);
        let auth = match config.role {
            Role::Client(_) => Auth::Client(ClientAuth::default()),
            Role::Server(_) => Auth::Server(ServerAuth::default()),
        };
        Self {
            channels: Channels::new(config.max_channels),
            handshake_deadline: now + config.handshake_timeout,
            config,
            transport,
            auth,
            authenticated: false,
            events: VecDeque::new(),
            global_replies: ReplyQueue::default(),
            global_waiters: VecDeque::new(),
            keepalive_at: None,
            keepalives_unanswered: 0,
            closed: None,
            no_more_sessions: false,
            any_blocked: false,
        }
    }

    /// Feeds bytes received from the peer. Consumes them all; returns how many.
    /// An error ends the connection: a DISCONNECT naming it is queued for the peer.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<usize> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        self.transport.feed(data);
        let result = self.process(now);
        self.check(result)?;
        Ok(data.len())
    }

    /// Like [`Connection::handle_input`], taking ownership of the bytes: when a
    /// caller reads into one large `BytesMut` and splits each read off it, the
    /// input is never copied (decryption happens in place, and channel data
    /// reaches the application as slices of the caller's buffer).
    pub fn handle_input_bytes(&mut self, now: Instant, data: BytesMut) -> Result<usize> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        let len = data.len();
        self.transport.feed_bytes(data);
        let result = self.process(now);
        self.check(result)?;
        Ok(len)
    }

    /// Ciphertext to write to the peer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let out = self.transport.take_transmit();
        if out.is_some() && self.any_blocked {
            self.wake_blocked();
        }
        out
    }

    /// Whether `poll_transmit` has something.
    pub fn has_transmit(&self) -> bool {
        self.transport.has_transmit()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next moment `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let handshake = (!self.authenticated).then_some(self.handshake_deadline);
        [
            handshake,
            self.keepalive_at,
            self.transport.rekey_deadline(),
            self.transport.kex_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Lets timers fire: handshake timeout, keepalives, time-based rekey, the
    /// deadline of a key re-exchange in flight.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        let result = self.timers(now);
        self.check(result)
    }

    /// Whether the connection has ended (the reason is in `close_reason`).
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why the connection ended.
    pub fn close_reason(&self) -> Option<&Error> {
        self.closed.as_ref()
    }

    /// Whether authentication has completed.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The session identifier, after the first key exchange.
    pub fn session_id(&self) -> Option<&[u8; 32]> {
        self.transport.session_id()
    }

    /// The server's host key (verified, on a client).
    pub fn host_key(&self) -> Option<&crate::keys::PublicKey> {
        self.transport.peer_host_key()
    }

    /// The algorithms of the last key exchange.
    pub fn negotiated(&self) -> Option<&crate::kex::Negotiated> {
        self.transport.negotiated()
    }

    /// Key exchanges completed (1 after the handshake, more after rekeys).
    pub fn kex_count(&self) -> u32 {
        self.transport.kex_count()
    }

    /// The peer's version line.
    pub fn peer_version(&self) -> Option<&[u8]> {
        self.transport.peer_version()
    }

    /// Signature algorithms a server announced with EXT_INFO (client side).
    pub fn server_sig_algs(&self) -> Option<&[String]> {
        self.transport.server_sig_algs()
    }

    /// Bytes the peer will still accept on `channel` right now.
    pub fn send_window(&self, channel: ChannelId) -> Option<u32> {
        self.channels.get(channel).map(|c| c.send_window)
    }

    /// Bytes sent on `channel` that the peer has not yet given back as window
    /// (see `Channel::unacknowledged`).
    pub fn unacknowledged(&self, channel: ChannelId) -> Option<u32> {
        self.channels.get(channel).map(|c| c.unacknowledged())
    }

    /// Open channels.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Turns a fatal error into a closed connection with a DISCONNECT queued.
    pub(crate) fn check<T>(&mut self, result: Result<T>) -> Result<T> {
        match result {
            Err(e) if e.is_fatal() => {
                if self.closed.is_none() {
                    if !matches!(e, Error::PeerDisconnected { .. }) {
                        self.transport
                            .send_disconnect(e.disconnect_reason(), &e.to_string());
                    }
                    self.closed = Some(e.clone());
                }
                Err(e)
            }
            other => other,
        }
    }

    fn process(&mut self, now: Instant) -> Result<()> {
        while let Some(incoming) = self.transport.poll(now)? {
            self.heard_from_peer(now);
            match incoming {
                Incoming::KexDone { first, negotiated } => {
                    let (cipher_out, cipher_in) = if self.config.is_client() {
                        (negotiated.cipher_c2s, negotiated.cipher_s2c)
                    } else {
                        (negotiated.cipher_s2c, negotiated.cipher_c2s)
                    };
                    self.events.push_back(Event::KexComplete {
                        rekey: !first,
                        kex: negotiated.kex,
                        cipher_out,
                        cipher_in,
                    });
                    if let (true, Auth::Client(auth)) = (first, &mut self.auth) {
                        auth.start(&mut self.transport);
                    }
                }
                Incoming::Payload(packet) => self.dispatch(packet, now)?,
            }
        }
        self.transport.check_rekey(now)
    }

    fn heard_from_peer(&mut self, now: Instant) {
        self.keepalives_unanswered = 0;
        if let (true, Some(interval)) = (self.authenticated, self.config.keepalive_interval) {
            self.keepalive_at = Some(now + interval);
        }
    }

    fn timers(&mut self, now: Instant) -> Result<()> {
        if !self.authenticated && now >= self.handshake_deadline {
            return Err(Error::Timeout(
                "key exchange and authentication did not finish in time",
            ));
        }
        if let (Some(at), Some(interval)) = (self.keepalive_at, self.config.keepalive_interval)
            && now >= at
        {
            if self.keepalives_unanswered >= self.config.keepalive_max {
                return Err(Error::Timeout("the peer stopped answering keepalives"));
            }
            self.keepalives_unanswered += 1;
            self.keepalive_at = Some(now + interval);
            self.global_waiters.push_back(GlobalWaiter::Keepalive);
            self.transport.send(|b| {
                b.put_u8(msg::GLOBAL_REQUEST);
                b.put_string(KEEPALIVE.as_bytes());
                b.put_bool(true);
            });
        }
        self.transport.check_rekey(now)
    }

    fn on_authenticated(&mut self, who: Authenticated, now: Instant) {
        self.authenticated = true;
        self.transport.authenticated();
        self.events.push_back(Event::Authenticated(who));
        self.heard_from_peer(now);
    }

    fn dispatch(&mut self, packet: Packet, now: Instant) -> Result<()> {
        let m = packet.payload[0];
        let payload = &packet.payload;
        match (&mut self.auth, m) {
            (Auth::Server(auth), msg::SERVICE_REQUEST) => {
                auth.on_service_request(&mut self.transport, payload)
            }
            (Auth::Server(auth), msg::USERAUTH_REQUEST) => {
                let Role::Server(cfg) = &self.config.role else {
                    unreachable!("server auth")
                };
                let result = auth.on_request(&mut self.transport, cfg, payload);
                self.events
                    .extend(auth.rejected.drain(..).map(Event::AuthRejected));
                if let Some(who) = result? {
                    self.on_authenticated(who, now);
                }
                Ok(())
            }
            (Auth::Client(auth), msg::SERVICE_ACCEPT | 50..=79) => {
                let Role::Client(cfg) = &self.config.role else {
                    unreachable!("client auth")
                };
                if auth.on_message(&mut self.transport, cfg, payload)? {
                    let who = Authenticated {
                        user: cfg.user.clone(),
                        key: cfg.key.as_ref().map(|k| *k.public()),
                    };
                    self.on_authenticated(who, now);
                }
                Ok(())
            }
            (_, 80..=127) if !self.authenticated => Err(Error::Unexpected {
                msg: m,
                state: "before authentication",
            }),
            (_, 80..=127) => self.on_connection_message(packet),
            _ => {
                self.transport.send_unimplemented(packet.seq);
                Ok(())
            }
        }
    }

    fn on_connection_message(&mut self, packet: Packet) -> Result<()> {
        let payload = packet.payload;
        let m = payload[0];
        let body = payload.slice(1..);
        let mut r = Reader::from_bytes(&body, msg::name(m));
        match m {
            msg::GLOBAL_REQUEST => self.on_global_request(&mut r),
            msg::REQUEST_SUCCESS | msg::REQUEST_FAILURE => {
                match self.global_waiters.pop_front() {
                    Some(GlobalWaiter::Keepalive) => {}
                    Some(GlobalWaiter::Application) => self.events.push_back(Event::GlobalReply {
                        success: m == msg::REQUEST_SUCCESS,
                        data: r.rest_bytes(),
                    }),
                    None => {
                        return Err(Error::Unexpected {
                            msg: m,
                            state: "with no global request outstanding",
                        });
                    }
                }
                Ok(())
            }
            msg::CHANNEL_OPEN => self.on_channel_open(&mut r),
            msg::CHANNEL_OPEN_CONFIRMATION => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                if c.state != ChannelState::Opening {
                    return Err(Error::Unexpected {
                        msg: m,
                        state: "for a channel we did not open",
                    });
                }
                let (remote, window, max_packet) = (r.u32()?, r.u32()?, r.u32()?);
                c.set_remote(remote, window, max_packet);
                c.state = ChannelState::Open;
                self.events.push_back(Event::ChannelOpened { channel });
                Ok(())
            }
            msg::CHANNEL_OPEN_FAILURE => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                if c.state != ChannelState::Opening {
                    return Err(Error::Unexpected {
                        msg: m,
                        state: "for a channel we did not open",
                    });
                }
                let reason = r.u32()?;
                let description = String::from_utf8_lossy(r.string()?).into_owned();
                self.channels.remove(channel);
                self.events.push_back(Event::ChannelOpenFailed {
                    channel,
                    reason,
                    description,
                });
                Ok(())
            }
            msg::CHANNEL_WINDOW_ADJUST => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                c.add_send_window(r.u32()?);
                if c.blocked && self.transport.buffered() < self.config.send_buffer {
                    c.blocked = false;
                    self.events.push_back(Event::ChannelWritable { channel });
                }
                Ok(())
            }
            msg::CHANNEL_DATA | msg::CHANNEL_EXTENDED_DATA => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                let ext = if m == msg::CHANNEL_EXTENDED_DATA {
                    Some(r.u32()?)
                } else {
                    None
                };
                let data = r.bytes()?;
                let problem = if c.state != ChannelState::Open {
                    Some("the channel is not open")
                } else if c.eof_received {
                    Some("data after EOF")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(Error::ChannelState {
                        msg: msg::name(m),
                        channel: channel.0,
                        problem,
                    });
                }
                if data.len() > self.config.max_packet as usize {
                    return Err(Error::PacketTooLarge {
                        channel: channel.0,
                        len: data.len(),
                        max: self.config.max_packet,
                    });
                }
                if !c.receive(data.len() as u32) {
                    return Err(Error::WindowOverrun(channel.0));
                }
                if !c.close_sent && !data.is_empty() {
                    self.events
                        .push_back(Event::ChannelData { channel, ext, data });
                }
                Ok(())
            }
            msg::CHANNEL_EOF => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                if c.state != ChannelState::Open {
                    return Err(Error::ChannelState {
                        msg: "CHANNEL_EOF",
                        channel: channel.0,
                        problem: "the channel is not open",
                    });
                }
                if !c.eof_received {
                    c.eof_received = true;
                    self.events.push_back(Event::ChannelEof { channel });
                }
                Ok(())
            }
            msg::CHANNEL_CLOSE => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                if c.state != ChannelState::Open {
                    return Err(Error::Unexpected {
                        msg: m,
                        state: "on a channel that is not open",
                    });
                }
                if !c.close_sent {
                    let remote = c.remote_id;
                    self.transport.send(|b| {
                        b.put_u8(msg::CHANNEL_CLOSE);
                        b.put_u32(remote);
                    });
                }
                self.channels.remove(channel);
                self.events.push_back(Event::ChannelClosed { channel });
                Ok(())
            }
            msg::CHANNEL_REQUEST => self.on_channel_request(&mut r),
            msg::CHANNEL_SUCCESS | msg::CHANNEL_FAILURE => {
                let (channel, c) = lookup(&mut self.channels, &mut r)?;
                if c.awaiting_replies == 0 {
                    return Err(Error::Unexpected {
                        msg: m,
                        state: "with no channel request outstanding",
                    });
                }
                c.awaiting_replies -= 1;
                self.events.push_back(Event::ChannelReply {
                    channel,
                    success: m == msg::CHANNEL_SUCCESS,
                });
                Ok(())
            }
            _ => {
                self.transport.send_unimplemented(packet.seq);
                Ok(())
            }
        }
    }
}

/// The channel a message names by its recipient channel field.
fn lookup<'c>(
    channels: &'c mut Channels,
    r: &mut Reader<'_>,
) -> Result<(ChannelId, &'c mut Channel)> {
    let id = r.u32()?;
    let channel = ChannelId(id);
    match channels.get_mut(channel) {
        Some(c) => Ok((channel, c)),
        None => Err(Error::UnknownChannel {
            msg: r.what(),
            channel: id,
        }),
    }
}
