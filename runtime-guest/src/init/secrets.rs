//! Secrets: the config's `secrets`, written only to memory. PID 1 mounts a
//! tmpfs at `/run/secrets` (mode 0755 like Docker's, so a non-root owner can
//! reach its own secret; each file keeps its own mode, 0400 by default) and
//! refuses to write a secret anywhere that is not a tmpfs or ramfs.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use serde::Deserialize;
use tracing::info;

use super::mount;
use crate::config::{ConfigError, config_error as err};

/// The tmpfs PID 1 mounts for secrets.
pub const SECRETS_DIR: &str = "/run/secrets";

/// A `secrets[]` entry as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    pub path: PathBuf,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub base64: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

impl std::fmt::Debug for RawSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawSecret({})", self.path.display())
    }
}

/// A validated secret. Its contents never appear in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret({}, {} bytes, {:04o}, {}:{})",
            self.path.display(),
            self.contents.len(),
            self.mode,
            self.uid,
            self.gid
        )
    }
}

/// Validates `secrets`.
pub fn validate(raw: Vec<RawSecret>) -> Result<Vec<Secret>, ConfigError> {
    let mut out: Vec<Secret> = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("secrets[{i}].{f}");
        let clean = s.path.is_absolute()
            && s.path.file_name().is_some()
            && s.path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !clean {
            return Err(err(
                at("path"),
                "must be an absolute file path without . or ..",
            ));
        }
        if out.iter().any(|o| o.path == s.path) {
            return Err(err(at("path"), "another secret has this path"));
        }
        let contents = match (s.value, s.base64) {
            (Some(v), None) => v.into_bytes(),
            (None, Some(b)) => {
                use base64ct::{Base64, Encoding};
                Base64::decode_vec(b.trim())
                    .map_err(|e| err(at("base64"), format!("not base64: {e}")))?
            }
            _ => {
                return Err(err(
                    format!("secrets[{i}]"),
                    "give exactly one of `value` and `base64`",
                ));
            }
        };
        let mode = match s.mode {
            None => 0o400,
            Some(m) => u32::from_str_radix(&m, 8)
                .ok()
                .filter(|&m| m <= 0o7777)
                .ok_or_else(|| {
                    err(
                        at("mode"),
                        format!("{m:?} is not an octal mode like \"0400\""),
                    )
                })?,
        };
        out.push(Secret {
            path: s.path,
            contents,
            mode,
            uid: s.uid.unwrap_or(0),
            gid: s.gid.unwrap_or(0),
        });
    }
    Ok(out)
}

/// A secret that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("config secrets[{index}] ({path}): {what}")]
pub struct SecretError {
    pub index: usize,
    pub path: String,
    pub what: String,
}

/// Mounts the secrets tmpfs (under `root`, "/" in the VM) and writes every
/// secret. Nothing is written unless its directory is in memory.
pub fn write_all(root: &Path, secrets: &[Secret]) -> Result<(), SecretError> {
    if secrets.is_empty() {
        return Ok(());
    }
    let dir = mount::under(root, SECRETS_DIR);
    mount_secrets_tmpfs(&dir).map_err(|e| SecretError {
        index: 0,
        path: dir.display().to_string(),
        what: format!("cannot mount the secrets tmpfs: {e}"),
    })?;
    for (index, s) in secrets.iter().enumerate() {
        let path = mount::under(root, &s.path.to_string_lossy());
        write_one(&path, s).map_err(|what| SecretError {
            index,
            path: s.path.display().to_string(),
            what,
        })?;
    }
    info!("{} secret(s) written to memory", secrets.len());
    Ok(())
}

fn mount_secrets_tmpfs(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if mount::is_in_memory(dir)?
        && mount::mount_points()?
            .iter()
            .any(|m| m.target == dir && m.fstype == "tmpfs")
    {
        return Ok(());
    }
    mount::mount_fs(
        "tmpfs",
        dir,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=0755",
    )
}

fn write_one(path: &Path, s: &Secret) -> Result<(), String> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let existing = nearest_existing(parent);
    if !mount::is_in_memory(&existing).map_err(|e| format!("{}: {e}", existing.display()))? {
        return Err(format!(
            "{} is not on a tmpfs: secrets are never written to a disk (use a path under {SECRETS_DIR})",
            existing.display()
        ));
    }
    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    file.write_all(&s.contents).map_err(|e| e.to_string())?;
    give_to(&file, s.uid, s.gid).map_err(|e| format!("chown {}:{}: {e}", s.uid, s.gid))?;
    set_mode(&file, s.mode).map_err(|e| format!("chmod {:04o}: {e}", s.mode))?;
    Ok(())
}

