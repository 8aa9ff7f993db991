//! The appliance core: what the HTTP API, the CLI and the demo can do with the
//! containers of every connected guest. Guest links are accepted by `listen`
//! and run in `guestlink`; the shared map lives in `registry`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto_core::tether::{self, Cursor, LIVE, Signal, State};
use proto_core::{ChannelRequest, PrivateKey, PublicKey};
use smol::Async;
use tracing::warn;

use crate::api_types::*;
pub use crate::attachment::Attachment;
use crate::attachment::{self, Plan};
use crate::guestlink::{self, LinkCommand, OpenKind};
use crate::limits::{Limits, Refusals};
use crate::registry::Shared;

/// How long a signal or start request waits for its container by default.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The appliance. Cheap to clone; every clone is the same appliance.
#[derive(Clone)]
pub struct Appliance {
    pub(crate) shared: Arc<Shared>,
    /// Container records and output on disk (`stored`), when configured.
    pub(crate) store: Option<Arc<crate::store::Store>>,
}

impl Appliance {
    /// An appliance with this SSH key that trusts the `known` guest host keys
    /// (container id -> key), or any guest when `None`.
    pub fn new(key: PrivateKey, known: Option<HashMap<String, PublicKey>>) -> Self {
        Self::with_limits(key, known, Limits::default())
    }

    /// Like [`Appliance::new`], with these bounds against hostile guests.
    pub fn with_limits(
        key: PrivateKey,
        known: Option<HashMap<String, PublicKey>>,
        limits: Limits,
    ) -> Self {
        Self {
            shared: Arc::new(Shared::new(key, known).with_limits(limits)),
            store: None,
        }
    }

