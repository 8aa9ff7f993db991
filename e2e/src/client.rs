//! A test SSH client on proto-core: connects, authenticates, opens one session,
//! optionally asks for a pty, execs a command, feeds it stdin (then EOF), reacts
//! to output with scripted actions (signal, window change, more input), and
//! collects stdout, stderr and the exit status or signal.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use bytes::Bytes;
use proto_core::crypto::{CipherAlg, KexAlg};
use proto_core::{
    ChannelId, ChannelRequest, Config, Connection, DisconnectReason, Event, PtyRequest,
};
use smol::Async;

use crate::driver::{Application, drive};

/// What to do when stdout first contains some bytes.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// Fires once stdout contains this.
    pub when: Vec<u8>,
    /// What to do then.
    pub action: Action,
}

/// A scripted client action.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send channel request `signal` with this name (`TERM`).
    Signal(String),
    /// Send channel request `window-change`.
    WindowChange { cols: u32, rows: u32 },
    /// Send these bytes as stdin.
    Send(Vec<u8>),
    /// Send EOF.
    Eof,
}

/// One command to run.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// The command line for `exec`.
    pub command: String,
    /// A pty with this TERM and size (cols, rows), requested before `exec`.
    pub pty: Option<(String, u32, u32)>,
    /// `env` requests sent before `exec` (a refusal is counted, not fatal).
    pub env: Vec<(String, String)>,
    /// Bytes sent as stdin once `exec` succeeded.
    pub stdin: Vec<u8>,
    /// Send EOF after `stdin`.
    pub close_stdin: bool,
    /// Actions on output.
    pub triggers: Vec<Trigger>,
}

/// What came back.
#[derive(Debug, Clone, Default)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    /// Whether the server sent EOF before closing.
    pub eof: bool,
    /// Key exchanges completed (1 + rekeys).
    pub kex_count: u32,
    /// The negotiated key exchange method.
    pub kex: Option<KexAlg>,
    /// The negotiated cipher, client to server.
    pub cipher: Option<CipherAlg>,
    /// `env` requests the server refused.
    pub env_refused: usize,
}

/// Runs `request` on the server at `addr` with the client `config`. `Err`
/// explains what failed (connection, authentication, a refused request).
pub fn run_exec(
    addr: SocketAddr,
    config: Config,
    request: ExecRequest,
) -> Result<ExecOutcome, String> {
    smol::block_on(async {
        let stream = Async::<TcpStream>::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.get_ref().set_nodelay(true);
        let mut conn = Connection::new(config, Instant::now(), Box::new(rand_core::OsRng));
        let (_tx, rx) = smol::channel::unbounded::<()>();
        let mut app = ClientApp::new(request);
        let end = drive(&stream, &mut conn, &mut app, &rx).await;
        if let Some(failure) = app.failure {
            return Err(format!("{failure} (connection end: {end:?})"));
        }
        if !app.closed {
            return Err(format!(
                "the connection ended before the channel closed: {end:?}"
            ));
        }
        if !end.is_clean() {
            return Err(format!("the connection did not end cleanly: {end:?}"));
        }
        let mut outcome = app.outcome;
        outcome.kex_count = conn.kex_count();
        if let Some(n) = conn.negotiated() {
            outcome.kex = Some(n.kex);
            outcome.cipher = Some(n.cipher_c2s);
        }
        Ok(outcome)
    })
}

struct ClientApp {
    request: ExecRequest,
    channel: Option<ChannelId>,
    /// Names of our want-reply requests, in the order replies will come.
    awaiting: VecDeque<&'static str>,
    started: bool,
    /// Stdin not yet taken by the window.
    to_send: VecDeque<Bytes>,
    eof_wanted: bool,
    eof_sent: bool,
    /// Where in stdout the next trigger search starts.
    scanned: usize,
    outcome: ExecOutcome,
    failure: Option<String>,
    closed: bool,
}

impl ClientApp {
    fn new(mut request: ExecRequest) -> Self {
        let stdin = std::mem::take(&mut request.stdin);
        let eof_wanted = request.close_stdin;
        let to_send = if stdin.is_empty() {
            VecDeque::new()
        } else {
            VecDeque::from([Bytes::from(stdin)])
        };
        Self {
            request,
            channel: None,
            awaiting: VecDeque::new(),
            started: false,
            to_send,
            eof_wanted,
            eof_sent: false,
            scanned: 0,
            outcome: ExecOutcome::default(),
            failure: None,
            closed: false,
        }
    }

    fn fail(&mut self, conn: &mut Connection, why: String) {
        self.failure.get_or_insert(why);
        conn.disconnect(DisconnectReason::ByApplication, "test client gave up");
    }

