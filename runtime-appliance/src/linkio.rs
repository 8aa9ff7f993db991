//! What sits between a guest link's socket and the tasks around it: link sync
//! as the appliance, reading the socket straight into one large buffer (no copy
//! on the way into a connection), the bound on stdin an attachment may queue,
//! and quoting a command for `sh -c`.

use std::io;
use std::net::TcpStream;
use std::sync::Arc;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt, future};
use proto_core::link::Initiator;
use smol::{Async, Timer};

/// How much stdin an attachment has handed over that the guest's window has
/// not taken yet; writers wait while it is over [`STDIN_QUEUE_LIMIT`].
#[derive(Default)]
pub struct StdinGauge {
    queued: std::sync::atomic::AtomicUsize,
    drained: event_listener::Event,
}

/// Stdin tetherd holds per attachment at most (before writers wait).
pub const STDIN_QUEUE_LIMIT: usize = 1 << 20;

impl StdinGauge {
    /// Waits until the queue has room.
    pub async fn room(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let listener = self.drained.listen();
            if self.queued.load(SeqCst) < STDIN_QUEUE_LIMIT {
                return;
            }
            listener.await;
        }
    }

    /// Waits for room, then counts `n` more bytes as queued.
    pub async fn reserve(&self, n: usize) {
        self.room().await;
        self.queued
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// `n` queued bytes were sent (or dropped).
    pub fn release(&self, n: usize) {
        self.queued
            .fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
        self.drained.notify(usize::MAX);
    }
}

/// Stdin bytes on their way to the guest; whatever is dropped unsent (the
/// channel or link went away) is released from its gauge.
pub struct QueuedStdin {
    pub data: Bytes,
    pub gauge: Arc<StdinGauge>,
}

impl Drop for QueuedStdin {
    fn drop(&mut self) {
        self.gauge.release(self.data.len());
    }
}

/// Reads from a socket straight into one large buffer and hands each read
/// over as its own `BytesMut`: consecutive reads are contiguous, so the
/// connection joins them without a copy (the profile showed the copy into the
/// connection's input buffer costing more than decrypting it).
pub struct ReadBuffer {
    buf: BytesMut,
}

/// Room for reads; a new buffer starts when less than a read's worth is left.
const READ_BUFFER: usize = 1 << 20;
const MIN_READ: usize = 64 * 1024;

impl Default for ReadBuffer {
    fn default() -> Self {
        Self {
            buf: BytesMut::with_capacity(READ_BUFFER),
        }
    }
}

impl ReadBuffer {
    /// The next bytes from `stream`; empty at end of stream.
    pub async fn read(&mut self, stream: &Async<TcpStream>) -> io::Result<BytesMut> {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            // The old allocation lives on in the chunks handed out.
            self.buf = BytesMut::with_capacity(READ_BUFFER);
        }
        let buf = &mut self.buf;
        let n = stream
            .read_with(|s| {
                let (filled, _) =
                    rustix::io::read(s, buf.spare_capacity_mut()).map_err(io::Error::from)?;
                Ok(filled.len())
            })
            .await?;
        // SAFETY: `read` initialized the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Ok(self.buf.split())
    }
}

/// Quotes an argument for `sh -c`, which is how SSH's `exec` runs a command.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// Link sync as the appliance: HELLO until a matching HELLO-ACK, then READY.
/// Returns the guest's bytes that followed its HELLO-ACK, or an error with the
/// reason a guest gave in a FATAL frame.
pub async fn sync_link(stream: &Async<TcpStream>) -> io::Result<Vec<u8>> {
    let mut initiator = Initiator::new(Instant::now(), crate::registry::rng());
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(out) = initiator.poll_transmit() {
            (&mut &*stream).write_all(&out).await?;
        }
        if initiator.is_ready() {
            return Ok(Vec::new());
        }
        let deadline = initiator
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let read = async { Some((&mut &*stream).read(&mut buf).await) };
        let timer = async {
            Timer::at(deadline).await;
            None
        };
        match future::or(read, timer).await {
            None => initiator.handle_timeout(Instant::now()),
            Some(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Some(Ok(n)) => {
                let used = initiator.handle_input(Instant::now(), &buf[..n]);
                if let Some(reason) = initiator.fatal() {
                    return Err(io::Error::other(format!("the guest cannot run: {reason}")));
                }
                if initiator.is_ready() {
                    if let Some(out) = initiator.poll_transmit() {
                        (&mut &*stream).write_all(&out).await?;
                    }
                    return Ok(buf[used..n].to_vec());
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_for_sh() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
