//! The log follower, like a container engine's log driver: every session of
//! every guest is followed from the end of what is stored (offset 0 the first
//! time) as soon as a guest lists it, and its output is appended to the store,
//! stream-tagged and timestamped. A chunk's window goes back to the guest only
//! once it is written, so a `block` session never loses a byte, even to a
//! tetherd crash. The container records mirror what the guests list.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_channel::{Receiver, Sender};
use futures_lite::future;
use proto_core::tether::{AttachRequest, ContainerInfo, Kind, State};
use tracing::{debug, info, warn};

use crate::api_types::ContainerView;
use crate::attachment::{Control, open_on};
use crate::guestlink::{ChannelEvent, LinkChannel, LinkCommand, OpenKind};
use crate::registry::Shared;
use crate::store::{FrameKind, Record, Store, lock};

/// How long a follower waits for its container to be served again after its
/// link dropped, before it leaves (it is started again when the container is
/// next listed).
const REATTACH_WAIT: Duration = Duration::from_secs(2);

/// A follower whose channel open failed tries again after RETRY_FIRST,
/// doubling up to RETRY_MAX while it keeps failing.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(3);

/// How long after a follower ended its container is looked at again.
const LOOK_AGAIN: Duration = Duration::from_millis(50);

/// A follower that received nothing for this long closes its log's file
/// (reopened by the next output), so idle containers hold no descriptors.
const IDLE_RELEASE: Duration = Duration::from_secs(2);

/// Starts following every container the appliance lists, for as long as the
/// process runs.
pub(crate) fn spawn(shared: Arc<Shared>, store: Arc<Store>) {
    smol::spawn(manage(shared, store)).detach();
}

/// A record's view of a container (its id, state and exit) for the registry.
pub(crate) fn info_of(record: &Record) -> ContainerInfo {
    let state = match record.state.as_str() {
        "created" => State::Created,
        "running" => State::Running,
        _ => State::Exited,
    };
    ContainerInfo {
        id: record.id.clone(),
        kind: if record.kind == "exec" {
            Kind::Exec
        } else {
            Kind::Primary
        },
        state,
        exit_status: record.exit_code.unwrap_or(0),
        output_end: record.output_end,
        tty: record.tty,
    }
}

fn record_of(view: &ContainerView, old: Option<Record>) -> Record {
    Record {
        id: view.id.clone(),
        kind: view.kind.to_owned(),
        state: view.state.to_owned(),
        exit_code: view.exit_code,
        output_end: view.output_end,
        tty: view.tty,
        exit_signal: old.as_ref().and_then(|r| r.exit_signal.clone()),
        guest_key: old.and_then(|r| r.guest_key),
        forked_from: view.forked_from.clone(),
        fork_failure: view.fork_failure.clone(),
    }
}

/// Writes the record of a newly listed container unless it exists.
pub(crate) fn save_new_record(store: &Store, view: &ContainerView) -> std::io::Result<()> {
    if store.record(&view.id).is_some() {
        return Ok(());
    }
    store.save_record(&record_of(view, None))
}

/// Whether everything the guest will ever have for `record` is stored.
fn complete(store: &Store, record: &Record) -> bool {
    record.state == "exited"
        && store
            .log(&record.id)
            .is_ok_and(|log| lock(&log).end() >= record.output_end)
}

async fn manage(shared: Arc<Shared>, store: Arc<Store>) {
    // What each served container looked like when last looked at, so only
    // the containers that changed touch the disk. Only served ones are kept.
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    // From here on the registry collects the ids whose listing changes; the
    // first look is at everything listed already.
    shared.watch_changes();
    let mut ids: BTreeSet<String> = shared.views().into_iter().map(|v| v.id).collect();
    loop {
        let listener = shared.changes_noted.listen();
        ids.extend(shared.take_changes());
        if ids.is_empty() {
            listener.await;
            continue;
        }
        // Records are written with an fsync each: off the links' executor.
        let batch = std::mem::take(&mut ids);
        let (s, st, sn) = (shared.clone(), store.clone(), seen.clone());
        smol::unblock(move || {
            let mut seen = lock(&sn);
            for id in &batch {
                look_at(&s, &st, &mut seen, id);
            }
        })
        .await;
    }
}

