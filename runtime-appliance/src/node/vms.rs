//! The VMs this tetherd boots, one per container: creating one (a guest config
//! with a fresh host key pinned for its id, its directory under
//! `STATE/vms/ID`, the hypervisor), reaping it when the hypervisor exits,
//! stopping and removing it, and what the node has left for more.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto_core::{PrivateKey, PublicKey};
use rand_core::OsRng;
use smol::lock::OnceCell;
use tracing::{info, warn};

use super::boot_files::{self, BootFiles};
use super::fork;
use super::guest_config::{extra_mac, generated_id, guest_config, mac_for};
use super::host;
use super::identity;
use super::request::{CreateRequest, Created, NetMode, NodeView, Removed, StopReply, VmView};
use super::state::{make_private_dir, prepare_dir, write_private};
use crate::api_types::ApiError;
use crate::appliance::Appliance;
use crate::vm::accel::{self, AccelChoice};
use crate::vm::{Memory, Nic, QemuBackend, Share, Vm, VmBackend, VmError, VmExit, VmSpec, adopt};

/// How long an auto-removed VM is still known (so a late attach or wait is
/// told it exited instead of waiting for it to appear).
const TOMBSTONE: Duration = Duration::from_secs(60);

/// How VMs are booted here.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// `STATE`: VMs live in `STATE/vms/ID`.
    pub state_dir: PathBuf,
    /// tetherd's link-sync listener, which each VM's ttyS0 connects to.
    pub link: SocketAddr,
    pub qemu: PathBuf,
    pub accel: AccelChoice,
    /// Default kernel and initramfs (else found or built on first use).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Where guest RAM files go (`tetherd-ID-GENERATION`): a tmpfs.
    pub shm_dir: PathBuf,
}

/// One VM.
struct Record {
    request: CreateRequest,
    dir: PathBuf,
    accel: &'static str,
    /// `None` while the hypervisor is starting.
    vm: Option<Arc<dyn Vm>>,
    exit: Option<VmExit>,
    /// Auto-removed: its files are gone; kept a while so late callers learn it exited.
    removed: bool,
    /// What it was booted with (`None` for a VM an earlier tetherd started).
    spec: Option<VmSpec>,
    /// A fork's child: its parent and number.
    child: Option<(String, u32)>,
}

/// The VMs of this tetherd.
pub struct Vms {
    pub(super) settings: VmSettings,
    pub(super) appliance: Appliance,
    appliance_key: PublicKey,
    backend: OnceCell<Arc<dyn VmBackend>>,
    boot: OnceCell<BootFiles>,
    records: Mutex<BTreeMap<String, Record>>,
    /// Containers being forked now (one fork at a time each).
    forking: Mutex<std::collections::BTreeSet<String>>,
}

/// What the rest of the node needs to watch one VM.
#[derive(Clone)]
pub struct VmWatch {
    pub vm: Arc<dyn Vm>,
    pub console: PathBuf,
}

impl Vms {
    /// VMs booted with QEMU per `settings`, for containers of `appliance`
    /// (whose public key the guests authorize).
    pub fn new(settings: VmSettings, appliance: Appliance, appliance_key: PublicKey) -> Self {
        Self {
            settings,
            appliance,
            appliance_key,
            backend: OnceCell::new(),
            boot: OnceCell::new(),
            records: Mutex::new(BTreeMap::new()),
            forking: Mutex::new(Default::default()),
        }
    }

