//! The bodies of the VM routes: `POST /v1/containers` (what to boot; every
//! check names the field it is about) and the answers of create, stop,
//! delete and `GET /v1/node`. The CLI deserializes the same types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api_types::ApiError;
use crate::vm::VmExit;

/// vCPUs when the request gives none.
pub const DEFAULT_CPUS: u32 = 1;
/// Memory when the request gives none.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The least memory the kernel, the initramfs and tether boot in.
pub const MIN_MEMORY_MIB: u32 = 128;
const MAX_CPUS: u32 = 255;
const MAX_MEMORY_MIB: u32 = 1 << 20;

/// How a VM is networked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// No network interface.
    #[default]
    None,
    /// One virtio NIC on QEMU user networking with `restrict=on`: the guest
    /// reaches neither the host nor the outside.
    User,
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "user" => Ok(Self::User),
            _ => Err(format!("{s:?}: expected `user` or `none`")),
        }
    }
}

/// `POST /v1/containers`: a container in a VM of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The container id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The primary process's argv.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub tty: bool,
    /// Keep the process's stdin open for attachers (else it reads EOF).
    #[serde(default)]
    pub stdin: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// vCPUs the VM can grow to by CPU hotplug (default: `cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// A host directory to use as the root filesystem (9p, tag `rootfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// A raw ext4 image to use as the root filesystem (`/dev/vda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<PathBuf>,
    #[serde(default)]
    pub net: NetMode,
    /// Boot this kernel instead of tetherd's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Boot this initramfs instead of tetherd's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Remove the VM's files as soon as it has exited.
    #[serde(default)]
    pub auto_remove: bool,
    /// Hold the primary process until `POST /v1/containers/{id}/start` (so an
    /// attacher sees its output from the first byte); after
    /// `START_GATE_TIMEOUT` it starts anyway.
    #[serde(default)]
    pub start_gated: bool,
    /// More NICs, each on its own QEMU user network with `restrict=on`
    /// (after the one `net: user` gives).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicRequest>,
    /// Raw disk images to attach after the root disk (`/dev/vdb`, ... with
    /// `disk`; else from `/dev/vda`): mount them with the guest's `mounts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<PathBuf>,
    /// OS configuration for the guest, merged into its config as written
    /// (docs/CONFIG.md): `hostname`, `domainname`, `hosts`, `dns`, `networks`,
    /// `mounts`, `secrets`, `sysctls`, `ulimits`, `modules`. The guest checks
    /// it; one it cannot apply is a fatal error it reports as it powers off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One more NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    /// Its MAC (`52:54:00:12:34:56`); derived from the id and position when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The guest config fields a request's `guest` may set.
pub const GUEST_FIELDS: [&str; 10] = [
    "hostname",
    "domainname",
    "hosts",
    "dns",
    "networks",
    "mounts",
    "secrets",
    "sysctls",
    "ulimits",
    "modules",
];

/// How long a start-gated primary waits for its start.
pub const START_GATE_TIMEOUT: &str = "60s";

/// A JSON request body; an error names the field that is wrong.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::BadRequest(format!("request body: {}", e.inner()))
        } else {
            bad(&path, e.inner())
        }
    })
}

/// A 400 naming `field`.
pub(super) fn bad(field: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("field `{field}`: {why}"))
}

