//! The `tetherd` command line (clap): the server commands (`serve`, `demo`,
//! `keygen`, `guest-config`) and the client commands that talk to the HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// tetherd: the appliance side of Tether.
#[derive(Debug, Parser)]
#[command(name = "tetherd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the client commands find the API.
#[derive(Debug, Clone, Default, Args)]
pub struct ApiArgs {
    /// tetherd's API: `unix:PATH` or `http://HOST[:PORT][/PREFIX]` (default: the
    /// unix socket `tetherd serve` listens on by default, see `serve --api`).
    #[arg(long, env = "TETHERD_API")]
    pub api: Option<String>,
    /// A file holding the API's bearer token (else the token in TETHERD_TOKEN).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept links from guests and serve the HTTP API.
    Serve(ServeArgs),
    /// Run the appliance and a local tether with a shell, and attach this terminal.
    Demo(DemoArgs),
    /// Write an ed25519 key (OpenSSH format) to PATH and its public key to PATH.pub.
    Keygen(KeygenArgs),
    /// Write a ready guest config (fresh host key, one primary session running CMD).
    GuestConfig(GuestConfigArgs),
    /// List containers.
    Ls(ApiArgs),
    /// Attach the terminal to a container (detach with ctrl-p ctrl-q).
    Attach(AttachArgs),
    /// Run a command in a container.
    Exec(ExecArgs),
    /// Print a container's output.
    Logs(LogsArgs),
    /// Send a signal to a container.
    Kill(KillArgs),
    /// Wait for a container to exit and print its exit code.
    Wait(IdArgs),
    /// Boot a VM for a container and attach to it, like `docker run`.
    Run(RunArgs),
    /// Power a container's VM down (killed after a grace period).
    Stop(StopArgs),
    /// Remove a stopped container's VM and its files.
    Rm(RmArgs),
    /// Fork a container's VM into children, each a container of its own
    /// (`ID-N` or the names given); prints each child's id as it connects.
    Fork(ForkArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Listener for hypervisor serial bridges (link sync on).
    #[arg(long, default_value = "127.0.0.1:2377")]
    pub listen: SocketAddr,
    /// Listener for clean links (plain TCP, no link sync).
    #[arg(long)]
    pub listen_direct: Option<SocketAddr>,
    /// HTTP API listener: `unix:PATH` (default /run/tetherd/api.sock, for a
    /// user without root $XDG_RUNTIME_DIR/tetherd/api.sock; mode 0660, group
    /// `tetherd` when it exists) or `ADDR:PORT` (needs --api-token-file or
    /// --api-no-auth).
    #[arg(long, value_name = "unix:PATH|ADDR:PORT")]
    pub api: Option<crate::http::listen::ApiAddr>,
    /// The bearer token every API request must carry (a file: its first line,
    /// at least 16 characters).
    #[arg(long, value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,
    /// Serve a TCP API without a token (anyone who reaches it controls every
    /// container: for tests).
    #[arg(long, conflicts_with = "api_token_file")]
    pub api_no_auth: bool,
    /// An Origin allowed to call the API (`scheme://host[:port]`, repeatable);
    /// requests with any other Origin header are refused.
    #[arg(long = "api-allow-origin", value_name = "ORIGIN")]
    pub api_allow_origins: Vec<String>,
    /// A host name the TCP API is reached by (repeatable); a Host header that
    /// is neither the listener's address nor such a name is refused.
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// The appliance's private key (OpenSSH format); default
    /// STATE_DIR/appliance.key, generated on first start.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Known guest host keys: lines of `ID ssh-ed25519 AAAA...`.
    #[arg(long, conflicts_with = "accept_any_host_key")]
    pub known_guests: Option<PathBuf>,
    /// Trust any guest host key (development only).
    #[arg(long)]
    pub accept_any_host_key: bool,
    /// Where tetherd keeps its state: VMs in `vms/ID/` (config, console log, QMP
    /// socket), container records and output in `containers/ID/`.
    /// Default: /var/lib/tetherd for root, else $XDG_STATE_HOME/tetherd.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The kernel VMs boot (default: the newest /boot/vmlinuz-*).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The initramfs VMs boot (default: built and cached by scripts/build-initramfs).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Where guest RAM files go (a tmpfs): each VM's RAM is a file
    /// `tetherd-ID-GENERATION` here, removed when the VM ends, so a fork's
    /// children can map it copy-on-write.
    #[arg(long, default_value = "/dev/shm")]
    pub shm_dir: PathBuf,
    /// The accelerator: `auto` tries KVM for real and falls back to TCG.
    #[arg(long, default_value = "auto")]
    pub accel: crate::vm::accel::AccelChoice,
    /// Bounds against hostile or broken guests.
    #[command(flatten)]
    pub limits: crate::limits::LimitArgs,
    /// Where and how much container output is kept.
    #[command(flatten)]
    pub logs: crate::store::LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// The command the demo container runs.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Where to write the private key.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct GuestConfigArgs {
    /// The container id.
    #[arg(long)]
    pub id: String,
    /// The appliance's public key file (`tetherd keygen` wrote it as PATH.pub).
    #[arg(long)]
    pub key: PathBuf,
    /// Where to write the config.
    #[arg(long)]
    pub out: PathBuf,
    /// The guest's link SPEC (e.g. `serial:/dev/ttyS0`, `tcp:127.0.0.1:2377`).
    #[arg(long, default_value = "serial:/dev/ttyS0")]
    pub link: String,
    /// Record the guest's host key in this known-guests file.
    #[arg(long)]
    pub known_guests: Option<PathBuf>,
    /// Give the session a terminal.
    #[arg(long)]
    pub tty: bool,
    /// The primary session's command.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Container id.
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Container id.
    pub id: String,
    /// Replay output from this offset (default: everything retained).
    #[arg(long, default_value = "0")]
    pub from: String,
    /// Do not forward stdin.
    #[arg(long)]
    pub no_stdin: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Allocate a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Forward stdin.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Container id.
    pub id: String,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Keep printing new output.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Start at this output offset.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Start each line with the time tetherd received it.
    #[arg(short = 't', long)]
    pub timestamps: bool,
    /// Only output since this time (RFC 3339) or for this long (`10m`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N lines (`all`: every line).
    #[arg(short = 'n', long)]
    pub tail: Option<String>,
    /// Container id.
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct KillArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Signal name (TERM, KILL, HUP, ...).
    #[arg(short = 's', long, default_value = "TERM")]
    pub signal: String,
    /// Container id.
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The container id (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Forward stdin (keep the container's stdin open).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Print the container id and return instead of attaching.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Remove the VM's files when it exits.
    #[arg(long)]
    pub rm: bool,
    /// vCPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// Environment variable (K=V, or K to pass this one's value on).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// A host directory as the root filesystem (9p).
    #[arg(long, conflicts_with = "disk")]
    pub rootfs: Option<PathBuf>,
    /// A raw ext4 image as the root filesystem (/dev/vda).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Networking: `none`, or `user` (QEMU user networking, restrict=on: no way out).
    #[arg(long, default_value = "none")]
    pub net: crate::node::request::NetMode,
    /// One more NIC on its own user network, with this MAC (repeatable).
    #[arg(long = "nic", value_name = "MAC")]
    pub nics: Vec<String>,
    /// A raw disk image to attach after the root disk (repeatable); mount it
    /// with the guest config's `mounts`.
    #[arg(long = "add-disk", value_name = "FILE")]
    pub disks: Vec<PathBuf>,
    /// The container's host name (default: its id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// OS configuration for the guest (JSON object with `hosts`, `dns`,
    /// `networks`, `mounts`, `secrets`, ...: docs/CONFIG.md).
    #[arg(long, value_name = "FILE")]
    pub guest_config: Option<PathBuf>,
    /// Boot this kernel instead of tetherd's default.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Boot this initramfs instead of tetherd's default.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// How long to wait for the container to come up.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub boot_timeout: std::time::Duration,
    /// Print how long the VM took to boot (to stderr).
    #[arg(long)]
    pub timing: bool,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Seconds the guest gets to power off before its VM is killed.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
    /// Container ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Kill a running VM first.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Container ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ForkArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// How many children.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub children: u32,
    /// A child's container id (repeatable, in order; the others are ID-N).
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// A child's host name (repeatable, in order; the others take their id).
    #[arg(long = "hostname", value_name = "NAME")]
    pub hostnames: Vec<String>,
    /// How long each child may take to connect before it counts as failed
    /// (and its VM is killed).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// The container to fork (it keeps its id).
    pub id: String,
}
