//! Output served from the store: `logs` (with timestamps, `since`, `tail`,
//! `follow`) whether or not the guest is still there, and the output of an
//! attach.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_channel::Sender;
use bytes::{Bytes, BytesMut};

use crate::api_types::{ApiError, ExitStatus, LogsOptions, Output};
use crate::appliance::Attachment;
use crate::registry::Shared;
use crate::store::{Frame, FrameKind, OutputLog, Reader, Store, lock};

/// Output items buffered between the disk reader and the client.
const QUEUE: usize = 16;

fn internal(id: &str, e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("reading the stored output of {id}: {e}"))
}

/// A `since` value: an RFC 3339 time (`2026-12-03T05:00:00Z`, fractions and
/// a space instead of `T` allowed), or a duration meaning that long before
/// `now` (`10m`, `1h30m`, or seconds).
pub fn parse_since(v: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return Ok(t);
    }
    crate::http::query::parse_duration(v)
        .and_then(|d| now.checked_sub(d))
        .ok_or_else(|| {
            format!("since={v:?} is neither an RFC 3339 time (2026-12-03T05:00:00Z) nor a duration (10m)")
        })
}

/// The offset where the last `n` lines start (a final line without its
/// newline counts as a line).
pub fn tail_start(log: &OutputLog, n: usize) -> std::io::Result<u64> {
    let end = log.end();
    let mut reader = log.reader(log.start());
    let mut starts: VecDeque<u64> = VecDeque::new();
    starts.push_back(reader.offset());
    while let Some(frame) = reader.next_frame()? {
        if frame.kind == FrameKind::Gap {
            continue;
        }
        for (i, _) in frame.data.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            starts.push_back(frame.offset + i as u64 + 1);
            if starts.len() > n + 1 {
                starts.pop_front();
            }
        }
    }
    if starts.back() == Some(&end) {
        starts.pop_back();
    }
    while starts.len() > n {
        starts.pop_front();
    }
    Ok(starts.front().copied().unwrap_or(end))
}

/// Prefixes every line with the time its first byte was received.
#[derive(Default)]
struct Stamper {
    /// Per stream (stdout, stderr): whether the next byte starts a line.
    mid_line: [bool; 2],
}

impl Stamper {
    fn stamp(&mut self, frame: &Frame) -> Bytes {
        let i = usize::from(frame.kind == FrameKind::Stderr);
        let stamp = humantime::format_rfc3339_nanos(frame.time).to_string();
        let mut out = BytesMut::with_capacity(frame.data.len() + 40);
        for line in frame.data.split_inclusive(|b| *b == b'\n') {
            if !self.mid_line[i] {
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b" ");
            }
            out.extend_from_slice(line);
            self.mid_line[i] = line.last() != Some(&b'\n');
        }
        out.freeze()
    }
}

/// Reads stored frames into output items for a logs request.
struct Producer {
    store: Arc<Store>,
    id: String,
    /// Fires when this container's output or record changes.
    changed: Arc<event_listener::Event>,
    log: Arc<Mutex<OutputLog>>,
    reader: Reader,
    options: LogsOptions,
    /// Without follow: stop here.
    end_at: Option<u64>,
    stamper: Stamper,
    /// Whether a live guest link serves the container now.
    served: Served,
    /// How long a follow waits at the end of the stored output for a
    /// container no guest serves (its guest went without an exit) before
    /// it ends the stream instead of waiting forever.
    unserved_wait: Duration,
}

/// Asks whether a live guest link serves the container.
type Served = Arc<dyn Fn() -> bool + Send + Sync>;

/// How long a follow waits for a container no guest serves: as long as a
/// client re-attaches after a drop (a guest reconnecting comes back sooner).
const UNSERVED_WAIT: Duration = Duration::from_secs(60);
/// How often a follow of an unserved container looks again.
const UNSERVED_CHECK: Duration = Duration::from_secs(1);

