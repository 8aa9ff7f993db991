//! Fuzzing harnesses, built under `cfg(fuzzing)` (cargo fuzz sets it) and in unit
//! tests, so the targets in `fuzz/` stay one line each and a broken harness fails
//! `cargo test` rather than silently fuzzing shallow states.
//!
//! Every harness takes the fuzzer's bytes and must never panic on them; a panic
//! here is a bug in the crate (or a broken assertion of a property it promises:
//! sealed packets open to what was sealed, decoders round-trip, and a byte stream
//! gives the same output however it is split).

use bytes::{BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use crate::DisconnectReason;
use crate::crypto::null::NullProvider;
use crate::crypto::{AwsLcProvider, CipherAlg, CryptoProvider};
use crate::kex::{KexInit, Preferences, encode_kexinit, negotiate};
use crate::keys::{PrivateKey, PublicKey, parse_authorized_keys};
use crate::packet::{Opener, Sealer};
use crate::request::ChannelRequest;
use crate::wire::{Reader, msg};

pub mod links;
mod messages;
mod stream;
mod tether;

pub use links::tether_links;
pub use stream::{client_stream, server_stream};
pub use tether::tether_layer;

/// The fuzzer's bytes as a source of choices; reads past the end yield zeros.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    /// `n` bytes: the input's, then a filler pattern once it runs out.
    pub fn filled(&mut self, n: usize) -> Vec<u8> {
        let mut v = self.bytes(n).to_vec();
        v.resize(n, b'x');
        v
    }
}

/// A seedable RNG with no dependencies (SplitMix64): padding, cookies and kex
/// values stay reproducible for a given input.
pub struct FuzzRng(u64);

impl FuzzRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
}

impl RngCore for FuzzRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

// ---------------------------------------------------------------- packets

