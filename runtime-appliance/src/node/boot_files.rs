//! The kernel and initramfs VMs boot by default: the ones `tetherd serve` was
//! given, else Debian's kernel with the initramfs `scripts/build-initramfs`
//! builds (and caches) for the `tether` binary next to `tetherd`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Environment variable naming the build script (else it is looked for near
/// the `tetherd` binary, as in a checkout: `target/release/../../scripts/`).
pub const SCRIPT_ENV: &str = "TETHER_BUILD_INITRAMFS";

/// What a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Resolves the defaults (blocking: it may build an initramfs).
pub fn resolve(kernel: Option<&Path>, initrd: Option<&Path>) -> Result<BootFiles, String> {
    match (kernel, initrd) {
        (Some(k), Some(i)) => Ok(BootFiles {
            kernel: k.into(),
            initrd: i.into(),
        }),
        (None, Some(i)) => Ok(BootFiles {
            kernel: newest_kernel().ok_or_else(|| {
                "no kernel in /boot: give --kernel FILE, or install one: apt-get install linux-image-amd64"
                    .to_string()
            })?,
            initrd: i.into(),
        }),
        (kernel, None) => {
            let built = run_script(kernel)?;
            Ok(BootFiles {
                kernel: kernel.map(Path::to_path_buf).unwrap_or(built.kernel),
                initrd: built.initrd,
            })
        }
    }
}

/// The newest `/boot/vmlinuz-*` whose modules are installed.
pub fn newest_kernel() -> Option<PathBuf> {
    let mut kernels: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Path::new("/lib/modules")
                .join(&version)
                .join("modules.dep")
                .exists()
                .then(|| (version_key(&version), e.path()))
        })
        .collect();
    kernels.sort();
    kernels.pop().map(|(_, p)| p)
}

/// Numbers in a version string, for ordering (`6.1.0-57` -> [6, 1, 0, 57]).
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn find_script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SCRIPT_ENV) {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("build-initramfs"),
        dir.join("../../scripts/build-initramfs"),
        dir.join("../../../scripts/build-initramfs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The `tether` a VM gets: the one next to `tetherd`, or in a checkout the
/// smaller build of the guest profile (`target/guest/tether`, see the
/// workspace Cargo.toml) when it is at least as new.
fn guest_tether(tetherd: &Path) -> Option<PathBuf> {
    let sibling = tetherd.with_file_name("tether");
    let small = tetherd.parent()?.parent()?.join("guest").join("tether");
    let modified = |p: &Path| p.metadata().ok().filter(|m| m.is_file())?.modified().ok();
    match (modified(&sibling), modified(&small)) {
        (Some(a), Some(b)) if b < a => Some(sibling),
        (_, Some(_)) => Some(small),
        (Some(_), None) => Some(sibling),
        (None, None) => None,
    }
}

fn run_script(kernel: Option<&Path>) -> Result<BootFiles, String> {
    let script = find_script().ok_or_else(|| {
        format!(
            "no initramfs: give `tetherd serve --initrd FILE` (scripts/build-initramfs builds one), \
             or set {SCRIPT_ENV} to that script"
        )
    })?;
    let mut cmd = Command::new(&script);
    cmd.arg("--no-install");
    if let Some(tether) = std::env::current_exe().ok().and_then(|e| guest_tether(&e)) {
        cmd.arg("--tether").arg(tether);
    }
    if let Some(kernel) = kernel {
        let version = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or_else(|| {
                format!(
                    "--kernel {}: give --initrd too (only a /boot/vmlinuz-VERSION kernel gets a built initramfs)",
                    kernel.display()
                )
            })?;
        cmd.args(["--kernel-version", version]);
    }
    tracing::info!(script = %script.display(), "finding the initramfs (building it if needed)");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = stderr.lines().rev().take(3).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            last.join(" | ")
        ));
    }
    parse_script_output(&stdout).ok_or_else(|| {
        format!(
            "{} printed no kernel and initramfs: {stdout}",
            script.display()
        )
    })
}

/// `kernel PATH` and `initramfs PATH` lines.
fn parse_script_output(text: &str) -> Option<BootFiles> {
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .map(|p| PathBuf::from(p.trim()))
    };
    Some(BootFiles {
        kernel: line("kernel")?,
        initrd: line("initramfs")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_profile_build_is_taken_when_it_is_as_new() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("release");
        let guest = dir.path().join("guest");
        std::fs::create_dir_all(&release).unwrap();
        std::fs::create_dir_all(&guest).unwrap();
        let tetherd = release.join("tetherd");
        assert_eq!(guest_tether(&tetherd), None);
        std::fs::write(release.join("tether"), "").unwrap();
        assert_eq!(guest_tether(&tetherd), Some(release.join("tether")));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(guest.join("tether"), "").unwrap();
        assert_eq!(guest_tether(&tetherd), Some(guest.join("tether")));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(release.join("tether"), "x").unwrap();
        assert_eq!(guest_tether(&tetherd), Some(release.join("tether")));
    }

    #[test]
    fn script_output_and_versions() {
        let out = "kernel /boot/vmlinuz-6.1.0-57-amd64\ninitramfs /c/initramfs-6.1.0-57-amd64-real-ab.cpio.gz\n";
        assert_eq!(
            parse_script_output(out),
            Some(BootFiles {
                kernel: "/boot/vmlinuz-6.1.0-57-amd64".into(),
                initrd: "/c/initramfs-6.1.0-57-amd64-real-ab.cpio.gz".into(),
            })
        );
        assert_eq!(parse_script_output("kernel /k\n"), None);
        assert!(version_key("6.1.0-57-amd64") > version_key("6.1.0-9-amd64"));
    }

    #[test]
    fn given_files_are_used_as_they_are() {
        let files = resolve(Some(Path::new("/k")), Some(Path::new("/i"))).unwrap();
        assert_eq!(files.kernel, Path::new("/k"));
        let err = resolve(Some(Path::new("/opt/bzImage")), None);
        if let Err(e) = err {
            assert!(e.contains("initrd") || e.contains("initramfs"), "{e}");
        }
    }
}