    /// Accepts guest links on `listener` forever; `sync` runs link sync first
    /// (for hypervisor serial bridges).
    pub async fn listen(&self, listener: Async<TcpListener>, sync: bool) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let shared = &self.shared;
                    let Some(slot) = shared.slots.admit(shared.limits.max_links) else {
                        Refusals::count(&shared.refusals.links, 1);
                        warn!(%peer, "guest link refused: --max-links links are open");
                        continue;
                    };
                    smol::spawn(guestlink::run(shared.clone(), stream, sync, slot)).detach();
                }
                Err(e) => {
                    warn!("accepting a guest link: {e}");
                    smol::Timer::after(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Binds a guest listener and serves it in the background; returns its address.
    pub fn spawn_listener(&self, addr: SocketAddr, sync: bool) -> std::io::Result<SocketAddr> {
        let listener = Async::<TcpListener>::bind(addr)?;
        let local = listener.get_ref().local_addr()?;
        let me = self.clone();
        smol::spawn(async move { me.listen(listener, sync).await }).detach();
        Ok(local)
    }

    /// Every container of every connected guest (and exited ones still known).
    pub async fn list(&self) -> Vec<ContainerView> {
        self.shared.views()
    }

    /// One container.
    pub async fn get(&self, id: &str) -> Result<ContainerView, ApiError> {
        let (info, generation) = self
            .shared
            .info(id)
            .ok_or_else(|| ApiError::NotFound(id.into()))?;
        Ok(ContainerView::new(&info, generation).with_note(self.shared.forks.note(id)))
    }

    /// Waits until the container exits; waits `timeout` for it to appear first.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<ExitStatus, ApiError> {
        if self.shared.info(id).is_none() {
            self.shared.wait_for(id, timeout).await?;
        }
        let changed = self.shared.watch(id);
        loop {
            let listener = changed.listen();
            if let Some((info, _)) = self.shared.info(id)
                && info.state == State::Exited
            {
                return Ok(ExitStatus::Code(info.exit_status));
            }
            listener.await;
        }
    }

    /// Sends a signal (name without "SIG", e.g. "TERM") to a container's process group.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), ApiError> {
        let Some(signal) = Signal::parse(signal) else {
            return Err(ApiError::BadRequest(format!("unknown signal {signal:?}")));
        };
        let request = ChannelRequest::Signal {
            name: signal.name(),
        };
        match attachment::control_request(&self.shared, id, request, CONTROL_TIMEOUT).await? {
            true => Ok(()),
            false => Err(ApiError::Refused(format!(
                "{id} is not running; SIG{signal} not delivered"
            ))),
        }
    }

    /// Releases a start-gated container.
    pub async fn start(&self, id: &str) -> Result<(), ApiError> {
        let request = ChannelRequest::Other {
            name: tether::START.into(),
            data: Default::default(),
        };
        match attachment::control_request(&self.shared, id, request, CONTROL_TIMEOUT).await? {
            true => Ok(()),
            false => Err(ApiError::Refused(format!("{id} is not waiting to start"))),
        }
    }

    /// A fresh container list from the link serving `id`, and its entry.
    async fn fresh_end(
        &self,
        link: &async_channel::Sender<LinkCommand>,
        id: &str,
    ) -> Result<u64, ApiError> {
        let list = guestlink::ask(&self.shared, link, "a container list", |reply| {
            LinkCommand::List { reply }
        })
        .await?;
        list.iter()
            .find(|c| c.id == id)
            .map(|c| c.output_end)
            .ok_or_else(|| ApiError::NotFound(id.into()))
    }

    /// Attaches to a container's stdio, waiting up to `options.timeout` for it.
    /// Output the guest no longer holds is replayed from the store.
    pub async fn attach(&self, id: &str, options: AttachOptions) -> Result<Attachment, ApiError> {
        if let Some(att) = self.attach_stored(id, &options).await {
            return att;
        }
        self.attach_guest(id, options).await
    }

    /// An attach served by the guest alone.
    pub(crate) async fn attach_guest(
        &self,
        id: &str,
        options: AttachOptions,
    ) -> Result<Attachment, ApiError> {
        let (entry, link) = self.shared.wait_for(id, options.timeout).await?;
        let from = match options.from {
            From::Offset(n) => n,
            // The guest resolves it and says where output starts.
            From::Live => LIVE,
        };
        let plan = Plan {
            id: id.to_owned(),
            stdin: options.stdin,
            cursor: Cursor::new(from, options.stdout, options.stderr, None),
            reattach_timeout: options.timeout,
        };
        let att = attachment::attach(self.shared.clone(), plan, entry.info.tty, link).await?;
        self.shared
            .counters
            .attaches
            .fetch_add(1, Ordering::Relaxed);
        Ok(att)
    }

    /// Starts a process in a container; it becomes its own container id
    /// (`Attachment::id`), attached from its first byte.
    pub async fn exec(&self, id: &str, options: ExecOptions) -> Result<Attachment, ApiError> {
        if options.command.is_empty() {
            return Err(ApiError::BadRequest("exec needs a command".into()));
        }
        let (_, link) = self.shared.wait_for(id, options.timeout).await?;
        let command = options
            .command
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        let tty = options.tty.then(|| options.size.unwrap_or((80, 24)));
        let kind = OpenKind::Exec {
            command,
            tty,
            env: options.env.clone(),
        };
        let channel = attachment::open_on(&self.shared, &link, kind).await?;
        let exec_id = channel.exec_id.clone().unwrap_or_default();
        if !crate::claims::valid_id(&exec_id) {
            return Err(ApiError::LinkDown(format!(
                "the guest named the exec {}, not a container id",
                crate::claims::loggable(&exec_id)
            )));
        }
        self.shared.counters.execs.fetch_add(1, Ordering::Relaxed);
        // With a store, the exec is served from it (`exec_stored`); without,
        // or when it cannot take the exec, from its channel directly.
        let att = match self.exec_stored(&exec_id, options.tty, options.timeout, channel, link) {
            Ok(att) => att,
            Err((channel, link)) => {
                let plan = Plan {
                    id: exec_id,
                    stdin: true,
                    cursor: Cursor::new(0, true, true, None),
                    reattach_timeout: options.timeout,
                };
                attachment::start(self.shared.clone(), plan, options.tty, (channel, link))
            }
        };
        if !options.stdin {
            let _ = att.close_stdin().await;
        }
        Ok(att)
    }

    /// Output from offset `options.from`; without `follow` it ends at the
    /// output that existed when the call was made (no `Output::Exit` then).
    /// Served from the store when there is one (then also after the guest is
    /// gone, and with timestamps, `since` and `tail`).
    pub async fn logs(&self, id: &str, options: LogsOptions) -> Result<Attachment, ApiError> {
        if let Some(logs) = self.logs_stored(id, &options) {
            return logs;
        }
        if options.timestamps || options.since.is_some() || options.tail.is_some() {
            return Err(ApiError::BadRequest(
                "timestamps, since and tail need a tetherd with a state directory".into(),
            ));
        }
        let (from, follow) = (options.from, options.follow);
        let timeout = Duration::from_secs(10);
        let Some((info, generation)) = self.shared.info(id) else {
            return Err(ApiError::NotFound(id.into()));
        };
        if generation.is_none() {
            return Err(ApiError::Refused(format!(
                "{id} has exited and its guest is gone; its output went with it"
            )));
        }
        let (_, link) = self.shared.wait_for(id, timeout).await?;
        let end_at = if follow || info.state == State::Exited {
            None
        } else {
            Some(self.fresh_end(&link, id).await?)
        };
        let plan = Plan {
            id: id.to_owned(),
            stdin: false,
            cursor: Cursor::new(from, true, true, end_at),
            reattach_timeout: timeout,
        };
        attachment::attach(self.shared.clone(), plan, false, link).await
    }

    /// Trusts `key` as the host key of the guest serving container `id`
    /// (a VM this appliance boots with a key it generated).
    pub fn pin_guest(&self, id: &str, key: PublicKey) {
        self.shared.pin_guest(id, key);
    }

    /// Stops trusting the key `pin_guest` pinned for `id`.
    pub fn unpin_guest(&self, id: &str) {
        self.shared.unpin_guest(id);
    }

    /// Forgets container `id` (and removes its stored records and output) if
    /// it has exited and its link is gone.
    pub fn forget(&self, id: &str) {
        if self.shared.info(id).is_some_and(|(_, link)| link.is_none()) {
            self.shared.forget(id);
            if let Err(e) = self.remove_stored(id) {
                warn!(container = %id, "{e}");
            }
        }
    }

    /// Live guest links.
    pub fn links(&self) -> usize {
        self.shared.link_count()
    }

    /// Metrics in the Prometheus text format.
    pub fn metrics(&self) -> String {
        let c = &self.shared.counters;
        let views = self.shared.views();
        let count = |state: &str| views.iter().filter(|v| v.state == state).count();
        let mut m = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            m.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in samples {
                m.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        metric(
            "tetherd_links",
            "gauge",
            "Guest links connected now.",
            &[("", self.links() as u64)],
        );
        metric(
            "tetherd_links_accepted_total",
            "counter",
            "Guest links accepted.",
            &[("", c.links_accepted.load(Ordering::Relaxed))],
        );
        metric(
            "tetherd_containers",
            "gauge",
            "Containers known, by state.",
            &[
                ("{state=\"created\"}", count("created") as u64),
                ("{state=\"running\"}", count("running") as u64),
                ("{state=\"exited\"}", count("exited") as u64),
            ],
        );
        metric(
            "tetherd_attaches_total",
            "counter",
            "Attachments opened.",
            &[("", c.attaches.load(Ordering::Relaxed))],
        );
        metric(
            "tetherd_execs_total",
            "counter",
            "Execs started.",
            &[("", c.execs.load(Ordering::Relaxed))],
        );
        metric(
            "tetherd_guest_output_bytes_total",
            "counter",
            "Channel data received from guests, in bytes (output, each time it crosses a link).",
            &[("", c.guest_output_bytes.load(Ordering::Relaxed))],
        );
        metric(
            "tetherd_reattaches_total",
            "counter",
            "Re-attachments after a link drop.",
            &[("", c.reattaches.load(Ordering::Relaxed))],
        );
        metric(
            "tetherd_claims_refused_total",
            "counter",
            "Container ids a guest claimed and was refused (not its own, taken, malformed), once per link and id.",
            &[("", c.claims_refused.load(Ordering::Relaxed))],
        );
        metric(
            "tetherd_id_conflicts_total",
            "counter",
            "Containers claimed by two live links.",
            &[("", c.conflicts.load(Ordering::Relaxed))],
        );
        let r = &self.shared.refusals;
        let n = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        metric(
            "tetherd_refused_total",
            "counter",
            "What the bounds against hostile or broken guests refused, by kind.",
            &[
                ("{kind=\"link\"}", n(&r.links)),
                ("{kind=\"link_sync_timeout\"}", n(&r.link_syncs)),
                ("{kind=\"container\"}", n(&r.containers)),
                ("{kind=\"remembered_forgotten\"}", n(&r.remembered)),
                ("{kind=\"guest_request_timeout\"}", n(&r.guest_requests)),
                ("{kind=\"output_flood\"}", n(&r.output_floods)),
            ],
        );
        m
    }
}

/// Quotes an argument for `sh -c`, which is how SSH's `exec` runs a command.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_for_sh() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
