//! Storage: the config's `mounts` and `rootfs`. A source is a device path,
//! `LABEL=`/`UUID=` (found by reading superblocks), a virtio 9p share
//! (`9p:TAG`) or `tmpfs`; each waits for its device through the device record,
//! never longer than its `timeout`. A `rootfs` is mounted at `/newroot`, the
//! boot filesystems (/dev, /proc, /sys, /run, /tmp) move into it, and it
//! becomes `/` for everything tether runs.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;
use serde::Deserialize;
use tracing::info;

use super::mount::{self, API_FILESYSTEMS, under};
use super::probe::{self, Identity};
use super::uevent::Devices;
use crate::config::{ConfigError, config_error as err};

/// How long a mount waits for its device unless its `timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a configured root filesystem is mounted before it becomes `/`.
pub const NEW_ROOT: &str = "/newroot";
/// 9p options unless a mount gives its own (a larger msize than the kernel's
/// default is much faster for file I/O).
const NINEP_DEFAULTS: &[(&str, &str)] = &[
    ("trans", "virtio"),
    ("version", "9p2000.L"),
    ("msize", "262144"),
];

/// A `mounts[]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMount {
    pub source: String,
    pub target: PathBuf,
    #[serde(default)]
    pub fstype: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// The `rootfs` object as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRootfs {
    pub source: String,
    #[serde(default)]
    pub fstype: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// Where a filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A device node, e.g. `/dev/vdb`.
    Device(PathBuf),
    /// The filesystem whose label this is.
    Label(String),
    /// The filesystem whose UUID this is (lower case).
    Uuid(String),
    /// A virtio 9p share by its mount tag.
    NineP(String),
    /// A new tmpfs.
    Tmpfs,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Device(p) => write!(f, "{}", p.display()),
            Source::Label(l) => write!(f, "LABEL={l}"),
            Source::Uuid(u) => write!(f, "UUID={u}"),
            Source::NineP(t) => write!(f, "9p:{t}"),
            Source::Tmpfs => write!(f, "tmpfs"),
        }
    }
}

/// A validated mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The config field it came from (`mounts[2]`, `rootfs`), for errors.
    pub field: String,
    pub source: Source,
    pub target: PathBuf,
    /// None: read from the superblock.
    pub fstype: Option<String>,
    pub flags: MsFlags,
    /// Filesystem-specific options, comma-separated.
    pub data: String,
    pub timeout: Duration,
}

/// A storage step that failed, naming the config field.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("config {field}: no device {wanted} appeared within {waited:?}{hint}")]
    NoDevice {
        field: String,
        wanted: Source,
        waited: Duration,
        hint: &'static str,
    },
    #[error("config {field}: {what}")]
    Unusable { field: String, what: String },
    #[error("config {field}: mount {device} on {target}: {error}")]
    Mount {
        field: String,
        device: String,
        target: PathBuf,
        error: io::Error,
    },
    #[error("config rootfs: cannot make it the root: {step}: {error}")]
    SwitchRoot { step: String, error: io::Error },
}

/// Validates `mounts`: parents are mounted before what is inside them.
pub fn validate_mounts(raw: Vec<RawMount>) -> Result<Vec<MountSpec>, ConfigError> {
    let mut out = Vec::new();
    for (i, m) in raw.into_iter().enumerate() {
        let field = format!("mounts[{i}]");
        if !is_clean_absolute(&m.target) || m.target == Path::new("/") {
            return Err(err(
                format!("{field}.target"),
                "must be an absolute path other than / without . or .. (use rootfs for /)",
            ));
        }
        out.push(validate_one(
            field, &m.source, m.target, m.fstype, m.options, m.timeout,
        )?);
    }
    out.sort_by_key(|m| m.target.components().count());
    Ok(out)
}

