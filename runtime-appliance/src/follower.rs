//! The log follower, like a container engine's log driver: every session of
//! every guest is followed from the end of what is stored (offset 0 the first
//! time) as soon as a guest lists it, and its output is appended to the store,
//! stream-tagged and timestamped. A chunk's window goes back to the guest only
//! once it is written, so a `block` session never loses a byte, even to a
//! tetherd crash. The container records mirror what the guests list.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proto_core::tether::{AttachRequest, ContainerInfo, Kind, State};
use tracing::{debug, info, warn};

use crate::api_types::ContainerView;
use crate::attachment::open_on;
use crate::guestlink::{ChannelEvent, LinkCommand, OpenKind};
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

/// The shortest time between two passes over the containers listed.
const PASS_INTERVAL: Duration = Duration::from_millis(50);

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
    let active: Arc<Mutex<HashSet<String>>> = Arc::default();
    // What each served container looked like at the last pass, so a pass
    // (one per change of any guest's list) touches the disk only for the
    // containers that changed. Only served containers are kept.
    let mut seen: HashMap<String, Seen> = HashMap::new();
    loop {
        let listener = shared.changed.listen();
        let mut served = HashSet::new();
        for view in shared.views() {
            if view.connection.is_none() {
                continue;
            }
            served.insert(view.id.clone());
            let listed = record_of(&view, None);
            let last = seen.get(&view.id);
            let unchanged = last.is_some_and(|s| s.listed == listed);
            if unchanged && (last.is_some_and(|s| s.complete) || lock(&active).contains(&view.id)) {
                continue;
            }
            let record = if unchanged {
                store.record(&view.id).unwrap_or_else(|| listed.clone())
            } else {
                let old = store.record(&view.id);
                let mut record = record_of(&view, old.clone());
                if let Some(key) = view.connection.and_then(|g| shared.link_key(g)) {
                    record.guest_key = Some(key.to_openssh());
                }
                if old.as_ref() != Some(&record)
                    && let Err(e) = store.save_record(&record)
                {
                    warn!(container = %view.id, "writing its record: {e}");
                }
                record
            };
            let complete = complete(&store, &record);
            seen.insert(view.id.clone(), Seen { listed, complete });
            if complete || !lock(&active).insert(view.id.clone()) {
                continue;
            }
            let (shared, store, active) = (shared.clone(), store.clone(), active.clone());
            smol::spawn(async move {
                follow(&shared, &store, &view.id).await;
                lock(&active).remove(&view.id);
                // Look again: the container may have come back meanwhile.
                shared.changed.notify(usize::MAX);
            })
            .detach();
        }
        seen.retain(|id, _| served.contains(id));
        listener.await;
        // One pass per PASS_INTERVAL at most: a guest pushing lists as fast
        // as it can costs a pass now and then, not one per push.
        smol::Timer::after(PASS_INTERVAL).await;
    }
}

/// A served container as the guest listed it at the last pass (its record
/// without what only tetherd adds), and whether all its output was stored.
struct Seen {
    listed: Record,
    complete: bool,
}

/// Follows container `id` until all its output is stored, or until it is
/// not served for `REATTACH_WAIT`.
async fn follow(shared: &Shared, store: &Store, id: &str) {
    let log = match store.log(id) {
        Ok(log) => log,
        Err(e) => {
            warn!(container = %id, "opening its output log: {e}");
            return;
        }
    };
    let mut backoff = RETRY_FIRST;
    loop {
        if store.record(id).is_some_and(|r| complete(store, &r)) {
            return;
        }
        let from = lock(&log).end();
        let Ok((_, link)) = shared.wait_for(id, REATTACH_WAIT).await else {
            return;
        };
        let request = AttachRequest {
            id: id.to_owned(),
            stdin: false,
            stdout: true,
            stderr: true,
            from,
        };
        let lc = match open_on(shared, &link, OpenKind::Attach(request)).await {
            Ok(lc) => {
                backoff = RETRY_FIRST;
                lc
            }
            Err(e) => {
                debug!(container = %id, "follower: {e}");
                smol::Timer::after(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        let channel = lc.channel;
        debug!(container = %id, from, "following");
        loop {
            let event = lc.events.recv().await.unwrap_or(ChannelEvent::Closed);
            let written = match event {
                ChannelEvent::Data { ext, data } => {
                    let kind = match ext {
                        Some(_) => FrameKind::Stderr,
                        None => FrameKind::Stdout,
                    };
                    let n = data.len();
                    let written = lock(&log).append(kind, SystemTime::now(), &data);
                    if written.is_ok() {
                        // Only now may the guest forget these bytes.
                        let _ = link.send(LinkCommand::Consumed { channel, n }).await;
                    }
                    written
                }
                ChannelEvent::Gap(lost) => lock(&log).append_gap(SystemTime::now(), lost),
                ChannelEvent::Exit(status) => {
                    let mut record = store.record(id).unwrap_or_else(|| Record {
                        id: id.to_owned(),
                        kind: "primary".into(),
                        state: "exited".into(),
                        exit_code: None,
                        output_end: 0,
                        tty: false,
                        guest_key: None,
                        exit_signal: None,
                        forked_from: None,
                        fork_failure: None,
                    });
                    record.state = "exited".into();
                    record.exit_code = Some(status.code());
                    if let proto_core::tether::ExitStatus::Signal { name, .. } = &status {
                        record.exit_signal = Some(name.clone());
                    }
                    record.output_end = record.output_end.max(lock(&log).end());
                    if let Err(e) = store.save_record(&record) {
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
                    store.changed.notify(usize::MAX);
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
