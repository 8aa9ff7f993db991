//! The one loop both runtimes use: it moves bytes between an async byte stream
//! (TCP, a unix socket, a serial device, vsock) and a sans-IO tether link from
//! proto-core, arms the one timer the link asks for, and gives the
//! application its turn whenever something happened. Protocol rules live in
//! the link; the runtime's part is [`Link::work`] and [`Link::woken`].
//!
//! Also here: reading straight into large buffers ([`ReadBuffer`]), link sync
//! from either end ([`sync`]), and the OS-seeded RNG the links draw from.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use bytes::{Bytes, BytesMut};
use futures_lite::future;
use proto_core::outbox::{Outbox, Transmit};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

mod read;
pub mod sync;

pub use read::ReadBuffer;

/// Most ciphertext taken from the link and not yet written: beyond this the
/// link's own send buffer pushes back on channel output.
const MAX_PENDING_WRITE: usize = 256 * 1024;

/// How long a last DISCONNECT may take to leave before the link is dropped.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// A fresh RNG seeded by the OS, for a link or a link sync.
pub fn rng() -> Box<dyn rand_core::RngCore + Send> {
    Box::new(ChaCha20Rng::from_entropy())
}

/// A sans-IO link with an application on top.
pub trait Link: Transmit {
    /// What wakes the link besides its stream and its timer: new output, a
    /// command from another task.
    type Wake;

    /// Bytes from the stream.
    fn handle_input(&mut self, now: Instant, data: BytesMut) -> proto_core::Result<()>;
    /// The link's timer fired.
    fn handle_timeout(&mut self, now: Instant) -> proto_core::Result<()>;
    /// When the timer should fire next.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Why the link ended, once it has.
    fn close_reason(&self) -> Option<&proto_core::Error>;
    /// The application's turn, after anything happened: carry out the link's
    /// events and feed it what changed.
    fn work(&mut self);
    /// Something outside woke the link.
    fn woken(&mut self, wake: Self::Wake);
    /// Before each wait: whether bytes are waiting to be written (taken from
    /// the link, or still in it). A guest does not exit under them.
    fn backlog(&mut self, _unsent: bool) {}
}

/// How a driven link ended.
#[derive(Debug)]
pub enum End {
    /// Closed on purpose, by either side.
    Orderly,
    /// The stream ended without a word.
    Eof,
    /// The link failed: a protocol error, a timeout, a DISCONNECT for a reason.
    Protocol(proto_core::Error),
    /// Reading or writing the stream failed.
    Io(io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Orderly => f.write_str("closed"),
            End::Eof => f.write_str("the peer closed the stream"),
            End::Protocol(e) => write!(f, "{e}"),
            End::Io(e) => write!(f, "{e}"),
        }
    }
}

fn end_of(reason: Option<&proto_core::Error>) -> End {
    use proto_core::{DisconnectReason, Error};
    match reason {
        None | Some(Error::Closed) => End::Orderly,
        Some(Error::PeerDisconnected {
            reason: DisconnectReason::ByApplication,
            ..
        }) => End::Orderly,
        Some(e) => End::Protocol(e.clone()),
    }
}

enum Wake<W> {
    Read(io::Result<BytesMut>),
    Wrote(io::Result<usize>),
    Woken(W),
    Timer,
}

