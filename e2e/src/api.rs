//! Where a test's `tetherd serve` offers its API, and how the test reaches
//! it: a unix socket (tetherd's default), or TCP with a bearer token. Every
//! test that starts `tetherd serve` takes its `--api` arguments from an
//! `ApiEndpoint` and points the CLI (`TETHERD_API`, `TETHERD_TOKEN`) and its
//! raw HTTP requests at it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::peers::free_port;

/// The token of TCP endpoints (any 16+ printable characters will do).
pub const TEST_TOKEN: &str = "e2e-token-0123456789abcdef";

/// A `tetherd serve` API address and its credentials.
#[derive(Debug, Clone)]
pub enum ApiEndpoint {
    /// A unix socket.
    Unix(PathBuf),
    /// A loopback TCP port and the file holding its token.
    Tcp {
        addr: SocketAddr,
        token_file: PathBuf,
    },
}

impl ApiEndpoint {
    /// A socket `api.sock` in `dir`.
    pub fn unix(dir: &Path) -> Self {
        Self::Unix(dir.join("api.sock"))
    }

    /// A free loopback port, with the token written to `dir/api.token`.
    pub fn tcp(dir: &Path) -> Self {
        let token_file = dir.join("api.token");
        std::fs::write(&token_file, format!("{TEST_TOKEN}\n")).expect("write the token file");
        let port = free_port().expect("free port");
        Self::Tcp {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            token_file,
        }
    }

    /// The `tetherd serve` arguments for it.
    pub fn serve_args(&self) -> Vec<OsString> {
        match self {
            Self::Unix(path) => vec!["--api".into(), format!("unix:{}", path.display()).into()],
            Self::Tcp { addr, token_file } => vec![
                "--api".into(),
                addr.to_string().into(),
                "--api-token-file".into(),
                token_file.into(),
            ],
        }
    }

    /// The client's `--api` / `TETHERD_API` value.
    pub fn url(&self) -> String {
        match self {
            Self::Unix(path) => format!("unix:{}", path.display()),
            Self::Tcp { addr, .. } => format!("http://{addr}"),
        }
    }

    /// The token to send, if any.
    pub fn token(&self) -> Option<&'static str> {
        match self {
            Self::Unix(_) => None,
            Self::Tcp { .. } => Some(TEST_TOKEN),
        }
    }

    /// Points a `tetherd` client command at this API.
    pub fn client_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("TETHERD_API", self.url());
        match self.token() {
            Some(token) => cmd.env("TETHERD_TOKEN", token),
            None => cmd.env_remove("TETHERD_TOKEN"),
        }
    }

    /// A connection to the API.
    pub fn connect(&self) -> std::io::Result<Box<dyn ReadWrite>> {
        Ok(match self {
            Self::Unix(path) => Box::new(UnixStream::connect(path)?),
            Self::Tcp { addr, .. } => Box::new(TcpStream::connect(addr)?),
        })
    }

    /// Waits (up to 10 s) until the API accepts connections.
    pub fn wait_ready(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.connect().is_err() {
            assert!(
                Instant::now() < end,
                "tetherd serve's API {} did not come up",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Host header a well-behaved client sends.
    pub fn host(&self) -> String {
        match self {
            Self::Unix(_) => "localhost".into(),
            Self::Tcp { addr, .. } => addr.to_string(),
        }
    }

    /// One HTTP/1.1 request with the right Host and token, plus `headers`
    /// (`Name: value` lines); returns the status and the body.
    pub fn http(&self, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host());
        if let Some(token) = self.token() {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        self.raw(&head, body)
    }

    /// One request from `head` (request line and header lines, each ending
    /// in CRLF) exactly as given; returns the status and the body.
    pub fn raw(&self, head: &str, body: &str) -> (u16, String) {
        let mut s = self.connect().expect("connect to the API");
        write!(
            s,
            "{head}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send the request");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_owned())
    }
}

/// A byte stream to the API (TCP or unix).
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