    /// VMs booted by `backend` with `boot` files (tests use a fake backend).
    pub fn with_backend(
        settings: VmSettings,
        appliance: Appliance,
        appliance_key: PublicKey,
        backend: Arc<dyn VmBackend>,
        boot: BootFiles,
    ) -> Self {
        let me = Self::new(settings, appliance, appliance_key);
        let _ = me.backend.set_blocking(backend);
        let _ = me.boot.set_blocking(boot);
        me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backend, deciding the accelerator on first use (it may boot a probe VM).
    pub async fn backend(&self) -> Result<Arc<dyn VmBackend>, ApiError> {
        self.backend
            .get_or_try_init(|| async {
                let accel = match self.settings.accel {
                    AccelChoice::Fixed(a) => a,
                    AccelChoice::Auto => {
                        let kernel = self.boot_files().await?.kernel;
                        let qemu = self.settings.qemu.clone();
                        make_private_dir(&self.settings.state_dir).map_err(ApiError::Internal)?;
                        let cache = self.settings.state_dir.join("accel.json");
                        let probed =
                            smol::unblock(move || accel::probe(&qemu, &kernel, &cache)).await;
                        info!(accel = probed.accel.as_str(), reason = %probed.reason, "VM accelerator");
                        probed.accel
                    }
                };
                Ok::<_, ApiError>(Arc::new(QemuBackend::new(self.settings.qemu.clone(), accel))
                    as Arc<dyn VmBackend>)
            })
            .await
            .cloned()
    }

    /// The default kernel and initramfs, found (or built) on first use.
    async fn boot_files(&self) -> Result<BootFiles, ApiError> {
        self.boot
            .get_or_try_init(|| async {
                let (k, i) = (self.settings.kernel.clone(), self.settings.initrd.clone());
                smol::unblock(move || boot_files::resolve(k.as_deref(), i.as_deref()))
                    .await
                    .map_err(ApiError::Unavailable)
            })
            .await
            .cloned()
    }

    /// The VM of container `id`, if this tetherd booted it.
    pub fn watch(&self, id: &str) -> Option<VmWatch> {
        let records = self.lock();
        let r = records.get(id)?;
        Some(VmWatch {
            vm: r.vm.clone()?,
            console: r.dir.join("console.log"),
        })
    }

    /// Boots a VM for the container `request` describes.
    pub async fn create(self: &Arc<Self>, request: CreateRequest) -> Result<Created, ApiError> {
        request.check()?;
        let id = request.name.clone().unwrap_or_else(generated_id);
        let dir = self.settings.state_dir.join("vms").join(&id);
        let reused = {
            let mut records = self.lock();
            if records.get(&id).is_some_and(|r| !r.removed) {
                return Err(ApiError::Refused(format!(
                    "container {id} exists (remove it first: DELETE /v1/containers/{id})"
                )));
            }
            records.insert(
                id.clone(),
                Record {
                    request: request.clone(),
                    dir: dir.clone(),
                    accel: "",
                    vm: None,
                    exit: None,
                    removed: false,
                    spec: None,
                    child: None,
                },
            )
        };
        if reused.is_some() {
            // An auto-removed VM of that name: its container goes with it now.
            self.appliance.forget(&id);
        }
        match self.boot(&id, &dir, &request).await {
            Ok(created) => Ok(created),
            Err(e) => {
                self.lock().remove(&id);
                self.appliance.unpin_guest(&id);
                warn!(container = %id, "could not boot its VM: {e}");
                Err(e)
            }
        }
    }

    async fn boot(
        self: &Arc<Self>,
        id: &str,
        dir: &Path,
        request: &CreateRequest,
    ) -> Result<Created, ApiError> {
        if self.appliance.get(id).await.is_ok() {
            return Err(ApiError::Refused(format!(
                "a container {id} is already known (served by a guest link, or exited and not removed)"
            )));
        }
        let backend = self.backend().await?;
        let files = match (&request.kernel, &request.initrd) {
            (Some(kernel), Some(initrd)) => BootFiles {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
            },
            (kernel, initrd) => {
                let default = self.boot_files().await?;
                BootFiles {
                    kernel: kernel.clone().unwrap_or(default.kernel),
                    initrd: initrd.clone().unwrap_or(default.initrd),
                }
            }
        };
        prepare_dir(dir)?;
        let host_key = PrivateKey::generate(&mut OsRng);
        let mac = mac_for(id);
        let config = guest_config(id, &self.appliance_key, &host_key, request, &mac);
        let config_path = dir.join("config.json");
        write_private(&config_path, format!("{config:#}\n").as_bytes())?;
        write_private(
            &dir.join("guest.pub"),
            format!("{}\n", host_key.public().to_openssh()).as_bytes(),
        )?;
        write_private(
            &dir.join("request.json"),
            format!("{:#}\n", serde_json::json!(request)).as_bytes(),
        )?;
        self.appliance.pin_guest(id, *host_key.public());
        let nics: Vec<Nic> = match request.net {
            NetMode::None => Vec::new(),
            NetMode::User => vec![Nic::User { mac }],
        }
        .into_iter()
        .chain(request.nics.iter().enumerate().map(|(n, nic)| Nic::User {
            mac: nic.mac.clone().unwrap_or_else(|| extra_mac(id, n)),
        }))
        .collect();
        let hostname = request
            .guest
            .as_ref()
            .and_then(|g| g.get("hostname"))
            .and_then(|h| h.as_str())
            .map_or_else(|| identity::hostname_for(id), str::to_owned);
        let me = identity::booted(id, &hostname, &macs_of(&nics))?;
        let identity_path = dir.join("identity");
        identity::write(&identity_path, &me)?;
        let ram = self
            .settings
            .shm_dir
            .join(format!("tetherd-{id}-{}", me.generation));
        write_private(&dir.join(RAM_PATH), ram.as_os_str().as_encoded_bytes())?;
        let spec = VmSpec {
            id: id.to_owned(),
            dir: dir.to_owned(),
            kernel: files.kernel,
            initrd: files.initrd,
            append: Vec::new(),
            cpus: request.cpus(),
            max_cpus: request.max_cpus.unwrap_or(0).max(request.cpus()),
            memory_mib: request.memory_mib(),
            config: config_path,
            link: self.settings.link,
            nics,
            disks: request.disk.iter().chain(&request.disks).cloned().collect(),
            shares: request
                .rootfs
                .iter()
                .map(|p| Share {
                    tag: "rootfs".into(),
                    path: p.clone(),
                })
                .collect(),
            memory: Memory {
                path: ram,
                shared: true,
            },
            vmgenid: identity::vmgenid(),
            identity: identity_path,
            incoming: false,
        };
        let vm = self.launch(&backend, &spec).await?;
        Ok(Created {
            id: id.to_owned(),
            accel: backend.accel().as_str().to_owned(),
            pid: vm.pid(),
            console: spec.console_log(),
        })
    }

    /// Starts the hypervisor of `spec` (whose record exists), records it,
    /// and reaps it when it exits.
    pub(super) async fn launch(
        self: &Arc<Self>,
        backend: &Arc<dyn VmBackend>,
        spec: &VmSpec,
    ) -> Result<Arc<dyn Vm>, ApiError> {
        let id = &spec.id;
        let started = backend.start(spec).await;
        let vm: Arc<dyn Vm> = match started {
            Ok(vm) => vm.into(),
            Err(e) => {
                if spec.memory.shared {
                    remove_ram(&spec.memory.path);
                }
                return Err(vm_error(e));
            }
        };
        let accel = backend.accel().as_str();
        info!(container = %id, pid = vm.pid(), accel, dir = %spec.dir.display(), "VM started");
        if let Some(r) = self.lock().get_mut(id) {
            r.vm = Some(vm.clone());
            r.accel = accel;
            r.spec = Some(spec.clone());
        }
        let me = self.clone();
        let owner = id.to_owned();
        let watched = vm.clone();
        smol::spawn(async move {
            let exit = watched.wait().await;
            me.exited(&owner, exit).await;
        })
        .detach();
        Ok(vm)
    }

    /// The hypervisor of `id` has exited: record it, and auto-remove.
    async fn exited(self: &Arc<Self>, id: &str, exit: VmExit) {
        let auto_remove = {
            let mut records = self.lock();
            let Some(r) = records.get_mut(id) else { return };
            r.exit = Some(exit);
            let _ = fs::write(
                r.dir.join("exit.json"),
                format!("{}\n", serde_json::json!(exit)),
            );
            if let Ok(ram) = fs::read(r.dir.join(RAM_PATH)) {
                remove_ram(Path::new(std::ffi::OsStr::from_bytes(&ram)));
            }
            r.request.auto_remove
        };
        info!(container = %id, %exit, "VM exited");
        if auto_remove {
            if let Some(r) = self.lock().get_mut(id) {
                r.removed = true;
            }
            self.remove_files(id);
            // A late wait still gets the container's exit code meanwhile.
            smol::Timer::after(TOMBSTONE).await;
            let mut records = self.lock();
            if records.get(id).is_some_and(|r| r.removed) {
                records.remove(id);
                self.appliance.forget(id);
            }
        }
    }

    fn remove_files(&self, id: &str) {
        let dir = self.settings.state_dir.join("vms").join(id);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(container = %id, "removing {}: {e}", dir.display());
        }
        self.appliance.unpin_guest(id);
    }

