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
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Base URL of tetherd's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:2378", env = "TETHERD_API")]
    pub api: String,
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
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Listener for hypervisor serial bridges (link sync on).
    #[arg(long, default_value = "127.0.0.1:2377")]
    pub listen: SocketAddr,
    /// Listener for clean links (plain TCP, no link sync).
    #[arg(long)]
    pub listen_direct: Option<SocketAddr>,
    /// HTTP API listener.
    #[arg(long, default_value = "127.0.0.1:2378")]
    pub api: SocketAddr,
    /// The appliance's private key (OpenSSH format).
    #[arg(long)]
    pub key: PathBuf,
    /// Known guest host keys: lines of `ID ssh-ed25519 AAAA...`.
    #[arg(long, conflicts_with = "accept_any_host_key")]
    pub known_guests: Option<PathBuf>,
    /// Trust any guest host key (development only).
    #[arg(long)]
    pub accept_any_host_key: bool,
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
