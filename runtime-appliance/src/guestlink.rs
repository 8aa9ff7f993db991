//! One guest link as a task: link sync (on serial-bridge listeners), then
//! proto-core's `ApplianceLink` driven by link-driver's loop. Other tasks talk
//! to it through [`LinkCommand`]s and get answers on per-request channels; the
//! link's container lists go to the shared map. The protocol's rules are the
//! link's; this module only routes, within the bounds of `limits`: link sync
//! has a deadline, container lists are screened and capped, and channel output
//! is staged per channel (`delivery`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use async_channel::{Receiver, Sender};
use bytes::{Bytes, BytesMut};
use link_driver::{End, Link};
use proto_core::outbox::Transmit;
use proto_core::tether::{
    ApplianceEvent, ApplianceLink, AttachRequest, ContainerInfo, ExitStatus, ForkMode, ListId, Open,
};
use proto_core::{ChannelId, ChannelRequest};
use smol::Async;
use tracing::{debug, info, warn};

use crate::api_types::ApiError;
use crate::delivery::Delivery;
use crate::limits::{self, LinkSlot, Refusals};
use crate::registry::Shared;
use crate::stdin::{QueuedStdin, StdinGauge};

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
    /// For an attach: where its output starts (`offset@tether`).
    pub offset: Option<u64>,
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
    /// Open a control channel to container `id`, send `request`, answer.
    Control {
        id: String,
        request: ChannelRequest,
        reply: Reply<bool>,
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
    /// Send `fork@tether` (docs/PROTOCOL.md 4.5); the answer is whether the
    /// guest agreed, and for a quiesce its identity generation.
    Fork {
        mode: ForkMode,
        reply: Reply<(bool, Option<u64>)>,
    },
}

/// A channel's user, as the link task knows it.
struct Chan {
    events: Sender<ChannelEvent>,
    /// Until `Opened`: who asked, and the receiver to hand over.
    opening: Option<(Reply<LinkChannel>, Receiver<ChannelEvent>)>,
    /// A control channel's asker.
    control: Option<Reply<bool>>,
    /// Who waits for request replies, in order.
    replies: VecDeque<Sender<bool>>,
    /// Stdin handed to the link and not yet sent, and whose it is.
    stdin: Option<(Arc<StdinGauge>, usize)>,
    /// Output staged on its way to `events`.
    delivery: Delivery,
}

impl Chan {
    fn new(events: Sender<ChannelEvent>) -> Self {
        Self {
            events,
            opening: None,
            control: None,
            replies: VecDeque::new(),
            stdin: None,
            delivery: Delivery::default(),
        }
    }
}

/// Sends `link` the command `command` builds around a reply channel, and
/// waits for the guest's answer within the guest request timeout (a 503
/// naming `what` after it).
pub(crate) async fn ask<T>(
    shared: &Shared,
    link: &Sender<LinkCommand>,
    what: &str,
    command: impl FnOnce(Reply<T>) -> LinkCommand,
) -> Result<T, ApiError> {
    let dropped = || ApiError::LinkDown("the guest link dropped".into());
    let (tx, rx) = async_channel::bounded(1);
    link.send(command(tx)).await.map_err(|_| dropped())?;
    let limit = shared.limits.guest_request_timeout;
    limits::guest_answer(limit, &shared.refusals, what, async {
        rx.recv().await.map_err(|_| dropped())?
    })
    .await
}

fn down(why: &str) -> ApiError {
    ApiError::LinkDown(format!("{why}: the guest connection is not ready"))
}

/// Runs a guest link until it drops. `sync` runs link sync first. `_slot`
/// counts the link against `max_links` until it has gone.
pub async fn run(shared: Arc<Shared>, stream: Async<TcpStream>, sync: bool, _slot: LinkSlot) {
    let generation = shared.next_generation();
    let peer = stream
        .get_ref()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(link = generation, %peer, sync, "guest link accepted");
    let result = serve(&shared, &stream, sync, generation).await;
    shared.link_gone(generation);
    match result {
        Ok(End::Orderly) => info!(link = generation, "guest link closed"),
        Ok(End::Eof) => info!(link = generation, "the guest closed the link"),
        Ok(end) => warn!(link = generation, "guest link ended: {end}"),
        Err(e) => warn!(link = generation, "guest link ended before SSH: {e}"),
    }
}

