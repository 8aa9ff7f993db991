//! The guest's processes and what acts on them. The protocol's view of every
//! session (state, exit, output log, readers, credits) is proto-core's
//! `Sessions`; this module holds what only the OS has: process ids, pipes and
//! ptys, the tasks that move output into the logs and input out of them, and
//! carries out what links ask for (`GuestEvent`s). Everything runs on one
//! thread (a `LocalExecutor`), so state is `RefCell`s and wake-ups are `Event`s.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use event_listener::Event;
use futures_lite::AsyncWriteExt;
use nix::unistd::Pid;
use proto_core::PtyRequest;
use proto_core::outlog::Stream;
use proto_core::tether::{
    self, Credit, ExitStatus, GuestEvent, Kind, SessionEvent, Sessions, Signal, State,
};
use smol::{Async, LocalExecutor, Timer};
use tracing::{info, warn};

use crate::config::{Config, GateExpiry, SessionSpec};
use crate::process::{self, SpawnSpec};

/// How long output may keep flowing after a process exited (a background child
/// can hold its pipes open), before the session is declared finished anyway.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Bytes read from a process's output at a time (its pipe holds 1 MiB).
const READ_BUFFER: usize = 256 * 1024;

/// Exit status of a session that could not start (as a shell reports it).
const CANNOT_RUN: u32 = 127;
/// Exit status of a start-gated session whose gate expired with `fail`.
const GATE_FAILED: u32 = 125;

/// Input waiting for the process.
enum StdinItem {
    Data(Bytes, Credit),
    /// Close stdin (a terminal gets its EOF character instead).
    Eof,
}

/// A session's process, as the OS knows it.
struct Proc {
    pid: Option<Pid>,
    /// The reaper's report; the session finishes once its output is all in.
    exit: Option<ExitStatus>,
    stop_signal: Signal,
    /// Output streams not yet at end of file.
    outputs_open: u8,
    /// Reader tasks, dropped (cancelled) if output must be cut off.
    tasks: Vec<smol::Task<()>>,
    /// The pty master, for resizing.
    pty: Option<Rc<OwnedFd>>,
    stdin: VecDeque<StdinItem>,
    /// Wakes the stdin writer.
    stdin_ready: Rc<Event>,
    /// Wakes output readers waiting for room under the `block` policy.
    space: Rc<Event>,
}

impl Proc {
    fn new(stop_signal: Signal) -> Self {
        Self {
            pid: None,
            exit: None,
            stop_signal,
            outputs_open: 0,
            tasks: Vec::new(),
            pty: None,
            stdin: VecDeque::new(),
            stdin_ready: Rc::new(Event::new()),
            space: Rc::new(Event::new()),
        }
    }
}

/// The guest.
pub struct Guest {
    pub config: Config,
    /// Every session as the protocol sees it; links borrow it per call.
    pub sessions: RefCell<Sessions>,
    procs: RefCell<BTreeMap<String, Proc>>,
    /// Anything a link might want to send changed: output, states, credits.
    pub changed: Event,
    ex: Rc<LocalExecutor<'static>>,
    /// Links holding bytes not yet written to their stream (exit waits for them).
    pub link_backlog: crate::serve::Backlog,
    /// A fatal error (PID 1) the links must report as an SSH DISCONNECT.
    pub fatal: crate::init::fatal::FatalNotice,
    /// Links with output not yet sent on their attachments (a fork's
    /// quiesce drains them).
    pub output_behind: crate::serve::Backlog,
    /// Drops and holds the links for a fork.
    pub links: crate::serve::LinkGate,
    /// VM fork: the identity source and where a fork stands.
    pub fork: crate::fork::ForkState,
    /// A forked child's renamed sessions: process key (the id the session
    /// had when its process was made, which its tasks keep) to its id now.
    renamed: RefCell<BTreeMap<String, String>>,
}

impl Guest {
    /// The guest with its configured sessions created (not started).
    pub fn new(config: Config, ex: Rc<LocalExecutor<'static>>) -> Rc<Self> {
        let fork = crate::fork::ForkState::new(
            config.fork_backend,
            config.fork_identity.clone(),
            crate::init::is_pid1(),
        );
        Self::with_fork(config, ex, fork)
    }

