//! The guest's sessions as the protocol sees them: each session's kind, state,
//! exit and output log, which attachments read it (for the `block` policy),
//! stdin credits on their way back to a link, and exec ids. One `Sessions`
//! serves every link of a guest; each [`GuestLink`](super::GuestLink) borrows
//! it for the duration of a call.
//!
//! The runtime feeds in what its processes do (`started`, `push_output`,
//! `finish`) and carries out what the links ask for (their `GuestEvent`s).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::messages::{ContainerInfo, ExitStatus, Forked, Kind, State};
use crate::event::ChannelId;
use crate::outlog::{OutputLog, Overflow, Stream};

/// Exited execs remembered (listed, attachable for their output) at most.
pub const KEEP_EXITED_EXECS: usize = 64;

/// A session as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    pub id: String,
    pub kind: Kind,
    /// Whether the process gets a terminal (then all output is stdout).
    pub tty: bool,
    /// Whether the process gets input.
    pub stdin: bool,
    /// Bytes of output the guest retains.
    pub output_buffer: usize,
    pub overflow: Overflow,
}

/// One link, as sessions know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(u64);

/// Whose window reopens once stdin bytes reached the process: hand it back
/// with [`Sessions::stdin_written`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    pub(crate) link: LinkId,
    pub(crate) channel: ChannelId,
}

/// What sessions tell the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The session's log has more room: a reader held back by `block` may go on.
    Room { session: String },
    /// An old exited exec was forgotten; the runtime may drop its records.
    Forgotten { session: String },
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) kind: Kind,
    pub(crate) tty: bool,
    pub(crate) stdin_open: bool,
    pub(crate) state: State,
    pub(crate) start_requested: bool,
    pub(crate) log: OutputLog,
    pub(crate) exit: Option<ExitStatus>,
    /// Attachments reading the output, by (link, channel): how far each was
    /// sent, and how far its peer acknowledged.
    readers: BTreeMap<(LinkId, ChannelId), (u64, u64)>,
}

impl Session {
    fn info(&self, id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.to_owned(),
            kind: self.kind,
            state: self.state,
            exit_status: match (&self.exit, self.state) {
                (Some(e), State::Exited) => e.code(),
                _ => 0,
            },
            output_end: self.log.end(),
            tty: self.tty,
        }
    }

    /// Applies the readers' progress to a `block` log: what was sent to all of
    /// them stops counting against the capacity, what all acknowledged is freed.
    fn apply_readers(&mut self) {
        let sent = self.readers.values().map(|r| r.0).min();
        let acked = self.readers.values().map(|r| r.1).min();
        match (sent, acked) {
            (Some(sent), Some(acked)) => {
                self.log.release(acked);
                self.log.set_sent(sent);
            }
            _ => self.log.set_sent(self.log.start()),
        }
    }
}

/// Every session of a guest.
#[derive(Debug)]
pub struct Sessions {
    primary: String,
    sessions: BTreeMap<String, Session>,
    exec_buffer: usize,
    exec_seq: u64,
    next_link: u64,
    credits: Vec<(Credit, usize)>,
    /// Bumped whenever what a container list reports changes (not output).
    version: u64,
    exit_reported: bool,
    /// An attachment has carried the primary's output to its end.
    primary_drained: bool,
    room: BTreeSet<String>,
    events: VecDeque<SessionEvent>,
    /// Quiesced for a fork: new sessions and attachments to stopped ones are
    /// refused on every link.
    quiesced: bool,
    /// A child's `forked@tether`, until an appliance answered it.
    forked: Option<Forked>,
    /// A child still recovering: its links sync and authenticate, but send
    /// no container list (the names may still be its parent's) until it
    /// announces itself.
    recovering: bool,
}

impl Sessions {
    /// No sessions yet. `primary` is the container id; execs get
    /// `exec_buffer` bytes of output log each.
    pub fn new(primary: &str, exec_buffer: usize) -> Self {
        Self {
            primary: primary.to_owned(),
            sessions: BTreeMap::new(),
            exec_buffer,
            exec_seq: 0,
            next_link: 0,
            credits: Vec::new(),
            version: 0,
            exit_reported: false,
            primary_drained: false,
            room: BTreeSet::new(),
            events: VecDeque::new(),
            quiesced: false,
            forked: None,
            recovering: false,
        }
    }

