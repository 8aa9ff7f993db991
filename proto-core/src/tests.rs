//! In-crate tests that play a raw peer by hand: the null provider makes packets
//! plaintext, so a test can write any message, well-formed or not, at any state.

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::crypto::null::NullProvider;
use crate::kex::{Preferences, encode_kexinit};
use crate::wire::{PutSsh, Reader, msg};
use crate::*;

mod bounds;

fn server() -> Connection {
    let mut cfg = Config::server(ServerConfig::new(
        PrivateKey::from_seed([2; 32]),
        vec![PublicKey::from_bytes([1; 32])],
    ));
    cfg.provider = Arc::new(NullProvider);
    cfg.window = 1000;
    Connection::new(cfg, Instant::now(), Box::new(ChaCha8Rng::seed_from_u64(1)))
}

/// Frames a payload; `tag` adds the null cipher's 16-byte tag (after NEWKEYS).
fn frame(payload: &[u8], tag: bool) -> Vec<u8> {
    let mut pad = 8 - (5 + payload.len()) % 8;
    if pad < 4 {
        pad += 8;
    }
    let mut b = Vec::new();
    b.put_u32((1 + payload.len() + pad) as u32);
    b.put_u8(pad as u8);
    b.put_slice(payload);
    b.put_bytes(0, pad + if tag { 16 } else { 0 });
    b
}

fn payload(build: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    build(&mut b);
    b.to_vec()
}

/// A hand-driven client talking to a real server under the null provider.
struct Raw {
    server: Connection,
    /// Payloads the server sent, decoded from its plaintext output.
    received: Vec<Bytes>,
    encrypted: bool,
    buf: Vec<u8>,
}

impl Raw {
    /// Runs version exchange, key exchange and (optionally) authentication.
    fn new(authenticate: bool) -> Self {
        let mut raw = Self::keyed();
        raw.send(&payload(|b| {
            b.put_u8(msg::SERVICE_REQUEST);
            b.put_string(b"ssh-userauth");
        }))
        .unwrap();
        if authenticate {
            raw.send(&raw.auth_request(PublicKey::from_bytes([1; 32])))
                .unwrap();
            assert!(raw.server.is_authenticated());
        }
        raw
    }

    /// A server past its first key exchange, before any service request.
    fn keyed() -> Self {
        let mut raw = Raw {
            server: server(),
            received: Vec::new(),
            encrypted: false,
            buf: Vec::new(),
        };
        raw.input(b"SSH-2.0-raw\r\n");
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let kexinit = encode_kexinit(&Preferences::default(), true, true, &mut rng);
        raw.send(&kexinit).unwrap();
        raw.send(&payload(|b| {
            b.put_u8(msg::KEX_INIT);
            b.put_string(&[1; 32]);
        }))
        .unwrap();
        raw.send(&[msg::NEWKEYS]).unwrap();
        raw.encrypted = true;
        raw
    }

    fn auth_request(&self, key: PublicKey) -> Vec<u8> {
        payload(|b| {
            b.put_u8(msg::USERAUTH_REQUEST);
            b.put_string(b"u");
            b.put_string(b"ssh-connection");
            b.put_string(b"publickey");
            b.put_bool(true);
            b.put_string(b"ssh-ed25519");
            b.put_string(&key.blob());
            b.put_string(&payload(|s| {
                s.put_string(b"ssh-ed25519");
                s.put_string(&[0; 64]);
            }));
        })
    }

    fn input(&mut self, bytes: &[u8]) {
        self.server.handle_input(Instant::now(), bytes).unwrap();
        self.collect();
    }

    fn send(&mut self, p: &[u8]) -> Result<usize> {
        let r = self
            .server
            .handle_input(Instant::now(), &frame(p, self.encrypted));
        self.collect();
        r
    }

