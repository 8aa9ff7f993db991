//! Attachments: a container's output stream and its input, kept across link
//! drops. A driver task owns the guest channel; when the link drops before the
//! process has exited, it waits for the container to come back and re-attaches
//! from exactly the offset it had delivered (proto-core's `Cursor` keeps that
//! position), so the stream stays byte-exact with no duplicates.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use bytes::Bytes;
use futures_lite::future;
use proto_core::tether::{Cursor, Delivery};
use proto_core::{ChannelId, ChannelRequest};
use tracing::{debug, info};

use crate::api_types::{ApiError, Output};
use crate::guestlink::{self, ChannelEvent, LinkChannel, LinkCommand, OpenKind};
use crate::limits::guest_answer;
use crate::registry::Shared;
use crate::stdin::{QueuedStdin, StdinGauge};

/// Requests from an `Attachment` to its driver.
pub(crate) enum Control {
    Stdin(QueuedStdin),
    CloseStdin,
    Resize(u32, u32),
    Signal(String, Sender<bool>),
    Consumed(usize),
}

impl Control {
    /// The command that carries this item on `channel`; `Consumed` is the
    /// one it cannot say alone (how much window that returns is the
    /// channel's owner's business): its byte count comes back instead.
    pub(crate) fn into_command(self, channel: ChannelId) -> Result<LinkCommand, usize> {
        Ok(match self {
            Control::Stdin(data) => LinkCommand::Send { channel, data },
            Control::CloseStdin => LinkCommand::Eof { channel },
            Control::Resize(cols, rows) => LinkCommand::Request {
                channel,
                request: ChannelRequest::WindowChange {
                    cols,
                    rows,
                    width_px: 0,
                    height_px: 0,
                },
                reply: None,
            },
            Control::Signal(name, reply) => LinkCommand::Request {
                channel,
                request: ChannelRequest::Signal { name },
                reply: Some(reply),
            },
            Control::Consumed(n) => return Err(n),
        })
    }
}

/// A live attachment to a container's (or an exec's) stdio.
pub struct Attachment {
    /// The container (or exec) id.
    pub id: String,
    /// Whether the process has a terminal (then there is no stderr).
    pub tty: bool,
    /// The output offset this attachment started at.
    pub start: u64,
    offset: u64,
    /// Output replayed from the store before `rx` (its window is not the
    /// guest's, so it is not reported as consumed).
    prefix: Option<Receiver<Output>>,
    rx: Receiver<Output>,
    ctl: Sender<Control>,
    stdin: Arc<StdinGauge>,
    shared: Arc<Shared>,
}

impl Attachment {
    /// The next piece of output; `None` once the attachment has ended (after
    /// `Output::Exit`, at the end of a non-follow log, or when the container did
    /// not come back after its link dropped).
    pub async fn next(&mut self) -> Option<Output> {
        if let Some(prefix) = &self.prefix {
            match prefix.recv().await {
                Ok(out) => {
                    self.advance(&out);
                    return Some(out);
                }
                Err(_) => self.prefix = None,
            }
        }
        let out = self.rx.recv().await.ok()?;
        if let Output::Stdout(b) | Output::Stderr(b) = &out {
            let _ = self.ctl.try_send(Control::Consumed(b.len()));
        }
        self.advance(&out);
        Some(out)
    }

