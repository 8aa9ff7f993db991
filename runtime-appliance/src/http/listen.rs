//! Where the API listens: a unix socket (the default, like Docker's: only its
//! owner and the `tetherd` group can connect) or a TCP address (which then
//! needs a bearer token, see `access`).
//!
//! `ApiAddr` is the parsed `--api` value; `ApiListener::bind` creates the
//! socket (its directory, mode 0660, group `tetherd` when that group exists,
//! a stale socket file of a dead tetherd replaced); `ApiStream` is one
//! accepted connection of either kind.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use smol::Async;

/// The socket's mode: owner and group may connect, nobody else.
pub const SOCKET_MODE: u32 = 0o660;
/// The group given the socket when it exists (like Docker's `docker` group).
pub const SOCKET_GROUP: &str = "tetherd";

/// The API's address: `unix:PATH` or `ADDR:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for ApiAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            // `unix:///run/x.sock` (Docker's spelling) is `unix:/run/x.sock`.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!("{s:?}: unix: needs a socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let tcp = s.strip_prefix("tcp:").unwrap_or(s);
        tcp.parse().map(Self::Tcp).map_err(|_| {
            format!("{s:?}: expected unix:PATH or ADDR:PORT (e.g. unix:/run/tetherd/api.sock, 127.0.0.1:2378)")
        })
    }
}

impl fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "http://{addr}"),
        }
    }
}

/// The default socket: `/run/tetherd/api.sock` for root, else
/// `$XDG_RUNTIME_DIR/tetherd/api.sock` when that is set (as rootless Docker
/// does), else `/run/tetherd/api.sock`. `tetherd serve` and the client
/// commands agree on it.
pub fn default_socket() -> PathBuf {
    let system = PathBuf::from("/run/tetherd/api.sock");
    if nix::unistd::geteuid().is_root() {
        return system;
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("tetherd/api.sock"),
        _ => system,
    }
}

/// A bound API listener.
pub enum ApiListener {
    Tcp(Async<TcpListener>),
    Unix(Async<UnixListener>),
}

impl ApiListener {
    /// Binds `addr`; a unix socket as described in the module docs.
    pub fn bind(addr: &ApiAddr) -> Result<Self, String> {
        match addr {
            ApiAddr::Tcp(a) => Async::<TcpListener>::bind(*a)
                .map(Self::Tcp)
                .map_err(|e| format!("--api {a}: {e}")),
            ApiAddr::Unix(path) => bind_unix(path).map(Self::Unix),
        }
    }

    /// Where it listens (a TCP listener's real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ApiAddr> {
        match self {
            Self::Tcp(l) => l.get_ref().local_addr().map(ApiAddr::Tcp),
            Self::Unix(l) => {
                let addr = l.get_ref().local_addr()?;
                let path = addr.as_pathname().unwrap_or(Path::new(""));
                Ok(ApiAddr::Unix(path.to_path_buf()))
            }
        }
    }

    /// The next connection, and its peer for log messages.
    pub async fn accept(&self) -> io::Result<(ApiStream, String)> {
        match self {
            Self::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.get_ref().set_nodelay(true);
                Ok((ApiStream::Tcp(stream), peer.to_string()))
            }
            Self::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let peer = match nix::sys::socket::getsockopt(
                    stream.get_ref(),
                    nix::sys::socket::sockopt::PeerCredentials,
                ) {
                    Ok(cred) => format!("unix pid {} uid {}", cred.pid(), cred.uid()),
                    Err(_) => "unix".into(),
                };
                Ok((ApiStream::Unix(stream), peer))
            }
        }
    }
}

/// Creates the socket at `path`: its directory (mode 0755) if missing, a stale
/// socket file replaced (one a live tetherd answers on is an error), mode
/// 0660, group `tetherd` when that group exists.
fn bind_unix(path: &Path) -> Result<Async<UnixListener>, String> {
    let name = |e: &dyn fmt::Display| format!("--api unix:{}: {e}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| name(&format!("creating {}: {e}", dir.display())))?;
    }
    remove_stale(path).map_err(|e| name(&e))?;
    let listener = Async::<UnixListener>::bind(path).map_err(|e| name(&e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| name(&format!("chmod: {e}")))?;
    if let Ok(Some(group)) = nix::unistd::Group::from_name(SOCKET_GROUP)
        && let Err(e) = nix::unistd::chown(path, None, Some(group.gid))
    {
        tracing::warn!(error = %e, "cannot give the API socket {} to group {SOCKET_GROUP}", path.display());
    }
    Ok(listener)
}

/// Removes a socket file nothing listens on; refuses to touch anything else.
fn remove_stale(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.file_type().is_socket() {
        return Err("exists and is not a socket; remove it or choose another path".into());
    }
    match UnixStream::connect(path) {
        Ok(_) => Err("another tetherd is serving on it".into()),
        Err(_) => std::fs::remove_file(path).map_err(|e| format!("removing the stale socket: {e}")),
    }
}

/// One API connection, TCP or unix.
pub enum ApiStream {
    Tcp(Async<TcpStream>),
    Unix(Async<UnixStream>),
}

impl AsyncRead for ApiStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_close(cx),
            Self::Unix(s) => Pin::new(s).poll_close(cx),
        }
    }
}

impl ApiStream {
    /// Connects to `addr` (the client side).
    pub async fn connect(addr: &ApiAddr) -> io::Result<Self> {
        match addr {
            ApiAddr::Tcp(a) => {
                let s = Async::<TcpStream>::connect(*a).await?;
                let _ = s.get_ref().set_nodelay(true);
                Ok(Self::Tcp(s))
            }
            ApiAddr::Unix(path) => Async::<UnixStream>::connect(path).await.map(Self::Unix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_api_addresses() {
        assert_eq!(
            "unix:/run/t/api.sock".parse(),
            Ok(ApiAddr::Unix("/run/t/api.sock".into()))
        );
        assert_eq!(
            "unix:///run/t/api.sock".parse(),
            Ok(ApiAddr::Unix("/run/t/api.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:2378".parse(),
            Ok(ApiAddr::Tcp("127.0.0.1:2378".parse().unwrap()))
        );
        assert_eq!(
            "tcp:[::1]:9".parse(),
            Ok(ApiAddr::Tcp("[::1]:9".parse().unwrap()))
        );
        for bad in ["unix:", "localhost:2378", "http://127.0.0.1:2378", ""] {
            let e = bad.parse::<ApiAddr>().unwrap_err();
            assert!(
                e.contains("unix:PATH") || e.contains("socket path"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_socket_is_0660_in_a_created_directory_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/tetherd/api.sock");
        let first = ApiListener::bind(&ApiAddr::Unix(path.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A live socket is not taken over.
        let e = ApiListener::bind(&ApiAddr::Unix(path.clone()))
            .err()
            .unwrap();
        assert!(e.contains("another tetherd"), "{e}");
        // Once its tetherd is gone, the file left behind is replaced.
        drop(first);
        assert!(path.exists());
        ApiListener::bind(&ApiAddr::Unix(path.clone())).unwrap();
        // A regular file is never removed.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        let e = ApiListener::bind(&ApiAddr::Unix(file.clone()))
            .err()
            .unwrap();
        assert!(e.contains("not a socket"), "{e}");
        assert!(file.exists());
    }
}
