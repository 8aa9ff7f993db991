//! One guest link: link sync (on serial-bridge listeners), then an SSH client
//! connection to the guest. It registers the guest's containers in the map and
//! carries channels for attachments, execs, signals and start gates. Other tasks
//! talk to it through [`LinkCommand`]s; it answers on per-request channels.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use async_channel::{Receiver, Sender};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncWriteExt, future};
use proto_core::outbox::Outbox;
use proto_core::tether::{self, AttachRequest, ContainerInfo};
use proto_core::{ChannelId, ChannelRequest, Connection, Event, PtyRequest};
use smol::{Async, Timer};
use tracing::{debug, info, warn};

use crate::api_types::{ApiError, ExitStatus};
pub use crate::linkio::{QueuedStdin, StdinGauge, shell_quote};
use crate::linkio::{ReadBuffer, sync_link};
use crate::registry::Shared;

/// Most ciphertext taken from the connection and not yet written.
const MAX_PENDING_WRITE: usize = 256 * 1024;

/// What a channel delivers to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    Data {
        ext: Option<u32>,
        data: Bytes,
    },
    Gap(u64),
    Exit(ExitStatus),
    /// The channel is gone (after `Exit`, or because the link dropped).
    Closed,
}

/// How to open a channel.
#[derive(Debug, Clone)]
pub enum OpenKind {
    Attach(AttachRequest),
    Exec {
        command: String,
        tty: Option<(u32, u32)>,
        env: Vec<(String, String)>,
    },
}

/// An open channel, as its user holds it.
pub struct LinkChannel {
    pub channel: ChannelId,
    pub events: Receiver<ChannelEvent>,
    /// For execs: the id the guest gave the new container.
    pub exec_id: Option<String>,
}

type Reply<T> = Sender<Result<T, ApiError>>;

/// Requests to a link task.
pub enum LinkCommand {
    Open {
        kind: OpenKind,
        reply: Reply<LinkChannel>,
    },
    Send {
        channel: ChannelId,
        data: QueuedStdin,
    },
    Eof {
        channel: ChannelId,
    },
    Close {
        channel: ChannelId,
    },
    Request {
        channel: ChannelId,
        request: ChannelRequest,
        reply: Option<Sender<bool>>,
    },
    Consumed {
        channel: ChannelId,
        n: usize,
    },
    /// Ask the guest for a fresh container list (and update the map).
    List {
        reply: Reply<Vec<ContainerInfo>>,
    },
}

/// A channel on this link.
struct Chan {
    events: Sender<ChannelEvent>,
    /// Set until the open completes (for execs: until `exec` is answered).
    opening: Option<(OpenKind, Reply<LinkChannel>, Receiver<ChannelEvent>)>,
    exec_id: Option<String>,
    replies: VecDeque<Option<Sender<bool>>>,
    /// Stdin the guest's window has no room for yet, then maybe EOF.
    stdin: VecDeque<QueuedStdin>,
    eof_after_stdin: bool,
}

impl Chan {
    /// Sends queued stdin as far as the window allows, then a queued EOF.
    fn flush_stdin(&mut self, conn: &mut Connection, channel: ChannelId) {
        while let Some(front) = self.stdin.front_mut() {
            let n = conn.channel_send(channel, None, &front.data).unwrap_or(0);
            if n < front.data.len() {
                front.gauge.release(n);
                front.data = front.data.slice(n..);
                if n == 0 {
                    return;
                }
                continue;
            }
            self.stdin.pop_front();
        }
        if std::mem::take(&mut self.eof_after_stdin) {
            let _ = conn.channel_eof(channel);
        }
    }
}

/// Runs a guest link until it drops. `sync` runs link sync first.
pub async fn run(shared: Arc<Shared>, stream: Async<TcpStream>, sync: bool) {
    let generation = shared.next_generation();
    let peer = stream
        .get_ref()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(link = generation, %peer, sync, "guest link accepted");
    let (tx, rx) = async_channel::unbounded();
    let result = serve(&shared, &stream, sync, generation, tx, rx).await;
    shared.link_gone(generation);
    match result {
        Ok(()) => info!(link = generation, "guest link closed"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            info!(link = generation, "the guest closed the link")
        }
        Err(e) => warn!(link = generation, "guest link ended: {e}"),
    }
}

struct Link {
    shared: Arc<Shared>,
    generation: u64,
    chans: BTreeMap<ChannelId, Chan>,
    /// Our container-ids requests awaiting a reply; `None` is our own refresh.
    lists: VecDeque<Option<Reply<Vec<ContainerInfo>>>>,
}

