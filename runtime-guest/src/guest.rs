//! The guest's shared state and what acts on it: starting sessions, moving
//! output from processes into the logs, input from links into processes,
//! collecting exits, signals, resizes and start gates. Everything runs on one
//! thread (a `LocalExecutor`), so state is `RefCell`s and wake-ups are `Event`s.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use event_listener::Event;
use futures_lite::AsyncWriteExt;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use proto_core::outlog::{Overflow, Stream};
use proto_core::tether::{ContainerInfo, Kind, State};
use smol::{Async, LocalExecutor, Timer};
use tracing::{info, warn};

use crate::config::{Config, GateExpiry, SessionSpec};
use crate::process::{self, SpawnSpec};
use crate::reaper::ExitInfo;
use crate::session::{Credit, Session, StdinItem};

/// How long output may keep flowing after a process exited (a background child
/// can hold its pipes open), before the session is declared finished anyway.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Bytes read from a process's output at a time (its pipe holds 1 MiB).
const READ_BUFFER: usize = 256 * 1024;

/// Exited execs remembered (listed, attachable for their output) at most.
const KEEP_EXITED_EXECS: usize = 64;

/// Exit status of a session that could not start (as a shell reports it).
const CANNOT_RUN: u32 = 127;
/// Exit status of a start-gated session whose gate expired with `fail`.
const GATE_FAILED: u32 = 125;

/// The guest.
pub struct Guest {
    pub config: Config,
    sessions: RefCell<BTreeMap<String, Session>>,
    /// Anything a link might want to send changed: output, states, credits.
    pub changed: Event,
    credits: RefCell<Vec<(Credit, usize)>>,
    exec_seq: Cell<u64>,
    link_seq: Cell<u64>,
    ex: Rc<LocalExecutor<'static>>,
    /// The primary's exit has been reported to an appliance.
    pub exit_reported: Cell<bool>,
    /// Links holding bytes not yet written to their stream (exit waits for them).
    pub link_backlog: crate::serve::Backlog,
    /// A fatal error (PID 1) the links must report as an SSH DISCONNECT.
    pub fatal: crate::init::fatal::FatalNotice,
}

impl Guest {
    /// The guest with its configured sessions created (not started).
    pub fn new(config: Config, ex: Rc<LocalExecutor<'static>>) -> Rc<Self> {
        let sessions = config
            .sessions
            .iter()
            .map(|s| {
                let kind = if s.id == config.id {
                    Kind::Primary
                } else {
                    Kind::Exec
                };
                (s.id.clone(), Session::new(s.clone(), kind))
            })
            .collect();
        Rc::new(Self {
            config,
            sessions: RefCell::new(sessions),
            changed: Event::new(),
            credits: RefCell::new(Vec::new()),
            exec_seq: Cell::new(0),
            link_seq: Cell::new(0),
            ex,
            exit_reported: Cell::new(false),
            link_backlog: Default::default(),
            fatal: Default::default(),
        })
    }

    /// Runs `f` on session `id`.
    pub fn with<R>(&self, id: &str, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        self.sessions.borrow_mut().get_mut(id).map(f)
    }

