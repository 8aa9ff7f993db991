//! The byte streams a link SPEC (proto-core's `linkspec`) opens: a serial
//! device, a TCP connection or listener, vsock, a unix socket.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use smol::Async;

pub use proto_core::linkspec::{Endpoint, LinkSpec};

/// An open link: a byte stream that can be read and written at the same time.
pub enum LinkStream {
    Tcp(Async<TcpStream>),
    Unix(Async<UnixStream>),
    /// Serial devices and vsock sockets.
    Fd(Async<File>),
}

/// Something that yields links: a connector that dials, or a listener.
pub enum Dialer {
    Connect(LinkSpec),
    TcpListener(Async<TcpListener>),
    VsockListener(Async<File>),
}

impl Dialer {
    /// Prepares to open links (binds listeners now, so errors surface early).
    pub fn new(spec: &LinkSpec) -> io::Result<Self> {
        Ok(match &spec.endpoint {
            Endpoint::TcpListen(addr) => Dialer::TcpListener(Async::<TcpListener>::bind(*addr)?),
            Endpoint::VsockListen { port } => {
                Dialer::VsockListener(Async::new(File::from(vsock::listen(*port)?))?)
            }
            _ => Dialer::Connect(spec.clone()),
        })
    }

    /// The local address of a TCP listener (for tests that listen on port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Dialer::TcpListener(l) => l.get_ref().local_addr().ok(),
            _ => None,
        }
    }

    /// Opens the next link: connects, opens the device, or accepts.
    pub async fn open(&self) -> io::Result<LinkStream> {
        match self {
            Dialer::TcpListener(l) => {
                let (s, _) = l.accept().await?;
                s.get_ref().set_nodelay(true)?;
                Ok(LinkStream::Tcp(s))
            }
            Dialer::VsockListener(l) => {
                l.readable().await?;
                let fd = vsock::accept(l.get_ref())?;
                Ok(LinkStream::Fd(Async::new(File::from(fd))?))
            }
            Dialer::Connect(spec) => match &spec.endpoint {
                Endpoint::Serial(path) => Ok(LinkStream::Fd(Async::new(serial::open(path)?)?)),
                Endpoint::Tcp(addr) => {
                    let addrs: Vec<SocketAddr> = smol::net::resolve(addr.as_str()).await?;
                    let mut last = io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{addr} resolves to nothing"),
                    );
                    for a in addrs {
                        match Async::<TcpStream>::connect(a).await {
                            Ok(s) => {
                                s.get_ref().set_nodelay(true)?;
                                return Ok(LinkStream::Tcp(s));
                            }
                            Err(e) => last = e,
                        }
                    }
                    Err(last)
                }
                Endpoint::Unix(path) => {
                    Ok(LinkStream::Unix(Async::<UnixStream>::connect(path).await?))
                }
                Endpoint::Vsock { cid, port } => {
                    let fd = vsock::connect(*cid, *port)?;
                    Ok(LinkStream::Fd(Async::new(File::from(fd))?))
                }
                Endpoint::TcpListen(_) | Endpoint::VsockListen { .. } => {
                    unreachable!("listeners are built in new")
                }
            },
        }
    }
}

/// Serial devices: raw mode at 115200 baud, like VIC's tether.
mod serial {
    use super::*;
    use nix::sys::termios::{self, BaudRate, SetArg};

    pub fn open(path: &std::path::Path) -> io::Result<File> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(path)?;
        if let Ok(mut t) = termios::tcgetattr(&file) {
            termios::cfmakeraw(&mut t);
            let _ = termios::cfsetspeed(&mut t, BaudRate::B115200);
            termios::tcsetattr(&file, SetArg::TCSANOW, &t).map_err(io::Error::from)?;
        }
        Ok(file)
    }

    trait NoCtty {
        fn custom_flags_noctty(&mut self) -> &mut Self;
    }

    impl NoCtty for std::fs::OpenOptions {
        fn custom_flags_noctty(&mut self) -> &mut Self {
            use std::os::unix::fs::OpenOptionsExt;
            self.custom_flags(nix::libc::O_NOCTTY)
        }
    }
}

/// vsock sockets through nix.
mod vsock {
    use super::*;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

    fn socket() -> io::Result<OwnedFd> {
        socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io::Error::from)
    }

    pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
        let fd = socket()?;
        socket::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(cid, port),
        )
        .map_err(io::Error::from)?;
        Ok(fd)
    }

    pub fn listen(port: u32) -> io::Result<OwnedFd> {
        let fd = socket()?;
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(nix::libc::VMADDR_CID_ANY, port),
        )
        .map_err(io::Error::from)?;
        socket::listen(&fd, socket::Backlog::new(4).map_err(io::Error::from)?)
            .map_err(io::Error::from)?;
        Ok(fd)
    }

    pub fn accept(listener: &File) -> io::Result<OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(io::Error::from)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}