    /// Decodes the server's output into payloads (plaintext under the null provider).
    fn collect(&mut self) {
        while let Some(out) = self.server.poll_transmit() {
            self.buf.extend_from_slice(&out);
        }
        if let Some(eol) = self.buf.iter().position(|&b| b == b'\n')
            && self.buf.starts_with(b"SSH-")
        {
            self.buf.drain(..=eol);
        }
        loop {
            if self.buf.len() < 4 {
                return;
            }
            let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
            // Before the server's NEWKEYS there is no tag; after it, 16 bytes.
            let newkeys_seen = self.received.iter().any(|p| p[0] == msg::NEWKEYS);
            let tag = if newkeys_seen { 16 } else { 0 };
            if self.buf.len() < 4 + len + tag {
                return;
            }
            let pad = self.buf[4] as usize;
            self.received
                .push(Bytes::copy_from_slice(&self.buf[5..4 + len - pad]));
            self.buf.drain(..4 + len + tag);
        }
    }

    fn last(&self) -> &Bytes {
        self.received.last().expect("the server said something")
    }

    /// Opens a session channel (server id 0) with the given window.
    fn open_session(&mut self, window: u32) {
        self.send(&payload(|b| {
            b.put_u8(msg::CHANNEL_OPEN);
            b.put_string(b"session");
            b.put_u32(5);
            b.put_u32(window);
            b.put_u32(32768);
        }))
        .unwrap();
        let Some(Event::ChannelOpen { channel, .. }) = self
            .server
            .events
            .iter()
            .rev()
            .find(|e| matches!(e, Event::ChannelOpen { .. }))
            .cloned()
        else {
            panic!("no open event")
        };
        self.server.accept_channel(channel).unwrap();
        self.collect();
        assert_eq!(self.last()[0], msg::CHANNEL_OPEN_CONFIRMATION);
    }
}

fn data(channel: u32, len: usize) -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::CHANNEL_DATA);
        b.put_u32(channel);
        b.put_string(&vec![b'x'; len]);
    })
}

fn assert_disconnected(raw: &Raw, reason: DisconnectReason) {
    let last = raw.last();
    assert_eq!(last[0], msg::DISCONNECT, "last message {:?}", last);
    assert_eq!(Reader::new(&last[1..], "t").u32().unwrap(), reason.code());
    assert!(raw.server.is_closed());
}

#[test]
fn data_beyond_the_window_disconnects_the_peer() {
    let mut raw = Raw::new(true);
    raw.open_session(1 << 20);
    raw.send(&data(0, 600)).unwrap();
    assert_eq!(
        raw.send(&data(0, 401)).unwrap_err(),
        Error::WindowOverrun(0)
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);
}

#[test]
fn data_for_an_unknown_channel_is_an_error() {
    let mut raw = Raw::new(true);
    assert_eq!(
        raw.send(&data(77, 1)).unwrap_err(),
        Error::UnknownChannel {
            msg: "CHANNEL_DATA",
            channel: 77
        }
    );
    assert_disconnected(&raw, DisconnectReason::ProtocolError);
}

#[test]
fn unknown_messages_get_unimplemented_and_the_connection_lives_on() {
    let mut raw = Raw::new(true);
    raw.send(&[200, 1, 2, 3]).unwrap();
    let last = raw.last().clone();
    assert_eq!(last[0], msg::UNIMPLEMENTED);
    raw.open_session(1000);
}

