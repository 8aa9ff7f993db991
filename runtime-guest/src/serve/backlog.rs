//! The links' backlog: bytes a link has taken from its connection and not yet
//! written to its stream. The guest waits for it before exiting (or powering
//! off): a serial line drains far slower than a process writes.

use std::cell::Cell;
use std::time::Instant;

use event_listener::Event;
use futures_lite::future;
use smol::Timer;

use crate::guest::Guest;

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
            future::or(
                async {
                    listener.await;
                },
                async {
                    Timer::at(deadline).await;
                },
            )
            .await;
        }
    }
}

/// Counts one link in the guest's [`Backlog`] while it holds unwritten bytes.
pub(super) struct Unsent<'a> {
    backlog: &'a Backlog,
    counted: bool,
}

impl<'a> Unsent<'a> {
    pub(super) fn new(guest: &'a Guest) -> Self {
        Self {
            backlog: &guest.link_backlog,
            counted: false,
        }
    }

    pub(super) fn set(&mut self, unsent: bool) {
        if unsent == self.counted {
            return;
        }
        let n = &self.backlog.links;
        if unsent {
            n.set(n.get() + 1);
        } else {
            n.set(n.get().saturating_sub(1));
            self.backlog.drained.notify(usize::MAX);
        }
        self.counted = unsent;
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}
