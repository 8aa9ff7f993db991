//! `GuestLink`: the guest's side of one link (docs/PROTOCOL.md section 4) over
//! an SSH server [`Connection`]: which channel may do what, attach validation,
//! replay with `output-gap@tether`, stream selection, the end sequence, when
//! stdin window is returned, `block` credits, and container-list pushes.
//!
//! Same shape as `Connection`: feed input and time, call [`GuestLink::pump`]
//! after anything changed (input, time, or the sessions: output, exits, stdin
//! written), then drain `poll_transmit` and `poll_event`. The runtime carries
//! out the events (start a process, write stdin, signal, resize) and reports
//! back through [`Sessions`].

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::messages::{self as m, AttachRequest, ForkMode, State};
use super::sessions::{Credit, LinkId, Sessions};
use super::signal::Signal;
use crate::auth::{Authenticated, Rejected};
use crate::error::{DisconnectReason, Error, Result};
use crate::event::{ChannelId, EXTENDED_STDERR, Event, open_failure};
use crate::outlog::{Overflow, Read, Stream};
use crate::request::{ChannelRequest, PtyRequest};
use crate::{Config, Connection};

/// Most output pulled from a log per channel per read.
const READ_CHUNK: usize = 256 * 1024;
/// Most `env` requests a session channel may carry before its `exec`.
const MAX_ENV: usize = 1024;

/// What a link asks the guest runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestEvent {
    /// The appliance authenticated (for the log).
    Authenticated(Authenticated),
    /// An authentication attempt was refused (for the log).
    AuthRejected(Rejected),
    /// Start an exec session's process: `command` through the shell's `-c`, or
    /// the shell itself when `None`. A failure to start goes to
    /// [`Sessions::fail`]; success to [`Sessions::started`].
    Exec {
        session: String,
        command: Option<String>,
        pty: Option<PtyRequest>,
        env: Vec<(String, String)>,
    },
    /// Release a start-gated session: start its process.
    Start { session: String },
    /// Write to the process's stdin, then return `credit` with
    /// [`Sessions::stdin_written`] (also if the bytes could not be written).
    Stdin {
        session: String,
        data: Bytes,
        credit: Credit,
    },
    /// Close the process's stdin after what was written; a terminal gets its
    /// EOF character instead.
    CloseStdin { session: String },
    /// Deliver a signal to the session's process group.
    Signal { session: String, signal: Signal },
    /// Resize the session's terminal.
    Resize {
        session: String,
        cols: u16,
        rows: u16,
    },
    /// `fork@tether`: quiesce or resume (docs/PROTOCOL.md 4.5); answer with
    /// [`GuestLink::fork_done`] on this link. A guest that cannot fork
    /// answers at once with `None`.
    Fork { mode: ForkMode },
    /// The appliance answered this link's `forked@tether` (FAILURE: an
    /// appliance that predates fork; the child runs on).
    ForkedAnswered { accepted: bool },
}

/// A global request waiting for its reply: replies go out in request order,
/// so a list asked for behind a fork waits for the fork.
enum Held {
    List,
    Fork(ForkMode),
    Refused,
}

/// Why new sessions and attachments to stopped ones are refused.
pub const QUIESCED: &str = "quiesced for fork";
/// The DISCONNECT description after a quiesce.
pub const QUIESCED_DISCONNECT: &str = "tether: quiesced for fork";

/// What a channel is for.
enum Role {
    /// A `session` channel before its `exec` or `shell`.
    Setup {
        pty: Option<PtyRequest>,
        env: Vec<(String, String)>,
    },
    /// Attached to a session's stdio (an attach, a control channel, an exec).
    Attached(Attached),
}

struct Attached {
    session: String,
    /// Opened as `attach@tether` (the appliance closes it after the end
    /// sequence); else an exec's session channel (the guest closes it).
    attach: bool,
    /// The next output offset to send.
    cursor: u64,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    /// The end sequence went out (or the channel carries no output).
    done: bool,
}