    /// The output offset just past what `next` has returned.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn advance(&mut self, out: &Output) {
        match out {
            Output::Stdout(b) | Output::Stderr(b) => {
                self.offset = self.offset.saturating_add(b.len() as u64);
            }
            Output::Gap(n) => self.offset = self.offset.saturating_add(*n),
            Output::Exit(_) => {}
        }
    }

    /// An attachment fed by `rx` alone (output from the store; no guest
    /// channel behind it, so stdin, resize and signals are refused).
    pub(crate) fn fed(
        shared: Arc<Shared>,
        id: &str,
        tty: bool,
        start: u64,
        rx: Receiver<Output>,
    ) -> Self {
        let (ctl, _) = async_channel::unbounded();
        Self {
            id: id.to_owned(),
            tty,
            start,
            offset: start,
            prefix: None,
            rx,
            ctl,
            stdin: Arc::new(StdinGauge::default()),
            shared,
        }
    }

    /// `output` (fed from the store) with its input going to `ctl`'s
    /// reader (the follower that holds an exec's channel).
    pub(crate) fn with_control(mut output: Attachment, ctl: Sender<Control>) -> Self {
        // The output is not the guest's window to return: it comes through
        // `prefix`, which reports nothing consumed.
        output.prefix = Some(output.take_rx());
        output.ctl = ctl;
        output
    }

    /// This attachment's input with `output`'s output (an attachment whose
    /// channel carries no output, and one fed from the store).
    pub(crate) fn with_output_of(mut self, mut output: Attachment) -> Self {
        self.start = output.start;
        self.offset = output.offset;
        self.tty = output.tty;
        // Its output comes first and ends with the exit; this one's own
        // receiver yields nothing.
        self.prefix = Some(output.take_rx());
        self
    }

    /// The output receiver, leaving one that has ended.
    fn take_rx(&mut self) -> Receiver<Output> {
        std::mem::replace(&mut self.rx, async_channel::bounded(1).1)
    }

    fn send(&self, c: Control) -> Result<(), ApiError> {
        self.ctl
            .try_send(c)
            .map_err(|_| ApiError::LinkDown("the attachment has ended".into()))
    }

    /// Writes to the process's stdin (needs `stdin` in the options).
    /// Waits while a full queue of earlier input has not reached the guest.
    pub async fn write_stdin(&self, data: Bytes) -> Result<(), ApiError> {
        self.stdin.reserve(data.len()).await;
        self.send(Control::Stdin(QueuedStdin {
            data,
            gauge: self.stdin.clone(),
        }))
    }

    /// Resolves when `write_stdin` would not wait.
    pub fn stdin_room(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let gauge = self.stdin.clone();
        async move { gauge.room().await }
    }

    /// Closes the process's stdin (a terminal gets its EOF character).
    pub async fn close_stdin(&self) -> Result<(), ApiError> {
        self.send(Control::CloseStdin)
    }

    /// Resizes the process's terminal.
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), ApiError> {
        self.send(Control::Resize(cols, rows))
    }

    /// Sends a signal (name without "SIG") to the process group.
    pub async fn signal(&self, name: &str) -> Result<(), ApiError> {
        let (tx, rx) = async_channel::bounded(1);
        self.send(Control::Signal(name.to_owned(), tx))?;
        let limit = self.shared.limits.guest_request_timeout;
        let answer = guest_answer(limit, &self.shared.refusals, "a signal", async {
            rx.recv()
                .await
                .map_err(|_| ApiError::LinkDown("the attachment has ended".into()))
        });
        match answer.await? {
            true => Ok(()),
            false => Err(ApiError::Refused(format!(
                "the guest could not deliver SIG{name}"
            ))),
        }
    }
}

/// How a driver (re)opens its channel.
#[derive(Clone)]
pub(crate) struct Plan {
    pub id: String,
    pub stdin: bool,
    /// Where the output stands and what of it is wanted.
    pub cursor: Cursor,
    /// How long to wait for the container to come back after a link drop.
    pub reattach_timeout: Duration,
}

impl Plan {
    /// The guest channel for this plan, from where the cursor stands.
    fn open_kind(&self) -> OpenKind {
        OpenKind::Attach(self.cursor.request(&self.id, self.stdin))
    }
}

/// Opens the first channel of `plan` on `link` and starts its driver. `tty`
/// is what the container list says.
pub(crate) async fn attach(
    shared: Arc<Shared>,
    plan: Plan,
    tty: bool,
    link: Sender<LinkCommand>,
) -> Result<Attachment, ApiError> {
    let channel = open_on(&shared, &link, plan.open_kind()).await?;
    let pending = barrier(&shared, &link, &channel).await?;
    Ok(start_after(shared, plan, tty, (channel, link), pending))
}

