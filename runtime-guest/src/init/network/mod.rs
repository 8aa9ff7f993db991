//! Guest networking as PID 1: the config's `networks` applied over rtnetlink.
//! [`Network`] finds each NIC (by MAC or PCI slot), names it, sets its MTU,
//! brings it up, and sets addresses, neighbours and routes with replace
//! semantics; NICs that are not there yet stay pending until
//! [`Network::link_added`] reports them (hotplug). NICs with `dhcp` get a
//! client from [`dhcp::client`], run by the caller's executor.
//!
//! Netlink calls are synchronous (the kernel answers at once) and open their
//! socket in the calling thread's network namespace.
//!
//! How PID 1 uses it (on its smol `LocalExecutor`):
//!
//! ```ignore
//! let mut net = Network::new(config.raw_os.networks.clone());
//! let mut leases = Vec::new();
//! for r in net.configure_present() {          // then, per uevent "add" of a net
//!     match r {                               // device: net.link_added(&ifname)
//!         Ok(c) => if let Some(nic) = c.dhcp {
//!             let (client, handle) = dhcp::client(nic, config.raw_os.hostname.clone());
//!             ex.spawn(client).detach();      // runs forever: renewals, rebinding
//!             leases.push(handle);
//!         },
//!         Err(e) => warn!("{e}"),
//!     }
//! }
//! for h in &leases {                          // bounded: boot goes on without a lease
//!     match h.first_lease(Duration::from_secs(30)).await {
//!         Ok(lease) => nameservers.extend(lease.dns),   // for resolv.conf if `dns` is unset
//!         Err(e) => warn!("{e}"),
//!     }
//! }
//! ```

pub mod addr;
pub mod announce;
pub mod boot;
pub mod dhcp;
pub mod link;
pub mod rtnl;
pub mod spec;

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use tracing::{info, warn};

use link::{LinkInfo, LinkStep};
use rtnl::{Rtnl, RtnlError};
pub use spec::{MacAddr, NicSpec, RawNetwork, Selector, SpecError, validate};

/// What went wrong, naming the NIC (`networks[0] (mac ...)`) and the item.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("networks: cannot open the netlink socket: {0}")]
    Open(RtnlError),
    #[error("networks: cannot list interfaces: {0}")]
    List(RtnlError),
    #[error("{nic}: interface {ifname}: {step}: {source}")]
    Link {
        nic: String,
        ifname: String,
        step: LinkStep,
        source: RtnlError,
    },
    #[error("{nic}: on {ifname}: address {address}: {source}")]
    Address {
        nic: String,
        ifname: String,
        address: IpNet,
        source: RtnlError,
    },
    #[error("{nic}: on {ifname}: neighbour {ip}: {source}")]
    Neighbour {
        nic: String,
        ifname: String,
        ip: IpAddr,
        source: RtnlError,
    },
    #[error("{nic}: on {ifname}: route to {to}{}: {source}",
        via.map(|v| format!(" via {v}")).unwrap_or_default())]
    Route {
        nic: String,
        ifname: String,
        to: IpNet,
        via: Option<IpAddr>,
        source: RtnlError,
    },
}

/// A NIC that has been configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// Its position in `networks`.
    pub index: usize,
    pub ifindex: u32,
    pub ifname: String,
    pub mac: Option<MacAddr>,
    /// Set when the spec asks for DHCP: hand it to [`dhcp::client`].
    pub dhcp: Option<dhcp::DhcpNic>,
}

#[derive(Debug, Clone)]
enum State {
    Pending,
    Done(Configured),
    Failed,
}

/// The configurator: remembers which specs are satisfied and which wait for
/// their NIC to appear.
#[derive(Debug, Clone)]
pub struct Network {
    specs: Vec<NicSpec>,
    states: Vec<State>,
    sys_class_net: PathBuf,
}

impl Network {
    /// A configurator for validated specs; nothing is applied yet.
    pub fn new(specs: Vec<NicSpec>) -> Self {
        let states = vec![State::Pending; specs.len()];
        Network {
            specs,
            states,
            sys_class_net: link::sys_class_net(),
        }
    }

    /// Looks for PCI slots under `path` instead of `/sys/class/net` (tests).
    pub fn with_sys_class_net(mut self, path: PathBuf) -> Self {
        self.sys_class_net = path;
        self
    }

    /// Brings `lo` up and configures every NIC that is present now. NICs not
    /// found stay pending; one that fails is reported and not retried.
    pub fn configure_present(&mut self) -> Vec<Result<Configured, NetworkError>> {
        let mut rtnl = match Rtnl::open() {
            Ok(r) => r,
            Err(e) => return vec![Err(NetworkError::Open(e))],
        };
        if let Err(e) = link::loopback_up(&mut rtnl) {
            warn!("networks: cannot bring lo up: {e}");
        }
        let mut out = Vec::new();
        for i in 0..self.specs.len() {
            if !matches!(self.states[i], State::Pending) {
                continue;
            }
            // Listed again for each NIC: configuring one may rename another.
            let links = match link::list(&mut rtnl) {
                Ok(l) => l,
                Err(e) => {
                    out.push(Err(NetworkError::List(e)));
                    break;
                }
            };
            let Some(found) = link::find(&links, &self.specs[i].selector, &self.sys_class_net)
            else {
                info!("{}: not present yet; waiting for it", self.specs[i]);
                continue;
            };
            out.push(self.configure_one(&mut rtnl, i, &links, found));
        }
        out
    }

