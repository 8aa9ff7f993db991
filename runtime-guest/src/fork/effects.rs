//! The real [`fork::Effects`]: signals to the sessions' process groups,
//! draining output to the links, sync, the random pool, the clock, the NICs,
//! the host name, the sessions' names and the link. Each step's duration is
//! logged.

use std::rc::Rc;
use std::time::{Duration, Instant};

use fork::Addressing;
use ipnet::IpNet;
use smol::Timer;
use tracing::{info, warn};

use crate::guest::Guest;
use crate::init::network::dhcp;
use crate::init::network::link::LinkInfo;
use crate::init::network::rtnl::Rtnl;
use crate::init::network::spec::MacAddr;

use super::{net, os};

/// How long a quiesce may take to drain output (docs/PROTOCOL.md 4.5).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How long a child waits for its first DHCP lease.
const DHCP_LIMIT: Duration = Duration::from_secs(10);
/// Lets the output readers take what the stopped processes left in their pipes.
const PIPE_SETTLE: Duration = Duration::from_millis(20);

/// The guest's effects. OS steps (random pool, clock, network, host name)
/// are carried out only by PID 1; an ordinary process logs that it skips them.
pub struct LinuxEffects {
    guest: Rc<Guest>,
    os: bool,
    started: Instant,
    step: Option<(&'static str, Instant)>,
    rtnl: Option<Rtnl>,
}

impl LinuxEffects {
    pub fn new(guest: Rc<Guest>, os: bool) -> Self {
        Self {
            guest,
            os,
            started: Instant::now(),
            step: None,
            rtnl: None,
        }
    }

    /// Logs the last step's duration.
    pub fn finish(&mut self) {
        if let Some((step, at)) = self.step.take() {
            info!("fork: step {step} took {} ms", ms(at.elapsed()));
        }
    }

    fn rtnl(&mut self) -> Result<&mut Rtnl, String> {
        if self.rtnl.is_none() {
            self.rtnl = Some(Rtnl::open().map_err(|e| format!("netlink: {e}"))?);
        }
        Ok(self.rtnl.as_mut().expect("just set"))
    }

    /// Whether an OS step runs; logs once per step when skipped.
    fn os_step(&self, what: &str) -> bool {
        if !self.os {
            info!("fork: {what} skipped: tether is not PID 1");
        }
        self.os
    }

