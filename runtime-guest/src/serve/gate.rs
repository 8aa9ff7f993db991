//! Dropping and holding the links for a fork: a child drops its parent's
//! link the moment it notices (the bytes it holds are the parent's) and
//! makes no new one until it has recovered; then each link starts afresh
//! (a serial line is reopened, which discards stale input, and asks for an
//! ANNOUNCE).

use std::cell::Cell;

use event_listener::Event;

/// The links' epoch and hold.
#[derive(Default)]
pub struct LinkGate {
    epoch: Cell<u64>,
    held: Cell<bool>,
    changed: Event,
}

impl LinkGate {
    /// Drops every link open now.
    pub fn reset(&self) {
        self.epoch.set(self.epoch.get() + 1);
        self.changed.notify(usize::MAX);
    }

    /// No new link until [`LinkGate::release`].
    pub fn hold(&self) {
        self.held.set(true);
        self.changed.notify(usize::MAX);
    }

    /// New links may start.
    pub fn release(&self) {
        self.held.set(false);
        self.changed.notify(usize::MAX);
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// Waits until links may start.
    pub(super) async fn released(&self) {
        while self.held.get() {
            let listener = self.changed.listen();
            if !self.held.get() {
                return;
            }
            listener.await;
        }
    }

    /// Waits until the links of `epoch` are to be dropped.
    pub(super) async fn reset_since(&self, epoch: u64) {
        while self.epoch.get() == epoch {
            let listener = self.changed.listen();
            if self.epoch.get() != epoch {
                return;
            }
            listener.await;
        }
    }
}