async fn serve(
    shared: &Arc<Shared>,
    stream: &Async<TcpStream>,
    sync: bool,
    generation: u64,
) -> io::Result<End> {
    stream.get_ref().set_nodelay(true)?;
    let first = if sync {
        sync_within(shared, stream).await?
    } else {
        BytesMut::new()
    };
    let (tx, rx) = async_channel::unbounded();
    let link = ApplianceLink::new(shared.client_config(), Instant::now(), link_driver::rng());
    let mut side = ApplianceSide {
        shared: shared.clone(),
        generation,
        link,
        chans: BTreeMap::new(),
        lists: BTreeMap::new(),
        forks: VecDeque::new(),
        rx: rx.clone(),
        staged: BTreeSet::new(),
    };
    shared.link_up(generation, tx);
    Ok(link_driver::drive(stream, &mut side, first, || {
        let rx = rx.clone();
        async move { rx.recv().await.ok() }
    })
    .await)
}

/// Link sync, within `link_sync_timeout` (a guest that never finishes it
/// would otherwise hold its slot forever).
async fn sync_within(shared: &Shared, stream: &Async<TcpStream>) -> io::Result<BytesMut> {
    let limit = shared.limits.link_sync_timeout;
    let timeout = async {
        smol::Timer::after(limit).await;
        Refusals::count(&shared.refusals.link_syncs, 1);
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("link sync did not finish within {limit:?}"),
        ))
    };
    futures_lite::future::or(link_driver::sync::as_appliance(stream), timeout).await
}

/// Drops list entries with ids no container may have and caps the list at
/// `max_containers_per_link`; one log line says what was dropped.
fn screen(shared: &Shared, generation: u64, list: Vec<ContainerInfo>) -> Vec<ContainerInfo> {
    let (list, invalid, over) = limits::screen(list, shared.limits.max_containers_per_link);
    if invalid + over > 0 {
        Refusals::count(&shared.refusals.containers, (invalid + over) as u64);
        warn!(
            link = generation,
            invalid,
            over_limit = over,
            "the guest's container list has ids that are malformed or beyond --max-containers-per-link; ignored"
        );
    }
    list
}

/// An `ApplianceLink` and the users of its channels.
/// Channel opens a link may have waiting for the guest's answer; more are
/// refused at once (a guest that never answers does not collect them).
const MAX_OPENING: usize = 256;

struct ApplianceSide {
    shared: Arc<Shared>,
    generation: u64,
    link: ApplianceLink,
    chans: BTreeMap<ChannelId, Chan>,
    lists: BTreeMap<ListId, Reply<Vec<ContainerInfo>>>,
    /// Who waits for the guest's answers to `fork@tether`, in order.
    forks: VecDeque<Reply<(bool, Option<u64>)>>,
    rx: Receiver<LinkCommand>,
    /// Channels with output staged.
    staged: BTreeSet<ChannelId>,
}

impl Drop for ApplianceSide {
    fn drop(&mut self) {
        // Leave the map first: attachments woken below must not find this
        // link again when they look for a new one.
        self.shared.link_gone(self.generation);
        let gone = || ApiError::LinkDown("the guest link dropped".into());
        for (_, mut chan) in std::mem::take(&mut self.chans) {
            chan.delivery.flush(&chan.events, true);
            if let Some((reply, _)) = chan.opening {
                let _ = reply.try_send(Err(gone()));
            }
            if let Some(reply) = chan.control {
                let _ = reply.try_send(Err(gone()));
            }
            if let Some((gauge, queued)) = chan.stdin {
                gauge.release(queued);
            }
            let _ = chan.events.try_send(ChannelEvent::Closed);
        }
        for (_, waiter) in std::mem::take(&mut self.lists) {
            let _ = waiter.try_send(Err(gone()));
        }
        for waiter in std::mem::take(&mut self.forks) {
            let _ = waiter.try_send(Err(gone()));
        }
        // Commands still queued are answered by being dropped: take them out
        // (the channel lives on while anyone holds a sender, and with it
        // their reply senders, so a waiter would never hear).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

impl Transmit for ApplianceSide {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.link.poll_transmit()
    }
    fn has_transmit(&self) -> bool {
        self.link.has_transmit()
    }
}

impl Link for ApplianceSide {
    type Wake = Option<LinkCommand>;

    fn handle_input(&mut self, now: Instant, data: BytesMut) -> proto_core::Result<()> {
        self.link.handle_input_bytes(now, data)
    }

