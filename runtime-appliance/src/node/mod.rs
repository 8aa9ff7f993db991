//! This machine as a node: the appliance (guest links, containers, attach)
//! plus the VMs it boots for containers (`vms`). `Node` is what `tetherd
//! serve` puts behind the HTTP API: the container routes go to the
//! appliance, and for a container in one of its VMs an attach or a wait also
//! watches the VM, so a VM that dies is reported instead of waited for.

pub mod boot_files;
mod copy;
pub mod fork;
pub mod guest_config;
pub mod host;
pub mod identity;
pub mod request;
pub mod state;
pub mod vms;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future;
use smol::Timer;

use crate::api_types::{
    ApiError, AttachOptions, ContainerView, ExecOptions, ExitStatus, LogsOptions, Output,
};
use crate::appliance::{Appliance, Attachment};
use crate::http::backend::{Backend, Session};
use request::{CreateRequest, Created, NodeView, Removed, StopReply};
use vms::{VmWatch, Vms};

/// How long after its VM exited a container's stream may still deliver
/// what was already on its way, and its last link may still be closing.
const AFTER_VM_EXIT: Duration = Duration::from_millis(1000);

/// The appliance and its VMs.
#[derive(Clone)]
pub struct Node {
    pub appliance: Appliance,
    /// `None`: this tetherd does not boot VMs.
    pub vms: Option<Arc<Vms>>,
}

impl Node {
    /// A node without VMs (`serve` always has them; tests may not).
    pub fn without_vms(appliance: Appliance) -> Self {
        Self {
            appliance,
            vms: None,
        }
    }

    fn watch(&self, id: &str) -> Option<VmWatch> {
        self.vms.as_ref()?.watch(id)
    }

    fn vms(&self) -> Result<&Arc<Vms>, ApiError> {
        self.vms
            .as_ref()
            .ok_or_else(|| ApiError::Unsupported("this tetherd does not boot VMs".into()))
    }
}

/// Resolves when the VM has exited (plus a moment), as an error naming it.
async fn vm_gone<T>(id: &str, watch: &VmWatch) -> Result<T, ApiError> {
    let exit = watch.vm.wait().await;
    Timer::after(AFTER_VM_EXIT).await;
    Err(ApiError::Refused(format!(
        "the VM of {id} has exited ({exit}) without its container reporting an exit; its console: {}",
        watch.console.display()
    )))
}

/// An attachment that also ends when its container's VM is gone.
pub struct NodeSession {
    inner: Attachment,
    vm: Option<VmWatch>,
}

impl NodeSession {
    fn new(inner: Attachment, vm: Option<VmWatch>) -> Self {
        Self { inner, vm }
    }
}

impl Session for NodeSession {
    fn id(&self) -> &str {
        &self.inner.id
    }
    fn tty(&self) -> bool {
        self.inner.tty
    }
    fn start(&self) -> u64 {
        self.inner.start
    }
    fn offset(&self) -> u64 {
        self.inner.offset()
    }
    async fn next(&mut self) -> Option<Output> {
        let Some(watch) = self.vm.clone() else {
            return self.inner.next().await;
        };
        // Output already on its way is delivered first; then, with the VM
        // gone, the stream ends instead of waiting for a re-attach.
        future::or(self.inner.next(), async {
            watch.vm.wait().await;
            Timer::after(AFTER_VM_EXIT).await;
            None
        })
        .await
    }
    fn write_stdin(&self, data: Bytes) -> impl Future<Output = Result<(), ApiError>> + Send {
        self.inner.write_stdin(data)
    }
    fn stdin_room(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.stdin_room()
    }
    fn close_stdin(&self) -> impl Future<Output = Result<(), ApiError>> + Send {
        self.inner.close_stdin()
    }
    fn resize(&self, cols: u32, rows: u32) -> impl Future<Output = Result<(), ApiError>> + Send {
        self.inner.resize(cols, rows)
    }
}

impl Backend for Node {
    type Session = NodeSession;

    async fn list(&self) -> Vec<ContainerView> {
        self.appliance.list().await
    }

    async fn get(&self, id: &str) -> Result<ContainerView, ApiError> {
        self.appliance.get(id).await
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<ExitStatus, ApiError> {
        let Some(watch) = self.watch(id) else {
            return self.appliance.wait(id, timeout).await;
        };
        let gone = async {
            let err = vm_gone(id, &watch).await;
            // The container may have exited just before its VM did.
            match self.appliance.get(id).await {
                Ok(v) if v.state == "exited" => Ok(ExitStatus::Code(v.exit_code.unwrap_or(0))),
                _ => err,
            }
        };
        future::or(self.appliance.wait(id, timeout), gone).await
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), ApiError> {
        self.appliance.signal(id, signal).await
    }

    async fn start(&self, id: &str) -> Result<(), ApiError> {
        self.appliance.start(id).await
    }

    async fn attach(&self, id: &str, options: AttachOptions) -> Result<NodeSession, ApiError> {
        let watch = self.watch(id);
        let attach = self.appliance.attach(id, options);
        let inner = match &watch {
            Some(w) => future::or(attach, vm_gone(id, w)).await?,
            None => attach.await?,
        };
        Ok(NodeSession::new(inner, watch))
    }

    async fn exec(&self, id: &str, options: ExecOptions) -> Result<NodeSession, ApiError> {
        let watch = self.watch(id);
        let exec = self.appliance.exec(id, options);
        let inner = match &watch {
            Some(w) => future::or(exec, vm_gone(id, w)).await?,
            None => exec.await?,
        };
        Ok(NodeSession::new(inner, watch))
    }

    async fn logs(&self, id: &str, options: LogsOptions) -> Result<NodeSession, ApiError> {
        let watch = self.watch(id);
        let inner = self.appliance.logs(id, options).await?;
        Ok(NodeSession::new(inner, watch))
    }

    fn metrics(&self) -> String {
        let mut m = self.appliance.metrics();
        if let Some(vms) = &self.vms {
            let (running, exited) = vms.counts();
            m.push_str(&format!(
                "# HELP tetherd_vms VMs booted by this tetherd, by state.\n# TYPE tetherd_vms gauge\n\
                 tetherd_vms{{state=\"running\"}} {running}\ntetherd_vms{{state=\"exited\"}} {exited}\n"
            ));
        }
        m
    }

    async fn create(&self, request: CreateRequest) -> Result<Created, ApiError> {
        self.vms()?.create(request).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<StopReply, ApiError> {
        self.vms()?.stop(id, grace).await
    }

    async fn remove(&self, id: &str, force: bool) -> Result<Removed, ApiError> {
        let vm = match &self.vms {
            Some(vms) => vms.remove(id, force).await,
            None => Err(ApiError::NotFound(id.to_owned())),
        };
        match vm {
            // Not a VM: a container a guest of its own serves, whose
            // records and output the state directory holds.
            Err(ApiError::NotFound(_)) if self.appliance.remove_stored(id)? => {
                self.appliance.forget(id);
                Ok(Removed {
                    id: id.to_owned(),
                    killed: false,
                })
            }
            other => other,
        }
    }

    async fn node(&self) -> Result<NodeView, ApiError> {
        self.vms()?.node().await
    }

    async fn fork(
        &self,
        id: &str,
        request: fork::ForkRequest,
        timeout: Duration,
    ) -> Result<async_channel::Receiver<fork::ForkEvent>, ApiError> {
        self.vms()?.fork(id, request, timeout).await
    }
}
