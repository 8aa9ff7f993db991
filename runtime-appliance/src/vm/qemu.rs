//! The QEMU backend: the command line a `VmSpec` becomes, starting
//! `qemu-system-x86_64` in the VM's directory, and the handle that waits for
//! it, kills it and reaches its QMP socket.
//!
//! One thread per VM waits for QEMU with `waitid(WNOWAIT)` and reaps it only
//! while holding the exit lock, so `kill` can never signal a reused pid.

use std::ffi::OsString;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use super::{Accel, Nic, Qmp, Vm, VmBackend, VmError, VmExit, VmFuture, VmSpec};

/// Kernel arguments that shorten the boot: no timer calibration or checks,
/// no crypto self-tests, no PS/2 probing, two serial ports, no audit.
const FAST_BOOT: &[&str] = &[
    "tsc=reliable",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "cryptomgr.notests",
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
    "noreplace-smp",
    "8250.nr_uarts=2",
    "audit=0",
];

/// How long QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Boots VMs with `qemu-system-x86_64`.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    /// The QEMU binary.
    pub qemu: PathBuf,
    pub accel: Accel,
}

impl QemuBackend {
    /// A backend running `qemu` on `accel`.
    pub fn new(qemu: PathBuf, accel: Accel) -> Self {
        Self { qemu, accel }
    }

    /// QEMU's arguments for `spec` (see docs/API.md, "How a VM is booted").
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["-accel", self.accel.as_str()]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        let memory = spec.memory_mib.to_string();
        let cpus = format!("{},maxcpus={}", spec.cpus, spec.max_cpus.max(spec.cpus));
        push(&["-m", &memory, "-smp", &cpus]);
        // RAM in a file: a fork's children map it copy-on-write.
        let ram = format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
            spec.memory_mib,
            escape(&spec.memory.path),
            if spec.memory.shared { "on" } else { "off" }
        );
        push(&["-machine", "memory-backend=mem", "-object", &ram]);
        let vmgenid = format!("vmgenid,guid={}", spec.vmgenid);
        push(&["-device", &vmgenid]);
        push(&["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"]);
        let mut append = vec!["console=ttyS1", "quiet", "panic=-1"];
        append.extend(FAST_BOOT);
        if self.accel == Accel::Tcg {
            // A binary translator does not speculate: the mitigations only cost time.
            append.push("mitigations=off");
        }
        append.extend(spec.append.iter().map(String::as_str));
        let append = append.join(" ");
        a.push("-kernel".into());
        a.push(spec.kernel.clone().into());
        a.push("-initrd".into());
        a.push(spec.initrd.clone().into());
        a.push("-append".into());
        a.push(append.into());
        // ttyS0 is the link; QEMU reconnects if tetherd restarts.
        a.push("-serial".into());
        a.push(format!("tcp:{},reconnect=1,nodelay=on", spec.link).into());
        // ttyS1 is the console.
        a.push("-serial".into());
        a.push(format!("file:{}", escape(&spec.console_log())).into());
        a.push("-fw_cfg".into());
        a.push(format!("name=opt/tether/config,file={}", escape(&spec.config)).into());
        a.push("-fw_cfg".into());
        a.push(format!("name=opt/tether/identity,file={}", escape(&spec.identity)).into());
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", escape(&spec.qmp_socket())).into());
        for (i, nic) in spec.nics.iter().enumerate() {
            match nic {
                Nic::User { mac } => {
                    a.push("-netdev".into());
                    // Each user network its own subnet, so DHCP on one does not
                    // hand out the address another NIC has.
                    let net = if i == 0 {
                        String::new()
                    } else {
                        format!(",net=10.0.{}.0/24", (2 + i).min(254))
                    };
                    a.push(format!("user,id=n{i},restrict=on{net}").into());
                    a.push("-device".into());
                    a.push(format!("virtio-net-pci,netdev=n{i},mac={mac}").into());
                }
            }
        }
        for share in &spec.shares {
            a.push("-virtfs".into());
            a.push(
                format!(
                    "local,path={},mount_tag={},security_model=none",
                    escape(&share.path),
                    share.tag
                )
                .into(),
            );
        }
        for disk in &spec.disks {
            a.push("-drive".into());
            a.push(format!("file={},if=virtio,format=raw", escape(disk)).into());
        }
        if spec.incoming {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a
    }
}

