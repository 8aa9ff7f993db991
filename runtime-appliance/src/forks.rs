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
    /// Child container id -> the generation its identity carries, and who waits.
    waiting: HashMap<String, (u64, Sender<Forked>)>,
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
        self.lock().waiting.insert(id.to_owned(), (generation, tx));
        rx
    }

    /// Stops waiting for child `id`.
    pub fn cancel(&self, id: &str) {
        self.lock().waiting.remove(id);
    }

    /// Link `link`, whose guest may serve `forked.new_id`, announced a
    /// child. Whoever waits for it hears; the link's containers are noted.
    /// An announcement nobody waits for (a late one, or one after tetherd
    /// restarted) is still noted.
    pub fn announced(&self, link: u64, forked: &Forked) {
        let note = ForkNote::of(forked);
        let mut s = self.lock();
        if let Some((generation, _)) = s.waiting.get(&forked.new_id)
            && *generation == forked.generation
            && let Some((_, waiter)) = s.waiting.remove(&forked.new_id)
        {
            let _ = waiter.try_send(forked.clone());
        }
        s.notes.insert(forked.new_id.clone(), note.clone());
        s.links.insert(link, note);
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
        hub.announced(3, &forked("web-1", 8, ""));
        assert!(rx.try_recv().is_err(), "another generation is not the child");
        hub.announced(4, &forked("web-1", 7, "clock: no RTC"));
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
        hub.cancel("web-2");
        hub.announced(1, &forked("web-2", 1, ""));
        assert!(rx.try_recv().is_err());
    }
}
