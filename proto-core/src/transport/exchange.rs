//! The key exchange itself (RFC 4253 sections 7 and 8, RFC 8731, the
//! ML-KEM hybrid): both KEXINITs, the method's messages, the exchange hash,
//! and NEWKEYS in each direction.

use std::time::Instant;

use bytes::BufMut;

use super::{Incoming, KexState, Side, Transport};
use crate::error::{Error, Result};
use crate::kex::{self, HashInput, KexInit, Negotiated};
use crate::keys::{ED25519, PublicKey};
use crate::packet::Packet;
use crate::wire::{PutSsh, Reader, msg};

impl Transport {
    pub(super) fn on_kexinit(&mut self, packet: Packet) -> Result<Option<Incoming>> {
        let ours = match std::mem::replace(&mut self.kex, KexState::Idle) {
            KexState::Idle => {
                self.send_kexinit();
                match std::mem::replace(&mut self.kex, KexState::Idle) {
                    KexState::SentInit { ours } => ours,
                    _ => unreachable!("send_kexinit sets SentInit"),
                }
            }
            KexState::SentInit { ours } => ours,
            _ => {
                return Err(Error::Unexpected {
                    msg: msg::KEXINIT,
                    state: "in a key exchange",
                });
            }
        };
        let theirs = packet.payload;
        let negotiated = {
            let (c, s) = if self.is_client() {
                (&ours, &theirs)
            } else {
                (&theirs, &ours)
            };
            kex::negotiate(&KexInit::decode(c)?, &KexInit::decode(s)?, self.is_client())?
        };
        if self.kex_done == 0 {
            self.strict = negotiated.strict;
            self.peer_ext_info = negotiated.peer_ext_info;
            if self.require_strict && !self.strict {
                return Err(Error::StrictKex(
                    "the peer does not offer strict key exchange, which this side requires",
                ));
            }
            if self.strict && packet.seq != 0 {
                return Err(Error::StrictKex("KEXINIT was not the first packet"));
            }
        }
        let client = if self.is_client() {
            let (secret, public) = self
                .provider
                .kex_client(negotiated.kex, &mut *self.rng)
                .map_err(|_| Error::KeyExchange("could not start the key exchange"))?;
            self.send_now(|b| {
                b.put_u8(msg::KEX_INIT);
                b.put_string(&public);
            });
            Some((secret, public))
        } else {
            None
        };
        let ignore_guess = negotiated.ignore_guess;
        self.kex = KexState::Exchange {
            ours,
            theirs,
            negotiated,
            client,
            ignore_guess,
        };
        Ok(None)
    }

    pub(super) fn on_kex_method(&mut self, packet: Packet) -> Result<Option<Incoming>> {
        let m = packet.payload[0];
        let KexState::Exchange { ignore_guess, .. } = &mut self.kex else {
            return Err(Error::Unexpected {
                msg: m,
                state: "outside a key exchange",
            });
        };
        if std::mem::take(ignore_guess) {
            return Ok(None);
        }
        match (m, self.is_client()) {
            (msg::KEX_INIT, false) => self.server_reply(&packet.payload)?,
            (msg::KEX_REPLY, true) => self.client_finish(&packet.payload)?,
            _ => {
                return Err(Error::Unexpected {
                    msg: m,
                    state: "in a key exchange (wrong direction)",
                });
            }
        }
        Ok(None)
    }

    fn server_reply(&mut self, payload: &[u8]) -> Result<()> {
        let KexState::Exchange {
            ours,
            theirs,
            negotiated,
            ..
        } = std::mem::replace(&mut self.kex, KexState::Idle)
        else {
            unreachable!("checked by on_kex_method");
        };
        let Side::Server { host_key } = &self.side else {
            unreachable!("server only")
        };
        let host_key = host_key.clone();
        let mut r = Reader::new(&payload[1..], "KEX_ECDH_INIT");
        let client_public = r.string()?;
        let (server_public, k) = self
            .provider
            .kex_server(negotiated.kex, client_public, &mut *self.rng)
            .map_err(|_| Error::KeyExchange("the client's public value is invalid"))?;
        let host_blob = host_key.public().blob();
        let peer_version = self.peer_version.clone().unwrap_or_default();
        let h = HashInput {
            client_version: &peer_version,
            server_version: &self.local_version,
            client_kexinit: &theirs,
            server_kexinit: &ours,
            host_key_blob: &host_blob,
            client_public,
            server_public: &server_public,
            shared_secret: &k,
        }
        .hash(&*self.provider);
        let sig = self
            .provider
            .ed25519_sign(host_key.seed(), &h)
            .map_err(|_| Error::KeyExchange("could not sign with the host key"))?;
        self.send_now(|b| {
            b.put_u8(msg::KEX_REPLY);
            b.put_string(&host_blob);
            b.put_string(&server_public);
            let mut sig_blob = Vec::with_capacity(83);
            sig_blob.put_string(ED25519.as_bytes());
            sig_blob.put_string(&sig);
            b.put_string(&sig_blob);
        });
        self.peer_host_key = Some(*host_key.public());
        self.send_newkeys(negotiated, &k, &h);
        Ok(())
    }

