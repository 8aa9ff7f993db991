//! User authentication (RFC 4252): `publickey` with Ed25519 on both sides, and
//! `none` on a server configured to allow it. The user name carries no authority;
//! the key alone decides.

use bytes::{BufMut, BytesMut};

use crate::config::{ClientConfig, ServerConfig};
use crate::error::{Error, Result};
use crate::keys::{ED25519, PublicKey};
use crate::transport::Transport;
use crate::wire::{PutSsh, Reader, msg};

const USERAUTH: &str = "ssh-userauth";
const CONNECTION: &str = "ssh-connection";

/// Who authenticated, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The user name the client sent.
    pub user: String,
    /// The key the client proved, or `None` for the `none` method.
    pub key: Option<PublicKey>,
}

/// An authentication attempt the server refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The user name the client sent.
    pub user: String,
    /// The method it tried.
    pub method: String,
    /// The key it offered, if it offered a readable one.
    pub key: Option<PublicKey>,
    /// Why it was refused.
    pub reason: &'static str,
}

/// The server's side of authentication.
#[derive(Default)]
pub struct ServerAuth {
    /// Refused attempts not yet reported as events.
    pub rejected: Vec<Rejected>,
    service_accepted: bool,
    failures: u32,
    done: bool,
}

impl ServerAuth {
    /// SSH_MSG_SERVICE_REQUEST.
    pub fn on_service_request(&mut self, t: &mut Transport, payload: &[u8]) -> Result<()> {
        let name = Reader::new(&payload[1..], "SERVICE_REQUEST").utf8()?;
        if name != USERAUTH || self.service_accepted {
            return Err(Error::Service(name.to_owned()));
        }
        self.service_accepted = true;
        t.send(|b| {
            b.put_u8(msg::SERVICE_ACCEPT);
            b.put_string(USERAUTH.as_bytes());
        });
        Ok(())
    }

    fn fail(
        &mut self,
        t: &mut Transport,
        cfg: &ServerConfig,
        counts: bool,
    ) -> Result<Option<Authenticated>> {
        if counts {
            self.failures += 1;
            if self.failures >= cfg.max_auth_attempts {
                return Err(Error::Auth("too many failed authentication attempts"));
            }
        }
        t.send(|b| {
            b.put_u8(msg::USERAUTH_FAILURE);
            b.put_name_list(&["publickey"]);
            b.put_bool(false);
        });
        Ok(None)
    }

    /// SSH_MSG_USERAUTH_REQUEST. Returns who authenticated once someone has.
    pub fn on_request(
        &mut self,
        t: &mut Transport,
        cfg: &ServerConfig,
        payload: &[u8],
    ) -> Result<Option<Authenticated>> {
        if !self.service_accepted {
            return Err(Error::Unexpected {
                msg: msg::USERAUTH_REQUEST,
                state: "before ssh-userauth was requested",
            });
        }
        if self.done {
            return Ok(None); // RFC 4252 section 5.1: ignore requests after success
        }
        let mut r = Reader::new(&payload[1..], "USERAUTH_REQUEST");
        let user = r.utf8()?.to_owned();
        let service = r.utf8()?;
        if service != CONNECTION {
            return Err(Error::Service(service.to_owned()));
        }
        let method = r.utf8()?;
        let reject = |key: Option<PublicKey>, reason| Rejected {
            user: user.clone(),
            method: method.to_owned(),
            key,
            reason,
        };
        match method {
            "none" if cfg.allow_none => self.succeed(t, user, None),
            "none" => self.fail(t, cfg, false),
            "publickey" => {
                let signed = r.bool()?;
                let alg = r.utf8()?;
                let blob = r.string()?;
                let key = match PublicKey::from_blob(blob) {
                    Ok(key) if alg == ED25519 && cfg.authorized_keys.contains(&key) => key,
                    Ok(key) => {
                        self.rejected.push(reject(Some(key), "key not authorized"));
                        return self.fail(t, cfg, true);
                    }
                    Err(_) => {
                        self.rejected.push(reject(None, "not an ssh-ed25519 key"));
                        return self.fail(t, cfg, true);
                    }
                };
                if !signed {
                    // A query: would this key do? (RFC 4252 section 7)
                    t.send(|b| {
                        b.put_u8(msg::USERAUTH_PK_OK);
                        b.put_string(alg.as_bytes());
                        b.put_string(blob);
                    });
                    return Ok(None);
                }
                let signed_len = payload.len() - r.remaining();
                let sig_blob = r.string()?;
                let mut s = Reader::new(sig_blob, "publickey signature");
                let (sig_alg, sig) = (s.utf8()?, s.string()?);
                let session_id = *t
                    .session_id()
                    .expect("auth runs after the first key exchange");
                let mut data = Vec::with_capacity(36 + signed_len);
                data.put_string(&session_id);
                data.put_slice(&payload[..signed_len]);
                if sig_alg == ED25519 && t.provider().ed25519_verify(key.as_bytes(), &data, sig) {
                    self.succeed(t, user, Some(key))
                } else {
                    self.rejected
                        .push(reject(Some(key), "signature does not verify"));
                    self.fail(t, cfg, true)
                }
            }
            other => {
                let other = other.to_owned();
                self.rejected.push(Rejected {
                    user,
                    method: other,
                    key: None,
                    reason: "method not supported",
                });
                self.fail(t, cfg, true)
            }
        }
    }

