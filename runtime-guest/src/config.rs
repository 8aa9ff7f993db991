//! The guest configuration: JSON, documented field by field in docs/CONFIG.md.
//! Unknown fields are errors, and every error names the field it is about
//! (`sessions[0].overflow: unknown variant ...`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto_core::outlog::Overflow;
use proto_core::tether::Signal;
use proto_core::{PrivateKey, PublicKey};
use serde::Deserialize;

use crate::init::network::{NicSpec, RawNetwork};
use crate::init::{modules, secrets, storage, system};
use crate::linkspec::LinkSpec;

use config_error as err;

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    /// The field, e.g. `sessions[0].cmd`; or the file for I/O errors.
    pub path: String,
    pub message: String,
}

/// A configuration error about `path` (a field, or where the config came from).
pub fn config_error(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub id: String,
    pub host_key: String,
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    #[serde(default)]
    pub allow_none_auth: bool,
    pub sessions: Vec<RawSession>,
    #[serde(default)]
    pub link: Option<String>,
    #[serde(default)]
    pub shell: Option<String>,
    #[serde(default)]
    pub exit_linger: Option<String>,
    #[serde(default)]
    pub keepalive: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub domainname: Option<String>,
    #[serde(default)]
    pub hosts: Vec<HostEntry>,
    #[serde(default)]
    pub dns: Option<Dns>,
    #[serde(default)]
    pub mounts: Vec<storage::RawMount>,
    #[serde(default)]
    pub rootfs: Option<storage::RawRootfs>,
    #[serde(default)]
    pub networks: Vec<RawNetwork>,
    #[serde(default)]
    pub secrets: Vec<secrets::RawSecret>,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub sysctls: BTreeMap<String, system::SysctlValue>,
    #[serde(default)]
    pub ulimits: BTreeMap<String, [system::RawLimit; 2]>,
    #[serde(default)]
    pub fork: Option<RawFork>,
    #[serde(default)]
    pub fork_timeout: Option<String>,
}

/// `fork` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFork {
    pub backend: ForkBackend,
    /// `qemu` only: the identity file to read instead of the fw_cfg one
    /// (a hypervisor integration that hands it over otherwise, or a test).
    #[serde(default)]
    pub identity: Option<PathBuf>,
}

/// Where a guest's fork identity comes from (docs/PROTOCOL.md 4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForkBackend {
    /// QEMU: the fw_cfg file `opt/tether/identity`.
    Qemu,
    /// VMware: guestinfo over the backdoor, frozen with `instantclone.freeze`.
    Vmware,
    /// No forking: `fork@tether` is refused.
    None,
}

/// One session as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSession {
    pub id: String,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default = "yes")]
    pub stdin: bool,
    #[serde(default)]
    pub start_gated: bool,
    #[serde(default)]
    pub start_gate_timeout: Option<String>,
    #[serde(default)]
    pub start_gate_expiry: GateExpiry,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub output_buffer: Option<usize>,
    #[serde(default)]
    pub overflow: OverflowName,
    #[serde(default)]
    pub tty_size: Option<[u16; 2]>,
    #[serde(default)]
    pub fork_signal: Option<String>,
    #[serde(default)]
    pub fork_grace: Option<String>,
}

fn yes() -> bool {
    true
}

/// `/etc/hosts` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub ip: String,
    pub names: Vec<String>,
}

/// `resolv.conf` contents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// What a start-gated session does when its gate times out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateExpiry {
    /// Start anyway (default).
    #[default]
    Start,
    /// Do not start: the session exits with status 125.
    Fail,
}

/// The overflow policy as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowName {
    #[default]
    DropOldest,
    Block,
}

