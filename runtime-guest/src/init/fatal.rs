//! Fatal errors: PID 1 never panics out and never returns. A panic, or an
//! error it cannot run past (a bad config included), is written to the
//! console and reported on the link, then the machine powers off.
//!
//! On the link: while no SSH connection runs, as a link-sync FATAL frame
//! (docs/PROTOCOL.md 2.1); once SSH runs, as a DISCONNECT whose description
//! starts with `tether: fatal: ` ([`FatalNotice`], which the link task obeys).

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::future;

use super::{console, power};
use crate::linkspec::{Endpoint, LinkSpec};

/// Where a fatal error is reported: the configured link once known.
static REPORT_LINK: Mutex<Option<LinkSpec>> = Mutex::new(None);
/// Set by the first fatal error: a second one (a panic while dying) goes
/// straight to power-off.
static DYING: AtomicBool = AtomicBool::new(false);
/// How long processes have to stop after a fatal error.
const FATAL_GRACE: Duration = Duration::from_secs(1);
/// How many times a FATAL frame is written on a serial line, and how far
/// apart.
const SERIAL_REPEATS: usize = 3;
const SERIAL_REPEAT_GAP: Duration = Duration::from_millis(250);
/// Longest a FATAL frame may take to go out.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes `link` the place fatal errors are reported.
pub fn report_on(link: &LinkSpec) {
    if let Ok(mut l) = REPORT_LINK.lock() {
        *l = Some(link.clone());
    }
}

/// Turns every panic, on any thread, into [`die`].
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        die(&format!("panic{at}: {message}"));
    }));
}

/// Reports `reason` on the console and the link, then powers off.
pub fn die(reason: &str) -> ! {
    if DYING.swap(true, Ordering::SeqCst) {
        console::write_line(&format!("tether: fatal while dying: {reason}"));
        power::power_off(Duration::ZERO);
    }
    console::write_line(&format!("tether: fatal: {reason}"));
    let link = REPORT_LINK.lock().ok().and_then(|l| l.clone());
    if let Some(link) = link
        && link.sync
        && let Err(e) = send_fatal_frame(&link, reason)
    {
        console::write_line(&format!("tether: cannot report it on the link {link}: {e}"));
    }
    power::power_off(FATAL_GRACE)
}

/// Writes a FATAL frame on the link: on its serial line, or over a new TCP
/// connection to the appliance. Other links carry no link sync.
pub fn send_fatal_frame(link: &LinkSpec, reason: &str) -> io::Result<()> {
    let frame = proto_core::link::fatal_frame(reason);
    match &link.endpoint {
        Endpoint::Serial(path) => {
            let line = crate::linkspec::serial::open(path)?;
            // A serial bridge that is not connected at the moment drops what
            // is written: say it more than once (docs/PROTOCOL.md 2.1).
            for n in 0..SERIAL_REPEATS {
                if n > 0 {
                    std::thread::sleep(SERIAL_REPEAT_GAP);
                }
                write_all_within(&line, &frame, SEND_TIMEOUT)?;
                nix::sys::termios::tcdrain(&line).map_err(io::Error::from)?;
            }
            Ok(())
        }
        Endpoint::Tcp(addr) => {
            use std::net::ToSocketAddrs;
            let to = addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "resolves to nothing"))?;
            let mut s = std::net::TcpStream::connect_timeout(&to, SEND_TIMEOUT)?;
            s.set_write_timeout(Some(SEND_TIMEOUT))?;
            s.write_all(&frame)?;
            // Let the appliance read it before the close tears the link down.
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `write_all` on a non-blocking descriptor, bounded in time.
fn write_all_within(mut f: &std::fs::File, mut buf: &[u8], limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    while !buf.is_empty() {
        match f.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A fatal error on its way to the appliance over a running SSH connection.
/// PID 1 raises it; a link task that has an SSH connection sends
/// `SSH_MSG_DISCONNECT` (BY_APPLICATION) with [`Self::disconnect_description`]
/// and calls [`Self::mark_delivered`] once it is written. Raising it also
/// wakes the link tasks (through the guest's `changed` event, by the caller).
#[derive(Default)]
pub struct FatalNotice {
    reason: RefCell<Option<String>>,
    delivered: Cell<bool>,
    event: Event,
}

impl FatalNotice {
    /// Records the reason (the first one stays).
    pub fn raise(&self, reason: &str) {
        self.reason
            .borrow_mut()
            .get_or_insert_with(|| reason.to_owned());
    }

    /// The DISCONNECT description to send, once raised.
    pub fn disconnect_description(&self) -> Option<String> {
        self.reason
            .borrow()
            .as_ref()
            .map(|r| format!("tether: fatal: {r}"))
    }

    /// A link task wrote the DISCONNECT.
    pub fn mark_delivered(&self) {
        self.delivered.set(true);
        self.event.notify(usize::MAX);
    }

    /// Waits until a link task delivered it, at most `timeout`.
    pub async fn wait_delivered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let listener = self.event.listen();
            if self.delivered.get() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            future::or(
                async {
                    listener.await;
                },
                async {
                    smol::Timer::at(deadline).await;
                },
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto_core::link::Initiator;
    use rand_core::SeedableRng;
    use std::io::Read;

    #[test]
    fn a_fatal_frame_reaches_an_appliance_listening_on_tcp() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link: LinkSpec = format!("tcp:{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let sender =
            std::thread::spawn(move || send_fatal_frame(&link, "config sessions: required"));
        let (mut conn, _) = listener.accept().unwrap();
        let mut appliance = Initiator::new(
            Instant::now(),
            Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
        );
        let mut buf = [0u8; 256];
        while appliance.fatal().is_none() {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the frame arrived");
            appliance.handle_input(Instant::now(), &buf[..n]);
        }
        assert_eq!(appliance.fatal(), Some("config sessions: required"));
        sender.join().unwrap().unwrap();
    }

    #[test]
    fn a_fatal_frame_goes_out_on_a_serial_line() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let device = nix::unistd::ttyname(&pty.slave).unwrap();
        let link: LinkSpec = format!("serial:{}", device.display()).parse().unwrap();
        send_fatal_frame(&link, "no root filesystem").unwrap();
        let mut master = std::fs::File::from(pty.master);
        let mut appliance = Initiator::new(
            Instant::now(),
            Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
        );
        // The frame, said SERIAL_REPEATS times.
        let frame = proto_core::link::fatal_frame("no root filesystem");
        let mut got = vec![0u8; frame.len() * SERIAL_REPEATS];
        master.read_exact(&mut got).unwrap();
        assert_eq!(got, frame.repeat(SERIAL_REPEATS));
        appliance.handle_input(Instant::now(), &got);
        assert_eq!(appliance.fatal(), Some("no root filesystem"));
    }

    #[test]
    fn the_notice_keeps_the_first_reason_and_reports_delivery() {
        let notice = FatalNotice::default();
        assert_eq!(notice.disconnect_description(), None);
        notice.raise("reaper ended");
        notice.raise("later");
        assert_eq!(
            notice.disconnect_description().as_deref(),
            Some("tether: fatal: reaper ended")
        );
        assert!(!smol::block_on(
            notice.wait_delivered(Duration::from_millis(10))
        ));
        notice.mark_delivered();
        assert!(smol::block_on(
            notice.wait_delivered(Duration::from_secs(1))
        ));
    }
}
