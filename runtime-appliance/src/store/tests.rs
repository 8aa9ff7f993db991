use std::fs;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

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

/// A reader at the end is served kept frames from memory; one that took
/// some from memory and falls behind what is kept (or reads after the memory
/// was given back) goes on from the file at the right byte, across
/// rotations, and never gets from memory what rotation removed.
#[test]
fn kept_frames_and_the_file_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_size: 3 << 20,
        max_files: 2,
    };
    let mut log = OutputLog::open(dir.path(), limits).unwrap();
    let chunk = |i: u32| Bytes::from(vec![(i % 251) as u8; 100_000 + i as usize]);
    let mut expect = Vec::new();
    let mut r = log.reader(0);
    let mut got = Vec::new();
    let mut from_memory = 0;
    for i in 0..120u32 {
        let data = chunk(i);
        expect.extend_from_slice(&data);
        // Memory is given back now and then, as when nobody else reads.
        log.append_shared(FrameKind::Stdout, t(i.into()), data, i % 40 != 39)
            .unwrap();
        // The reader keeps up for a while, then falls behind, then catches up.
        if !(30..70).contains(&i) {
            loop {
                let frame = match r.next_kept(&log) {
                    Some(f) => {
                        from_memory += 1;
                        Some(f)
                    }
                    None => r.next_frame().unwrap(),
                };
                let Some(f) = frame else { break };
                assert_ne!(f.kind, FrameKind::Gap, "nothing was rotated away unread");
                assert_eq!(f.offset, got.len() as u64);
                got.extend_from_slice(&f.data);
            }
        }
    }
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "the bytes differ");
    assert!(
        from_memory > 50,
        "only {from_memory} frames came from memory"
    );
    // A reader from the start gets a gap for what rotation removed, then
    // the rest from the file and memory alike.
    let mut late = log.reader(0);
    let first = late.next_kept(&log);
    assert!(
        first.is_none(),
        "rotated-away output is not served from memory"
    );
    let gap = late.next_frame().unwrap().unwrap();
    assert_eq!((gap.kind, gap.offset), (FrameKind::Gap, 0));
    let mut rest = Vec::new();
    loop {
        let frame = match late.next_kept(&log) {
            Some(f) => Ok(Some(f)),
            None => late.next_frame(),
        };
        match frame.unwrap() {
            Some(f) => rest.extend_from_slice(&f.data),
            None => break,
        }
    }
    assert!(rest == expect[gap.len as usize..], "the rest differs");
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
        exit_code: Some(3),
        output_end: 5,
        ..Record::new("../evil/id", "primary", "exited")
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

#[test]
fn a_released_log_file_is_reopened_by_the_next_append_in_the_same_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = OutputLog::open(dir.path(), Limits::default()).unwrap();
    log.append(FrameKind::Stdout, t(1), b"before ").unwrap();
    log.release_file();
    log.append(FrameKind::Stdout, t(2), b"after").unwrap();
    assert_eq!(read_all(&log, 0), (b"before after".to_vec(), 0));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "one segment");
    // Reopened from disk, the log goes on where it was.
    drop(log);
    let log = OutputLog::open(dir.path(), Limits::default()).unwrap();
    assert_eq!(log.end(), 12);
}

#[test]
fn a_stored_containers_watchers_are_woken_by_its_own_changes_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("containers"), Limits::default()).unwrap();
    let (web, db) = (store.watch("web"), store.watch("db"));
    let (mut web_woken, mut db_woken) = (web.listen(), db.listen());
    store.notify("web");
    let now = |l: &mut event_listener::EventListener| {
        futures_lite::future::block_on(futures_lite::future::poll_once(l)).is_some()
    };
    assert!(now(&mut web_woken));
    assert!(!now(&mut db_woken));
}

/// A closed segment is left to the kernel's own writeback. ext4 flushes a
/// file truncated to zero in full when it is closed (`auto_da_alloc`), so
/// truncating each new segment wrote every byte of output to disk as its
/// segment closed, even output that rotation deleted seconds later.
#[test]
fn a_closed_segment_is_not_flushed_to_disk_at_once() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = dirty_pages::observable(dir.path()) {
        eprintln!("skipped a_closed_segment_is_not_flushed_to_disk_at_once: {why}");
        return;
    }
    let limits = Limits {
        max_size: 8 << 20,
        max_files: 4,
    };
    let mut log = OutputLog::open(dir.path(), limits).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    // The ninth MiB starts a second segment: the first is closed.
    for _ in 0..9 {
        log.append(FrameKind::Stdout, t(1), &chunk).unwrap();
    }
    let first = fs::File::open(segments::segment_path(dir.path(), 0)).unwrap();
    let (cached, dirty) = dirty_pages::of(&first).unwrap();
    assert!(cached >= 2048, "the segment is in the page cache: {cached}");
    assert!(
        dirty * 2 >= cached,
        "the closed segment was flushed at once: {dirty} of {cached} pages still dirty"
    );
}

/// Dirty pages of a file, from `cachestat(2)` (Linux 6.5).
mod dirty_pages {
    use std::os::fd::AsRawFd;
    use std::path::Path;

    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }

    /// Why this test cannot tell, if it cannot: it needs ext4 (whose
    /// heuristic it guards against), `cachestat`, and a writeback expiry long
    /// enough that the kernel leaves dirty pages alone while it runs.
    pub fn observable(dir: &Path) -> Result<(), String> {
        let fs = nix::sys::statfs::statfs(dir).map_err(|e| e.to_string())?;
        if fs.filesystem_type() != nix::sys::statfs::EXT4_SUPER_MAGIC {
            return Err(format!("{} is not on ext4", dir.display()));
        }
        let expiry = std::fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
            .map_err(|e| format!("vm.dirty_expire_centisecs: {e}"))?;
        if expiry.trim().parse::<u64>().unwrap_or(0) < 500 {
            return Err(format!("vm.dirty_expire_centisecs is {}", expiry.trim()));
        }
        let probe = std::fs::File::open(dir).map_err(|e| e.to_string())?;
        of(&probe).map(|_| ())
    }

    /// Pages of `file` in the page cache, and how many of them are dirty.
    pub fn of(file: &std::fs::File) -> Result<(u64, u64), String> {
        if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            return Err("cachestat's number is known here for x86_64 and aarch64".into());
        }
        const SYS_CACHESTAT: nix::libc::c_long = 451;
        let range = Range { off: 0, len: 0 };
        let mut stat = Cachestat::default();
        // SAFETY: the pointers are to live values of the kernel's layouts.
        let rc = unsafe {
            nix::libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Cachestat,
                0,
            )
        };
        if rc != 0 {
            return Err(format!("cachestat: {}", std::io::Error::last_os_error()));
        }
        Ok((stat.cache, stat.dirty))
    }
}
