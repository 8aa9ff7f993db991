//! PID 1 mode: `tether` as the VM's init (when `getpid() == 1`). It boots the
//! userland, finds its config, configures the OS, serves the container's
//! sessions like the ordinary mode, and powers the VM off when the primary
//! session exits. It never returns and never panics out: every fatal error
//! is reported on the console and the link, then the VM powers off.
//!
//! Boot order (each step in the room named for it):
//! 1. panic hook ([`fatal`]); kernel filesystems ([`mount`]); the console and
//!    logging ([`console`]); the default open-file limit ([`system`]);
//! 2. the uevent listener and the record of present devices ([`uevent`]),
//!    CPUs and memory online ([`hotplug`]), boot modules ([`modules`]);
//! 3. the config ([`source`]): `--config`, `tether.config=`, fw_cfg, or
//!    `/etc/tether/config.json`; its `link` defaults to `serial:/dev/ttyS0`;
//! 4. config `modules`, `ulimits`, `hostname`, `domainname`; the network
//!    ([`Network`], the `network` part); `sysctls`;
//! 5. `rootfs` and `mounts` ([`storage`]), `secrets` ([`secrets`]),
//!    `/etc/hosts` and `/etc/resolv.conf` ([`system`]);
//! 6. the guest runs (reaper, links, sessions; the reaper and link tasks are
//!    watched: if either ends, that is fatal); then power-off ([`power`]).

pub mod button;
pub mod console;
pub mod fatal;
pub mod hotplug;
pub mod modules;
pub mod mount;
pub mod network;
pub mod power;
pub mod probe;
pub mod secrets;
pub mod source;
pub mod storage;
pub mod system;
pub mod uevent;

#[cfg(test)]
mod testing;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use smol::LocalExecutor;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::guest::Guest;
use crate::linkspec::{Endpoint, LinkSpec, serial};
use storage::Roots;
use uevent::{Devices, Uevent};

/// The link PID 1 uses when neither `--link` nor the config names one.
pub const DEFAULT_LINK: &str = "serial:/dev/ttyS0";
/// Longest wait for the serial line to send its last bytes before power-off.
const LINK_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether this process is the machine's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// What the command line gave PID 1.
#[derive(Debug, Default, Clone)]
pub struct Args {
    /// `--config PATH`: overrides every other config source.
    pub config: Option<PathBuf>,
    /// `--link SPEC`: overrides the config's `link`.
    pub link: Option<String>,
}

/// What PID 1 asks of the network part (`network::boot::Boot`; tests use
/// stand-ins).
pub trait Network {
    /// Configures the config's `networks` (and the loopback link) at boot,
    /// after the device record started; NICs not there yet are configured
    /// when they appear. An error is fatal.
    fn configure<'a>(
        &'a self,
        config: &'a Config,
        devices: &'a Rc<Devices>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

    /// A network device appeared after boot (`add` uevent, subsystem `net`).
    fn device_added(&self, event: &Uevent);

    /// Name servers the network learnt (DHCP), for `resolv.conf` when the
    /// config gives none.
    fn dns(&self) -> Option<crate::config::Dns> {
        None
    }
}

