//! `ApplianceLink`: the appliance's side of one link (docs/PROTOCOL.md section
//! 4) over an SSH client [`Connection`]: container lists asked for and pushed,
//! attach channels with their start offset (`offset@tether`), gaps and end
//! sequence, the exec-open sequence (env, pty-req, exec, `exec-id@tether`),
//! control channels that carry one request, and stdin held until the guest's
//! window takes it.
//!
//! Same shape as `Connection`: commands in, then drain `poll_transmit` and
//! `poll_event`. Channel ids returned by `open` name the channel in every
//! later event.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::messages::{self as m, AttachRequest, ContainerInfo, ExitStatus, ForkMode, Forked};
use crate::error::{Error, Result};
use crate::event::ChannelId;
use crate::request::ChannelRequest;
use crate::{Config, Connection};

mod inbound;

/// Names one of our container-list requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListId(u64);

/// What to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// Attach to a session's stdio. With neither stdout nor stderr it is a
    /// control channel: no output, no end sequence.
    Attach(AttachRequest),
    /// Start a process through the guest's shell (`sh -c command`): it becomes
    /// an exec session, attached from its first byte.
    Exec {
        command: String,
        /// A terminal of (cols, rows).
        tty: Option<(u32, u32)>,
        env: Vec<(String, String)>,
    },
}

/// What a link tells the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplianceEvent {
    /// The guest proved its host key (see `connection().host_key()`).
    Authenticated,
    /// A container list: the reply to [`ApplianceLink::list`], or a push or
    /// the link's own first request (`reply` = `None`).
    Containers {
        list: Vec<ContainerInfo>,
        reply: Option<ListId>,
    },
    /// A container list request failed, or a pushed list did not parse.
    ListFailed {
        reply: Option<ListId>,
        reason: String,
    },
    /// A channel is open. An attach knows its exact start `offset` (from
    /// `offset@tether`); an exec knows the id the guest gave it.
    Opened {
        channel: ChannelId,
        offset: Option<u64>,
        exec_id: Option<String>,
    },
    /// The guest refused the channel (or, for an exec, the command).
    OpenFailed { channel: ChannelId, reason: String },
    /// Output: `ext` is `None` for stdout, `Some(1)` for stderr. Hand the
    /// window back with [`ApplianceLink::consumed`] once used.
    Data {
        channel: ChannelId,
        ext: Option<u32>,
        data: Bytes,
    },
    /// `lost` bytes of output are gone before what follows.
    Gap { channel: ChannelId, lost: u64 },
    /// The process ended; all its output was delivered.
    Exit {
        channel: ChannelId,
        status: ExitStatus,
    },
    /// The reply to a request sent with `want_reply` (or to a control request).
    Reply { channel: ChannelId, success: bool },
    /// `n` bytes of queued stdin left for the guest, or were dropped with the
    /// channel: they no longer count against the sender.
    StdinSent { channel: ChannelId, n: usize },
    /// The channel is gone.
    Closed { channel: ChannelId },
    /// The guest's reply to [`ApplianceLink::fork`]: `success`, and for a
    /// quiesce the guest's identity generation (docs/PROTOCOL.md 4.5).
    Fork {
        mode: ForkMode,
        success: bool,
        generation: Option<u64>,
    },
    /// A forked child announced itself (`forked@tether`; the link answered
    /// SUCCESS). A non-empty `failure` means its recovery failed.
    Forked(Forked),
}

/// Who waits for the reply to one of our global requests.
#[derive(Debug, Clone, Copy)]
enum GlobalWaiter {
    /// A container list: ours (`Some`) or the link's own first one.
    List(Option<ListId>),
    Fork(ForkMode),
}

/// Who waits for a channel reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// The application (`request` with want_reply).
    Caller,
    /// The `exec` of an exec channel: its reply completes the open.
    Exec,
    /// A control channel's one request: reply, then close.
    Control,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Attach,
    Exec,
    Control,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// CHANNEL_OPEN sent.
    Opening,
    /// Confirmed; an attach waits for its `offset@tether`, an exec for the
    /// reply to `exec`, a control channel for the reply to its request.
    Confirmed,
    /// `Opened` was reported.
    Open,
    /// `OpenFailed` was reported; the channel is closing.
    Failed,
}

