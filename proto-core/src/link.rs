//! Link sync (docs/PROTOCOL.md section 2): aligns a serial byte stream that may
//! carry noise and stale bytes so that SSH starts on a clean boundary.
//!
//! The appliance ([`Initiator`]) sends HELLO with a fresh nonce and retries
//! (100 ms, doubling to 1 s); the guest ([`Responder`]) answers the latest HELLO
//! with HELLO-ACK; the appliance confirms with READY, and SSH starts right after
//! READY both ways. Frames carry a CRC-32C and fresh nonces, so noise and stale
//! frames from an earlier connection never complete a sync. Each side scans for
//! frames with a fixed 25-byte window: memory stays bounded whatever arrives.
//!
//! A guest that cannot run at all (a bad configuration) says why in a FATAL
//! frame ([`fatal_frame`], [`Initiator::fatal`]) instead of answering.

use std::time::{Duration, Instant};

use rand_core::RngCore;

mod fatal;
pub use fatal::{MAX_FATAL_REASON, fatal_frame};

/// Bytes in a frame.
pub const FRAME_LEN: usize = 25;
/// `SYN` then "TS".
const MAGIC: [u8; 3] = [0x16, 0x54, 0x53];
const VERSION: u8 = 1;
/// First retry of an unanswered HELLO, doubling up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest wait between HELLOs.
pub const MAX_RETRY: Duration = Duration::from_secs(1);

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Appliance: start a sync.
    Hello = 1,
    /// Guest: ready, echoing the HELLO's nonce.
    HelloAck = 2,
    /// Appliance: SSH starts right after this frame.
    Ready = 3,
    /// Guest: please send HELLO now.
    Announce = 4,
    /// Guest: cannot run; a reason follows (nonce_a: its length, nonce_b: its CRC-32C).
    Fatal = 5,
}

/// One link-sync frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub nonce_a: u64,
    pub nonce_b: u64,
}

impl Frame {
    /// The 25 wire bytes: magic (3), version, kind, two nonces (8 each), and a
    /// CRC-32C of the 21 bytes before it.
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut f = [0u8; FRAME_LEN];
        f[..3].copy_from_slice(&MAGIC);
        f[3] = VERSION;
        f[4] = self.kind as u8;
        f[5..13].copy_from_slice(&self.nonce_a.to_be_bytes());
        f[13..21].copy_from_slice(&self.nonce_b.to_be_bytes());
        let crc = crc32c::crc32c(&f[..21]);
        f[21..].copy_from_slice(&crc.to_be_bytes());
        f
    }

    /// A frame if `bytes` is one: magic, version, known kind and a matching CRC.
    pub fn decode(bytes: &[u8; FRAME_LEN]) -> Option<Frame> {
        if bytes[..3] != MAGIC || bytes[3] != VERSION {
            return None;
        }
        if crc32c::crc32c(&bytes[..21]).to_be_bytes() != bytes[21..] {
            return None;
        }
        let kind = match bytes[4] {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloAck,
            3 => FrameKind::Ready,
            4 => FrameKind::Announce,
            5 => FrameKind::Fatal,
            _ => return None,
        };
        let nonce = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let frame = Frame {
            kind,
            nonce_a: nonce(5),
            nonce_b: nonce(13),
        };
        if kind == FrameKind::Fatal && fatal::payload_len(&frame).is_none() {
            return None;
        }
        Some(frame)
    }
}

/// What the scanner found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Frame(Frame),
    /// A FATAL frame with its reason.
    Fatal(String),
}

/// Finds frames in a stream of anything, holding at most one frame's worth
/// (plus a FATAL reason being collected, and the bytes of a rejected one).
#[derive(Debug, Default)]
struct Scanner {
    window: Vec<u8>,
    /// A FATAL header was seen: its reason's bytes are being collected.
    payload: Option<fatal::Payload>,
    /// The bytes of a FATAL reason that failed its CRC, to be scanned again
    /// as ordinary input (a truncated FATAL must not hide the frames after it).
    replay: std::collections::VecDeque<u8>,
}

