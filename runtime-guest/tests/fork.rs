//! The guest's fork end to end in one process (no VM, not PID 1, so the OS
//! steps are skipped): a real `Guest` with a running session, its identity
//! in a file standing in for QEMU's fw_cfg, and an appliance (proto-core's
//! `ApplianceLink`) on a unix socket the guest dials. Quiesce stops the
//! output and ends the link, the next link is refused sessions until
//! `resume`; a changed generation makes the guest a child that renames
//! itself and announces itself with `forked@tether`.
//!
//! Its own test binary (its own process): a serving guest reaps every
//! child of its process (`waitpid(-1)`, as PID 1 must), which in a shared
//! test process took other tests' children (a `losetup` whose status was
//! lost left its loop device attached).

use std::os::unix::net::{UnixListener, UnixStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use link_driver::Link;
use proto_core::outbox::Transmit;
use proto_core::tether::{ApplianceEvent, ApplianceLink, ContainerInfo, ForkMode, Open, State};
use proto_core::{ClientConfig, HostKeyPolicy, PrivateKey};
use smol::{Async, LocalExecutor, Timer};

use runtime_guest::config::Config;
use runtime_guest::fork::{ForkState, Qemu};
use runtime_guest::guest::Guest;

/// What the test asks of the appliance side.
enum Cmd {
    Fork(ForkMode),
    Open(Open),
    List,
}

/// An `ApplianceLink` whose events go to the test.
struct Appliance {
    link: ApplianceLink,
    events: async_channel::Sender<ApplianceEvent>,
}

impl Transmit for Appliance {
    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.link.poll_transmit()
    }
    fn has_transmit(&self) -> bool {
        self.link.has_transmit()
    }
}

impl Link for Appliance {
    type Wake = Cmd;

    fn handle_input(&mut self, now: Instant, data: BytesMut) -> proto_core::Result<()> {
        self.link.handle_input_bytes(now, data)
    }
    fn handle_timeout(&mut self, now: Instant) -> proto_core::Result<()> {
        self.link.handle_timeout(now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }
    fn close_reason(&self) -> Option<&proto_core::Error> {
        self.link.close_reason()
    }
    fn work(&mut self) {
        while let Some(e) = self.link.poll_event() {
            let _ = self.events.try_send(e);
        }
    }
    fn woken(&mut self, cmd: Cmd) {
        let _ = match cmd {
            Cmd::Fork(mode) => self.link.fork(mode),
            Cmd::Open(what) => self.link.open(what).map(drop),
            Cmd::List => self.link.list().map(drop),
        };
    }
}

/// One connection from the guest, seen from the appliance.
struct Conn {
    cmds: async_channel::Sender<Cmd>,
    events: async_channel::Receiver<ApplianceEvent>,
    /// The link's end (`PeerDisconnected` and its description, say).
    ended: async_channel::Receiver<String>,
}

impl Conn {
    fn send(&self, cmd: Cmd) {
        self.cmds.try_send(cmd).unwrap();
    }

    /// The next event that `pick` takes, within 10 s.
    async fn wait<T>(&self, what: &str, mut pick: impl FnMut(ApplianceEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let next = future::or(async { self.events.recv().await.ok() }, async {
                Timer::at(deadline).await;
                None
            })
            .await;
            match next {
                Some(e) => {
                    if let Some(t) = pick(e) {
                        return t;
                    }
                }
                None => panic!("no {what} within 10 s"),
            }
        }
    }

    /// Sends `fork@tether`; the reply's success and generation.
    async fn fork(&self, mode: ForkMode) -> (bool, Option<u64>) {
        self.send(Cmd::Fork(mode));
        self.wait("fork reply", |e| match e {
            ApplianceEvent::Fork {
                mode: m,
                success,
                generation,
            } if m == mode => Some((success, generation)),
            _ => None,
        })
        .await
    }

