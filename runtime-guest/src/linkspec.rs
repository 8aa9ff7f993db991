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
    /// A serial device (raw, its stale input discarded at open).
    Serial(Async<File>),
    /// vsock sockets.
    Fd(Async<File>),
}

impl LinkStream {
    /// Whether this is a serial line, whose guest end announces itself after
    /// opening (the HELLOs sent before it opened were discarded).
    pub fn is_serial(&self) -> bool {
        matches!(self, Self::Serial(_))
    }
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
                Endpoint::Serial(path) => Ok(LinkStream::Serial(Async::new(serial::open(path)?)?)),
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

/// Serial devices: raw 8N1 at 115200 baud with the modem lines ignored and
/// no flow control (a hypervisor's serial port has no carrier and nobody to
/// send XON), opened without blocking and without becoming our controlling
/// terminal; what was queued before we opened it is stale and discarded.
pub mod serial {
    use super::*;
    use nix::sys::termios::{
        self, BaudRate, ControlFlags, FlushArg, InputFlags, SetArg, SpecialCharacterIndices,
        Termios,
    };
    use std::os::unix::fs::OpenOptionsExt;

    /// Opens a serial device for the link.
    pub fn open(path: &std::path::Path) -> io::Result<File> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)?;
        // A FIFO or a file (tests) has no line settings: use it as it is.
        if let Ok(mut t) = termios::tcgetattr(&file) {
            make_link_line(&mut t);
            termios::tcsetattr(&file, SetArg::TCSANOW, &t).map_err(io::Error::from)?;
            raise_rx_trigger(path);
            discard_stale_input(&file)?;
        }
        Ok(file)
    }

    /// Raw 8N1 at 115200, receiver on, modem lines ignored, no flow control.
    pub fn make_link_line(t: &mut Termios) {
        termios::cfmakeraw(t);
        t.control_flags |= ControlFlags::CLOCAL | ControlFlags::CREAD;
        t.control_flags &= !ControlFlags::CRTSCTS;
        t.input_flags &= !(InputFlags::IXON | InputFlags::IXOFF | InputFlags::IXANY);
        t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        let _ = termios::cfsetspeed(t, BaudRate::B115200);
    }

    /// Waits (at most `limit`) until what was written to the device has gone
    /// out of the line: bytes still in the kernel's buffer are lost when the
    /// machine powers off.
    pub fn drain(path: &std::path::Path, limit: std::time::Duration) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)
        else {
            return false;
        };
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(termios::tcdrain(&file).is_ok());
        });
        wait.recv_timeout(limit).unwrap_or(false)
    }

    /// Raises a 16550's receive FIFO trigger to its highest level (14 of
    /// 16 bytes; the kernel's default is 8). An emulated UART hands the guest
    /// one trigger's worth of bytes per interrupt and main-loop turn, so under
    /// QEMU/TCG this nearly doubles what the appliance can send per second (a
    /// key exchange's 1.2 KiB KEX_HYBRID_INIT among it); the tail of a
    /// message shorter than a trigger still arrives after the FIFO timeout of
    /// four character times. Clears the FIFO, so it comes before the discard
    /// of stale input. Devices without the setting are left as they are.
    fn raise_rx_trigger(path: &std::path::Path) {
        let Some(name) = std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
        else {
            return;
        };
        let knob = std::path::Path::new("/sys/class/tty")
            .join(name)
            .join("rx_trig_bytes");
        if knob.exists()
            && let Err(e) = std::fs::write(&knob, "14")
        {
            tracing::debug!("{}: {e}", knob.display());
        }
    }

    fn discard_stale_input(file: &File) -> io::Result<()> {
        termios::tcflush(file, FlushArg::TCIFLUSH).map_err(io::Error::from)
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    /// A pty pair stands in for the hypervisor's serial port: the slave is the
    /// guest's device, the master the appliance's end of the line.
    #[test]
    fn a_serial_link_over_a_pty_is_raw_discards_stale_input_and_syncs() {
        use nix::sys::termios::{ControlFlags, InputFlags, LocalFlags, OutputFlags, tcgetattr};
        use proto_core::link::{Frame, FrameKind, Initiator, Responder};
        use rand_core::SeedableRng;
        use std::time::{Duration, Instant};

        let pty = nix::pty::openpty(None, None).expect("openpty");
        let device = nix::unistd::ttyname(&pty.slave).expect("ttyname");
        let master = Async::new(File::from(pty.master)).expect("async master");
        let spec: LinkSpec = format!("serial:{}", device.display()).parse().unwrap();
        smol::block_on(async {
            // Left over from before the guest opened the line (HELLOs of a
            // connection nobody answered, a console's garbage).
            (&mut &master).write_all(b"stale bytes\n").await.unwrap();
            smol::Timer::after(Duration::from_millis(50)).await;

            let stream = Dialer::new(&spec).unwrap().open().await.unwrap();
            assert!(stream.is_serial());
            let t = tcgetattr(&pty.slave).unwrap();
            assert!(
                t.control_flags
                    .contains(ControlFlags::CLOCAL | ControlFlags::CREAD)
            );
            assert!(!t.control_flags.contains(ControlFlags::CRTSCTS));
            assert!(
                !t.input_flags
                    .intersects(InputFlags::IXON | InputFlags::IXOFF | InputFlags::ICRNL)
            );
            assert!(
                !t.local_flags
                    .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG)
            );
            assert!(!t.output_flags.contains(OutputFlags::OPOST));
            let LinkStream::Serial(dev) = &stream else {
                unreachable!()
            };
            let mut probe = [0u8; 64];
            assert_eq!(
                std::io::Read::read(&mut dev.get_ref(), &mut probe).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock),
                "stale input was discarded at open"
            );

            let guest = async {
                let mut responder =
                    Responder::new(Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)));
                responder.announce();
                (&mut &*dev)
                    .write_all(&responder.poll_transmit().unwrap())
                    .await
                    .unwrap();
                let mut buf = [0u8; 512];
                let after = loop {
                    let n = (&mut &*dev).read(&mut buf).await.unwrap();
                    let used = responder.handle_input(&buf[..n]);
                    if let Some(out) = responder.poll_transmit() {
                        (&mut &*dev).write_all(&out).await.unwrap();
                    }
                    if responder.is_synced() {
                        break buf[used..n].to_vec();
                    }
                };
                let every_byte: Vec<u8> = (0..=255).collect();
                (&mut &*dev).write_all(&every_byte).await.unwrap();
                let mut got = after;
                while got.len() < 256 {
                    let n = (&mut &*dev).read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                got
            };
            let appliance = async {
                let mut initiator = Initiator::new(
                    Instant::now(),
                    Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(2)),
                );
                // The HELLO sent when the connection came up is lost with the
                // stale input: only the ANNOUNCE gets the sync going.
                initiator.poll_transmit();
                let mut buf = [0u8; 512];
                let mut seen = Vec::new();
                let after = loop {
                    let n = (&mut &master).read(&mut buf).await.unwrap();
                    seen.extend_from_slice(&buf[..n]);
                    let used = initiator.handle_input(Instant::now(), &buf[..n]);
                    if let Some(out) = initiator.poll_transmit() {
                        (&mut &master).write_all(&out).await.unwrap();
                    }
                    if initiator.is_ready() {
                        break buf[used..n].to_vec();
                    }
                };
                // No retry was ever due (handle_timeout is never called): the
                // guest's ANNOUNCE got the HELLO that synced.
                let first_frame = seen
                    .windows(25)
                    .find_map(|w| Frame::decode(w.try_into().unwrap()));
                assert_eq!(first_frame.map(|f| f.kind), Some(FrameKind::Announce));
                let every_byte: Vec<u8> = (0..=255).collect();
                (&mut &master).write_all(&every_byte).await.unwrap();
                let mut got = after;
                while got.len() < 256 {
                    let n = (&mut &master).read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                got
            };
            let (at_guest, at_appliance) = futures_lite::future::zip(guest, appliance).await;
            let every_byte: Vec<u8> = (0..=255).collect();
            assert_eq!(
                at_guest, every_byte,
                "the line is 8-bit clean towards the guest"
            );
            assert_eq!(
                at_appliance, every_byte,
                "the line is 8-bit clean towards the appliance"
            );
        });
    }
}
