//! The VM manager with a scripted backend: no QEMU, VMs that exit when told.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU32, Ordering};

use event_listener::Event;

use super::*;
use crate::node::guest_config::is_hostname;
use crate::vm::{Accel, Qmp, VmFuture};

struct FakeVm {
    pid: u32,
    exit: Mutex<Option<VmExit>>,
    changed: Event,
}

impl FakeVm {
    fn exit_with(&self, exit: VmExit) {
        *self.exit.lock().unwrap() = Some(exit);
        self.changed.notify(usize::MAX);
    }
}

impl Vm for FakeVm {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn try_wait(&self) -> Option<VmExit> {
        *self.exit.lock().unwrap()
    }
    fn wait(&self) -> VmFuture<'_, VmExit> {
        Box::pin(async move {
            loop {
                let l = self.changed.listen();
                if let Some(e) = self.try_wait() {
                    return e;
                }
                l.await;
            }
        })
    }
    fn kill(&self) -> Result<(), VmError> {
        if self.try_wait().is_none() {
            self.exit_with(VmExit {
                code: None,
                signal: Some(9),
            });
        }
        Ok(())
    }
    fn qmp(&self) -> VmFuture<'_, Result<Qmp, VmError>> {
        Box::pin(async { Err(VmError::Unavailable("a fake VM has no QMP".into())) })
    }
}

/// Boots `FakeVm`s (or fails, when `fail` is set), remembering them.
#[derive(Default)]
struct FakeBackend {
    fail: bool,
    next_pid: AtomicU32,
    started: Mutex<Vec<(VmSpec, Arc<FakeVm>)>>,
}

/// Lets `Box<dyn Vm>` share the fake the test keeps.
struct Shared(Arc<FakeVm>);

impl Vm for Shared {
    fn pid(&self) -> u32 {
        self.0.pid()
    }
    fn try_wait(&self) -> Option<VmExit> {
        self.0.try_wait()
    }
    fn wait(&self) -> VmFuture<'_, VmExit> {
        self.0.wait()
    }
    fn kill(&self) -> Result<(), VmError> {
        self.0.kill()
    }
    fn qmp(&self) -> VmFuture<'_, Result<Qmp, VmError>> {
        self.0.qmp()
    }
}

impl VmBackend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn accel(&self) -> Accel {
        Accel::Tcg
    }
    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmFuture<'a, Result<Box<dyn Vm>, VmError>> {
        Box::pin(async move {
            if self.fail {
                return Err(VmError::StartFailed {
                    exit: VmExit {
                        code: Some(1),
                        signal: None,
                    },
                    log: "qemu: bad option".into(),
                });
            }
            let vm = Arc::new(FakeVm {
                pid: 1000 + self.next_pid.fetch_add(1, Ordering::Relaxed),
                exit: Mutex::new(None),
                changed: Event::new(),
            });
            self.started
                .lock()
                .unwrap()
                .push((spec.clone(), vm.clone()));
            Ok(Box::new(Shared(vm)) as Box<dyn Vm>)
        })
    }
}

struct Setup {
    dir: tempfile::TempDir,
    vms: Arc<Vms>,
    backend: Arc<FakeBackend>,
    key: PrivateKey,
}

fn setup(fail: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = PrivateKey::from_seed([9; 32]);
    let appliance = Appliance::new(key.clone(), Some(HashMap::new()));
    let backend = Arc::new(FakeBackend {
        fail,
        ..Default::default()
    });
    let settings = VmSettings {
        state_dir: dir.path().into(),
        link: "127.0.0.1:2377".parse().unwrap(),
        qemu: "qemu-system-x86_64".into(),
        accel: AccelChoice::Fixed(Accel::Tcg),
        kernel: None,
        initrd: None,
        shm_dir: dir.path().join("shm"),
    };
    let vms = Vms::with_backend(
        settings,
        appliance,
        *key.public(),
        backend.clone(),
        BootFiles {
            kernel: "/boot/vmlinuz".into(),
            initrd: "/cache/initramfs.cpio.gz".into(),
        },
    );
    Setup {
        dir,
        vms: Arc::new(vms),
        backend,
        key,
    }
}

fn request(name: &str, cmd: &[&str]) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn started(s: &Setup, i: usize) -> (VmSpec, Arc<FakeVm>) {
    s.backend.started.lock().unwrap()[i].clone()
}

