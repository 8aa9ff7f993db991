//! Key exchange pieces (RFC 4253 sections 7-8, RFC 8308, OpenSSH strict kex):
//! KEXINIT encoding and negotiation, the exchange hash and key derivation. The
//! transport drives them; this module holds no state of its own.

use bytes::{BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use crate::crypto::{CipherAlg, CryptoProvider, KexAlg};
use crate::error::{Error, Result};
use crate::keys::ED25519;
use crate::wire::{PutSsh, Reader, msg};

/// Markers that ride in the kex name-list of the first KEXINIT.
pub const EXT_INFO_C: &str = "ext-info-c";
pub const EXT_INFO_S: &str = "ext-info-s";
pub const STRICT_C: &str = "kex-strict-c-v00@openssh.com";
pub const STRICT_S: &str = "kex-strict-s-v00@openssh.com";

/// MAC names we advertise for peers that insist on a non-empty list; never used,
/// since every cipher we offer is AEAD.
const MACS: [&str; 2] = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-256"];

/// Which algorithms this side offers, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preferences {
    /// Key exchange methods.
    pub kex: Vec<KexAlg>,
    /// Ciphers (both directions).
    pub ciphers: Vec<CipherAlg>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            kex: KexAlg::ALL.to_vec(),
            ciphers: CipherAlg::ALL.to_vec(),
        }
    }
}

/// A decoded KEXINIT.
#[derive(Debug, Clone)]
pub struct KexInit<'a> {
    pub kex: Vec<&'a str>,
    pub host_key: Vec<&'a str>,
    pub cipher_c2s: Vec<&'a str>,
    pub cipher_s2c: Vec<&'a str>,
    pub comp_c2s: Vec<&'a str>,
    pub comp_s2c: Vec<&'a str>,
    pub first_kex_follows: bool,
}

impl<'a> KexInit<'a> {
    /// Decodes a KEXINIT payload (message number included).
    pub fn decode(payload: &'a [u8]) -> Result<Self> {
        let mut r = Reader::new(payload, "KEXINIT");
        r.u8()?;
        r.take(16)?;
        let kex = r.name_list()?;
        let host_key = r.name_list()?;
        let cipher_c2s = r.name_list()?;
        let cipher_s2c = r.name_list()?;
        let _mac_c2s = r.name_list()?;
        let _mac_s2c = r.name_list()?;
        let comp_c2s = r.name_list()?;
        let comp_s2c = r.name_list()?;
        let _lang_c2s = r.name_list()?;
        let _lang_s2c = r.name_list()?;
        let first_kex_follows = r.bool()?;
        r.u32()?;
        Ok(Self {
            kex,
            host_key,
            cipher_c2s,
            cipher_s2c,
            comp_c2s,
            comp_s2c,
            first_kex_follows,
        })
    }
}

/// Encodes our KEXINIT payload. The ext-info and strict-kex markers go only into
/// the first one (RFC 8308 section 2.1; OpenSSH PROTOCOL "kex-strict").
pub fn encode_kexinit(
    prefs: &Preferences,
    client: bool,
    first: bool,
    rng: &mut dyn RngCore,
) -> Bytes {
    let mut b = BytesMut::with_capacity(512);
    b.put_u8(msg::KEXINIT);
    let mut cookie = [0u8; 16];
    rng.fill_bytes(&mut cookie);
    b.put_slice(&cookie);
    let mut kex: Vec<&str> = prefs.kex.iter().map(|k| k.name()).collect();
    if first {
        kex.push(if client { EXT_INFO_C } else { EXT_INFO_S });
        kex.push(if client { STRICT_C } else { STRICT_S });
    }
    b.put_name_list(&kex);
    b.put_name_list(&[ED25519]);
    let ciphers: Vec<&str> = prefs.ciphers.iter().map(|c| c.name()).collect();
    b.put_name_list(&ciphers);
    b.put_name_list(&ciphers);
    b.put_name_list(&MACS);
    b.put_name_list(&MACS);
    b.put_name_list(&["none"]);
    b.put_name_list(&["none"]);
    b.put_name_list::<&str>(&[]);
    b.put_name_list::<&str>(&[]);
    b.put_bool(false);
    b.put_u32(0);
    b.freeze()
}

