//! The real provider, on aws-lc-rs: AES-GCM at memory speed with AES-NI/VAES,
//! the OpenSSH ChaCha20-Poly1305 construction, X25519, ML-KEM-768 and Ed25519.
//!
//! ML-KEM key generation (the client's: tetherd's, never forked) draws from
//! aws-lc's own DRBG (aws-lc-rs offers no seeded variant); encapsulation (the
//! guest's) and every other random value come from the injected RNG (see
//! `mlkem`).

use aws_lc_rs::aead::chacha20_poly1305_openssh as chapoly;
use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::signature::{self, KeyPair};
use aws_lc_rs::{agreement, digest, kem};
use rand_core::RngCore;

use super::*;
use crate::wire::PutSsh;

/// The production provider.
#[derive(Debug, Default, Clone, Copy)]
pub struct AwsLcProvider;

use super::mlkem::{self, CIPHERTEXT as MLKEM768_CIPHERTEXT, PUBLIC as MLKEM768_PUBLIC};
const X25519_LEN: usize = 32;

fn x25519_keypair(rng: &mut dyn RngCore) -> Result<(agreement::PrivateKey, Vec<u8>), CryptoError> {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let private = agreement::PrivateKey::from_private_key(&agreement::X25519, &seed)
        .map_err(|_| CryptoError)?;
    let public = private.compute_public_key().map_err(|_| CryptoError)?;
    Ok((private, public.as_ref().to_vec()))
}

fn x25519_agree(private: &agreement::PrivateKey, peer: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if peer.len() != X25519_LEN {
        return Err(CryptoError);
    }
    let shared = agreement::agree(
        private,
        agreement::UnparsedPublicKey::new(&agreement::X25519, peer),
        CryptoError,
        |k| Ok(k.to_vec()),
    )?;
    // RFC 8731 section 3: an all-zero result means a low-order point.
    if shared.iter().all(|&b| b == 0) {
        return Err(CryptoError);
    }
    Ok(shared)
}

/// Curve25519 hashes K as an mpint (RFC 8731 section 3.1).
fn mpint_secret(shared: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(shared.len() + 5);
    k.put_mpint(shared);
    k
}

/// The hybrid method hashes K = SHA-256(K_pq || K_cl) as a string.
fn hybrid_secret(pq: &[u8], cl: &[u8]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(pq);
    ctx.update(cl);
    let mut k = Vec::with_capacity(36);
    k.put_string(ctx.finish().as_ref());
    k
}

struct Curve25519Client(agreement::PrivateKey);

impl KexClient for Curve25519Client {
    fn finish(self: Box<Self>, server_public: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Ok(mpint_secret(&x25519_agree(&self.0, server_public)?))
    }
}

struct HybridClient {
    mlkem: kem::DecapsulationKey<kem::AlgorithmId>,
    x25519: agreement::PrivateKey,
}

impl KexClient for HybridClient {
    fn finish(self: Box<Self>, server_public: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if server_public.len() != MLKEM768_CIPHERTEXT + X25519_LEN {
            return Err(CryptoError);
        }
        let (ct, x) = server_public.split_at(MLKEM768_CIPHERTEXT);
        let pq = self
            .mlkem
            .decapsulate(kem::Ciphertext::from(ct))
            .map_err(|_| CryptoError)?;
        let cl = x25519_agree(&self.x25519, x)?;
        Ok(hybrid_secret(pq.as_ref(), &cl))
    }
}

struct Gcm {
    key: LessSafeKey,
    iv: [u8; 12],
}

impl Gcm {
    fn new(alg: CipherAlg, key: &[u8], iv: &[u8]) -> Self {
        let aead = if alg == CipherAlg::Aes256Gcm {
            &AES_256_GCM
        } else {
            &AES_128_GCM
        };
        let key = UnboundKey::new(aead, key).expect("key length comes from CipherAlg::key_len");
        let mut fixed = [0u8; 12];
        fixed.copy_from_slice(&iv[..12]);
        Self {
            key: LessSafeKey::new(key),
            iv: fixed,
        }
    }

