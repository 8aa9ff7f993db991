//! The connection under an attach/exec WebSocket, and output frames written
//! to it without another copy of their payload.

use std::io::{self, IoSlice};
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

/// The longest header of a server frame (unmasked): 2 bytes, 16 or 64 bits
/// of length.
const FRAME_HEAD: usize = 10;

/// A binary message of the k8s channel protocols: the channel byte, then the
/// payload in pieces as they came from the guest.
pub struct OutputMessage {
    pub channel: u8,
    pub chunks: Vec<bytes::Bytes>,
    /// Bytes in `chunks`.
    pub len: usize,
}

/// Sends one binary message straight to the connection with one `writev` of
/// its header and its chunks, so the payload is never copied in this process
/// (tungstenite would copy it into its write buffer). Anything tungstenite
/// still holds (a pong, a close reply) is flushed first, so frames never
/// interleave.
pub async fn send_binary(ws: &mut Ws, msg: &OutputMessage) -> io::Result<()> {
    future::poll_fn(|cx| futures_sink::Sink::<Message>::poll_flush(Pin::new(&mut *ws), cx))
        .await
        .map_err(io::Error::other)?;
    let mut head = [0u8; FRAME_HEAD + 1];
    let head_len = frame_header(&mut head, 1 + msg.len as u64);
    head[head_len] = msg.channel;
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&head[..=head_len]))
        .chain(msg.chunks.iter().map(|c| IoSlice::new(c)))
        .collect();
    write_all_vectored(ws.get_mut(), &mut slices).await
}

/// Writes a final binary frame's header for `payload` bytes into `out`;
/// returns its length: FIN + binary, then the length in 7 bits, or 126 and
/// 16 bits, or 127 and 64 bits (RFC 6455 section 5.2).
fn frame_header(out: &mut [u8; FRAME_HEAD + 1], payload: u64) -> usize {
    out[0] = 0x82;
    match payload {
        0..=125 => {
            out[1] = payload as u8;
            2
        }
        126..=0xffff => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&payload.to_be_bytes());
            10
        }
    }
}

/// `write_all` for several buffers, each `writev` taking as much as the
/// socket does.
async fn write_all_vectored<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_use_the_shortest_length_form() {
        let mut h = [0u8; FRAME_HEAD + 1];
        assert_eq!(frame_header(&mut h, 125), 2);
        assert_eq!(h[..2], [0x82, 125]);
        assert_eq!(frame_header(&mut h, 126), 4);
        assert_eq!(h[..4], [0x82, 126, 0, 126]);
        assert_eq!(frame_header(&mut h, 0x1_0000), 10);
        assert_eq!(h[..10], [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    /// A writer that takes at most 3 bytes per call, like a full socket.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn short_writes_finish_every_buffer_in_order() {
        let mut w = Trickle(Vec::new());
        let parts: [&[u8]; 4] = [b"ab", b"", b"cdefg", b"h"];
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        future::block_on(write_all_vectored(&mut w, &mut slices)).unwrap();
        assert_eq!(w.0, b"abcdefgh");
    }
}
