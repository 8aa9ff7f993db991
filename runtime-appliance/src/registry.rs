//! The appliance's shared state: the connection map (proto-core's pure
//! `ConnectionMap`), each live link's command queue, the pinned guest keys, and
//! what is remembered of exited containers after their link has gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::Sender;
use event_listener::Event;
use futures_lite::future;
use proto_core::connmap::{ConnectionMap, Entry, MapEvent, WaiterId};
use proto_core::tether::{ContainerInfo, State};
use proto_core::{ClientConfig, HostKeyPolicy, PrivateKey, PublicKey};
use smol::Timer;
use tracing::warn;

use crate::api_types::{ApiError, ContainerView};
use crate::claims::{self, Refusal};
use crate::forks::ForkHub;
use crate::guestlink::LinkCommand;
use crate::limits::{Limits, LinkSlots, MAX_CLIENT_WAIT, Refusals};
use crate::remembered::Remembered;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub links_accepted: AtomicU64,
    pub attaches: AtomicU64,
    pub execs: AtomicU64,
    pub reattaches: AtomicU64,
    pub conflicts: AtomicU64,
    /// Container claims refused (`claims`): counted once per link and id.
    pub claims_refused: AtomicU64,
    /// Channel data received from guests, in bytes.
    pub guest_output_bytes: AtomicU64,
}

#[derive(Default)]
struct Registry {
    map: ConnectionMap,
    links: HashMap<u64, Sender<LinkCommand>>,
    /// Exited containers whose link is gone: still listed, still waitable.
    remembered: Remembered,
    /// Where each `ConnectionMap` waiter hears that its id arrived.
    ready: HashMap<WaiterId, Sender<Entry>>,
    /// Ids whose listing changed since the follower last took them; `None`
    /// until a follower watches (see [`Shared::watch_changes`]).
    changes: Option<BTreeSet<String>>,
    /// Each live link's host key, and the claims refused to it so far.
    claimants: HashMap<u64, Claimant>,
    /// Per container id, while anyone waits on it: its listing changed.
    watched: HashMap<String, Arc<Event>>,
}

/// What the registry keeps of a link for judging its claims.
#[derive(Default)]
struct Claimant {
    key: Option<PublicKey>,
    /// Ids refused already (so a refusal is logged and counted once); at
    /// most `MAX_REFUSALS_KEPT`, beyond which refusals go uncounted.
    refused: std::collections::HashSet<String>,
}

/// Refusals remembered per link (a guest naming new bad ids forever does not
/// grow tetherd's memory).
const MAX_REFUSALS_KEPT: usize = 256;

impl Registry {
    fn drain_map_events(&mut self, counters: &Counters) {
        while let Some(ev) = self.map.poll_event() {
            match ev {
                MapEvent::Ready { waiter, entry } => {
                    if let Some(tx) = self.ready.remove(&waiter) {
                        let _ = tx.try_send(entry);
                    }
                }
                MapEvent::Conflict { id, serving, other } => {
                    counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    warn!(container = %id, serving, other, "two live guest links claim this container; the newer serves it");
                }
                _ => {}
            }
        }
    }

    /// Notes that the listing of `ids` changed: for the follower, and to
    /// wake whoever watches one of them.
    fn note_changes<'a>(&mut self, ids: impl IntoIterator<Item = &'a String>) {
        for id in ids {
            if let Some(event) = self.watched.get(id) {
                event.notify(usize::MAX);
            }
            if let Some(changes) = &mut self.changes {
                changes.insert(id.clone());
            }
        }
    }
}

/// Everything the appliance's tasks share.
pub struct Shared {
    generations: AtomicU64,
    state: Mutex<Registry>,
    /// Ids were added to the changes a follower watches.
    pub changes_noted: Event,
    client: proto_core::Config,
    /// Container id -> the guest host key pinned for it (none: any key).
    known: Option<HashMap<String, PublicKey>>,
    /// Keys pinned while running (VMs this appliance booted), beside `known`.
    pinned: Mutex<HashMap<String, PublicKey>>,
    pub counters: Counters,
    /// Bounds against hostile or broken guests, and what they refused.
    pub limits: Limits,
    pub refusals: Refusals,
    /// Guest links open now (counted against `limits.max_links`).
    pub slots: std::sync::Arc<LinkSlots>,
    /// Forks: children awaited, containers forked from others.
    pub forks: ForkHub,
}