    /// The nonce for this packet, then the invocation counter (the IV's last eight
    /// bytes) moves on (RFC 5647 section 7.1).
    fn next_nonce(&mut self) -> Nonce {
        let nonce = Nonce::assume_unique_for_key(self.iv);
        let counter = u64::from_be_bytes(self.iv[4..].try_into().expect("8 bytes"));
        self.iv[4..].copy_from_slice(&counter.wrapping_add(1).to_be_bytes());
        nonce
    }
}

impl SealingCipher for Gcm {
    fn block_len(&self) -> usize {
        16
    }
    fn tag_len(&self) -> usize {
        16
    }
    fn length_outside_padding(&self) -> bool {
        true
    }
    fn seal(&mut self, _seq: u32, packet: &mut [u8], tag: &mut [u8]) {
        let nonce = self.next_nonce();
        let (len, body) = packet.split_at_mut(4);
        let t = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*len), body)
            .expect("AES-GCM sealing cannot fail for packet-sized input");
        tag.copy_from_slice(t.as_ref());
    }
}

impl OpeningCipher for Gcm {
    fn block_len(&self) -> usize {
        16
    }
    fn tag_len(&self) -> usize {
        16
    }
    fn length_outside_padding(&self) -> bool {
        true
    }
    fn packet_length(&self, _seq: u32, first: [u8; 4]) -> u32 {
        u32::from_be_bytes(first)
    }
    fn open(&mut self, _seq: u32, packet: &mut [u8], tag: &[u8]) -> Result<(), CryptoError> {
        let nonce = self.next_nonce();
        let (len, body) = packet.split_at_mut(4);
        self.key
            .open_in_place_separate_tag(nonce, Aad::from(&*len), tag, body)
            .map(|_| ())
            .map_err(|_| CryptoError)
    }
}

struct ChaChaSeal(chapoly::SealingKey);
struct ChaChaOpen(chapoly::OpeningKey);

fn chacha_key(key: &[u8]) -> &[u8; 64] {
    key.try_into()
        .expect("key length comes from CipherAlg::key_len")
}

impl SealingCipher for ChaChaSeal {
    fn block_len(&self) -> usize {
        8
    }
    fn tag_len(&self) -> usize {
        16
    }
    fn length_outside_padding(&self) -> bool {
        // The length is encrypted, but OpenSSH still aligns only what follows
        // it (`aadlen` = 4 for every AEAD cipher); with `false` our packets were
        // 4 bytes off and `ssh` failed: "padding error: need 44 block 8 mod 4".
        true
    }
    fn seal(&mut self, seq: u32, packet: &mut [u8], tag: &mut [u8]) {
        let tag: &mut [u8; 16] = tag.try_into().expect("16-byte tag");
        self.0.seal_in_place(seq, packet, tag);
    }
}

impl OpeningCipher for ChaChaOpen {
    fn block_len(&self) -> usize {
        8
    }
    fn tag_len(&self) -> usize {
        16
    }
    fn length_outside_padding(&self) -> bool {
        // The length is encrypted, but OpenSSH still aligns only what follows
        // it (`aadlen` = 4 for every AEAD cipher); with `false` our packets were
        // 4 bytes off and `ssh` failed: "padding error: need 44 block 8 mod 4".
        true
    }
    fn packet_length(&self, seq: u32, first: [u8; 4]) -> u32 {
        u32::from_be_bytes(self.0.decrypt_packet_length(seq, first))
    }
    fn open(&mut self, seq: u32, packet: &mut [u8], tag: &[u8]) -> Result<(), CryptoError> {
        let tag: &[u8; 16] = tag.try_into().map_err(|_| CryptoError)?;
        self.0
            .open_in_place(seq, packet, tag)
            .map(|_| ())
            .map_err(|_| CryptoError)
    }
}

impl CryptoProvider for AwsLcProvider {
    fn kex_client(
        &self,
        alg: KexAlg,
        rng: &mut dyn RngCore,
    ) -> Result<(Box<dyn KexClient>, Vec<u8>), CryptoError> {
        let (x25519, x_public) = x25519_keypair(rng)?;
        match alg {
            KexAlg::Curve25519 | KexAlg::Curve25519Libssh => {
                Ok((Box::new(Curve25519Client(x25519)), x_public))
            }
            KexAlg::MlKem768X25519 => {
                let mlkem =
                    kem::DecapsulationKey::generate(&kem::ML_KEM_768).map_err(|_| CryptoError)?;
                let ek = mlkem.encapsulation_key().map_err(|_| CryptoError)?;
                let ek = ek.key_bytes().map_err(|_| CryptoError)?;
                let mut public = Vec::with_capacity(MLKEM768_PUBLIC + X25519_LEN);
                public.extend_from_slice(ek.as_ref());
                public.extend_from_slice(&x_public);
                Ok((Box::new(HybridClient { mlkem, x25519 }), public))
            }
        }
    }