/// A validated session.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub id: String,
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub user: Option<String>,
    pub tty: bool,
    pub stdin: bool,
    pub start_gate: Option<(Duration, GateExpiry)>,
    pub stop_signal: Signal,
    pub output_buffer: usize,
    pub overflow: Overflow,
    pub tty_size: (u16, u16),
    /// Sent before a fork's SIGSTOP (beforeCheckpoint) and after its SIGCONT
    /// (afterRestore).
    pub fork_signal: Option<Signal>,
    /// How long the session has to act on `fork_signal` before it is stopped.
    pub fork_grace: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: String,
    pub host_key: PrivateKey,
    pub authorized_keys: Vec<PublicKey>,
    pub allow_none_auth: bool,
    pub sessions: Vec<SessionSpec>,
    pub link: Option<LinkSpec>,
    pub shell: String,
    pub exit_linger: Duration,
    pub keepalive: Duration,
    /// `None`: QEMU when its identity file exists, else no forking.
    pub fork_backend: Option<ForkBackend>,
    /// The `qemu` backend's identity file, when not fw_cfg's.
    pub fork_identity: Option<PathBuf>,
    /// How long a quiesced guest waits to be resumed (or to find itself a
    /// child) before it resumes on its own.
    pub fork_timeout: Duration,
    pub raw_os: OsConfig,
}

/// OS configuration fields, validated (applied only when running as PID 1).
#[derive(Debug, Clone, Default)]
pub struct OsConfig {
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub hosts: Vec<HostEntry>,
    pub dns: Option<Dns>,
    /// Parents before children.
    pub mounts: Vec<storage::MountSpec>,
    pub rootfs: Option<storage::MountSpec>,
    /// Validated `networks` (see `init::network`).
    pub networks: Vec<NicSpec>,
    pub secrets: Vec<secrets::Secret>,
    pub modules: Vec<String>,
    pub sysctls: Vec<system::Sysctl>,
    pub ulimits: Vec<system::Ulimit>,
}

impl OsConfig {
    /// Whether the config asks for any OS configuration.
    pub fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.domainname.is_none()
            && self.hosts.is_empty()
            && self.dns.is_none()
            && self.mounts.is_empty()
            && self.rootfs.is_none()
            && self.networks.is_empty()
            && self.secrets.is_empty()
            && self.modules.is_empty()
            && self.sysctls.is_empty()
            && self.ulimits.is_empty()
    }
}

/// Default output log capacity per session.
pub const DEFAULT_OUTPUT_BUFFER: usize = 1 << 20;