impl CreateRequest {
    /// Parses and checks a request body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let request: Self = parse_body(body)?;
        request.check()?;
        Ok(request)
    }

    /// Checks the values serde cannot.
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(name) = &self.name {
            check_id(name).map_err(|why| bad("name", why))?;
        }
        if self.cmd.is_empty() {
            return Err(bad("cmd", "needs at least the program to run"));
        }
        if let Some(i) = self.cmd.iter().position(|a| a.contains('\0')) {
            return Err(bad(&format!("cmd[{i}]"), "contains a NUL byte"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(bad(&format!("env.{k}"), "not a variable name"));
            }
            if v.contains('\0') {
                return Err(bad(&format!("env.{k}"), "the value contains a NUL byte"));
            }
        }
        if let Some(n) = self.cpus
            && !(1..=MAX_CPUS).contains(&n)
        {
            return Err(bad("cpus", format!("must be 1 to {MAX_CPUS}, not {n}")));
        }
        if let Some(n) = self.max_cpus
            && !(self.cpus()..=MAX_CPUS).contains(&n)
        {
            let least = self.cpus();
            return Err(bad(
                "max_cpus",
                format!("must be {least} (cpus) to {MAX_CPUS}, not {n}"),
            ));
        }
        if let Some(m) = self.memory_mib
            && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m)
        {
            return Err(bad(
                "memory_mib",
                format!("must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}, not {m}"),
            ));
        }
        if self.rootfs.is_some() && self.disk.is_some() {
            return Err(bad("disk", "give `rootfs` or `disk`, not both"));
        }
        if let Some(dir) = &self.rootfs {
            check_path(dir, true).map_err(|why| bad("rootfs", why))?;
        }
        for (field, file) in [
            ("disk", &self.disk),
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
        ] {
            if let Some(file) = file {
                check_path(file, false).map_err(|why| bad(field, why))?;
            }
        }
        for (i, file) in self.disks.iter().enumerate() {
            check_path(file, false).map_err(|why| bad(&format!("disks[{i}]"), why))?;
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if let Some(mac) = &nic.mac
                && !is_mac(mac)
            {
                return Err(bad(
                    &format!("nics[{i}].mac"),
                    format!("{mac:?} is not a MAC address like 52:54:00:12:34:56"),
                ));
            }
        }
        for key in self.guest.iter().flat_map(|g| g.keys()) {
            if !GUEST_FIELDS.contains(&key.as_str()) {
                let known = GUEST_FIELDS.join(", ");
                return Err(bad(
                    &format!("guest.{key}"),
                    format!("not an OS config field ({known})"),
                ));
            }
        }
        Ok(())
    }

    /// vCPUs, defaulted.
    pub fn cpus(&self) -> u32 {
        self.cpus.unwrap_or(DEFAULT_CPUS)
    }

    /// Memory, defaulted.
    pub fn memory_mib(&self) -> u32 {
        self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB)
    }
}

/// Six hex pairs separated by colons.
fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A container id that is also a safe directory name: 1 to 64 of
/// `A-Z a-z 0-9 _ . -`, starting with a letter or digit.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok_start = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok_start || !ok_chars || id.len() > 64 {
        return Err(format!(
            "{id:?} is not a container name (1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)"
        ));
    }
    Ok(())
}

/// An absolute path to an existing directory (or file) QEMU can take.
fn check_path(path: &Path, dir: bool) -> Result<(), String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown}: must be an absolute path"));
    }
    if shown.to_string().contains(',') {
        return Err(format!("{shown}: QEMU cannot take a path with a comma"));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    match (dir, meta.is_dir()) {
        (true, false) => Err(format!("{shown}: not a directory")),
        (false, true) => Err(format!("{shown}: a directory, not a file")),
        _ => Ok(()),
    }
}

/// `201` to `POST /v1/containers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    pub id: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The hypervisor's pid.
    pub pid: u32,
    /// The guest's console log.
    pub console: PathBuf,
}

/// `200` to `POST /v1/containers/{id}/stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReply {
    pub id: String,
    /// How the hypervisor ended.
    pub exit: VmExit,
    /// The guest did not power off within the grace period and was killed.
    pub killed: bool,
}

/// `200` to `DELETE /v1/containers/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub id: String,
    /// Whether a running VM had to be killed (`force=1`).
    pub killed: bool,
}

/// One VM as `GET /v1/node` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    pub id: String,
    /// `booting` (its guest has not linked yet), `running` or `exited`.
    pub state: String,
    pub pid: u32,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: String,
    /// Once exited: how the hypervisor ended.
    pub exit: Option<VmExit>,
    /// The VM's directory (config, console log, QMP socket).
    pub dir: PathBuf,
}

