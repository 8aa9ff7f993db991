//! The connection harnesses: a `Connection` of either role under the null
//! provider, fed the fuzzer's bytes raw or, after a scripted handshake, framed
//! as packets, with timer steps and application commands mixed in.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::messages::{open_message, payload, service, userauth};
use super::{FuzzRng, Input};
use crate::crypto::null::NullProvider;
use crate::crypto::{CipherAlg, CryptoProvider};
use crate::kex::{Preferences, encode_kexinit};
use crate::keys::{PrivateKey, PublicKey};
use crate::packet::Sealer;
use crate::wire::{PutSsh, msg};
use crate::{ClientConfig, Config, Connection, Event, HostKeyPolicy, ServerConfig};

/// Which side the harness drives; the fuzzer plays the other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Server,
    Client,
}

/// Header flags (the first input byte).
pub(super) const SCRIPTED: u8 = 1; // handshake by script, then the input is framed as packets
pub(super) const VERSION: u8 = 2; // raw mode: prepend a valid version line
pub(super) const REFUSE: u8 = 4; // refuse channel opens and requests
pub(super) const KEEPALIVE: u8 = 8; // keepalives on, two misses allowed
pub(super) const SMALL: u8 = 16; // tiny rekey, channel and buffer limits
pub(super) const EXTRA: u8 = 32; // scripted: open a channel; raw: check split independence
pub(super) const NO_KEY: u8 = 64; // server allows `none`; client has no key
pub(super) const UNAUTH: u8 = 128; // scripted: stop before authentication

/// The key the scripted server presents, and the client key the server accepts.
fn host_public() -> PublicKey {
    PublicKey::from_bytes([2; 32])
}

fn config(side: Side, flags: u8) -> Config {
    let mut cfg = match side {
        Side::Server => {
            let mut s = ServerConfig::new(
                PrivateKey::from_seed([2; 32]),
                vec![PublicKey::from_bytes([1; 32])],
            );
            s.allow_none = flags & NO_KEY != 0;
            let mut cfg = Config::server(s);
            cfg.channel_types.push("direct-tcpip".into());
            cfg
        }
        Side::Client => {
            let mut cfg = Config::client(ClientConfig {
                user: "fuzz".into(),
                key: (flags & NO_KEY == 0).then(|| PrivateKey::from_seed([1; 32])),
                host_keys: HostKeyPolicy::Pinned(vec![host_public()]),
            });
            cfg.channel_types.push("forwarded-tcpip".into());
            cfg
        }
    };
    cfg.provider = Arc::new(NullProvider);
    cfg.global_requests.push("tcpip-forward".into());
    cfg.channel_requests.push("start@tether".into());
    cfg.window = 4096;
    if flags & KEEPALIVE != 0 {
        cfg.keepalive_interval = Some(Duration::from_secs(10));
        cfg.keepalive_max = 2;
    }
    if flags & SMALL != 0 {
        cfg.rekey_bytes = 8192;
        cfg.max_channels = 2;
        cfg.send_buffer = 2048;
        cfg.max_packet = 512;
    }
    cfg
}

/// Frames payloads as the peer's null cipher does: plain before NEWKEYS, then a
/// 16-byte tag that is not checked. The crate's own `Sealer` does the framing, so
/// the harness follows its padding rule whatever it is.
struct Framer {
    sealer: Sealer,
    rng: FuzzRng,
}

impl Framer {
    fn frame(&mut self, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::with_capacity(payload.len() + 64);
        let start = Sealer::begin(&mut b);
        b.put_slice(payload);
        self.sealer.finish(&mut b, start, &mut self.rng);
        b
    }

    fn newkeys(&mut self) {
        self.sealer
            .rekey(NullProvider.sealer(CipherAlg::Aes256Gcm, &[], &[]));
    }
}

/// A connection under test, the time it lives at, and the application's
/// answering policy.
pub(super) struct Harness {
    pub(super) side: Side,
    pub(super) conn: Connection,
    now: Instant,
    flags: u8,
    /// Frame fuzzer input as packets (the script has done the handshake).
    packets: bool,
    framer: Framer,
    /// Leave questions (opens, want-reply requests) for a later command.
    lazy: bool,
    pub(super) unanswered: VecDeque<Event>,
    /// Answers the connection refused (the fuzzer may provoke them; a test
    /// of a well-formed scenario expects none).
    pub(super) refused: Vec<crate::Error>,
}

