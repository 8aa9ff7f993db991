//! Exited containers remembered after their link has gone, bounded: past
//! the cap the oldest remembered one is forgotten first.

use std::collections::{BTreeMap, HashMap};

use proto_core::tether::ContainerInfo;

/// Remembered containers by id, with the order they were remembered in.
#[derive(Debug, Default)]
pub struct Remembered {
    by_id: HashMap<String, (u64, ContainerInfo)>,
    order: BTreeMap<u64, String>,
    next: u64,
}

impl Remembered {
    /// Remembers `info` (replacing what was remembered of its id); forgets the
    /// oldest while more than `cap` are remembered. Returns how many were forgotten.
    pub fn insert(&mut self, info: ContainerInfo, cap: usize) -> usize {
        self.remove(&info.id);
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, info.id.clone());
        self.by_id.insert(info.id.clone(), (seq, info));
        let mut forgotten = 0;
        while self.by_id.len() > cap {
            let Some((_, id)) = self.order.pop_first() else {
                break;
            };
            self.by_id.remove(&id);
            forgotten += 1;
        }
        forgotten
    }

    /// Forgets `id`.
    pub fn remove(&mut self, id: &str) {
        if let Some((seq, _)) = self.by_id.remove(id) {
            self.order.remove(&seq);
        }
    }

    /// What is remembered of `id`.
    pub fn get(&self, id: &str) -> Option<&ContainerInfo> {
        self.by_id.get(id).map(|(_, info)| info)
    }

    /// Everything remembered, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &ContainerInfo> {
        self.by_id.values().map(|(_, info)| info)
    }

    /// How many are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto_core::tether::{Kind, State};

    fn exited(id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            kind: Kind::Primary,
            state: State::Exited,
            exit_status: 1,
            output_end: 0,
            tty: false,
        }
    }

    #[test]
    fn the_oldest_is_forgotten_past_the_cap() {
        let mut r = Remembered::default();
        assert_eq!(r.insert(exited("a"), 2), 0);
        assert_eq!(r.insert(exited("b"), 2), 0);
        // Remembering `a` again makes it the newest.
        assert_eq!(r.insert(exited("a"), 2), 0);
        assert_eq!(r.insert(exited("c"), 2), 1);
        assert!(r.get("b").is_none());
        assert!(r.get("a").is_some() && r.get("c").is_some());
        r.remove("a");
        assert_eq!(r.len(), 1);
        assert_eq!(r.order.len(), 1);
    }
}