#[test]
fn create_writes_a_private_guest_config_and_boots_the_vm() {
    let s = setup(false);
    smol::block_on(async {
        let mut req = request("web", &["sh", "-c", "echo hi"]);
        req.env.insert("A".into(), "1".into());
        req.net = NetMode::User;
        req.cpus = Some(2);
        let created = s.vms.create(req).await.unwrap();
        assert_eq!(created.id, "web");
        assert_eq!(created.accel, "tcg");
        let (spec, _) = started(&s, 0);
        let dir = s.dir.path().join("vms/web");
        assert_eq!(spec.dir, dir);
        assert_eq!(spec.cpus, 2);
        assert_eq!(spec.link.to_string(), "127.0.0.1:2377");
        assert_eq!(spec.nics.len(), 1);
        let mode = fs::metadata(dir.join("config.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the config holds the guest's private key"
        );
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["id"], "web");
        assert_eq!(config["link"], "serial:/dev/ttyS0");
        assert_eq!(config["exit_linger"], "5s");
        assert_eq!(config["sessions"][0]["cmd"][2], "echo hi");
        assert_eq!(config["sessions"][0]["env"]["A"], "1");
        assert_eq!(config["sessions"][0]["stdin"], false);
        assert_eq!(config["networks"][0]["gateway"], "10.0.2.2");
        assert_eq!(
            config["authorized_keys"][0],
            s.key.public().to_openssh().as_str()
        );
        let host_key = PrivateKey::from_openssh(config["host_key"].as_str().unwrap()).unwrap();
        let pinned = fs::read_to_string(dir.join("guest.pub")).unwrap();
        assert_eq!(pinned.trim(), host_key.public().to_openssh());
        let node = s.vms.node().await.unwrap();
        assert_eq!(
            (node.vms_running, node.vm_cpus, node.vm_memory_mib),
            (1, 2, 256)
        );
        assert_eq!(node.vms[0].state, "booting");
        assert_eq!(node.accel, "tcg");
    });
}

#[test]
fn a_name_in_use_is_a_conflict_until_removed() {
    let s = setup(false);
    smol::block_on(async {
        s.vms.create(request("dup", &["true"])).await.unwrap();
        let err = s.vms.create(request("dup", &["true"])).await.unwrap_err();
        assert_eq!(err.status(), 409, "{err}");
        let err = s.vms.remove("dup", false).await.unwrap_err();
        assert_eq!(err.status(), 409, "a running VM needs force: {err}");
        let removed = s.vms.remove("dup", true).await.unwrap();
        assert!(removed.killed);
        assert!(!s.dir.path().join("vms/dup").exists());
        s.vms.create(request("dup", &["true"])).await.unwrap();
    });
}

#[test]
fn stop_kills_a_guest_that_does_not_power_off_and_rm_then_removes_it() {
    let s = setup(false);
    smol::block_on(async {
        s.vms
            .create(request("stubborn", &["sleep", "1000"]))
            .await
            .unwrap();
        let reply = s
            .vms
            .stop("stubborn", Duration::from_millis(100))
            .await
            .unwrap();
        assert!(reply.killed);
        assert_eq!(reply.exit.signal, Some(9));
        let node = s.vms.node().await.unwrap();
        assert_eq!(node.vms_running, 0);
        assert_eq!(node.vms[0].state, "exited");
        assert!(!s.vms.remove("stubborn", false).await.unwrap().killed);
        let err = s.vms.stop("stubborn", Duration::ZERO).await.unwrap_err();
        assert_eq!(err.status(), 404);
    });
}

