//! The packet layer against the bare AEAD it wraps: one 32 KiB payload sealed
//! with `packet::Sealer::finish` and opened with `packet::Opener::next`,
//! beside aws-lc-rs sealing and opening a buffer of the same size directly. The
//! goal is a packet path at 0.9 of the raw one or better.
//!
//! - `packet`: the payload is already in the buffer (placed untimed), as in
//!   `raw`: the difference is what framing, padding and buffer handling cost.
//! - `packet+copy`: the payload is also copied in (`put_slice`), as the channel
//!   layer does; `raw+copy` is the bare AEAD with the same copy.

use std::hint::black_box;

use aws_lc_rs::aead::chacha20_poly1305_openssh as chapoly;
use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use proto_core::crypto::{AwsLcProvider, CipherAlg, CryptoProvider};
use proto_core::packet::{Opener, Sealer};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

const PAYLOAD: usize = 32 * 1024;

/// The bytes the cipher covers for a 32 KiB payload: `packet_length ||
/// padding_length || payload || padding`, as the sealer lays them out.
fn packet_len(alg: CipherAlg) -> usize {
    let (key, iv) = (vec![7u8; alg.key_len()], vec![9u8; alg.iv_len()]);
    let mut sealer = Sealer::new(AwsLcProvider.sealer(alg, &key, &iv));
    let mut wire = BytesMut::new();
    let start = Sealer::begin(&mut wire);
    wire.put_bytes(0x5a, PAYLOAD);
    sealer.finish(&mut wire, start, &mut ChaCha8Rng::seed_from_u64(1));
    wire.len() - 16
}

fn packet_layer(c: &mut Criterion) {
    for alg in CipherAlg::ALL {
        let mut group = c.benchmark_group(alg.name().trim_end_matches("@openssh.com"));
        group.throughput(Throughput::Bytes(PAYLOAD as u64));
        let (key, iv) = (vec![7u8; alg.key_len()], vec![9u8; alg.iv_len()]);

        let mut sealer = Sealer::new(AwsLcProvider.sealer(alg, &key, &iv));
        let mut opener = Opener::default();
        opener.rekey(AwsLcProvider.opener(alg, &key, &iv));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let payload = vec![0x5au8; PAYLOAD];
        let mut wire = BytesMut::with_capacity(PAYLOAD + 256);
        group.bench_function("packet", |b| {
            b.iter_batched_ref(
                || {
                    let mut buf = BytesMut::with_capacity(PAYLOAD + 256);
                    let start = Sealer::begin(&mut buf);
                    buf.put_slice(&payload);
                    (buf, start)
                },
                |(buf, start)| {
                    sealer.finish(buf, *start, &mut rng);
                    let packet = opener.next(buf).unwrap().expect("a whole packet");
                    black_box(packet.payload.len())
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function("packet+copy", |b| {
            b.iter(|| {
                let start = Sealer::begin(&mut wire);
                wire.put_slice(&payload);
                sealer.finish(&mut wire, start, &mut rng);
                let packet = opener.next(&mut wire).unwrap().expect("a whole packet");
                black_box(packet.payload.len())
            })
        });

        let mut raw = RawAead::new(alg, &key);
        let mut buf = vec![0x5au8; packet_len(alg)];
        group.bench_function("raw", |b| b.iter(|| raw.round_trip(&mut buf)));
        // What any in-place sealer pays too: the plaintext has to get into the
        // buffer being sealed. The packet path's `put_slice` is this copy.
        group.bench_function("raw+copy", |b| {
            b.iter(|| {
                buf[5..5 + PAYLOAD].copy_from_slice(&payload);
                raw.round_trip(&mut buf)
            })
        });
        group.finish();
    }
}

/// The provider's AEAD used directly, as `crypto/aws.rs` uses it.
enum RawAead {
    Gcm {
        key: LessSafeKey,
        counter: u64,
    },
    ChaCha {
        seal: chapoly::SealingKey,
        open: chapoly::OpeningKey,
        seq: u32,
    },
}

impl RawAead {
    fn new(alg: CipherAlg, key: &[u8]) -> Self {
        match alg {
            CipherAlg::Aes256Gcm | CipherAlg::Aes128Gcm => {
                let aead = if alg == CipherAlg::Aes256Gcm {
                    &AES_256_GCM
                } else {
                    &AES_128_GCM
                };
                let key = LessSafeKey::new(UnboundKey::new(aead, key).unwrap());
                Self::Gcm { key, counter: 0 }
            }
            CipherAlg::ChaCha20Poly1305 => {
                let key: &[u8; 64] = key.try_into().unwrap();
                Self::ChaCha {
                    seal: chapoly::SealingKey::new(key),
                    open: chapoly::OpeningKey::new(key),
                    seq: 0,
                }
            }
            other => unimplemented!("no raw AEAD baseline for {other:?}"),
        }
    }

    /// Seals `packet` in place (its first four bytes are the length) and opens it again.
    fn round_trip(&mut self, packet: &mut [u8]) -> usize {
        match self {
            Self::Gcm { key, counter } => {
                *counter += 1;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&counter.to_be_bytes());
                let (len, body) = packet.split_at_mut(4);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&*len),
                        body,
                    )
                    .unwrap();
                let plain = key
                    .open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&*len),
                        tag.as_ref(),
                        body,
                    )
                    .unwrap();
                black_box(plain.len())
            }
            Self::ChaCha { seal, open, seq } => {
                *seq = seq.wrapping_add(1);
                let mut tag = [0u8; 16];
                seal.seal_in_place(*seq, packet, &mut tag);
                let first = [packet[0], packet[1], packet[2], packet[3]];
                black_box(open.decrypt_packet_length(*seq, first));
                let plain = open.open_in_place(*seq, packet, &tag).unwrap();
                black_box(plain.len())
            }
        }
    }
}

criterion_group!(benches, packet_layer);
criterion_main!(benches);
