//! DHCPv4 for the NICs whose spec says `"dhcp": true`: the async driver that
//! moves packets and timers between the sockets and the sans-IO [`Client`],
//! and applies what it decides (address with the lease's lifetime, default
//! route, gratuitous ARP). It runs forever on the caller's executor: a missing
//! server makes [`DhcpHandle::first_lease`] fail after a bounded wait while the
//! client keeps trying in the background.

pub mod client;
pub mod socket;
pub mod wire;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::future;
use ipnet::{IpNet, Ipv4Net};
use rand_core::{OsRng, RngCore};
use tracing::{info, warn};

pub use client::{Client, Event, Lease, Transmit};

use super::addr::{self, Lifetime};
use super::announce;
use super::rtnl::{Rtnl, RtnlError};
use super::spec::MacAddr;
use socket::DhcpSockets;

/// After a failure to open sockets, how long to wait before trying again.
const REOPEN_DELAY: Duration = Duration::from_secs(5);

/// The interface a DHCP client runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpNic {
    /// How messages name the NIC (`networks[0] (mac ...)`).
    pub label: String,
    pub ifindex: u32,
    pub ifname: String,
    pub mac: MacAddr,
    /// Whether to install the server's router as the default route (false
    /// when the spec gives an IPv4 `gateway`, which wins).
    pub use_router: bool,
}

/// Why DHCP has no lease (yet).
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("{nic}: DHCP: no lease after {after:?} (still trying in the background){}",
        last.as_ref().map(|l| format!("; last problem: {l}")).unwrap_or_default())]
    Timeout {
        nic: String,
        after: Duration,
        last: Option<String>,
    },
    #[error("{nic}: DHCP: cannot open sockets on {ifname}: {source}")]
    Socket {
        nic: String,
        ifname: String,
        source: std::io::Error,
    },
    #[error("{nic}: DHCP: cannot open the netlink socket: {source}")]
    Netlink { nic: String, source: RtnlError },
    #[error("{nic}: DHCP: cannot apply lease {address}: {what}: {source}")]
    Apply {
        nic: String,
        address: Ipv4Net,
        what: &'static str,
        source: RtnlError,
    },
}

/// Lease events of one client, for whoever wants them (the init code waits for
/// the first; a test watches renewals).
pub struct DhcpHandle {
    label: String,
    events: async_channel::Receiver<Result<Event, DhcpError>>,
}

impl DhcpHandle {
    /// The next event (None once the client is gone). Events are dropped while
    /// 16 are waiting unread, so ignoring the handle after the first lease is fine.
    pub async fn next_event(&self) -> Option<Result<Event, DhcpError>> {
        self.events.recv().await.ok()
    }

    /// Waits up to `timeout` for a lease; the error names the last problem seen.
    pub async fn first_lease(&self, timeout: Duration) -> Result<Lease, DhcpError> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let next = future::or(async { Some(self.events.recv().await) }, async {
                Timer::at(deadline).await;
                None
            })
            .await;
            match next {
                Some(Ok(Ok(Event::Bound(l)))) => return Ok(l),
                Some(Ok(Ok(_))) => {}
                Some(Ok(Err(e))) => last = Some(e.to_string()),
                Some(Err(_)) | None => {
                    return Err(DhcpError::Timeout {
                        nic: self.label.clone(),
                        after: timeout,
                        last,
                    });
                }
            }
        }
    }
}

/// A DHCP client for `nic`: spawn the future (it never ends) and keep or drop
/// the handle. `hostname` is sent to the server (option 12) if given.
pub fn client(
    nic: DhcpNic,
    hostname: Option<String>,
) -> (impl Future<Output = ()> + 'static, DhcpHandle) {
    let (tx, rx) = async_channel::bounded(16);
    let handle = DhcpHandle {
        label: nic.label.clone(),
        events: rx,
    };
    let fut = async move {
        loop {
            let Err(e) = run(&nic, hostname.clone(), &tx).await;
            warn!("{e}; trying again in {REOPEN_DELAY:?}");
            let _ = tx.try_send(Err(e));
            Timer::after(REOPEN_DELAY).await;
        }
    };
    (fut, handle)
}

/// A client running on the executor, by interface index.
struct Running {
    nic: DhcpNic,
    hostname: Option<String>,
    /// Dropping it cancels the client.
    _task: smol::Task<()>,
}

thread_local! {
    /// The running clients: a forked child stops its parent's (which would
    /// renew the parent's lease) and starts one with its new MAC.
    static RUNNING: std::cell::RefCell<std::collections::BTreeMap<u32, Running>> =
        Default::default();
}

/// Starts a client for `nic` on `ex`, replacing one already running on the
/// interface; the handle gives its lease events.
pub fn start(
    ex: &smol::LocalExecutor<'static>,
    nic: DhcpNic,
    hostname: Option<String>,
) -> DhcpHandle {
    let (client, handle) = client(nic.clone(), hostname.clone());
    let running = Running {
        hostname,
        _task: ex.spawn(client),
        nic,
    };
    RUNNING.with(|r| r.borrow_mut().insert(running.nic.ifindex, running));
    handle
}

