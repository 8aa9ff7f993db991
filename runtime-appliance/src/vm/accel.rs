//! Which accelerator VMs run on: KVM when it works on this host, else TCG.
//!
//! "Works" is tried for real. A host can have a `/dev/kvm` that opens and
//! creates VMs while the guest then never boots (broken nested virtualisation),
//! so after the cheap ioctl checks the probe boots the kernel under KVM with
//! no root filesystem and expects its panic within a few seconds. The answer
//! is cached per host boot, since it does not change until then.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// An accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's binary translator (slow, works everywhere).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// What `--accel` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if the probe says it works, else TCG.
    Auto,
    /// This one, unprobed.
    Fixed(Accel),
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Fixed(Accel::Kvm)),
            "tcg" => Ok(Self::Fixed(Accel::Tcg)),
            _ => Err(format!("{s:?}: expected auto, kvm or tcg")),
        }
    }
}

/// How long a kernel may take to reach its panic under working KVM.
const BOOT_PROBE_LIMIT: Duration = Duration::from_secs(8);

/// The probe's answer and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probed {
    pub accel: Accel,
    pub reason: String,
}

/// The cached answer: valid for one host boot, one QEMU and one kernel.
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    qemu: String,
    kernel: String,
    probed: Probed,
}

/// Decides the accelerator: `cache` (a file) keeps the answer until the host
/// reboots. Blocking: it may boot a kernel for a few seconds.
pub fn probe(qemu: &Path, kernel: &Path, cache: &Path) -> Probed {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let key = |c: &Cached| {
        c.boot_id == boot_id
            && !boot_id.is_empty()
            && c.qemu == qemu.display().to_string()
            && c.kernel == kernel.display().to_string()
    };
    if let Some(cached) = fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
        .filter(key)
    {
        return cached.probed;
    }
    let probed = match kvm_device_works().and_then(|()| {
        let dir = cache.parent().unwrap_or(Path::new("."));
        boot_probe(qemu, kernel, dir, BOOT_PROBE_LIMIT)
    }) {
        Ok(took) => Probed {
            accel: Accel::Kvm,
            reason: format!("a kernel booted under KVM in {:.1} s", took.as_secs_f64()),
        },
        Err(why) => Probed {
            accel: Accel::Tcg,
            reason: why,
        },
    };
    let cached = Cached {
        boot_id,
        qemu: qemu.display().to_string(),
        kernel: kernel.display().to_string(),
        probed: probed.clone(),
    };
    if let Ok(text) = serde_json::to_vec_pretty(&cached) {
        let _ = fs::write(cache, text);
    }
    probed
}

nix::ioctl_none_bad!(kvm_get_api_version, nix::request_code_none!(0xAE, 0x00));
nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));
nix::ioctl_write_int_bad!(kvm_create_vcpu, nix::request_code_none!(0xAE, 0x41));

/// `/dev/kvm` opens, speaks API version 12, and creates a VM with a vCPU.
pub fn kvm_device_works() -> Result<(), String> {
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let version = unsafe { kvm_get_api_version(kvm.as_raw_fd()) }
        .map_err(|e| format!("/dev/kvm: KVM_GET_API_VERSION: {e}"))?;
    if version != 12 {
        return Err(format!("/dev/kvm speaks API version {version}, not 12"));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value and returns a
    // new file descriptor, which is owned here from then on.
    let vm = unsafe { kvm_create_vm(kvm.as_raw_fd(), 0) }
        .map_err(|e| format!("/dev/kvm: KVM_CREATE_VM: {e}"))?;
    // SAFETY: `vm` was just returned by the kernel and nothing else owns it.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    // SAFETY: KVM_CREATE_VCPU takes the vCPU id by value and returns a new fd.
    let vcpu = unsafe { kvm_create_vcpu(vm.as_raw_fd(), 0) }
        .map_err(|e| format!("/dev/kvm: KVM_CREATE_VCPU: {e}"))?;
    // SAFETY: as above, a fresh descriptor owned here.
    drop(unsafe { OwnedFd::from_raw_fd(vcpu) });
    Ok(())
}

/// Boots `kernel` under KVM with the CPU model VMs use; it has no root
/// filesystem, so it panics, and `panic=-1` with `-no-reboot` ends QEMU.
/// Returns how long that took.
pub fn boot_probe(
    qemu: &Path,
    kernel: &Path,
    dir: &Path,
    limit: Duration,
) -> Result<Duration, String> {
    let log = dir.join("kvm-probe.log");
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", qemu.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "a kernel did not boot under KVM within {limit:?} (broken nested virtualisation?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let console = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    if status.success() && console.contains("Kernel panic") {
        return Ok(took);
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let last = stderr.lines().last().unwrap_or("").trim().to_owned();
    Err(format!("QEMU under KVM failed ({status}): {last}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_choices_parse() {
        assert_eq!("auto".parse(), Ok(AccelChoice::Auto));
        assert_eq!("kvm".parse(), Ok(AccelChoice::Fixed(Accel::Kvm)));
        assert_eq!("tcg".parse(), Ok(AccelChoice::Fixed(Accel::Tcg)));
        assert!("xen".parse::<AccelChoice>().unwrap_err().contains("xen"));
    }

    #[test]
    fn a_cached_answer_is_used_for_the_same_boot_qemu_and_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("accel.json");
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        let cached = Cached {
            boot_id: boot_id.trim().into(),
            qemu: "/nonexistent/qemu".into(),
            kernel: "/nonexistent/vmlinuz".into(),
            probed: Probed {
                accel: Accel::Kvm,
                reason: "cached".into(),
            },
        };
        fs::write(&cache, serde_json::to_vec(&cached).unwrap()).unwrap();
        let got = probe(
            Path::new("/nonexistent/qemu"),
            Path::new("/nonexistent/vmlinuz"),
            &cache,
        );
        assert_eq!(got.reason, "cached");
        // Another kernel: probed again; no QEMU at that path means TCG.
        let got = probe(
            Path::new("/nonexistent/qemu"),
            Path::new("/nonexistent/other"),
            &cache,
        );
        assert_eq!(got.accel, Accel::Tcg);
    }
}