    fn running_vm(&self, id: &str) -> Result<Arc<dyn Vm>, ApiError> {
        let records = self.lock();
        match records.get(id) {
            None => Err(ApiError::NotFound(format!(
                "{id} (no VM of that name; stop and rm act on containers created with POST /v1/containers)"
            ))),
            Some(r) if r.removed => Err(ApiError::NotFound(format!("{id} (removed)"))),
            Some(Record { vm: None, .. }) => Err(ApiError::Refused(format!(
                "the VM of {id} is still starting; try again"
            ))),
            Some(Record { vm: Some(vm), .. }) => Ok(vm.clone()),
        }
    }

    /// Asks the guest to power off; kills the hypervisor after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<StopReply, ApiError> {
        let vm = self.running_vm(id)?;
        if vm.try_wait().is_none() {
            // As `docker stop` does: the stop signal reaches the primary over
            // the link, and the guest powers off once it exits. The ACPI power
            // button (in `Vm::stop`) is for a guest that is not linked.
            let term = self.appliance.signal(id, "TERM");
            let asked = futures_lite::future::or(async { Some(term.await) }, async {
                smol::Timer::after(Duration::from_secs(2)).await;
                None
            })
            .await;
            if let Some(Err(e)) = asked {
                info!(container = %id, "SIGTERM through the link: {e}");
            }
        }
        let stopped = vm.stop(grace).await;
        if stopped.killed {
            info!(container = %id, "the guest did not power off within {grace:?}; killed");
        }
        Ok(StopReply {
            id: id.to_owned(),
            exit: stopped.exit,
            killed: stopped.killed,
        })
    }

    /// Removes an exited VM's files (a running one only with `force`, killing it).
    pub async fn remove(&self, id: &str, force: bool) -> Result<Removed, ApiError> {
        let vm = self.running_vm(id)?;
        let mut killed = false;
        if vm.try_wait().is_none() {
            if !force {
                return Err(ApiError::Refused(format!(
                    "{id} is running: stop it first (POST /v1/containers/{id}/stop) or remove it with force=1"
                )));
            }
            vm.kill().map_err(vm_error)?;
            vm.wait().await;
            killed = true;
        }
        // The record goes first: `exited` writes into the directory only
        // while holding the lock and finding the record.
        self.lock().remove(id);
        self.remove_files(id);
        self.appliance.forget(id);
        info!(container = %id, killed, "VM removed");
        Ok(Removed {
            id: id.to_owned(),
            killed,
        })
    }

    /// The node's resources and its VMs.
    pub async fn node(&self) -> Result<NodeView, ApiError> {
        let accel = self.backend().await?.accel().as_str().to_owned();
        let records: Vec<(String, VmView)> = self
            .lock()
            .iter()
            .filter(|(_, r)| !r.removed)
            .map(|(id, r)| {
                let exit = r.vm.as_ref().and_then(|vm| vm.try_wait()).or(r.exit);
                let view = VmView {
                    id: id.clone(),
                    state: if exit.is_some() { "exited" } else { "booting" }.into(),
                    pid: r.vm.as_ref().map(|vm| vm.pid()).unwrap_or(0),
                    cpus: r.request.cpus(),
                    memory_mib: r.request.memory_mib(),
                    accel: r.accel.to_owned(),
                    exit,
                    dir: r.dir.clone(),
                };
                (id.clone(), view)
            })
            .collect();
        let mut vms = Vec::with_capacity(records.len());
        for (id, mut view) in records {
            if view.exit.is_none()
                && self
                    .appliance
                    .get(&id)
                    .await
                    .is_ok_and(|c| c.connection.is_some())
            {
                view.state = "running".into();
            }
            vms.push(view);
        }
        let live = vms.iter().filter(|v| v.exit.is_none());
        let (total, available) = host::memory_mib();
        Ok(NodeView {
            cpus: host::cpus(),
            memory_total_mib: total,
            memory_available_mib: available,
            accel,
            vms_running: live.clone().count() as u32,
            vm_cpus: live.clone().map(|v| v.cpus).sum(),
            vm_memory_mib: live.map(|v| u64::from(v.memory_mib)).sum(),
            vms,
        })
    }

    /// Counts for `/metrics`: (running, exited).
    pub fn counts(&self) -> (usize, usize) {
        let records = self.lock();
        let exited = records
            .values()
            .filter(|r| !r.removed && r.vm.as_ref().is_some_and(|vm| vm.try_wait().is_some()))
            .count();
        let all = records.values().filter(|r| !r.removed).count();
        (all - exited, exited)
    }
}