async fn serve(
    shared: &Arc<Shared>,
    stream: &Async<TcpStream>,
    sync: bool,
    generation: u64,
    tx: Sender<LinkCommand>,
    rx: Receiver<LinkCommand>,
) -> io::Result<()> {
    stream.get_ref().set_nodelay(true)?;
    let leftover = if sync {
        sync_link(stream).await?
    } else {
        Vec::new()
    };
    let mut conn = Connection::new(
        shared.client_config(),
        Instant::now(),
        crate::registry::rng(),
    );
    let mut link = Link {
        shared: shared.clone(),
        generation,
        chans: BTreeMap::new(),
        lists: VecDeque::new(),
    };
    shared.link_up(generation, tx);
    if !leftover.is_empty() {
        conn.handle_input(Instant::now(), &leftover)
            .map_err(io::Error::other)?;
    }
    let mut outbox = Outbox::new(MAX_PENDING_WRITE);
    let mut reader = ReadBuffer::default();
    enum Wake {
        Read(io::Result<BytesMut>),
        Wrote(io::Result<usize>),
        Command(Option<LinkCommand>),
        Timer,
    }
    loop {
        link.handle_events(&mut conn);
        outbox.fill(&mut conn);
        if conn.is_closed() && outbox.is_empty() {
            return match conn.close_reason() {
                Some(proto_core::Error::Closed) | None => Ok(()),
                Some(e) => Err(io::Error::other(e.to_string())),
            };
        }
        let timeout = conn.poll_timeout();
        let can_read = outbox.may_read(&conn);
        let wake = {
            let read = async {
                if !can_read {
                    return future::pending().await;
                }
                Wake::Read(reader.read(stream).await)
            };
            let write = async {
                match outbox.front() {
                    Some(front) => Wake::Wrote((&mut &*stream).write(front).await),
                    None => future::pending().await,
                }
            };
            let command = async { Wake::Command(rx.recv().await.ok()) };
            let timer = async {
                match timeout {
                    Some(t) => {
                        Timer::at(t).await;
                        Wake::Timer
                    }
                    None => future::pending().await,
                }
            };
            future::or(write, future::or(read, future::or(command, timer))).await
        };
        match wake {
            Wake::Read(Ok(chunk)) if chunk.is_empty() => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Wake::Read(Ok(chunk)) => {
                if let Err(e) = conn.handle_input_bytes(Instant::now(), chunk) {
                    link.handle_events(&mut conn);
                    return Err(io::Error::other(e.to_string()));
                }
            }
            Wake::Read(Err(e)) | Wake::Wrote(Err(e)) => return Err(e),
            Wake::Wrote(Ok(n)) => outbox.advance(n),
            Wake::Command(Some(cmd)) => {
                link.command(&mut conn, cmd);
                while let Ok(cmd) = rx.try_recv() {
                    link.command(&mut conn, cmd);
                }
            }
            Wake::Command(None) => {}
            Wake::Timer => {
                if let Err(e) = conn.handle_timeout(Instant::now()) {
                    return Err(io::Error::other(e.to_string()));
                }
            }
        }
    }
}

fn encode<F: FnOnce(&mut BytesMut)>(f: F) -> Bytes {
    let mut b = BytesMut::new();
    f(&mut b);
    b.freeze()
}

impl Drop for Link {
    fn drop(&mut self) {
        // Leave the map first: attachments woken below must not find this
        // link again when they look for a new one.
        self.shared.link_gone(self.generation);
        for (_, chan) in std::mem::take(&mut self.chans) {
            if let Some((_, reply, _)) = chan.opening {
                let _ = reply.try_send(Err(ApiError::LinkDown("the guest link dropped".into())));
            }
            let _ = chan.events.try_send(ChannelEvent::Closed);
        }
        for waiter in self.lists.drain(..).flatten() {
            let _ = waiter.try_send(Err(ApiError::LinkDown("the guest link dropped".into())));
        }
    }
}

