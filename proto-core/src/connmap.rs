//! The appliance's connection map: container id -> the connection that serves
//! it, with waiters for ids that have not arrived yet.
//!
//! Connections are numbered by a generation that only grows. Each connection's
//! container list is recorded as its *claims*; the id resolves to the newest live
//! claim. So an old connection's teardown removes only its own claims and can
//! never remove a newer registration (VIC's `RemoveInteraction` race), and when
//! two live connections claim one id the newer wins, the older is kept as a
//! fallback, and a [`MapEvent::Conflict`] reports it.
//!
//! A list that arrives for a connection already removed (a late reply racing
//! the teardown) is ignored: it would resurrect claims nobody removes. The
//! map remembers the last [`REMEMBERED_REMOVALS`] removed generations for this.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::tether::ContainerInfo;

/// Removed generations the map remembers, to ignore their late updates.
pub const REMEMBERED_REMOVALS: usize = 4096;

/// A connection's generation number: unique, increasing with each connection.
pub type Generation = u64;

/// A pending wait, as returned by [`ConnectionMap::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaiterId(pub u64);

/// Where a container is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The connection serving it.
    pub generation: Generation,
    /// What the guest last said about it.
    pub info: ContainerInfo,
}

/// Something the map's user must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapEvent {
    /// A waited-for id appeared.
    Ready { waiter: WaiterId, entry: Entry },
    /// A waiter's deadline passed first.
    TimedOut { waiter: WaiterId, id: String },
    /// Two live connections claim one id; `serving` won (the newer).
    Conflict {
        id: String,
        serving: Generation,
        other: Generation,
    },
}

#[derive(Debug)]
struct Waiter {
    id: String,
    deadline: Instant,
}

/// The map. Pure data: time comes in through `wait` and `handle_timeout`.
/// Waiters are indexed by id and by deadline, so an arriving id or the clock
/// touches only the waiters concerned, however many wait.
#[derive(Debug, Default)]
pub struct ConnectionMap {
    claims: HashMap<String, BTreeMap<Generation, ContainerInfo>>,
    by_connection: HashMap<Generation, Vec<String>>,
    waiters: BTreeMap<WaiterId, Waiter>,
    waiters_by_id: HashMap<String, BTreeSet<WaiterId>>,
    deadlines: BTreeSet<(Instant, WaiterId)>,
    next_waiter: u64,
    events: VecDeque<MapEvent>,
    /// Recently removed generations, oldest first, and the same as a set.
    removed_order: VecDeque<Generation>,
    removed: HashSet<Generation>,
}