#[test]
fn truncated_and_out_of_state_messages_are_typed_errors() {
    type Check = fn(&Error) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (
            vec![msg::CHANNEL_REQUEST, 0, 0, 0, 0, 0, 0, 0, 9, b'e'],
            |e| matches!(e, Error::Malformed { .. }),
        ),
        (vec![msg::NEWKEYS], |e| {
            matches!(e, Error::Unexpected { msg: 21, .. })
        }),
        (vec![msg::KEX_REPLY], |e| {
            matches!(e, Error::Unexpected { msg: 31, .. })
        }),
        (vec![msg::CHANNEL_SUCCESS, 0, 0, 0, 0], |e| {
            matches!(e, Error::Unexpected { .. })
        }),
        (vec![msg::REQUEST_SUCCESS], |e| {
            matches!(e, Error::Unexpected { msg: 81, .. })
        }),
        (vec![msg::KEXINIT, 1, 2], |e| {
            matches!(e, Error::Malformed { .. })
        }),
        (vec![msg::CHANNEL_WINDOW_ADJUST, 0, 0, 0, 0, 0], |e| {
            matches!(e, Error::Malformed { .. })
        }),
        (vec![25], |e| matches!(e, Error::Unexpected { msg: 25, .. })),
    ];
    for (p, check) in cases {
        let mut raw = Raw::new(true);
        raw.open_session(1000);
        let err = raw.send(&p).unwrap_err();
        assert!(check(&err), "{p:?}: {err:?}");
        assert!(raw.last()[0] == msg::DISCONNECT);
    }
}

#[test]
fn channel_messages_before_authentication_are_refused() {
    let mut raw = Raw::new(false);
    let err = raw.send(&data(0, 1)).unwrap_err();
    assert!(matches!(err, Error::Unexpected { msg: 94, .. }));
}

#[test]
fn a_key_query_gets_pk_ok_only_for_authorized_keys() {
    let mut raw = Raw::new(false);
    let query = |key: PublicKey| {
        payload(|b| {
            b.put_u8(msg::USERAUTH_REQUEST);
            b.put_string(b"u");
            b.put_string(b"ssh-connection");
            b.put_string(b"publickey");
            b.put_bool(false);
            b.put_string(b"ssh-ed25519");
            b.put_string(&key.blob());
        })
    };
    raw.send(&query(PublicKey::from_bytes([1; 32]))).unwrap();
    assert_eq!(raw.last()[0], msg::USERAUTH_PK_OK);
    raw.send(&query(PublicKey::from_bytes([9; 32]))).unwrap();
    assert_eq!(raw.last()[0], msg::USERAUTH_FAILURE);
    assert!(!raw.server.is_authenticated());
}

#[test]
fn failed_authentication_is_bounded() {
    let mut raw = Raw::new(false);
    let bad = raw.auth_request(PublicKey::from_bytes([9; 32]));
    for _ in 0..5 {
        raw.send(&bad).unwrap();
        assert_eq!(raw.last()[0], msg::USERAUTH_FAILURE);
    }
    assert!(matches!(raw.send(&bad).unwrap_err(), Error::Auth(_)));
    assert_disconnected(&raw, DisconnectReason::NoMoreAuthMethodsAvailable);
}

fn service_request(name: &[u8]) -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::SERVICE_REQUEST);
        b.put_string(name);
    })
}

#[test]
fn a_service_other_than_userauth_is_refused() {
    let mut raw = Raw::keyed();
    let err = raw.send(&service_request(b"ssh-connection")).unwrap_err();
    assert_eq!(err, Error::Service("ssh-connection".into()));
    assert_disconnected(&raw, DisconnectReason::ServiceNotAvailable);
}

#[test]
fn asking_for_userauth_twice_is_refused() {
    let mut raw = Raw::new(false);
    let err = raw.send(&service_request(b"ssh-userauth")).unwrap_err();
    assert_eq!(err, Error::Service("ssh-userauth".into()));
    assert_disconnected(&raw, DisconnectReason::ServiceNotAvailable);
}

#[test]
fn unanswered_requests_are_bounded() {
    let mut raw = Raw::new(true);
    raw.open_session(1000);
    let req = payload(|b| {
        b.put_u8(msg::CHANNEL_REQUEST);
        b.put_u32(0);
        b.put_string(b"shell");
        b.put_bool(true);
    });
    let mut result = Ok(0);
    for _ in 0..2000 {
        result = raw.send(&req);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(
        result.unwrap_err(),
        Error::Limit("too many unanswered channel requests")
    );
}