/// Runs `link` over `stream` until it ends. `first` is input that arrived
/// with link sync. `wake` makes the future for outside wake-ups; it is called
/// before each `work`, so nothing that happens during `work` is missed.
pub async fn drive<S, L, W>(
    stream: &Async<S>,
    link: &mut L,
    first: BytesMut,
    mut wake: impl FnMut() -> W,
) -> End
where
    S: AsFd,
    L: Link,
    W: Future<Output = L::Wake>,
{
    if !first.is_empty()
        && let Err(e) = link.handle_input(Instant::now(), first)
    {
        link.work();
        return fail(stream, link, e).await;
    }
    let mut outbox = Outbox::new(MAX_PENDING_WRITE);
    let mut reader = ReadBuffer::default();
    let mut timer = Deadline::default();
    loop {
        let woken = wake();
        link.work();
        outbox.fill(link);
        link.backlog(!outbox.is_empty() || link.has_transmit());
        if link.close_reason().is_some() && outbox.is_empty() {
            return end_of(link.close_reason());
        }
        timer.want(link.poll_timeout());
        let can_read = outbox.may_read(link);
        let event = {
            let read = async {
                if !can_read {
                    return future::pending().await;
                }
                Wake::Read(reader.read(stream).await)
            };
            let write = async {
                match outbox.front() {
                    Some(front) => Wake::Wrote(write(stream, front).await),
                    None => future::pending().await,
                }
            };
            let woken = async { Wake::Woken(woken.await) };
            let timer = async {
                timer.expired().await;
                Wake::Timer
            };
            future::or(write, future::or(read, future::or(woken, timer))).await
        };
        match event {
            Wake::Read(Ok(chunk)) if chunk.is_empty() => {
                // Events already queued still matter (an exit status, say).
                link.work();
                return End::Eof;
            }
            Wake::Read(Ok(chunk)) => {
                if let Err(e) = link.handle_input(Instant::now(), chunk) {
                    link.work();
                    return fail(stream, link, e).await;
                }
            }
            Wake::Read(Err(e)) | Wake::Wrote(Err(e)) => return End::Io(e),
            Wake::Wrote(Ok(n)) => outbox.advance(n),
            Wake::Woken(w) => link.woken(w),
            Wake::Timer => {
                if let Err(e) = link.handle_timeout(Instant::now()) {
                    return fail(stream, link, e).await;
                }
            }
        }
    }
}

/// The link's next deadline as one reactor timer, armed again only when the
/// deadline moves earlier. The keepalive deadline moves later with every
/// packet received; a timer made afresh for each pass of the loop cost a
/// reactor wake-up (an eventfd write, then an epoll pass that only re-arms)
/// per packet. Left armed at the earlier moment, the timer fires early now
/// and then, and `handle_timeout` acts only on what is due.
#[derive(Default)]
struct Deadline {
    timer: Option<(Instant, Timer)>,
}

impl Deadline {
    /// Makes sure the timer fires no later than `at` (`None`: no deadline).
    fn want(&mut self, at: Option<Instant>) {
        match (at, &mut self.timer) {
            (None, _) => self.timer = None,
            (Some(at), Some((armed, _))) if *armed <= at => {}
            (Some(at), Some((armed, timer))) => {
                *armed = at;
                timer.set_at(at);
            }
            (Some(at), None) => self.timer = Some((at, Timer::at(at))),
        }
    }

    /// Waits for the armed moment (forever without one), then disarms.
    async fn expired(&mut self) {
        match &mut self.timer {
            Some((_, timer)) => {
                timer.await;
                self.timer = None;
            }
            None => future::pending().await,
        }
    }
}

/// The link failed: its DISCONNECT goes out if it can, briefly.
async fn fail<S: AsFd, L: Link>(stream: &Async<S>, link: &mut L, e: proto_core::Error) -> End {
    let mut last = Vec::new();
    while let Some(out) = link.poll_transmit() {
        last.extend_from_slice(&out);
    }
    let _ = future::or(write_all(stream, &last), async {
        Timer::after(LAST_WORDS).await;
        Ok(())
    })
    .await;
    match end_of(Some(&e)) {
        End::Orderly => End::Orderly,
        _ => End::Protocol(e),
    }
}

/// Writes some of `buf`.
pub async fn write<S: AsFd>(stream: &Async<S>, buf: &Bytes) -> io::Result<usize> {
    stream
        .write_with(|s| rustix::io::write(s, buf).map_err(io::Error::from))
        .await
}

/// Writes all of `buf`.
pub async fn write_all<S: AsFd>(stream: &Async<S>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = stream
            .write_with(|s| rustix::io::write(s, buf).map_err(io::Error::from))
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_is_armed_again_only_when_it_moves_earlier() {
        let now = Instant::now();
        let mut d = Deadline::default();
        d.want(Some(now + Duration::from_millis(40)));
        d.want(Some(now + Duration::from_secs(60)));
        assert_eq!(
            d.timer.as_ref().map(|t| t.0),
            Some(now + Duration::from_millis(40))
        );
        d.want(Some(now + Duration::from_millis(20)));
        assert_eq!(
            d.timer.as_ref().map(|t| t.0),
            Some(now + Duration::from_millis(20))
        );
        async_io::block_on(d.expired());
        assert!(now.elapsed() >= Duration::from_millis(20));
        assert!(d.timer.is_none(), "a timer that fired is disarmed");
        d.want(None);
        let waited = async_io::block_on(future::or(
            async {
                d.expired().await;
                false
            },
            async {
                Timer::after(Duration::from_millis(30)).await;
                true
            },
        ));
        assert!(waited, "no deadline never fires");
    }
}
