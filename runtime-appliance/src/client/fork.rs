//! `tetherd fork`: asks for a fork and prints its events as they stream in:
//! each child's id on stdout as it connects, progress on stderr. The exit
//! status is non-zero if any child failed.

use std::io::Write;
use std::process::ExitCode;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Method;

use super::api::{Api, ClientError, encode};
use crate::cli::ForkArgs;
use crate::node::fork::{ForkEvent, ForkRequest};

/// Runs `tetherd fork`.
pub async fn fork(args: ForkArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    let request = ForkRequest {
        children: args.children,
        names: args.names.clone(),
        hostnames: args.hostnames.clone(),
    };
    let body = serde_json::to_vec(&request)
        .map_err(|e| ClientError::Protocol(format!("encoding the request: {e}")))?;
    let path = format!(
        "/v1/containers/{}/fork?timeout={}ms",
        encode(&args.id),
        args.timeout.as_millis()
    );
    let resp = api
        .send(
            Method::POST,
            &path,
            Full::new(Bytes::from(body)),
            Some("application/json"),
        )
        .await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let all = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(ClientError::from_body(status, &all));
    }
    let mut printer = Printer::default();
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Protocol(format!("the fork's events: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = pending.split_to(end + 1);
            let event: ForkEvent = serde_json::from_slice(&line).map_err(|e| {
                ClientError::Protocol(format!(
                    "unexpected fork event {:?}: {e}",
                    String::from_utf8_lossy(&line)
                ))
            })?;
            printer.print(&event);
        }
    }
    if !printer.done {
        return Err(ClientError::Protocol(
            "the fork's events ended before it was done".into(),
        ));
    }
    Ok(if printer.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::FAILED)
    })
}

/// What the events said so far.
struct Printer {
    ok: bool,
    done: bool,
}

impl Default for Printer {
    fn default() -> Self {
        Self {
            ok: true,
            done: false,
        }
    }
}

impl Printer {
    fn print(&mut self, event: &ForkEvent) {
        let mut out = std::io::stdout();
        match event {
            ForkEvent::Quiesced { id, ms, .. } => eprintln!("{id} quiesced ({ms} ms)"),
            ForkEvent::Saved {
                save_ms,
                paused_ms,
                state_bytes,
                ram_bytes,
                ..
            } => eprintln!(
                "saved in {save_ms} ms ({} KiB of device state, {} MiB of RAM copied); \
                 the parent was paused {paused_ms} ms",
                state_bytes >> 10,
                ram_bytes >> 20
            ),
            ForkEvent::Resumed { id, ms } => eprintln!("{id} resumed ({ms} ms)"),
            ForkEvent::Connected {
                id,
                ms,
                after_cont_ms,
                recovery_us,
                ..
            } => {
                let _ = writeln!(out, "{id}");
                let _ = out.flush();
                eprintln!(
                    "{id} connected ({ms} ms; {after_cont_ms} ms after its VM continued; \
                     recovery in the guest {:.1} ms)",
                    *recovery_us as f64 / 1000.0
                );
            }
            ForkEvent::Failed { id, reason, ms, .. } => {
                self.ok = false;
                eprintln!("{id} failed ({ms} ms): {reason}");
            }
            ForkEvent::Error { message, .. } => {
                self.ok = false;
                eprintln!("fork error: {message}");
            }
            ForkEvent::Done {
                ms,
                connected,
                failed,
            } => {
                self.done = true;
                eprintln!(
                    "fork done in {ms} ms: {} connected, {} failed",
                    connected.len(),
                    failed.len()
                );
            }
        }
    }
}
