//! Serving the appliance over one link: link sync (if the link needs it), then
//! an SSH server connection whose channels attach to sessions (`attach@tether`)
//! or start execs (standard `session` channels).

use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use proto_core::event::open_failure;
use proto_core::link::Responder;
use proto_core::outbox::Outbox;
use proto_core::tether::{self, AttachRequest, State};
use proto_core::{ChannelId, ChannelRequest, Connection, Event, PtyRequest, ServerConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use smol::Timer;
use tracing::{debug, info, warn};

use crate::config::parse_signal;
use crate::guest::Guest;
use crate::linkspec::{Dialer, LinkSpec, LinkStream};
use crate::session::Credit;

mod backlog;
mod pump;
pub use backlog::Backlog;
use backlog::Unsent;
use pump::summary;

/// Most ciphertext taken from the connection and not yet written: beyond this
/// the connection's own send buffer pushes back on channel output.
const MAX_PENDING_WRITE: usize = 256 * 1024;
/// How long a peer has for link sync (a serial line restarts it, so this
/// only frees a slot held by a silent peer).
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer has for key exchange and authentication.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Peers a listening link serves at once.
const MAX_LISTEN_PEERS: usize = 16;
/// Most output pulled from a log per channel per round.
const READ_CHUNK: usize = 256 * 1024;

fn rng() -> Box<dyn rand_core::RngCore + Send> {
    Box::new(ChaCha20Rng::from_entropy())
}

/// Opens links forever, serving each until it drops, with backoff in between.
pub async fn run_links(guest: Rc<Guest>, spec: LinkSpec) {
    let mut backoff = Duration::from_millis(100);
    let dialer = loop {
        match Dialer::new(&spec) {
            Ok(d) => break d,
            Err(e) => {
                warn!("link {spec}: {e}; retrying in {backoff:?}");
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    if let Some(addr) = dialer.local_addr() {
        info!("link {spec}: listening on {addr}");
    }
    let listening = !matches!(dialer, Dialer::Connect(_));
    let active = Rc::new(std::cell::Cell::new(0usize));
    loop {
        match dialer.open().await {
            Ok(stream) if listening => {
                // A listening link serves several peers at once (an appliance and
                // an `ssh` user, say), up to a bound.
                if active.get() >= MAX_LISTEN_PEERS {
                    warn!(
                        "link {spec}: {MAX_LISTEN_PEERS} peers connected already; refusing another"
                    );
                    continue;
                }
                active.set(active.get() + 1);
                let (guest, active, sync) = (guest.clone(), active.clone(), spec.sync);
                guest.clone().spawn(async move {
                    run_one(&guest, &stream, sync).await;
                    active.set(active.get() - 1);
                });
            }
            Ok(stream) => {
                backoff = Duration::from_millis(100);
                run_one(&guest, &stream, spec.sync).await;
            }
            Err(e) => {
                // Also for listeners: a persistent accept error (out of file
                // descriptors, say) must not spin.
                warn!("link {spec}: {e}; retrying in {backoff:?}");
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if !listening {
            Timer::after(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Serves one link until it ends, then forgets what it was reading.
async fn run_one(guest: &Rc<Guest>, stream: &LinkStream, sync: bool) {
    let generation = guest.next_link();
    info!(link = generation, "link open");
    match serve(guest, stream, sync, generation).await {
        Ok(()) => info!(link = generation, "link closed"),
        Err(e) => warn!(link = generation, "link ended: {e}"),
    }
    guest.drop_link_readers(generation);
}

/// Runs link sync as the guest; returns the bytes that followed READY.
async fn sync(stream: &LinkStream) -> io::Result<Vec<u8>> {
    let mut responder = Responder::new(rng());
    if stream.is_serial() {
        // Opening the line discarded the HELLOs sent before: ask for one now.
        responder.announce();
        if let Some(out) = responder.poll_transmit() {
            stream.write_all(&out).await?;
        }
    }
    let mut buf = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let used = responder.handle_input(&buf[..n]);
        if let Some(out) = responder.poll_transmit() {
            stream.write_all(&out).await?;
        }
        if responder.is_synced() {
            return Ok(buf[used..n].to_vec());
        }
    }
}

fn server_config(guest: &Guest) -> proto_core::Config {
    let c = &guest.config;
    let mut server = ServerConfig::new(c.host_key.clone(), c.authorized_keys.clone());
    server.allow_none = c.allow_none_auth;
    let mut config = proto_core::Config::server(server);
    tether::enable_guest(&mut config);
    config.keepalive_interval = Some(c.keepalive);
    config.keepalive_max = 2;
    config.handshake_timeout = HANDSHAKE_TIMEOUT;
    config
}

/// What a channel is for.
enum Role {
    /// A `session` channel before its `exec` or `shell`.
    Setup {
        pty: Option<PtyRequest>,
        env: Vec<(String, String)>,
    },
    /// Attached to a session's stdio.
    Attached(Attached),
}

struct Attached {
    session: String,
    cursor: u64,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    done: bool,
}

/// One SSH connection's state beyond the `Connection` itself.
struct Link {
    guest: Rc<Guest>,
    generation: u64,
    roles: BTreeMap<ChannelId, Role>,
    pushed: Option<Vec<(String, State, u32)>>,
}

async fn serve(
    guest: &Rc<Guest>,
    stream: &LinkStream,
    sync_first: bool,
    generation: u64,
) -> io::Result<()> {
    let leftover = if sync_first {
        // A serial line may wait for its appliance indefinitely; elsewhere a
        // peer that never syncs must not hold a connection slot.
        let deadline = Timer::after(SYNC_TIMEOUT);
        future::or(sync(stream), async {
            deadline.await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no link sync within 30 s",
            ))
        })
        .await?
    } else {
        Vec::new()
    };
    debug!(link = generation, "link sync done");
    let mut conn = Connection::new(server_config(guest), Instant::now(), rng());
    let mut link = Link {
        guest: guest.clone(),
        generation,
        roles: BTreeMap::new(),
        pushed: None,
    };
    if !leftover.is_empty() {
        conn.handle_input(Instant::now(), &leftover)
            .map_err(io::Error::other)?;
    }
    let mut outbox = Outbox::new(MAX_PENDING_WRITE);
    let mut unsent = Unsent::new(guest);
    let mut buf = vec![0u8; 64 * 1024];
    enum Wake {
        Read(io::Result<usize>),
        Wrote(io::Result<usize>),
        Changed,
        Timer,
    }
    let mut fatal_sent = false;
    loop {
        let listener = guest.changed.listen();
        if !fatal_sent && let Some(description) = guest.fatal.disconnect_description() {
            // PID 1 is going down: say why, as the last thing on this connection.
            conn.disconnect(proto_core::DisconnectReason::ByApplication, &description);
            fatal_sent = true;
        }
        link.handle_events(&mut conn);
        link.pump(&mut conn);
        outbox.fill(&mut conn);
        unsent.set(!outbox.is_empty() || conn.has_transmit());
        if conn.is_closed() && outbox.is_empty() {
            if fatal_sent {
                guest.fatal.mark_delivered();
            }
            return match conn.close_reason() {
                Some(e) if !is_orderly(e) => Err(io::Error::other(e.to_string())),
                _ => Ok(()),
            };
        }
        let timeout = conn.poll_timeout();
        let can_read = outbox.may_read(&conn);
        let wake = {
            let read = async {
                if !can_read {
                    return future::pending().await;
                }
                Wake::Read(stream.read(&mut buf).await)
            };
            let write = async {
                match outbox.front() {
                    Some(front) => Wake::Wrote(stream.write(front).await),
                    None => future::pending().await,
                }
            };
            let changed = async {
                listener.await;
                Wake::Changed
            };
            let timer = async {
                match timeout {
                    Some(t) => {
                        Timer::at(t).await;
                        Wake::Timer
                    }
                    None => future::pending().await,
                }
            };
            future::or(write, future::or(read, future::or(changed, timer))).await
        };
        match wake {
            Wake::Read(Ok(0)) => return Ok(()),
            Wake::Read(Ok(n)) => {
                if let Err(e) = conn.handle_input(Instant::now(), &buf[..n]) {
                    link.handle_events(&mut conn);
                    flush_best_effort(stream, &mut conn, &mut outbox).await;
                    return if is_orderly(&e) {
                        Ok(())
                    } else {
                        Err(io::Error::other(e.to_string()))
                    };
                }
            }
            Wake::Read(Err(e)) => return Err(e),
            Wake::Wrote(Ok(n)) => outbox.advance(n),
            Wake::Wrote(Err(e)) => return Err(e),
            Wake::Changed => {}
            Wake::Timer => {
                if let Err(e) = conn.handle_timeout(Instant::now()) {
                    flush_best_effort(stream, &mut conn, &mut outbox).await;
                    return Err(io::Error::other(e.to_string()));
                }
            }
        }
    }
}

/// Whether a connection ended the way connections normally end.
fn is_orderly(e: &proto_core::Error) -> bool {
    matches!(
        e,
        proto_core::Error::Closed
            | proto_core::Error::PeerDisconnected {
                reason: proto_core::DisconnectReason::ByApplication,
                ..
            }
    )
}

/// Writes what is pending (a DISCONNECT, typically), giving up after a moment.
async fn flush_best_effort(stream: &LinkStream, conn: &mut Connection, outbox: &mut Outbox) {
    outbox.fill_all(conn);
    let all = outbox.concat();
    let _ = future::or(async { stream.write_all(&all).await }, async {
        Timer::after(Duration::from_secs(1)).await;
        Ok(())
    })
    .await;
}

fn encode<F: FnOnce(&mut BytesMut)>(f: F) -> Bytes {
    let mut b = BytesMut::new();
    f(&mut b);
    b.freeze()
}

impl Link {
    fn handle_events(&mut self, conn: &mut Connection) {
        while let Some(event) = conn.poll_event() {
            if let Err(e) = self.handle_event(conn, event) {
                debug!(link = self.generation, "command refused: {e}");
            }
        }
    }

    fn handle_event(&mut self, conn: &mut Connection, event: Event) -> proto_core::Result<()> {
        match event {
            Event::Authenticated(who) => {
                info!(link = self.generation, user = %who.user, key = ?who.key, "appliance authenticated");
            }
            Event::AuthRejected(r) => {
                let key = r
                    .key
                    .map(|k| k.fingerprint())
                    .unwrap_or_else(|| "none".into());
                warn!(link = self.generation, user = %r.user, method = %r.method, %key, "refused authentication: {}", r.reason);
            }
            Event::ChannelOpen {
                channel,
                channel_type,
                data,
            } => match channel_type.as_str() {
                "session" => {
                    conn.accept_channel(channel)?;
                    self.roles.insert(
                        channel,
                        Role::Setup {
                            pty: None,
                            env: Vec::new(),
                        },
                    );
                }
                tether::ATTACH => self.open_attach(conn, channel, &data)?,
                _ => conn.reject_channel(
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
                let ok = self.channel_request(conn, channel, request);
                if want_reply {
                    conn.channel_reply(channel, ok)?;
                }
            }
            Event::ChannelData { channel, data, .. } => {
                let len = data.len();
                match self.roles.get(&channel) {
                    Some(Role::Attached(a)) if a.stdin => {
                        let credit = Credit {
                            link: self.generation,
                            channel,
                        };
                        self.guest.write_stdin(&a.session, data, credit);
                    }
                    _ => conn.channel_consume(channel, len)?,
                }
            }
            Event::ChannelEof { channel } => {
                if let Some(Role::Attached(a)) = self.roles.get(&channel)
                    && a.stdin
                {
                    self.guest.close_stdin(&a.session);
                }
            }
            Event::ChannelClosed { channel } => {
                if let Some(Role::Attached(a)) = self.roles.remove(&channel) {
                    let key = (self.generation, channel);
                    self.guest.with(&a.session, |s| {
                        if s.readers.remove(&key).is_some() {
                            s.apply_readers();
                        }
                    });
                }
            }
            Event::GlobalRequest {
                name, want_reply, ..
            } => {
                if name == tether::CONTAINER_IDS && want_reply {
                    let list = self.guest.container_list();
                    self.pushed = Some(summary(&list));
                    conn.global_reply(true, encode(|b| tether::encode_container_ids(&list, b)))?;
                } else if want_reply {
                    conn.global_reply(false, Bytes::new())?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn open_attach(
        &mut self,
        conn: &mut Connection,
        channel: ChannelId,
        data: &[u8],
    ) -> proto_core::Result<()> {
        let req = match AttachRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                return conn.reject_channel(
                    channel,
                    open_failure::CONNECT_FAILED,
                    &format!("bad attach request: {e}"),
                );
            }
        };
        let Some((start, end)) = self.guest.with(&req.id, |s| (s.log.start(), s.log.end())) else {
            return conn.reject_channel(
                channel,
                open_failure::CONNECT_FAILED,
                &format!("unknown session {}", req.id),
            );
        };
        let from = if req.from == tether::LIVE {
            end
        } else {
            req.from
        };
        if from > end {
            let why = format!("offset {from} is beyond the end of output ({end})");
            return conn.reject_channel(channel, open_failure::CONNECT_FAILED, &why);
        }
        conn.accept_channel(channel)?;
        let offset = encode(|b| tether::encode_offset(from, b));
        conn.channel_request(
            channel,
            &ChannelRequest::Other {
                name: tether::OFFSET.into(),
                data: offset,
            },
            false,
        )?;
        let mut cursor = from;
        if from < start {
            let gap = encode(|b| tether::encode_output_gap(start - from, b));
            conn.channel_request(
                channel,
                &ChannelRequest::Other {
                    name: tether::OUTPUT_GAP.into(),
                    data: gap,
                },
                false,
            )?;
            cursor = start;
        }
        debug!(link = self.generation, ?channel, session = %req.id, from, "attached");
        self.roles.insert(
            channel,
            Role::Attached(Attached {
                session: req.id,
                cursor,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                done: false,
            }),
        );
        Ok(())
    }

    /// Handles a channel request; returns the reply.
    fn channel_request(
        &mut self,
        conn: &mut Connection,
        channel: ChannelId,
        request: ChannelRequest,
    ) -> bool {
        let guest = self.guest.clone();
        match self.roles.get_mut(&channel) {
            Some(Role::Setup { pty, env }) => match request {
                ChannelRequest::Pty(p) => {
                    *pty = Some(p);
                    true
                }
                ChannelRequest::Env { name, value } => {
                    env.push((name, String::from_utf8_lossy(&value).into_owned()));
                    true
                }
                ChannelRequest::WindowChange { cols, rows, .. } => {
                    if let Some(p) = pty {
                        p.cols = cols;
                        p.rows = rows;
                    }
                    true
                }
                ChannelRequest::Exec { .. } | ChannelRequest::Shell => {
                    let cmd = match &request {
                        ChannelRequest::Exec { command } => {
                            vec![
                                guest.config.shell.clone(),
                                "-c".into(),
                                String::from_utf8_lossy(command).into_owned(),
                            ]
                        }
                        _ => vec![guest.config.shell.clone()],
                    };
                    let size = pty
                        .as_ref()
                        .map(|p| (p.cols.clamp(1, 65535) as u16, p.rows.clamp(1, 65535) as u16));
                    let mut env = std::mem::take(env);
                    if let Some(p) = pty.as_ref().filter(|p| !p.term.is_empty()) {
                        env.push(("TERM".into(), p.term.clone()));
                    }
                    let id = guest.add_exec(cmd, size, env);
                    let data = encode(|b| tether::encode_exec_id(&id, b));
                    let _ = conn.channel_request(
                        channel,
                        &ChannelRequest::Other {
                            name: tether::EXEC_ID.into(),
                            data,
                        },
                        false,
                    );
                    self.roles.insert(
                        channel,
                        Role::Attached(Attached {
                            session: id,
                            cursor: 0,
                            stdin: true,
                            stdout: true,
                            stderr: true,
                            done: false,
                        }),
                    );
                    true
                }
                _ => false,
            },
            Some(Role::Attached(a)) => match request {
                ChannelRequest::WindowChange { cols, rows, .. } => {
                    guest.resize(&a.session, cols, rows).is_ok()
                }
                ChannelRequest::Signal { name } => match parse_signal(&name) {
                    Some(sig) => guest.signal(&a.session, sig).is_ok(),
                    None => false,
                },
                ChannelRequest::Other { name, .. } if name == tether::START => {
                    guest.release_gate(&a.session)
                }
                _ => false,
            },
            None => false,
        }
    }
}
