//! One session: a configured process (the primary, or an exec) with its output
//! log, its stdin queue and how it ended.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::rc::Rc;

use bytes::Bytes;
use event_listener::Event;
use nix::unistd::Pid;
use proto_core::ChannelId;
use proto_core::outlog::OutputLog;
use proto_core::tether::{ContainerInfo, Kind, State};

use crate::config::SessionSpec;
use crate::reaper::ExitInfo;

/// Whose window to reopen once stdin bytes reached the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The link connection the bytes came over.
    pub link: u64,
    pub channel: ChannelId,
}

/// Input waiting for the process.
pub enum StdinItem {
    Data {
        data: Bytes,
        credit: Credit,
    },
    /// Close stdin (a terminal gets its EOF character instead).
    Eof,
}

/// A session.
pub struct Session {
    pub spec: SessionSpec,
    pub kind: Kind,
    pub state: State,
    pub log: OutputLog,
    pub pid: Option<Pid>,
    pub exit: Option<ExitInfo>,
    /// Output streams not yet at end of file.
    pub outputs_open: u8,
    pub stdin: VecDeque<StdinItem>,
    /// Whether stdin can still take input (it exists and EOF was not asked for).
    pub stdin_open: bool,
    /// Wakes the stdin writer.
    pub stdin_ready: Rc<Event>,
    /// Wakes output readers waiting for room under the `block` policy.
    pub space: Rc<Event>,
    /// The pty master, for resizing.
    pub pty: Option<Rc<OwnedFd>>,
    /// Reader tasks, dropped (cancelled) if output must be cut off.
    pub tasks: Vec<smol::Task<()>>,
    /// Attachments reading this session's output, by (link, channel): how far
    /// each was sent, and how far its peer acknowledged.
    pub readers: BTreeMap<(u64, ChannelId), (u64, u64)>,
}

impl Session {
    /// A session that has not started.
    pub fn new(spec: SessionSpec, kind: Kind) -> Self {
        Self {
            log: OutputLog::new(spec.output_buffer, spec.overflow),
            spec,
            kind,
            state: State::Created,
            pid: None,
            exit: None,
            outputs_open: 0,
            stdin: VecDeque::new(),
            stdin_open: false,
            stdin_ready: Rc::new(Event::new()),
            space: Rc::new(Event::new()),
            pty: None,
            tasks: Vec::new(),
            readers: BTreeMap::new(),
        }
    }

    /// Applies the readers' progress to a `block` log: what was sent to all of
    /// them stops counting against the capacity, what all acknowledged is freed.
    pub fn apply_readers(&mut self) {
        let sent = self.readers.values().map(|r| r.0).min();
        let acked = self.readers.values().map(|r| r.1).min();
        match (sent, acked) {
            (Some(sent), Some(acked)) => {
                self.log.release(acked);
                self.log.set_sent(sent);
            }
            _ => self.log.set_sent(self.log.start()),
        }
        self.space.notify(usize::MAX);
    }

    /// The entry `container-ids@tether` reports.
    pub fn info(&self) -> ContainerInfo {
        ContainerInfo {
            id: self.spec.id.clone(),
            kind: self.kind,
            state: self.state,
            exit_status: match (self.state, &self.exit) {
                (State::Exited, Some(e)) => e.code,
                _ => 0,
            },
            output_end: self.log.end(),
            tty: self.spec.tty,
        }
    }

    /// Moves to `Exited` once the process has ended and its output is all in.
    pub fn settle(&mut self) -> bool {
        if self.state != State::Exited && self.exit.is_some() && self.outputs_open == 0 {
            self.state = State::Exited;
            self.log.finish();
            self.stdin.clear();
            self.stdin_open = false;
            self.pty = None;
            self.stdin_ready.notify(usize::MAX);
            return true;
        }
        false
    }
}
