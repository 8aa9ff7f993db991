//! Simulated guests for load tests of one `tetherd` (the `tether-load`
//! tool): each is proto-core's `GuestLink` over a real TCP connection with
//! link sync, driven by link-driver's loop, the code `tether` runs, with the
//! real key exchange and authentication. What it leaves out is the process:
//! its one primary session echoes its stdin as output (a `cat`), so thousands
//! of guests fit in one process and the appliance's cost is what is measured.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use link_driver::{End, Link};
use proto_core::outbox::Transmit;
use proto_core::outlog::{Overflow, Stream};
use proto_core::tether::{GuestEvent, GuestLink, Kind, SessionSpec, Sessions};
use proto_core::{PrivateKey, PublicKey, ServerConfig};
use smol::Async;

/// Output a simulated guest retains (its echoes and its greeting).
const OUTPUT_BUFFER: usize = 64 * 1024;

/// One simulated guest.
pub struct GuestSpec {
    /// The container id (also the primary session's).
    pub id: String,
    pub host_key: PrivateKey,
    /// The appliance key it accepts.
    pub appliance: PublicKey,
    /// What the session has written before the link comes up.
    pub greeting: Bytes,
    /// Keepalive interval (`tether`'s default is 4 s).
    pub keepalive: Duration,
}

/// Connects to the appliance at `addr`, runs link sync and then the SSH link
/// until it ends. `authenticated` is called once the appliance has
/// authenticated (the handshake is complete).
pub async fn run_guest(
    addr: SocketAddr,
    spec: GuestSpec,
    authenticated: impl FnOnce(Instant) + 'static,
) -> io::Result<End> {
    let stream = Async::<TcpStream>::connect(addr).await?;
    stream.get_ref().set_nodelay(true)?;
    let first = link_driver::sync::as_guest(&stream, true).await?;
    let mut sessions = Sessions::new(&spec.id, OUTPUT_BUFFER);
    sessions.add(SessionSpec {
        id: spec.id.clone(),
        kind: Kind::Primary,
        tty: false,
        stdin: true,
        output_buffer: OUTPUT_BUFFER,
        overflow: Overflow::DropOldest,
    });
    sessions.started(&spec.id);
    if !spec.greeting.is_empty() {
        sessions.push_output(&spec.id, Stream::Stdout, spec.greeting);
    }
    let mut config =
        proto_core::Config::server(ServerConfig::new(spec.host_key, vec![spec.appliance]));
    config.keepalive_interval = Some(spec.keepalive);
    config.keepalive_max = 2;
    let link = GuestLink::new(config, Instant::now(), link_driver::rng(), &mut sessions);
    let mut guest = EchoGuest {
        link,
        sessions,
        authenticated: Some(Box::new(authenticated)),
    };
    Ok(link_driver::drive(&stream, &mut guest, first, futures_lite::future::pending).await)
}

/// A `GuestLink` whose session echoes its input.
struct EchoGuest {
    link: GuestLink,
    sessions: Sessions,
    authenticated: Option<Box<dyn FnOnce(Instant)>>,
}

impl Transmit for EchoGuest {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.link.poll_transmit()
    }
    fn has_transmit(&self) -> bool {
        self.link.has_transmit()
    }
}

impl Link for EchoGuest {
    type Wake = ();

    fn handle_input(&mut self, now: Instant, data: BytesMut) -> proto_core::Result<()> {
        self.link.handle_input_bytes(&mut self.sessions, now, data)
    }

    fn handle_timeout(&mut self, now: Instant) -> proto_core::Result<()> {
        self.link.handle_timeout(&mut self.sessions, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }

    fn close_reason(&self) -> Option<&proto_core::Error> {
        self.link.close_reason()
    }

    fn work(&mut self) {
        while let Some(event) = self.link.poll_event() {
            match event {
                GuestEvent::Authenticated(_) => {
                    if let Some(done) = self.authenticated.take() {
                        done(Instant::now());
                    }
                }
                GuestEvent::Stdin {
                    session,
                    data,
                    credit,
                } => {
                    let n = data.len();
                    self.sessions.push_output(&session, Stream::Stdout, data);
                    self.sessions.stdin_written(credit, n);
                }
                _ => {}
            }
        }
        while self.sessions.poll_event().is_some() {}
        self.link.pump(&mut self.sessions);
    }

    fn woken(&mut self, _: ()) {}
}