/// The outcome of negotiating two KEXINITs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The key exchange method.
    pub kex: KexAlg,
    /// Client-to-server cipher.
    pub cipher_c2s: CipherAlg,
    /// Server-to-client cipher.
    pub cipher_s2c: CipherAlg,
    /// Both sides asked for strict kex (meaningful in the first exchange only).
    pub strict: bool,
    /// The peer announced ext-info (meaningful in the first exchange only).
    pub peer_ext_info: bool,
    /// The peer sent a guessed kex packet that we must ignore.
    pub ignore_guess: bool,
}

fn choose<'a>(client: &[&'a str], server: &[&str], what: &'static str) -> Result<&'a str> {
    client
        .iter()
        .find(|c| server.contains(c))
        .copied()
        .ok_or(Error::NoCommonAlgorithm(what))
}

/// Negotiates per RFC 4253 section 7.1: the first client algorithm the server also lists.
pub fn negotiate(
    client: &KexInit<'_>,
    server: &KexInit<'_>,
    we_are_client: bool,
) -> Result<Negotiated> {
    // Markers are not methods: leave them out of the choice.
    let is_marker = |n: &&str| [EXT_INFO_C, EXT_INFO_S, STRICT_C, STRICT_S].contains(n);
    let ckex: Vec<&str> = client
        .kex
        .iter()
        .copied()
        .filter(|n| !is_marker(n))
        .collect();
    let skex: Vec<&str> = server
        .kex
        .iter()
        .copied()
        .filter(|n| !is_marker(n))
        .collect();
    let kex_name = choose(&ckex, &skex, "key exchange")?;
    let kex = KexAlg::from_name(kex_name).ok_or(Error::NoCommonAlgorithm("key exchange"))?;
    choose(&client.host_key, &server.host_key, "host key")?;
    let c2s = choose(
        &client.cipher_c2s,
        &server.cipher_c2s,
        "cipher (client to server)",
    )?;
    let s2c = choose(
        &client.cipher_s2c,
        &server.cipher_s2c,
        "cipher (server to client)",
    )?;
    choose(&client.comp_c2s, &server.comp_c2s, "compression")?;
    choose(&client.comp_s2c, &server.comp_s2c, "compression")?;
    let strict = client.kex.contains(&STRICT_C) && server.kex.contains(&STRICT_S);
    let (peer, peer_marker) = if we_are_client {
        (server, EXT_INFO_S)
    } else {
        (client, EXT_INFO_C)
    };
    let guess_right =
        ckex.first() == skex.first() && client.host_key.first() == server.host_key.first();
    Ok(Negotiated {
        kex,
        cipher_c2s: CipherAlg::from_name(c2s).ok_or(Error::NoCommonAlgorithm("cipher"))?,
        cipher_s2c: CipherAlg::from_name(s2c).ok_or(Error::NoCommonAlgorithm("cipher"))?,
        strict,
        peer_ext_info: peer.kex.contains(&peer_marker),
        ignore_guess: peer.first_kex_follows && !guess_right,
    })
}

/// The inputs of the exchange hash H (RFC 4253 section 8, RFC 8731, the hybrid draft).
pub struct HashInput<'a> {
    pub client_version: &'a [u8],
    pub server_version: &'a [u8],
    pub client_kexinit: &'a [u8],
    pub server_kexinit: &'a [u8],
    pub host_key_blob: &'a [u8],
    pub client_public: &'a [u8],
    pub server_public: &'a [u8],
    /// K, already encoded as the method hashes it.
    pub shared_secret: &'a [u8],
}

impl HashInput<'_> {
    /// H = SHA-256 over every input as a string, then K as encoded.
    pub fn hash(&self, provider: &dyn CryptoProvider) -> [u8; 32] {
        let mut b = Vec::with_capacity(
            64 + self.client_kexinit.len()
                + self.server_kexinit.len()
                + self.client_public.len()
                + self.server_public.len()
                + 200,
        );
        for part in [
            self.client_version,
            self.server_version,
            self.client_kexinit,
            self.server_kexinit,
            self.host_key_blob,
            self.client_public,
            self.server_public,
        ] {
            b.put_string(part);
        }
        b.put_slice(self.shared_secret);
        provider.sha256(&b)
    }
}