impl Harness {
    fn new(side: Side, flags: u8, seed: u8) -> Self {
        let now = Instant::now();
        let conn = Connection::new(
            config(side, flags),
            now,
            Box::new(FuzzRng::new(seed as u64)),
        );
        Self {
            side,
            conn,
            now,
            flags,
            packets: false,
            framer: Framer {
                sealer: Sealer::default(),
                rng: FuzzRng::new(7),
            },
            lazy: false,
            unanswered: VecDeque::new(),
            refused: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let _ = self.conn.handle_input(self.now, bytes);
        self.pump();
    }

    pub(super) fn send(&mut self, payload: &[u8]) {
        let packet = self.framer.frame(payload);
        self.feed(&packet);
    }

    /// Drains output and answers events the way an application would.
    fn pump(&mut self) {
        loop {
            while self.conn.poll_transmit().is_some() {}
            let Some(event) = self.conn.poll_event() else {
                break;
            };
            let question = matches!(
                event,
                Event::ChannelOpen { .. }
                    | Event::ChannelRequest {
                        want_reply: true,
                        ..
                    }
                    | Event::GlobalRequest {
                        want_reply: true,
                        ..
                    }
            );
            if self.lazy && question {
                // Answered later, by a command: other messages may come first.
                self.unanswered.push_back(event);
            } else {
                self.answer(event);
            }
        }
    }

    /// What the application does about one event.
    pub(super) fn answer(&mut self, event: Event) {
        let refuse = self.flags & REFUSE != 0;
        let answered = match event {
            Event::ChannelOpen { channel, .. } if refuse => {
                self.conn.reject_channel(channel, 1, "no")
            }
            Event::ChannelOpen { channel, .. } => self.conn.accept_channel(channel),
            Event::ChannelRequest {
                channel,
                want_reply: true,
                ..
            } => self.conn.channel_reply(channel, !refuse),
            Event::GlobalRequest {
                want_reply: true, ..
            } => self
                .conn
                .global_reply(!refuse, Bytes::from_static(b"\0\0\0\x01")),
            Event::ChannelData { channel, data, .. } => {
                self.conn.channel_consume(channel, data.len())
            }
            Event::ChannelEof { channel } if refuse => self.conn.channel_close(channel),
            Event::ChannelEof { channel } => self.conn.channel_eof(channel),
            _ => Ok(()),
        };
        if let Err(e) = answered {
            self.refused.push(e);
        }
    }

    /// Plays the peer through key exchange and authentication (the null
    /// provider accepts any public value and signature).
    fn handshake(&mut self) {
        let mut rng = FuzzRng::new(99);
        self.feed(b"SSH-2.0-fuzz\r\n");
        let client = self.side == Side::Server;
        self.send(&encode_kexinit(
            &Preferences::default(),
            client,
            true,
            &mut rng,
        ));
        self.send(&self.kex_method());
        self.send(&[msg::NEWKEYS]);
        self.framer.newkeys();
        self.packets = true;
        match self.side {
            Side::Server => {
                self.send(&service(msg::SERVICE_REQUEST));
                if self.flags & UNAUTH != 0 {
                    return;
                }
                self.send(&userauth(0, [1; 32]));
            }
            Side::Client => {
                // The client has sent SERVICE_REQUEST.
                if self.flags & UNAUTH != 0 {
                    return;
                }
                self.send(&service(msg::SERVICE_ACCEPT));
                self.send(&[msg::USERAUTH_SUCCESS]);
            }
        }
        assert!(
            self.conn.is_authenticated(),
            "the scripted handshake authenticates: {:?}",
            self.conn.close_reason()
        );
        if self.flags & EXTRA != 0 {
            match self.side {
                Side::Server => self.send(&open_message(0)),
                Side::Client => {
                    let ch = self.conn.open_session().expect("authenticated");
                    self.send(&payload(|b| {
                        b.put_u8(msg::CHANNEL_OPEN_CONFIRMATION);
                        b.put_u32(ch.0);
                        b.put_u32(0);
                        b.put_u32(1 << 20);
                        b.put_u32(32768);
                    }));
                }
            }
            if self.flags & REFUSE == 0 {
                assert_eq!(self.conn.channel_count(), 1, "the scripted channel is open");
            }
        }
    }

    /// The peer's half of the key exchange method (ECDH init or reply).
    pub(super) fn kex_method(&self) -> Vec<u8> {
        payload(|b| match self.side {
            Side::Server => {
                b.put_u8(msg::KEX_INIT);
                b.put_string(&[1; 32]);
            }
            Side::Client => {
                b.put_u8(msg::KEX_REPLY);
                b.put_string(&host_public().blob());
                b.put_string(&[2; 32]);
                b.put_string(&payload(|s| {
                    s.put_string(b"ssh-ed25519");
                    s.put_string(&[0; 64]);
                }));
            }
        })
    }

    /// One fuzzer-chosen step.
    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 8 {
            0 => {
                let n = input.u8() as usize;
                self.chunk(input.bytes(n));
            }
            1 => {
                let n = input.u16() as usize;
                self.chunk(input.bytes(n));
            }
            2 => {
                let n = input.u8() as usize;
                self.feed(input.bytes(n)); // never framed
            }
            3 => {
                self.now += Duration::from_millis(input.u16() as u64 * 100);
                let _ = self.conn.handle_timeout(self.now);
                self.pump();
            }
            4 => {
                if let Some(at) = self.conn.poll_timeout() {
                    self.now = self.now.max(at);
                }
                let _ = self.conn.handle_timeout(self.now);
                self.pump();
            }
            5 => {
                self.command(input);
                self.pump();
            }
            6 if self.packets => {
                for p in self.message(input) {
                    self.send(&p);
                }
            }
            7 if self.packets => {
                // Several messages in one read, so nothing is answered between them.
                let mut batch = Vec::new();
                for _ in 0..2 + input.u8() % 4 {
                    for p in self.message(input) {
                        batch.extend_from_slice(&self.framer.frame(&p));
                    }
                }
                self.feed(&batch);
            }
            _ => {
                let n = input.u8() as usize;
                self.chunk(input.bytes(n));
            }
        }
    }