/// A path as the value of a QEMU `key=value` option: commas are doubled.
/// (Paths given as whole arguments, `-kernel` and `-initrd`, cannot contain
/// commas at all; the request checks refuse them.)
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl VmBackend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> VmFuture<'a, Result<Box<dyn Vm>, VmError>> {
        Box::pin(async move {
            let vm = self.spawn(spec)?;
            let started = Instant::now();
            let socket = spec.qmp_socket();
            loop {
                if let Some(exit) = vm.try_wait() {
                    let log = fs::read_to_string(spec.dir.join("qemu.log")).unwrap_or_default();
                    let log = log.lines().rev().take(5).collect::<Vec<_>>();
                    let log = log.into_iter().rev().collect::<Vec<_>>().join(" | ");
                    return Err(VmError::StartFailed { exit, log });
                }
                if socket.exists() {
                    return Ok(Box::new(vm) as Box<dyn Vm>);
                }
                if started.elapsed() > START_TIMEOUT {
                    let _ = vm.kill();
                    return Err(VmError::Unavailable(format!(
                        "QEMU did not open {} within {START_TIMEOUT:?}",
                        socket.display()
                    )));
                }
                smol::Timer::after(Duration::from_millis(20)).await;
            }
        })
    }
}

impl QemuBackend {
    fn spawn(&self, spec: &VmSpec) -> Result<QemuVm, VmError> {
        let _ = fs::remove_file(spec.qmp_socket());
        let log_path = spec.dir.join("qemu.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| VmError::io(log_path.display().to_string(), e))?;
        let err = log
            .try_clone()
            .map_err(|e| VmError::io(log_path.display().to_string(), e))?;
        let child = Command::new(&self.qemu)
            .args(self.args(spec))
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: a ctrl-c meant for tetherd's terminal
            // does not reach the VMs.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                let what = format!("starting {}", self.qemu.display());
                if e.kind() == std::io::ErrorKind::NotFound {
                    VmError::Unavailable(format!(
                        "{what}: not found (install QEMU: apt-get install qemu-system-x86)"
                    ))
                } else {
                    VmError::io(what, e)
                }
            })?;
        let pid = child.id();
        let _ = fs::write(spec.dir.join("qemu.pid"), format!("{pid}\n"));
        let exit = Arc::new(ExitCell::default());
        let cell = exit.clone();
        std::thread::Builder::new()
            .name(format!("qemu-{pid}"))
            .spawn(move || reap(child, &cell))
            .map_err(|e| VmError::io("starting the QEMU waiter thread", e))?;
        Ok(QemuVm {
            pid,
            qmp: spec.qmp_socket(),
            exit,
        })
    }
}

/// A VM's exit, once known, and who to tell.
#[derive(Default)]
struct ExitCell {
    exit: Mutex<Option<VmExit>>,
    changed: Event,
}

impl ExitCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<VmExit>> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits for QEMU to exit; reaps it under the exit lock.
fn reap(mut child: Child, cell: &ExitCell) {
    let pid = Pid::from_raw(child.id() as i32);
    while let Err(nix::errno::Errno::EINTR) =
        waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
    {}
    let mut exit = cell.lock();
    let status = child.wait();
    *exit = Some(match status {
        Ok(s) => VmExit {
            code: s.code(),
            signal: s.signal(),
        },
        Err(_) => VmExit {
            code: None,
            signal: None,
        },
    });
    drop(exit);
    cell.changed.notify(usize::MAX);
}