impl Shared {
    /// Shared state for an appliance with this key, trusting `known` guests
    /// (or any guest when `None`).
    pub fn new(key: PrivateKey, known: Option<HashMap<String, PublicKey>>) -> Self {
        let host_keys = match &known {
            Some(k) => HostKeyPolicy::Pinned(k.values().copied().collect()),
            None => HostKeyPolicy::AcceptAny,
        };
        let mut client = proto_core::Config::client(ClientConfig {
            user: "tetherd".into(),
            key: Some(key),
            host_keys,
        });
        // Two unanswered keepalives 4 s apart end a link: a dead one is noticed
        // 8 to 12 s after it died, within the 15 s users were promised.
        client.keepalive_interval = Some(Duration::from_secs(4));
        client.keepalive_max = 2;
        // Large packets for bulk output: fewer packets to seal, open and
        // deliver per byte (the largest whole packet a peer must take is
        // 256 KiB + 1 KiB, proto_core::packet::MAX_PACKET_LEN).
        client.max_packet = 256 * 1024;
        Self {
            generations: AtomicU64::new(0),
            state: Mutex::new(Registry::default()),
            changes_noted: Event::new(),
            client,
            known,
            pinned: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            limits: Limits::default(),
            refusals: Refusals::default(),
            slots: Default::default(),
            forks: ForkHub::default(),
        }
    }

    /// The same, with these limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    fn pins(&self) -> std::sync::MutexGuard<'_, HashMap<String, PublicKey>> {
        self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Trusts `key` as the guest host key of container `id` from now on
    /// (replacing an earlier pin of `id`). No effect when any key is trusted.
    pub fn pin_guest(&self, id: &str, key: PublicKey) {
        self.pins().insert(id.to_owned(), key);
    }

    /// Stops trusting the key pinned for `id` at runtime.
    pub fn unpin_guest(&self, id: &str) {
        self.pins().remove(id);
    }

    /// Lists a container no link serves (one a state directory remembers),
    /// until a guest lists it again.
    pub fn remember(&self, info: ContainerInfo) {
        let mut r = self.lock();
        if r.map.get(&info.id).is_none() {
            let id = info.id.clone();
            let forgotten = r.remembered.insert(info, self.limits.max_remembered);
            Refusals::count(&self.refusals.remembered, forgotten as u64);
            r.note_changes([&id]);
        }
    }

    /// Forgets an exited container whose link is gone.
    pub fn forget(&self, id: &str) {
        self.forks.forget(id);
        let mut r = self.lock();
        r.remembered.remove(id);
        r.note_changes([&id.to_owned()]);
    }