    fn chunk(&mut self, bytes: &[u8]) {
        if self.packets {
            self.send(bytes)
        } else {
            self.feed(bytes)
        }
    }
}

/// A server `Connection` (null provider) driven by the fuzzer: see [`stream`].
pub fn server_stream(data: &[u8]) {
    stream(Side::Server, data);
}

/// A client `Connection` (null provider) driven by the fuzzer: see [`stream`].
pub fn client_stream(data: &[u8]) {
    stream(Side::Client, data);
}

/// Byte 0 holds the flags above, byte 1 seeds the RNG (its top bit makes the
/// application answer questions only when a command says so). Raw mode feeds the rest as
/// the peer's byte stream (after a version line if asked), one `handle_input` per
/// fuzzer-chosen chunk, mixed with timer steps and application commands. Scripted
/// mode first completes key exchange and authentication, then frames the
/// fuzzer's chunks as packets and offers well-formed messages with chosen fields.
fn stream(side: Side, data: &[u8]) {
    let mut input = Input::new(data);
    let (flags, seed) = (input.u8(), input.u8());
    if flags & (SCRIPTED | EXTRA) == EXTRA {
        return split_independence(side, flags, seed, &mut input);
    }
    let mut h = Harness::new(side, flags, seed);
    if flags & SCRIPTED != 0 {
        h.handshake();
    } else if flags & VERSION != 0 {
        h.feed(b"SSH-2.0-fuzz\r\n");
    }
    h.lazy = seed & 0x80 != 0;
    while !input.is_empty() && !h.conn.is_closed() {
        h.step(&mut input);
    }
}

