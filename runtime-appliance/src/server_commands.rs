//! The server commands: `serve`, `keygen` and `guest-config` (`demo` has
//! its own module).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use proto_core::{PrivateKey, PublicKey};
use rand_core::OsRng;
use smol::Async;
use tracing::info;

use crate::appliance::Appliance;
use crate::cli::{Command, GuestConfigArgs, KeygenArgs, ServeArgs};
use crate::http::access::Access;
use crate::http::listen::{ApiAddr, ApiListener};

/// Runs a server command.
pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Serve(args) => serve(args),
        Command::Keygen(args) => keygen(&args),
        Command::GuestConfig(args) => guest_config(&args),
        Command::Demo(args) => return crate::demo::run(args),
        _ => Err("not a server command".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tetherd: {e}");
            ExitCode::from(2)
        }
    }
}

fn read_key(path: &Path) -> Result<PrivateKey, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("--key {}: {e}", path.display()))?;
    PrivateKey::from_openssh(&text).map_err(|e| format!("--key {}: {e}", path.display()))
}

/// Parses a known-guests file: `ID ssh-ed25519 AAAA... [comment]` per line.
pub fn parse_known_guests(text: &str) -> Result<HashMap<String, PublicKey>, String> {
    let mut known = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, key) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: expected `ID ssh-ed25519 AAAA...`", n + 1))?;
        let key =
            PublicKey::from_openssh(key.trim()).map_err(|e| format!("line {}: {e}", n + 1))?;
        known.insert(id.to_owned(), key);
    }
    Ok(known)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    match crate::limits::raise_fd_limit() {
        Ok((from, to)) if from < to => info!("open files: limit raised from {from} to {to}"),
        Ok((_, to)) => info!("open files: limit {to}"),
        Err(e) => tracing::warn!("open files: the limit could not be raised: {e}"),
    }
    warm_up_rng()?;
    let state = crate::node::state::state_dir(args.state_dir.as_deref())?;
    let key = match &args.key {
        Some(path) => read_key(path)?,
        None => crate::node::state::state_key(&state)?,
    };
    let known = match (&args.known_guests, args.accept_any_host_key) {
        (Some(path), _) => {
            let text = fs::read_to_string(path)
                .map_err(|e| format!("--known-guests {}: {e}", path.display()))?;
            Some(
                parse_known_guests(&text)
                    .map_err(|e| format!("--known-guests {}: {e}", path.display()))?,
            )
        }
        (None, true) => {
            tracing::warn!(
                "--accept-any-host-key: any guest host key is trusted (development only)"
            );
            None
        }
        // Only the guests of the VMs this tetherd boots (it pins their keys).
        (None, false) => Some(HashMap::new()),
    };
    let public = *key.public();
    let appliance = Appliance::with_limits(key, known, args.limits.limits())
        .with_store(&state.join("containers"), args.logs.limits())?;
    let bind = |addr: SocketAddr, what: &str| {
        Async::<TcpListener>::bind(addr).map_err(|e| format!("{what} {addr}: {e}"))
    };
    let guests = bind(args.listen, "--listen")?;
    let guests_addr = guests.get_ref().local_addr().map_err(|e| e.to_string())?;
    info!("guest links (link sync on) on {guests_addr}");
    let vms = crate::node::vms::Vms::new(
        crate::node::vms::VmSettings {
            state_dir: state,
            link: crate::node::state::dialable(guests_addr),
            qemu: args.qemu.clone(),
            accel: args.accel,
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            shm_dir: args.shm_dir.clone(),
        },
        appliance.clone(),
        public,
    );
    let vms = std::sync::Arc::new(vms);
    vms.adopt_leftovers();
    let node = crate::node::Node {
        appliance: appliance.clone(),
        vms: Some(vms),
    };
    let direct = args
        .listen_direct
        .map(|a| bind(a, "--listen-direct"))
        .transpose()?;
    let (api, access) = api_listener(&args)?;
    // Every task runs on smol's global executor thread, which polls epoll
    // itself while idle. This thread only waits: were it in `smol::block_on`
    // too, it would hold the reactor while idle, and each I/O event would
    // reach the executor thread through a futex wake-up from here.
    futures_lite::future::block_on(smol::spawn(async move {
        let a = appliance.clone();
        smol::spawn(async move { a.listen(guests, true).await }).detach();
        if let Some(direct) = direct {
            info!(
                "guest links (direct) on {}",
                direct
                    .get_ref()
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            );
            let a = appliance.clone();
            smol::spawn(async move { a.listen(direct, false).await }).detach();
        }
        crate::http::serve_backend(api, node, access).await;
    }));
    Ok(())
}