/// Validates `rootfs`.
pub fn validate_rootfs(raw: Option<RawRootfs>) -> Result<Option<MountSpec>, ConfigError> {
    let Some(r) = raw else { return Ok(None) };
    let spec = validate_one(
        "rootfs".into(),
        &r.source,
        PathBuf::from(NEW_ROOT),
        r.fstype,
        r.options,
        r.timeout,
    )?;
    if spec.source == Source::Tmpfs {
        return Err(err("rootfs.source", "a tmpfs root would be empty"));
    }
    Ok(Some(spec))
}

fn validate_one(
    field: String,
    source: &str,
    target: PathBuf,
    fstype: Option<String>,
    options: Vec<String>,
    timeout: Option<String>,
) -> Result<MountSpec, ConfigError> {
    let source = parse_source(source).map_err(|why| err(format!("{field}.source"), why))?;
    let fstype = match (&source, fstype) {
        (Source::NineP(_), None) => Some("9p".to_owned()),
        (Source::Tmpfs, None) => Some("tmpfs".to_owned()),
        (Source::NineP(_), Some(t)) if t != "9p" => {
            return Err(err(
                format!("{field}.fstype"),
                "a 9p: source is fstype \"9p\"",
            ));
        }
        (_, Some(t)) if t.is_empty() || t.contains([',', ' ', '\0']) => {
            return Err(err(format!("{field}.fstype"), "not a filesystem type"));
        }
        (_, t) => t,
    };
    for (j, o) in options.iter().enumerate() {
        if o.is_empty() || o.contains([',', '\0']) {
            return Err(err(
                format!("{field}.options[{j}]"),
                "one option per entry, without commas",
            ));
        }
    }
    let (flags, mut data) = split_options(&options);
    if let Source::NineP(_) = source {
        data = with_defaults(&data, NINEP_DEFAULTS);
    }
    let timeout = match timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => humantime::parse_duration(&t).map_err(|e| {
            err(
                format!("{field}.timeout"),
                format!("not a duration like \"10s\": {e}"),
            )
        })?,
    };
    Ok(MountSpec {
        field,
        source,
        target,
        fstype,
        flags,
        data,
        timeout,
    })
}

/// Parses a mount source.
pub fn parse_source(s: &str) -> Result<Source, String> {
    let nonempty = |v: &str, what: &str| {
        if v.is_empty() {
            Err(format!("{what} is empty"))
        } else {
            Ok(v.to_owned())
        }
    };
    if let Some(l) = s.strip_prefix("LABEL=") {
        return Ok(Source::Label(nonempty(l, "the label")?));
    }
    if let Some(u) = s.strip_prefix("UUID=") {
        return Ok(Source::Uuid(nonempty(u, "the UUID")?.to_ascii_lowercase()));
    }
    if let Some(t) = s.strip_prefix("9p:") {
        return Ok(Source::NineP(nonempty(t, "the 9p mount tag")?));
    }
    if s == "tmpfs" {
        return Ok(Source::Tmpfs);
    }
    let p = Path::new(s);
    if s.starts_with("/dev/") && is_clean_absolute(p) {
        return Ok(Source::Device(p.to_path_buf()));
    }
    Err(format!(
        "{s:?} is not /dev/NAME, LABEL=..., UUID=..., 9p:TAG or tmpfs"
    ))
}

fn is_clean_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Splits mount(8)-style options into mount flags and the filesystem's own.
pub fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags -= MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => flags |= MsFlags::MS_DIRSYNC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            "defaults" | "suid" | "dev" | "exec" | "async" | "atime" => {}
            other => data.push(other.to_owned()),
        }
    }
    (flags, data.join(","))
}

fn with_defaults(data: &str, defaults: &[(&str, &str)]) -> String {
    let given: Vec<&str> = data.split(',').filter(|o| !o.is_empty()).collect();
    let mut out: Vec<String> = defaults
        .iter()
        .filter(|(k, _)| !given.iter().any(|o| o.split('=').next() == Some(k)))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out.extend(given.iter().map(|s| s.to_string()));
    out.join(",")
}

