//! The network as PID 1 runs it: the config's NICs at boot, a DHCP client
//! for each NIC that asks for one (kept running for renewals), and NICs that
//! appear later (hotplug). Boot waits for a first lease a bounded time only.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use smol::LocalExecutor;
use tracing::{info, warn};

use super::{Configured, Network as Nics, dhcp};
use crate::config::{Config, Dns};
use crate::init::uevent::{Devices, Uevent};

/// How long boot waits for a NIC's first DHCP lease; the client keeps
/// trying afterwards.
const FIRST_LEASE: Duration = Duration::from_secs(10);

/// PID 1's network part.
pub struct Boot {
    ex: Rc<LocalExecutor<'static>>,
    hostname: RefCell<Option<String>>,
    nics: RefCell<Option<Nics>>,
    /// Name servers learnt by DHCP, for `resolv.conf` when the config has none.
    dns: RefCell<Vec<String>>,
    domains: RefCell<Vec<String>>,
}

impl Boot {
    /// Runs DHCP clients on `ex`.
    pub fn new(ex: Rc<LocalExecutor<'static>>) -> Rc<Self> {
        Rc::new(Self {
            ex,
            hostname: RefCell::new(None),
            nics: RefCell::new(None),
            dns: RefCell::new(Vec::new()),
            domains: RefCell::new(Vec::new()),
        })
    }

    /// Starts a NIC's DHCP client if it asks for one; its handle for a first lease.
    fn start_dhcp(&self, nic: &Configured) -> Option<dhcp::DhcpHandle> {
        let dhcp_nic = nic.dhcp.clone()?;
        let handle = dhcp::start(&self.ex, dhcp_nic, self.hostname.borrow().clone());
        info!("{}: DHCP started", nic.ifname);
        Some(handle)
    }
}

impl crate::init::Network for Boot {
    fn configure<'a>(
        &'a self,
        config: &'a Config,
        _devices: &'a Rc<Devices>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>> {
        Box::pin(async move {
            *self.hostname.borrow_mut() = config.raw_os.hostname.clone();
            let mut nics = Nics::new(config.raw_os.networks.clone());
            let mut leases = Vec::new();
            for result in nics.configure_present() {
                let nic = result.map_err(|e| e.to_string())?;
                info!("{}: configured (networks[{}])", nic.ifname, nic.index);
                leases.extend(self.start_dhcp(&nic).map(|h| (nic.ifname.clone(), h)));
            }
            for spec in nics.pending() {
                info!("{spec}: not present yet; configured when it appears");
            }
            *self.nics.borrow_mut() = Some(nics);
            for (ifname, handle) in leases {
                match handle.first_lease(FIRST_LEASE).await {
                    Ok(lease) => {
                        info!(
                            "{ifname}: DHCP lease {}/{}",
                            lease.address, lease.prefix_len
                        );
                        let mut dns = self.dns.borrow_mut();
                        dns.extend(lease.dns.iter().map(|a| a.to_string()));
                        self.domains.borrow_mut().extend(lease.domain);
                    }
                    Err(e) => warn!("{ifname}: {e}; DHCP goes on in the background"),
                }
            }
            Ok(())
        })
    }

    fn device_added(&self, event: &Uevent) {
        let Some(ifname) = event.get("INTERFACE") else {
            return;
        };
        let configured = match self.nics.borrow_mut().as_mut() {
            Some(nics) => nics.link_added(ifname),
            // Not configured yet: boot will find it present.
            None => return,
        };
        match configured {
            Some(Ok(nic)) => {
                info!(
                    "{}: hotplugged and configured (networks[{}])",
                    nic.ifname, nic.index
                );
                self.start_dhcp(&nic);
            }
            Some(Err(e)) => warn!("{e}"),
            None => info!("network device {ifname} appeared; no config names it"),
        }
    }

    fn dns(&self) -> Option<Dns> {
        let nameservers = self.dns.borrow().clone();
        (!nameservers.is_empty()).then(|| Dns {
            nameservers,
            search: self.domains.borrow().clone(),
            options: Vec::new(),
        })
    }
}
