//! An in-memory pair of connections with a virtual clock, input chunking and
//! fault injection: no sockets, no sleeps (quinn-proto's `Pair`, str0m's netem).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use proto_core::{
    ChannelId, ClientConfig, Config, Connection, Error, Event, HostKeyPolicy, PrivateKey,
    ServerConfig,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// How bytes in flight are split before the receiver sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Each transmit as one input.
    Whole,
    /// One byte per `handle_input` call.
    OneByte,
    /// Random splits, seeded.
    Random(u64),
    /// Random splits handed over as owned `BytesMut` pieces of one buffer.
    RandomOwned(u64),
}

/// A byte-level tap on one direction: sees the stream offset and the bytes in
/// flight, and may change them.
pub type Tap = Box<dyn FnMut(u64, &mut Vec<u8>)>;

pub fn client_key() -> PrivateKey {
    PrivateKey::from_seed([1; 32])
}

pub fn host_key() -> PrivateKey {
    PrivateKey::from_seed([2; 32])
}

pub fn client_config() -> Config {
    Config::client(ClientConfig {
        user: "tetherd".into(),
        key: Some(client_key()),
        host_keys: HostKeyPolicy::Pinned(vec![*host_key().public()]),
    })
}

pub fn server_config() -> Config {
    Config::server(ServerConfig::new(host_key(), vec![*client_key().public()]))
}

/// One side of the pair with what it has said.
pub struct Side {
    pub conn: Connection,
    pub events: Vec<Event>,
    pub error: Option<Error>,
    /// Bytes sent so far (all transmits, as produced).
    pub sent: Vec<u8>,
    pub record: bool,
    offset: u64,
    tap: Option<Tap>,
}

impl Side {
    fn new(conn: Connection) -> Self {
        Self {
            conn,
            events: Vec::new(),
            error: None,
            sent: Vec::new(),
            record: true,
            offset: 0,
            tap: None,
        }
    }

    /// Takes the events seen so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

pub struct Pair {
    pub client: Side,
    pub server: Side,
    pub now: Instant,
    pub chunking: Chunking,
    chunk_rng: ChaCha8Rng,
    /// Return received data to the window at once.
    pub auto_consume: bool,
    /// Server side accepts every channel open.
    pub auto_accept: bool,
}

impl Pair {
    pub fn new(client: Config, server: Config) -> Self {
        Self::with_seed(client, server, 7)
    }

    pub fn with_seed(client: Config, server: Config, seed: u64) -> Self {
        let now = Instant::now();
        let c = Connection::new(client, now, Box::new(ChaCha8Rng::seed_from_u64(seed)));
        let s = Connection::new(server, now, Box::new(ChaCha8Rng::seed_from_u64(seed + 1)));
        Self {
            client: Side::new(c),
            server: Side::new(s),
            now,
            chunking: Chunking::Whole,
            chunk_rng: ChaCha8Rng::seed_from_u64(seed + 2),
            auto_consume: true,
            auto_accept: true,
        }
    }

    pub fn default_pair() -> Self {
        Self::new(client_config(), server_config())
    }

    pub fn tap_client_to_server(&mut self, tap: Tap) {
        self.client.tap = Some(tap);
    }

    pub fn tap_server_to_client(&mut self, tap: Tap) {
        self.server.tap = Some(tap);
    }

    /// Moves bytes and events until neither side has anything to do. Returns
    /// whether anything happened.
    pub fn step(&mut self) -> bool {
        let a = self.transfer(true);
        let b = self.transfer(false);
        a || b
    }

    /// Runs both sides to idle, without advancing time.
    pub fn drive(&mut self) {
        for _ in 0..1_000_000 {
            if !self.step() {
                return;
            }
        }
        panic!("pair did not settle");
    }