/// The guest's side of one link.
pub struct GuestLink {
    conn: Connection,
    link: LinkId,
    roles: BTreeMap<ChannelId, Role>,
    /// The `Sessions::version` last pushed or replied.
    pushed: Option<u64>,
    events: VecDeque<GuestEvent>,
    /// Global requests not yet answered, oldest first (behind a fork).
    held: VecDeque<Held>,
    /// This link sent the pending `forked@tether`.
    forked_sent: bool,
}

fn encode(f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    f(&mut b);
    b.freeze()
}

fn other(name: &str, data: Bytes) -> ChannelRequest {
    ChannelRequest::Other {
        name: name.into(),
        data,
    }
}

impl GuestLink {
    /// A link over a new server connection; `config` gets the tether
    /// extensions enabled.
    pub fn new(
        mut config: Config,
        now: Instant,
        rng: Box<dyn rand_core::RngCore + Send>,
        sessions: &mut Sessions,
    ) -> Self {
        m::enable_guest(&mut config);
        Self {
            conn: Connection::new(config, now, rng),
            link: sessions.new_link(),
            roles: BTreeMap::new(),
            pushed: None,
            events: VecDeque::new(),
            held: VecDeque::new(),
            forked_sent: false,
        }
    }

    /// The SSH connection underneath (for its state: peer, algorithms).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Feeds received bytes (any split gives the same result).
    pub fn handle_input(&mut self, s: &mut Sessions, now: Instant, data: &[u8]) -> Result<()> {
        let result = self.conn.handle_input(now, data).map(drop);
        self.handle_events(s);
        result
    }

    /// Like [`GuestLink::handle_input`], taking ownership (no copy).
    pub fn handle_input_bytes(
        &mut self,
        s: &mut Sessions,
        now: Instant,
        data: BytesMut,
    ) -> Result<()> {
        let result = self.conn.handle_input_bytes(now, data).map(drop);
        self.handle_events(s);
        result
    }

    /// Lets timers fire.
    pub fn handle_timeout(&mut self, s: &mut Sessions, now: Instant) -> Result<()> {
        let result = self.conn.handle_timeout(now);
        self.handle_events(s);
        result
    }

