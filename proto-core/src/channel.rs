//! Channel bookkeeping (RFC 4254 section 5): the id table, both windows,
//! EOF/CLOSE state, and the order in which request replies must go out.

use std::collections::{BTreeMap, VecDeque};

use crate::event::ChannelId;

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// We sent CHANNEL_OPEN; no answer yet.
    Opening,
    /// The peer sent CHANNEL_OPEN; the application has not answered.
    Offered,
    /// Open in both directions.
    Open,
}

/// Replies owed to the peer, in the order its requests arrived. A slot is
/// `None` while the application decides; replies leave from the front only.
#[derive(Debug)]
pub struct ReplyQueue<T> {
    slots: VecDeque<Option<T>>,
}

impl<T> Default for ReplyQueue<T> {
    fn default() -> Self {
        Self {
            slots: VecDeque::new(),
        }
    }
}

impl<T> ReplyQueue<T> {
    /// A request the application must answer.
    pub fn push_pending(&mut self) {
        self.slots.push_back(None);
    }

    /// A request the core has already answered.
    pub fn push_ready(&mut self, reply: T) {
        self.slots.push_back(Some(reply));
    }

    /// Fills the oldest unanswered slot. False if none is waiting.
    pub fn answer(&mut self, reply: T) -> bool {
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(reply);
                true
            }
            None => false,
        }
    }

    /// The next reply that may go out now.
    pub fn pop_ready(&mut self) -> Option<T> {
        if self.slots.front().is_some_and(Option::is_some) {
            self.slots.pop_front().flatten()
        } else {
            None
        }
    }

    /// Replies owed.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}

/// One channel.
#[derive(Debug)]
pub struct Channel {
    pub state: ChannelState,
    /// The peer's number for this channel.
    pub remote_id: u32,
    /// Bytes the peer will still accept.
    pub send_window: u32,
    /// The window the peer opened the channel with.
    pub send_window_initial: u32,
    /// Largest data payload the peer accepts per packet.
    pub send_max_packet: u32,
    /// Bytes we will still accept.
    pub recv_window: u32,
    /// The window we aim to keep open.
    pub recv_window_size: u32,
    /// Bytes consumed by the application and not yet returned to the peer.
    pub recv_credit: u32,
    pub eof_sent: bool,
    pub eof_received: bool,
    pub close_sent: bool,
    /// Replies we owe the peer.
    pub replies: ReplyQueue<bool>,
    /// Our want-reply requests the peer has not answered.
    pub awaiting_replies: u32,
    /// A send was cut short; tell the application when more fits.
    pub blocked: bool,
}

/// Largest data payload we put in one packet, whatever the peer allows.
const SEND_PACKET_CAP: u32 = 128 * 1024;

impl Channel {
    /// A channel with our receive window; the peer's side is filled in on open.
    pub fn new(state: ChannelState, window: u32) -> Self {
        Self {
            state,
            remote_id: 0,
            send_window: 0,
            send_window_initial: 0,
            send_max_packet: 0,
            recv_window: window,
            recv_window_size: window,
            recv_credit: 0,
            eof_sent: false,
            eof_received: false,
            close_sent: false,
            replies: ReplyQueue::default(),
            awaiting_replies: 0,
            blocked: false,
        }
    }

    /// Records the peer's side of the channel.
    pub fn set_remote(&mut self, remote_id: u32, window: u32, max_packet: u32) {
        self.remote_id = remote_id;
        self.send_window = window;
        self.send_window_initial = window;
        self.send_max_packet = max_packet.clamp(1, SEND_PACKET_CAP);
    }

    /// Accounts for `len` bytes of incoming data. False if they overrun the window.
    pub fn receive(&mut self, len: u32) -> bool {
        if len > self.recv_window {
            return false;
        }
        self.recv_window -= len;
        true
    }

