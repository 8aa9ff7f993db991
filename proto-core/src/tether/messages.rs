//! The `@tether` messages (docs/PROTOCOL.md section 4) as typed values with
//! their RFC 4251 encodings, and the configuration that lets them through.

use bytes::BufMut;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::wire::{PutSsh, Reader};

/// Global request: list of sessions (appliance to guest, and guest pushes).
pub const CONTAINER_IDS: &str = "container-ids@tether";
/// Channel type: attach to a session's stdio.
pub const ATTACH: &str = "attach@tether";
/// Channel request: the offset an attach channel's output starts at.
pub const OFFSET: &str = "offset@tether";
/// Channel request: output was lost before the replay point.
pub const OUTPUT_GAP: &str = "output-gap@tether";
/// Channel request: release a start-gated session.
pub const START: &str = "start@tether";
/// Channel request: the id the guest gave an exec.
pub const EXEC_ID: &str = "exec-id@tether";
/// Global request: quiesce for a VM fork.
pub const FORK: &str = "fork@tether";
/// Global request: a forked child announces itself.
pub const FORKED: &str = "forked@tether";
/// `from` value of an attach that wants live output only.
pub const LIVE: u64 = u64::MAX;

/// Most entries a container list may carry.
const MAX_ENTRIES: u32 = 100_000;

/// Lets the tether extensions through a guest's (server) configuration, and
/// requires strict key exchange (the tether profile).
pub fn enable_guest(config: &mut Config) {
    config.require_strict_kex = true;
    config.channel_types.push(ATTACH.into());
    config
        .global_requests
        .extend([CONTAINER_IDS.into(), FORK.into()]);
    config.channel_requests.extend([START.into()]);
}

/// Lets the tether extensions through an appliance's (client) configuration,
/// and requires strict key exchange (the tether profile).
pub fn enable_appliance(config: &mut Config) {
    config.require_strict_kex = true;
    config
        .global_requests
        .extend([CONTAINER_IDS.into(), FORKED.into()]);
    config
        .channel_requests
        .extend([OFFSET.into(), OUTPUT_GAP.into(), EXEC_ID.into()]);
}

/// What a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// The container's own process.
    Primary,
    /// A process started later by `exec`.
    Exec,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Configured, not started (start-gated).
    Created,
    Running,
    Exited,
}

impl Kind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Exec => "exec",
        }
    }
}

impl State {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Exited => "exited",
        }
    }
}

fn malformed(what: &'static str) -> Error {
    Error::Malformed {
        msg: CONTAINER_IDS,
        what,
    }
}

/// One entry of `container-ids@tether`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerInfo {
    pub id: String,
    pub kind: Kind,
    pub state: State,
    /// 0 unless exited; 128+N when killed by signal N.
    pub exit_status: u32,
    /// Offset one past the last output byte so far.
    pub output_end: u64,
    /// Whether the session has a terminal (then all output is stdout).
    pub tty: bool,
}

/// Encodes a container list, sorted by id.
pub fn encode_container_ids(entries: &[ContainerInfo], b: &mut impl BufMut) {
    let mut sorted: Vec<&ContainerInfo> = entries.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    b.put_u32(sorted.len() as u32);
    for e in sorted {
        b.put_string(e.id.as_bytes());
        b.put_string(e.kind.as_str().as_bytes());
        b.put_string(e.state.as_str().as_bytes());
        b.put_u32(e.exit_status);
        b.put_u64(e.output_end);
        b.put_bool(e.tty);
    }
}

