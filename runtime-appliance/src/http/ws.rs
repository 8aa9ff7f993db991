//! The WebSocket side of attach and exec: the upgrade handshake and the
//! session pump between a `Session` and the Kubernetes channel protocol.

use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use futures_lite::StreamExt;
use futures_lite::future;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};

use super::backend::{Backend, Session};
use super::k8s::{self, ClientFrame, Protocol, Status};
use super::listen::ApiStream;
use super::response::{Body, HttpError, full};
use super::ws_io::{Conn, OutputMessage, READ_BUFFER, Ws, send_binary};
use super::{EXEC_ID_HEADER, HyperIo, OFFSET_HEADER, State, TTY_HEADER};
use crate::api_types::Output;
use smol_hyper::rt::FuturesIo;

/// Largest message a client may send (stdin chunks and resizes are small).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;
/// How long to wait for the client's close reply after the status.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A valid upgrade request's answer.
#[derive(Debug)]
pub struct Upgrade {
    accept: String,
    pub protocol: Protocol,
}

/// Which streams the client asked for.
#[derive(Debug, Clone, Copy)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks that `req` is a WebSocket upgrade offering a supported subprotocol.
pub fn check_upgrade(req: &Request<Incoming>) -> Result<Upgrade, HttpError> {
    let headers = req.headers();
    let needs = "this endpoint needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket, \
                 Sec-WebSocket-Version: 13, Sec-WebSocket-Key, Sec-WebSocket-Protocol: v5.channel.k8s.io)";
    if !has_token(headers, header::CONNECTION, "upgrade")
        || !has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "WebSocketRequired",
            needs,
        ));
    }
    match headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
    {
        Some(b"13") => {}
        other => {
            let got = other
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| "none".into());
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "WebSocketRequired",
                format!("unsupported Sec-WebSocket-Version {got:?} (only 13)"),
            ));
        }
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                "WebSocketRequired",
                "missing Sec-WebSocket-Key header",
            )
        })?;
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let protocol = k8s::negotiate(offered.iter().copied()).ok_or_else(|| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedSubprotocol",
            format!(
                "no supported WebSocket subprotocol offered (got {:?}; offer {} or {})",
                offered.join(", "),
                k8s::V5,
                k8s::V4
            ),
        )
    })?;
    Ok(Upgrade {
        accept: derive_accept_key(key.as_bytes()),
        protocol,
    })
}

/// The 101 response, with the negotiated subprotocol and tether's headers.
pub fn switching_protocols<S: Session>(
    upgrade: &Upgrade,
    session: &S,
    exec: bool,
) -> Response<Body> {
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&upgrade.accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(upgrade.protocol.name()),
    );
    h.insert(OFFSET_HEADER, HeaderValue::from(session.start()));
    h.insert(
        TTY_HEADER,
        HeaderValue::from_static(if session.tty() { "1" } else { "0" }),
    );
    if exec && let Ok(id) = HeaderValue::from_str(session.id()) {
        h.insert(EXEC_ID_HEADER, id);
    }
    resp
}

enum Event {
    Out(Option<Output>),
    In(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    /// Held stdin can go now.
    Room,
}

/// Runs one attach or exec session after the 101 response: output to the
/// client until the process exits (then the status message and a normal
/// close), client input to the session.
pub async fn run<B: Backend, S: Session>(
    state: Arc<State<B>>,
    on_upgrade: OnUpgrade,
    protocol: Protocol,
    mut session: S,
    streams: Streams,
) {
    let upgraded: Upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(id = session.id(), error = %e, "WebSocket upgrade failed");
            return;
        }
    };
    let _guard = state.metrics.stream_started();
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
        .read_buffer_size(READ_BUFFER);
    // The connection itself, not hyper's wrapper of it: every read through
    // the wrapper zeroes its whole buffer first.
    let mut ws: Ws = match upgraded.downcast::<FuturesIo<ApiStream>>() {
        Ok(parts) => {
            let (io, read) = (
                Box::new(parts.io.into_inner()) as Box<dyn Conn>,
                parts.read_buf.to_vec(),
            );
            WebSocketStream::from_partially_read(io, read, Role::Server, Some(config)).await
        }
        Err(upgraded) => {
            WebSocketStream::from_raw_socket(
                Box::new(HyperIo(upgraded)) as Box<dyn Conn>,
                Role::Server,
                Some(config),
            )
            .await
        }
    };
    let id = session.id().to_string();
    tracing::debug!(%id, protocol = protocol.name(), start = session.start(), "attach session started");
    let mut input_first = false;
    // Stdin the guest has no room for yet: while it waits, output keeps
    // flowing (the process may be blocked on it) and the client is not read.
    let mut held: Option<bytes::Bytes> = None;
    // Output read while coalescing that did not fit the message being built.
    let mut pending: Option<Option<Output>> = None;
    loop {
        input_first = !input_first;
        let event = if let Some(out) = pending.take() {
            Event::Out(out)
        } else {
            let room = held.is_some().then(|| session.stdin_room());
            let out = async { Event::Out(session.next().await) };
            let inp = async {
                match room {
                    Some(room) => {
                        room.await;
                        Event::Room
                    }
                    None => Event::In(ws.next().await),
                }
            };
            if input_first {
                future::or(inp, out).await
            } else {
                future::or(out, inp).await
            }
        };
        match event {
            Event::Out(Some(out)) => {
                let msg = match out {
                    Output::Stdout(b) if streams.stdout && !b.is_empty() => {
                        coalesce(&mut session, k8s::STDOUT, b, &mut pending).await
                    }
                    Output::Stderr(b) if streams.stderr && !b.is_empty() => {
                        coalesce(&mut session, k8s::STDERR, b, &mut pending).await
                    }
                    Output::Stdout(_) | Output::Stderr(_) => continue,
                    Output::Gap(n) => {
                        // A gap at the start is in X-Tether-Offset already;
                        // one mid-stream ends the session (1011, the reason
                        // names the offsets), so the client knows and can
                        // re-attach past it: the bytes stay exact.
                        state.metrics.gap(n);
                        let why = super::logs_query::gap_message(&session, n);
                        tracing::info!(%id, "attach session: {why}");
                        close(&mut ws, CloseCode::Error, &why).await;
                        return;
                    }
                    Output::Exit(exit) => {
                        let status = Status::from_exit(&exit);
                        tracing::debug!(%id, code = exit.code(), "attach session: process exited");
                        if ws
                            .send(Message::Binary(k8s::frame(k8s::STATUS, &status.to_json())))
                            .await
                            .is_ok()
                        {
                            close(&mut ws, CloseCode::Normal, "").await;
                        }
                        return;
                    }
                };
                if let Err(e) = send_binary(&mut ws, &msg).await {
                    tracing::debug!(%id, error = %e, "attach session: client gone");
                    return;
                }
            }
            Event::Out(None) => {
                // No exit status: the link to the guest is gone (or the
                // container is). Close abnormally so the client re-attaches.
                let offset = session.offset();
                tracing::info!(%id, offset, "attach session: output ended without an exit status");
                close(
                    &mut ws,
                    CloseCode::Error,
                    &format!("output ended without an exit status at offset {offset}"),
                )
                .await;
                return;
            }
            Event::In(None) => {
                tracing::debug!(%id, "attach session: client disconnected");
                return;
            }
            Event::In(Some(Err(e))) => {
                tracing::debug!(%id, error = %e, "attach session: WebSocket error");
                return;
            }
            Event::In(Some(Ok(Message::Close(_)))) => {
                tracing::debug!(%id, "attach session: client closed");
                let _ = ws.close(None).await;
                return;
            }
            Event::Room => {
                if let Some(b) = held.take()
                    && let Err(e) = session.write_stdin(b).await
                {
                    tracing::warn!(%id, error = %e, "attach session: writing stdin failed");
                }
            }
            Event::In(Some(Ok(Message::Binary(data)))) => {
                held = input(&session, protocol, streams, &id, &data).await;
            }
            Event::In(Some(Ok(Message::Text(t)))) => {
                tracing::debug!(%id, len = t.len(), "attach session: ignoring a text message");
            }
            Event::In(Some(Ok(_))) => {}
        }
    }
}