impl Scanner {
    /// Consumes `data` up to and including the first valid frame. Returns the
    /// bytes of `data` consumed and what was found, if something ended there.
    fn scan(&mut self, data: &[u8]) -> (usize, Option<Found>) {
        let mut used = 0;
        loop {
            let byte = match self.replay.pop_front() {
                Some(b) => b,
                None if used < data.len() => {
                    used += 1;
                    data[used - 1]
                }
                None => return (used, None),
            };
            if let Some(found) = self.push(byte) {
                return (used, Some(found));
            }
        }
    }

    fn push(&mut self, byte: u8) -> Option<Found> {
        if let Some(payload) = &mut self.payload {
            if !payload.push(byte) {
                return None;
            }
            let payload = self.payload.take().expect("collecting");
            return match payload.finish() {
                Ok(reason) => Some(Found::Fatal(reason)),
                Err(bytes) => {
                    self.replay.extend(bytes);
                    None
                }
            };
        }
        self.window.push(byte);
        self.realign();
        if self.window.len() == FRAME_LEN {
            let bytes: &[u8; FRAME_LEN] = self.window[..].try_into().expect("full window");
            if let Some(frame) = Frame::decode(bytes) {
                self.window.clear();
                if frame.kind == FrameKind::Fatal {
                    self.payload = fatal::Payload::expect(&frame);
                    return None;
                }
                return Some(Found::Frame(frame));
            }
            self.window.remove(0);
            self.realign();
        }
        None
    }

    /// Drops leading bytes until the window could be the start of a frame.
    fn realign(&mut self) {
        while !self.window.is_empty() {
            let n = self.window.len().min(MAGIC.len());
            if self.window[..n] == MAGIC[..n] {
                return;
            }
            self.window.remove(0);
        }
    }
}

fn fresh_nonce(rng: &mut dyn RngCore) -> u64 {
    loop {
        let n = rng.next_u64();
        if n != 0 {
            return n;
        }
    }
}

/// The appliance's side: sends HELLO until a matching HELLO-ACK, then READY.
pub struct Initiator {
    scanner: Scanner,
    rng: Box<dyn RngCore + Send>,
    nonce: u64,
    out: Vec<u8>,
    retry_at: Instant,
    backoff: Duration,
    ready: bool,
    hellos: u32,
    fatal: Option<String>,
}

impl Initiator {
    /// Starts a sync: the first HELLO is queued at once.
    pub fn new(now: Instant, rng: Box<dyn RngCore + Send>) -> Self {
        let mut s = Self {
            scanner: Scanner::default(),
            rng,
            nonce: 0,
            out: Vec::new(),
            retry_at: now,
            backoff: FIRST_RETRY,
            ready: false,
            hellos: 0,
            fatal: None,
        };
        s.send_hello(now);
        s
    }

    fn send_hello(&mut self, now: Instant) {
        self.nonce = fresh_nonce(&mut *self.rng);
        // A HELLO not yet written is stale now: only the newest is sent, so a
        // flood of ANNOUNCEs cannot make the queue grow.
        self.out.clear();
        self.out.extend_from_slice(
            &Frame {
                kind: FrameKind::Hello,
                nonce_a: self.nonce,
                nonce_b: 0,
            }
            .encode(),
        );
        self.hellos += 1;
        self.retry_at = now + self.backoff;
    }