    /// Runs to idle, then lets virtual time pass to each next deadline, until
    /// both sides are closed or `limit` of virtual time has passed.
    pub fn drive_with_time(&mut self, limit: Duration) {
        let end = self.now + limit;
        loop {
            self.drive();
            if self.client.conn.is_closed() && self.server.conn.is_closed() {
                return;
            }
            let next = [
                self.client.conn.poll_timeout(),
                self.server.conn.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    for side in [&mut self.client, &mut self.server] {
                        if side.conn.poll_timeout().is_some_and(|t| t <= now)
                            && let Err(e) = side.conn.handle_timeout(now)
                        {
                            side.error.get_or_insert(e);
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Moves one direction's pending transmits into the other side.
    fn transfer(&mut self, from_client: bool) -> bool {
        let (from, to) = if from_client {
            (&mut self.client, &mut self.server)
        } else {
            (&mut self.server, &mut self.client)
        };
        let mut progressed =
            Self::collect(from, self.auto_consume, self.auto_accept && !from_client);
        while let Some(out) = from.conn.poll_transmit() {
            progressed = true;
            let mut bytes = out.to_vec();
            if let Some(tap) = &mut from.tap {
                tap(from.offset, &mut bytes);
            }
            from.offset += out.len() as u64;
            if from.record {
                from.sent.extend_from_slice(&out);
            }
            if to.conn.is_closed() {
                continue;
            }
            // Owned input: pieces split off one buffer, as a zero-copy reader does.
            let mut owned = bytes::BytesMut::from(&bytes[..]);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = match self.chunking {
                    Chunking::Whole => rest.len(),
                    Chunking::OneByte => 1,
                    Chunking::Random(_) | Chunking::RandomOwned(_) => {
                        1 + (self.chunk_rng.next_u32() as usize % rest.len().min(4096))
                    }
                };
                let (head, tail) = rest.split_at(n);
                rest = tail;
                let result = match self.chunking {
                    Chunking::RandomOwned(_) => {
                        to.conn.handle_input_bytes(self.now, owned.split_to(n))
                    }
                    _ => to.conn.handle_input(self.now, head),
                };
                if let Err(e) = result {
                    to.error.get_or_insert(e);
                    break;
                }
            }
            Self::collect(to, self.auto_consume, self.auto_accept && from_client);
        }
        progressed
    }

    fn collect(side: &mut Side, auto_consume: bool, auto_accept: bool) -> bool {
        let mut any = false;
        while let Some(ev) = side.conn.poll_event() {
            any = true;
            match &ev {
                Event::ChannelData { channel, data, .. } if auto_consume => {
                    side.conn.channel_consume(*channel, data.len()).unwrap();
                }
                Event::ChannelOpen { channel, .. } if auto_accept => {
                    side.conn.accept_channel(*channel).unwrap();
                }
                _ => {}
            }
            side.events.push(ev);
        }
        any
    }

    /// Handshake and authentication; panics if they fail.
    pub fn connect(&mut self) {
        self.drive();
        assert!(
            self.client.error.is_none(),
            "client: {:?}",
            self.client.error
        );
        assert!(
            self.server.error.is_none(),
            "server: {:?}",
            self.server.error
        );
        assert!(self.client.conn.is_authenticated() && self.server.conn.is_authenticated());
    }

    /// Opens a session from the client; returns (client id, server id).
    pub fn open_session(&mut self) -> (ChannelId, ChannelId) {
        let c = self.client.conn.open_session().unwrap();
        self.drive();
        let s = self
            .server
            .events
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::ChannelOpen { channel, .. } => Some(*channel),
                _ => None,
            })
            .expect("server saw the open");
        assert!(
            self.client
                .events
                .contains(&Event::ChannelOpened { channel: c })
        );
        (c, s)
    }
}

/// Concatenated channel data of one channel and stream from a list of events.
pub fn data_of(events: &[Event], channel: ChannelId, ext: Option<u32>) -> Bytes {
    let mut v = Vec::new();
    for e in events {
        if let Event::ChannelData {
            channel: c,
            ext: x,
            data,
        } = e
            && *c == channel
            && *x == ext
        {
            v.extend_from_slice(data);
        }
    }
    v.into()
}

/// A deterministic byte pattern, so receivers can check order without storing.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i ^ (i >> 11) ^ (i >> 19)) as u8)
        .collect()
}