/// Where the kernel's views of devices are (`/sys`, `/dev`; elsewhere in tests).
#[derive(Debug, Clone)]
pub struct Roots {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            sys: "/sys".into(),
            dev: "/dev".into(),
        }
    }
}

/// What a source resolved to: the `source` argument of mount(2), and the
/// filesystem's identity when a superblock was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub source: String,
    pub identity: Option<Identity>,
}

/// Waits (at most the spec's timeout) for the device a spec names.
pub async fn resolve(
    spec: &MountSpec,
    devices: &Devices,
    roots: &Roots,
) -> Result<Resolved, StorageError> {
    let found = match &spec.source {
        Source::Tmpfs => Some(Resolved {
            source: "tmpfs".into(),
            identity: None,
        }),
        Source::NineP(tag) => {
            devices
                .wait_until(spec.timeout, |_| {
                    has_9p_tag(&roots.sys, tag).then(|| Resolved {
                        source: tag.clone(),
                        identity: None,
                    })
                })
                .await
        }
        Source::Device(path) => {
            let at = under(
                &roots.dev,
                &path.to_string_lossy().replacen("/dev/", "/", 1),
            );
            devices
                .wait_until(spec.timeout, |_| {
                    at.exists().then(|| Resolved {
                        source: at.display().to_string(),
                        identity: probe::probe_path(&at).ok().flatten(),
                    })
                })
                .await
        }
        Source::Label(_) | Source::Uuid(_) => {
            if by_identity(devices, &roots.dev, &spec.source).is_none() {
                info!(
                    "{}: waiting up to {:?} for {} to appear",
                    spec.field, spec.timeout, spec.source
                );
            }
            devices
                .wait_until(spec.timeout, |d| by_identity(d, &roots.dev, &spec.source))
                .await
        }
    };
    found.ok_or_else(|| StorageError::NoDevice {
        field: spec.field.clone(),
        wanted: spec.source.clone(),
        waited: spec.timeout,
        hint: match spec.source {
            Source::NineP(_) => " (is the 9pnet_virtio module loaded?)",
            Source::Label(_) | Source::Uuid(_) => {
                " (read from ext2/3/4, XFS and btrfs superblocks of the block devices present)"
            }
            _ => "",
        },
    })
}

/// The recorded block device whose superblock carries this label or UUID.
fn by_identity(devices: &Devices, dev: &Path, wanted: &Source) -> Option<Resolved> {
    let mut hit = None;
    devices.find(|e| {
        let Some(name) = e.devname().filter(|_| e.subsystem == "block") else {
            return false;
        };
        let path = dev.join(name);
        let Ok(Some(id)) = probe::probe_path(&path) else {
            return false;
        };
        let matches = match wanted {
            Source::Label(l) => id.label.as_deref() == Some(l.as_str()),
            Source::Uuid(u) => id.uuid.as_deref() == Some(u.as_str()),
            _ => false,
        };
        if matches {
            hit = Some(Resolved {
                source: path.display().to_string(),
                identity: Some(id),
            });
        }
        matches
    });
    hit
}

/// Whether a virtio 9p device with this mount tag is bound to its driver.
fn has_9p_tag(sys: &Path, tag: &str) -> bool {
    let Ok(devices) = std::fs::read_dir(sys.join("bus/virtio/drivers/9pnet_virtio")) else {
        return false;
    };
    devices.flatten().any(|d| {
        std::fs::read(d.path().join("mount_tag"))
            .is_ok_and(|t| t.split(|&b| b == 0).next() == Some(tag.as_bytes()))
    })
}

