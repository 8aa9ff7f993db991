//! The state directory's containers: `DIR/containers/ID/record.json` (what is
//! known of a container, written atomically: temp file, fsync, rename) and
//! its output in segment files ([`segments`]). The follower writes them; `ls`,
//! `logs` and `attach` read them, also after the guest (or tetherd) is gone.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use event_listener::Event;
use serde::{Deserialize, Serialize};

pub mod segments;
#[cfg(test)]
mod tests;

pub use segments::{Frame, FrameKind, Limits, OutputLog, Reader};

/// `tetherd serve`'s flags for the stored output.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Size at which a container's output segment file is closed and a new
    /// one begun (bytes; K, M, G suffixes allowed).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub log_max_size: u64,
    /// Output segment files kept per container (the oldest go first).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub log_max_files: u32,
}

impl LogArgs {
    /// The rotation limits these flags give.
    pub fn limits(&self) -> Limits {
        Limits {
            max_size: self.log_max_size,
            max_files: self.log_max_files as usize,
        }
    }
}

/// A size: bytes, or with a `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_size(v: &str) -> Result<u64, String> {
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{v:?} is not a size (e.g. 64M, 512K, 1048576)"))?;
    match n.checked_mul(1 << shift) {
        Some(0) | None => Err(format!("{v:?} must be from 1 byte to 16 EiB")),
        Some(n) => Ok(n),
    }
}

/// What is kept of a container across tetherd restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// `primary` or `exec`.
    pub kind: String,
    /// `created`, `running` or `exited`.
    pub state: String,
    pub exit_code: Option<u32>,
    /// The guest's output end as last listed.
    pub output_end: u64,
    pub tty: bool,
    /// The host key of the guest that served it (OpenSSH public key).
    #[serde(default)]
    pub guest_key: Option<String>,
    /// The signal that ended it (name without `SIG`), if one did.
    #[serde(default)]
    pub exit_signal: Option<String>,
    /// The container its VM was forked from (a fork's child).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<String>,
    /// The recovery step that failed in its forked VM, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_failure: Option<String>,
}

impl Record {
    /// A record of `id` with nothing known yet but its kind and state.
    pub fn new(id: &str, kind: &str, state: &str) -> Self {
        Self {
            id: id.to_owned(),
            kind: kind.to_owned(),
            state: state.to_owned(),
            exit_code: None,
            output_end: 0,
            tty: false,
            guest_key: None,
            exit_signal: None,
            forked_from: None,
            fork_failure: None,
        }
    }
}

/// A container's directory name: the id itself when it is a plain name, else
/// `~` and its hex (ids come from guests and may hold `/` or `..`).
pub fn dir_name(id: &str) -> String {
    let plain = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if plain {
        id.to_owned()
    } else {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("~{}", &hex[..hex.len().min(400)])
    }
}

/// The containers under `DIR/containers`.
pub struct Store {
    root: PathBuf,
    limits: Limits,
    /// Each open output log, while anything (a follower, a reader) holds
    /// it: one `OutputLog` per container at a time, and none kept for
    /// containers nobody is reading or writing.
    logs: Mutex<HashMap<String, Weak<Mutex<OutputLog>>>>,
    /// Per container, while anyone watches it: output was appended or its
    /// record changed. One container's output wakes only its own readers.
    watched: Mutex<HashMap<String, Arc<Event>>>,
    /// The records read or written so far: this process is their only
    /// writer, and a follow asks for its record each time it reaches the
    /// end of the output (per chunk while following live).
    records: Mutex<HashMap<String, Record>>,
    /// The containers whose output a follower is storing now: one writer
    /// per log.
    following: Mutex<HashSet<String>>,
    /// Held across each `update_record`: the listing and a follower storing
    /// an exit change one record without undoing each other's change.
    record_writer: Mutex<()>,
}

