//! A guest channel's output on its way to the channel's user, bounded against
//! a guest that sends it in thousands of tiny packets.
//!
//! Channel data arrives as slices of the link's large receive buffer. Output
//! is staged per channel while the link task works through one read, then
//! handed on: small pieces are copied out (one tiny packet must not keep a
//! whole receive buffer alive) and merged with their neighbours of the same
//! stream; consecutive gaps are added up. At most [`OWED_PIECES`] data pieces
//! wait unconsumed at the user; the rest stays staged and merged until the
//! user consumes. The window bounds the bytes; [`MAX_STAGED`] bounds the
//! pieces: a channel past it is a flood and is closed (its attachment resumes
//! from the exact offset it delivered).

use std::collections::VecDeque;

use async_channel::Sender;
use bytes::{Bytes, BytesMut};

use crate::guestlink::ChannelEvent;

/// Data pieces a user may hold unconsumed before more is staged.
pub const OWED_PIECES: usize = 64;
/// Pieces smaller than this are copied out of the receive buffer.
pub const COPY_BELOW: usize = 16 * 1024;
/// Merged pieces grow up to this size.
const MERGE_UP_TO: usize = 64 * 1024;
/// Staged pieces past which a channel's output is a flood.
pub const MAX_STAGED: usize = 4096;

enum Piece {
    /// Small data, copied and merged.
    Merged {
        ext: Option<u32>,
        buf: BytesMut,
    },
    /// A large slice, handed on as it came.
    Whole {
        ext: Option<u32>,
        data: Bytes,
    },
    Gap(u64),
    Exit(proto_core::tether::ExitStatus),
}

/// The channel's output sent more pieces than may be staged.
#[derive(Debug, PartialEq, Eq)]
pub struct Flood;

/// One channel's staged output.
#[derive(Default)]
pub struct Delivery {
    staged: VecDeque<Piece>,
    /// Data pieces handed on and not yet consumed.
    owed: usize,
}

impl Delivery {
    /// Stages an event (data, a gap or the exit status).
    pub fn push(&mut self, event: ChannelEvent) -> Result<(), Flood> {
        match event {
            ChannelEvent::Data { ext, data } => self.push_data(ext, data),
            ChannelEvent::Gap(n) => match self.staged.back_mut() {
                Some(Piece::Gap(m)) => *m = m.saturating_add(n),
                _ => self.staged.push_back(Piece::Gap(n)),
            },
            ChannelEvent::Exit(status) => self.staged.push_back(Piece::Exit(status)),
            ChannelEvent::Closed => {}
        }
        if self.staged.len() > MAX_STAGED {
            return Err(Flood);
        }
        Ok(())
    }

    fn push_data(&mut self, ext: Option<u32>, data: Bytes) {
        if data.len() >= COPY_BELOW {
            self.staged.push_back(Piece::Whole { ext, data });
            return;
        }
        if let Some(Piece::Merged { ext: e, buf }) = self.staged.back_mut()
            && *e == ext
            && buf.len() + data.len() <= MERGE_UP_TO
        {
            buf.extend_from_slice(&data);
            return;
        }
        let mut buf = BytesMut::with_capacity(data.len().max(16));
        buf.extend_from_slice(&data);
        self.staged.push_back(Piece::Merged { ext, buf });
    }

    /// The user consumed one data piece.
    pub fn consumed(&mut self) {
        self.owed = self.owed.saturating_sub(1);
    }

    /// Whether anything is staged.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Hands on what the user may take now; `all` ignores what it owes (the
    /// channel is ending).
    pub fn flush(&mut self, to: &Sender<ChannelEvent>, all: bool) {
        while let Some(piece) = self.staged.front() {
            let data = matches!(piece, Piece::Merged { .. } | Piece::Whole { .. });
            if data && self.owed >= OWED_PIECES && !all {
                return;
            }
            let event = match self.staged.pop_front().expect("front exists") {
                Piece::Merged { ext, buf } => ChannelEvent::Data {
                    ext,
                    data: buf.freeze(),
                },
                Piece::Whole { ext, data } => ChannelEvent::Data { ext, data },
                Piece::Gap(n) => ChannelEvent::Gap(n),
                Piece::Exit(status) => ChannelEvent::Exit(status),
            };
            self.owed += usize::from(data);
            let _ = to.try_send(event);
        }
    }

