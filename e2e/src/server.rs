//! A test SSH server on proto-core: accepts `session` channels and runs `exec`
//! (or `shell`) through `sh -c`, with pipes or, after `pty-req`, a pty. Handles
//! `env`, `window-change` and `signal`; on exit sends `exit-status` or
//! `exit-signal`, then EOF, then CLOSE, only after all output has gone out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use proto_core::crypto::{CipherAlg, KexAlg};
use proto_core::event::open_failure;
use proto_core::{ChannelId, ChannelRequest, Config, Connection, Event};
use smol::channel::Sender;
use smol::{Async, LocalExecutor, future};

use crate::driver::{Application, End, drive};
use crate::process::{self, Input, ProcMsg, Running, Size, Spawn};

/// What one finished connection looked like, for assertions.
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    /// How it ended.
    pub end: End,
    /// Key exchanges completed (1 + rekeys).
    pub kex_count: u32,
    /// The last negotiated key exchange method.
    pub kex: Option<KexAlg>,
    /// The last negotiated cipher, client to server.
    pub cipher: Option<CipherAlg>,
    /// The user name the client authenticated with.
    pub user: Option<String>,
    /// Exit statuses (`"status 3"`, `"signal TERM"`) sent, in order.
    pub exits: Vec<String>,
}

/// A running test server; stops, and kills the children it started, on drop.
pub struct Server {
    addr: SocketAddr,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    reports: Arc<Mutex<Vec<ConnectionReport>>>,
    children: Arc<Mutex<HashSet<Pid>>>,
}

impl Server {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reports of the connections that have ended so far.
    pub fn reports(&self) -> Vec<ConnectionReport> {
        self.reports.lock().unwrap().clone()
    }

    /// Waits up to `limit` for `n` connections to have ended; returns the
    /// reports there are then (a client may exit before the server notices).
    pub fn wait_reports(&self, n: usize, limit: Duration) -> Vec<ConnectionReport> {
        let end = Instant::now() + limit;
        while self.reports.lock().unwrap().len() < n && Instant::now() < end {
            thread::sleep(Duration::from_millis(20));
        }
        self.reports()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.try_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for pid in self.children.lock().unwrap().drain() {
            let _ = process::signal_group(pid, Signal::SIGKILL);
        }
    }
}

/// Serves SSH on `listener` with `config` (a server config) on a thread of its own.
pub fn serve(listener: TcpListener, config: Config) -> io::Result<Server> {
    let addr = listener.local_addr()?;
    let listener = Async::new(listener)?;
    let (stop_tx, stop_rx) = smol::channel::bounded::<()>(1);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let children = Arc::new(Mutex::new(HashSet::new()));
    let (r, c) = (reports.clone(), children.clone());
    let thread = thread::Builder::new()
        .name(format!("e2e-server-{addr}"))
        .spawn(move || {
            let ex = LocalExecutor::new();
            let accept = async {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    ex.spawn(serve_connection(
                        stream,
                        config.clone(),
                        r.clone(),
                        c.clone(),
                    ))
                    .detach();
                }
            };
            let stop = async {
                let _ = stop_rx.recv().await;
            };
            smol::block_on(ex.run(future::or(accept, stop)));
        })?;
    Ok(Server {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
        reports,
        children,
    })
}

async fn serve_connection(
    stream: Async<TcpStream>,
    config: Config,
    reports: Arc<Mutex<Vec<ConnectionReport>>>,
    children: Arc<Mutex<HashSet<Pid>>>,
) {
    let _ = stream.get_ref().set_nodelay(true);
    let mut conn = Connection::new(config, Instant::now(), Box::new(rand_core::OsRng));
    let (tx, rx) = smol::channel::unbounded();
    let mut app = ServerApp {
        tx,
        sessions: HashMap::new(),
        next_serial: 0,
        children,
        user: None,
        exits: Vec::new(),
    };
    let end = drive(&stream, &mut conn, &mut app, &rx).await;
    app.hang_up_all();
    let negotiated = conn.negotiated().copied();
    reports.lock().unwrap().push(ConnectionReport {
        end,
        kex_count: conn.kex_count(),
        kex: negotiated.map(|n| n.kex),
        cipher: negotiated.map(|n| n.cipher_c2s),
        user: app.user,
        exits: app.exits,
    });
}

