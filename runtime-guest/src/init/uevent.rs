//! Device events: the one kobject-uevent netlink listener, and the record of
//! the devices present, so a waiter that comes late still finds a device that
//! arrived early (the record starts from what sysfs shows when the listener
//! starts, so nothing that came before it is missed either). Every wait has a
//! deadline.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::future;
use smol::{Async, Timer};

/// How often a wait looks again without an event.
const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// One kernel device event (or a present device, read from sysfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `add`, `remove`, `change`, `move`, `online`, `offline`, `bind`, `unbind`.
    pub action: String,
    /// The device's path under `/sys`, e.g. `/devices/pci0000:00/.../block/vdb`.
    pub devpath: String,
    /// `block`, `net`, `cpu`, `memory`, `virtio`, ...
    pub subsystem: String,
    /// Every `KEY=value` the event carried.
    pub vars: BTreeMap<String, String>,
}

impl Uevent {
    /// Parses a kernel uevent message: `ACTION@DEVPATH\0KEY=value\0...`.
    /// Messages from udev (`libudev` header) and malformed ones are `None`.
    pub fn parse(msg: &[u8]) -> Option<Self> {
        let mut parts = msg.split(|&b| b == 0).filter(|p| !p.is_empty());
        let header = std::str::from_utf8(parts.next()?).ok()?;
        let (_, header_path) = header.split_once('@')?;
        let mut vars = BTreeMap::new();
        for part in parts {
            let Ok(text) = std::str::from_utf8(part) else {
                continue;
            };
            if let Some((k, v)) = text.split_once('=') {
                vars.insert(k.to_owned(), v.to_owned());
            }
        }
        let action = vars.get("ACTION")?.clone();
        let devpath = vars
            .get("DEVPATH")
            .cloned()
            .unwrap_or_else(|| header_path.to_owned());
        let subsystem = vars.get("SUBSYSTEM").cloned().unwrap_or_default();
        Some(Self {
            action,
            devpath,
            subsystem,
            vars,
        })
    }

    /// A present device as sysfs describes it (its `uevent` file), as if it
    /// had just been added.
    pub fn present(devpath: &str, subsystem: &str, uevent_file: &str) -> Self {
        let vars = uevent_file
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            action: "add".into(),
            devpath: devpath.into(),
            subsystem: subsystem.into(),
            vars,
        }
    }

    /// A variable's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// The device node's name under /dev (`vdb`), if it has one.
    pub fn devname(&self) -> Option<&str> {
        self.get("DEVNAME").filter(|n| !n.is_empty())
    }
}

/// The devices present, kept from events (Kata's uevent map).
#[derive(Default)]
pub struct Devices {
    record: RefCell<BTreeMap<String, Uevent>>,
    changed: Event,
}

impl Devices {
    /// An empty record.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Takes an event into the record (a removal forgets the device) and wakes
    /// the waiters.
    pub fn apply(&self, event: Uevent) {
        {
            let mut record = self.record.borrow_mut();
            if event.action == "remove" {
                record.remove(&event.devpath);
            } else {
                record.insert(event.devpath.clone(), event);
            }
        }
        self.changed.notify(usize::MAX);
    }

    /// The first recorded device that `matches`.
    pub fn find(&self, mut matches: impl FnMut(&Uevent) -> bool) -> Option<Uevent> {
        self.record.borrow().values().find(|e| matches(e)).cloned()
    }

    /// Wakes the waiters without an event (something else they watch changed).
    pub fn poke(&self) {
        self.changed.notify(usize::MAX);
    }

    /// Waits until `check` gives a value, trying it now and after every event,
    /// at most for `timeout`. `check` may consult the record or anything else
    /// a device event changes (sysfs, /dev).
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let listener = self.changed.listen();
            if let Some(v) = check(self) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Look again now and then even without an event: sysfs may change
            // without one reaching us (the listener could not start, say).
            let next_look = (Instant::now() + RECHECK_EVERY).min(deadline);
            future::or(
                async {
                    listener.await;
                },
                async {
                    Timer::at(next_look).await;
                },
            )
            .await;
        }
    }

    /// Records the block and network devices sysfs shows now (`sys` is
    /// `/sys`): the ones that came before the listener.
    pub fn record_present(&self, sys: &Path) {
        let sys = std::fs::canonicalize(sys).unwrap_or_else(|_| sys.to_path_buf());
        for subsystem in ["block", "net"] {
            let Ok(entries) = std::fs::read_dir(sys.join("class").join(subsystem)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(real) = std::fs::canonicalize(entry.path()) else {
                    continue;
                };
                let Ok(devpath) = real.strip_prefix(&sys) else {
                    continue;
                };
                let text = std::fs::read_to_string(real.join("uevent")).unwrap_or_default();
                let devpath = format!("/{}", devpath.display());
                let present = Uevent::present(&devpath, subsystem, &text);
                self.record.borrow_mut().entry(devpath).or_insert(present);
            }
        }
        self.changed.notify(usize::MAX);
    }
}

/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;
/// Receive buffer: a boot's burst of events must not overflow it.
const RECEIVE_BUFFER: usize = 4 << 20;

/// The netlink socket the kernel sends device events to.
pub struct UeventSocket {
    socket: Async<OwnedFd>,
}