/// Locks a mutex, taking it over from a thread that panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// The store in `root` (created, mode 0700).
    pub fn open(root: &Path, limits: Limits) -> Result<Self, String> {
        crate::node::state::make_private_dir(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            limits,
            logs: Mutex::new(HashMap::new()),
            watched: Mutex::new(HashMap::new()),
            records: Mutex::new(HashMap::new()),
            following: Mutex::new(HashSet::new()),
            record_writer: Mutex::new(()),
        })
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(dir_name(id))
    }

    /// Every record stored; unreadable ones are logged and skipped.
    pub fn records(&self) -> Vec<Record> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join("record.json");
            match fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                    Ok(r) => out.push(r),
                    Err(e) => tracing::warn!(file = %path.display(), "bad container record: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(file = %path.display(), "{e}"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Changes `id`'s record as one step against other updates: `change`
    /// gets the record stored now, if any, and returns the new one, which is
    /// written unless it is the same. The new record, and how writing went.
    pub fn update_record(
        &self,
        id: &str,
        change: impl FnOnce(Option<&Record>) -> Record,
    ) -> (Record, io::Result<()>) {
        let _one_writer = lock(&self.record_writer);
        let old = self.record(id);
        let new = change(old.as_ref());
        let saved = if old.as_ref() == Some(&new) {
            Ok(())
        } else {
            self.save_record(&new)
        };
        (new, saved)
    }

    /// Claims `id`'s output for one follower; false if another has it.
    pub fn start_following(&self, id: &str) -> bool {
        lock(&self.following).insert(id.to_owned())
    }

    /// Whether a follower stores `id`'s output now.
    pub fn is_followed(&self, id: &str) -> bool {
        lock(&self.following).contains(id)
    }

    /// Gives up the claim of `start_following`.
    pub fn stop_following(&self, id: &str) {
        lock(&self.following).remove(id);
    }

    /// The record of `id`, if stored.
    pub fn record(&self, id: &str) -> Option<Record> {
        if let Some(r) = lock(&self.records).get(id) {
            return Some(r.clone());
        }
        let bytes = fs::read(self.dir(id).join("record.json")).ok()?;
        let record: Record = serde_json::from_slice(&bytes).ok()?;
        lock(&self.records).insert(id.to_owned(), record.clone());
        Some(record)
    }

    /// Writes `record` atomically (a crash leaves the old one or the new one).
    pub fn save_record(&self, record: &Record) -> io::Result<()> {
        let dir = self.dir(&record.id);
        fs::create_dir_all(&dir)?;
        // A name of its own per write: two writers must not rename each
        // other's file away.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            "record.json.tmp{}",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(record).map_err(io::Error::other)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join("record.json"))?;
        lock(&self.records).insert(record.id.clone(), record.clone());
        self.notify(&record.id);
        Ok(())
    }

    /// The output log of `id`, opened (and its tail repaired) unless it is
    /// open already.
    pub fn log(&self, id: &str) -> io::Result<Arc<Mutex<OutputLog>>> {
        let mut logs = lock(&self.logs);
        if let Some(log) = logs.get(id).and_then(Weak::upgrade) {
            return Ok(log);
        }
        let log = Arc::new(Mutex::new(OutputLog::open(&self.dir(id), self.limits)?));
        // Entries of logs no longer held are dropped as the map doubles, so
        // it stays within twice the logs open.
        if logs.len() >= 64 && logs.len().is_power_of_two() {
            logs.retain(|_, l| l.strong_count() > 0);
        }
        logs.insert(id.to_owned(), Arc::downgrade(&log));
        Ok(log)
    }

    /// What fires when `id`'s output grows or its record changes; keep it
    /// while watching (the store forgets events nobody holds).
    pub fn watch(&self, id: &str) -> Arc<Event> {
        let mut watched = lock(&self.watched);
        if let Some(event) = watched.get(id) {
            return event.clone();
        }
        if watched.len() >= 64 && watched.len().is_power_of_two() {
            watched.retain(|_, e| Arc::strong_count(e) > 1);
        }
        let event = Arc::new(Event::new());
        watched.insert(id.to_owned(), event.clone());
        event
    }

    /// Wakes whoever watches `id` (see [`Store::watch`]).
    pub fn notify(&self, id: &str) {
        if let Some(event) = lock(&self.watched).get(id) {
            event.notify(usize::MAX);
        }
    }

    /// Whether anything is stored for `id`.
    pub fn has(&self, id: &str) -> bool {
        self.dir(id).exists()
    }

    /// Removes everything stored for `id`; false if nothing was.
    pub fn remove(&self, id: &str) -> io::Result<bool> {
        lock(&self.logs).remove(id);
        lock(&self.records).remove(id);
        match fs::remove_dir_all(self.dir(id)) {
            Ok(()) => {
                self.notify(id);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