    fn send_requests(
        &mut self,
        conn: &mut Connection,
        channel: ChannelId,
    ) -> Result<(), proto_core::Error> {
        for (name, value) in &self.request.env {
            let env = ChannelRequest::Env {
                name: name.clone(),
                value: Bytes::from(value.clone().into_bytes()),
            };
            conn.channel_request(channel, &env, true)?;
            self.awaiting.push_back("env");
        }
        if let Some((term, cols, rows)) = &self.request.pty {
            // Modes: just TTY_OP_END; the server's defaults are fine.
            let pty = PtyRequest {
                term: term.clone(),
                cols: *cols,
                rows: *rows,
                width_px: 0,
                height_px: 0,
                modes: Bytes::from_static(&[0]),
            };
            conn.channel_request(channel, &ChannelRequest::Pty(pty), true)?;
            self.awaiting.push_back("pty-req");
        }
        let exec = ChannelRequest::Exec {
            command: Bytes::from(self.request.command.clone().into_bytes()),
        };
        conn.channel_request(channel, &exec, true)?;
        self.awaiting.push_back("exec");
        Ok(())
    }

    /// Sends what the window takes of the queued stdin, then EOF if asked.
    fn pump_stdin(&mut self, conn: &mut Connection) {
        let (Some(channel), true) = (self.channel, self.started) else {
            return;
        };
        while let Some(front) = self.to_send.front_mut() {
            match conn.channel_send(channel, None, front) {
                Ok(n) if n == front.len() => {
                    self.to_send.pop_front();
                }
                Ok(n) => {
                    *front = front.slice(n..);
                    return; // ChannelWritable will call again
                }
                Err(_) => return, // closing
            }
        }
        if self.eof_wanted && !self.eof_sent {
            self.eof_sent = conn.channel_eof(channel).is_ok();
        }
    }

    fn run_triggers(&mut self, conn: &mut Connection, channel: ChannelId) {
        let longest = self
            .request
            .triggers
            .iter()
            .map(|t| t.when.len())
            .max()
            .unwrap_or(0);
        let from = self.scanned.saturating_sub(longest);
        let fired: Vec<Trigger> = {
            let (fire, keep): (Vec<Trigger>, Vec<Trigger>) = self
                .request
                .triggers
                .drain(..)
                .partition(|t| contains(&self.outcome.stdout[from..], &t.when));
            self.request.triggers = keep;
            fire
        };
        self.scanned = self.outcome.stdout.len();
        for t in fired {
            let result = match t.action {
                Action::Signal(name) => {
                    conn.channel_request(channel, &ChannelRequest::Signal { name }, false)
                }
                Action::WindowChange { cols, rows } => conn.channel_request(
                    channel,
                    &ChannelRequest::WindowChange {
                        cols,
                        rows,
                        width_px: 0,
                        height_px: 0,
                    },
                    false,
                ),
                Action::Send(bytes) => {
                    self.to_send.push_back(bytes.into());
                    Ok(())
                }
                Action::Eof => {
                    self.eof_wanted = true;
                    Ok(())
                }
            };
            if let Err(e) = result {
                self.fail(conn, format!("trigger action failed: {e}"));
            }
        }
        self.pump_stdin(conn);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

impl Application for ClientApp {
    type Message = ();

    fn on_event(&mut self, conn: &mut Connection, event: Event) {
        match event {
            Event::Authenticated(_) => match conn.open_session() {
                Ok(channel) => self.channel = Some(channel),
                Err(e) => self.fail(conn, format!("open_session: {e}")),
            },
            Event::ChannelOpened { channel } => {
                if let Err(e) = self.send_requests(conn, channel) {
                    self.fail(conn, format!("channel request: {e}"));
                }
            }
            Event::ChannelOpenFailed {
                reason,
                description,
                ..
            } => {
                self.fail(
                    conn,
                    format!("the server refused the session: {reason} {description}"),
                );
            }
            Event::ChannelReply { success, .. } => match (self.awaiting.pop_front(), success) {
                (Some("env"), false) => self.outcome.env_refused += 1,
                (Some("exec"), true) => {
                    self.started = true;
                    self.pump_stdin(conn);
                }
                (Some(name), false) => self.fail(conn, format!("the server refused {name}")),
                (Some(_), true) => {}
                (None, _) => self.fail(conn, "a reply to a request we did not make".into()),
            },
            Event::ChannelData { channel, ext, data } => {
                match ext {
                    None => self.outcome.stdout.extend_from_slice(&data),
                    Some(_) => self.outcome.stderr.extend_from_slice(&data),
                }
                let _ = conn.channel_consume(channel, data.len());
                if ext.is_none() && !self.request.triggers.is_empty() {
                    self.run_triggers(conn, channel);
                }
            }
            Event::ChannelWritable { .. } => self.pump_stdin(conn),
            Event::ChannelRequest {
                channel,
                request,
                want_reply,
            } => {
                match request {
                    ChannelRequest::ExitStatus { code } => self.outcome.exit_status = Some(code),
                    ChannelRequest::ExitSignal { name, .. } => {
                        self.outcome.exit_signal = Some(name)
                    }
                    _ => {}
                }
                if want_reply {
                    let _ = conn.channel_reply(channel, false);
                }
            }
            Event::ChannelEof { .. } => self.outcome.eof = true,
            Event::ChannelClosed { .. } => {
                self.closed = true;
                conn.disconnect(DisconnectReason::ByApplication, "done");
            }
            _ => {}
        }
    }

    fn on_message(&mut self, _conn: &mut Connection, _message: ()) {}
}