impl Link {
    fn command(&mut self, conn: &mut Connection, cmd: LinkCommand) {
        let down =
            |what: &str| ApiError::LinkDown(format!("{what}: the guest connection is not ready"));
        match cmd {
            LinkCommand::Open { kind, reply } => {
                let (channel_type, data) = match &kind {
                    OpenKind::Attach(req) => (tether::ATTACH, encode(|b| req.encode(b))),
                    OpenKind::Exec { .. } => ("session", Bytes::new()),
                };
                match conn.open_channel(channel_type, &data) {
                    Ok(channel) => {
                        let (etx, erx) = async_channel::unbounded();
                        let chan = Chan {
                            events: etx,
                            opening: Some((kind, reply, erx)),
                            exec_id: None,
                            replies: VecDeque::new(),
                            stdin: VecDeque::new(),
                            eof_after_stdin: false,
                        };
                        self.chans.insert(channel, chan);
                    }
                    Err(e) => {
                        let _ = reply.try_send(Err(down(&e.to_string())));
                    }
                }
            }
            LinkCommand::Send { channel, data } => {
                if let Some(chan) = self.chans.get_mut(&channel) {
                    chan.stdin.push_back(data);
                    chan.flush_stdin(conn, channel);
                }
            }
            LinkCommand::Eof { channel } => {
                if let Some(chan) = self.chans.get_mut(&channel) {
                    chan.eof_after_stdin = true;
                    chan.flush_stdin(conn, channel);
                }
            }
            LinkCommand::Close { channel } => {
                debug!(link = self.generation, ?channel, "closing channel");
                let _ = conn.channel_close(channel);
            }
            LinkCommand::Request {
                channel,
                request,
                reply,
            } => {
                let ok = conn
                    .channel_request(channel, &request, reply.is_some())
                    .is_ok();
                if let Some(chan) = self.chans.get_mut(&channel).filter(|_| ok) {
                    if reply.is_some() {
                        chan.replies.push_back(reply);
                    }
                } else if let Some(reply) = reply {
                    let _ = reply.try_send(false);
                }
            }
            LinkCommand::Consumed { channel, n } => {
                let _ = conn.channel_consume(channel, n);
            }
            LinkCommand::List { reply } => {
                match conn.global_request(tether::CONTAINER_IDS, &[], true) {
                    Ok(()) => self.lists.push_back(Some(reply)),
                    Err(e) => {
                        let _ = reply.try_send(Err(down(&e.to_string())));
                    }
                }
            }
        }
    }

    fn handle_events(&mut self, conn: &mut Connection) {
        while let Some(event) = conn.poll_event() {
            self.event(conn, event);
        }
    }

    fn event(&mut self, conn: &mut Connection, event: Event) {
        match event {
            Event::Authenticated(_) => {
                info!(link = self.generation, host_key = ?conn.host_key(), "guest authenticated");
                if conn
                    .global_request(tether::CONTAINER_IDS, &[], true)
                    .is_ok()
                {
                    self.lists.push_back(None);
                }
            }
            Event::GlobalReply { success, data } => {
                let waiter = self.lists.pop_front().flatten();
                let list = if success {
                    tether::decode_container_ids(&data)
                        .map_err(|e| ApiError::LinkDown(format!("bad container list: {e}")))
                } else {
                    Err(ApiError::LinkDown(
                        "the guest refused to list its containers".into(),
                    ))
                };
                if let Ok(list) = &list {
                    self.shared
                        .update(self.generation, conn.host_key().copied(), list.clone());
                }
                if let Some(w) = waiter {
                    let _ = w.try_send(list);
                }
            }
            Event::GlobalRequest {
                name,
                data,
                want_reply,
            } => {
                if name == tether::CONTAINER_IDS {
                    match tether::decode_container_ids(&data) {
                        Ok(list) => {
                            self.shared
                                .update(self.generation, conn.host_key().copied(), list)
                        }
                        Err(e) => warn!(link = self.generation, "bad container-ids push: {e}"),
                    }
                }
                if want_reply {
                    let _ = conn.global_reply(name == tether::CONTAINER_IDS, Bytes::new());
                }
            }
            Event::ChannelOpened { channel } => {
                debug!(link = self.generation, ?channel, "channel opened");
                self.opened(conn, channel)
            }
            Event::ChannelOpenFailed {
                channel,
                description,
                ..
            } => {
                if let Some(chan) = self.chans.remove(&channel)
                    && let Some((_, reply, _)) = chan.opening
                {
                    let _ = reply.try_send(Err(ApiError::Refused(description)));
                }
            }
            Event::ChannelData { channel, ext, data } => {
                if let Some(chan) = self.chans.get(&channel) {
                    let _ = chan.events.try_send(ChannelEvent::Data { ext, data });
                } else {
                    let _ = conn.channel_consume(channel, data.len());
                }
            }
            Event::ChannelRequest {
                channel,
                request,
                want_reply,
            } => {
                self.channel_request(channel, request);
                if want_reply {
                    let _ = conn.channel_reply(channel, false);
                }
            }
            Event::ChannelReply { channel, success } => self.reply(conn, channel, success),
            Event::ChannelClosed { channel } => {
                if let Some(chan) = self.chans.remove(&channel) {
                    if let Some((_, reply, _)) = chan.opening {
                        let _ = reply.try_send(Err(ApiError::Refused(
                            "the guest closed the channel".into(),
                        )));
                    }
                    let _ = chan.events.try_send(ChannelEvent::Closed);
                }
            }
            Event::ChannelWritable { channel } => {
                if let Some(chan) = self.chans.get_mut(&channel) {
                    chan.flush_stdin(conn, channel);
                }
            }
            Event::ChannelEof { .. } | Event::KexComplete { .. } | Event::AuthRejected(_) => {}
            Event::ChannelOpen { channel, .. } => {
                let _ = conn.reject_channel(
                    channel,
                    proto_core::event::open_failure::ADMINISTRATIVELY_PROHIBITED,
                    "the appliance accepts no channels",
                );
            }
        }
    }

