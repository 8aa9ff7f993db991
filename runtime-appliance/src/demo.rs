//! `tetherd demo`: the appliance on loopback, a local `tether` child linked
//! to it over TCP with link sync, a shell in it, and this terminal attached.
//! Needs nothing but the built binaries.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};

use proto_core::PrivateKey;
use rand_core::OsRng;

use crate::appliance::Appliance;
use crate::cli::{ApiArgs, AttachArgs, Command, DemoArgs};
use crate::http::access::Access;
use crate::http::listen::{ApiAddr, ApiListener};
use crate::server_commands::{guest_config_json, write_private};

/// The `tether` binary next to this one.
fn tether_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me.with_file_name("tether");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release -p runtime-guest` (scripts/demo does)",
            path.display()
        ))
    }
}

/// The demo: an appliance on loopback, a local `tether` child linked to it
/// over TCP with link sync, a shell in it, and this terminal attached.
pub fn run(args: DemoArgs) -> ExitCode {
    match demo_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tetherd demo: {e}");
            ExitCode::from(2)
        }
    }
}

fn demo_inner(args: DemoArgs) -> Result<ExitCode, String> {
    let tether = tether_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("tether-demo")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let appliance_key = PrivateKey::generate(&mut OsRng);
    let host_key = PrivateKey::generate(&mut OsRng);
    let id = "demo";
    let appliance = Appliance::new(
        appliance_key.clone(),
        Some(HashMap::from([(id.to_owned(), *host_key.public())])),
    );
    let guests = appliance
        .spawn_listener("127.0.0.1:0".parse().expect("address"), true)
        .map_err(|e| e.to_string())?;
    // The API on a socket in the demo's own private directory: only this
    // user reaches it.
    let socket = ApiAddr::Unix(dir.path().join("api.sock"));
    let api = ApiListener::bind(&socket)?;
    let a = appliance.clone();
    smol::spawn(async move { crate::http::serve_api(api, a, Access::unix()).await }).detach();

    let shell = std::env::var("SHELL")
        .ok()
        .filter(|s| Path::new(s).exists())
        .unwrap_or_else(|| "/bin/sh".into());
    let cmd = if args.cmd.is_empty() {
        vec![shell]
    } else {
        args.cmd.clone()
    };
    let interactive = crate::client::term::stdin_is_tty();
    let config = guest_config_json(
        id,
        appliance_key.public(),
        &host_key,
        &format!("tcp:{guests}"),
        interactive,
        &cmd,
    );
    let config_path = dir.path().join("config.json");
    write_private(&config_path, &config.to_string())?;
    let log_path = dir.path().join("tether.log");
    let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = Process::new(&tether)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", tether.display()))?;
    if interactive {
        eprintln!(
            "tether demo: a shell in a local tether, linked over loopback with link sync. Detach with ctrl-p ctrl-q.\r"
        );
    }
    let code = crate::client::run(Command::Attach(AttachArgs {
        api: ApiArgs {
            api: Some(socket.to_string()),
            token_file: None,
        },
        id: id.into(),
        from: "0".into(),
        no_stdin: false,
    }));
    let _ = child.kill();
    let _ = child.wait();
    if interactive {
        let _ = fs::copy(&log_path, std::env::temp_dir().join("tether-demo.log"));
        eprintln!(
            "tether's log: {}",
            std::env::temp_dir().join("tether-demo.log").display()
        );
    }
    Ok(code)
}