    /// Runs a task on the guest's executor.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + 'static) {
        self.ex.spawn(task).detach();
    }

    /// Forgets every reader and credit of link `link` (it went away).
    pub fn drop_link_readers(&self, link: u64) {
        self.drop_credits(link);
        for s in self.sessions.borrow_mut().values_mut() {
            let before = s.readers.len();
            s.readers.retain(|(l, _), _| *l != link);
            if s.readers.len() != before {
                s.apply_readers();
            }
        }
        self.notify();
    }

    /// Runs `f` on every session.
    pub fn each(&self, mut f: impl FnMut(&mut Session)) {
        for s in self.sessions.borrow_mut().values_mut() {
            f(s);
        }
    }

    /// What `container-ids@tether` reports.
    pub fn container_list(&self) -> Vec<ContainerInfo> {
        self.sessions.borrow().values().map(Session::info).collect()
    }

    /// A fresh link generation number.
    pub fn next_link(&self) -> u64 {
        self.link_seq.set(self.link_seq.get() + 1);
        self.link_seq.get()
    }

    /// Credits of link `link` for stdin bytes written since the last call
    /// (other links' credits stay for them).
    pub fn take_credits(&self, link: u64) -> Vec<(Credit, usize)> {
        let mut all = self.credits.borrow_mut();
        let (mine, others) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|(c, _)| c.link == link);
        *all = others;
        mine
    }

    /// Forgets the credits of a link that went away.
    fn drop_credits(&self, link: u64) {
        self.credits.borrow_mut().retain(|(c, _)| c.link != link);
    }

    fn notify(&self) {
        self.changed.notify(usize::MAX);
    }

    /// Starts every configured session that is not start-gated, and arms the
    /// gates of the others.
    pub fn start_configured(self: &Rc<Self>) {
        let ids: Vec<(String, Option<(Duration, GateExpiry)>)> = self
            .config
            .sessions
            .iter()
            .map(|s| (s.id.clone(), s.start_gate))
            .collect();
        for (id, gate) in ids {
            match gate {
                None => self.start(&id),
                Some((timeout, expiry)) => {
                    let guest = self.clone();
                    self.ex
                        .spawn(async move {
                            Timer::after(timeout).await;
                            if guest.with(&id, |s| s.state == State::Created) == Some(true) {
                                info!(session = %id, "start gate timed out after {timeout:?}: {expiry:?}");
                                match expiry {
                                    GateExpiry::Start => guest.start(&id),
                                    GateExpiry::Fail => guest.fail(&id, GATE_FAILED, "start gate timed out; not started"),
                                }
                            }
                        })
                        .detach();
                }
            }
        }
    }

    /// Releases a start-gated session. False if it already started.
    pub fn release_gate(self: &Rc<Self>, id: &str) -> bool {
        if self.with(id, |s| s.state == State::Created) != Some(true) {
            return false;
        }
        self.start(id);
        true
    }

    fn fail(&self, id: &str, code: u32, why: &str) {
        self.with(id, |s| {
            s.log
                .push(Stream::Stderr, format!("tether: {why}\n").as_bytes());
            s.exit = Some(ExitInfo::code(code));
            s.outputs_open = 0;
            s.settle();
        });
        self.notify();
    }

    /// Starts session `id`'s process; a failure to start becomes its exit.
    pub fn start(self: &Rc<Self>, id: &str) {
        let Some(spec) = self.with(id, |s| s.spec.clone()) else {
            return;
        };
        let tty = spec.tty.then_some(spec.tty_size);
        let spawned = process::spawn(&SpawnSpec {
            cmd: &spec.cmd,
            env: &spec.env,
            cwd: spec.cwd.as_deref(),
            user: spec.user.as_deref(),
            tty,
            stdin: spec.stdin,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                warn!(session = %id, "cannot start: {e}");
                return self.fail(id, CANNOT_RUN, &e.to_string());
            }
        };
        info!(session = %id, pid = spawned.pid.as_raw(), "started {:?}", spec.cmd);
        let mut tasks = vec![self.spawn_reader(id, spawned.stdout, Stream::Stdout)];
        if let Some(err) = spawned.stderr {
            tasks.push(self.spawn_reader(id, err, Stream::Stderr));
        }
        let pty = spawned.pty.map(Rc::new);
        if let Some(stdin) = spawned.stdin.filter(|_| spec.stdin) {
            let eof = pty.as_deref().map(process::eof_char);
            self.spawn_stdin_writer(id, stdin, eof);
        }
        self.with(id, |s| {
            s.pid = Some(spawned.pid);
            s.state = State::Running;
            s.outputs_open = tasks.len() as u8;
            s.tasks = tasks;
            s.pty = pty;
            s.stdin_open = spec.stdin;
        });
        self.notify();
    }

    fn spawn_reader(self: &Rc<Self>, id: &str, fd: OwnedFd, stream: Stream) -> smol::Task<()> {
        let guest = self.clone();
        let id = id.to_owned();
        self.ex.spawn(async move {
            if let Err(e) = guest.read_output(&id, fd, stream).await {
                warn!(session = %id, "output {stream:?}: {e}");
            }
            guest.with(&id, |s| {
                s.outputs_open = s.outputs_open.saturating_sub(1);
                s.settle();
            });
            guest.notify();
        })
    }

    async fn read_output(&self, id: &str, fd: OwnedFd, stream: Stream) -> std::io::Result<()> {
        let file = Async::new(File::from(fd))?;
        // Reads land in the spare capacity of a shared buffer (no zero-fill)
        // and leave it as `Bytes` without a copy; a fresh buffer starts when
        // the rest gets small.
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        loop {
            let room = loop {
                let Some((room, space)) = self.with(id, |s| (s.log.space(), s.space.clone()))
                else {
                    return Ok(());
                };
                if room > 0 {
                    break room;
                }
                let listener = space.listen();
                if self.with(id, |s| s.log.space()).unwrap_or(1) > 0 {
                    continue;
                }
                listener.await;
            };
            if buf.capacity() < READ_BUFFER / 4 {
                buf = BytesMut::with_capacity(READ_BUFFER);
            }
            let read = file
                .read_with(|f| {
                    let spare = buf.spare_capacity_mut();
                    let want = room.min(spare.len());
                    let (filled, _) =
                        rustix::io::read(f, &mut spare[..want]).map_err(std::io::Error::from)?;
                    Ok(filled.len())
                })
                .await;
            let n = match read {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                // A pty master reads EIO once every slave is closed: end of output.
                Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => return Ok(()),
                Err(e) => return Err(e),
            };
            // SAFETY: `read` initialized the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(n) };
            let chunk = buf.split().freeze();
            self.with(id, |s| s.log.push_bytes(stream, chunk));
            self.notify();
        }
    }

    fn spawn_stdin_writer(self: &Rc<Self>, id: &str, fd: OwnedFd, eof_char: Option<u8>) {
        let guest = self.clone();
        let id = id.to_owned();
        self.ex
            .spawn(async move {
                let Ok(mut file) = Async::new(File::from(fd)) else {
                    return;
                };
                loop {
                    let Some((item, ready)) =
                        guest.with(&id, |s| (s.stdin.pop_front(), s.stdin_ready.clone()))
                    else {
                        return;
                    };
                    match item {
                        Some(StdinItem::Data { data, credit }) => {
                            // A process that stopped reading (or exited) loses the
                            // input, but the sender's window must still reopen.
                            let _ = file.write_all(&data).await;
                            guest.credits.borrow_mut().push((credit, data.len()));
                            guest.notify();
                        }
                        Some(StdinItem::Eof) => match eof_char {
                            Some(c) => {
                                let _ = file.write_all(&[c]).await;
                            }
                            None => return, // dropping the pipe closes it
                        },
                        None => {
                            if guest
                                .with(&id, |s| s.state == State::Exited)
                                .unwrap_or(true)
                            {
                                return;
                            }
                            let listener = ready.listen();
                            if guest.with(&id, |s| s.stdin.is_empty()) == Some(true) {
                                listener.await;
                            }
                        }
                    }
                }
            })
            .detach();
    }

    /// Queues input for session `id`. False (with the credit returned at once)
    /// if its stdin is closed.
    pub fn write_stdin(&self, id: &str, data: Bytes, credit: Credit) -> bool {
        let len = data.len();
        let queued = self
            .with(id, |s| {
                if !s.stdin_open {
                    return false;
                }
                s.stdin.push_back(StdinItem::Data { data, credit });
                s.stdin_ready.notify(1);
                true
            })
            .unwrap_or(false);
        if !queued {
            self.credits.borrow_mut().push((credit, len));
            self.notify();
        }
        queued
    }

    /// Closes session `id`'s stdin after what is queued.
    pub fn close_stdin(&self, id: &str) {
        self.with(id, |s| {
            if s.stdin_open {
                s.stdin.push_back(StdinItem::Eof);
                if s.pty.is_none() {
                    s.stdin_open = false;
                }
                s.stdin_ready.notify(1);
            }
        });
    }

    /// Sends a signal to session `id`'s process group.
    pub fn signal(&self, id: &str, signal: Signal) -> std::io::Result<()> {
        let pid = self
            .with(id, |s| s.pid.filter(|_| s.exit.is_none()))
            .flatten();
        match pid {
            Some(pid) => process::signal_group(pid, signal),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the session is not running",
            )),
        }
    }

    /// Resizes session `id`'s terminal.
    pub fn resize(&self, id: &str, cols: u32, rows: u32) -> std::io::Result<()> {
        let pty = self.with(id, |s| s.pty.clone()).flatten();
        match pty {
            Some(pty) => process::resize(
                &pty,
                cols.min(u16::MAX as u32) as u16,
                rows.min(u16::MAX as u32) as u16,
            ),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the session has no terminal",
            )),
        }
    }

    /// Records a process exit reported by the reaper.
    pub fn on_exit(self: &Rc<Self>, pid: Pid, exit: ExitInfo) {
        let id = self
            .sessions
            .borrow()
            .values()
            .find(|s| s.pid == Some(pid) && s.exit.is_none())
            .map(|s| s.spec.id.clone());
        let Some(id) = id else { return }; // an orphan we reaped as subreaper
        info!(session = %id, code = exit.code, "exited");
        let settled = self.with(&id, |s| {
            s.exit = Some(exit);
            s.settle()
        });
        if settled == Some(false) {
            // Give the output a moment to drain, then cut it off.
            let guest = self.clone();
            self.ex
                .spawn(async move {
                    Timer::after(OUTPUT_GRACE).await;
                    guest.with(&id, |s| {
                        if s.state != State::Exited {
                            s.tasks.clear();
                            s.outputs_open = 0;
                            s.settle();
                        }
                    });
                    guest.notify();
                })
                .detach();
        }
        self.notify();
    }

    /// Forgets the oldest exited execs beyond [`KEEP_EXITED_EXECS`], so a
    /// guest running execs for months keeps a bounded list (and the container
    /// list always fits a packet).
    fn prune_execs(&self) {
        let mut sessions = self.sessions.borrow_mut();
        let mut exited: Vec<(u64, String)> = sessions
            .values()
            .filter(|s| s.kind == Kind::Exec && s.state == State::Exited && s.readers.is_empty())
            .filter_map(|s| {
                let n = s.spec.id.rsplit_once("-exec")?.1.parse::<u64>().ok()?;
                Some((n, s.spec.id.clone()))
            })
            .collect();
        if exited.len() >= KEEP_EXITED_EXECS {
            exited.sort();
            for (_, id) in &exited[..exited.len() + 1 - KEEP_EXITED_EXECS] {
                sessions.remove(id);
            }
        }
    }

    /// Creates and starts an exec session; returns its id.
    pub fn add_exec(
        self: &Rc<Self>,
        cmd: Vec<String>,
        tty: Option<(u16, u16)>,
        env: Vec<(String, String)>,
    ) -> String {
        let n = self.exec_seq.get() + 1;
        self.exec_seq.set(n);
        let primary = self.config.primary();
        let id = format!("{}-exec{n}", self.config.id);
        let mut spec = SessionSpec {
            id: id.clone(),
            cmd,
            tty: tty.is_some(),
            stdin: true,
            start_gate: None,
            stop_signal: Signal::SIGTERM,
            tty_size: tty.unwrap_or((80, 24)),
            // Its requester is attached from the first byte: hold the process
            // back rather than drop output, as SSH does.
            overflow: Overflow::Block,
            ..primary.clone()
        };
        spec.env.extend(env);
        self.prune_execs();
        self.sessions
            .borrow_mut()
            .insert(id.clone(), Session::new(spec, Kind::Exec));
        self.start(&id);
        id
    }

    /// The primary session's exit, once it has exited.
    pub fn primary_exit(&self) -> Option<ExitInfo> {
        self.with(&self.config.id, |s| {
            if s.state == State::Exited {
                s.exit.clone()
            } else {
                None
            }
        })
        .flatten()
    }

    /// Stops every process still running (the container is stopping): each
    /// session's stop signal, then SIGKILL for what is left after `grace`.
    pub async fn stop_all(&self, grace: Duration) {
        let running = |guest: &Self| -> Vec<(Pid, Signal)> {
            guest
                .sessions
                .borrow()
                .values()
                .filter(|s| s.exit.is_none())
                .filter_map(|s| s.pid.map(|p| (p, s.spec.stop_signal)))
                .collect()
        };
        for (pid, signal) in running(self) {
            let _ = process::signal_group(pid, signal);
        }
        let deadline = std::time::Instant::now() + grace;
        while !running(self).is_empty() && std::time::Instant::now() < deadline {
            let listener = self.changed.listen();
            futures_lite::future::or(listener, async {
                Timer::at(deadline).await;
            })
            .await;
        }
        for (pid, _) in running(self) {
            let _ = process::signal_group(pid, Signal::SIGKILL);
        }
    }

    /// Forwards a signal tether received to the primary session.
    pub fn forward_to_primary(&self, signal: Signal) {
        let primary = self.config.id.clone();
        if let Err(e) = self.signal(&primary, signal) {
            warn!("cannot forward {signal} to the primary session: {e}");
        }
    }
}
