//! `tetherd run`, `stop` and `rm`: a container in a VM of its own, through
//! `tetherd serve`'s API, the way `docker run` works: create it, attach
//! (waiting for it to boot), and exit with its exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hyper::Method;

use super::api::{Api, ClientError, encode};
use super::session::{RECONNECT_FOR, Resume};
use super::ws;
use crate::cli::{RmArgs, RunArgs, StopArgs};
use crate::node::request::{CreateRequest, Created, NicRequest, Removed, StopReply};

/// `run`'s exit code when it fails itself (as `docker run` does).
pub const RUN_FAILED: u8 = 125;

/// The create request `run`'s arguments describe.
pub fn request(args: &RunArgs) -> Result<CreateRequest, ClientError> {
    let mut env = std::collections::BTreeMap::new();
    for kv in &args.env {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            // `-e NAME` passes this process's value on, as docker does.
            None => match std::env::var(kv) {
                Ok(v) => (kv.clone(), v),
                Err(_) => continue,
            },
        };
        env.insert(k, v);
    }
    let mut guest = match &args.guest_config {
        None => serde_json::Map::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ClientError::Protocol(format!("--guest-config {}: {e}", path.display()))
            })?;
            match serde_json::from_str(&text) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => {
                    return Err(ClientError::Protocol(format!(
                        "--guest-config {}: not a JSON object",
                        path.display()
                    )));
                }
                Err(e) => {
                    return Err(ClientError::Protocol(format!(
                        "--guest-config {}: {e}",
                        path.display()
                    )));
                }
            }
        }
    };
    if let Some(name) = &args.hostname {
        guest.insert("hostname".into(), name.clone().into());
    }
    let disks = args
        .disks
        .iter()
        .map(|d| absolute(Some(d), "--add-disk").map(|p| p.unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CreateRequest {
        name: args.name.clone(),
        cmd: args.cmd.clone(),
        tty: args.tty,
        stdin: args.interactive,
        env,
        cpus: args.cpus,
        max_cpus: None,
        memory_mib: args.memory,
        rootfs: absolute(args.rootfs.as_deref(), "--rootfs")?,
        disk: absolute(args.disk.as_deref(), "--disk")?,
        net: args.net,
        kernel: absolute(args.kernel.as_deref(), "--kernel")?,
        initrd: absolute(args.initrd.as_deref(), "--initrd")?,
        auto_remove: args.rm,
        // Attached, the primary starts once the attachment is there, so none
        // of its output (or its exit) happens before anyone is listening.
        start_gated: !args.detach,
        nics: args
            .nics
            .iter()
            .map(|mac| NicRequest {
                mac: Some(mac.clone()),
            })
            .collect(),
        disks,
        guest: (!guest.is_empty()).then_some(guest),
    })
}

/// The server checks absolute paths; a relative one is taken from here.
fn absolute(path: Option<&Path>, flag: &str) -> Result<Option<PathBuf>, ClientError> {
    path.map(|p| {
        std::path::absolute(p)
            .map_err(|e| ClientError::Protocol(format!("{flag} {}: {e}", p.display())))
    })
    .transpose()
}

/// `tetherd run`.
pub async fn run(args: RunArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    let request = request(&args)?;
    let started = Instant::now();
    let created: Created = api
        .send_json(Method::POST, "/v1/containers", &request)
        .await?;
    if args.detach {
        println!("{}", created.id);
        return Ok(ExitCode::SUCCESS);
    }
    let id = created.id;
    let path = format!(
        "/v1/containers/{}/attach?stdin={}&stdout=1&stderr=1&from=0&timeout={}ms",
        encode(&id),
        u8::from(args.interactive),
        args.boot_timeout.as_millis()
    );
    let conn = ws::connect(&api, &path).await.map_err(|e| {
        let console = created.console.display().to_string();
        let mut message = format!("{id} did not come up: {e}");
        if !message.contains(&console) {
            message.push_str(&format!(" (its console: {console})"));
        }
        ClientError::Protocol(message)
    })?;
    let start = format!("/v1/containers/{}/start", encode(&id));
    if let Err(e) = api.call(Method::POST, &start).await {
        // Already started (its gate timed out): the output is replayed anyway.
        tracing::debug!(error = %e, "starting {id}");
    }
    if args.timing {
        eprintln!(
            "tetherd: {id} booted in {:.2} s ({}); its console: {}\r",
            started.elapsed().as_secs_f64(),
            created.accel,
            created.console.display()
        );
    }
    let resume = Resume {
        id: Some(id.clone()),
        window: RECONNECT_FOR,
        first_delay: Duration::from_millis(100),
    };
    // At EOF of local stdin the container's stdin closes, as with `docker run -i`.
    super::interactive(&api, conn, resume, args.interactive, args.tty, &id, true).await
}

/// `tetherd stop ID...`.
pub async fn stop(args: StopArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    for id in &args.ids {
        let path = format!("/v1/containers/{}/stop?grace={}s", encode(id), args.time);
        let reply: StopReply = api.json(Method::POST, &path).await?;
        if reply.killed {
            eprintln!(
                "tetherd: {id} did not power off within {}s; killed",
                args.time
            );
        }
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tetherd rm ID...`.
pub async fn rm(args: RmArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    for id in &args.ids {
        let path = format!(
            "/v1/containers/{}?force={}",
            encode(id),
            u8::from(args.force)
        );
        let _: Removed = api.json(Method::DELETE, &path).await?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}
