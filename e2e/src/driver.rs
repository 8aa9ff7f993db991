//! The smol driver: moves bytes between a TCP stream and a proto-core
//! [`Connection`], hands its events to an [`Application`], delivers messages
//! from the application's helper threads, and arms the one timer the
//! connection asks for. Reading and writing run concurrently, so neither side
//! can deadlock the other by writing while the peer writes too.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::time::Instant;

use bytes::Bytes;
use proto_core::{Connection, DisconnectReason, Error, Event};
use smol::channel::Receiver;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::{Async, Timer, future};

/// Ciphertext we hold before we stop taking more from the connection; past it,
/// `channel_send` gets back-pressure through the connection's own send buffer.
const OUT_HIGH_WATER: usize = 512 * 1024;
/// Size of one socket read.
const READ_SIZE: usize = 64 * 1024;

/// What runs on top of a connection: it reacts to events and to messages from
/// its own helpers (threads reading child output, for example).
pub trait Application {
    /// What the application's helpers send it.
    type Message;

    /// One event from the connection. Commands may be issued on `conn`.
    fn on_event(&mut self, conn: &mut Connection, event: Event);

    /// One message from a helper.
    fn on_message(&mut self, conn: &mut Connection, message: Self::Message);
}

/// How a driven connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// This side disconnected (`Connection::disconnect`).
    Disconnected,
    /// The peer sent SSH_MSG_DISCONNECT.
    PeerDisconnected {
        /// The peer's reason.
        reason: DisconnectReason,
        /// The peer's description.
        description: String,
    },
    /// The peer closed the TCP stream without a DISCONNECT (OpenSSH's `ssh` does).
    Eof,
    /// A protocol or I/O error.
    Failed(String),
}

impl End {
    /// Whether the connection ended the way a finished session does.
    pub fn is_clean(&self) -> bool {
        match self {
            Self::Disconnected | Self::Eof => true,
            Self::PeerDisconnected { reason, .. } => *reason == DisconnectReason::ByApplication,
            Self::Failed(_) => false,
        }
    }

    fn from_close(reason: Option<&Error>) -> Self {
        match reason {
            Some(Error::Closed) | None => Self::Disconnected,
            Some(Error::PeerDisconnected {
                reason,
                description,
            }) => Self::PeerDisconnected {
                reason: *reason,
                description: description.clone(),
            },
            Some(other) => Self::Failed(other.to_string()),
        }
    }
}

enum Wake<M> {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
    Message(M),
    Timer,
}

/// Runs `conn` over `stream` until it closes (either side disconnects, the
/// stream ends, or an error occurs). `app` sees every event; `messages` carries
/// what the application's helpers send, delivered on this task.
pub async fn drive<A: Application>(
    stream: &Async<TcpStream>,
    conn: &mut Connection,
    app: &mut A,
    messages: &Receiver<A::Message>,
) -> End {
    let mut out: VecDeque<Bytes> = VecDeque::new();
    let mut out_len = 0usize;
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        pump(conn, app, &mut out, &mut out_len);
        if conn.is_closed() {
            // Best effort: let the DISCONNECT (if any) reach the peer.
            flush(stream, &mut out).await;
            return End::from_close(conn.close_reason());
        }
        let deadline = conn.poll_timeout();
        let wake = {
            let mut writer = stream;
            let mut reader = stream;
            let front = out.front().cloned();
            let write = async move {
                match front {
                    Some(b) => Wake::Wrote(writer.write(&b).await),
                    None => future::pending().await,
                }
            };
            let read = async { Wake::Read(reader.read(&mut buf).await) };
            let message = async {
                match messages.recv().await {
                    Ok(m) => Wake::Message(m),
                    // No helper can send any more; nothing to wait for here.
                    Err(_) => future::pending().await,
                }
            };
            let timer = async move {
                match deadline {
                    Some(at) => {
                        Timer::at(at).await;
                        Wake::Timer
                    }
                    None => future::pending().await,
                }
            };
            future::race(write, future::race(read, future::race(message, timer))).await
        };
        match wake {
            Wake::Wrote(Ok(n)) => {
                out_len -= n;
                let front = out.front_mut().expect("a write was in flight");
                if n == front.len() {
                    out.pop_front();
                } else {
                    *front = front.slice(n..);
                }
            }
            Wake::Wrote(Err(e)) => return End::Failed(format!("write: {e}")),
            Wake::Read(Ok(0)) => {
                // Events already queued still matter (an exit status, say).
                pump(conn, app, &mut out, &mut out_len);
                return End::Eof;
            }
            Wake::Read(Ok(n)) => {
                // An error closes the connection; the top of the loop reports it.
                let _ = conn.handle_input(Instant::now(), &buf[..n]);
            }
            Wake::Read(Err(e)) => return End::Failed(format!("read: {e}")),
            Wake::Message(m) => app.on_message(conn, m),
            Wake::Timer => {
                let _ = conn.handle_timeout(Instant::now());
            }
        }
    }
}

/// Hands events to the application and takes ciphertext until both are drained
/// (or enough ciphertext is waiting), since each may produce more of the other.
fn pump<A: Application>(
    conn: &mut Connection,
    app: &mut A,
    out: &mut VecDeque<Bytes>,
    out_len: &mut usize,
) {
    loop {
        let mut progressed = false;
        while let Some(event) = conn.poll_event() {
            app.on_event(conn, event);
            progressed = true;
        }
        while *out_len < OUT_HIGH_WATER {
            let Some(bytes) = conn.poll_transmit() else {
                break;
            };
            *out_len += bytes.len();
            out.push_back(bytes);
            progressed = true;
        }
        if !progressed {
            return;
        }
    }
}

async fn flush(stream: &Async<TcpStream>, out: &mut VecDeque<Bytes>) {
    let mut writer = stream;
    while let Some(bytes) = out.pop_front() {
        if writer.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = writer.flush().await;
}