impl Producer {
    /// The next frame wanted (after `since`), if stored yet.
    fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if self.end_at.is_some_and(|end| self.reader.offset() >= end) {
                return Ok(None);
            }
            let (kept, at_end) = {
                let log = lock(&self.log);
                (
                    self.reader.next_kept(&log),
                    self.reader.offset() >= log.end(),
                )
            };
            let frame = match kept {
                Some(frame) => Some(frame),
                // A follow at the end asks often: no file is touched then.
                None if at_end => None,
                None => self.reader.next_frame()?,
            };
            let Some(mut frame) = frame else {
                return Ok(None);
            };
            if let Some(end) = self.end_at
                && frame.offset + frame.len > end
            {
                frame.len = end - frame.offset;
                if frame.kind != FrameKind::Gap {
                    frame.data = frame.data.slice(..frame.len as usize);
                }
            }
            if self.options.since.is_some_and(|since| frame.time < since) {
                continue;
            }
            return Ok(Some(frame));
        }
    }

    fn output(&mut self, frame: &Frame) -> Output {
        let data = if self.options.timestamps {
            self.stamper.stamp(frame)
        } else {
            frame.data.clone()
        };
        match frame.kind {
            FrameKind::Stdout => Output::Stdout(data),
            FrameKind::Stderr => Output::Stderr(data),
            FrameKind::Gap => Output::Gap(frame.len),
        }
    }

    /// The exit status once everything of an exited container was sent:
    /// all its output the guest listed, or, once `gave_up` (no guest served
    /// it for `unserved_wait`), all that is stored. The guest lists a session
    /// as exited once its own log holds the last byte, which may be well
    /// before the follower has stored it, and a link that drops meanwhile
    /// comes back with the rest: until then the exit waits.
    fn finished(&self, gave_up: bool) -> Option<ExitStatus> {
        let record = self.store.record(&self.id)?;
        let offset = self.reader.offset();
        if record.state != "exited" || offset < lock(&self.log).end() {
            return None;
        }
        if offset < record.output_end && !gave_up {
            return None;
        }
        Some(match record.exit_signal {
            Some(name) => ExitStatus::Signal {
                name,
                core_dumped: false,
            },
            None => ExitStatus::Code(record.exit_code.unwrap_or(0)),
        })
    }

    async fn run(mut self, first: Option<Frame>, out: Sender<Output>) {
        if let Some(frame) = first
            && out.send(self.output(&frame)).await.is_err()
        {
            return;
        }
        let mut unserved_since: Option<Instant> = None;
        loop {
            let listener = self.changed.listen();
            match self.next_frame() {
                Ok(Some(frame)) => {
                    if out.send(self.output(&frame)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(None) if !self.options.follow => return,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(container = %self.id, "reading its stored output: {e}");
                    return;
                }
            }
            let served = (self.served)();
            if served {
                unserved_since = None;
            }
            let gave_up = unserved_since.is_some_and(|s| s.elapsed() >= self.unserved_wait);
            if let Some(exit) = self.finished(gave_up) {
                let _ = out.send(Output::Exit(exit)).await;
                return;
            }
            if gave_up {
                tracing::info!(container = %self.id, "no guest serves it and no exit is stored; the stream ends");
                return;
            }
            if served {
                listener.await;
                continue;
            }
            unserved_since.get_or_insert_with(Instant::now);
            // Nothing may ever change the store again: look now and then.
            let tick = async {
                smol::Timer::after(UNSERVED_CHECK.min(self.unserved_wait)).await;
            };
            futures_lite::future::or(listener, tick).await;
        }
    }
}

/// `logs` from the store. The stream starts at the first stored byte at or
/// after `options.from` (a leading gap is folded into the start offset).
pub(crate) fn from_store(
    shared: &Arc<Shared>,
    store: &Arc<Store>,
    id: &str,
    options: LogsOptions,
) -> Result<Attachment, ApiError> {
    let record = store
        .record(id)
        .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
    serve(shared, store, id, record.tty, options)
}