/// A message from a session's helper threads: the channel, the session's
/// serial (channel ids are reused, serials are not), and what happened.
type Message = (ChannelId, u64, ProcMsg);

#[derive(Default)]
struct Session {
    serial: u64,
    pty: Option<(Size, String)>,
    env: Vec<(String, String)>,
    running: Option<Running>,
    /// Output read from the child and not yet taken by `channel_send`, per stream.
    pending: HashMap<Option<u32>, VecDeque<Bytes>>,
    /// Streams whose reader waits for a credit.
    owed: HashSet<Option<u32>>,
    open_streams: usize,
    eof_before_start: bool,
    exit: Option<ExitStatus>,
    finished: bool,
}

struct ServerApp {
    tx: Sender<Message>,
    sessions: HashMap<ChannelId, Session>,
    next_serial: u64,
    children: Arc<Mutex<HashSet<Pid>>>,
    user: Option<String>,
    exits: Vec<String>,
}

impl Application for ServerApp {
    type Message = Message;

    fn on_event(&mut self, conn: &mut Connection, event: Event) {
        match event {
            Event::Authenticated(who) => self.user = Some(who.user),
            Event::ChannelOpen {
                channel,
                channel_type,
                ..
            } => {
                if channel_type == "session" && conn.accept_channel(channel).is_ok() {
                    self.next_serial += 1;
                    self.sessions.insert(
                        channel,
                        Session {
                            serial: self.next_serial,
                            ..Session::default()
                        },
                    );
                } else {
                    let _ = conn.reject_channel(
                        channel,
                        open_failure::UNKNOWN_CHANNEL_TYPE,
                        "unsupported channel type",
                    );
                }
            }
            Event::ChannelRequest {
                channel,
                request,
                want_reply,
            } => {
                let ok = self.on_request(channel, request);
                if want_reply {
                    let _ = conn.channel_reply(channel, ok);
                }
            }
            Event::ChannelData { channel, ext, data } => {
                let len = data.len();
                let to_child = match (
                    ext,
                    self.sessions.get(&channel).and_then(|s| s.running.as_ref()),
                ) {
                    (None, Some(r)) => r.stdin.try_send(Input::Data(data)).is_ok(),
                    _ => false,
                };
                if !to_child {
                    let _ = conn.channel_consume(channel, len);
                }
            }
            Event::ChannelEof { channel } => {
                if let Some(s) = self.sessions.get_mut(&channel) {
                    match &s.running {
                        Some(r) => {
                            let _ = r.stdin.try_send(Input::Eof);
                        }
                        None => s.eof_before_start = true,
                    }
                }
            }
            Event::ChannelWritable { channel } => self.flush(conn, channel),
            Event::ChannelClosed { channel } => {
                if let Some(s) = self.sessions.remove(&channel) {
                    hang_up(&s);
                }
            }
            _ => {}
        }
    }

    fn on_message(&mut self, conn: &mut Connection, (channel, serial, msg): Message) {
        let Some(s) = self
            .sessions
            .get_mut(&channel)
            .filter(|s| s.serial == serial)
        else {
            return;
        };
        match msg {
            ProcMsg::Output { ext, data } => {
                s.pending.entry(ext).or_default().push_back(data);
                s.owed.insert(ext);
                self.flush(conn, channel);
            }
            ProcMsg::OutputEnd { .. } => {
                s.open_streams -= 1;
                self.maybe_finish(conn, channel);
            }
            ProcMsg::Consumed(n) => {
                let _ = conn.channel_consume(channel, n);
            }
            ProcMsg::Exited(status) => {
                if let Some(r) = &s.running {
                    self.children.lock().unwrap().remove(&r.pid);
                }
                s.exit = Some(status);
                self.maybe_finish(conn, channel);
            }
        }
    }
}

