//! `POST /v1/containers/{id}/fork`: one running container VM becomes
//! several (docs/PROTOCOL.md 4.5, docs/API.md "Fork"). The guest quiesces
//! (`fork@tether "quiesce"`) and drops its link; QEMU is stopped and its
//! device state saved (`x-ignore-shared`: RAM is the file it lives in); the
//! RAM file is copied (sparse) to a template the children map copy-on-write,
//! since the parent resumes and writes its own; the parent continues, and is
//! told `resume` on its next link; each child loads the state from the
//! template, continues, recovers as a child and announces itself
//! (`forked@tether`), or is reported failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use proto_core::PublicKey;
use proto_core::tether::ForkMode;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::copy::{self, Copied};
use super::guest_config::mac_for;
use super::identity::{self, MAX_CHILD};
use super::request::{bad, check_id, parse_body};
use super::state::{prepare_dir, write_private};
use super::vms::{Vms, macs_of, vm_error};
use crate::api_types::ApiError;
use crate::guestlink::{self, LinkCommand};
use crate::vm::{Memory, Nic, Vm, VmSpec};

/// The most children one fork makes.
pub const MAX_CHILDREN: u32 = 16;
/// How long a child may take to announce itself by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest's link may stay up after it quiesced.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long saving or loading the device state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The body of `POST /v1/containers/{id}/fork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many children.
    pub children: u32,
    /// Their container ids, in order (the rest are `<id>-<n>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Their host names, in order (the rest take their container id). A
    /// host name is RFC 1123 (labels of letters, digits and `-`, up to 253
    /// bytes); Linux takes at most 64 bytes, so a longer one fails the
    /// child's recovery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