/// Keys and IVs for both directions, derived from K, H and the session id.
pub struct DerivedKeys {
    pub iv_c2s: Vec<u8>,
    pub iv_s2c: Vec<u8>,
    pub key_c2s: Vec<u8>,
    pub key_s2c: Vec<u8>,
}

/// RFC 4253 section 7.2: HASH(K || H || letter || session_id), extended as needed.
fn derive_one(
    provider: &dyn CryptoProvider,
    k: &[u8],
    h: &[u8; 32],
    letter: u8,
    session_id: &[u8],
    len: usize,
) -> Vec<u8> {
    let mut input = Vec::with_capacity(k.len() + 32 + 1 + session_id.len());
    input.extend_from_slice(k);
    input.extend_from_slice(h);
    input.push(letter);
    input.extend_from_slice(session_id);
    let mut out = provider.sha256(&input).to_vec();
    while out.len() < len {
        let mut more = Vec::with_capacity(k.len() + 32 + out.len());
        more.extend_from_slice(k);
        more.extend_from_slice(h);
        more.extend_from_slice(&out);
        out.extend_from_slice(&provider.sha256(&more));
    }
    out.truncate(len);
    out
}

/// Derives the keys the negotiated ciphers need.
pub fn derive_keys(
    provider: &dyn CryptoProvider,
    neg: &Negotiated,
    k: &[u8],
    h: &[u8; 32],
    session_id: &[u8],
) -> DerivedKeys {
    let d = |letter, len| derive_one(provider, k, h, letter, session_id, len);
    DerivedKeys {
        iv_c2s: d(b'A', neg.cipher_c2s.iv_len()),
        iv_s2c: d(b'B', neg.cipher_s2c.iv_len()),
        key_c2s: d(b'C', neg.cipher_c2s.key_len()),
        key_s2c: d(b'D', neg.cipher_s2c.key_len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    #[test]
    fn negotiation_picks_the_clients_first_shared_choice_and_ignores_markers() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let client = Preferences {
            kex: vec![KexAlg::Curve25519, KexAlg::MlKem768X25519],
            ciphers: vec![CipherAlg::ChaCha20Poly1305, CipherAlg::Aes256Gcm],
        };
        let server = Preferences::default();
        let c = encode_kexinit(&client, true, true, &mut rng);
        let s = encode_kexinit(&server, false, true, &mut rng);
        let (c, s) = (KexInit::decode(&c).unwrap(), KexInit::decode(&s).unwrap());
        let n = negotiate(&c, &s, true).unwrap();
        assert_eq!(n.kex, KexAlg::Curve25519);
        assert_eq!(n.cipher_c2s, CipherAlg::ChaCha20Poly1305);
        assert!(n.strict && n.peer_ext_info && !n.ignore_guess);
    }

    #[test]
    fn no_shared_cipher_is_a_named_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let a = Preferences {
            kex: KexAlg::ALL.to_vec(),
            ciphers: vec![CipherAlg::Aes128Gcm],
        };
        let b = Preferences {
            kex: KexAlg::ALL.to_vec(),
            ciphers: vec![CipherAlg::Aes256Gcm],
        };
        let c = encode_kexinit(&a, true, true, &mut rng);
        let s = encode_kexinit(&b, false, true, &mut rng);
        let err = negotiate(
            &KexInit::decode(&c).unwrap(),
            &KexInit::decode(&s).unwrap(),
            true,
        );
        assert_eq!(
            err.unwrap_err(),
            Error::NoCommonAlgorithm("cipher (client to server)")
        );
    }

    #[test]
    fn later_kexinits_carry_no_markers() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let k = encode_kexinit(&Preferences::default(), true, false, &mut rng);
        let k = KexInit::decode(&k).unwrap();
        assert!(!k.kex.contains(&STRICT_C) && !k.kex.contains(&EXT_INFO_C));
    }
}
