//! Ciphertext taken from a connection and not yet written: the one buffer a
//! runtime keeps between `poll_transmit` and its socket, and the back-pressure
//! rule that goes with it. Pure bookkeeping; the caller does the writing.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::connection::Connection;
use crate::tether::{ApplianceLink, GuestLink};

/// Something that produces ciphertext for a socket: a `Connection`, or a
/// tether link over one.
pub trait Transmit {
    /// The next bytes to write.
    fn poll_transmit(&mut self) -> Option<Bytes>;
    /// Whether `poll_transmit` has something.
    fn has_transmit(&self) -> bool;
}

impl Transmit for Connection {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        Connection::poll_transmit(self)
    }
    fn has_transmit(&self) -> bool {
        Connection::has_transmit(self)
    }
}

impl Transmit for GuestLink {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        GuestLink::poll_transmit(self)
    }
    fn has_transmit(&self) -> bool {
        GuestLink::has_transmit(self)
    }
}

impl Transmit for ApplianceLink {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        ApplianceLink::poll_transmit(self)
    }
    fn has_transmit(&self) -> bool {
        ApplianceLink::has_transmit(self)
    }
}

/// Transmits waiting for the socket.
#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    len: usize,
    limit: usize,
}

impl Outbox {
    /// An outbox that takes up to `limit` bytes from its connection at a time.
    /// Beyond it the connection keeps its output, so `channel_send` feels the
    /// back-pressure of a slow socket.
    pub fn new(limit: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            len: 0,
            limit,
        }
    }

    /// Takes what the connection has to send, up to the limit.
    pub fn fill(&mut self, conn: &mut impl Transmit) {
        while self.len < self.limit {
            let Some(out) = conn.poll_transmit() else {
                break;
            };
            self.len += out.len();
            self.queue.push_back(out);
        }
    }

    /// Takes everything the connection has to send, ignoring the limit (a
    /// last flush before closing, typically a DISCONNECT).
    pub fn fill_all(&mut self, conn: &mut impl Transmit) {
        while let Some(out) = conn.poll_transmit() {
            self.len += out.len();
            self.queue.push_back(out);
        }
    }

    /// The bytes to write next.
    pub fn front(&self) -> Option<&Bytes> {
        self.queue.front()
    }

    /// `n` bytes of the front were written.
    pub fn advance(&mut self, n: usize) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        let n = n.min(front.len());
        self.len -= n;
        if n == front.len() {
            self.queue.pop_front();
        } else {
            *front = front.slice(n..);
        }
    }

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether to read more input now. Not while the outbox is full and the
    /// connection has still more to send: a peer that sends but never reads
    /// would otherwise make us queue replies without bound.
    pub fn may_read(&self, conn: &impl Transmit) -> bool {
        self.len < self.limit || !conn.has_transmit()
    }

    /// Everything waiting, as one buffer (for a best-effort final write).
    pub fn concat(&self) -> Vec<u8> {
        self.queue.iter().flat_map(|b| b.iter().copied()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::null::NullProvider;
    use crate::{Config, PrivateKey, ServerConfig};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    use std::sync::Arc;
    use std::time::Instant;

    fn conn() -> Connection {
        let mut cfg = Config::server(ServerConfig::new(PrivateKey::from_seed([2; 32]), vec![]));
        cfg.provider = Arc::new(NullProvider);
        Connection::new(cfg, Instant::now(), Box::new(ChaCha8Rng::seed_from_u64(1)))
    }

    #[test]
    fn partial_writes_advance_through_the_queue_in_order() {
        let mut c = conn();
        let mut out = Outbox::new(1 << 20);
        out.fill(&mut c);
        let all = out.concat();
        assert!(
            !all.is_empty(),
            "a new connection has its version and KEXINIT to send"
        );
        let mut written = Vec::new();
        while let Some(front) = out.front() {
            let n = front.len().min(7);
            written.extend_from_slice(&front[..n]);
            out.advance(n);
        }
        assert_eq!(written, all);
        assert!(out.is_empty() && out.may_read(&c));
    }

    #[test]
    fn a_full_outbox_stops_reading_only_while_the_connection_has_more() {
        let mut c = conn();
        let mut out = Outbox::new(1);
        out.fill(&mut c);
        // One transmit is taken (it exceeds the limit); the connection is empty.
        assert!(out.may_read(&c));
        c.rekey(); // nothing to send before the first key exchange
        assert!(!c.has_transmit());
        c.disconnect(crate::DisconnectReason::ByApplication, "bye");
        assert!(c.has_transmit());
        assert!(!out.may_read(&c), "full, and the connection holds more");
        out.fill_all(&mut c);
        assert!(!c.has_transmit());
    }
}
