//! Mounting: the kernel filesystems PID 1 mounts first (proc, sysfs, devtmpfs,
//! devpts, /dev/shm, /run, /tmp, cgroup2), the few mount syscalls everything
//! else uses, each behind a function named for its purpose, and the mount
//! table (`/proc/self/mountinfo`).

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// A mount that failed, naming what and where.
#[derive(Debug, thiserror::Error)]
#[error("mount {what} on {target}: {source}")]
pub struct MountError {
    pub what: String,
    pub target: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One of the filesystems every Linux userland expects.
struct Early {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// In order: proc first (the mount table is read from it), /dev before what
/// lives in it, /sys before the cgroup tree inside it.
const EARLY: &[Early] = &[
    Early {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Early {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Early {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    Early {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        // Its own instance, with a ptmx anyone may open (as /dev/ptmx links to).
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    Early {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Early {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
    Early {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Early {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
];

/// The filesystems mounted at boot that move into a configured root.
pub const API_FILESYSTEMS: &[&str] = &["/dev", "/proc", "/sys", "/run", "/tmp"];

/// Mounts the early filesystems under `root` ("/" at boot), tolerating any
/// already mounted (by an initramfs script, or a kernel that mounts
/// devtmpfs itself), then the /dev links programs expect. Returns what failed:
/// the caller logs it once the console works (a degraded VM that says why is
/// more use than one that stops).
pub fn mount_early(root: &Path) -> Vec<MountError> {
    let mut failed = Vec::new();
    for fs in EARLY {
        let target = under(root, fs.target);
        let mounted = mount_points().unwrap_or_default();
        if mounted
            .iter()
            .any(|m| m.target == target && m.fstype == fs.fstype)
            || (fs.fstype == "proc" && target.join("self").exists())
        {
            continue;
        }
        let result = std::fs::create_dir_all(&target).and_then(|()| {
            mount_fs(fs.source, &target, fs.fstype, fs.flags, fs.data).or_else(|e| {
                // Mounted already, where we could not see it in the table.
                if e.raw_os_error() == Some(Errno::EBUSY as i32) {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        });
        if let Err(source) = result {
            failed.push(MountError {
                what: format!("{} ({})", fs.source, fs.fstype),
                target,
                source,
            });
        }
    }
    if let Err(source) = link_dev_entries(&under(root, "/dev")) {
        failed.push(MountError {
            what: "the /dev links (ptmx, fd, stdin, stdout, stderr)".into(),
            target: under(root, "/dev"),
            source,
        });
    }
    failed
}

/// `/dev/ptmx` -> `pts/ptmx` (the devpts instance we mounted), and the
/// `/dev/fd`, `/dev/std*` links devtmpfs does not make.
fn link_dev_entries(dev: &Path) -> io::Result<()> {
    let links = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, to) in links {
        let at = dev.join(name);
        match std::fs::read_link(&at) {
            Ok(existing) if existing == Path::new(to) => continue,
            _ => {}
        }
        if name == "ptmx" || !at.exists() {
            let _ = std::fs::remove_file(&at);
            std::os::unix::fs::symlink(to, &at)?;
        }
    }
    Ok(())
}

/// `path` (absolute) inside `root`.
pub fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Mounts a filesystem.
pub fn mount_fs(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> io::Result<()> {
    let data = (!data.is_empty()).then_some(data);
    nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(io::Error::from)
}

/// Moves a mount (and everything mounted under it) to another place.
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(io::Error::from)
}

/// Makes `from` also visible at `to`.
pub fn bind_mount(from: &Path, to: &Path) -> io::Result<()> {
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(io::Error::from)
}

/// Unmounts, failing with EBUSY while something uses the filesystem.
pub fn unmount(target: &Path) -> Result<(), Errno> {
    nix::mount::umount2(target, MntFlags::empty())
}

/// Detaches a mount now; the kernel frees it when its last user goes.
pub fn unmount_lazily(target: &Path) -> Result<(), Errno> {
    nix::mount::umount2(target, MntFlags::MNT_DETACH)
}

/// Makes the root filesystem read-only (before power-off, so a disk is clean).
pub fn remount_root_read_only() -> Result<(), Errno> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
}

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The current mount table, in the order the mounts were made (this
/// thread's: a thread may have a mount namespace of its own).
pub fn mount_points() -> io::Result<Vec<MountPoint>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/thread-self/mountinfo",
    )?))
}

/// Parses `/proc/self/mountinfo` (proc(5)): the mount point is field 5, the
/// filesystem type and source follow the ` - ` separator; spaces and other
/// awkward bytes in paths are octal escapes (`\040`).
pub fn parse_mountinfo(text: &str) -> Vec<MountPoint> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let target = head.split(' ').nth(4)?;
            let mut tail = tail.split(' ');
            let fstype = tail.next()?;
            let source = tail.next().unwrap_or("");
            Some(MountPoint {
                target: PathBuf::from(unescape_octal(target)),
                fstype: unescape_octal(fstype),
                source: unescape_octal(source),
            })
        })
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.len() >= i + 4
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystem `path` lives on is held in memory only (tmpfs or ramfs):
/// what is written there never reaches a disk.
pub fn is_in_memory(path: &Path) -> io::Result<bool> {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    let kind = statfs(path).map_err(io::Error::from)?.filesystem_type();
    // ramfs (an initramfs root) has no constant in libc: linux/magic.h.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_table_is_parsed_with_escapes() {
        let text = "\
22 1 0:21 / / rw,relatime shared:1 - rootfs rootfs rw
23 22 0:22 / /proc rw,nosuid,nodev,noexec shared:2 - proc proc rw
40 22 253:16 / /data\\040disk rw,noatime shared:9 - ext4 /dev/vdb rw
41 22 0:40 / /run/secrets rw master:3 - tmpfs tmpfs rw,mode=755
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].target, Path::new("/proc"));
        assert_eq!(m[2].target, Path::new("/data disk"));
        assert_eq!(
            (m[2].fstype.as_str(), m[2].source.as_str()),
            ("ext4", "/dev/vdb")
        );
        assert_eq!(m[3].fstype, "tmpfs");
    }

    #[test]
    fn paths_nest_under_a_root() {
        assert_eq!(
            under(Path::new("/newroot"), "/dev/pts"),
            Path::new("/newroot/dev/pts")
        );
        assert_eq!(under(Path::new("/"), "/proc"), Path::new("/proc"));
    }

    #[test]
    fn the_early_table_mounts_parents_first() {
        for (i, fs) in EARLY.iter().enumerate() {
            for later in &EARLY[i + 1..] {
                assert!(
                    !Path::new(fs.target).starts_with(later.target),
                    "{} is mounted before its parent {}",
                    fs.target,
                    later.target
                );
            }
        }
    }

    #[test]
    fn dev_links_point_where_programs_look() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ptmx"), b"").unwrap();
        link_dev_entries(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("ptmx")).unwrap(),
            Path::new("pts/ptmx")
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("stderr")).unwrap(),
            Path::new("/proc/self/fd/2")
        );
        link_dev_entries(dir.path()).unwrap(); // idempotent
    }
}