    fn kex_server(
        &self,
        alg: KexAlg,
        client_public: &[u8],
        rng: &mut dyn RngCore,
    ) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        let (x25519, x_public) = x25519_keypair(rng)?;
        match alg {
            KexAlg::Curve25519 | KexAlg::Curve25519Libssh => {
                let shared = x25519_agree(&x25519, client_public)?;
                Ok((x_public, mpint_secret(&shared)))
            }
            KexAlg::MlKem768X25519 => {
                if client_public.len() != MLKEM768_PUBLIC + X25519_LEN {
                    return Err(CryptoError);
                }
                let (ek, x) = client_public.split_at(MLKEM768_PUBLIC);
                let mut m = [0u8; 32];
                rng.fill_bytes(&mut m);
                let (ct, pq) = mlkem::encapsulate(ek, &m)?;
                let cl = x25519_agree(&x25519, x)?;
                let mut public = Vec::with_capacity(MLKEM768_CIPHERTEXT + X25519_LEN);
                public.extend_from_slice(ct.as_ref());
                public.extend_from_slice(&x_public);
                Ok((public, hybrid_secret(pq.as_ref(), &cl)))
            }
        }
    }

    fn sealer(&self, alg: CipherAlg, key: &[u8], iv: &[u8]) -> Box<dyn SealingCipher> {
        match alg {
            CipherAlg::Aes256Gcm | CipherAlg::Aes128Gcm => Box::new(Gcm::new(alg, key, iv)),
            CipherAlg::ChaCha20Poly1305 => {
                Box::new(ChaChaSeal(chapoly::SealingKey::new(chacha_key(key))))
            }
        }
    }

    fn opener(&self, alg: CipherAlg, key: &[u8], iv: &[u8]) -> Box<dyn OpeningCipher> {
        match alg {
            CipherAlg::Aes256Gcm | CipherAlg::Aes128Gcm => Box::new(Gcm::new(alg, key, iv)),
            CipherAlg::ChaCha20Poly1305 => {
                Box::new(ChaChaOpen(chapoly::OpeningKey::new(chacha_key(key))))
            }
        }
    }

    fn sha256(&self, data: &[u8]) -> [u8; 32] {
        digest::digest(&digest::SHA256, data)
            .as_ref()
            .try_into()
            .expect("32-byte digest")
    }

    fn ed25519_public_key(&self, seed: &[u8; 32]) -> Result<[u8; 32], CryptoError> {
        let pair = signature::Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| CryptoError)?;
        pair.public_key()
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError)
    }

    fn ed25519_sign(&self, seed: &[u8; 32], msg: &[u8]) -> Result<[u8; 64], CryptoError> {
        let pair = signature::Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| CryptoError)?;
        pair.sign(msg).as_ref().try_into().map_err(|_| CryptoError)
    }

    fn ed25519_verify(&self, public: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, public)
            .verify(msg, sig)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// A VM fork's children each reseed their RNG; what the server side of a
    /// key exchange sends and derives must follow that RNG alone (no hidden
    /// process state a fork would clone), and the client must agree.
    #[test]
    fn the_hybrid_server_side_is_a_function_of_the_injected_rng() {
        let p = AwsLcProvider;
        let alg = KexAlg::MlKem768X25519;
        let (client, client_public) = p
            .kex_client(alg, &mut ChaCha20Rng::seed_from_u64(1))
            .unwrap();
        let server = |seed| {
            p.kex_server(alg, &client_public, &mut ChaCha20Rng::seed_from_u64(seed))
                .unwrap()
        };
        let (reply, secret) = server(2);
        assert_eq!((reply.clone(), secret.clone()), server(2));
        assert_ne!(reply, server(3).0);
        assert_eq!(client.finish(&reply).unwrap(), secret);
    }
}
