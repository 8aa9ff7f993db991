//! Link sync (docs/PROTOCOL.md section 2) over a stream, from either end:
//! proto-core's `link` state machines with the stream's bytes and the clock.
//! Each returns the bytes that followed the sync, which belong to SSH.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use bytes::BytesMut;
use futures_lite::future;
use proto_core::link::{Initiator, Responder};

use crate::{ReadBuffer, rng, write_all};

/// Sync as the appliance: HELLO until a matching HELLO-ACK, then READY. A
/// guest that cannot run says why with a FATAL frame: that is the error.
pub async fn as_appliance<S: AsFd>(stream: &Async<S>) -> io::Result<BytesMut> {
    let mut initiator = Initiator::new(Instant::now(), rng());
    let mut reader = ReadBuffer::default();
    loop {
        if let Some(out) = initiator.poll_transmit() {
            write_all(stream, &out).await?;
        }
        if initiator.is_ready() {
            return Ok(BytesMut::new());
        }
        let deadline = initiator
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        // Small reads: what follows HELLO-ACK is SSH and must be handed on.
        let read = async { Some(reader.read_at_most(stream, 4096).await) };
        let timer = async {
            Timer::at(deadline).await;
            None
        };
        match future::or(read, timer).await {
            None => initiator.handle_timeout(Instant::now()),
            Some(Ok(chunk)) if chunk.is_empty() => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Some(Ok(mut chunk)) => {
                let used = initiator.handle_input(Instant::now(), &chunk);
                if let Some(reason) = initiator.fatal() {
                    return Err(io::Error::other(format!("the guest cannot run: {reason}")));
                }
                if initiator.is_ready() {
                    if let Some(out) = initiator.poll_transmit() {
                        write_all(stream, &out).await?;
                    }
                    return Ok(chunk.split_off(used));
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
}

/// Sync as the guest: answer the latest HELLO until READY. With `announce`,
/// first ask the appliance to start at once (a serial port that just opened).
pub async fn as_guest<S: AsFd>(stream: &Async<S>, announce: bool) -> io::Result<BytesMut> {
    let mut responder = Responder::new(rng());
    if announce {
        responder.announce();
    }
    let mut reader = ReadBuffer::default();
    loop {
        if let Some(out) = responder.poll_transmit() {
            write_all(stream, &out).await?;
        }
        let mut chunk = reader.read_at_most(stream, 4096).await?;
        if chunk.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let used = responder.handle_input(&chunk);
        if let Some(out) = responder.poll_transmit() {
            write_all(stream, &out).await?;
        }
        if responder.is_synced() {
            return Ok(chunk.split_off(used));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn both_ends_sync_through_noise_and_hand_on_what_follows() {
        smol::block_on(async {
            let (a, g) = UnixStream::pair().unwrap();
            let (a, g) = (Async::new(a).unwrap(), Async::new(g).unwrap());
            // Firmware noise on the line before the guest speaks.
            write_all(&g, b"Booting from ROM...\x1bc\x1b[2J")
                .await
                .unwrap();
            let guest = async {
                let rest = as_guest(&g, true).await.unwrap();
                write_all(&g, b"SSH-2.0-guest\r\n").await.unwrap();
                rest
            };
            let appliance = async {
                let mut got = as_appliance(&a).await.unwrap().to_vec();
                write_all(&a, b"SSH-2.0-appliance\r\n").await.unwrap();
                let mut reader = ReadBuffer::default();
                while !got.ends_with(b"\r\n") {
                    got.extend_from_slice(&reader.read(&a).await.unwrap());
                }
                got
            };
            let (rest, got) = future::zip(guest, appliance).await;
            assert_eq!(got, b"SSH-2.0-guest\r\n");
            let mut reader = ReadBuffer::default();
            let mut rest = rest.to_vec();
            while !rest.ends_with(b"\r\n") {
                rest.extend_from_slice(&reader.read(&g).await.unwrap());
            }
            assert_eq!(rest, b"SSH-2.0-appliance\r\n");
        });
    }
}
