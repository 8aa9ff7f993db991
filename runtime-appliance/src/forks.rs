//! What the appliance knows of VM forks (docs/PROTOCOL.md 4.5): the
//! children a fork workflow waits for (`forked@tether` from each, matched by
//! container id and identity generation), and which containers were forked
//! from which, with the failure a child reported, for `ls` and the records.

use std::collections::HashMap;
use std::sync::Mutex;

use async_channel::{Receiver, Sender};
use proto_core::tether::Forked;
use serde::{Deserialize, Serialize};

/// How a container came from a fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkNote {
    /// The container id its VM was forked from.
    pub forked_from: String,
    /// The recovery step that failed in its VM (`step: reason`), if one did.
    pub failure: Option<String>,
}

impl ForkNote {
    /// The note a child's announcement gives.
    pub fn of(forked: &Forked) -> Self {
        Self {
            forked_from: forked.parent_id.clone(),
            failure: (!forked.failure.is_empty()).then(|| forked.failure.clone()),
        }
    }
}

#[derive(Default)]
struct State {
    /// Identity generation -> the child container id given it, and who waits.
    waiting: HashMap<u64, (String, Sender<Forked>)>,
    /// Live links that announced a child: their containers are noted.
    links: HashMap<u64, ForkNote>,
    /// Container id -> its note.
    notes: HashMap<String, ForkNote>,
}

/// The appliance's fork bookkeeping.
#[derive(Default)]
pub struct ForkHub {
    state: Mutex<State>,
}

impl ForkHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for child `id` of identity `generation` to announce itself.
    pub fn expect(&self, id: &str, generation: u64) -> Receiver<Forked> {
        let (tx, rx) = async_channel::bounded(1);
        self.lock().waiting.insert(generation, (id.to_owned(), tx));
        rx
    }

    /// Stops waiting for the child of identity `generation`.
    pub fn cancel(&self, generation: u64) {
        self.lock().waiting.remove(&generation);
    }

    /// Link `link` announced a child. The child is the one given the
    /// announced identity generation (a guest whose recovery failed before
    /// it took its new id may still name its parent's), else the id it
    /// names; it counts only if `may_serve` that id with the link's key.
    /// Whoever waits for it hears; the link's containers are noted. An
    /// announcement nobody waits for (a late one, or one after tetherd
    /// restarted) is still noted. Returns the child's id, if taken.
    pub fn announced(
        &self,
        link: u64,
        forked: &Forked,
        may_serve: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let note = ForkNote::of(forked);
        let mut s = self.lock();
        let id = match s.waiting.get(&forked.generation) {
            Some((id, _)) => id.clone(),
            None => forked.new_id.clone(),
        };
        if !may_serve(&id) {
            return None;
        }
        if let Some((_, waiter)) = s.waiting.remove(&forked.generation) {
            let _ = waiter.try_send(forked.clone());
        }
        s.notes.insert(id.clone(), note.clone());
        s.links.insert(link, note);
        Some(id)
    }

    /// The parent of the child link `link` serves, if it announced one.
    pub fn parent_of(&self, link: u64) -> Option<String> {
        self.lock().links.get(&link).map(|n| n.forked_from.clone())
    }

    /// Link `link` lists `ids`: if it announced a child, they are the child's.
    pub fn listed<'a>(&self, link: u64, ids: impl Iterator<Item = &'a str>) {
        let mut s = self.lock();
        if let Some(note) = s.links.get(&link).cloned() {
            for id in ids {
                s.notes.insert(id.to_owned(), note.clone());
            }
        }
    }

    /// A link is gone (its containers keep their notes).
    pub fn link_gone(&self, link: u64) {
        self.lock().links.remove(&link);
    }

    /// Notes container `id` (from its stored record).
    pub fn restore(&self, id: &str, note: ForkNote) {
        self.lock().notes.insert(id.to_owned(), note);
    }

    /// The note of container `id`.
    pub fn note(&self, id: &str) -> Option<ForkNote> {
        self.lock().notes.get(id).cloned()
    }

    /// Forgets container `id`.
    pub fn forget(&self, id: &str) {
        self.lock().notes.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forked(id: &str, generation: u64, failure: &str) -> Forked {
        Forked {
            parent_id: "web".into(),
            new_id: id.into(),
            generation,
            failure: failure.into(),
            recovery_us: 1200,
        }
    }

    #[test]
    fn an_announcement_reaches_its_waiter_only_with_the_right_generation() {
        let hub = ForkHub::default();
        let rx = hub.expect("web-1", 7);
        let anyone = |_: &str| true;
        assert_eq!(
            hub.announced(3, &forked("web-1", 8, ""), anyone).as_deref(),
            Some("web-1")
        );
        assert!(
            rx.try_recv().is_err(),
            "another generation is not the child"
        );
        // A child that failed before taking its id names its parent's: the
        // generation says which child it is.
        assert_eq!(hub.parent_of(3).as_deref(), Some("web"));
        let named = hub.announced(4, &forked("web", 7, "clock: no RTC"), anyone);
        assert_eq!(named.as_deref(), Some("web-1"));
        assert_eq!(rx.try_recv().unwrap().failure, "clock: no RTC");
        let note = hub.note("web-1").unwrap();
        assert_eq!(note.forked_from, "web");
        assert_eq!(note.failure.as_deref(), Some("clock: no RTC"));
        // The child's execs are noted as they are listed by its link.
        hub.listed(4, ["web-1", "web-exec2-1"].into_iter());
        assert_eq!(hub.note("web-exec2-1").unwrap().forked_from, "web");
        hub.listed(5, ["other"].into_iter());
        hub.link_gone(4);
        hub.listed(4, ["late"].into_iter());
        assert!(hub.note("other").is_none() && hub.note("late").is_none());
        hub.forget("web-1");
        assert!(hub.note("web-1").is_none());
    }

    #[test]
    fn a_cancelled_child_is_not_waited_for() {
        let hub = ForkHub::default();
        let rx = hub.expect("web-2", 1);
        hub.cancel(1);
        hub.announced(1, &forked("web-2", 1, ""), |_| true);
        assert!(rx.try_recv().is_err());
        // A guest that may not serve the child is not heard.
        let rx = hub.expect("web-3", 2);
        assert_eq!(hub.announced(2, &forked("web-3", 2, ""), |_| false), None);
        assert!(rx.try_recv().is_err() && hub.note("web-3").is_none());
    }
}
