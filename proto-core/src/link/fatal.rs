//! The FATAL frame (docs/PROTOCOL.md section 2): how a guest that cannot run
//! says why before any SSH exists. A FATAL frame is an ordinary 25-byte frame
//! of kind 5 whose nonces carry the reason's length and CRC-32C, followed by
//! the reason: an appliance that predates it skips the unknown kind as noise,
//! and the reason's own bytes can never look like a frame (no control bytes).

use super::{Frame, FrameKind};

/// Longest reason, in bytes of UTF-8.
pub const MAX_FATAL_REASON: usize = 1024;

/// The bytes a guest sends to say it cannot run: a FATAL header and `reason`,
/// with control characters replaced by spaces and cut to
/// [`MAX_FATAL_REASON`] bytes on a character boundary.
pub fn fatal_frame(reason: &str) -> Vec<u8> {
    let mut text: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().is_empty() {
        text = "unknown".into();
    }
    let mut end = text.len().min(MAX_FATAL_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    let header = Frame {
        kind: FrameKind::Fatal,
        nonce_a: text.len() as u64,
        nonce_b: u64::from(crc32c::crc32c(text.as_bytes())),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// The reason length a FATAL header announces, if the header is well formed.
pub(super) fn payload_len(frame: &Frame) -> Option<usize> {
    let len = usize::try_from(frame.nonce_a).ok()?;
    ((1..=MAX_FATAL_REASON).contains(&len) && frame.nonce_b <= u64::from(u32::MAX)).then_some(len)
}

/// A FATAL reason being collected after its header.
#[derive(Debug)]
pub(super) struct Payload {
    len: usize,
    crc: u32,
    bytes: Vec<u8>,
}

impl Payload {
    /// Starts collecting the reason a valid FATAL header announces.
    pub(super) fn expect(header: &Frame) -> Option<Self> {
        Some(Self {
            len: payload_len(header)?,
            crc: u32::try_from(header.nonce_b).ok()?,
            bytes: Vec::new(),
        })
    }

    /// Adds a byte; true once the reason is complete.
    pub(super) fn push(&mut self, byte: u8) -> bool {
        self.bytes.push(byte);
        self.bytes.len() >= self.len
    }

    /// The reason, or the bytes back when the CRC or the UTF-8 is wrong (they
    /// were not a reason, and may hold frames).
    pub(super) fn finish(self) -> Result<String, Vec<u8>> {
        if crc32c::crc32c(&self.bytes) != self.crc {
            return Err(self.bytes);
        }
        String::from_utf8(self.bytes).map_err(|e| e.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    fn appliance() -> Initiator {
        let mut app = Initiator::new(Instant::now(), Box::new(ChaCha8Rng::seed_from_u64(1)));
        app.poll_transmit();
        app
    }

    fn hello_ack_for(app: &mut Initiator) -> Vec<u8> {
        app.handle_timeout(Instant::now() + MAX_RETRY * 2);
        let hello = Frame::decode(app.poll_transmit().unwrap()[..].try_into().unwrap()).unwrap();
        Frame {
            kind: FrameKind::HelloAck,
            nonce_a: hello.nonce_a,
            nonce_b: 9,
        }
        .encode()
        .to_vec()
    }

    #[test]
    fn a_fatal_frame_is_a_kind_5_header_then_the_reason() {
        let bytes = fatal_frame("config sessions: required");
        assert_eq!(&bytes[..5], &[0x16, 0x54, 0x53, 1, 5]);
        let header = Frame::decode(bytes[..FRAME_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.kind, FrameKind::Fatal);
        assert_eq!(header.nonce_a, 25);
        assert_eq!(
            header.nonce_b,
            u64::from(crc32c::crc32c(b"config sessions: required"))
        );
        assert_eq!(&bytes[FRAME_LEN..], b"config sessions: required");
    }

    #[test]
    fn the_appliance_surfaces_the_reason_whatever_the_chunking_and_noise() {
        let mut stream = b"Booting from ROM...\x1bc\x16\x54".to_vec();
        stream.extend(fatal_frame("tether: config link: unknown scheme"));
        stream.extend(b"trailing noise");
        for chunk in [1, 7, 25, 26, 4096] {
            let mut app = appliance();
            for c in stream.chunks(chunk) {
                app.handle_input(Instant::now(), c);
            }
            assert_eq!(app.fatal(), Some("tether: config link: unknown scheme"));
            assert!(!app.is_ready());
            assert_eq!(app.poll_timeout(), None, "no more HELLOs to a dying guest");
        }
    }

    #[test]
    fn reasons_are_bounded_and_cleaned_of_control_bytes() {
        let long = "é".repeat(1000);
        let bytes = fatal_frame(&long);
        assert!(bytes.len() - FRAME_LEN <= MAX_FATAL_REASON);
        let mut app = appliance();
        app.handle_input(Instant::now(), &bytes);
        assert_eq!(app.fatal().unwrap(), "é".repeat(512));

        let mut app = appliance();
        app.handle_input(Instant::now(), &fatal_frame("line one\nline\x16two\x00"));
        assert_eq!(app.fatal(), Some("line one line two "));
        assert!(!fatal_frame("x\u{16}TS")[FRAME_LEN..].contains(&0x16));
    }

    #[test]
    fn a_truncated_fatal_is_ignored_and_hides_no_frame_after_it() {
        let mut app = appliance();
        let ack = hello_ack_for(&mut app);
        let mut stream = fatal_frame("cut off by a reconnect")[..FRAME_LEN + 5].to_vec();
        stream.extend(&ack);
        for _ in 0..MAX_FATAL_REASON / 10 {
            stream.extend(b"0123456789"); // pads past the announced length
        }
        app.handle_input(Instant::now(), &stream);
        assert!(
            app.is_ready(),
            "the HELLO-ACK inside the would-be reason counted"
        );
        assert_eq!(app.fatal(), None);
    }

    #[test]
    fn a_corrupt_reason_is_ignored() {
        let mut bytes = fatal_frame("config: bad");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let mut app = appliance();
        app.handle_input(Instant::now(), &bytes);
        assert_eq!(app.fatal(), None);
        // Still listening: the next good frame is seen.
        let ack = hello_ack_for(&mut app);
        app.handle_input(Instant::now(), &ack);
        assert!(app.is_ready());
    }

    #[test]
    fn a_header_announcing_an_oversized_reason_is_noise() {
        for (len, crc) in [(0, 0), (MAX_FATAL_REASON as u64 + 1, 0), (5, 1 << 32)] {
            let header = Frame {
                kind: FrameKind::Fatal,
                nonce_a: len,
                nonce_b: crc,
            };
            assert_eq!(Frame::decode(&header.encode()), None);
        }
    }

    #[test]
    fn an_older_appliance_skips_the_fatal_as_noise_and_still_syncs() {
        // What a decoder without kind 5 sees: a frame it rejects, then text
        // with no magic in it; the sync after it completes.
        let bytes = fatal_frame("old appliance");
        let mut old_view = bytes.clone();
        old_view[4] = 0x7f; // an unknown kind, as kind 5 is to an old decoder
        assert_eq!(
            Frame::decode(old_view[..FRAME_LEN].try_into().unwrap()),
            None
        );
        assert!(!bytes[FRAME_LEN..].contains(&0x16));
        let mut app = appliance();
        let ack = hello_ack_for(&mut app);
        let mut stream = old_view;
        stream.extend(ack);
        app.handle_input(Instant::now(), &stream);
        assert!(app.is_ready());
    }

    #[test]
    fn a_guest_responder_queues_a_fatal_and_ignores_one_it_receives() {
        let mut guest = Responder::new(Box::new(ChaCha8Rng::seed_from_u64(2)));
        guest.report_fatal("no config");
        let out = guest.poll_transmit().unwrap();
        let mut app = appliance();
        app.handle_input(Instant::now(), &out);
        assert_eq!(app.fatal(), Some("no config"));
        assert_eq!(guest.handle_input(&out), out.len());
        assert!(!guest.is_synced());
    }
}