    /// Tells the configurator that interface `ifname` appeared: if a pending
    /// spec means it, it is configured now. None: no pending spec means it.
    pub fn link_added(&mut self, ifname: &str) -> Option<Result<Configured, NetworkError>> {
        let mut rtnl = match Rtnl::open() {
            Ok(r) => r,
            Err(e) => return Some(Err(NetworkError::Open(e))),
        };
        let links = match link::list(&mut rtnl) {
            Ok(l) => l,
            Err(e) => return Some(Err(NetworkError::List(e))),
        };
        let found = links.iter().find(|l| l.name == ifname)?;
        let i = (0..self.specs.len()).find(|&i| {
            matches!(self.states[i], State::Pending)
                && link::find(
                    std::slice::from_ref(found),
                    &self.specs[i].selector,
                    &self.sys_class_net,
                )
                .is_some()
        })?;
        Some(self.configure_one(&mut rtnl, i, &links, found))
    }

    /// The specs whose NIC has not appeared yet.
    pub fn pending(&self) -> impl Iterator<Item = &NicSpec> {
        self.specs
            .iter()
            .zip(&self.states)
            .filter(|(_, s)| matches!(s, State::Pending))
            .map(|(spec, _)| spec)
    }

    /// The NICs configured so far.
    pub fn configured(&self) -> impl Iterator<Item = &Configured> {
        self.states.iter().filter_map(|s| match s {
            State::Done(c) => Some(c),
            _ => None,
        })
    }

    fn configure_one(
        &mut self,
        rtnl: &mut Rtnl,
        i: usize,
        links: &[LinkInfo],
        found: &LinkInfo,
    ) -> Result<Configured, NetworkError> {
        let result = apply(rtnl, &self.specs[i], links, found);
        self.states[i] = match &result {
            Ok(c) => State::Done(c.clone()),
            Err(_) => State::Failed,
        };
        result
    }
}

/// Applies `spec` to the interface `found`: link, addresses, neighbours,
/// routes (on-link first, so routers behind them are reachable), default route,
/// then announces the addresses.
pub fn apply(
    rtnl: &mut Rtnl,
    spec: &NicSpec,
    links: &[LinkInfo],
    found: &LinkInfo,
) -> Result<Configured, NetworkError> {
    let nic = spec.to_string();
    let ifname = link::configure(rtnl, links, found, spec.name.as_deref(), spec.mtu).map_err(
        |(step, source)| NetworkError::Link {
            nic: nic.clone(),
            ifname: found.name.clone(),
            step,
            source,
        },
    )?;
    let ifindex = found.index;
    for a in &spec.addresses {
        addr::replace_address(rtnl, ifindex, a, addr::Lifetime::Forever).map_err(|source| {
            NetworkError::Address {
                nic: nic.clone(),
                ifname: ifname.clone(),
                address: *a,
                source,
            }
        })?;
    }
    for n in &spec.neighbours {
        addr::replace_neighbour(rtnl, ifindex, &n.ip, &n.mac).map_err(|source| {
            NetworkError::Neighbour {
                nic: nic.clone(),
                ifname: ifname.clone(),
                ip: n.ip,
                source,
            }
        })?;
    }
    let default = spec.gateway.map(|gw| spec::RouteSpec {
        to: match gw {
            IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
            IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
        },
        via: Some(gw),
    });
    let on_link = spec.routes.iter().filter(|r| r.via.is_none());
    let via = spec.routes.iter().filter(|r| r.via.is_some());
    for r in on_link.chain(via).chain(default.iter()) {
        addr::replace_route(rtnl, ifindex, &r.to, r.via.as_ref()).map_err(|source| {
            NetworkError::Route {
                nic: nic.clone(),
                ifname: ifname.clone(),
                to: r.to,
                via: r.via,
                source,
            }
        })?;
    }
    if let Some(mac) = found.mac {
        announce_addresses(ifindex, mac, &spec.addresses, &nic);
    }
    info!("{nic}: configured as {ifname}");
    Ok(Configured {
        index: spec.index,
        ifindex,
        ifname: ifname.clone(),
        mac: found.mac,
        dhcp: match (spec.dhcp, found.mac) {
            (true, Some(mac)) => Some(dhcp::DhcpNic {
                label: nic,
                ifindex,
                ifname,
                mac,
                use_router: !matches!(spec.gateway, Some(IpAddr::V4(_))),
            }),
            _ => None,
        },
    })
}

/// Gratuitous ARP / unsolicited NA for each address; a failure only warns:
/// the address works, peers just learn it later.
fn announce_addresses(ifindex: u32, mac: MacAddr, addresses: &[IpNet], nic: &str) {
    for a in addresses {
        let sent = match a.addr() {
            IpAddr::V4(ip) => announce::gratuitous_arp(ifindex, mac, ip),
            IpAddr::V6(ip) => announce::unsolicited_neighbour_advertisement(ifindex, mac, ip),
        };
        if let Err(e) = sent {
            warn!("{nic}: announcing {}: {e}", a.addr());
        }
    }
}