    /// The container id (the primary session's id).
    pub fn primary(&self) -> &str {
        &self.primary
    }

    /// Adds a configured session, not started. False if the id is taken.
    pub fn add(&mut self, spec: SessionSpec) -> bool {
        if self.sessions.contains_key(&spec.id) {
            return false;
        }
        let session = Session {
            kind: spec.kind,
            tty: spec.tty,
            // Input may come before the process starts (an exec's data right
            // behind its `exec`, or a start-gated session's): it waits for it.
            stdin_open: spec.stdin,
            state: State::Created,
            start_requested: false,
            log: OutputLog::new(spec.output_buffer, spec.overflow),
            exit: None,
            readers: BTreeMap::new(),
        };
        self.sessions.insert(spec.id, session);
        self.version += 1;
        true
    }

    /// A new exec session (kind exec, `block` policy: its requester is attached
    /// from the first byte, so the process is held back rather than output
    /// dropped, as with SSH). Returns its id, `<container id>-exec<n>`.
    pub(crate) fn add_exec(&mut self, tty: bool) -> String {
        self.prune_execs();
        self.exec_seq += 1;
        let id = format!("{}-exec{}", self.primary, self.exec_seq);
        self.add(SessionSpec {
            id: id.clone(),
            kind: Kind::Exec,
            tty,
            stdin: true,
            output_buffer: self.exec_buffer,
            overflow: Overflow::Block,
        });
        id
    }

    /// Forgets the oldest exited execs beyond [`KEEP_EXITED_EXECS`], so a guest
    /// running execs for months keeps a bounded list that always fits a packet.
    fn prune_execs(&mut self) {
        let mut exited: Vec<(u64, String)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.kind == Kind::Exec && s.state == State::Exited)
            .filter(|(_, s)| s.readers.is_empty())
            .filter_map(|(id, _)| {
                let n = id.strip_prefix(&self.primary)?.strip_prefix("-exec")?;
                Some((n.parse::<u64>().ok()?, id.clone()))
            })
            .collect();
        if exited.len() < KEEP_EXITED_EXECS {
            return;
        }
        exited.sort();
        for (_, id) in exited.drain(..=exited.len() - KEEP_EXITED_EXECS) {
            self.sessions.remove(&id);
            self.version += 1;
            self.events
                .push_back(SessionEvent::Forgotten { session: id });
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut Session> {
        self.sessions.get_mut(id)
    }

    /// The session's process runs now.
    pub fn started(&mut self, id: &str) {
        if let Some(s) = self.sessions.get_mut(id)
            && s.state == State::Created
        {
            s.state = State::Running;
            self.version += 1;
        }
    }

    /// Output the session's process wrote.
    pub fn push_output(&mut self, id: &str, stream: Stream, data: Bytes) {
        if let Some(s) = self.sessions.get_mut(id)
            && s.state != State::Exited
        {
            s.log.push_bytes(stream, data);
        }
    }

    /// Bytes the session's output reader may take now (see
    /// [`OutputLog::space`]); 0 for an unknown or exited session.
    pub fn space(&self, id: &str) -> usize {
        match self.sessions.get(id) {
            Some(s) if s.state != State::Exited => s.log.space(),
            _ => 0,
        }
    }

    /// The process has ended and all its output is in: the session is exited.
    pub fn finish(&mut self, id: &str, exit: ExitStatus) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        if s.state == State::Exited {
            return;
        }
        s.state = State::Exited;
        s.exit = Some(exit);
        s.log.finish();
        s.stdin_open = false;
        self.version += 1;
    }

    /// The session could not run: `why` goes to its stderr, `code` is its exit.
    pub fn fail(&mut self, id: &str, code: u32, why: &str) {
        if let Some(s) = self.sessions.get_mut(id)
            && s.state != State::Exited
        {
            s.log
                .push(Stream::Stderr, format!("tether: {why}\n").as_bytes());
        }
        self.finish(id, ExitStatus::Code(code));
    }

