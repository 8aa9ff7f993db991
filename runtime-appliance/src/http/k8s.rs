//! The Kubernetes remote-command WebSocket protocol (`v4.channel.k8s.io` and
//! `v5.channel.k8s.io`), as the kubelet speaks it and `kubectl exec` expects it.
//!
//! Every binary message starts with a channel byte: 0 stdin (client to server),
//! 1 stdout, 2 stderr, 3 status (server to client, one JSON `metav1.Status`),
//! 4 resize (client to server, JSON `{"Width":W,"Height":H}`). v5 adds 255,
//! "close a stream": `[255, 0]` closes stdin.
//!
//! Used by both the server (`crate::http`) and the CLI client (`crate::client`).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::api_types::{ApiError, ExitStatus};

/// The v5 subprotocol name (adds the close-stream message).
pub const V5: &str = "v5.channel.k8s.io";
/// The v4 subprotocol name.
pub const V4: &str = "v4.channel.k8s.io";

/// Channel bytes.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5 only: `[CLOSE, channel]` closes that stream.
pub const CLOSE: u8 = 255;

/// `metav1.Status` values the kubelet uses for a process end.
pub const NON_ZERO_EXIT_CODE_REASON: &str = "NonZeroExitCode";
pub const EXIT_CODE_CAUSE_TYPE: &str = "ExitCode";

/// A negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

impl Protocol {
    /// The `Sec-WebSocket-Protocol` token.
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => V4,
            Self::V5 => V5,
        }
    }

    /// The protocol a `Sec-WebSocket-Protocol` token names, if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim() {
            V5 => Some(Self::V5),
            V4 => Some(Self::V4),
            _ => None,
        }
    }

    /// Whether the client can close stdin (`[255, 0]`).
    pub fn supports_close(self) -> bool {
        self == Self::V5
    }
}

/// Picks a protocol from the values of the client's `Sec-WebSocket-Protocol`
/// headers (each a comma-separated list): v5 if offered, else v4.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<Protocol> {
    let mut best = None;
    for token in header_values.into_iter().flat_map(|v| v.split(',')) {
        match Protocol::from_name(token) {
            Some(Protocol::V5) => return Some(Protocol::V5),
            Some(Protocol::V4) => best = Some(Protocol::V4),
            None => {}
        }
    }
    best
}

/// One message: the channel byte, then `data`.
pub fn frame(channel: u8, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(1 + data.len());
    buf.put_u8(channel);
    buf.put_slice(data);
    buf.freeze()
}

/// A terminal size as the resize channel carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The resize message for a terminal of `width` columns and `height` rows.
pub fn resize_frame(width: u16, height: u16) -> Bytes {
    // Serializing two integers cannot fail; fall back to an empty object anyway.
    let json =
        serde_json::to_vec(&TerminalSize { width, height }).unwrap_or_else(|_| b"{}".to_vec());
    frame(RESIZE, &json)
}

/// A message from the client, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Stdin(Bytes),
    Resize(TerminalSize),
    /// v5: close the stream with this channel number.
    Close(u8),
}

/// A message from the server, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerFrame {
    Stdout(Bytes),
    Stderr(Bytes),
    Status(Status),
}

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty message (a message starts with a channel byte)")]
    Empty,
    #[error("unknown channel {channel} (for {protocol})")]
    UnknownChannel { channel: u8, protocol: &'static str },
    #[error("bad resize message {text:?}: {error} (expected {{\"Width\":W,\"Height\":H}})")]
    BadResize { text: String, error: String },
    #[error("bad close message: expected 2 bytes [255, channel], got {0} bytes")]
    BadClose(usize),
    #[error("bad status message {text:?}: {error}")]
    BadStatus { text: String, error: String },
}

/// Decodes a binary message a client sent.
pub fn parse_client(protocol: Protocol, msg: &Bytes) -> Result<ClientFrame, FrameError> {
    let (&channel, _) = msg.split_first().ok_or(FrameError::Empty)?;
    let data = msg.slice(1..);
    match channel {
        STDIN => Ok(ClientFrame::Stdin(data)),
        RESIZE => serde_json::from_slice(&data)
            .map(ClientFrame::Resize)
            .map_err(|e| FrameError::BadResize {
                text: String::from_utf8_lossy(&data).chars().take(100).collect(),
                error: e.to_string(),
            }),
        CLOSE if protocol.supports_close() => match *data {
            [stream] => Ok(ClientFrame::Close(stream)),
            _ => Err(FrameError::BadClose(msg.len())),
        },
        channel => Err(FrameError::UnknownChannel {
            channel,
            protocol: protocol.name(),
        }),
    }
}

