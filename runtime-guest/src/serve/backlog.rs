//! The links' backlog: bytes a link has taken from its connection and not yet
//! written to its stream. The guest waits for it before exiting (or powering
//! off): a serial line drains far slower than a process writes.

use std::cell::Cell;
use std::time::Instant;

use event_listener::Event;
use futures_lite::future;
use smol::Timer;

/// The links that hold bytes not yet written to their stream: the guest
/// does not exit (or power off) under them.
#[derive(Default)]
pub struct Backlog {
    links: Cell<usize>,
    drained: Event,
}

impl Backlog {
    /// Whether some link still holds unwritten bytes.
    pub fn is_empty(&self) -> bool {
        self.links.get() == 0
    }

    /// Waits until no link holds unwritten bytes, or `deadline`.
    pub async fn drained(&self, deadline: Instant) {
        while !self.is_empty() && Instant::now() < deadline {
            let listener = self.drained.listen();
            if self.is_empty() {
                return;
            }
            future::or(listener, async {
                Timer::at(deadline).await;
            })
            .await;
        }
    }

    /// One more link holds unwritten bytes.
    pub(super) fn hold(&self) {
        self.links.set(self.links.get() + 1);
    }

    /// A link wrote out what it held (or went away).
    pub(super) fn release(&self) {
        self.links.set(self.links.get().saturating_sub(1));
        self.drained.notify(usize::MAX);
    }
}
