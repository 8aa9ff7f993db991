//! Channel requests (RFC 4254 section 6) as typed values, with their encodings.

use bytes::{BufMut, Bytes};

use crate::error::Result;
use crate::wire::{PutSsh, Reader};

/// A terminal request (`pty-req`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// TERM, e.g. `xterm-256color`.
    pub term: String,
    /// Width in characters.
    pub cols: u32,
    /// Height in rows.
    pub rows: u32,
    /// Width in pixels (usually 0).
    pub width_px: u32,
    /// Height in pixels (usually 0).
    pub height_px: u32,
    /// Encoded terminal modes (RFC 4254 section 8).
    pub modes: Bytes,
}

/// A channel request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelRequest {
    /// `pty-req`.
    Pty(PtyRequest),
    /// `env`.
    Env { name: String, value: Bytes },
    /// `shell`.
    Shell,
    /// `exec`.
    Exec { command: Bytes },
    /// `subsystem`.
    Subsystem { name: String },
    /// `window-change`.
    WindowChange {
        cols: u32,
        rows: u32,
        width_px: u32,
        height_px: u32,
    },
    /// `signal`: a signal name without the `SIG` prefix.
    Signal { name: String },
    /// `exit-status`.
    ExitStatus { code: u32 },
    /// `exit-signal`.
    ExitSignal {
        name: String,
        core_dumped: bool,
        message: String,
    },
    /// Any other request, with its type-specific data undecoded.
    Other { name: String, data: Bytes },
}

impl ChannelRequest {
    /// The request type name.
    pub fn name(&self) -> &str {
        match self {
            Self::Pty(_) => "pty-req",
            Self::Env { .. } => "env",
            Self::Shell => "shell",
            Self::Exec { .. } => "exec",
            Self::Subsystem { .. } => "subsystem",
            Self::WindowChange { .. } => "window-change",
            Self::Signal { .. } => "signal",
            Self::ExitStatus { .. } => "exit-status",
            Self::ExitSignal { .. } => "exit-signal",
            Self::Other { name, .. } => name,
        }
    }

    /// Whether this is a request the core knows (the RFC 4254 set).
    pub fn is_standard(&self) -> bool {
        !matches!(self, Self::Other { .. })
    }

    /// Decodes the type-specific data of request `name`.
    pub fn decode(name: &str, r: &mut Reader<'_>) -> Result<Self> {
        Ok(match name {
            "pty-req" => Self::Pty(PtyRequest {
                term: r.utf8()?.to_owned(),
                cols: r.u32()?,
                rows: r.u32()?,
                width_px: r.u32()?,
                height_px: r.u32()?,
                modes: r.bytes()?,
            }),
            "env" => Self::Env {
                name: r.utf8()?.to_owned(),
                value: r.bytes()?,
            },
            "shell" => Self::Shell,
            "exec" => Self::Exec {
                command: r.bytes()?,
            },
            "subsystem" => Self::Subsystem {
                name: r.utf8()?.to_owned(),
            },
            "window-change" => Self::WindowChange {
                cols: r.u32()?,
                rows: r.u32()?,
                width_px: r.u32()?,
                height_px: r.u32()?,
            },
            "signal" => Self::Signal {
                name: r.utf8()?.to_owned(),
            },
            "exit-status" => Self::ExitStatus { code: r.u32()? },
            "exit-signal" => {
                let name = r.utf8()?.to_owned();
                let core_dumped = r.bool()?;
                let message = String::from_utf8_lossy(r.string()?).into_owned();
                // The language tag is optional in practice; read it if present.
                if r.remaining() > 0 {
                    r.string()?;
                }
                Self::ExitSignal {
                    name,
                    core_dumped,
                    message,
                }
            }
            other => Self::Other {
                name: other.to_owned(),
                data: r.rest_bytes(),
            },
        })
    }

    /// Encodes the type-specific data.
    pub fn encode_data(&self, b: &mut impl BufMut) {
        match self {
            Self::Pty(p) => {
                b.put_string(p.term.as_bytes());
                b.put_u32(p.cols);
                b.put_u32(p.rows);
                b.put_u32(p.width_px);
                b.put_u32(p.height_px);
                b.put_string(&p.modes);
            }
            Self::Env { name, value } => {
                b.put_string(name.as_bytes());
                b.put_string(value);
            }
            Self::Shell => {}
            Self::Exec { command } => b.put_string(command),
            Self::Subsystem { name } | Self::Signal { name } => b.put_string(name.as_bytes()),
            Self::WindowChange {
                cols,
                rows,
                width_px,
                height_px,
            } => {
                b.put_u32(*cols);
                b.put_u32(*rows);
                b.put_u32(*width_px);
                b.put_u32(*height_px);
            }
            Self::ExitStatus { code } => b.put_u32(*code),
            Self::ExitSignal {
                name,
                core_dumped,
                message,
            } => {
                b.put_string(name.as_bytes());
                b.put_bool(*core_dumped);
                b.put_string(message.as_bytes());
                b.put_string(b"");
            }
            Self::Other { data, .. } => b.put_slice(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_standard_request_round_trips() {
        let all = [
            ChannelRequest::Pty(PtyRequest {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
                width_px: 0,
                height_px: 0,
                modes: Bytes::from_static(&[0]),
            }),
            ChannelRequest::Env {
                name: "LANG".into(),
                value: Bytes::from_static(b"C"),
            },
            ChannelRequest::Shell,
            ChannelRequest::Exec {
                command: Bytes::from_static(b"echo hi"),
            },
            ChannelRequest::Subsystem {
                name: "sftp".into(),
            },
            ChannelRequest::WindowChange {
                cols: 132,
                rows: 43,
                width_px: 1,
                height_px: 2,
            },
            ChannelRequest::Signal {
                name: "TERM".into(),
            },
            ChannelRequest::ExitStatus { code: 3 },
            ChannelRequest::ExitSignal {
                name: "KILL".into(),
                core_dumped: true,
                message: "killed".into(),
            },
            ChannelRequest::Other {
                name: "start@tether".into(),
                data: Bytes::from_static(b"xyz"),
            },
        ];
        for req in all {
            let mut data = Vec::new();
            req.encode_data(&mut data);
            let back = ChannelRequest::decode(req.name(), &mut Reader::new(&data, "test")).unwrap();
            assert_eq!(back, req);
        }
    }
}
