//! VM fork in the guest (docs/PROTOCOL.md 4.5): `fork@tether` quiesce and
//! resume, noticing that this VM is a child (its identity's generation
//! changed while quiesced), the child's recovery, and its `forked@tether`.
//! The order of the steps and what a failure stops is the `fork` crate's;
//! this module runs its plans over [`LinuxEffects`] and keeps the state
//! between requests.

#[cfg(target_arch = "x86_64")]
mod backdoor;
mod backend;
mod effects;
pub mod net;
pub mod os;

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use event_listener::Event;
use fork::{Identity, Role};
use futures_lite::future;
use proto_core::tether::{ForkMode, Forked};
use smol::Timer;
use tracing::{info, warn};

use crate::config::ForkBackend;
use crate::guest::Guest;
pub use backend::{Backend, QEMU_IDENTITY, Qemu, choose};
pub use effects::LinuxEffects;

/// How often a quiesced guest reads its identity.
const POLL: Duration = Duration::from_millis(20);
/// Where the kernel log is read for vmgenid's confirmation.
const KMSG: &str = "/dev/kmsg";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Quiescing or quiesced: waiting for a resume, a new identity, or the
    /// fork timeout.
    Quiesced,
    /// A child recovering, or one whose recovery failed (its sessions stay
    /// stopped; it forks no more).
    Child,
}

/// The guest's fork state.
pub struct ForkState {
    backend: RefCell<Option<Box<dyn Backend>>>,
    /// The generation this guest runs as: its identity's at start, a child's
    /// after it noticed.
    generation: Cell<Option<u64>>,
    phase: Cell<Phase>,
    /// The appliance asked to resume.
    resume: Cell<bool>,
    /// Wakes the quiesced wait and those waiting for it to end.
    wake: Event,
    /// When this child noticed its identity (for `recovery-us`).
    noticed: Cell<Option<Instant>>,
    reported: Cell<bool>,
    /// vmgenid reseeds in the kernel log at start.
    vmgenid: Cell<usize>,
    /// PID 1: OS steps are carried out.
    os: bool,
}

impl ForkState {
    /// The configured backend (see [`choose`]), with the generation of the
    /// identity the VM booted with.
    pub fn new(configured: Option<ForkBackend>, identity: Option<PathBuf>, os: bool) -> Self {
        let state = Self::with_backend(choose(configured, identity), os);
        if os {
            state
                .vmgenid
                .set(os::vmgenid_reseeds(KMSG.as_ref()).unwrap_or(0));
        }
        state
    }

    /// A state over `backend` (tests give their own).
    pub fn with_backend(backend: Option<Box<dyn Backend>>, os: bool) -> Self {
        let state = Self {
            backend: RefCell::new(backend),
            generation: Cell::new(None),
            phase: Cell::new(Phase::Running),
            resume: Cell::new(false),
            wake: Event::new(),
            noticed: Cell::new(None),
            reported: Cell::new(false),
            vmgenid: Cell::new(0),
            os,
        };
        match state.read() {
            Ok(Some(id)) => {
                info!("fork: identity generation {}", id.generation);
                state.generation.set(Some(id.generation));
            }
            Ok(None) => {}
            Err(e) => warn!("fork: {e}"),
        }
        state
    }

    /// The generation this guest runs as.
    pub fn generation(&self) -> Option<u64> {
        self.generation.get()
    }

    /// The identity the hypervisor holds now.
    fn read(&self) -> Result<Option<Identity>, String> {
        let mut backend = self.backend.borrow_mut();
        let Some(b) = backend.as_mut() else {
            return Ok(None);
        };
        match b.read()? {
            None => Ok(None),
            Some(bytes) => Identity::parse(&bytes)
                .map(Some)
                .map_err(|e| format!("{} identity: {e}", b.name())),
        }
    }

    /// A link authenticated: a child's announcement gets its recovery time
    /// (from noticing the identity to this request).
    pub fn authenticated(&self, guest: &Guest) {
        let Some(noticed) = self.noticed.get() else {
            return;
        };
        let mut sessions = guest.sessions.borrow_mut();
        let Some(forked) = sessions.pending_fork() else {
            return;
        };
        let took = noticed.elapsed();
        forked.recovery_us = took.as_micros().try_into().unwrap_or(u64::MAX);
        if !self.reported.replace(true) {
            info!("fork: recovered in {} ms", took.as_millis());
        }
    }
}

/// Carries out `fork@tether`; the reply: `Some(generation)` for SUCCESS.
pub async fn request(guest: &Rc<Guest>, mode: ForkMode) -> Option<u64> {
    let f = &guest.fork;
    if f.backend.borrow().is_none() {
        info!(
            "fork: {} refused: no identity source (fork backend none)",
            mode.as_str()
        );
        return None;
    }
    match mode {
        ForkMode::Quiesce => quiesce(guest).await,
        ForkMode::Resume => resume(guest).await,
    }
}

async fn quiesce(guest: &Rc<Guest>) -> Option<u64> {
    let f = &guest.fork;
    match f.phase.get() {
        // Asked again (the reply was lost): it is quiesced.
        Phase::Quiesced => return f.generation.get(),
        Phase::Child => {
            warn!("fork: quiesce refused: this child's recovery did not finish");
            return None;
        }
        Phase::Running => {}
    }
    let identity = match f.read() {
        Ok(Some(id)) => id,
        Ok(None) => {
            warn!("fork: quiesce refused: the hypervisor holds no identity");
            return None;
        }
        Err(e) => {
            warn!("fork: quiesce refused: {e}");
            return None;
        }
    };
    if f.generation.get().is_none() {
        f.generation.set(Some(identity.generation));
    }
    let started = Instant::now();
    f.phase.set(Phase::Quiesced);
    f.resume.set(false);
    let mut fx = LinuxEffects::new(guest.clone(), f.os);
    let result = fork::quiesce(&mut fx).await;
    fx.finish();
    match result {
        Ok(()) => {
            let g = f.generation.get();
            info!(
                "fork: quiesced in {} ms (generation {g:?}); waiting up to {:?}",
                started.elapsed().as_millis(),
                guest.config.fork_timeout
            );
            guest.spawn(wait_quiesced(guest.clone()));
            g
        }
        Err(e) => {
            f.phase.set(Phase::Running);
            f.wake.notify(usize::MAX);
            warn!("fork: quiesce failed at {e}; the sessions continue");
            None
        }
    }
}