    async fn list(&self) -> Vec<ContainerInfo> {
        self.send(Cmd::List);
        self.wait("container list", |e| match e {
            ApplianceEvent::Containers {
                list,
                reply: Some(_),
            } => Some(list),
            _ => None,
        })
        .await
    }
}

const APPLIANCE_KEY: [u8; 32] = [5; 32];
const HOST_KEY: [u8; 32] = [4; 32];

/// Accepts the guest's next connection and drives an appliance over it.
async fn accept(ex: &LocalExecutor<'static>, listener: &Async<UnixListener>) -> Conn {
    let (stream, _) = future::or(async { Some(listener.accept().await.unwrap()) }, async {
        Timer::after(Duration::from_secs(10)).await;
        None
    })
    .await
    .expect("the guest dials within 10 s");
    let stream: Async<UnixStream> = stream;
    let config = proto_core::Config::client(ClientConfig {
        user: "tetherd".into(),
        key: Some(PrivateKey::from_seed(APPLIANCE_KEY)),
        host_keys: HostKeyPolicy::Pinned(vec![*PrivateKey::from_seed(HOST_KEY).public()]),
    });
    let (events_tx, events) = async_channel::unbounded();
    let (cmds, cmd_rx) = async_channel::unbounded();
    let (end_tx, ended) = async_channel::unbounded();
    let mut side = Appliance {
        link: ApplianceLink::new(config, Instant::now(), link_driver::rng()),
        events: events_tx,
    };
    ex.spawn(async move {
        let wake = || {
            let rx = cmd_rx.clone();
            async move {
                match rx.recv().await {
                    Ok(c) => c,
                    Err(_) => future::pending().await,
                }
            }
        };
        let end = link_driver::drive(&stream, &mut side, BytesMut::new(), wake).await;
        let why = side.link.close_reason().map(|e| e.to_string());
        let _ = end_tx.try_send(why.unwrap_or_else(|| end.to_string()));
    })
    .detach();
    let conn = Conn {
        cmds,
        events,
        ended,
    };
    conn.wait("authentication", |e| {
        (e == ApplianceEvent::Authenticated).then_some(())
    })
    .await;
    conn
}

fn identity(json: &str) -> Vec<u8> {
    let mut b = json.as_bytes().to_vec();
    b.resize(fork::IDENTITY_SIZE, b' ');
    b
}

fn config(socket: &std::path::Path) -> Config {
    let v = serde_json::json!({
        "id": "web",
        "host_key": PrivateKey::from_seed(HOST_KEY).to_openssh("web"),
        "authorized_keys": [PrivateKey::from_seed(APPLIANCE_KEY).public().to_openssh()],
        "link": format!("unix:{}", socket.display()),
        "fork_timeout": "30s",
        "sessions": [{"id": "web", "cmd": ["/bin/sh", "-c", "while :; do echo tick; sleep 0.02; done"]}],
    });
    Config::parse(&v.to_string(), None).unwrap()
}

/// The primary's output end, from a fresh list.
async fn output_end(conn: &Conn, id: &str) -> u64 {
    let list = conn.list().await;
    list.iter().find(|c| c.id == id).expect("listed").output_end
}

#[test]
fn quiesce_stops_and_resume_continues_and_a_new_generation_makes_a_child() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("link");
    let id_path = dir.path().join("identity");
    std::fs::write(&id_path, identity(r#"{"generation": 1}"#)).unwrap();
    let ex = Rc::new(LocalExecutor::new());
    let fork = ForkState::with_backend(
        Some(Box::new(Qemu {
            path: id_path.clone(),
        })),
        false,
    );
    assert_eq!(fork.generation(), Some(1));
    let guest = Guest::with_fork(config(&socket), ex.clone(), fork);
    let listener = Async::new(UnixListener::bind(&socket).unwrap()).unwrap();
    let (ex2, g2) = (ex.clone(), guest.clone());
    let serving = ex.spawn(async move { runtime_guest::serve_guest(&ex2, g2, false).await });
    let body = async {
        let conn = accept(&ex, &listener).await;
        let running = output_end(&conn, "web").await;
        Timer::after(Duration::from_millis(100)).await;
        assert!(output_end(&conn, "web").await > running, "the session runs");

        // Quiesce: SUCCESS with the generation, then the DISCONNECT.
        assert_eq!(conn.fork(ForkMode::Quiesce).await, (true, Some(1)));
        let end = conn.ended.recv().await.unwrap();
        assert!(end.contains("tether: quiesced for fork"), "{end}");

        // The parent's next link: stopped output, sessions refused.
        let conn = accept(&ex, &listener).await;
        let stopped = output_end(&conn, "web").await;
        Timer::after(Duration::from_millis(200)).await;
        assert_eq!(
            output_end(&conn, "web").await,
            stopped,
            "stopped while quiesced"
        );
        conn.send(Cmd::Open(Open::Exec {
            command: "true".into(),
            tty: None,
            env: Vec::new(),
        }));
        let refused = conn
            .wait("refusal", |e| match e {
                ApplianceEvent::OpenFailed { reason, .. } => Some(reason),
                _ => None,
            })
            .await;
        assert_eq!(refused, "quiesced for fork");
        assert_eq!(conn.fork(ForkMode::Resume).await, (true, None));
        Timer::after(Duration::from_millis(200)).await;
        assert!(output_end(&conn, "web").await > stopped, "running again");

        // Quiesce again; this time the VM is "cloned": a new generation.
        assert_eq!(conn.fork(ForkMode::Quiesce).await, (true, Some(1)));
        conn.ended.recv().await.unwrap();
        let nonce = "ab".repeat(32);
        std::fs::write(
            &id_path,
            identity(&format!(
                r#"{{"generation": 2, "parent": "web", "id": "web-1", "child": 1, "hostname": "web-1", "nonce": "{nonce}"}}"#
            )),
        )
        .unwrap();
        let conn = accept(&ex, &listener).await;
        let forked = conn
            .wait("forked@tether", |e| match e {
                ApplianceEvent::Forked(f) => Some(f),
                _ => None,
            })
            .await;
        assert_eq!(
            (
                forked.parent_id.as_str(),
                forked.new_id.as_str(),
                forked.generation
            ),
            ("web", "web-1", 2)
        );
        assert_eq!(forked.failure, "");
        assert!(
            forked.recovery_us > 0 && forked.recovery_us < 10_000_000,
            "{}",
            forked.recovery_us
        );
        let list = conn.list().await;
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].id.as_str(), list[0].state),
            ("web-1", State::Running)
        );
        let child = list[0].output_end;
        Timer::after(Duration::from_millis(200)).await;
        assert!(
            output_end(&conn, "web-1").await > child,
            "the child's session runs"
        );
        assert_eq!(guest.fork.generation(), Some(2));
    };
    smol::block_on(ex.run(future::or(body, async {
        let _ = serving.await;
        panic!("the guest stopped serving");
    })));
    guest.sessions.borrow_mut().set_quiesced(false);
    smol::block_on(ex.run(guest.stop_all(Duration::from_secs(1))));
}