    /// Feeds received bytes. Returns how many were consumed: once the sync
    /// completes, the rest of `data` is the guest's first SSH bytes.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> usize {
        let mut used = 0;
        while !self.ready && self.fatal.is_none() && used < data.len() {
            let (n, found) = self.scanner.scan(&data[used..]);
            used += n;
            let frame = match found {
                Some(Found::Frame(frame)) => Some(frame),
                Some(Found::Fatal(reason)) => {
                    self.fatal = Some(reason);
                    None
                }
                None => None,
            };
            match frame {
                Some(Frame {
                    kind: FrameKind::HelloAck,
                    nonce_a,
                    nonce_b,
                }) if nonce_a == self.nonce => {
                    let ready = Frame {
                        kind: FrameKind::Ready,
                        nonce_a,
                        nonce_b,
                    };
                    self.out.extend_from_slice(&ready.encode());
                    self.ready = true;
                }
                Some(Frame {
                    kind: FrameKind::Announce,
                    ..
                }) => {
                    self.backoff = FIRST_RETRY;
                    self.send_hello(now);
                }
                _ => {} // noise, stale acks, our own frames echoed back
            }
        }
        used
    }

    /// Bytes to write.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// When to retry the HELLO (never once the guest reported a fatal error).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.ready && self.fatal.is_none()).then_some(self.retry_at)
    }

    /// Retries the HELLO if it is due, with a fresh nonce and a longer wait.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.ready && self.fatal.is_none() && now >= self.retry_at {
            self.backoff = (self.backoff * 2).min(MAX_RETRY);
            self.send_hello(now);
        }
    }

    /// Whether SSH may start.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// HELLOs sent so far.
    pub fn hellos_sent(&self) -> u32 {
        self.hellos
    }

    /// The reason the guest gave in a FATAL frame: it will not sync, ever
    /// (it is powering off). Input after it is not consumed.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }
}

/// The guest's side: answers the latest HELLO and waits for its READY.
pub struct Responder {
    scanner: Scanner,
    rng: Box<dyn RngCore + Send>,
    awaiting: Option<(u64, u64)>,
    /// An ANNOUNCE not yet written.
    announce: Option<[u8; FRAME_LEN]>,
    /// The answer to the latest HELLO, not yet written (older ones are
    /// stale: a flood of HELLOs cannot make the queue grow).
    ack: Option<[u8; FRAME_LEN]>,
    /// A FATAL frame not yet written.
    fatal: Option<Vec<u8>>,
    synced: bool,
}

impl Responder {
    /// A responder waiting for HELLO.
    pub fn new(rng: Box<dyn RngCore + Send>) -> Self {
        Self {
            scanner: Scanner::default(),
            rng,
            awaiting: None,
            announce: None,
            ack: None,
            fatal: None,
            synced: false,
        }
    }

    /// Asks the appliance to send HELLO now (after a fork or a link reset).
    pub fn announce(&mut self) {
        let nonce_b = fresh_nonce(&mut *self.rng);
        let frame = Frame {
            kind: FrameKind::Announce,
            nonce_a: 0,
            nonce_b,
        };
        self.announce = Some(frame.encode());
    }

    /// Feeds received bytes. Returns how many were consumed: once synced, the
    /// rest of `data` is the appliance's first SSH bytes.
    pub fn handle_input(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        while !self.synced && used < data.len() {
            let (n, found) = self.scanner.scan(&data[used..]);
            used += n;
            let frame = match found {
                Some(Found::Frame(frame)) => Some(frame),
                _ => None, // a FATAL from the appliance means nothing here
            };
            match frame {
                Some(Frame {
                    kind: FrameKind::Hello,
                    nonce_a,
                    ..
                }) => {
                    let nonce_b = fresh_nonce(&mut *self.rng);
                    self.awaiting = Some((nonce_a, nonce_b));
                    let ack = Frame {
                        kind: FrameKind::HelloAck,
                        nonce_a,
                        nonce_b,
                    };
                    self.ack = Some(ack.encode());
                }
                Some(Frame {
                    kind: FrameKind::Ready,
                    nonce_a,
                    nonce_b,
                }) if self.awaiting == Some((nonce_a, nonce_b)) => {
                    self.synced = true;
                }
                _ => {}
            }
        }
        used
    }

    /// Tells the appliance this guest cannot run, and why (see [`fatal_frame`]).
    pub fn report_fatal(&mut self, reason: &str) {
        self.fatal = Some(fatal_frame(reason));
    }