    /// The next moment `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// Ciphertext to write to the peer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.conn.poll_transmit()
    }

    /// Whether `poll_transmit` has something.
    pub fn has_transmit(&self) -> bool {
        self.conn.has_transmit()
    }

    /// The next thing for the runtime to do.
    pub fn poll_event(&mut self) -> Option<GuestEvent> {
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

    /// Ends the link with a DISCONNECT carrying `description`.
    pub fn disconnect(&mut self, reason: DisconnectReason, description: &str) {
        self.conn.disconnect(reason, description);
    }

    /// The link is gone: forget its readers and credits. Call once, last.
    pub fn end(self, s: &mut Sessions) {
        s.link_gone(self.link);
    }

    fn handle_events(&mut self, s: &mut Sessions) {
        while let Some(event) = self.conn.poll_event() {
            // A command refused here means the connection is closing: its
            // close reason says why.
            let _ = self.handle_event(s, event);
        }
    }

    fn handle_event(&mut self, s: &mut Sessions, event: Event) -> Result<()> {
        match event {
            Event::Authenticated(who) => self.events.push_back(GuestEvent::Authenticated(who)),
            Event::AuthRejected(r) => self.events.push_back(GuestEvent::AuthRejected(r)),
            Event::ChannelOpen {
                channel,
                channel_type,
                data,
            } => match channel_type.as_str() {
                "session" if s.quiesced() => self.conn.reject_channel(
                    channel,
                    open_failure::ADMINISTRATIVELY_PROHIBITED,
                    QUIESCED,
                )?,
                "session" => {
                    self.conn.accept_channel(channel)?;
                    let setup = Role::Setup {
                        pty: None,
                        env: Vec::new(),
                    };
                    self.roles.insert(channel, setup);
                }
                m::ATTACH => self.open_attach(s, channel, &data)?,
                _ => self.conn.reject_channel(
                    channel,
                    open_failure::UNKNOWN_CHANNEL_TYPE,
                    "unknown channel type",
                )?,
            },
            Event::ChannelRequest {
                channel,
                request,
                want_reply,
            } => {
                let ok = self.channel_request(s, channel, request);
                if want_reply {
                    self.conn.channel_reply(channel, ok)?;
                }
            }
            Event::ChannelData { channel, data, .. } => self.stdin(s, channel, data)?,
            Event::ChannelEof { channel } => {
                if let Some(Role::Attached(a)) = self.roles.get(&channel)
                    && a.stdin
                    && let Some(session) = s.get_mut(&a.session)
                    && session.stdin_open
                {
                    // A terminal takes its EOF character and stays open.
                    session.stdin_open = session.tty;
                    let session = a.session.clone();
                    self.events.push_back(GuestEvent::CloseStdin { session });
                }
            }
            Event::ChannelClosed { channel } => {
                if let Some(Role::Attached(a)) = self.roles.remove(&channel) {
                    if a.attach && a.done && a.session == s.primary() && (a.stdout || a.stderr) {
                        // The appliance closes an attach channel after its
                        // end sequence once it holds the output.
                        s.note_primary_drained();
                    }
                    s.remove_reader(&a.session, (self.link, channel));
                }
            }
            Event::GlobalRequest {
                name,
                data,
                want_reply,
            } if want_reply => {
                let held = match name.as_str() {
                    m::CONTAINER_IDS => Held::List,
                    m::FORK => match m::decode_fork(&data)
                        .ok()
                        .as_deref()
                        .and_then(ForkMode::parse)
                    {
                        Some(mode) => {
                            self.events.push_back(GuestEvent::Fork { mode });
                            Held::Fork(mode)
                        }
                        None => Held::Refused,
                    },
                    _ => Held::Refused,
                };
                self.held.push_back(held);
                self.answer_held(s)?;
            }
            Event::GlobalReply { success, .. } if self.forked_sent => {
                // The only global request this side sends with want-reply.
                self.forked_sent = false;
                s.fork_answered();
                let accepted = success;
                self.events
                    .push_back(GuestEvent::ForkedAnswered { accepted });
            }
            _ => {}
        }
        Ok(())
    }

    /// Answers the held global requests from the oldest, up to the first
    /// fork still in progress, or a list while a child has not sent its
    /// `forked@tether` on this link yet (its names may still be its
    /// parent's, and the appliance must know it is a child before it reads
    /// them).
    fn answer_held(&mut self, s: &Sessions) -> Result<()> {
        while let Some(held) = self.held.front() {
            match held {
                Held::Fork(_) => return Ok(()),
                Held::List if s.recovering() || (s.fork_announced() && !self.forked_sent) => {
                    return Ok(());
                }
                Held::List => {
                    let list = encode(|b| m::encode_container_ids(&s.list(), b));
                    self.pushed = Some(s.version());
                    self.conn.global_reply(true, list)?;
                }
                Held::Refused => self.conn.global_reply(false, Bytes::new())?,
            }
            self.held.pop_front();
        }
        Ok(())
    }

    /// Answers this link's oldest `fork@tether` ([`GuestEvent::Fork`]):
    /// `Some(generation)` for SUCCESS (a quiesce's reply carries it, and the
    /// link then ends with DISCONNECT `tether: quiesced for fork`), `None`
    /// for FAILURE.
    pub fn fork_done(&mut self, s: &mut Sessions, result: Option<u64>) {
        let Some(i) = self.held.iter().position(|h| matches!(h, Held::Fork(_))) else {
            return;
        };
        let Some(Held::Fork(mode)) = self.held.remove(i) else {
            return;
        };
        // Requests held behind it are answered after it, in order.
        let behind: Vec<Held> = self.held.drain(i..).collect();
        let data = match (mode, result) {
            (ForkMode::Quiesce, Some(generation)) => {
                encode(|b| m::encode_fork_reply(generation, b))
            }
            _ => Bytes::new(),
        };
        if self.conn.global_reply(result.is_some(), data).is_err() {
            return;
        }
        self.held.extend(behind);
        let _ = self.answer_held(s);
        if mode == ForkMode::Quiesce && result.is_some() {
            self.conn
                .disconnect(DisconnectReason::ByApplication, QUIESCED_DISCONNECT);
        }
    }

    /// Input from the appliance: to the process if the channel may write its
    /// stdin and it is open, else straight back to the window.
    fn stdin(&mut self, s: &mut Sessions, channel: ChannelId, data: Bytes) -> Result<()> {
        if let Some(Role::Attached(a)) = self.roles.get(&channel)
            && a.stdin
            && s.get(&a.session).is_some_and(|s| s.stdin_open)
        {
            let credit = Credit {
                link: self.link,
                channel,
            };
            let session = a.session.clone();
            self.events.push_back(GuestEvent::Stdin {
                session,
                data,
                credit,
            });
            return Ok(());
        }
        self.conn.channel_consume(channel, data.len())
    }

    fn open_attach(&mut self, s: &mut Sessions, channel: ChannelId, data: &[u8]) -> Result<()> {
        let refuse = |conn: &mut Connection, why: String| {
            conn.reject_channel(channel, open_failure::CONNECT_FAILED, &why)
        };
        let req = match AttachRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return refuse(&mut self.conn, format!("bad attach request: {e}")),
        };
        let Some(session) = s.get(&req.id) else {
            return refuse(&mut self.conn, format!("unknown session {}", req.id));
        };
        if s.quiesced() && session.state != State::Exited {
            return refuse(&mut self.conn, QUIESCED.into());
        }
        let (start, end) = (session.log.start(), session.log.end());
        let from = if req.from == m::LIVE { end } else { req.from };
        if from > end {
            let why = format!("offset {from} is beyond the end of output ({end})");
            return refuse(&mut self.conn, why);
        }
        self.conn.accept_channel(channel)?;
        let offset = encode(|b| m::encode_offset(from, b));
        self.conn
            .channel_request(channel, &other(m::OFFSET, offset), false)?;
        let mut cursor = from;
        if from < start {
            let gap = encode(|b| m::encode_output_gap(start - from, b));
            self.conn
                .channel_request(channel, &other(m::OUTPUT_GAP, gap), false)?;
            cursor = start;
        }
        let attached = Attached {
            session: req.id,
            attach: true,
            cursor,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            done: !(req.stdout || req.stderr),
        };
        self.roles.insert(channel, Role::Attached(attached));
        Ok(())
    }

    /// Handles a channel request; returns the reply.
    fn channel_request(
        &mut self,
        s: &mut Sessions,
        channel: ChannelId,
        request: ChannelRequest,
    ) -> bool {
        match self.roles.get_mut(&channel) {
            Some(Role::Setup { pty, env }) => match request {
                ChannelRequest::Pty(p) => {
                    *pty = Some(p);
                    true
                }
                ChannelRequest::Env { name, value } if env.len() < MAX_ENV => {
                    env.push((name, String::from_utf8_lossy(&value).into_owned()));
                    true
                }
                ChannelRequest::WindowChange { cols, rows, .. } => {
                    if let Some(p) = pty {
                        (p.cols, p.rows) = (cols, rows);
                    }
                    true
                }
                ChannelRequest::Exec { .. } | ChannelRequest::Shell if s.quiesced() => false,
                ChannelRequest::Exec { .. } | ChannelRequest::Shell => {
                    let command = match request {
                        ChannelRequest::Exec { command } => {
                            Some(String::from_utf8_lossy(&command).into_owned())
                        }
                        _ => None,
                    };
                    let (pty, env) = (pty.take(), std::mem::take(env));
                    self.start_exec(s, channel, command, pty, env)
                }
                _ => false,
            },
            Some(Role::Attached(a)) => {
                let session = a.session.clone();
                let quiesced = s.quiesced();
                let Some(state) = s.get_mut(&session) else {
                    return false;
                };
                match request {
                    ChannelRequest::WindowChange { cols, rows, .. } => {
                        if !state.tty || state.state == State::Exited {
                            return false;
                        }
                        let (cols, rows) = (clamp_u16(cols), clamp_u16(rows));
                        self.events.push_back(GuestEvent::Resize {
                            session,
                            cols,
                            rows,
                        });
                        true
                    }
                    ChannelRequest::Signal { name } => {
                        let Some(signal) = Signal::parse(&name) else {
                            return false;
                        };
                        if state.state != State::Running {
                            return false;
                        }
                        self.events
                            .push_back(GuestEvent::Signal { session, signal });
                        true
                    }
                    ChannelRequest::Other { name, .. } if name == m::START => {
                        if state.state != State::Created || state.start_requested || quiesced {
                            return false;
                        }
                        state.start_requested = true;
                        self.events.push_back(GuestEvent::Start { session });
                        true
                    }
                    _ => false,
                }
            }
            None => false,
        }
    }

    /// A session channel's `exec` or `shell`: a new exec session, named to the
    /// appliance before anything else happens on the channel.
    fn start_exec(
        &mut self,
        s: &mut Sessions,
        channel: ChannelId,
        command: Option<String>,
        pty: Option<PtyRequest>,
        env: Vec<(String, String)>,
    ) -> bool {
        let session = s.add_exec(pty.is_some());
        let id = encode(|b| m::encode_exec_id(&session, b));
        if self
            .conn
            .channel_request(channel, &other(m::EXEC_ID, id), false)
            .is_err()
        {
            return false;
        }
        let attached = Attached {
            session: session.clone(),
            attach: false,
            cursor: 0,
            stdin: true,
            stdout: true,
            stderr: true,
            done: false,
        };
        self.roles.insert(channel, Role::Attached(attached));
        self.events.push_back(GuestEvent::Exec {
            session,
            command,
            pty,
            env,
        });
        true
    }

    /// Moves output from logs into channels, finishes channels of exited
    /// sessions, returns stdin window, and pushes container-list changes.
    /// Call after anything changed.
    pub fn pump(&mut self, s: &mut Sessions) {
        if self.conn.is_closed() {
            return;
        }
        let mut blocked: Vec<String> = Vec::new();
        for (&channel, role) in self.roles.iter_mut() {
            let Role::Attached(a) = role else { continue };
            if a.done {
                continue;
            }
            let Some(session) = s.get_mut(&a.session) else {
                continue;
            };
            send_output(&mut self.conn, channel, a, session);
            if session.log.overflow() == Overflow::Block {
                // Sent output stops counting against the log; it is freed only
                // once the appliance acknowledged it by returning window, so
                // bytes in flight when a link drops are replayed, never lost.
                let unacked = self.conn.unacknowledged(channel).unwrap_or(0) as u64;
                let acked = a.cursor.saturating_sub(unacked);
                s.set_reader(&a.session, (self.link, channel), a.cursor, acked);
                blocked.push(a.session.clone());
            }
        }
        blocked.sort();
        blocked.dedup();
        for id in blocked {
            s.apply_readers(&id);
        }
        for (channel, n) in s.take_credits(self.link) {
            let _ = self.conn.channel_consume(channel, n);
        }
        // A recovering child announces nothing yet: its `forked@tether` comes
        // first, once recovery ends.
        if self.conn.is_authenticated() && !s.recovering() {
            self.send_forked(s);
            // Fails only on a closed connection, which stops the pump anyway.
            let _ = self.answer_held(s);
            self.push_list(s);
            self.note_exit_reported(s);
        }
    }

    /// A child's announcement, first after authentication, once per link
    /// until an appliance answers.
    fn send_forked(&mut self, s: &mut Sessions) {
        if self.forked_sent {
            return;
        }
        let Some(forked) = s.pending_fork() else {
            return;
        };
        let data = encode(|b| forked.encode(b));
        if self.conn.global_request(m::FORKED, &data, true).is_ok() {
            self.forked_sent = true;
        }
    }

    /// Whether every attachment that follows output has been given all its
    /// session's output so far (a fork's quiesce drains until it has).
    pub fn output_sent(&self, s: &Sessions) -> bool {
        self.conn.is_closed()
            || self.roles.values().all(|r| match r {
                Role::Attached(a) if !a.done && (a.stdout || a.stderr) => s
                    .get(&a.session)
                    .is_none_or(|session| a.cursor >= session.log.end()),
                _ => true,
            })
    }

    fn push_list(&mut self, s: &Sessions) {
        if self.pushed == Some(s.version()) {
            return;
        }
        let list = encode(|b| m::encode_container_ids(&s.list(), b));
        if self
            .conn
            .global_request(m::CONTAINER_IDS, &list, false)
            .is_ok()
        {
            self.pushed = Some(s.version());
        }
    }

    /// Tells the sessions once the primary's exit has reached the appliance:
    /// pushed, its output carried to the end by an attachment and that
    /// attachment closed by the appliance, which means it holds the output
    /// (a primary that exits before anyone attached waits for one, up to
    /// `exit_linger`), and every attachment to it closed.
    fn note_exit_reported(&self, s: &mut Sessions) {
        let primary = s.primary();
        let exited = s.state(primary) == Some(State::Exited);
        let pushed = self.pushed == Some(s.version());
        let open = self.roles.values().any(|r| {
            matches!(r, Role::Attached(a) if a.session == primary
                && (!a.done || (a.attach && (a.stdout || a.stderr))))
        });
        if exited && pushed && !open && s.primary_drained() {
            s.note_exit_reported();
        }
    }
}