#[derive(Debug)]
struct Chan {
    kind: Kind,
    phase: Phase,
    /// An exec's command, or a control channel's request, until it goes out.
    pending: Option<Pending>,
    exec_id: Option<String>,
    waiters: VecDeque<Waiter>,
    stdin: VecDeque<Bytes>,
    eof_after_stdin: bool,
}

#[derive(Debug)]
enum Pending {
    Exec(Open),
    Control(ChannelRequest),
}

impl Chan {
    fn new(kind: Kind, pending: Option<Pending>) -> Self {
        Self {
            kind,
            phase: Phase::Opening,
            pending,
            exec_id: None,
            waiters: VecDeque::new(),
            stdin: VecDeque::new(),
            eof_after_stdin: false,
        }
    }
}

/// The appliance's side of one link.
pub struct ApplianceLink {
    conn: Connection,
    chans: BTreeMap<ChannelId, Chan>,
    /// Our global requests awaiting a reply, in order.
    globals: VecDeque<GlobalWaiter>,
    next_list: u64,
    events: VecDeque<ApplianceEvent>,
}

fn encode(f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    f(&mut b);
    b.freeze()
}

impl ApplianceLink {
    /// A link over a new client connection; `config` gets the tether
    /// extensions enabled.
    pub fn new(mut config: Config, now: Instant, rng: Box<dyn rand_core::RngCore + Send>) -> Self {
        m::enable_appliance(&mut config);
        Self {
            conn: Connection::new(config, now, rng),
            chans: BTreeMap::new(),
            globals: VecDeque::new(),
            next_list: 0,
            events: VecDeque::new(),
        }
    }

    /// The SSH connection underneath (the guest's host key, algorithms).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Feeds received bytes (any split gives the same result).
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<()> {
        let result = self.conn.handle_input(now, data).map(drop);
        self.handle_events();
        result
    }

    /// Like [`ApplianceLink::handle_input`], taking ownership (no copy).
    pub fn handle_input_bytes(&mut self, now: Instant, data: BytesMut) -> Result<()> {
        let result = self.conn.handle_input_bytes(now, data).map(drop);
        self.handle_events();
        result
    }