/// Mounts one spec at its target (made if missing), once its device is there.
pub async fn mount_one(
    spec: &MountSpec,
    devices: &Devices,
    roots: &Roots,
) -> Result<(), StorageError> {
    let resolved = resolve(spec, devices, roots).await?;
    let fstype = match (&spec.fstype, &resolved.identity) {
        (Some(t), _) => t.clone(),
        (None, Some(id)) => id.fstype.to_owned(),
        (None, None) => {
            return Err(StorageError::Unusable {
                field: format!("{}.fstype", spec.field),
                what: format!(
                    "not given, and {} holds no filesystem tether recognises (ext2/3/4, XFS, btrfs)",
                    resolved.source
                ),
            });
        }
    };
    let failed = |error| StorageError::Mount {
        field: spec.field.clone(),
        device: resolved.source.clone(),
        target: spec.target.clone(),
        error,
    };
    std::fs::create_dir_all(&spec.target).map_err(failed)?;
    mount::mount_fs(
        &resolved.source,
        &spec.target,
        &fstype,
        spec.flags,
        &spec.data,
    )
    .map_err(failed)?;
    info!(
        "mounted {} ({}, {fstype}) on {}",
        spec.source,
        resolved.source,
        spec.target.display()
    );
    Ok(())
}

/// The kernel modules the filesystems of `specs` need (loaded on demand, so a
/// container that mounts nothing does not pay for ext4 or 9p at boot).
/// Without an fstype, the superblock decides later: ext4 is the likely one.
pub fn modules_for<'a>(specs: impl IntoIterator<Item = &'a MountSpec>) -> Vec<String> {
    let mut wanted: Vec<String> = Vec::new();
    for spec in specs {
        let needs: &[&str] = match (spec.fstype.as_deref(), &spec.source) {
            (_, Source::Tmpfs) | (Some("tmpfs"), _) => &[],
            (_, Source::NineP(_)) | (Some("9p"), _) => &["9pnet_virtio", "9p"],
            // ext4 asks the crypto API for crc32c, which modules.dep does not say.
            (None | Some("ext4" | "ext3" | "ext2"), _) => &["crc32c_generic", "ext4"],
            (Some(other), _) => {
                wanted.push(other.to_owned());
                &[]
            }
        };
        wanted.extend(needs.iter().map(|m| m.to_string()));
    }
    let mut seen = std::collections::BTreeSet::new();
    wanted.retain(|m| seen.insert(m.clone()));
    wanted
}

/// Mounts every configured mount, in order.
pub async fn mount_all(
    specs: &[MountSpec],
    devices: &Devices,
    roots: &Roots,
) -> Result<(), StorageError> {
    for spec in specs {
        mount_one(spec, devices, roots).await?;
    }
    Ok(())
}

/// Mounts the configured root at [`NEW_ROOT`], moves the boot filesystems
/// into it and makes it `/`.
pub async fn enter_rootfs(
    spec: &MountSpec,
    devices: &Devices,
    roots: &Roots,
) -> Result<(), StorageError> {
    mount_one(spec, devices, roots).await?;
    let new_root = Path::new(NEW_ROOT);
    let step = |step: String| move |error| StorageError::SwitchRoot { step, error };
    for api in API_FILESYSTEMS {
        let inside = under(new_root, api);
        std::fs::create_dir_all(&inside).map_err(step(format!(
            "make {api} in it (a read-only root must have it)"
        )))?;
        mount::move_mount(Path::new(api), &inside).map_err(step(format!("move {api} into it")))?;
    }
    switch_root(new_root).map_err(step("switch to it".into()))?;
    info!("the root is now {}", spec.source);
    Ok(())
}

/// Makes `new_root` the root: `pivot_root` where the old root can be
/// detached, else (an initramfs, which can never be unmounted) by moving the
/// new root over `/` and entering it, as switch_root(8) does.
fn switch_root(new_root: &Path) -> io::Result<()> {
    nix::unistd::chdir(new_root)?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            mount::unmount_lazily(Path::new(".")).map_err(io::Error::from)?;
        }
        Err(nix::errno::Errno::EINVAL) => {
            mount::move_mount(Path::new("."), Path::new("/"))?;
            nix::unistd::chroot(".")?;
        }
        Err(e) => return Err(e.into()),
    }
    nix::unistd::chdir("/")?;
    Ok(())
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
