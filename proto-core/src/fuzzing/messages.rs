//! What the harness says for the peer and the application: well-formed
//! messages with fuzzer-chosen fields, and application commands.

use bytes::{BufMut, Bytes};

use super::stream::{Harness, Side};
use super::{FuzzRng, Input};
use crate::kex::{Preferences, encode_kexinit};
use crate::keys::PublicKey;
use crate::request::{ChannelRequest, PtyRequest};
use crate::wire::{PutSsh, msg};
use crate::{ChannelId, DisconnectReason};

pub(super) fn payload(build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = Vec::new();
    build(&mut b);
    b
}

impl Harness {
    /// An application command with fuzzer-chosen arguments.
    pub(super) fn command(&mut self, input: &mut Input<'_>) {
        let (c, ch) = (input.u8() % 15, ChannelId(input.u8() as u32 % 4));
        let _ = match c {
            0 => self.conn.open_session().map(drop),
            1 => self.conn.open_channel("direct-tcpip", b"x").map(drop),
            2 | 3 => {
                let data = vec![b'd'; input.u16() as usize % 20_000];
                let ext = (c == 3).then_some(1);
                self.conn.channel_send(ch, ext, &data).map(drop)
            }
            4 => self.conn.channel_eof(ch),
            5 => self.conn.channel_close(ch),
            6 => {
                let req = request(input);
                self.conn.channel_request(ch, &req, input.u8() & 1 != 0)
            }
            7 => self
                .conn
                .global_request("tcpip-forward", b"", input.u8() & 1 != 0),
            8 => {
                self.conn.rekey();
                Ok(())
            }
            9 => self.conn.channel_consume(ch, input.u16() as usize),
            10 => self.conn.channel_reply(ch, input.u8() & 1 != 0),
            11 => {
                self.conn
                    .disconnect(DisconnectReason::ByApplication, "fuzz");
                Ok(())
            }
            12 => {
                if let Some(event) = self.unanswered.pop_front() {
                    self.answer(event);
                }
                Ok(())
            }
            13 => self.conn.accept_channel(ch),
            _ => self.conn.reject_channel(ch, 2, "no"),
        };
    }

    /// A well-formed message with fuzzer-chosen fields (packet mode only).
    pub(super) fn message(&mut self, input: &mut Input<'_>) -> Vec<Vec<u8>> {
        let (k, ch) = (input.u8() % 20, input.u8() as u32 % 4);
        let m = match k {
            0 => open_message(input.u8() as u32),
            1 | 2 => payload(|b| {
                let len = input.u16() as usize % 10_000;
                b.put_u8(if k == 1 {
                    msg::CHANNEL_DATA
                } else {
                    msg::CHANNEL_EXTENDED_DATA
                });
                b.put_u32(ch);
                if k == 2 {
                    b.put_u32(1);
                }
                b.put_string(&input.filled(len));
            }),
            3 => payload(|b| {
                b.put_u8(msg::CHANNEL_WINDOW_ADJUST);
                b.put_u32(ch);
                b.put_u32(input.u32());
            }),
            4 => payload(|b| {
                let req = request(input);
                b.put_u8(msg::CHANNEL_REQUEST);
                b.put_u32(ch);
                b.put_string(req.name().as_bytes());
                b.put_bool(input.u8() & 1 != 0);
                req.encode_data(b);
            }),
            5 => vec![msg::CHANNEL_EOF, 0, 0, 0, ch as u8],
            6 => vec![msg::CHANNEL_CLOSE, 0, 0, 0, ch as u8],
            7 => vec![msg::CHANNEL_SUCCESS, 0, 0, 0, ch as u8],
            8 => vec![msg::CHANNEL_FAILURE, 0, 0, 0, ch as u8],
            9 => payload(|b| {
                let name: &[u8] = match input.u8() % 4 {
                    0 => b"keepalive@openssh.com",
                    1 => b"no-more-sessions@openssh.com",
                    2 => b"tcpip-forward",
                    _ => b"hostkeys-00@openssh.com",
                };
                b.put_u8(msg::GLOBAL_REQUEST);
                b.put_string(name);
                b.put_bool(input.u8() & 1 != 0);
            }),
            10 => vec![msg::REQUEST_SUCCESS + input.u8() % 2],
            11 => payload(|b| {
                b.put_u8(msg::CHANNEL_OPEN_CONFIRMATION);
                b.put_u32(ch);
                b.put_u32(input.u8() as u32);
                b.put_u32(input.u32());
                b.put_u32(input.u16() as u32);
            }),
            12 => payload(|b| {
                b.put_u8(msg::CHANNEL_OPEN_FAILURE);
                b.put_u32(ch);
                b.put_u32(2);
                b.put_string(b"refused");
                b.put_string(b"");
            }),
            13 => {
                // A whole re-exchange played by the peer.
                let client = self.side == Side::Server;
                let mut rng = FuzzRng::new(input.u8() as u64);
                let init = encode_kexinit(&Preferences::default(), client, false, &mut rng);
                return vec![init.to_vec(), self.kex_method(), vec![msg::NEWKEYS]];
            }
            14 => vec![[msg::IGNORE, msg::DEBUG, msg::UNIMPLEMENTED][input.u8() as usize % 3]],
            15 => {
                let key = [[1; 32], [9; 32]][input.u8() as usize % 2];
                userauth(input.u8(), key)
            }
            16 => service([msg::SERVICE_REQUEST, msg::SERVICE_ACCEPT][input.u8() as usize % 2]),
            17 => match input.u8() % 4 {
                0 => vec![msg::USERAUTH_SUCCESS],
                1 => payload(|b| {
                    b.put_u8(msg::USERAUTH_FAILURE);
                    b.put_name_list(&["publickey"]);
                    b.put_bool(false);
                }),
                2 => payload(|b| {
                    b.put_u8(msg::USERAUTH_BANNER);
                    b.put_string(b"hello");
                    b.put_string(b"");
                }),
                _ => payload(|b| {
                    b.put_u8(msg::USERAUTH_PK_OK);
                    b.put_string(b"ssh-ed25519");
                    b.put_string(&PublicKey::from_bytes([1; 32]).blob());
                }),
            },
            18 => payload(|b| {
                b.put_u8(msg::DISCONNECT);
                b.put_u32(input.u8() as u32);
                b.put_string(b"bye");
                b.put_string(b"");
            }),
            _ => payload(|b| {
                b.put_u8(msg::EXT_INFO);
                b.put_u32(1);
                b.put_string(b"server-sig-algs");
                b.put_string(b"ssh-ed25519,rsa-sha2-256");
            }),
        };
        vec![m]
    }
}

