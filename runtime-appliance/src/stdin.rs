//! The bound on stdin an attachment may have on its way to a guest: writers
//! wait while more than [`STDIN_QUEUE_LIMIT`] bytes are handed over and not
//! yet taken by the guest's window, so a fast client cannot make tetherd
//! queue without bound.

use std::sync::Arc;

use bytes::Bytes;

/// How much stdin an attachment has handed over that the guest's window has
/// not taken yet; writers wait while it is over [`STDIN_QUEUE_LIMIT`].
#[derive(Default)]
pub struct StdinGauge {
    queued: std::sync::atomic::AtomicUsize,
    drained: event_listener::Event,
}

/// Stdin tetherd holds per attachment at most (before writers wait).
pub const STDIN_QUEUE_LIMIT: usize = 1 << 20;

impl StdinGauge {
    /// Waits until the queue has room.
    pub async fn room(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let listener = self.drained.listen();
            if self.queued.load(SeqCst) < STDIN_QUEUE_LIMIT {
                return;
            }
            listener.await;
        }
    }

    /// Waits for room, then counts `n` more bytes as queued.
    pub async fn reserve(&self, n: usize) {
        self.room().await;
        self.queued
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// `n` queued bytes were sent (or dropped).
    pub fn release(&self, n: usize) {
        self.queued
            .fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
        self.drained.notify(usize::MAX);
    }
}

/// Stdin bytes on their way to the guest; whatever is dropped unsent (the
/// channel or link went away) is released from its gauge.
pub struct QueuedStdin {
    pub data: Bytes,
    pub gauge: Arc<StdinGauge>,
}

impl Drop for QueuedStdin {
    fn drop(&mut self) {
        self.gauge.release(self.data.len());
    }
}