/// The fork workflow's bookkeeping (the workflow is in `fork`).
impl Vms {
    /// The parent of a fork: a VM this tetherd booted, running, whose RAM
    /// is a file it shares.
    pub(super) fn forkable(&self, id: &str) -> Result<fork::Parent, ApiError> {
        let vm = self.running_vm(id)?;
        if vm.try_wait().is_some() {
            return Err(ApiError::Refused(format!("the VM of {id} has exited")));
        }
        let records = self.lock();
        let r = records
            .get(id)
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
        let Some(spec) = r.spec.clone() else {
            return Err(ApiError::Refused(format!(
                "the VM of {id} was started by an earlier tetherd; only VMs this tetherd booted fork"
            )));
        };
        if !spec.memory.shared {
            return Err(ApiError::Refused(format!(
                "{id} is a fork's child, whose memory is a private copy: fork its parent instead"
            )));
        }
        let key = fs::read_to_string(r.dir.join("guest.pub"))
            .ok()
            .and_then(|k| PublicKey::from_openssh(k.trim()).ok())
            .ok_or_else(|| ApiError::Internal(format!("the guest key of {id} is not readable")))?;
        Ok(fork::Parent {
            id: id.to_owned(),
            spec,
            vm,
            key,
        })
    }

    /// Names and numbers the children of a fork of `parent` and records
    /// them (no VM yet), so no other request takes the names; their guests
    /// serve with the parent's key.
    pub(super) fn reserve_children(
        &self,
        parent: &fork::Parent,
        request: &fork::ForkRequest,
    ) -> Result<Vec<(String, u32)>, ApiError> {
        let id = &parent.id;
        let mut forking = self.forking.lock().unwrap_or_else(|p| p.into_inner());
        if forking.contains(id) {
            return Err(ApiError::Refused(format!("{id} is being forked already")));
        }
        let mut records = self.lock();
        let taken = |name: &str, records: &BTreeMap<String, Record>| {
            records.get(name).is_some_and(|r| !r.removed)
                || self.appliance.shared.info(name).is_some()
        };
        for name in &request.names {
            if taken(name, &records) {
                return Err(ApiError::Refused(format!(
                    "container {name} exists (remove it first: DELETE /v1/containers/{name})"
                )));
            }
        }
        let mut n = records
            .iter()
            .filter_map(|(rid, r)| match &r.child {
                Some((p, n)) if p == id => Some(*n),
                _ => fork::child_number(id, rid),
            })
            .max()
            .unwrap_or(0);
        let mut children = Vec::new();
        for i in 0..request.children as usize {
            n += 1;
            let name = match request.names.get(i) {
                Some(name) => name.clone(),
                None => loop {
                    let name = format!("{id}-{n}");
                    if !taken(&name, &records) && !request.names.contains(&name) {
                        break name;
                    }
                    n += 1;
                },
            };
            if n > identity::MAX_CHILD {
                return Err(ApiError::Refused(format!(
                    "{id} has had {} children: no more child numbers",
                    identity::MAX_CHILD
                )));
            }
            children.push((name, n));
        }
        for (name, n) in &children {
            let mut request = r_request(&records, id);
            request.name = Some(name.clone());
            records.insert(
                name.clone(),
                Record {
                    request,
                    dir: self.settings.state_dir.join("vms").join(name),
                    accel: "",
                    vm: None,
                    exit: None,
                    removed: false,
                    spec: None,
                    child: Some((id.clone(), *n)),
                },
            );
            self.appliance.pin_guest(name, parent.key);
        }
        forking.insert(id.clone());
        Ok(children)
    }

