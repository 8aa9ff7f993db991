//! Packet padding as OpenSSH checks it. For AEAD ciphers OpenSSH leaves the
//! 4-byte `packet_length` out of the alignment rule (packet.c, `aadlen`), so the
//! length field's value must itself be a multiple of the block size: 16 for
//! AES-GCM, 8 for chacha20-poly1305@openssh.com. Found by the e2e interop tests:
//! our chacha packets were 4 bytes off and `ssh` dropped the connection with
//! "padding error: need 44 block 8 mod 4".

use bytes::{BufMut, BytesMut};
use proto_core::crypto::{AwsLcProvider, CipherAlg, CryptoProvider};
use proto_core::packet::{Opener, Sealer};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

fn block_of(alg: CipherAlg) -> u32 {
    match alg {
        CipherAlg::ChaCha20Poly1305 => 8,
        _ => 16,
    }
}

#[test]
fn aead_packet_length_is_a_multiple_of_the_block_size_as_openssh_requires() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for alg in CipherAlg::ALL {
        let (key, iv) = (vec![7u8; alg.key_len()], vec![9u8; alg.iv_len()]);
        let mut sealer = Sealer::new(AwsLcProvider.sealer(alg, &key, &iv));
        // A second opener only to read the (possibly encrypted) length fields.
        let length_reader = AwsLcProvider.opener(alg, &key, &iv);
        let mut opener = Opener::default();
        opener.rekey(AwsLcProvider.opener(alg, &key, &iv));
        for (seq, payload_len) in (1..200usize).enumerate() {
            let mut wire = BytesMut::new();
            let start = Sealer::begin(&mut wire);
            wire.put_bytes(0x5a, payload_len);
            let seq = seq as u32;
            sealer.finish(&mut wire, start, &mut rng);
            let len = length_reader.packet_length(seq, [wire[0], wire[1], wire[2], wire[3]]);
            assert_eq!(
                len % block_of(alg),
                0,
                "{alg:?}: packet_length {len} for a {payload_len}-byte payload"
            );
            // And we accept packets aligned that way (what OpenSSH sends).
            let packet = opener.next(&mut wire).unwrap().expect("a whole packet");
            assert_eq!(packet.payload.len(), payload_len);
        }
    }
}
