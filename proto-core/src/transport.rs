//! The transport layer (RFC 4253): version exchange, packets, key exchange with
//! strict-kex rules, rekeying, and the transport's own messages (DISCONNECT,
//! IGNORE, DEBUG, UNIMPLEMENTED, EXT_INFO). Layers above see only payloads.
//!
//! Payloads sent while our key exchange is in flight are queued as plaintext and
//! sealed with the new keys right after our NEWKEYS: never dropped, never sent
//! under keys the peer is about to discard. That queue is bounded (a peer that
//! never answers our KEXINIT but keeps sending requests is cut off), and a key
//! re-exchange has a deadline. Once a DISCONNECT is queued nothing more is sealed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use crate::config::{Config, HostKeyPolicy, Role};
use crate::crypto::{CryptoProvider, KexClient, OpeningCipher};
use crate::error::{DisconnectReason, Error, Result};
use crate::kex::{self, Negotiated, Preferences};
use crate::keys::{PrivateKey, PublicKey};
use crate::packet::{Opener, Packet, Sealer};
use crate::wire::{PutSsh, Reader, msg};

mod exchange;
mod version;

/// Payloads that may wait behind our unanswered KEXINIT, besides
/// `send_buffer` bytes of them (the application's own data is bounded by it).
const MAX_PENDING_PAYLOADS: usize = 16 * 1024;
/// Bytes beyond `send_buffer` the queue behind a KEXINIT may hold.
const PENDING_SLACK: usize = 256 * 1024;

/// What the transport hands up.
#[derive(Debug)]
pub enum Incoming {
    /// A payload for the layers above.
    Payload(Packet),
    /// A key exchange completed.
    KexDone { first: bool, negotiated: Negotiated },
}

enum KexState {
    /// No key exchange in flight.
    Idle,
    /// Our KEXINIT is out; the peer's has not arrived.
    SentInit { ours: Bytes },
    /// Both KEXINITs are known; the method's messages are under way.
    Exchange {
        ours: Bytes,
        theirs: Bytes,
        negotiated: Negotiated,
        client: Option<(Box<dyn KexClient>, Vec<u8>)>,
        ignore_guess: bool,
    },
    /// Our NEWKEYS is out; the peer's has not arrived. Holds the incoming keys.
    AwaitNewKeys {
        opener: Box<dyn OpeningCipher>,
        negotiated: Negotiated,
    },
}

enum Side {
    Client { host_keys: HostKeyPolicy },
    Server { host_key: PrivateKey },
}

/// The transport of one connection.
pub struct Transport {
    side: Side,
    provider: Arc<dyn CryptoProvider>,
    prefs: Preferences,
    rng: Box<dyn RngCore + Send>,
    local_version: Vec<u8>,
    peer_version: Option<Vec<u8>>,
    skipped_bytes: usize,
    skipped_lines: usize,
    inbuf: BytesMut,
    /// Received bytes that do not continue `inbuf`'s allocation (a read that
    /// landed in a fresh buffer), in order: `poll` takes them over a buffer at
    /// a time, copying only the rest of a packet that straddles two buffers.
    spill: VecDeque<BytesMut>,
    out: BytesMut,
    sealer: Sealer,
    opener: Opener,
    kex: KexState,
    kex_done: u32,
    strict: bool,
    peer_ext_info: bool,
    session_id: Option<[u8; 32]>,
    peer_host_key: Option<PublicKey>,
    server_sig_algs: Option<Vec<String>>,
    negotiated: Option<Negotiated>,
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    pending_limit: usize,
    rekey_bytes: u64,
    rekey_interval: Duration,
    last_kex: Instant,
    /// When the exchange in flight was first seen with a clock (a KEXINIT
    /// may go out from a call without one; the next call with one stamps it).
    kex_started: Option<Instant>,
    kex_timeout: Duration,
    require_strict: bool,
    /// The next packet may be EXT_INFO (it follows the peer's first NEWKEYS).
    ext_info_next: bool,
    /// A client accepts the server's second EXT_INFO until authenticated
    /// (RFC 8308 section 2.4).
    ext_info_before_auth: bool,
    /// A DISCONNECT is queued: nothing more is sealed.
    disconnected: bool,
}