/// `path` or its nearest ancestor that exists (where it would be created).
fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn give_to(file: &std::fs::File, uid: u32, gid: u32) -> io::Result<()> {
    nix::unistd::fchown(
        file,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(io::Error::from)
}

fn set_mode(file: &std::fs::File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::testing::in_private_mounts;

    fn raw(path: &str) -> RawSecret {
        RawSecret {
            path: path.into(),
            value: Some("s3cret".into()),
            base64: None,
            mode: None,
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn secrets_validate_with_defaults_and_errors_name_the_field() {
        let s = validate(vec![
            raw("/run/secrets/db"),
            RawSecret {
                value: None,
                base64: Some("AAEC/w==".into()),
                mode: Some("0440".into()),
                uid: Some(1000),
                gid: Some(1000),
                ..raw("/run/secrets/blob")
            },
        ])
        .unwrap();
        assert_eq!(
            (s[0].mode, s[0].uid, s[0].contents.as_slice()),
            (0o400, 0, &b"s3cret"[..])
        );
        assert_eq!(
            (s[1].mode, s[1].gid, s[1].contents.as_slice()),
            (0o440, 1000, &[0, 1, 2, 255][..])
        );
        assert!(
            !format!("{:?}", s[0]).contains("s3cret"),
            "Debug must not show the secret"
        );

        let cases = [
            (raw("relative"), "secrets[0].path"),
            (raw("/run/secrets/../etc/x"), "secrets[0].path"),
            (raw("/"), "secrets[0].path"),
            (
                RawSecret {
                    base64: Some("x".into()),
                    ..raw("/a")
                },
                "secrets[0]",
            ),
            (
                RawSecret {
                    value: None,
                    ..raw("/a")
                },
                "secrets[0]",
            ),
            (
                RawSecret {
                    value: None,
                    base64: Some("!!".into()),
                    ..raw("/a")
                },
                "secrets[0].base64",
            ),
            (
                RawSecret {
                    mode: Some("0999".into()),
                    ..raw("/a")
                },
                "secrets[0].mode",
            ),
            (
                RawSecret {
                    mode: Some("17777".into()),
                    ..raw("/a")
                },
                "secrets[0].mode",
            ),
        ];
        for (secret, field) in cases {
            assert_eq!(validate(vec![secret]).unwrap_err().path, field);
        }
        assert_eq!(
            validate(vec![raw("/a"), raw("/a")]).unwrap_err().path,
            "secrets[1].path"
        );
    }

    #[test]
    fn secrets_land_on_a_tmpfs_with_their_modes_and_never_on_disk() {
        // On a disk, so a secret that escaped its tmpfs would show.
        let root = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let secrets = validate(vec![
            RawSecret {
                mode: Some("0440".into()),
                gid: Some(1234),
                ..raw("/run/secrets/app/db")
            },
            raw("/etc/leaked"),
        ])
        .unwrap();
        let root_path = root.path().to_path_buf();
        let seen = in_private_mounts("writing secrets to a tmpfs", move || {
            let refused = write_all(&root_path, &secrets).unwrap_err().to_string();
            let file = root_path.join("run/secrets/app/db");
            let meta = std::fs::metadata(&file).unwrap();
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            (
                std::fs::read(&file).unwrap(),
                meta.permissions().mode() & 0o7777,
                meta.gid(),
                mount::is_in_memory(&file).unwrap(),
                root_path.join("etc/leaked").exists(),
                refused,
            )
        });
        let Some((contents, mode, gid, in_memory, leaked, refused)) = seen else {
            return;
        };
        assert_eq!(contents, b"s3cret");
        assert_eq!((mode, gid), (0o440, 1234));
        assert!(in_memory);
        assert!(!leaked, "a secret outside a tmpfs was written");
        assert!(
            refused.starts_with("config secrets[1] (/etc/leaked):")
                && refused.contains("not on a tmpfs"),
            "{refused}"
        );
        assert!(
            !root.path().join("run/secrets/app").exists(),
            "the tmpfs held them, not the disk"
        );
    }
}