    /// Stdin bytes handed out with `credit` reached the process (or were
    /// dropped because it stopped reading): the sender's window may reopen.
    pub fn stdin_written(&mut self, credit: Credit, n: usize) {
        self.credits.push((credit, n));
    }

    /// Where session `id` is in its life.
    pub fn state(&self, id: &str) -> Option<State> {
        self.sessions.get(id).map(|s| s.state)
    }

    /// How session `id` ended, once exited.
    pub fn exit(&self, id: &str) -> Option<&ExitStatus> {
        self.sessions
            .get(id)
            .filter(|s| s.state == State::Exited)
            .and_then(|s| s.exit.as_ref())
    }

    /// What `container-ids@tether` reports, sorted by id.
    pub fn list(&self) -> Vec<ContainerInfo> {
        self.sessions.iter().map(|(id, s)| s.info(id)).collect()
    }

    /// Session ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.sessions.keys().map(String::as_str)
    }

    /// Whether an appliance has been told the primary exited, an attachment
    /// carried its output to the end, and no attachment to it is still open.
    pub fn exit_reported(&self) -> bool {
        self.exit_reported
    }

    /// The next thing the runtime should know.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        if let Some(session) = self.room.pop_first() {
            return Some(SessionEvent::Room { session });
        }
        self.events.pop_front()
    }

    /// Quiesces for a fork (or ends it): while quiesced every link refuses
    /// new sessions, and attachments to and starts of sessions that are not
    /// exited (their processes are stopped).
    pub fn set_quiesced(&mut self, quiesced: bool) {
        self.quiesced = quiesced;
    }

    /// Whether the guest is quiesced for a fork.
    pub fn quiesced(&self) -> bool {
        self.quiesced
    }

    /// A child announces itself: every link sends `forked` as its first
    /// global request after authentication, until an appliance answers.
    pub fn announce_fork(&mut self, forked: Forked) {
        self.forked = Some(forked);
        self.recovering = false;
    }

    /// A child starts recovering (docs/PROTOCOL.md 4.5): until
    /// [`Sessions::announce_fork`], links announce nothing after
    /// authenticating.
    pub fn begin_fork_recovery(&mut self) {
        self.recovering = true;
    }

    /// Whether a child is recovering and has not announced itself yet.
    pub fn recovering(&self) -> bool {
        self.recovering
    }

    /// Whether an announcement waits for an appliance's answer.
    pub fn fork_announced(&self) -> bool {
        self.forked.is_some()
    }

    /// The announcement not yet answered (the runtime may update its
    /// `recovery_us` when a link authenticates).
    pub fn pending_fork(&mut self) -> Option<&mut Forked> {
        self.forked.as_mut()
    }

    pub(crate) fn fork_answered(&mut self) {
        self.forked = None;
    }

    /// A child takes its names: the primary becomes `id` (the container id),
    /// every other session `X` becomes `X-n`; later execs are named after
    /// `id`. Returns the (old, new) pairs; nothing is renamed if a new name
    /// would be taken twice.
    pub fn rename_for_child(&mut self, id: &str, n: u32) -> Result<Vec<(String, String)>, String> {
        let renames: Vec<(String, String)> = self
            .sessions
            .keys()
            .map(|old| {
                let new = if *old == self.primary {
                    id.to_owned()
                } else {
                    format!("{old}-{n}")
                };
                (old.clone(), new)
            })
            .collect();
        let new: BTreeSet<&String> = renames.iter().map(|(_, new)| new).collect();
        if new.len() != renames.len() {
            return Err(format!(
                "renaming to {id} and -{n} would give two sessions one id"
            ));
        }
        let old = std::mem::take(&mut self.sessions);
        for ((_, session), (_, new)) in old.into_iter().zip(&renames) {
            self.sessions.insert(new.clone(), session);
        }
        self.primary = id.to_owned();
        self.room.clear();
        self.version += 1;
        Ok(renames)
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn note_primary_drained(&mut self) {
        self.primary_drained = true;
    }

    pub(crate) fn primary_drained(&self) -> bool {
        self.primary_drained
    }

    pub(crate) fn note_exit_reported(&mut self) {
        self.exit_reported = true;
    }

    pub(crate) fn new_link(&mut self) -> LinkId {
        self.next_link += 1;
        LinkId(self.next_link)
    }

    /// Credits for `link` returned since the last call.
    pub(crate) fn take_credits(&mut self, link: LinkId) -> Vec<(ChannelId, usize)> {
        let mut mine = Vec::new();
        self.credits.retain(|(c, n)| {
            if c.link == link {
                mine.push((c.channel, *n));
                false
            } else {
                true
            }
        });
        mine
    }

    /// Records how far an attachment was sent and acknowledged (`block` logs).
    pub(crate) fn set_reader(&mut self, id: &str, key: (LinkId, ChannelId), sent: u64, acked: u64) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.readers.insert(key, (sent, acked));
        }
    }

    /// Forgets an attachment's reader record.
    pub(crate) fn remove_reader(&mut self, id: &str, key: (LinkId, ChannelId)) {
        if let Some(s) = self.sessions.get_mut(id)
            && s.readers.remove(&key).is_some()
        {
            self.apply_readers(id);
        }
    }

    /// Applies a session's reader records to its log; notes new room.
    pub(crate) fn apply_readers(&mut self, id: &str) {
        if let Some(s) = self.sessions.get_mut(id) {
            let before = s.log.space();
            s.apply_readers();
            if s.log.space() > before {
                self.room.insert(id.to_owned());
            }
        }
    }

    /// A link went away: its readers and undelivered credits go with it.
    pub(crate) fn link_gone(&mut self, link: LinkId) {
        self.credits.retain(|(c, _)| c.link != link);
        let ids: Vec<String> = self
            .sessions
            .iter_mut()
            .filter_map(|(id, s)| {
                let before = s.readers.len();
                s.readers.retain(|(l, _), _| *l != link);
                (s.readers.len() != before).then(|| id.clone())
            })
            .collect();
        for id in ids {
            self.apply_readers(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        let mut s = Sessions::new("web", 1 << 20);
        s.add(SessionSpec {
            id: "web".into(),
            kind: Kind::Primary,
            tty: false,
            stdin: true,
            output_buffer: 1 << 20,
            overflow: Overflow::DropOldest,
        });
        s
    }

    #[test]
    fn a_session_goes_created_running_exited_and_lists_its_exit() {
        let mut s = sessions();
        assert_eq!(s.state("web"), Some(State::Created));
        s.started("web");
        s.push_output("web", Stream::Stdout, Bytes::from_static(b"hi"));
        assert_eq!(s.exit("web"), None);
        s.finish("web", ExitStatus::signal(super::super::Signal::TERM, false));
        let info = &s.list()[0];
        assert_eq!(
            (info.state, info.exit_status, info.output_end),
            (State::Exited, 143, 2)
        );
        // Output after the end is not taken.
        s.push_output("web", Stream::Stdout, Bytes::from_static(b"late"));
        assert_eq!(s.list()[0].output_end, 2);
    }

    #[test]
    fn only_the_newest_exited_execs_are_kept() {
        let mut s = sessions();
        for _ in 0..KEEP_EXITED_EXECS + 10 {
            let id = s.add_exec(false);
            s.started(&id);
            s.finish(&id, ExitStatus::Code(0));
        }
        let execs = s.ids().filter(|id| id.contains("-exec")).count();
        assert!(execs <= KEEP_EXITED_EXECS + 1, "{execs}");
        assert!(s.state("web-exec1").is_none());
        assert!(
            s.state(&format!("web-exec{}", KEEP_EXITED_EXECS + 10))
                .is_some()
        );
        assert!(matches!(
            s.poll_event(),
            Some(SessionEvent::Forgotten { .. })
        ));
    }

    #[test]
    fn a_failed_start_explains_itself_on_stderr() {
        let mut s = sessions();
        s.fail("web", 127, "no such file");
        assert_eq!(s.exit("web"), Some(&ExitStatus::Code(127)));
        assert_eq!(
            s.list()[0].output_end,
            "tether: no such file\n".len() as u64
        );
    }
}