/// `GET /v1/node`: what a scheduler needs to place containers here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Host CPUs.
    pub cpus: u32,
    pub memory_total_mib: u64,
    /// The kernel's estimate of memory available without swapping (`MemAvailable`).
    pub memory_available_mib: u64,
    /// The accelerator VMs boot with: `kvm` or `tcg`.
    pub accel: String,
    /// VMs whose hypervisor is running (booting or running).
    pub vms_running: u32,
    /// vCPUs given to running VMs.
    pub vm_cpus: u32,
    /// Memory given to running VMs.
    pub vm_memory_mib: u64,
    /// Every VM this tetherd knows, running or exited, by id.
    pub vms: Vec<VmView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(body: &str) -> String {
        CreateRequest::parse(body.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_minimal_request_takes_the_defaults() {
        let r = CreateRequest::parse(br#"{"cmd": ["sh"]}"#).unwrap();
        assert_eq!(r.cmd, ["sh"]);
        assert_eq!((r.cpus(), r.memory_mib(), r.net), (1, 256, NetMode::None));
        assert!(r.name.is_none() && !r.tty && !r.stdin && !r.auto_remove);
        let r = CreateRequest::parse(
            br#"{"name": "web-1", "cmd": ["sh", "-c", "x"], "tty": true, "stdin": true,
                 "env": {"A": "1"}, "cpus": 2, "memory_mib": 512, "net": "user",
                 "auto_remove": true}"#,
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("web-1"));
        assert_eq!((r.cpus(), r.memory_mib(), r.net), (2, 512, NetMode::User));
    }

    #[test]
    fn bad_requests_name_the_field() {
        assert!(error(r#"{"cmd": []}"#).contains("field `cmd`"));
        assert!(error(r#"{}"#).contains("missing field `cmd`"));
        assert!(error(r#"{"cmd": ["sh"], "cpus": 0}"#).contains("field `cpus`"));
        assert!(error(r#"{"cmd": ["sh"], "cpus": "two"}"#).contains("field `cpus`"));
        assert!(error(r#"{"cmd": ["sh"], "memory_mib": 16}"#).contains("field `memory_mib`"));
        assert!(error(r#"{"cmd": ["sh"], "net": "bridge"}"#).contains("field `net`"));
        assert!(error(r#"{"cmd": ["sh"], "name": "../etc"}"#).contains("field `name`"));
        assert!(error(r#"{"cmd": ["sh"], "name": ""}"#).contains("field `name`"));
        assert!(error(r#"{"cmd": ["sh"], "env": {"A=B": "1"}}"#).contains("field `env.A=B`"));
        assert!(error(r#"{"cmd": ["sh"], "colour": "red"}"#).contains("unknown field `colour`"));
        assert!(error(r#"{"cmd": ["sh"], "kernel": "vmlinuz"}"#).contains("field `kernel`"));
        assert!(
            error(r#"{"cmd": ["sh"], "initrd": "/nonexistent/initrd"}"#).contains("field `initrd`")
        );
        assert!(error(r#"{"cmd": ["sh"], "rootfs": "/etc/hostname"}"#).contains("not a directory"));
        assert!(
            error(r#"{"cmd": ["sh"], "rootfs": "/", "disk": "/etc/hostname"}"#)
                .contains("not both")
        );
        assert!(error(r#"{"cmd": ["sh"], "disk": "/tmp"}"#).contains("field `disk`"));
        assert!(error(r#"{"cmd": ["sh"], "disks": ["/tmp"]}"#).contains("field `disks[0]`"));
        assert!(
            error(r#"{"cmd": ["sh"], "nics": [{"mac": "zz"}]}"#).contains("field `nics[0].mac`")
        );
        assert!(
            error(r#"{"cmd": ["sh"], "guest": {"sessions": []}}"#)
                .contains("field `guest.sessions`")
        );
        assert!(error("not json").contains("request body"));
    }

    #[test]
    fn ids_are_safe_directory_names() {
        for ok in ["web", "a", "web-1.test_2", &"x".repeat(64)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "..", "a b", &"x".repeat(65), "é"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