pub(super) fn service(m: u8) -> Vec<u8> {
    payload(|b| {
        b.put_u8(m);
        b.put_string(b"ssh-userauth");
    })
}

/// A USERAUTH_REQUEST: `publickey` signed (variant 0; the null provider accepts
/// any signature), a key query, `none`, another service, or an unknown method.
pub(super) fn userauth(variant: u8, key: [u8; 32]) -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::USERAUTH_REQUEST);
        b.put_string(b"u");
        b.put_string(if variant % 5 == 3 {
            b"ssh-other"
        } else {
            b"ssh-connection"
        });
        match variant % 5 {
            2 => b.put_string(b"none"),
            4 => b.put_string(b"password"),
            v => {
                b.put_string(b"publickey");
                b.put_bool(v != 1);
                b.put_string(b"ssh-ed25519");
                b.put_string(&PublicKey::from_bytes(key).blob());
                if v != 1 {
                    b.put_string(&payload(|s| {
                        s.put_string(b"ssh-ed25519");
                        s.put_string(&[0; 64]);
                    }));
                }
            }
        }
    })
}

pub(super) fn open_message(sender: u32) -> Vec<u8> {
    payload(|b| {
        b.put_u8(msg::CHANNEL_OPEN);
        b.put_string(b"session");
        b.put_u32(sender);
        b.put_u32(1 << 20);
        b.put_u32(32768);
    })
}

fn request(input: &mut Input<'_>) -> ChannelRequest {
    match input.u8() % 8 {
        0 => ChannelRequest::Pty(PtyRequest {
            term: "xterm".into(),
            cols: 80,
            rows: 24,
            width_px: 0,
            height_px: 0,
            modes: Bytes::from_static(&[0]),
        }),
        1 => ChannelRequest::Env {
            name: "LANG".into(),
            value: Bytes::from_static(b"C"),
        },
        2 => ChannelRequest::Shell,
        3 => ChannelRequest::Exec {
            command: Bytes::from_static(b"true"),
        },
        4 => ChannelRequest::ExitStatus { code: input.u32() },
        5 => ChannelRequest::Signal {
            name: "TERM".into(),
        },
        6 => ChannelRequest::Other {
            name: "keepalive@openssh.com".into(),
            data: Bytes::new(),
        },
        _ => ChannelRequest::Other {
            name: "start@tether".into(),
            data: Bytes::from_static(b"x"),
        },
    }
}