    /// Bytes to write.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let mut out: Vec<u8> = [self.announce.take(), self.ack.take()]
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        out.extend(self.fatal.take().into_iter().flatten());
        (!out.is_empty()).then_some(out)
    }

    /// Whether SSH may start.
    pub fn is_synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    fn rng(seed: u64) -> Box<dyn RngCore + Send> {
        Box::new(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Runs a sync over a lossless stream with noise injected by `noise`.
    /// Returns what each side passed on as SSH bytes.
    fn run(
        mut noise_to_guest: Vec<u8>,
        mut noise_to_appliance: Vec<u8>,
        chunk: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let start = Instant::now();
        let mut now = start;
        let mut app = Initiator::new(now, rng(1));
        let mut guest = Responder::new(rng(2));
        let (mut to_guest, mut to_app) = (
            std::mem::take(&mut noise_to_guest),
            std::mem::take(&mut noise_to_appliance),
        );
        let (mut app_ssh, mut guest_ssh) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            if let Some(b) = app.poll_transmit() {
                to_guest.extend(b);
                if app.is_ready() {
                    to_guest.extend_from_slice(b"SSH-2.0-tetherd\r\n");
                }
            }
            if let Some(b) = guest.poll_transmit() {
                to_app.extend(b);
            }
            for c in std::mem::take(&mut to_guest).chunks(chunk) {
                if guest.is_synced() {
                    guest_ssh.extend_from_slice(c);
                    continue;
                }
                let n = guest.handle_input(c);
                if guest.is_synced() {
                    guest_ssh.extend_from_slice(&c[n..]);
                    to_app.extend_from_slice(b"SSH-2.0-tether\r\n");
                }
            }
            for c in std::mem::take(&mut to_app).chunks(chunk) {
                if app.is_ready() {
                    app_ssh.extend_from_slice(c);
                    continue;
                }
                let n = app.handle_input(now, c);
                if app.is_ready() {
                    app_ssh.extend_from_slice(&c[n..]);
                }
            }
            if app.is_ready()
                && guest.is_synced()
                && app.poll_transmit().is_none()
                && guest.poll_transmit().is_none()
            {
                break;
            }
            now += Duration::from_millis(50);
            app.handle_timeout(now);
        }
        assert!(app.is_ready() && guest.is_synced());
        (app_ssh, guest_ssh)
    }

    #[test]
    fn frames_round_trip_and_a_bad_crc_is_noise() {
        let f = Frame {
            kind: FrameKind::HelloAck,
            nonce_a: 7,
            nonce_b: u64::MAX,
        };
        let mut b = f.encode();
        assert_eq!(&b[..5], &[0x16, 0x54, 0x53, 1, 2]);
        assert_eq!(Frame::decode(&b), Some(f));
        b[10] ^= 1;
        assert_eq!(Frame::decode(&b), None);
    }

    #[test]
    fn sync_completes_and_ssh_starts_right_after_ready() {
        for chunk in [1, 3, 24, 1000] {
            let (app, guest) = run(Vec::new(), Vec::new(), chunk);
            assert_eq!(guest, b"SSH-2.0-tetherd\r\n");
            assert_eq!(app, b"SSH-2.0-tether\r\n");
        }
    }

    #[test]
    fn noise_firmware_text_and_stale_frames_are_skipped() {
        let mut noise = b"Booting from ROM...\x1bc\x1b[?7l\x1b[2J".to_vec();
        // Stale frames of an earlier connection, one with a broken CRC, and a
        // partial frame cut off by the reconnect.
        noise.extend(
            Frame {
                kind: FrameKind::HelloAck,
                nonce_a: 99,
                nonce_b: 5,
            }
            .encode(),
        );
        let mut bad = Frame {
            kind: FrameKind::Ready,
            nonce_a: 1,
            nonce_b: 2,
        }
        .encode();
        bad[22] ^= 0x80;
        noise.extend(bad);
        noise.extend(
            &Frame {
                kind: FrameKind::Hello,
                nonce_a: 3,
                nonce_b: 0,
            }
            .encode()[..11],
        );
        noise.extend([0x16, 0x16, 0x54, 0x00, 0xff]);
        for chunk in [1, 5, 4096] {
            let (app, guest) = run(noise.clone(), noise.clone(), chunk);
            assert_eq!(guest, b"SSH-2.0-tetherd\r\n");
            assert_eq!(app, b"SSH-2.0-tether\r\n");
        }
    }

    #[test]
    fn an_unanswered_hello_is_retried_with_backoff_and_fresh_nonces() {
        let t0 = Instant::now();
        let mut app = Initiator::new(t0, rng(1));
        let first = app.poll_transmit().unwrap();
        let mut waits = Vec::new();
        let mut now = t0;
        let mut nonces = vec![
            Frame::decode(first[..].try_into().unwrap())
                .unwrap()
                .nonce_a,
        ];
        for _ in 0..6 {
            let at = app.poll_timeout().unwrap();
            waits.push(at - now);
            now = at;
            app.handle_timeout(now);
            let hello = app.poll_transmit().unwrap();
            nonces.push(
                Frame::decode(hello[..].try_into().unwrap())
                    .unwrap()
                    .nonce_a,
            );
        }
        let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        nonces.sort();
        nonces.dedup();
        assert_eq!(nonces.len(), 7);
    }

    #[test]
    fn only_the_latest_hello_is_accepted() {
        let t0 = Instant::now();
        let mut app = Initiator::new(t0, rng(1));
        let h1 = Frame::decode(app.poll_transmit().unwrap()[..].try_into().unwrap()).unwrap();
        app.handle_timeout(t0 + FIRST_RETRY);
        let _h2 = app.poll_transmit().unwrap();
        let stale = Frame {
            kind: FrameKind::HelloAck,
            nonce_a: h1.nonce_a,
            nonce_b: 1,
        }
        .encode();
        assert_eq!(app.handle_input(t0, &stale), FRAME_LEN);
        assert!(!app.is_ready());
    }

    #[test]
    fn a_stale_ready_does_not_sync_the_guest() {
        let mut guest = Responder::new(rng(3));
        guest.handle_input(
            &Frame {
                kind: FrameKind::Hello,
                nonce_a: 5,
                nonce_b: 0,
            }
            .encode(),
        );
        let ack = Frame::decode(guest.poll_transmit().unwrap()[..].try_into().unwrap()).unwrap();
        guest.handle_input(
            &Frame {
                kind: FrameKind::Ready,
                nonce_a: 5,
                nonce_b: ack.nonce_b ^ 1,
            }
            .encode(),
        );
        assert!(!guest.is_synced());
        guest.handle_input(
            &Frame {
                kind: FrameKind::Ready,
                nonce_a: 5,
                nonce_b: ack.nonce_b,
            }
            .encode(),
        );
        assert!(guest.is_synced());
    }

    #[test]
    fn announce_makes_the_appliance_send_hello_at_once() {
        let t0 = Instant::now();
        let mut app = Initiator::new(t0, rng(1));
        app.poll_transmit();
        let mut guest = Responder::new(rng(2));
        guest.announce();
        app.handle_input(t0, &guest.poll_transmit().unwrap());
        assert!(app.poll_transmit().is_some());
        assert_eq!(app.hellos_sent(), 2);
    }

    #[test]
    fn a_flood_of_frames_queues_only_the_latest_answer() {
        // Ten thousand stale HELLOs in one read: the guest answers only the last.
        let mut guest = Responder::new(rng(2));
        guest.announce();
        let hellos: Vec<u8> = (1..=10_000u64)
            .flat_map(|n| {
                Frame {
                    kind: FrameKind::Hello,
                    nonce_a: n,
                    nonce_b: 0,
                }
                .encode()
            })
            .collect();
        assert_eq!(guest.handle_input(&hellos), hellos.len());
        let out = guest.poll_transmit().unwrap();
        assert_eq!(out.len(), 2 * FRAME_LEN, "the ANNOUNCE and one HELLO-ACK");
        let ack = Frame::decode(out[FRAME_LEN..].try_into().unwrap()).unwrap();
        assert_eq!((ack.kind, ack.nonce_a), (FrameKind::HelloAck, 10_000));
        // Ten thousand ANNOUNCEs: the appliance sends one fresh HELLO.
        let t0 = Instant::now();
        let mut app = Initiator::new(t0, rng(1));
        let announces: Vec<u8> = (1..=10_000u64)
            .flat_map(|n| {
                Frame {
                    kind: FrameKind::Announce,
                    nonce_a: 0,
                    nonce_b: n,
                }
                .encode()
            })
            .collect();
        assert_eq!(app.handle_input(t0, &announces), announces.len());
        assert_eq!(app.poll_transmit().unwrap().len(), FRAME_LEN);
    }
}