    /// The create request a child of `parent` named `child` is recorded with.
    pub(super) fn child_request(&self, parent: &str, child: &str) -> CreateRequest {
        let mut request = r_request(&self.lock(), parent);
        request.name = Some(child.to_owned());
        request
    }

    /// Forgets a child that never ran: its record and files.
    pub(super) fn drop_child(&self, id: &str) {
        self.lock().remove(id);
        self.remove_files(id);
    }

    /// The fork of `parent` is over.
    pub(super) fn end_fork(&self, parent: &str) {
        self.forking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(parent);
    }
}

/// The create request of record `id` (default if it has none).
fn r_request(records: &BTreeMap<String, Record>, id: &str) -> CreateRequest {
    records
        .get(id)
        .map(|r| r.request.clone())
        .unwrap_or_default()
}

impl Vms {
    /// Takes over the VMs an earlier tetherd left in the state directory:
    /// running ones (QEMU reconnects their links; their guests are trusted
    /// again, and stop and rm work on them) and exited ones (listed until rm).
    pub fn adopt_leftovers(self: &Arc<Self>) {
        let Ok(entries) = fs::read_dir(self.settings.state_dir.join("vms")) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let Some(vm) = adopt::adopt(&dir) else {
                continue;
            };
            let request: CreateRequest = fs::read(dir.join("request.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let running = vm.try_wait().is_none();
            let key = fs::read_to_string(dir.join("guest.pub"))
                .ok()
                .and_then(|k| PublicKey::from_openssh(k.trim()).ok());
            if running && let Some(key) = key {
                self.appliance.pin_guest(&id, key);
            }
            info!(container = %id, running, pid = vm.pid(), "took over a VM an earlier tetherd started");
            let accel = vm.accel;
            let vm: Arc<dyn Vm> = Arc::new(vm);
            self.lock().insert(
                id.clone(),
                Record {
                    request,
                    dir,
                    accel,
                    vm: Some(vm.clone()),
                    exit: None,
                    removed: false,
                    spec: None,
                    child: None,
                },
            );
            if running {
                let me = self.clone();
                smol::spawn(async move {
                    let exit = vm.wait().await;
                    me.exited(&id, exit).await;
                })
                .detach();
            }
        }
    }
}

/// The file in a VM's directory naming its RAM file (removed when it exits).
const RAM_PATH: &str = "memory.path";

/// Removes a VM's RAM file.
fn remove_ram(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing the guest RAM file {}: {e}", path.display());
    }
}

/// The MACs of `nics`, in order.
pub(crate) fn macs_of(nics: &[Nic]) -> Vec<String> {
    nics.iter()
        .map(|n| match n {
            Nic::User { mac } => mac.clone(),
        })
        .collect()
}

pub(super) fn vm_error(e: VmError) -> ApiError {
    match e {
        VmError::Unavailable(m) => ApiError::Unavailable(m),
        other => ApiError::Internal(format!("booting the VM: {other}")),
    }
}

#[cfg(test)]
#[path = "vms_tests.rs"]
mod tests;