/// Stops the client on `ifindex`; returns the NIC and host name it ran with.
pub fn stop(ifindex: u32) -> Option<(DhcpNic, Option<String>)> {
    RUNNING
        .with(|r| r.borrow_mut().remove(&ifindex))
        .map(|r| (r.nic, r.hostname))
}

async fn run(
    nic: &DhcpNic,
    hostname: Option<String>,
    tx: &async_channel::Sender<Result<Event, DhcpError>>,
) -> Result<std::convert::Infallible, DhcpError> {
    let socks =
        DhcpSockets::open(nic.ifindex, &nic.ifname).map_err(|source| DhcpError::Socket {
            nic: nic.label.clone(),
            ifname: nic.ifname.clone(),
            source,
        })?;
    let mut rtnl = Rtnl::open().map_err(|source| DhcpError::Netlink {
        nic: nic.label.clone(),
        source,
    })?;
    let mut client = Client::new(nic.mac, hostname, OsRng.next_u64(), Instant::now());
    let mut sent_error = false;
    loop {
        while let Some(t) = client.poll_transmit() {
            if let Err(e) = socks.send(&t).await
                && !sent_error
            {
                // Logged once: a NIC without carrier fails every send.
                warn!("{}: DHCP: send failed: {e}", nic.label);
                sent_error = true;
            }
        }
        while let Some(ev) = client.poll_event() {
            let result = apply(&mut rtnl, nic, &ev).map(|()| ev);
            if let Err(e) = &result {
                warn!("{e}");
            }
            let _ = tx.try_send(result);
        }
        let timeout = client.poll_timeout();
        let packet = future::or(async { Some(socks.recv().await) }, async {
            match timeout {
                Some(t) => Timer::at(t).await,
                None => future::pending().await,
            };
            None
        })
        .await;
        let now = Instant::now();
        match packet {
            Some(Ok(bytes)) => client.handle_packet(&bytes, now),
            Some(Err(source)) => {
                return Err(DhcpError::Socket {
                    nic: nic.label.clone(),
                    ifname: nic.ifname.clone(),
                    source,
                });
            }
            None => client.handle_timeout(now),
        }
    }
}

fn net_of(l: &Lease) -> Ipv4Net {
    Ipv4Net::new(l.address, l.prefix_len).unwrap_or_else(|_| Ipv4Net::from(l.address))
}

fn default_route() -> IpNet {
    IpNet::V4(Ipv4Net::default())
}

/// Applies one lease event to the interface.
fn apply(rtnl: &mut Rtnl, nic: &DhcpNic, ev: &Event) -> Result<(), DhcpError> {
    let fail = |l: &Lease, what, source| DhcpError::Apply {
        nic: nic.label.clone(),
        address: net_of(l),
        what,
        source,
    };
    match ev {
        Event::Bound(l) | Event::Renewed(l) => {
            let lifetime = match l.expiry() {
                None => Lifetime::Forever,
                Some(end) => Lifetime::For(end.saturating_duration_since(Instant::now())),
            };
            addr::replace_address(rtnl, nic.ifindex, &IpNet::V4(net_of(l)), lifetime)
                .map_err(|e| fail(l, "adding the address", e))?;
            if let Event::Bound(_) = ev {
                if nic.use_router
                    && let Some(gw) = l.routers.first()
                {
                    addr::replace_route(
                        rtnl,
                        nic.ifindex,
                        &default_route(),
                        Some(&IpAddr::V4(*gw)),
                    )
                    .map_err(|e| fail(l, "adding the default route", e))?;
                }
                info!(
                    "{}: DHCP lease {} from {} for {}",
                    nic.label,
                    net_of(l),
                    l.server,
                    l.lease_time
                        .map(|d| format!("{d:?}"))
                        .unwrap_or_else(|| "ever".into())
                );
                if let Err(e) = announce::gratuitous_arp(nic.ifindex, nic.mac, l.address) {
                    warn!("{}: gratuitous ARP for {}: {e}", nic.label, l.address);
                }
            }
        }
        Event::Lost(l) => {
            info!("{}: DHCP lease {} lost", nic.label, net_of(l));
            if nic.use_router
                && let Some(gw) = l.routers.first()
            {
                // Ignored if already gone with the address.
                let _ =
                    addr::delete_route(rtnl, nic.ifindex, &default_route(), Some(&IpAddr::V4(*gw)));
            }
            match addr::delete_address(rtnl, nic.ifindex, &IpNet::V4(net_of(l))) {
                Err(e) if e.errno() != Some(nix::errno::Errno::EADDRNOTAVAIL) => {
                    return Err(fail(l, "removing the address", e));
                }
                _ => {}
            }
        }
    }
    Ok(())
}