fn duration(
    path: &str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| err(path, format!("not a duration like \"30s\": {e}"))),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), e.to_string()))?;
        Self::parse(&text, path.parent())
    }

    /// Parses and validates config text; relative key paths resolve against `base`.
    pub fn parse(text: &str, base: Option<&Path>) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            err(
                if path == "." {
                    "(top level)".into()
                } else {
                    path
                },
                e.inner().to_string(),
            )
        })?;
        Self::validate(raw, base)
    }

    fn validate(raw: RawConfig, base: Option<&Path>) -> Result<Self, ConfigError> {
        if raw.id.is_empty() {
            return Err(err("id", "must not be empty"));
        }
        let key_text = if raw.host_key.trim_start().starts_with("-----BEGIN") {
            raw.host_key.clone()
        } else {
            let p = base
                .map(|b| b.join(&raw.host_key))
                .unwrap_or_else(|| PathBuf::from(&raw.host_key));
            std::fs::read_to_string(&p)
                .map_err(|e| err("host_key", format!("cannot read {}: {e}", p.display())))?
        };
        let host_key =
            PrivateKey::from_openssh(&key_text).map_err(|e| err("host_key", e.to_string()))?;
        let authorized_keys = raw
            .authorized_keys
            .iter()
            .enumerate()
            .map(|(i, line)| {
                PublicKey::from_openssh(line)
                    .map_err(|e| err(format!("authorized_keys[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if authorized_keys.is_empty() && !raw.allow_none_auth {
            return Err(err(
                "authorized_keys",
                "no keys: the appliance could never authenticate (set allow_none_auth for development)",
            ));
        }
        if raw.sessions.is_empty() {
            return Err(err(
                "sessions",
                "at least one session (the primary, whose id is the container id) is required",
            ));
        }
        let mut sessions = Vec::new();
        for (i, s) in raw.sessions.into_iter().enumerate() {
            let at = |f: &str| format!("sessions[{i}].{f}");
            if s.id.is_empty() || s.id.contains(['/', ' ']) {
                return Err(err(
                    at("id"),
                    "must be non-empty, without spaces or slashes",
                ));
            }
            if sessions.iter().any(|x: &SessionSpec| x.id == s.id) {
                return Err(err(at("id"), format!("duplicate session id {:?}", s.id)));
            }
            if s.cmd.is_empty() || s.cmd[0].is_empty() {
                return Err(err(at("cmd"), "must name a program"));
            }
            let stop_signal = match &s.stop_signal {
                None => Signal::TERM,
                Some(name) => Signal::parse(name)
                    .ok_or_else(|| err(at("stop_signal"), format!("unknown signal {name:?}")))?,
            };
            let start_gate = if s.start_gated {
                Some((
                    duration(
                        &at("start_gate_timeout"),
                        &s.start_gate_timeout,
                        Duration::from_secs(30),
                    )?,
                    s.start_gate_expiry,
                ))
            } else {
                if s.start_gate_timeout.is_some() {
                    return Err(err(
                        at("start_gate_timeout"),
                        "set only with start_gated = true",
                    ));
                }
                None
            };
            let fork_signal =
                match &s.fork_signal {
                    None => None,
                    Some(name) => Some(Signal::parse(name).ok_or_else(|| {
                        err(at("fork_signal"), format!("unknown signal {name:?}"))
                    })?),
                };
            let fork_grace = duration(&at("fork_grace"), &s.fork_grace, Duration::from_secs(1))?;
            let output_buffer = s.output_buffer.unwrap_or(DEFAULT_OUTPUT_BUFFER);
            if output_buffer == 0 {
                return Err(err(at("output_buffer"), "must be at least 1 byte"));
            }
            let tty_size = s.tty_size.map(|[c, r]| (c, r)).unwrap_or((80, 24));
            if tty_size.0 == 0 || tty_size.1 == 0 {
                return Err(err(at("tty_size"), "columns and rows must be positive"));
            }
            for k in s.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(err(at(&format!("env.{k}")), "not a valid variable name"));
                }
            }
            sessions.push(SessionSpec {
                id: s.id,
                cmd: s.cmd,
                env: s.env,
                cwd: s.cwd,
                user: s.user,
                tty: s.tty,
                stdin: s.stdin,
                start_gate,
                stop_signal,
                output_buffer,
                overflow: match s.overflow {
                    OverflowName::DropOldest => Overflow::DropOldest,
                    OverflowName::Block => Overflow::Block,
                },
                tty_size,
                fork_signal,
                fork_grace,
            });
        }
        if !sessions.iter().any(|s| s.id == raw.id) {
            return Err(err(
                "sessions",
                format!(
                    "no session has the container id {:?}: that session is the primary",
                    raw.id
                ),
            ));
        }
        let networks =
            crate::init::network::validate(&raw.networks).map_err(|e| err(e.path, e.message))?;
        let link = match &raw.link {
            None => None,
            Some(spec) => Some(spec.parse::<LinkSpec>().map_err(|e| err("link", e))?),
        };
        let (fork_backend, fork_identity) = match raw.fork {
            None => (None, None),
            Some(RawFork {
                backend,
                identity: Some(_),
            }) if backend != ForkBackend::Qemu => {
                return Err(err(
                    "fork.identity",
                    "only the qemu backend reads an identity file",
                ));
            }
            Some(f) => (Some(f.backend), f.identity),
        };
        Ok(Config {
            id: raw.id,
            host_key,
            authorized_keys,
            allow_none_auth: raw.allow_none_auth,
            sessions,
            link,
            shell: raw.shell.unwrap_or_else(|| "/bin/sh".into()),
            exit_linger: duration("exit_linger", &raw.exit_linger, Duration::from_secs(30))?,
            keepalive: duration("keepalive", &raw.keepalive, Duration::from_secs(4))?,
            fork_backend,
            fork_identity,
            fork_timeout: duration("fork_timeout", &raw.fork_timeout, Duration::from_secs(60))?,
            raw_os: OsConfig {
                hostname: system::validate_name("hostname", raw.hostname)?,
                domainname: system::validate_name("domainname", raw.domainname)?,
                hosts: system::validate_hosts(raw.hosts)?,
                dns: system::validate_dns(raw.dns)?,
                mounts: storage::validate_mounts(raw.mounts)?,
                rootfs: storage::validate_rootfs(raw.rootfs)?,
                networks,
                secrets: secrets::validate(raw.secrets)?,
                modules: modules::validate(raw.modules)?,
                sysctls: system::validate_sysctls(raw.sysctls)?,
                ulimits: system::validate_ulimits(raw.ulimits)?,
            },
        })
    }

    /// The primary session's spec.
    pub fn primary(&self) -> &SessionSpec {
        self.sessions
            .iter()
            .find(|s| s.id == self.id)
            .expect("validated")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        PrivateKey::from_seed([4; 32]).to_openssh("t")
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "id": "c1",
            "host_key": key(),
            "authorized_keys": [PrivateKey::from_seed([5; 32]).public().to_openssh()],
            "sessions": [{"id": "c1", "cmd": ["/bin/sh"]}],
        })
    }

    fn parse(v: serde_json::Value) -> Result<Config, ConfigError> {
        Config::parse(&v.to_string(), None)
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = parse(base()).unwrap();
        let s = c.primary();
        assert_eq!(
            (s.stdin, s.tty, s.output_buffer, s.overflow),
            (true, false, 1 << 20, Overflow::DropOldest)
        );
        assert_eq!(c.shell, "/bin/sh");
        assert_eq!(
            (s.fork_signal, s.fork_grace),
            (None, Duration::from_secs(1))
        );
        assert_eq!(
            (c.fork_backend, c.fork_timeout),
            (None, Duration::from_secs(60))
        );
    }

    #[test]
    fn a_fork_identity_file_is_for_the_qemu_backend_only() {
        let mut v = base();
        v["fork"] = serde_json::json!({"backend": "qemu", "identity": "/run/identity"});
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.fork_backend, Some(ForkBackend::Qemu));
        assert_eq!(c.fork_identity.as_deref(), Some(Path::new("/run/identity")));
        v["fork"]["backend"] = "vmware".into();
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("fork.identity") && e.contains("qemu"), "{e}");
    }

    #[test]
    fn fork_settings_are_read() {
        let mut v = base();
        v["fork"] = serde_json::json!({"backend": "vmware"});
        v["fork_timeout"] = "5s".into();
        v["sessions"][0]["fork_signal"] = "USR1".into();
        v["sessions"][0]["fork_grace"] = "250ms".into();
        let c = parse(v).unwrap();
        assert_eq!(c.fork_backend, Some(ForkBackend::Vmware));
        assert_eq!(c.fork_timeout, Duration::from_secs(5));
        assert_eq!(c.fork_identity, None);
        let s = c.primary();
        assert_eq!(s.fork_signal, Signal::parse("USR1"));
        assert_eq!(s.fork_grace, Duration::from_millis(250));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (serde_json::json!({"bogus": 1}), "bogus"),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "colour": "red"}]}),
                "sessions[0]",
            ),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "overflow": "sideways"}]}),
                "sessions[0].overflow",
            ),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": []}]}),
                "sessions[0].cmd",
            ),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "stop_signal": "NOPE"}]}),
                "sessions[0].stop_signal",
            ),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "start_gated": true, "start_gate_timeout": "soon"}]}),
                "sessions[0].start_gate_timeout",
            ),
            (
                serde_json::json!({"sessions": [{"id": "other", "cmd": ["x"]}]}),
                "sessions",
            ),
            (
                serde_json::json!({"host_key": "/nonexistent/key"}),
                "host_key",
            ),
            (
                serde_json::json!({"authorized_keys": ["ssh-rsa AAAA"]}),
                "authorized_keys[0]",
            ),
            (serde_json::json!({"link": "carrier-pigeon:1"}), "link"),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "fork_signal": "NOPE"}]}),
                "sessions[0].fork_signal",
            ),
            (
                serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "fork_grace": "a bit"}]}),
                "sessions[0].fork_grace",
            ),
            (
                serde_json::json!({"fork": {"backend": "xen"}}),
                "fork.backend",
            ),
            (serde_json::json!({"fork_timeout": "never"}), "fork_timeout"),
            (
                serde_json::json!({"networks": [{"mac": "zz"}]}),
                "networks[0].mac",
            ),
            (
                serde_json::json!({"networks": [{"mac": "52:54:00:00:00:01", "colour": 1}]}),
                "networks[0]",
            ),
        ];
        for (patch, field) in cases {
            let mut v = base();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let e = parse(v).unwrap_err();
            assert!(e.path.starts_with(field), "expected {field}, got {e}");
        }
    }
}
