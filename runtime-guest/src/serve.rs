//! Serving the appliance over links: dialing or listening with backoff, link
//! sync where the link needs it, then proto-core's `GuestLink` driven by
//! link-driver's loop. The protocol's rules are the link's; here the guest
//! carries out what it asks for.

use std::io;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use link_driver::{End, Link};
use proto_core::outbox::Transmit;
use proto_core::tether::{ForkMode, GuestEvent, GuestLink};
use proto_core::{DisconnectReason, ServerConfig};
use smol::{Async, Timer};
use tracing::{debug, info, warn};

use crate::guest::Guest;
use crate::linkspec::{Dialer, LinkSpec, LinkStream};

mod backlog;
mod gate;
pub use backlog::Backlog;
pub use gate::LinkGate;

/// How long a peer has for link sync (a serial line restarts it, so this
/// only frees a slot held by a silent peer).
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer has for key exchange and authentication.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Peers a listening link serves at once.
const MAX_LISTEN_PEERS: usize = 16;

/// Opens links forever, serving each until it drops, with backoff in between.
pub async fn run_links(guest: Rc<Guest>, spec: LinkSpec) {
    let mut backoff = Duration::from_millis(100);
    let dialer = loop {
        match Dialer::new(&spec) {
            Ok(d) => break d,
            Err(e) => {
                warn!("link {spec}: {e}; retrying in {backoff:?}");
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    if let Some(addr) = dialer.local_addr() {
        info!("link {spec}: listening on {addr}");
    }
    let listening = !matches!(dialer, Dialer::Connect(_));
    let active = Rc::new(std::cell::Cell::new(0usize));
    loop {
        match dialer.open().await {
            Ok(stream) if listening => {
                // A listening link serves several peers at once (an appliance and
                // an `ssh` user, say), up to a bound.
                if active.get() >= MAX_LISTEN_PEERS {
                    warn!(
                        "link {spec}: {MAX_LISTEN_PEERS} peers connected already; refusing another"
                    );
                    continue;
                }
                active.set(active.get() + 1);
                let (guest, active, sync) = (guest.clone(), active.clone(), spec.sync);
                guest.clone().spawn(async move {
                    run_one(&guest, &stream, sync).await;
                    active.set(active.get() - 1);
                });
            }
            Ok(stream) => {
                backoff = Duration::from_millis(100);
                if run_one(&guest, &stream, spec.sync).await {
                    // Dropped for a fork: the next link starts at once.
                    continue;
                }
            }
            Err(e) => {
                // Also for listeners: a persistent accept error (out of file
                // descriptors, say) must not spin.
                warn!("link {spec}: {e}; retrying in {backoff:?}");
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if !listening {
            Timer::after(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Serves one link until it ends; true if it was dropped for a fork.
async fn run_one(guest: &Rc<Guest>, stream: &LinkStream, sync: bool) -> bool {
    guest.links.released().await;
    let epoch = guest.links.epoch();
    info!("link open");
    // Opening a serial line discarded the HELLOs sent before: ask for one.
    let announce = stream.is_serial();
    let served = async {
        match stream {
            LinkStream::Tcp(s) => serve(guest, s, sync, announce).await,
            LinkStream::Unix(s) => serve(guest, s, sync, announce).await,
            LinkStream::Serial(s) | LinkStream::Fd(s) => serve(guest, s, sync, announce).await,
        }
    };
    let dropped = async {
        guest.links.reset_since(epoch).await;
        None
    };
    let Some(end) = future::or(async { Some(served.await) }, dropped).await else {
        info!("link dropped: this VM is a fork's child");
        return true;
    };
    match end {
        Ok(End::Orderly) => info!("link closed"),
        Ok(End::Eof) => info!("the appliance closed the link"),
        Ok(end) => warn!("link ended: {end}"),
        Err(e) => warn!("link ended before SSH: {e}"),
    }
    false
}

/// The receive window of each channel on a serial line. Everything the
/// appliance sends waits in one queue in front of the emulated UART, which
/// under TCG moves only tens of KiB a second: the default 2 MiB window lets a
/// stdin flood queue so much ahead of a keepalive that the appliance gives the
/// link up as dead. A small window bounds that queue (and costs nothing: the
/// line, not the window, limits what a serial link carries).
const SERIAL_WINDOW: u32 = 32 * 1024;

fn server_config(guest: &Guest, serial: bool) -> proto_core::Config {
    let c = &guest.config;
    let mut server = ServerConfig::new(c.host_key.clone(), c.authorized_keys.clone());
    server.allow_none = c.allow_none_auth;
    let mut config = proto_core::Config::server(server);
    config.keepalive_interval = Some(c.keepalive);
    config.keepalive_max = 2;
    config.handshake_timeout = HANDSHAKE_TIMEOUT;
    if serial {
        config.window = SERIAL_WINDOW;
    }
    config
}

/// Link sync (if the link needs it), then the SSH link until it ends.
async fn serve<S: AsFd>(
    guest: &Rc<Guest>,
    stream: &Async<S>,
    sync: bool,
    announce: bool,
) -> io::Result<End> {
    let first = if sync {
        // A serial line may wait for its appliance indefinitely; elsewhere a
        // peer that never syncs must not hold a connection slot.
        future::or(link_driver::sync::as_guest(stream, announce), async {
            Timer::after(SYNC_TIMEOUT).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no link sync within 30 s",
            ))
        })
        .await?
    } else {
        BytesMut::new()
    };
    let link = GuestLink::new(
        server_config(guest, announce),
        Instant::now(),
        link_driver::rng(),
        &mut guest.sessions.borrow_mut(),
    );
    let mut side = GuestSide {
        guest: guest.clone(),
        link: Some(link),
        number: NEXT_LINK.with(|n| n.replace(n.get() + 1)),
        unsent: false,
        fatal_sent: false,
        behind: false,
        forks: Default::default(),
        fork_running: None,
    };
    debug!(link = side.number, "link sync done");
    let end = link_driver::drive(stream, &mut side, first, || guest.changed.listen()).await;
    if side.fatal_sent {
        guest.fatal.mark_delivered();
    }
    Ok(end)
}

thread_local! {
    /// Numbers links in the log.
    static NEXT_LINK: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// A `GuestLink` with the guest that carries out its events.
struct GuestSide {
    guest: Rc<Guest>,
    /// Always set until drop.
    link: Option<GuestLink>,
    number: u64,
    /// Counted in the guest's backlog: bytes wait to be written.
    unsent: bool,
    /// A fatal error went out as this link's DISCONNECT.
    fatal_sent: bool,
    /// Counted in the guest's `output_behind`: output waits to be sent.
    behind: bool,
    /// `fork@tether` requests not started yet (one runs at a time).
    forks: std::collections::VecDeque<ForkMode>,
    /// The one running: its answer once done.
    fork_running: Option<Rc<std::cell::Cell<Option<Option<u64>>>>>,
}

impl GuestSide {
    fn link(&mut self) -> &mut GuestLink {
        self.link.as_mut().expect("set until drop")
    }
}

impl GuestSide {
    /// Answers a finished fork request, and starts the next.
    fn forks(&mut self) {
        if let Some(done) = self.fork_running.as_ref().and_then(|r| r.get()) {
            self.fork_running = None;
            let guest = self.guest.clone();
            self.link()
                .fork_done(&mut guest.sessions.borrow_mut(), done);
        }
        if self.fork_running.is_none()
            && let Some(mode) = self.forks.pop_front()
        {
            let cell = Rc::new(std::cell::Cell::new(None));
            self.fork_running = Some(cell.clone());
            let guest = self.guest.clone();
            self.guest.spawn(async move {
                let reply = crate::fork::request(&guest, mode).await;
                cell.set(Some(reply));
                guest.changed.notify(usize::MAX);
            });
        }
    }

    /// Keeps the guest's count of links with output not yet sent.
    fn behind(&mut self, behind: bool) {
        if behind != self.behind {
            self.behind = behind;
            match behind {
                true => self.guest.output_behind.hold(),
                false => self.guest.output_behind.release(),
            }
        }
    }
}

impl Drop for GuestSide {
    fn drop(&mut self) {
        self.backlog(false);
        self.behind(false);
        if let Some(link) = self.link.take() {
            link.end(&mut self.guest.sessions.borrow_mut());
            self.guest.after_links();
        }
    }
}

impl Transmit for GuestSide {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.link().poll_transmit()
    }
    fn has_transmit(&self) -> bool {
        self.link.as_ref().is_some_and(GuestLink::has_transmit)
    }
}

impl Link for GuestSide {
    type Wake = ();

    fn handle_input(&mut self, now: Instant, data: BytesMut) -> proto_core::Result<()> {
        let guest = self.guest.clone();
        let mut sessions = guest.sessions.borrow_mut();
        self.link().handle_input_bytes(&mut sessions, now, data)
    }

    fn handle_timeout(&mut self, now: Instant) -> proto_core::Result<()> {
        let guest = self.guest.clone();
        let mut sessions = guest.sessions.borrow_mut();
        self.link().handle_timeout(&mut sessions, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.link.as_ref().and_then(GuestLink::poll_timeout)
    }

    fn close_reason(&self) -> Option<&proto_core::Error> {
        self.link.as_ref().and_then(GuestLink::close_reason)
    }

    fn work(&mut self) {
        let guest = self.guest.clone();
        if !self.fatal_sent
            && let Some(description) = guest.fatal.disconnect_description()
        {
            // PID 1 is going down: say why, as the last thing on this link.
            self.link()
                .disconnect(DisconnectReason::ByApplication, &description);
            self.fatal_sent = true;
        }
        while let Some(event) = self.link().poll_event() {
            match event {
                GuestEvent::Fork { mode } => {
                    info!(link = self.number, "fork@tether {}", mode.as_str());
                    self.forks.push_back(mode);
                }
                event => {
                    if matches!(event, GuestEvent::Authenticated(_)) {
                        guest.fork.authenticated(&guest);
                    }
                    guest.carry_out(self.number, event);
                }
            }
        }
        self.forks();
        let reported = guest.exit_reported();
        self.link().pump(&mut guest.sessions.borrow_mut());
        let behind = !self.link().output_sent(&guest.sessions.borrow());
        self.behind(behind);
        guest.after_links();
        if !reported && guest.exit_reported() {
            // The exit wait (`serve_guest`) listens on `changed`.
            guest.changed.notify(usize::MAX);
        }
    }

    fn woken(&mut self, _: ()) {}

    fn backlog(&mut self, unsent: bool) {
        if unsent != self.unsent {
            self.unsent = unsent;
            match unsent {
                true => self.guest.link_backlog.hold(),
                false => self.guest.link_backlog.release(),
            }
        }
    }
}
