use std::fs;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

fn t(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

/// Every byte from `from`, with gaps as `None` runs.
fn read_all(log: &OutputLog, from: u64) -> (Vec<u8>, u64) {
    let mut r = log.reader(from);
    let (mut out, mut gaps) = (Vec::new(), 0);
    while let Some(f) = r.next_frame().unwrap() {
        match f.kind {
            FrameKind::Gap => gaps += f.len,
            _ => out.extend_from_slice(&f.data),
        }
    }
    (out, gaps)
}

#[test]
fn frames_come_back_exactly_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = OutputLog::open(dir.path(), Limits::default()).unwrap();
    log.append(FrameKind::Stdout, t(1), b"hello ").unwrap();
    log.append(FrameKind::Stderr, t(2), b"world").unwrap();
    assert_eq!(log.end(), 11);
    assert_eq!(read_all(&log, 0), (b"hello world".to_vec(), 0));
    assert_eq!(read_all(&log, 3), (b"lo world".to_vec(), 0));
    let mut r = log.reader(6);
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!((f.kind, f.time, f.offset), (FrameKind::Stderr, t(2), 6));
    assert!(r.next_frame().unwrap().is_none());
    log.append(FrameKind::Stdout, t(3), b"!").unwrap();
    assert_eq!(
        r.next_frame().unwrap().unwrap().data,
        &b"!"[..],
        "a reader sees later output"
    );
}

#[test]
fn segments_rotate_by_size_and_the_oldest_go() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_size: 100,
        max_files: 3,
    };
    let mut log = OutputLog::open(dir.path(), limits).unwrap();
    let mut r = log.reader(0);
    let mut seen = Vec::new();
    for i in 0..50u8 {
        log.append(FrameKind::Stdout, t(i.into()), &[i; 20])
            .unwrap();
        while let Some(f) = r.next_frame().unwrap() {
            seen.extend_from_slice(&f.data);
        }
    }
    assert_eq!(seen.len(), 1000, "a reader following the log loses nothing");
    let files = fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 3);
    assert!(log.start() > 0);
    let (bytes, gap) = read_all(&log, 0);
    assert_eq!(gap, log.start(), "what was rotated away reads as a gap");
    assert_eq!(bytes.len() as u64, 1000 - log.start());
    assert_eq!(bytes.last(), Some(&49));
}

#[test]
fn a_torn_tail_is_cut_off_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = OutputLog::open(dir.path(), Limits::default()).unwrap();
    log.append(FrameKind::Stdout, t(1), b"kept").unwrap();
    log.append_gap(t(2), 10).unwrap();
    log.append(FrameKind::Stdout, t(3), b"also kept").unwrap();
    drop(log);
    let seg = dir.path().join(format!("output-{:020}.log", 0));
    let good = fs::metadata(&seg).unwrap().len();
    // A frame cut short mid-payload, as a kill -9 can leave it.
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    let mut header = vec![1u8];
    header.extend_from_slice(&5u64.to_le_bytes());
    header.extend_from_slice(&23u64.to_le_bytes());
    header.extend_from_slice(&100u64.to_le_bytes());
    f.write_all(&header).unwrap();
    f.write_all(b"torn").unwrap();
    drop(f);
    let mut log = OutputLog::open(dir.path(), Limits::default()).unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), good);
    assert_eq!(log.end(), 23);
    log.append(FrameKind::Stdout, t(4), b"!").unwrap();
    assert_eq!(read_all(&log, 0), (b"keptalso kept!".to_vec(), 10));
}

#[test]
fn records_are_written_atomically_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Limits::default()).unwrap();
    let record = Record {
        id: "../evil/id".into(),
        kind: "primary".into(),
        state: "exited".into(),
        exit_code: Some(3),
        output_end: 5,
        tty: false,
        guest_key: None,
        forked_from: None,
        fork_failure: None,
        exit_signal: None,
    };
    store.save_record(&record).unwrap();
    assert_eq!(store.records(), vec![record.clone()]);
    assert_eq!(store.record("../evil/id"), Some(record));
    assert!(
        dir.path()
            .join("~2e2e2f6576696c2f6964/record.json")
            .exists()
    );
    assert!(store.remove("../evil/id").unwrap());
    assert!(store.records().is_empty());
    assert!(!store.remove("../evil/id").unwrap());
}
