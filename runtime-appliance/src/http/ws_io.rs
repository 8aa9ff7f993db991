//! The connection under an attach/exec WebSocket, and output frames written
//! to it without another copy of their payload.

use std::io;
use std::pin::Pin;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt, future};

/// How much of the client's stream is read at once (its messages are stdin
/// chunks and resizes): tungstenite zeroes this much before every read.
pub const READ_BUFFER: usize = 16 * 1024;

/// The upgraded connection: the API stream itself when hyper hands it back,
/// else hyper's wrapper of it.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// The attach/exec WebSocket.
pub type Ws = WebSocketStream<Box<dyn Conn>>;

/// Room for the longest header of a server frame (unmasked).
pub const FRAME_HEAD: usize = 10;

/// Sends one binary message (`msg` starts with [`FRAME_HEAD`] spare bytes,
/// as the attach session builds it) straight to the connection: the header goes
/// into the spare bytes, so the payload is not copied again into
/// tungstenite's write buffer. Anything tungstenite still holds (a pong, a
/// close reply) is flushed first, so frames never interleave.
pub async fn send_binary(ws: &mut Ws, mut msg: bytes::BytesMut) -> io::Result<()> {
    future::poll_fn(|cx| futures_sink::Sink::<Message>::poll_flush(Pin::new(&mut *ws), cx))
        .await
        .map_err(io::Error::other)?;
    let payload = msg.len() - FRAME_HEAD;
    // FIN + binary, then the length in 7 bits, or 126 + 16 bits, or 127 + 64 bits.
    let start = match payload {
        0..=125 => {
            msg[FRAME_HEAD - 2..FRAME_HEAD].copy_from_slice(&[0x82, payload as u8]);
            FRAME_HEAD - 2
        }
        126..=0xffff => {
            msg[FRAME_HEAD - 4..FRAME_HEAD - 2].copy_from_slice(&[0x82, 126]);
            msg[FRAME_HEAD - 2..FRAME_HEAD].copy_from_slice(&(payload as u16).to_be_bytes());
            FRAME_HEAD - 4
        }
        _ => {
            msg[..2].copy_from_slice(&[0x82, 127]);
            msg[2..FRAME_HEAD].copy_from_slice(&(payload as u64).to_be_bytes());
            0
        }
    };
    ws.get_mut().write_all(&msg[start..]).await
}