    fn link_of(&mut self, nic: usize) -> Result<Nic, String> {
        let rtnl = self.rtnl()?;
        let link = net::nic(rtnl, nic)?;
        let mac = link.mac.ok_or("the interface has no MAC address")?;
        Ok(Nic { link, mac })
    }
}

/// Lets the other tasks run between two recovery steps. The steps are
/// system calls that do not wait, so without this a child's new link (it
/// starts right after the randomness step) would not read a byte until the
/// whole recovery was done; with it, its sync and key exchange go on while
/// the clock, the network and the names are set.
async fn let_links_run() {
    futures_lite::future::yield_now().await;
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl fork::Effects for LinuxEffects {
    fn begin(&mut self, step: &'static str) {
        self.finish();
        self.step = Some((step, Instant::now()));
    }

    async fn refuse_sessions(&mut self, refuse: bool) {
        self.guest.sessions.borrow_mut().set_quiesced(refuse);
        self.guest.changed.notify(usize::MAX);
    }

    async fn before_checkpoint(&mut self) -> Result<(), String> {
        let grace = self.guest.send_fork_signals();
        if let Some(grace) = grace {
            Timer::after(grace).await;
        }
        Ok(())
    }

    async fn stop_sessions(&mut self) -> Result<(), String> {
        self.guest
            .signal_running(proto_core::tether::Signal::STOP)
            .map_err(|e| format!("SIGSTOP: {e}"))
    }

    async fn drain(&mut self) -> Result<(), String> {
        Timer::after(PIPE_SETTLE).await;
        let deadline = self.started + DRAIN_LIMIT;
        self.guest.changed.notify(usize::MAX);
        self.guest.output_behind.drained(deadline).await;
        self.guest.link_backlog.drained(deadline).await;
        if !self.guest.output_behind.is_empty() {
            warn!("fork: output not all sent within {DRAIN_LIMIT:?}; quiescing anyway");
        }
        Ok(())
    }

    async fn sync_fs(&mut self) -> Result<(), String> {
        nix::unistd::sync();
        Ok(())
    }

    async fn continue_sessions(&mut self) -> Result<(), String> {
        let_links_run().await;
        let r = self
            .guest
            .signal_running(proto_core::tether::Signal::CONT)
            .map_err(|e| format!("SIGCONT: {e}"));
        // afterRestore: the fork signal again, now that they run.
        self.guest.send_fork_signals();
        r
    }

    async fn reseed(&mut self, nonce: Option<&[u8; 32]>) -> Result<(), String> {
        if !self.os_step("reseeding the random pool") {
            return Ok(());
        }
        os::reseed("/dev/urandom".as_ref(), nonce).map_err(|e| e.to_string())
    }

    async fn step_clock(&mut self) -> Result<(), String> {
        let_links_run().await;
        if !self.os_step("stepping the clock") {
            return Ok(());
        }
        let moved = os::step_clock("/dev/rtc0".as_ref()).map_err(|e| format!("/dev/rtc0: {e}"))?;
        info!("fork: clock stepped by {moved:+.3} s from the RTC");
        Ok(())
    }

    async fn set_mac(&mut self, nic: usize, mac: [u8; 6]) -> Result<(), String> {
        let_links_run().await;
        if !self.os_step("setting the MAC") {
            return Ok(());
        }
        let l = self.link_of(nic)?;
        let rtnl = self.rtnl()?;
        net::set_mac(rtnl, &l.link, MacAddr(mac)).map_err(|e| format!("{}: {e}", l.link.name))
    }

    async fn flush_neighbours(&mut self, nic: usize) -> Result<(), String> {
        let_links_run().await;
        if !self.os_step("flushing neighbours") {
            return Ok(());
        }
        let l = self.link_of(nic)?;
        let rtnl = self.rtnl()?;
        net::flush_neighbours(rtnl, l.link.index)
            .map(drop)
            .map_err(|e| format!("{}: {e}", l.link.name))
    }

    async fn address(&mut self, nic: usize, how: &Addressing) -> Result<(), String> {
        let_links_run().await;
        if !self.os_step("re-addressing") {
            return Ok(());
        }
        let l = self.link_of(nic)?;
        let (index, name) = (l.link.index, l.link.name.clone());
        // The parent's DHCP client would renew the parent's lease.
        let running = dhcp::stop(index);
        match how {
            Addressing::Static {
                address,
                prefix,
                gateway,
            } => {
                let net = IpNet::new(*address, *prefix).map_err(|e| e.to_string())?;
                let rtnl = self.rtnl()?;
                net::set_static(rtnl, &l.link, &net, gateway.as_ref())
                    .map_err(|e| format!("{name}: {net}: {e}"))?;
                info!("fork: {name}: address {net}");
                Ok(())
            }
            Addressing::Dhcp => {
                let rtnl = self.rtnl()?;
                net::clear_addresses(rtnl, index, true, None)
                    .map_err(|e| format!("{name}: removing the parent's addresses: {e}"))?;
                let (nic, hostname) = match running {
                    Some((nic, hostname)) => (nic, hostname),
                    None => (
                        dhcp::DhcpNic {
                            label: format!("nics[{nic}]"),
                            ifindex: index,
                            ifname: name.clone(),
                            mac: l.mac,
                            use_router: true,
                        },
                        None,
                    ),
                };
                let nic = dhcp::DhcpNic { mac: l.mac, ..nic };
                let handle = dhcp::start(self.guest.executor(), nic, hostname);
                let lease = handle
                    .first_lease(DHCP_LIMIT)
                    .await
                    .map_err(|e| e.to_string())?;
                info!(
                    "fork: {name}: DHCP lease {}/{}",
                    lease.address, lease.prefix_len
                );
                Ok(())
            }
        }
    }

    async fn announce(&mut self, nic: usize) -> Result<(), String> {
        let_links_run().await;
        if !self.os_step("announcing addresses") {
            return Ok(());
        }
        let l = self.link_of(nic)?;
        let rtnl = self.rtnl()?;
        let n = net::announce(rtnl, l.link.index, l.mac)?;
        info!("fork: {}: {n} address(es) announced", l.link.name);
        Ok(())
    }

    async fn set_hostname(&mut self, name: &str) -> Result<(), String> {
        let_links_run().await;
        if !self.os_step("setting the host name") {
            return Ok(());
        }
        nix::unistd::sethostname(name).map_err(|e| format!("sethostname {name}: {e}"))
    }

    async fn rename_sessions(&mut self, id: &str, child: u32) -> Result<(), String> {
        let_links_run().await;
        self.guest.rename_for_child(id, child)
    }

    async fn reset_link(&mut self) -> Result<(), String> {
        // The parent's link was dropped when the new identity was seen. New
        // links start now, with the fresh randomness, and sync and
        // authenticate while the rest recovers; they announce nothing until
        // `child` queues the `forked@tether` (the sessions are marked
        // recovering).
        self.guest.links.reset();
        self.guest.links.release();
        Ok(())
    }
}

/// An interface with its MAC.
struct Nic {
    link: LinkInfo,
    mac: MacAddr,
}