impl ConnectionMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the full container list of connection `generation` (an answer to
    /// `container-ids@tether` or a guest push), replacing its previous list.
    /// Returns false, changing nothing, for a connection already removed.
    pub fn update(&mut self, generation: Generation, list: Vec<ContainerInfo>) -> bool {
        if self.removed.contains(&generation) {
            return false;
        }
        let old = self.by_connection.remove(&generation).unwrap_or_default();
        let listed: HashSet<&str> = list.iter().map(|c| c.id.as_str()).collect();
        for id in &old {
            if !listed.contains(id.as_str()) {
                self.drop_claim(id, generation);
            }
        }
        let mut ids = Vec::with_capacity(list.len());
        for info in list {
            let id = info.id.clone();
            let claims = self.claims.entry(id.clone()).or_default();
            let was_new = claims.is_empty();
            let newly_claimed = claims.insert(generation, info).is_none();
            if newly_claimed && claims.len() > 1 {
                let (&serving, _) = claims.last_key_value().expect("non-empty");
                let other = claims
                    .keys()
                    .rev()
                    .find(|&&g| g != serving)
                    .copied()
                    .expect("two claims");
                self.events.push_back(MapEvent::Conflict {
                    id: id.clone(),
                    serving,
                    other,
                });
            }
            if was_new {
                self.wake(&id);
            }
            ids.push(id);
        }
        self.by_connection.insert(generation, ids);
        true
    }

    /// Forgets everything connection `generation` claimed (it went away).
    pub fn remove_connection(&mut self, generation: Generation) {
        for id in self.by_connection.remove(&generation).unwrap_or_default() {
            self.drop_claim(&id, generation);
        }
        if self.removed.insert(generation) {
            self.removed_order.push_back(generation);
            if self.removed_order.len() > REMEMBERED_REMOVALS
                && let Some(oldest) = self.removed_order.pop_front()
            {
                self.removed.remove(&oldest);
            }
        }
    }

    fn drop_claim(&mut self, id: &str, generation: Generation) {
        if let Some(claims) = self.claims.get_mut(id) {
            claims.remove(&generation);
            if claims.is_empty() {
                self.claims.remove(id);
            }
        }
    }

    /// Where `id` is served now.
    pub fn get(&self, id: &str) -> Option<Entry> {
        let claims = self.claims.get(id)?;
        let (&generation, info) = claims.last_key_value()?;
        Some(Entry {
            generation,
            info: info.clone(),
        })
    }

    /// Every served id, sorted.
    pub fn list(&self) -> Vec<Entry> {
        let mut ids: Vec<&String> = self.claims.keys().collect();
        ids.sort();
        ids.into_iter().filter_map(|id| self.get(id)).collect()
    }

    /// The ids connection `generation` claims (its last list).
    pub fn claims_of(&self, generation: Generation) -> &[String] {
        self.by_connection
            .get(&generation)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.by_connection.len()
    }

    /// Finds `id` now, or registers a waiter that gets [`MapEvent::Ready`] when it
    /// appears or [`MapEvent::TimedOut`] at `deadline`.
    pub fn wait(&mut self, id: &str, deadline: Instant) -> Result<Entry, WaiterId> {
        if let Some(entry) = self.get(id) {
            return Ok(entry);
        }
        let waiter = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        self.waiters_by_id
            .entry(id.to_owned())
            .or_default()
            .insert(waiter);
        self.deadlines.insert((deadline, waiter));
        self.waiters.insert(
            waiter,
            Waiter {
                id: id.to_owned(),
                deadline,
            },
        );
        Err(waiter)
    }

    /// Withdraws a waiter (its caller gave up).
    pub fn cancel(&mut self, waiter: WaiterId) {
        self.unregister(waiter);
    }

    /// Removes a waiter from every index; what it waited for.
    fn unregister(&mut self, waiter: WaiterId) -> Option<Waiter> {
        let w = self.waiters.remove(&waiter)?;
        self.deadlines.remove(&(w.deadline, waiter));
        if let Some(set) = self.waiters_by_id.get_mut(&w.id) {
            set.remove(&waiter);
            if set.is_empty() {
                self.waiters_by_id.remove(&w.id);
            }
        }
        Some(w)
    }

    /// Waiters registered and not yet resolved.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    fn wake(&mut self, id: &str) {
        let Some(ready) = self.waiters_by_id.remove(id) else {
            return;
        };
        for waiter in ready {
            if let Some(w) = self.waiters.remove(&waiter) {
                self.deadlines.remove(&(w.deadline, waiter));
            }
            let entry = self.get(id).expect("just claimed");
            self.events.push_back(MapEvent::Ready { waiter, entry });
        }
    }

    /// The earliest waiter deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Expires waiters whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(deadline, waiter)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let w = self.unregister(waiter).expect("indexed waiters exist");
            self.events
                .push_back(MapEvent::TimedOut { waiter, id: w.id });
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MapEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tether::{Kind, State};
    use std::time::Duration;

    fn c(id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            kind: Kind::Primary,
            state: State::Running,
            exit_status: 0,
            output_end: 0,
            tty: false,
        }
    }

    #[test]
    fn an_old_connections_teardown_never_removes_a_newer_registration() {
        let mut map = ConnectionMap::new();
        map.update(1, vec![c("vm1")]);
        // The VM reconnects before the old connection's teardown runs.
        map.update(2, vec![c("vm1")]);
        map.remove_connection(1);
        assert_eq!(map.get("vm1").unwrap().generation, 2);
    }

    #[test]
    fn two_live_claims_resolve_to_the_newer_and_fall_back_to_the_older() {
        let mut map = ConnectionMap::new();
        map.update(3, vec![c("x")]);
        map.update(5, vec![c("x")]);
        assert_eq!(
            map.poll_event(),
            Some(MapEvent::Conflict {
                id: "x".into(),
                serving: 5,
                other: 3
            })
        );
        assert_eq!(map.get("x").unwrap().generation, 5);
        map.remove_connection(5);
        assert_eq!(map.get("x").unwrap().generation, 3);
        map.remove_connection(3);
        assert_eq!(map.get("x"), None);
    }

    #[test]
    fn a_late_update_for_a_removed_connection_is_ignored() {
        let mut map = ConnectionMap::new();
        map.update(1, vec![c("vm1")]);
        map.remove_connection(1);
        // A container list that was in flight when the link went.
        assert!(!map.update(1, vec![c("vm1"), c("ghost")]));
        assert_eq!(map.get("vm1"), None);
        assert_eq!(map.get("ghost"), None);
        assert_eq!(map.connections(), 0);
        // Only the last REMEMBERED_REMOVALS removals are remembered.
        for g in 2..(2 + REMEMBERED_REMOVALS as u64) {
            map.remove_connection(g);
        }
        assert!(map.update(1, vec![c("vm1")]));
        assert!(!map.update(2 + REMEMBERED_REMOVALS as u64 - 1, vec![c("x")]));
    }

    #[test]
    fn a_push_replaces_the_connections_list() {
        let mut map = ConnectionMap::new();
        map.update(1, vec![c("a"), c("e1")]);
        map.update(1, vec![c("a"), c("e2")]);
        let ids: Vec<String> = map.list().into_iter().map(|e| e.info.id).collect();
        assert_eq!(ids, ["a", "e2"]);
        assert_eq!(map.claims_of(1), ["a", "e2"]);
        assert!(map.claims_of(2).is_empty());
    }

    #[test]
    fn a_cancelled_waiter_neither_wakes_nor_sets_the_next_deadline() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut map = ConnectionMap::new();
        let a = map.wait("x", at(1)).unwrap_err();
        let b = map.wait("x", at(2)).unwrap_err();
        let y = map.wait("y", at(3)).unwrap_err();
        map.cancel(a);
        assert_eq!(map.poll_timeout(), Some(at(2)));
        map.update(1, vec![c("x")]);
        assert!(matches!(map.poll_event(), Some(MapEvent::Ready { waiter, .. }) if waiter == b));
        assert_eq!(map.poll_event(), None);
        assert_eq!(map.poll_timeout(), Some(at(3)));
        map.handle_timeout(at(10));
        assert_eq!(
            map.poll_event(),
            Some(MapEvent::TimedOut {
                waiter: y,
                id: "y".into()
            })
        );
        assert_eq!((map.waiting(), map.poll_timeout()), (0, None));
    }

    #[test]
    fn waiters_wake_when_the_id_arrives_or_time_out() {
        let t0 = Instant::now();
        let mut map = ConnectionMap::new();
        let w1 = map.wait("late", t0 + Duration::from_secs(50)).unwrap_err();
        let w2 = map.wait("never", t0 + Duration::from_secs(5)).unwrap_err();
        assert_eq!(map.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        map.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(
            map.poll_event(),
            Some(MapEvent::TimedOut {
                waiter: w2,
                id: "never".into()
            })
        );
        map.update(9, vec![c("late")]);
        assert!(
            matches!(map.poll_event(), Some(MapEvent::Ready { waiter, entry }) if waiter == w1 && entry.generation == 9)
        );
        assert_eq!(map.waiting(), 0);
        assert!(map.wait("late", t0).is_ok());
    }
}
