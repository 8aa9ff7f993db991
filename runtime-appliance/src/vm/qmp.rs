//! A small QMP client (QEMU Machine Protocol): JSON objects, one per line, over
//! the VM's unix socket. It reads the greeting, enters command mode
//! (`qmp_capabilities`), and runs commands one at a time, setting aside the
//! asynchronous events QEMU interleaves with the replies.

use std::path::Path;
use std::time::Duration;

use futures_lite::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use serde_json::{Value, json};
use smol::net::unix::UnixStream;

/// Longest line accepted from QEMU (replies are small; a schema dump is not).
const MAX_LINE: usize = 4 << 20;
/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {error}")]
    Connect {
        path: String,
        #[source]
        error: std::io::Error,
    },
    #[error("QMP: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: QEMU closed the connection")]
    Closed,
    #[error("QMP: not a QMP message: {0}")]
    Protocol(String),
    #[error("QMP command {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {0}: no reply within {COMMAND_TIMEOUT:?}")]
    Timeout(String),
    #[error("QMP: the migration did not finish within {limit:?} (still {status})")]
    MigrationTimeout { limit: Duration, status: String },
}

/// A path as one `sh` word (QEMU runs `exec:` migration URIs with `sh -c`).
fn quoted(path: &Path) -> String {
    crate::appliance::shell_quote(&path.display().to_string())
}

/// The guest's run state (`query-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    /// Whether the vCPUs are running.
    pub running: bool,
    /// QEMU's name for the state: `running`, `paused`, `shutdown`, ...
    pub status: String,
}