/// The documented promise "any split of the stream gives the same result": the
/// stream fed in fuzzer-chosen chunks and fed whole give the same output, events
/// and outcome (no timers or commands, so nothing but the split differs).
fn split_independence(side: Side, flags: u8, seed: u8, input: &mut Input<'_>) {
    let mut chunks: Vec<&[u8]> = Vec::new();
    if flags & VERSION != 0 {
        chunks.push(b"SSH-2.0-fuzz\r\n");
    }
    while !input.is_empty() {
        let n = input.u8() as usize;
        chunks.push(input.bytes(n));
    }
    let run = |chunks: &[&[u8]]| {
        let now = Instant::now();
        let rng = Box::new(FuzzRng::new(seed as u64));
        let mut conn = Connection::new(config(side, flags), now, rng);
        let (mut out, mut events) = (Vec::new(), Vec::new());
        for c in chunks {
            if conn.handle_input(now, c).is_err() {
                break;
            }
        }
        while let Some(t) = conn.poll_transmit() {
            out.extend_from_slice(&t);
        }
        while let Some(e) = conn.poll_event() {
            events.push(e);
        }
        (out, events, conn.close_reason().cloned())
    };
    let split = run(&chunks);
    let whole = run(&[&chunks.concat()]);
    assert!(split == whole, "the split changed the outcome");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harnesses reach what they claim to: a broken script would otherwise
    /// leave the fuzzer hammering the handshake.
    #[test]
    fn scripted_handshakes_reach_an_open_channel_on_both_sides() {
        for side in [Side::Server, Side::Client] {
            for flags in [SCRIPTED | EXTRA, SCRIPTED | EXTRA | SMALL | KEEPALIVE] {
                let mut h = Harness::new(side, flags, 1);
                h.handshake();
                assert_eq!(h.conn.channel_count(), 1);
                // Data, a request and a rekey round trip through the step interface.
                let steps: &[&[u8]] = &[
                    &[6, 1, 0, 5, 0, b'h', b'e', b'l', b'l', b'o'], // CHANNEL_DATA
                    &[6, 4, 0, 2, 1],                               // shell, want reply
                    &[6, 13, 0, 0],                                 // peer rekeys
                    &[5, 2, 0, 5, 0],                               // channel_send
                    &[6, 1, 0, 3, 0, b'a', b'b', b'c'],             // data again
                    &[3, 0x10, 0],                                  // time passes
                ];
                let steps = steps.concat();
                let mut input = Input::new(&steps);
                while !input.is_empty() {
                    h.step(&mut input);
                }
                assert!(!h.conn.is_closed(), "{side:?}: {:?}", h.conn.close_reason());
                assert_eq!(h.conn.kex_count(), 2, "{side:?}");
            }
        }
    }

    /// Found by server_stream against 3daca9f (then also by a tether test): a
    /// CHANNEL_OPEN and the CLOSE of an older channel in one read, the accept
    /// after both, and `accept_channel` moved the new channel to the freed id.
    #[test]
    fn open_and_older_close_in_one_read_then_accept() {
        let mut h = Harness::new(Side::Server, SCRIPTED | EXTRA, 1);
        h.handshake(); // channel 0 is open
        let close = payload(|b| {
            b.put_u8(msg::CHANNEL_CLOSE);
            b.put_u32(0);
        });
        let mut batch = h.framer.frame(&open_message(0x27));
        batch.extend_from_slice(&h.framer.frame(&close));
        h.feed(&batch);
        assert!(h.refused.is_empty(), "{:?}", h.refused);
        assert_eq!(h.conn.channel_count(), 1);
        // The new channel kept the id its open event named (1, as 0 was still
        // taken when it arrived): data for it is taken, not an unknown channel.
        let data = payload(|b| {
            b.put_u8(msg::CHANNEL_DATA);
            b.put_u32(1);
            b.put_string(b"hi");
        });
        h.send(&data);
        assert!(!h.conn.is_closed(), "{:?}", h.conn.close_reason());
        assert!(h.refused.is_empty(), "{:?}", h.refused);
    }

    #[test]
    fn unauthenticated_mode_leaves_authentication_to_the_fuzzer() {
        for side in [Side::Server, Side::Client] {
            let mut h = Harness::new(side, SCRIPTED | UNAUTH, 1);
            h.handshake();
            assert!(!h.conn.is_authenticated() && !h.conn.is_closed());
            let steps: &[u8] = match side {
                Side::Server => &[6, 15, 0, 0, 0], // signed publickey, authorized key
                Side::Client => &[6, 16, 0, 1, 6, 17, 0, 0], // SERVICE_ACCEPT, SUCCESS
            };
            let mut input = Input::new(steps);
            while !input.is_empty() {
                h.step(&mut input);
            }
            assert!(
                h.conn.is_authenticated(),
                "{side:?}: {:?}",
                h.conn.close_reason()
            );
        }
    }
}
