//! VMs an earlier tetherd started and left running (QEMU outlives tetherd
//! and reconnects its link): found through their directory's `qemu.pid`,
//! watched by polling since they are not our children, stopped over QMP.
//! A process counts as the VM only while its command line names the VM's
//! own QMP socket, so a reused pid is never taken for it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Qmp, Vm, VmError, VmExit, VmFuture};

/// How often an adopted VM is checked for having exited.
const POLL: Duration = Duration::from_millis(250);

/// A QEMU this tetherd did not start.
pub struct AdoptedVm {
    pid: u32,
    qmp: PathBuf,
    /// The accelerator on its command line.
    pub accel: &'static str,
    exit: Mutex<Option<VmExit>>,
}

/// The VM of directory `dir`: running (its QEMU is alive) or exited (how,
/// if `exit.json` says). `None` if the directory never had a QEMU.
pub fn adopt(dir: &Path) -> Option<AdoptedVm> {
    let pid = fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    let qmp = dir.join("qmp.sock");
    let cmdline = command_line(pid, &qmp);
    let accel = match cmdline.as_deref() {
        Some(args) if args.windows(2).any(|w| w == ["-accel", "kvm"]) => "kvm",
        _ => "tcg",
    };
    let exit = match cmdline {
        Some(_) => None,
        None => Some(
            fs::read(dir.join("exit.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(VmExit {
                    code: None,
                    signal: None,
                }),
        ),
    };
    Some(AdoptedVm {
        pid,
        qmp,
        accel,
        exit: Mutex::new(exit),
    })
}

/// `pid`'s arguments, if it is the QEMU serving `qmp`.
fn command_line(pid: u32, qmp: &Path) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let needle = qmp.display().to_string();
    args.iter().any(|a| a.contains(&needle)).then_some(args)
}

impl AdoptedVm {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<VmExit>> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Vm for AdoptedVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&self) -> Option<VmExit> {
        let mut exit = self.lock();
        if exit.is_none() && command_line(self.pid, &self.qmp).is_none() {
            // Not our child: how it ended is not ours to know.
            *exit = Some(VmExit {
                code: None,
                signal: None,
            });
        }
        *exit
    }

    fn wait(&self) -> VmFuture<'_, VmExit> {
        Box::pin(async move {
            loop {
                if let Some(exit) = self.try_wait() {
                    return exit;
                }
                smol::Timer::after(POLL).await;
            }
        })
    }

    fn kill(&self) -> Result<(), VmError> {
        if self.try_wait().is_none() {
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

    #[test]
    fn a_directory_whose_process_is_not_its_qemu_is_an_exited_vm() {
        let dir = tempfile::tempdir().unwrap();
        assert!(adopt(dir.path()).is_none(), "no qemu.pid: never had a VM");
        // Our own pid is alive but is not a QEMU serving this directory's socket.
        fs::write(dir.path().join("qemu.pid"), std::process::id().to_string()).unwrap();
        fs::write(
            dir.path().join("exit.json"),
            r#"{"code": 0, "signal": null}"#,
        )
        .unwrap();
        let vm = adopt(dir.path()).unwrap();
        assert_eq!(
            vm.try_wait(),
            Some(VmExit {
                code: Some(0),
                signal: None
            })
        );
        vm.kill().unwrap();
    }

    #[test]
    fn a_running_process_naming_the_socket_is_adopted_until_it_exits() {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        // A stand-in whose command line names the socket, as QEMU's does.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; exit 0", "-qmp"])
            .arg(format!("unix:{},server=on", qmp.display()))
            .spawn()
            .unwrap();
        fs::write(dir.path().join("qemu.pid"), child.id().to_string()).unwrap();
        // Right after spawn the child's command line may still be empty.
        for _ in 0..100 {
            if command_line(child.id(), &qmp).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let vm = adopt(dir.path()).unwrap();
        assert_eq!(vm.try_wait(), None);
        vm.kill().unwrap();
        let _ = child.wait();
        let exit = smol::block_on(vm.wait());
        assert_eq!(
            exit,
            VmExit {
                code: None,
                signal: None
            }
        );
    }
}