impl ForkRequest {
    /// Parses and checks a request body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let request: Self = parse_body(body)?;
        request.check()?;
        Ok(request)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), ApiError> {
        if !(1..=MAX_CHILDREN).contains(&self.children) {
            return Err(bad(
                "children",
                format!("must be 1 to {MAX_CHILDREN}, not {}", self.children),
            ));
        }
        if self.names.len() > self.children as usize {
            return Err(bad(
                "names",
                format!("{} names for {} children", self.names.len(), self.children),
            ));
        }
        for (i, name) in self.names.iter().enumerate() {
            check_id(name).map_err(|why| bad(&format!("names[{i}]"), why))?;
            if self.names[..i].contains(name) {
                return Err(bad(
                    &format!("names[{i}]"),
                    format!("{name:?} is given twice"),
                ));
            }
        }
        if self.hostnames.len() > self.children as usize {
            return Err(bad(
                "hostnames",
                format!(
                    "{} host names for {} children",
                    self.hostnames.len(),
                    self.children
                ),
            ));
        }
        for (i, h) in self.hostnames.iter().enumerate() {
            if !is_dns_name(h) {
                return Err(bad(
                    &format!("hostnames[{i}]"),
                    format!(
                        "{h:?} is not a host name (labels of letters, digits and '-', up to 253 bytes)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An RFC 1123 host name: dot-separated labels of 1 to 63 letters, digits
/// and `-` (not at either end), 253 bytes at most.
fn is_dns_name(h: &str) -> bool {
    (1..=253).contains(&h.len())
        && h.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// One line of the fork's `application/x-ndjson` answer. `ms` is always
/// the time since the fork was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ForkEvent {
    /// The parent's guest stopped its sessions, drained their output and
    /// dropped its link.
    Quiesced {
        id: String,
        generation: u64,
        ms: u64,
    },
    /// The parent's device state is saved, its RAM copied for the children,
    /// and it runs again: it was paused for `paused_ms`.
    Saved {
        ms: u64,
        save_ms: u64,
        paused_ms: u64,
        state_bytes: u64,
        ram_bytes: u64,
    },
    /// The parent's guest was told to resume its sessions on its new link.
    Resumed { id: String, ms: u64 },
    /// A child announced itself, `after_cont_ms` after its VM continued;
    /// its guest took `recovery_us` to recover.
    Connected {
        id: String,
        child: u32,
        ms: u64,
        after_cont_ms: u64,
        recovery_us: u64,
    },
    /// A child failed: its VM did not start or load, it did not announce
    /// itself in time (its VM is killed), or its recovery failed (`reason`
    /// is `step: why`; its processes stay stopped).
    Failed {
        id: String,
        child: u32,
        ms: u64,
        reason: String,
    },
    /// Something failed after the parent quiesced; the parent was continued
    /// and resumed where that could be done.
    Error { ms: u64, message: String },
    /// The last line.
    Done {
        ms: u64,
        connected: Vec<String>,
        failed: Vec<String>,
    },
}

/// The files a fork makes: the children's RAM template (in the shm
/// directory) and the saved device state (in the parent's directory).
struct ForkFiles {
    template: PathBuf,
    state: PathBuf,
}

/// What saving the parent took.
struct Saved {
    save_ms: u64,
    /// When the parent was stopped.
    paused: Instant,
    state_bytes: u64,
    ram_bytes: u64,
}

/// A child to make.
#[derive(Debug, Clone)]
struct Child {
    id: String,
    n: u32,
    spec: VmSpec,
    generation: u64,
}

/// Where a fork's events go, and when it began.
#[derive(Clone)]
struct Events {
    started: Instant,
    tx: Sender<ForkEvent>,
}

impl Events {
    /// Milliseconds since the fork began.
    fn ms(&self) -> u64 {
        ms(self.started)
    }

    fn send(&self, event: ForkEvent) {
        let _ = self.tx.try_send(event);
    }
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

/// What the fork workflow needs of the parent.
pub(super) struct Parent {
    pub id: String,
    pub spec: VmSpec,
    pub vm: Arc<dyn Vm>,
    /// The guest's host key (its children serve with it).
    pub key: PublicKey,
}

impl Vms {
    /// Forks container `id`'s VM into `request.children` children; returns
    /// once the parent's guest has quiesced, with the events that follow.
    pub async fn fork(
        self: &Arc<Self>,
        id: &str,
        request: ForkRequest,
        timeout: Duration,
    ) -> Result<Receiver<ForkEvent>, ApiError> {
        request.check()?;
        let started = Instant::now();
        let parent = self.forkable(id)?;
        let reserved = self.reserve_children(&parent, &request)?;
        let files = ForkFiles {
            template: self
                .settings
                .shm_dir
                .join(format!("tetherd-{id}-template-{}", identity::generation())),
            state: parent
                .spec
                .dir
                .join(format!("fork-{}.state", identity::generation())),
        };
        let prepared =
            match self.prepare_children(&parent, &reserved, &request.hostnames, &files.template) {
                Ok(children) => self.quiesce(id).await.map(|q| (children, q)),
                Err(e) => Err(e),
            };
        let (children, (generation, old_link)) = match prepared {
            Ok(p) => p,
            Err(e) => {
                for (child, _) in &reserved {
                    self.drop_child(child);
                }
                self.end_fork(id);
                return Err(e);
            }
        };
        let (tx, rx) = async_channel::unbounded();
        let events = Events { started, tx };
        events.send(ForkEvent::Quiesced {
            id: id.to_owned(),
            generation,
            ms: events.ms(),
        });
        let me = self.clone();
        smol::spawn(async move {
            let id = parent.id.clone();
            me.run_fork(parent, children, files, old_link, timeout, &events)
                .await;
            me.end_fork(&id);
        })
        .detach();
        Ok(rx)
    }

    /// Asks the guest serving `id` to quiesce and waits for its link to
    /// drop: its identity generation and the dropped link's number.
    async fn quiesce(&self, id: &str) -> Result<(u64, u64), ApiError> {
        let shared = &self.appliance.shared;
        let (entry, link) = shared.wait_for(id, Duration::from_secs(10)).await?;
        let (agreed, generation) = guestlink::ask(shared, &link, "fork@tether quiesce", |reply| {
            LinkCommand::Fork {
                mode: ForkMode::Quiesce,
                reply,
            }
        })
        .await?;
        if !agreed {
            return Err(ApiError::Refused(format!(
                "the guest of {id} refused to quiesce: the guest does not support fork \
                 (or is quiesced for another fork)"
            )));
        }
        let limit = Instant::now() + DISCONNECT_WAIT;
        while shared.link_alive(entry.generation) && Instant::now() < limit {
            let listener = shared.changes_noted.listen();
            if !shared.link_alive(entry.generation) {
                break;
            }
            futures_lite::future::or(listener, async {
                smol::Timer::after(Duration::from_millis(100)).await;
            })
            .await;
        }
        Ok((generation.unwrap_or(0), entry.generation))
    }

    /// Everything after the quiesce; events go to `tx`.
    async fn run_fork(
        self: &Arc<Self>,
        parent: Parent,
        children: Vec<Child>,
        files: ForkFiles,
        old_link: u64,
        timeout: Duration,
        events: &Events,
    ) {
        let send = |e: ForkEvent| events.send(e);
        let ForkFiles { template, state } = files;
        let saved = self.save(&parent, &children, &template, &state).await;
        // The parent runs on whatever happened.
        let continued = self.continue_parent(&parent.vm).await;
        let resume = {
            let me = self.clone();
            let id = parent.id.clone();
            smol::spawn(async move { me.resume_parent(&id, old_link).await })
        };
        let failure = match (saved, continued) {
            (Ok(saved), Ok(())) => {
                send(ForkEvent::Saved {
                    ms: events.ms(),
                    save_ms: saved.save_ms,
                    paused_ms: ms(saved.paused),
                    state_bytes: saved.state_bytes,
                    ram_bytes: saved.ram_bytes,
                });
                None
            }
            (Err(e), _) | (Ok(_), Err(e)) => Some(e.to_string()),
        };
        let mut connected = Vec::new();
        let mut failed = Vec::new();
        if let Some(message) = failure {
            warn!(container = %parent.id, "fork failed: {message}");
            send(ForkEvent::Error {
                ms: events.ms(),
                message: message.clone(),
            });
            for child in &children {
                self.drop_child(&child.id);
                failed.push(child.id.clone());
            }
        } else {
            let (loaded_tx, loaded_rx) = async_channel::unbounded::<()>();
            let tasks: Vec<_> = children
                .into_iter()
                .map(|child| {
                    let me = self.clone();
                    let (events, loaded, state) =
                        (events.clone(), loaded_tx.clone(), state.clone());
                    smol::spawn(async move {
                        me.run_child(child, &state, timeout, &loaded, &events).await
                    })
                })
                .collect();
            drop(loaded_tx);
            // Every child has mapped the template (or failed) once its
            // state is loaded: the file goes, the mappings stay.
            while loaded_rx.recv().await.is_ok() {}
            remove(&template);
            for task in tasks {
                let (id, ok) = task.await;
                if ok {
                    connected.push(id);
                } else {
                    failed.push(id);
                }
            }
        }
        remove(&template);
        remove(&state);
        match resume.await {
            Ok(()) => send(ForkEvent::Resumed {
                id: parent.id.clone(),
                ms: events.ms(),
            }),
            Err(e) => {
                warn!(container = %parent.id, "resuming after the fork: {e}");
                send(ForkEvent::Error {
                    ms: events.ms(),
                    message: format!("resuming {}: {e}", parent.id),
                });
            }
        }
        info!(container = %parent.id, ?connected, ?failed, ms = events.ms(), "fork done");
        send(ForkEvent::Done {
            ms: events.ms(),
            connected,
            failed,
        });
    }

    /// Stops the parent, saves its device state to `state`, copies its RAM
    /// to `template` and its disks to the children's directories.
    async fn save(
        &self,
        parent: &Parent,
        children: &[Child],
        template: &Path,
        state: &Path,
    ) -> Result<Saved, ApiError> {
        let qmp_error = |e: crate::vm::QmpError| ApiError::Internal(format!("saving the VM: {e}"));
        let mut qmp = parent.vm.qmp().await.map_err(vm_error)?;
        let paused = Instant::now();
        qmp.stop().await.map_err(qmp_error)?;
        qmp.save_state(state, MIGRATION_TIMEOUT)
            .await
            .map_err(qmp_error)?;
        let save_ms = ms(paused);
        let ram = parent.spec.memory.path.clone();
        let template = template.to_owned();
        let disks: Vec<(PathBuf, PathBuf)> = children
            .iter()
            .flat_map(|c| parent.spec.disks.iter().cloned().zip(c.spec.disks.clone()))
            .collect();
        let ram_bytes = smol::unblock(move || {
            let copied = copy::copy(&ram, &template, false).map_err(|e| {
                ApiError::Internal(format!(
                    "copying the guest RAM {} to {}: {e}",
                    ram.display(),
                    template.display()
                ))
            })?;
            for (from, to) in disks {
                copy::copy(&from, &to, true).map_err(|e| {
                    ApiError::Internal(format!(
                        "copying the disk {} to {}: {e}",
                        from.display(),
                        to.display()
                    ))
                })?;
            }
            Ok::<_, ApiError>(match copied {
                Copied::Sparse { bytes } => bytes,
                Copied::Reflink => 0,
            })
        })
        .await?;
        let state_bytes = std::fs::metadata(state).map(|m| m.len()).unwrap_or(0);
        Ok(Saved {
            save_ms,
            paused,
            state_bytes,
            ram_bytes,
        })
    }

    /// Continues the parent's vCPUs (a fresh QMP connection: the one that
    /// saved may have failed).
    async fn continue_parent(&self, vm: &Arc<dyn Vm>) -> Result<(), ApiError> {
        let mut qmp = vm.qmp().await.map_err(vm_error)?;
        qmp.cont()
            .await
            .map_err(|e| ApiError::Internal(format!("continuing the parent: {e}")))
    }

    /// Sends `fork@tether "resume"` on the parent's next link.
    async fn resume_parent(&self, id: &str, old_link: u64) -> Result<(), ApiError> {
        let shared = &self.appliance.shared;
        let limit = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            let left = limit.saturating_duration_since(Instant::now());
            let (entry, link) = shared.wait_for(id, left).await?;
            // Not the old link, nor a child's: a child whose recovery failed
            // before it renamed its sessions lists the parent's id.
            if entry.generation == old_link || shared.forks.parent_of(entry.generation).is_some() {
                smol::Timer::after(Duration::from_millis(50)).await;
                continue;
            }
            let (agreed, _) = guestlink::ask(shared, &link, "fork@tether resume", |reply| {
                LinkCommand::Fork {
                    mode: ForkMode::Resume,
                    reply,
                }
            })
            .await?;
            return if agreed {
                info!(container = %id, "resumed after the fork");
                Ok(())
            } else {
                Err(ApiError::Refused(format!(
                    "the guest of {id} refused fork@tether resume"
                )))
            };
        }
    }

    /// Starts one child from `state`, continues it, and waits for its
    /// announcement: its id, and whether it connected and recovered.
    async fn run_child(
        self: &Arc<Self>,
        child: Child,
        state: &Path,
        timeout: Duration,
        loaded: &Sender<()>,
        events: &Events,
    ) -> (String, bool) {
        let shared = &self.appliance.shared;
        let announced = shared.forks.expect(&child.id, child.generation);
        let generation = child.generation;
        let fail = |reason: String| {
            warn!(container = %child.id, "fork child failed: {reason}");
            events.send(ForkEvent::Failed {
                id: child.id.clone(),
                child: child.n,
                ms: events.ms(),
                reason,
            });
            (child.id.clone(), false)
        };
        let cont = self.start_child(&child, state).await;
        let _ = loaded.try_send(());
        let (vm, cont_at) = match cont {
            Ok(c) => c,
            Err((vm, e)) => {
                shared.forks.cancel(generation);
                match vm {
                    Some(vm) => {
                        let _ = vm.kill();
                    }
                    None => self.drop_child(&child.id),
                }
                return fail(e.to_string());
            }
        };
        let heard = futures_lite::future::or(async { announced.recv().await.ok() }, async {
            smol::Timer::after(timeout).await;
            None
        })
        .await;
        shared.forks.cancel(generation);
        match heard {
            Some(forked) if forked.failure.is_empty() => {
                events.send(ForkEvent::Connected {
                    id: child.id.clone(),
                    child: child.n,
                    ms: events.ms(),
                    after_cont_ms: ms(cont_at),
                    recovery_us: forked.recovery_us,
                });
                (child.id.clone(), true)
            }
            Some(forked) => {
                self.appliance.failed_child(&child.id, &forked);
                fail(forked.failure)
            }
            None => {
                let _ = vm.kill();
                fail(format!(
                    "did not connect within {timeout:?} (its VM was killed; console: {})",
                    child.spec.console_log().display()
                ))
            }
        }
    }

    /// Starts a child's QEMU, loads the saved state and continues it.
    async fn start_child(
        self: &Arc<Self>,
        child: &Child,
        state: &Path,
    ) -> Result<(Arc<dyn Vm>, Instant), (Option<Arc<dyn Vm>>, ApiError)> {
        let backend = self.backend().await.map_err(|e| (None, e))?;
        let vm = self
            .launch(&backend, &child.spec)
            .await
            .map_err(|e| (None, e))?;
        let loaded = async {
            let mut qmp = vm.qmp().await.map_err(vm_error)?;
            let qmp_error =
                |e: crate::vm::QmpError| ApiError::Internal(format!("loading the saved VM: {e}"));
            qmp.load_state(state, MIGRATION_TIMEOUT)
                .await
                .map_err(qmp_error)?;
            qmp.cont().await.map_err(qmp_error)?;
            Ok::<_, ApiError>(Instant::now())
        };
        match loaded.await {
            Ok(at) => {
                info!(container = %child.id, pid = vm.pid(), "fork child continued");
                Ok((vm, at))
            }
            Err(e) => Err((Some(vm), e)),
        }
    }

    /// The children's directories and VM specs: the parent's config and host
    /// key, an identity and MACs of their own, RAM from the template.
    fn prepare_children(
        &self,
        parent: &Parent,
        reserved: &[(String, u32)],
        hostnames: &[String],
        template: &Path,
    ) -> Result<Vec<Child>, ApiError> {
        let from = &parent.spec.dir;
        reserved
            .iter()
            .enumerate()
            .map(|(i, (id, n))| {
                let dir = self.settings.state_dir.join("vms").join(id);
                prepare_dir(&dir)?;
                for file in ["config.json", "guest.pub"] {
                    std::fs::copy(from.join(file), dir.join(file)).map_err(|e| {
                        ApiError::Internal(format!("copying {} of {}: {e}", file, parent.id))
                    })?;
                }
                let request = self.child_request(&parent.id, id);
                write_private(
                    &dir.join("request.json"),
                    format!("{:#}\n", serde_json::json!(request)).as_bytes(),
                )?;
                let nics: Vec<Nic> = parent
                    .spec
                    .nics
                    .iter()
                    .enumerate()
                    .map(|(i, _)| Nic::User {
                        mac: if i == 0 {
                            mac_for(id)
                        } else {
                            mac_for(&format!("{id}/nic{i}"))
                        },
                    })
                    .collect();
                let hostname = hostnames
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| identity::hostname_for(id));
                let me = identity::child(&parent.id, id, *n, &hostname, &macs_of(&nics))?;
                let identity_path = dir.join("identity");
                identity::write(&identity_path, &me)?;
                let disks = (0..parent.spec.disks.len())
                    .map(|i| dir.join(format!("disk{i}.img")))
                    .collect();
                let spec = VmSpec {
                    id: id.clone(),
                    dir: dir.clone(),
                    config: dir.join("config.json"),
                    nics,
                    disks,
                    memory: Memory {
                        path: template.to_owned(),
                        shared: false,
                    },
                    vmgenid: identity::vmgenid(),
                    identity: identity_path,
                    incoming: true,
                    ..parent.spec.clone()
                };
                Ok(Child {
                    id: id.clone(),
                    n: *n,
                    spec,
                    generation: me.generation,
                })
            })
            .collect()
    }
}

/// Removes a file the fork made, if it is there.
fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", path.display());
    }
}

/// Whether `id` is a child name of `parent` (`<parent>-<n>`): its number.
pub(super) fn child_number(parent: &str, id: &str) -> Option<u32> {
    let n = id.strip_prefix(parent)?.strip_prefix('-')?;
    if n.starts_with('0') {
        return None;
    }
    n.parse().ok().filter(|n| (1..=MAX_CHILD).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_requests_are_checked_field_by_field() {
        let ok = ForkRequest::parse(br#"{"children": 2, "names": ["a"]}"#).unwrap();
        assert_eq!((ok.children, ok.names.len()), (2, 1));
        let error = |body: &str| ForkRequest::parse(body.as_bytes()).unwrap_err().to_string();
        assert!(error(r#"{"children": 0}"#).contains("field `children`"));
        assert!(error(r#"{"children": 17}"#).contains("1 to 16"));
        assert!(error(r#"{}"#).contains("missing field `children`"));
        assert!(error(r#"{"children": 1, "names": ["a", "b"]}"#).contains("2 names for 1"));
        assert!(error(r#"{"children": 2, "names": ["a", "a"]}"#).contains("given twice"));
        assert!(error(r#"{"children": 1, "names": ["../x"]}"#).contains("names[0]"));
        assert!(error(r#"{"children": 1, "colour": 1}"#).contains("unknown field"));
        assert!(error(r#"{"children": 1, "hostnames": ["a_b"]}"#).contains("hostnames[0]"));
        assert!(error(r#"{"children": 1, "hostnames": ["a", "b"]}"#).contains("2 host names"));
        let long = format!("{}.{}", "a".repeat(63), "b".repeat(63));
        let body = format!(r#"{{"children": 1, "hostnames": ["{long}"]}}"#);
        assert_eq!(
            ForkRequest::parse(body.as_bytes()).unwrap().hostnames,
            [long]
        );
    }

    #[test]
    fn child_numbers_come_from_plain_child_names() {
        assert_eq!(child_number("web", "web-3"), Some(3));
        assert_eq!(child_number("web", "web-03"), None);
        assert_eq!(child_number("web", "web-0"), None);
        assert_eq!(child_number("web", "web-x"), None);
        assert_eq!(child_number("web", "webs-1"), None);
        assert_eq!(child_number("web", "web-1-2"), None);
    }

    #[test]
    fn events_are_one_json_object_each_with_its_kind() {
        let e = ForkEvent::Connected {
            id: "web-1".into(),
            child: 1,
            ms: 1500,
            after_cont_ms: 900,
            recovery_us: 80_000,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"event":"connected","id":"web-1","child":1,"ms":1500,"after_cont_ms":900,"recovery_us":80000}"#
        );
        assert_eq!(serde_json::from_str::<ForkEvent>(&line).unwrap(), e);
    }
}
