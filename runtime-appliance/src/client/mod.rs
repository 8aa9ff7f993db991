//! The CLI client commands (`ls`, `attach`, `exec`, `logs`, `kill`, `wait`,
//! and `run`, `stop`, `rm` in `run`): they talk to tetherd's HTTP API (see
//! `docs/API.md`).

pub mod api;
mod fork;
pub mod run;
pub mod session;
pub mod term;
pub mod ws;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::StreamExt;
use http_body_util::BodyExt;
use hyper::Method;
use serde::Deserialize;

use crate::cli::{ApiArgs, AttachArgs, Command, ExecArgs, IdArgs, KillArgs, LogsArgs};
use crate::http::OFFSET_HEADER;
use api::{Api, ClientError, encode};
use session::{Outcome, RECONNECT_FOR, Resume, Terminal};

/// Exit code for a failure of the client itself (not the container's).
const FAILED: u8 = 1;

/// Runs a `tetherd` command: the client commands here, the server commands
/// in `crate::server_commands`.
pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Serve(_) | Command::Demo(_) | Command::Keygen(_) | Command::GuestConfig(_) => {
            return crate::server_commands::run(command);
        }
        Command::Ls(args) => smol::block_on(ls(args)),
        Command::Attach(args) => smol::block_on(attach_command(args)),
        Command::Exec(args) => smol::block_on(exec_command(args)),
        Command::Logs(args) => smol::block_on(logs(args)),
        Command::Kill(args) => smol::block_on(kill(args)),
        Command::Wait(args) => smol::block_on(wait(args)),
        Command::Run(args) => {
            return smol::block_on(run::run(args)).unwrap_or_else(|e| {
                eprintln!("tetherd run: {e}");
                ExitCode::from(run::RUN_FAILED)
            });
        }
        Command::Stop(args) => smol::block_on(run::stop(args)),
        Command::Rm(args) => smol::block_on(run::rm(args)),
        Command::Fork(args) => smol::block_on(fork::fork(args)),
    };
    result.unwrap_or_else(|e| {
        eprintln!("tetherd: {e}");
        ExitCode::from(FAILED)
    })
}

/// A container as the API lists it.
#[derive(Debug, Deserialize)]
pub struct ContainerRow {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub exit_code: Option<u32>,
    pub connection: Option<u64>,
    pub output_end: u64,
    #[serde(default)]
    pub forked_from: Option<String>,
    #[serde(default)]
    pub fork_failure: Option<String>,
}

impl ContainerRow {
    /// The NOTE column: how a fork's child came about.
    fn note(&self) -> String {
        match (&self.forked_from, &self.fork_failure) {
            (Some(parent), Some(why)) => format!("fork of {parent} failed: {why}"),
            (Some(parent), None) => format!("forked from {parent}"),
            _ => String::new(),
        }
    }
}

/// The `ls` table (with a NOTE column when a container came from a fork).
pub fn format_table(rows: &[ContainerRow]) -> String {
    let header = ["ID", "KIND", "STATE", "EXIT", "LINK", "OUTPUT", "NOTE"].map(String::from);
    let mut lines = vec![header];
    for r in rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        lines.push([
            r.id.clone(),
            r.kind.clone(),
            r.state.clone(),
            opt(r.exit_code.map(|c| c.to_string())),
            opt(r.connection.map(|c| c.to_string())),
            r.output_end.to_string(),
            r.note(),
        ]);
    }
    if rows.iter().all(|r| r.note().is_empty()) {
        for line in &mut lines {
            line[6].clear();
        }
    }
    let mut widths = [0usize; 7];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn ls(args: ApiArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args)?;
    let rows: Vec<ContainerRow> = api.json(Method::GET, "/v1/containers").await?;
    print!("{}", format_table(&rows));
    Ok(ExitCode::SUCCESS)
}

async fn kill(args: KillArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    let path = format!(
        "/v1/containers/{}/signal?signal={}",
        encode(&args.id),
        encode(&args.signal)
    );
    api.call(Method::POST, &path).await?;
    Ok(ExitCode::SUCCESS)
}

