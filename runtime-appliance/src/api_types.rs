//! The appliance's operations as the HTTP API, the CLI and the demo see them:
//! container views, attach and exec options, output, exit statuses and errors.

use std::time::Duration;

use bytes::Bytes;
use proto_core::tether::{Kind, State};
use serde::Serialize;

/// A container as `GET /v1/containers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerView {
    pub id: String,
    /// "primary" or "exec".
    pub kind: &'static str,
    /// "created", "running" or "exited".
    pub state: &'static str,
    /// Set once exited: the code, or 128+N when killed by signal N.
    pub exit_code: Option<u32>,
    /// The generation number of the link serving it; `None` once the link is gone.
    pub connection: Option<u64>,
    /// Offset one past the last output byte the guest reported.
    pub output_end: u64,
    /// Whether the process has a terminal.
    pub tty: bool,
    /// The container its VM was forked from (a fork's child).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<String>,
    /// The recovery step that failed in its forked VM (`step: reason`): its
    /// processes stay stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork_failure: Option<String>,
}

impl ContainerView {
    /// The view of a guest's container-list entry.
    pub fn new(info: &proto_core::tether::ContainerInfo, connection: Option<u64>) -> Self {
        Self {
            id: info.id.clone(),
            kind: kind_name(info.kind),
            state: info.state.as_str(),
            exit_code: (info.state == State::Exited).then_some(info.exit_status),
            connection,
            output_end: info.output_end,
            tty: info.tty,
            forked_from: None,
            fork_failure: None,
        }
    }

    /// The view with how its VM came from a fork.
    pub fn with_note(mut self, note: Option<crate::forks::ForkNote>) -> Self {
        if let Some(note) = note {
            self.forked_from = Some(note.forked_from);
            self.fork_failure = note.failure;
        }
        self
    }
}

fn kind_name(kind: Kind) -> &'static str {
    kind.as_str()
}

/// Where an attach's output starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Replay from this offset (0 = everything retained).
    Offset(u64),
    /// Live output only.
    Live,
}

/// What an attach wants.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub from: From,
    /// How long to wait for the container to appear (VIC waited 50 s).
    pub timeout: Duration,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            stdin: false,
            stdout: true,
            stderr: true,
            from: From::Offset(0),
            timeout: Duration::from_secs(50),
        }
    }
}

/// What an exec wants.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// argv; run through the guest's `exec` (joined with spaces, as SSH does).
    pub command: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    /// Initial terminal size (cols, rows) when `tty`.
    pub size: Option<(u32, u32)>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// How long to wait for the container to appear.
    pub timeout: Duration,
}

/// What a logs request wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogsOptions {
    /// The output offset to start at.
    pub from: u64,
    /// Keep streaming until the process has exited and all its output was sent.
    pub follow: bool,
    /// Start each line with the time tetherd received it (RFC 3339, UTC, ns).
    pub timestamps: bool,
    /// Only output received at or after this time.
    pub since: Option<std::time::SystemTime>,
    /// Only the last this many lines (before `follow` goes on).
    pub tail: Option<usize>,
}

pub use proto_core::tether::ExitStatus;

/// One piece of an attachment's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    /// This many bytes were lost before the replay point (drop-oldest overflow).
    Gap(u64),
    /// The process ended (after all its output).
    Exit(ExitStatus),
}

/// Why an operation failed; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No such container (HTTP 404).
    #[error("no such container: {0}")]
    NotFound(String),
    /// The container did not appear in time (HTTP 404, reason "Timeout").
    #[error("container {id} did not appear within {waited:?}")]
    Timeout { id: String, waited: Duration },
    /// The request is malformed (HTTP 400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The guest refused (HTTP 409), e.g. an exited container without retained output.
    #[error("{0}")]
    Refused(String),
    /// The link to the guest failed mid-operation (HTTP 503).
    #[error("link to the guest is down: {0}")]
    LinkDown(String),
    /// This tetherd cannot do that now, e.g. boot a VM without QEMU (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// This tetherd does not offer the operation at all (HTTP 501).
    #[error("{0}")]
    Unsupported(String),
    /// Something failed on this side, e.g. writing the state directory (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) | Self::Timeout { .. } => 404,
            Self::BadRequest(_) => 400,
            Self::Refused(_) => 409,
            Self::LinkDown(_) | Self::Unavailable(_) => 503,
            Self::Unsupported(_) => 501,
            Self::Internal(_) => 500,
        }
    }

    /// A short machine-readable reason (used as metav1.Status reason too).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "NotFound",
            Self::Timeout { .. } => "Timeout",
            Self::BadRequest(_) => "BadRequest",
            Self::Refused(_) => "Conflict",
            Self::LinkDown(_) | Self::Unavailable(_) => "ServiceUnavailable",
            Self::Unsupported(_) => "NotImplemented",
            Self::Internal(_) => "InternalError",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_exit_codes_follow_the_shell() {
        assert_eq!(
            ExitStatus::Signal {
                name: "KILL".into(),
                core_dumped: false
            }
            .code(),
            137
        );
        assert_eq!(
            ExitStatus::Signal {
                name: "RTMIN+2".into(),
                core_dumped: false
            }
            .code(),
            128 + 36
        );
        assert_eq!(ExitStatus::Code(3).code(), 3);
    }
}
