//! The state directory: where it is, the appliance key kept in it, and each
//! VM's directory under `vms/` (private, cleared for reuse unless its QEMU
//! still runs).

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use proto_core::PrivateKey;
use rand_core::OsRng;
use tracing::info;

use crate::api_types::ApiError;

/// The state directory: `given`, else `/var/lib/tetherd` for root, else
/// `$XDG_STATE_HOME/tetherd` (`~/.local/state/tetherd`). It is created when
/// first needed (mode 0700: it holds keys).
pub fn state_dir(given: Option<&Path>) -> Result<PathBuf, String> {
    let dir = match given {
        Some(d) => d.to_path_buf(),
        None if nix::unistd::geteuid().is_root() => PathBuf::from("/var/lib/tetherd"),
        None => std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
            .ok_or("give --state-dir DIR (no HOME to put it in)")?
            .join("tetherd"),
    };
    let dir =
        std::path::absolute(&dir).map_err(|e| format!("--state-dir {}: {e}", dir.display()))?;
    if dir.display().to_string().contains(',') {
        return Err(format!(
            "--state-dir {}: QEMU cannot take a path with a comma",
            dir.display()
        ));
    }
    Ok(dir)
}

/// Creates `dir` (and its parents) with mode 0700.
pub(crate) fn make_private_dir(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// The appliance key kept in the state directory, generated on first use.
pub fn state_key(dir: &Path) -> Result<PrivateKey, String> {
    make_private_dir(dir)?;
    let path = dir.join("appliance.key");
    match fs::read_to_string(&path) {
        Ok(text) => PrivateKey::from_openssh(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate(&mut OsRng);
            write_private(&path, key.to_openssh("tetherd").as_bytes())
                .map_err(|e| e.to_string())?;
            info!("generated the appliance key {}", path.display());
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The address a VM dials for a listener bound to `addr` (loopback for a wildcard).
pub fn dialable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// The pid of the QEMU still running in a VM directory, if any.
fn hypervisor_alive(dir: &Path) -> Option<u32> {
    let pid = fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .filter(|c| String::from_utf8_lossy(c).contains("qemu"))
        .map(|_| pid)
}

/// Makes the VM's directory (0700), clearing what an earlier VM of that name left,
/// unless its hypervisor still runs.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), ApiError> {
    if dir.exists() {
        if let Some(pid) = hypervisor_alive(dir) {
            return Err(ApiError::Refused(format!(
                "a VM left by an earlier tetherd still runs in {} (pid {pid}); stop it or pick another name",
                dir.display()
            )));
        }
        fs::remove_dir_all(dir)
            .map_err(|e| ApiError::Internal(format!("clearing {}: {e}", dir.display())))?;
    }
    make_private_dir(dir).map_err(ApiError::Internal)
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), ApiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))
}
