//! The attach/exec session loop of the CLI: output to the local stdout and
//! stderr, local stdin (with the detach sequence) and window size to the
//! container, the exit status at the end, and transparent re-attach with
//! `from=<offset received so far>` when the WebSocket drops.

use std::io::Write;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use bytes::Bytes;
use futures_lite::{StreamExt, future};

use super::api::{Api, ClientError, encode};
use super::term::{DetachKeys, Input};
use super::ws::{self, Connected};
use crate::http::k8s::{self, ServerFrame, Status};

/// How long a held ctrl-p waits for a ctrl-q before it is sent on its own.
pub const DETACH_WAIT: Duration = Duration::from_millis(250);
/// How long to keep trying to re-attach after the WebSocket drops.
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// The local side of a session.
pub struct Terminal {
    /// Local stdin; `None`: not forwarded.
    pub stdin: Option<Input>,
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Window size changes (columns, rows), polled by the session loop
    /// itself: a task of their own would start smol's executor thread, which
    /// then competes with this one for the reactor and hands it I/O events
    /// through futex wake-ups.
    pub resize: Option<futures_lite::stream::Boxed<(u16, u16)>>,
    /// The current window size, sent at every (re)connect (set it only for a
    /// process with a terminal).
    pub size: Option<(u16, u16)>,
    /// Watch stdin for ctrl-p ctrl-q.
    pub detach_keys: bool,
    /// At EOF of local stdin, close the process's stdin (v5 `[255, 0]`);
    /// otherwise just stop forwarding.
    pub close_stdin_at_eof: bool,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this code (128+N for signal N).
    Exited(u32),
    /// The user detached with ctrl-p ctrl-q.
    Detached,
}

/// What to re-attach to when the WebSocket drops.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The container (or exec) id; `None` disables re-attach.
    pub id: Option<String>,
    /// Keep trying this long.
    pub window: Duration,
    /// Wait this long between the first attempts (doubling up to 2 s).
    pub first_delay: Duration,
}

enum End {
    Status(Status),
    Detached,
    Dropped(String),
}