/// A QEMU process.
pub struct QemuVm {
    pid: u32,
    qmp: PathBuf,
    exit: Arc<ExitCell>,
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&self) -> Option<VmExit> {
        *self.exit.lock()
    }

    fn wait(&self) -> VmFuture<'_, VmExit> {
        Box::pin(async move {
            loop {
                let listener = self.exit.changed.listen();
                if let Some(exit) = self.try_wait() {
                    return exit;
                }
                listener.await;
            }
        })
    }

    fn kill(&self) -> Result<(), VmError> {
        let exit = self.exit.lock();
        if exit.is_none() {
            // Not reaped yet (the waiter reaps under this lock): the pid is still QEMU's.
            kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL)
                .map_err(|e| VmError::io(format!("killing QEMU (pid {})", self.pid), e.into()))?;
        }
        Ok(())
    }

    fn qmp(&self) -> VmFuture<'_, Result<Qmp, VmError>> {
        Box::pin(async move { Ok(Qmp::connect(&self.qmp).await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{Memory, Share};

    fn spec() -> VmSpec {
        VmSpec {
            id: "web".into(),
            dir: "/state/vms/web".into(),
            kernel: "/boot/vmlinuz".into(),
            initrd: "/cache/initramfs.cpio.gz".into(),
            append: vec!["tether.debug=1".into()],
            cpus: 2,
            max_cpus: 4,
            memory_mib: 512,
            config: "/state/vms/web/config.json".into(),
            link: "127.0.0.1:2377".parse().unwrap(),
            nics: vec![
                Nic::User {
                    mac: "52:54:00:12:34:56".into(),
                },
                Nic::User {
                    mac: "52:54:00:12:34:57".into(),
                },
            ],
            disks: vec!["/images/root.img".into()],
            shares: vec![Share {
                tag: "rootfs".into(),
                path: "/srv/rootfs".into(),
            }],
            memory: Memory {
                path: "/dev/shm/tetherd-web-7".into(),
                shared: true,
            },
            vmgenid: "8c5a4e1e-4c0b-4f4e-9a55-0d6f8a1b2c3d".into(),
            identity: "/state/vms/web/identity".into(),
            incoming: false,
        }
    }

    #[test]
    fn the_command_line_follows_the_contract() {
        let backend = QemuBackend::new("qemu-system-x86_64".into(), Accel::Tcg);
        let args: Vec<String> = backend
            .args(&spec())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert_eq!(
            line,
            "-accel tcg -m 512 -smp 2,maxcpus=4 -machine memory-backend=mem \
             -object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/tetherd-web-7,share=on \
             -device vmgenid,guid=8c5a4e1e-4c0b-4f4e-9a55-0d6f8a1b2c3d -nographic -nodefaults -no-user-config -no-reboot \
             -kernel /boot/vmlinuz -initrd /cache/initramfs.cpio.gz \
             -append console=ttyS1 quiet panic=-1 tsc=reliable no_timer_check \
             rcupdate.rcu_expedited=1 cryptomgr.notests i8042.noaux i8042.nokbd i8042.nopnp \
             noreplace-smp 8250.nr_uarts=2 audit=0 mitigations=off tether.debug=1 \
             -serial tcp:127.0.0.1:2377,reconnect=1,nodelay=on \
             -serial file:/state/vms/web/console.log \
             -fw_cfg name=opt/tether/config,file=/state/vms/web/config.json \
             -fw_cfg name=opt/tether/identity,file=/state/vms/web/identity \
             -qmp unix:/state/vms/web/qmp.sock,server=on,wait=off \
             -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 \
             -netdev user,id=n1,restrict=on,net=10.0.3.0/24 \
             -device virtio-net-pci,netdev=n1,mac=52:54:00:12:34:57 \
             -virtfs local,path=/srv/rootfs,mount_tag=rootfs,security_model=none \
             -drive file=/images/root.img,if=virtio,format=raw"
        );
        // A fork's child maps the template privately and waits for the state.
        let mut child = spec();
        child.memory.shared = false;
        child.incoming = true;
        let line = backend.args(&child).join(std::ffi::OsStr::new(" "));
        let line = line.to_string_lossy();
        assert!(
            line.contains("mem-path=/dev/shm/tetherd-web-7,share=off "),
            "{line}"
        );
        assert!(line.ends_with(" -incoming defer"), "{line}");
        let kvm = QemuBackend::new("qemu-system-x86_64".into(), Accel::Kvm);
        let args = kvm.args(&spec());
        assert_eq!(
            &args[..4],
            &["-accel", "kvm", "-cpu", "host"].map(OsString::from)
        );
    }

    #[test]
    fn a_missing_qemu_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.dir = dir.path().into();
        let backend = QemuBackend::new("/nonexistent/qemu-system-x86_64".into(), Accel::Tcg);
        let err = smol::block_on(backend.start(&s)).err().unwrap();
        assert!(
            err.to_string().contains("apt-get install qemu-system-x86"),
            "{err}"
        );
    }

    #[test]
    fn a_hypervisor_that_exits_at_once_is_a_start_failure_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.dir = dir.path().into();
        // `false` stands in for a QEMU that rejects its command line.
        let backend = QemuBackend::new("/bin/false".into(), Accel::Tcg);
        let err = smol::block_on(backend.start(&s)).err().unwrap();
        match err {
            VmError::StartFailed { exit, .. } => assert_eq!(exit.code, Some(1)),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn kill_and_wait_see_the_same_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.dir = dir.path().into();
        // A stand-in that "opens" its QMP socket and then runs until killed.
        let script = dir.path().join("fake-qemu");
        fs::write(&script, "#!/bin/sh\ntouch qmp.sock\nexec sleep 60\n").unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let backend = QemuBackend::new(script, Accel::Tcg);
        smol::block_on(async {
            let vm = backend.start(&s).await.unwrap();
            assert_eq!(vm.try_wait(), None);
            vm.kill().unwrap();
            let exit = vm.wait().await;
            assert_eq!(exit.signal, Some(9));
            // Killing an exited VM is a no-op.
            vm.kill().unwrap();
            assert_eq!(vm.try_wait(), Some(exit));
        });
    }
}