/// Decodes a container list.
pub fn decode_container_ids(data: &[u8]) -> Result<Vec<ContainerInfo>> {
    let mut r = Reader::new(data, CONTAINER_IDS);
    let count = r.u32()?;
    // Each entry takes at least 33 bytes: never trust the count for allocation.
    if count > MAX_ENTRIES || count as usize > r.remaining() / 33 {
        return Err(malformed("entry count larger than the message"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let id = r.utf8()?.to_owned();
        let kind = match r.utf8()? {
            "primary" => Kind::Primary,
            "exec" => Kind::Exec,
            _ => return Err(malformed("unknown kind")),
        };
        let state = match r.utf8()? {
            "created" => State::Created,
            "running" => State::Running,
            "exited" => State::Exited,
            _ => return Err(malformed("unknown state")),
        };
        out.push(ContainerInfo {
            id,
            kind,
            state,
            exit_status: r.u32()?,
            output_end: r.u64()?,
            tty: r.bool()?,
        });
    }
    Ok(out)
}

/// The extra data of an `attach@tether` channel open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The session to attach to.
    pub id: String,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// Output offset to replay from; [`LIVE`] for live output only.
    pub from: u64,
}

impl AttachRequest {
    /// Encodes the channel-open extra data.
    pub fn encode(&self, b: &mut impl BufMut) {
        b.put_string(self.id.as_bytes());
        b.put_bool(self.stdin);
        b.put_bool(self.stdout);
        b.put_bool(self.stderr);
        b.put_u64(self.from);
    }

    /// Decodes the channel-open extra data.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data, ATTACH);
        Ok(Self {
            id: r.utf8()?.to_owned(),
            stdin: r.bool()?,
            stdout: r.bool()?,
            stderr: r.bool()?,
            from: r.u64()?,
        })
    }
}

/// `offset@tether` data.
pub fn encode_offset(offset: u64, b: &mut impl BufMut) {
    b.put_u64(offset);
}

/// Decodes `offset@tether` data.
pub fn decode_offset(data: &[u8]) -> Result<u64> {
    Reader::new(data, OFFSET).u64()
}

/// `output-gap@tether` data: bytes lost before the replay point.
pub fn encode_output_gap(lost: u64, b: &mut impl BufMut) {
    b.put_u64(lost);
}

/// Decodes `output-gap@tether` data.
pub fn decode_output_gap(data: &[u8]) -> Result<u64> {
    Reader::new(data, OUTPUT_GAP).u64()
}

/// `exec-id@tether` data.
pub fn encode_exec_id(id: &str, b: &mut impl BufMut) {
    b.put_string(id.as_bytes());
}

/// Decodes `exec-id@tether` data.
pub fn decode_exec_id(data: &[u8]) -> Result<String> {
    Ok(Reader::new(data, EXEC_ID).utf8()?.to_owned())
}

/// How a session's process ended, as `exit-status` or `exit-signal` carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(u32),
    /// It was killed by this signal (name without "SIG").
    Signal { name: String, core_dumped: bool },
}

impl ExitStatus {
    /// Killed by `signal`.
    pub fn signal(signal: super::Signal, core_dumped: bool) -> Self {
        Self::Signal {
            name: signal.name(),
            core_dumped,
        }
    }

    /// The shell's view: the code, or 128+N for signal N.
    pub fn code(&self) -> u32 {
        match self {
            Self::Code(c) => *c,
            Self::Signal { name, .. } => {
                128 + super::Signal::parse(name).map_or(0, |s| s.number() as u32)
            }
        }
    }

    /// The channel request that reports it.
    pub fn request(&self) -> crate::ChannelRequest {
        match self {
            Self::Code(code) => crate::ChannelRequest::ExitStatus { code: *code },
            Self::Signal { name, core_dumped } => crate::ChannelRequest::ExitSignal {
                name: name.clone(),
                core_dumped: *core_dumped,
                message: String::new(),
            },
        }
    }
}

/// What a `fork@tether` request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForkMode {
    /// Stop the sessions, drain, sync, reply with the generation, disconnect.
    Quiesce,
    /// Continue the stopped sessions (the parent, after the save).
    Resume,
}

impl ForkMode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quiesce => "quiesce",
            Self::Resume => "resume",
        }
    }

    /// The mode a wire name stands for.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "quiesce" => Some(Self::Quiesce),
            "resume" => Some(Self::Resume),
            _ => None,
        }
    }
}

/// `fork@tether` data.
pub fn encode_fork(mode: ForkMode, b: &mut impl BufMut) {
    b.put_string(mode.as_str().as_bytes());
}