/// Seeds aws-lc's random generator now. The first draw from it in a process
/// initialises its jitter entropy source (tens of milliseconds of CPU, more
/// on a busy machine); without this, the first links' key exchanges paid
/// for it on the executor thread, stalling every link meanwhile.
fn warm_up_rng() -> Result<(), String> {
    let started = std::time::Instant::now();
    aws_lc_rs::rand::fill(&mut [0u8; 32])
        .map_err(|_| "aws-lc's random generator failed to start".to_owned())?;
    tracing::debug!(took = ?started.elapsed(), "random generator seeded");
    Ok(())
}

/// Binds the API (`--api`, the default socket without it) and its access
/// rules: a TCP listener needs `--api-token-file` or `--api-no-auth`.
fn api_listener(args: &ServeArgs) -> Result<(ApiListener, Access), String> {
    let addr = args
        .api
        .clone()
        .unwrap_or_else(|| ApiAddr::Unix(crate::http::listen::default_socket()));
    let token = args
        .api_token_file
        .as_deref()
        .map(crate::http::access::read_token)
        .transpose()?;
    let listener_ip = match &addr {
        ApiAddr::Tcp(a) if token.is_none() && !args.api_no_auth => {
            return Err(format!(
                "--api {a}: a TCP API needs --api-token-file PATH (or --api-no-auth, for tests); \
                 or listen on a unix socket (--api unix:PATH)"
            ));
        }
        ApiAddr::Tcp(a) => Some(a.ip()),
        ApiAddr::Unix(_) => None,
    };
    let api = ApiListener::bind(&addr)?;
    let local = api.local_addr().map_err(|e| e.to_string())?;
    info!("HTTP API on {local}");
    if listener_ip.is_some() && token.is_none() {
        tracing::warn!(
            "--api-no-auth: the API on {local} takes requests without a token; \
             whoever reaches it controls every container (for tests only)"
        );
    }
    let access = Access {
        token,
        allowed_origins: args.api_allow_origins.clone(),
        hosts: args.api_hosts.clone(),
        listener: listener_ip,
    };
    Ok((api, access))
}

/// Writes a file only the owner can read.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn keygen(args: &KeygenArgs) -> Result<(), String> {
    if args.out.exists() {
        return Err(format!("{} exists; remove it first", args.out.display()));
    }
    let key = PrivateKey::generate(&mut OsRng);
    write_private(&args.out, &key.to_openssh("tetherd"))?;
    let public = format!("{} tetherd\n", key.public().to_openssh());
    fs::write(pub_path(&args.out), public)
        .map_err(|e| format!("{}: {e}", pub_path(&args.out).display()))?;
    println!("{} {}", args.out.display(), key.public().fingerprint());
    Ok(())
}

/// A guest config with a fresh host key and one primary session.
pub fn guest_config_json(
    id: &str,
    appliance: &PublicKey,
    host_key: &PrivateKey,
    link: &str,
    tty: bool,
    cmd: &[String],
) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "host_key": host_key.to_openssh(id),
        "authorized_keys": [appliance.to_openssh()],
        "link": link,
        "sessions": [{ "id": id, "cmd": cmd, "tty": tty }],
    })
}

fn guest_config(args: &GuestConfigArgs) -> Result<(), String> {
    let text =
        fs::read_to_string(&args.key).map_err(|e| format!("--key {}: {e}", args.key.display()))?;
    let appliance = PublicKey::from_openssh(text.lines().next().unwrap_or(""))
        .map_err(|e| format!("--key {}: {e}", args.key.display()))?;
    args.link
        .parse::<proto_core::linkspec::LinkSpec>()
        .map_err(|e| format!("--link: {e}"))?;
    let host_key = PrivateKey::generate(&mut OsRng);
    let config = guest_config_json(
        &args.id, &appliance, &host_key, &args.link, args.tty, &args.cmd,
    );
    write_private(&args.out, &format!("{:#}\n", config))?;
    if let Some(known) = &args.known_guests {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(known)
            .map_err(|e| format!("--known-guests {}: {e}", known.display()))?;
        writeln!(f, "{} {}", args.id, host_key.public().to_openssh())
            .map_err(|e| format!("--known-guests {}: {e}", known.display()))?;
    }
    println!(
        "{} (guest host key {})",
        args.out.display(),
        host_key.public().fingerprint()
    );
    Ok(())
}