/// `from_store` for a container whose record may not be written yet (an
/// exec that just started); `tty` is what its guest said.
pub(crate) fn serve(
    shared: &Arc<Shared>,
    store: &Arc<Store>,
    id: &str,
    tty: bool,
    options: LogsOptions,
) -> Result<Attachment, ApiError> {
    let log = store.log(id).map_err(|e| internal(id, e))?;
    let (reader, end) = {
        let log = lock(&log);
        let mut from = options.from.max(log.start());
        if let Some(n) = options.tail {
            from = from.max(tail_start(&log, n).map_err(|e| internal(id, e))?);
        }
        (log.reader(from), log.end())
    };
    let end_at = (!options.follow).then_some(end);
    let mut start = reader.offset();
    let mut producer = Producer {
        store: store.clone(),
        id: id.to_owned(),
        changed: store.watch(id),
        log,
        reader,
        options,
        end_at,
        stamper: Stamper::default(),
        served: {
            let (shared, id) = (shared.clone(), id.to_owned());
            Arc::new(move || shared.info(&id).is_some_and(|(_, link)| link.is_some()))
        },
        unserved_wait: UNSERVED_WAIT,
    };
    // Leading gaps (output rotated away or lost before it was stored) move
    // the start instead of interrupting the stream.
    let first = loop {
        match producer.next_frame().map_err(|e| internal(id, e))? {
            Some(f) if f.kind == FrameKind::Gap => start = f.offset + f.len,
            Some(f) => {
                start = f.offset;
                break Some(f);
            }
            None => {
                start = start.max(producer.reader.offset());
                break None;
            }
        }
    };
    let (tx, rx) = async_channel::bounded(QUEUE);
    smol::spawn(producer.run(first, tx)).detach();
    Ok(Attachment::fed(shared.clone(), id, tty, start, rx))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::store::Limits;

    /// A store holding container `web`'s record (`state`, `exit_code`, and
    /// `output_end` as its guest listed it) and `stored` as its output.
    fn stored_web(
        state: &str,
        exit_code: Option<u32>,
        output_end: u64,
        stored: &[u8],
    ) -> (tempfile::TempDir, Arc<Store>, Arc<Mutex<OutputLog>>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Limits::default()).unwrap());
        let record = crate::store::Record {
            exit_code,
            output_end,
            ..crate::store::Record::new("web", "primary", state)
        };
        store.save_record(&record).unwrap();
        let log = store.log("web").unwrap();
        lock(&log)
            .append(FrameKind::Stdout, SystemTime::now(), stored)
            .unwrap();
        (dir, store, log)
    }

    /// A follow of `web` from offset 0.
    fn follow_web(
        store: &Arc<Store>,
        log: &Arc<Mutex<OutputLog>>,
        served: bool,
        unserved_wait: Duration,
    ) -> Producer {
        Producer {
            store: store.clone(),
            id: "web".into(),
            changed: store.watch("web"),
            log: log.clone(),
            reader: lock(log).reader(0),
            options: LogsOptions {
                follow: true,
                ..Default::default()
            },
            end_at: None,
            stamper: Stamper::default(),
            served: Arc::new(move || served),
            unserved_wait,
        }
    }

    #[test]
    fn since_is_a_time_or_a_duration_ago() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            parse_since("10s", now),
            Ok(UNIX_EPOCH + Duration::from_secs(990))
        );
        assert_eq!(
            parse_since("1970-01-01T00:01:00Z", now),
            Ok(UNIX_EPOCH + Duration::from_secs(60))
        );
        assert!(
            parse_since("yesterday", now)
                .unwrap_err()
                .contains("since=\"yesterday\"")
        );
    }

    #[test]
    fn tail_counts_lines_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OutputLog::open(dir.path(), Limits::default()).unwrap();
        let t = UNIX_EPOCH;
        log.append(FrameKind::Stdout, t, b"one\ntw").unwrap();
        log.append(FrameKind::Stderr, t, b"o\nthree\n").unwrap();
        assert_eq!(tail_start(&log, 1).unwrap(), 8);
        assert_eq!(tail_start(&log, 2).unwrap(), 4);
        assert_eq!(tail_start(&log, 9).unwrap(), 0);
        assert_eq!(tail_start(&log, 0).unwrap(), log.end());
        log.append(FrameKind::Stdout, t, b"partial").unwrap();
        assert_eq!(
            tail_start(&log, 1).unwrap(),
            14,
            "a last line without newline counts"
        );
    }

    #[test]
    fn timestamps_start_every_line_of_each_stream() {
        let t = UNIX_EPOCH + Duration::from_secs(1);
        let frame = |kind, data: &'static [u8]| Frame {
            kind,
            time: t,
            offset: 0,
            len: data.len() as u64,
            data: Bytes::from_static(data),
        };
        let mut s = Stamper::default();
        let ts = "1970-01-01T00:00:01.000000000Z";
        assert_eq!(
            s.stamp(&frame(FrameKind::Stdout, b"a\nb")),
            format!("{ts} a\n{ts} b")
        );
        assert_eq!(
            s.stamp(&frame(FrameKind::Stderr, b"e\n")),
            format!("{ts} e\n")
        );
        assert_eq!(
            s.stamp(&frame(FrameKind::Stdout, b"c\n")),
            "c\n",
            "stdout was mid-line"
        );
    }

    #[test]
    fn a_stored_exit_by_signal_comes_back_as_the_signal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Limits::default()).unwrap());
        let record = crate::store::Record {
            exit_code: Some(143),
            exit_signal: Some("TERM".into()),
            ..crate::store::Record::new("web", "primary", "exited")
        };
        store.save_record(&record).unwrap();
        let log = store.log("web").unwrap();
        let reader = lock(&log).reader(0);
        let p = Producer {
            store: store.clone(),
            id: "web".into(),
            changed: store.watch("web"),
            log,
            reader,
            options: LogsOptions::default(),
            end_at: None,
            stamper: Stamper::default(),
            served: Arc::new(|| false),
            unserved_wait: UNSERVED_WAIT,
        };
        let exit = p.finished(false).unwrap();
        assert_eq!(exit.code(), 143);
        assert!(matches!(exit, ExitStatus::Signal { ref name, .. } if name == "TERM"));
    }

    #[test]
    fn since_and_the_end_bound_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Limits::default()).unwrap());
        let log = store.log("web").unwrap();
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        lock(&log)
            .append(FrameKind::Stdout, at(10), b"old\n")
            .unwrap();
        lock(&log)
            .append(FrameKind::Stdout, at(20), b"new\n")
            .unwrap();
        let reader = lock(&log).reader(0);
        let mut p = Producer {
            store: store.clone(),
            id: "web".into(),
            changed: store.watch("web"),
            log: log.clone(),
            reader,
            options: LogsOptions {
                since: Some(at(15)),
                ..Default::default()
            },
            end_at: Some(6),
            stamper: Stamper::default(),
            served: Arc::new(|| false),
            unserved_wait: UNSERVED_WAIT,
        };
        let f = p.next_frame().unwrap().unwrap();
        assert_eq!((f.offset, &f.data[..]), (4, &b"ne"[..]));
        assert!(p.next_frame().unwrap().is_none());
    }

    /// The guest lists a session as exited before the follower has stored
    /// its last output: a follow that caught up with the store waits for the
    /// rest instead of ending early with the exit (a lost tail).
    #[test]
    fn the_exit_waits_for_output_the_guest_listed_but_not_yet_stored() {
        let (_dir, store, log) = stored_web("exited", Some(3), 6, b"one");
        smol::block_on(async {
            let (tx, rx) = async_channel::bounded(8);
            let run = smol::spawn(follow_web(&store, &log, true, UNSERVED_WAIT).run(None, tx));
            assert!(matches!(rx.recv().await, Ok(Output::Stdout(b)) if &b[..] == b"one"));
            smol::Timer::after(Duration::from_millis(100)).await;
            assert!(rx.is_empty(), "the exit came before the output listed");
            lock(&log)
                .append(FrameKind::Stdout, SystemTime::now(), b"two")
                .unwrap();
            store.notify("web");
            assert!(matches!(rx.recv().await, Ok(Output::Stdout(b)) if &b[..] == b"two"));
            assert!(matches!(rx.recv().await, Ok(Output::Exit(e)) if e.code() == 3));
            run.await;
            // No guest serves it any more (after the wait for one to come
            // back): what is stored is all there is.
            let (tx, rx) = async_channel::bounded(8);
            let mut p = follow_web(&store, &log, false, Duration::from_millis(300));
            let started = Instant::now();
            p.reader = lock(&log).reader(3);
            lock(&log)
                .append(FrameKind::Stdout, SystemTime::now(), b"!")
                .unwrap();
            let (_, saved) = store.update_record("web", |r| {
                let mut short = r.cloned().unwrap();
                short.output_end = 100;
                short
            });
            saved.unwrap();
            p.run(None, tx).await;
            assert!(matches!(rx.recv().await, Ok(Output::Stdout(b)) if &b[..] == b"two"));
            assert!(matches!(rx.recv().await, Ok(Output::Stdout(b)) if &b[..] == b"!"));
            assert!(matches!(rx.recv().await, Ok(Output::Exit(e)) if e.code() == 3));
            assert!(
                started.elapsed() >= Duration::from_millis(300),
                "no wait for a guest"
            );
        });
    }

    /// A follow of a running container whose guest went without an exit
    /// ends once no guest has served it for the wait; while one does, it
    /// keeps waiting for output.
    #[test]
    fn a_follow_ends_when_no_guest_serves_its_container() {
        let (_dir, store, log) = stored_web("running", None, 3, b"hi\n");
        let producer = |served| follow_web(&store, &log, served, Duration::from_millis(300));
        smol::block_on(async {
            // Unserved: the stored output, then the end (no exit).
            let (tx, rx) = async_channel::bounded(8);
            let started = Instant::now();
            producer(false).run(None, tx).await;
            assert!(matches!(rx.recv().await, Ok(Output::Stdout(b)) if &b[..] == b"hi\n"));
            assert!(rx.recv().await.is_err(), "ended without an exit");
            assert!(started.elapsed() >= Duration::from_millis(300));
            // Served: still waiting well past the wait.
            let (tx, rx) = async_channel::bounded(8);
            let run = producer(true).run(None, tx);
            let waited = futures_lite::future::or(
                async {
                    run.await;
                    false
                },
                async {
                    smol::Timer::after(Duration::from_millis(900)).await;
                    true
                },
            )
            .await;
            assert!(waited, "a served container's follow ended");
            drop(rx);
        });
    }
}
