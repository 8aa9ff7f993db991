//! Fault injection: corrupted bytes, injected packets, garbage before the version.

mod support;

use std::time::Duration;

use proto_core::crypto::KexAlg;
use proto_core::kex::Preferences;
use proto_core::{ChannelRequest, Connection, DisconnectReason, Error, Event};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use support::*;

fn fault_configs() -> (proto_core::Config, proto_core::Config) {
    let mut c = client_config();
    let mut s = server_config();
    for cfg in [&mut c, &mut s] {
        cfg.preferences = Preferences {
            kex: vec![KexAlg::Curve25519],
            ..Preferences::default()
        };
        cfg.keepalive_interval = Some(Duration::from_secs(5));
        cfg.keepalive_max = 2;
    }
    (c, s)
}

/// Handshake, a session with a request and data, a close, then the client
/// disconnects. Command errors are ignored: after a fault the connection may
/// already be gone.
fn run_scenario(pair: &mut Pair) {
    pair.drive();
    if let Ok(cc) = pair.client.conn.open_session() {
        pair.drive();
        let _ = pair.client.conn.channel_request(
            cc,
            &ChannelRequest::Exec {
                command: "true".into(),
            },
            true,
        );
        let _ = pair.client.conn.channel_send(cc, None, &pattern(0, 3000));
        pair.drive();
        let _ = pair.client.conn.channel_close(cc);
        pair.drive();
    }
    // Only a scenario that ran to its end disconnects; a broken one must be
    // detected by the endpoints themselves, by error or by timeout.
    if pair
        .client
        .events
        .iter()
        .any(|e| matches!(e, Event::ChannelClosed { .. }))
    {
        pair.client
            .conn
            .disconnect(DisconnectReason::ByApplication, "done");
    }
    pair.drive_with_time(Duration::from_secs(600));
}