    fn handle_timeout(&mut self, now: Instant) -> proto_core::Result<()> {
        self.link.handle_timeout(now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }

    fn close_reason(&self) -> Option<&proto_core::Error> {
        self.link.close_reason()
    }

    fn work(&mut self) {
        while let Some(event) = self.link.poll_event() {
            self.event(event);
        }
        self.flush_staged();
    }

    fn woken(&mut self, command: Option<LinkCommand>) {
        let Some(command) = command else { return };
        self.command(command);
        while let Ok(command) = self.rx.try_recv() {
            self.command(command);
        }
        self.flush_staged();
    }
}

impl ApplianceSide {
    fn command(&mut self, command: LinkCommand) {
        match command {
            LinkCommand::Open { kind, reply } => {
                if self.chans.len() >= MAX_OPENING
                    && self.chans.values().filter(|c| c.opening.is_some()).count() >= MAX_OPENING
                {
                    let why = format!("the guest has {MAX_OPENING} channel opens unanswered");
                    let _ = reply.try_send(Err(ApiError::Unavailable(why)));
                    return;
                }
                let what = match kind {
                    OpenKind::Attach(req) => Open::Attach(req),
                    OpenKind::Exec { command, tty, env } => Open::Exec { command, tty, env },
                };
                match self.link.open(what) {
                    Ok(channel) => {
                        let (tx, rx) = async_channel::unbounded();
                        let mut chan = Chan::new(tx);
                        chan.opening = Some((reply, rx));
                        self.chans.insert(channel, chan);
                    }
                    Err(e) => {
                        let _ = reply.try_send(Err(down(&e.to_string())));
                    }
                }
            }
            LinkCommand::Control { id, request, reply } => match self.link.control(&id, request) {
                Ok(channel) => {
                    let (tx, _) = async_channel::unbounded();
                    let mut chan = Chan::new(tx);
                    chan.control = Some(reply);
                    self.chans.insert(channel, chan);
                }
                Err(e) => {
                    let _ = reply.try_send(Err(down(&e.to_string())));
                }
            },
            LinkCommand::Send { channel, mut data } => {
                let Some(chan) = self.chans.get_mut(&channel) else {
                    return; // dropping `data` releases it
                };
                let bytes = std::mem::take(&mut data.data);
                let (gauge, queued) = chan.stdin.get_or_insert_with(|| (data.gauge.clone(), 0));
                debug_assert!(Arc::ptr_eq(gauge, &data.gauge));
                *queued += bytes.len();
                self.link.send_stdin(channel, bytes);
            }
            LinkCommand::Eof { channel } => self.link.close_stdin(channel),
            LinkCommand::Close { channel } => {
                debug!(link = self.generation, ?channel, "closing channel");
                self.link.close(channel);
            }
            LinkCommand::Request {
                channel,
                request,
                reply,
            } => {
                let sent = self.link.request(channel, &request, reply.is_some());
                match (sent, reply, self.chans.get_mut(&channel)) {
                    (Ok(()), Some(reply), Some(chan)) => chan.replies.push_back(reply),
                    (_, Some(reply), _) => {
                        let _ = reply.try_send(false);
                    }
                    _ => {}
                }
            }
            LinkCommand::Consumed { channel, n } => {
                if let Some(chan) = self.chans.get_mut(&channel) {
                    chan.delivery.consumed();
                }
                self.link.consumed(channel, n);
            }
            LinkCommand::List { reply } => match self.link.list() {
                Ok(id) => {
                    self.lists.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.try_send(Err(down(&e.to_string())));
                }
            },
            LinkCommand::Fork { mode, reply } => match self.link.fork(mode) {
                Ok(()) => self.forks.push_back(reply),
                Err(e) => {
                    let _ = reply.try_send(Err(down(&e.to_string())));
                }
            },
        }
    }