async fn wait(args: IdArgs) -> Result<ExitCode, ClientError> {
    #[derive(Deserialize)]
    struct Waited {
        exit_code: u32,
    }
    let api = Api::from_args(&args.api)?;
    let waited: Waited = api
        .json(
            Method::GET,
            &format!("/v1/containers/{}/wait", encode(&args.id)),
        )
        .await?;
    println!("{}", waited.exit_code);
    Ok(ExitCode::SUCCESS)
}

/// `logs`: streams output to stdout; if the stream breaks after it started
/// (a gap, a restarted tetherd), resumes at the offset received so far.
async fn logs(args: LogsArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    let mut out = term::raw_stdout();
    let query = LogsQuery {
        from: args.from,
        follow: args.follow,
        timestamps: args.timestamps,
        since: args.since.clone(),
        tail: args.tail.clone(),
    };
    stream_logs(&api, &args.id, &query, &mut out, RECONNECT_FOR).await?;
    Ok(ExitCode::SUCCESS)
}

/// What `logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogsQuery {
    pub from: u64,
    pub follow: bool,
    pub timestamps: bool,
    pub since: Option<String>,
    pub tail: Option<String>,
}

impl LogsQuery {
    /// The query string for a request from `offset` (`tail` only on the
    /// first: a resumed stream goes on where it was).
    fn path(&self, id: &str, offset: u64, first: bool) -> String {
        let mut path = format!(
            "/v1/containers/{}/logs?follow={}&from={offset}",
            encode(id),
            u8::from(self.follow)
        );
        if self.timestamps {
            path.push_str("&timestamps=1");
        }
        if let Some(since) = &self.since {
            path.push_str(&format!("&since={}", encode(since)));
        }
        if let (Some(tail), true) = (&self.tail, first) {
            path.push_str(&format!("&tail={}", encode(tail)));
        }
        path
    }
}

/// The logs loop, writing to `out`; returns the offset reached.
pub async fn stream_logs(
    api: &Api,
    id: &str,
    query: &LogsQuery,
    out: &mut dyn Write,
    reconnect_for: Duration,
) -> Result<u64, ClientError> {
    let mut offset = query.from;
    let mut broken_since: Option<Instant> = None;
    // Only a stream that worked once is resumed: a first failure (no such
    // container, API down) is reported at once.
    let mut streamed = false;
    loop {
        let path = query.path(id, offset, !streamed);
        let attempt = async {
            let resp = api.request(Method::GET, &path).await?;
            let status = resp.status();
            if !status.is_success() {
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(ClientError::from_body(status, &body));
            }
            let start = resp
                .headers()
                .get(OFFSET_HEADER)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if let Some(start) = start.filter(|&s| s > offset) {
                eprintln!(
                    "tetherd: {} bytes of output before offset {start} are no longer retained",
                    start - offset
                );
                offset = start;
            }
            Ok(resp.into_body())
        };
        let e: ClientError = match attempt.await {
            Ok(mut body) => loop {
                streamed = true;
                match body.frame().await {
                    None => return Ok(offset),
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            broken_since = None;
                            offset += data.len() as u64;
                            write_all(out, data);
                        }
                    }
                    Some(Err(e)) => {
                        break ClientError::Protocol(format!("the output stream broke: {e}"));
                    }
                }
            },
            Err(e) => e,
        };
        let since = *broken_since.get_or_insert_with(Instant::now);
        // With timestamps the bytes received are not output offsets.
        let resumable = streamed && !query.timestamps && e.is_transient();
        if !resumable || since.elapsed() > reconnect_for {
            return Err(e);
        }
        tracing::debug!(error = %e, offset, "logs: resuming");
        smol::Timer::after(Duration::from_millis(200)).await;
    }
}

fn write_all(out: &mut dyn Write, data: &Bytes) {
    if let Err(e) = out.write_all(data).and_then(|()| out.flush()) {
        tracing::debug!(error = %e, "writing output failed");
    }
}