async fn resume(guest: &Rc<Guest>) -> Option<u64> {
    let f = &guest.fork;
    if f.phase.get() == Phase::Quiesced {
        f.resume.set(true);
        f.wake.notify(usize::MAX);
        while f.phase.get() == Phase::Quiesced {
            let listener = f.wake.listen();
            if f.phase.get() != Phase::Quiesced {
                break;
            }
            listener.await;
        }
    }
    // Not quiesced (resumed on its own already): nothing is stopped.
    f.generation.get()
}

/// While quiesced: the VMware freeze, then the identity every 20 ms until it
/// changes (a child), the appliance resumes, or the fork timeout passes.
async fn wait_quiesced(guest: Rc<Guest>) {
    let f = &guest.fork;
    let needs_freeze = f
        .backend
        .borrow()
        .as_ref()
        .is_some_and(|b| b.name() == "vmware");
    if needs_freeze {
        // The reply and the DISCONNECT go out first.
        guest
            .link_backlog
            .drained(Instant::now() + Duration::from_secs(1))
            .await;
        Timer::after(Duration::from_millis(100)).await;
        let frozen = f.backend.borrow_mut().as_mut().map(|b| b.freeze());
        if let Some(Err(e)) = frozen {
            warn!("fork: freeze: {e}");
        }
    }
    let deadline = Instant::now() + guest.config.fork_timeout;
    let mut warned = false;
    loop {
        if f.resume.get() {
            info!("fork: resumed by the appliance");
            return continue_parent(&guest).await;
        }
        if Instant::now() >= deadline {
            warn!(
                "fork: not resumed within fork_timeout ({:?}); resuming on my own",
                guest.config.fork_timeout
            );
            return continue_parent(&guest).await;
        }
        match f.read() {
            Ok(Some(id)) if id.is_new_generation(f.generation.get()) => {
                return child(&guest, id).await;
            }
            Ok(_) => {}
            Err(e) if !warned => {
                warn!("fork: {e}; still waiting");
                warned = true;
            }
            Err(_) => {}
        }
        let listener = f.wake.listen();
        future::or(listener, async {
            Timer::after(POLL).await;
        })
        .await;
    }
}

async fn continue_parent(guest: &Rc<Guest>) {
    let mut fx = LinuxEffects::new(guest.clone(), guest.fork.os);
    if let Err(e) = fork::resume(&mut fx).await {
        warn!("fork: resume: {e}");
    }
    fx.finish();
    guest.fork.phase.set(Phase::Running);
    guest.fork.wake.notify(usize::MAX);
}

/// This VM is a child: drop the parent's link at once (its bytes are the
/// parent's) and recover; the links come back during recovery (its `link`
/// step) and carry the announcement once it is queued here.
async fn child(guest: &Rc<Guest>, identity: Identity) {
    let f = &guest.fork;
    let noticed = Instant::now();
    f.phase.set(Phase::Child);
    f.noticed.set(Some(noticed));
    f.reported.set(false);
    let old = f.generation.get();
    info!(
        "fork: I am a child: generation {old:?} -> {} (id {:?})",
        identity.generation, identity.id
    );
    guest.links.hold();
    guest.links.reset();
    guest.sessions.borrow_mut().begin_fork_recovery();
    if f.os {
        match os::vmgenid_reseeds(KMSG.as_ref()) {
            Ok(n) if n > f.vmgenid.get() => {
                info!("fork: confirmed by vmgenid: the kernel reseeded for a VM fork");
                f.vmgenid.set(n);
            }
            Ok(_) => info!("fork: no vmgenid reseed in the kernel log (yet)"),
            Err(e) => info!("fork: cannot read the kernel log for vmgenid: {e}"),
        }
    }
    let mut fx = LinuxEffects::new(guest.clone(), f.os);
    let recovery = fork::recover(&mut fx, &identity).await;
    fx.finish();
    f.generation.set(Some(identity.generation));
    let parent = match &identity.role {
        Role::Child { parent, .. } => parent.clone(),
        Role::Booted => String::new(),
    };
    // The identity's id even if recovery stopped before the sessions took
    // it: the appliance expects this child under that name.
    let new_id = identity
        .id
        .clone()
        .unwrap_or_else(|| guest.sessions.borrow().primary().to_owned());
    let failure = recovery.failure_text();
    if failure.is_empty() {
        info!(
            "fork: child {new_id} of {parent} recovered in {} ms; announcing it",
            noticed.elapsed().as_millis()
        );
        f.phase.set(Phase::Running);
    } else {
        warn!("fork: recovery failed at {failure}; the sessions stay stopped");
    }
    guest.sessions.borrow_mut().announce_fork(Forked {
        parent_id: parent,
        new_id,
        generation: identity.generation,
        failure,
        recovery_us: noticed.elapsed().as_micros().try_into().unwrap_or(u64::MAX),
    });
    guest.links.release();
    guest.changed.notify(usize::MAX);
    f.wake.notify(usize::MAX);
}