#[test]
fn an_auto_removed_vm_leaves_no_files_once_it_exits() {
    let s = setup(false);
    smol::block_on(async {
        let mut req = request("temp", &["true"]);
        req.auto_remove = true;
        s.vms.create(req).await.unwrap();
        let dir = s.dir.path().join("vms/temp");
        assert!(dir.exists());
        let (_, vm) = started(&s, 0);
        vm.exit_with(VmExit {
            code: Some(0),
            signal: None,
        });
        for _ in 0..100 {
            if !dir.exists() {
                break;
            }
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        assert!(!dir.exists());
        assert!(s.vms.node().await.unwrap().vms.is_empty());
        // A late attach still learns the VM exited.
        assert!(s.vms.watch("temp").is_some());
        // And the name is free again at once.
        s.vms.create(request("temp", &["true"])).await.unwrap();
    });
}

#[test]
fn a_vm_that_fails_to_start_frees_its_name() {
    let s = setup(true);
    smol::block_on(async {
        let err = s
            .vms
            .create(request("broken", &["true"]))
            .await
            .unwrap_err();
        assert_eq!(err.status(), 500);
        assert!(err.to_string().contains("qemu: bad option"), "{err}");
        assert!(s.vms.node().await.unwrap().vms.is_empty());
    });
}

#[test]
fn generated_ids_and_macs() {
    let id = generated_id();
    assert!(super::super::request::check_id(&id).is_ok(), "{id}");
    assert_ne!(generated_id(), id);
    assert_eq!(mac_for("web"), mac_for("web"));
    assert!(mac_for("web").starts_with("52:54:00:"));
    assert!(is_hostname("web-1") && !is_hostname("web_1") && !is_hostname("-x"));
}

#[test]
fn a_booted_vm_gets_its_ram_file_identity_and_vmgenid_and_its_ram_file_goes_with_it() {
    let s = setup(false);
    smol::block_on(async {
        let mut req = request("web", &["sh"]);
        req.net = NetMode::User;
        s.vms.create(req).await.unwrap();
        let (spec, vm) = started(&s, 0);
        assert!(spec.memory.shared && !spec.incoming);
        let name = spec.memory.path.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("tetherd-web-"), "{name}");
        assert_eq!(
            spec.memory.path.parent(),
            Some(s.dir.path().join("shm").as_path())
        );
        let identity = ::fork::Identity::parse(&fs::read(&spec.identity).unwrap()).unwrap();
        assert_eq!(identity.id.as_deref(), Some("web"));
        assert_eq!(name, format!("tetherd-web-{}", identity.generation));
        assert_eq!(identity.nics.len(), 1);
        assert_eq!(spec.vmgenid.len(), 36);
        // QEMU would create the file; the VM's end removes it.
        fs::create_dir_all(s.dir.path().join("shm")).unwrap();
        fs::write(&spec.memory.path, b"ram").unwrap();
        vm.exit_with(VmExit {
            code: Some(0),
            signal: None,
        });
        for _ in 0..100 {
            if !spec.memory.path.exists() {
                break;
            }
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        assert!(!spec.memory.path.exists(), "the RAM file outlived its VM");
    });
}

#[test]
fn fork_children_are_named_numbered_and_reserved() {
    let s = setup(false);
    smol::block_on(async {
        s.vms.create(request("web", &["sh"])).await.unwrap();
        let parent = s.vms.forkable("web").unwrap();
        let req = super::fork::ForkRequest {
            children: 3,
            names: vec!["db".into()],
            hostnames: Vec::new(),
        };
        let children = s.vms.reserve_children(&parent, &req).unwrap();
        assert_eq!(
            children,
            [("db".into(), 1), ("web-2".into(), 2), ("web-3".into(), 3)]
        );
        // One fork at a time; the names are taken meanwhile.
        let again = s.vms.reserve_children(&parent, &req).unwrap_err();
        assert!(again.to_string().contains("being forked"), "{again}");
        s.vms.end_fork("web");
        let taken = s.vms.reserve_children(&parent, &req).unwrap_err();
        assert!(taken.to_string().contains("container db exists"), "{taken}");
        // The next fork numbers on: web-4.
        let next = super::fork::ForkRequest {
            children: 1,
            ..Default::default()
        };
        let more = s.vms.reserve_children(&parent, &next).unwrap();
        assert_eq!(more, [("web-4".into(), 4)]);
        s.vms.end_fork("web");
        // A child that never ran goes without a trace.
        s.vms.drop_child("web-4");
        assert!(s.vms.watch("web-4").is_none());
        assert!(
            s.vms.forkable("web-3").is_err(),
            "a child not started is no parent"
        );
        let unknown = s.vms.forkable("nope").err().unwrap();
        assert!(matches!(unknown, ApiError::NotFound(_)), "{unknown}");
    });
}

#[test]
fn a_guest_that_refuses_to_quiesce_fails_the_fork_and_frees_the_names() {
    let s = setup(false);
    smol::block_on(async {
        s.vms.create(request("web", &["sh"])).await.unwrap();
        // A link for the VM's guest (its pinned key) that refuses fork@tether,
        // as a guest that predates fork does.
        let shared = s.vms.appliance.shared.clone();
        let key = fs::read_to_string(s.dir.path().join("vms/web/guest.pub")).unwrap();
        let key = PublicKey::from_openssh(key.trim()).unwrap();
        let (tx, rx) = async_channel::unbounded();
        shared.link_up(7, tx);
        let info = proto_core::tether::ContainerInfo {
            id: "web".into(),
            kind: proto_core::tether::Kind::Primary,
            state: proto_core::tether::State::Running,
            exit_status: 0,
            output_end: 0,
            tty: false,
        };
        shared.update(7, Some(key), vec![info]);
        let guest = smol::spawn(async move {
            while let Ok(command) = rx.recv().await {
                if let crate::guestlink::LinkCommand::Fork { mode, reply } = command {
                    assert_eq!(mode, proto_core::tether::ForkMode::Quiesce);
                    let _ = reply.send(Ok((false, None))).await;
                }
            }
        });
        let req = super::fork::ForkRequest {
            children: 2,
            ..Default::default()
        };
        let err = s
            .vms
            .fork("web", req.clone(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Refused(_)), "{err}");
        assert!(
            err.to_string().contains("the guest does not support fork"),
            "{err}"
        );
        // Nothing is left of the children; the names are free again.
        assert!(!s.dir.path().join("vms/web-1").exists());
        assert!(
            s.vms
                .node()
                .await
                .unwrap()
                .vms
                .iter()
                .all(|v| v.id == "web")
        );
        let parent = s.vms.forkable("web").unwrap();
        let again = s.vms.reserve_children(&parent, &req).unwrap();
        assert_eq!(again, [("web-1".into(), 1), ("web-2".into(), 2)]);
        shared.link_gone(7);
        drop(guest);
    });
}