/// Decodes `fork@tether` data: the mode, as sent (a guest refuses modes it
/// does not know).
pub fn decode_fork(data: &[u8]) -> Result<String> {
    Ok(Reader::new(data, FORK).utf8()?.to_owned())
}

/// The SUCCESS data of `fork@tether`: the guest's identity generation.
pub fn encode_fork_reply(generation: u64, b: &mut impl BufMut) {
    b.put_u64(generation);
}

/// Decodes the SUCCESS data of `fork@tether`.
pub fn decode_fork_reply(data: &[u8]) -> Result<u64> {
    Reader::new(data, FORK).u64()
}

/// `forked@tether` data: a child announces itself (docs/PROTOCOL.md 4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forked {
    /// The container id forked from.
    pub parent_id: String,
    /// This VM's container id.
    pub new_id: String,
    /// This VM's identity generation.
    pub generation: u64,
    /// Empty if every recovery step succeeded, else `step: reason`.
    pub failure: String,
    /// Microseconds from noticing the new identity to this request.
    pub recovery_us: u64,
}

impl Forked {
    pub fn encode(&self, b: &mut impl BufMut) {
        b.put_string(self.parent_id.as_bytes());
        b.put_string(self.new_id.as_bytes());
        b.put_u64(self.generation);
        b.put_string(self.failure.as_bytes());
        b.put_u64(self.recovery_us);
    }

    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data, FORKED);
        Ok(Self {
            parent_id: r.utf8()?.to_owned(),
            new_id: r.utf8()?.to_owned(),
            generation: r.u64()?,
            failure: r.utf8()?.to_owned(),
            recovery_us: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            kind: Kind::Exec,
            state: State::Exited,
            exit_status: 137,
            output_end: 1 << 40,
            tty: true,
        }
    }

    #[test]
    fn container_ids_are_sorted_and_round_trip() {
        let mut b = Vec::new();
        encode_container_ids(&[info("b"), info("a")], &mut b);
        let back = decode_container_ids(&b).unwrap();
        assert_eq!(back, [info("a"), info("b")]);
        let mut empty = Vec::new();
        encode_container_ids(&[], &mut empty);
        assert_eq!(empty, [0, 0, 0, 0]);
    }

    #[test]
    fn a_lying_count_does_not_allocate() {
        assert!(decode_container_ids(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_container_ids(&[0, 0, 0, 1]).is_err());
    }

    #[test]
    fn attach_request_bytes_match_protocol_md() {
        let req = AttachRequest {
            id: "c1".into(),
            stdin: true,
            stdout: true,
            stderr: false,
            from: LIVE,
        };
        let mut b = Vec::new();
        req.encode(&mut b);
        assert_eq!(
            b,
            [
                0, 0, 0, 2, b'c', b'1', 1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]
        );
        assert_eq!(AttachRequest::decode(&b).unwrap(), req);
    }

    #[test]
    fn forked_bytes_match_protocol_md() {
        let f = Forked {
            parent_id: "w".into(),
            new_id: "w-1".into(),
            generation: 7,
            failure: "clock: no RTC".into(),
            recovery_us: 0x0102,
        };
        let mut b = Vec::new();
        f.encode(&mut b);
        let mut want = vec![0, 0, 0, 1, b'w', 0, 0, 0, 3, b'w', b'-', b'1'];
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 13]);
        want.extend_from_slice(b"clock: no RTC");
        want.extend_from_slice(&0x0102u64.to_be_bytes());
        assert_eq!(b, want);
        assert_eq!(Forked::decode(&b).unwrap(), f);
        // The three-field form of an earlier draft is refused.
        assert!(Forked::decode(&want[..20]).is_err());
    }

    #[test]
    fn fork_modes_round_trip() {
        for mode in [ForkMode::Quiesce, ForkMode::Resume] {
            let mut b = Vec::new();
            encode_fork(mode, &mut b);
            assert_eq!(ForkMode::parse(&decode_fork(&b).unwrap()), Some(mode));
        }
        assert_eq!(ForkMode::parse("split"), None);
        let mut b = Vec::new();
        encode_fork_reply(9, &mut b);
        assert_eq!(decode_fork_reply(&b).unwrap(), 9);
    }
}