/// Waits until everything the guest sent on a new attach channel before
/// answering a request is here: the gap it reports right after the start
/// offset then belongs to the start, so the offset a client is told is
/// exact. The events received meanwhile are returned, to be handled first.
async fn barrier(
    shared: &Shared,
    link: &Sender<LinkCommand>,
    lc: &LinkChannel,
) -> Result<VecDeque<ChannelEvent>, ApiError> {
    let (tx, rx) = async_channel::bounded(1);
    let request = ChannelRequest::Other {
        name: "keepalive@openssh.com".into(),
        data: Bytes::new(),
    };
    let command = LinkCommand::Request {
        channel: lc.channel,
        request,
        reply: Some(tx),
    };
    if link.send(command).await.is_ok() {
        // Any answer will do; none means the link dropped (the driver sees).
        let limit = shared.limits.guest_request_timeout;
        guest_answer(
            limit,
            &shared.refusals,
            "an attach's first request",
            async {
                let _ = rx.recv().await;
                Ok(())
            },
        )
        .await?;
    }
    let mut pending = VecDeque::new();
    while let Ok(event) = lc.events.try_recv() {
        pending.push_back(event);
    }
    Ok(pending)
}

/// Starts a driver for an open channel and returns the attachment.
pub(crate) fn start(
    shared: Arc<Shared>,
    plan: Plan,
    tty: bool,
    first: (LinkChannel, Sender<LinkCommand>),
) -> Attachment {
    start_after(shared, plan, tty, first, VecDeque::new())
}

/// `start`, with the channel's first events already received: gaps at their
/// front move the start offset.
fn start_after(
    shared: Arc<Shared>,
    mut plan: Plan,
    tty: bool,
    first: (LinkChannel, Sender<LinkCommand>),
    mut pending: VecDeque<ChannelEvent>,
) -> Attachment {
    plan.cursor.opened(first.0.offset);
    while let Some(ChannelEvent::Gap(lost)) = pending.front() {
        plan.cursor.gap(*lost);
        pending.pop_front();
    }
    let start = plan.cursor.offset();
    let (out_tx, out_rx) = async_channel::unbounded();
    let (ctl_tx, ctl_rx) = async_channel::unbounded();
    let id = plan.id.clone();
    // Detached: when the attachment is dropped, the driver sees its channels
    // close and closes the guest channel (a detach) before it ends.
    smol::spawn(drive(shared.clone(), plan, first, pending, out_tx, ctl_rx)).detach();
    Attachment {
        id,
        tty,
        start,
        offset: start,
        prefix: None,
        rx: out_rx,
        ctl: ctl_tx,
        stdin: Arc::new(StdinGauge::default()),
        shared,
    }
}

/// Opens a channel on a link (within the guest request timeout).
pub(crate) async fn open_on(
    shared: &Shared,
    link: &Sender<LinkCommand>,
    kind: OpenKind,
) -> Result<LinkChannel, ApiError> {
    guestlink::ask(shared, link, "a channel open", |reply| LinkCommand::Open {
        kind,
        reply,
    })
    .await
}

enum Step {
    Event(Option<ChannelEvent>),
    Control(Option<Control>),
}