impl Transport {
    /// A transport that has sent its version line and first KEXINIT.
    pub fn new(config: &Config, now: Instant, rng: Box<dyn RngCore + Send>) -> Self {
        let side = match &config.role {
            Role::Client(c) => Side::Client {
                host_keys: c.host_keys.clone(),
            },
            Role::Server(s) => Side::Server {
                host_key: s.host_key.clone(),
            },
        };
        let mut t = Self {
            side,
            provider: config.provider.clone(),
            prefs: config.preferences.clone(),
            rng,
            local_version: config.version.as_bytes().to_vec(),
            peer_version: None,
            skipped_bytes: 0,
            skipped_lines: 0,
            inbuf: BytesMut::with_capacity(64 * 1024),
            spill: VecDeque::new(),
            out: BytesMut::with_capacity(64 * 1024),
            sealer: Sealer::default(),
            opener: Opener::default(),
            kex: KexState::Idle,
            kex_done: 0,
            strict: false,
            peer_ext_info: false,
            session_id: None,
            peer_host_key: None,
            server_sig_algs: None,
            negotiated: None,
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_limit: config.send_buffer.saturating_add(PENDING_SLACK),
            rekey_bytes: config.rekey_bytes,
            rekey_interval: config.rekey_interval,
            last_kex: now,
            kex_started: None,
            kex_timeout: config.kex_timeout,
            require_strict: config.require_strict_kex,
            ext_info_next: false,
            ext_info_before_auth: config.is_client(),
            disconnected: false,
        };
        t.out.put_slice(&t.local_version);
        t.out.put_slice(b"\r\n");
        t.send_kexinit();
        t
    }

    fn is_client(&self) -> bool {
        matches!(self.side, Side::Client { .. })
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.spill
            .back_mut()
            .unwrap_or(&mut self.inbuf)
            .extend_from_slice(data);
    }

    /// Appends received bytes the caller no longer needs, without copying:
    /// bytes that continue the buffer (consecutive reads split from one
    /// allocation) join it, others wait in `spill` (only the version line,
    /// which is parsed straight from `inbuf`, is always joined).
    pub fn feed_bytes(&mut self, data: BytesMut) {
        if data.is_empty() {
            return;
        }
        let tail = self.spill.back_mut().unwrap_or(&mut self.inbuf);
        if tail.is_empty() {
            *tail = data;
        } else if self.peer_version.is_none()
            || tail.as_ptr().wrapping_add(tail.len()) == data.as_ptr()
        {
            // `unsplit` joins adjacent pieces of one allocation for free.
            tail.unsplit(data);
        } else {
            self.spill.push_back(data);
        }
    }

    /// Moves spilled input into `inbuf` for the packet being received: a
    /// whole buffer if `inbuf` is empty, else just the bytes that packet
    /// still needs. False if there is nothing to move.
    fn take_spill(&mut self) -> bool {
        let Some(front) = self.spill.front_mut() else {
            return false;
        };
        if self.inbuf.is_empty() {
            self.inbuf = std::mem::take(front);
        } else {
            let want = self.opener.wanted(self.inbuf.len()).clamp(1, front.len());
            self.inbuf.extend_from_slice(&front.split_to(want));
        }
        if front.is_empty() {
            self.spill.pop_front();
        }
        true
    }