    fn succeed(
        &mut self,
        t: &mut Transport,
        user: String,
        key: Option<PublicKey>,
    ) -> Result<Option<Authenticated>> {
        self.done = true;
        t.send(|b| b.put_u8(msg::USERAUTH_SUCCESS));
        Ok(Some(Authenticated { user, key }))
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ClientState {
    /// Waiting for the first key exchange.
    #[default]
    Idle,
    /// SERVICE_REQUEST sent.
    AwaitService,
    /// A request with this method is out.
    AwaitResult(&'static str),
    Done,
}

/// The client's side of authentication.
#[derive(Default)]
pub struct ClientAuth {
    state: ClientState,
}

impl ClientAuth {
    /// Starts authentication (after the first key exchange).
    pub fn start(&mut self, t: &mut Transport) {
        if self.state == ClientState::Idle {
            self.state = ClientState::AwaitService;
            t.send(|b| {
                b.put_u8(msg::SERVICE_REQUEST);
                b.put_string(USERAUTH.as_bytes());
            });
        }
    }

    fn send_request(&mut self, t: &mut Transport, cfg: &ClientConfig) -> Result<()> {
        let mut body = BytesMut::with_capacity(256);
        body.put_u8(msg::USERAUTH_REQUEST);
        body.put_string(cfg.user.as_bytes());
        body.put_string(CONNECTION.as_bytes());
        let Some(key) = &cfg.key else {
            body.put_string(b"none");
            self.state = ClientState::AwaitResult("none");
            t.send(|b| b.put_slice(&body));
            return Ok(());
        };
        body.put_string(b"publickey");
        body.put_bool(true);
        body.put_string(ED25519.as_bytes());
        body.put_string(&key.public().blob());
        let session_id = *t
            .session_id()
            .expect("auth runs after the first key exchange");
        let mut data = Vec::with_capacity(36 + body.len());
        data.put_string(&session_id);
        data.put_slice(&body);
        let sig = t
            .provider()
            .ed25519_sign(key.seed(), &data)
            .map_err(|_| Error::Auth("could not sign with the user key"))?;
        let mut sig_blob = Vec::with_capacity(83);
        sig_blob.put_string(ED25519.as_bytes());
        sig_blob.put_string(&sig);
        body.put_string(&sig_blob);
        self.state = ClientState::AwaitResult("publickey");
        t.send(|b| b.put_slice(&body));
        Ok(())
    }

    /// An authentication-layer message from the server. Returns true on success.
    pub fn on_message(
        &mut self,
        t: &mut Transport,
        cfg: &ClientConfig,
        payload: &[u8],
    ) -> Result<bool> {
        let m = payload[0];
        match (m, &self.state) {
            (msg::SERVICE_ACCEPT, ClientState::AwaitService) => {
                self.send_request(t, cfg)?;
                Ok(false)
            }
            (msg::USERAUTH_SUCCESS, ClientState::AwaitResult(_)) => {
                self.state = ClientState::Done;
                Ok(true)
            }
            (msg::USERAUTH_FAILURE, ClientState::AwaitResult(method)) => {
                Reader::new(&payload[1..], "USERAUTH_FAILURE").name_list()?;
                Err(Error::Auth(if *method == "none" {
                    "the server requires a key and none is configured"
                } else {
                    "the server refused our key"
                }))
            }
            (msg::USERAUTH_BANNER, _) => Ok(false),
            _ => Err(Error::Unexpected {
                msg: m,
                state: "authenticating",
            }),
        }
    }
}
