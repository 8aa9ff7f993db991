//! `Cursor`: where an appliance-side attachment is in a session's output,
//! across channels and link drops. One offset counts stdout and stderr
//! together (docs/PROTOCOL.md 4.2), so the cursor always asks the guest for
//! both streams, filters here, and knows `offset + gaps + bytes received` at
//! every moment: a re-attach from [`Cursor::offset`] loses no byte and
//! repeats none.
//!
//! It also keeps the window accounting straight across channels: bytes
//! delivered on an earlier channel and consumed later must not reopen the
//! window of the current one.

use bytes::Bytes;

use super::messages::{AttachRequest, LIVE};
use crate::event::EXTENDED_STDERR;

/// What to do with a piece of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Give it to the user (then `consumed` once used).
    Stdout(Bytes),
    Stderr(Bytes),
    /// Not wanted: return this much window at once.
    Skip(usize),
}

/// An attachment's position and wishes.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// The next output offset; [`LIVE`] until a live attach learns it.
    offset: u64,
    stdout: bool,
    stderr: bool,
    /// Stop at this offset (logs without follow).
    end_at: Option<u64>,
    /// Delivered on earlier channels, not yet consumed.
    earlier: usize,
    /// Delivered on the current channel, not yet consumed.
    current: usize,
}

impl Cursor {
    /// Starts at `from` (an offset, or [`LIVE`]) and wants the given streams,
    /// up to `end_at` if set.
    pub fn new(from: u64, stdout: bool, stderr: bool, end_at: Option<u64>) -> Self {
        Self {
            offset: from,
            stdout,
            stderr,
            end_at,
            earlier: 0,
            current: 0,
        }
    }

    /// The next offset (what a re-attach asks for); [`LIVE`] if not known yet.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The attach request for a (new) channel: both streams when any output
    /// is wanted, so the offset stays exact.
    pub fn request(&self, id: &str, stdin: bool) -> AttachRequest {
        let output = self.stdout || self.stderr;
        AttachRequest {
            id: id.to_owned(),
            stdin,
            stdout: output,
            stderr: output,
            from: self.offset,
        }
    }

    /// A new channel opened at `offset` (from `offset@tether`, when the guest
    /// sent it): it is authoritative for a live attach.
    pub fn opened(&mut self, offset: Option<u64>) {
        if let Some(offset) = offset
            && (self.offset == LIVE || offset >= self.offset)
        {
            self.offset = offset;
        }
        self.earlier += std::mem::take(&mut self.current);
    }

    /// Whether the attachment has all it wanted (`end_at` reached).
    pub fn at_end(&self) -> bool {
        self.end_at
            .is_some_and(|end| self.offset != LIVE && self.offset >= end)
    }

    /// Output arrived on the current channel.
    pub fn data(&mut self, ext: Option<u32>, mut data: Bytes) -> Delivery {
        if let Some(end) = self.end_at {
            let room = end.saturating_sub(self.offset);
            if (data.len() as u64) > room {
                data.truncate(room as usize);
            }
        }
        if self.offset != LIVE {
            self.offset += data.len() as u64;
        }
        let stderr = ext == Some(EXTENDED_STDERR);
        let wanted = if stderr { self.stderr } else { self.stdout };
        if !wanted {
            return Delivery::Skip(data.len());
        }
        self.current += data.len();
        if stderr {
            Delivery::Stderr(data)
        } else {
            Delivery::Stdout(data)
        }
    }

    /// `lost` bytes are gone before what follows.
    pub fn gap(&mut self, lost: u64) {
        if self.offset != LIVE {
            self.offset = self.offset.saturating_add(lost);
        }
    }

    /// The user consumed `n` delivered bytes: how much window to return on
    /// the current channel (bytes of earlier channels are not its to return).
    pub fn consumed(&mut self, n: usize) -> usize {
        let old = n.min(self.earlier);
        self.earlier -= old;
        let now = (n - old).min(self.current);
        self.current -= now;
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwanted_streams_count_in_the_offset_and_return_window_at_once() {
        let mut c = Cursor::new(10, true, false, None);
        c.opened(Some(10));
        assert_eq!(
            c.data(None, Bytes::from_static(b"out")),
            Delivery::Stdout(Bytes::from_static(b"out"))
        );
        assert_eq!(
            c.data(Some(1), Bytes::from_static(b"err!")),
            Delivery::Skip(4)
        );
        c.gap(5);
        assert_eq!(c.offset(), 22);
        assert_eq!(c.request("web", false).from, 22);
        assert!(c.request("web", false).stderr, "both streams are asked for");
    }

    #[test]
    fn a_live_attach_learns_its_offset_from_the_guest() {
        let mut c = Cursor::new(LIVE, true, true, None);
        assert_eq!(c.offset(), LIVE);
        c.opened(Some(1000));
        c.data(None, Bytes::from_static(b"abc"));
        assert_eq!(c.offset(), 1003);
    }

    #[test]
    fn output_stops_exactly_at_the_end() {
        let mut c = Cursor::new(0, true, true, Some(4));
        c.opened(Some(0));
        assert_eq!(
            c.data(None, Bytes::from_static(b"abcdef")),
            Delivery::Stdout(Bytes::from_static(b"abcd"))
        );
        assert!(c.at_end());
    }

    #[test]
    fn window_of_an_earlier_channel_is_not_returned_on_the_next() {
        let mut c = Cursor::new(0, true, true, None);
        c.opened(Some(0));
        c.data(None, Bytes::from_static(b"12345"));
        // The link dropped; a new channel re-attaches from offset 5.
        c.opened(Some(5));
        c.data(None, Bytes::from_static(b"678"));
        assert_eq!(c.consumed(5), 0, "those bytes came on the old channel");
        assert_eq!(c.consumed(3), 3);
        assert_eq!(c.consumed(1), 0, "never more than was delivered");
    }
}