/// Byte ranges of the unencrypted stream that no check covers: the padding of
/// packets before NEWKEYS (RFC 4253 leaves it unauthenticated).
fn unprotected(stream: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut at = stream.iter().position(|&b| b == b'\n').unwrap() + 1;
    loop {
        let len = u32::from_be_bytes(stream[at..at + 4].try_into().unwrap()) as usize;
        let pad = stream[at + 4] as usize;
        let msg = stream[at + 5];
        ranges.push(at + 4 + len - pad..at + 4 + len);
        at += 4 + len;
        if msg == 21 {
            return ranges;
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_ends_the_connection_with_an_error() {
    let (c, s) = fault_configs();
    let mut clean = Pair::new(c.clone(), s.clone());
    run_scenario(&mut clean);
    assert!(clean.client.error.is_none());
    let clean_end = clean.server.error.clone();
    assert!(matches!(
        clean_end,
        Some(Error::PeerDisconnected {
            reason: DisconnectReason::ByApplication,
            ..
        })
    ));
    let streams = [clean.client.sent.clone(), clean.server.sent.clone()];
    let mut flips = 0;
    for (dir, stream) in streams.iter().enumerate() {
        let skip = unprotected(stream);
        for offset in 0..stream.len() {
            if skip.iter().any(|r| r.contains(&offset)) {
                continue;
            }
            let mut pair = Pair::new(c.clone(), s.clone());
            pair.client.record = false;
            pair.server.record = false;
            let bit = 1u8 << (offset % 8);
            let tap: Tap = Box::new(move |at, bytes| {
                let at = at as usize;
                if (at..at + bytes.len()).contains(&offset) {
                    bytes[offset - at] ^= bit;
                }
            });
            if dir == 0 {
                pair.tap_client_to_server(tap);
            } else {
                pair.tap_server_to_client(tap);
            }
            run_scenario(&mut pair);
            let (receiver, normal_end) = if dir == 0 {
                (&pair.server, &clean_end)
            } else {
                (&pair.client, &None)
            };
            assert!(
                receiver.error.is_some() && receiver.error != *normal_end,
                "direction {dir}: flipping bit {bit:#x} at byte {offset} went unnoticed"
            );
            flips += 1;
        }
    }
    assert!(flips > 4000, "only {flips} positions checked");
}

/// An unencrypted SSH_MSG_IGNORE packet.
fn ignore_packet() -> Vec<u8> {
    // packet_length 12 = padding_length byte + 5 payload bytes + 6 padding.
    vec![0, 0, 0, 12, 6, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[test]
fn an_ignore_during_the_strict_initial_key_exchange_is_a_disconnect() {
    let mut pair = Pair::default_pair();
    let mut done = false;
    pair.tap_client_to_server(Box::new(move |_, bytes| {
        if !std::mem::replace(&mut done, true) {
            bytes.extend_from_slice(&ignore_packet()); // right after the client's KEXINIT
        }
    }));
    pair.drive();
    assert!(
        matches!(pair.server.error, Some(Error::StrictKex(_))),
        "{:?}",
        pair.server.error
    );
    assert!(matches!(
        pair.client.error,
        Some(Error::PeerDisconnected {
            reason: DisconnectReason::ProtocolError,
            ..
        })
    ));
}

#[test]
fn a_packet_before_kexinit_breaks_strict_kex() {
    let mut pair = Pair::default_pair();
    let mut done = false;
    pair.tap_client_to_server(Box::new(move |_, bytes| {
        if !std::mem::replace(&mut done, true) {
            let eol = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
            bytes.splice(eol..eol, ignore_packet());
        }
    }));
    pair.drive();
    assert_eq!(
        pair.server.error,
        Some(Error::StrictKex("KEXINIT was not the first packet"))
    );
}

fn fresh(config: proto_core::Config) -> Connection {
    Connection::new(
        config,
        std::time::Instant::now(),
        Box::new(ChaCha8Rng::seed_from_u64(1)),
    )
}

#[test]
fn the_client_skips_noise_and_banner_lines_before_the_version() {
    let mut pair = Pair::default_pair();
    let mut done = false;
    pair.tap_server_to_client(Box::new(move |_, bytes| {
        if !std::mem::replace(&mut done, true) {
            // A stale link-sync frame, UART noise and banner lines.
            let noise = b"\x16TS\x01\x02garbage\x00\xffWelcome\r\nSSH-1.5-not-this\r\nmore\n";
            bytes.splice(0..0, noise.iter().copied());
        }
    }));
    pair.connect();
}

#[test]
fn endless_noise_before_the_version_is_an_error_not_unbounded_memory() {
    let mut client = fresh(client_config());
    let noise = vec![b'x'; 1024];
    let mut result = Ok(0);
    for _ in 0..100 {
        result = client.handle_input(std::time::Instant::now(), &noise);
        if result.is_err() {
            break;
        }
    }
    assert!(matches!(result, Err(Error::Version(_))));
    let mut client = fresh(client_config());
    let lines = "line\n".repeat(2000);
    assert!(matches!(
        client.handle_input(std::time::Instant::now(), lines.as_bytes()),
        Err(Error::Version(_))
    ));
}

#[test]
fn a_server_requires_the_version_line_first_and_bounds_its_length() {
    let mut server = fresh(server_config());
    assert!(matches!(
        server.handle_input(std::time::Instant::now(), b"GET / HTTP/1.1\r\n"),
        Err(Error::Version(_))
    ));
    let mut server = fresh(server_config());
    let long = format!("SSH-2.0-{}", "a".repeat(300));
    assert!(matches!(
        server.handle_input(std::time::Instant::now(), long.as_bytes()),
        Err(Error::Version(_))
    ));
    let mut server = fresh(server_config());
    assert!(matches!(
        server.handle_input(std::time::Instant::now(), b"SSH-1.5-old\r\n"),
        Err(Error::Version(_))
    ));
}

#[test]
fn bad_packets_before_the_key_exchange_get_typed_errors_and_a_disconnect() {
    type Check = fn(&Error) -> bool;
    let cases: [(&[u8], Check); 5] = [
        (&[0xff, 0xff, 0xff, 0xf8, 0], |e| {
            matches!(e, Error::PacketLength(_))
        }),
        (&[0, 0, 0, 13, 0], |e| matches!(e, Error::PacketLength(13))),
        (&[0, 0, 0, 12, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], |e| {
            matches!(e, Error::Padding(2))
        }),
        // A KEXINIT cut short inside its cookie.
        (&[0, 0, 0, 12, 4, 20, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0], |e| {
            matches!(e, Error::Malformed { .. })
        }),
        // CHANNEL_DATA before any key exchange.
        (&[0, 0, 0, 12, 6, 94, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], |e| {
            matches!(e, Error::Unexpected { msg: 94, .. })
        }),
    ];
    for (packet, check) in cases {
        let mut server = fresh(server_config());
        while server.poll_transmit().is_some() {}
        let mut input = b"SSH-2.0-test\r\n".to_vec();
        input.extend_from_slice(packet);
        let err = server
            .handle_input(std::time::Instant::now(), &input)
            .unwrap_err();
        assert!(check(&err), "{packet:?}: {err:?}");
        let out = server.poll_transmit().expect("a DISCONNECT is queued");
        assert_eq!(out[5], 1, "the queued packet is SSH_MSG_DISCONNECT");
        assert!(server.is_closed());
        assert!(
            server
                .handle_input(std::time::Instant::now(), b"more")
                .is_err()
        );
    }
}