/// Decodes a binary message the server sent.
pub fn parse_server(protocol: Protocol, msg: &Bytes) -> Result<ServerFrame, FrameError> {
    let (&channel, _) = msg.split_first().ok_or(FrameError::Empty)?;
    let data = msg.slice(1..);
    match channel {
        STDOUT => Ok(ServerFrame::Stdout(data)),
        STDERR => Ok(ServerFrame::Stderr(data)),
        STATUS => serde_json::from_slice(&data)
            .map(ServerFrame::Status)
            .map_err(|e| FrameError::BadStatus {
                text: String::from_utf8_lossy(&data).chars().take(200).collect(),
                error: e.to_string(),
            }),
        channel => Err(FrameError::UnknownChannel {
            channel,
            protocol: protocol.name(),
        }),
    }
}

/// `metav1.Status`, in the field order and with the omissions Go's
/// `encoding/json` produces (`metadata` is always present, empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default = "empty_object")]
    pub metadata: serde_json::Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

/// `metav1.StatusDetails` (only the fields used here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
}

/// `metav1.StatusCause`; Go names the `Type` field `reason` in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatusCause {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl Status {
    /// How the kubelet reports a process end: `Success` for exit code 0,
    /// otherwise `Failure` with reason `NonZeroExitCode` and an `ExitCode`
    /// cause holding the code (128+N for a signal N, as a shell shows it).
    pub fn from_exit(exit: &ExitStatus) -> Self {
        let code = exit.code();
        if code == 0 {
            return Self {
                status: "Success".into(),
                ..Self::failure(String::new(), None, None)
            };
        }
        let why = match exit {
            ExitStatus::Code(c) => format!("exit status {c}"),
            ExitStatus::Signal {
                name,
                core_dumped: false,
            } => format!("signal: SIG{name}"),
            ExitStatus::Signal {
                name,
                core_dumped: true,
            } => format!("signal: SIG{name} (core dumped)"),
        };
        Self {
            message: Some(format!("command terminated with non-zero exit code: {why}")),
            reason: Some(NON_ZERO_EXIT_CODE_REASON.into()),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    reason: Some(EXIT_CODE_CAUSE_TYPE.into()),
                    message: Some(code.to_string()),
                    field: None,
                }],
            }),
            ..Self::failure(String::new(), None, None)
        }
    }

    /// A `Failure` status for an operation error.
    pub fn from_error(err: &ApiError) -> Self {
        Self::failure(
            err.to_string(),
            Some(err.reason()),
            i32::from(err.status()).into(),
        )
    }

    fn failure(message: String, reason: Option<&str>, code: Option<i32>) -> Self {
        Self {
            metadata: empty_object(),
            status: "Failure".into(),
            message: (!message.is_empty()).then_some(message),
            reason: reason.map(Into::into),
            details: None,
            code,
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The process's exit code this status reports, or the failure message
    /// when it reports an error rather than an exit.
    pub fn exit_code(&self) -> Result<u32, String> {
        match self.status.as_str() {
            "Success" => Ok(0),
            "Failure" if self.reason.as_deref() == Some(NON_ZERO_EXIT_CODE_REASON) => self
                .details
                .iter()
                .flat_map(|d| &d.causes)
                .find(|c| c.reason.as_deref() == Some(EXIT_CODE_CAUSE_TYPE))
                .and_then(|c| c.message.as_deref())
                .ok_or_else(|| "status NonZeroExitCode without an ExitCode cause".to_string())
                .and_then(|m| {
                    m.parse()
                        .map_err(|_| format!("status ExitCode cause is not a number: {m:?}"))
                }),
            "Failure" => Err(self
                .message
                .clone()
                .unwrap_or_else(|| "failure without a message".into())),
            other => Err(format!("unknown status {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_status_is_the_kubelet_json() {
        let json = String::from_utf8(Status::from_exit(&ExitStatus::Code(0)).to_json()).unwrap();
        assert_eq!(json, r#"{"metadata":{},"status":"Success"}"#);
    }

    #[test]
    fn non_zero_exit_status_is_the_kubelet_json() {
        let json = String::from_utf8(Status::from_exit(&ExitStatus::Code(3)).to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit status 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
        let killed = Status::from_exit(&ExitStatus::Signal {
            name: "KILL".into(),
            core_dumped: false,
        });
        assert_eq!(killed.exit_code(), Ok(137));
        assert!(killed.message.unwrap().ends_with("signal: SIGKILL"));
    }

    #[test]
    fn status_round_trips_and_reports_exit_codes() {
        for code in [0, 1, 3, 130, 255] {
            let st = Status::from_exit(&ExitStatus::Code(code));
            let back: Status = serde_json::from_slice(&st.to_json()).unwrap();
            assert_eq!(back.exit_code(), Ok(code));
        }
        let err = Status::from_error(&ApiError::LinkDown("gone".into()));
        assert_eq!(
            String::from_utf8(err.to_json()).unwrap(),
            r#"{"metadata":{},"status":"Failure","message":"link to the guest is down: gone","reason":"ServiceUnavailable","code":503}"#
        );
        assert_eq!(
            err.exit_code(),
            Err("link to the guest is down: gone".into())
        );
        // What a Go kubelet sends (with "code" absent and extra fields) parses too.
        let go: Status = serde_json::from_str(
            r#"{"metadata":{},"status":"Failure","message":"x","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"42"}]}}"#,
        )
        .unwrap();
        assert_eq!(go.exit_code(), Ok(42));
        let bad: Status =
            serde_json::from_str(r#"{"status":"Failure","reason":"NonZeroExitCode"}"#).unwrap();
        assert!(
            bad.exit_code()
                .unwrap_err()
                .contains("without an ExitCode cause")
        );
    }

    #[test]
    fn negotiation_prefers_v5() {
        assert_eq!(negotiate([V4, V5]), Some(Protocol::V5));
        assert_eq!(
            negotiate(["channel.k8s.io, v4.channel.k8s.io"]),
            Some(Protocol::V4)
        );
        assert_eq!(
            negotiate(["v4.channel.k8s.io", " v5.channel.k8s.io "]),
            Some(Protocol::V5)
        );
        assert_eq!(negotiate(["base64.channel.k8s.io"]), None);
        assert_eq!(negotiate([]), None);
    }

    #[test]
    fn client_frames_decode() {
        let p = Protocol::V5;
        assert_eq!(
            parse_client(p, &frame(STDIN, b"hi")),
            Ok(ClientFrame::Stdin(Bytes::from_static(b"hi")))
        );
        assert_eq!(
            parse_client(p, &frame(STDIN, b"")),
            Ok(ClientFrame::Stdin(Bytes::new()))
        );
        assert_eq!(
            parse_client(p, &resize_frame(80, 24)),
            Ok(ClientFrame::Resize(TerminalSize {
                width: 80,
                height: 24
            }))
        );
        assert_eq!(&resize_frame(80, 24)[1..], br#"{"Width":80,"Height":24}"#);
        // kubectl's json.Encoder adds a newline.
        assert!(parse_client(p, &frame(RESIZE, b"{\"Width\":1,\"Height\":2}\n")).is_ok());
        assert_eq!(
            parse_client(p, &Bytes::from_static(&[255, 0])),
            Ok(ClientFrame::Close(0))
        );
        assert_eq!(parse_client(p, &Bytes::new()), Err(FrameError::Empty));
        assert_eq!(
            parse_client(p, &Bytes::from_static(&[255])),
            Err(FrameError::BadClose(1))
        );
        assert!(matches!(
            parse_client(Protocol::V4, &Bytes::from_static(&[255, 0])),
            Err(FrameError::UnknownChannel { channel: 255, .. })
        ));
        assert!(matches!(
            parse_client(p, &frame(7, b"")),
            Err(FrameError::UnknownChannel { channel: 7, .. })
        ));
        let bad = parse_client(p, &frame(RESIZE, b"{\"Width\":-1}")).unwrap_err();
        assert!(bad.to_string().contains("bad resize message"), "{bad}");
    }

    #[test]
    fn server_frames_decode() {
        let p = Protocol::V4;
        assert_eq!(
            parse_server(p, &frame(STDOUT, b"o")),
            Ok(ServerFrame::Stdout(Bytes::from_static(b"o")))
        );
        assert_eq!(
            parse_server(p, &frame(STDERR, b"e")),
            Ok(ServerFrame::Stderr(Bytes::from_static(b"e")))
        );
        let st = Status::from_exit(&ExitStatus::Code(9));
        assert_eq!(
            parse_server(p, &frame(STATUS, &st.to_json())),
            Ok(ServerFrame::Status(st))
        );
        assert!(matches!(
            parse_server(p, &frame(STATUS, b"{nope")),
            Err(FrameError::BadStatus { .. })
        ));
        assert!(matches!(
            parse_server(p, &frame(STDIN, b"x")),
            Err(FrameError::UnknownChannel { .. })
        ));
    }
}