/// A connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|error| QmpError::Connect {
                path: path.display().to_string(),
                error,
            })?;
        let mut qmp = Self {
            reader: BufReader::new(stream.clone()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        serde_json::from_str(line.trim()).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Runs `command` with `arguments`; returns the `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut message = json!({ "execute": command });
        if let Some(args) = arguments {
            message["arguments"] = args;
        }
        let mut text = message.to_string();
        text.push('\n');
        let exchange = async {
            self.writer.write_all(text.as_bytes()).await?;
            self.writer.flush().await?;
            loop {
                let reply = self.read_message().await?;
                if reply.get("event").is_some() {
                    self.events.push(reply);
                    continue;
                }
                if let Some(ret) = reply.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = reply.get("error") {
                    let field = |name: &str| {
                        err.get(name)
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned()
                    };
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class: field("class"),
                        desc: field("desc"),
                    });
                }
                return Err(QmpError::Protocol(format!("unexpected reply {reply}")));
            }
        };
        futures_lite::future::or(exchange, async {
            smol::Timer::after(COMMAND_TIMEOUT).await;
            Err(QmpError::Timeout(command.to_owned()))
        })
        .await
    }

    /// Presses the ACPI power button: the guest should power off.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// The guest's run state.
    pub async fn query_status(&mut self) -> Result<RunState, QmpError> {
        let ret = self.execute("query-status", None).await?;
        Ok(RunState {
            running: ret.get("running").and_then(Value::as_bool).unwrap_or(false),
            status: ret
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        })
    }

    /// Pauses the vCPUs.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// Hot-plugs a device: `arguments` holds `driver`, `id` and the driver's properties.
    pub async fn device_add(&mut self, arguments: Value) -> Result<(), QmpError> {
        self.execute("device_add", Some(arguments)).await.map(drop)
    }

    /// Turns on `x-ignore-shared`: guest RAM in a file is left out of a
    /// migration stream (it is the file), on both the saving and the loading side.
    pub async fn ignore_shared_memory(&mut self) -> Result<(), QmpError> {
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        self.execute("migrate-set-capabilities", Some(caps))
            .await
            .map(drop)
    }

    /// Starts saving the VM's state to `uri` (`exec:CMD`); see `migration`.
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Starts loading a saved state from `uri` into a VM started with
    /// `-incoming defer`; see `migration`.
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// The state of the current migration, outgoing or incoming
    /// (`query-migrate`): `active`, `completed`, `failed`, ...; with
    /// QEMU's error description when it failed.
    pub async fn migration(&mut self) -> Result<(String, Option<String>), QmpError> {
        let ret = self.execute("query-migrate", None).await?;
        let status = ret.get("status").and_then(Value::as_str).unwrap_or("none");
        let error = ret.get("error-desc").and_then(Value::as_str);
        Ok((status.to_owned(), error.map(str::to_owned)))
    }

    /// Polls `migration` until it completed (`Ok`) or failed, for at most `limit`.
    pub async fn migration_done(&mut self, limit: Duration) -> Result<(), QmpError> {
        let started = std::time::Instant::now();
        loop {
            let (status, error) = self.migration().await?;
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" | "cancelling" => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: status,
                        desc: error.unwrap_or_else(|| "no reason given".into()),
                    });
                }
                _ if started.elapsed() > limit => {
                    return Err(QmpError::MigrationTimeout { limit, status });
                }
                _ => smol::Timer::after(Duration::from_millis(5)).await,
            };
        }
    }

    /// Saves the device state of a stopped VM whose RAM is a shared file
    /// (`x-ignore-shared`: the file is the RAM) to `file`, within `limit`.
    pub async fn save_state(&mut self, file: &Path, limit: Duration) -> Result<(), QmpError> {
        self.ignore_shared_memory().await?;
        let uri = format!("exec:cat > {}", quoted(file));
        self.migrate(&uri).await?;
        self.migration_done(limit).await
    }

    /// Loads what `save_state` saved into a VM started with `-incoming
    /// defer` on (a copy of) the same RAM file, within `limit`.
    pub async fn load_state(&mut self, file: &Path, limit: Duration) -> Result<(), QmpError> {
        self.ignore_shared_memory().await?;
        let uri = format!("exec:cat {}", quoted(file));
        self.migrate_incoming(&uri).await?;
        self.migration_done(limit).await
    }

    /// Events received so far (and forgets them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::net::unix::UnixListener;

    /// A scripted QEMU: sends the greeting, then answers each command line
    /// with the next reply lines.
    fn fake_qemu(path: &Path, replies: Vec<Vec<&'static str>>) -> smol::Task<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        smol::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream.clone());
            let mut writer = stream;
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            for lines in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                seen.push(line.trim().to_owned());
                for l in lines {
                    writer.write_all(l.as_bytes()).await.unwrap();
                    writer.write_all(b"\r\n").await.unwrap();
                }
            }
            seen
        })
    }

    #[test]
    fn commands_get_their_replies_and_events_are_set_aside() {
        smol::block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let qemu = fake_qemu(
                &path,
                vec![
                    vec![r#"{"return": {}}"#],
                    vec![
                        r#"{"event": "POWERDOWN", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                        r#"{"return": {}}"#,
                    ],
                    vec![
                        r#"{"return": {"status": "running", "singlestep": false, "running": true}}"#,
                    ],
                    vec![
                        r#"{"error": {"class": "GenericError", "desc": "Duplicate device ID 'n1'"}}"#,
                    ],
                ],
            );
            let mut qmp = Qmp::connect(&path).await.unwrap();
            qmp.system_powerdown().await.unwrap();
            assert_eq!(qmp.take_events()[0]["event"], "POWERDOWN");
            let state = qmp.query_status().await.unwrap();
            assert_eq!(
                state,
                RunState {
                    running: true,
                    status: "running".into()
                }
            );
            let err = qmp
                .device_add(json!({"driver": "virtio-net-pci", "id": "n1"}))
                .await
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "QMP command device_add: GenericError: Duplicate device ID 'n1'"
            );
            let seen = qemu.await;
            assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
            assert_eq!(seen[1], r#"{"execute":"system_powerdown"}"#);
            assert_eq!(
                seen[3],
                r#"{"arguments":{"driver":"virtio-net-pci","id":"n1"},"execute":"device_add"}"#
            );
        });
    }

    #[test]
    fn a_socket_that_is_not_qmp_is_reported() {
        smol::block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let server = smol::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(b"{\"hello\": 1}\n").await.unwrap();
                smol::Timer::after(Duration::from_millis(200)).await;
            });
            let err = Qmp::connect(&path).await.err().unwrap();
            assert!(err.to_string().contains("expected a greeting"), "{err}");
            server.await;
            let err = Qmp::connect(&dir.path().join("none.sock"))
                .await
                .err()
                .unwrap();
            assert!(err.to_string().contains("none.sock"), "{err}");
        });
    }
}