async fn drive(
    shared: Arc<Shared>,
    mut plan: Plan,
    first: (LinkChannel, Sender<LinkCommand>),
    mut pending: VecDeque<ChannelEvent>,
    out: Sender<Output>,
    ctl: Receiver<Control>,
) {
    let mut current = Some(first);
    loop {
        if plan.cursor.at_end() {
            return;
        }
        let (lc, link) = match current.take() {
            Some(c) => c,
            None => {
                shared
                    .counters
                    .reattaches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let offset = plan.cursor.offset();
                info!(container = %plan.id, offset, "re-attaching after a link drop");
                match reopen(&shared, &plan).await {
                    Ok(c) => {
                        plan.cursor.opened(c.0.offset);
                        c
                    }
                    Err(e) => {
                        info!(container = %plan.id, "cannot re-attach: {e}");
                        return;
                    }
                }
            }
        };
        let channel = lc.channel;
        loop {
            let step = match pending.pop_front() {
                Some(event) => Step::Event(Some(event)),
                None => {
                    future::or(async { Step::Event(lc.events.recv().await.ok()) }, async {
                        Step::Control(ctl.recv().await.ok())
                    })
                    .await
                }
            };
            let command = match step {
                Step::Event(Some(ChannelEvent::Data { ext, data })) => {
                    let item = match plan.cursor.data(ext, data) {
                        Delivery::Skip(n) => {
                            // Not asked for: counted in the offset, and its
                            // window returned at once.
                            let _ = link.send(LinkCommand::Consumed { channel, n }).await;
                            None
                        }
                        Delivery::Stdout(d) => Some(Output::Stdout(d)),
                        Delivery::Stderr(d) => Some(Output::Stderr(d)),
                    };
                    if let Some(item) = item
                        && out.send(item).await.is_err()
                    {
                        break;
                    }
                    if plan.cursor.at_end() {
                        let _ = link.send(LinkCommand::Close { channel }).await;
                        return;
                    }
                    continue;
                }
                Step::Event(Some(ChannelEvent::Gap(lost))) => {
                    plan.cursor.gap(lost);
                    let _ = out.send(Output::Gap(lost)).await;
                    continue;
                }
                Step::Event(Some(ChannelEvent::Exit(status))) => {
                    let _ = out.send(Output::Exit(status)).await;
                    let _ = link.send(LinkCommand::Close { channel }).await;
                    return;
                }
                Step::Event(Some(ChannelEvent::Closed)) | Step::Event(None) => {
                    let offset = plan.cursor.offset();
                    debug!(container = %plan.id, offset, "channel closed before the process exited");
                    break;
                }
                Step::Control(Some(c)) => match c.into_command(channel) {
                    Ok(command) => command,
                    Err(n) => LinkCommand::Consumed {
                        channel,
                        n: plan.cursor.consumed(n),
                    },
                },
                Step::Control(None) => {
                    // The attachment was dropped: detach (close without EOF).
                    let _ = link.send(LinkCommand::Close { channel }).await;
                    return;
                }
            };
            let _ = link.send(command).await;
        }
        if out.is_closed() || ctl.is_closed() {
            let _ = link.send(LinkCommand::Close { channel }).await;
            return;
        }
    }
}

/// Opens a new channel for `plan` once its container is served again,
/// trying again while links keep dropping, for `reattach_timeout` at most.
async fn reopen(
    shared: &Shared,
    plan: &Plan,
) -> Result<(LinkChannel, Sender<LinkCommand>), ApiError> {
    let deadline = Instant::now() + plan.reattach_timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = match shared.wait_for(&plan.id, left).await {
            Ok((_, link)) => open_on(shared, &link, plan.open_kind())
                .await
                .map(|c| (c, link)),
            Err(e) => Err(e),
        };
        match attempt {
            Err(ApiError::LinkDown(why)) if Instant::now() < deadline => {
                debug!(container = %plan.id, "re-attach: {why}; trying again");
                smol::Timer::after(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Opens a short-lived control channel (no stdio) to container `id` and sends
/// one request; the guest's answer.
pub(crate) async fn control_request(
    shared: &Shared,
    id: &str,
    request: ChannelRequest,
    timeout: Duration,
) -> Result<bool, ApiError> {
    let (_, link) = shared.wait_for(id, timeout).await?;
    guestlink::ask(shared, &link, "a control request", |reply| {
        LinkCommand::Control {
            id: id.to_owned(),
            request,
            reply,
        }
    })
    .await
}
