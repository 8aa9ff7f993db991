//! A provider with NO SECURITY, for fuzzing and tests only (built under
//! `cfg(fuzzing)` and in unit tests): packets are sealed with the identity and a
//! zero tag that is not checked, every signature verifies, and the key exchange
//! yields a fixed secret. It lets a fuzzer's byte stream reach auth and channel
//! states, as rustls-fuzzing-provider and sunset's `cfg(fuzzing)` do.

use rand_core::RngCore;

use super::*;

/// The insecure provider.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullProvider;

struct NullKex;

impl KexClient for NullKex {
    fn finish(self: Box<Self>, _server_public: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Ok(vec![0, 0, 0, 1, 1])
    }
}

struct Identity;

impl SealingCipher for Identity {
    fn block_len(&self) -> usize {
        8
    }
    fn tag_len(&self) -> usize {
        16
    }
    fn length_outside_padding(&self) -> bool {
        false
    }
    fn seal(&mut self, _seq: u32, _packet: &mut [u8], tag: &mut [u8]) {
        tag.fill(0);
    }
}

impl OpeningCipher for Identity {
    fn block_len(&self) -> usize {
        8
    }
    fn tag_len(&self) -> usize {
        16
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

impl CryptoProvider for NullProvider {
    fn kex_client(
        &self,
        _alg: KexAlg,
        _rng: &mut dyn RngCore,
    ) -> Result<(Box<dyn KexClient>, Vec<u8>), CryptoError> {
        Ok((Box::new(NullKex), vec![1; 32]))
    }

    fn kex_server(
        &self,
        _alg: KexAlg,
        _client_public: &[u8],
        _rng: &mut dyn RngCore,
    ) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        Ok((vec![2; 32], vec![0, 0, 0, 1, 1]))
    }

    fn sealer(&self, _alg: CipherAlg, _key: &[u8], _iv: &[u8]) -> Box<dyn SealingCipher> {
        Box::new(Identity)
    }

    fn opener(&self, _alg: CipherAlg, _key: &[u8], _iv: &[u8]) -> Box<dyn OpeningCipher> {
        Box::new(Identity)
    }

    fn sha256(&self, data: &[u8]) -> [u8; 32] {
        super::AwsLcProvider.sha256(data)
    }

    fn ed25519_public_key(&self, seed: &[u8; 32]) -> Result<[u8; 32], CryptoError> {
        Ok(*seed)
    }

    fn ed25519_sign(&self, _seed: &[u8; 32], _msg: &[u8]) -> Result<[u8; 64], CryptoError> {
        Ok([0; 64])
    }

    fn ed25519_verify(&self, _public: &[u8; 32], _msg: &[u8], _sig: &[u8]) -> bool {
        true
    }
}