impl ServerApp {
    /// Acts on a channel request; the answer is whether it succeeded.
    fn on_request(&mut self, channel: ChannelId, request: ChannelRequest) -> bool {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return false;
        };
        match request {
            ChannelRequest::Pty(p) if s.running.is_none() => {
                let size = Size {
                    cols: p.cols,
                    rows: p.rows,
                    width_px: p.width_px,
                    height_px: p.height_px,
                };
                s.pty = Some((size, p.term));
                true
            }
            ChannelRequest::Env { name, value } => {
                s.env
                    .push((name, String::from_utf8_lossy(&value).into_owned()));
                true
            }
            ChannelRequest::Exec { command } => self.start(
                channel,
                Some(String::from_utf8_lossy(&command).into_owned()),
            ),
            ChannelRequest::Shell => self.start(channel, None),
            ChannelRequest::WindowChange {
                cols,
                rows,
                width_px,
                height_px,
            } => {
                let size = Size {
                    cols,
                    rows,
                    width_px,
                    height_px,
                };
                match (&s.running, &mut s.pty) {
                    (
                        Some(Running {
                            master: Some(m), ..
                        }),
                        _,
                    ) => process::set_winsize(m, size).is_ok(),
                    (None, Some((pending, _))) => {
                        *pending = size;
                        true
                    }
                    _ => false,
                }
            }
            ChannelRequest::Signal { name } => match (&s.running, process::signal_from_name(&name))
            {
                (Some(r), Some(sig)) if s.exit.is_none() => {
                    process::signal_group(r.pid, sig).is_ok()
                }
                _ => false,
            },
            _ => false,
        }
    }

    fn start(&mut self, channel: ChannelId, command: Option<String>) -> bool {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return false;
        };
        if s.running.is_some() {
            return false;
        }
        let spec = Spawn {
            command,
            env: s.env.clone(),
            pty: s.pty.clone(),
        };
        let (tx, serial) = (self.tx.clone(), s.serial);
        let notify = move |m: ProcMsg| {
            let _ = tx.try_send((channel, serial, m));
        };
        match process::spawn(&spec, notify) {
            Ok(running) => {
                self.children.lock().unwrap().insert(running.pid);
                s.open_streams = running.credits.len();
                if s.eof_before_start {
                    let _ = running.stdin.try_send(Input::Eof);
                }
                s.running = Some(running);
                true
            }
            Err(_) => false,
        }
    }

    /// Sends what the window allows of each stream's pending output, hands the
    /// readers their credits back when their stream is drained.
    fn flush(&mut self, conn: &mut Connection, channel: ChannelId) {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        for (ext, queue) in s.pending.iter_mut() {
            while let Some(front) = queue.front_mut() {
                match conn.channel_send(channel, *ext, front) {
                    Ok(n) if n == front.len() => {
                        queue.pop_front();
                    }
                    Ok(n) => {
                        *front = front.slice(n..);
                        break;
                    }
                    Err(_) => queue.clear(), // the channel is closing: nobody will read it
                }
            }
            if queue.is_empty()
                && s.owed.remove(ext)
                && let Some(r) = &s.running
            {
                for (_, credit) in r.credits.iter().filter(|(e, _)| e == ext) {
                    let _ = credit.try_send(());
                }
            }
        }
        self.maybe_finish(conn, channel);
    }

    /// Once the child has exited and every byte of its output has been handed to
    /// the connection: exit-status or exit-signal, EOF, CLOSE (RFC 4254 6.10).
    fn maybe_finish(&mut self, conn: &mut Connection, channel: ChannelId) {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        let Some(status) = s.exit else { return };
        if s.finished || s.open_streams > 0 || s.pending.values().any(|q| !q.is_empty()) {
            return;
        }
        s.finished = true;
        let request = match process::exit_signal_name(&status) {
            Some(name) => {
                self.exits.push(format!("signal {name}"));
                ChannelRequest::ExitSignal {
                    name,
                    core_dumped: std::os::unix::process::ExitStatusExt::core_dumped(&status),
                    message: String::new(),
                }
            }
            None => {
                let code = status.code().unwrap_or(255) as u32;
                self.exits.push(format!("status {code}"));
                ChannelRequest::ExitStatus { code }
            }
        };
        let _ = conn.channel_request(channel, &request, false);
        let _ = conn.channel_eof(channel);
        let _ = conn.channel_close(channel);
    }

    fn hang_up_all(&mut self) {
        for (_, s) in self.sessions.drain() {
            hang_up(&s);
        }
    }
}

/// A session that goes away while its child runs sends the child SIGHUP, as a
/// terminal hang-up would.
fn hang_up(s: &Session) {
    if let (Some(r), None) = (&s.running, s.exit) {
        let _ = process::signal_group(r.pid, Signal::SIGHUP);
    }
}