fn clamp_u16(n: u32) -> u16 {
    n.clamp(1, u16::MAX as u32) as u16
}

/// Sends what the channel's window allows from the session's log; after the
/// last byte of an exited session, the end sequence.
fn send_output(
    conn: &mut Connection,
    channel: ChannelId,
    a: &mut Attached,
    session: &mut super::sessions::Session,
) {
    loop {
        let window = conn.send_window(channel).unwrap_or(0) as usize;
        if window == 0 {
            return;
        }
        match session.log.read(a.cursor, window.min(READ_CHUNK)) {
            Read::Gap { lost, resume } => {
                let gap = encode(|b| m::encode_output_gap(lost, b));
                let _ = conn.channel_request(channel, &other(m::OUTPUT_GAP, gap), false);
                a.cursor = resume;
            }
            Read::Data { stream, data, next } => {
                let (wanted, ext) = match stream {
                    Stream::Stdout => (a.stdout, None),
                    Stream::Stderr => (a.stderr, Some(EXTENDED_STDERR)),
                };
                if !wanted {
                    a.cursor = next;
                    continue;
                }
                let sent = conn.channel_send(channel, ext, &data).unwrap_or(0);
                a.cursor += sent as u64;
                if sent < data.len() {
                    return;
                }
            }
            Read::End => {
                if let Some(exit) = &session.exit {
                    let _ = conn.channel_request(channel, &exit.request(), false);
                    let _ = conn.channel_eof(channel);
                    if !a.attach {
                        let _ = conn.channel_close(channel);
                    }
                }
                a.done = true;
                return;
            }
            Read::Pending | Read::Beyond { .. } => return,
        }
    }
}