impl UeventSocket {
    /// Opens and binds the socket (events from now on queue in it).
    pub fn open() -> io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, setsockopt, socket,
            sockopt,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(io::Error::from)?;
        // Root may exceed rmem_max; if not, the default still works.
        if setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER);
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP)).map_err(io::Error::from)?;
        Ok(Self {
            socket: Async::new(fd)?,
        })
    }

    /// The next message: `Ok(None)` for one to skip (not from the kernel,
    /// not a uevent); `Err` with `ENOBUFS` when events were lost.
    pub async fn next(&self) -> io::Result<Option<Uevent>> {
        use nix::sys::socket::{NetlinkAddr, recvfrom};
        let mut buf = vec![0u8; 16 * 1024];
        let (n, from) = self
            .socket
            .read_with(|fd| {
                recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf).map_err(io::Error::from)
            })
            .await?;
        // Only the kernel (port 0) speaks with authority about devices.
        if from.is_some_and(|a| a.pid() != 0) {
            return Ok(None);
        }
        Ok(Uevent::parse(&buf[..n]))
    }
}

/// Runs forever: records each event, then hands it to `on_event` (hotplug).
/// When the kernel dropped events (the socket overflowed), what sysfs shows
/// is recorded again.
pub async fn listen(
    socket: UeventSocket,
    devices: Rc<Devices>,
    sys: &Path,
    mut on_event: impl FnMut(&Uevent),
) -> io::Error {
    loop {
        match socket.next().await {
            Ok(Some(event)) => {
                devices.apply(event.clone());
                on_event(&event);
            }
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                tracing::warn!("device events were lost (socket overflow); rescanning sysfs");
                devices.record_present(sys);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(parts: &[&str]) -> Vec<u8> {
        let mut m = Vec::new();
        for p in parts {
            m.extend_from_slice(p.as_bytes());
            m.push(0);
        }
        m
    }

    fn disk(action: &str, name: &str) -> Uevent {
        Uevent::parse(&msg(&[
            &format!("{action}@/devices/pci0000:00/0000:00:04.0/virtio2/block/{name}"),
            &format!("ACTION={action}"),
            &format!("DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio2/block/{name}"),
            "SUBSYSTEM=block",
            &format!("DEVNAME={name}"),
            "DEVTYPE=disk",
            "SEQNUM=1042",
        ]))
        .unwrap()
    }

    #[test]
    fn a_kernel_message_is_parsed() {
        let e = disk("add", "vdb");
        assert_eq!(e.action, "add");
        assert_eq!(e.subsystem, "block");
        assert_eq!(e.devname(), Some("vdb"));
        assert_eq!(
            e.devpath,
            "/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb"
        );
        assert_eq!(e.get("SEQNUM"), Some("1042"));
    }

    #[test]
    fn udev_and_garbage_messages_are_skipped() {
        assert_eq!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(Uevent::parse(b""), None);
        assert_eq!(Uevent::parse(&msg(&["add@/x", "SUBSYSTEM=block"])), None);
        // A cpu event: no DEVNAME.
        let cpu = Uevent::parse(&msg(&[
            "add@/devices/system/cpu/cpu3",
            "ACTION=add",
            "DEVPATH=/devices/system/cpu/cpu3",
            "SUBSYSTEM=cpu",
        ]))
        .unwrap();
        assert_eq!(cpu.devname(), None);
    }

    #[test]
    fn a_late_waiter_sees_a_device_that_arrived_early() {
        let devices = Devices::new();
        devices.apply(disk("add", "vdb"));
        let found = smol::block_on(devices.wait_until(Duration::from_millis(10), |d| {
            d.find(|e| e.devname() == Some("vdb"))
        }));
        assert!(found.is_some());
    }

    #[test]
    fn a_waiter_wakes_when_its_device_arrives_and_gives_up_at_its_deadline() {
        let devices = Devices::new();
        let ex = smol::LocalExecutor::new();
        smol::block_on(ex.run(async {
            let d = devices.clone();
            ex.spawn(async move {
                Timer::after(Duration::from_millis(20)).await;
                d.apply(disk("add", "vdc"));
            })
            .detach();
            let t0 = Instant::now();
            let found = devices
                .wait_until(Duration::from_secs(5), |d| {
                    d.find(|e| e.devname() == Some("vdc"))
                })
                .await;
            assert!(found.is_some() && t0.elapsed() < Duration::from_secs(1));
            let t0 = Instant::now();
            let none = devices
                .wait_until(Duration::from_millis(50), |d| {
                    d.find(|e| e.devname() == Some("vdz"))
                })
                .await;
            assert!(none.is_none() && t0.elapsed() >= Duration::from_millis(50));
        }));
    }

    #[test]
    fn a_removed_device_is_forgotten() {
        let devices = Devices::new();
        devices.apply(disk("add", "vdb"));
        devices.apply(disk("remove", "vdb"));
        assert!(devices.find(|e| e.devname() == Some("vdb")).is_none());
    }

    #[test]
    fn present_devices_are_read_from_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let dev = sys
            .path()
            .join("devices/pci0000:00/0000:00:04.0/virtio2/block/vdb");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(
            dev.join("uevent"),
            "MAJOR=254\nMINOR=16\nDEVNAME=vdb\nDEVTYPE=disk\n",
        )
        .unwrap();
        std::fs::create_dir_all(sys.path().join("class/block")).unwrap();
        std::os::unix::fs::symlink(
            "../../devices/pci0000:00/0000:00:04.0/virtio2/block/vdb",
            sys.path().join("class/block/vdb"),
        )
        .unwrap();
        let devices = Devices::new();
        devices.record_present(sys.path());
        let vdb = devices.find(|e| e.devname() == Some("vdb")).unwrap();
        assert_eq!(
            vdb.devpath,
            "/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb"
        );
        assert_eq!(
            (vdb.subsystem.as_str(), vdb.action.as_str()),
            ("block", "add")
        );
    }
}