/// Why PID 1 cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Module(#[from] modules::ModuleError),
    #[error("{0}")]
    Storage(#[from] storage::StorageError),
    #[error("{0}")]
    Secret(#[from] secrets::SecretError),
    #[error("config {field}: {error}")]
    System { field: String, error: io::Error },
    #[error("config networks: {0}")]
    Network(String),
    #[error("{0}")]
    TaskEnded(String),
}

fn system_error(field: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let field = field.into();
    move |error| InitError::System { field, error }
}

/// Runs as PID 1 until the primary session exits, then powers off.
pub fn run(args: Args) -> ! {
    fatal::install_panic_hook();
    let early = mount::mount_early(Path::new("/"));
    console::attach_stdio();
    console::init_logging();
    info!("tether {} is PID 1", env!("CARGO_PKG_VERSION"));
    for e in early {
        warn!("{e}");
    }
    if let Ok(default) = DEFAULT_LINK.parse::<LinkSpec>() {
        fatal::report_on(&default);
    }
    if let Err(e) = system::raise_default_nofile() {
        warn!("cannot raise the open-file limit: {e}");
    }
    let cmdline = source::KernelCmdline::read();
    let ex = Rc::new(LocalExecutor::new());
    let network = network::boot::Boot::new(ex.clone());
    let result = smol::block_on(ex.run(boot(&ex, args, &cmdline, network)));
    match result {
        Ok((code, link)) => {
            info!("the primary session exited with status {code}; powering off");
            if let Some(LinkSpec {
                endpoint: Endpoint::Serial(device),
                ..
            }) = link
            {
                serial::drain(&device, LINK_DRAIN);
            }
            power::power_off(power::TERM_GRACE)
        }
        Err(e) => fatal::die(&e.to_string()),
    }
}

/// Runs everything up to the primary's exit; returns its status and the link.
async fn boot(
    ex: &Rc<LocalExecutor<'static>>,
    args: Args,
    cmdline: &source::KernelCmdline,
    network: Rc<dyn Network>,
) -> Result<(u32, Option<LinkSpec>), InitError> {
    let roots = Roots::default();
    let devices = start_devices(ex, &roots, network.clone());
    let module_dir = modules::modules_dir();
    let index = modules::read_index(&module_dir);
    let boot_list = std::fs::read_to_string(modules::BOOT_LIST)
        .map(|t| modules::parse_list(&t))
        .unwrap_or_default();
    modules::load(&module_dir, &index, &boot_list, false)?;

    let config = read_config(&args, cmdline)?;
    if let Some(link) = &config.link {
        fatal::report_on(link);
    }
    configure(&config, &devices, &roots, &*network, &module_dir, &index).await?;
    let link = config.link.clone();
    let guest = Guest::new(config, ex.clone());
    button::watch(&guest, &roots.sys, &roots.dev);
    let code = crate::serve_guest(ex, guest, true)
        .await
        .map_err(InitError::TaskEnded)?;
    Ok((code, link))
}

/// Starts the device record and its listener (before anything that may add
/// devices), and puts what is present online.
fn start_devices(
    ex: &Rc<LocalExecutor<'static>>,
    roots: &Roots,
    network: Rc<dyn Network>,
) -> Rc<Devices> {
    let devices = Devices::new();
    let socket = uevent::UeventSocket::open();
    devices.record_present(&roots.sys);
    let onlined = hotplug::online_present(&roots.sys);
    if onlined > 0 {
        info!("{onlined} CPU(s) and memory block(s) put online");
    }
    match socket {
        Ok(socket) => {
            let (d, sys) = (devices.clone(), roots.sys.clone());
            ex.spawn(async move {
                let e = uevent::listen(socket, d, &sys, |event| {
                    hotplug::handle(event, &sys, &*network)
                })
                .await;
                warn!("device events: {e}; hotplug stops (waits still look at sysfs)");
            })
            .detach();
        }
        Err(e) => warn!("cannot listen for device events: {e}; waits look at sysfs only"),
    }
    devices
}

/// Finds, reads and validates the config; its `link` defaults to
/// [`DEFAULT_LINK`] and `--link` overrides it.
fn read_config(args: &Args, cmdline: &source::KernelCmdline) -> Result<Config, InitError> {
    let link_arg = match &args.link {
        Some(spec) => Some(
            spec.parse::<LinkSpec>()
                .map_err(|e| crate::config::config_error("--link", e))?,
        ),
        None => None,
    };
    if let Some(link) = &link_arg {
        fatal::report_on(link);
    }
    let fw_cfg = Path::new(source::FW_CFG_CONFIG).exists();
    let from = source::choose(args.config.as_deref(), cmdline, fw_cfg);
    info!("config: {from}");
    let mut config = match source::load(&from) {
        Ok(c) => c,
        Err(e) => {
            // Report where the broken config says the appliance is, if it says.
            if link_arg.is_none()
                && let Some(link) =
                    source::link_of_unusable_config(&from).and_then(|l| l.parse::<LinkSpec>().ok())
            {
                fatal::report_on(&link);
            }
            return Err(e.into());
        }
    };
    if let Some(link) = link_arg {
        config.link = Some(link);
    }
    if config.link.is_none() {
        config.link = DEFAULT_LINK.parse().ok();
    }
    Ok(config)
}

/// Applies the OS configuration, in boot order.
async fn configure(
    config: &Config,
    devices: &Rc<Devices>,
    roots: &Roots,
    network: &dyn Network,
    module_dir: &Path,
    index: &modules::ModuleIndex,
) -> Result<(), InitError> {
    let os = &config.raw_os;
    modules::load(module_dir, index, &os.modules, true)?;
    for l in &os.ulimits {
        system::set_limit(l).map_err(system_error(format!("ulimits ({:?})", l.resource)))?;
    }
    if let Some(name) = &os.hostname {
        system::set_hostname(name).map_err(system_error("hostname"))?;
        info!("hostname {name}");
    }
    if let Some(name) = &os.domainname {
        system::set_domainname(name).map_err(system_error("domainname"))?;
    }
    network
        .configure(config, devices)
        .await
        .map_err(InitError::Network)?;
    for s in &os.sysctls {
        system::write_sysctl(s).map_err(system_error(format!("sysctls.{}", s.key)))?;
    }
    let filesystems = storage::modules_for(os.rootfs.iter().chain(&os.mounts));
    modules::load(module_dir, index, &filesystems, false)?;
    if let Some(root) = &os.rootfs {
        storage::enter_rootfs(root, devices, roots).await?;
    }
    storage::mount_all(&os.mounts, devices, roots).await?;
    secrets::write_all(Path::new("/"), &os.secrets)?;
    let hosts = system::render_hosts(os.hostname.as_deref(), &os.hosts);
    system::provide_etc_file(Path::new("/"), "hosts", &hosts).map_err(system_error("hosts"))?;
    if let Some(dns) = os.dns.clone().or_else(|| network.dns()) {
        system::provide_etc_file(
            Path::new("/"),
            "resolv.conf",
            &system::render_resolv_conf(&dns),
        )
        .map_err(system_error("dns"))?;
    }
    Ok(())
}