/// Brings container `id`'s record up to date with its listing and starts
/// following it unless it is followed already or all its output is stored.
fn look_at(shared: &Arc<Shared>, store: &Arc<Store>, seen: &mut HashMap<String, Seen>, id: &str) {
    let Some((info, Some(generation))) = shared.info(id) else {
        seen.remove(id);
        return;
    };
    let view = ContainerView::new(&info, Some(generation));
    let listed = record_of(&view, None);
    let last = seen.get(id);
    let unchanged = last.is_some_and(|s| s.listed == listed);
    if unchanged && (last.is_some_and(|s| s.complete) || store.is_followed(id)) {
        return;
    }
    let record = if unchanged {
        store.record(id).unwrap_or_else(|| listed.clone())
    } else {
        let key = shared.link_key(generation);
        let (record, saved) = store.update_record(id, |old| {
            let mut record = record_of(&view, old.cloned());
            if let Some(key) = key {
                record.guest_key = Some(key.to_openssh());
            }
            record
        });
        if let Err(e) = saved {
            warn!(container = %id, "writing its record: {e}");
        }
        record
    };
    let complete = complete(store, &record);
    seen.insert(id.to_owned(), Seen { listed, complete });
    if complete || !store.start_following(id) {
        return;
    }
    spawn_follow(shared.clone(), store.clone(), id.to_owned(), None);
}

/// An exec's own channel, handed to the follower: it carries the exec's
/// output from its first byte (stored from there, so the output crosses the
/// link once) and its client's input.
pub(crate) struct ExecChannel {
    pub channel: LinkChannel,
    pub link: Sender<LinkCommand>,
    /// The client's input, resizes and signals, while it is attached.
    pub control: Receiver<Control>,
    /// Whether the exec has a terminal.
    pub tty: bool,
    /// While the client is attached: how long to wait for the exec to be
    /// served again after a link drop (the client's own timeout).
    pub reattach_timeout: Duration,
}

/// Follows `id`, which the caller claimed with `Store::start_following`,
/// starting with `exec`'s channel if given; gives up the claim at the end.
pub(crate) fn spawn_follow(
    shared: Arc<Shared>,
    store: Arc<Store>,
    id: String,
    exec: Option<ExecChannel>,
) {
    smol::spawn(async move {
        follow(&shared, &store, &id, exec).await;
        store.stop_following(&id);
        // Look again (the container may have come back meanwhile), a little
        // later: a follow that fails at once must not spin.
        smol::Timer::after(LOOK_AGAIN).await;
        shared.note_changed(&id);
    })
    .detach();
}

/// A served container as the guest listed it when last looked at (its
/// record without what only tetherd adds), and whether all its output was
/// stored.
struct Seen {
    listed: Record,
    complete: bool,
}