    /// Drops what is staged (the channel is being cut off).
    pub fn discard(&mut self) {
        self.staged.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(ext: Option<u32>, bytes: &[u8]) -> ChannelEvent {
        ChannelEvent::Data {
            ext,
            data: Bytes::copy_from_slice(bytes),
        }
    }

    fn drain(rx: &async_channel::Receiver<ChannelEvent>) -> Vec<ChannelEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn tiny_pieces_are_copied_merged_and_gaps_added_up() {
        let (tx, rx) = async_channel::unbounded();
        let mut d = Delivery::default();
        // One big receive buffer; each tiny piece is a slice of it.
        let buffer = Bytes::from(vec![b'x'; 1 << 20]);
        for i in 0..1000 {
            d.push(ChannelEvent::Data {
                ext: None,
                data: buffer.slice(i..i + 1),
            })
            .unwrap();
        }
        d.push(ChannelEvent::Gap(3)).unwrap();
        d.push(ChannelEvent::Gap(4)).unwrap();
        d.push(data(Some(1), b"err")).unwrap();
        d.flush(&tx, false);
        let got = drain(&rx);
        assert_eq!(got.len(), 3, "{got:?}");
        let ChannelEvent::Data {
            ext: None,
            data: merged,
        } = &got[0]
        else {
            panic!("{got:?}")
        };
        assert_eq!(merged.len(), 1000);
        // A copy: dropping the receive buffer's last handle frees it.
        let range = buffer.as_ptr_range();
        assert!(!range.contains(&merged.as_ptr()));
        assert_eq!(got[1], ChannelEvent::Gap(7));
        assert_eq!(got[2], data(Some(1), b"err"));
    }

    #[test]
    fn at_most_owed_pieces_wait_at_the_user_and_the_rest_merges() {
        let (tx, rx) = async_channel::unbounded();
        let mut d = Delivery::default();
        for i in 0..OWED_PIECES * 3 {
            // Alternate streams so nothing merges while owed is below the cap.
            d.push(data(Some((i % 2) as u32), b"a")).unwrap();
            d.flush(&tx, false);
        }
        assert_eq!(rx.len(), OWED_PIECES);
        assert!(!d.is_empty());
        for _ in 0..OWED_PIECES {
            d.consumed();
        }
        d.flush(&tx, false);
        assert_eq!(rx.len(), OWED_PIECES * 2);
        d.flush(&tx, true);
        let total: usize = drain(&rx)
            .iter()
            .map(|e| match e {
                ChannelEvent::Data { data, .. } => data.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(total, OWED_PIECES * 3);
    }

    #[test]
    fn a_flood_of_unmergeable_pieces_is_cut_off() {
        let (tx, _rx) = async_channel::unbounded();
        let mut d = Delivery::default();
        for _ in 0..OWED_PIECES {
            d.push(data(None, b"a")).unwrap();
            d.flush(&tx, false);
        }
        let mut result = Ok(());
        for i in 0..=MAX_STAGED {
            result = d.push(data(Some((i % 2) as u32), b"a"));
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Flood));
        d.discard();
        assert!(d.is_empty());
    }

    #[test]
    fn large_pieces_pass_without_a_copy() {
        let (tx, rx) = async_channel::unbounded();
        let mut d = Delivery::default();
        let big = Bytes::from(vec![7u8; COPY_BELOW]);
        d.push(ChannelEvent::Data {
            ext: None,
            data: big.clone(),
        })
        .unwrap();
        d.flush(&tx, false);
        let Ok(ChannelEvent::Data { data, .. }) = rx.try_recv() else {
            panic!()
        };
        assert_eq!(data.as_ptr(), big.as_ptr());
    }
}
