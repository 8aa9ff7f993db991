//! The guest's per-session output log (docs/PROTOCOL.md section 5): output
//! records addressed by a `u64` offset that never resets, a bounded capacity, and
//! an overflow policy. Attachments read from any retained offset, so output
//! written before anyone attached is replayed, and an appliance that lost its
//! link re-attaches from exactly the byte it had.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Which of the process's streams a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What happens when the log is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop the oldest output; the process never blocks (default).
    #[default]
    DropOldest,
    /// Stop reading the process's output until an attachment has read it:
    /// nothing is ever lost.
    Block,
}

/// The outcome of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Output between the requested offset and `resume` is gone.
    Gap { lost: u64, resume: u64 },
    /// Output starting at the requested offset; the next read starts at `next`.
    Data {
        stream: Stream,
        data: Bytes,
        next: u64,
    },
    /// Nothing at or after the offset yet.
    Pending,
    /// Nothing at or after the offset, and the process's output has ended.
    End,
    /// The offset lies beyond everything ever written.
    Beyond { end: u64 },
}

#[derive(Debug)]
struct Record {
    offset: u64,
    stream: Stream,
    data: Bytes,
}

impl Record {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// Small writes collect in an open tail record up to this size.
const TAIL_MAX: usize = 16 * 1024;

/// The output of one session.
#[derive(Debug)]
pub struct OutputLog {
    records: VecDeque<Record>,
    tail: BytesMut,
    tail_stream: Stream,
    start: u64,
    end: u64,
    capacity: usize,
    overflow: Overflow,
    finished: bool,
    /// Under `Block`: output below this has been sent to every reader (it may
    /// not be acknowledged yet) and no longer counts against the capacity.
    sent: u64,
}

impl OutputLog {
    /// An empty log holding up to `capacity` bytes.
    pub fn new(capacity: usize, overflow: Overflow) -> Self {
        Self {
            records: VecDeque::new(),
            tail: BytesMut::new(),
            tail_stream: Stream::Stdout,
            start: 0,
            end: 0,
            capacity: capacity.max(1),
            overflow,
            finished: false,
            sent: 0,
        }
    }

    /// Offset of the oldest retained byte.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Offset one past the newest byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes retained.
    pub fn retained(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// The overflow policy.
    pub fn overflow(&self) -> Overflow {
        self.overflow
    }

    /// Bytes the process may write before the log must act: under `Block`, the
    /// reader of the process's output must not take more than this. Output
    /// sent but not yet acknowledged does not count, so a reader's whole window
    /// can be in flight whatever the capacity (a receiver that returns window
    /// only after half of it arrived would otherwise wait forever).
    pub fn space(&self) -> usize {
        match self.overflow {
            Overflow::DropOldest => self.capacity,
            Overflow::Block => {
                let unsent = self.end - self.sent.clamp(self.start, self.end);
                self.capacity.saturating_sub(unsent as usize)
            }
        }
    }

    /// Under `Block`, records that every reader has been sent the output below
    /// `upto` (the smallest reader offset; `start()` when nobody reads).
    pub fn set_sent(&mut self, upto: u64) {
        self.sent = upto.clamp(self.start, self.end);
    }

    /// Marks the end of output (the process exited and its pipes drained).
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Whether output has ended.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let data = self.tail.split().freeze();
            let offset = self.end - data.len() as u64;
            self.records.push_back(Record {
                offset,
                stream: self.tail_stream,
                data,
            });
        }
    }