    fn client_finish(&mut self, payload: &[u8]) -> Result<()> {
        let KexState::Exchange {
            ours,
            theirs,
            negotiated,
            client,
            ..
        } = std::mem::replace(&mut self.kex, KexState::Idle)
        else {
            unreachable!("checked by on_kex_method");
        };
        let Some((secret, client_public)) = client else {
            unreachable!("clients start the exchange")
        };
        let Side::Client { host_keys } = &self.side else {
            unreachable!("client only")
        };
        let mut r = Reader::new(&payload[1..], "KEX_ECDH_REPLY");
        let host_blob = r.string()?;
        let server_public = r.string()?;
        let sig_blob = r.string()?;
        let host = PublicKey::from_blob(host_blob)
            .map_err(|_| Error::KeyExchange("the server's host key is not ssh-ed25519"))?;
        if !host_keys.allows(&host) {
            return Err(Error::HostKeyRejected(host.fingerprint()));
        }
        if self.peer_host_key.is_some_and(|k| k != host) {
            return Err(Error::HostKeyRejected(format!(
                "{} (changed during rekey)",
                host.fingerprint()
            )));
        }
        let k = secret
            .finish(server_public)
            .map_err(|_| Error::KeyExchange("the server's public value is invalid"))?;
        let peer_version = self.peer_version.clone().unwrap_or_default();
        let h = HashInput {
            client_version: &self.local_version,
            server_version: &peer_version,
            client_kexinit: &ours,
            server_kexinit: &theirs,
            host_key_blob: host_blob,
            client_public: &client_public,
            server_public,
            shared_secret: &k,
        }
        .hash(&*self.provider);
        let mut s = Reader::new(sig_blob, "host key signature");
        if s.utf8()? != ED25519 {
            return Err(Error::KeyExchange("host key signature is not ssh-ed25519"));
        }
        let sig = s.string()?;
        if !self.provider.ed25519_verify(host.as_bytes(), &h, sig) {
            return Err(Error::KeyExchange("host key signature does not verify"));
        }
        self.peer_host_key = Some(host);
        self.send_newkeys(negotiated, &k, &h);
        Ok(())
    }

    /// Sends NEWKEYS, switches outgoing keys, sends EXT_INFO if due, then flushes
    /// what was queued behind the exchange.
    fn send_newkeys(&mut self, negotiated: Negotiated, k: &[u8], h: &[u8; 32]) {
        let session_id = *self.session_id.get_or_insert(*h);
        let keys = kex::derive_keys(&*self.provider, &negotiated, k, h, &session_id);
        let (out_alg, out_key, out_iv, in_alg, in_key, in_iv) = if self.is_client() {
            (
                negotiated.cipher_c2s,
                &keys.key_c2s,
                &keys.iv_c2s,
                negotiated.cipher_s2c,
                &keys.key_s2c,
                &keys.iv_s2c,
            )
        } else {
            (
                negotiated.cipher_s2c,
                &keys.key_s2c,
                &keys.iv_s2c,
                negotiated.cipher_c2s,
                &keys.key_c2s,
                &keys.iv_c2s,
            )
        };
        self.send_now(|b| b.put_u8(msg::NEWKEYS));
        self.sealer
            .rekey(self.provider.sealer(out_alg, out_key, out_iv));
        if self.strict {
            self.sealer.seq = 0;
        }
        self.sealer.bytes = 0;
        let opener = self.provider.opener(in_alg, in_key, in_iv);
        self.kex = KexState::AwaitNewKeys { opener, negotiated };
        if self.kex_done == 0 && !self.is_client() && self.peer_ext_info {
            self.send_now(|b| {
                b.put_u8(msg::EXT_INFO);
                b.put_u32(1);
                b.put_string(b"server-sig-algs");
                b.put_string(ED25519.as_bytes());
            });
        }
        while let Some(payload) = self.pending.pop_front() {
            self.pending_bytes -= payload.len();
            self.send_now(|b| b.put_slice(&payload));
        }
    }

    pub(super) fn on_newkeys(&mut self, now: Instant) -> Result<Option<Incoming>> {
        let KexState::AwaitNewKeys { opener, negotiated } =
            std::mem::replace(&mut self.kex, KexState::Idle)
        else {
            return Err(Error::Unexpected {
                msg: msg::NEWKEYS,
                state: "before our NEWKEYS",
            });
        };
        self.opener.rekey(opener);
        if self.strict {
            self.opener.seq = 0;
        }
        self.opener.bytes = 0;
        self.kex_done += 1;
        self.ext_info_next = self.kex_done == 1;
        self.last_kex = now;
        self.negotiated = Some(negotiated);
        Ok(Some(Incoming::KexDone {
            first: self.kex_done == 1,
            negotiated,
        }))
    }
}