/// `--from`: an offset or `live`.
fn parse_from(v: &str) -> Result<String, ClientError> {
    if v.eq_ignore_ascii_case("live") {
        return Ok("live".into());
    }
    v.parse::<u64>()
        .map(|n| n.to_string())
        .map_err(|_| ClientError::BadUrl {
            url: v.into(),
            why: "--from takes an output offset or \"live\"".into(),
        })
}

async fn attach_command(args: AttachArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    let from = parse_from(&args.from).map_err(|_| {
        ClientError::Protocol(format!(
            "--from {:?}: expected an output offset or \"live\"",
            args.from
        ))
    })?;
    let stdin = !args.no_stdin;
    let path = format!(
        "/v1/containers/{}/attach?stdin={}&stdout=1&stderr=1&from={from}",
        encode(&args.id),
        u8::from(stdin)
    );
    let conn = ws::connect(&api, &path).await?;
    let tty = conn.tty.unwrap_or(false);
    let resume = Resume {
        id: Some(args.id.clone()),
        window: RECONNECT_FOR,
        first_delay: Duration::from_millis(100),
    };
    // At EOF of stdin, attach stops forwarding but leaves the container's
    // stdin open: it is shared with other attachers and outlives this one.
    interactive(&api, conn, resume, stdin, tty, &args.id, false).await
}

async fn exec_command(args: ExecArgs) -> Result<ExitCode, ClientError> {
    let api = Api::from_args(&args.api)?;
    let mut path = format!(
        "/v1/containers/{}/exec?stdin={}&stdout=1&stderr=1&tty={}",
        encode(&args.id),
        u8::from(args.interactive),
        u8::from(args.tty)
    );
    for arg in &args.cmd {
        path.push_str("&command=");
        path.push_str(&encode(arg));
    }
    if args.tty
        && let Some((w, h)) = term::window_size()
    {
        path.push_str(&format!("&width={w}&height={h}"));
    }
    let conn = ws::connect(&api, &path).await?;
    // Re-attach to the exec's own id; without one, a re-attach would reach
    // the container's primary process instead, so do not.
    let resume = Resume {
        id: conn.exec_id.clone(),
        window: RECONNECT_FOR,
        first_delay: Duration::from_millis(100),
    };
    interactive(
        &api,
        conn,
        resume,
        args.interactive,
        args.tty,
        &args.id,
        true,
    )
    .await
}

/// Sets up the local terminal and runs the session.
pub(crate) async fn interactive(
    api: &Api,
    conn: ws::Connected,
    resume: Resume,
    stdin: bool,
    tty: bool,
    id: &str,
    close_stdin_at_eof: bool,
) -> Result<ExitCode, ClientError> {
    let raw = stdin && tty && term::stdin_is_tty();
    let size = if tty { term::window_size() } else { None };
    let resize = if tty && size.is_some() {
        winch_sizes()
    } else {
        None
    };
    let mut terminal = Terminal {
        stdin: stdin.then(term::Input::stdin),
        stdout: term::raw_stdout(),
        stderr: Box::new(std::io::stderr()),
        resize,
        size,
        detach_keys: raw,
        close_stdin_at_eof,
    };
    let guard = if raw {
        match term::RawMode::enable() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(error = %e, "cannot put the terminal in raw mode");
                None
            }
        }
    } else {
        None
    };
    let outcome = session::run(api, conn, resume, &mut terminal).await;
    drop(guard);
    match outcome? {
        Outcome::Exited(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))),
        Outcome::Detached => {
            eprintln!("\ndetached from {id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Window sizes on SIGWINCH.
fn winch_sizes() -> Option<futures_lite::stream::Boxed<(u16, u16)>> {
    match async_signal::Signals::new([async_signal::Signal::Winch]) {
        Ok(signals) => Some(
            signals
                .take_while(Result::is_ok)
                .filter_map(|_| term::window_size())
                .boxed(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGWINCH; window size changes are not forwarded");
            None
        }
    }
}