    /// The application used `n` bytes. Returns a window adjustment to send once
    /// half the window has been consumed (OpenSSH's rule).
    pub fn consume(&mut self, n: u32) -> Option<u32> {
        let unconsumed = self.recv_window_size - self.recv_window - self.recv_credit;
        self.recv_credit += n.min(unconsumed);
        if self.recv_credit > 0 && self.recv_credit >= self.recv_window_size / 2 {
            let adjust = std::mem::take(&mut self.recv_credit);
            self.recv_window += adjust;
            Some(adjust)
        } else {
            None
        }
    }

    /// Bytes sent that the peer has not yet returned to the window: data it may
    /// not have received, or not yet used. A peer that returns window only for
    /// what it consumed (as tetherd does) thereby acknowledges delivery.
    pub fn unacknowledged(&self) -> u32 {
        self.send_window_initial.saturating_sub(self.send_window)
    }

    /// The peer opened its window further. Saturates at 2^32-1 (RFC 4254 5.2).
    pub fn add_send_window(&mut self, n: u32) {
        self.send_window = self.send_window.saturating_add(n);
    }
}

/// The channels of one connection, by local id. Ids are not reused while the
/// connection lives (until the 32-bit counter wraps), so a message or command
/// still in flight for a closed channel can never land on a newer one.
#[derive(Debug)]
pub struct Channels {
    slots: BTreeMap<u32, Channel>,
    next: u32,
    max: usize,
}

impl Channels {
    pub fn new(max: usize) -> Self {
        Self {
            slots: BTreeMap::new(),
            next: 0,
            max,
        }
    }

    /// Stores a channel under a fresh id; `None` when the table is full.
    pub fn insert(&mut self, channel: Channel) -> Option<ChannelId> {
        if self.slots.len() >= self.max {
            return None;
        }
        while self.slots.contains_key(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        self.slots.insert(id, channel);
        Some(ChannelId(id))
    }

    pub fn get(&self, id: ChannelId) -> Option<&Channel> {
        self.slots.get(&id.0)
    }

    pub fn get_mut(&mut self, id: ChannelId) -> Option<&mut Channel> {
        self.slots.get_mut(&id.0)
    }

    pub fn remove(&mut self, id: ChannelId) -> Option<Channel> {
        self.slots.remove(&id.0)
    }

    /// Every live channel.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ChannelId, &mut Channel)> {
        self.slots.iter_mut().map(|(&i, c)| (ChannelId(i), c))
    }

    /// Live channels.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_leave_in_request_order() {
        let mut q = ReplyQueue::default();
        q.push_pending();
        q.push_ready(false);
        q.push_pending();
        assert_eq!(q.pop_ready(), None);
        assert!(q.answer(true));
        assert_eq!(q.pop_ready(), Some(true));
        assert_eq!(q.pop_ready(), Some(false));
        assert_eq!(q.pop_ready(), None);
        assert!(q.answer(true));
        assert!(!q.answer(true));
    }

    #[test]
    fn window_refills_only_after_half_is_consumed() {
        let mut c = Channel::new(ChannelState::Open, 100);
        assert!(c.receive(60));
        assert_eq!(c.consume(30), None);
        assert_eq!(c.consume(30), Some(60));
        assert_eq!(c.recv_window, 100);
        assert!(!c.receive(101));
        // Consuming more than was received never inflates the window.
        assert!(c.receive(10));
        assert_eq!(c.consume(1000), None);
        assert_eq!(c.recv_credit, 10);
    }

    #[test]
    fn ids_are_not_reused_and_the_table_is_bounded() {
        let mut t = Channels::new(2);
        let a = t.insert(Channel::new(ChannelState::Open, 1)).unwrap();
        let b = t.insert(Channel::new(ChannelState::Open, 1)).unwrap();
        assert!(t.insert(Channel::new(ChannelState::Open, 1)).is_none());
        t.remove(a);
        let c = t.insert(Channel::new(ChannelState::Open, 1)).unwrap();
        assert!(
            c != a && c != b,
            "a closed channel's id is not handed out again"
        );
        assert_eq!(t.len(), 2);
    }
}
