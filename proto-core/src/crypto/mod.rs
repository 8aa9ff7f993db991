//! The crypto provider: every algorithm the protocol needs, behind one trait, so the
//! state machines never name a crypto library and fuzzers can swap in a provider
//! without security (`null`, built only for tests and `cfg(fuzzing)`).

use core::fmt;

use rand_core::RngCore;

mod aws;
mod mlkem;
#[cfg(any(test, fuzzing))]
pub mod null;

pub use aws::AwsLcProvider;

/// A key exchange method (all hash with SHA-256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KexAlg {
    /// `mlkem768x25519-sha256`: hybrid ML-KEM-768 + X25519 (post-quantum).
    MlKem768X25519,
    /// `curve25519-sha256` (RFC 8731).
    Curve25519,
    /// `curve25519-sha256@libssh.org`, the pre-RFC name of the same method.
    Curve25519Libssh,
}

impl KexAlg {
    /// Every method, in this side's default order of preference.
    pub const ALL: [KexAlg; 3] = [
        Self::MlKem768X25519,
        Self::Curve25519,
        Self::Curve25519Libssh,
    ];

    /// The SSH name.
    pub fn name(self) -> &'static str {
        match self {
            Self::MlKem768X25519 => "mlkem768x25519-sha256",
            Self::Curve25519 => "curve25519-sha256",
            Self::Curve25519Libssh => "curve25519-sha256@libssh.org",
        }
    }

    /// The method with this SSH name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// A packet cipher (all AEAD: the MAC is implicit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CipherAlg {
    /// `aes256-gcm@openssh.com` (RFC 5647 as OpenSSH uses it).
    Aes256Gcm,
    /// `aes128-gcm@openssh.com`.
    Aes128Gcm,
    /// `chacha20-poly1305@openssh.com`.
    ChaCha20Poly1305,
}

impl CipherAlg {
    /// Every cipher, in this side's default order of preference.
    pub const ALL: [CipherAlg; 3] = [Self::Aes256Gcm, Self::Aes128Gcm, Self::ChaCha20Poly1305];

    /// The SSH name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "aes256-gcm@openssh.com",
            Self::Aes128Gcm => "aes128-gcm@openssh.com",
            Self::ChaCha20Poly1305 => "chacha20-poly1305@openssh.com",
        }
    }

    /// The cipher with this SSH name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Bytes of key material drawn from the key derivation.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes256Gcm => 32,
            Self::Aes128Gcm => 16,
            Self::ChaCha20Poly1305 => 64,
        }
    }

    /// Bytes of IV drawn from the key derivation.
    pub fn iv_len(self) -> usize {
        match self {
            Self::Aes256Gcm | Self::Aes128Gcm => 12,
            Self::ChaCha20Poly1305 => 0,
        }
    }
}

/// A crypto operation failed on input from the peer (a bad public value, a bad tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoError;

/// The client half of a key exchange, waiting for the server's reply.
pub trait KexClient: Send {
    /// Combines the server's public value with our secret. Returns the shared secret
    /// `K` already encoded the way the method hashes it (`mpint` or `string`).
    fn finish(self: Box<Self>, server_public: &[u8]) -> Result<Vec<u8>, CryptoError>;
}

/// Seals outgoing packets.
pub trait SealingCipher: Send {
    /// The padding granularity.
    fn block_len(&self) -> usize;
    /// Bytes of tag appended after the packet.
    fn tag_len(&self) -> usize;
    /// Whether the 4-byte packet length is left out of the padding alignment, as
    /// OpenSSH does for every AEAD cipher (packet.c, `aadlen`): AES-GCM, whose
    /// length travels in the clear as AAD, and chacha20-poly1305@openssh.com,
    /// whose length is encrypted under a key of its own. Then `packet_length`
    /// itself must be a multiple of `block_len`.
    fn length_outside_padding(&self) -> bool;
    /// Seals `packet` (`packet_length || padding_length || payload || padding`) in
    /// place and writes the tag.
    fn seal(&mut self, seq: u32, packet: &mut [u8], tag: &mut [u8]);
}

/// Opens incoming packets.
pub trait OpeningCipher: Send {
    /// The padding granularity.
    fn block_len(&self) -> usize;
    /// Bytes of tag after the packet.
    fn tag_len(&self) -> usize;
    /// Whether the packet length is left out of the padding alignment (see
    /// `SealingCipher::length_outside_padding`).
    fn length_outside_padding(&self) -> bool;
    /// The packet length from the first four bytes (decrypted if need be; not yet
    /// authenticated).
    fn packet_length(&self, seq: u32, first: [u8; 4]) -> u32;
    /// Authenticates and decrypts `packet` in place; its first four bytes are the
    /// length as received.
    fn open(&mut self, seq: u32, packet: &mut [u8], tag: &[u8]) -> Result<(), CryptoError>;
}

/// Every algorithm the protocol uses.
pub trait CryptoProvider: Send + Sync + fmt::Debug {
    /// Starts a key exchange as client: the secret half and the public value to send.
    fn kex_client(
        &self,
        alg: KexAlg,
        rng: &mut dyn RngCore,
    ) -> Result<(Box<dyn KexClient>, Vec<u8>), CryptoError>;

    /// Answers a client's public value as server: our public value and the encoded
    /// shared secret `K`.
    fn kex_server(
        &self,
        alg: KexAlg,
        client_public: &[u8],
        rng: &mut dyn RngCore,
    ) -> Result<(Vec<u8>, Vec<u8>), CryptoError>;

    /// A sealing cipher keyed for one direction.
    fn sealer(&self, alg: CipherAlg, key: &[u8], iv: &[u8]) -> Box<dyn SealingCipher>;

    /// An opening cipher keyed for one direction.
    fn opener(&self, alg: CipherAlg, key: &[u8], iv: &[u8]) -> Box<dyn OpeningCipher>;

    /// SHA-256.
    fn sha256(&self, data: &[u8]) -> [u8; 32];

    /// The Ed25519 public key of a seed.
    fn ed25519_public_key(&self, seed: &[u8; 32]) -> Result<[u8; 32], CryptoError>;

    /// An Ed25519 signature.
    fn ed25519_sign(&self, seed: &[u8; 32], msg: &[u8]) -> Result<[u8; 64], CryptoError>;

    /// Whether `sig` is a valid Ed25519 signature of `msg` by `public`.
    fn ed25519_verify(&self, public: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool;
}