    /// Appends output. Under `DropOldest` the oldest bytes go when the log is
    /// over capacity; under `Block` the caller keeps within [`OutputLog::space`].
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if stream != self.tail_stream || self.tail.len() + data.len() > TAIL_MAX {
            self.seal_tail();
            self.tail_stream = stream;
        }
        if data.len() >= TAIL_MAX {
            self.records.push_back(Record {
                offset: self.end,
                stream,
                data: Bytes::copy_from_slice(data),
            });
        } else {
            self.tail.extend_from_slice(data);
        }
        self.end += data.len() as u64;
        if self.overflow == Overflow::DropOldest {
            let keep_from = self.end.saturating_sub(self.capacity as u64);
            self.discard_before(keep_from);
        }
    }

    /// Appends output already in a `Bytes` (large reads become records without a
    /// copy; small ones join the open tail record).
    pub fn push_bytes(&mut self, stream: Stream, data: bytes::Bytes) {
        if data.len() < TAIL_MAX {
            return self.push(stream, &data);
        }
        self.seal_tail();
        self.tail_stream = stream;
        let len = data.len() as u64;
        self.records.push_back(Record {
            offset: self.end,
            stream,
            data,
        });
        self.end += len;
        if self.overflow == Overflow::DropOldest {
            let keep_from = self.end.saturating_sub(self.capacity as u64);
            self.discard_before(keep_from);
        }
    }

    /// Under `Block`, frees output below `upto` once every reader has
    /// acknowledged it (the caller passes the smallest acknowledged offset).
    pub fn release(&mut self, upto: u64) {
        if self.overflow == Overflow::Block {
            self.discard_before(upto.min(self.end));
        }
    }

    fn discard_before(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        self.start = offset;
        while let Some(first) = self.records.front_mut() {
            if first.end() <= offset {
                self.records.pop_front();
            } else {
                if first.offset < offset {
                    let cut = (offset - first.offset) as usize;
                    first.data = first.data.slice(cut..);
                    first.offset = offset;
                }
                return;
            }
        }
        // Everything sealed is gone; the cut may fall inside the tail.
        let tail_start = self.end - self.tail.len() as u64;
        if tail_start < offset {
            let cut = ((offset - tail_start) as usize).min(self.tail.len());
            let _ = self.tail.split_to(cut);
        }
    }

    /// Reads up to `max` bytes of one stream starting at `from`.
    pub fn read(&mut self, from: u64, max: usize) -> Read {
        if from < self.start {
            return Read::Gap {
                lost: self.start - from,
                resume: self.start,
            };
        }
        if from > self.end {
            return Read::Beyond { end: self.end };
        }
        if from == self.end {
            return if self.finished {
                Read::End
            } else {
                Read::Pending
            };
        }
        let tail_start = self.end - self.tail.len() as u64;
        if from >= tail_start {
            self.seal_tail();
        }
        let i = self.records.partition_point(|r| r.end() <= from);
        let record = &self.records[i];
        let skip = (from - record.offset) as usize;
        let n = (record.data.len() - skip).min(max.max(1));
        let data = record.data.slice(skip..skip + n);
        Read::Data {
            stream: record.stream,
            data,
            next: from + n as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads everything from `from` to the end, with gaps noted.
    fn drain(log: &mut OutputLog, mut from: u64, max: usize) -> (Vec<(Stream, u8)>, u64) {
        let mut out = Vec::new();
        let mut lost = 0;
        loop {
            match log.read(from, max) {
                Read::Gap { lost: l, resume } => {
                    lost += l;
                    from = resume;
                }
                Read::Data { stream, data, next } => {
                    out.extend(data.iter().map(|&b| (stream, b)));
                    from = next;
                }
                Read::Pending | Read::End => return (out, lost),
                Read::Beyond { .. } => panic!("beyond"),
            }
        }
    }

    #[test]
    fn output_before_any_reader_is_replayed_from_offset_zero_in_order() {
        let mut log = OutputLog::new(1 << 20, Overflow::DropOldest);
        log.push(Stream::Stdout, b"ab");
        log.push(Stream::Stderr, b"c");
        log.push(Stream::Stdout, b"de");
        let (out, lost) = drain(&mut log, 0, 1);
        assert_eq!(lost, 0);
        let expect = [
            (Stream::Stdout, b'a'),
            (Stream::Stdout, b'b'),
            (Stream::Stderr, b'c'),
            (Stream::Stdout, b'd'),
            (Stream::Stdout, b'e'),
        ];
        assert_eq!(out, expect);
        assert_eq!(log.read(5, 10), Read::Pending);
        log.finish();
        assert_eq!(log.read(5, 10), Read::End);
        assert_eq!(log.read(6, 10), Read::Beyond { end: 5 });
    }

    #[test]
    fn drop_oldest_reports_the_gap_and_keeps_the_newest_capacity() {
        let mut log = OutputLog::new(10, Overflow::DropOldest);
        for i in 0..25u8 {
            log.push(Stream::Stdout, &[i]);
        }
        assert_eq!((log.start(), log.end(), log.retained()), (15, 25, 10));
        let (out, lost) = drain(&mut log, 3, 4);
        assert_eq!(lost, 12);
        assert_eq!(
            out.iter().map(|x| x.1).collect::<Vec<_>>(),
            (15..25).collect::<Vec<u8>>()
        );
        assert_eq!(log.space(), 10);
        // A big write larger than the log keeps only its end.
        log.push(Stream::Stderr, &[7; 100_000]);
        assert_eq!(log.retained(), 10);
    }

    #[test]
    fn block_never_drops_and_frees_only_what_was_read() {
        let mut log = OutputLog::new(8, Overflow::Block);
        log.push(Stream::Stdout, b"12345678");
        assert_eq!(log.space(), 0);
        let Read::Data { data, next, .. } = log.read(0, 3) else {
            panic!()
        };
        assert_eq!(&data[..], b"123");
        log.release(next);
        assert_eq!((log.start(), log.space()), (3, 3));
        log.push(Stream::Stdout, b"9ab");
        let (out, lost) = drain(&mut log, 3, 100);
        assert_eq!(lost, 0);
        assert_eq!(out.iter().map(|x| x.1).collect::<Vec<_>>(), b"456789ab");
    }

    #[test]
    fn block_lets_sent_but_unacknowledged_output_stay_beyond_capacity() {
        let mut log = OutputLog::new(4, Overflow::Block);
        log.push(Stream::Stdout, b"abcd");
        assert_eq!(log.space(), 0);
        // All four bytes went out but nobody acknowledged them yet: the process
        // may write four more, and nothing is freed.
        log.set_sent(4);
        assert_eq!(log.space(), 4);
        log.push(Stream::Stdout, b"efgh");
        assert_eq!((log.start(), log.space()), (0, 0));
        log.release(2);
        assert_eq!(log.start(), 2);
        // A reader that goes away makes sent output count again.
        log.set_sent(log.start());
        assert_eq!(log.space(), 0);
    }

    #[test]
    fn large_and_small_writes_interleave_exactly() {
        let mut log = OutputLog::new(1 << 22, Overflow::DropOldest);
        let mut expect = Vec::new();
        for i in 0..200usize {
            let chunk: Vec<u8> = (0..(i * 997) % 40_000).map(|j| (i + j) as u8).collect();
            let s = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            log.push(s, &chunk);
            expect.extend(chunk.iter().map(|&b| (s, b)));
        }
        let mut by_bytes = OutputLog::new(1 << 22, Overflow::DropOldest);
        for i in 0..200usize {
            let chunk: Vec<u8> = (0..(i * 997) % 40_000).map(|j| (i + j) as u8).collect();
            let s = if i % 3 == 0 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            by_bytes.push_bytes(s, Bytes::from(chunk));
        }
        assert!(drain(&mut by_bytes, 0, 1 << 20).0 == expect);
        for max in [1000, 1 << 20] {
            let (out, _) = drain(&mut log, 0, max);
            assert!(out == expect, "max {max}");
        }
    }
}
