//! What the HTTP server needs from the appliance, as traits: `Appliance` and
//! `Attachment` implement them, and the tests implement them with a scripted
//! fake so the HTTP and WebSocket layers can be tested on their own.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::api_types::ApiError;
use crate::api_types::{
    AttachOptions, ContainerView, ExecOptions, ExitStatus, LogsOptions, Output,
};
use crate::appliance::{Appliance, Attachment};
use crate::node::fork::{ForkEvent, ForkRequest};
use crate::node::request::{CreateRequest, Created, NodeView, Removed, StopReply};

fn no_vms() -> ApiError {
    ApiError::Unsupported("this tetherd does not boot VMs".into())
}

/// A live stream of a container's output with its stdin, resize and offset.
/// `next` must be cancel-safe: the server races it against client input.
pub trait Session: Send + Sync + 'static {
    /// The container (or exec) id.
    fn id(&self) -> &str;
    /// Whether the process has a terminal (no stderr then).
    fn tty(&self) -> bool;
    /// The output offset this session started at (after any gap).
    fn start(&self) -> u64;
    /// The output offset just past what `next` has returned.
    fn offset(&self) -> u64;
    fn next(&mut self) -> impl Future<Output = Option<Output>> + Send;
    fn write_stdin(&self, data: Bytes) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Resolves when `write_stdin` would not wait (holds no borrow of the
    /// session, so output can be read meanwhile).
    fn stdin_room(&self) -> impl Future<Output = ()> + Send + 'static;
    fn close_stdin(&self) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn resize(&self, cols: u32, rows: u32) -> impl Future<Output = Result<(), ApiError>> + Send;
}

/// The appliance's operations.
pub trait Backend: Clone + Send + Sync + 'static {
    type Session: Session;
    fn list(&self) -> impl Future<Output = Vec<ContainerView>> + Send;
    fn get(&self, id: &str) -> impl Future<Output = Result<ContainerView, ApiError>> + Send;
    fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<ExitStatus, ApiError>> + Send;
    fn signal(&self, id: &str, signal: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn attach(
        &self,
        id: &str,
        options: AttachOptions,
    ) -> impl Future<Output = Result<Self::Session, ApiError>> + Send;
    fn exec(
        &self,
        id: &str,
        options: ExecOptions,
    ) -> impl Future<Output = Result<Self::Session, ApiError>> + Send;
    fn logs(
        &self,
        id: &str,
        options: LogsOptions,
    ) -> impl Future<Output = Result<Self::Session, ApiError>> + Send;
    fn metrics(&self) -> String;

    /// Boots a VM for a new container (`POST /v1/containers`).
    fn create(
        &self,
        request: CreateRequest,
    ) -> impl Future<Output = Result<Created, ApiError>> + Send {
        drop(request);
        async { Err(no_vms()) }
    }
    /// Powers a container's VM down, killing it after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<StopReply, ApiError>> + Send {
        let _ = (id, grace);
        async { Err(no_vms()) }
    }
    /// Removes a container's VM and its files.
    fn remove(
        &self,
        id: &str,
        force: bool,
    ) -> impl Future<Output = Result<Removed, ApiError>> + Send {
        let _ = (id, force);
        async { Err(no_vms()) }
    }
    /// Forks a container's VM (`POST /v1/containers/{id}/fork`): once the
    /// guest quiesced, the events of the rest of the fork.
    fn fork(
        &self,
        id: &str,
        request: ForkRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<async_channel::Receiver<ForkEvent>, ApiError>> + Send {
        let _ = (id, request, timeout);
        async { Err(no_vms()) }
    }
    /// The node's resources and VMs (`GET /v1/node`).
    fn node(&self) -> impl Future<Output = Result<NodeView, ApiError>> + Send {
        async { Err(no_vms()) }
    }
}

impl Session for Attachment {
    fn id(&self) -> &str {
        &self.id
    }
    fn tty(&self) -> bool {
        self.tty
    }
    fn start(&self) -> u64 {
        self.start
    }
    fn offset(&self) -> u64 {
        Attachment::offset(self)
    }
    fn next(&mut self) -> impl Future<Output = Option<Output>> + Send {
        Attachment::next(self)
    }
    fn write_stdin(&self, data: Bytes) -> impl Future<Output = Result<(), ApiError>> + Send {
        Attachment::write_stdin(self, data)
    }
    fn stdin_room(&self) -> impl Future<Output = ()> + Send + 'static {
        Attachment::stdin_room(self)
    }
    fn close_stdin(&self) -> impl Future<Output = Result<(), ApiError>> + Send {
        Attachment::close_stdin(self)
    }
    fn resize(&self, cols: u32, rows: u32) -> impl Future<Output = Result<(), ApiError>> + Send {
        Attachment::resize(self, cols, rows)
    }
}

impl Backend for Appliance {
    type Session = Attachment;
    fn list(&self) -> impl Future<Output = Vec<ContainerView>> + Send {
        Appliance::list(self)
    }
    fn get(&self, id: &str) -> impl Future<Output = Result<ContainerView, ApiError>> + Send {
        Appliance::get(self, id)
    }
    fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<ExitStatus, ApiError>> + Send {
        Appliance::wait(self, id, timeout)
    }
    fn signal(&self, id: &str, signal: &str) -> impl Future<Output = Result<(), ApiError>> + Send {
        Appliance::signal(self, id, signal)
    }
    fn start(&self, id: &str) -> impl Future<Output = Result<(), ApiError>> + Send {
        Appliance::start(self, id)
    }
    fn attach(
        &self,
        id: &str,
        options: AttachOptions,
    ) -> impl Future<Output = Result<Attachment, ApiError>> + Send {
        Appliance::attach(self, id, options)
    }
    fn exec(
        &self,
        id: &str,
        options: ExecOptions,
    ) -> impl Future<Output = Result<Attachment, ApiError>> + Send {
        Appliance::exec(self, id, options)
    }
    fn logs(
        &self,
        id: &str,
        options: LogsOptions,
    ) -> impl Future<Output = Result<Attachment, ApiError>> + Send {
        Appliance::logs(self, id, options)
    }
    fn metrics(&self) -> String {
        Appliance::metrics(self)
    }
}
