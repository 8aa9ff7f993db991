//! Booting VMs: what a VM is made of (`VmSpec`), the backend that boots one
//! (`VmBackend`), and the handle of a running one (`Vm`). QEMU is the backend
//! today (`qemu`), controlled over QMP (`qmp`); `accel` decides between KVM and
//! TCG by trying KVM for real.

pub mod accel;
pub mod adopt;
pub mod qemu;
pub mod qmp;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use accel::Accel;
pub use qemu::QemuBackend;
pub use qmp::{Qmp, QmpError};

/// A future a `Vm` returns (boxed, so `Vm` stays object-safe).
pub type VmFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The container id (one VM per container).
    pub id: String,
    /// The VM's own directory: its config, console log, QMP socket, logs.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel command line arguments.
    pub append: Vec<String>,
    pub cpus: u32,
    /// vCPUs that can be hotplugged up to (at least `cpus`).
    pub max_cpus: u32,
    pub memory_mib: u32,
    /// The guest config (JSON), handed to the guest through fw_cfg `opt/tether/config`.
    pub config: PathBuf,
    /// tetherd's link-sync listener; the guest's ttyS0 connects to it.
    pub link: SocketAddr,
    pub nics: Vec<Nic>,
    /// Raw disk images, in order (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<PathBuf>,
    /// Host directories shared over 9p.
    pub shares: Vec<Share>,
    /// The file guest RAM lives in (so a fork can map it copy-on-write).
    pub memory: Memory,
    /// The vmgenid GUID: a fresh one per VM, so a child's kernel reseeds.
    pub vmgenid: String,
    /// The identity (docs/PROTOCOL.md 4.5), handed over through fw_cfg
    /// `opt/tether/identity`: not part of the saved state.
    pub identity: PathBuf,
    /// Wait for the saved state over QMP (`-incoming defer`): a fork's child.
    pub incoming: bool,
}

/// Guest RAM as a file (QEMU `memory-backend-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    pub path: PathBuf,
    /// `share=on`: the VM writes the file itself (a booted VM). `share=off`:
    /// a private copy-on-write mapping of it (a child of a fork).
    pub shared: bool,
}

impl VmSpec {
    /// The console log (the guest's ttyS1).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    /// User-mode networking isolated from the host and the outside
    /// (`restrict=on`). The `n`-th NIC gets network 10.0.(2+n).0/24 (router
    /// .2, DNS .3, DHCP from .15): the first has QEMU's usual 10.0.2.0/24.
    User { mac: String },
}

/// A host directory shared with the guest over 9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The 9p mount tag the guest mounts (`9p:TAG`).
    pub tag: String,
    pub path: PathBuf,
}

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    /// The hypervisor's exit code (0 when the guest powered off).
    pub code: Option<i32>,
    /// The signal that killed the hypervisor.
    pub signal: Option<i32>,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown status"),
        }
    }
}

/// How a `stop` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub exit: VmExit,
    /// The guest did not power off within the grace period and was killed.
    pub killed: bool,
}

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what}: {error}")]
    Io {
        what: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{0}")]
    Qmp(#[from] QmpError),
    #[error("the hypervisor exited while starting ({exit}): {log}")]
    StartFailed { exit: VmExit, log: String },
    #[error("{0}")]
    Unavailable(String),
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            error,
        }
    }
}

/// Something that boots VMs (QEMU today; VMware later).
pub trait VmBackend: Send + Sync {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;
    /// The accelerator VMs of this backend run on.
    fn accel(&self) -> Accel;
    /// Boots a VM; returns once the hypervisor is up (its control socket
    /// answers), or fails if it exits first.
    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmFuture<'a, Result<Box<dyn Vm>, VmError>>;
}

/// A running (or exited) VM.
pub trait Vm: Send + Sync {
    /// The hypervisor's process id.
    fn pid(&self) -> u32;
    /// How it ended, if it has.
    fn try_wait(&self) -> Option<VmExit>;
    /// Waits until the hypervisor has exited.
    fn wait(&self) -> VmFuture<'_, VmExit>;
    /// Ends the hypervisor now (SIGKILL); the guest gets no warning.
    fn kill(&self) -> Result<(), VmError>;
    /// A fresh QMP connection (one at a time: QEMU serves one client).
    fn qmp(&self) -> VmFuture<'_, Result<Qmp, VmError>>;

    /// Asks the guest to power off (ACPI power button), waits up to `grace`,
    /// then kills the hypervisor.
    fn stop(&self, grace: Duration) -> VmFuture<'_, Stopped> {
        Box::pin(async move {
            if let Some(exit) = self.try_wait() {
                return Stopped {
                    exit,
                    killed: false,
                };
            }
            let asked = async {
                let mut qmp = self.qmp().await?;
                qmp.system_powerdown().await?;
                Ok::<_, VmError>(())
            };
            if let Err(e) = with_deadline(asked, Duration::from_secs(5)).await {
                tracing::info!(
                    pid = self.pid(),
                    "could not ask the guest to power off: {e}"
                );
            }
            let waited = with_deadline(async { Ok(self.wait().await) }, grace).await;
            match waited {
                Ok(exit) => Stopped {
                    exit,
                    killed: false,
                },
                Err(_) => {
                    if let Err(e) = self.kill() {
                        tracing::warn!(pid = self.pid(), "killing the hypervisor: {e}");
                    }
                    Stopped {
                        exit: self.wait().await,
                        killed: true,
                    }
                }
            }
        })
    }
}

/// Runs `fut` for at most `limit`.
pub(crate) async fn with_deadline<T>(
    fut: impl Future<Output = Result<T, VmError>>,
    limit: Duration,
) -> Result<T, VmError> {
    futures_lite::future::or(fut, async {
        smol::Timer::after(limit).await;
        Err(VmError::Unavailable(format!("timed out after {limit:?}")))
    })
    .await
}