    fn event(&mut self, event: ApplianceEvent) {
        match event {
            ApplianceEvent::Authenticated => {
                let key = self.link.connection().host_key();
                info!(link = self.generation, host_key = ?key, "guest authenticated");
            }
            ApplianceEvent::Containers { list, reply } => {
                let key = self.link.connection().host_key().copied();
                let list = screen(&self.shared, self.generation, list);
                self.shared.update(self.generation, key, list.clone());
                if let Some(w) = reply.and_then(|r| self.lists.remove(&r)) {
                    let _ = w.try_send(Ok(list));
                }
            }
            ApplianceEvent::ListFailed { reply, reason } => {
                warn!(link = self.generation, "container list: {reason}");
                if let Some(w) = reply.and_then(|r| self.lists.remove(&r)) {
                    let _ = w.try_send(Err(ApiError::LinkDown(reason)));
                }
            }
            ApplianceEvent::Opened {
                channel,
                offset,
                exec_id,
            } => {
                debug!(link = self.generation, ?channel, "channel opened");
                let Some(chan) = self.chans.get_mut(&channel) else {
                    return;
                };
                if let Some((reply, events)) = chan.opening.take() {
                    let opened = LinkChannel {
                        channel,
                        events,
                        offset,
                        exec_id,
                    };
                    if reply.try_send(Ok(opened)).is_err() {
                        // Whoever asked has gone meanwhile: nobody will close it.
                        self.link.close(channel);
                    }
                }
            }
            ApplianceEvent::OpenFailed { channel, reason } => {
                if let Some(chan) = self.chans.remove(&channel) {
                    self.forget(chan, ApiError::Refused(reason));
                }
            }
            ApplianceEvent::Data { channel, ext, data } => {
                let counter = &self.shared.counters.guest_output_bytes;
                counter.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if self.chans.contains_key(&channel) {
                    self.deliver(channel, ChannelEvent::Data { ext, data });
                } else {
                    self.link.consumed(channel, data.len());
                }
            }
            ApplianceEvent::Gap { channel, lost } => self.deliver(channel, ChannelEvent::Gap(lost)),
            ApplianceEvent::Exit { channel, status } => {
                self.deliver(channel, ChannelEvent::Exit(status))
            }
            ApplianceEvent::Reply { channel, success } => {
                let Some(chan) = self.chans.get_mut(&channel) else {
                    return;
                };
                if let Some(reply) = chan.control.take() {
                    let _ = reply.try_send(Ok(success));
                } else if let Some(reply) = chan.replies.pop_front() {
                    let _ = reply.try_send(success);
                }
            }
            ApplianceEvent::StdinSent { channel, n } => {
                if let Some((gauge, queued)) =
                    self.chans.get_mut(&channel).and_then(|c| c.stdin.as_mut())
                {
                    gauge.release(n);
                    *queued = queued.saturating_sub(n);
                }
            }
            ApplianceEvent::Closed { channel } => {
                if let Some(chan) = self.chans.remove(&channel) {
                    let closed = ApiError::Refused("the guest closed the channel".into());
                    self.forget(chan, closed);
                }
            }
            ApplianceEvent::Fork {
                mode,
                success,
                generation,
            } => {
                info!(
                    link = self.generation,
                    mode = mode.as_str(),
                    success,
                    ?generation,
                    "fork@tether answered"
                );
                if let Some(w) = self.forks.pop_front() {
                    let _ = w.try_send(Ok((success, generation)));
                }
            }
            ApplianceEvent::Forked(forked) => self.forked(forked),
            _ => {}
        }
    }

    /// A child announced itself: taken only from a guest whose host key may
    /// serve the container it names.
    fn forked(&self, forked: proto_core::tether::Forked) {
        let key = self.link.connection().host_key().copied();
        let taken = self.shared.forks.announced(self.generation, &forked, |id| {
            self.shared.may_serve(key.as_ref(), id)
        });
        let Some(id) = taken else {
            warn!(
                link = self.generation,
                container = %crate::claims::loggable(&forked.new_id),
                "a guest announced a forked child it may not serve; ignored"
            );
            return;
        };
        info!(
            link = self.generation,
            parent = %crate::claims::loggable(&forked.parent_id),
            container = %id,
            generation = forked.generation,
            failure = %forked.failure,
            recovery_us = forked.recovery_us,
            "forked child announced"
        );
        self.shared.note_changed(&id);
    }

    /// Stages output for a channel's user (handed on when this batch of work
    /// is done); a flood closes the channel.
    fn deliver(&mut self, channel: ChannelId, event: ChannelEvent) {
        let Some(chan) = self.chans.get_mut(&channel) else {
            return;
        };
        if chan.delivery.push(event).is_ok() {
            self.staged.insert(channel);
            return;
        }
        Refusals::count(&self.shared.refusals.output_floods, 1);
        warn!(
            link = self.generation,
            ?channel,
            "the guest's output came in more pieces than can be staged; channel closed"
        );
        if let Some(mut chan) = self.chans.remove(&channel) {
            chan.delivery.discard();
            self.link.close(channel);
            self.forget(
                chan,
                ApiError::Refused("the guest flooded the channel".into()),
            );
        }
    }

    /// Hands staged output on to the channels' users, as far as they may take it.
    fn flush_staged(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        for channel in staged {
            if let Some(chan) = self.chans.get_mut(&channel) {
                chan.delivery.flush(&chan.events, false);
                if !chan.delivery.is_empty() {
                    self.staged.insert(channel);
                }
            }
        }
    }

    /// A channel is gone: whoever still waits on it hears why, after the
    /// output staged for it.
    fn forget(&self, mut chan: Chan, why: ApiError) {
        chan.delivery.flush(&chan.events, true);
        if let Some((reply, _)) = chan.opening {
            let _ = reply.try_send(Err(why.clone()));
        }
        if let Some(reply) = chan.control {
            let _ = reply.try_send(Err(why));
        }
        if let Some((gauge, queued)) = chan.stdin {
            gauge.release(queued);
        }
        let _ = chan.events.try_send(ChannelEvent::Closed);
    }
}
