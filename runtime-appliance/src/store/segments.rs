//! One container's output on disk: framed records in segment files
//! `output-<first offset, 20 digits>.log`, rotated by size and count.
//!
//! A frame is a 25-byte header (kind `u8`: 1 stdout, 2 stderr, 3 gap;
//! timestamp `u64` nanoseconds since the Unix epoch; output offset `u64`;
//! length `u64`, all little-endian) followed by `length` payload bytes for
//! stdout and stderr (a gap has no payload: `length` bytes were lost). Every
//! frame is written with one `write` call, so a tetherd killed mid-write
//! leaves at most one torn frame at the tail of the newest segment; opening
//! the log cuts it off (and anything after it).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Bytes of a frame header.
pub const HEADER: usize = 25;
/// The largest payload a frame may claim (a corrupt length is a torn tail).
const MAX_PAYLOAD: u64 = 16 << 20;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Stdout = 1,
    Stderr = 2,
    /// `len` bytes of output were lost before the follower read them.
    Gap = 3,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            3 => Some(Self::Gap),
            _ => None,
        }
    }
}

/// One stored piece of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    /// When tetherd received it.
    pub time: SystemTime,
    /// Output offset of its first byte.
    pub offset: u64,
    /// Output bytes it covers (payload length, or bytes lost for a gap).
    pub len: u64,
    /// The payload (empty for a gap).
    pub data: Bytes,
}

/// Rotation limits: a segment is closed once it reaches `max_size` bytes;
/// at most `max_files` segments are kept (the oldest go first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_size: u64,
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: 64 << 20,
            max_files: 4,
        }
    }
}

pub(super) fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("output-{start:020}.log"))
}

/// The segments in `dir`, by start offset.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut starts = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("output-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            starts.push(n);
        }
    }
    starts.sort_unstable();
    Ok(starts)
}

fn encode_header(kind: FrameKind, time: SystemTime, offset: u64, len: u64) -> [u8; HEADER] {
    let nanos = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
        .unwrap_or(0);
    let mut h = [0u8; HEADER];
    h[0] = kind as u8;
    h[1..9].copy_from_slice(&nanos.to_le_bytes());
    h[9..17].copy_from_slice(&offset.to_le_bytes());
    h[17..25].copy_from_slice(&len.to_le_bytes());
    h
}

fn decode_header(h: &[u8; HEADER]) -> Option<(FrameKind, SystemTime, u64, u64)> {
    let kind = FrameKind::from_u8(h[0])?;
    let word = |r: std::ops::Range<usize>| u64::from_le_bytes(h[r].try_into().unwrap_or([0; 8]));
    let time = UNIX_EPOCH + Duration::from_nanos(word(1..9));
    let len = word(17..25);
    if kind != FrameKind::Gap && len > MAX_PAYLOAD {
        return None;
    }
    Some((kind, time, word(9..17), len))
}