/// `packet::Opener::next` on a byte stream split at fuzzer-chosen points, under
/// the plain, null or a real cipher (fixed keys). With the high bit of the first
/// byte set, fuzzer-chosen payloads are sealed first, optionally one byte is
/// flipped, and what opens must be exactly what was sealed (under an AEAD, a
/// corrupted packet must never open).
pub fn packet_decoder(data: &[u8]) {
    let mut input = Input::new(data);
    let sel = input.u8();
    let alg = match sel % 5 {
        0 | 1 => None,
        n => Some(CipherAlg::ALL[n as usize - 2]),
    };
    let null = sel % 5 == 1;
    let mut opener = Opener::default();
    let mut sealer = Sealer::default();
    if let Some(alg) = alg {
        let (key, iv) = (vec![7u8; alg.key_len()], vec![9u8; alg.iv_len()]);
        opener.rekey(AwsLcProvider.opener(alg, &key, &iv));
        sealer.rekey(AwsLcProvider.sealer(alg, &key, &iv));
    } else if null {
        opener.rekey(NullProvider.opener(CipherAlg::Aes256Gcm, &[], &[]));
        sealer.rekey(NullProvider.sealer(CipherAlg::Aes256Gcm, &[], &[]));
    }
    let mut wire = BytesMut::new();
    let mut sealed = Vec::new();
    let mut corrupted = false;
    if sel & 0x80 != 0 {
        let mut rng = FuzzRng::new(sel as u64);
        for _ in 0..input.u8() % 8 {
            let len = input.u16() as usize % 40_000 + 1;
            let payload = input.filled(len);
            let start = Sealer::begin(&mut wire);
            wire.put_slice(&payload);
            sealer.finish(&mut wire, start, &mut rng);
            sealed.push(payload);
        }
        let (at, flip) = (input.u16() as usize, input.u8());
        if flip != 0 && !wire.is_empty() {
            let at = at % wire.len();
            wire[at] ^= flip;
            corrupted = true;
        }
    } else {
        wire.put_slice(input.bytes(usize::MAX));
    }
    let mut wire = wire.freeze();
    let mut buf = BytesMut::new();
    let mut opened: Vec<Bytes> = Vec::new();
    while !wire.is_empty() {
        // Split points come from the stream's own bytes in the raw mode, from a
        // fixed stride in the sealed mode (its input is used up by then).
        let n = if sel & 0x80 != 0 {
            (sel as usize & 0x7f) * 37 + 1
        } else {
            wire[0] as usize + 1
        };
        buf.extend_from_slice(&wire.split_to(n.min(wire.len())));
        let mut failed = false;
        loop {
            match opener.next(&mut buf) {
                Ok(Some(p)) => {
                    assert!(!p.payload.is_empty(), "an opened packet has a payload");
                    assert_eq!(p.seq as usize, opened.len());
                    opened.push(p.payload);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            break;
        }
    }
    if sel & 0x80 != 0 {
        if !corrupted {
            assert_eq!(opened.len(), sealed.len(), "every sealed packet opens");
        }
        if !corrupted || alg.is_some() {
            for (got, want) in opened.iter().zip(&sealed) {
                assert_eq!(&got[..], &want[..], "a packet opens to what was sealed");
            }
        }
    }
}

// ---------------------------------------------------------------- decoders

const REQUEST_NAMES: [&str; 12] = [
    "pty-req",
    "env",
    "shell",
    "exec",
    "subsystem",
    "window-change",
    "signal",
    "exit-status",
    "exit-signal",
    "keepalive@openssh.com",
    "start@tether",
    "",
];

/// Every standalone decoder, chosen by the first byte, with round-trip checks
/// where the crate also encodes.
pub fn message_decoders(data: &[u8]) {
    let mut input = Input::new(data);
    let sel = input.u8();
    match sel % 10 {
        0 => {
            let _ = KexInit::decode(input.bytes(usize::MAX));
        }
        1 => {
            let n = input.u16() as usize;
            let (a, b) = (input.bytes(n), input.bytes(usize::MAX));
            if let (Ok(c), Ok(s)) = (KexInit::decode(a), KexInit::decode(b)) {
                let _ = negotiate(&c, &s, sel & 0x80 != 0);
            }
            // Against a real KEXINIT of ours, on both sides.
            let ours = encode_kexinit(&Preferences::default(), true, true, &mut FuzzRng::new(0));
            if let Ok(peer) = KexInit::decode(b) {
                let ours = KexInit::decode(&ours).expect("our KEXINIT decodes");
                let _ = negotiate(&ours, &peer, true);
                let _ = negotiate(&peer, &ours, false);
            }
        }
        2 => {
            let name = REQUEST_NAMES[input.u8() as usize % REQUEST_NAMES.len()];
            let payload = Bytes::copy_from_slice(input.bytes(usize::MAX));
            let mut r = Reader::from_bytes(&payload, "CHANNEL_REQUEST");
            if let Ok(req) = ChannelRequest::decode(name, &mut r) {
                let mut enc = Vec::new();
                req.encode_data(&mut enc);
                let back = ChannelRequest::decode(name, &mut Reader::new(&enc, "re-encoded"))
                    .expect("an encoded request decodes");
                assert_eq!(back, req, "channel request round trip");
            }
        }
        3 => {
            if let Ok(key) = PublicKey::from_blob(input.bytes(usize::MAX)) {
                assert_eq!(PublicKey::from_blob(&key.blob()), Ok(key));
            }
        }
        4 => {
            let text = String::from_utf8_lossy(input.bytes(usize::MAX));
            if let Ok(key) = PublicKey::from_openssh(&text) {
                assert_eq!(PublicKey::from_openssh(&key.to_openssh()), Ok(key));
                let _ = key.fingerprint();
            }
        }
        5 => {
            let text = String::from_utf8_lossy(input.bytes(usize::MAX));
            if let Ok(key) = PrivateKey::from_openssh(&text) {
                let again = PrivateKey::from_openssh(&key.to_openssh("fuzz"))
                    .expect("a written key parses");
                assert_eq!(again.seed(), key.seed());
            }
        }
        6 => {
            let text = String::from_utf8_lossy(input.bytes(usize::MAX));
            let _ = parse_authorized_keys(&text);
        }
        7 => {
            let ops = input.u8() as usize % 32;
            let ops = input.bytes(ops).to_vec();
            let payload = Bytes::copy_from_slice(input.bytes(usize::MAX));
            let mut r = Reader::from_bytes(&payload, "fuzz");
            for op in ops {
                let before = r.remaining();
                let ok = match op % 9 {
                    0 => r.u8().is_ok(),
                    1 => r.bool().is_ok(),
                    2 => r.u32().is_ok(),
                    3 => r.u64().is_ok(),
                    4 => r.string().is_ok(),
                    5 => r.bytes().is_ok_and(|b| b.len() <= before),
                    6 => r.utf8().is_ok(),
                    7 => r.name_list().is_ok(),
                    _ => r.take(op as usize / 9).is_ok(),
                };
                assert!(r.remaining() <= before);
                if !ok {
                    break;
                }
            }
            let _ = r.rest_bytes();
        }
        8 => {
            let code = input.u32();
            assert_eq!(DisconnectReason::from_code(code).code(), code);
            let _ = msg::name(code as u8);
        }
        _ => {
            let text = String::from_utf8_lossy(input.bytes(usize::MAX));
            for line in text.lines() {
                let _ = PublicKey::from_openssh(line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stream::{EXTRA, SCRIPTED, VERSION};
    use super::*;

    #[test]
    fn every_harness_runs_on_simple_inputs() {
        let inputs: [&[u8]; 5] = [
            &[],
            &[0],
            &[0x80, 3, 10, 0, 0, 0],
            &[SCRIPTED | EXTRA, 0, 6, 1, 0, 0, 100, 3, 0xff, 0xff, 4],
            &[EXTRA | VERSION, 0, 5, 1, 2, 3, 4, 5],
        ];
        for data in inputs {
            packet_decoder(data);
            message_decoders(data);
            server_stream(data);
            client_stream(data);
            tether_layer(data);
        }
        for sel in 0..=255u8 {
            packet_decoder(&[sel, 2, 0x10, 0, 7, 7, 7, 3, 0, 1]);
            message_decoders(&[sel, 0, 0, 0, 4, 1, 2, 3, 4]);
        }
    }
}
