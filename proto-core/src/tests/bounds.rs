//! The core's own bounds against a raw peer: channel state checked on
//! receive, EXT_INFO only where RFC 8308 puts it, strict kex when required,
//! a bounded queue behind an unanswered KEXINIT, a deadline on a key
//! re-exchange, and nothing sealed after a DISCONNECT.

use std::time::{Duration, Instant};

use bytes::BufMut;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use super::{Raw, assert_disconnected, data, frame, payload, server};
use crate::kex::{Preferences, encode_kexinit};
use crate::wire::{PutSsh, msg};
use crate::*;

fn eof(channel: u32) -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::CHANNEL_EOF);
        b.put_u32(channel);
    })
}

fn ext_info() -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::EXT_INFO);
        b.put_u32(0);
    })
}

#[test]
fn eof_on_a_channel_not_yet_open_is_a_typed_error_and_a_disconnect() {
    let mut raw = Raw::new(true);
    // Offered to the server, which has not accepted it.
    raw.send(&payload(|b| {
        b.put_u8(msg::CHANNEL_OPEN);
        b.put_string(b"session");
        b.put_u32(5);
        b.put_u32(1000);
        b.put_u32(1000);
    }))
    .unwrap();
    assert_eq!(
        raw.send(&eof(0)).unwrap_err(),
        Error::ChannelState {
            msg: "CHANNEL_EOF",
            channel: 0,
            problem: "the channel is not open",
        }
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);
}

#[test]
fn data_after_eof_is_a_typed_error_and_a_disconnect() {
    let mut raw = Raw::new(true);
    raw.open_session(1000);
    raw.send(&data(0, 10)).unwrap();
    raw.send(&eof(0)).unwrap();
    assert_eq!(
        raw.send(&data(0, 1)).unwrap_err(),
        Error::ChannelState {
            msg: "CHANNEL_DATA",
            channel: 0,
            problem: "data after EOF",
        }
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);
}

#[test]
fn a_packet_above_our_max_packet_is_a_typed_error_and_a_disconnect() {
    let mut raw = Raw::new(true);
    raw.open_session(1000);
    let max = raw.server.config.max_packet;
    assert_eq!(
        raw.send(&data(0, max as usize + 1)).unwrap_err(),
        Error::PacketTooLarge {
            channel: 0,
            len: max as usize + 1,
            max,
        }
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);
}

#[test]
fn ext_info_is_accepted_right_after_the_first_newkeys_only() {
    let mut raw = Raw::keyed();
    raw.send(&ext_info()).unwrap();
    let err = raw.send(&ext_info()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unexpected {
                msg: msg::EXT_INFO,
                ..
            }
        ),
        "{err:?}"
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);

    let mut raw = Raw::new(true);
    let err = raw.send(&ext_info()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unexpected {
                msg: msg::EXT_INFO,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A server that has read the raw client's version line and a KEXINIT
/// encoded with or without the strict-kex marker.
fn kexinit_with_strict(strict: bool, require: bool) -> (Connection, Result<usize>) {
    let mut conn = server();
    conn.config.require_strict_kex = require;
    conn.transport = crate::transport::Transport::new(
        &conn.config,
        Instant::now(),
        Box::new(ChaCha8Rng::seed_from_u64(1)),
    );
    conn.handle_input(Instant::now(), b"SSH-2.0-raw\r\n")
        .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // A first KEXINIT carries ext-info and strict-kex markers; a later one neither.
    let kexinit = encode_kexinit(&Preferences::default(), true, strict, &mut rng);
    let result = conn.handle_input(Instant::now(), &frame(&kexinit, false));
    (conn, result)
}

#[test]
fn require_strict_kex_refuses_a_peer_without_it() {
    let (conn, result) = kexinit_with_strict(false, true);
    assert!(matches!(result, Err(Error::StrictKex(_))), "{result:?}");
    assert!(conn.is_closed());
    let (conn, result) = kexinit_with_strict(false, false);
    assert!(result.is_ok() && !conn.is_closed());
    let (conn, result) = kexinit_with_strict(true, true);
    assert!(result.is_ok() && !conn.is_closed());
}

#[test]
fn the_tether_profile_requires_strict_kex() {
    let mut config = server().config;
    crate::tether::enable_guest(&mut config);
    assert!(config.require_strict_kex);
}

fn keepalive() -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::GLOBAL_REQUEST);
        b.put_string(b"keepalive@openssh.com");
        b.put_bool(true);
    })
}

#[test]
fn replies_queued_behind_an_unanswered_kexinit_are_capped() {
    let mut raw = Raw::new(true);
    raw.server.rekey();
    let mut result = Ok(0);
    for _ in 0..100_000 {
        result = raw.send(&keepalive());
        if result.is_err() {
            break;
        }
    }
    assert_eq!(
        result.unwrap_err(),
        Error::Limit("too many messages queued behind our unanswered KEXINIT")
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);
}

#[test]
fn a_key_re_exchange_in_flight_has_a_deadline() {
    let mut raw = Raw::new(true);
    raw.server.rekey();
    // Started without a clock: the next call with one stamps it.
    assert_eq!(raw.server.poll_timeout(), None);
    let t0 = Instant::now();
    raw.server.handle_timeout(t0).unwrap();
    let deadline = raw.server.poll_timeout().expect("a kex deadline");
    assert_eq!(deadline, t0 + raw.server.config.kex_timeout);
    raw.server
        .handle_timeout(deadline - Duration::from_millis(1))
        .unwrap();
    assert_eq!(
        raw.server.handle_timeout(deadline).unwrap_err(),
        Error::Timeout("a key re-exchange did not finish in time")
    );
    raw.collect();
    assert_disconnected(&raw, DisconnectReason::ConnectionLost);
}

#[test]
fn nothing_is_sealed_after_a_disconnect() {
    let mut raw = Raw::new(true);
    raw.open_session(1000);
    raw.server
        .disconnect(DisconnectReason::ByApplication, "bye");
    raw.collect();
    assert_eq!(raw.last()[0], msg::DISCONNECT);
    let n = raw.received.len();
    // Whatever the layers above still try to send is dropped.
    raw.server.transport.send(|b| b.put_u8(msg::IGNORE));
    raw.server.transport.send_unimplemented(9);
    raw.server.transport.start_rekey();
    assert!(raw.server.poll_transmit().is_none());
    raw.collect();
    assert_eq!(raw.received.len(), n);
}
