//! The binary packet protocol (RFC 4253 section 6): framing, padding, sequence
//! numbers and byte counters over whichever cipher is current. Payloads are built
//! in place in the output buffer and sealed there; incoming packets are opened in
//! place and their payloads handed out as `Bytes` slices, so channel data is
//! copied once on the way in and once on the way out.

use bytes::{BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use crate::crypto::{CryptoError, OpeningCipher, SealingCipher};
use crate::error::{Error, Result};

/// The largest `packet_length` accepted from a peer. RFC 4253 asks for at least
/// 35000; channel data of up to 256 KiB per packet fits.
pub const MAX_PACKET_LEN: usize = 256 * 1024 + 1024;

/// Bytes of header before the payload: `packet_length` and `padding_length`.
pub const HEADER_LEN: usize = 5;

/// The cipher before the first NEWKEYS: no encryption, no MAC, 8-byte blocks.
pub(crate) struct Plain;

impl SealingCipher for Plain {
    fn block_len(&self) -> usize {
        8
    }
    fn tag_len(&self) -> usize {
        0
    }
    fn length_outside_padding(&self) -> bool {
        false
    }
    fn seal(&mut self, _seq: u32, _packet: &mut [u8], _tag: &mut [u8]) {}
}

impl OpeningCipher for Plain {
    fn block_len(&self) -> usize {
        8
    }
    fn tag_len(&self) -> usize {
        0
    }
    fn length_outside_padding(&self) -> bool {
        false
    }
    fn packet_length(&self, _seq: u32, first: [u8; 4]) -> u32 {
        u32::from_be_bytes(first)
    }
    fn open(&mut self, _seq: u32, _packet: &mut [u8], _tag: &[u8]) -> Result<(), CryptoError> {
        Ok(())
    }
}

/// The sending half: seals packets into an output buffer.
pub struct Sealer {
    cipher: Box<dyn SealingCipher>,
    /// The sequence number of the next packet.
    pub(crate) seq: u32,
    /// Bytes sealed since the counter was last reset (drives rekeying).
    pub(crate) bytes: u64,
}

impl Default for Sealer {
    fn default() -> Self {
        Self {
            cipher: Box::new(Plain),
            seq: 0,
            bytes: 0,
        }
    }
}

impl Sealer {
    /// A sealer using `cipher` from the next packet on.
    pub fn new(cipher: Box<dyn SealingCipher>) -> Self {
        Self {
            cipher,
            seq: 0,
            bytes: 0,
        }
    }

    /// Switches to new keys (after NEWKEYS); the sequence number carries on.
    pub fn rekey(&mut self, cipher: Box<dyn SealingCipher>) {
        self.cipher = cipher;
    }

    /// Starts a packet: reserves the header. The caller appends the payload, then
    /// calls [`Sealer::finish`] with the returned start offset.
    pub fn begin(out: &mut BytesMut) -> usize {
        let start = out.len();
        out.put_bytes(0, HEADER_LEN);
        start
    }

    /// Bytes a packet with `payload_len` bytes of payload occupies on the wire, at most.
    pub fn overhead(&self) -> usize {
        HEADER_LEN + 2 * self.cipher.block_len().max(8) + self.cipher.tag_len()
    }

    /// Pads, encrypts and authenticates the packet started at `start`.
    pub fn finish(&mut self, out: &mut BytesMut, start: usize, rng: &mut dyn RngCore) {
        let payload_len = out.len() - start - HEADER_LEN;
        let block = self.cipher.block_len();
        // Both AEAD modes leave the 4-byte length out of the alignment (OpenSSH's
        // `aadlen`); see `SealingCipher::length_outside_padding`.
        let covered = if self.cipher.length_outside_padding() {
            1
        } else {
            HEADER_LEN
        } + payload_len;
        let mut padding = block - covered % block;
        if padding < 4 {
            padding += block;
        }
        let packet_len = 1 + payload_len + padding;
        out[start..start + 4].copy_from_slice(&(packet_len as u32).to_be_bytes());
        out[start + 4] = padding as u8;
        let mut pad = [0u8; 32];
        rng.fill_bytes(&mut pad[..padding]);
        out.put_slice(&pad[..padding]);
        let tag_len = self.cipher.tag_len();
        out.put_bytes(0, tag_len);
        let (packet, tag) = out[start..].split_at_mut(4 + packet_len);
        self.cipher.seal(self.seq, packet, tag);
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (4 + packet_len + tag_len) as u64;
    }
}

/// One opened packet.
#[derive(Debug)]
pub struct Packet {
    /// Its sequence number (for SSH_MSG_UNIMPLEMENTED).
    pub(crate) seq: u32,
    /// The payload, starting with the message number (never empty).
    pub payload: Bytes,
}

/// The receiving half: finds packet boundaries and opens packets.
pub struct Opener {
    cipher: Box<dyn OpeningCipher>,
    /// The sequence number of the next packet.
    pub(crate) seq: u32,
    /// Bytes opened since the counter was last reset (drives rekeying).
    pub(crate) bytes: u64,
    /// The length of the packet being received, once its first bytes are in.
    pending_len: Option<usize>,
}

impl Default for Opener {
    fn default() -> Self {
        Self {
            cipher: Box::new(Plain),
            seq: 0,
            bytes: 0,
            pending_len: None,
        }
    }
}

impl Opener {
    /// Switches to new keys (after NEWKEYS); the sequence number carries on.
    pub fn rekey(&mut self, cipher: Box<dyn OpeningCipher>) {
        self.cipher = cipher;
    }

    /// How many more bytes, after the `have` already buffered, complete what
    /// `next` is waiting for: the packet's first four bytes, or the rest of
    /// the packet once its length is known.
    pub fn wanted(&self, have: usize) -> usize {
        match self.pending_len {
            Some(len) => (4 + len + self.cipher.tag_len()).saturating_sub(have),
            None => 4usize.saturating_sub(have),
        }
    }

    /// Takes the next whole packet off the front of `buf`, if it is all there.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>> {
        let len = match self.pending_len {
            Some(len) => len,
            None => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let first = [buf[0], buf[1], buf[2], buf[3]];
                let len = self.cipher.packet_length(self.seq, first);
                let block = self.cipher.block_len();
                let covered = len as usize
                    + if self.cipher.length_outside_padding() {
                        0
                    } else {
                        4
                    };
                if (len as usize) < HEADER_LEN + 1 || len as usize > MAX_PACKET_LEN {
                    return Err(Error::PacketLength(len));
                }
                if !covered.is_multiple_of(block) {
                    return Err(Error::PacketLength(len));
                }
                self.pending_len = Some(len as usize);
                len as usize
            }
        };
        let tag_len = self.cipher.tag_len();
        let total = 4 + len + tag_len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut packet = buf.split_to(total);
        let (body, tag) = packet.split_at_mut(4 + len);
        self.cipher
            .open(self.seq, body, tag)
            .map_err(|_| Error::Mac)?;
        let padding = packet[4];
        if (padding as usize) < 4 || padding as usize + 2 > len {
            return Err(Error::Padding(padding));
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.bytes += total as u64;
        self.pending_len = None;
        let payload = packet
            .freeze()
            .slice(HEADER_LEN..4 + len - padding as usize);
        Ok(Some(Packet { seq, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AwsLcProvider, CipherAlg, CryptoProvider};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    fn pair(alg: Option<CipherAlg>) -> (Sealer, Opener) {
        match alg {
            None => (Sealer::default(), Opener::default()),
            Some(alg) => {
                let key = vec![7u8; alg.key_len()];
                let iv = vec![9u8; alg.iv_len()];
                let mut opener = Opener::default();
                opener.rekey(AwsLcProvider.opener(alg, &key, &iv));
                (Sealer::new(AwsLcProvider.sealer(alg, &key, &iv)), opener)
            }
        }
    }

    fn seal(sealer: &mut Sealer, out: &mut BytesMut, payload: &[u8]) {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let start = Sealer::begin(out);
        out.put_slice(payload);
        sealer.finish(out, start, &mut rng);
    }

    #[test]
    fn every_cipher_round_trips_packets_split_anywhere() {
        for alg in [
            None,
            Some(CipherAlg::Aes256Gcm),
            Some(CipherAlg::Aes128Gcm),
            Some(CipherAlg::ChaCha20Poly1305),
        ] {
            let (mut sealer, mut opener) = pair(alg);
            let mut wire = BytesMut::new();
            let payloads: Vec<Vec<u8>> = (0..40).map(|n| vec![n as u8 + 1; n * 37 + 1]).collect();
            for p in &payloads {
                seal(&mut sealer, &mut wire, p);
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(13) {
                buf.extend_from_slice(chunk);
                while let Some(p) = opener.next(&mut buf).unwrap() {
                    got.push(p.payload.to_vec());
                }
            }
            assert_eq!(got, payloads, "{alg:?}");
            assert_eq!(opener.seq, 40);
        }
    }

    #[test]
    fn a_flipped_bit_is_a_mac_error() {
        for alg in [CipherAlg::Aes256Gcm, CipherAlg::ChaCha20Poly1305] {
            let (mut sealer, mut opener) = pair(Some(alg));
            let mut wire = BytesMut::new();
            seal(&mut sealer, &mut wire, b"hello, world");
            wire[8] ^= 0x10;
            assert_eq!(opener.next(&mut wire).unwrap_err(), Error::Mac);
        }
    }

    #[test]
    fn oversize_and_misaligned_lengths_are_refused_before_buffering() {
        let mut opener = Opener::default();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0][..]);
        assert!(matches!(opener.next(&mut buf), Err(Error::PacketLength(_))));
        let mut opener = Opener::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 13][..]);
        assert!(matches!(
            opener.next(&mut buf),
            Err(Error::PacketLength(13))
        ));
    }

    #[test]
    fn short_padding_is_refused() {
        let mut opener = Opener::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 12, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(opener.next(&mut buf).unwrap_err(), Error::Padding(3));
    }
}