    /// Ciphertext ready to write, if any.
    pub fn take_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// Whether ciphertext is waiting to be written.
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }

    /// Makes room in the outgoing buffer for `additional` more bytes at once.
    /// A buffer handed to `take_transmit` is shared, and bytes grows a shared
    /// buffer to exactly what a reservation asks, copying what it holds: a
    /// batch of large packets sealed one by one was copied again with each.
    pub fn reserve_out(&mut self, additional: usize) {
        self.out.reserve(additional);
    }

    /// Bytes buffered on the way out: ciphertext plus payloads queued behind a kex.
    pub fn buffered(&self) -> usize {
        self.out.len() + self.pending_bytes
    }

    /// The session identifier (H of the first key exchange).
    pub fn session_id(&self) -> Option<&[u8; 32]> {
        self.session_id.as_ref()
    }

    /// The server's host key, once verified (client) or our own (server).
    pub fn peer_host_key(&self) -> Option<&PublicKey> {
        self.peer_host_key.as_ref()
    }

    /// The algorithms of the last completed key exchange.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Completed key exchanges.
    pub fn kex_count(&self) -> u32 {
        self.kex_done
    }

    /// The peer's version line.
    pub fn peer_version(&self) -> Option<&[u8]> {
        self.peer_version.as_deref()
    }

    /// Signature algorithms the server announced in EXT_INFO.
    pub fn server_sig_algs(&self) -> Option<&[String]> {
        self.server_sig_algs.as_deref()
    }

    /// The crypto provider.
    pub fn provider(&self) -> &dyn CryptoProvider {
        &*self.provider
    }

    fn our_kex_in_flight(&self) -> bool {
        matches!(
            self.kex,
            KexState::SentInit { .. } | KexState::Exchange { .. }
        )
    }

    /// Sends a payload built by `build` now, bypassing the kex queue (for kex and
    /// transport messages, which may always be sent). Nothing follows a DISCONNECT.
    fn send_now(&mut self, build: impl FnOnce(&mut BytesMut)) {
        if self.disconnected {
            return;
        }
        let start = Sealer::begin(&mut self.out);
        build(&mut self.out);
        self.sealer.finish(&mut self.out, start, &mut *self.rng);
    }

    /// Sends a payload of the layers above: sealed now, or queued until our
    /// key exchange completes.
    pub fn send(&mut self, build: impl FnOnce(&mut BytesMut)) {
        if self.disconnected {
            return;
        }
        if self.our_kex_in_flight() {
            let mut payload = BytesMut::new();
            build(&mut payload);
            self.pending_bytes += payload.len();
            self.pending.push_back(payload.freeze());
            return;
        }
        self.send_now(build);
        if self.sealer.bytes >= self.rekey_bytes {
            self.start_rekey();
        }
    }

    /// Starts a key re-exchange, unless one is in flight or the first has not finished.
    pub fn start_rekey(&mut self) {
        if matches!(self.kex, KexState::Idle) && self.kex_done > 0 {
            self.send_kexinit();
        }
    }

    /// When the key re-exchange in flight must have finished (the first
    /// exchange is bounded by the handshake timeout instead).
    pub fn kex_deadline(&self) -> Option<Instant> {
        if self.kex_done == 0 || matches!(self.kex, KexState::Idle) {
            return None;
        }
        self.kex_started.map(|t| t + self.kex_timeout)
    }

    /// Notes `now` as the start of an exchange in flight not yet stamped.
    fn stamp(&mut self, now: Instant) {
        if matches!(self.kex, KexState::Idle) {
            self.kex_started = None;
        } else if self.kex_started.is_none() {
            self.kex_started = Some(now);
        }
    }

    /// The client is authenticated: a late EXT_INFO is out of place from now on.
    pub fn authenticated(&mut self) {
        self.ext_info_before_auth = false;
    }

    /// Fails when too much waits behind our unanswered KEXINIT.
    fn check_pending(&self) -> Result<()> {
        if self.pending_bytes > self.pending_limit || self.pending.len() > MAX_PENDING_PAYLOADS {
            return Err(Error::Limit(
                "too many messages queued behind our unanswered KEXINIT",
            ));
        }
        Ok(())
    }

    /// When the time-based rekey falls due.
    pub fn rekey_deadline(&self) -> Option<Instant> {
        (self.kex_done > 0 && matches!(self.kex, KexState::Idle))
            .then(|| self.last_kex + self.rekey_interval)
    }

    /// Rekeys if a limit has been reached; fails if the re-exchange in flight
    /// is overdue.
    pub fn check_rekey(&mut self, now: Instant) -> Result<()> {
        self.stamp(now);
        if self.kex_deadline().is_some_and(|d| now >= d) {
            return Err(Error::Timeout("a key re-exchange did not finish in time"));
        }
        let due = self.rekey_deadline().is_some_and(|d| now >= d)
            || self.sealer.bytes >= self.rekey_bytes
            || self.opener.bytes >= self.rekey_bytes;
        if due {
            self.start_rekey();
        }
        Ok(())
    }

    /// Sends SSH_MSG_DISCONNECT (allowed in any state).
    pub fn send_disconnect(&mut self, reason: DisconnectReason, description: &str) {
        self.send_now(|b| {
            b.put_u8(msg::DISCONNECT);
            b.put_u32(reason.code());
            b.put_string(description.as_bytes());
            b.put_string(b"");
        });
        self.disconnected = true;
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Answers a packet of a type we do not know.
    pub fn send_unimplemented(&mut self, seq: u32) {
        self.send_now(|b| {
            b.put_u8(msg::UNIMPLEMENTED);
            b.put_u32(seq);
        });
    }

    fn send_kexinit(&mut self) {
        let first = self.kex_done == 0;
        let ours = kex::encode_kexinit(&self.prefs, self.is_client(), first, &mut *self.rng);
        let payload = ours.clone();
        self.send_now(|b| b.put_slice(&payload));
        self.kex = KexState::SentInit { ours };
        self.kex_started = None;
    }

    /// Processes buffered input until a payload or event is ready for the layers
    /// above, or more input is needed.
    pub fn poll(&mut self, now: Instant) -> Result<Option<Incoming>> {
        self.stamp(now);
        if self.peer_version.is_none() && !self.read_version()? {
            return Ok(None);
        }
        loop {
            let Some(packet) = self.opener.next(&mut self.inbuf)? else {
                if self.take_spill() {
                    continue;
                }
                return Ok(None);
            };
            let incoming = self.handle_packet(packet, now)?;
            self.stamp(now);
            self.check_pending()?;
            if let Some(incoming) = incoming {
                if self.opener.bytes >= self.rekey_bytes {
                    self.start_rekey();
                }
                return Ok(Some(incoming));
            }
        }
    }

    fn in_peer_kex(&self) -> bool {
        matches!(
            self.kex,
            KexState::Exchange { .. } | KexState::AwaitNewKeys { .. }
        )
    }

    fn handle_packet(&mut self, packet: Packet, now: Instant) -> Result<Option<Incoming>> {
        let m = packet.payload[0];
        let initial = self.kex_done == 0;
        let ext_info_allowed = std::mem::take(&mut self.ext_info_next) || self.ext_info_before_auth;
        match m {
            msg::DISCONNECT => {
                let mut r = Reader::new(&packet.payload[1..], "DISCONNECT");
                let reason = DisconnectReason::from_code(r.u32()?);
                let description = String::from_utf8_lossy(r.string()?).into_owned();
                Err(Error::PeerDisconnected {
                    reason,
                    description,
                })
            }
            msg::IGNORE | msg::DEBUG | msg::UNIMPLEMENTED => {
                if initial && self.strict {
                    return Err(Error::StrictKex(
                        "a message other than key exchange during the initial key exchange",
                    ));
                }
                Ok(None)
            }
            msg::KEXINIT => self.on_kexinit(packet),
            msg::NEWKEYS => self.on_newkeys(now),
            msg::KEX_INIT | msg::KEX_REPLY => self.on_kex_method(packet),
            _ if initial => Err(Error::Unexpected {
                msg: m,
                state: "in the initial key exchange",
            }),
            _ if self.in_peer_kex() => Err(Error::Unexpected {
                msg: m,
                state: "in a key exchange",
            }),
            msg::EXT_INFO if !ext_info_allowed => Err(Error::Unexpected {
                msg: m,
                state: "not right after the first NEWKEYS (EXT_INFO out of place)",
            }),
            msg::EXT_INFO => self.on_ext_info(&packet.payload).map(|()| None),
            22..=49 => Err(Error::Unexpected {
                msg: m,
                state: "outside a key exchange",
            }),
            _ => Ok(Some(Incoming::Payload(packet))),
        }
    }

    fn on_ext_info(&mut self, payload: &[u8]) -> Result<()> {
        let mut r = Reader::new(&payload[1..], "EXT_INFO");
        let count = r.u32()?;
        for _ in 0..count.min(64) {
            let name = r.utf8()?;
            let value = r.string()?;
            if name == "server-sig-algs" && self.is_client() {
                let list = core::str::from_utf8(value).map_err(|_| Error::Malformed {
                    msg: "EXT_INFO",
                    what: "server-sig-algs is not ASCII",
                })?;
                self.server_sig_algs = Some(list.split(',').map(str::to_owned).collect());
            }
        }
        Ok(())
    }
}