    fn opened(&mut self, conn: &mut Connection, channel: ChannelId) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        let Some((kind, reply, events)) = chan.opening.take() else {
            return;
        };
        match kind {
            OpenKind::Attach(_) => {
                let opened = LinkChannel {
                    channel,
                    events,
                    exec_id: None,
                };
                if reply.try_send(Ok(opened)).is_err() {
                    // Whoever asked has gone meanwhile: nobody will close it.
                    let _ = conn.channel_close(channel);
                }
            }
            OpenKind::Exec { command, tty, env } => {
                for (name, value) in &env {
                    let req = ChannelRequest::Env {
                        name: name.clone(),
                        value: Bytes::copy_from_slice(value.as_bytes()),
                    };
                    let _ = conn.channel_request(channel, &req, false);
                }
                if let Some((cols, rows)) = tty {
                    let pty = PtyRequest {
                        term: "xterm".into(),
                        cols,
                        rows,
                        width_px: 0,
                        height_px: 0,
                        modes: Bytes::from_static(&[0]),
                    };
                    let _ = conn.channel_request(channel, &ChannelRequest::Pty(pty), false);
                }
                let _ = conn.channel_request(
                    channel,
                    &ChannelRequest::Exec {
                        command: command.clone().into(),
                    },
                    true,
                );
                chan.replies.push_back(None);
                chan.opening = Some((OpenKind::Exec { command, tty, env }, reply, events));
            }
        }
    }

    fn reply(&mut self, conn: &mut Connection, channel: ChannelId, success: bool) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        match chan.replies.pop_front() {
            Some(Some(waiter)) => {
                let _ = waiter.try_send(success);
            }
            // The reply to an exec's `exec` request completes the open.
            Some(None) => {
                if let Some((_, reply, events)) = chan.opening.take() {
                    if success && chan.exec_id.is_some() {
                        let opened = LinkChannel {
                            channel,
                            events,
                            exec_id: chan.exec_id.clone(),
                        };
                        if reply.try_send(Ok(opened)).is_err() {
                            let _ = conn.channel_close(channel);
                        }
                    } else {
                        let why = if success {
                            "the guest did not name the exec"
                        } else {
                            "the guest refused the exec"
                        };
                        let _ = reply.try_send(Err(ApiError::Refused(why.into())));
                        let _ = conn.channel_close(channel);
                    }
                }
            }
            None => debug!(link = self.generation, "unexpected channel reply"),
        }
    }

    fn channel_request(&mut self, channel: ChannelId, request: ChannelRequest) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        let event = match request {
            ChannelRequest::ExitStatus { code } => ChannelEvent::Exit(ExitStatus::Code(code)),
            ChannelRequest::ExitSignal {
                name, core_dumped, ..
            } => ChannelEvent::Exit(ExitStatus::Signal { name, core_dumped }),
            ChannelRequest::Other { name, data } if name == tether::OUTPUT_GAP => {
                match tether::decode_output_gap(&data) {
                    Ok(lost) => ChannelEvent::Gap(lost),
                    Err(_) => return,
                }
            }
            ChannelRequest::Other { name, data } if name == tether::EXEC_ID => {
                chan.exec_id = tether::decode_exec_id(&data).ok();
                return;
            }
            _ => return,
        };
        let _ = chan.events.try_send(event);
    }
}