/// Reads as much of `buf` as the file has; the count read.
fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes a frame's header and payload with one `writev` (no copy into a
/// buffer of its own); a short write (rare for a regular file) is finished
/// with further writes.
fn write_frame_to(f: &mut File, header: &[u8], data: &[u8]) -> io::Result<()> {
    let mut done = loop {
        match f.write_vectored(&[IoSlice::new(header), IoSlice::new(data)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if done < header.len() {
        f.write_all(&header[done..])?;
        done = header.len();
    }
    f.write_all(&data[done - header.len()..])
}

/// Reads the frame at the file's position, if it is complete and follows
/// `expected`; `None` at the end (or at a torn or foreign frame).
fn read_frame(f: &mut File, expected: u64) -> io::Result<Option<Frame>> {
    let mut h = [0u8; HEADER];
    if read_full(f, &mut h)? < HEADER {
        return Ok(None);
    }
    let Some((kind, time, offset, len)) = decode_header(&h) else {
        return Ok(None);
    };
    if offset != expected {
        return Ok(None);
    }
    let mut data = Vec::new();
    if kind != FrameKind::Gap {
        // Read into spare capacity: no zeroing of a buffer about to be
        // overwritten.
        data.reserve_exact(len as usize);
        (&mut *f).take(len).read_to_end(&mut data)?;
        if data.len() < len as usize {
            return Ok(None);
        }
    }
    Ok(Some(Frame {
        kind,
        time,
        offset,
        len,
        data: Bytes::from(data),
    }))
}

/// Bytes of the newest frames an output log keeps in memory for readers at
/// its end (a live attach or `logs -f`), so they need not read back from
/// disk what was just written.
const RECENT_MAX: usize = 2 << 20;

/// A kept frame at least this large holds on to the buffer it came in
/// instead of a copy (a copy cost 3% of tetherd's time in a 1 GB attach).
const KEEP_SLICE_FROM: usize = 128 << 10;

/// What a kept frame costs besides its bytes (its entry and allocation):
/// charged too, so a flood of one-byte frames holds about as little memory as
/// a few large ones.
const RECENT_FRAME_COST: usize = 128;

/// A frame kept in memory, and where it ends on disk: the segment (by start
/// offset) and the file position just past it, where a reader that took it
/// from memory goes on reading the file.
struct Recent {
    frame: Frame,
    segment: u64,
    pos_end: u64,
}

impl Recent {
    /// What this frame counts against [`RECENT_MAX`].
    fn cost(&self) -> usize {
        self.frame.data.len() + RECENT_FRAME_COST
    }
}

/// A container's output log, open for appending.
pub struct OutputLog {
    dir: PathBuf,
    limits: Limits,
    segments: Vec<u64>,
    file: Option<File>,
    size: u64,
    end: u64,
    /// The newest frames, contiguous and ending at `end` (see [`RECENT_MAX`]).
    recent: VecDeque<Recent>,
    recent_bytes: usize,
}

impl OutputLog {
    /// Opens (creating) the log in `dir`, cutting off a torn tail.
    pub fn open(dir: &Path, limits: Limits) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let segments = list_segments(dir)?;
        let mut log = Self {
            dir: dir.to_path_buf(),
            limits,
            segments,
            file: None,
            size: 0,
            end: 0,
            recent: VecDeque::new(),
            recent_bytes: 0,
        };
        if let Some(&last) = log.segments.last() {
            let path = segment_path(dir, last);
            let mut f = OpenOptions::new().read(true).append(true).open(&path)?;
            let mut end = last;
            let mut good = 0u64;
            while let Some(frame) = read_frame(&mut f, end)? {
                end += frame.len;
                good = f.stream_position()?;
            }
            if f.metadata()?.len() != good {
                tracing::warn!(file = %path.display(), kept = good, "cutting off a torn tail");
                f.set_len(good)?;
            }
            log.file = Some(f);
            log.size = good;
            log.end = end;
        }
        Ok(log)
    }

    /// The first offset still stored (the end when nothing is).
    pub fn start(&self) -> u64 {
        self.segments.first().copied().unwrap_or(self.end)
    }

    /// One past the last offset stored (gaps included).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Appends output of `kind` received at `time`.
    pub fn append(&mut self, kind: FrameKind, time: SystemTime, data: &[u8]) -> io::Result<()> {
        self.append_shared(kind, time, Bytes::copy_from_slice(data), false)
    }

    /// Appends output of `kind` received at `time`; with `keep`, the frame
    /// is also kept in memory for readers at the end (pass it while anyone
    /// reads this log: without, the memory kept is given back).
    pub fn append_shared(
        &mut self,
        kind: FrameKind,
        time: SystemTime,
        data: Bytes,
        keep: bool,
    ) -> io::Result<()> {
        if data.is_empty() && kind != FrameKind::Gap {
            return Ok(());
        }
        let len = data.len() as u64;
        self.write_frame(kind, time, len, data, keep)
    }

    /// Records that `lost` bytes of output never reached the follower.
    pub fn append_gap(&mut self, time: SystemTime, lost: u64) -> io::Result<()> {
        if lost == 0 {
            return Ok(());
        }
        // Kept only if frames before it are: the memory is contiguous.
        let keep = !self.recent.is_empty();
        self.write_frame(FrameKind::Gap, time, lost, Bytes::new(), keep)
    }

    fn write_frame(
        &mut self,
        kind: FrameKind,
        time: SystemTime,
        len: u64,
        data: Bytes,
        keep: bool,
    ) -> io::Result<()> {
        if self.segments.is_empty() || self.size >= self.limits.max_size {
            self.rotate()?;
        } else if self.file.is_none() {
            // Released while idle: append to the current segment again.
            let last = self.segments.last().copied().unwrap_or(self.end);
            let path = segment_path(&self.dir, last);
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .read(true)
                    .open(&path)?,
            );
        }
        let header = encode_header(kind, time, self.end, len);
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no segment open"))?;
        if let Err(e) = write_frame_to(f, &header, &data) {
            // What is on disk no longer matches the memory.
            self.forget_recent();
            return Err(e);
        }
        let offset = self.end;
        self.size += (HEADER + data.len()) as u64;
        self.end += len;
        if !keep {
            self.forget_recent();
            return Ok(());
        }
        let kept = Recent {
            frame: Frame {
                kind,
                time,
                offset,
                len,
                // A small frame gets its own copy: a slice of the packet it
                // came in would keep that packet's whole read buffer (1 MiB)
                // alive for as long as the frame is kept. A large one (a bulk
                // stream's) keeps its slice, pinning at most 8 times its size.
                data: if data.len() >= KEEP_SLICE_FROM {
                    data
                } else {
                    Bytes::copy_from_slice(&data)
                },
            },
            segment: self.segments.last().copied().unwrap_or(offset),
            pos_end: self.size,
        };
        self.recent_bytes += kept.cost();
        self.recent.push_back(kept);
        while self.recent_bytes > RECENT_MAX
            && let Some(old) = self.recent.pop_front()
        {
            self.recent_bytes -= old.cost();
        }
        Ok(())
    }

    /// Whether the next append writes to a file already open: without, it
    /// opens the current segment again or creates the first one (filesystem
    /// work a caller on an async executor may want to do elsewhere).
    pub fn holds_file(&self) -> bool {
        self.file.is_some() && !self.segments.is_empty() && self.size < self.limits.max_size
    }

    /// Closes the current segment's file until the next append reopens it:
    /// a container that writes nothing holds no file descriptor (10,000
    /// quiet containers would otherwise hold 10,000).
    pub fn release_file(&mut self) {
        self.file = None;
    }

    fn forget_recent(&mut self) {
        self.recent = VecDeque::new();
        self.recent_bytes = 0;
    }

    /// Starts a new segment at the end; drops the oldest beyond `max_files`.
    fn rotate(&mut self) -> io::Result<()> {
        let path = segment_path(&self.dir, self.end);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        // Only a leftover file is emptied. Truncating a new one would be a
        // no-op for its contents but not for ext4: a file truncated to zero
        // is flushed to disk in full when closed (its "replace via truncate"
        // heuristic, `auto_da_alloc`), so every rotated segment was written
        // out even when the rotation deleted it seconds later.
        if f.metadata()?.len() != 0 {
            f.set_len(0)?;
        }
        if self.segments.last() != Some(&self.end) {
            self.segments.push(self.end);
        }
        self.file = Some(f);
        self.size = 0;
        while self.segments.len() > self.limits.max_files.max(1) {
            let old = self.segments.remove(0);
            // A reader is never served from memory what is no longer stored.
            let first = self.segments[0];
            while self.recent.front().is_some_and(|r| r.segment < first) {
                if let Some(r) = self.recent.pop_front() {
                    self.recent_bytes -= r.cost();
                }
            }
            match fs::remove_file(segment_path(&self.dir, old)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// A reader from `from` (clamped to what is stored).
    pub fn reader(&self, from: u64) -> Reader {
        Reader {
            dir: self.dir.clone(),
            file: None,
            next: from,
            resume: None,
        }
    }

    /// The kept frame holding output offset `at`, if it is kept.
    fn recent_at(&self, at: u64) -> Option<&Recent> {
        let first = self.recent.front()?.frame.offset;
        if at < first || at >= self.end {
            return None;
        }
        let i = self
            .recent
            .partition_point(|r| r.frame.offset + r.frame.len <= at);
        self.recent.get(i)
    }
}

/// Reads frames from a log, one after the other; survives the log growing
/// and rotating underneath it.
pub struct Reader {
    dir: PathBuf,
    /// The open segment: the file, its start offset, and the offset its
    /// position stands at.
    file: Option<(File, u64, u64)>,
    /// The next output offset wanted.
    next: u64,
    /// Where the file is read on from after frames taken from memory: the
    /// segment and the file position of `next`.
    resume: Option<(u64, u64)>,
}

impl Reader {
    /// The next output offset this reader returns.
    pub fn offset(&self) -> u64 {
        self.next
    }

    /// The next frame from `log`'s memory (cut to start at the reader's
    /// offset), if the log still keeps it there; else read
    /// [`next_frame`](Self::next_frame) from disk.
    pub fn next_kept(&mut self, log: &OutputLog) -> Option<Frame> {
        let recent = log.recent_at(self.next)?;
        let mut frame = recent.frame.clone();
        let skip = self.next - frame.offset;
        frame.offset += skip;
        frame.len -= skip;
        if frame.kind != FrameKind::Gap {
            frame.data = frame.data.slice(skip as usize..);
        }
        self.next = frame.offset + frame.len;
        self.resume = Some((recent.segment, recent.pos_end));
        Some(frame)
    }

    /// Puts the file where frames taken from memory ended.
    fn resume_file(&mut self) -> io::Result<()> {
        let Some((segment, pos)) = self.resume.take() else {
            return Ok(());
        };
        if !matches!(&self.file, Some((_, start, _)) if *start == segment) {
            self.file = match File::open(segment_path(&self.dir, segment)) {
                Ok(f) => Some((f, segment, self.next)),
                // Rotated away meanwhile: find the offset from the list.
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
        }
        if let Some((f, _, at)) = self.file.as_mut() {
            f.seek(SeekFrom::Start(pos))?;
            *at = self.next;
        }
        Ok(())
    }

    /// The next frame (cut to start at the reader's offset); `None` when the
    /// reader has everything stored so far. Output rotated away before the
    /// reader got to it comes as a gap.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        self.resume_file()?;
        loop {
            if self.file.is_none() && !self.open_segment()? {
                return Ok(None);
            }
            let Some((f, start, at)) = self.file.as_mut() else {
                return Ok(None);
            };
            let pos = f.stream_position()?;
            if let Some(frame) = read_frame(f, *at)? {
                *at += frame.len;
                if let Some(frame) = self.cut(frame) {
                    return Ok(Some(frame));
                }
                continue;
            }
            // The end of what this segment holds (or a frame being
            // written): stay, unless the next segment has begun.
            f.seek(SeekFrom::Start(pos))?;
            let (start, at) = (*start, *at);
            if at != start && segment_path(&self.dir, at).exists() {
                let f = File::open(segment_path(&self.dir, at))?;
                self.file = Some((f, at, at));
                continue;
            }
            return Ok(None);
        }
    }

    /// The part of `frame` at or after the reader's offset, preceded by a
    /// gap for bytes that are no longer stored.
    fn cut(&mut self, mut frame: Frame) -> Option<Frame> {
        let end = frame.offset + frame.len;
        if end <= self.next {
            return None;
        }
        if frame.offset > self.next {
            let gap = Frame {
                kind: FrameKind::Gap,
                time: frame.time,
                offset: self.next,
                len: frame.offset - self.next,
                data: Bytes::new(),
            };
            // Read this frame again next time.
            if let Some((f, _, at)) = self.file.as_mut() {
                let back = (HEADER + frame.data.len()) as i64;
                f.seek(SeekFrom::Current(-back)).ok()?;
                *at = frame.offset;
            }
            self.next = frame.offset;
            return Some(gap);
        }
        let skip = self.next - frame.offset;
        self.next = end;
        if skip > 0 {
            frame.offset += skip;
            frame.len -= skip;
            if frame.kind != FrameKind::Gap {
                frame.data = frame.data.slice(skip as usize..);
            }
        }
        Some(frame)
    }

    /// Opens the segment holding the reader's offset (or the first one after
    /// it); false when there is none.
    fn open_segment(&mut self) -> io::Result<bool> {
        let segments = list_segments(&self.dir)?;
        let start = match segments.iter().rev().find(|&&s| s <= self.next) {
            Some(&s) => s,
            None => match segments.first() {
                Some(&s) => s,
                None => return Ok(false),
            },
        };
        match File::open(segment_path(&self.dir, start)) {
            Ok(f) => {
                self.file = Some((f, start, start));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