/// The largest output message built from several chunks.
const COALESCE_MAX: usize = 1 << 20;

/// At most this many chunks go into one output message (one `writev`).
const COALESCE_CHUNKS: usize = 256;

/// One output message for `channel`, starting with `first` and taking every
/// further chunk of the same stream that is ready now (up to
/// [`COALESCE_MAX`] bytes): a stream the guest sends in SSH-packet-sized
/// chunks goes out in few large messages (fewer frames, wakeups and writes at
/// both ends), while a lone chunk (a keystroke's echo) goes at once. The
/// chunks are not copied: [`send_binary`] writes them as they are. Anything
/// else that was ready is left in `pending`.
async fn coalesce<S: Session>(
    session: &mut S,
    channel: u8,
    first: bytes::Bytes,
    pending: &mut Option<Option<Output>>,
) -> OutputMessage {
    let mut msg = OutputMessage {
        channel,
        len: first.len(),
        chunks: vec![first],
    };
    while msg.len < COALESCE_MAX && msg.chunks.len() < COALESCE_CHUNKS {
        let Some(next) = future::poll_once(session.next()).await else {
            break;
        };
        match (next, channel) {
            (Some(Output::Stdout(b)), k8s::STDOUT) | (Some(Output::Stderr(b)), k8s::STDERR) => {
                msg.len += b.len();
                msg.chunks.push(b);
            }
            (next, _) => {
                *pending = Some(next);
                break;
            }
        }
    }
    msg
}

/// Applies one client message to the session; stdin is returned for the
/// caller to write when there is room. Bad messages are logged and ignored:
/// the output stream stays up.
async fn input<S: Session>(
    session: &S,
    protocol: Protocol,
    streams: Streams,
    id: &str,
    data: &bytes::Bytes,
) -> Option<bytes::Bytes> {
    match k8s::parse_client(protocol, data) {
        Ok(ClientFrame::Stdin(_)) if !streams.stdin => {
            tracing::debug!(%id, "attach session: stdin data without stdin=1; ignored");
        }
        Ok(ClientFrame::Stdin(b)) if b.is_empty() => {}
        Ok(ClientFrame::Stdin(b)) => return Some(b),
        Ok(ClientFrame::Resize(size)) => {
            if let Err(e) = session.resize(size.width.into(), size.height.into()).await {
                tracing::debug!(%id, error = %e, "attach session: resize failed");
            }
        }
        Ok(ClientFrame::Close(k8s::STDIN)) if streams.stdin => {
            if let Err(e) = session.close_stdin().await {
                tracing::warn!(%id, error = %e, "attach session: closing stdin failed");
            }
        }
        Ok(ClientFrame::Close(channel)) => {
            tracing::debug!(%id, channel, "attach session: close of a stream the client cannot close; ignored");
        }
        Err(e) => tracing::debug!(%id, error = %e, "attach session: ignoring a bad message"),
    }
    None
}

/// Sends a close frame and waits (briefly) for the client's reply.
async fn close(ws: &mut Ws, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if ws.close(Some(frame)).await.is_err() {
        return;
    }
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    future::or(drain, async {
        smol::Timer::after(CLOSE_GRACE).await;
    })
    .await;
}