    /// The guest with a given fork state (tests give their own backend).
    pub fn with_fork(
        config: Config,
        ex: Rc<LocalExecutor<'static>>,
        fork: crate::fork::ForkState,
    ) -> Rc<Self> {
        let mut sessions = Sessions::new(&config.id, config.primary().output_buffer);
        let mut procs = BTreeMap::new();
        for s in &config.sessions {
            let kind = if s.id == config.id {
                Kind::Primary
            } else {
                Kind::Exec
            };
            sessions.add(tether::SessionSpec {
                id: s.id.clone(),
                kind,
                tty: s.tty,
                stdin: s.stdin,
                output_buffer: s.output_buffer,
                overflow: s.overflow,
            });
            procs.insert(s.id.clone(), Proc::new(s.stop_signal));
        }
        Rc::new(Self {
            config,
            sessions: RefCell::new(sessions),
            procs: RefCell::new(procs),
            changed: Event::new(),
            ex,
            link_backlog: Default::default(),
            fatal: Default::default(),
            output_behind: Default::default(),
            links: Default::default(),
            fork,
            renamed: RefCell::new(BTreeMap::new()),
        })
    }

    /// The executor the guest runs on.
    pub fn executor(&self) -> &LocalExecutor<'static> {
        &self.ex
    }

    /// The container id (a forked child's, once renamed).
    pub fn primary_id(&self) -> String {
        self.sessions.borrow().primary().to_owned()
    }

    /// The session id now of process key `key` (differs once a forked child
    /// renamed its sessions).
    fn sid(&self, key: &str) -> String {
        self.renamed
            .borrow()
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.to_owned())
    }

    /// The process key of session `sid`.
    fn key(&self, sid: &str) -> String {
        self.renamed
            .borrow()
            .iter()
            .find(|(_, now)| *now == sid)
            .map_or_else(|| sid.to_owned(), |(key, _)| key.clone())
    }

    /// The configured session of process key `key`.
    fn spec_of(&self, key: &str) -> Option<&SessionSpec> {
        self.config.sessions.iter().find(|s| s.id == key)
    }

    /// Process groups of sessions whose process runs, with the session id.
    fn running(&self) -> Vec<(String, Pid)> {
        self.procs
            .borrow()
            .iter()
            .filter(|(_, p)| p.exit.is_none())
            .filter_map(|(id, p)| p.pid.map(|pid| (id.clone(), pid)))
            .collect()
    }

    /// Sends `signal` to every running session's process group (a fork's
    /// SIGSTOP and SIGCONT). A group that is gone is no error.
    pub fn signal_running(&self, signal: Signal) -> std::io::Result<()> {
        for (id, pid) in self.running() {
            match process::signal_group(pid, signal) {
                Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {}
                Err(e) => return Err(std::io::Error::new(e.kind(), format!("{id}: {e}"))),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Sends each running session that configured a `fork_signal` that
    /// signal; returns the longest `fork_grace` among them.
    pub fn send_fork_signals(&self) -> Option<Duration> {
        let mut grace = None;
        for (id, pid) in self.running() {
            let Some((signal, g)) = self
                .spec_of(&id)
                .and_then(|s| s.fork_signal.map(|sig| (sig, s.fork_grace)))
            else {
                continue;
            };
            match process::signal_group(pid, signal) {
                Ok(()) => grace = grace.max(Some(g)),
                Err(e) => warn!(session = %id, "cannot send the fork signal SIG{signal}: {e}"),
            }
        }
        grace
    }

    /// A forked child takes its names: the primary becomes `id`, every other
    /// session `X` becomes `X-n`.
    pub fn rename_for_child(&self, id: &str, n: u32) -> Result<(), String> {
        let renames = self.sessions.borrow_mut().rename_for_child(id, n)?;
        let keys: Vec<String> = renames.iter().map(|(old, _)| self.key(old)).collect();
        let mut renamed = self.renamed.borrow_mut();
        for (key, (_, new)) in keys.into_iter().zip(&renames) {
            renamed.insert(key, new.clone());
        }
        drop(renamed);
        info!("fork: sessions renamed: {renames:?}");
        self.notify();
        Ok(())
    }

    /// Runs a task on the guest's executor.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + 'static) {
        self.ex.spawn(task).detach();
    }

    fn notify(&self) {
        self.changed.notify(usize::MAX);
    }

    fn with<R>(&self, id: &str, f: impl FnOnce(&mut Proc) -> R) -> Option<R> {
        self.procs.borrow_mut().get_mut(id).map(f)
    }

    /// Carries out what a link asks for.
    pub fn carry_out(self: &Rc<Self>, link: u64, event: GuestEvent) {
        match event {
            GuestEvent::Authenticated(who) => {
                info!(link, user = %who.user, key = ?who.key, "appliance authenticated");
            }
            GuestEvent::AuthRejected(r) => {
                let key = r.key.map_or_else(|| "none".into(), |k| k.fingerprint());
                warn!(link, user = %r.user, method = %r.method, %key, "refused authentication: {}", r.reason);
            }
            GuestEvent::Exec {
                session,
                command,
                pty,
                env,
            } => self.start_exec(&session, command, pty, env),
            GuestEvent::Start { session } => self.start(&self.key(&session)),
            GuestEvent::Stdin {
                session,
                data,
                credit,
            } => self.queue_stdin(&self.key(&session), StdinItem::Data(data, credit)),
            GuestEvent::CloseStdin { session } => {
                self.queue_stdin(&self.key(&session), StdinItem::Eof)
            }
            GuestEvent::Signal { session, signal } => {
                if let Err(e) = self.signal(&self.key(&session), signal) {
                    warn!(link, %session, "cannot deliver SIG{signal}: {e}");
                }
            }
            GuestEvent::Resize {
                session,
                cols,
                rows,
            } => {
                let pty = self.with(&self.key(&session), |p| p.pty.clone()).flatten();
                if let Some(pty) = pty
                    && let Err(e) = process::resize(&pty, cols, rows)
                {
                    warn!(link, %session, "cannot resize the terminal: {e}");
                }
            }
            GuestEvent::ForkedAnswered { accepted: true } => {
                info!(link, "the appliance took this child's forked@tether");
            }
            GuestEvent::ForkedAnswered { accepted: false } => {
                info!(
                    link,
                    "the appliance refused forked@tether (it predates fork); running on"
                );
            }
            _ => {}
        }
    }

    /// Acts on what the sessions report: room in a `block` log, execs forgotten.
    pub fn after_links(&self) {
        loop {
            let event = self.sessions.borrow_mut().poll_event();
            match event {
                Some(SessionEvent::Room { session }) => {
                    self.with(&self.key(&session), |p| p.space.notify(usize::MAX));
                }
                Some(SessionEvent::Forgotten { session }) => {
                    let key = self.key(&session);
                    self.renamed.borrow_mut().remove(&key);
                    self.procs.borrow_mut().remove(&key);
                }
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Starts every configured session that is not start-gated, and arms the
    /// gates of the others.
    pub fn start_configured(self: &Rc<Self>) {
        let gates: Vec<(String, Option<(Duration, GateExpiry)>)> = self
            .config
            .sessions
            .iter()
            .map(|s| (s.id.clone(), s.start_gate))
            .collect();
        for (id, gate) in gates {
            let Some((timeout, expiry)) = gate else {
                self.start(&id);
                continue;
            };
            info!(session = %id, "ready; waits for its start gate (at most {timeout:?})");
            let guest = self.clone();
            self.spawn(async move {
                Timer::after(timeout).await;
                if guest.sessions.borrow().state(&guest.sid(&id)) == Some(State::Created) {
                    info!(session = %id, "start gate timed out after {timeout:?}: {expiry:?}");
                    match expiry {
                        GateExpiry::Start => guest.start(&id),
                        GateExpiry::Fail => {
                            guest.fail(&id, GATE_FAILED, "start gate timed out; not started")
                        }
                    }
                }
            });
        }
    }

    fn fail(&self, id: &str, code: u32, why: &str) {
        let unwritten = self
            .with(id, |p| std::mem::take(&mut p.stdin))
            .unwrap_or_default();
        let mut sessions = self.sessions.borrow_mut();
        return_credits(&mut sessions, unwritten);
        sessions.fail(&self.sid(id), code, why);
        drop(sessions);
        self.notify();
    }

    /// Starts configured session `id`'s process (`id`: its process key).
    fn start(self: &Rc<Self>, id: &str) {
        if self.sessions.borrow().state(&self.sid(id)) != Some(State::Created) {
            return;
        }
        let Some(spec) = self.spec_of(id) else {
            return;
        };
        let tty = spec.tty.then_some(spec.tty_size);
        self.launch(id, spec, tty);
    }

    /// Starts an exec's process: the primary's cwd, user and environment,
    /// plus `env`, running `command` through the shell.
    fn start_exec(
        self: &Rc<Self>,
        id: &str,
        command: Option<String>,
        pty: Option<PtyRequest>,
        env: Vec<(String, String)>,
    ) {
        let primary = self.config.primary();
        let shell = self.config.shell.clone();
        let cmd = match command {
            Some(c) => vec![shell, "-c".into(), c],
            None => vec![shell],
        };
        let mut all_env = primary.env.clone();
        all_env.extend(env);
        if let Some(p) = pty.as_ref().filter(|p| !p.term.is_empty()) {
            all_env.insert("TERM".into(), p.term.clone());
        }
        let size = pty.map(|p| (clamp(p.cols), clamp(p.rows)));
        let spec = SessionSpec {
            id: id.to_owned(),
            cmd,
            env: all_env,
            tty: size.is_some(),
            stdin: true,
            start_gate: None,
            stop_signal: Signal::TERM,
            fork_signal: None,
            ..primary.clone()
        };
        self.procs
            .borrow_mut()
            .insert(id.to_owned(), Proc::new(Signal::TERM));
        self.launch(id, &spec, size);
    }

    /// Spawns session `id`'s process; a failure to start becomes its exit.
    fn launch(self: &Rc<Self>, id: &str, spec: &SessionSpec, tty: Option<(u16, u16)>) {
        let cmd = &spec.cmd;
        let spawned = process::spawn(&SpawnSpec {
            cmd,
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
        info!(session = %id, pid = spawned.pid.as_raw(), "started {cmd:?}");
        let mut tasks = vec![self.spawn_reader(id, spawned.stdout, Stream::Stdout)];
        if let Some(err) = spawned.stderr {
            tasks.push(self.spawn_reader(id, err, Stream::Stderr));
        }
        let pty = spawned.pty.map(Rc::new);
        if let Some(stdin) = spawned.stdin.filter(|_| spec.stdin) {
            let eof = pty.as_deref().map(process::eof_char);
            self.spawn_stdin_writer(id, stdin, eof);
        }
        self.with(id, |p| {
            p.pid = Some(spawned.pid);
            p.outputs_open = tasks.len() as u8;
            p.tasks = tasks;
            p.pty = pty;
        });
        self.sessions.borrow_mut().started(&self.sid(id));
        self.notify();
    }

    fn spawn_reader(self: &Rc<Self>, id: &str, fd: OwnedFd, stream: Stream) -> smol::Task<()> {
        let guest = self.clone();
        let id = id.to_owned();
        self.ex.spawn(async move {
            if let Err(e) = guest.read_output(&id, fd, stream).await {
                warn!(session = %id, "output {stream:?}: {e}");
            }
            guest.with(&id, |p| p.outputs_open = p.outputs_open.saturating_sub(1));
            guest.settle(&id);
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
                let Some(space) = self.with(id, |p| p.space.clone()) else {
                    return Ok(());
                };
                let listener = space.listen();
                let room = self.sessions.borrow().space(&self.sid(id));
                if room > 0 {
                    break room;
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
            self.sessions
                .borrow_mut()
                .push_output(&self.sid(id), stream, chunk);
            self.notify();
        }
    }

    fn spawn_stdin_writer(self: &Rc<Self>, id: &str, fd: OwnedFd, eof_char: Option<u8>) {
        let guest = self.clone();
        let id = id.to_owned();
        self.spawn(async move {
            let Ok(mut file) = Async::new(File::from(fd)) else {
                return;
            };
            loop {
                let Some((item, ready)) =
                    guest.with(&id, |p| (p.stdin.pop_front(), p.stdin_ready.clone()))
                else {
                    return;
                };
                match item {
                    Some(StdinItem::Data(data, credit)) => {
                        // A process that stopped reading (or exited) loses the
                        // input, but the sender's window must still reopen.
                        let _ = file.write_all(&data).await;
                        guest
                            .sessions
                            .borrow_mut()
                            .stdin_written(credit, data.len());
                        guest.notify();
                    }
                    Some(StdinItem::Eof) => match eof_char {
                        Some(c) => {
                            let _ = file.write_all(&[c]).await;
                        }
                        None => return, // dropping the pipe closes it
                    },
                    None => {
                        if guest.sessions.borrow().state(&guest.sid(&id)) != Some(State::Running) {
                            return;
                        }
                        let listener = ready.listen();
                        if guest.with(&id, |p| p.stdin.is_empty()) == Some(true) {
                            listener.await;
                        }
                    }
                }
            }
        });
    }

    /// Queues input for a session's stdin writer (which a session not started
    /// yet gets when it starts). Once the process ended, data is dropped and
    /// its credit returned at once.
    fn queue_stdin(&self, id: &str, item: StdinItem) {
        let open = matches!(
            self.sessions.borrow().state(&self.sid(id)),
            Some(State::Created | State::Running)
        );
        if open && let Some(p) = self.procs.borrow_mut().get_mut(id) {
            p.stdin.push_back(item);
            p.stdin_ready.notify(1);
            return;
        }
        if let StdinItem::Data(data, credit) = item {
            self.sessions.borrow_mut().stdin_written(credit, data.len());
            self.notify();
        }
    }

    /// Sends a signal to a session's process group.
    fn signal(&self, id: &str, signal: Signal) -> std::io::Result<()> {
        let pid = self
            .with(id, |p| p.pid.filter(|_| p.exit.is_none()))
            .flatten();
        match pid {
            Some(pid) => process::signal_group(pid, signal),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the session is not running",
            )),
        }
    }

    /// Records a process exit reported by the reaper.
    pub fn on_exit(self: &Rc<Self>, pid: Pid, exit: ExitStatus) {
        let id = self
            .procs
            .borrow()
            .iter()
            .find(|(_, p)| p.pid == Some(pid) && p.exit.is_none())
            .map(|(id, _)| id.clone());
        let Some(id) = id else { return }; // an orphan we reaped as subreaper
        info!(session = %id, code = exit.code(), "exited");
        self.with(&id, |p| p.exit = Some(exit));
        if !self.settle(&id) {
            // Give the output a moment to drain, then cut it off.
            let guest = self.clone();
            self.spawn(async move {
                Timer::after(OUTPUT_GRACE).await;
                guest.with(&id, |p| {
                    p.tasks.clear();
                    p.outputs_open = 0;
                });
                guest.settle(&id);
            });
        }
    }

    /// Finishes a session once its process has ended and its output is all
    /// in. True if it is finished.
    fn settle(&self, id: &str) -> bool {
        let done = self
            .with(id, |p| {
                let done = p.exit.is_some() && p.outputs_open == 0;
                if !done {
                    return None;
                }
                p.pty = None;
                p.stdin_ready.notify(usize::MAX);
                let unwritten = std::mem::take(&mut p.stdin);
                p.exit.clone().map(|exit| (exit, unwritten))
            })
            .flatten();
        let Some((exit, unwritten)) = done else {
            return false;
        };
        let mut sessions = self.sessions.borrow_mut();
        return_credits(&mut sessions, unwritten);
        sessions.finish(&self.sid(id), exit);
        drop(sessions);
        self.notify();
        true
    }

    /// The primary session's exit, once it has exited.
    pub fn primary_exit(&self) -> Option<ExitStatus> {
        let sessions = self.sessions.borrow();
        sessions.exit(sessions.primary()).cloned()
    }

    /// Whether an appliance has heard of the primary's exit.
    pub fn exit_reported(&self) -> bool {
        self.sessions.borrow().exit_reported()
    }

    /// Stops every process still running (the container is stopping): each
    /// session's stop signal, then SIGKILL for what is left after `grace`.
    pub async fn stop_all(&self, grace: Duration) {
        let running = |guest: &Self| -> Vec<(Pid, Signal)> {
            guest
                .procs
                .borrow()
                .values()
                .filter(|p| p.exit.is_none())
                .filter_map(|p| p.pid.map(|pid| (pid, p.stop_signal)))
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
            let _ = process::signal_group(pid, Signal::KILL);
        }
    }

    /// Forwards a signal tether received to the primary session.
    pub fn forward_to_primary(&self, signal: Signal) {
        if let Err(e) = self.signal(&self.key(&self.primary_id()), signal) {
            warn!("cannot forward SIG{signal} to the primary session: {e}");
        }
    }
}

/// Stdin that will never be written still reopens its sender's window.
fn return_credits(sessions: &mut Sessions, items: VecDeque<StdinItem>) {
    for item in items {
        if let StdinItem::Data(data, credit) = item {
            sessions.stdin_written(credit, data.len());
        }
    }
}

fn clamp(n: u32) -> u16 {
    n.clamp(1, u16::MAX as u32) as u16
}
