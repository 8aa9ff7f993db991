//! Public-key authentication against the real crypto provider: a client whose
//! signature is corrupted, or made over another session id, is refused. (The
//! other pair tests all sign correctly, so without these nothing would notice
//! a server that stopped verifying signatures.)

mod support;

use std::sync::Arc;

use proto_core::crypto::{
    AwsLcProvider, CipherAlg, CryptoError, CryptoProvider, KexAlg, KexClient, OpeningCipher,
    SealingCipher,
};
use proto_core::{Error, Event};
use rand_core::RngCore;
use support::*;

/// How the client's signing goes wrong.
#[derive(Debug, Clone, Copy)]
enum Forgery {
    /// One bit of the signature flipped.
    FlipBit,
    /// A valid signature, but over a different session id.
    OtherSessionId,
}

/// The real provider, except that the client's user-key signatures are forged.
#[derive(Debug)]
struct Forging(Forgery);

impl CryptoProvider for Forging {
    fn kex_client(
        &self,
        alg: KexAlg,
        rng: &mut dyn RngCore,
    ) -> Result<(Box<dyn KexClient>, Vec<u8>), CryptoError> {
        AwsLcProvider.kex_client(alg, rng)
    }

    fn kex_server(
        &self,
        alg: KexAlg,
        client_public: &[u8],
        rng: &mut dyn RngCore,
    ) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        AwsLcProvider.kex_server(alg, client_public, rng)
    }

    fn sealer(&self, alg: CipherAlg, key: &[u8], iv: &[u8]) -> Box<dyn SealingCipher> {
        AwsLcProvider.sealer(alg, key, iv)
    }

    fn opener(&self, alg: CipherAlg, key: &[u8], iv: &[u8]) -> Box<dyn OpeningCipher> {
        AwsLcProvider.opener(alg, key, iv)
    }

    fn sha256(&self, data: &[u8]) -> [u8; 32] {
        AwsLcProvider.sha256(data)
    }

    fn ed25519_public_key(&self, seed: &[u8; 32]) -> Result<[u8; 32], CryptoError> {
        AwsLcProvider.ed25519_public_key(seed)
    }

    fn ed25519_sign(&self, seed: &[u8; 32], msg: &[u8]) -> Result<[u8; 64], CryptoError> {
        match self.0 {
            Forgery::FlipBit => {
                let mut sig = AwsLcProvider.ed25519_sign(seed, msg)?;
                sig[10] ^= 0x01;
                Ok(sig)
            }
            Forgery::OtherSessionId => {
                // The signed data starts with string(session id): 4 + 32 bytes.
                let mut other = msg.to_vec();
                for b in &mut other[4..36] {
                    *b ^= 0xff;
                }
                AwsLcProvider.ed25519_sign(seed, &other)
            }
        }
    }

    fn ed25519_verify(&self, public: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
        AwsLcProvider.ed25519_verify(public, msg, sig)
    }
}

fn refused(forgery: Forgery) {
    let mut c = client_config();
    c.provider = Arc::new(Forging(forgery));
    let s = server_config();
    assert!(
        format!("{:?}", s.provider).contains("AwsLc"),
        "the server verifies with the real provider"
    );
    let mut pair = Pair::new(c, s);
    pair.drive();
    assert!(
        matches!(pair.client.error, Some(Error::Auth(_))),
        "{forgery:?}: {:?}",
        pair.client.error
    );
    assert!(!pair.server.conn.is_authenticated(), "{forgery:?}");
    assert!(
        pair.server.events.iter().any(|e| matches!(e, Event::AuthRejected(r) if r.key == Some(*client_key().public()) && r.reason == "signature does not verify")),
        "{forgery:?}: the refusal names the signature"
    );
}

#[test]
fn a_corrupted_signature_is_refused() {
    refused(Forgery::FlipBit);
}

#[test]
fn a_signature_over_another_session_id_is_refused() {
    refused(Forgery::OtherSessionId);
}

#[test]
fn the_unforged_provider_authenticates() {
    let mut c = client_config();
    c.provider = Arc::new(AwsLcProvider);
    let mut pair = Pair::new(c, server_config());
    pair.connect();
}
