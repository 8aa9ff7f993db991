//! Ed25519 keys: OpenSSH private key files and `authorized_keys`-style public key
//! lines (parsed and written with the `ssh-key` crate), and their SSH wire blobs.

use core::fmt;

use rand_core::RngCore;
use ssh_key::private::{Ed25519Keypair, Ed25519PrivateKey, KeypairData};
use ssh_key::public::{Ed25519PublicKey, KeyData};
use ssh_key::{HashAlg, LineEnding};

use crate::crypto::{AwsLcProvider, CryptoProvider};
use crate::wire::{PutSsh, Reader};

/// The only key algorithm this crate speaks.
pub const ED25519: &str = "ssh-ed25519";

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text or blob is not a key in a format we read.
    #[error("not a valid OpenSSH key: {0}")]
    Parse(String),
    /// A valid key of an algorithm other than ssh-ed25519.
    #[error("unsupported key algorithm {0} (only ssh-ed25519 is supported)")]
    Unsupported(String),
    /// A passphrase-protected private key.
    #[error("the private key is encrypted; give an unencrypted key")]
    Encrypted,
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses one `authorized_keys`-style line: `ssh-ed25519 AAAA... [comment]`.
    pub fn from_openssh(line: &str) -> Result<Self, KeyError> {
        let key = ssh_key::PublicKey::from_openssh(line.trim())
            .map_err(|e| KeyError::Parse(e.to_string()))?;
        match key.key_data() {
            KeyData::Ed25519(k) => Ok(Self(k.0)),
            other => Err(KeyError::Unsupported(other.algorithm().to_string())),
        }
    }

    fn to_ssh_key(self) -> ssh_key::PublicKey {
        ssh_key::PublicKey::new(KeyData::Ed25519(Ed25519PublicKey(self.0)), "")
    }

    /// The `ssh-ed25519 AAAA...` line, without a comment.
    pub fn to_openssh(&self) -> String {
        self.to_ssh_key()
            .to_openssh()
            .expect("ed25519 public keys always encode")
    }

    /// The SSH wire blob: `string "ssh-ed25519" || string key`.
    pub fn blob(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(51);
        b.put_string(ED25519.as_bytes());
        b.put_string(&self.0);
        b
    }

    /// Parses a wire blob.
    pub fn from_blob(blob: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(blob, "public key blob");
        let alg = r.utf8().map_err(|e| KeyError::Parse(e.to_string()))?;
        if alg != ED25519 {
            return Err(KeyError::Unsupported(alg.to_string()));
        }
        let key = r.string().map_err(|e| KeyError::Parse(e.to_string()))?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| KeyError::Parse("ed25519 key is not 32 bytes".into()))?;
        Ok(Self(key))
    }

    /// The OpenSSH fingerprint, `SHA256:<base64>`.
    pub fn fingerprint(&self) -> String {
        self.to_ssh_key().fingerprint(HashAlg::Sha256).to_string()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// An Ed25519 private key (host key or user key).
#[derive(Clone)]
pub struct PrivateKey {
    seed: [u8; 32],
    public: PublicKey,
}

impl PrivateKey {
    /// The key with this 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let public = AwsLcProvider
            .ed25519_public_key(&seed)
            .expect("every 32-byte string is an ed25519 seed");
        Self {
            seed,
            public: PublicKey(public),
        }
    }

    /// A fresh key from `rng`.
    pub fn generate(rng: &mut dyn RngCore) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// Parses an unencrypted OpenSSH private key file
    /// (`-----BEGIN OPENSSH PRIVATE KEY-----`).
    pub fn from_openssh(text: &str) -> Result<Self, KeyError> {
        let key =
            ssh_key::PrivateKey::from_openssh(text).map_err(|e| KeyError::Parse(e.to_string()))?;
        if key.is_encrypted() {
            return Err(KeyError::Encrypted);
        }
        match key.key_data() {
            KeypairData::Ed25519(pair) => {
                let parsed = Self::from_seed(pair.private.to_bytes());
                if parsed.public.0 != pair.public.0 {
                    return Err(KeyError::Parse(
                        "public half does not match private half".into(),
                    ));
                }
                Ok(parsed)
            }
            other => Err(KeyError::Unsupported(
                other
                    .algorithm()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "unknown".into()),
            )),
        }
    }

    /// The OpenSSH private key file text.
    pub fn to_openssh(&self, comment: &str) -> String {
        let pair = Ed25519Keypair {
            public: Ed25519PublicKey(self.public.0),
            private: Ed25519PrivateKey::from_bytes(&self.seed),
        };
        let key = ssh_key::PrivateKey::new(KeypairData::Ed25519(pair), comment)
            .expect("an unencrypted ed25519 key always encodes");
        key.to_openssh(LineEnding::LF)
            .expect("ed25519 keys always encode")
            .to_string()
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub(crate) fn seed(&self) -> &[u8; 32] {
        &self.seed
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({})", self.public.fingerprint())
    }
}

/// Parses `authorized_keys` text: one key per line, blank lines and `#` comments
/// skipped. An error names the line.
pub fn parse_authorized_keys(text: &str) -> Result<Vec<PublicKey>, (usize, KeyError)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| PublicKey::from_openssh(l).map_err(|e| (i + 1, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated by `ssh-keygen -t ed25519 -N '' -C test`.
    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACDlcOvaaw++hsfRGm8nUJ2Zt224JWPYC+dG666jncNsRAAAAIi4ZGiYuGRo
mAAAAAtzc2gtZWQyNTUxOQAAACDlcOvaaw++hsfRGm8nUJ2Zt224JWPYC+dG666jncNsRA
AAAECio1UzUGfLYOxiUrkapj3QiwUGyYzvz43A0FWXAxDk/OVw69prD76Gx9EabydQnZm3
bbglY9gL50brrqOdw2xEAAAABHRlc3QB
-----END OPENSSH PRIVATE KEY-----
";
    const PUB: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOVw69prD76Gx9EabydQnZm3bbglY9gL50brrqOdw2xE test";

    #[test]
    fn openssh_private_key_parses_and_matches_its_public_line() {
        let key = PrivateKey::from_openssh(KEY).unwrap();
        assert_eq!(*key.public(), PublicKey::from_openssh(PUB).unwrap());
        let again = PrivateKey::from_openssh(&key.to_openssh("test")).unwrap();
        assert_eq!(again.seed, key.seed);
    }

    #[test]
    fn blob_round_trips_and_rejects_other_algorithms() {
        let key = PublicKey::from_openssh(PUB).unwrap();
        assert_eq!(PublicKey::from_blob(&key.blob()).unwrap(), key);
        let mut rsa = Vec::new();
        rsa.put_string(b"ssh-rsa");
        rsa.put_string(&[1, 2, 3]);
        assert_eq!(
            PublicKey::from_blob(&rsa),
            Err(KeyError::Unsupported("ssh-rsa".into()))
        );
        assert!(PublicKey::from_blob(&[0, 0]).is_err());
    }

    #[test]
    fn authorized_keys_errors_name_the_line() {
        let text = format!("# comment\n\n{PUB}\nssh-ed25519 notbase64\n");
        let err = parse_authorized_keys(&text).unwrap_err();
        assert_eq!(err.0, 4);
    }
}