    /// What fires when `id`'s listing changes (served, state, exit, gone);
    /// keep it while waiting (events nobody holds are forgotten).
    pub fn watch(&self, id: &str) -> Arc<Event> {
        let mut r = self.lock();
        if let Some(event) = r.watched.get(id) {
            return event.clone();
        }
        if r.watched.len() >= 64 && r.watched.len().is_power_of_two() {
            r.watched.retain(|_, e| Arc::strong_count(e) > 1);
        }
        let event = Arc::new(Event::new());
        r.watched.insert(id.to_owned(), event.clone());
        event
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new link's generation number.
    pub fn next_generation(&self) -> u64 {
        self.counters.links_accepted.fetch_add(1, Ordering::Relaxed);
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The SSH client configuration for guest links.
    pub fn client_config(&self) -> proto_core::Config {
        let mut config = self.client.clone();
        if let proto_core::Role::Client(client) = &mut config.role
            && let HostKeyPolicy::Pinned(keys) = &mut client.host_keys
        {
            keys.extend(self.pins().values().copied());
        }
        config
    }

    /// The host key of live link `generation`'s guest, once it authenticated.
    pub fn link_key(&self, generation: u64) -> Option<PublicKey> {
        self.lock().claimants.get(&generation).and_then(|c| c.key)
    }

    /// A link is ready to take commands.
    pub fn link_up(&self, generation: u64, commands: Sender<LinkCommand>) {
        self.lock().links.insert(generation, commands);
    }

    /// A link is gone: its claims go, exited containers are remembered.
    pub fn link_gone(&self, generation: u64) {
        self.forks.link_gone(generation);
        let mut r = self.lock();
        r.links.remove(&generation);
        r.claimants.remove(&generation);
        // Only this link's claims: a link going does not scan every container.
        let ids = r.map.claims_of(generation).to_vec();
        let exited: Vec<ContainerInfo> = ids
            .iter()
            .filter_map(|id| r.map.get(id))
            .filter(|e| e.generation == generation && e.info.state == State::Exited)
            .map(|e| e.info)
            .collect();
        for info in exited {
            let forgotten = r.remembered.insert(info, self.limits.max_remembered);
            Refusals::count(&self.refusals.remembered, forgotten as u64);
        }
        r.map.remove_connection(generation);
        r.drain_map_events(&self.counters);
        r.note_changes(&ids);
        drop(r);
        self.changes_noted.notify(usize::MAX);
    }

    /// A link's full container list (a reply or a push); the claims
    /// `claims` refuses are dropped, logged and counted.
    pub fn update(&self, generation: u64, host_key: Option<PublicKey>, list: Vec<ContainerInfo>) {
        let parent = self.forks.parent_of(generation);
        let mut r = self.lock();
        r.claimants.entry(generation).or_default().key = host_key;
        let list: Vec<ContainerInfo> = list
            .into_iter()
            .filter(|c| {
                // A fork's child whose recovery failed before it renamed its
                // sessions still names its parent's: they stay the parent's.
                let why = match &parent {
                    Some(p) if claims::parents_own(p, &c.id) => Err(Refusal::ParentsName),
                    _ => self.judge(&r, generation, host_key.as_ref(), &c.id),
                };
                match why {
                    Ok(()) => true,
                    Err(why) => {
                        self.refused(&mut r, generation, &c.id, &why);
                        false
                    }
                }
            })
            .collect();
        let ids: Vec<String> = list.iter().map(|c| c.id.clone()).collect();
        self.forks
            .listed(generation, ids.iter().map(String::as_str));
        // What the follower must look at again: entries that differ from
        // what the map has, and ids this link no longer lists.
        let mut changed: Vec<String> = list
            .iter()
            .filter(|c| {
                r.map
                    .get(&c.id)
                    .is_none_or(|e| e.generation != generation || e.info != **c)
            })
            .map(|c| c.id.clone())
            .collect();
        let listed: std::collections::HashSet<&String> = ids.iter().collect();
        changed.extend(
            r.map
                .claims_of(generation)
                .iter()
                .filter(|id| !listed.contains(id))
                .cloned(),
        );
        // A late list from a link already gone changes nothing (and leaves
        // no claimant behind).
        if r.map.update(generation, list) {
            for id in &ids {
                r.remembered.remove(id);
            }
        } else {
            r.claimants.remove(&generation);
            changed.clear();
        }
        r.drain_map_events(&self.counters);
        r.note_changes(&changed);
        drop(r);
        if !changed.is_empty() {
            self.changes_noted.notify(usize::MAX);
        }
    }

    /// From now on, collects the ids whose listing changes (served by
    /// another link, a new state, gone) for [`Shared::take_changes`].
    pub fn watch_changes(&self) {
        self.lock().changes.get_or_insert_with(BTreeSet::new);
    }

    /// The ids whose listing changed since the last call (or since
    /// [`Shared::watch_changes`]).
    pub fn take_changes(&self) -> BTreeSet<String> {
        self.lock()
            .changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Asks the follower to look at `id` again.
    pub fn note_changed(&self, id: &str) {
        self.lock().note_changes([&id.to_owned()]);
        self.changes_noted.notify(usize::MAX);
    }

    /// Whether link `generation` with `key` may serve `id` (see `claims`).
    fn judge(
        &self,
        r: &Registry,
        generation: u64,
        key: Option<&PublicKey>,
        id: &str,
    ) -> Result<(), Refusal> {
        if !claims::valid_id(id) {
            return Err(Refusal::BadId);
        }
        let allowed = |key: Option<&PublicKey>| match (&self.known, key) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(Refusal::NoHostKey),
            (Some(known), Some(key)) => {
                if claims::pinned_to(known, key, id) || claims::pinned_to(&self.pins(), key, id) {
                    Ok(())
                } else {
                    Err(Refusal::NotPinned)
                }
            }
        };
        allowed(key)?;
        if let Some(entry) = r.map.get(id)
            && entry.generation != generation
            && r.links.contains_key(&entry.generation)
        {
            let serving = r
                .claimants
                .get(&entry.generation)
                .and_then(|c| c.key.as_ref());
            if serving != key && allowed(serving).is_ok() {
                return Err(Refusal::Taken {
                    serving: entry.generation,
                });
            }
        }
        Ok(())
    }

    /// Whether a guest with host key `key` may serve `id` (pins only: what
    /// other links serve does not matter here).
    pub fn may_serve(&self, key: Option<&PublicKey>, id: &str) -> bool {
        match (&self.known, key) {
            (None, _) => claims::valid_id(id),
            (Some(_), None) => false,
            (Some(known), Some(key)) => {
                claims::valid_id(id)
                    && (claims::pinned_to(known, key, id)
                        || claims::pinned_to(&self.pins(), key, id))
            }
        }
    }

    /// Logs and counts a refused claim, once per link and id.
    fn refused(&self, r: &mut Registry, generation: u64, id: &str, why: &Refusal) {
        let claimant = r.claimants.entry(generation).or_default();
        if claimant.refused.contains(id) || claimant.refused.len() >= MAX_REFUSALS_KEPT {
            return;
        }
        claimant.refused.insert(id.to_owned());
        self.counters.claims_refused.fetch_add(1, Ordering::Relaxed);
        warn!(link = generation, container = %claims::loggable(id), "a guest's claim of a container was refused: {why}");
    }

    /// What is known of `id`: live, or remembered after its link went.
    pub fn info(&self, id: &str) -> Option<(ContainerInfo, Option<u64>)> {
        let r = self.lock();
        match r.map.get(id) {
            Some(e) => Some((e.info, Some(e.generation))),
            None => r.remembered.get(id).map(|i| (i.clone(), None)),
        }
    }

    /// Every container, live and remembered, sorted by id.
    pub fn views(&self) -> Vec<ContainerView> {
        let r = self.lock();
        let mut out: BTreeMap<String, ContainerView> = r
            .remembered
            .values()
            .map(|i| (i.id.clone(), ContainerView::new(i, None)))
            .collect();
        for e in r.map.list() {
            out.insert(
                e.info.id.clone(),
                ContainerView::new(&e.info, Some(e.generation)),
            );
        }
        drop(r);
        let out = out
            .into_iter()
            .map(|(id, v)| v.with_note(self.forks.note(&id)));
        out.collect()
    }

    /// Whether link `generation` is still up.
    pub fn link_alive(&self, generation: u64) -> bool {
        self.lock().links.contains_key(&generation)
    }

    /// Live links.
    pub fn link_count(&self) -> usize {
        self.lock().links.len()
    }

    /// Waits up to `timeout` for `id` to be served by a live link.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<(Entry, Sender<LinkCommand>), ApiError> {
        let deadline = Instant::now() + timeout.min(MAX_CLIENT_WAIT);
        let (waiter, ready) = {
            let mut r = self.lock();
            match r.map.wait(id, deadline) {
                Ok(entry) => match r.links.get(&entry.generation) {
                    Some(link) => return Ok((entry.clone(), link.clone())),
                    None => {
                        return Err(ApiError::LinkDown(format!(
                            "the link serving {id} is closing"
                        )));
                    }
                },
                Err(w) => {
                    let (tx, rx) = async_channel::bounded(1);
                    r.ready.insert(w, tx);
                    (w, rx)
                }
            }
        };
        struct Cancel<'a>(&'a Shared, WaiterId);
        impl Drop for Cancel<'_> {
            fn drop(&mut self) {
                let mut r = self.0.lock();
                r.map.cancel(self.1);
                r.ready.remove(&self.1);
            }
        }
        let _cancel = Cancel(self, waiter);
        // This waiter alone hears when its id arrives; the deadline is its own.
        let arrived = future::or(async { ready.recv().await.ok() }, async {
            Timer::at(deadline).await;
            None
        })
        .await;
        let Some(entry) = arrived else {
            return Err(ApiError::Timeout {
                id: id.to_owned(),
                waited: timeout,
            });
        };
        match self.lock().links.get(&entry.generation) {
            Some(link) => Ok((entry, link.clone())),
            None => Err(ApiError::LinkDown(format!(
                "the link serving {id} is closing"
            ))),
        }
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
