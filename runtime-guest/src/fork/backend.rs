//! Where a guest's fork identity comes from, and how it freezes (docs/PROTOCOL.md
//! 4.5): QEMU's fw_cfg file (the appliance saves the VM from outside, so
//! freezing is waiting), or VMware's guestinfo and `instantclone.freeze`
//! over the backdoor.

use std::io;
use std::path::PathBuf;

use tracing::info;

use crate::config::ForkBackend;

/// The identity as QEMU hands it to the guest (fw_cfg `opt/tether/identity`).
pub const QEMU_IDENTITY: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/tether/identity/raw";

/// An identity source.
pub trait Backend {
    /// For the log.
    fn name(&self) -> &'static str;
    /// The identity's bytes as the hypervisor holds them now; `None` if it
    /// holds none.
    fn read(&mut self) -> Result<Option<Vec<u8>>, String>;
    /// Called once quiesced and the reply is out: VMware freezes here (the
    /// call returns in each clone); QEMU has nothing to do (the appliance
    /// saves the VM from outside while the guest waits).
    fn freeze(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// QEMU: a fixed-size fw_cfg file, read live (not part of the saved state).
pub struct Qemu {
    pub path: PathBuf,
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }
}

/// VMware: guestinfo and the freeze over an RPC channel.
pub struct Vmware<C: fork::vmware::RpcChannel> {
    pub channel: C,
}

impl<C: fork::vmware::RpcChannel> Backend for Vmware<C> {
    fn name(&self) -> &'static str {
        "vmware"
    }

    fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        fork::vmware::identity(&mut self.channel)
    }

    fn freeze(&mut self) -> Result<(), String> {
        fork::vmware::freeze(&mut self.channel)
    }
}

/// The configured backend; unset: QEMU when its identity file exists, else
/// none. The VMware backdoor is never probed unasked (on other hypervisors
/// its port I/O faults). `identity` is the QEMU backend's file when it is not
/// fw_cfg's.
pub fn choose(
    configured: Option<ForkBackend>,
    identity: Option<PathBuf>,
) -> Option<Box<dyn Backend>> {
    let qemu = || -> Box<dyn Backend> {
        Box::new(Qemu {
            path: identity.clone().unwrap_or_else(|| QEMU_IDENTITY.into()),
        })
    };
    let chosen = match configured {
        Some(ForkBackend::Qemu) => Some(qemu()),
        Some(ForkBackend::Vmware) => vmware(),
        Some(ForkBackend::None) => None,
        None => std::path::Path::new(QEMU_IDENTITY).exists().then(qemu),
    };
    if let Some(b) = &chosen {
        info!("fork: identity from {}", b.name());
    }
    chosen
}

#[cfg(target_arch = "x86_64")]
fn vmware() -> Option<Box<dyn Backend>> {
    Some(Box::new(Vmware {
        channel: super::backdoor::Backdoor,
    }))
}

#[cfg(not(target_arch = "x86_64"))]
fn vmware() -> Option<Box<dyn Backend>> {
    tracing::warn!("fork: the VMware backend needs x86_64; forking is off");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_reads_the_file_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        let mut q = Qemu { path: path.clone() };
        assert_eq!(q.read(), Ok(None));
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(q.read(), Ok(Some(b"x".to_vec())));
        assert_eq!(q.freeze(), Ok(()));
        assert!(choose(Some(ForkBackend::None), None).is_none());
        let chosen = choose(Some(ForkBackend::Qemu), Some(path));
        assert_eq!(chosen.unwrap().read(), Ok(Some(b"x".to_vec())));
    }
}