    /// Lets timers fire.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        let result = self.conn.handle_timeout(now);
        self.handle_events();
        result
    }

    /// The next moment `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// Ciphertext to write to the guest.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let out = self.conn.poll_transmit();
        // Sending may have made room for blocked stdin.
        self.handle_events();
        out
    }

    /// Whether `poll_transmit` has something.
    pub fn has_transmit(&self) -> bool {
        self.conn.has_transmit()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ApplianceEvent> {
        self.events.pop_front()
    }

    /// Whether the link has ended.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Why the link ended.
    pub fn close_reason(&self) -> Option<&Error> {
        self.conn.close_reason()
    }

    /// Channels open or opening.
    pub fn channels(&self) -> impl Iterator<Item = ChannelId> + '_ {
        self.chans.keys().copied()
    }

    /// Asks the guest for its container list; the answer comes as
    /// `Containers` (or `ListFailed`) with this id.
    pub fn list(&mut self) -> Result<ListId> {
        self.conn.global_request(m::CONTAINER_IDS, &[], true)?;
        self.next_list += 1;
        let id = ListId(self.next_list);
        self.globals.push_back(GlobalWaiter::List(Some(id)));
        Ok(id)
    }

    /// Sends `fork@tether` with `mode`; the guest's answer comes as
    /// [`ApplianceEvent::Fork`]. After a successful quiesce the guest ends
    /// the link.
    pub fn fork(&mut self, mode: ForkMode) -> Result<()> {
        let data = encode(|b| m::encode_fork(mode, b));
        self.conn.global_request(m::FORK, &data, true)?;
        self.globals.push_back(GlobalWaiter::Fork(mode));
        Ok(())
    }

    /// Opens a channel; `Opened` or `OpenFailed` follows.
    pub fn open(&mut self, what: Open) -> Result<ChannelId> {
        let (channel, chan) = match what {
            Open::Attach(req) => {
                let data = encode(|b| req.encode(b));
                let channel = self.conn.open_channel(m::ATTACH, &data)?;
                (channel, Chan::new(Kind::Attach, None))
            }
            exec @ Open::Exec { .. } => {
                let channel = self.conn.open_session()?;
                (channel, Chan::new(Kind::Exec, Some(Pending::Exec(exec))))
            }
        };
        self.chans.insert(channel, chan);
        Ok(channel)
    }

    /// Opens a control channel to session `id`, sends `request` on it, reports
    /// the answer as `Reply` (or `OpenFailed`), and closes the channel.
    pub fn control(&mut self, id: &str, request: ChannelRequest) -> Result<ChannelId> {
        let req = AttachRequest {
            id: id.to_owned(),
            stdin: false,
            stdout: false,
            stderr: false,
            from: m::LIVE,
        };
        let data = encode(|b| req.encode(b));
        let channel = self.conn.open_channel(m::ATTACH, &data)?;
        let chan = Chan::new(Kind::Control, Some(Pending::Control(request)));
        self.chans.insert(channel, chan);
        Ok(channel)
    }

    /// Queues stdin for the process; it goes out as the guest's window allows.
    pub fn send_stdin(&mut self, channel: ChannelId, data: Bytes) {
        let n = data.len();
        match self.chans.get_mut(&channel) {
            Some(chan) if !chan.eof_after_stdin => {
                chan.stdin.push_back(data);
                self.flush_stdin(channel);
            }
            _ => self
                .events
                .push_back(ApplianceEvent::StdinSent { channel, n }),
        }
    }

    /// Closes the process's stdin once queued stdin has gone out.
    pub fn close_stdin(&mut self, channel: ChannelId) {
        if let Some(chan) = self.chans.get_mut(&channel) {
            chan.eof_after_stdin = true;
            self.flush_stdin(channel);
        }
    }

    /// Sends a channel request (window-change, signal); with `want_reply` a
    /// `Reply` follows.
    pub fn request(
        &mut self,
        channel: ChannelId,
        request: &ChannelRequest,
        want_reply: bool,
    ) -> Result<()> {
        let chan = self
            .chans
            .get_mut(&channel)
            .ok_or(Error::InvalidCommand("no such channel"))?;
        self.conn.channel_request(channel, request, want_reply)?;
        if want_reply {
            chan.waiters.push_back(Waiter::Caller);
        }
        Ok(())
    }

    /// `n` bytes of output were used: the guest may send more.
    pub fn consumed(&mut self, channel: ChannelId, n: usize) {
        let _ = self.conn.channel_consume(channel, n);
    }

    /// Closes a channel (a detach: the process keeps running). Queued stdin
    /// is dropped; `Closed` follows.
    pub fn close(&mut self, channel: ChannelId) {
        if let Some(chan) = self.chans.get_mut(&channel) {
            let dropped: usize = chan.stdin.drain(..).map(|b| b.len()).sum();
            if dropped > 0 {
                self.events.push_back(ApplianceEvent::StdinSent {
                    channel,
                    n: dropped,
                });
            }
        }
        let _ = self.conn.channel_close(channel);
    }

    fn flush_stdin(&mut self, channel: ChannelId) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        if chan.phase == Phase::Opening {
            return;
        }
        while let Some(front) = chan.stdin.front_mut() {
            let n = self.conn.channel_send(channel, None, front).unwrap_or(0);
            if n > 0 {
                self.events
                    .push_back(ApplianceEvent::StdinSent { channel, n });
            }
            if n < front.len() {
                *front = front.slice(n..);
                return;
            }
            chan.stdin.pop_front();
        }
        if std::mem::take(&mut chan.eof_after_stdin) {
            let _ = self.conn.channel_eof(channel);
        }
    }
}