/// Runs a session on an open connection until the process exits or the
/// user detaches, re-attaching as `resume` allows.
pub async fn run(
    api: &Api,
    mut conn: Connected,
    resume: Resume,
    term: &mut Terminal,
) -> Result<Outcome, ClientError> {
    let mut offset = conn.offset.unwrap_or(0);
    let mut stdin_open = term.stdin.is_some();
    let mut keys = DetachKeys::default();
    loop {
        if let Some((w, h)) = term.size {
            let _ = conn.ws.send(Message::Binary(k8s::resize_frame(w, h))).await;
        }
        match pump(&mut conn, &mut offset, term, &mut keys, &mut stdin_open).await {
            End::Status(status) => {
                finish(&mut conn).await;
                return status.exit_code().map(Outcome::Exited).map_err(|message| {
                    ClientError::Api {
                        status: status
                            .code
                            .and_then(|c| u16::try_from(c).ok())
                            .unwrap_or(500),
                        reason: status.reason.clone().unwrap_or_default(),
                        message,
                    }
                });
            }
            End::Detached => {
                // The server applies everything sent before the close.
                finish(&mut conn).await;
                return Ok(Outcome::Detached);
            }
            End::Dropped(why) => {
                let Some(id) = &resume.id else {
                    return Err(ClientError::Protocol(format!(
                        "the stream ended without an exit status: {why}"
                    )));
                };
                tracing::debug!(%why, offset, "stream dropped; re-attaching");
                conn = reattach(api, id, offset, stdin_open, &resume, &why).await?;
                match conn.offset {
                    Some(start) if start > offset => {
                        tracing::warn!(lost = start - offset, "output was lost while re-attaching");
                        offset = start;
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn reattach(
    api: &Api,
    id: &str,
    offset: u64,
    stdin: bool,
    resume: &Resume,
    why: &str,
) -> Result<Connected, ClientError> {
    let path = format!(
        "/v1/containers/{}/attach?stdin={}&stdout=1&stderr=1&from={offset}&timeout=10s",
        encode(id),
        u8::from(stdin)
    );
    let deadline = Instant::now() + resume.window;
    let mut delay = resume.first_delay;
    loop {
        smol::Timer::after(delay).await;
        match ws::connect(api, &path).await {
            Ok(conn) => return Ok(conn),
            Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                tracing::debug!(error = %e, "re-attach failed; retrying");
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(ClientError::Protocol(format!(
                    "the stream dropped ({why}) and re-attaching to {id} at offset {offset} failed: {e}"
                )));
            }
        }
    }
}

enum Event {
    Ws(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    Stdin(Option<Bytes>),
    Resize(Option<(u16, u16)>),
    ReleaseCtrlP,
}

async fn pump(
    conn: &mut Connected,
    offset: &mut u64,
    term: &mut Terminal,
    keys: &mut DetachKeys,
    stdin_open: &mut bool,
) -> End {
    let mut held_until: Option<Instant> = None;
    let mut ws_first = false;
    loop {
        ws_first = !ws_first;
        let event = {
            let from_ws = async { Event::Ws(conn.ws.next().await) };
            let input = &mut term.stdin;
            let stdin = async {
                match (input, *stdin_open) {
                    (Some(input), true) => Event::Stdin(input.next().await),
                    _ => future::pending().await,
                }
            };
            let sizes = &mut term.resize;
            let resize = async {
                match sizes {
                    Some(sizes) => Event::Resize(sizes.next().await),
                    None => future::pending().await,
                }
            };
            let release = async {
                match held_until {
                    Some(at) => {
                        smol::Timer::at(at).await;
                        Event::ReleaseCtrlP
                    }
                    None => future::pending().await,
                }
            };
            let local = future::or(stdin, future::or(resize, release));
            if ws_first {
                future::or(from_ws, local).await
            } else {
                future::or(local, from_ws).await
            }
        };
        let msg = match event {
            Event::Ws(Some(Ok(Message::Binary(data)))) => {
                match k8s::parse_server(conn.protocol, &data) {
                    Ok(ServerFrame::Stdout(b)) => write_out(&mut term.stdout, &b, offset),
                    Ok(ServerFrame::Stderr(b)) => write_out(&mut term.stderr, &b, offset),
                    Ok(ServerFrame::Status(status)) => return End::Status(status),
                    Err(e) => tracing::debug!(error = %e, "ignoring a message"),
                }
                continue;
            }
            Event::Ws(Some(Ok(Message::Close(frame)))) => {
                let why = frame.map_or_else(
                    || "closed".into(),
                    |f| format!("closed ({}): {}", f.code, f.reason),
                );
                return End::Dropped(why);
            }
            Event::Ws(Some(Ok(_))) => continue,
            Event::Ws(Some(Err(e))) => return End::Dropped(e.to_string()),
            Event::Ws(None) => return End::Dropped("connection closed".into()),
            Event::Stdin(Some(data)) if term.detach_keys => {
                let (out, detach) = keys.feed(&data);
                held_until = keys.holding().then(|| Instant::now() + DETACH_WAIT);
                if !out.is_empty() && !send(conn, k8s::frame(k8s::STDIN, &out)).await {
                    return End::Dropped("sending stdin failed".into());
                }
                if detach {
                    return End::Detached;
                }
                continue;
            }
            Event::Stdin(Some(data)) => k8s::frame(k8s::STDIN, &data),
            Event::Stdin(None) => {
                *stdin_open = false;
                if !term.close_stdin_at_eof {
                    continue;
                }
                if !conn.protocol.supports_close() {
                    tracing::debug!("stdin ended, but v4 cannot close the remote stdin");
                    continue;
                }
                Bytes::from_static(&[k8s::CLOSE, k8s::STDIN])
            }
            Event::ReleaseCtrlP => {
                held_until = None;
                match keys.flush() {
                    Some(b) => k8s::frame(k8s::STDIN, &[b]),
                    None => continue,
                }
            }
            Event::Resize(Some((w, h))) => {
                term.size = Some((w, h));
                k8s::resize_frame(w, h)
            }
            Event::Resize(None) => {
                term.resize = None;
                continue;
            }
        };
        if !send(conn, msg).await {
            return End::Dropped("sending failed".into());
        }
    }
}

/// Closes the WebSocket and waits (up to a second) for the server's close
/// reply, so that the server has read everything sent before.
async fn finish(conn: &mut Connected) {
    let closing = async {
        if conn.ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = conn.ws.next().await {}
        }
    };
    future::or(closing, async {
        smol::Timer::after(Duration::from_secs(1)).await;
    })
    .await;
}

async fn send(conn: &mut Connected, msg: Bytes) -> bool {
    match conn.ws.send(Message::Binary(msg)).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket send failed");
            false
        }
    }
}

fn write_out(out: &mut Box<dyn Write + Send>, data: &[u8], offset: &mut u64) {
    *offset += data.len() as u64;
    if let Err(e) = out.write_all(data).and_then(|()| out.flush()) {
        tracing::debug!(error = %e, "writing output failed");
    }
}