/// Follows container `id` until all its output is stored, or until it is
/// not served for `REATTACH_WAIT`. With an exec's channel, that channel
/// comes first, and the client's input goes to the guest (on attach
/// channels with stdin after a link drop) for as long as it is attached.
async fn follow(shared: &Shared, store: &Store, id: &str, exec: Option<ExecChannel>) {
    let log = match store.log(id) {
        Ok(log) => log,
        Err(e) => {
            warn!(container = %id, "opening its output log: {e}");
            return;
        }
    };
    let mut backoff = RETRY_FIRST;
    // What a record made here says until the guest's listing is stored.
    let (kind, tty, reattach_timeout) = match &exec {
        Some(e) => ("exec", e.tty, e.reattach_timeout),
        None => ("primary", false, REATTACH_WAIT),
    };
    let (mut first, mut control) = match exec {
        Some(e) => (Some((e.channel, e.link)), Some(e.control)),
        None => (None, None),
    };
    loop {
        // An exec's own channel is read to its exit whatever the listing
        // says: it carries the exit as it happened (a signal's name).
        if first.is_none() && store.record(id).is_some_and(|r| complete(store, &r)) {
            return;
        }
        let (lc, link) = match first.take() {
            Some(exec) => exec,
            None => {
                let from = lock(&log).end();
                let wait = if control.is_some() {
                    reattach_timeout
                } else {
                    REATTACH_WAIT
                };
                let Ok((_, link)) = shared.wait_for(id, wait).await else {
                    // Input still queued is dropped: its writers are freed.
                    if let Some(control) = control {
                        control.close();
                        while control.try_recv().is_ok() {}
                    }
                    return;
                };
                let request = AttachRequest {
                    id: id.to_owned(),
                    stdin: control.is_some(),
                    stdout: true,
                    stderr: true,
                    from,
                };
                match open_on(shared, &link, OpenKind::Attach(request)).await {
                    Ok(lc) => {
                        backoff = RETRY_FIRST;
                        debug!(container = %id, from, "following");
                        (lc, link)
                    }
                    Err(e) => {
                        debug!(container = %id, "follower: {e}");
                        smol::Timer::after(backoff).await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            }
        };
        let channel = lc.channel;
        loop {
            let event = match &control {
                None => next_event(&lc.events, &log).await,
                Some(ctl) => {
                    let input = async { Err(ctl.recv().await.ok()) };
                    match future::or(async { Ok(next_event(&lc.events, &log).await) }, input).await
                    {
                        Ok(event) => event,
                        Err(None) => {
                            // The client went: the output is still stored.
                            control = None;
                            continue;
                        }
                        Err(Some(c)) => {
                            // Window goes back when output is stored, not
                            // when the client consumed it.
                            if let Ok(command) = c.into_command(channel) {
                                let _ = link.send(command).await;
                            }
                            continue;
                        }
                    }
                }
            };
            let written = match event {
                ChannelEvent::Data { ext, data } => {
                    let kind = match ext {
                        Some(_) => FrameKind::Stderr,
                        None => FrameKind::Stdout,
                    };
                    let n = data.len();
                    // Kept in memory too while anyone else (an attach, a
                    // `logs -f`) holds the log: they read it from there.
                    let keep = Arc::strong_count(&log) > 1;
                    let written = if lock(&log).holds_file() {
                        lock(&log).append_shared(kind, SystemTime::now(), data, keep)
                    } else {
                        // Creating a segment file (a new inode: a container's
                        // first output) or opening it again: off the links'
                        // executor.
                        let log = log.clone();
                        smol::unblock(move || {
                            lock(&log).append_shared(kind, SystemTime::now(), data, keep)
                        })
                        .await
                    };
                    if written.is_ok() {
                        // Only now may the guest forget these bytes.
                        let _ = link.send(LinkCommand::Consumed { channel, n }).await;
                    }
                    written
                }
                ChannelEvent::Gap(lost) => lock(&log).append_gap(SystemTime::now(), lost),
                ChannelEvent::Exit(status) => {
                    let end = lock(&log).end();
                    let (record, saved) = store.update_record(id, |old| {
                        let mut record = old.cloned().unwrap_or_else(|| Record {
                            tty,
                            ..Record::new(id, kind, "exited")
                        });
                        record.state = "exited".into();
                        record.exit_code = Some(status.code());
                        if let proto_core::tether::ExitStatus::Signal { name, .. } = &status {
                            record.exit_signal = Some(name.clone());
                        }
                        record.output_end = record.output_end.max(end);
                        record
                    });
                    if let Err(e) = saved {
                        warn!(container = %id, "writing its record: {e}");
                    }
                    // Closing tells the guest the appliance holds everything.
                    let _ = link.send(LinkCommand::Close { channel }).await;
                    info!(container = %id, code = status.code(), end = record.output_end, "output stored to the end");
                    return;
                }
                ChannelEvent::Closed => break,
            };
            match written {
                Ok(()) => {
                    store.notify(id);
                }
                Err(e) => {
                    // Keep the window closed: the guest keeps the bytes.
                    warn!(container = %id, "writing its output: {e}; retrying in 1 s");
                    let _ = link.send(LinkCommand::Close { channel }).await;
                    smol::Timer::after(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

/// A channel's next event. A follower that waits longer than
/// [`IDLE_RELEASE`] closes its log's file meanwhile.
async fn next_event(
    events: &async_channel::Receiver<ChannelEvent>,
    log: &Mutex<crate::store::OutputLog>,
) -> ChannelEvent {
    let or_closed = |r: Result<ChannelEvent, _>| r.unwrap_or(ChannelEvent::Closed);
    if let Ok(event) = events.try_recv() {
        return event;
    }
    let idle = async {
        smol::Timer::after(IDLE_RELEASE).await;
        None
    };
    if let Some(event) =
        futures_lite::future::or(async { Some(or_closed(events.recv().await)) }, idle).await
    {
        return event;
    }
    lock(log).release_file();
    or_closed(events.recv().await)
}
